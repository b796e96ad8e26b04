"""The front end without engines: auth, OpenAI-shaped errors, bounds, subset names that try to
leave the state dir, the subsets API and profiling, logs and operational routes.

A real server process (uvicorn on 127.0.0.1) with the base not served; no request here reaches
the point of starting a vLLM engine, which the last test checks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from api_harness import ADMIN_KEY, API_KEY, EXAMPLES, Server, assert_error

@pytest.fixture(scope="module")
def admin(frontend: Server) -> httpx.Client:
    return frontend.client(ADMIN_KEY)


@pytest.fixture(scope="module")
def user(frontend: Server) -> httpx.Client:
    return frontend.client(API_KEY)


@pytest.fixture(scope="module")
def explicit(admin: httpx.Client) -> dict:
    r = admin.post("/v1/subsets", json={"name": "explicit-a", "experts": [0, 1, 2, 3]})
    assert r.status_code == 201, r.text
    return r.json()


# -- operations --------------------------------------------------------------------------------
def test_operational_routes_need_no_key(frontend: Server) -> None:
    with frontend.client(None) as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").status_code == 200  # nothing to load at start
        v = c.get("/version").json()
        assert v["version"] and v["base"] == "tiny" and v["base_fingerprint"].startswith("sha256:")
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and "emo_engines_loaded 0.0" in metrics.text


def test_request_id_is_echoed_and_logged(frontend: Server, user: httpx.Client) -> None:
    r = user.get("/v1/models", headers={"X-Request-Id": "req-abc-123"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-123"
    generated = user.get("/v1/models").headers["x-request-id"]
    assert len(generated) == 32
    time.sleep(0.2)
    lines = [json.loads(l) for l in frontend.log().splitlines() if l.startswith("{")]
    mine = [l for l in lines if l.get("request_id") == "req-abc-123"]
    assert mine and mine[-1]["path"] == "/v1/models" and mine[-1]["status"] == 200 and "ms" in mine[-1]
    assert any(l.get("request_id") == generated for l in lines)


# -- auth --------------------------------------------------------------------------------------
READ_ROUTES = [("GET", "/v1/models"), ("GET", "/v1/models/tiny"), ("GET", "/v1/subsets"),
               ("GET", "/v1/subsets/explicit-a"), ("GET", "/v1/engines")]
MODEL_ROUTES = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]
ADMIN_ROUTES = [("POST", "/v1/subsets"), ("DELETE", "/v1/subsets/explicit-a"),
                ("POST", "/v1/subsets/explicit-a/load"), ("POST", "/v1/subsets/explicit-a/unload")]


@pytest.mark.parametrize("method, path", READ_ROUTES + MODEL_ROUTES + ADMIN_ROUTES)
@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_every_v1_route_needs_a_key(frontend: Server, explicit: dict, method: str, path: str,
                                    key: str | None) -> None:
    with frontend.client(key) as c:
        r = c.request(method, path, json={"model": "explicit-a", "prompt": "x"})
    err = assert_error(r, 401)
    assert err["type"] == "authentication_error" and r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path", ADMIN_ROUTES)
def test_subset_changes_need_the_admin_key(user: httpx.Client, explicit: dict, method: str, path: str) -> None:
    assert_error(user.request(method, path, json={"name": "x", "experts": [0]}), 401, contains="admin key")


def test_reading_works_with_either_key(user: httpx.Client, admin: httpx.Client, explicit: dict) -> None:
    for c in (user, admin):
        assert c.get("/v1/subsets").status_code == 200
        assert c.get("/v1/models").status_code == 200


def test_openai_client_with_wrong_key(frontend: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        frontend.openai(key="wrong").models.list()


# -- OpenAI-shaped errors and bounds -----------------------------------------------------------
def test_unknown_model_is_404(frontend: Server, user: httpx.Client) -> None:
    err = assert_error(user.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, param="model")
    assert err["message"] == "The model `nope` does not exist."
    assert_error(user.get("/v1/models/nope"), 404)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        frontend.openai().chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("body, param", [
    ({"model": "explicit-a"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "explicit-a", "prompt": "x", "n": "many"}, "n"),
    ({"model": "explicit-a", "prompt": "x", "n": 0}, "n"),
    ({"model": "explicit-a", "prompt": "x", "n": 5}, "n"),  # more than --max-n 4
    ({"model": "explicit-a", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "explicit-a", "prompt": "x", "max_tokens": 4096}, "max_tokens"),  # context is 2048
    ({"model": "explicit-a", "prompt": "x", "stream_options": 3}, "stream_options"),
    ({"model": "explicit-a", "prompt": {"a": 1}}, None),
    # a prompt list multiplies n: 4,000 and 800 choices, past the 64 allowed (--max-choices)
    ({"model": "explicit-a", "prompt": ["hi"] * 1000, "n": 4, "max_tokens": 1}, "prompt"),
    ({"model": "explicit-a", "prompt": ["hello there"] * 200, "n": 4, "max_tokens": 64}, "prompt"),
    ({"model": "explicit-a", "prompt": [[416, 224]] * 65, "max_tokens": 1}, "prompt"),
    ({"model": "explicit-a", "prompt": "a", "best_of": 65, "max_tokens": 1}, "best_of"),
    # 64 choices x 1,024 tokens: past the default token bound (--max-n 4 contexts of 2,048)
    ({"model": "explicit-a", "prompt": ["a"] * 16, "n": 4, "max_tokens": 1024}, "max_tokens"),
    ({"model": "explicit-a", "prompt": ["a"] * 16, "n": 4}, "max_tokens"),  # absent: the context each
])
def test_bad_completion_requests_are_400(user: httpx.Client, explicit: dict, body: dict, param: str | None) -> None:
    err = assert_error(user.post("/v1/completions", json=body), 400)
    assert err["type"] == "invalid_request_error"
    if param:
        assert err["param"] is not None and err["param"].startswith(param), err


def test_bad_chat_requests_are_400(user: httpx.Client, explicit: dict) -> None:
    assert_error(user.post("/v1/chat/completions", json={"model": "explicit-a", "messages": []}), 400, param="messages")
    assert_error(user.post("/v1/chat/completions", json={"model": "explicit-a", "messages": [{"role": "user"}],
                                                         "max_completion_tokens": 10**6}), 400,
                 param="max_completion_tokens")


@pytest.mark.parametrize("raw, param", [
    (r'"user": "tenant-\ud800"', "user"),
    (r'"vllm_xargs": {"tag": "x\udfff"}', "vllm_xargs.tag"),
    (r'"prompt": ["fine", "\ud83d broken"]', "prompt.1"),
])
def test_lone_surrogates_are_400_naming_the_field(user: httpx.Client, explicit: dict, raw: str, param: str) -> None:
    """Valid JSON, invalid Unicode: vLLM answered these with a 500 (UnicodeEncodeError)."""
    body = '{"model": "explicit-a", "prompt": "x", "max_tokens": 1, ' + raw + "}"
    r = user.post("/v1/completions", content=body.encode(), headers={"content-type": "application/json"})
    err = assert_error(r, 400, param=param)
    assert "surrogate" in err["message"]


def test_malformed_json_is_400(user: httpx.Client) -> None:
    r = user.post("/v1/completions", content=b'{"model": "x", ', headers={"content-type": "application/json"})
    assert_error(r, 400)


def test_unknown_route_and_method(user: httpx.Client) -> None:
    assert_error(user.get("/v1/nothing-here"), 404)
    assert_error(user.put("/v1/models"), 405)


def test_body_over_the_limit_is_413(user: httpx.Client, explicit: dict) -> None:
    big = {"model": "explicit-a", "prompt": "x" * 70_000}
    assert_error(user.post("/v1/completions", json=big), 413)

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"model": "explicit-a", "prompt": "'
        for _ in range(80):
            yield b"y" * 1000
        yield b'"}'

    assert_error(user.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_prompt_longer_than_the_context_is_413(user: httpx.Client, explicit: dict) -> None:
    words = " ".join(f"w{i}" for i in range(6000))  # ~12k tokens, context 2048, body < 64 KiB
    err = assert_error(user.post("/v1/completions", json={"model": "explicit-a", "prompt": words}), 413,
                       param="prompt", contains="context of 2048 tokens")
    assert err["code"] == "context_length_exceeded"
    assert_error(user.post("/v1/completions", json={"model": "explicit-a", "prompt": list(range(3000))}), 413)
    assert_error(user.post("/v1/chat/completions", json={
        "model": "explicit-a", "messages": [{"role": "user", "content": words}]}), 413, param="messages")


def test_oversized_headers_are_refused(frontend: Server, user: httpx.Client) -> None:
    assert_error(httpx.get(f"{frontend.url}/health", headers={"X-Big": "z" * 20_000}, timeout=10), 431)
    try:  # a block too large to arrive in one read: uvicorn drops the connection instead
        r = httpx.get(f"{frontend.url}/health", headers={f"X-{i}": "z" * 8000 for i in range(40)}, timeout=10)
        assert r.status_code in (400, 431)
    except httpx.TransportError:
        pass
    assert user.get("/health").status_code == 200


# -- subsets API -------------------------------------------------------------------------------
def test_explicit_subset_lifecycle(frontend: Server, admin: httpx.Client) -> None:
    r = admin.post("/v1/subsets", json={"name": "life", "experts": [[1, 2], [3, 4], [5, 6], [7, 8]]})
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["state"] == "ready" and s["experts"] == [[1, 2, 15], [3, 4, 15], [5, 6, 15], [7, 8, 15]]
    assert s["bytes"]["subset"] < s["bytes"]["base"] and s["params"]["subset"] < s["params"]["base"]
    manifest = frontend.state_dir / "subsets" / "life.json"
    assert json.loads(manifest.read_text())["experts"] == s["experts"]
    assert (frontend.state_dir / "materialized" / "life" / "subset.json").is_file()

    models = {m.id: m for m in frontend.openai().models.list()}
    assert "life" in models and "tiny" not in models  # --no-serve-base
    card = models["life"].model_dump()
    assert card["owned_by"] == "emo-serve" and card["parent"] == "tiny"
    assert card["emo"]["experts_per_layer"] == [3, 3, 3, 3] and card["emo"]["base_experts_per_layer"] == [16] * 4
    assert admin.get("/v1/models/life").json()["id"] == "life"
    assert [x["id"] for x in admin.get("/v1/subsets").json()["data"]].count("life") == 1

    assert_error(admin.post("/v1/subsets", json={"name": "life", "experts": [0]}), 409, param="name")
    assert_error(admin.post("/v1/subsets", json={"name": "tiny", "experts": [0]}), 409, contains="base model")

    assert admin.delete("/v1/subsets/life").json() == {"id": "life", "object": "subset", "deleted": True}
    assert_error(admin.get("/v1/subsets/life"), 404)
    assert_error(admin.delete("/v1/subsets/life"), 404)
    assert "life" not in {m.id for m in frontend.openai().models.list()}
    assert not manifest.exists() and not (frontend.state_dir / "materialized" / "life").exists()


@pytest.mark.parametrize("body, contains", [
    ({"name": "a", "experts": [0], "bogus": 1}, "bogus"),
    ({"name": "a", "experts": [0], "examples": ["x"], "size": 2}, "exactly one of `experts`, `examples` or `from_traffic`"),
    ({"name": "a", "examples": ["x"]}, "exactly one of `size`"),
    ({"name": "a", "examples": ["x"], "size": 2, "fraction": 0.5}, "exactly one of `size`"),
    ({"name": "a", "experts": [0], "size": 2}, "apply to `examples`"),
    ({"name": "a", "experts": [[0], [1]]}, "2 layers"),
    ({"name": "a", "experts": [0, 99]}, "out of range"),
    ({"name": "a", "examples": ["x"], "size": 99}, "keep 1..15"),
    ({"name": "a", "examples": ["x"], "size": 2, "method": "nonsense"}, "method"),
    ({"name": "a", "examples": ["x"], "sizes": [2, 2, 2, 2], "method": "layerwise"}, "layerwise"),
    ({"name": "a", "examples": [""], "size": 2}, "empty example"),
    ({"name": "a", "examples": [{"messages": [{"role": "user"}]}], "size": 2}, "messages"),
    ({"name": "a", "examples": ["x"] * 65, "size": 2}, "65 examples"),
    ({"name": "a", "examples": [], "size": 2}, "examples"),
    ({"name": "a", "examples": ["x"], "size": 2, "budget": 8}, "exactly one of"),
    ({"name": "a", "experts": [0], "max_loss_increase": 0.1}, "apply to `examples`"),
    ({"name": "a", "examples": ["x"], "max_loss_increase": -0.1}, "max_loss_increase"),
    ({"name": "a", "examples": ["x"], "budget": 3}, "budget 3: needs between 4"),
    ({"name": "a", "examples": ["x"], "budget": 61}, "and 60"),
    ({"name": "a", "examples": ["x"], "budget": 8, "method": "layerwise"}, "use 'usage' with a budget"),
    ({"name": "a", "examples": ["x"], "max_loss_increase": 0.1, "method": "random"}, "ranks no expert"),
])
def test_bad_subset_requests_are_400(admin: httpx.Client, body: dict, contains: str) -> None:
    assert_error(admin.post("/v1/subsets", json=body), 400, contains=contains)
    assert_error(admin.get("/v1/subsets/a"), 404)  # nothing was registered


@pytest.mark.parametrize("name", ["../evil", "..", "/etc/passwd", ".hidden", "a/b", "a\\b", "x" * 65,
                                  "a..b", "%2e%2e", "ok\n"])
def test_subset_names_cannot_leave_the_state_dir(frontend: Server, admin: httpx.Client, name: str) -> None:
    assert_error(admin.post("/v1/subsets", json={"name": name, "experts": [0]}), 400, param="name")
    assert not list(frontend.state_dir.glob("*evil*")) and not (frontend.state_dir.parent / "evil.json").exists()


@pytest.mark.parametrize("path", ["/v1/subsets/%2e%2e", "/v1/subsets/..%2f..%2fetc%2fpasswd",
                                  "/v1/subsets/%2e%2e%2fsubsets%2fexplicit-a"])
def test_encoded_traversal_in_paths(admin: httpx.Client, explicit: dict, path: str) -> None:
    for method in ("GET", "DELETE"):
        r = admin.request(method, path)
        assert r.status_code in (400, 404), r.text
        assert set(r.json()) == {"error"}
    assert admin.get("/v1/subsets/explicit-a").status_code == 200  # untouched


def test_symlinked_manifest_is_refused(frontend: Server, admin: httpx.Client, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    (frontend.state_dir / "subsets" / "linked.json").symlink_to(outside)
    assert_error(admin.post("/v1/subsets", json={"name": "linked", "experts": [0]}), 400, contains="symlink")
    assert outside.read_text() == "precious"


def test_subset_from_examples_is_profiled(frontend: Server, admin: httpx.Client) -> None:
    r = admin.post("/v1/subsets", json={"name": "from-examples", "examples": [
        *EXAMPLES, {"messages": [{"role": "user", "content": "sum the list"}, {"role": "assistant",
                                                                              "content": "sum(xs)"}]}],
        "size": 4})
    assert r.status_code == 202, r.text
    assert r.json()["state"] == "profiling" and len(r.json()["example_fingerprints"]) == 4
    frontend.wait_until(lambda: admin.get("/v1/subsets/from-examples").json()["state"] != "profiling",
                        300, "profiling")
    s = admin.get("/v1/subsets/from-examples").json()
    assert s["state"] == "ready", s
    assert s["method"] == "usage" and s["size"] == 4 and s["experts_per_layer"] == [5, 5, 5, 5]
    assert all(15 in ids for ids in s["experts"]) and s["profile_seconds"] > 0
    stored = json.loads((frontend.state_dir / "subsets" / "from-examples.json").read_text())
    assert stored["provenance"]["example_fingerprints"] == s["example_fingerprints"]
    assert "from-examples" in {m.id for m in frontend.openai().models.list()}
    metrics = admin.get("/metrics").text
    assert 'emo_subset_profiling_seconds_count{method="usage"} 1.0' in metrics


def test_example_limits_come_from_the_settings(server_factory, tiny_ckpt: Path) -> None:
    """A server run with `--max-examples 70` profiles more than the library's default of 64
    examples, and refuses one more than 70 (the shared `frontend` keeps the default)."""
    limited = server_factory(tiny_ckpt, "--no-serve-base", "--max-examples", "70")
    admin = limited.client(ADMIN_KEY)
    many = [f"x = {i}\n" for i in range(71)]
    r = admin.post("/v1/subsets", json={"name": "seventy", "examples": many[:70], "size": 2, "method": "random"})
    assert r.status_code == 202, r.text
    limited.wait_until(lambda: admin.get("/v1/subsets/seventy").json()["state"] != "profiling", 300, "profiling")
    s = admin.get("/v1/subsets/seventy").json()
    assert s["state"] == "ready", s
    assert len(s["example_fingerprints"]) == 70
    r = admin.post("/v1/subsets", json={"name": "seventy-one", "examples": many, "size": 2, "method": "random"})
    assert_error(r, 400, contains="71 examples, at most 70 are allowed")
    admin.close()


def test_subset_sized_by_a_loss_tolerance(frontend: Server, admin: httpx.Client) -> None:
    """`max_loss_increase` instead of a size: the smallest size whose held-out perplexity
    increase is within the tolerance, with the estimate shown and stored in the manifest."""
    tolerance = 0.5
    r = admin.post("/v1/subsets", json={"name": "tolerant", "examples": EXAMPLES, "max_loss_increase": tolerance,
                                        "folds": 3})
    assert r.status_code == 202, r.text
    assert r.json()["max_loss_increase"] == tolerance
    frontend.wait_until(lambda: admin.get("/v1/subsets/tolerant").json()["state"] != "profiling", 300, "sizing")
    s = admin.get("/v1/subsets/tolerant").json()
    assert s["state"] == "ready", s
    q = s["quality"]
    assert q["estimate"] == "k-fold" and q["folds"] == 3 and q["examples"] == len(EXAMPLES)
    assert s["max_loss_increase"] == q["max_loss_increase"] == tolerance
    assert q["relative_change"] <= tolerance and [len(e) - 1 for e in s["experts"]] == q["sizes"]
    smaller = [c for c in q["candidates"] if sum(c["sizes"]) < sum(q["sizes"])]
    assert all(c["relative_change"] > tolerance for c in smaller)  # none smaller would have done
    stored = json.loads((frontend.state_dir / "subsets" / "tolerant.json").read_text())
    assert stored["provenance"]["details"]["quality"] == q


def test_subset_sized_by_a_budget(frontend: Server, admin: httpx.Client) -> None:
    r = admin.post("/v1/subsets", json={"name": "budgeted", "examples": EXAMPLES, "budget": 10, "folds": 3})
    assert r.status_code == 202, r.text
    frontend.wait_until(lambda: admin.get("/v1/subsets/budgeted").json()["state"] != "profiling", 300, "sizing")
    s = admin.get("/v1/subsets/budgeted").json()
    assert s["state"] == "ready", s
    assert s["budget"] == s["quality"]["budget"] == 10
    assert sum(len(e) - 1 for e in s["experts"]) == 10 and all(15 in e for e in s["experts"])


def test_failed_profiling_is_reported(frontend: Server, admin: httpx.Client) -> None:
    """A fault while profiling (a shard of the base vanished) fails the subset, with the error
    on it; the server goes on serving and the name can be deleted."""
    base = frontend.state_dir.parent / "base"
    shard = next(base.glob("*.safetensors"))
    hidden = shard.with_name("moved-away")
    shard.rename(hidden)
    try:
        r = admin.post("/v1/subsets", json={"name": "will-fail", "examples": EXAMPLES[:1], "size": 2})
        assert r.status_code == 202, r.text
        frontend.wait_until(lambda: admin.get("/v1/subsets/will-fail").json()["state"] != "profiling",
                            300, "profiling")
    finally:
        hidden.rename(shard)
    s = admin.get("/v1/subsets/will-fail").json()
    assert s["state"] == "failed" and shard.name in s["error"], s
    assert "will-fail" not in {m.id for m in frontend.openai().models.list()}
    assert_error(admin.post("/v1/completions", json={"model": "will-fail", "prompt": "x"}), 503, contains="failed")
    assert_error(admin.post("/v1/subsets/will-fail/load"), 503)
    assert admin.delete("/v1/subsets/will-fail").status_code == 200


def test_unload_and_delete_unknown_are_404(admin: httpx.Client) -> None:
    for method, path in [("POST", "/v1/subsets/nope/load"), ("POST", "/v1/subsets/nope/unload"),
                         ("DELETE", "/v1/subsets/nope")]:
        assert_error(admin.request(method, path), 404, param="name")


def test_no_engine_was_started(frontend: Server, admin: httpx.Client) -> None:
    """Everything above was answered by the front end alone; it still serves."""
    engines = admin.get("/v1/engines").json()["data"]
    assert all(e["state"] == "stopped" and e["starts"] == 0 for e in engines), engines
    assert not (frontend.state_dir / "logs").exists() or not list((frontend.state_dir / "logs").iterdir())
    assert admin.get("/health").status_code == 200 and admin.get("/v1/models").status_code == 200


def test_routing_capture_off(server_factory, tiny_ckpt: Path, tmp_path: Path) -> None:
    """`--no-routing-capture`: engines start without the capture, and what reads it says so."""
    server = server_factory(tiny_ckpt, "--no-serve-base", "--no-routing-capture", "--served-model-name", "tiny",
                            state_dir=tmp_path / "state")
    with server.client(ADMIN_KEY) as c:
        err = assert_error(c.get("/v1/models/tiny/routing"), 404)
        assert err["code"] == "routing_capture_off"
        err = assert_error(c.post("/v1/subsets", json={"name": "t", "from_traffic": {"model": "tiny"},
                                                       "fraction": 0.25}), 404)
        assert err["code"] == "routing_capture_off"
        assert c.post("/v1/subsets", json={"name": "x", "experts": [0, 1]}).status_code == 201
        assert c.get("/v1/subsets/x").json()["drift"] is None
    assert server.stop() == set()


def test_an_idle_connection_outlives_the_clients_keep_alive(frontend: Server) -> None:
    """httpx (and so the `openai` client) drops an idle connection after 5 s, uvicorn's own
    default: with equal timeouts a request sent on a connection the server is closing is lost.
    The front end keeps idle connections longer than its clients do."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(frontend.url)
    request = f"GET /health HTTP/1.1\r\nHost: {url.hostname}:{url.port}\r\n\r\n".encode()
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        for attempt in range(2):
            sock.sendall(request)
            answer = b""
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            while len(body) < length and (chunk := sock.recv(65536)):
                body += chunk
            assert head.startswith(b"HTTP/1.1 200"), f"request {attempt + 1} on one connection: {answer[:80]!r}"
            if attempt == 0:
                time.sleep(6)  # idle past httpx's keep-alive expiry and uvicorn's default
