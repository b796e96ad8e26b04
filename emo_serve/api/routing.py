"""Collect the engines' routing counters into the front end's book, and keep it on disk.

Every `--routing-interval` seconds (and before anything reads the book: a routing query, a
subset from traffic, an engine-side profile) each engine with capture on is drained by a
control call between its steps (`emo_vllm.usage`). Counters arrive in the engine's expert
numbering and are put into the base's (the placement knows each engine's experts). Changed
models are written back atomically beside the subsets (`<state-dir>/usage/<model>.json`), so a
restart keeps what was learnt; an engine that crashed loses at most one interval of counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from ..engines import EngineManager, EngineState
from ..engines.manager import Engine
from ..engines.placement import Placement
from ..engines.process import EngineProcess, EngineStartError
from ..files import atomic_write_text
from ..usage import PROFILE_KEY_PREFIX, Tally, UsageBook, from_engine

log = logging.getLogger(__name__)
_RPC_ERRORS = (EngineStartError, aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError)


class RoutingCollector:
    def __init__(self, book: UsageBook, manager: EngineManager, placement: Placement, *, interval: float,
                 path_of: Callable[[str], Path], known: Callable[[str], bool]) -> None:
        self.book, self.manager, self.placement = book, manager, placement
        self.interval = interval
        self._path_of, self._known = path_of, known
        self.attached: set[str] = set()  # engine ids whose runner counts
        self.profiles: dict[str, Tally] = {}  # engine-side profiling runs, by key
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

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
        await self.collect()
        await asyncio.to_thread(self._write, self._dump_dirty())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.collect()
                dumps = self._dump_dirty()
                if dumps:
                    await asyncio.to_thread(self._write, dumps)
            except Exception:  # the loop must outlive any one bad pass; the next one retries
                log.exception("routing collection failed")

    async def collect(self, timeout: float = 10.0) -> None:
        """Drain every counting engine that is up into the book (concurrently; an engine that does
        not answer within `timeout`, e.g. a stalled one, is skipped until the next pass)."""
        async with self._lock:
            ready = []
            for engine_id in sorted(self.attached):
                engine = self.manager.get(engine_id)
                if engine is None:
                    self.attached.discard(engine_id)
                elif engine.state is EngineState.READY and engine.proc is not None:
                    ready.append((engine_id, engine.proc))
            results = await asyncio.gather(*(proc.rpc("emo_usage_drain", timeout=timeout) for _, proc in ready),
                                           return_exceptions=True)
            for (engine_id, _), result in zip(ready, results):
                try:
                    if isinstance(result, BaseException):
                        raise result
                    self._add(result[0], self.placement.local_ids(engine_id))
                except _RPC_ERRORS as exc:  # a dying or stalled engine: its supervisor deals with it
                    log.warning("could not collect routing counters", extra={"engine": engine_id,
                                                                             "error": repr(exc)})

    def _add(self, data: dict[str, Any], local_ids: list[list[int]] | None) -> None:
        now = time.time()
        for entry in data["keys"]:
            tally = from_engine(entry, data["layers"], data["bounds"], self.book.experts_per_layer, local_ids)
            model, user = str(entry["model"]), str(entry["user"])
            if model.startswith(PROFILE_KEY_PREFIX):
                self.profiles.setdefault(model, Tally.empty(self.book.experts_per_layer)).add(tally)
            elif self._known(model):  # requests sent to an engine directly are nobody's
                self.book.add(model, user, tally, now)

    # -- persistence -------------------------------------------------------------------------------
    def load(self, models: list[str]) -> None:
        for model in models:
            path = self._path_of(model)
            if not path.exists():
                continue
            try:
                self.book.load(model, path)
            except ValueError as exc:  # a bad file costs its counters, not the server's start
                log.warning("ignoring routing counters", extra={"model": model, "error": str(exc)})

    def _dump_dirty(self) -> dict[str, str]:
        """Serialize changed models on the event loop (where the book changes), write elsewhere."""
        out = {}
        for model in self.book.dirty():
            out[model] = json.dumps(self.book.snapshot(model), separators=(",", ":")) + "\n"
        return out

    def _write(self, dumps: dict[str, str]) -> None:
        for model, text in dumps.items():
            try:
                atomic_write_text(self._path_of(model), text)
            except OSError as exc:
                log.warning("could not write routing counters", extra={"model": model, "error": str(exc)})

    def forget(self, model: str) -> None:
        self.book.forget(model)
        self._path_of(model).unlink(missing_ok=True)
