"""The engine manager: which models have a vLLM engine, starting them on demand, evicting the least
recently used idle one when `max_engines` are resident, restarting after a crash, and stopping
them all on shutdown.

Everything runs on the event loop, so the bookkeeping needs no locks; waiters sleep on a
"something changed" event that every state change and every finished request fires.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..errors import Busy, Conflict, NotFound, TimedOut, Unavailable
from .process import STOP_GRACE_SECONDS, EngineOptions, EngineProcess, EngineStartError

log = logging.getLogger(__name__)

FAILED_RETRY_SECONDS = 10.0  # first back-off after a failed start; doubles per failure in a row
MAX_RETRY_SECONDS = 300.0
STABLE_SECONDS = 120.0  # an engine that served this long before crashing starts a new failure count
FORCED_STOP_GRACE = 2.0


def retry_delay(failures: int) -> float:
    """Seconds to wait before starting an engine again after `failures` failures in a row (failed
    starts, crashes soon after a start, missed health probes): none after a first crash of a
    healthy engine, then 10 s, 20 s, 40 s ... up to 5 minutes."""
    return 0.0 if failures <= 1 else min(FAILED_RETRY_SECONDS * 2 ** (failures - 2), MAX_RETRY_SECONDS)


@dataclass(frozen=True)
class Probe:
    """The health probe of a ready engine: `/health` every `interval` s, each answer within
    `timeout` s; after `misses` misses in a row the engine is killed and marked failed."""

    interval: float = 10.0
    timeout: float = 5.0
    misses: int = 3


class EngineState(str, Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


class UnknownModel(NotFound):
    """No model (or engine) of that id."""

    code, default_param = "model_not_found", "model"

    def __init__(self, model: str, *, param: str | None = None) -> None:
        super().__init__(f"The model `{model}` does not exist.", param=param)


class ModelUnavailable(Unavailable):
    """The engine is down, failed to start, or did not become ready in time."""

    code, default_param = "model_unavailable", "model"


class UpstreamTimeout(ModelUnavailable, TimedOut):
    """The engine did not answer a request in time."""

    code = "upstream_timeout"


class CapacityExhausted(Busy):
    """Every engine slot is held by a model with requests in flight."""

    code = "engine_capacity_exhausted"


class ModelInUse(Conflict):
    """Unloading a model with requests in flight without `force`."""

    code = "model_in_use"


@dataclass
class Engine:
    """The serving slot of one model id (base or subset), with or without a running process."""

    model_id: str
    model_dir: str
    # Added to this engine's command line and environment (the shared engine's mask hooks).
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    state: EngineState = EngineState.STOPPED
    proc: EngineProcess | None = None
    inflight: int = 0
    waiters: int = 0
    last_used: float = 0.0
    error: str | None = None
    failed_at: float = 0.0
    failures: int = 0  # in a row; sets the back-off before the next start
    crashed: bool = False  # stopped by a crash or a failed start, not yet back
    detail: str | None = None  # the failure's engine log tail: server log and admins only
    ready_at: float = 0.0
    starts: int = 0
    crashes: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)
    leases: set[Lease] = field(default_factory=set, repr=False)

    @property
    def retry_at(self) -> float:
        return self.failed_at + retry_delay(self.failures)

    @property
    def down(self) -> bool:
        """Failed, or stopped by a crash and not yet back: what `/ready` reports."""
        return self.state is EngineState.FAILED or (self.state is EngineState.STOPPED and self.crashed)

    @property
    def resident(self) -> bool:
        return self.state in (EngineState.STARTING, EngineState.READY, EngineState.STOPPING)

    def info(self) -> dict:
        return {"model": self.model_id, "state": self.state.value, "inflight": self.inflight,
                "waiting": self.waiters, "pid": self.proc.pid if self.proc else None,
                "socket": str(self.proc.socket_path) if self.proc else None,
                "starts": self.starts, "crashes": self.crashes, "error": self.error,
                "retry_in_seconds": round(max(0.0, self.retry_at - time.monotonic()), 1) if self.failures else None,
                "idle_seconds": round(time.monotonic() - self.last_used, 1) if self.last_used else None}


class Lease:
    """One request's hold on a ready engine; `release()` is idempotent.

    `model` is the model the request is for (on a shared engine, one of several), `extra` what
    the placement adds to its body (mask row, cache salt); `upstream` is set by the proxy while
    the engine answers, so that `abort()` can end the request (vLLM aborts a request whose
    connection closes).
    """

    def __init__(self, manager: EngineManager, engine: Engine, model: str | None = None) -> None:
        self._manager, self.engine, self._released = manager, engine, False
        assert engine.proc is not None
        self.proc = engine.proc
        self.model = model or engine.model_id
        self.extra: dict[str, Any] = {}
        self.salt: str | None = None
        self.upstream: Any = None
        self.aborted = False
        engine.leases.add(self)

    @property
    def served_name(self) -> str:
        """The name the engine itself serves (and writes in `model` of its answers)."""
        return self.engine.model_id

    def abort(self) -> None:
        """End the request now (forced unload of its model): close its upstream connection."""
        self.aborted = True
        if self.upstream is not None:
            self.upstream.close()

    async def check_engine(self) -> bool:
        """After the engine failed this request (see `EngineManager.check_after_failure`)."""
        return await self._manager.check_after_failure(self.engine, self.proc)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.engine.leases.discard(self)
            self.engine.inflight -= 1
            self.engine.last_used = time.monotonic()
            self._manager._changed()


class EngineManager:
    def __init__(self, opts: EngineOptions, *, max_engines: int, wait_timeout: float,
                 on_load: Callable[[str, float], None] | None = None,
                 on_crash: Callable[[str], None] | None = None,
                 on_started: Callable[[Engine, EngineProcess], Awaitable[None]] | None = None,
                 probe: Probe | None = None) -> None:
        self.opts = opts
        self.max_engines = max_engines
        self.wait_timeout = wait_timeout
        self._on_load, self._on_crash, self._on_started = on_load, on_crash, on_started
        self.probe = probe or Probe()
        self.engines: dict[str, Engine] = {}
        self._event = asyncio.Event()
        self._closing = False
        self._socket_tmp = tempfile.TemporaryDirectory(prefix="emo-engines-")
        self.opts = EngineOptions(**{**opts.__dict__, "socket_dir": Path(self._socket_tmp.name)})
        self._slots = 0
        self._background: set[asyncio.Task] = set()

    def set_on_started(self, hook: Callable[[Engine, EngineProcess], Awaitable[None]]) -> None:
        """Run `hook` after an engine answers its health check and before it is marked ready."""
        self._on_started = hook

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A fire-and-forget task that is kept referenced until it ends."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- registry of models --------------------------------------------------------------------
    def register(self, model_id: str, model_dir: str, *, extra_args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None) -> Engine:
        engine = self.engines.get(model_id)
        if engine is None:
            engine = self.engines[model_id] = Engine(model_id, model_dir, extra_args, dict(env or {}))
        return engine

    async def unregister(self, model_id: str, *, force: bool = False) -> None:
        await self.unload(model_id, force=force)
        self.engines.pop(model_id, None)

    def get(self, model_id: str) -> Engine | None:
        return self.engines.get(model_id)

    @property
    def loaded_count(self) -> int:
        return sum(e.state is EngineState.READY for e in self.engines.values())

    def _changed(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def notify(self) -> None:
        """Wake every waiter: something a placement tracks changed (e.g. experts were loaded)."""
        self._changed()

    async def wait_for_change(self, deadline: float) -> bool:
        """Sleep until an engine changes state, a request ends or `notify()`; False at `deadline`."""
        return await self._wait_change(deadline)

    async def _wait_change(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(self._event.wait(), remaining)
        except asyncio.TimeoutError:
            return False
        return True

    # -- requests ------------------------------------------------------------------------------
    async def acquire(self, model_id: str, *, model: str | None = None) -> Lease:
        """Hold a ready engine for one request, starting it (and evicting an idle one) if needed;
        waits at most `wait_timeout` for a start in progress."""
        engine = self.engines.get(model_id)
        if engine is None:
            raise UnknownModel(model_id)
        deadline = time.monotonic() + self.wait_timeout
        engine.waiters += 1
        try:
            while True:
                if self._closing:
                    raise ModelUnavailable("the server is shutting down")
                if self.engines.get(model_id) is not engine:
                    raise UnknownModel(model_id)
                if engine.state is EngineState.READY and engine.proc and engine.proc.alive:
                    engine.inflight += 1
                    engine.last_used = time.monotonic()
                    return Lease(self, engine, model)
                self._advance(engine)
                if not await self._wait_change(deadline):
                    raise ModelUnavailable(
                        f"the model `{model_id}` is still loading after {self.wait_timeout:.0f} s; retry later")
        finally:
            engine.waiters -= 1

    async def load(self, model_id: str, *, wait: bool = False) -> Engine:
        """Start the model's engine if it is not resident (for `POST .../load` and preloading)."""
        engine = self.engines.get(model_id)
        if engine is None:
            raise UnknownModel(model_id)
        if wait:
            (await self.acquire(model_id)).release()
        elif engine.state is EngineState.FAILED:
            engine.failed_at = 0.0  # an explicit load retries at once
            self._advance(engine)
        elif engine.state is not EngineState.READY:
            self._advance(engine)
        return engine

    async def unload(self, model_id: str, *, force: bool = False) -> None:
        engine = self.engines.get(model_id)
        if engine is None:
            raise UnknownModel(model_id)
        if engine.inflight and not force:
            raise ModelInUse(f"the model `{model_id}` has {engine.inflight} requests in flight; "
                             "retry when they finish or pass force=true")
        # Forced: vLLM would finish its streams before exiting on SIGTERM; don't wait for that.
        await self._stop(engine, grace=FORCED_STOP_GRACE if engine.inflight else STOP_GRACE_SECONDS)

    def _advance(self, engine: Engine) -> None:
        """Move a non-ready engine towards ready: start it if a slot is free, else begin evicting
        the least recently used idle engine. Raises if nothing can make progress."""
        if engine.state in (EngineState.STARTING, EngineState.STOPPING):
            return
        if engine.down and time.monotonic() < engine.retry_at:
            raise ModelUnavailable((engine.error or f"the engine of `{engine.model_id}` failed")
                                   + f"; next start in {engine.retry_at - time.monotonic():.0f} s")
        if engine.state is EngineState.READY and engine.proc and engine.proc.proc:
            # Its process is gone and the watcher has not run yet: the crash is counted here
            # (the watcher then only cleans up), and the back-off below applies to it.
            self._record_exit(engine, engine.proc, engine.proc.proc.returncode or 0)
            if engine.down and time.monotonic() < engine.retry_at:
                raise ModelUnavailable((engine.error or f"the engine of `{engine.model_id}` failed")
                                       + f"; next start in {engine.retry_at - time.monotonic():.0f} s")
        if engine.state is EngineState.READY:  # marked ready but its process is gone
            engine.state = EngineState.STOPPED
        resident = [e for e in self.engines.values() if e.resident]
        if len(resident) < self.max_engines:
            self._start(engine)
            return
        if engine.down:  # never stop a healthy engine to retry one that keeps failing
            raise ModelUnavailable((engine.error or f"the engine of `{engine.model_id}` failed")
                                   + "; it is retried when an engine slot is free")
        if any(e.state is EngineState.STOPPING for e in resident):
            return  # a slot is being freed; wait for it
        idle = [e for e in resident if e.state is EngineState.READY and not e.inflight and not e.waiters]
        if not idle:
            raise CapacityExhausted(
                f"all {self.max_engines} engine slots are serving models with requests in flight; "
                "retry later")
        victim = min(idle, key=lambda e: e.last_used)
        log.info("evicting least recently used engine", extra={"model": victim.model_id,
                                                               "for_model": engine.model_id})
        self._spawn(self._stop(victim))

    def _start(self, engine: Engine) -> None:
        self._slots += 1
        engine.state = EngineState.STARTING
        engine.error = None
        engine.starts += 1
        engine.proc = EngineProcess(engine.model_id, engine.model_dir, self.opts, self._slots,
                                    extra_args=engine.extra_args, env=engine.env)
        engine.task = asyncio.create_task(self._run(engine, engine.proc))
        self._changed()

    async def _run(self, engine: Engine, proc: EngineProcess) -> None:
        """Start `proc`, then watch it: an exit we did not ask for is a crash."""
        t0 = time.monotonic()
        try:
            await proc.start()
            if self._on_started is not None:  # e.g. install the shared engine's mask rows
                await self._on_started(engine, proc)
        except EngineStartError as exc:
            log.error("engine failed to start", extra={"model": engine.model_id, "error": str(exc),
                                                       "log_tail": exc.detail})
            await proc.stop()
            if engine.proc is proc:
                engine.state, engine.error, engine.detail = EngineState.FAILED, str(exc), exc.detail
                engine.failed_at, engine.proc = time.monotonic(), None
                engine.failures = max(engine.failures, 1) + 1  # a failed start always backs off
                engine.crashed = True
            self._changed()
            return
        except asyncio.CancelledError:
            await proc.stop()
            raise
        seconds = time.monotonic() - t0
        engine.state, engine.last_used, engine.ready_at = EngineState.READY, time.monotonic(), time.monotonic()
        engine.error = engine.detail = None
        engine.crashed = False
        log.info("engine ready", extra={"model": engine.model_id, "pid": proc.pid, "seconds": round(seconds, 2)})
        if self._on_load:
            self._on_load(engine.model_id, seconds)
        self._changed()
        prober = asyncio.create_task(self._probe(engine, proc))
        try:
            code = await proc.wait()
        finally:
            prober.cancel()
        self._record_exit(engine, proc, code)
        # Always, whoever saw the exit first (a request may already have started its successor):
        # reap leftover children, remove its shared-memory files, close its client.
        await proc.stop()
        self._changed()

    def _record_exit(self, engine: Engine, proc: EngineProcess, code: int) -> None:
        """Count an exit we did not ask for as a crash, once: from the watcher above, or from a
        request that meets the dead process before the watcher has run."""
        if engine.proc is not proc or engine.state is not EngineState.READY:
            return
        engine.crashes += 1
        stable = time.monotonic() - engine.ready_at >= STABLE_SECONDS
        engine.failures = 1 if stable else engine.failures + 1
        engine.state, engine.proc, engine.failed_at = EngineState.STOPPED, None, time.monotonic()
        engine.crashed = True
        if proc.failure:
            engine.error = f"the engine of `{engine.model_id}` {proc.failure}"
        else:
            engine.error = f"the engine of `{engine.model_id}` exited with code {code}"
        engine.error += "; it restarts on the next request"
        log.error("engine crashed", extra={"model": engine.model_id, "code": code, "pid": proc.pid,
                                           "failures": engine.failures, "log_tail": proc.log_tail()})
        if self._on_crash:
            self._on_crash(engine.model_id)

    async def _probe(self, engine: Engine, proc: EngineProcess) -> None:
        """Ping a ready engine on a timer (as uvicorn's supervisor pings its workers): a hung
        engine keeps its process alive, so only a missed answer shows it. After `misses` misses
        in a row it is killed; the crash path above then fails its requests and restarts it on
        demand."""
        misses = 0
        while True:
            await asyncio.sleep(self.probe.interval)
            if await proc.healthy(self.probe.timeout):
                misses = 0
                continue
            misses += 1
            log.warning("engine missed a health probe", extra={"model": engine.model_id, "misses": misses})
            if misses >= self.probe.misses:
                proc.failure = "stopped answering its health probe"
                proc.signal_group(signal.SIGKILL)
                return

    async def check_after_failure(self, engine: Engine, proc: EngineProcess, timeout: float = 5.0) -> bool:
        """Whether an engine that just failed a request or a control call is still healthy.

        vLLM answers a request that meets a dead engine core (a worker killed, a kernel crash)
        with its own 500, and `/health` with 503 from then on; its API server exits only a moment
        later. One immediate probe tells the two apart: a dead engine is killed now, so the crash
        path marks it down and the next request restarts it, instead of each request in between
        meeting the same corpse until the periodic probe notices."""
        if engine.proc is not proc or proc.proc is None or proc.proc.returncode is not None:
            return False  # already gone (the crash path owns it)
        if await proc.healthy(timeout):
            return True
        log.error("engine failed a request and its health check; killing it so it restarts",
                  extra={"model": engine.model_id, "pid": proc.pid})
        proc.failure = "failed a request and then its health check"
        proc.signal_group(signal.SIGKILL)
        return False

    async def _stop(self, engine: Engine, grace: float = STOP_GRACE_SECONDS) -> None:
        proc, task = engine.proc, engine.task
        if engine.state is EngineState.STOPPING:
            while engine.state is EngineState.STOPPING:
                await self._wait_change(time.monotonic() + 60)
            return
        engine.crashed, engine.failures = False, 0  # stopped on purpose: not down, no back-off
        if proc is None:
            if engine.state is EngineState.FAILED:
                engine.state = EngineState.STOPPED
            return
        engine.state = EngineState.STOPPING
        self._changed()
        try:
            if task is not None and task is not asyncio.current_task() and not task.done():
                task.cancel()  # a start in progress, or the crash watcher
            await proc.stop(grace)
        finally:
            engine.state, engine.proc = EngineState.STOPPED, None
            self._changed()

    # -- shutdown ------------------------------------------------------------------------------
    async def shutdown(self, drain_timeout: float) -> None:
        """Refuse new requests, let in-flight ones finish (bounded), then stop every engine."""
        self._closing = True
        self._changed()
        deadline = time.monotonic() + drain_timeout
        while any(e.inflight for e in self.engines.values()):
            if not await self._wait_change(deadline):
                break
        await asyncio.gather(*(self._stop(e, grace=FORCED_STOP_GRACE if e.inflight else STOP_GRACE_SECONDS)
                               for e in list(self.engines.values())), return_exceptions=True)
        self._socket_tmp.cleanup()

    def kill_all(self) -> None:
        """Synchronous last resort for interpreter exit."""
        for e in self.engines.values():
            if e.proc is not None:
                e.proc.kill_now()
