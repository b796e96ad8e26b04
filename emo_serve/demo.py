"""Generate EMO checkpoints with the released model's exact config schema and tensor names:
seeded random weights, sharded safetensors + index, and a byte-level BPE tokenizer trained
offline. The real-size preset (~28 GB bf16) streams to disk tensor by tensor.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import EmoConfig
from .files import staged_dir
from .safetensors_format import SafetensorsWriter, TensorSpec

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough for CI engines; head_dim 64 because vLLM's CPU attention rejects 16.
    "tiny": dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=2, intermediate_size=128,
                 num_experts=16, num_shared_experts=1, num_experts_per_tok=4, vocab_size=2048,
                 max_position_embeddings=2048, torch_dtype="float32", shards=2),
    # The shapes of allenai/Emo_1b14b_1T.
    "emo-1b14b": dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=16,
                      intermediate_size=1024, num_experts=128, num_shared_experts=1,
                      num_experts_per_tok=8, vocab_size=100352, max_position_embeddings=4096,
                      torch_dtype="bfloat16", shards=6),
}
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def demo_config(preset: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A `config.json` dict in the released schema; None-valued overrides are ignored."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    values.pop("shards", None)
    cfg: dict[str, Any] = {
        "model_type": "emo",
        "architectures": ["EmoForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_emo.EmoConfig",
                     "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM"},
        "num_key_value_heads": values.get("num_attention_heads"),
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "norm_topk_prob": False,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
    }
    cfg.update(values)
    EmoConfig.from_dict(cfg, source="demo config")  # fail early on inconsistent flags
    return cfg


def tensor_specs(config: dict[str, Any]) -> list[TensorSpec]:
    """Every tensor of the model, in model order."""
    cfg = EmoConfig.from_dict(config)
    dt = DTYPES[cfg.torch_dtype]
    h, hd = cfg.hidden_size, cfg.head_size
    specs = [TensorSpec("model.embed_tokens.weight", dt, (cfg.vocab_size, h))]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        specs += [
            TensorSpec(f"{p}.self_attn.q_proj.weight", dt, (cfg.num_attention_heads * hd, h)),
            TensorSpec(f"{p}.self_attn.k_proj.weight", dt, (cfg.kv_heads * hd, h)),
            TensorSpec(f"{p}.self_attn.v_proj.weight", dt, (cfg.kv_heads * hd, h)),
            TensorSpec(f"{p}.self_attn.o_proj.weight", dt, (h, cfg.num_attention_heads * hd)),
        ]
        if cfg.attention_bias:
            specs += [TensorSpec(f"{p}.self_attn.{x}_proj.bias", dt, (heads * hd,))
                      for x, heads in zip("qkv", (cfg.num_attention_heads, cfg.kv_heads, cfg.kv_heads))]
            specs.append(TensorSpec(f"{p}.self_attn.o_proj.bias", dt, (h,)))
        specs += [
            TensorSpec(f"{p}.pre_attention_layernorm.weight", dt, (h,)),
            TensorSpec(f"{p}.pre_feedforward_layernorm.weight", dt, (h,)),
        ]
        n = cfg.experts_per_layer[i]
        if n == 0:
            d = cfg.dense_intermediate_size or cfg.intermediate_size
            specs += _mlp_specs(f"{p}.mlp", dt, h, d, bias=cfg.dense_mlp_bias)
            continue
        specs.append(TensorSpec(f"{p}.mlp.gate.weight", dt, (n, h)))
        for e in range(n):
            specs += _mlp_specs(f"{p}.mlp.experts.{e}", dt, h, cfg.intermediate_size)
    specs.append(TensorSpec("model.norm.weight", dt, (h,)))
    if not cfg.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", dt, (cfg.vocab_size, h)))
    return specs


def _mlp_specs(prefix: str, dt: torch.dtype, h: int, d: int, bias: bool = False) -> list[TensorSpec]:
    specs = [TensorSpec(f"{prefix}.gate_proj.weight", dt, (d, h)),
             TensorSpec(f"{prefix}.up_proj.weight", dt, (d, h)),
             TensorSpec(f"{prefix}.down_proj.weight", dt, (h, d))]
    if bias:
        specs += [TensorSpec(f"{prefix}.gate_proj.bias", dt, (d,)),
                  TensorSpec(f"{prefix}.up_proj.bias", dt, (d,)),
                  TensorSpec(f"{prefix}.down_proj.bias", dt, (h,))]
    return specs


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Seeded per tensor name, so any shard can be generated on its own and in any order.

    Norms are ~1, routers get a larger scale than other matrices so routing is decisive (no
    near-ties between expert scores that float rounding could flip).
    """
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(spec.name.encode())) % 2**63)
    # In place: the float32 draw of the 100352 x 2048 embedding is 822 MB; no second copy.
    t = torch.randn(spec.shape, generator=gen)
    if spec.name.endswith("norm.weight"):
        t.mul_(0.1).add_(1.0)
    elif spec.name.endswith(".bias"):
        t.mul_(0.02)
    else:
        fan_in = spec.shape[-1]
        scale = 2.0 if spec.name.endswith("mlp.gate.weight") else 1.0
        t.mul_(scale / fan_in**0.5)
    return t.to(spec.dtype)


def shard_plan(specs: list[TensorSpec], shards: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into `shards` files of about equal bytes."""
    total = sum(s.nbytes for s in specs) or 1
    groups: list[list[TensorSpec]] = [[] for _ in range(shards)]
    offset = 0
    for s in specs:
        groups[min(shards - 1, offset * shards // total)].append(s)
        offset += s.nbytes
    return [g for g in groups if g]


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def write_sharded(out_dir: Path, groups: list[list[TensorSpec]], tensors: Iterator[tuple[str, torch.Tensor]],
                  *, desc: str) -> dict[str, Any]:
    """Write tensors (yielded in the order of `groups`) as shards + index into `out_dir`."""
    weight_map: dict[str, str] = {}
    total = sum(s.nbytes for g in groups for s in g)
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, leave=False) as bar:
        for i, group in enumerate(groups):
            name = shard_name(i, len(groups))
            with SafetensorsWriter(out_dir / name, group) as writer:
                for spec in group:
                    got_name, tensor = next(tensors)
                    writer.write(got_name, tensor)
                    del tensor  # may view a read buffer: don't pin it while the next one is read
                    weight_map[spec.name] = name
                    bar.update(spec.nbytes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def tokenizer_corpus() -> Iterator[str]:
    """Text shipped with the package (the trained demo model's example and held-out files, code,
    prose, legal text and maths) and generated arithmetic. Fixed data only: the tokenizer, and so
    a generated checkpoint's fingerprint and every manifest made on it, must not change when the
    package's code does."""
    data = resources.files("emo_serve") / "data" / "models"
    for folder in ("examples", "heldout"):
        for path in sorted((data / folder).iterdir(), key=lambda p: p.name):
            if path.name.endswith(".jsonl"):
                yield from (json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip())
    for a in range(0, 400, 7):
        yield " ".join(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for b in range(1, 30, 3))


def train_tokenizer(vocab_size: int, max_length: int, corpus: Iterable[str] | None = None
                    ) -> tuple[str, dict[str, Any]]:
    """A byte-level BPE tokenizer (tokenizer.json text) and its tokenizer_config.json, trained
    on `corpus` (default: `tokenizer_corpus()`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 8192), special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else tokenizer_corpus(), trainer=trainer)
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "model_max_length": max_length,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    }
    return tok.to_str(), tokenizer_config


def write_tokenizer(out_dir: Path, config: dict[str, Any], corpus: Iterable[str] | None = None) -> None:
    text, tok_config = train_tokenizer(config["vocab_size"], config["max_position_embeddings"], corpus)
    (out_dir / "tokenizer.json").write_text(text)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    im_end = json.loads(text)["model"]["vocab"].get("<|im_end|>")
    eos = [config["eos_token_id"]] + ([im_end] if im_end is not None else [])
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_demo_checkpoint(out_dir: str | Path, preset: str = "tiny", *, shards: int | None = None,
                          seed: int = 0, **overrides: Any) -> Path:
    """Write a demo checkpoint into `out_dir` (which must not exist); returns its path.

    Everything goes to a temporary sibling directory renamed into place at the end, so an
    interrupted run leaves nothing that looks like a checkpoint.
    """
    config = demo_config(preset, **overrides)
    n_shards = shards or PRESETS[preset]["shards"]
    if n_shards < 1:
        raise ValueError("--shards must be >= 1")
    specs = tensor_specs(config)
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp, config)
        tensors = ((s.name, random_tensor(s, seed)) for s in specs)
        write_sharded(tmp, shard_plan(specs, n_shards), tensors, desc=f"demo-model {Path(out_dir).name}")
    return Path(out_dir)

