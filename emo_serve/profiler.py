"""Rank a checkpoint's experts from a few task examples and turn the ranking into a subset.

The base model runs one decoder layer at a time through `reference` (the same forward the tests
and `eval` trust): all examples go through a layer, its weights are dropped, and the activations
are carried to the next, so peak memory is about one layer plus activations whatever the model's
size, and a remote base (`hf://`, `http://`) is read by byte range like a local one.

Methods (per layer, per expert; all are means over the examples' tokens, so layers compare):

- `usage`: router probability, each part (routed / shared) with its own softmax as the model
  routes;
- `frequency`: share of tokens whose top-k holds the expert;
- `layerwise`: `usage` of layer l with layers < l already restricted to their chosen experts
  (greedy, as the EMO repository selects); needs the kept size up front;
- `easy_ep`: EASY-EP (arXiv 2504.06792): g_{i,t}·‖E_i(h_t)‖·(1 − cos(h_t, h_t + MoE(h_t))), with
  h_t the layer's normed MoE input and g the combine weight;
- `random`: seeded uniform scores (no forward pass): the baseline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, PrivateAttr, ValidationError

from . import reference
from .checkpoint import Checkpoint
from .config import EmoConfig, LayerRouting
from .errors import EmoServeError, SubsetError
from .examples import Source, ensure_examples, tokenize_examples
from .files import atomic_write_text
from .layers import ComputeError, as_device, as_dtype, stream_layers
from .methods import METHODS
from .subset import BaseRef, Provenance, SubsetSpec, make_subset

SCORES_FORMAT: Final = "emo-scores/v1"


class ProfileError(EmoServeError):
    """Profiling was asked for something it cannot do (method, device, dtype, size)."""


class Scores(BaseModel):
    """Per-layer, per-expert scores of one profiling run (empty lists for dense layers)."""

    format: Literal["emo-scores/v1"] = SCORES_FORMAT
    method: str
    base: BaseRef
    scores: list[list[float]]
    counts: list[list[int]]  # tokens whose top-k included the expert
    tokens: list[int]  # tokens scored at each layer
    routed: list[list[int]]  # ids a subset may choose from (not shared / always-active)
    shared: list[list[int]]  # ids every subset keeps
    example_fingerprints: list[str]
    example_tokens: list[int]  # after truncation
    warnings: list[str] = Field(default_factory=list)
    seed: int = 0
    dtype: str = "float32"
    kept: list[list[int]] | None = None  # layerwise: the routed experts chosen greedily
    sizes: list[int] | None = None  # layerwise: the sizes those choices were made for

    _checkpoint: Checkpoint | None = PrivateAttr(default=None)

    # -- choosing experts ----------------------------------------------------------------------
    def top(self, sizes: Sequence[int]) -> list[list[int]]:
        """The `sizes[layer]` best routed experts per layer (ties: lower id first)."""
        if self.kept is not None:
            if list(sizes) != self.sizes:
                raise SubsetError(
                    f"layerwise scores were made for sizes {_short(self.sizes)}, not "
                    f"{_short(list(sizes))}: the choice at each layer depends on the earlier ones, "
                    "so profile again with the size you want"
                )
            return [list(k) for k in self.kept]
        return [sorted(sorted(ids, key=lambda e: (-s[e], e))[:k])
                for ids, s, k in zip(self.routed, self.scores, sizes)]

    def resolve_sizes(self, size: int | None = None, fraction: float | None = None,
                      sizes: Sequence[int] | None = None) -> list[int]:
        return resolve_sizes([len(r) for r in self.routed], size=size, fraction=fraction, sizes=sizes)

    def to_subset(self, size: int | None = None, *, fraction: float | None = None, name: str,
                  sizes: Sequence[int] | None = None, checkpoint: Checkpoint | None = None) -> SubsetSpec:
        """A subset spec keeping the top routed experts per layer plus the shared ones.

        Give exactly one of `size` (K per layer), `fraction` (of each layer's routed experts,
        rounded, at least 1) or `sizes` (per layer). The base is `checkpoint`, else the one
        profiled, else re-opened from `base.location` (headers only); its fingerprint must match.
        """
        per_layer = self.resolve_sizes(size, fraction, sizes)
        ckpt = checkpoint or self._checkpoint or Checkpoint(self.base.location)
        if ckpt.fingerprint != self.base.fingerprint:
            raise SubsetError(f"scores were made for base {self.base.fingerprint}, "
                              f"but {ckpt.location} has {ckpt.fingerprint}")
        moe_sizes = {k for k, r in zip(per_layer, self.routed) if r}
        provenance = Provenance(
            method=self.method,
            size=size if size is not None else (moe_sizes.pop() if len(moe_sizes) == 1 else per_layer),
            fraction=fraction,
            seed=self.seed if self.method == "random" else None,
            example_fingerprints=self.example_fingerprints,
            details={"examples": len(self.example_fingerprints), "tokens": sum(self.example_tokens),
                     "dtype": self.dtype, "warnings": self.warnings},
        )
        return make_subset(ckpt, self.top(per_layer), name, provenance)

    # -- persistence ---------------------------------------------------------------------------
    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Scores:
        try:
            text = Path(path).read_bytes()  # pydantic reports bad UTF-8 as it does bad JSON
        except OSError as exc:
            raise ProfileError(f"{path}: cannot read scores ({exc.strerror})") from None
        return cls.parse(text, source=os.fspath(path))

    @classmethod
    def parse(cls, text: str | bytes, *, source: str) -> Scores:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'scores'}: {e['msg']}"
                                for e in exc.errors())
            raise ProfileError(f"{source}: not a scores file ({details})") from None


def _short(sizes: list[int] | None) -> str:
    if sizes and len(set(sizes)) == 1:
        return str(sizes[0])
    return str(sizes)


def resolve_sizes(routed_counts: Sequence[int], *, size: int | None = None, fraction: float | None = None,
                  sizes: Sequence[int] | None = None) -> list[int]:
    """Routed experts to keep per layer (0 where a layer has none to choose from)."""
    given = [x is not None for x in (size, fraction, sizes)]
    if sum(given) != 1:
        raise SubsetError("give exactly one of size, fraction or per-layer sizes")
    if fraction is not None:
        if isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
            raise SubsetError(f"fraction {fraction} must be in (0, 1]")
        return [max(1, min(n, math.floor(fraction * n + 0.5))) if n else 0 for n in routed_counts]
    if size is not None:
        sizes = [size if n else 0 for n in routed_counts]
        label = f"size {size}"
    else:
        sizes = list(sizes or ())
        label = "sizes"
        if len(sizes) != len(routed_counts):
            raise SubsetError(f"sizes lists {len(sizes)} layers, the base has {len(routed_counts)}")
    for layer, (k, n) in enumerate(zip(sizes, routed_counts)):
        if isinstance(k, bool) or not isinstance(k, int):
            raise SubsetError(f"{label}: layer {layer}: expected an integer, got {k!r}")
        if n and not 1 <= k <= n:
            raise SubsetError(f"{label}: layer {layer} has {n} routed experts, keep 1..{n} (got {k})")
        if not n and k:
            raise SubsetError(f"{label}: layer {layer} has no routed experts to keep (got {k})")
    return list(sizes)


# -- profiling ---------------------------------------------------------------------------------
class _Tally:
    """Float64 sums per layer: score, top-k count and tokens (accumulated across examples)."""

    def __init__(self, cfg: EmoConfig, device: torch.device) -> None:
        n = cfg.experts_per_layer
        self.sums = [torch.zeros(e, dtype=torch.float64, device=device) for e in n]
        self.counts = [torch.zeros(e, dtype=torch.long, device=device) for e in n]
        self.tokens = [0] * len(n)

    def add(self, layer: int, per_token: torch.Tensor, routing: reference.Routing) -> None:
        """`per_token` [T, E]: the method's score of each token for each expert."""
        self.sums[layer] += per_token.double().sum(0)
        self.counts[layer] += (routing.weights > 0).sum(0)
        self.tokens[layer] += per_token.shape[0]

    def means(self) -> list[list[float]]:
        return [(s / t).tolist() if t else [0.0] * len(s) for s, t in zip(self.sums, self.tokens)]


def _easy_ep(w: reference.LayerWeights, h: torch.Tensor, routing: reference.Routing) -> torch.Tensor:
    """EASY-EP's per-token expert importance [T, E] from the experts' own outputs on h."""
    norms = torch.zeros_like(routing.weights)
    out = torch.zeros_like(h)
    for e in routing.weights.any(0).nonzero().flatten().tolist():
        rows = routing.weights[:, e].nonzero().flatten()
        y = reference.expert(h[rows], w, e)
        norms[rows, e] = y.float().norm(dim=-1)
        out.index_add_(0, rows, routing.weights[rows, e, None].to(h.dtype) * y)  # MoE(h), as `moe`
    change = 1.0 - F.cosine_similarity(h.float(), (h + out).float(), dim=-1)
    return routing.weights * norms * change[:, None]


def _probe_ids(r: LayerRouting) -> list[int]:
    """The cheapest restriction of a layer (its shared experts only, else one routed expert):
    used while the full routing is recomputed from the hook's input, so scoring a layer
    does not run all of its experts twice."""
    return r.shared_ids or r.routed_ids[:1]


@torch.inference_mode()
def profile(checkpoint: Checkpoint | str | os.PathLike[str], examples: Source, *, method: str = "usage",
            device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
            max_tokens_per_example: int = 512, seed: int = 0, layerwise_size: int | float | None = None,
            progress: bool = True) -> Scores:
    """Score every expert of every layer on `examples` (a file path, a list, or `Example`s).

    `layerwise_size` is the routed experts kept per layer (int) or a fraction of them (float),
    needed by `layerwise` only. Deterministic for the same inputs and settings.
    """
    if method not in METHODS:
        raise ProfileError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    try:
        dt, dev = as_dtype(dtype), as_device(device)
    except ComputeError as exc:  # the profiler's own error, whatever part of it refused
        raise ProfileError(str(exc)) from None
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    cfg = ckpt.config
    items = ensure_examples(examples)
    routing = [cfg.layer_routing(i) for i in range(cfg.num_hidden_layers)]
    routed = [r.routed_ids for r in routing]
    sizes = None
    if method == "layerwise":
        if layerwise_size is None:
            raise ProfileError("method 'layerwise' needs the kept size (an int, or a fraction as a float)")
        counts = [len(r) for r in routed]
        sizes = (resolve_sizes(counts, fraction=layerwise_size) if isinstance(layerwise_size, float)
                 else resolve_sizes(counts, size=layerwise_size))
    sequences, warnings = tokenize_examples(ckpt, items, max_tokens_per_example)

    tally = _Tally(cfg, dev)
    kept: list[list[int]] | None = None
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        scores = [torch.rand(n, generator=gen, dtype=torch.float64).tolist() for n in cfg.experts_per_layer]
    else:
        kept = _run_layers(ckpt, sequences, method, tally, dt, dev, sizes, routed, progress)
        scores = tally.means()
    result = Scores(
        method=method,
        base=BaseRef(location=ckpt.location, fingerprint=ckpt.fingerprint),
        scores=scores,
        counts=[c.tolist() for c in tally.counts],
        tokens=tally.tokens,
        routed=routed,
        shared=[r.shared_ids for r in routing],
        example_fingerprints=[ex.fingerprint for ex in items],
        example_tokens=[len(s) for s in sequences],
        warnings=warnings,
        seed=seed,
        dtype=str(dt).removeprefix("torch."),
        kept=kept,
        sizes=sizes,
    )
    result._checkpoint = ckpt
    return result


def _score_hook(method: str, tally: _Tally, w: reference.LayerWeights,
                layer_routing: LayerRouting) -> reference.RoutingHook:
    """The hook that adds one sequence's per-token scores of a layer to `tally`."""
    if method == "layerwise":
        def layerwise(layer: int, h: torch.Tensor, _: reference.Routing) -> None:
            # The layer ran restricted to a cheap probe (see `_probe_ids`); score its full routing.
            full = reference.route(F.linear(h, w["gate"]), layer_routing)
            tally.add(layer, full.probs, full)
        return layerwise
    per_token: Callable[[torch.Tensor, reference.Routing], torch.Tensor] = {
        "usage": lambda h, r: r.probs,
        "frequency": lambda h, r: (r.weights > 0).double(),
        "easy_ep": lambda h, r: _easy_ep(w, h, r),
    }[method]

    def hook(layer: int, h: torch.Tensor, routing: reference.Routing) -> None:
        tally.add(layer, per_token(h, routing), routing)
    return hook


def _run_layers(ckpt: Checkpoint, sequences: list[torch.Tensor], method: str, tally: _Tally,
                dtype: torch.dtype, device: torch.device, sizes: list[int] | None,
                routed: list[list[int]], progress: bool) -> list[list[int]] | None:
    """Stream the model layer by layer, scoring each MoE layer; returns layerwise's choices."""
    cfg = ckpt.config
    hidden = reference.embed(ckpt, sequences, dtype=dtype, device=device)
    kept: list[list[int]] = []
    for layer, w in stream_layers(ckpt, dtype=dtype, device=device,
                                  desc=f"profiling ({method})" if progress else None):
        r = cfg.layer_routing(layer)
        hook = None if r.is_dense else _score_hook(method, tally, w, r)
        if method == "layerwise" and not r.is_dense:
            assert sizes is not None
            probe = reference.keep_mask(cfg, layer, _probe_ids(r)).to(device)
            for x in hidden:
                reference.decoder_layer(x, w, cfg, layer, probe, hook)
            sums = tally.sums[layer].tolist()
            choice = sorted(sorted(routed[layer], key=lambda e: (-sums[e], e))[: sizes[layer]])
            kept.append(choice)
            mask = reference.keep_mask(cfg, layer, r.kept_ids(choice)).to(device)
            hidden = [reference.decoder_layer(x, w, cfg, layer, mask) for x in hidden]
        else:
            kept.append([])
            hidden = [reference.decoder_layer(x, w, cfg, layer, None, hook) for x in hidden]
        del hook
    return kept if method == "layerwise" else None
