"""A shared engine's EMO MoE layer in plain torch, and an oracle for it with no masks or slots.

The plugin's block (`emo.EmoSparseMoeBlock`) runs its experts in vLLM's `FusedMoE`, so it can only
be built, compiled and captured where vLLM is installed. This module repeats its forward step for
step around the same `routing_ops` (capture from the unmasked logits, the request's mask row,
top-k in base ids moved to expert slots, a shared expert beside them) with a dense expert
computation in torch alone, so `routing_ops` can be run eagerly, traced by `torch.compile` and
replayed from a CUDA graph on any machine with torch (`scripts/gpu-check.py`,
tests/plugin/test_torch_moe.py). It imports torch and `routing_ops` only: no vLLM, no emo_serve.

Every per-step input is a persistent buffer filled in place (`token_rows`, the tally's
`token_keys`, mask rows with `set_mask_row`, slot contents and maps with `load_slots`), never a
Python value read in `forward()`, which a trace would freeze and a graph replay would not re-run.

The expert computation runs every slot on every token and weighs each by the token's top-k
weights scattered to slots: no data-dependent shapes, fine at test sizes and at 32 slots; the
fused kernel runs only the picked experts, which is what a real engine needs.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .routing_ops import OUTSIDE_BOUNDS, RoutingTally, mask_logits, remap_slots, slot_topk


@dataclass  # not frozen: `routing_ops.Routing` declares plain (settable) attributes
class SharedExpertRouting:
    """The released model's routing (`routing_ops.Routing`): one shared expert, the last id;
    top-(k-1) of softmax(routed logits), no renormalisation, nothing always active."""

    num_experts: int
    top_k: int
    num_shared: int = 1
    norm_topk_prob: bool = False
    always_active: tuple[int, ...] = ()

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def routed_ids(self) -> list[int]:
        return list(range(self.num_routed))


class SwiGLU(nn.Module):
    """down(silu(gate x) * up x), gate and up stacked as one projection (the shared expert)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class EmoMoeBlock(nn.Module):
    """`emo.EmoSparseMoeBlock` with expert masks and expert slots, in torch alone.

    Build it on its device (`device=`) and do not move it: `token_rows` and the tally are shared
    plain references, as in the plugin, and `.to()` would leave them behind.
    """

    subset_masks: torch.Tensor  # [rows, experts]: 0 kept / -inf dropped; row 0 unmasked
    w13: torch.Tensor  # [slots, 2 * intermediate, hidden]: gate | up, as the fused MoE stacks them
    w2: torch.Tensor  # [slots, hidden, intermediate]
    slot_of: torch.Tensor  # [routed] base id -> slot
    slot_resident: torch.Tensor  # [routed] 1.0 if the base id is in a slot, else 0.0
    slot_occupant: torch.Tensor  # [slots] slot -> base id, -1 if empty

    def __init__(self, routing: SharedExpertRouting, *, hidden_size: int, intermediate_size: int,
                 num_slots: int, mask_rows: int, token_rows: torch.Tensor, layer: int = 0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if routing.num_shared != 1 or routing.always_active or routing.norm_topk_prob or routing.top_k < 2:
            raise ValueError("expert slots need EMO's routing with one shared expert, top-k >= 2 and no "
                             f"renormalisation (the released model's), not {routing}")
        if not 0 < num_slots <= routing.num_routed:
            raise ValueError(f"{num_slots} slots for {routing.num_routed} routed experts")
        if mask_rows < 1:
            raise ValueError("the mask table needs row 0 (unmasked)")
        self.routing, self.layer = routing, layer
        self.num_routed, self.num_slots = routing.num_routed, num_slots
        self.routed_top_k = routing.top_k - routing.num_shared
        self.token_rows = token_rows  # the model's per-token row index, not registered per layer
        self.tally: RoutingTally | None = None  # set by the stack once every layer exists
        self.gate = nn.Linear(hidden_size, routing.num_experts, bias=False, device=device, dtype=dtype)
        self.shared_expert = SwiGLU(hidden_size, intermediate_size, device=device, dtype=dtype)
        self.requires_grad_(False)  # inference only: a trace needs no backward graph
        self.register_buffer("subset_masks", torch.zeros(mask_rows, routing.num_experts, device=device),
                             persistent=False)
        self.register_buffer("w13", torch.zeros(num_slots, 2 * intermediate_size, hidden_size,
                                                device=device, dtype=dtype), persistent=False)
        self.register_buffer("w2", torch.zeros(num_slots, hidden_size, intermediate_size,
                                               device=device, dtype=dtype), persistent=False)
        self.register_buffer("slot_of", torch.zeros(self.num_routed, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("slot_resident", torch.zeros(self.num_routed, device=device), persistent=False)
        self.register_buffer("slot_occupant", torch.full((num_slots,), -1, dtype=torch.long, device=device),
                             persistent=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        orig_shape = hidden_states.shape
        x = hidden_states.view(-1, hidden_states.shape[-1])
        router_logits = self.gate(x)
        if self.tally is not None:
            self.tally.record(self.layer, router_logits)  # unmasked, as the plugin captures
        router_logits = mask_logits(router_logits, self.subset_masks, self.token_rows)
        # The shared logit is dropped: softmax over one logit is 1.0, the shared MLP's weight.
        weights, slots = slot_topk(x, router_logits[:, : self.num_routed], self.routed_top_k, False,
                                   slot_of=self.slot_of, resident=self.slot_resident)
        # scatter_add_, not scatter_: a non-resident pick (weight 0) may name a resident's slot.
        combine = torch.zeros(x.shape[0], self.num_slots, dtype=weights.dtype, device=x.device)
        combine.scatter_add_(1, slots, weights)
        gate, up = torch.einsum("th,nih->tni", x, self.w13).chunk(2, dim=-1)
        act = F.silu(gate) * up * combine.to(x.dtype).unsqueeze(-1)
        out = torch.einsum("tni,nhi->th", act, self.w2) + self.shared_expert(x)
        return out.view(orig_shape)


class EmoMoeStack(nn.Module):
    """MoE blocks in a row (`h = h + block(h)`, the decoder's residual without attention or norms),
    sharing one per-token row index and, with `tally_keys`, one routing tally, as the plugin's
    model shares them across its layers."""

    token_rows: torch.Tensor  # [max_tokens]: each token's mask row, written before each step

    def __init__(self, routing: SharedExpertRouting, *, num_layers: int, hidden_size: int,
                 intermediate_size: int, num_slots: int, mask_rows: int, max_tokens: int, tally_keys: int = 0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.register_buffer("token_rows", torch.zeros(max_tokens, dtype=torch.long, device=device),
                             persistent=False)
        self.blocks = nn.ModuleList(
            EmoMoeBlock(routing, hidden_size=hidden_size, intermediate_size=intermediate_size,
                        num_slots=num_slots, mask_rows=mask_rows, token_rows=self.token_rows, layer=layer,
                        device=device, dtype=dtype)
            for layer in range(num_layers))
        self.tally: RoutingTally | None = None
        if tally_keys:
            self.tally = RoutingTally({layer: routing for layer in range(num_layers)}, max_tokens=max_tokens,
                                      keys=tally_keys, token_rows=self.token_rows, device=device,
                                      mask_tables={b.layer: b.subset_masks for b in self.moe_blocks()})
            for block in self.moe_blocks():
                block.tally = self.tally
                # The tally stacks the layers' mask tables once; each block holds its layer's view
                # of that, so a row written to the block is the row the tally reads.
                block.subset_masks = self.tally.stacked_table(block.layer)

    def moe_blocks(self) -> list[EmoMoeBlock]:
        return [b for b in self.blocks if isinstance(b, EmoMoeBlock)]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            hidden_states = hidden_states + block(hidden_states)
        return hidden_states


# -- control calls, between steps (never inside a forward) -------------------------------------
@torch.no_grad()
def load_slots(block: EmoMoeBlock, slots: Sequence[int] | torch.Tensor, ids: Sequence[int] | torch.Tensor,
               w13: torch.Tensor, w2: torch.Tensor) -> int:
    """Copy base experts `ids` (weights `w13` [n, 2I, H], `w2` [n, H, I]) into `slots`, in place,
    and remap (`routing_ops.remap_slots`, as `slots._commit_layer` does); returns how many experts were evicted."""
    device = block.slot_of.device
    slots_t = torch.as_tensor(slots, dtype=torch.long, device=device)
    ids_t = torch.as_tensor(ids, dtype=torch.long, device=device)
    if slots_t.shape != ids_t.shape or slots_t.unique().numel() != slots_t.numel() \
            or ids_t.unique().numel() != ids_t.numel():
        raise ValueError(f"slots {slots_t.tolist()} and ids {ids_t.tolist()} must pair up, each once")
    block.w13.index_copy_(0, slots_t, w13.to(device=device, dtype=block.w13.dtype))
    block.w2.index_copy_(0, slots_t, w2.to(device=device, dtype=block.w2.dtype))
    return remap_slots(block.slot_of, block.slot_resident, block.slot_occupant, slots_t, ids_t)


@torch.no_grad()
def set_mask_row(block: EmoMoeBlock, row: int, kept_ids: Collection[int] | None) -> None:
    """Mask row `row` keeps `kept_ids` (routed base ids) and the shared expert, -inf elsewhere;
    None clears it (routes unmasked), as `masks.MaskControl.emo_set_subset` does per layer."""
    if not 0 < row < block.subset_masks.shape[0]:
        raise ValueError(f"mask row {row} is outside 1..{block.subset_masks.shape[0] - 1}")
    table = block.subset_masks
    table[row].zero_()
    if kept_ids is not None:
        drop = torch.ones(table.shape[1], dtype=torch.bool, device=table.device)
        keep = sorted(set(kept_ids) | set(range(block.num_routed, table.shape[1])))
        drop[torch.tensor(keep, dtype=torch.long, device=table.device)] = False
        table[row].masked_fill_(drop, float("-inf"))


# -- the oracle ------------------------------------------------------------------------------
@dataclass
class ExpertWeights:
    """One MoE layer's full weights, every expert by base id (the checkpoint's view)."""

    gate: torch.Tensor  # [experts, hidden]
    w13: torch.Tensor  # [routed, 2 * intermediate, hidden]
    w2: torch.Tensor  # [routed, hidden, intermediate]
    shared_w13: torch.Tensor  # [2 * intermediate, hidden]
    shared_w2: torch.Tensor  # [hidden, intermediate]

    @classmethod
    def random(cls, routing: SharedExpertRouting, hidden_size: int, intermediate_size: int, *,
               generator: torch.Generator, device: torch.device | None = None,
               dtype: torch.dtype = torch.float32, gate_scale: float = 4.0) -> ExpertWeights:
        """Seeded weights whose outputs stay near unit scale; `gate_scale` spreads the router
        logits so that routing is decided, not near-uniform."""
        def rand(*shape: int, fan_in: int, scale: float = 1.0) -> torch.Tensor:
            t = torch.randn(*shape, generator=generator, dtype=torch.float32) * (scale / fan_in ** 0.5)
            return t.to(device=device, dtype=dtype)
        h, i, r = hidden_size, intermediate_size, routing.num_routed
        return cls(gate=rand(routing.num_experts, h, fan_in=h, scale=gate_scale),
                   w13=rand(r, 2 * i, h, fan_in=h), w2=rand(r, h, i, fan_in=i),
                   shared_w13=rand(2 * i, h, fan_in=h), shared_w2=rand(h, i, fan_in=i))

    @torch.no_grad()
    def load_into(self, block: EmoMoeBlock) -> None:
        """The router and the shared expert (routed experts go to slots with `load_slots`)."""
        block.gate.weight.copy_(self.gate)
        block.shared_expert.gate_up_proj.weight.copy_(self.shared_w13)
        block.shared_expert.down_proj.weight.copy_(self.shared_w2)


@dataclass
class ReferenceLayer:
    out: torch.Tensor  # [tokens, hidden]: the MoE block's output
    chosen: list[list[int]]  # per token: the routed base ids its masked top-k gave weight > 0
    probs: torch.Tensor  # [tokens, experts] float32: unmasked routing (routed softmax | shared 1.0)
    outside: torch.Tensor  # [tokens]: share of the unmasked routed top-k weight on dropped experts


def _swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


@torch.no_grad()
def reference_moe(x: torch.Tensor, weights: ExpertWeights, routing: SharedExpertRouting,
                  kept: Sequence[Collection[int] | None], resident: Collection[int] | None = None) -> ReferenceLayer:
    """EMO's MoE layer token by token from full weights: softmax over the token's kept routed
    experts only (`kept[t]`, None = all), top-(k-1) of them, each pick's expert weighted by its
    probability (0 unless in `resident`, when given: an expert not in memory adds nothing), plus
    the shared expert at weight 1.0. No mask rows, no slots, no fused buffers."""
    num_routed, picks = routing.num_routed, routing.top_k - routing.num_shared
    # One matmul over the batch, as the block does, so both route from the same logits bits.
    logits = F.linear(x, weights.gate).float()
    routed_probs = logits[:, :num_routed].softmax(-1)
    probs = torch.cat([routed_probs, torch.ones(x.shape[0], routing.num_shared, device=x.device)], dim=-1)
    out = torch.empty_like(x)
    outside = torch.zeros(x.shape[0])
    chosen: list[list[int]] = []
    for t in range(x.shape[0]):
        ids = list(range(num_routed)) if kept[t] is None else sorted(kept[t] or ())
        ids_t = torch.tensor(ids, dtype=torch.long, device=x.device)
        p = logits[t, ids_t].softmax(-1)
        vals, idx = p.topk(min(picks, len(ids)))
        y = _swiglu(x[t], weights.shared_w13, weights.shared_w2)
        picked = []
        for v, i in zip(vals.tolist(), idx.tolist()):
            e = ids[i]
            if v > 0:
                picked.append(e)
                if resident is None or e in resident:
                    y = y + v * _swiglu(x[t], weights.w13[e], weights.w2[e])
        out[t] = y
        chosen.append(sorted(picked))
        # Drift: of the unmasked routing's top-(k-1) weight, the share its row drops.
        top_p, top_ids = routed_probs[t].topk(picks)
        keep = set(ids)
        gone = [v for v, e in zip(top_p.tolist(), top_ids.tolist()) if e not in keep]
        outside[t] = sum(gone) / max(float(top_p.sum()), 1e-30)
    return ReferenceLayer(out, chosen, probs, outside)


def reference_tally(layers: Sequence[ReferenceLayer], keys: Sequence[int], num_keys: int,
                    routing: SharedExpertRouting) -> dict[str, torch.Tensor]:
    """What `RoutingTally.take` returns after these MoE layers' tokens (token t under key
    `keys[t]`; one routing group), each indexed by key first: counts and mass [keys, layers,
    experts], tokens, and the drift (the mean over layers of each token's `outside`) summed and
    bucketed by `OUTSIDE_BOUNDS`."""
    e = routing.num_experts
    key_t = torch.tensor(list(keys), dtype=torch.long)
    counts = torch.zeros(num_keys, len(layers), e, dtype=torch.long)
    mass = torch.zeros(num_keys, len(layers), e, dtype=torch.float64)
    tokens = torch.zeros(num_keys, dtype=torch.long).index_add_(0, key_t, torch.ones_like(key_t))
    for j, layer in enumerate(layers):
        mass[:, j].index_add_(0, key_t, layer.probs.double().cpu())
        for t, ids in enumerate(layer.chosen):
            counts[keys[t], j, [*ids, *range(routing.num_routed, e)]] += 1
    mean = torch.stack([layer.outside.double() for layer in layers]).mean(0)
    outside_sum = torch.zeros(num_keys, dtype=torch.float64).index_add_(0, key_t, mean)
    hist = torch.zeros(num_keys, len(OUTSIDE_BOUNDS), dtype=torch.long)
    buckets = torch.bucketize(mean, torch.tensor(OUTSIDE_BOUNDS[:-1], dtype=torch.float64))
    hist.index_put_((key_t, buckets), torch.ones_like(key_t), accumulate=True)
    return {"mass0": mass, "counts0": counts, "tokens": tokens, "outside_sum": outside_sum, "hist": hist}


__all__ = ["EmoMoeBlock", "EmoMoeStack", "ExpertWeights", "ReferenceLayer", "SharedExpertRouting", "SwiGLU",
           "load_slots", "reference_moe", "reference_tally", "set_mask_row"]
