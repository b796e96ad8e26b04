"""The reference forward against an independent implementation: transformers' Qwen2-MoE.

Qwen2-MoE routes a softmax over its routed experts, takes the top-k and renormalises only if
`norm_topk_prob`, then adds a shared expert scaled by sigmoid(shared_expert_gate(x)); its
`mlp_only_layers` are plain MLPs. That is EMO's routing (DESIGN.md) when the EMO shared expert
(s = 1, softmax weight exactly 1.0) becomes Qwen's shared expert with its gate weight 0
(sigmoid 0.5) and down projection doubled (both exact in floating point); for s = 0 the shared
expert is zeroed. Attention, RoPE, norms and the LM head come along for free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from emo_serve.checkpoint import Checkpoint
from emo_serve.demo import write_demo_checkpoint
from emo_serve.reference import forward


def qwen2_moe(ckpt: Checkpoint) -> torch.nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    c = ckpt.config
    moe = c.moe_layers()
    r = c.layer_routing(moe[0])
    assert r.num_shared in (0, 1) and not r.always_active
    config = Qwen2MoeConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.kv_heads, head_dim=c.head_size,
        intermediate_size=c.dense_intermediate_size or c.intermediate_size,
        moe_intermediate_size=c.intermediate_size, shared_expert_intermediate_size=c.intermediate_size,
        num_experts=r.num_routed, num_experts_per_tok=r.routed_top_k, norm_topk_prob=c.norm_topk_prob,
        mlp_only_layers=[i for i in range(c.num_hidden_layers) if i not in moe], qkv_bias=False,
        rms_norm_eps=c.rms_norm_eps, rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    model = Qwen2MoeForCausalLM(config).eval()
    model.load_state_dict(state_dict(ckpt, r.num_shared), strict=True)
    return model


def state_dict(ckpt: Checkpoint, shared: int) -> dict[str, torch.Tensor]:
    t = {n: x.float() for n, x in ckpt.read_many(ckpt.expected_tensor_names())}
    out: dict[str, Any] = {"model.embed_tokens.weight": t["model.embed_tokens.weight"],
                           "model.norm.weight": t["model.norm.weight"], "lm_head.weight": t["lm_head.weight"]}
    cfg = ckpt.config
    for i in range(cfg.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        for x in "qkvo":
            out[f"{q}self_attn.{x}_proj.weight"] = t[f"{p}self_attn.{x}_proj.weight"]
        out[f"{q}input_layernorm.weight"] = t[f"{p}pre_attention_layernorm.weight"]
        out[f"{q}post_attention_layernorm.weight"] = t[f"{p}pre_feedforward_layernorm.weight"]
        n = cfg.experts_per_layer[i]
        if n == 0:
            for x in ("gate", "up", "down"):
                out[f"{q}mlp.{x}_proj.weight"] = t[f"{p}mlp.{x}_proj.weight"]
            continue
        routed = range(n - shared)
        e = lambda j, x: t[f"{p}mlp.experts.{j}.{x}_proj.weight"]  # noqa: E731
        out[f"{q}mlp.gate.weight"] = t[f"{p}mlp.gate.weight"][: n - shared]
        out[f"{q}mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e(j, "gate"), e(j, "up")]) for j in routed])
        out[f"{q}mlp.experts.down_proj"] = torch.stack([e(j, "down") for j in routed])
        if shared:
            out[f"{q}mlp.shared_expert.gate_proj.weight"] = e(n - 1, "gate")
            out[f"{q}mlp.shared_expert.up_proj.weight"] = e(n - 1, "up")
            out[f"{q}mlp.shared_expert.down_proj.weight"] = 2 * e(n - 1, "down")
        else:
            d = cfg.intermediate_size
            out[f"{q}mlp.shared_expert.gate_proj.weight"] = torch.zeros(d, cfg.hidden_size)
            out[f"{q}mlp.shared_expert.up_proj.weight"] = torch.zeros(d, cfg.hidden_size)
            out[f"{q}mlp.shared_expert.down_proj.weight"] = torch.zeros(cfg.hidden_size, d)
        out[f"{q}mlp.shared_expert_gate.weight"] = torch.zeros(1, cfg.hidden_size)
    return out


VARIANTS = {
    # s = 1, top-4 of 16 (the released routing), behind a dense first layer with GQA.
    "shared-dense-first": dict(num_experts_per_layer=[0, 16, 16, 16], dense_intermediate_size=192,
                               num_key_value_heads=1),
    "s0-renormalised": dict(num_shared_experts=0, norm_topk_prob=True, num_experts=12, num_experts_per_tok=3),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_forward_matches_qwen2_moe(variant: str, tmp_path: Path) -> None:
    d = write_demo_checkpoint(tmp_path / variant, "tiny", shards=1, **VARIANTS[variant])
    ckpt = Checkpoint(d)
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, ckpt.config.vocab_size, (n,), generator=gen) for n in (23, 7)]
    ours = forward(ckpt, seqs)
    model = qwen2_moe(ckpt)
    with torch.inference_mode():
        for ids, got in zip(seqs, ours):
            theirs = model(ids[None]).logits[0]
            assert got.shape == theirs.shape == (len(ids), ckpt.config.vocab_size)
            assert (got - theirs).abs().max().item() < 1e-4
