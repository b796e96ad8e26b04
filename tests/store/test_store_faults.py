"""The store and the profiling jobs under faults: a full disk (a real, tiny tmpfs), files left by
a killed process, a flood of profiling requests, and a delete + re-create racing a job."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from emo_serve.api.jobs import ProfilingJobs
from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import Busy
from emo_serve.examples import load_examples
from emo_serve.selection import SelectionRequest
from emo_serve.store import SubsetState, SubsetStore
from emo_serve.subset import make_subset

EXAMPLES = load_examples(["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n"])


@pytest.fixture
def base(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: room for the store's directories and a manifest, not for a subset's
    tokenizer (the fault is real: ENOSPC from the kernel)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_persists_nothing_and_a_restart_still_starts(base: Checkpoint, tiny_disk: Path) -> None:
    store = SubsetStore(base, "tiny", tiny_disk / "state")
    spec = make_subset(base, [[1, 2]] * 4, "full")
    with pytest.raises(OSError) as caught:
        store.add(spec)
    assert caught.value.errno == errno.ENOSPC
    assert not store.manifest_path("full").exists()  # never a manifest for a subset that is not whole
    assert not store.model_dir("full").exists()
    assert not [p for d in (store.subsets_dir, store.materialized_dir) for p in d.iterdir()]
    restarted = SubsetStore(base, "tiny", tiny_disk / "state")
    assert restarted.load_existing() == []


def test_a_stored_subset_that_cannot_be_materialized_is_listed_as_failed(base: Checkpoint, tmp_path: Path,
                                                                      tiny_disk: Path) -> None:
    """A manifest whose model dir is gone and cannot be rebuilt (disk full) does not stop the
    server from starting: the subset is listed as failed, with why."""
    SubsetStore(base, "tiny", tmp_path / "state").add(make_subset(base, [[1, 2]] * 4, "kept"))
    state = tiny_disk / "state"
    (state / "subsets").mkdir(parents=True)
    shutil.copy(tmp_path / "state" / "subsets" / "kept.json", state / "subsets" / "kept.json")
    store = SubsetStore(base, "tiny", state)
    (record,) = store.load_existing()
    assert record.state is SubsetState.FAILED and "No space left" in (record.error or "")


def test_files_left_by_a_killed_write_are_swept_at_start(base: Checkpoint, tmp_path: Path) -> None:
    store = SubsetStore(base, "tiny", tmp_path / "state")
    store.add(make_subset(base, [[1, 2]] * 4, "kept"))
    leftovers = [store.subsets_dir / ".kept.json.k3j2h1.tmp", store.materialized_dir / ".other.x9y8z7.tmp"]
    leftovers[0].write_text("{half a manif")
    leftovers[1].mkdir()
    (leftovers[1] / "config.json").write_text("{}")
    restarted = SubsetStore(base, "tiny", tmp_path / "state")
    assert not any(p.exists() for p in leftovers)
    assert [r.state for r in restarted.load_existing()] == [SubsetState.READY]


def test_the_profiling_queue_is_bounded_and_delete_cancels_a_queued_job(base: Checkpoint, tmp_path: Path) -> None:
    store = SubsetStore(base, "tiny", tmp_path / "state")

    async def scenario() -> None:
        jobs = ProfilingJobs(store, max_jobs=2)
        jobs.start("first", EXAMPLES, SelectionRequest(method="usage", size=2))
        jobs.start("second", EXAMPLES, SelectionRequest(method="usage", size=2))
        with pytest.raises(Busy, match="limit is 2"):
            jobs.start("third", EXAMPLES, SelectionRequest(method="usage", size=2))
        assert "third" not in store.records
        assert jobs.cancel("second")
        store.remove("second")
        jobs.start("third", EXAMPLES, SelectionRequest(method="usage", size=2))  # room again
        while jobs._tasks:
            await asyncio.sleep(0.01)
        jobs.close()

    asyncio.run(scenario())
    assert store.records["first"].state is SubsetState.READY
    assert store.records["third"].state is SubsetState.READY
    assert "second" not in store.records and not store.manifest_path("second").exists()
    assert not store.model_dir("second").exists()


def test_a_job_racing_a_delete_and_re_create_leaves_the_new_subset_alone(base: Checkpoint, tmp_path: Path) -> None:
    store = SubsetStore(base, "tiny", tmp_path / "state")
    explicit = make_subset(base, [[5, 6, 7]] * 4, "race")

    async def scenario() -> None:
        jobs = ProfilingJobs(store)
        jobs.start("race", EXAMPLES, SelectionRequest(method="usage", size=2))
        store.remove("race")  # deleted while the job runs (not cancelled: the worst case)
        store.add(explicit)   # and made again, by hand, under the same name
        await asyncio.sleep(0)
        while jobs._tasks:
            await asyncio.sleep(0.01)
        jobs.close()

    asyncio.run(scenario())
    record = store.records["race"]
    assert record.spec is not None and record.spec.experts == explicit.experts
    restarted = SubsetStore(base, "tiny", tmp_path / "state")
    (again,) = restarted.load_existing()
    assert again.spec is not None and again.spec.experts == explicit.experts
    assert record.model_dir is not None and (record.model_dir / "subset.json").is_file()
    assert not list(store.materialized_dir.glob(".*.tmp"))
