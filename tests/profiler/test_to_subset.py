"""From scores to a subset spec: sizes, fractions, provenance, persistence, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import ExamplesError, SubsetError
from emo_serve.profiler import ProfileError, Scores, profile, resolve_sizes

EXAMPLES = ["import os\nprint(os.getcwd())", "7 * 6 = 42"]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def usage(ckpt: Checkpoint) -> Scores:
    return profile(ckpt, EXAMPLES, progress=False)


def test_top_k_per_layer_plus_shared(ckpt, usage):
    spec = usage.to_subset(3, name="code")
    for layer, ids in enumerate(spec.experts):
        routed = torch.tensor(usage.scores[layer][:15])
        assert ids == sorted(routed.argsort(descending=True)[:3].tolist()) + [15]
    spec.check_against(ckpt)
    p = spec.provenance
    assert (p.method, p.size, p.fraction) == ("usage", 3, None)
    assert p.example_fingerprints == usage.example_fingerprints and len(p.example_fingerprints) == 2
    assert p.details["tokens"] == sum(usage.example_tokens) and p.details["warnings"] == []


def test_fraction_and_per_layer_sizes(usage):
    assert [len(ids) - 1 for ids in usage.to_subset(fraction=0.25, name="q").experts] == [4] * 4  # 3.75 -> 4
    assert [len(ids) - 1 for ids in usage.to_subset(fraction=0.01, name="q").experts] == [1] * 4  # at least 1
    spec = usage.to_subset(sizes=[1, 2, 3, 15], name="mixed")
    assert [len(ids) - 1 for ids in spec.experts] == [1, 2, 3, 15]
    assert spec.provenance.size == [1, 2, 3, 15]
    assert usage.to_subset(2, name="a").experts[0][:2] == usage.to_subset(sizes=[2] * 4, name="b").experts[0][:2]


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "layer 0 has 15 routed experts, keep 1..15 (got 0)"),
    ({"size": 16}, "keep 1..15 (got 16)"),
    ({"size": -1}, "got -1"),
    ({"fraction": 0.0}, "must be in (0, 1]"),
    ({"fraction": 1.5}, "must be in (0, 1]"),
    ({"size": 2, "fraction": 0.5}, "exactly one of"),
    ({}, "exactly one of"),
    ({"sizes": [2, 2]}, "sizes lists 2 layers, the base has 4"),
    ({"sizes": [2, 2, 2, 2.5]}, "layer 3: expected an integer"),
])
def test_bad_sizes(usage, kwargs, message):
    with pytest.raises(SubsetError) as err:
        usage.to_subset(**kwargs, name="x")
    assert message in str(err.value)


def test_bad_name(usage):
    with pytest.raises(SubsetError, match="invalid subset name"):
        usage.to_subset(2, name="../evil")


def test_resolve_sizes_skips_layers_without_routed_experts():
    assert resolve_sizes([15, 0, 7], fraction=0.5) == [8, 0, 4]
    assert resolve_sizes([15, 0, 7], size=3) == [3, 0, 3]
    with pytest.raises(SubsetError, match="layer 1 has no routed experts"):
        resolve_sizes([15, 0], sizes=[3, 1])


def test_layerwise_is_tied_to_its_size(ckpt):
    lw = profile(ckpt, EXAMPLES, method="layerwise", layerwise_size=0.25, progress=False)
    assert lw.sizes == [4] * 4
    assert lw.to_subset(4, name="lw").experts == [sorted(k) + [15] for k in lw.kept]
    assert lw.to_subset(fraction=0.25, name="lw").experts == lw.to_subset(4, name="lw2").experts
    with pytest.raises(SubsetError, match="layerwise scores were made for sizes 4, not 3"):
        lw.to_subset(3, name="lw")
    with pytest.raises(ProfileError, match="needs the kept size"):
        profile(ckpt, EXAMPLES, method="layerwise", progress=False)
    with pytest.raises(SubsetError, match="got 99"):
        profile(ckpt, EXAMPLES, method="layerwise", layerwise_size=99, progress=False)


def test_save_load_round_trip_and_reopen_base(tmp_path, usage, ckpt):
    path = tmp_path / "scores.json"
    usage.save(path)
    loaded = Scores.load(path)
    assert loaded.scores == usage.scores and loaded.counts == usage.counts
    assert loaded.model_dump() == usage.model_dump()
    # No checkpoint attached after loading: the base is re-opened from its recorded location.
    assert loaded.to_subset(3, name="again").experts == usage.to_subset(3, name="first").experts


def test_scores_refuse_another_base(tmp_path, usage):
    from emo_serve.demo import write_demo_checkpoint

    other = Checkpoint(write_demo_checkpoint(tmp_path / "other", "tiny", seed=7))
    with pytest.raises(SubsetError, match="scores were made for base"):
        usage.to_subset(3, name="x", checkpoint=other)


def test_bad_scores_file(tmp_path):
    (tmp_path / "s.json").write_text('{"format": "emo-scores/v1", "method": "usage"}')
    with pytest.raises(ProfileError, match="not a scores file"):
        Scores.load(tmp_path / "s.json")
    with pytest.raises(ProfileError, match="cannot read scores"):
        Scores.load(tmp_path / "missing.json")


@pytest.mark.parametrize("kwargs, error, message", [
    ({"examples": []}, ExamplesError, "no examples"),
    ({"examples": ["ok", ""]}, ExamplesError, "examples[1]: empty example"),
    ({"method": "magic"}, ProfileError, "unknown method 'magic'; choose from usage, frequency"),
    ({"dtype": "int8"}, ProfileError, "unknown dtype 'int8'"),
    ({"device": "cuda:0"}, ProfileError, "CUDA is not available"),
    ({"device": "warp-drive"}, ProfileError, "unknown device"),
    ({"max_tokens_per_example": 0}, ExamplesError, "must be >= 1"),
])
def test_bad_profile_arguments(ckpt, kwargs, error, message):
    if kwargs.get("device", "").startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    args = {"examples": EXAMPLES, **kwargs}
    with pytest.raises(error) as err:
        profile(ckpt, args.pop("examples"), progress=False, **args)
    assert message in str(err.value)


def test_truncation_warning_reaches_the_subset(ckpt):
    scores = profile(ckpt, EXAMPLES, max_tokens_per_example=3, progress=False)
    assert scores.example_tokens == [3, 3] and len(scores.warnings) == 2
    spec = scores.to_subset(2, name="t")
    assert spec.provenance.details["warnings"] == scores.warnings
    assert "truncated to 3" in scores.warnings[0]


def test_bfloat16_compute_mostly_agrees(ckpt, usage):
    bf = profile(ckpt, EXAMPLES, dtype="bfloat16", progress=False)
    assert bf.dtype == "bfloat16"
    diff = (torch.tensor(bf.scores) - torch.tensor(usage.scores)).abs().max()
    assert 0 < diff < 0.05
