"""The front end's map of a shared engine's expert slots: which base expert each slot holds,
which to load for a subset, and which to evict.

The engine (`emo_vllm.slots`) holds a fixed number of routed experts per MoE layer; the shared
experts and every router are always resident. A subset is servable once all of its routed
experts are in slots. A load fills free slots first, then evicts the least recently used
experts that no subset with requests in flight needs (nor the subset being loaded), as vLLM's
LoRA manager evicts adapters. Everything runs on the event loop, so no locks are needed here;
the placement serialises loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import SubsetError

Experts = list[list[int]]  # per layer, base expert ids (shared ones included)


class SubsetTooLarge(SubsetError):
    """A subset that needs more routed experts at some layer than the engine has slots."""

    code = "subset_exceeds_expert_slots"


@dataclass
class LoadPlan:
    """One load: per layer, the slots to fill and the base experts they receive."""

    pairs: dict[int, list[tuple[int, int]]]  # layer -> [(slot, base id)]
    evicted: dict[int, list[int]] = field(default_factory=dict)  # layer -> base ids leaving

    @property
    def experts(self) -> int:
        return sum(len(p) for p in self.pairs.values())

    @property
    def evictions(self) -> int:
        return sum(len(e) for e in self.evicted.values())

    def wire(self) -> dict[str, list[list[int]]]:
        """The plan as `emo_slots_stage` takes it."""
        return {str(layer): [[s, e] for s, e in pairs] for layer, pairs in self.pairs.items()}


class SlotTable:
    """Slot -> base expert, per MoE layer, as the engine holds them (empty after a start)."""

    def __init__(self, routed: Experts, slots: int) -> None:
        self.routed = [set(ids) for ids in routed]  # the routed ids of each layer ([] for dense)
        self.slots = slots
        self.reset()

    def reset(self) -> None:
        """Every slot empty: what a freshly started engine holds."""
        self.occupant: list[list[int | None]] = [[None] * self.layer_slots(i) for i in range(len(self.routed))]
        self.used_at: list[list[float]] = [[0.0] * self.layer_slots(i) for i in range(len(self.routed))]
        self.loading: set[tuple[int, int]] = set()

    def layer_slots(self, layer: int) -> int:
        return min(self.slots, len(self.routed[layer]))

    def _routed(self, experts: Experts) -> list[list[int]]:
        return [[e for e in ids if e in self.routed[i]] for i, ids in enumerate(experts)]

    def check_fits(self, experts: Experts, *, where: str) -> None:
        """SubsetTooLarge naming the first layer that needs more routed experts than it has slots."""
        for layer, ids in enumerate(self._routed(experts)):
            if len(ids) > self.layer_slots(layer):
                raise SubsetTooLarge(f"{where} keeps {len(ids)} routed experts at layer {layer}, but the shared "
                                     f"engine has {self.layer_slots(layer)} expert slots per layer "
                                     "(--expert-slots); keep fewer experts or raise --expert-slots")

    def _slot_of(self, layer: int, expert: int) -> int | None:
        for slot, held in enumerate(self.occupant[layer]):
            if held == expert and (layer, slot) not in self.loading:
                return slot
        return None

    def resident(self, experts: Experts) -> Experts:
        """Of `experts`' routed ids, those in a loaded slot, per layer."""
        return [[e for e in ids if self._slot_of(i, e) is not None] for i, ids in enumerate(self._routed(experts))]

    def is_resident(self, experts: Experts) -> bool:
        return all(len(r) == len(ids) for r, ids in zip(self.resident(experts), self._routed(experts), strict=True))

    def touch(self, experts: Experts) -> None:
        """Mark `experts` used now (the LRU order of eviction)."""
        now = time.monotonic()
        for layer, ids in enumerate(self._routed(experts)):
            for e in ids:
                if (slot := self._slot_of(layer, e)) is not None:
                    self.used_at[layer][slot] = now

    def plan(self, experts: Experts, pinned: set[tuple[int, int]]) -> LoadPlan | int:
        """Slots for `experts`' missing routed ids: free slots first, then the least recently used
        experts that are not `pinned` ((layer, base id) of subsets with requests in flight) nor
        `experts`' own. Returns the layer that has too few such slots when there are not enough."""
        plan = LoadPlan({})
        for layer, ids in enumerate(self._routed(experts)):
            wanted = set(ids)
            missing = [e for e in ids if self._slot_of(layer, e) is None]
            if not missing:
                continue
            held = self.occupant[layer]
            free = [s for s, e in enumerate(held) if e is None and (layer, s) not in self.loading]
            victims = sorted((s for s, e in enumerate(held) if e is not None and (layer, s) not in self.loading
                              and e not in wanted and (layer, e) not in pinned),
                             key=lambda s: self.used_at[layer][s])
            # A stale copy of a wanted expert in a loading slot cannot happen: loads are serialised.
            usable = free + victims
            if len(usable) < len(missing):
                return layer
            chosen = usable[: len(missing)]
            plan.pairs[layer] = list(zip(chosen, missing, strict=True))
            gone = [held[s] for s in chosen if held[s] is not None]
            if gone:
                plan.evicted[layer] = [e for e in gone if e is not None]
        return plan

    def begin(self, plan: LoadPlan) -> None:
        """The planned slots hold nothing servable until `finish`: their old experts are gone now."""
        for layer, pairs in plan.pairs.items():
            for slot, expert in pairs:
                self.occupant[layer][slot] = expert
                self.loading.add((layer, slot))

    def finish(self, plan: LoadPlan, *, ok: bool) -> None:
        """After the engine committed the load (`ok`), or did not (the slots are then empty)."""
        now = time.monotonic()
        for layer, pairs in plan.pairs.items():
            for slot, _ in pairs:
                self.loading.discard((layer, slot))
                self.used_at[layer][slot] = now
                if not ok:
                    self.occupant[layer][slot] = None

    def count(self) -> int:
        """Routed experts resident, summed over layers."""
        return sum(e is not None and (layer, s) not in self.loading
                   for layer, held in enumerate(self.occupant) for s, e in enumerate(held))

    def occupancy(self) -> list[list[int | None]]:
        """Per layer, the base expert of each slot (None: empty or loading), for /ui and the API."""
        return [[None if (layer, s) in self.loading else e for s, e in enumerate(held)]
                for layer, held in enumerate(self.occupant)]
