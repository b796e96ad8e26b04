"""A trainable, batched EMO language model with the exact math of `emo_serve.reference`.

It reuses the reference's RMSNorm, RoPE, SwiGLU and router (`route`), batching only what the
reference does one sequence at a time (attention over [B, T], experts over all B*T tokens).
EMO's recipe enters as an optional per-document *pool*: before routing, each document's router
logits outside its pool are masked, where the pool is the top-P routed experts by the document's
own mean router probability (P given per document). The shared expert is never in question
(EMO keeps it always on). `state_dict_for_checkpoint` names tensors as the released model does,
so the export is read by the same reader, reference forward and vLLM plugin as any EMO checkpoint.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EmoConfig
from ..reference import rms_norm, rotary, route, swiglu


class DecoderLayer(nn.Module):
    def __init__(self, cfg: EmoConfig, layer: int) -> None:
        super().__init__()
        h, hd, e, i = cfg.hidden_size, cfg.head_size, cfg.experts_per_layer[layer], cfg.intermediate_size
        self.cfg, self.routing = cfg, cfg.layer_routing(layer)
        self.q_proj = nn.Parameter(torch.empty(cfg.num_attention_heads * hd, h))
        self.k_proj = nn.Parameter(torch.empty(cfg.kv_heads * hd, h))
        self.v_proj = nn.Parameter(torch.empty(cfg.kv_heads * hd, h))
        self.o_proj = nn.Parameter(torch.empty(h, cfg.num_attention_heads * hd))
        self.pre_attention_layernorm = nn.Parameter(torch.ones(h))
        self.pre_feedforward_layernorm = nn.Parameter(torch.ones(h))
        self.gate = nn.Parameter(torch.empty(e, h))
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        cfg = self.cfg
        hd, nh, nkv = cfg.head_size, cfg.num_attention_heads, cfg.kv_heads
        pos = torch.arange(T, device=x.device)
        q = rotary(F.linear(x, self.q_proj).view(B, T, nh, hd), pos, cfg.rope_theta)
        k = rotary(F.linear(x, self.k_proj).view(B, T, nkv, hd), pos, cfg.rope_theta)
        v = F.linear(x, self.v_proj).view(B, T, nkv, hd)
        rep = nh // nkv
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True)
        return F.linear(out.transpose(1, 2).reshape(B, T, nh * hd), self.o_proj)

    def pool_mask(self, logits: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        """Bool [B, E]: each document's shared experts plus its top-`pool[b]` routed experts by
        mean router probability over its valid tokens (no gradient: the pool is a choice)."""
        s = self.routing.num_shared
        with torch.no_grad():
            probs = logits[..., : logits.shape[-1] - s].float().softmax(-1) * valid[..., None]
            mean = probs.sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
            order = mean.argsort(-1, descending=True)
            ranks = torch.empty_like(order)
            ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
            keep = ranks < pool[:, None]
            return torch.cat([keep, torch.ones(keep.shape[0], s, dtype=torch.bool)], dim=1)

    def moe(self, h: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE output [B, T, H] and the global load-balancing loss over valid tokens."""
        B, T, H = h.shape
        logits = F.linear(h, self.gate)
        if pool is not None:
            logits = logits.masked_fill(~self.pool_mask(logits, valid, pool)[:, None, :], float("-inf"))
        flat = h.reshape(B * T, H)
        r = route(logits.reshape(B * T, -1), self.routing)
        out = torch.zeros_like(flat)
        for e in range(self.routing.num_experts):
            rows = r.weights[:, e].nonzero().flatten()
            if rows.numel():
                y = swiglu(flat[rows], self.gate_proj[e], self.up_proj[e], self.down_proj[e])
                out = out.index_add(0, rows, r.weights[rows, e, None] * y)
        return out.view(B, T, H), self.balance_loss(r.weights, r.probs, valid.reshape(-1))

    def balance_loss(self, weights: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Switch-style f·P over the routed experts, computed over the whole batch at once
        (EMO's global balancing: documents may specialise as long as the batch is balanced)."""
        n = self.routing.num_routed
        v = valid.float()[:, None]
        chosen = (weights[:, :n] > 0).float() * v
        f = chosen.sum(0) / chosen.sum().clamp(min=1)
        p = (probs[:, :n] * v).sum(0) / v.sum().clamp(min=1)
        return n * (f * p).sum()

    def forward(self, x: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.cfg.rms_norm_eps
        x = x + self.attention(rms_norm(x, self.pre_attention_layernorm, eps))
        out, aux = self.moe(rms_norm(x, self.pre_feedforward_layernorm, eps), valid, pool)
        return x + out, aux


class EmoLM(nn.Module):
    def __init__(self, cfg: EmoConfig, *, seed: int = 0) -> None:
        super().__init__()
        if cfg.tie_word_embeddings or any(c == 0 for c in cfg.experts_per_layer):
            raise ValueError("the trainer supports untied embeddings and MoE layers only")
        self.cfg = cfg
        self.embed_tokens = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int) -> None:
        """GPT-2-style init (std 0.02, residual outputs scaled by depth), seeded."""
        gen = torch.Generator().manual_seed(seed)
        out_std = 0.02 / (2 * self.cfg.num_hidden_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm") or name == "norm":
                    p.fill_(1.0)
                else:
                    std = out_std if name.endswith(("o_proj", "down_proj")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, ids: torch.Tensor, valid: torch.Tensor, pool: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] and the mean load-balancing loss over layers."""
        x = self.embed_tokens[ids]
        aux = x.new_zeros(())
        for layer in self.layers:
            x, a = layer(x, valid, pool)
            aux = aux + a
        return F.linear(rms_norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head), aux / len(self.layers)

    def state_dict_for_checkpoint(self) -> dict[str, torch.Tensor]:
        """Tensors under the released checkpoint's names, experts split one per tensor."""
        out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": self.embed_tokens}
        for i, module in enumerate(self.layers):
            layer = cast(DecoderLayer, module)  # a ModuleList is typed as holding plain Modules
            p = f"model.layers.{i}"
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                out[f"{p}.self_attn.{name}.weight"] = getattr(layer, name)
            out[f"{p}.pre_attention_layernorm.weight"] = layer.pre_attention_layernorm
            out[f"{p}.pre_feedforward_layernorm.weight"] = layer.pre_feedforward_layernorm
            out[f"{p}.mlp.gate.weight"] = layer.gate
            for e in range(layer.routing.num_experts):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    out[f"{p}.mlp.experts.{e}.{name}.weight"] = getattr(layer, name)[e]
        out["model.norm.weight"] = self.norm
        out["lm_head.weight"] = self.lm_head
        return {k: v.detach() for k, v in out.items()}
