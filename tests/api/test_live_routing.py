"""Live routing: counts captured in the engine, engine-side profiling, subsets learnt from
traffic, drift, the routing endpoints and metrics, the page in a real browser, and counters kept
across a restart.

One shared server on the trained `emo-demo` (float32) for the module; every request that checks
exact token counts carries its own `cache_salt`, so no prefix-cache hit skips a token.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_harness import ADMIN_KEY, API_KEY, CLI, Server, assert_error
from emo_serve.default_model import shipped_default_model
from emo_serve.profiler import profile

pytestmark = pytest.mark.vllm

BASE = "emo-demo"
DEMO = shipped_default_model()
EXAMPLES = Path(__file__).parents[2] / "emo_serve" / "data" / "models" / "examples"
SHARED = {"EMO_ENGINE_MODE": "shared"}
SERVER_ARGS = ("--dtype", "float32", "--kv-cache-gb", "1", "--routing-interval", "1",
               "--probe-interval", "600")
SCORE_TOL = 1e-5


def texts(domain: str) -> list[str]:
    return [json.loads(line)["text"] for line in (EXAMPLES / f"{domain}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("routing-state")


@pytest.fixture(scope="module")
def routed(server_factory, state: Path) -> Server:
    server = server_factory(None, *SERVER_ARGS, state_dir=state, env=SHARED)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def admin(routed: Server) -> httpx.Client:
    return routed.client(ADMIN_KEY)


def complete(admin: httpx.Client, model: str, prompt: str, *, max_tokens: int = 1, **kw) -> dict:
    r = admin.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                            "temperature": 0, "cache_salt": uuid.uuid4().hex, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def create(admin: httpx.Client, **body) -> dict:
    r = admin.post("/v1/subsets", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def routing(admin: httpx.Client, model: str, **params) -> dict:
    r = admin.get(f"/v1/models/{model}/routing", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def routed_ids(experts: list[list[int]]) -> list[set[int]]:
    """The subset's routed experts per layer (the demo's shared expert is id 15)."""
    return [set(ids) - {15} for ids in experts]


# -- capture ---------------------------------------------------------------------------------------
def test_counts_equal_the_reference_top_k(admin: httpx.Client) -> None:
    """For a fixed prompt, the engine's per-layer expert counts are the reference forward's top-k
    choices, and its router mass is the reference's probabilities."""
    prompt = "def add(a, b):\n    return a + b\n"
    out = complete(admin, BASE, prompt, user="counts-probe")
    stats = routing(admin, BASE, user="counts-probe")
    frequency = profile(DEMO, [prompt], method="frequency", progress=False)
    usage = profile(DEMO, [prompt], method="usage", progress=False)
    assert out["usage"]["prompt_tokens"] == frequency.example_tokens[0] == stats["tokens"]
    for layer in stats["layers"]:
        i = layer["layer"]
        assert layer["tokens"] == frequency.tokens[i]
        assert layer["counts"] == frequency.counts[i], f"layer {i}"
        assert max(abs(a - b) for a, b in zip(layer["mass"], usage.scores[i])) < SCORE_TOL, f"layer {i}"


def test_every_token_is_attributed_to_its_model_and_user(admin: httpx.Client) -> None:
    """Prompt and generated tokens are counted once each (the last token is never fed back), for
    the model asked for and the OpenAI `user`, whatever the client puts in `vllm_xargs`."""
    before = routing(admin, BASE)["tokens"]
    out = complete(admin, BASE, "Once upon a time", max_tokens=6, user="tenant-spoof",
                   vllm_xargs={"emo_model": "someone-else", "emo_user": "another-user", "emo_subset_row": 3})
    expected = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    assert routing(admin, BASE, user="tenant-spoof")["tokens"] == expected
    assert routing(admin, BASE)["tokens"] == before + expected
    assert_error(admin.get(f"/v1/models/{BASE}/routing", params={"user": "another-user"}), 400, param="user")


def drains(admin: httpx.Client) -> dict[str, float]:
    """`emo_routing_drains_total` of the server, by outcome (summed over engines)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{admin.base_url}/metrics").text):
        for sample in family.samples:
            if sample.name == "emo_routing_drains_total":
                out[sample.labels["outcome"]] = out.get(sample.labels["outcome"], 0.0) + sample.value
    return out


def wait_for_drains(admin: httpx.Client, outcome: str, more_than: float, *, timeout: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while (seen := drains(admin)).get(outcome, 0.0) <= more_than:
        assert time.monotonic() < deadline, f"no `{outcome}` routing collection after {timeout:.0f} s: {seen}"
        time.sleep(0.2)
    return seen


def test_an_idle_engine_is_not_drained_and_loses_nothing(admin: httpx.Client) -> None:
    """Once an engine has served nothing since its last drain, the 1 s collector skips it (each
    drain wakes vLLM's worker, which then busy-polls for a second), and the next request's
    tokens are still counted."""
    complete(admin, BASE, "warm", user="idle-probe")
    idle = wait_for_drains(admin, "idle", drains(admin).get("idle", 0.0))
    after = wait_for_drains(admin, "idle", idle["idle"] + 2)  # three more passes, nothing served
    assert after.get("drained", 0.0) == idle.get("drained", 0.0), (idle, after)
    before = routing(admin, BASE, user="idle-probe")["tokens"]
    out = complete(admin, BASE, "Once upon a time", max_tokens=3, user="idle-probe")
    expected = out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"] - 1
    assert routing(admin, BASE, user="idle-probe")["tokens"] == before + expected
    assert drains(admin)["drained"] > after.get("drained", 0.0)


# -- engine-side profiling ---------------------------------------------------------------------------
def test_engine_side_profile_matches_the_cli(admin: httpx.Client, tmp_path: Path) -> None:
    code = EXAMPLES / "code.jsonl"
    created = create(admin, name="code-engine", examples=texts("code"), fraction=0.25)
    assert created["state"] in ("ready", "loaded") and created["scored_by"] == "engine"
    manifest, scores_file = tmp_path / "code.json", tmp_path / "scores.json"
    r = subprocess.run([*CLI, "profile", "--base", str(DEMO), "--examples", str(code), "--fraction", "0.25",
                        "-o", str(manifest), "--scores", str(scores_file), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert created["experts"] == json.loads(manifest.read_text())["experts"]
    engine_scores = admin.get("/v1/subsets/code-engine/scores").json()
    cli_scores = json.loads(scores_file.read_text())
    assert engine_scores["tokens"] == cli_scores["tokens"]
    assert engine_scores["example_fingerprints"] == cli_scores["example_fingerprints"]
    for mine, theirs in zip(engine_scores["scores"], cli_scores["scores"]):
        assert max(abs(a - b) for a, b in zip(mine, theirs)) < SCORE_TOL
    # ...and the subset serves at once, from the shared engine.
    first = complete(admin, "code-engine", "def main():", max_tokens=2)
    assert first["model"] == "code-engine" and first["usage"]["completion_tokens"] == 2


# -- subsets from traffic ----------------------------------------------------------------------------
def test_from_traffic_learns_a_tenants_subset(admin: httpx.Client) -> None:
    """The code examples sent as completions by one tenant (and legal text by another) give that
    tenant a subset overlapping the one profiled from the same examples by >= 75 % per layer."""
    for text in texts("code"):
        complete(admin, BASE, text, max_tokens=4, user="tenant-code")
    for text in texts("legal"):
        complete(admin, BASE, text, max_tokens=4, user="tenant-legal")
    learnt = create(admin, name="tenant-code", fraction=0.25,
                    from_traffic={"model": BASE, "user": "tenant-code", "min_tokens": 100})
    assert learnt["scored_by"] == "traffic" and learnt["state"] in ("ready", "loaded")
    profiled = profile(DEMO, texts("code"), method="usage", progress=False).to_subset(fraction=0.25, name="p")
    for layer, (got, want) in enumerate(zip(routed_ids(learnt["experts"]), routed_ids(profiled.experts))):
        assert len(got & want) / len(want) >= 0.75, f"layer {layer}: {sorted(got)} vs {sorted(want)}"
    # The legal tenant's traffic is routed elsewhere: its subset is not the code one.
    legal = create(admin, name="tenant-legal", fraction=0.25,
                   from_traffic={"model": BASE, "user": "tenant-legal", "min_tokens": 100})
    assert legal["experts"] != learnt["experts"]
    # A budget spreads a total over layers, one at least each.
    budget = create(admin, name="tenant-budget", budget=10, from_traffic={"model": BASE, "user": "tenant-code"})
    assert sum(len(ids) for ids in routed_ids(budget["experts"])) == 10


# -- drift ---------------------------------------------------------------------------------------------
def test_drift_is_higher_off_domain(admin: httpx.Client) -> None:
    """A subset made for code, sent legal text, drifts >= 3x as much as when sent code."""
    for name in ("drift-code", "drift-legal"):
        create(admin, name=name, examples=texts("code"), size=7)
    for text in texts("code"):
        complete(admin, "drift-code", text)
    for text in texts("legal"):
        complete(admin, "drift-legal", text)
    routing(admin, "drift-code")  # collects the engines' counts now (a subset shows the last collection)
    on, off = (admin.get(f"/v1/subsets/{n}").json()["drift"] for n in ("drift-code", "drift-legal"))
    assert on["router"] == off["router"] == "full"
    assert on["tokens"] > 0 and off["tokens"] > 0
    assert off["mass_outside"] >= 3 * on["mass_outside"] > 0, (on, off)
    # The same figure as a Prometheus histogram, labelled by model only.
    metrics = httpx.get(f"{admin.base_url}/metrics").text
    count = [line for line in metrics.splitlines() if line.startswith('emo_routing_mass_outside_count{model="drift-code"}')]
    assert count and float(count[0].split()[-1]) == on["tokens"]
    assert "expert=" not in metrics
    # ...and over time: the subset's routing JSON has a series of buckets.
    series = routing(admin, "drift-legal")["drift_series"]
    assert series and math.isclose(sum(p["mass_outside"] * p["tokens"] for p in series) / sum(p["tokens"] for p in series),
                                   off["mass_outside"], rel_tol=1e-9)


def test_routing_json_window_and_png(admin: httpx.Client) -> None:
    complete(admin, BASE, "The court held that", max_tokens=2)
    stats = routing(admin, BASE)
    assert stats["object"] == "model.routing" and stats["kind"] == "base" and stats["drift"] is None
    assert [layer["layer"] for layer in stats["layers"]] == [0, 1, 2, 3]
    assert all(len(layer["counts"]) == len(layer["mass"]) == 16 for layer in stats["layers"])
    recent = routing(admin, BASE, window=3600)
    assert 0 < recent["tokens"] <= stats["tokens"]
    subset = routing(admin, "drift-code")
    assert subset["kind"] == "subset" and subset["layers"][0]["kept"] is not None and subset["drift"]["tokens"] > 0
    png = admin.get(f"/v1/models/{BASE}/routing", params={"format": "png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
    scores_png = admin.get("/v1/subsets/drift-code/scores", params={"format": "png"})
    assert scores_png.status_code == 200 and scores_png.content.startswith(b"\x89PNG")


@pytest.mark.parametrize("path, params, status, param", [
    ("/v1/models/nope/routing", {}, 404, "model"),
    (f"/v1/models/{BASE}/routing", {"window": 0}, 400, "window"),
    (f"/v1/models/{BASE}/routing", {"window": 10**9}, 400, "window"),
    (f"/v1/models/{BASE}/routing", {"window": -5}, 400, "window"),
    (f"/v1/models/{BASE}/routing", {"window": "soon"}, 400, "window"),
    (f"/v1/models/{BASE}/routing", {"window": 60, "user": "tenant-code"}, 400, "window"),
    (f"/v1/models/{BASE}/routing", {"user": "nobody-at-all"}, 400, "user"),
    (f"/v1/models/{BASE}/routing", {"format": "gif"}, 400, "format"),
    ("/v1/subsets/drift-code", {"window": 0}, 400, "window"),
    ("/v1/subsets/code-engine-missing/scores", {}, 404, "name"),
])
def test_bad_routing_queries(admin: httpx.Client, path: str, params: dict, status: int, param: str) -> None:
    assert_error(admin.get(path, params=params), status, param=param)


@pytest.mark.parametrize("body, status, param", [
    ({"from_traffic": {"model": "nope"}, "fraction": 0.25}, 404, "from_traffic.model"),
    ({"from_traffic": {"model": BASE, "min_tokens": 10**9}, "fraction": 0.25}, 400, "from_traffic.min_tokens"),
    ({"from_traffic": {"model": BASE, "user": "nobody-at-all"}, "fraction": 0.25}, 400, "from_traffic.user"),
    ({"from_traffic": {"model": BASE, "window": 0}, "fraction": 0.25}, 400, "from_traffic.window"),
    ({"from_traffic": {"model": BASE, "window": 60, "user": "tenant-code"}, "fraction": 0.25}, 400,
     "from_traffic.window"),                                                       # users: all time only
    ({"from_traffic": {"model": BASE}}, 400, None),                                # no size
    ({"from_traffic": {"model": BASE}, "max_loss_increase": 0.1}, 400, None),     # needs examples
    ({"from_traffic": {"model": BASE}, "fraction": 0.25, "method": "easy_ep"}, 400, None),
    ({"from_traffic": {"model": BASE}, "examples": ["x"], "fraction": 0.25}, 400, None),
    ({"from_traffic": {"model": BASE, "min_tokens": 0}, "fraction": 0.25}, 400, None),
    ({"from_traffic": {"model": BASE}, "budget": 10**6}, 400, "budget"),
])
def test_bad_subsets_from_traffic(admin: httpx.Client, body: dict, status: int, param: str | None) -> None:
    error = assert_error(admin.post("/v1/subsets", json={"name": "bad-traffic", **body}), status, param=param)
    assert "Traceback" not in error["message"]
    assert admin.get("/v1/subsets/bad-traffic").status_code == 404


# -- the page ------------------------------------------------------------------------------------------
def test_page_in_a_real_browser(routed: Server, tmp_path: Path) -> None:
    from browser import chromium_page

    anonymous = httpx.get(f"{routed.url}/ui")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
    assert httpx.get(f"{routed.url}/ui", auth=("ops", "wrong")).status_code == 401
    with chromium_page(f"{routed.url}/ui", password=API_KEY, screenshot=tmp_path / "ui.png") as page:
        models = page.eval_on_selector_all("#models tbody tr", "rows => rows.map(r => r.dataset.model)")
        assert BASE in models and "drift-code" in models
        images = page.eval_on_selector_all("img.heatmap", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
        assert ["/v1/subsets/drift-code/scores?format=png", 650] in [[s, w] for s, w in images]
        assert all(width > 300 for _, width in images), images  # every heatmap decoded as an image
        assert page.locator("#subset-drift-legal svg.drift circle").count() >= 1
        assert float(page.locator("#subset-drift-legal .drift-value").inner_text()) > 0
        assert page.console_errors == []
    assert (tmp_path / "ui.png").stat().st_size > 10_000


# -- persistence (last: it stops the module's server) --------------------------------------------------
def test_counters_survive_a_restart(routed: Server, admin: httpx.Client, server_factory, state: Path) -> None:
    before = {m: routing(admin, m) for m in (BASE, "drift-code", "tenant-code")}
    drift = admin.get("/v1/subsets/drift-legal").json()["drift"]
    admin.close()
    assert routed.stop() == set()
    # Written atomically at shutdown, one file per model that had traffic (none for the subsets
    # learnt from traffic: nobody sent them requests).
    assert {p.name for p in (state / "usage").glob("*.json")} == {
        f"{m}.json" for m in (BASE, "code-engine", "drift-code", "drift-legal")}
    assert not list((state / "usage").glob(".*.tmp"))
    again = server_factory(None, *SERVER_ARGS, "--no-serve-base", state_dir=state, env=SHARED)
    with again.client(ADMIN_KEY) as c:
        for model, stats in before.items():
            after = routing(c, model)
            assert after["tokens"] == stats["tokens"] and after["layers"] == stats["layers"], model
        assert c.get("/v1/subsets/drift-legal").json()["drift"]["mass_outside"] == drift["mass_outside"]
        assert routing(c, BASE, user="tenant-code")["tokens"] > 0
        # Deleting a subset deletes its counters.
        assert c.delete("/v1/subsets/drift-code").status_code == 200
    assert not (state / "usage" / "drift-code.json").exists()
