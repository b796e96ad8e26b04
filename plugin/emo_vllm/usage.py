"""Live routing capture: which experts each model's and each user's tokens use, in the engine.

With `--additional-config '{"emo_usage": true}'` every MoE layer passes its router logits through
one custom op (`torch.ops.vllm.emo_capture_routing`, opaque to torch.compile, so its body runs
eagerly every step) that adds, per request key (the front end's model name and the OpenAI `user`
from `vllm_xargs`), per layer and expert:

* `mass`: router probability as the reference routes (each part with its own softmax), from the
  *unmasked* logits: what the profiler's `usage` method sums;
* `counts`: tokens whose top-k held the expert, after the request's mask row (what the fused MoE
  ran; the profiler's `frequency` and the reference's choices);
* on engines with expert masks, each token's share of the unmasked routing's routed top-k weight
  that falls on experts its subset masks out (what the base router would have given them),
  averaged over MoE layers: the subset's drift, summed and bucketed (a histogram). The top-k
  weight rather than the whole softmax: the softmax's tail is spread over every expert whatever
  the text, and measured on the trained demo it hides the difference between in- and
  out-of-domain traffic (1.4x against 3x; docs/benchmarks/routing.md).

Why not vLLM's own capture (`enable_return_routed_experts`, the router's `set_capture_fn`): the
first needs Model Runner V2 (refused on the CPU runner) and both give top-k ids only, not the
probabilities the profiler ranks by nor the mass outside a subset.

The tallies live in the worker and are handed out (and zeroed) by a control call between steps
(`UsageControl.emo_usage_drain`), so a step never waits on the front end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from vllm.utils.torch_utils import direct_register_custom_op

from emo_serve.config import LayerRouting
from emo_serve.reference import route

from .runner_hook import extra_args, on_each_step

# `--additional-config` key that turns capture on.
USAGE_CONFIG = "emo_usage"
# `vllm_xargs` fields the front end sets on every request: whose tokens these are.
MODEL_ARG = "emo_model"
USER_ARG = "emo_user"
# Upper bounds of the mass-outside histogram's buckets (the last catches the rest).
OUTSIDE_BOUNDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


class RoutingUsage:
    """The worker's tallies: per key slot, per MoE layer (engine-local expert ids)."""

    def __init__(self, max_tokens: int) -> None:
        self.token_keys = np.zeros(max_tokens, dtype=np.int64)
        self.num_tokens = 0  # tokens of the step being run; 0 outside real steps (warm-up, dummy runs)
        self.blocks: dict[int, Any] = {}  # layer -> EmoSparseMoeBlock (routing, masks)
        self._routed: dict[int, torch.Tensor] = {}
        self.keys: dict[tuple[str, str], int] = {}
        self._outside_step = torch.zeros(max_tokens, dtype=torch.float64)
        self._bounds = torch.tensor(OUTSIDE_BOUNDS[:-1], dtype=torch.float64)
        self._reset(capacity=8)

    def add_block(self, layer: int, block: Any) -> None:
        self.blocks[layer] = block
        # The ids a subset may drop (not shared, not always active): the drift's denominator.
        self._routed[layer] = torch.tensor(block.routing.routed_ids, dtype=torch.long)
        self._reset(capacity=self._capacity)

    def _reset(self, capacity: int) -> None:
        self._capacity = capacity
        experts = {i: b.routing.num_experts for i, b in self.blocks.items()}
        self.mass = {i: torch.zeros(capacity, e, dtype=torch.float64) for i, e in experts.items()}
        self.counts = {i: torch.zeros(capacity, e, dtype=torch.long) for i, e in experts.items()}
        self.tokens = {i: torch.zeros(capacity, dtype=torch.long) for i in self.blocks}
        self.outside_sum = torch.zeros(capacity, dtype=torch.float64)
        self.outside_tokens = torch.zeros(capacity, dtype=torch.long)
        self.hist = torch.zeros(capacity, len(OUTSIDE_BOUNDS), dtype=torch.long)
        self.keys = {}

    def _grow(self) -> None:
        def wider(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((2 * t.shape[0], *t.shape[1:]))
            out[: t.shape[0]] = t
            return out

        self._capacity *= 2
        for table in (self.mass, self.counts, self.tokens):
            for layer in table:
                table[layer] = wider(table[layer])
        self.outside_sum, self.outside_tokens, self.hist = (wider(self.outside_sum), wider(self.outside_tokens),
                                                            wider(self.hist))

    # -- each step, before the forward (runner_hook) ------------------------------------------
    def fill(self, states: Sequence[Any], token_batch_rows: np.ndarray) -> None:
        slots = np.empty(len(states), dtype=np.int64)
        for i, state in enumerate(states):
            args = extra_args(state)
            key = (str(args.get(MODEL_ARG, "")), str(args.get(USER_ARG, "")))
            slot = self.keys.get(key)
            if slot is None:
                slot = self.keys[key] = len(self.keys)
                if slot >= self._capacity:
                    self._grow()
            slots[i] = slot
        n = len(token_batch_rows)
        self.token_keys[:n] = slots[token_batch_rows]
        self._outside_step[:n] = 0.0
        self.num_tokens = n

    # -- each MoE layer, inside the forward ---------------------------------------------------
    @torch.inference_mode()
    def capture(self, layer: int, router_logits: torch.Tensor) -> None:
        n = self.num_tokens
        block = self.blocks.get(layer)
        if n == 0 or block is None or router_logits.shape[0] < n:
            return
        routing: LayerRouting = block.routing
        keys = torch.from_numpy(self.token_keys[:n])
        logits = router_logits[:n].float()
        full = route(logits, routing)
        chosen = full
        table, rows = block.subset_masks, block.token_rows
        if table is not None and rows is not None and bool((rows[:n] != 0).any()):
            mask = table[rows[:n]]
            chosen = route(logits + mask, routing)
            routed = full.weights.index_select(1, self._routed[layer]).sum(-1).clamp_min(1e-30)
            self._outside_step[:n] += ((full.weights * torch.isinf(mask)).sum(-1) / routed).double()
        self.mass[layer].index_add_(0, keys, full.probs.double())
        self.counts[layer].index_add_(0, keys, (chosen.weights > 0).long())
        self.tokens[layer].index_add_(0, keys, torch.ones(n, dtype=torch.long))
        if layer == max(self.blocks):  # the step's last MoE layer: the per-token mean, once
            if table is not None:
                mean = self._outside_step[:n] / len(self.blocks)
                self.outside_sum.index_add_(0, keys, mean)
                self.outside_tokens.index_add_(0, keys, torch.ones(n, dtype=torch.long))
                self.hist.index_put_((keys, torch.bucketize(mean, self._bounds)),
                                     torch.ones(n, dtype=torch.long), accumulate=True)
            self.num_tokens = 0

    # -- control call, between steps ----------------------------------------------------------
    def drain(self) -> dict[str, Any]:
        """Every key's tallies since the last drain (keys with no tokens left out); then zero."""
        layers = sorted(self.blocks)
        out: list[dict[str, Any]] = []
        for (model, user), slot in self.keys.items():
            tokens = [int(self.tokens[i][slot]) for i in layers]
            if not any(tokens):
                continue
            out.append({"model": model, "user": user, "tokens": tokens,
                        "mass": [self.mass[i][slot].tolist() for i in layers],
                        "counts": [self.counts[i][slot].tolist() for i in layers],
                        "outside_sum": float(self.outside_sum[slot]),
                        "outside_tokens": int(self.outside_tokens[slot]),
                        "hist": self.hist[slot].tolist()})
        self._reset(capacity=self._capacity)
        return {"layers": layers, "bounds": list(OUTSIDE_BOUNDS), "keys": out}


_USAGE: RoutingUsage | None = None  # one model per worker process


def enable(max_tokens: int) -> RoutingUsage:
    """The worker's tallies, made when the model is built with capture on."""
    global _USAGE
    _USAGE = RoutingUsage(max_tokens)
    return _USAGE


def usage_of_worker() -> RoutingUsage:
    if _USAGE is None:
        raise RuntimeError(f"routing capture is off: start the engine with --additional-config "
                           f"'{{\"{USAGE_CONFIG}\": true}}'")
    return _USAGE


def _capture_routing(router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    if _USAGE is not None:
        _USAGE.capture(layer, router_logits)
    return router_logits.clone()


def _capture_routing_fake(router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(router_logits)


direct_register_custom_op("emo_capture_routing", _capture_routing, fake_impl=_capture_routing_fake)


class UsageControl:
    """The worker's capture control calls (mixed into `emo_vllm.worker.EmoWorkerExtension`)."""

    model_runner: Any

    def emo_usage_attach(self) -> dict[str, Any]:
        """Hook the runner so each step's tokens are attributed (idempotent)."""
        usage = usage_of_worker()
        on_each_step(self.model_runner, "usage", usage.fill)
        return {"layers": sorted(usage.blocks)}

    def emo_usage_drain(self) -> dict[str, Any]:
        """The tallies since the last drain, per key; zeroed."""
        return usage_of_worker().drain()


__all__ = ["MODEL_ARG", "OUTSIDE_BOUNDS", "USAGE_CONFIG", "USER_ARG", "RoutingUsage", "UsageControl", "enable"]
