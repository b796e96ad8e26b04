"""Expert slots: the base not served, one shared engine holding 6 of the demo's 15 routed experts
per layer, subsets' experts loaded into it and evicted from it while it serves.

Five subsets whose union exceeds the slots at every layer are served one after another, then
interleaved with 8+ requests in flight: each answer is checked against a dedicated vLLM engine
on the subset's own manifest (offline `LLM`, one fresh process per subset). float32, so that
"identical" means identical.

One fault is injected on purpose: `EMOVLLM_STAGE_DELAY_S` makes every load wait 1 s before it
reads (storage slower than this machine's page cache), so that a load is reliably in progress
while a stream runs beside it and while the engine is killed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from api_harness import ADMIN_KEY, API_KEY, Server, assert_error, engine_of

from emo_serve.checkpoint import Checkpoint
from emo_serve.default_model import shipped_default_model
from emo_serve.export import materialize_subset
from emo_serve.subset import make_subset

pytestmark = pytest.mark.vllm

HERE = Path(__file__).parent
ENGINE = "emo-shared"
LOGPROB_TOL = 1e-3
MAX_TOKENS = 8
SLOTS = 6
# Routed experts per layer (15 routed + the shared one; top-4 = 3 routed + shared). The union of
# any two of the first four is 8 > 6 at every layer: serving them in turn evicts.
SUBSETS = {
    "s-a": [[0, 1, 2, 3]] * 4,
    "s-b": [[4, 5, 6, 7]] * 4,
    "s-c": [[8, 9, 10, 11]] * 4,
    "s-d": [[12, 13, 14, 0], [12, 13, 14, 1], [12, 13, 14, 2], [12, 13, 14, 3]],
    "s-e": [[1, 5, 9, 13, 14], [2, 6, 10, 14], [3, 7, 11], [0, 4, 8, 12, 13, 14]],
}
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "This program is free software; you can redistribute it and/or modify it under the terms of the",
]
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "1", "--probe-interval", "600",
               "--no-serve-base", "--expert-slots", str(SLOTS))


@pytest.fixture(scope="module")
def demo() -> Checkpoint:
    path = shipped_default_model()
    assert path is not None, "the package ships emo-demo"
    return Checkpoint(path)


@pytest.fixture(scope="module")
def server(server_factory) -> Iterator[Server]:
    server = server_factory(None, *SERVER_ARGS, env={"EMO_ENGINE_MODE": "shared", "EMOVLLM_STAGE_DELAY_S": "1"})
    server.wait_ready()
    yield server
    server.stop()  # its engine polls its queue; the modules after this one get the CPU back


@pytest.fixture(scope="module")
def admin(server: Server) -> httpx.Client:
    return server.client(ADMIN_KEY)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return server.openai(API_KEY)


@pytest.fixture(scope="module")
def dedicated(demo: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """What a dedicated engine on each subset's manifest dir computes (vLLM's offline `LLM`)."""
    work = tmp_path_factory.mktemp("dedicated-slots")
    results = {}
    for name, experts in SUBSETS.items():
        model_dir = materialize_subset(demo, make_subset(demo, experts, name), work / name)
        out = work / f"{name}.json"
        r = subprocess.run([sys.executable, str(HERE / "offline_llm.py"), str(model_dir), str(MAX_TOKENS), str(out),
                            *PROMPTS], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-4000:]
        results[name] = json.loads(out.read_text())
    return results


def generate(client: openai.OpenAI, model: str, prompt: str) -> dict:
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, "prompt_logprobs": 0,
                                                "return_tokens_as_token_ids": True})
    choice = out.choices[0]
    return {"model": out.model, "tokens": [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens],
            "prompt_logprobs": choice.model_extra["prompt_logprobs"]}


def check_parity(served: dict, reference: dict, what: str) -> None:
    assert served["tokens"] == reference["token_ids"], f"{what}: greedy tokens differ"
    ids = reference["prompt_token_ids"]
    lps = [entry[str(tok)]["logprob"] for tok, entry in zip(ids[1:], served["prompt_logprobs"][1:])]
    worst = max(abs(a - b) for a, b in zip(lps, reference["prompt_logprobs"], strict=True))
    assert worst <= LOGPROB_TOL, f"{what}: prompt logprobs differ by {worst}"


def metric(admin: httpx.Client, name: str) -> float:
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith(f'{name}{{engine="{ENGINE}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def created(admin: httpx.Client) -> dict[str, dict]:
    out = {}
    for name, experts in SUBSETS.items():
        r = admin.post("/v1/subsets", json={"name": name, "experts": experts})
        assert r.status_code == 201, r.text
        out[name] = r.json()
    return out


# -- exactness through evictions -----------------------------------------------------------------
def test_subsets_served_in_turn_then_interleaved_match_dedicated_engines(
        server: Server, admin: httpx.Client, client: openai.OpenAI, created: dict, dedicated: dict) -> None:
    pid = engine_of(server, ENGINE)["pid"]
    for round_ in range(2):  # one after another, twice: the second round reloads what was evicted
        for name in SUBSETS:
            check_parity(generate(client, name, PROMPTS[0]), dedicated[name][0], f"{name}, round {round_}")
            resident = admin.get(f"/v1/subsets/{name}").json()["resident_experts"]
            assert resident == [sorted(ids) for ids in SUBSETS[name]], resident
    assert metric(admin, "emo_expert_evictions_total") > 0
    # Interleaved: 20 requests over the five subsets, 10 in flight at a time.
    jobs = [(name, i % len(PROMPTS)) for i in range(4) for name in SUBSETS]
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda job: (job, generate(client, job[0], PROMPTS[job[1]])), jobs))
    for (name, p), served in results:
        assert served["model"] == name
        check_parity(served, dedicated[name][p], f"{name}, interleaved, prompt {p}")
    engine = engine_of(server, ENGINE)
    assert engine["pid"] == pid and engine["starts"] == 1, engine  # one engine process throughout
    assert [e["model"] for e in admin.get("/v1/engines").json()["data"]] == [ENGINE]


def test_a_stream_runs_on_while_other_experts_load_and_evict(admin: httpx.Client, client: openai.OpenAI,
                                                              created: dict) -> None:
    # A known state whatever the interleaving before left resident: s-c, then s-a, leaves s-a's four
    # experts and two of s-c's per layer (the least recently used go first), so s-f's 4 and 5 are
    # missing at every layer and its load evicts two of s-c's.
    generate(client, "s-c", "warm")
    generate(client, "s-a", "warm")
    r = admin.post("/v1/subsets", json={"name": "s-f", "experts": [[4, 5]] * 4})
    assert r.status_code == 201, r.text
    assert r.json()["resident_experts"] == [[]] * 4, r.json()
    loads, evictions = metric(admin, "emo_expert_loads_total"), metric(admin, "emo_expert_evictions_total")
    stamps: list[float] = []
    with ThreadPoolExecutor(1) as pool:
        # s-f's load evicts the two older experts of each layer; it waits 1 s before reading.
        loading = pool.submit(lambda: (client.completions.create(model="s-f", prompt="x", max_tokens=2).model,
                                       time.monotonic()))
        time.sleep(0.3)
        t0 = time.monotonic()
        reason = None
        for chunk in client.completions.create(model="s-a", prompt="def f(", max_tokens=480, stream=True,
                                               extra_body={"ignore_eos": True}):
            stamps.append(time.monotonic())
            if chunk.choices and chunk.choices[0].finish_reason:
                reason = chunk.choices[0].finish_reason
        model, loaded_at = loading.result(timeout=120)
    assert reason == "length" and model == "s-f"
    assert metric(admin, "emo_expert_loads_total") == loads + 8  # 2 experts x 4 layers
    assert metric(admin, "emo_expert_evictions_total") == evictions + 8
    during = [t for t in stamps if t0 <= t <= loaded_at]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) > 10, f"only {len(during)} chunks arrived while s-f's experts were loading"
    assert max(gaps) < 0.5, f"the stream stalled for {max(gaps):.2f} s during the load"
    assert admin.get("/v1/subsets/s-f").json()["resident_experts"] == [[4, 5]] * 4


def test_a_subset_larger_than_the_slots_is_refused(admin: httpx.Client) -> None:
    err = assert_error(admin.post("/v1/subsets", json={"name": "too-big", "experts": [list(range(7))] * 4}), 400,
                       contains="layer 0")
    assert err["code"] == "subset_exceeds_expert_slots" and "7 routed experts" in err["message"]
    assert_error(admin.get("/v1/subsets/too-big"), 404)


def test_unload_and_delete_keep_their_meaning(admin: httpx.Client, client: openai.OpenAI, created: dict) -> None:
    assert client.completions.create(model="s-e", prompt="x", max_tokens=2).model == "s-e"
    r = admin.post("/v1/subsets/s-e/unload")
    assert r.status_code == 200 and r.json()["state"] != "loaded", r.text
    assert client.completions.create(model="s-e", prompt="x", max_tokens=2).model == "s-e"  # back on demand
    r = admin.post("/v1/subsets", json={"name": "short-lived", "experts": [[0, 1]] * 4})
    assert r.status_code == 201, r.text
    assert client.completions.create(model="short-lived", prompt="x", max_tokens=2).model == "short-lived"
    assert admin.delete("/v1/subsets/short-lived").status_code == 200
    assert_error(admin.get("/v1/subsets/short-lived"), 404)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="short-lived", prompt="x", max_tokens=2)


def test_an_engine_killed_during_a_load_answers_503_then_recovers(
        server: Server, admin: httpx.Client, client: openai.OpenAI, created: dict, dedicated: dict) -> None:
    # Make s-d need a load: serve two subsets that fill every slot with other experts.
    for name in ("s-b", "s-c"):
        generate(client, name, "warm")
    assert admin.get("/v1/subsets/s-d").json()["resident_experts"] != [sorted(i) for i in SUBSETS["s-d"]]
    pid = engine_of(server, ENGINE)["pid"]
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(lambda: httpx.post(f"{server.url}/v1/completions", timeout=120,
                                                 headers={"Authorization": f"Bearer {API_KEY}"},
                                                 json={"model": "s-d", "prompt": "x", "max_tokens": 2}))
        time.sleep(0.5)  # the load waits 1 s before reading: it is in progress now
        os.killpg(pid, signal.SIGKILL)
        r = pending.result(timeout=120)
    err = assert_error(r, 503)
    assert err["code"] == "model_unavailable", err
    deadline = time.monotonic() + 120  # the restart may wait out a back-off (the engine was young)
    while True:
        try:
            served = generate(client, "s-d", PROMPTS[1])
            break
        except openai.APIStatusError as exc:
            assert exc.status_code == 503 and time.monotonic() < deadline, exc
            time.sleep(1.0)
    check_parity(served, dedicated["s-d"][1], "s-d after the crash")
    assert admin.get("/v1/subsets/s-d").json()["resident_experts"] == [sorted(i) for i in SUBSETS["s-d"]]
    assert engine_of(server, ENGINE)["crashes"] == 1


def test_the_page_shows_slot_occupancy_per_layer(server: Server, client: openai.OpenAI, created: dict) -> None:
    generate(client, "s-c", "warm")
    html = server.client(ADMIN_KEY).get("/ui").text
    assert "Expert slots" in html
    for layer, ids in enumerate(SUBSETS["s-c"]):
        row = html.split(f'<tr data-layer="{layer}">', 1)[1].split("</tr>", 1)[0]
        shown = {int(x) for x in re.findall(r'class="slot slot-used">(\d+)<', row)}
        assert set(ids) <= shown and len(shown) <= SLOTS, (layer, shown)


def test_routing_is_counted_in_base_ids_with_the_whole_router(admin: httpx.Client, client: openai.OpenAI,
                                                              created: dict) -> None:
    """The engine's router covers every base expert whatever is resident, so drift is exact."""
    for _ in range(3):
        generate(client, "s-b", PROMPTS[1])
    drift = admin.get("/v1/subsets/s-b").json()["drift"]
    assert drift["router"] == "full" and drift["tokens"] > 0, drift
    # The base's router puts some of its top-k weight on experts s-b dropped (4 of 15 kept).
    assert 0 < drift["mass_outside"] < 1, drift
