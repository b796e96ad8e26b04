"""The EMO tensor schema: every tensor a config implies, with its name and shape, in model order.

One answer for the checkpoint reader (which checks a checkpoint's names and shapes against it),
the demo generator (which writes it) and the subset stream (which walks it), so a tensor the
config requires cannot be known to one of them and missing from another. Names follow the
released model (DESIGN.md): attention, the two norms, then the router and the experts of an MoE
layer or the plain MLP of a dense one.
"""

from __future__ import annotations

import torch

from .config import EmoConfig
from .errors import ConfigError
from .safetensors_format import TensorSpec

# Config (`torch_dtype`) and command-line names of the dtypes models are stored and computed in.
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Shape = tuple[int, ...]


def layer_tensor_shapes(cfg: EmoConfig, layer: int) -> dict[str, Shape]:
    """Name -> shape of decoder layer `layer`'s tensors (attention, norms, router and experts or
    the dense MLP), in model order."""
    p = f"model.layers.{layer}"
    h, hd = cfg.hidden_size, cfg.head_size
    heads = {"q": cfg.num_attention_heads, "k": cfg.kv_heads, "v": cfg.kv_heads}
    shapes: dict[str, Shape] = {f"{p}.self_attn.{x}_proj.weight": (n * hd, h) for x, n in heads.items()}
    shapes[f"{p}.self_attn.o_proj.weight"] = (h, cfg.num_attention_heads * hd)
    if cfg.attention_bias:
        shapes.update({f"{p}.self_attn.{x}_proj.bias": (n * hd,) for x, n in heads.items()})
        shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
    shapes[f"{p}.pre_attention_layernorm.weight"] = (h,)
    shapes[f"{p}.pre_feedforward_layernorm.weight"] = (h,)
    count = cfg.experts_per_layer[layer]
    if count == 0:
        shapes.update(_mlp_shapes(f"{p}.mlp", h, cfg.dense_intermediate_size or cfg.intermediate_size,
                                  bias=cfg.dense_mlp_bias))
        return shapes
    shapes[f"{p}.mlp.gate.weight"] = (count, h)
    for e in range(count):
        shapes.update(_mlp_shapes(f"{p}.mlp.experts.{e}", h, cfg.intermediate_size))
    return shapes


def _mlp_shapes(prefix: str, h: int, d: int, *, bias: bool = False) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {f"{prefix}.gate_proj.weight": (d, h), f"{prefix}.up_proj.weight": (d, h),
                                f"{prefix}.down_proj.weight": (h, d)}
    if bias:
        shapes.update({f"{prefix}.gate_proj.bias": (d,), f"{prefix}.up_proj.bias": (d,),
                       f"{prefix}.down_proj.bias": (h,)})
    return shapes


def tensor_shapes(cfg: EmoConfig) -> dict[str, Shape]:
    """Name -> shape of every tensor of the model, in model order."""
    h = cfg.hidden_size
    shapes: dict[str, Shape] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        shapes.update(layer_tensor_shapes(cfg, i))
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def tensor_specs(cfg: EmoConfig, dtype: torch.dtype | None = None) -> list[TensorSpec]:
    """Every tensor of the model as a `TensorSpec` (what a writer needs up front), in model order;
    `dtype` defaults to the config's `torch_dtype`."""
    if dtype is None:
        if cfg.torch_dtype not in DTYPES:
            raise ConfigError(f"torch_dtype {cfg.torch_dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[cfg.torch_dtype]
    return [TensorSpec(name, dtype, shape) for name, shape in tensor_shapes(cfg).items()]


def layer_tensor_names(cfg: EmoConfig, layer: int) -> list[str]:
    """Tensor names of decoder layer `layer`, in model order."""
    return list(layer_tensor_shapes(cfg, layer))


def expert_tensor_names(layer: int, expert: int) -> list[str]:
    return [f"model.layers.{layer}.mlp.experts.{expert}.{x}_proj.weight" for x in ("gate", "up", "down")]
