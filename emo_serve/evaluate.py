"""What a subset costs: the base and its subsets scored side by side on held-out task text.

The base checkpoint is streamed one decoder layer at a time through `reference` (the forward
the tests and the profiler trust). A subset is a keep mask on the same weights, so each layer
is read once and the base and every subset advance through it together: evaluating several
subsets of the 28 GB model needs about one layer of weights plus activations.

Per model: mean next-token negative log-likelihood and perplexity, next-token top-1 accuracy,
top-1 agreement with the base, and for subsets the relative change vs the base, the router
mass kept per layer (the share of the base router's probability, on the examples' own routing
through the base, that falls on the kept routed experts) and parameters/bytes vs the base.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from . import reference
from .checkpoint import Checkpoint
from .config import EmoConfig
from .errors import EmoServeError
from .examples import Source, ensure_examples, tokenize_examples
from .layers import as_device, as_dtype, stream_layers
from .stream import subset_sizes
from .subset import BaseRef, SubsetSpec

EVAL_FORMAT: Final = "emo-eval/v1"
Experts = Sequence[Sequence[int]]  # kept original ids per layer (incl. shared), as in a manifest


class EvalError(EmoServeError):
    """Evaluation was asked for something it cannot do (no predictable tokens, bad subset)."""


@dataclass
class SequenceStats:
    """Sums over one sequence's predicted tokens (positions 1..T-1), for one model."""

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0
    agree: int = 0
    mass: list[float] = field(default_factory=list)  # per layer: summed kept router mass
    routed_tokens: list[int] = field(default_factory=list)  # per layer: tokens behind `mass`


@dataclass
class Totals:
    """Token-weighted sums over several sequences of one model (what folds and reports add up)."""

    tokens: int = 0
    nll: float = 0.0
    correct: int = 0
    agree: int = 0
    mass: list[float] = field(default_factory=list)
    routed_tokens: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, stats: Sequence[SequenceStats]) -> Totals:
        t = cls()
        for s in stats:
            t.tokens += s.tokens
            t.nll += s.nll
            t.correct += s.correct
            t.agree += s.agree
            t.mass = [a + b for a, b in zip(t.mass, s.mass)] if t.mass else list(s.mass)
            t.routed_tokens = ([a + b for a, b in zip(t.routed_tokens, s.routed_tokens)]
                               if t.routed_tokens else list(s.routed_tokens))
        return t

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens if self.tokens else math.nan

    @property
    def agreement(self) -> float:
        return self.agree / self.tokens if self.tokens else math.nan

    def router_mass(self) -> list[float | None]:
        return [m / n if n else None for m, n in zip(self.mass, self.routed_tokens)]


def relative_increase(sub: Totals, base: Totals) -> float:
    """Relative perplexity change, exp(ΔNLL) − 1, on the same tokens (0 for equal models)."""
    return math.expm1(sub.mean_nll - base.mean_nll)


# -- the streamed pass -------------------------------------------------------------------------
def _mass_hook(cfg: EmoConfig, layer: int, experts: Sequence[Experts], out: list[SequenceStats]
               ) -> reference.RoutingHook:
    """On the base's routing of one sequence, add each subset's kept share of routed mass."""
    choosable = cfg.layer_routing(layer).routed_ids
    kept = [[e for e in subset[layer] if e in set(choosable)] for subset in experts]

    def hook(i: int, h: torch.Tensor, routing: reference.Routing) -> None:
        probs = routing.probs[:, choosable].double()
        total = probs.sum(-1).clamp(min=1e-30)
        for stats, ids in zip(out, kept):
            share = routing.probs[:, ids].double().sum(-1) / total
            stats.mass[layer] += float(share.sum())
            stats.routed_tokens[layer] += h.shape[0]

    return hook


@torch.inference_mode()
def evaluate_experts(ckpt: Checkpoint, sequences: Sequence[torch.Tensor], subsets: Sequence[Experts], *,
                     dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu",
                     progress: bool = False) -> tuple[list[SequenceStats], list[list[SequenceStats]]]:
    """Stats of the base and of each subset (kept ids per layer) on each sequence, in one
    layer-streamed pass. Returns (base per sequence, [subset][sequence])."""
    dt, dev = as_dtype(dtype), as_device(device)
    cfg = ckpt.config
    n_layers = cfg.num_hidden_layers
    masks = [[m.to(dev) if m is not None else None for m in reference.keep_masks(cfg, s)] for s in subsets]
    hidden = reference.embed(ckpt, sequences, dtype=dt, device=dev)
    states = [list(hidden) for _ in range(1 + len(subsets))]  # [model][sequence]; model 0 = base
    sub_stats = [[SequenceStats(mass=[0.0] * n_layers, routed_tokens=[0] * n_layers) for _ in sequences]
                 for _ in subsets]
    desc = f"evaluating base + {len(subsets)} subset(s)" if progress else None
    for layer, w in stream_layers(ckpt, dtype=dt, device=dev, desc=desc):
        moe = not cfg.layer_routing(layer).is_dense
        for i, x in enumerate(states[0]):
            hook = _mass_hook(cfg, layer, subsets, [s[i] for s in sub_stats]) if moe and subsets else None
            states[0][i] = reference.decoder_layer(x, w, cfg, layer, None, hook)
        for m, keep in enumerate(masks, start=1):
            states[m] = [reference.decoder_layer(x, w, cfg, layer, keep[layer]) for x in states[m]]
    base_stats, base_top = [], []
    for ids, x in zip(sequences, states[0]):
        stats, top = _score(ckpt, ids.to(dev), x, None, dt)
        base_stats.append(stats)
        base_top.append(top)
    for m, per_seq in enumerate(sub_stats, start=1):
        for i, (ids, x) in enumerate(zip(sequences, states[m])):
            stats, _ = _score(ckpt, ids.to(dev), x, base_top[i], dt)
            per_seq[i].tokens, per_seq[i].nll = stats.tokens, stats.nll
            per_seq[i].correct, per_seq[i].agree = stats.correct, stats.agree
        states[m] = []
    return base_stats, sub_stats


def _score(ckpt: Checkpoint, ids: torch.Tensor, hidden: torch.Tensor, base_top: torch.Tensor | None,
           dtype: torch.dtype) -> tuple[SequenceStats, torch.Tensor]:
    """Next-token stats of one sequence from its last hidden states; one sequence's logits at a
    time, so a 100k vocabulary never holds all examples' logits at once."""
    logits = reference.final_logits(ckpt, [hidden], dtype=dtype)[0][:-1].float()
    target = ids[1:]
    top = logits.argmax(-1)
    stats = SequenceStats(
        tokens=int(target.numel()),
        nll=float(F.cross_entropy(logits, target, reduction="sum").double()) if target.numel() else 0.0,
        correct=int((top == target).sum()),
        agree=int((top == base_top).sum()) if base_top is not None else int(target.numel()),
    )
    return stats, top


# -- the report --------------------------------------------------------------------------------
class ModelEval(BaseModel):
    """One model's numbers on the examples (the base has no subset fields)."""

    name: str
    nll: float
    perplexity: float
    accuracy: float
    agreement: float
    relative_change: float = 0.0  # perplexity vs the base: exp(ΔNLL) − 1
    accuracy_change: float = 0.0  # points (×100) vs the base
    experts: list[int] = Field(default_factory=list)  # kept per layer, incl. shared
    routed_experts: list[int] = Field(default_factory=list)  # kept routed per layer
    router_mass: list[float | None] = Field(default_factory=list)
    params: int
    bytes: int
    params_fraction: float = 1.0
    bytes_fraction: float = 1.0


class EvalReport(BaseModel):
    format: Literal["emo-eval/v1"] = EVAL_FORMAT
    base_ref: BaseRef
    examples: int
    tokens: int  # predicted tokens (positions after the first of each example)
    example_fingerprints: list[str]
    warnings: list[str] = Field(default_factory=list)
    dtype: str
    base: ModelEval
    subsets: list[ModelEval]

    def table(self) -> str:
        """A fixed-width table for terminals."""
        head = (f"{'model':<28} {'routed/layer':>12} {'ppl':>9} {'Δppl':>8} {'acc':>6} {'Δacc':>6} "
                f"{'agree':>6} {'mass':>6} {'bytes':>7}")
        rows = [head, "-" * len(head)]
        for m in [self.base, *self.subsets]:
            routed = "all" if m is self.base else _compact(m.routed_experts)
            masses = [x for x in m.router_mass if x is not None]
            mass = f"{sum(masses) / len(masses):.3f}" if masses else "1.000"
            rows.append(f"{m.name[:28]:<28} {routed:>12} {m.perplexity:>9.3f} {m.relative_change:>+8.1%} "
                        f"{m.accuracy:>6.1%} {m.accuracy_change:>+6.1f} {m.agreement:>6.1%} {mass:>6} "
                        f"{m.bytes_fraction:>7.1%}")
        rows.append(f"{self.examples} examples, {self.tokens} predicted tokens, {self.dtype}; Δacc in points, "
                    "mass = mean share of the base router's routed probability on kept experts")
        return "\n".join(rows)


def _compact(sizes: Sequence[int]) -> str:
    moe = [s for s in sizes if s]
    return str(moe[0]) if moe and len(set(moe)) == 1 else ",".join(map(str, sizes))


def _model_eval(name: str, totals: Totals, base: Totals, sizes: dict[str, int]) -> ModelEval:
    return ModelEval(
        name=name, nll=totals.mean_nll, perplexity=math.exp(totals.mean_nll), accuracy=totals.accuracy,
        agreement=totals.agreement, relative_change=relative_increase(totals, base),
        accuracy_change=100 * (totals.accuracy - base.accuracy),
        params=sizes["subset_params"], bytes=sizes["subset_bytes"],
        params_fraction=sizes["subset_params"] / sizes["base_params"],
        bytes_fraction=sizes["subset_bytes"] / sizes["base_bytes"],
    )


def evaluate(base: Checkpoint | str | os.PathLike[str], subsets: Sequence[SubsetSpec], examples: Source, *,
             device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
             max_tokens_per_example: int = 512, progress: bool = True) -> EvalReport:
    """Score the base and every subset (manifests made for this base) on `examples`."""
    ckpt = base if isinstance(base, Checkpoint) else Checkpoint(base)
    cfg = ckpt.config
    for spec in subsets:
        spec.check_against(ckpt)
    items = ensure_examples(examples)
    sequences, warnings = tokenize_examples(ckpt, items, max_tokens_per_example)
    if sum(len(s) - 1 for s in sequences) < 1:
        raise EvalError("the examples have no token to predict (each needs at least 2 tokens)")
    base_seq, sub_seq = evaluate_experts(ckpt, sequences, [s.experts for s in subsets], dtype=dtype,
                                         device=device, progress=progress)
    base_totals = Totals.of(base_seq)
    total_bytes = ckpt.total_tensor_bytes
    total_params = sum(t.numel for t in ckpt.tensors.values())
    full = {"subset_params": total_params, "subset_bytes": total_bytes,
            "base_params": total_params, "base_bytes": total_bytes}
    base_eval = _model_eval("base", base_totals, base_totals, full)
    base_eval.experts = list(cfg.experts_per_layer)
    base_eval.routed_experts = cfg.routed_counts()
    results = []
    for spec, per_seq in zip(subsets, sub_seq):
        totals = Totals.of(per_seq)
        result = _model_eval(spec.name, totals, base_totals, subset_sizes(ckpt, spec))
        result.experts = [len(ids) for ids in spec.experts]
        result.routed_experts = [len(set(ids) & set(cfg.layer_routing(i).routed_ids))
                                 for i, ids in enumerate(spec.experts)]
        result.router_mass = totals.router_mass()
        results.append(result)
    return EvalReport(
        base_ref=BaseRef(location=ckpt.location, fingerprint=ckpt.fingerprint),
        examples=len(items), tokens=base_totals.tokens,
        example_fingerprints=[ex.fingerprint for ex in items], warnings=warnings,
        dtype=str(as_dtype(dtype)).removeprefix("torch."), base=base_eval, subsets=results,
    )

