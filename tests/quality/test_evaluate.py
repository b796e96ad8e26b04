"""`evaluate`: equal to the reference forward run in full, exact for an all-experts subset."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emo_serve import reference
from emo_serve.checkpoint import Checkpoint
from emo_serve.errors import SubsetError
from emo_serve.evaluate import EvalError, evaluate
from emo_serve.examples import load_examples, tokenize_examples
from emo_serve.subset import make_subset, random_subset

EXAMPLES = ["def add(a, b):\n    return a + b\n", "The licence grants the right to copy and modify. " * 2,
            "12 + 7 = 19. 3 * 4 = 12. 100 - 1 = 99."]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


def test_all_experts_subset_equals_base_exactly(ckpt: Checkpoint) -> None:
    everything = make_subset(ckpt, [ckpt.config.layer_routing(i).routed_ids for i in range(4)], "everything")
    report = evaluate(ckpt, [everything], EXAMPLES, progress=False)
    sub, base = report.subsets[0], report.base
    assert sub.nll == base.nll and sub.accuracy == base.accuracy
    assert sub.relative_change == 0.0 and sub.accuracy_change == 0.0
    assert sub.agreement == 1.0
    assert sub.router_mass == [pytest.approx(1.0, abs=1e-12)] * 4
    assert sub.bytes == base.bytes and sub.bytes_fraction == 1.0


def _reference_numbers(ckpt: Checkpoint, sequences: list[torch.Tensor], experts: list[list[int]] | None
                       ) -> tuple[float, float, list[torch.Tensor]]:
    keep = reference.keep_masks(ckpt.config, experts) if experts is not None else None
    logits = reference.forward(ckpt, sequences, keep=keep)
    nll = sum(float(F.cross_entropy(lg[:-1], s[1:], reduction="sum")) for lg, s in zip(logits, sequences))
    top = [lg[:-1].argmax(-1) for lg in logits]
    correct = sum(int((t == s[1:]).sum()) for t, s in zip(top, sequences))
    n = sum(len(s) - 1 for s in sequences)
    return nll / n, correct / n, top


def test_numbers_equal_the_reference_forward_in_full(ckpt: Checkpoint) -> None:
    subsets = [random_subset(ckpt, 4, "r4", seed=1), random_subset(ckpt, 2, "r2", seed=2)]
    report = evaluate(ckpt, subsets, EXAMPLES, progress=False)
    sequences, _ = tokenize_examples(ckpt, load_examples(EXAMPLES), 512)
    n = sum(len(s) - 1 for s in sequences)
    assert report.tokens == n and report.examples == 3

    base_nll, base_acc, base_top = _reference_numbers(ckpt, sequences, None)
    assert report.base.nll == pytest.approx(base_nll, rel=1e-6)
    assert report.base.perplexity == pytest.approx(math.exp(base_nll), rel=1e-6)
    assert report.base.accuracy == base_acc

    # The router mass, from the base's routing of the same sequences through a hook.
    mass = {s.name: [0.0] * 4 for s in subsets}

    def hook(layer: int, h: torch.Tensor, routing: reference.Routing) -> None:
        routed = routing.probs[:, :15]
        for s in subsets:
            kept = [e for e in s.experts[layer] if e < 15]
            mass[s.name][layer] += float((routed[:, kept].sum(-1) / routed.sum(-1)).sum())

    reference.forward(ckpt, sequences, hook=hook)
    tokens = sum(len(s) for s in sequences)  # the router sees every position
    for spec, got in zip(subsets, report.subsets):
        nll, acc, top = _reference_numbers(ckpt, sequences, spec.experts)
        agree = sum(int((a == b).sum()) for a, b in zip(top, base_top)) / n
        assert got.nll == pytest.approx(nll, rel=1e-6)
        assert got.accuracy == acc and got.agreement == agree
        assert got.relative_change == pytest.approx(math.exp(nll - base_nll) - 1, rel=1e-6, abs=1e-12)
        assert got.router_mass == pytest.approx([m / tokens for m in mass[spec.name]], rel=1e-6)
        assert got.routed_experts == [int(spec.provenance.size)] * 4
        assert got.experts == [int(spec.provenance.size) + 1] * 4


def test_report_json_round_trips_and_table_names_every_model(ckpt: Checkpoint) -> None:
    from emo_serve.evaluate import EvalReport

    report = evaluate(ckpt, [random_subset(ckpt, 4, "r4")], EXAMPLES, progress=False)
    again = EvalReport.model_validate_json(report.model_dump_json())
    assert again == report
    table = report.table()
    assert "base" in table and "r4" in table and f"{report.tokens} predicted tokens" in table


def test_subset_of_another_base_is_refused(ckpt: Checkpoint, tmp_path: Path) -> None:
    from emo_serve.demo import write_demo_checkpoint

    other = Checkpoint(write_demo_checkpoint(tmp_path / "other", "tiny", seed=5))
    with pytest.raises(SubsetError, match="fingerprint"):
        evaluate(ckpt, [random_subset(other, 4, "foreign")], EXAMPLES, progress=False)


def test_examples_without_a_token_to_predict_are_refused(ckpt: Checkpoint) -> None:
    with pytest.raises(EvalError, match="no token to predict"):
        evaluate(ckpt, [], ["a"], progress=False)
