"""Live routing capture: which experts each model's and each user's tokens use, in the engine.

With `--additional-config '{"emo_usage": true}'` every MoE layer passes its router logits to
`capture_routing` (under torch.compile the custom op `torch.ops.vllm.emo_capture_routing`,
opaque, so its body runs eagerly every step), which adds, per request key (the front end's model
name and the OpenAI `user` from `vllm_xargs`), per layer and expert:

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
from vllm.logger import init_logger
from vllm.utils.torch_utils import direct_register_custom_op

from emo_serve.config import LayerRouting
from emo_serve.reference import route

from .runner_hook import extra_args, on_each_step

logger = init_logger("vllm.emo_vllm.usage")

# `--additional-config` key that turns capture on.
USAGE_CONFIG = "emo_usage"
# `vllm_xargs` fields the front end sets on every request: whose tokens these are.
MODEL_ARG = "emo_model"
USER_ARG = "emo_user"
# Upper bounds of the mass-outside histogram's buckets (the last catches the rest).
OUTSIDE_BOUNDS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def route_batched(logits: torch.Tensor, r: LayerRouting) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference.route` over any leading dims ([layers, tokens, experts]): (probs, weights).
    Always-active layers are left to `reference.route` (see `_Group`)."""
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
    """MoE layers that route alike (same experts, top-k, shared ids): captured as one tensor, so
    a step costs one set of ops per group rather than per layer."""

    def __init__(self, layers: list[int], blocks: list[Any], max_tokens: int) -> None:
        self.layers, self.blocks = layers, blocks
        self.routing: LayerRouting = blocks[0].routing
        # float32 whatever the model's dtype (vLLM builds models under that default dtype).
        self.logits = torch.zeros(len(layers), max_tokens, self.routing.num_experts, dtype=torch.float32)
        self.routed = torch.tensor(self.routing.routed_ids, dtype=torch.long)  # what a subset may drop
        self.masked = blocks[0].subset_masks is not None

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.routing.always_active:
            return route_batched(logits, self.routing)
        per_layer = [route(x, self.routing) for x in logits]
        return torch.stack([p.probs for p in per_layer]), torch.stack([p.weights for p in per_layer])


class RoutingUsage:
    """The worker's tallies, per key slot and MoE layer (engine-local expert ids).

    In the forward each MoE layer only copies its router logits into its group's buffer, at the
    step's place in a buffer of many steps' tokens; when that is full, before a mask row changes
    and before a drain, all buffered tokens of all layers are routed at once, as the reference
    does, and added to the tallies. Measured on the demo: routing each layer in its step cost 10 %
    of a batch-1 decode step, all layers once per step 5 %; buffered, a step only copies.
    """

    def __init__(self, max_tokens: int) -> None:
        # Buffered tokens: a step never holds more than max_tokens; a flush of that many costs
        # tens of ms on the demo, ~0.5 s for 8192 tokens at the 14B shape (bench/bench_routing.py).
        self.capacity = max_tokens
        self.token_keys = np.zeros(self.capacity, dtype=np.int64)
        self.token_rows = torch.zeros(self.capacity, dtype=torch.long)  # the mask row each token routed with
        self.pos = 0  # buffered tokens
        self._step: tuple[int, int] | None = None  # (offset, tokens) of the step being run, else None
        self.blocks: dict[int, Any] = {}  # layer -> EmoSparseMoeBlock (routing, masks)
        self.keys: dict[tuple[str, str], int] = {}
        self._groups: list[_Group] = []
        self._where: dict[int, tuple[_Group, int]] = {}
        self._last = -1
        self._bounds = torch.tensor(OUTSIDE_BOUNDS[:-1], dtype=torch.float64)
        self._capacity = 8
        self._reset()

    def add_block(self, layer: int, block: Any) -> None:
        """Called for each MoE layer as the model is built."""
        self.blocks[layer] = block
        alike: dict[tuple[Any, ...], list[int]] = {}
        for i in sorted(self.blocks):
            r = self.blocks[i].routing
            alike.setdefault((r.num_experts, r.top_k, r.num_shared, r.always_active, r.norm_topk_prob), []).append(i)
        self._groups = [_Group(ids, [self.blocks[i] for i in ids], self.capacity) for ids in alike.values()]
        self._where = {layer: (g, j) for g in self._groups for j, layer in enumerate(g.layers)}
        self._last = max(self.blocks)
        self._reset()

    def _reset(self) -> None:
        cap = self._capacity
        self.mass = [torch.zeros(len(g.layers), cap, g.routing.num_experts, dtype=torch.float64) for g in self._groups]
        self.counts = [torch.zeros(len(g.layers), cap, g.routing.num_experts, dtype=torch.long) for g in self._groups]
        self.tokens = torch.zeros(cap, dtype=torch.long)  # every MoE layer sees every token once
        self.outside_sum = torch.zeros(cap, dtype=torch.float64)
        self.outside_tokens = torch.zeros(cap, dtype=torch.long)
        self.hist = torch.zeros(cap, len(OUTSIDE_BOUNDS), dtype=torch.long)
        self.keys = {}

    def _grow(self) -> None:
        def wider(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] *= 2
            out = t.new_zeros(shape)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        self._capacity *= 2
        self.mass = [wider(t, 1) for t in self.mass]
        self.counts = [wider(t, 1) for t in self.counts]
        self.tokens, self.outside_sum = wider(self.tokens), wider(self.outside_sum)
        self.outside_tokens, self.hist = wider(self.outside_tokens), wider(self.hist)

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
        if self.pos + n > self.capacity:
            try:
                self.flush()
            except Exception:  # counting must never take the engine down: drop the buffer, say so
                logger.exception("routing capture: could not tally %d buffered tokens; dropped", self.pos)
                self.pos = 0
        self.token_keys[self.pos:self.pos + n] = slots[token_batch_rows]
        self._step = (self.pos, n)

    # -- inside the forward -------------------------------------------------------------------
    def capture(self, layer: int, router_logits: torch.Tensor) -> None:
        step, where = self._step, self._where.get(layer)
        if step is None or where is None or router_logits.shape[0] < step[1]:
            return
        (pos, n), (group, j) = step, where
        group.logits[j, pos:pos + n].copy_(router_logits[:n])
        if layer == self._last:
            rows = group.blocks[0].token_rows
            if rows is not None:
                self.token_rows[pos:pos + n].copy_(rows[:n])
            self.pos, self._step = pos + n, None

    # -- between steps ------------------------------------------------------------------------
    @torch.inference_mode()
    def flush(self) -> None:
        """Route every buffered token of every layer as the reference does and add them up.
        Must run before a mask row changes (the tokens were routed with the rows of their step)."""
        n, self.pos, self._step = self.pos, 0, None
        if n == 0:
            return
        keys = torch.from_numpy(self.token_keys[:n])
        rows = self.token_rows[:n]
        masked = bool((rows != 0).any())
        outside: torch.Tensor | None = None
        # Sums per key as one matmul per group: [keys, n] one-hot @ [layers, n, experts].
        used = len(self.keys)
        onehot = torch.zeros(used, n, dtype=torch.float32).index_put_(
            (keys, torch.arange(n)), torch.ones(n, dtype=torch.float32))
        for g, group in enumerate(self._groups):
            logits = group.logits[:, :n]
            probs, weights = group.route(logits)
            chosen = weights
            if group.masked and masked:
                masks = torch.stack([b.subset_masks for b in group.blocks]).float()
                mask = masks[:, rows]  # [layers, n, experts]
                chosen = group.route(logits + mask)[1]
                routed = weights.index_select(-1, group.routed).sum(-1).clamp_min(1e-30)
                share = ((weights * torch.isinf(mask)).sum(-1) / routed).sum(0).double()
                outside = share if outside is None else outside + share
            self.mass[g][:, :used] += torch.matmul(onehot, probs).double()
            self.counts[g][:, :used] += torch.matmul(onehot, (chosen > 0).float()).round().long()
        ones = torch.ones(n, dtype=torch.long)
        self.tokens.index_add_(0, keys, ones)
        if self._groups[0].masked:  # drift: the per-token share, averaged over MoE layers
            mean = (outside if outside is not None else torch.zeros(n, dtype=torch.float64)) / len(self.blocks)
            self.outside_sum.index_add_(0, keys, mean)
            self.outside_tokens.index_add_(0, keys, ones)
            self.hist.index_put_((keys, torch.bucketize(mean, self._bounds)), ones, accumulate=True)

    def drain(self) -> dict[str, Any]:
        """Every key's tallies since the last drain (keys with no tokens left out); then zero."""
        self.flush()
        layers = sorted(self.blocks)
        out: list[dict[str, Any]] = []
        for (model, user), slot in self.keys.items():
            tokens = int(self.tokens[slot])
            if not tokens:
                continue
            mass: dict[int, list[float]] = {}
            counts: dict[int, list[int]] = {}
            for g, group in enumerate(self._groups):
                for j, layer in enumerate(group.layers):
                    mass[layer] = self.mass[g][j, slot].tolist()
                    counts[layer] = self.counts[g][j, slot].tolist()
            out.append({"model": model, "user": user, "tokens": [tokens] * len(layers),
                        "mass": [mass[i] for i in layers], "counts": [counts[i] for i in layers],
                        "outside_sum": float(self.outside_sum[slot]),
                        "outside_tokens": int(self.outside_tokens[slot]), "hist": self.hist[slot].tolist()})
        self._reset()
        return {"layers": layers, "bounds": list(OUTSIDE_BOUNDS), "keys": out}


_USAGE: RoutingUsage | None = None  # one model per worker process


def enable(max_tokens: int) -> RoutingUsage:
    """The worker's tallies, made when the model is built with capture on."""
    global _USAGE
    _USAGE = RoutingUsage(max_tokens)
    return _USAGE


def flush_pending() -> None:
    """Tally buffered tokens now (before a mask row changes); nothing when capture is off."""
    if _USAGE is not None:
        _USAGE.flush()


def usage_of_worker() -> RoutingUsage:
    if _USAGE is None:
        raise RuntimeError(f"routing capture is off: start the engine with --additional-config "
                           f"'{{\"{USAGE_CONFIG}\": true}}'")
    return _USAGE


def capture_routing(router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    """Hand a MoE layer's router logits to the tallies; what the layer routes with next.

    Traced by torch.compile, it is the custom op (opaque, so its body runs every step). Eager,
    as the server runs engines (`--enforce-eager`), it is a plain call: going through the
    dispatcher and the op's defensive clone cost ~6 us a layer, a third of what capture added to
    a batch-1 decode step of the demo (bench/bench_capture_ab.py)."""
    if torch.compiler.is_compiling():
        return torch.ops.vllm.emo_capture_routing(router_logits, layer)
    return _tally(router_logits, layer)


def _tally(router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    if _USAGE is not None:
        _USAGE.capture(layer, router_logits)
    return router_logits


def _capture_routing(router_logits: torch.Tensor, layer: int) -> torch.Tensor:
    return _tally(router_logits, layer).clone()  # an op's output may not alias its input


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


__all__ = ["MODEL_ARG", "OUTSIDE_BOUNDS", "USAGE_CONFIG", "USER_ARG", "RoutingUsage", "UsageControl", "capture_routing",
           "enable"]
