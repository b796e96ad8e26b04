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
# On a CPU, run eagerly, steps are tallied together once this many tokens are buffered (or before
# anything reads the tallies or changes a mask row): a step's tally is ~20 small ops whose cost is
# per op, not per token, which on the demo's 3-4 ms decode step cost 13-15 % of decode speed.
CPU_TALLY_TOKENS = 64


class Routing(Protocol):
    """What the tensor work reads of a layer's routing (`emo_serve.config.LayerRouting`, frozen)."""

    @property
    def num_experts(self) -> int: ...
    @property
    def num_shared(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def norm_topk_prob(self) -> bool: ...
    @property
    def always_active(self) -> tuple[int, ...]: ...
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


def remap_slots(slot_of: torch.Tensor, resident: torch.Tensor, occupant: torch.Tensor, slots: torch.Tensor,
                ids: torch.Tensor) -> int:
    """After experts `ids` were copied into `slots` (between steps): point the base-id -> slot map
    at them, in place, and mark the experts they replaced as gone. Returns how many were evicted."""
    old = occupant[slots]
    old = old[old >= 0]
    resident[old] = 0.0
    slot_of[ids] = slots
    resident[ids] = 1.0
    occupant[slots] = ids
    return int(old.numel())


def route_batched(logits: torch.Tensor, r: Routing, always: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`emo_serve.reference.route` over any leading dims ([layers, tokens, experts]): (probs,
    weights), each part of the softmax as the model routes it. A masked (-inf) expert gets
    probability 0; when fewer than top-k are kept, the extra picks weigh 0. `always`: the
    always-active ids as a tensor on the logits' device, made once (a host-to-device copy cannot
    run inside a CUDA-graph capture)."""
    if r.always_active:
        probs = logits.softmax(-1)
        if always is None:
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
    """MoE layers that route alike: tallied as one tensor, one set of ops per group and step.

    EMO's own routing (one shared expert, the last id: softmax over one logit is 1.0, so it is
    always chosen with weight 1) is tallied over the routed experts only, its shared column
    filled in from the token count when read (`one_shared`): half the ops of the general path,
    which matters on CPU, where a step's tally costs per op, not per token."""

    def __init__(self, layers: list[int], routing: Routing, max_tokens: int, keys: int,
                 tables: list[torch.Tensor] | None, device: torch.device | None) -> None:
        self.layers, self.routing = layers, routing
        self.one_shared = (routing.num_shared == 1 and not routing.always_active and not routing.norm_topk_prob
                           and routing.top_k > 1)
        self.width = routing.num_experts - 1 if self.one_shared else routing.num_experts
        # Token-major, so that a step's first n tokens are one contiguous block: float32 whatever
        # the model's dtype (vLLM builds models under that default dtype).
        self.logits = torch.zeros(max_tokens, len(layers), self.width, dtype=torch.float32, device=device)
        routed = torch.zeros(routing.num_experts, dtype=torch.float32, device=device)
        routed[list(routing.routed_ids)] = 1.0
        self.routed = routed  # 1.0 where a subset may drop the expert (the general path)
        self.always = torch.tensor(routing.always_active, dtype=torch.long, device=device)
        # float32: exact enough between drains (the front end drains every few seconds).
        self.mass = torch.zeros(keys, len(layers), self.width, dtype=torch.float32, device=device)
        self.counts = torch.zeros(keys, len(layers), self.width, dtype=torch.long, device=device)
        # The layers' mask tables, stacked once ([rows, layers, experts]): each block's table is a
        # view of its layer here, so a step indexes one tensor instead of stacking them.
        self.tables = torch.stack(tables, dim=1) if tables is not None else None

    def tally(self, keys: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor | None:
        """Add the step's tokens (`keys`, mask `rows`) to mass and counts; with masks, each token's
        share of routed top-k weight dropped by its row, summed over this group's layers."""
        n = keys.shape[0]
        logits = self.logits[:n]  # [n, layers, width]
        mask = self.tables[rows][..., : self.width] if self.tables is not None and rows is not None else None
        if self.one_shared:
            k = self.routing.top_k - 1
            probs = logits.softmax(-1)
            self.mass.index_add_(0, keys, probs)
            share = None
            if mask is None:
                picked, hit = logits.topk(k, dim=-1).indices, torch.ones(n, len(self.layers), k, dtype=torch.long,
                                                                         device=keys.device)
            else:  # a masked expert's logit is -inf: picked only when fewer than k are kept, with weight 0
                vals, idx = probs.topk(k, dim=-1)
                dropped = (mask < 0).gather(-1, idx)  # mask entries are 0 or -inf
                share = (torch.where(dropped, vals, 0.0).sum(-1) / vals.sum(-1).clamp_min(1e-30)).sum(-1)
                masked_vals, picked = (logits + mask).topk(k, dim=-1)
                hit = (masked_vals > float("-inf")).long()
            self.counts.index_add_(0, keys, torch.zeros_like(self.counts[0]).expand(n, -1, -1)
                                   .scatter(-1, picked, hit))
            return share
        if mask is None:
            probs, weights = route_batched(logits, self.routing, self.always)
            self.mass.index_add_(0, keys, probs)
            self.counts.index_add_(0, keys, (weights > 0).long())
            return None
        # One routing pass for both: unmasked (mass, drift) and masked (what the experts ran: counts).
        probs2, weights2 = route_batched(torch.stack([logits, logits + mask]), self.routing, self.always)
        probs, weights = probs2[0], weights2[0]
        self.mass.index_add_(0, keys, probs)
        self.counts.index_add_(0, keys, (weights2[1] > 0).long())
        routed = (weights * self.routed).sum(-1).clamp_min(1e-30)
        return (torch.where(mask < 0, weights, 0.0).sum(-1) / routed).sum(-1)

    def read(self, idx: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mass and counts of keys `idx` over every expert (host copies), zeroed in place."""
        mass, counts = self.mass.index_select(0, idx).cpu(), self.counts.index_select(0, idx).cpu()
        self.mass.index_fill_(0, idx, 0)
        self.counts.index_fill_(0, idx, 0)
        if self.one_shared:  # the shared expert: probability 1.0 and chosen, for every token
            shared = tokens.view(-1, 1, 1).expand(-1, len(self.layers), 1)
            mass, counts = torch.cat([mass, shared.float()], -1), torch.cat([counts, shared], -1)
        return mass, counts


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

    With `buffer_tokens` (a CPU, run eagerly), the last layer appends the step's keys and mask rows
    to the buffered steps' instead, and the steps are tallied together once `buffer_tokens` tokens
    are buffered, when the next step would not fit, or on `flush` (which `take` runs, and which
    must run before a mask row changes). Under `torch.compile` or a CUDA graph every step is
    tallied in its own forward, as above: a Python offset cannot vary between replays.
    """

    def __init__(self, routings: Mapping[int, Routing], *, max_tokens: int, keys: int,
                 mask_tables: Mapping[int, torch.Tensor] | None = None, token_rows: torch.Tensor | None = None,
                 device: torch.device | None = None, buffer_tokens: int = 0) -> None:
        if keys < 2:
            raise ValueError(f"a tally needs the trash key and at least one other, not {keys} keys")
        self.keys, self.max_tokens = keys, max_tokens
        alike: dict[tuple[object, ...], list[int]] = {}
        for layer in sorted(routings):
            r = routings[layer]
            alike.setdefault((r.num_experts, r.top_k, r.num_shared, tuple(r.always_active), r.norm_topk_prob,
                              tuple(r.routed_ids)), []).append(layer)
        self.groups = [_Group(ids, routings[ids[0]], max_tokens, keys,
                              [mask_tables[i] for i in ids] if mask_tables is not None else None, device)
                       for ids in alike.values()]
        self._where = {layer: (g, j) for g in self.groups for j, layer in enumerate(g.layers)}
        self.num_layers = len(routings)
        self._first, self._last = min(routings), max(routings)
        self.buffer_tokens = min(buffer_tokens, max_tokens)
        self.buffered = 0  # tokens of earlier steps in the buffers, not tallied yet
        self._step_buffered = False  # whether the step under way appends to them
        self._cuda = torch.cuda.is_available()
        self.token_rows = token_rows if mask_tables is not None else None
        self.token_keys = torch.zeros(max_tokens, dtype=torch.long, device=device)  # filled before each step
        # The buffered steps' keys and mask rows, token by token as in the groups' logits.
        self.pending_keys = torch.zeros(max_tokens if buffer_tokens else 0, dtype=torch.long, device=device)
        self.pending_rows = (torch.zeros(max_tokens if buffer_tokens else 0, dtype=torch.long, device=device)
                             if self.token_rows is not None else None)
        self.tokens = torch.zeros(keys, dtype=torch.long, device=device)  # every layer sees every token once
        # Drift, with masks (where every token has a share, so its token count is `tokens`).
        self.outside_sum = torch.zeros(keys, dtype=torch.float32, device=device)
        self.hist = torch.zeros(keys, len(OUTSIDE_BOUNDS), dtype=torch.long, device=device)
        self.bounds = torch.tensor(OUTSIDE_BOUNDS[:-1], dtype=torch.float32, device=device)

    @property
    def masked(self) -> bool:
        return self.token_rows is not None

    def stacked_table(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s mask table as a view of its group's stacked tables: what its block must
        hold from now on, so that rows written to the block are the rows the tally reads."""
        group, j = self._where[layer]
        assert group.tables is not None, "the tally was built without mask tables"
        return group.tables[:, j]

    # -- inside the forward ---------------------------------------------------------------------
    def record(self, layer: int, router_logits: torch.Tensor) -> None:
        """A MoE layer's unmasked router logits for this step; the last layer tallies the step
        (or buffers it)."""
        group, j = self._where[layer]
        n = router_logits.shape[0]
        if layer == self._first:
            self._step_buffered = bool(self.buffer_tokens) and not torch.compiler.is_compiling() and not (
                self._cuda and torch.cuda.is_current_stream_capturing())
            # A step tallied alone writes its logits first in the buffers: the buffered steps'
            # go first (a forward compiled after eager ones, say).
            if self.buffered and (not self._step_buffered or self.buffered + n > self.max_tokens):
                self.flush()
        start = self.buffered if self._step_buffered else 0
        group.logits[start:start + n, j].copy_(router_logits[:, : group.width])
        if layer != self._last:
            return
        keys = self.token_keys[:n]
        if not self._step_buffered:
            self.tally(keys, self.token_rows[:n] if self.token_rows is not None else None)
            keys.zero_()  # TRASH_KEY until the next step's inputs are written
            return
        self.pending_keys[start:start + n].copy_(keys)
        if self.pending_rows is not None and self.token_rows is not None:
            self.pending_rows[start:start + n].copy_(self.token_rows[:n])
        keys.zero_()
        self.buffered += n
        if self.buffered >= self.buffer_tokens:
            self.flush()

    def flush(self) -> None:
        """Tally the buffered steps now (between steps: before a read or a mask row change)."""
        n, self.buffered = self.buffered, 0
        if n:
            self.tally(self.pending_keys[:n], self.pending_rows[:n] if self.pending_rows is not None else None)

    def tally(self, keys: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Add the tokens whose logits are first in the groups' buffers (`keys`, mask `rows`)."""
        outside: torch.Tensor | None = None
        for group in self.groups:
            share = group.tally(keys, rows)
            if share is not None:
                outside = share if outside is None else outside + share
        ones = torch.ones_like(keys)
        self.tokens.index_add_(0, keys, ones)
        if outside is not None:
            mean = outside / self.num_layers
            self.outside_sum.index_add_(0, keys, mean)
            self.hist.index_put_((keys, torch.bucketize(mean, self.bounds)), ones, accumulate=True)

    # -- between steps --------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every tally buffer (each indexed by key first)."""
        return [t for g in self.groups for t in (g.mass, g.counts)] + [self.tokens, self.outside_sum, self.hist]

    def take(self, keys: Sequence[int]) -> dict[str, torch.Tensor]:
        """The tallies of `keys` (host copies, keys in the given order), zeroed in place."""
        self.flush()
        idx = torch.tensor(list(keys), dtype=torch.long, device=self.tokens.device)
        out: dict[str, torch.Tensor] = {}
        tokens = self.tokens.index_select(0, idx).cpu()
        for g, group in enumerate(self.groups):
            out[f"mass{g}"], out[f"counts{g}"] = group.read(idx, tokens)
        for name in ("tokens", "outside_sum", "hist"):
            t = getattr(self, name)
            out[name] = t.index_select(0, idx).cpu()
            t.index_fill_(0, idx, 0)
        out["outside_tokens"] = tokens if self.masked else torch.zeros_like(tokens)
        return out


__all__ = ["CPU_TALLY_TOKENS", "OUTSIDE_BOUNDS", "TRASH_KEY", "Routing", "RoutingTally", "mask_logits",
           "remap_slots", "route_batched", "slot_topk"]
