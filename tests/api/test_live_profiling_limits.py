"""Live-engine profiling shares the engine with everyone: it counts against --max-profiling-jobs
(429 beyond), a request's examples are bounded in tokens (400 naming `examples`), and its
prefills go one at a time, so a completion sent meanwhile is answered.

The first tests need no server; the rest share one server on the trained `emo-demo` (base served,
shared engine, routing capture on) with two profiling places.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from api_harness import ADMIN_KEY, Server, assert_error, frozen
from emo_serve.api.jobs import ProfilingJobs
from emo_serve.api.live_scores import check_total, priority_scheduled
from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import Busy, ExamplesError
from emo_serve.examples import load_examples
from emo_serve.selection import SelectionRequest
from emo_serve.settings import Settings
from emo_serve.store import SubsetStore

BASE = "emo-demo"
EXAMPLES = Path(__file__).parents[2] / "emo_serve" / "data" / "models" / "examples"
MAX_JOBS = 2
SERVER_ARGS = ("--dtype", "float32", "--kv-cache-gb", "1", "--routing-interval", "1", "--probe-interval", "600",
               "--max-profiling-jobs", str(MAX_JOBS))


def texts(domain: str) -> list[str]:
    return [json.loads(line)["text"] for line in (EXAMPLES / f"{domain}.jsonl").read_text().splitlines()]


def long_texts(count: int) -> list[str]:
    """`count` distinct texts of well over 2,000 tokens each (the demo's texts, concatenated)."""
    whole = "\n".join(texts("code") + texts("legal") + texts("math") + texts("prose"))
    return [f"# example {i}\n{whole}" for i in range(count)]


# -- without a server ------------------------------------------------------------------------------
def test_live_runs_hold_profiling_places(tiny_ckpt: Path, tmp_path: Path) -> None:
    """A run in a live engine takes one of `max_jobs` places, as a queued job does: beyond them
    both a live run and a queued job are refused with `Busy` (429), and a place frees on exit."""
    store = SubsetStore(Checkpoint(tiny_ckpt), "tiny", tmp_path / "state")
    examples = load_examples(["def add(a, b):\n    return a + b\n"])

    async def scenario() -> None:
        jobs = ProfilingJobs(store, max_jobs=2)
        with jobs.live():
            jobs.start("queued", examples, SelectionRequest(method="usage", size=2))
            assert jobs.in_flight == 2
            with pytest.raises(Busy) as live_refused, jobs.live():
                pass
            with pytest.raises(Busy):
                jobs.start("one-too-many", examples, SelectionRequest(method="usage", size=2))
        assert live_refused.value.param == "examples" and "the limit is 2" in str(live_refused.value)
        assert jobs.in_flight == 1
        with jobs.live():  # the live place came back
            assert jobs.in_flight == 2
        jobs.cancel("queued")
        jobs.close()

    asyncio.run(scenario())


def test_example_tokens_are_bounded() -> None:
    check_total([[1] * 300] * 64, 64 * 300)
    with pytest.raises(ExamplesError) as refused:
        check_total([[1] * 300] * 64, 64 * 300 - 1)
    assert refused.value.param == "examples" and "19200 tokens" in str(refused.value)
    assert "--max-profile-tokens" in str(refused.value)


def test_default_token_bound_fits_a_few_hundred_tokens_per_example(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMO_MAX_PROFILE_TOKENS", raising=False)
    limit = Settings().max_profile_tokens
    assert 64 * 300 <= limit < 64 * 2000
    monkeypatch.setenv("EMO_MAX_PROFILE_TOKENS", "1000")
    assert Settings().max_profile_tokens == 1000


@pytest.mark.parametrize("args, expected", [
    ((), False),
    (("--scheduling-policy", "fcfs"), False),
    (("--scheduling-policy", "priority"), True),
    (("--max-num-seqs", "8", "--scheduling-policy=priority"), True),
])
def test_priority_only_where_the_engine_schedules_by_it(args: tuple[str, ...], expected: bool) -> None:
    """vLLM refuses a request priority other than 0 unless the engine runs the priority policy."""
    proc = SimpleNamespace(opts=SimpleNamespace(extra_args=args), extra_args=())
    assert priority_scheduled(proc) is expected


# -- on a live engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(server_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Stopped with the module, not the session: after its engine was frozen and thawed, vLLM's
    worker was seen spinning a whole core while idle (its shared-memory queue's reader), which
    would slow every test after it."""
    server = server_factory(None, *SERVER_ARGS, state_dir=tmp_path_factory.mktemp("live-limits"),
                            env={"EMO_ENGINE_MODE": "shared"})
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def admin(live: Server) -> httpx.Client:
    return live.client(ADMIN_KEY)


def create(server: Server, body: dict) -> httpx.Response:
    with server.client(ADMIN_KEY) as c:
        return c.post("/v1/subsets", json=body)


@pytest.mark.vllm
def test_too_many_example_tokens_is_400(admin: httpx.Client) -> None:
    """64 examples of 2,000 tokens (after truncation) are over the default bound: refused before
    anything reaches the engine, naming `examples`."""
    r = admin.post("/v1/subsets", json={"name": "too-long", "examples": long_texts(64), "fraction": 0.25,
                                        "max_tokens_per_example": 2000})
    assert_error(r, 400, param="examples", contains="128000 tokens")
    assert admin.get("/v1/subsets/too-long").status_code == 404


@pytest.mark.vllm
def test_live_profiling_beyond_the_limit_is_429(live: Server, admin: httpx.Client) -> None:
    """Ten creates at once while the engine is stalled (so the first ones are still prefilling
    when the others arrive): `MAX_JOBS` of them hold the places and finish once it resumes, the
    others are 429 with Retry-After, as queued profiling jobs beyond the limit are."""
    engine_pid = admin.get("/v1/engines").json()["data"][0]["pid"]
    examples = [f"# {i}\n{t}" for i, t in enumerate(texts("code")[:4])]
    bodies = [{"name": f"burst-{i}", "examples": examples, "fraction": 0.25} for i in range(10)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        with frozen(engine_pid):
            futures = [pool.submit(create, live, body) for body in bodies]
            live.wait_until(lambda: sum(f.done() for f in futures) >= len(bodies) - MAX_JOBS, 120,
                            "the creates beyond the limit to be refused")
        responses = [f.result(timeout=300) for f in futures]
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * MAX_JOBS + [429] * (len(bodies) - MAX_JOBS), [r.text for r in responses]
    for r in responses:
        if r.status_code == 429:
            error = assert_error(r, 429, param="examples", contains=f"the limit is {MAX_JOBS}")
            assert r.headers["retry-after"] and error["type"] == "rate_limit_error"
        else:
            assert r.json()["scored_by"] == "engine"
    # The places are free again: one more is scored at once.
    r = create(live, {"name": "after-burst", "examples": examples, "fraction": 0.25})
    assert r.status_code == 201, r.text


@pytest.mark.vllm
def test_a_completion_is_answered_during_live_profiling(live: Server, admin: httpx.Client) -> None:
    """64 examples of 400 tokens (within the default bound) are scored in the engine while
    completions go to the same engine; every completion is answered and the subset is made."""
    body = {"name": "big-profile", "examples": long_texts(64), "fraction": 0.25, "max_tokens_per_example": 400}
    answers: list[dict] = []
    with ThreadPoolExecutor(1) as pool:
        profiling = pool.submit(create, live, body)
        while not profiling.done() or not answers:
            r = admin.post("/v1/completions", json={"model": BASE, "prompt": "def add(a, b):", "max_tokens": 2,
                                                    "temperature": 0, "cache_salt": uuid.uuid4().hex})
            assert r.status_code == 200, r.text
            answers.append(r.json())
        created = profiling.result()
    assert created.status_code == 201, created.text
    assert created.json()["scored_by"] == "engine"
    assert all(a["usage"]["completion_tokens"] == 2 for a in answers)
    scores = admin.get("/v1/subsets/big-profile/scores").json()
    assert scores["example_tokens"] == [400] * 64
