"""The store's calls from the event loop (`api/store_calls`): a publish writes off the loop, so a
slow disk holds no request, and a delete racing it never leaves a deleted subset's files behind.

The slow disk is a fake: `os.fsync` held on an event until the test lets it go (a real fsync's
wait cannot be caused on demand); everything else is the real store on a real state dir.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from emo_serve import files
from emo_serve.api import store_calls
from emo_serve.catalog import SubsetNotFound
from emo_serve.checkpoint import Checkpoint
from emo_serve.store import SubsetRecord, SubsetState, SubsetStore
from emo_serve.subset import make_subset

WAIT = 30.0  # seconds before a step that never comes fails the test (it would hang otherwise)


class HeldDisk:
    """`os.fsync` that, once `hold` is called, waits until released, and says which threads
    called it while held."""

    def __init__(self) -> None:
        self.entered, self.released = threading.Event(), threading.Event()
        self.released.set()
        self.threads: set[int] = set()
        self._fsync = os.fsync

    def hold(self) -> None:
        self.entered.clear()
        self.released.clear()

    def fsync(self, fd: int) -> None:
        if not self.released.is_set():
            self.threads.add(threading.get_ident())
            self.entered.set()
        self.released.wait(WAIT)
        self._fsync(fd)


@pytest.fixture
def store(tiny_ckpt: Path, tmp_path: Path) -> SubsetStore:
    return SubsetStore(Checkpoint(tiny_ckpt), "tiny", tmp_path / "state")


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldDisk]:
    held = HeldDisk()
    monkeypatch.setattr(files.os, "fsync", held.fsync)
    yield held
    held.released.set()


async def staged(store: SubsetStore, name: str) -> tuple[SubsetRecord, SubsetRecord]:
    """A profiling record holding `name` and what its job built, ready to publish."""
    record = store.begin(name, {"examples": 0})
    await store_calls.claim(store, record)
    spec = make_subset(store.base, [[1, 2]] * store.base.config.num_hidden_layers, name)
    built = await asyncio.to_thread(store.build, spec, save=False, model_dir=store.staging_dir(name))
    return record, built


async def entered(disk: HeldDisk) -> None:
    """Wait, on the loop, until a write is held in fsync: reached only if the loop is free."""
    assert await asyncio.to_thread(disk.entered.wait, WAIT), "the publish never reached its fsync"


async def delete(store: SubsetStore, name: str) -> None:
    """What `SubsetCatalogue.delete_subset` does to the store (its engine side aside)."""
    async with store_calls.changes(store):
        await store_calls.call(store, store.catalog.delete, name)
        store.forget(name)


def test_a_publish_waiting_on_the_disk_leaves_the_event_loop_free(store: SubsetStore, disk: HeldDisk) -> None:
    async def scenario() -> tuple[SubsetRecord, int, int]:
        record, built = await staged(store, "slow")
        disk.hold()
        publishing = asyncio.create_task(store_calls.publish(store, record, built, scores=None))
        await entered(disk)
        ticks = 0
        for _ in range(3):  # the loop runs other work while the write waits
            await asyncio.sleep(0)
            ticks += 1
        assert not publishing.done()
        disk.released.set()
        await publishing
        return record, ticks, threading.get_ident()

    record, ticks, loop_thread = asyncio.run(scenario())
    assert ticks == 3 and loop_thread not in disk.threads
    assert record.state is SubsetState.READY and store.manifest_path("slow").is_file()


def test_a_delete_during_a_publish_waits_for_it_and_leaves_nothing(store: SubsetStore, disk: HeldDisk) -> None:
    async def scenario() -> None:
        record, built = await staged(store, "raced")
        disk.hold()
        publishing = asyncio.create_task(store_calls.publish(store, record, built, scores=None))
        await entered(disk)
        deleting = asyncio.create_task(delete(store, "raced"))
        await asyncio.sleep(0.05)
        assert not deleting.done()  # it waits for the publish's lock, not for the disk
        disk.released.set()
        await asyncio.gather(publishing, deleting)

    asyncio.run(scenario())
    assert "raced" not in store.records
    assert not store.manifest_path("raced").exists() and not store.model_dir("raced").exists()


def test_a_publish_after_a_delete_writes_nothing(store: SubsetStore) -> None:
    async def scenario() -> None:
        record, built = await staged(store, "gone")
        await delete(store, "gone")
        with pytest.raises(SubsetNotFound, match="deleted while it was being created"):
            await store_calls.publish(store, record, built, scores=None)

    asyncio.run(scenario())
    assert "gone" not in store.records
    assert not store.manifest_path("gone").exists() and not store.model_dir("gone").exists()
