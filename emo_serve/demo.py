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

from .config import EmoConfig
from .files import staged_dir
from .safetensors_format import TensorSpec
from .schema import tensor_specs
from .shards import shard_plan, write_sharded

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
    specs = tensor_specs(EmoConfig.from_dict(config, source="demo config"))
    with staged_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_tokenizer(tmp, config)
        tensors = ((s.name, random_tensor(s, seed)) for s in specs)
        write_sharded(tmp, shard_plan(specs, n_shards), tensors, desc=f"demo-model {Path(out_dir).name}")
    return Path(out_dir)

