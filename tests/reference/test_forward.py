"""The reference forward's interface: keep masks, hooks, batching, dtypes, biases, dense layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emo_serve.checkpoint import Checkpoint
from emo_serve.demo import write_demo_checkpoint
from emo_serve.layers import load_layer
from emo_serve.reference import Routing, forward, keep_masks, rms_norm, swiglu


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


def seqs(n: int = 2, length: int = 9, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 2048, (length + i,), generator=gen) for i in range(n)]


def test_keep_masks(ckpt: Checkpoint) -> None:
    ids = seqs()
    full = forward(ckpt, ids)
    kept = forward(ckpt, ids, keep=keep_masks(ckpt.config, [list(range(16))] * 4))
    assert all(torch.equal(a, b) for a, b in zip(full, kept))  # keeping everything changes nothing
    restricted = forward(ckpt, ids, keep=keep_masks(ckpt.config, [[0, 1, 15]] * 4))
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(full, restricted))


def test_batch_tensor_equals_list_and_each_sequence_alone(ckpt: Checkpoint) -> None:
    batch = torch.stack(seqs(3, 8, seed=1)[:1] * 3)
    out = forward(ckpt, batch)
    alone = forward(ckpt, batch[0])
    assert len(out) == 3 and len(alone) == 1
    assert all(torch.equal(o, alone[0]) for o in out)
    # Causal: a prefix's logits do not depend on what follows.
    prefix = forward(ckpt, batch[0][:5])[0]
    torch.testing.assert_close(prefix, alone[0][:5], rtol=1e-5, atol=1e-5)


def test_hook_sees_every_moe_layer_of_every_sequence(ckpt: Checkpoint) -> None:
    calls: list[tuple[int, tuple[int, ...], Routing]] = []
    ids = seqs(2, 6)
    forward(ckpt, ids, hook=lambda layer, h, r: calls.append((layer, tuple(h.shape), r)))
    assert [(c[0], c[1]) for c in calls] == [(layer, (len(s), 128)) for layer in range(4) for s in ids]
    for _, _, r in calls:
        assert r.weights.shape == r.probs.shape == r.logits.shape
        assert torch.all((r.weights > 0).sum(-1) == 4)  # top-4 incl. the shared expert
        torch.testing.assert_close(r.probs[:, :15].sum(-1), torch.ones(r.probs.shape[0]))


def test_load_layer_short_names(ckpt: Checkpoint) -> None:
    w = load_layer(ckpt, 1)
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate", "pre_attention_layernorm",
            "pre_feedforward_layernorm", "experts.15.down_proj"} <= w.keys()
    assert len(w) == 4 + 2 + 1 + 16 * 3
    assert torch.equal(w["gate"], ckpt.read("model.layers.1.mlp.gate.weight"))


def test_bf16_checkpoint_runs_in_float32(tmp_path: Path) -> None:
    d = write_demo_checkpoint(tmp_path / "bf16", "tiny", shards=1, torch_dtype="bfloat16")
    ckpt = Checkpoint(d)
    assert ckpt.tensors["model.norm.weight"].dtype == "BF16"
    (out,) = forward(ckpt, seqs(1))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    (low,) = forward(ckpt, seqs(1), dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    assert (low.float() - out).abs().max() < 0.5


def test_dense_layer_with_biases_and_attention_biases(tmp_path: Path) -> None:
    d = write_demo_checkpoint(tmp_path / "dense", "tiny", shards=1, num_experts_per_layer=[0, 16, 16, 16],
                              dense_intermediate_size=96, dense_mlp_bias=True, attention_bias=True)
    ckpt = Checkpoint(d)
    w = load_layer(ckpt, 0)
    assert "gate" not in w and w["gate_proj"].shape == (96, 128) and w["down_proj.bias"].shape == (128,)
    assert w["q_proj.bias"].shape == (128,)
    hooked: list[int] = []
    ids = seqs(1)
    (out,) = forward(ckpt, ids, hook=lambda layer, h, r: hooked.append(layer))
    assert hooked == [1, 2, 3]  # dense layers have no router
    # The dense MLP's biases are used: zeroing them changes the output.
    no_bias = {k: (torch.zeros_like(v) if k.endswith("_proj.bias") and "self_attn" not in k else v)
               for k, v in w.items()}
    x = torch.randn(5, 128)
    h = rms_norm(x, w["pre_feedforward_layernorm"], 1e-6)
    with_b = swiglu(h, w["gate_proj"], w["up_proj"], w["down_proj"],
                    (w["gate_proj.bias"], w["up_proj.bias"], w["down_proj.bias"]))
    want = F.linear(F.silu(F.linear(h, w["gate_proj"], w["gate_proj.bias"]))
                    * F.linear(h, w["up_proj"], w["up_proj.bias"]), w["down_proj"], w["down_proj.bias"])
    torch.testing.assert_close(with_b, want)
    assert not torch.allclose(with_b, swiglu(h, no_bias["gate_proj"], no_bias["up_proj"], no_bias["down_proj"]))
    assert torch.isfinite(out).all()
