"""The store's calls from the event loop: each change of a subset goes to the catalog (the state
dir, or a PostgreSQL database a fleet of replicas shares) and to this server's own records, in an
order that loses nothing when one of them fails.

Catalog calls run on a thread, for a state dir too: its writes are fsynced, and an fsync waits for
the disk (0.25-0.8 s measured in `bench/soak.py` while profiling jobs wrote beside it), which on
the event loop held every request and stream that long. A publish and a delete of the same name
would then interleave, so both hold the store's lock (`changes`): a publish checks that its record
is still current and writes with nothing in between.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

from ..catalog import SubsetNotFound
from ..store import SubsetRecord, SubsetStore

T = TypeVar("T")

_LOCKS: weakref.WeakKeyDictionary[SubsetStore, asyncio.Lock] = weakref.WeakKeyDictionary()


def changes(store: SubsetStore) -> asyncio.Lock:
    """Held while `store`'s subsets change by a publish, a delete or a shared store's poll: their
    catalog calls and file writes run off the event loop, so without it a delete could land
    between a publish's check that its record is current and its writes, and one change could
    undo another halfway. (The store itself runs no jobs and knows no event loop.)"""
    lock = _LOCKS.get(store)
    if lock is None:
        lock = _LOCKS[store] = asyncio.Lock()
    return lock


async def call(store: SubsetStore, work: Callable[..., T], *args: object) -> T:
    """Run a catalog call off the event loop."""
    return await asyncio.to_thread(work, *args)


async def claim(store: SubsetStore, record: SubsetRecord) -> None:
    """Hold a `begin`-registered record's name in the catalog (409 when another replica holds
    it, 503 when the store is down); the record is dropped again on failure."""
    try:
        await call(store, store.claim, record)
    except BaseException:
        store.discard(record)
        raise
    record.pending = False


async def abandon(store: SubsetStore, record: SubsetRecord) -> None:
    """Drop a record that never completed, and release its claim in the catalog."""
    store.discard(record)
    if not record.pending:
        await call(store, store.catalog.release, record.name, record.token)


async def mark_failed(store: SubsetStore, record: SubsetRecord, error: str) -> None:
    """Mark a profiling record failed, in the catalog too (other replicas show why)."""
    store.fail(record, error)
    if not record.pending:
        await call(store, store.catalog.fail, record.name, record.token, error)


async def publish(store: SubsetStore, record: SubsetRecord, built: SubsetRecord, scores: str | None) -> None:
    """Make a profiling `record` ready with what `build` staged for it: its materialized dir, then
    its manifest (and scores) in the catalog in one write, then the record. A subset deleted
    meanwhile is a 404 and nothing of it is written: here (a delete on this server holds the same
    lock) or by a database (a delete on another replica ended the claim)."""
    assert built.spec is not None
    spec = built.spec
    async with changes(store):
        if not store.is_current(record):  # deleted meanwhile: nothing of it is written
            raise SubsetNotFound(f"the subset `{record.name}` was deleted while it was being created")

        def write() -> None:
            store.stage(record, built)
            store.catalog.publish(record.name, record.token, spec.to_json() + "\n", scores)

        await asyncio.to_thread(write)
        store.complete(record, built)
