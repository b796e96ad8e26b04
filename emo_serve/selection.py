"""From task examples to a subset: the one path `emo-serve profile` and `POST /v1/subsets` share.

A request says how the experts are ranked (`method`) and how many are kept: exactly one of a
size per layer, a fraction of each layer's routed experts, per-layer sizes, or a size chosen by
measured quality (`max_loss_increase`, `budget`; see `sizing`). `check` refuses what cannot be
done before any forward pass is spent on it; `build_subset` profiles, sizes and makes the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .checkpoint import Checkpoint
from .config import EmoConfig
from .errors import EmoServeError, SubsetError
from .examples import Source
from .profiler import Scores, profile, resolve_sizes
from .sizing import auto_subset, check_request
from .subset import SubsetSpec


@dataclass(frozen=True)
class SelectionRequest:
    """How to rank experts and how many to keep, plus where to compute."""

    method: str = "usage"
    size: int | None = None  # routed experts per layer
    fraction: float | None = None  # of each layer's routed experts
    sizes: tuple[int, ...] | None = None  # routed experts, per layer
    max_loss_increase: float | None = None  # relative perplexity (0.05 = +5 %)
    budget: int | None = None  # routed experts summed over layers
    folds: int = 5  # cross-validation folds of the quality-sized requests
    device: str = "cpu"
    dtype: str = "float32"
    max_tokens_per_example: int = 512
    seed: int = 0

    @property
    def by_quality(self) -> bool:
        """Sized by measured quality (`sizing.auto_subset`) rather than by a given count."""
        return self.max_loss_increase is not None or self.budget is not None

    def check(self, cfg: EmoConfig) -> None:
        """Raise (SubsetError, SizingError) for a request the base `cfg` cannot satisfy; the
        error's `param` names the sizing field that was given."""
        try:
            self._check(cfg)
        except EmoServeError as exc:
            exc.param = exc.param or self._sizing_field()
            raise

    def _sizing_field(self) -> str:
        fields = ("size", "fraction", "sizes", "max_loss_increase", "budget")
        given = [k for k in fields if getattr(self, k) is not None]
        return given[0] if len(given) == 1 else "size"

    def _check(self, cfg: EmoConfig) -> None:
        if self.by_quality:
            if any(x is not None for x in (self.size, self.fraction, self.sizes)):
                raise SubsetError("give exactly one of size, fraction, sizes, max_loss_increase or budget")
            check_request(cfg, max_loss_increase=self.max_loss_increase, budget=self.budget, method=self.method)
            return
        resolve_sizes(cfg.routed_counts(), size=self.size, fraction=self.fraction, sizes=self.sizes)
        if self.method == "layerwise" and self.sizes is not None:
            raise SubsetError("method 'layerwise' needs `size` or `fraction`, not per-layer `sizes`", param="method")

    def describe(self) -> dict[str, Any]:
        """What was asked for, as recorded on a subset while it is profiled (given values only)."""
        given = {"size": self.size, "fraction": self.fraction, "sizes": list(self.sizes) if self.sizes else None,
                 "max_loss_increase": self.max_loss_increase, "budget": self.budget}
        return {k: v for k, v in given.items() if v is not None}


@dataclass(frozen=True)
class Selected:
    """A built subset, and the scores behind it when one profiling run chose it (a quality-sized
    subset is chosen from several runs; its estimate is in `provenance.details["quality"]`)."""

    spec: SubsetSpec
    scores: Scores | None


def build_subset(ckpt: Checkpoint, examples: Source, request: SelectionRequest, *, name: str,
                 progress: bool = False) -> Selected:
    """Profile `examples` on `ckpt`, keep what `request` asks for, and return the subset `name`."""
    request.check(ckpt.config)
    common: dict[str, Any] = dict(method=request.method, device=request.device, dtype=request.dtype,
                                  max_tokens_per_example=request.max_tokens_per_example, seed=request.seed,
                                  progress=progress)
    if request.by_quality:
        spec = auto_subset(ckpt, examples, name=name, max_loss_increase=request.max_loss_increase,
                           budget=request.budget, folds=request.folds, **common)
        return Selected(spec, None)
    # `layerwise` chooses greedily layer by layer, so it needs the size up front.
    layerwise = None
    if request.method == "layerwise":
        layerwise = request.size if request.size is not None else request.fraction
    scores = profile(ckpt, examples, layerwise_size=layerwise, **common)
    spec = scores.to_subset(request.size, fraction=request.fraction, sizes=request.sizes, name=name, checkpoint=ckpt)
    return Selected(spec, scores)
