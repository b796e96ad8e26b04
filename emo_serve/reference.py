"""A plain-PyTorch EMO forward: the oracle for the vLLM plugin, the profiler and `eval`.

It follows `modeling_emo.py` (pre-norm decoder, RoPE, SwiGLU experts) and its routing exactly
(DESIGN.md): with shared experts, separate softmaxes over the routed and the shared logits,
top-(k-s) routed plus all shared, no renormalisation; with always-active ids, one softmax over
all experts; with neither, softmax -> top-k (-> renormalise if `norm_topk_prob`).

The model is streamed one layer at a time (`layers.stream_layers`), so
the same code runs the 28 GB model in a few GB; hooks let the profiler and `eval` look at (or
restrict) each layer's routing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .config import EmoConfig, LayerRouting
from .layers import LayerWeights, stream_layers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * weight


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style RoPE (rotate halves), as in HF Llama/OLMoE; x is [T, heads, head_dim]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d))
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attention(h: torch.Tensor, w: LayerWeights, cfg: EmoConfig) -> torch.Tensor:
    """Causal self-attention over one sequence h [T, hidden]."""
    T = h.shape[0]
    hd, nh, nkv = cfg.head_size, cfg.num_attention_heads, cfg.kv_heads
    q = F.linear(h, w["q_proj"], w.get("q_proj.bias")).view(T, nh, hd)
    k = F.linear(h, w["k_proj"], w.get("k_proj.bias")).view(T, nkv, hd)
    v = F.linear(h, w["v_proj"], w.get("v_proj.bias")).view(T, nkv, hd)
    pos = torch.arange(T, device=h.device)
    q, k = rotary(q, pos, cfg.rope_theta), rotary(k, pos, cfg.rope_theta)
    rep = nh // nkv
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         is_causal=True)
    return F.linear(out.transpose(0, 1).reshape(T, nh * hd), w["o_proj"], w.get("o_proj.bias"))


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
           bias: Sequence[torch.Tensor | None] = (None, None, None)) -> torch.Tensor:
    return F.linear(F.silu(F.linear(x, gate, bias[0])) * F.linear(x, up, bias[1]), down, bias[2])


def expert(x: torch.Tensor, w: LayerWeights, e: int) -> torch.Tensor:
    return swiglu(x, w[f"experts.{e}.gate_proj"], w[f"experts.{e}.up_proj"], w[f"experts.{e}.down_proj"])


@dataclass
class Routing:
    """One layer's routing of T tokens: dense combine weights (zero where not selected) and
    the router probabilities (each part with its own softmax, as the model routes)."""

    weights: torch.Tensor  # [T, E]
    probs: torch.Tensor  # [T, E]
    logits: torch.Tensor  # [T, E], after any restriction (-inf where not kept)


def route(logits: torch.Tensor, r: LayerRouting, keep: torch.Tensor | None = None) -> Routing:
    """Select experts exactly as `EmoSparseMoeBlock` does; `keep` (bool [E]) restricts the router
    to a subset by setting other logits to -inf before the softmax."""
    logits = logits.float()
    top_k = r.top_k
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
        top_k = min(top_k, int(keep.sum()))
    weights = torch.zeros_like(logits)
    if r.always_active:
        probs = logits.softmax(-1)
        always = list(r.always_active)
        others = probs.clone()
        others[:, always] = float("-inf")
        if top_k > len(always):
            vals, idx = others.topk(top_k - len(always), dim=-1)
            weights.scatter_(1, idx, vals)
        weights[:, always] = probs[:, always]
    elif r.num_shared:
        s = r.num_shared
        probs = torch.cat([logits[:, :-s].softmax(-1), logits[:, -s:].softmax(-1)], dim=-1)
        if top_k > s:
            vals, idx = probs[:, :-s].topk(top_k - s, dim=-1)
            weights.scatter_(1, idx, vals)
        weights[:, -s:] = probs[:, -s:]
    else:
        probs = logits.softmax(-1)
        vals, idx = probs.topk(top_k, dim=-1)
        if r.norm_topk_prob:
            vals = vals / vals.sum(-1, keepdim=True)
        weights.scatter_(1, idx, vals)
    return Routing(weights, probs, logits)


def moe(h: torch.Tensor, w: LayerWeights, r: LayerRouting, keep: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, Routing]:
    """The sparse MoE block on normed hidden states h [T, hidden]."""
    routing = route(F.linear(h, w["gate"]), r, keep)
    out = torch.zeros_like(h)
    for e in routing.weights.any(0).nonzero().flatten().tolist():
        rows = routing.weights[:, e].nonzero().flatten()
        out.index_add_(0, rows, routing.weights[rows, e, None].to(h.dtype) * expert(h[rows], w, e))
    return out, routing


def dense_mlp(h: torch.Tensor, w: LayerWeights) -> torch.Tensor:
    bias = (w.get("gate_proj.bias"), w.get("up_proj.bias"), w.get("down_proj.bias"))
    return swiglu(h, w["gate_proj"], w["up_proj"], w["down_proj"], bias)


# A hook sees (layer, normed MoE input, routing) for each sequence; used by profiler and eval.
RoutingHook = Callable[[int, torch.Tensor, Routing], None]


def decoder_layer(x: torch.Tensor, w: LayerWeights, cfg: EmoConfig, layer: int,
                  keep: torch.Tensor | None = None, hook: RoutingHook | None = None) -> torch.Tensor:
    """One pre-norm decoder layer on one sequence x [T, hidden]."""
    x = x + attention(rms_norm(x, w["pre_attention_layernorm"], cfg.rms_norm_eps), w, cfg)
    h = rms_norm(x, w["pre_feedforward_layernorm"], cfg.rms_norm_eps)
    r = cfg.layer_routing(layer)
    if r.is_dense:
        return x + dense_mlp(h, w)
    out, routing = moe(h, w, r, keep)
    if hook is not None:
        hook(layer, h, routing)
    return x + out


def embed(ckpt: Checkpoint, sequences: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float32,
          device: str | torch.device = "cpu") -> list[torch.Tensor]:
    table = ckpt.read("model.embed_tokens.weight")
    return [table[ids.cpu()].to(device=device, dtype=dtype) for ids in sequences]


def final_logits(ckpt: Checkpoint, hidden: Sequence[torch.Tensor], *, dtype: torch.dtype = torch.float32
                 ) -> list[torch.Tensor]:
    cfg = ckpt.config
    device = hidden[0].device if hidden else "cpu"
    norm = ckpt.read("model.norm.weight").to(device=device, dtype=dtype)
    head_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = ckpt.read(head_name).to(device=device, dtype=dtype)
    return [F.linear(rms_norm(x, norm, cfg.rms_norm_eps), head) for x in hidden]


@torch.inference_mode()
def forward(ckpt: Checkpoint, sequences: Sequence[torch.Tensor] | torch.Tensor, *,
            keep: Sequence[torch.Tensor | None] | None = None, hook: RoutingHook | None = None,
            dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Logits [T, vocab] for every position of every sequence (prefill, no cache).

    `keep[layer]` (bool over the layer's experts, or None) restricts routing to a subset. Only
    one layer's weights are resident at a time.
    """
    if isinstance(sequences, torch.Tensor):
        sequences = [sequences] if sequences.dim() == 1 else list(sequences)
    hidden = embed(ckpt, sequences, dtype=dtype, device=device)
    for layer, w in stream_layers(ckpt, dtype=dtype, device=device):
        mask = keep[layer] if keep is not None else None
        if mask is not None:
            mask = mask.to(device)
        hidden = [decoder_layer(x, w, ckpt.config, layer, mask, hook) for x in hidden]
    return final_logits(ckpt, hidden, dtype=dtype)


def keep_mask(cfg: EmoConfig, layer: int, ids: Sequence[int]) -> torch.Tensor:
    """A bool mask over `layer`'s experts, true at `ids` (the `keep` argument of `route`)."""
    mask = torch.zeros(cfg.experts_per_layer[layer], dtype=torch.bool)
    mask[list(ids)] = True
    return mask


def keep_masks(cfg: EmoConfig, experts: Sequence[Sequence[int]]) -> list[torch.Tensor | None]:
    """Bool masks over each layer's experts from per-layer kept ids (None for dense layers)."""
    return [keep_mask(cfg, layer, ids) if cfg.experts_per_layer[layer] else None
            for layer, ids in enumerate(experts)]
