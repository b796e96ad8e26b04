"""Manifest directories: recognised only when they hold no weights, refused at load when the base
is not the checkpoint the subset was made from (or the directory contradicts itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.demo import write_demo_checkpoint
from emo_serve.errors import SubsetError
from emo_serve.export import materialize_subset
from emo_serve.stream import plan_subset
from emo_serve.subset import MANIFEST_FILE, SubsetSpec
from emo_vllm.manifest import is_manifest_dir, subset_weights
from plugin_harness import engine_process


@pytest.fixture(scope="session")
def local_manifest(small_subset: SubsetSpec, tiny_base: Checkpoint,
                   tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_subset(tiny_base, small_subset, tmp_path_factory.mktemp("manifest") / "small")


@pytest.fixture(scope="session")
def rebased_manifest(local_manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The manifest pointed at another checkpoint of the same architecture (another seed): what
    happens when a base is replaced under a manifest. Configs and headers are identical."""
    root = tmp_path_factory.mktemp("rebased")
    other = write_demo_checkpoint(root / "other-base", "tiny", seed=1)
    out = root / "manifest"
    out.mkdir()
    for f in local_manifest.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    spec = json.loads((out / MANIFEST_FILE).read_text())
    spec["base"]["location"] = str(other)
    (out / MANIFEST_FILE).write_text(json.dumps(spec))
    return out


def test_manifest_dir_is_told_from_an_export(local_manifest: Path, exported_small: Path,
                                             tiny_ckpt: Path) -> None:
    assert is_manifest_dir(local_manifest)
    assert (exported_small / MANIFEST_FILE).exists() and not is_manifest_dir(exported_small)
    assert not is_manifest_dir(tiny_ckpt)


def test_subset_weights_stream_the_plan(local_manifest: Path, tiny_base: Checkpoint,
                                        small_subset: SubsetSpec) -> None:
    config = json.loads((local_manifest / "config.json").read_text())
    got = {name: t.shape for name, t in subset_weights(local_manifest, config["emo_subset"])}
    assert got == {t.name: t.shape for t in plan_subset(tiny_base, small_subset)}


def test_fingerprint_mismatch_is_refused(rebased_manifest: Path) -> None:
    config = json.loads((rebased_manifest / "config.json").read_text())
    with pytest.raises(SubsetError, match="fingerprint") as err:
        next(iter(subset_weights(rebased_manifest, config["emo_subset"])))
    assert str(rebased_manifest) in str(err.value) and "other-base" in str(err.value)


def test_config_and_manifest_must_agree(local_manifest: Path) -> None:
    config = json.loads((local_manifest / "config.json").read_text())
    config["emo_subset"]["experts"][0] = config["emo_subset"]["experts"][0][1:]
    with pytest.raises(SubsetError, match="describe different subsets"):
        next(iter(subset_weights(local_manifest, config["emo_subset"])))
    with pytest.raises(SubsetError, match="no 'emo_subset' block"):
        next(iter(subset_weights(local_manifest, None)))


@pytest.mark.vllm
def test_engine_refuses_a_manifest_on_the_wrong_base(rebased_manifest: Path, engine_work: Path) -> None:
    proc = engine_process(rebased_manifest, engine_work / "rebased")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "SubsetError" in log and "was made for a checkpoint with fingerprint" in log, log[-4000:]
