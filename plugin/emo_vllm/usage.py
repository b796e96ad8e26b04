"""Live routing capture: which experts each model's and each user's tokens use, in the engine.

With `--additional-config '{"emo_usage": true}'` every MoE layer hands its router logits to the
step's tally (`routing_ops.RoutingTally`: mass, counts and drift per tally key, layer and
expert), which adds the step up inside the forward, as tensor work on persistent buffers: the
same on vLLM's CPU runner, traced by torch.compile, and replayed from a CUDA graph. A CPU engine
run eagerly tallies its steps together every `CPU_TALLY_TOKENS` tokens instead (and before a
drain or a mask row change): there a tally's cost is per op, and decode steps are a few tokens. A tally key
is a (model, user) pair (the front end's model name and the OpenAI `user`, from `vllm_xargs`);
`step_inputs` writes each token's key before the forward. Why the top-k weight for drift, rather
than the whole softmax: the softmax's tail is spread over every expert whatever the text, and on
the trained demo it hid the difference between in- and out-of-domain traffic
(docs/benchmarks/routing.md).

The tallies hold a fixed number of keys (the most requests a step can hold, plus spare), so
their addresses never change. A key whose requests have all left is spilled to host memory when
its place is needed (`KeyIndex`), and every key is handed out, zeroed, by a control call between
steps (`UsageControl.emo_usage_drain`), so a step never waits on the front end and never pauses
to flush a backlog (the buffered design this replaces stalled a step 0.4-1.1 s at the 14B shape).

Why not vLLM's own capture (`enable_return_routed_experts`, the router's `set_capture_fn`): the
first needs Model Runner V2 and both give top-k ids only, at the end of a request, not the
probabilities the profiler ranks by nor the mass outside a subset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

from .routing_ops import CPU_TALLY_TOKENS, OUTSIDE_BOUNDS, TRASH_KEY, RoutingTally
from .step_inputs import MODEL_ARG, USER_ARG, attach_step_inputs

logger = init_logger("vllm.emo_vllm.usage")

# `--additional-config` key that turns capture on.
USAGE_CONFIG = "emo_usage"
# Tally keys beyond the most requests one step can hold: keys of finished requests stay on the
# device until a drain or until their place is needed (then they are spilled to host memory).
SPARE_KEYS = 64
Key = tuple[str, str]  # (model, user)


class KeyIndex:
    """(model, user) -> tally key, 1..capacity-1 (0 is the trash key). When every key is taken,
    the least recently used keys that the step does not use are spilled (`spill(indices)`)."""

    def __init__(self, capacity: int, spill: Callable[[list[Key], list[int]], None]) -> None:
        self.capacity, self._spill = capacity, spill
        self.of: dict[Key, int] = {}
        self.used_at: dict[int, int] = {}
        self.step = 0
        self.free = list(range(capacity - 1, TRASH_KEY, -1))

    def indices(self, keys: Sequence[Key]) -> np.ndarray:
        """Each key's index for this step (assigning, and spilling if need be)."""
        self.step += 1
        out = np.empty(len(keys), dtype=np.int64)
        for i, key in enumerate(keys):
            index = self.of.get(key)
            if index is None:
                if not self.free:
                    self._make_room()
                index = self.of[key] = self.free.pop()
            self.used_at[index] = self.step
            out[i] = index
        return out

    def _make_room(self) -> None:
        idle = sorted((at, index) for index, at in self.used_at.items() if at < self.step)
        if not idle:
            raise RuntimeError(f"one step holds more than {self.capacity - 1} tally keys")
        spilled = [index for _, index in idle[: max(1, len(idle) // 4)]]  # a quarter at once: rare
        owner = {index: key for key, index in self.of.items()}
        keys = [owner[index] for index in spilled]
        self._spill(keys, spilled)
        for key, index in zip(keys, spilled, strict=True):
            del self.of[key], self.used_at[index]
            self.free.append(index)

    def reset(self) -> None:
        self.of.clear()
        self.used_at.clear()
        self.free = list(range(self.capacity - 1, TRASH_KEY, -1))


class RoutingUsage:
    """The worker's capture: the MoE blocks, their device tallies, key places and spills."""

    def __init__(self, max_tokens: int, max_reqs: int) -> None:
        self.max_tokens = max_tokens
        self.blocks: dict[int, Any] = {}  # layer -> EmoSparseMoeBlock (routing, masks)
        self.tally: RoutingTally | None = None
        self.key_index = KeyIndex(max_reqs + 1 + SPARE_KEYS, self._spill)
        self.spilled: dict[Key, dict[str, torch.Tensor]] = {}

    def add_block(self, layer: int, block: Any) -> None:
        """Called for each MoE layer as the model is built."""
        self.blocks[layer] = block

    def build(self, token_rows: torch.Tensor | None) -> RoutingTally:
        """The device tallies, once every MoE layer is known (while the model is built, so on
        its device)."""
        if not self.blocks:
            raise ValueError("routing capture needs MoE layers, and this model (or pipeline stage) has none")
        tables = {i: b.subset_masks for i, b in self.blocks.items() if b.subset_masks is not None}
        on_cpu = torch.empty(0).device.type == "cpu"  # the device the model is being built on
        self.tally = RoutingTally({i: b.routing for i, b in self.blocks.items()}, max_tokens=self.max_tokens,
                                  keys=self.key_index.capacity, mask_tables=tables or None,
                                  token_rows=token_rows if tables else None,
                                  buffer_tokens=CPU_TALLY_TOKENS if on_cpu else 0)
        for layer in tables:  # each block's mask table becomes its row of the tally's stacked tables
            self.blocks[layer].subset_masks = self.tally.stacked_table(layer)
        return self.tally

    # -- inside the forward -------------------------------------------------------------------
    def record(self, layer: int, router_logits: torch.Tensor) -> None:
        assert self.tally is not None, "RoutingUsage.build runs when the model is built"
        self.tally.record(layer, router_logits)

    # -- between steps ------------------------------------------------------------------------
    def _spill(self, keys: list[Key], indices: list[int]) -> None:
        assert self.tally is not None
        taken = self.tally.take(indices)
        for k, key in enumerate(keys):
            mine = {name: t[k] for name, t in taken.items()}
            held = self.spilled.get(key)
            self.spilled[key] = mine if held is None else {name: held[name] + t for name, t in mine.items()}

    def drain(self) -> dict[str, Any]:
        """Every key's tallies since the last drain (keys with no tokens left out); then zero."""
        assert self.tally is not None
        layers = sorted(self.blocks)
        keys = list(self.key_index.of)
        if keys:  # every key on the device joins the spilled ones: one place to add them up
            self._spill(keys, [self.key_index.of[k] for k in keys])
        self.key_index.reset()
        per_key, self.spilled = self.spilled, {}
        out: list[dict[str, Any]] = []
        for (model, user), t in per_key.items():
            tokens = int(t["tokens"])
            if not tokens:
                continue
            mass: dict[int, list[float]] = {}
            counts: dict[int, list[int]] = {}
            for g, group in enumerate(self.tally.groups):
                for j, layer in enumerate(group.layers):
                    mass[layer] = t[f"mass{g}"][j].tolist()
                    counts[layer] = t[f"counts{g}"][j].tolist()
            out.append({"model": model, "user": user, "tokens": [tokens] * len(layers),
                        "mass": [mass[i] for i in layers], "counts": [counts[i] for i in layers],
                        "outside_sum": float(t["outside_sum"]), "outside_tokens": int(t["outside_tokens"]),
                        "hist": t["hist"].tolist()})
        return {"layers": layers, "bounds": list(OUTSIDE_BOUNDS), "keys": out}


_USAGE: RoutingUsage | None = None  # one model per worker process


def enable(max_tokens: int, max_reqs: int) -> RoutingUsage:
    """The worker's tallies, made when the model is built with capture on."""
    global _USAGE
    _USAGE = RoutingUsage(max_tokens, max_reqs)
    return _USAGE


def flush_tallies() -> None:
    """Tally the steps a CPU engine has buffered (`RoutingTally.flush`); a mask row must not
    change under them."""
    if _USAGE is not None and _USAGE.tally is not None:
        _USAGE.tally.flush()


def usage_of_worker() -> RoutingUsage:
    if _USAGE is None:
        raise RuntimeError(f"routing capture is off: start the engine with --additional-config "
                           f"'{{\"{USAGE_CONFIG}\": true}}'")
    return _USAGE


class UsageControl:
    """The worker's capture control calls (mixed into `emo_vllm.worker.EmoWorkerExtension`)."""

    model_runner: Any

    def emo_usage_attach(self) -> dict[str, Any]:
        """Make sure each step's tokens are attributed (idempotent; see `step_inputs`)."""
        usage = usage_of_worker()
        runner = attach_step_inputs(self.model_runner)
        return {"layers": sorted(usage.blocks), "runner": runner}

    def emo_usage_drain(self) -> dict[str, Any]:
        """The tallies since the last drain, per key; zeroed."""
        return usage_of_worker().drain()


__all__ = ["MODEL_ARG", "OUTSIDE_BOUNDS", "USAGE_CONFIG", "USER_ARG", "KeyIndex", "RoutingUsage", "UsageControl",
           "enable", "flush_tallies"]
