"""Routing counters on a real server: a deleted and re-created subset starts empty, a subset's
drift is fresh right after traffic, and an OpenAI `user` the routing query could never name is
refused when the request is made.

One shared-engine server on `emo-demo` whose collector never runs on its own (the longest
`--routing-interval`): counts reach the book only when something reads them, so what the engine
still holds when a subset is deleted is exactly what a slow collection would leave there.
"""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from api_harness import ADMIN_KEY, Server, assert_error
from emo_serve.api.live_routing import FRESH_SECONDS
from emo_serve.usage import MAX_USER_CHARS

pytestmark = pytest.mark.vllm

BASE = "emo-demo"
SERVER_ARGS = ("--dtype", "float32", "--kv-cache-gb", "1", "--routing-interval", "3600",
               "--probe-interval", "600")


@pytest.fixture(scope="module")
def server(server_factory, tmp_path_factory: pytest.TempPathFactory) -> Server:
    server = server_factory(None, *SERVER_ARGS, state_dir=tmp_path_factory.mktemp("recreate-state"),
                            env={"EMO_ENGINE_MODE": "shared"})
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def admin(server: Server) -> httpx.Client:
    return server.client(ADMIN_KEY)


def complete(admin: httpx.Client, model: str, user: str) -> dict:
    r = admin.post("/v1/completions", json={"model": model, "prompt": "def add(a, b):", "max_tokens": 2,
                                            "temperature": 0, "user": user, "cache_salt": uuid.uuid4().hex})
    assert r.status_code == 200, r.text
    return r.json()


def tokens_of(out: dict) -> int:
    """Tokens the engine routes for one completion (the last generated token is never fed back)."""
    return out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1


def test_a_recreated_subset_starts_empty(server: Server, admin: httpx.Client) -> None:
    assert admin.post("/v1/subsets", json={"name": "s", "experts": [0, 1, 2, 3]}).status_code == 201
    complete(admin, "s", "oldtenant")
    assert admin.delete("/v1/subsets/s").status_code == 200  # the engine has not been drained yet
    assert not (server.state_dir / "usage" / "s.json").exists()
    assert admin.post("/v1/subsets", json={"name": "s", "experts": [4, 5, 6, 7]}).status_code == 201
    stats = admin.get("/v1/models/s/routing").json()
    assert stats["tokens"] == 0, stats["tokens"]
    assert_error(admin.get("/v1/models/s/routing", params={"user": "oldtenant"}), 400, param="user")
    # The new subset's own traffic is counted, exactly, and /metrics stays labelled by model name.
    out = complete(admin, "s", "newtenant")
    assert admin.get("/v1/models/s/routing").json()["tokens"] == tokens_of(out)
    assert admin.get("/v1/models/s/routing", params={"user": "newtenant"}).json()["tokens"] == tokens_of(out)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'emo_routing_mass_outside_count{model="s"}' in metrics
    assert "oldtenant" not in metrics and "newtenant" not in metrics and "@" not in metrics


def test_drift_is_fresh_right_after_traffic(admin: httpx.Client) -> None:
    """No routing query in between: the subset's GET collects the engines' counts itself, unless
    the last collection is under a second old (a client polling does not drain them each time)."""
    assert admin.post("/v1/subsets", json={"name": "fresh", "experts": [0, 1, 2, 3]}).status_code == 201
    time.sleep(FRESH_SECONDS + 0.2)  # the last collection (by the test before) is over a second old
    out = complete(admin, "fresh", "someone")
    asked = time.time()
    drift = admin.get("/v1/subsets/fresh").json()["drift"]
    assert drift["tokens"] == tokens_of(out) and drift["mass_outside"] is not None
    assert drift["collected_at"] >= asked
    assert admin.get("/v1/subsets/fresh").json()["drift"]["collected_at"] == drift["collected_at"]


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_a_user_too_long_to_query_is_refused(admin: httpx.Client, endpoint: str) -> None:
    body = {"model": BASE, "max_tokens": 1, "user": "u" * (MAX_USER_CHARS + 1)}
    body |= {"prompt": "x"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    assert_error(admin.post(endpoint, json=body), 400, param="user", contains=str(MAX_USER_CHARS))
    body["user"] = "u" * MAX_USER_CHARS  # the longest the routing query accepts is served and queryable
    assert admin.post(endpoint, json=body).status_code == 200
    r = admin.get(f"/v1/models/{BASE}/routing", params={"user": body["user"]})
    assert r.status_code == 200 and r.json()["tokens"] > 0
