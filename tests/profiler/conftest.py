"""Fixtures of the profiler tests: a checkpoint with planted domain experts and a 16-layer, >1 GB
checkpoint for the memory bound (both written once per session by the project's own generator)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Two "domains" whose texts share almost no tokens: arithmetic and English prose.
DOMAIN_TEXTS = {
    "math": ["12 + 34 = 46. 7 * 8 = 56. 90 - 45 = 45. 100 / 4 = 25.",
             "3 * 3 = 9. 81 / 9 = 9. 15 + 27 = 42. 64 - 16 = 48."],
    "prose": ["The quick brown fox jumps over the lazy dog while the cat sleeps.",
              "A long walk along the quiet river made the tired children happy."],
}
# Experts the router is made to prefer for each domain's tokens (same ids at every layer).
PLANTED = {"math": [2, 5, 9], "prose": [0, 7, 12]}


@dataclass(frozen=True)
class Planted:
    path: Path
    experts: dict[str, list[int]]
    texts: dict[str, list[str]]


@pytest.fixture(scope="session")
def planted_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    """The tiny preset (15 routed experts + shared id 15, top-4 = 3 routed) rewritten so that
    every token of a domain's texts embeds along that domain's direction u_d (scaled far above
    what the layers add, so the residual stream keeps it through all layers) and the router rows
    of the domain's planted experts are u_d: those tokens route to exactly those experts."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from emo_serve.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("planted") / "planted", "tiny", seed=3, shards=1)
    shard = path / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    cfg = json.loads((path / "config.json").read_text())
    ids = {d: {i for t in texts for i in tok.encode(t).ids} for d, texts in DOMAIN_TEXTS.items()}
    common = ids["math"] & ids["prose"]
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(cfg["hidden_size"], 2, generator=gen))  # orthonormal directions
    embed = tensors["model.embed_tokens.weight"]
    for k, domain in enumerate(DOMAIN_TEXTS):
        embed[sorted(ids[domain] - common)] = 300.0 * u[:, k]
        for layer in range(cfg["num_hidden_layers"]):
            tensors[f"model.layers.{layer}.mlp.gate.weight"][PLANTED[domain]] = u[:, k]
    save_file(tensors, shard, metadata={"format": "pt"})
    return Planted(path, PLANTED, DOMAIN_TEXTS)


BIG_OVERRIDES = dict(num_hidden_layers=16, hidden_size=512, intermediate_size=512, num_attention_heads=8,
                     num_experts=20, num_shared_experts=1, num_experts_per_tok=4, vocab_size=2048,
                     torch_dtype="float32")


@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 layers of ~67 MB (float32, 20 experts of width 512): 1.07 GB in all."""
    from emo_serve.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("big") / "big16", "tiny", shards=4, **BIG_OVERRIDES)
