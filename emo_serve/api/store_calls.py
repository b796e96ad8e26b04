"""The store's calls from the event loop: each change of a subset goes to the catalog (the state
dir, or a PostgreSQL database a fleet of replicas shares) and to this server's own records, in an
order that loses nothing when one of them fails.

Catalog calls run in place for the state dir (as they always did: they cannot then interleave with
other changes on the event loop) and on a thread for a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from ..store import SubsetRecord, SubsetStore

T = TypeVar("T")


async def call(store: SubsetStore, work: Callable[..., T], *args: object) -> T:
    """Run a catalog call from the event loop: in place for files, on a thread for a database."""
    if store.catalog.remote:
        return await asyncio.to_thread(work, *args)
    return work(*args)


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
    its manifest (and scores) in the catalog in one write, then the record. A database refuses a
    claim that a delete ended meanwhile (404)."""
    assert built.spec is not None
    store.stage(record, built)
    await call(store, store.catalog.publish, record.name, record.token, built.spec.to_json() + "\n", scores)
    store.complete(record, built)
