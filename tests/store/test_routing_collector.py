"""The routing collector (emo_serve.api.routing) against stand-in engines: counts booked only for
the incarnation of a model that exists now, files that follow deletes, saves that are rate-limited
and serialised off the event loop, and collections that reads may ask for.

The engines here hand out what `emo_vllm.usage.RoutingUsage.drain` hands out (the plugin's own
tests check that); the real-server counterpart is tests/api/test_routing_counters_recreate.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from emo_serve.api.routing import Incarnation, RoutingCollector
from emo_serve.catalog import DirectoryCatalog
from emo_serve.engines import EngineState
from emo_serve.usage import PROFILE_KEY_PREFIX, Tally, UsageBook, UsageEncoder, usage_key

SHAPE = [4, 0, 4]


def entry(key: str, user: str = "", n: int = 1) -> dict[str, Any]:
    """`n` tokens of one engine key, all routed to expert 0."""
    return {"model": key, "user": user, "tokens": [n, n], "mass": [[float(n), 0, 0, 0]] * 2,
            "counts": [[n, 0, 0, 0]] * 2, "outside_sum": 0.0, "outside_tokens": 0, "hist": [0, 0, 0]}


class Engine:
    """An engine's drain control call: what was counted since the last one. Giving it counts
    (`pending`) is serving a request: it sets `last_used`, as a lease's release does."""

    def __init__(self) -> None:
        self._pending: list[dict[str, Any]] = []
        self.drains = 0
        self.state, self.proc, self.pid = EngineState.READY, self, 1000
        self.inflight, self.last_used = 0, 0.0

    @property
    def pending(self) -> list[dict[str, Any]]:
        return self._pending

    @pending.setter
    def pending(self, keys: list[dict[str, Any]]) -> None:
        self._pending, self.last_used = keys, time.monotonic()

    async def rpc(self, method: str, *args: str, timeout: float | None = None) -> list[dict[str, Any]]:
        assert method == "emo_usage_drain"
        self.drains += 1
        keys, self._pending = self._pending, []
        return [{"layers": [0, 2], "bounds": [0.1, 0.5, 1.0], "keys": keys}]


class Models:
    """The service's side: which incarnation of each model counts now."""

    def __init__(self, **keys: str) -> None:
        self.now = {name: Incarnation(usage_key(name, salt), f"{name}-{salt}") for name, salt in keys.items()}

    def recreate(self, name: str, salt: str) -> None:
        self.now[name] = Incarnation(usage_key(name, salt), f"{name}-{salt}")


@pytest.fixture
def engine() -> Engine:
    return Engine()


def collector(engine: Engine, models: Models, state: Path, *, save_interval: float = 60.0,
              outcomes: list[str] | None = None) -> RoutingCollector:
    manager = SimpleNamespace(get=lambda engine_id: engine)
    placement = SimpleNamespace(local_ids=lambda engine_id: None)
    out = RoutingCollector(UsageBook(SHAPE), manager, placement, interval=3600, save_interval=save_interval,  # type: ignore[arg-type]
                           catalog=DirectoryCatalog(state), incarnation=models.now.get,
                           on_drain=None if outcomes is None else lambda _, how: outcomes.append(how))
    out.attached.add("engine")
    return out


def seen(c: RoutingCollector, model: str, user: str | None = None) -> int:
    return c.book.tally(model, user=user, now=time.time()).seen


def test_a_recreated_subset_books_only_its_own_tokens(engine: Engine, tmp_path: Path) -> None:
    """`s` is deleted with its last tokens still in the engine (no collection ran since), then
    made again: those tokens carry the old incarnation's key and are dropped, not booked to it."""
    models = Models(s="1", base="base")

    async def scenario() -> RoutingCollector:
        c = collector(engine, models, tmp_path)
        engine.pending = [entry(usage_key("s", "1"), "oldtenant", 5)]
        c.forget("s")
        models.recreate("s", "2")
        engine.pending += [entry(usage_key("s", "2"), "newtenant", 2),
                           entry("s", "direct", 7), entry("nobody", "", 3)]  # sent to the engine directly
        await c.collect()
        await c.stop()
        return c

    c = asyncio.run(scenario())
    assert seen(c, "s") == 2 and seen(c, "s", "newtenant") == 2 and seen(c, "s", "oldtenant") == 0
    assert c.book.models["s"].identity == "s-2" and set(c.book.models) == {"s"}
    assert json.loads((tmp_path / "usage" / "s.json").read_text())["identity"] == "s-2"


def test_a_file_of_an_earlier_incarnation_is_not_loaded(engine: Engine, tmp_path: Path) -> None:
    models = Models(s="1")
    c = collector(engine, models, tmp_path)
    engine.pending = [entry(usage_key("s", "1"), "oldtenant", 5)]
    asyncio.run(c.stop())
    models.recreate("s", "2")  # e.g. a crash between the delete's unlinks, then `s` made again
    again = collector(engine, models, tmp_path)
    again.load(["s"])
    assert "s" not in again.book.models
    models.recreate("s", "1")
    again.load(["s"])
    assert seen(again, "s", "oldtenant") == 5


def test_a_delete_during_a_write_leaves_no_file(engine: Engine, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The write of a model's counters is on a thread; a delete meanwhile must not see the file
    come back when the write's rename lands."""
    c = collector(engine, Models(s="1"), tmp_path)
    writing, deleted = threading.Event(), threading.Event()
    real = DirectoryCatalog.write_counters

    def slow_write(self: DirectoryCatalog, model: str, text: str) -> None:
        writing.set()
        assert deleted.wait(10)
        real(self, model, text)

    async def scenario() -> None:
        engine.pending = [entry(usage_key("s", "1"), "u", 1)]
        await c.collect()
        monkeypatch.setattr(DirectoryCatalog, "write_counters", slow_write)
        save = asyncio.create_task(c.save())
        assert await asyncio.to_thread(writing.wait, 10)
        c.forget("s")
        deleted.set()
        await save

    asyncio.run(scenario())
    assert not (tmp_path / "usage" / "s.json").exists()


def test_saves_are_rate_limited_and_serialised_off_the_event_loop(engine: Engine, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop only copies what changed; encoding (the costly part: every number) runs on
    a thread, at most once per `save_interval` per model, and everything is written at stop."""
    on_loop: list[str] = []

    def watch(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            if threading.current_thread() is threading.main_thread():
                on_loop.append(name)
            return real(*args, **kw)
        return wrapper

    monkeypatch.setattr(UsageEncoder, "encode", watch("encode", UsageEncoder.encode))
    monkeypatch.setattr(Tally, "to_json", watch("to_json", Tally.to_json))
    c = collector(engine, Models(base="b"), tmp_path, save_interval=60)
    path = tmp_path / "usage" / "base.json"

    def saved_tokens() -> list[int]:
        return json.loads(path.read_text())["total"]["tokens"]

    async def scenario() -> list[list[int]]:
        files = []
        for _ in range(2):
            engine.pending = [entry(usage_key("base", "b"), "u", 1)]
            await c.collect()
            await c.save()
            files.append(saved_tokens())
        engine.pending = [entry(usage_key("base", "b"), "u", 1)]
        await c.stop()
        return files

    first, within_the_interval = asyncio.run(scenario())
    assert first == within_the_interval == [1, 0, 1]   # saved at once, then not again within the interval
    assert saved_tokens() == [3, 0, 3]                 # stop writes what is left
    assert on_loop == []


def test_a_read_collects_only_when_the_last_collection_is_old(engine: Engine, tmp_path: Path) -> None:
    c = collector(engine, Models(base="b"), tmp_path)
    assert c.collected_at is None
    before = time.time()

    async def polls(n: int) -> None:
        await asyncio.gather(*(c.collect(max_age=1.0) for _ in range(n)))

    asyncio.run(polls(1))
    assert engine.drains == 1 and c.collected_at is not None and c.collected_at >= before
    asyncio.run(polls(5))   # a client polling in a loop
    assert engine.drains == 1
    c.collected_at -= 2
    engine.pending = [entry(usage_key("base", "b"))]  # the engine served a request meanwhile
    asyncio.run(polls(1))
    assert engine.drains == 2


def test_a_read_waits_a_bounded_time_for_a_stalled_engine(engine: Engine, tmp_path: Path) -> None:
    """The read goes on with the last collection; the collection itself goes on, and its counts
    (drained from the engine, so nowhere else any more) still reach the book."""
    c = collector(engine, Models(base="b"), tmp_path)
    drain = engine.rpc

    async def stalled(method: str, *args: str, timeout: float | None = None) -> list[dict[str, Any]]:
        await asyncio.sleep(1.0)
        return await drain(method, *args, timeout=timeout)

    engine.rpc = stalled  # type: ignore[method-assign]
    engine.pending = [entry(usage_key("base", "b"), "u", 4)]

    async def scenario() -> tuple[float, int, int]:
        t0 = time.monotonic()
        await c.refresh(max_age=1.0, wait=0.1)
        waited, during = time.monotonic() - t0, seen(c, "base")
        await asyncio.sleep(1.5)
        return waited, during, seen(c, "base")

    waited, during, after = asyncio.run(scenario())
    assert waited < 0.5 and during == 0 and after == 4


def test_an_engine_that_served_nothing_since_its_last_drain_is_skipped(engine: Engine, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Each drain wakes vLLM's CPU worker (a second of busy-polling), so an engine is drained only
    when it may have counted something: a request in flight, one ended since (within the grace
    for a step after an abort), or a new process. Shutdown drains every engine."""
    import emo_serve.api.routing as routing

    monkeypatch.setattr(routing, "IDLE_GRACE_SECONDS", 0.0)
    outcomes: list[str] = []
    c = collector(engine, Models(base="b"), tmp_path, outcomes=outcomes)

    async def scenario() -> None:
        engine.pending = [entry(usage_key("base", "b"), "u", 2)]
        await c.collect()                      # served since (never drained): drained
        await c.collect()                      # nothing since: skipped
        engine.inflight = 1
        await c.collect()                      # a request in flight: drained
        engine.inflight = 0
        await c.collect()                      # it ended before that drain began: skipped
        engine.pending = [entry(usage_key("base", "b"), "u", 3)]
        await c.collect(max_age=0.0)           # a read's fresh collection after a request
        engine.pid = 1001                      # restarted: a new process is drained once
        await c.collect()
        await c.collect()
        await c.stop()                         # shutdown: drained whatever it did

    asyncio.run(scenario())
    assert outcomes == ["drained", "idle", "drained", "idle", "drained", "drained", "idle", "drained"]
    assert engine.drains == 5 and seen(c, "base") == 5


def test_a_request_that_ends_within_the_grace_keeps_the_engine_drained(engine: Engine, tmp_path: Path) -> None:
    """A request aborted by its client may run one more step after its lease is released: an
    engine whose last request ended less than `IDLE_GRACE_SECONDS` before a drain began is drained
    again at the next pass."""
    outcomes: list[str] = []
    c = collector(engine, Models(base="b"), tmp_path, outcomes=outcomes)

    async def scenario() -> None:
        engine.pending = [entry(usage_key("base", "b"), "u", 1)]
        await c.collect()
        engine._pending = [entry(usage_key("base", "b"), "u", 1)]  # that request's last step, after it
        await c.collect()

    asyncio.run(scenario())
    assert outcomes == ["drained", "drained"] and seen(c, "base") == 2


def test_profiling_counts_are_kept_only_while_their_run_waits_for_them(engine: Engine, tmp_path: Path) -> None:
    """An engine-side profiling run that failed or was cancelled may leave tokens under its key in
    the engine; they are dropped when drained, not kept for a run that will never take them."""
    c = collector(engine, Models(base="b"), tmp_path)
    running, ended = f"{PROFILE_KEY_PREFIX}running", f"{PROFILE_KEY_PREFIX}ended"
    c.open_profile(running)

    async def scenario() -> None:
        engine.pending = [entry(running, n=3), entry(ended, n=5), entry(usage_key("base", "b"), "u", 1)]
        await c.collect()

    asyncio.run(scenario())
    assert list(c.profiles) == [running] and c.profiles[running].seen == 3
    assert seen(c, "base") == 1
