"""The shared engine mode (the default): the base and its subsets served by one vLLM engine with
per-request expert masks, checked against dedicated engines on the subsets' manifests.

One shared server on the trained `emo-demo` for the module (float32, so that "identical" means
identical); the dedicated side is vLLM's offline `LLM` on each model's own directory (the base,
and each subset's weightless manifest dir, which reads only the subset's bytes), one process
each. The base not served (expert slots) is tests/api/test_expert_slots.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from api_harness import ADMIN_KEY, API_KEY, Server, assert_error, engine_metrics, engine_of, frozen, installed_rows

from emo_serve.checkpoint import Checkpoint
from emo_serve.default_model import shipped_default_model
from emo_serve.export import materialize_subset
from emo_serve.subset import make_subset

pytestmark = pytest.mark.vllm

HERE = Path(__file__).parent
BASE = "emo-demo"
SHARED = {"EMO_ENGINE_MODE": "shared"}
LOGPROB_TOL = 1e-3
MAX_TOKENS = 12
# Routed experts per layer (the demo has 15 routed + 1 shared, top-4 = 3 routed + the shared one).
SUBSETS = {
    "pair": [[1, 7], [2, 11], [0, 9], [4, 13]],               # fewer routed experts than top-k
    "quarter": [[0, 3, 5, 8], [1, 2, 6, 14], [3, 7, 10, 12], [0, 5, 9, 11]],
    "half": [list(range(0, 15, 2))] * 4,
}
# Longer than a KV block (16 tokens), so that prefix caching has blocks to share.
PROMPTS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n",
    "This program is free software; you can redistribute it and/or modify it under the terms of the "
    "GNU General Public License as published by",
    "What is 12 plus 30? 12 + 30 = 42. What is 7 times 6? 7 * 6 =",
]
# Engines are frozen on purpose below; the health probe that would kill one is tested in test_faults.py.
SERVER_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "1", "--probe-interval", "600")


@pytest.fixture(scope="module")
def demo() -> Checkpoint:
    path = shipped_default_model()
    assert path is not None, "the package ships emo-demo"
    return Checkpoint(path)


@pytest.fixture(scope="module")
def shared(server_factory) -> Server:
    server = server_factory(None, *SERVER_ARGS, env=SHARED)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def admin(shared: Server) -> httpx.Client:
    return shared.client(ADMIN_KEY)


@pytest.fixture(scope="module")
def client(shared: Server) -> openai.OpenAI:
    return shared.openai(API_KEY)


@pytest.fixture(scope="module")
def subsets(admin: httpx.Client) -> dict[str, dict]:
    out = {}
    for name, experts in SUBSETS.items():
        r = admin.post("/v1/subsets", json={"name": name, "experts": experts})
        assert r.status_code == 201, r.text
        out[name] = r.json()
    return out


@pytest.fixture(scope="module")
def dedicated(demo: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    """What a dedicated engine computes for each model: the base's own dir, each subset's
    manifest dir (vLLM's offline `LLM`, one fresh process per model)."""
    work = tmp_path_factory.mktemp("dedicated")
    results = {}
    for model in [BASE, *SUBSETS]:
        model_dir = demo.location if model == BASE else str(
            materialize_subset(demo, make_subset(demo, SUBSETS[model], model), work / model))
        out = work / f"{model}.json"
        r = subprocess.run([sys.executable, str(HERE / "offline_llm.py"), model_dir, str(MAX_TOKENS), str(out),
                            *PROMPTS], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0, r.stderr[-4000:]
        results[model] = json.loads(out.read_text())
    return results


def generate(client: openai.OpenAI, model: str, prompt: str, **kw) -> dict:
    """Greedy tokens and prompt logprobs, as the OpenAI API returns them."""
    out = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                    logprobs=0, extra_body={"ignore_eos": True, "prompt_logprobs": 0,
                                                            "return_tokens_as_token_ids": True, **kw})
    choice = out.choices[0]
    prompt_lps = choice.model_extra["prompt_logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens]
    return {"model": out.model, "tokens": tokens, "prompt_logprobs": prompt_lps}


def check_parity(served: dict, reference: dict, what: str) -> None:
    assert served["tokens"] == reference["token_ids"], f"{what}: greedy tokens differ"
    ids = reference["prompt_token_ids"]
    lps = [entry[str(tok)]["logprob"] for tok, entry in zip(ids[1:], served["prompt_logprobs"][1:])]
    assert len(lps) == len(reference["prompt_logprobs"])
    worst = max(abs(a - b) for a, b in zip(lps, reference["prompt_logprobs"]))
    assert worst <= LOGPROB_TOL, f"{what}: prompt logprobs differ by {worst}"


# -- parity ----------------------------------------------------------------------------------
def test_subsets_share_the_base_engine(admin: httpx.Client, client: openai.OpenAI, subsets: dict) -> None:
    cards = {m.id: m.model_extra["emo"] for m in client.models.list().data}
    assert {cards[m]["engine"] for m in [BASE, *SUBSETS]} == {BASE}
    assert all(subsets[name]["engine_id"] == BASE for name in SUBSETS)
    engines = admin.get("/v1/engines").json()["data"]
    assert [e["model"] for e in engines] == [BASE]  # one engine, no start for any subset
    assert engines[0]["starts"] == 1
    assert f'emo_engine_resident_experts{{engine="{BASE}"}} 64.0' in admin.get("/metrics").text


def test_mixed_batches_match_dedicated_engines(client: openai.OpenAI, subsets: dict, dedicated: dict) -> None:
    """The base and three subsets, 12 requests in flight at once (concurrency 12)."""
    jobs = [(model, i) for model in [BASE, *SUBSETS] for i in range(len(PROMPTS))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        served = list(pool.map(lambda job: generate(client, job[0], PROMPTS[job[1]]), jobs))
    for (model, i), out in zip(jobs, served):
        assert out["model"] == model
        check_parity(out, dedicated[model][i], f"{model}, prompt {i}, mixed batch")


def test_same_prompt_to_two_subsets_back_to_back(client: openai.OpenAI, subsets: dict, dedicated: dict) -> None:
    """Prefix-cache isolation: the second subset must not reuse the first one's KV blocks."""
    for i, prompt in enumerate(PROMPTS):
        for model in ["quarter", "pair", BASE, "half", "quarter"]:
            check_parity(generate(client, model, prompt), dedicated[model][i], f"{model} after another, prompt {i}")


def test_client_cannot_pick_another_mask_or_salt(client: openai.OpenAI, subsets: dict, dedicated: dict) -> None:
    hostile = {"vllm_xargs": {"emo_subset_row": 0}, "cache_salt": "emo-base"}
    check_parity(generate(client, "pair", PROMPTS[0], **hostile), dedicated["pair"][0], "pair, hostile body")
    check_parity(generate(client, BASE, PROMPTS[0], vllm_xargs={"emo_subset_row": 1}), dedicated[BASE][0],
                 "base, hostile row")


def test_streams_carry_the_subset_name(client: openai.OpenAI, subsets: dict) -> None:
    chunks = list(client.chat.completions.create(model="half", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks and {c.model for c in chunks} == {"half"}


def generated_tokens(admin: httpx.Client, model: str) -> float:
    for line in admin.get("/metrics").text.splitlines():
        if line.startswith(f'emo_generation_tokens_total{{model="{model}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("options", [{"include_usage": True, "continuous_usage_stats": True},
                                     {"include_usage": True}, None])
def test_usage_is_counted_once_whatever_the_stream_options(admin: httpx.Client, client: openai.OpenAI,
                                                           subsets: dict, options: dict | None) -> None:
    before = generated_tokens(admin, "quarter")
    extra = {"stream_options": options} if options else {}
    chunks = list(client.completions.create(model="quarter", prompt="def f(", max_tokens=16, stream=True,
                                            extra_body={"ignore_eos": True}, **extra))
    assert sum(len(c.choices) for c in chunks) >= 16
    assert generated_tokens(admin, "quarter") - before == 16


def test_engine_has_its_own_group_in_the_front_ends_session(shared: Server, subsets: dict) -> None:
    """Its own process group (stopped as one), but not its own session: Linux's autogroup
    scheduler shares the CPU per session (see engines/process.py)."""
    pid = engine_of(shared, BASE)["pid"]
    assert os.getpgid(pid) == pid, "the engine must lead its own process group"
    assert os.getsid(pid) == os.getsid(shared.proc.pid), "the engine must stay in the front end's session"


def test_concurrent_streams_are_batched(shared: Server, client: openai.OpenAI, subsets: dict) -> None:
    """8 streams sent at once (the base and three subsets) run in the engine's batches together,
    as they do when sent to vLLM's own server: vLLM's per-step token histogram shows steps of
    several requests, and every stream's first event reaches its client before any of them ends.
    Before the fix, engines ran in a session of their own, where (Linux's autogroup scheduler,
    vLLM's polling engine core) their API server took requests and wrote tokens late, so the
    engine ran them nearly one at a time and whole streams arrived at once at the end."""
    models = [BASE, "pair", "quarter", "half"] * 2
    max_tokens = 48
    before = engine_metrics(shared, BASE)
    start = threading.Barrier(len(models))

    def one(i: int) -> tuple[float, float, int]:
        start.wait()
        first, chunks = None, 0
        stream = client.completions.create(model=models[i], prompt=PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].text is not None:
                first = first or time.perf_counter()
                chunks += 1
        assert first is not None, f"stream {i} ({models[i]}) had no token"
        return first, time.perf_counter(), chunks

    with ThreadPoolExecutor(len(models)) as pool:
        results = list(pool.map(one, range(len(models))))
    after = engine_metrics(shared, BASE)
    steps = after["vllm:iteration_tokens_total_count"] - before.get("vllm:iteration_tokens_total_count", 0.0)
    tokens = after["vllm:iteration_tokens_total_sum"] - before.get("vllm:iteration_tokens_total_sum", 0.0)
    assert all(chunks >= max_tokens // 2 for _, _, chunks in results), results
    # 8 x 48 decode tokens: batched, most steps carry all 8 (one request per step would give ~1).
    assert steps and tokens / steps >= 4, f"{tokens:.0f} tokens in {steps:.0f} engine steps: not batched"
    first_end = min(end for _, end, _ in results)
    late = [(models[i], round(first - first_end, 3)) for i, (first, _, _) in enumerate(results) if first >= first_end]
    assert not late, f"streams whose first token came after another stream had ended (s): {late}"


# -- life cycle ------------------------------------------------------------------------------
def test_new_subset_of_resident_experts_needs_no_engine_start(admin: httpx.Client, client: openai.OpenAI,
                                                              subsets: dict) -> None:
    starts = engine_of_base(admin)["starts"]
    r = admin.post("/v1/subsets", json={"name": "fresh", "experts": [2, 4, 6], "load": True})
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "loaded" and r.json()["engine_id"] == BASE
    out = client.completions.create(model="fresh", prompt="x = 1", max_tokens=4)
    assert out.model == "fresh" and out.choices[0].text
    assert engine_of_base(admin)["starts"] == starts


def engine_of_base(admin: httpx.Client) -> dict:
    return next(e for e in admin.get("/v1/engines").json()["data"] if e["model"] == BASE)


def test_delete_is_refused_while_busy_then_forced(shared: Server, admin: httpx.Client,
                                                  subsets: dict) -> None:
    generate(shared.openai(API_KEY), "half", "warm")  # its row is installed on first use
    assert "half" in installed_rows(shared, BASE).values()
    events: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with httpx.stream("POST", f"{shared.url}/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": "half", "prompt": "def f(", "max_tokens": 400, "ignore_eos": True,
                                "n": 8, "stream": True}) as r:
            for line in r.iter_lines():
                if line:
                    events.append(line)
                    started.set()

    pid = engine_of_base(admin)["pid"]
    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    with frozen(pid):  # at once: however fast the demo model is, the stream is still in flight
        assert_error(admin.delete("/v1/subsets/half"), 409, contains="in flight")
        assert_error(admin.post("/v1/subsets/half/unload"), 409, contains="in flight")
        deleting = ThreadPoolExecutor(1).submit(admin.delete, "/v1/subsets/half", params={"force": "true"})
        time.sleep(1.0)
    assert deleting.result(timeout=60).status_code == 200
    t.join(60)
    assert not t.is_alive()
    assert any('"code":"model_unavailable"' in e.replace(" ", "") for e in events), events[-3:]
    assert "half" not in installed_rows(shared, BASE).values()
    assert_error(admin.get("/v1/subsets/half"), 404)
    r = shared.openai(API_KEY).completions.create(model="quarter", prompt="ok", max_tokens=2)
    assert r.model == "quarter"


def test_engine_crash_fails_every_model_then_recovers(shared: Server, admin: httpx.Client, client: openai.OpenAI,
                                                      subsets: dict, dedicated: dict) -> None:
    results: dict[str, int] = {}

    def stream(model: str) -> None:
        with httpx.stream("POST", f"{shared.url}/v1/completions", timeout=120,
                          headers={"Authorization": f"Bearer {API_KEY}"},
                          json={"model": model, "prompt": "x", "max_tokens": 400, "ignore_eos": True,
                                "stream": True}) as r:
            body = "".join(r.iter_text())
        results[model] = 503 if '"model_unavailable"' in body else r.status_code

    pid = engine_of_base(admin)["pid"]
    with frozen(pid):  # all three stay in flight until the crash
        threads = [threading.Thread(target=stream, args=(m,)) for m in (BASE, "pair", "quarter")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine_of_base(admin)["inflight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine_of_base(admin)["inflight"] == 3
        os.killpg(pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    assert results == {BASE: 503, "pair": 503, "quarter": 503}
    deadline = time.monotonic() + 30  # the supervisor notices the exit (SIGCHLD) a moment later
    while engine_of_base(admin)["crashes"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The next request restarts the engine; rows are installed again before each subset serves.
    for model in ("pair", BASE, "quarter"):
        check_parity(generate(client, model, PROMPTS[1]), dedicated[model][1], f"{model} after the crash")
    assert engine_of_base(admin)["crashes"] == 1
