"""The subset store: manifests saved atomically, read back after a restart, materialized dirs
reused or rebuilt, deletes, name reservation, and stored files that no longer fit the base."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from emo_serve import files
from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import SubsetError
from emo_serve.store import NameTaken, SubsetNotFound, SubsetState, SubsetStore
from emo_serve.subset import MANIFEST_FILE, SubsetSpec, make_subset, random_subset

BASE_ID = "tiny-base"


@pytest.fixture(scope="module")
def base(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


@pytest.fixture
def store(base: Checkpoint, tmp_path: Path) -> SubsetStore:
    return SubsetStore(base, BASE_ID, tmp_path / "state")


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def test_add_saves_the_manifest_and_materializes(store: SubsetStore, base: Checkpoint) -> None:
    spec = random_subset(base, 3, "r3", seed=1)
    record = store.add(spec)
    assert record.state is SubsetState.READY and record.spec is not None
    assert record.spec.experts == spec.experts
    assert SubsetSpec.load(store.manifest_path("r3")).experts == spec.experts
    assert record.model_dir == store.model_dir("r3")
    assert SubsetSpec.load(record.model_dir / MANIFEST_FILE) == record.spec
    assert (record.model_dir / "config.json").is_file()
    assert record.sizes is not None and 0 < record.sizes["subset_bytes"] < record.sizes["base_bytes"]
    assert store.get("r3") is record and list(store.records) == ["r3"]
    assert leftovers(store.subsets_dir) == [] and leftovers(store.materialized_dir) == []


def test_manifest_points_at_the_checked_base(store: SubsetStore, base: Checkpoint) -> None:
    spec = random_subset(base, 2, "moved")
    spec = spec.model_copy(update={"base": spec.base.model_copy(update={"location": "/elsewhere"})})
    record = store.add(spec)
    assert record.spec is not None and record.spec.base.location == base.location
    assert SubsetSpec.load(store.manifest_path("moved")).base.location == base.location


def test_a_restarted_store_reads_its_subsets_back(store: SubsetStore, base: Checkpoint) -> None:
    first = store.add(random_subset(base, 2, "a", seed=1))
    store.add(make_subset(base, [[0, 1, 2]] * 4, "b"))
    again = SubsetStore(base, BASE_ID, store.subsets_dir.parent)
    records = again.load_existing()
    assert sorted(r.name for r in records) == ["a", "b"]
    assert all(r.state is SubsetState.READY for r in records)
    assert again.get("a").spec == first.spec and again.get("a").created == first.created


def test_remove_deletes_manifest_and_model_dir(store: SubsetStore, base: Checkpoint) -> None:
    record = store.add(random_subset(base, 2, "gone"))
    store.remove("gone")
    assert not store.manifest_path("gone").exists() and record.model_dir is not None
    assert not record.model_dir.exists()
    with pytest.raises(SubsetNotFound, match="`gone` does not exist"):
        store.get("gone")
    with pytest.raises(SubsetNotFound):
        store.remove("gone")


def test_reserve_refuses_taken_and_invalid_names(store: SubsetStore, base: Checkpoint) -> None:
    store.add(random_subset(base, 2, "taken"))
    with pytest.raises(NameTaken, match="a subset"):
        store.reserve("taken")
    with pytest.raises(NameTaken, match="the base model"):
        store.reserve(BASE_ID)
    for bad in ("../x", "a/b", "trailing\n", ".hidden"):
        with pytest.raises(SubsetError, match="invalid subset name"):
            store.reserve(bad)
    store.reserve("free")  # only checks: nothing is registered
    assert "free" not in store.records


def test_a_failed_write_keeps_the_old_manifest(store: SubsetStore, base: Checkpoint,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec = random_subset(base, 2, "atomic", seed=1)
    spec.save(store.manifest_path("atomic"))
    before = store.manifest_path("atomic").read_bytes()

    def crash(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        random_subset(base, 3, "atomic", seed=2).save(store.manifest_path("atomic"))
    monkeypatch.undo()
    assert store.manifest_path("atomic").read_bytes() == before  # never half-written
    assert leftovers(store.subsets_dir) == []  # and the temp file is gone


def test_bad_stored_manifests_are_listed_as_failed(store: SubsetStore, base: Checkpoint,
                                                    tmp_path: Path) -> None:
    store.subsets_dir.joinpath("broken.json").write_text("{not json")
    store.subsets_dir.joinpath("wrong-name.json").write_text(random_subset(base, 2, "other").to_json())
    foreign = random_subset(base, 2, "foreign")
    foreign.base.fingerprint = "sha256:" + "0" * 64  # as if made for another checkpoint
    store.subsets_dir.joinpath("foreign.json").write_text(foreign.to_json())
    store.subsets_dir.joinpath("-flag.json").write_text("{}")  # not a valid name: ignored
    good = random_subset(base, 2, "good")
    good.save(store.manifest_path("good"))
    records = {r.name: r for r in store.load_existing()}
    assert sorted(records) == ["broken", "foreign", "good", "wrong-name"]
    assert records["good"].state is SubsetState.READY
    for name in ("broken", "foreign", "wrong-name"):
        assert records[name].state is SubsetState.FAILED and records[name].spec is None
    assert "broken.json" in (records["broken"].error or "")
    assert "holds subset 'other'" in (records["wrong-name"].error or "")
    assert "fingerprint" in (records["foreign"].error or "")
    store.adopt(random_subset(base, 2, "broken"))  # a failed record is replaced by a good manifest
    assert store.get("broken").state is SubsetState.READY


def test_adopt_reuses_a_stored_subset_with_the_same_experts(store: SubsetStore, base: Checkpoint) -> None:
    spec = random_subset(base, 2, "pre", seed=4)
    first = store.adopt(spec)
    assert store.adopt(spec) is first
    with pytest.raises(NameTaken):
        store.adopt(random_subset(base, 2, "pre", seed=5))  # same name, other experts


def test_materialize_reuses_or_rebuilds(store: SubsetStore, base: Checkpoint) -> None:
    spec = store.add(random_subset(base, 2, "m", seed=1)).spec
    assert spec is not None
    target = store.model_dir("m")
    stamp = (target / MANIFEST_FILE).stat().st_mtime_ns
    assert store.materialize(spec) == target
    assert (target / MANIFEST_FILE).stat().st_mtime_ns == stamp  # same spec: reused as is
    (target / MANIFEST_FILE).write_text("stale")
    assert store.materialize(spec) == target
    assert SubsetSpec.load(target / MANIFEST_FILE) == spec  # unreadable: rebuilt


def test_profiling_records_begin_complete_and_fail(store: SubsetStore, base: Checkpoint) -> None:
    record = store.begin("p", {"method": "usage", "size": 2})
    assert record.state is SubsetState.PROFILING and store.is_current(record)
    with pytest.raises(NameTaken):
        store.begin("p", {})
    built = store.build(random_subset(base, 2, "p"), save=True)
    assert store.get("p") is record and record.state is SubsetState.PROFILING  # build registers nothing
    store.complete(record, built)
    assert record.state is SubsetState.READY and record.spec == built.spec and record.model_dir is not None
    failed = store.begin("q", {})
    store.fail(failed, "no good")
    assert failed.state is SubsetState.FAILED and failed.error == "no good"
    store.remove("q")
    assert not store.is_current(failed)


def test_paths_cannot_leave_the_state_dir(store: SubsetStore, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({}))
    os.symlink(outside, store.subsets_dir / "link.json")
    with pytest.raises(SubsetError, match="symlink"):
        store.manifest_path("link")
