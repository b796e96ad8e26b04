"""Collect the engines' routing counters into the front end's book, and keep it on disk.

Every `--routing-interval` seconds (and before anything reads the book: a routing query, a
subset's drift, a subset from traffic, an engine-side profile) each engine with capture on is
drained by a control call between its steps (`emo_vllm.usage`). Counters arrive in the engine's
expert numbering and are put into the base's (the placement knows each engine's experts).

An engine that has served nothing since its last drain is not drained: it has nothing to give,
and the call is not free. vLLM's CPU worker busy-polls its message queue for a second after each
message it reads, so draining an idle engine every 5 s kept a fifth of a core busy on a server
that served nobody (measured on the demo: its worker used 6.4 CPU s in 30 idle s, 0.5 s without capture).

Engines count under a key naming the model *and its incarnation* (`usage.usage_key`): a subset
deleted with counts still in an engine and made again under its name does not inherit them, as
only the key of the incarnation that exists now is booked.

Changed models are written back to the catalog (atomically beside the subsets,
`<state-dir>/usage/<model>.json`, or as this replica's row in a shared store), so a restart keeps
what was learnt: at most once per `--routing-save-interval` per model (a
model's file holds all its users and buckets) and everything at shutdown. The event loop only
copies what changed; encoding and writing run on a thread. An engine that crashed loses at most
one interval of counts, a front end killed outright at most one save interval.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

from ..catalog import Catalog
from ..engines import EngineManager, EngineState
from ..engines.manager import Engine
from ..engines.placement import Placement
from ..engines.process import EngineProcess, EngineStartError
from ..errors import Unavailable
from ..usage import (
    PROFILE_KEY_PREFIX,
    ModelUsage,
    Tally,
    UsageBook,
    UsageEncoder,
    UsageSnapshot,
    aligned_buckets,
    from_engine,
    key_model,
    merge_usage,
)

log = logging.getLogger(__name__)
_RPC_ERRORS = (EngineStartError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)
# An engine is idle, and skipped, once its last request ended this long before its last drain
# began: a request aborted by its client may still run a step after the front end lets it go.
IDLE_GRACE_SECONDS = 2.0


class Incarnation(NamedTuple):
    """Which life of a model counts now: the key its requests are counted under in the engines
    (`usage.usage_key`, per process) and the identity its saved counters carry (stable across
    restarts)."""

    key: str
    identity: str


class RoutingCollector:
    def __init__(self, book: UsageBook, manager: EngineManager, placement: Placement, *, interval: float,
                 save_interval: float, catalog: Catalog,
                 incarnation: Callable[[str], Incarnation | None],
                 on_drain: Callable[[str, str], None] | None = None) -> None:
        self.book, self.manager, self.placement = book, manager, placement
        self._on_drain = on_drain  # (engine id, outcome: drained / idle / failed), for /metrics
        self.interval, self.save_interval = interval, save_interval
        self._catalog, self._incarnation = catalog, incarnation
        self.attached: set[str] = set()  # engine ids whose runner counts
        self.profiles: dict[str, Tally] = {}  # engine-side profiling runs under way, by key (`open_profile`)
        self.collected_at: float | None = None  # when the last collection drained the engines (epoch s)
        # engine id -> (its pid, when its last drain began, monotonic)
        self._drained: dict[str, tuple[int | None, float]] = {}
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._saved: dict[str, float] = {}  # model -> when its last save began (monotonic)
        self._encoder = UsageEncoder()
        self._writer: asyncio.Task | None = None  # the last save's thread (it outlives a cancelled pass)
        self._refreshes: set[asyncio.Task] = set()  # collections that reads stopped waiting for
        # The other replicas' counts, summed, as a shared store last gave them (`pull`); reads add
        # them to this replica's own book.
        self.fleet = UsageBook(book.experts_per_layer, retention=book.retention, bucket=book.bucket,
                               max_users=book.max_users)
        self.pulled_at: float | None = None
        self._pull_lock = asyncio.Lock()

    async def attach(self, engine: Engine, proc: EngineProcess) -> None:
        """Before an engine is marked ready: hook its runner so its steps are counted."""
        try:
            await proc.rpc("emo_usage_attach")
        except EngineStartError:
            raise
        except Exception as exc:  # aiohttp or JSON errors: the engine cannot count
            raise EngineStartError(f"the engine of `{engine.model_id}` could not start counting its routing",
                                   repr(exc)) from exc
        self.attached.add(engine.model_id)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Collect once more (the engines are still up) and write every changed model."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.collect(everything=True)
        await self.save(everything=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.collect()
                await self.save()
            except Exception:  # the loop must outlive any one bad pass; the next one retries
                log.exception("routing collection failed")

    async def collect(self, timeout: float = 10.0, *, max_age: float | None = None, everything: bool = False) -> None:
        """Drain every counting engine that is up and has served since its last drain into the book
        (concurrently; an engine that does not answer within `timeout`, e.g. a stalled one, is
        skipped until the next pass). With `max_age`, only if the last collection is older than
        that (reads that want fresh counts without draining the engines at every poll);
        `everything`: idle engines too (at shutdown)."""
        async with self._lock:
            if max_age is not None and self.collected_at is not None and time.time() - self.collected_at <= max_age:
                return
            started, began = time.time(), time.monotonic()
            ready = []
            for engine_id in sorted(self.attached):
                engine = self.manager.get(engine_id)
                if engine is None:
                    self.attached.discard(engine_id)
                    self._drained.pop(engine_id, None)
                elif engine.state is EngineState.READY and engine.proc is not None:
                    if everything or not self._idle(engine_id, engine):
                        ready.append((engine_id, engine.proc))
                    elif self._on_drain is not None:
                        self._on_drain(engine_id, "idle")
            results = await asyncio.gather(*(proc.rpc("emo_usage_drain", timeout=timeout) for _, proc in ready),
                                           return_exceptions=True)
            for (engine_id, proc), result in zip(ready, results):
                outcome = "drained"
                try:
                    if isinstance(result, BaseException):
                        raise result
                    self._add(result[0], self.placement.local_ids(engine_id))
                    self._drained[engine_id] = (proc.pid, began)
                except _RPC_ERRORS as exc:  # a dying or stalled engine: its supervisor deals with it
                    outcome = "failed"
                    log.warning("could not collect routing counters", extra={"engine": engine_id,
                                                                             "error": repr(exc)})
                if self._on_drain is not None:
                    self._on_drain(engine_id, outcome)
            self.collected_at = started

    def _idle(self, engine_id: str, engine: Engine) -> bool:
        """Whether the engine has counted nothing since its last drain: the same process, no
        request in flight, and its last one ended `IDLE_GRACE_SECONDS` before that drain began
        (every request, engine-side profiling included, holds a lease, which sets `last_used`)."""
        drained = self._drained.get(engine_id)
        return (drained is not None and engine.proc is not None and drained[0] == engine.proc.pid
                and not engine.inflight and engine.last_used + IDLE_GRACE_SECONDS < drained[1])

    async def refresh(self, *, max_age: float, wait: float) -> None:
        """For a read that wants fresh counts: collect unless the last collection is under
        `max_age` seconds old, waiting for it at most `wait` seconds (a stalled engine holds a
        collection up to its timeout; the read then shows the last one, whose time it gives). The
        collection is never cancelled: an engine that was drained has handed its counts over."""
        task = asyncio.create_task(self.collect(max_age=max_age))
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)
        await asyncio.wait([task], timeout=wait)

    def open_profile(self, key: str) -> None:
        """An engine-side profiling run will count under `key`: book its tokens in `profiles` (the
        run pops them) until then."""
        self.profiles[key] = Tally.empty(self.book.experts_per_layer)

    def _add(self, data: dict[str, Any], local_ids: list[list[int]] | None) -> None:
        now = time.time()
        for entry in data["keys"]:
            key, user = str(entry["model"]), str(entry["user"])
            if key.startswith(PROFILE_KEY_PREFIX):
                # Only a run still waiting for its counts: one that failed or was cancelled may
                # leave tokens in the engine, and nobody would ever take them out of `profiles`.
                if key in self.profiles:
                    self.profiles[key].add(from_engine(entry, data["layers"], data["bounds"],
                                                       self.book.experts_per_layer, local_ids))
                continue
            model = key_model(key)
            current = self._incarnation(model)
            # Only the model's life that exists now: not a deleted one's last tokens, nor requests
            # sent to an engine directly (nobody's).
            if current is not None and current.key == key:
                tally = from_engine(entry, data["layers"], data["bounds"], self.book.experts_per_layer, local_ids)
                self.book.add(model, user, tally, now, identity=current.identity)

    # -- the fleet -------------------------------------------------------------------------------
    async def pull(self, models: list[str], *, max_age: float) -> None:
        """Read what the other replicas sharing the store saved for `models` (each saves every
        --routing-save-interval), unless the last pull is under `max_age` seconds old. Nothing to
        read when the store is the state dir."""
        if not self._catalog.shared:
            return
        async with self._pull_lock:
            if self.pulled_at is not None and time.monotonic() - self.pulled_at <= max_age:
                return
            wanted = [(m, current.identity) for m in models if (current := self._incarnation(m)) is not None]
            self.fleet.models = await asyncio.to_thread(self._read_others, wanted)
            self.pulled_at = time.monotonic()

    def _read_others(self, wanted: list[tuple[str, str]]) -> dict[str, ModelUsage]:
        out: dict[str, ModelUsage] = {}
        for model, identity in wanted:
            for data in self._catalog.other_counters(model):
                try:  # another life of the model (a replica that has not seen it deleted yet) is refused
                    usage = self.fleet.parse(model, data, source=self._catalog.where("counters", model),
                                             identity=identity)
                except ValueError as exc:
                    log.debug("skipping another replica's routing counters", extra={"error": str(exc)})
                    continue
                if model in out:
                    merge_usage(out[model], usage, self.book.bucket)
                else:
                    usage.buckets = deque(aligned_buckets([usage.buckets], self.book.bucket))
                    out[model] = usage
        return out

    def tally(self, model: str, *, window: float | None = None, user: str | None = None, now: float) -> Tally:
        """`model`'s routing over the fleet: this replica's book plus the others' last pulled."""
        own = self.book.tally(model, window=window, user=user, now=now)
        if model not in self.fleet.models:
            return own
        out = own.copy()
        out.add(self.fleet.tally(model, window=window, user=user, now=now))
        return out

    def series(self, model: str) -> list[tuple[float, Tally]]:
        """`model`'s time buckets over the fleet (one grid for every replica's)."""
        if model not in self.fleet.models:
            return self.book.series(model)
        return aligned_buckets([self.book.series(model), self.fleet.series(model)], self.book.bucket)

    def since(self, model: str) -> float | None:
        """Since when `model`'s routing is counted (the earliest replica's start)."""
        starts = [u.since for u in (self.book.models.get(model), self.fleet.models.get(model)) if u is not None]
        return min(starts) if starts else None

    # -- persistence -------------------------------------------------------------------------------
    def load(self, models: list[str]) -> None:
        for model in models:
            current = self._incarnation(model)
            data = self._catalog.read_counters(model) if current is not None else None
            if data is None or current is None:
                continue
            try:
                self.book.loads(model, data, source=self._catalog.where("counters", model), identity=current.identity)
            except ValueError as exc:  # a bad file costs its counters, not the server's start
                log.warning("ignoring routing counters", extra={"model": model, "error": str(exc)})

    async def save(self, *, everything: bool = False) -> None:
        """Write the changed models whose last save is `save_interval` old (`everything`: all
        changed models, as at shutdown). On the event loop only the snapshots' copies are made."""
        if self._writer is not None:  # snapshots are incremental: each is encoded after the last
            await asyncio.wait([self._writer])
        now = time.monotonic()
        due = [m for m in self.book.dirty()
               if everything or now - self._saved.get(m, -self.save_interval) >= self.save_interval]
        if not due:
            return
        for model in due:
            self._saved[model] = now
        self._writer = asyncio.create_task(asyncio.to_thread(self._write, [self.book.snapshot(m) for m in due]))
        await asyncio.shield(self._writer)

    def _write(self, snaps: list[UsageSnapshot]) -> None:
        for i, snap in enumerate(snaps):
            try:
                self._catalog.write_counters(snap.model, self._encoder.encode(snap))
            except (OSError, Unavailable) as exc:
                snap.usage.dirty = snap.usage.full = True  # whole again at the next save
                log.warning("could not write routing counters", extra={"model": snap.model, "error": str(exc)})
                continue
            except BaseException:
                for unsaved in snaps[i:]:
                    unsaved.usage.dirty = unsaved.usage.full = True
                raise
            # Forgotten (deleted) while this was written: its rename must not bring the file back.
            # `forget` drops the record before it unlinks, so one of the two unlinks comes last.
            if self.book.models.get(snap.model) is not snap.usage:
                self._catalog.forget_counters(snap.model)
        self._encoder.keep(list(self.book.models))

    def forget(self, model: str) -> None:
        self.book.forget(model)
        self.fleet.forget(model)
        self._saved.pop(model, None)
        # A shared store's delete removed every replica's rows already (and a row this replica
        # wrote just after it is of the old life, which reads refuse): no database call from the
        # event loop here.
        if not self._catalog.shared:
            self._catalog.forget_counters(model)
