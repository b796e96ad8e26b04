"""The EMO model config (`config.json`, `model_type: "emo"`) and its per-layer routing facts.

The released checkpoints carry one global expert count; pruned checkpoints and emo-serve
subsets carry per-layer counts (`num_experts_per_layer`). Everything that depends on the layer
(expert count, shared count, top-k, always-active ids, dense or MoE) is answered here once, so
the reference forward, the profiler, the exporter and the vLLM plugin agree on it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from .errors import ConfigError


@dataclass(frozen=True)
class LayerRouting:
    """How one decoder layer routes tokens.

    `num_experts == 0` means a dense layer (plain MLP, no router). Shared experts are the last
    `num_shared` expert indices. `top_k` is already capped at the layer's expert count.
    """

    num_experts: int
    num_shared: int
    top_k: int
    norm_topk_prob: bool
    always_active: tuple[int, ...] = ()

    @property
    def is_dense(self) -> bool:
        return self.num_experts == 0

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def routed_top_k(self) -> int:
        """Experts picked from the routed part when shared experts are split off."""
        return self.top_k - self.num_shared

    @property
    def shared_ids(self) -> list[int]:
        """Ids every subset must keep: the shared experts and any always-active ones (none at a
        dense layer, which has no experts)."""
        return sorted(set(range(self.num_routed, self.num_experts)) | set(self.always_active))

    @property
    def routed_ids(self) -> list[int]:
        """Ids a subset chooses from: every expert not in `shared_ids` (none at a dense layer)."""
        keep = set(self.shared_ids)
        return [e for e in range(self.num_experts) if e not in keep]

    def kept_ids(self, routed: Iterable[int]) -> list[int]:
        """The sorted ids a subset keeps when it chooses `routed`: those plus `shared_ids`. A dense
        layer keeps nothing whatever is asked (a flat id list given for every layer reaches it)."""
        if self.is_dense:
            return []
        return sorted(set(routed) | set(self.shared_ids))


class EmoConfig(BaseModel):
    """Validated view of an EMO `config.json`; unknown keys are kept as they are."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model_type: str = "emo"
    architectures: list[str] = ["EmoForCausalLM"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 0
    norm_topk_prob: bool = False
    num_experts_per_layer: list[int] | None = None
    num_shared_experts_per_layer: list[int] | None = None
    always_active_experts: list[int] | None = None
    always_active_experts_per_layer: list[list[int]] | None = None
    dense_intermediate_size: int | None = None
    dense_mlp_bias: bool = False
    torch_dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @model_validator(mode="after")
    def _check(self) -> EmoConfig:
        n = self.num_hidden_layers
        for key in (
            "num_experts_per_layer",
            "num_shared_experts_per_layer",
            "always_active_experts_per_layer",
        ):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise ValueError(f"{key} has {len(value)} entries, num_hidden_layers is {n}")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError("hidden_size is not divisible by num_attention_heads")
        if self.num_attention_heads % self.kv_heads:
            raise ValueError("num_attention_heads is not a multiple of num_key_value_heads")
        if self.num_experts_per_tok < 1:
            raise ValueError("num_experts_per_tok must be >= 1")
        # Per-layer counts may fall below these (pruned layers cap them); the global ones may not.
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds num_experts {self.num_experts}")
        if not 0 <= self.num_shared_experts <= self.num_experts:
            raise ValueError(f"num_shared_experts {self.num_shared_experts} is not in 0..num_experts "
                             f"({self.num_experts})")
        if any(c < 0 for c in self.experts_per_layer):
            raise ValueError("num_experts_per_layer entries must be >= 0")
        if any(c == 0 for c in self.experts_per_layer) and not self.dense_intermediate_size:
            raise ValueError("a dense layer (0 experts) needs dense_intermediate_size")
        for layer in range(n):
            self.layer_routing(layer)  # raises on inconsistent per-layer values
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config.json") -> EmoConfig:
        """Validate a parsed `config.json`; errors name the file and the offending key."""
        if data.get("model_type") != "emo":
            raise ConfigError(f"{source}: model_type is {data.get('model_type')!r}, expected 'emo'")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {validation_details(exc)}") from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def experts_per_layer(self) -> list[int]:
        if self.num_experts_per_layer is not None:
            return list(self.num_experts_per_layer)
        return [self.num_experts] * self.num_hidden_layers

    def layer_routing(self, layer: int) -> LayerRouting:
        """Routing of `layer`, with the defaults DESIGN.md describes."""
        count = self.experts_per_layer[layer]
        if count == 0:
            return LayerRouting(0, 0, 0, False)
        if self.num_shared_experts_per_layer is not None:
            shared = self.num_shared_experts_per_layer[layer]
        else:
            shared = min(self.num_shared_experts, count)
        if self.always_active_experts_per_layer is not None:
            always = tuple(self.always_active_experts_per_layer[layer])
        else:
            always = tuple(self.always_active_experts or ())
        top_k = min(self.num_experts_per_tok, count)
        where = f"layer {layer}"
        if not 0 <= shared <= count:
            raise ValueError(f"{where}: {shared} shared experts but {count} experts")
        if any(not 0 <= e < count for e in always):
            raise ValueError(f"{where}: always-active expert ids {list(always)} out of range 0..{count - 1}")
        if len(set(always)) != len(always) or len(always) > top_k:
            raise ValueError(f"{where}: always-active ids {list(always)} repeat or exceed top-k {top_k}")
        if not always and shared:
            if self.norm_topk_prob:
                raise ValueError(f"{where}: norm_topk_prob is not supported with shared experts")
            if top_k < shared:
                raise ValueError(f"{where}: top-k {top_k} is smaller than the {shared} shared experts")
        return LayerRouting(count, shared, top_k, self.norm_topk_prob, always)

    def routed_counts(self) -> list[int]:
        """Routed experts a subset can choose from, per layer (0 for a dense layer)."""
        return [len(self.layer_routing(i).routed_ids) for i in range(self.num_hidden_layers)]

    def moe_layers(self) -> list[int]:
        return [i for i, c in enumerate(self.experts_per_layer) if c > 0]


def validation_details(exc: ValidationError) -> str:
    """pydantic's errors as `key: message; ...`, without its "Value error, " noise."""
    parts = []
    for e in exc.errors():
        msg = e["msg"].removeprefix("Value error, ")
        loc = ".".join(str(p) for p in e["loc"])
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)
