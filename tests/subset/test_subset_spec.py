"""The subset manifest: names, expert lists, the base fingerprint, the derived config."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.config import EmoConfig
from emo_serve.demo import write_demo_checkpoint
from emo_serve.errors import SubsetError
from emo_serve.subset import (
    MANIFEST_FILE,
    SubsetSpec,
    make_subset,
    random_subset,
)
from emo_serve.names import validate_name
from emo_serve.stream import subset_sizes


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


GOOD_NAMES = ["math", "code-v2", "legal_2026.11", "A", "x" * 64, "0day"]
BAD_NAMES = ["", "../etc", "..", "a/b", "a\\b", ".hidden", "-flag", "_x", "a..b", "x" * 65, "a b",
             "tab\t", "new\nline", "trailing\n", "ünïcode", "a:b", "%2e%2e"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_everywhere(name: str, ckpt: Checkpoint) -> None:
    with pytest.raises(SubsetError, match="invalid subset name"):
        validate_name(name)
    with pytest.raises(SubsetError, match="invalid subset name"):
        random_subset(ckpt, 2, name)
    good = random_subset(ckpt, 2, "ok").model_dump(mode="json")
    with pytest.raises(SubsetError, match=r"^m\.json: name: .*invalid subset name"):
        SubsetSpec.parse(json.dumps({**good, "name": name}), source="m.json")


def test_make_subset_adds_shared_experts_and_sorts(ckpt: Checkpoint) -> None:
    spec = make_subset(ckpt, [[9, 3], [0], [14, 1, 2], [7]], "s")
    assert spec.experts == [[3, 9, 15], [0, 15], [1, 2, 14, 15], [7, 15]]
    assert spec.base.fingerprint == ckpt.fingerprint and spec.base.location == ckpt.location
    assert ckpt.config.layer_routing(0).shared_ids == [15] and ckpt.config.layer_routing(0).routed_ids == list(range(15))
    # Listing the shared expert yourself is fine.
    assert make_subset(ckpt, [[3, 15]] * 4, "s").experts == [[3, 15]] * 4


@pytest.mark.parametrize(
    ("routed", "message"),
    [
        ([[1, 1, 2], [0], [0], [0]], r"layer 0: duplicate expert ids \[1\]"),
        ([[1], [0, 16], [0], [0]], r"layer 1: expert ids \[16\] out of range 0\.\.15"),
        ([[1], [0], [-1], [0]], r"layer 2: negative expert id"),
        ([[1], [0], [0]], r"expert lists for 3 layers, the base has 4"),
        ([[1], [0], [0], []], r"layer 3: keeps no routed expert"),
    ],
)
def test_make_subset_refuses_bad_lists(ckpt: Checkpoint, routed: list[list[int]], message: str) -> None:
    with pytest.raises(SubsetError, match=message):
        make_subset(ckpt, routed, "s")


@pytest.mark.parametrize(
    ("experts", "message"),
    [
        ([[0, 15]] * 3, r"lists experts for 3 layers, the base has 4"),
        ([[0, 15], [0, 15], [0, 15], [0, 1]], r"layer 3: shared/always-active experts \[15\] must be kept"),
        ([[0, 15], [0, 15], [0, 15], [0, 15, 99]], r"layer 3: expert ids \[99\] out of range"),
        ([[0, 15], [0, 0, 15], [0, 15], [0, 15]], r"experts: .*layer 1: duplicate expert ids \[0\]"),
    ],
)
def test_manifest_is_checked_against_the_base(ckpt: Checkpoint, experts: list[list[int]], message: str) -> None:
    good = random_subset(ckpt, 2, "ok").model_dump(mode="json")
    with pytest.raises(SubsetError, match=message):
        SubsetSpec.parse(json.dumps({**good, "experts": experts})).check_against(ckpt)


def test_fingerprint_mismatch_names_both_checkpoints(ckpt: Checkpoint, tmp_path: Path) -> None:
    other = Checkpoint(write_demo_checkpoint(tmp_path / "other", "tiny", seed=7))
    spec = random_subset(ckpt, 3, "s")
    with pytest.raises(SubsetError, match=rf"made for a checkpoint with fingerprint {spec.base.fingerprint}, "
                                          rf"but {other.location} has {other.fingerprint}"):
        spec.check_against(other)


def test_save_and_load_round_trip(ckpt: Checkpoint, tmp_path: Path) -> None:
    spec = random_subset(ckpt, 5, "round-trip", seed=4)
    path = tmp_path / "sub" / MANIFEST_FILE
    spec.save(path)
    assert os.listdir(path.parent) == [MANIFEST_FILE]  # no temp file left over
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    loaded = SubsetSpec.load(path)
    assert loaded == spec
    data = json.loads(path.read_text())
    assert data["format"] == "emo-subset/v1"
    assert data["provenance"]["method"] == "random" and data["provenance"]["seed"] == 4
    assert data["provenance"]["created"].endswith("Z")


def test_unreadable_and_malformed_manifests(tmp_path: Path) -> None:
    with pytest.raises(SubsetError, match=r"nope\.json: cannot read subset manifest"):
        SubsetSpec.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "emo-subset/v9", "name": "x"}')
    with pytest.raises(SubsetError, match=r"bad\.json: format: .*; base: Field required; experts: Field required"):
        SubsetSpec.load(bad)


def test_random_subsets_are_seeded(ckpt: Checkpoint) -> None:
    a, b, c = (random_subset(ckpt, 4, "r", seed=s) for s in (1, 1, 2))
    assert a.experts == b.experts != c.experts
    assert all(len(ids) == 5 and ids[-1] == 15 for ids in a.experts)
    with pytest.raises(SubsetError, match=r"--random 16: layer 0 has 15 routed experts"):
        random_subset(ckpt, 16, "r")


@pytest.mark.parametrize("routed", [1, 2, 3, 7])
def test_subset_config(ckpt: Checkpoint, routed: int) -> None:
    spec = random_subset(ckpt, routed, "cfg", seed=routed)
    data = spec.subset_config(ckpt.config)
    cfg = EmoConfig.from_dict(data)
    assert cfg.experts_per_layer == [routed + 1] * 4
    assert cfg.num_shared_experts == 1 and cfg.num_shared_experts_per_layer == [1] * 4
    assert cfg.num_experts_per_tok == min(4, routed + 1)  # capped when fewer than top-k are kept
    assert all(cfg.layer_routing(i).top_k == min(4, routed + 1) for i in range(4))
    assert "auto_map" not in data  # the subset is served by the plugin, never remote code
    assert data["emo_subset"] == {"name": "cfg", "base": spec.base.model_dump(), "experts": spec.experts,
                                  "base_num_experts_per_layer": [16] * 4}


def test_subset_config_remaps_always_active_and_keeps_dense_layers(tmp_path: Path) -> None:
    d = write_demo_checkpoint(tmp_path / "aa", "tiny", shards=1, num_experts_per_layer=[0, 16, 16, 16],
                              dense_intermediate_size=64, always_active_experts=[4])
    base = Checkpoint(d)
    spec = make_subset(base, [[], [1, 9], [2], [8]], "aa")
    assert spec.experts == [[], [1, 4, 9, 15], [2, 4, 15], [4, 8, 15]]
    cfg = EmoConfig.from_dict(spec.subset_config(base.config))
    assert cfg.experts_per_layer == [0, 4, 3, 3]
    assert [cfg.layer_routing(i).always_active for i in range(4)] == [(), (1,), (1,), (0,)]
    with pytest.raises(SubsetError, match="layer 0 is dense and has no experts to keep"):
        SubsetSpec(name="x", base=spec.base, experts=[[0], *spec.experts[1:]]).check_against(base)


def test_subset_sizes(ckpt: Checkpoint) -> None:
    sizes = subset_sizes(ckpt, random_subset(ckpt, 3, "s"))
    info = ckpt.tensors
    expert = sum(info[f"model.layers.0.mlp.experts.0.{x}_proj.weight"].nbytes for x in ("gate", "up", "down"))
    router_row = info["model.layers.0.mlp.gate.weight"].nbytes // 16
    assert sizes["base_bytes"] == ckpt.total_tensor_bytes
    assert sizes["base_bytes"] - sizes["subset_bytes"] == 4 * 12 * (expert + router_row)
    assert sizes["subset_params"] * 4 == sizes["subset_bytes"]  # float32
