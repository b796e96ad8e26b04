"""Profiling jobs of the server: a subset made from examples is profiled in the background.

Profiling is CPU/GPU-bound and the machine is shared with the engines, so jobs run on one worker
thread, one at a time, and at most `max_jobs` wait or run (more is a 429: an unbounded queue is
memory anyone with the admin key can fill). The result is materialized on a thread into a staging
directory of the job's own, then committed on the event loop: a subset deleted meanwhile is
noticed there, and a re-created one of the same name is never touched. Deleting a subset cancels
its job, queued or running (a running one's result is discarded).

Examples scored in a live engine instead (`live_scores`) hold one of the same `max_jobs` places
while they run, and their prefills pass one at a time through `prefills`, so a completion on that
engine waits behind at most one example however many such runs are in flight.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from ..errors import Busy, EmoServeError
from ..examples import Example
from ..selection import SelectionRequest, build_subset
from ..store import SubsetRecord, SubsetState, SubsetStore
from . import store_calls

log = logging.getLogger(__name__)

OnDone = Callable[[SubsetRecord], Awaitable[None]]
OnSeconds = Callable[[str, float], None]  # (method, seconds) of a job that succeeded


class ProfilingJobs:
    """Runs `selection.build_subset` for the store's base, one job at a time."""

    def __init__(self, store: SubsetStore, *, max_jobs: int = 8) -> None:
        self.store = store
        self.max_jobs = max_jobs
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emo-profile")
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._live = 0  # runs scoring examples in a live engine now
        # One profiling prefill at a time in the engine, whichever run it belongs to: a completion
        # then waits behind at most one example, however many runs are in flight.
        self.prefills = asyncio.Semaphore(1)

    @property
    def in_flight(self) -> int:
        """Profiling runs queued or running, in the worker or in a live engine."""
        return len(self._tasks) + self._live

    def admit(self) -> None:
        """Raise Busy (429) unless a job may start now."""
        if self.in_flight >= self.max_jobs:
            raise Busy(f"{self.in_flight} profiling jobs are queued or running, the limit is {self.max_jobs}; "
                       "retry later", param="examples")

    @contextmanager
    def live(self) -> Iterator[None]:
        """Hold one of the `max_jobs` places while examples are scored in a live engine: those
        runs load the engine every completion needs, so they count like queued jobs (429 beyond)."""
        self.admit()
        self._live += 1
        try:
            yield
        finally:
            self._live -= 1

    @staticmethod
    def describe(examples: Sequence[Example], request: SelectionRequest) -> dict[str, Any]:
        """What a job was asked for, as its subset shows it while profiling (and if it failed)."""
        return {"method": request.method, **request.describe(), "examples": len(examples),
                "example_fingerprints": [e.fingerprint for e in examples]}

    def start(self, name: str, examples: Sequence[Example], request: SelectionRequest,
              on_done: OnDone | None = None, on_seconds: OnSeconds | None = None, *,
              record: SubsetRecord | None = None) -> SubsetRecord:
        """Register `name` as profiling (or take `record`, registered and claimed by the caller)
        and profile the examples on the worker thread."""
        self.admit()
        if record is None:
            record = self.store.begin(name, self.describe(examples, request))
            record.pending = False  # nothing to claim: the caller keeps the catalog's state itself
        task = asyncio.create_task(self._run(record, list(examples), request, on_done, on_seconds))
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._tasks.pop(name, None) if self._tasks.get(name) is t else None)
        return record

    def cancel(self, name: str) -> bool:
        """Cancel `name`'s job: a queued one never starts; a running one's result is dropped."""
        task = self._tasks.pop(name, None)
        if task is None:
            return False
        task.cancel()
        return True

    async def _run(self, record: SubsetRecord, examples: list[Example], request: SelectionRequest,
                   on_done: OnDone | None, on_seconds: OnSeconds | None) -> None:
        loop = asyncio.get_running_loop()
        store = self.store
        t0 = time.monotonic()
        try:
            selected = await loop.run_in_executor(
                self._pool, lambda: build_subset(store.base, examples, request, name=record.name))
            if not store.is_current(record):
                return  # deleted while profiling
            staging = store.staging_dir(record.name)
            try:
                built = await loop.run_in_executor(
                    None, lambda: store.build(selected.spec, save=False, model_dir=staging))
                if not store.is_current(record):  # deleted while writing: only our own files go
                    return
                scores = selected.scores.to_json() + "\n" if selected.scores is not None else None
                await store_calls.publish(store, record, built, scores)
            finally:
                if staging.exists():
                    await loop.run_in_executor(None, lambda: shutil.rmtree(staging, ignore_errors=True))
        except (EmoServeError, ValueError) as exc:
            await self._failed(record, str(exc))
        except Exception as exc:  # a bug or an I/O failure: keep serving, report it on the subset
            log.exception("profiling failed", extra={"subset": record.name})
            await self._failed(record, f"internal error while profiling: {exc!r}")
        record.profile_seconds = round(time.monotonic() - t0, 3)
        log.info("profiling finished", extra={"subset": record.name, "state": record.state.value,
                                              "seconds": record.profile_seconds, "error": record.error})
        if record.state is SubsetState.READY and on_seconds:
            on_seconds(request.method, record.profile_seconds)
        if on_done and store.is_current(record):
            await on_done(record)

    async def _failed(self, record: SubsetRecord, error: str) -> None:
        try:
            await store_calls.mark_failed(self.store, record, error)
        except EmoServeError as exc:  # the shared store is down: the failure shows on this replica
            log.warning("could not keep a profiling failure in the store", extra={"subset": record.name,
                                                                                 "error": str(exc)})

    def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
