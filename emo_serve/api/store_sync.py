"""A replica's subsets kept in step with a store that other replicas write too (`--store
postgresql://...`).

Every `--store-poll-interval` seconds the replica lists the store's subsets (names, states and
tokens: no manifests) and takes in what changed: a subset made on another replica is materialized
here and given its mask row; one deleted there is removed here (requests in flight on it end); a
job another replica finished or failed shows its new state. A request for a name this replica has
not seen yet looks it up at once (`fetch`), so a subset made on one replica answers on every other
before the next poll. Polling rather than LISTEN/NOTIFY: a listing is one indexed query, and a poll
needs no connection held open across a database restart. Subsets this replica is making itself
(`SubsetRecord.local`) are left to their job. A store that is down is logged once; what the
replica has cached keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

from ..catalog import Entry
from ..errors import Unavailable
from ..store import SubsetRecord, SubsetState, SubsetStore
from . import store_calls

log = logging.getLogger(__name__)


class Replica(Protocol):
    """What `CatalogueSync` needs of the service."""

    registry: SubsetStore

    async def forget_subset(self, name: str, *, force: bool = True) -> None: ...

    async def subset_ready(self, record: SubsetRecord) -> None: ...


# A name the store did not know (or held profiling) is asked again only after this long: a client
# sending requests for a name that does not exist, or polling a job, must not turn each into a
# database query.
UNKNOWN_TTL_S = 1.0
UNKNOWN_MAX = 4096


class CatalogueSync:
    """Keeps one replica's subsets in step with a shared store (see the module's docstring)."""

    def __init__(self, service: Replica, *, interval: float) -> None:
        self.service, self.interval = service, interval
        self._task: asyncio.Task[None] | None = None
        self._unknown: dict[str, float] = {}  # name -> when the store last had no such subset, or a job
        self.down = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.poll()
            except Unavailable as exc:
                self._mark_down(exc)
            except Exception:  # the loop must outlive any one bad pass; the next one retries
                log.exception("store poll failed")

    def _mark_down(self, exc: Exception) -> None:
        if not self.down:
            log.warning("the store is unreachable: cached subsets keep serving, creates and deletes answer 503",
                        extra={"error": str(exc)})
        self.down = True

    async def poll(self) -> None:
        registry = self.service.registry
        catalog = registry.catalog
        listing = await asyncio.to_thread(catalog.entries, manifests=False)
        alive = [name for name, r in registry.records.items() if r.local and r.state is SubsetState.PROFILING]
        await asyncio.to_thread(catalog.heartbeat, alive)
        if self.down:
            log.info("the store is reachable again")
            self.down = False
        rows = {e.name: e for e in listing}
        async with store_calls.changes(self.service.registry):
            for name, entry in rows.items():
                if self._stale(registry.records.get(name), entry):
                    await self._take(name)
            for name, record in list(registry.records.items()):
                if name not in rows and not record.pending:
                    log.info("subset deleted on another replica", extra={"subset": name})
                    await self.service.forget_subset(name)

    @staticmethod
    def _stale(record: SubsetRecord | None, entry: Entry) -> bool:
        """Whether the store holds news about a subset: unknown here, made again (new token), or
        another replica's job ended. A local failure (a subset too large for this replica's slots)
        is this replica's own state, and a subset being made here is its job's business."""
        if record is None:
            return True
        if record.local:
            return False
        if record.token != entry.token:
            return True
        return record.state is SubsetState.PROFILING and entry.state != "profiling"

    def stale(self, name: str) -> bool:
        """Whether this replica's view of `name` may lag the store: unknown here, or another
        replica's job last seen profiling (a poll between its claim and its publish saw that)."""
        record = self.service.registry.records.get(name)
        return record is None or (record.state is SubsetState.PROFILING and not record.local)

    async def fetch(self, name: str) -> None:
        """Take in `name` from the store now, if the store has it (a first request for it, or one
        for a job another replica may have finished)."""
        now = time.monotonic()
        if now - self._unknown.get(name, -UNKNOWN_TTL_S) < UNKNOWN_TTL_S:
            return
        async with store_calls.changes(self.service.registry):
            if not self.stale(name):
                return
            if not await self._take(name) or self.stale(name):
                if len(self._unknown) >= UNKNOWN_MAX:
                    self._unknown.clear()
                self._unknown[name] = now

    async def _take(self, name: str) -> bool:
        """Make this replica's record of `name` what the store holds (False: the store has none)."""
        registry = self.service.registry
        entry = await asyncio.to_thread(registry.catalog.get, name)
        old = registry.records.get(name)
        if old is not None and old.local:
            return entry is not None
        if entry is None:
            if old is not None and not old.pending:
                await self.service.forget_subset(name)
            return False
        if old is not None:
            await self.service.forget_subset(name)
        record = await asyncio.to_thread(registry.from_entry, entry)
        registry.records[name] = record
        self._unknown.pop(name, None)
        log.info("subset taken from the store", extra={"subset": name, "state": record.state.value})
        await self.service.subset_ready(record)
        return True
