"""Profiling jobs without a server: a job profiles on the worker thread and commits to the store;
a subset deleted while it profiles leaves no files; a job that cannot succeed fails its subset."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from emo_serve.api.jobs import ProfilingJobs
from emo_serve.checkpoint import Checkpoint
from emo_serve.examples import load_examples
from emo_serve.selection import SelectionRequest
from emo_serve.store import SubsetRecord, SubsetState, SubsetStore

EXAMPLES = load_examples(["def add(a, b):\n    return a + b\n", "for i in range(3):\n    print(i)\n"])


@pytest.fixture
def store(tiny_ckpt: Path, tmp_path: Path) -> SubsetStore:
    return SubsetStore(Checkpoint(tiny_ckpt), "tiny", tmp_path / "state")


async def finish(jobs: ProfilingJobs) -> None:
    while jobs._tasks:
        await asyncio.sleep(0.01)


def test_a_job_profiles_and_commits(store: SubsetStore) -> None:
    done: list[SubsetRecord] = []
    timed: list[tuple[str, float]] = []

    async def scenario() -> SubsetRecord:
        jobs = ProfilingJobs(store)

        async def on_done(record: SubsetRecord) -> None:
            done.append(record)

        record = jobs.start("code", EXAMPLES, SelectionRequest(method="usage", size=3), on_done=on_done,
                            on_seconds=lambda method, s: timed.append((method, s)))
        assert record.state is SubsetState.PROFILING
        assert record.job == {"method": "usage", "size": 3, "examples": 2,
                              "example_fingerprints": [e.fingerprint for e in EXAMPLES]}
        await finish(jobs)
        jobs.close()
        return record

    record = asyncio.run(scenario())
    assert record.state is SubsetState.READY, record.error
    assert record.spec is not None and [len(ids) for ids in record.spec.experts] == [4] * 4  # 3 + shared
    assert store.manifest_path("code").is_file() and record.model_dir is not None and record.model_dir.is_dir()
    assert done == [record] and [m for m, _ in timed] == ["usage"] and record.profile_seconds is not None


def test_a_subset_deleted_while_profiling_leaves_nothing(store: SubsetStore) -> None:
    async def scenario() -> SubsetRecord:
        jobs = ProfilingJobs(store)
        record = jobs.start("gone", EXAMPLES, SelectionRequest(method="usage", size=2))
        store.remove("gone")
        await finish(jobs)
        jobs.close()
        return record

    asyncio.run(scenario())
    assert "gone" not in store.records
    assert not store.manifest_path("gone").exists() and not store.model_dir("gone").exists()


def test_a_job_that_cannot_succeed_fails_its_subset(store: SubsetStore) -> None:
    async def scenario() -> SubsetRecord:
        jobs = ProfilingJobs(store)
        record = jobs.start("bad", EXAMPLES, SelectionRequest(method="usage", size=3, device="warp-drive"))
        await finish(jobs)
        jobs.close()
        return record

    record = asyncio.run(scenario())
    assert record.state is SubsetState.FAILED and "unknown device" in (record.error or "")
    assert not store.manifest_path("bad").exists()
