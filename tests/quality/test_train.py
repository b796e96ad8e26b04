"""The trainer: its batched model is the reference EMO forward, and its pools are subsets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emo_serve import reference
from emo_serve.checkpoint import Checkpoint
from emo_serve.config import EmoConfig
from emo_serve.train.corpus import Document, math_documents, roff_to_text
from emo_serve.train.loop import TrainSettings, export, model_config, pool_sizes
from emo_serve.train.model import EmoLM


@pytest.fixture(scope="module")
def model() -> EmoLM:
    torch.manual_seed(0)
    m = EmoLM(EmoConfig.from_dict(model_config(TrainSettings())), seed=3)
    with torch.no_grad():  # a trained router is far from init's near-uniform one
        for layer in m.layers:
            layer.gate.mul_(20)
    return m.eval()


def test_exported_model_runs_the_same_in_the_reference_forward(model: EmoLM, tmp_path: Path) -> None:
    ckpt = Checkpoint(export(model, model_config(TrainSettings()), tmp_path / "m", dtype=torch.float32))
    ids = torch.randint(0, 2048, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(ids, torch.ones_like(ids, dtype=torch.bool))
    expected = reference.forward(ckpt, list(ids))
    for got, want in zip(logits, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_bf16_export_has_the_released_schema(model: EmoLM, tmp_path: Path) -> None:
    ckpt = Checkpoint(export(model, model_config(TrainSettings()), tmp_path / "m"))
    assert ckpt.config.model_type == "emo" and ckpt.config.torch_dtype == "bfloat16"
    assert sorted(ckpt.tensors) == sorted(ckpt.expected_tensor_names())
    assert {t.dtype for t in ckpt.tensors.values()} == {"BF16"}


def test_a_document_pool_routes_like_a_subset_of_the_documents_top_experts(model: EmoLM) -> None:
    """Inside training, a pool of P experts is exactly what `reference` does with a keep mask of
    the document's top-P routed experts by mean router probability (plus the shared one)."""
    layer = model.layers[1]
    h = torch.randn(3, 24, 128, generator=torch.Generator().manual_seed(1))
    valid = torch.ones(3, 24, dtype=torch.bool)
    valid[2, 20:] = False  # padding does not vote for the pool
    pool = torch.tensor([3, 7, 15])
    with torch.no_grad():
        out, _ = layer.moe(h, valid, pool)
        logits = F.linear(h, layer.gate)
    w = {"gate": layer.gate.detach()}
    for e in range(16):
        for name in ("gate_proj", "up_proj", "down_proj"):
            w[f"experts.{e}.{name}"] = getattr(layer, name)[e].detach()
    for b in range(3):
        probs = logits[b][valid[b], :15].softmax(-1).mean(0)
        keep = torch.zeros(16, dtype=torch.bool)
        keep[probs.topk(int(pool[b])).indices] = True
        keep[15] = True
        want, routing = reference.moe(h[b], w, layer.routing, keep)
        torch.testing.assert_close(out[b], want, rtol=1e-5, atol=1e-6)
        used = routing.weights[:, :15].gt(0).any(0)
        assert int(used.sum()) <= int(pool[b]) and not (used & ~keep[:15]).any()


def test_pool_sizes_follow_the_settings() -> None:
    import random

    settings = TrainSettings(min_pool=3, small_pool_max=6, small_pool_prob=0.5)
    sizes = pool_sizes(settings, 15, 4000, random.Random(0))
    assert int(sizes.min()) == 3 and int(sizes.max()) == 15
    small = float((sizes <= 6).float().mean())
    assert 0.6 < small < 0.72  # 0.5 + 0.5 * 4/13 expected
    assert pool_sizes(settings, 15, 50, random.Random(1)).tolist() == \
        pool_sizes(settings, 15, 50, random.Random(1)).tolist()


def test_corpus_pieces_are_deterministic_and_readable() -> None:
    page = '.TH LS 1\n.SH NAME\nls \\- list directory contents\n.PP\n\\fB\\-a\\fR, \\fB\\-\\-all\\fR\ndo not ignore\n'
    text = roff_to_text(page)
    assert "NAME" in text and "ls - list directory contents" in text and "-a, --all" in text
    assert "\\f" not in text and ".PP" not in text
    a, b = math_documents(3, seed=0), math_documents(3, seed=0)
    assert a == b and all(d.domain == "math" for d in a)
    first = a[0].text.splitlines()[1]
    assert "=" in first or "?" in first or ":" in first
    held = [Document("code", f"doc{i}", "x").heldout for i in range(2000)]
    assert 0.07 < sum(held) / len(held) < 0.13
