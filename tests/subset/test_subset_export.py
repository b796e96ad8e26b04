"""Exported subsets are standalone checkpoints whose reference forward equals the full model's
forward with the router restricted to the same experts (DESIGN.md); materialized subsets are
the same minus the weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from emo_serve.checkpoint import TOKENIZER_FILES, Checkpoint
from emo_serve.demo import write_demo_checkpoint
from emo_serve.export import export_subset, materialize_subset
from emo_serve.reference import forward, keep_masks
from emo_serve.stream import iter_subset_tensors
from emo_serve.subset import MANIFEST_FILE, SubsetSpec, make_subset, random_subset

VARIANTS = {
    "released-schema": {},  # s = 1, top-4 of 16
    "s0-renormalised-dense-first": dict(num_shared_experts=0, norm_topk_prob=True, dense_intermediate_size=96,
                                        num_experts_per_layer=[0, 16, 16, 16]),
    "always-active-two-shared": dict(num_shared_experts=2, num_experts_per_tok=5, always_active_experts=[3]),
}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {v: write_demo_checkpoint(root / v, "tiny", shards=2, seed=11, **kw) for v, kw in VARIANTS.items()}


def token_batch(vocab: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in (17, 6)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exported_subset_equals_restricted_full_model(variant: str, bases: dict[str, Path], tmp_path: Path) -> None:
    base = Checkpoint(bases[variant])
    ids = token_batch(base.config.vocab_size, seed=len(variant))
    # Sizes below top-k (1, 2), at it, and well above; several seeds.
    for routed, seed in [(1, 0), (2, 1), (4, 2), (9, 3)]:
        spec = random_subset(base, routed, f"r{routed}", seed=seed)
        out = export_subset(base, spec, tmp_path / spec.name)
        sub = Checkpoint(out)
        assert sub.config.experts_per_layer == [len(e) for e in spec.experts]
        want = forward(base, ids, keep=keep_masks(base.config, spec.experts))
        got = forward(sub, ids)
        assert max_diff(got, want) <= 1e-5, (variant, routed)
        # and the restriction matters (so the check above can fail)
        assert max_diff(got, forward(base, ids)) > 1e-3 or routed == 9


def test_export_layout(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = Checkpoint(tiny_ckpt)
    spec = random_subset(base, 3, "layout", seed=5)
    out = export_subset(base, spec, tmp_path / "layout", shard_bytes=1_000_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert files == sorted([*shards, "config.json", MANIFEST_FILE, "model.safetensors.index.json",
                            *[t for t in TOKENIZER_FILES if (tiny_ckpt / t).exists()]])
    for name in TOKENIZER_FILES:
        if (tiny_ckpt / name).exists():
            assert (out / name).read_bytes() == (tiny_ckpt / name).read_bytes()
    assert SubsetSpec.load(out / MANIFEST_FILE) == spec
    config = json.loads((out / "config.json").read_text())
    assert config["emo_subset"]["experts"] == spec.experts and "auto_map" not in config
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sub = Checkpoint(out)
    assert index["metadata"]["total_size"] == sub.total_tensor_bytes
    assert set(index["weight_map"]) == set(sub.expected_tensor_names())
    streamed = dict(iter_subset_tensors(base, spec))
    for name, t in sub.read_many(list(sub.tensors)):
        assert torch.equal(t, streamed[name]), name
    assert oct(out.stat().st_mode & 0o777) == "0o755"


def test_subset_of_a_subset(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = Checkpoint(tiny_ckpt)
    outer = make_subset(base, [[0, 2, 4, 6, 8]] * 4, "outer")
    first = Checkpoint(export_subset(base, outer, tmp_path / "outer"))
    # Ids of the first subset: 1, 3 are original experts 2 and 6; 5 is the shared one (15).
    inner = make_subset(first, [[1, 3]] * 4, "inner")
    assert inner.experts == [[1, 3, 5]] * 4
    nested = Checkpoint(export_subset(first, inner, tmp_path / "inner"))
    direct = Checkpoint(export_subset(base, make_subset(base, [[2, 6]] * 4, "direct"), tmp_path / "direct"))
    for name in direct.tensors:
        assert torch.equal(nested.read(name), direct.read(name)), name


def test_materialize_writes_everything_but_the_weights(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = Checkpoint(tiny_ckpt)
    spec = random_subset(base, 2, "mat")
    out = materialize_subset(base, spec, tmp_path / "mat")
    assert not list(out.glob("*.safetensors")) and not (out / "model.safetensors.index.json").exists()
    exported = export_subset(base, spec, tmp_path / "exp")
    for name in ("config.json", MANIFEST_FILE, "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (exported / name).read_bytes(), name


def test_existing_output_is_never_touched(tiny_ckpt: Path, tmp_path: Path) -> None:
    base = Checkpoint(tiny_ckpt)
    spec = random_subset(base, 2, "x")
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for write in (export_subset, materialize_subset):
        with pytest.raises(FileExistsError, match="taken: already exists"):
            write(base, spec, out)
    assert os.listdir(out) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["taken"]


def test_http_base_exports_the_same_bytes(tiny_ckpt: Path, range_server, tmp_path: Path) -> None:
    import shutil

    shutil.copytree(tiny_ckpt, range_server.root / "export-http")
    remote = Checkpoint(range_server.url("export-http"))
    spec = random_subset(remote, 3, "h", seed=2)
    a = export_subset(remote, spec, tmp_path / "a")
    b = export_subset(Checkpoint(tiny_ckpt), spec.model_copy(), tmp_path / "b")
    for shard in sorted(a.glob("*.safetensors")):
        assert shard.read_bytes() == (b / shard.name).read_bytes()
