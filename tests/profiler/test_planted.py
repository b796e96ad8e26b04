"""Planted structure is recovered: a domain's examples select the experts its tokens were wired to."""

from __future__ import annotations

import pytest

from emo_serve.checkpoint import Checkpoint
from emo_serve.profiler import profile


@pytest.mark.parametrize("method", ["usage", "frequency", "layerwise", "easy_ep"])
@pytest.mark.parametrize("domain", ["math", "prose"])
def test_domain_examples_select_the_planted_experts(planted_ckpt, method, domain):
    ckpt = Checkpoint(planted_ckpt.path)
    planted = planted_ckpt.experts[domain]
    scores = profile(ckpt, planted_ckpt.texts[domain], method=method, layerwise_size=len(planted),
                     progress=False)
    spec = scores.to_subset(len(planted), name=f"{domain}-{method}")
    shared = [15]
    assert spec.experts == [sorted(planted) + shared] * ckpt.config.num_hidden_layers
    other = next(d for d in planted_ckpt.experts if d != domain)
    for layer in range(ckpt.config.num_hidden_layers):
        routed = scores.scores[layer][:15]
        # A clear margin, not a near tie: every planted expert beats every other routed one.
        assert min(routed[e] for e in planted) > 2 * max(
            s for e, s in enumerate(routed) if e not in planted)
        assert all(routed[e] < min(routed[p] for p in planted) for e in planted_ckpt.experts[other])


def test_random_baseline_ignores_the_planted_structure(planted_ckpt):
    ckpt = Checkpoint(planted_ckpt.path)
    picks = {tuple(profile(ckpt, planted_ckpt.texts["math"], method="random", seed=s, progress=False)
                   .to_subset(3, name="r").experts[0]) for s in range(5)}
    assert len(picks) > 1
