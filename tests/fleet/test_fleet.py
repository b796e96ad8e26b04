"""A fleet (issue 22): three `emo-serve serve` replicas share one PostgreSQL store behind the real
`vllm-router`. Subsets made on one replica answer on every other and through the router, a name is
created once, deletes reach every replica, routing learnt from traffic spread over the fleet equals
the same traffic on one replica, and the fleet rides out a killed replica and a restarted database.

Real parts throughout: PostgreSQL from Debian's packages, the router from PyPI, the replicas as
processes on 127.0.0.1 with their vLLM engines. The tests run in order on one fleet (module scope).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import httpx
import psycopg
import pytest
from api.api_harness import ADMIN_KEY, API_KEY, Server, descendants, installed_rows
from fleet_harness import Fleet

pytestmark = pytest.mark.vllm

BASE = "emo-demo"
Wait = Callable[[Callable[[], bool], float, str], float]


def create(url: str, name: str, experts: list[int] | None, **extra: object) -> httpx.Response:
    body = {"name": name, **({"experts": experts} if experts is not None else {}), **extra}
    return httpx.post(f"{url}/v1/subsets", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)


def complete(url: str, model: str, prompt: str = "def add(a, b):", *, user: str | None = None,
             timeout: float = 120) -> httpx.Response:
    body: dict[str, object] = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0}
    if user is not None:
        body["user"] = user
    return httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=timeout)


def requests_served(url: str, model: str) -> float:
    """This replica's own `emo_requests_total` for `model` (every status), from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "emo_requests_total" and s.labels.get("model") == model)


def assert_same_choice(mine: list[list[int]], theirs: list[list[int]], scores: dict, *,
                       size: int, rel: float = 1e-3) -> None:
    """The same experts per layer, except where the `size`-th place is a tie: the counts of the
    two models agree to float rounding (summed in another order, from other batches), so two
    experts whose scores differ by less than that may swap places. Any expert kept by one and not
    the other must score within `rel` of the layer's cut-off."""
    assert len(mine) == len(theirs) == len(scores["scores"])
    for layer, (a, b, s, routed) in enumerate(zip(mine, theirs, scores["scores"], scores["routed"], strict=True)):
        differ = set(a) ^ set(b)
        if not differ:
            continue
        cutoff = sorted((s[e] for e in routed), reverse=True)[size - 1]
        for expert in differ:
            assert s[expert] == pytest.approx(cutoff, rel=rel, abs=1e-7), (
                f"layer {layer}: expert {expert} kept by one model only, yet it scores {s[expert]} "
                f"against the cut-off {cutoff}: not a tie ({a} vs {b})")


def text_of(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_a_subset_made_on_one_replica_answers_everywhere(fleet: Fleet) -> None:
    a, b, c = (fleet.replicas[n].url for n in "abc")
    r = create(a, "code4", [0, 1, 2, 3])
    assert r.status_code == 201, r.text
    # At once, before any poll: B and C look the name up in the store on its first request.
    answers = {"b": text_of(complete(b, "code4")), "c": text_of(complete(c, "code4")),
               "a": text_of(complete(a, "code4")), "router": text_of(complete(fleet.router.url, "code4"))}
    assert len(set(answers.values())) == 1, answers  # greedy: the same tokens on every replica
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        models = {m["id"]: m for m in client.get(f"{c}/v1/models").json()["data"]}
    assert models["code4"]["parent"] == BASE and models["code4"]["emo"]["kind"] == "subset"


def test_concurrent_creates_of_one_name_make_one_subset(fleet: Fleet, wait: Wait) -> None:
    a, b = fleet.replicas["a"].url, fleet.replicas["b"].url
    barrier, answers = threading.Barrier(2), {}

    def make(url: str, experts: list[int]) -> None:
        barrier.wait()
        answers[url] = create(url, "twin", experts)

    threads = [threading.Thread(target=make, args=(a, [0, 1, 2, 3])), threading.Thread(target=make, args=(b, [4, 5]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(r.status_code for r in answers.values())
    assert statuses == [201, 409], {u: r.text for u, r in answers.items()}
    loser = next(r for r in answers.values() if r.status_code == 409)
    assert loser.json()["error"]["code"] == "name_taken"
    winner = next(r for r in answers.values() if r.status_code == 201).json()
    with psycopg.connect(fleet.store) as conn:
        (count,) = conn.execute("SELECT count(*) FROM emo_subsets WHERE name = 'twin'").fetchone()  # type: ignore[misc]
    assert count == 1

    def everywhere() -> bool:
        for replica in fleet.replicas.values():
            r = httpx.get(f"{replica.url}/v1/subsets/twin", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            if r.status_code != 200 or r.json()["experts"] != winner["experts"]:
                return False
        return True

    wait(everywhere, 10, "every replica to show the winner's experts")


def test_a_delete_on_one_replica_reaches_the_others(fleet: Fleet, wait: Wait) -> None:
    a, b = fleet.server("a"), fleet.server("b")
    assert create(a.url, "brief", [2, 3, 4]).status_code == 201
    text_of(complete(a.url, "brief"))  # its mask row is installed on first use
    engine = next(e["model"] for e in a.client().get("/v1/engines").json()["data"])
    assert "brief" in installed_rows(a, engine).values()
    r = httpx.delete(f"{b.url}/v1/subsets/brief", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    wait(lambda: complete(a.url, "brief").status_code == 404, 5, "A to answer 404 for `brief`")
    assert "brief" not in installed_rows(a, engine).values()
    assert complete(a.url, "brief").json()["error"]["code"] == "model_not_found"


def test_a_profiling_job_on_one_replica_is_seen_by_the_others(fleet: Fleet, wait: Wait) -> None:
    """A subset made from examples is a job on A (202, `profiling`): the name is held in the store
    at once (B refuses it), B shows the job, and then the finished subset with A's experts."""
    a, b = fleet.replicas["a"].url, fleet.replicas["b"].url
    r = create(a, "profiled", None, examples=["def f(x):\n    return x * 2\n"], method="random", size=3)
    assert r.status_code == 202, r.text
    assert create(b, "profiled", [1, 2]).status_code == 409

    def on_b() -> dict:
        got = httpx.get(f"{b}/v1/subsets/profiled", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
        assert got.status_code == 200, got.text
        return got.json()

    assert on_b()["state"] in ("profiling", "ready"), on_b()
    wait(lambda: on_b()["state"] == "ready", 60, "B to show the finished subset")
    mine = httpx.get(f"{a}/v1/subsets/profiled", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert mine["state"] == "ready" and on_b()["experts"] == mine["experts"] and on_b()["method"] == "random"
    assert text_of(complete(b, "profiled"))


def test_traffic_spread_over_the_fleet_teaches_what_one_replica_would(fleet: Fleet, wait: Wait) -> None:
    """The same prompts to two subsets with the same experts: `spread` through the router (which
    hashes each prompt to a replica), `single` straight to A. Read on C, the fleet's counts of
    `spread` equal A's of `single`, and so does the subset `from_traffic` learns from them."""
    a, c = fleet.replicas["a"].url, fleet.replicas["c"].url
    experts = [0, 1, 2, 3, 4, 5, 6, 7]
    for name in ("spread", "single"):
        assert create(a, name, experts).status_code == 201
    prompts = [f"def task_{i}(values):\n    return" for i in range(18)]
    for prompt in prompts:
        text_of(complete(fleet.router.url, "spread", prompt, user="tenant"))
        text_of(complete(a, "single", prompt, user="tenant"))
    served = {n: requests_served(r.url, "spread") for n, r in fleet.replicas.items()}
    assert sum(1 for v in served.values() if v) >= 2, served  # the router did spread them

    def routing(url: str, model: str) -> dict:
        r = httpx.get(f"{url}/v1/models/{model}/routing", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()

    single = routing(a, "single")
    wait(lambda: routing(c, "spread")["tokens"] == single["tokens"], 30,
         "C to read the whole fleet's counts of `spread` (each replica saves every second)")
    spread = routing(c, "spread")
    for mine, theirs in zip(spread["layers"], single["layers"], strict=True):
        assert mine["tokens"] == theirs["tokens"]
        assert mine["mass"] == pytest.approx(theirs["mass"], rel=1e-4, abs=1e-6)
    learnt = {}
    for model in ("spread", "single"):
        r = create(c, f"from-{model}", None, from_traffic={"model": model, "user": "tenant"}, size=4)
        assert r.status_code == 201, r.text
        learnt[model] = r.json()["experts"]
    single_scores = httpx.get(f"{c}/v1/subsets/from-single/scores", headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=60).json()
    assert_same_choice(learnt["spread"], learnt["single"], single_scores, size=4)
    # The scores it was chosen by are in the store: another replica shows the same.
    scores = [httpx.get(f"{url}/v1/subsets/from-spread/scores", headers={"Authorization": f"Bearer {API_KEY}"},
                        timeout=60) for url in (c, a)]
    assert [r.status_code for r in scores] == [200, 200], [r.text for r in scores]
    assert scores[0].json() == scores[1].json() and scores[0].json()["method"] == "usage"


def test_a_killed_replica_loses_no_request_silently_and_rejoins(fleet: Fleet, wait: Wait) -> None:
    c = fleet.replicas["c"]
    router = fleet.router
    results: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = complete(router.url, "code4", f"x{i} = {i} *", timeout=60)
                outcome: int | str = r.status_code
                if r.status_code == 200 and not r.json()["choices"][0]["text"]:
                    outcome = "empty"  # a success that carries nothing would be a lost request
            except httpx.HTTPError as exc:  # an error the client sees: not lost silently
                outcome = type(exc).__name__
            results.append((time.monotonic(), outcome))

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        wait(lambda: len(results) >= 5, 120, "traffic through the router")
        old = c.server
        assert old is not None
        pod = [old.proc.pid, *descendants(old.proc.pid)]
        for pid in pod:  # the whole pod dies at once: front end and engine
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        old.proc.wait(30)
        router.wait_worker(c.url, healthy=False, timeout=30)
        marked = time.monotonic()
        wait(lambda: sum(1 for t, _ in results if t > marked + 1) >= 5, 120, "traffic after the kill")
        restarted = c.start()
        restarted.wait_ready(timeout=900)
        router.wait_worker(c.url, healthy=True, timeout=60)
        back = requests_served(c.url, "code4")
        wait(lambda: requests_served(c.url, "code4") > back, 120, "the restarted replica to get traffic again")
    finally:
        stop.set()
        sender.join(120)
    assert not sender.is_alive()
    # Every request came back (the sender finished), each a success with text or an error the
    # client saw (a status >= 400 or a failed connection); none a silent empty answer.
    outcomes = [o for _, o in results]
    assert "empty" not in outcomes and all(o == 200 or not isinstance(o, int) or o >= 400 for o in outcomes)
    # Once the router marked C down, it sent nothing there: every later request succeeded.
    after = [o for t, o in results if t > marked + 1]
    assert after and all(o == 200 for o in after), after


def test_the_fleet_serves_through_a_database_restart(fleet: Fleet, wait: Wait) -> None:
    a, b = fleet.replicas["a"].url, fleet.replicas["b"].url
    fleet.postgres.stop()
    try:
        assert text_of(complete(a, "code4"))  # cached: served without the store
        assert text_of(complete(b, "twin"))
        r = create(b, "while-down", [1, 2])
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable" and r.headers.get("Retry-After")
        assert "password" not in r.text and "psycopg" not in r.text
    finally:
        fleet.postgres.start()
    wait(lambda: create(b, "after-restart", [1, 2]).status_code == 201, 30, "creates to work again")
    text_of(complete(a, "after-restart"))


def test_every_replica_is_still_whole(fleet: Fleet) -> None:
    """No replica lost its engine or restarted one along the way (the killed one aside)."""
    for name in ("a", "b"):
        server: Server = fleet.server(name)
        assert server.proc.poll() is None
        engines = server.client().get("/v1/engines").json()["data"]
        assert [e["starts"] for e in engines] == [1], engines
