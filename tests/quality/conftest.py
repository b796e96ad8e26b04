"""Fixtures of the quality tests: planted checkpoints whose right subset size is known.

A planted checkpoint is the tiny demo model edited so that, at every layer, the router sends
all of its routed probability to a chosen set of `dominant` experts: hidden dimension 0 of the
residual stream is held at a constant (embeddings set it, no attention or expert writes to it)
and the router rows read it with +a for dominant experts and -a for the others, a logit gap
that leaves the others a negligible share. With as many dominant experts as the routed top-k,
every token uses all of them: keeping them reproduces the base (to float rounding), and
dropping any one changes every token. The examples are the base's own greedy continuations, so
such a change costs likelihood whatever text the tokenizer makes of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """These tests run many small forward passes: with two threads on a busy 2-core machine the
    second thread mostly waits at barriers (10x slower here), so use one, and restore after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["def main():", "The licence", "12 + 7 =", "Copyright (C)", "import os", "The quick brown fox"]


def plant(ckpt_dir: Path, dominant: int, *, gap: float = 40.0, sharpen: float = 4.0,
          even: bool = False, expert_scale: float = 1.0) -> None:
    """Edit `ckpt_dir` in place so experts 0..dominant-1 take every layer's routed mass;
    `even` gives them equal router probabilities, `expert_scale` louder outputs."""
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(ckpt_dir / shard)
        for name, t in tensors.items():
            if name == "model.embed_tokens.weight":
                t[:, 0] = 1.0
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                t[0, :] = 0.0  # nothing writes to dimension 0: it stays 1.0 in every layer
                if name.endswith("down_proj.weight"):
                    t.mul_(expert_scale)
            elif name.endswith("layernorm.weight"):
                t[0] = 1.0
            elif name.endswith("mlp.gate.weight"):
                routed = t.shape[0] - 1  # the last expert is the shared one
                if even:
                    t[:routed] = 0.0
                t[:dominant, 0] = gap
                t[dominant:routed, 0] = -gap
            elif name == "lm_head.weight":
                t.mul_(sharpen)  # confident predictions: a changed hidden state shows in the loss
        save_file(tensors, ckpt_dir / shard, metadata={"format": "pt"})


def greedy_examples(ckpt_dir: Path, tokens: int = 16) -> list[str]:
    """The base's own greedy continuation of each prompt, as text that tokenizes back to exactly
    the generated ids: at each step the best-ranked token that keeps the text's tokenization
    unchanged (a BPE merge across the new token would otherwise re-tokenize the example)."""
    from emo_serve import reference
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.examples import load_tokenizer

    ckpt = Checkpoint(ckpt_dir)
    tok = load_tokenizer(ckpt).tokenizer
    seqs = [tok.encode(prompt).ids for prompt in PROMPTS]
    for _ in range(tokens):
        logits = reference.forward(ckpt, [torch.tensor(ids) for ids in seqs])
        for ids, lg in zip(seqs, logits):
            ranked = lg[-1].topk(32).indices.tolist()
            ids.append(next((t for t in ranked if tok.encode(tok.decode(ids + [t])).ids == ids + [t]),
                            ranked[0]))
    return [tok.decode(ids) for ids in seqs]


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A tiny checkpoint where 3 of 15 routed experts (= its routed top-k) carry every layer:
    the smallest lossless size is 3."""
    from emo_serve.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("planted") / "three", "tiny", seed=1)
    plant(path, dominant=3)
    return path, greedy_examples(path)


@pytest.fixture(scope="session")
def all_needed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A sharpened tiny checkpoint routing every token to all 15 routed experts (top-k 16), with
    equal weights and loud outputs: dropping any expert changes every token, so no subset is free."""
    from emo_serve.demo import write_demo_checkpoint

    path = write_demo_checkpoint(tmp_path_factory.mktemp("planted") / "all", "tiny", seed=2, num_experts_per_tok=16)
    plant(path, dominant=15, even=True, expert_scale=8.0)
    return path, greedy_examples(path)
