"""The shipped trained demo models: an EMO and its standard-MoE twin (same data, same settings,
no document pools). Per domain, the profiler picks subsets from the 5 shipped examples and
`evaluate` scores them on 20 held-out documents the models never trained on.

The bounds are loose on purpose: they state what EMO's training guarantees (a quarter of the
routed experts costs little, and far less than for the twin), not the exact numbers, which
`bench/bench_quality.py` reports (docs/benchmarks/quality.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.evaluate import EvalReport, evaluate
from emo_serve.profiler import profile

MODELS = Path(__file__).resolve().parents[2] / "emo_serve" / "data" / "models"
DOMAINS = ("code", "prose", "legal", "math")
FRACTIONS = (0.5, 0.25, 0.125)


def texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], EvalReport]:
    out = {}
    for model in ("emo-demo", "moe-demo"):
        ckpt = Checkpoint(MODELS / model)
        for domain in DOMAINS:
            scores = profile(ckpt, texts(MODELS / "examples" / f"{domain}.jsonl"), max_tokens_per_example=256,
                             progress=False)
            subsets = [scores.to_subset(fraction=f, name=f"{domain}-{f}", checkpoint=ckpt) for f in FRACTIONS]
            out[model, domain] = evaluate(ckpt, subsets, texts(MODELS / "heldout" / f"{domain}.jsonl"),
                                          max_tokens_per_example=256, progress=False)
    return out


def test_shipped_models_are_small_bf16_emo_checkpoints() -> None:
    for model in ("emo-demo", "moe-demo"):
        ckpt = Checkpoint(MODELS / model)
        cfg = ckpt.config
        assert cfg.model_type == "emo" and cfg.torch_dtype == "bfloat16" and cfg.head_size >= 64
        assert cfg.num_experts == 16 and cfg.num_shared_experts == 1 and cfg.num_experts_per_tok == 4
        assert ckpt.total_tensor_bytes < 10_000_000
        assert (MODELS / model / "tokenizer.json").is_file()
        assert "chat_template" in json.loads((MODELS / model / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("domain", DOMAINS)
def test_both_models_learned_the_domain(reports: dict[tuple[str, str], EvalReport], domain: str) -> None:
    for model in ("emo-demo", "moe-demo"):
        base = reports[model, domain].base
        assert base.perplexity < 100 and base.accuracy > 0.15, (model, base)


@pytest.mark.parametrize("domain", DOMAINS)
def test_emo_keeps_its_quality_with_a_quarter_of_the_experts(
        reports: dict[tuple[str, str], EvalReport], domain: str) -> None:
    emo = {s.routed_experts[0]: s for s in reports["emo-demo", domain].subsets}
    assert sorted(emo) == [2, 4, 8]
    assert emo[8].relative_change < 0.05 and emo[8].accuracy_change > -1.0
    assert emo[4].relative_change < 0.10 and emo[4].accuracy_change > -2.0
    assert emo[2].relative_change < 0.40


@pytest.mark.parametrize("domain", DOMAINS)
def test_emo_subsets_beat_the_standard_moe_twin(reports: dict[tuple[str, str], EvalReport], domain: str) -> None:
    emo = {s.routed_experts[0]: s for s in reports["emo-demo", domain].subsets}
    std = {s.routed_experts[0]: s for s in reports["moe-demo", domain].subsets}
    for size in (4, 2):
        assert emo[size].relative_change + 0.05 < std[size].relative_change, (size, emo[size], std[size])
        assert emo[size].accuracy_change > std[size].accuracy_change
