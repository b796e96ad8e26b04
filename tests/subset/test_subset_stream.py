"""The subset tensor stream: the right tensors, renamed and sliced, and only their bytes read —
over real HTTP range requests to a byte-counting server."""

from __future__ import annotations

import random
import re
import shutil
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.stream import iter_subset_tensors, plan_subset
from emo_serve.subset import make_subset, random_subset

EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def serve(ckpt_dir: Path, range_server) -> str:
    name = f"{ckpt_dir.name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(ckpt_dir, range_server.root / name)
    return range_server.url(name)


@pytest.mark.parametrize("routed", [1, 2, 3, 7, 15])
def test_stream_is_the_base_renamed_and_sliced(tiny_ckpt: Path, routed: int) -> None:
    base = Checkpoint(tiny_ckpt)
    spec = random_subset(base, routed, "s", seed=routed)
    got = dict(iter_subset_tensors(base, spec))
    cfg = spec.subset_config(base.config)
    assert len(got) == len(plan_subset(base, spec))
    for layer, kept in enumerate(spec.experts):
        gate = base.read(f"model.layers.{layer}.mlp.gate.weight")
        assert torch.equal(got[f"model.layers.{layer}.mlp.gate.weight"], gate[kept])
        for new, orig in enumerate(kept):
            for x in ("gate", "up", "down"):
                name = f"model.layers.{layer}.mlp.experts.{new}.{x}_proj.weight"
                assert torch.equal(got[name], base.read(f"model.layers.{layer}.mlp.experts.{orig}.{x}_proj.weight"))
        assert f"model.layers.{layer}.mlp.experts.{len(kept)}.up_proj.weight" not in got
    for name, t in got.items():
        if "mlp" not in name:
            assert torch.equal(t, base.read(name)), name
    assert cfg["num_experts_per_layer"] == [routed + 1] * 4


def test_stream_yields_in_plan_order(tiny_ckpt: Path) -> None:
    base = Checkpoint(tiny_ckpt)
    spec = random_subset(base, 4, "s")
    names = [n for n, _ in iter_subset_tensors(base, spec)]
    plan = [t.name for t in plan_subset(base, spec)]
    # Router slices are assembled when their last row run arrives; everything else is in plan order.
    assert [n for n in names if not n.endswith("mlp.gate.weight")] == \
           [n for n in plan if not n.endswith("mlp.gate.weight")]
    assert sorted(names) == sorted(plan)


@pytest.mark.parametrize("routed", [1, 3, 8])
def test_http_stream_transfers_only_the_subset(tiny_ckpt: Path, range_server, routed: int) -> None:
    range_server.reset()
    base = Checkpoint(serve(tiny_ckpt, range_server))
    spec = random_subset(base, routed, f"http{routed}", seed=routed)
    opened = range_server.bytes_served
    assert opened <= base.header_bytes  # config, index, headers, fingerprint sample: nothing else
    tensors = dict(iter_subset_tensors(base, spec))
    subset_bytes = sum(t.nbytes for t in plan_subset(base, spec))
    assert sum(t.numel() * t.element_size() for t in tensors.values()) == subset_bytes
    assert range_server.bytes_served - opened <= 1.02 * subset_bytes
    assert range_server.bytes_served <= 1.02 * subset_bytes + base.header_bytes
    assert base.stats.bytes_read == subset_bytes  # adjacent ranges coalesce; no over-read at all


def shards_of_one_layer(base: Checkpoint) -> dict[str, tuple[int, set[int]]]:
    """Shards holding only expert tensors of a single layer -> (layer, experts touching it)."""
    by_shard: dict[str, list[str]] = defaultdict(list)
    for name, info in base.tensors.items():
        by_shard[info.shard.rsplit("/", 1)[1]].append(name)
    out = {}
    for shard, names in by_shard.items():
        matches = [EXPERT.match(n) for n in names]
        if all(matches) and len({m[1] for m in matches}) == 1:
            out[shard] = (int(matches[0][1]), {int(m[2]) for m in matches})
    return out


def test_shards_without_subset_tensors_get_no_request(sharded_ckpt: Path, range_server) -> None:
    base = Checkpoint(serve(sharded_ckpt, range_server))
    avoid = shards_of_one_layer(base)
    assert len(avoid) >= 2, "fixture layout: want shards holding only one layer's experts"
    rng = random.Random(0)
    routed = [rng.sample(base.config.layer_routing(layer).routed_ids, 3) for layer in range(4)]
    for layer, experts in avoid.values():
        pool = [e for e in base.config.layer_routing(layer).routed_ids if e not in experts]
        routed[layer] = rng.sample(pool, min(3, len(pool)))
    spec = make_subset(base, routed, "avoid")
    range_server.reset()
    tensors = dict(iter_subset_tensors(base, spec))
    asked = {p.rsplit("/", 1)[1] for p in range_server.paths_requested()}
    assert asked and not asked & set(avoid)
    assert len(asked) == 8 - len(avoid)  # every other shard holds something the subset needs
    subset_bytes = sum(t.nbytes for t in plan_subset(base, spec))
    assert range_server.bytes_served <= 1.02 * subset_bytes
    local = Checkpoint(sharded_ckpt)
    assert torch.equal(tensors["model.layers.0.mlp.gate.weight"],
                       local.read("model.layers.0.mlp.gate.weight")[spec.experts[0]])
