"""The transformers config class for `model_type: "emo"`, registered by the plugin.

Released EMO checkpoints point `auto_map` at Hub code (`configuration_emo.EmoConfig`). With
this class registered under "emo", transformers resolves the config locally: an explicitly
registered, non-transformers class wins over `auto_map`, so no remote code is fetched or run
and `trust_remote_code` can stay off.

Only the fields vLLM itself reads are declared; the EMO-specific keys (`num_shared_experts`,
`num_experts_per_layer`, `always_active_experts`, `emo_subset`, ...) are kept as attributes
and interpreted once by `emo_serve.config.EmoConfig` (see `EmoConfig.routing_config`).
"""

from __future__ import annotations

from typing import Any

from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


class EmoConfig(PreTrainedConfig):
    model_type = "emo"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 100352
    hidden_size: int = 2048
    intermediate_size: int = 1024
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_experts: int = 128
    num_experts_per_tok: int = 8
    num_shared_experts: int = 0
    norm_topk_prob: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        super().__post_init__(**kwargs)

    def routing_config(self):  # -> emo_serve.config.EmoConfig
        """The emo-serve view of this config: per-layer expert counts, shared experts, capped
        top-k and always-active ids, validated exactly as the reference forward reads them."""
        from emo_serve.config import EmoConfig as RoutingConfig

        data = self.to_dict()
        data["model_type"] = "emo"
        theta = (self.rope_parameters or {}).get("rope_theta")
        if theta is not None:
            data["rope_theta"] = theta
        data.pop("rope_parameters", None)
        data.pop("dtype", None)
        return RoutingConfig.from_dict(data, source=f"{self.name_or_path or 'EMO'} config.json")


__all__ = ["EmoConfig"]
