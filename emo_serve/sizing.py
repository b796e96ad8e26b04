"""Choose a subset's size from a quality tolerance or an expert budget, measured honestly.

- `max_loss_increase`: the smallest uniform size (routed experts per layer) whose relative
  perplexity increase over the base stays within the tolerance;
- `budget`: a total of routed experts summed over layers, allocated layer by layer greedily:
  from the full model, each round removes experts from the layer where that costs least.

Quality is estimated by k-fold cross-validation over the examples: experts are ranked on the
other folds and the subset is scored on the held-out fold, so the estimate does not reward a
subset for fitting the very text it was chosen on. With one example that is impossible; the
estimate is then in-sample and says so. The final subset is profiled on all examples.

Sizing assumes that more experts never cost quality (true of the base's own routing in
expectation, not exactly): the search for the smallest size is exhaustive for small layers and a
k-ary search beyond `per_pass` sizes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import BaseModel, Field

from .checkpoint import Checkpoint
from .config import EmoConfig
from .errors import EmoServeError
from .evaluate import SequenceStats, Totals, evaluate_experts, relative_increase
from .examples import Example, Source, ensure_examples, tokenize_examples
from .profiler import Scores, profile, resolve_sizes
from .subset import SubsetSpec


class SizingError(EmoServeError):
    """No subset meets the request (tolerance or budget), or the request is malformed."""


class Candidate(BaseModel):
    sizes: list[int]
    relative_change: float
    accuracy_change: float  # points


class QualityEstimate(BaseModel):
    """What the chosen size is expected to cost, and how that was measured (in `provenance.details`)."""

    estimate: Literal["k-fold", "in-sample"]
    folds: int
    examples: int
    tokens: int  # tokens scored across the held-out folds
    method: str  # the profiling method ranking the experts
    max_loss_increase: float | None = None
    budget: int | None = None
    sizes: list[int]  # routed experts kept per layer
    relative_change: float  # perplexity: exp(ΔNLL) − 1
    accuracy_change: float  # next-token top-1, points
    agreement: float  # top-1 agreement with the base
    base_perplexity: float
    perplexity: float
    candidates: list[Candidate] = Field(default_factory=list)  # every size measured on the way


class _Folds:
    """The examples split into k folds, each with its ranking of experts and held-out tokens."""

    def __init__(self, ckpt: Checkpoint, items: list[Example], folds: int, method: str, *,
                 device: str | torch.device, dtype: torch.dtype | str, max_tokens: int, seed: int,
                 progress: bool) -> None:
        self.ckpt, self.method, self.progress = ckpt, method, progress
        self.device, self.dtype, self.max_tokens, self.seed = device, dtype, max_tokens, seed
        # folds <= 1 asks for in-sample scoring on purpose (the budget's greedy rounds).
        self.in_sample = len(items) == 1 or folds <= 1
        k = 1 if self.in_sample else min(folds, len(items))
        self.splits = ([(items, items)] if self.in_sample else
                       [([e for i, e in enumerate(items) if i % k != f], items[f::k]) for f in range(k)])
        self.heldout = [tokenize_examples(ckpt, test, max_tokens)[0] for _, test in self.splits]
        self._scores: dict[tuple[int, tuple[int, ...] | None], Scores] = {}

    @property
    def label(self) -> Literal["k-fold", "in-sample"]:
        return "in-sample" if self.in_sample else "k-fold"

    def scores(self, fold: int, sizes: Sequence[int]) -> Scores:
        """The fold's expert ranking; `layerwise` depends on the size, the others do not."""
        key = (fold, tuple(sizes) if self.method == "layerwise" else None)
        if key not in self._scores:
            layerwise_size = None
            if self.method == "layerwise":
                moe = {s for s in sizes if s}
                if len(moe) != 1:
                    raise SizingError("method 'layerwise' needs one size for every layer; "
                                      "use 'usage' for per-layer budgets")
                layerwise_size = moe.pop()
            self._scores[key] = profile(self.ckpt, self.splits[fold][0], method=self.method,
                                        layerwise_size=layerwise_size, progress=False, device=self.device,
                                        dtype=self.dtype, max_tokens_per_example=self.max_tokens, seed=self.seed)
        return self._scores[key]

    def measure(self, candidates: Sequence[Sequence[int]]) -> tuple[Totals, list[Totals]]:
        """Held-out totals of the base and of each candidate (routed sizes per layer), summed over
        folds; one layer-streamed pass per fold scores all candidates together."""
        cfg = self.ckpt.config
        base_all: list[SequenceStats] = []
        sub_all: list[list[SequenceStats]] = [[] for _ in candidates]
        for fold, sequences in enumerate(self.heldout):
            experts = []
            for sizes in candidates:
                top = self.scores(fold, sizes).top(sizes)
                experts.append([cfg.layer_routing(i).kept_ids(ids) for i, ids in enumerate(top)])
            base, subs = evaluate_experts(self.ckpt, sequences, experts, dtype=self.dtype,
                                          device=self.device, progress=self.progress)
            base_all += base
            for acc, per_seq in zip(sub_all, subs):
                acc += per_seq
        return Totals.of(base_all), [Totals.of(s) for s in sub_all]


def _candidate(sizes: Sequence[int], sub: Totals, base: Totals) -> Candidate:
    return Candidate(sizes=list(sizes), relative_change=relative_increase(sub, base),
                     accuracy_change=100 * (sub.accuracy - base.accuracy))


def _estimate(folds: _Folds, sizes: list[int], sub: Totals, base: Totals, candidates: list[Candidate], *,
              max_loss_increase: float | None = None, budget: int | None = None) -> QualityEstimate:
    return QualityEstimate(
        estimate=folds.label, folds=len(folds.splits), examples=sum(len(t) for _, t in folds.splits),
        tokens=base.tokens, method=folds.method, sizes=sizes,
        relative_change=relative_increase(sub, base), accuracy_change=100 * (sub.accuracy - base.accuracy),
        agreement=sub.agreement, base_perplexity=math.exp(base.mean_nll), perplexity=math.exp(sub.mean_nll),
        candidates=sorted(candidates, key=lambda c: sum(c.sizes)), max_loss_increase=max_loss_increase,
        budget=budget)


def smallest_size(folds: _Folds, routed: Sequence[int], tolerance: float, per_pass: int = 8
                  ) -> tuple[list[int], QualityEstimate]:
    """The smallest uniform size within `tolerance`; keeping every routed expert is the base
    itself, so the search is over smaller sizes and fails if none of them qualifies."""
    full = max(routed)
    uniform = lambda k: [min(k, n) for n in routed]  # noqa: E731 - a size as per-layer sizes
    measured: dict[int, tuple[Totals, Totals]] = {}
    bad, good = 0, full  # invariant: sizes <= bad fail (0 trivially), size `good` passes
    while good - bad > 1:
        inside = list(range(bad + 1, good))
        step = max(1, math.ceil(len(inside) / per_pass))
        trial = inside[::step][:per_pass]
        base, subs = folds.measure([uniform(k) for k in trial])
        for k, sub in zip(trial, subs):
            measured[k] = (sub, base)
        passing = [k for k in trial if relative_increase(measured[k][0], base) <= tolerance]
        good = min(passing, default=good)
        bad = max([k for k in trial if k < good and k not in passing], default=bad)
    candidates = [_candidate(uniform(k), s, b) for k, (s, b) in sorted(measured.items())]
    if good == full:
        tried = ", ".join(f"{c.sizes[0]}: {c.relative_change:+.1%}" for c in candidates[-3:])
        raise SizingError(
            f"no subset smaller than the base stays within a {tolerance:.1%} perplexity increase "
            f"({folds.label}; relative change by routed experts per layer: {tried}); "
            "raise max_loss_increase or give more examples")
    sub, base = measured[good]
    return uniform(good), _estimate(folds, uniform(good), sub, base, candidates, max_loss_increase=tolerance)


def check_budget(routed: Sequence[int], budget: int) -> None:
    """Refuse a budget outside one routed expert per MoE layer .. all of them (`routed`: each
    layer's count of routed experts)."""
    moe = [n for n in routed if n]
    if not len(moe) <= budget <= sum(routed):
        raise SizingError(f"budget {budget}: needs between {len(moe)} (one routed expert per MoE layer) "
                          f"and {sum(routed)} (all of them)", param="budget")


def check_request(cfg: EmoConfig, *, max_loss_increase: float | None, budget: int | None, method: str) -> None:
    """Raise SizingError for a request `auto_subset` cannot do, before any work is spent on it
    (the server answers 400 instead of failing the subset later)."""
    if (max_loss_increase is None) == (budget is None):
        raise SizingError("give exactly one of max_loss_increase or budget")
    if max_loss_increase is not None and (isinstance(max_loss_increase, bool) or not max_loss_increase >= 0):
        raise SizingError(f"max_loss_increase {max_loss_increase} must be a number >= 0 (0.05 = +5 % perplexity)")
    if method == "random":
        raise SizingError("method 'random' ranks no expert by the examples; choose another method", param="method")
    if budget is not None:
        if method == "layerwise":
            raise SizingError("method 'layerwise' keeps one size for every layer; use 'usage' with a budget",
                              param="method")
        check_budget(cfg.routed_counts(), budget)


def allocate_budget(folds: _Folds, routed: Sequence[int], budget: int, *, max_rounds: int = 16,
                    measure_on: Callable[[Sequence[Sequence[int]]], tuple[Totals, list[Totals]]] | None = None
                    ) -> list[int]:
    """Per-layer sizes summing to `budget`, pruned greedily from the full model: each round tries
    removing `step` experts (the lowest ranked) from every layer, all tries in one streamed pass,
    and keeps the removal that raises the loss least. Pruning from the top measures every
    marginal loss against a nearly intact model, where growing from one expert per layer would
    judge each layer against others that are still broken."""
    check_budget(routed, budget)
    moe = [i for i, n in enumerate(routed) if n]
    measure = measure_on or folds.measure
    sizes = list(routed)
    step = max(1, math.ceil((sum(routed) - budget) / max_rounds))
    while sum(sizes) > budget:
        cut = min(step, sum(sizes) - budget)
        tries = []
        for i in moe:
            if sizes[i] > 1:
                s = list(sizes)
                s[i] = max(1, s[i] - cut)
                tries.append(s)
        _, subs = measure(tries)
        sizes = tries[min(range(len(tries)), key=lambda j: (subs[j].mean_nll, j))]
    return sizes


def auto_subset(checkpoint: Checkpoint | str | os.PathLike[str], examples: Source, *, name: str,
                max_loss_increase: float | None = None, budget: int | None = None, method: str = "usage",
                folds: int = 5, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                max_tokens_per_example: int = 512, seed: int = 0, progress: bool = True) -> SubsetSpec:
    """A subset sized by `max_loss_increase` (relative perplexity) or by `budget` (routed experts
    summed over layers), with its quality estimate in `provenance.details["quality"]`."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    cfg = ckpt.config
    check_request(cfg, max_loss_increase=max_loss_increase, budget=budget, method=method)
    items = ensure_examples(examples)
    routed = cfg.routed_counts()
    def split(k: int) -> _Folds:
        return _Folds(ckpt, items, k, method, device=device, dtype=dtype, max_tokens=max_tokens_per_example,
                      seed=seed, progress=progress)

    cv = split(folds)
    if max_loss_increase is not None:
        sizes, estimate = smallest_size(cv, routed, max_loss_increase)
    else:
        assert budget is not None
        resolve_sizes(routed, sizes=[1 if n else 0 for n in routed])  # fails early on odd configs
        whole = split(1)  # in-sample: the greedy rounds rank every removal on all examples
        sizes = allocate_budget(cv, routed, budget, measure_on=whole.measure)
        base, (sub,) = cv.measure([sizes])
        estimate = _estimate(cv, sizes, sub, base, [_candidate(sizes, sub, base)], budget=budget)
    layerwise_size = sizes[next(i for i, n in enumerate(routed) if n)] if method == "layerwise" else None
    scores = profile(ckpt, items, method=method, layerwise_size=layerwise_size, progress=progress,
                     device=device, dtype=dtype, max_tokens_per_example=max_tokens_per_example, seed=seed)
    moe_sizes = {s for s in sizes if s}
    spec = (scores.to_subset(moe_sizes.pop(), name=name, checkpoint=ckpt) if len(moe_sizes) == 1
            else scores.to_subset(sizes=sizes, name=name, checkpoint=ckpt))
    spec.provenance.details["quality"] = estimate.model_dump(mode="json")
    return spec
