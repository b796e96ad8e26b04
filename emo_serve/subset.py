"""The subset spec: which experts of a base checkpoint to keep, per layer, as a JSON manifest.

Expert `j` of the subset is original expert `experts[layer][j]`; ids are sorted, so the shared
experts (the last ids of the base) stay last and keep their separate softmax. The manifest
records the base's fingerprint so it can't silently be applied to another checkpoint.
"""

from __future__ import annotations

import hashlib
import os
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from .config import EmoConfig, validation_details
from .errors import SubsetError
from .files import atomic_write_text
from .names import validate_name

if TYPE_CHECKING:  # only annotations: the manifest itself needs no tensor reader (nor torch)
    from .checkpoint import Checkpoint

SUBSET_FORMAT: Final = "emo-subset/v1"
MANIFEST_FILE = "subset.json"


class BaseRef(BaseModel):
    location: str
    fingerprint: str


class Provenance(BaseModel):
    """How the subset was made; free-form details (scores, quality estimates) go in `details`."""

    method: str = "explicit"
    size: int | list[int] | None = None
    fraction: float | None = None
    seed: int | None = None
    example_fingerprints: list[str] = Field(default_factory=list)
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    details: dict[str, Any] = Field(default_factory=dict)


class SubsetSpec(BaseModel):
    format: Literal["emo-subset/v1"] = SUBSET_FORMAT
    name: str
    base: BaseRef
    experts: list[list[int]]
    provenance: Provenance = Field(default_factory=Provenance)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        try:
            return validate_name(v)
        except SubsetError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("experts")
    @classmethod
    def _experts(cls, v: list[list[int]]) -> list[list[int]]:
        for layer, ids in enumerate(v):
            if len(set(ids)) != len(ids):
                dup = sorted({i for i in ids if ids.count(i) > 1})
                raise ValueError(f"layer {layer}: duplicate expert ids {dup}")
            if any(i < 0 for i in ids):
                raise ValueError(f"layer {layer}: negative expert id")
        return [sorted(ids) for ids in v]

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SubsetSpec:
        try:
            text = Path(path).read_bytes()  # pydantic reports bad UTF-8 as it does bad JSON
        except OSError as exc:
            raise SubsetError(f"{path}: cannot read subset manifest ({exc.strerror})") from None
        return cls.parse(text, source=str(path))

    @classmethod
    def parse(cls, text: str | bytes, *, source: str = "subset manifest") -> SubsetSpec:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise SubsetError(f"{source}: {validation_details(exc)}") from None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    # -- against the base ----------------------------------------------------------------------
    def check_against(self, ckpt: Checkpoint, *, check_fingerprint: bool = True) -> None:
        """Raise SubsetError unless this spec fits `ckpt` layer by layer."""
        if check_fingerprint and self.base.fingerprint != ckpt.fingerprint:
            raise SubsetError(
                f"subset {self.name!r} was made for a checkpoint with fingerprint "
                f"{self.base.fingerprint}, but {ckpt.location} has {ckpt.fingerprint}"
            )
        check_experts(self.experts, ckpt.config, where=f"subset {self.name!r}")

    def subset_config(self, base: EmoConfig) -> dict[str, Any]:
        """The config of the model this subset defines (see DESIGN.md, "A subset keeps ...")."""
        check_experts(self.experts, base, where=f"subset {self.name!r}")
        counts = [len(ids) for ids in self.experts]
        cfg = base.to_dict()
        cfg.pop("auto_map", None)
        routing = [base.layer_routing(i) for i in range(base.num_hidden_layers)]
        cfg["num_experts_per_layer"] = counts
        cfg["num_experts"] = max(counts)
        cfg["num_shared_experts_per_layer"] = [r.num_shared for r in routing]
        cfg["num_experts_per_tok"] = min(base.num_experts_per_tok, max(counts))
        cfg.pop("always_active_experts", None)
        if any(r.always_active for r in routing):
            cfg["always_active_experts_per_layer"] = [
                [ids.index(a) for a in r.always_active] for ids, r in zip(self.experts, routing)
            ]
        cfg["emo_subset"] = {
            "name": self.name,
            "base": self.base.model_dump(),
            "experts": self.experts,
            "base_num_experts_per_layer": base.experts_per_layer,
        }
        return cfg


def check_experts(experts: list[list[int]], cfg: EmoConfig, *, where: str) -> None:
    if len(experts) != cfg.num_hidden_layers:
        raise SubsetError(
            f"{where}: lists experts for {len(experts)} layers, the base has {cfg.num_hidden_layers}"
        )
    for layer, ids in enumerate(experts):
        r = cfg.layer_routing(layer)
        if r.is_dense:
            if ids:
                raise SubsetError(f"{where}: layer {layer} is dense and has no experts to keep")
            continue
        bad = [i for i in ids if not 0 <= i < r.num_experts]
        if bad:
            raise SubsetError(f"{where}: layer {layer}: expert ids {bad} out of range 0..{r.num_experts - 1}")
        required = set(r.shared_ids)
        missing = sorted(required - set(ids))
        if missing:
            raise SubsetError(f"{where}: layer {layer}: shared/always-active experts {missing} must be kept")
        if len(ids) == len(required) and r.num_routed > 0 and not set(ids) - required:
            raise SubsetError(f"{where}: layer {layer}: keeps no routed expert")


def make_subset(ckpt: Checkpoint, routed: list[list[int]], name: str,
                provenance: Provenance | None = None) -> SubsetSpec:
    """A validated spec keeping `routed[layer]` plus the shared experts of every MoE layer."""
    cfg = ckpt.config
    if len(routed) != cfg.num_hidden_layers:
        raise SubsetError(f"expert lists for {len(routed)} layers, the base has {cfg.num_hidden_layers}")
    for layer, ids in enumerate(routed):
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if list(ids).count(i) > 1})
            raise SubsetError(f"layer {layer}: duplicate expert ids {dup}")
    experts = [cfg.layer_routing(i).kept_ids(ids) for i, ids in enumerate(routed)]
    try:
        spec = SubsetSpec(
            name=name,
            base=BaseRef(location=ckpt.location, fingerprint=ckpt.fingerprint),
            experts=experts,
            provenance=provenance or Provenance(),
        )
    except ValidationError as exc:
        raise SubsetError(validation_details(exc)) from None
    spec.check_against(ckpt)
    return spec


def random_subset(ckpt: Checkpoint, size: int, name: str, seed: int = 0) -> SubsetSpec:
    """`size` routed experts per layer drawn at random (seeded): the baseline of the profiler."""
    rng = random.Random(seed)
    cfg = ckpt.config
    routed = []
    for layer in range(cfg.num_hidden_layers):
        pool = cfg.layer_routing(layer).routed_ids
        if pool and not 0 < size <= len(pool):
            raise SubsetError(f"--random {size}: layer {layer} has {len(pool)} routed experts")
        routed.append(sorted(rng.sample(pool, size)) if pool else [])
    return make_subset(ckpt, routed, name, Provenance(method="random", size=size, seed=seed))


def union_specs(specs: list[SubsetSpec], name: str) -> SubsetSpec:
    """Per layer, the union of the experts kept by subsets of one base (a multi-domain subset)."""
    if not specs:
        raise SubsetError("union needs at least one subset")
    first = specs[0]
    for spec in specs[1:]:
        if spec.base.fingerprint != first.base.fingerprint:
            raise SubsetError(f"subsets {first.name!r} and {spec.name!r} have different bases "
                              f"({first.base.fingerprint} vs {spec.base.fingerprint})")
        if len(spec.experts) != len(first.experts):
            raise SubsetError(f"subsets {first.name!r} and {spec.name!r} list different numbers of layers")
    experts = [sorted(set().union(*layer)) for layer in zip(*(s.experts for s in specs))]
    fingerprints = list(dict.fromkeys(f for s in specs for f in s.provenance.example_fingerprints))
    provenance = Provenance(method="union", example_fingerprints=fingerprints,
                            details={"parts": [s.name for s in specs]})
    return SubsetSpec(name=validate_name(name), base=first.base, experts=experts, provenance=provenance)


def examples_fingerprint(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]
