"""The per-token tensor work of a shared engine's MoE layers, in plain torch.

Expert masks, expert slots and routing capture all run inside the model's forward. Under CUDA
graphs a replay re-runs only the captured kernels, never the Python around them, so everything
here is tensor work on persistent buffers whose addresses never change: the per-step inputs
(which mask row and which tally key each token has) are written into those buffers before the
forward (`step_inputs`), and the tallies are read out between steps (`usage`). The same code runs
eagerly on vLLM's CPU runner, traced by `torch.compile`, and captured in a CUDA graph
(scripts/gpu-check.py runs it on a GPU with no vLLM installed: this module imports torch only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

# Upper bounds of the mass-outside histogram's buckets (the last catches the rest).
OUTSIDE_BOUNDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# Tally key 0 takes the tokens nobody asked to count: CUDA-graph padding, dummy and warm-up runs.
TRASH_KEY = 0


class Routing(Protocol):
    """What the tensor work reads of a layer's routing (`emo_serve.config.LayerRouting`)."""

    num_experts: int
    num_shared: int
    top_k: int
    norm_topk_prob: bool
    always_active: tuple[int, ...]

    @property
    def routed_ids(self) -> list[int]: ...


def mask_logits(logits: torch.Tensor, table: torch.Tensor, token_rows: torch.Tensor) -> torch.Tensor:
    """Each token's router logits plus its request's mask row (0 kept, -inf dropped)."""
    return logits + table[token_rows[: logits.shape[0]]]


def slot_topk(hidden_states: torch.Tensor, gating_output: torch.Tensor, topk: int, renormalize: bool, *,
              slot_of: torch.Tensor, resident: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO's routed part in base ids (softmax over the routed logits, top-k, no renormalisation),
    then each pick moved to its slot; a pick of an expert that is not resident weighs 0."""
    weights, ids = gating_output.float().softmax(-1).topk(topk, dim=-1)
    return weights * resident[ids], slot_of[ids]


def route_batched(logits: torch.Tensor, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """`emo_serve.reference.route` over any leading dims ([layers, tokens, experts]): (probs,
    weights), each part of the softmax as the model routes it. A masked (-inf) expert gets
    probability 0; when fewer than top-k are kept, the extra picks weigh 0."""
    if r.always_active:
        probs = logits.softmax(-1)
        always = torch.tensor(r.always_active, device=logits.device)
        weights = torch.zeros_like(probs)
        if r.top_k > len(r.always_active):
            vals, idx = probs.index_fill(-1, always, float("-inf")).topk(r.top_k - len(r.always_active), dim=-1)
            weights.scatter_(-1, idx, vals)
        weights.index_copy_(-1, always, probs.index_select(-1, always))
        return probs, weights
    if r.num_shared:
        s = r.num_shared
        probs = torch.cat([logits[..., :-s].softmax(-1), logits[..., -s:].softmax(-1)], dim=-1)
        weights = torch.zeros_like(probs)
        if r.top_k > s:
            vals, idx = probs[..., :-s].topk(r.top_k - s, dim=-1)
            weights.scatter_(-1, idx, vals)
        weights[..., -s:] = probs[..., -s:]
        return probs, weights
    probs = logits.softmax(-1)
    vals, idx = probs.topk(r.top_k, dim=-1)
    if r.norm_topk_prob:
        vals = vals / vals.sum(-1, keepdim=True)
    return probs, torch.zeros_like(probs).scatter_(-1, idx, vals)


class _Group:
    """MoE layers that route alike: tallied as one tensor, one set of ops per group and step."""

    def __init__(self, layers: list[int], routing: Routing, max_tokens: int, keys: int,
                 device: torch.device | None) -> None:
        self.layers, self.routing = layers, routing
        e = routing.num_experts
        # float32 whatever the model's dtype (vLLM builds models under that default dtype).
        self.logits = torch.zeros(len(layers), max_tokens, e, dtype=torch.float32, device=device)
        self.routed = torch.tensor(routing.routed_ids, dtype=torch.long, device=device)
        self.mass = torch.zeros(len(layers), keys, e, dtype=torch.float64, device=device)
        self.counts = torch.zeros(len(layers), keys, e, dtype=torch.long, device=device)


class RoutingTally:
    """Per tally key, MoE layer and expert, added up inside the forward, step by step:

    * `mass`: router probability as the reference routes, from the *unmasked* logits (what the
      profiler's `usage` method sums);
    * `counts`: tokens whose top-k held the expert after the request's mask row (what the fused
      experts ran: the profiler's `frequency`);
    * with masks, each token's share of the unmasked routing's routed top-k weight that falls on
      experts its row drops, averaged over MoE layers (the subset's drift): summed and bucketed.

    Each MoE layer copies its logits into its group's buffer (`record`); the last one tallies the
    whole step for every layer at once and returns the step's keys to `TRASH_KEY`, so a forward
    that nobody prepared (a dummy run) counts nothing.
    """

    def __init__(self, routings: Mapping[int, Routing], *, max_tokens: int, keys: int,
                 mask_tables: Mapping[int, torch.Tensor] | None = None, token_rows: torch.Tensor | None = None,
                 device: torch.device | None = None) -> None:
        if keys < 2:
            raise ValueError(f"a tally needs the trash key and at least one other, not {keys} keys")
        self.keys, self.max_tokens = keys, max_tokens
        alike: dict[tuple[object, ...], list[int]] = {}
        for layer in sorted(routings):
            r = routings[layer]
            alike.setdefault((r.num_experts, r.top_k, r.num_shared, tuple(r.always_active), r.norm_topk_prob,
                              tuple(r.routed_ids)), []).append(layer)
        self.groups = [_Group(ids, routings[ids[0]], max_tokens, keys, device) for ids in alike.values()]
        self._where = {layer: (g, j) for g in self.groups for j, layer in enumerate(g.layers)}
        self.num_layers = len(routings)
        self._last = max(routings)
        self.mask_tables = dict(mask_tables) if mask_tables is not None else None
        self.token_rows = token_rows
        self.token_keys = torch.zeros(max_tokens, dtype=torch.long, device=device)  # filled before each step
        self.tokens = torch.zeros(keys, dtype=torch.long, device=device)  # every layer sees every token once
        self.outside_sum = torch.zeros(keys, dtype=torch.float64, device=device)
        self.outside_tokens = torch.zeros(keys, dtype=torch.long, device=device)
        self.hist = torch.zeros(keys, len(OUTSIDE_BOUNDS), dtype=torch.long, device=device)
        self.bounds = torch.tensor(OUTSIDE_BOUNDS[:-1], dtype=torch.float64, device=device)

    @property
    def masked(self) -> bool:
        return self.mask_tables is not None and self.token_rows is not None

    # -- inside the forward ---------------------------------------------------------------------
    def record(self, layer: int, router_logits: torch.Tensor) -> None:
        """A MoE layer's unmasked router logits for this step; the last layer tallies the step."""
        group, j = self._where[layer]
        n = router_logits.shape[0]
        group.logits[j, :n].copy_(router_logits)
        if layer == self._last:
            self.tally(n)

    def tally(self, n: int) -> None:
        keys = self.token_keys[:n]
        outside: torch.Tensor | None = None
        for group in self.groups:
            logits = group.logits[:, :n]
            probs, weights = route_batched(logits, group.routing)
            chosen = weights
            if self.masked:
                assert self.mask_tables is not None and self.token_rows is not None
                tables = torch.stack([self.mask_tables[layer] for layer in group.layers]).float()
                mask = tables[:, self.token_rows[:n]]  # [layers, n, experts]
                chosen = route_batched(logits + mask, group.routing)[1]
                routed = weights.index_select(-1, group.routed).sum(-1).clamp_min(1e-30)
                share = ((weights * torch.isinf(mask)).sum(-1) / routed).sum(0).double()
                outside = share if outside is None else outside + share
            group.mass.index_add_(1, keys, probs.double())
            group.counts.index_add_(1, keys, (chosen > 0).long())
        ones = torch.ones_like(keys)
        self.tokens.index_add_(0, keys, ones)
        if outside is not None:
            mean = outside / self.num_layers
            self.outside_sum.index_add_(0, keys, mean)
            self.outside_tokens.index_add_(0, keys, ones)
            self.hist.index_put_((keys, torch.bucketize(mean, self.bounds)), ones, accumulate=True)
        keys.zero_()  # TRASH_KEY until the next step's inputs are written

    # -- between steps --------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tally buffer (whose first dim past the layers is the key)."""
        return [t for g in self.groups for t in (g.mass, g.counts)] + [
            self.tokens, self.outside_sum, self.outside_tokens, self.hist]

    def take(self, keys: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tallies of `keys` (host copies, keys in the given order), zeroed in place."""
        idx = torch.tensor(list(keys), dtype=torch.long, device=self.tokens.device)
        out: dict[str, torch.Tensor] = {}
        for g, group in enumerate(self.groups):
            out[f"mass{g}"] = group.mass.index_select(1, idx).cpu()
            out[f"counts{g}"] = group.counts.index_select(1, idx).cpu()
            group.mass.index_fill_(1, idx, 0)
            group.counts.index_fill_(1, idx, 0)
        for name in ("tokens", "outside_sum", "outside_tokens", "hist"):
            t = getattr(self, name)
            out[name] = t.index_select(0, idx).cpu()
            t.index_fill_(0, idx, 0)
        return out


__all__ = ["OUTSIDE_BOUNDS", "TRASH_KEY", "Routing", "RoutingTally", "mask_logits", "route_batched", "slot_topk"]
