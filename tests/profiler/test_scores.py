"""Profiler scores against a brute-force computation with the whole-model reference forward."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from emo_serve import reference
from emo_serve.checkpoint import Checkpoint
from emo_serve.examples import load_examples, tokenize_examples
from emo_serve.layers import load_layer
from emo_serve.profiler import profile

EXAMPLES = [
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n",
    "12 + 30 = 42. 6 * 7 = 42. 84 / 2 = 42.",
    {"messages": [{"role": "user", "content": "What is 6 * 7?"},
                  {"role": "assistant", "content": "6 * 7 = 42."}]},
]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(tiny_ckpt)


@pytest.fixture(scope="module")
def sequences(ckpt: Checkpoint) -> list[torch.Tensor]:
    seqs, warnings = tokenize_examples(ckpt, load_examples(EXAMPLES), 512)
    assert not warnings and len(seqs) == 3
    return seqs


def brute_routing(ckpt: Checkpoint, sequences: list[torch.Tensor], keep=None):
    """Per layer: (normed MoE inputs, routings) of every sequence, from `reference.forward`."""
    seen: dict[int, list[tuple[torch.Tensor, reference.Routing]]] = {}
    reference.forward(ckpt, sequences, keep=keep, hook=lambda l, h, r: seen.setdefault(l, []).append((h, r)))
    return seen


def test_usage_equals_mean_router_probability(ckpt, sequences):
    scores = profile(ckpt, EXAMPLES, method="usage", progress=False)
    seen = brute_routing(ckpt, sequences)
    total = sum(len(s) for s in sequences)
    for layer in range(ckpt.config.num_hidden_layers):
        probs = torch.cat([r.probs for _, r in seen[layer]]).double()
        assert scores.tokens[layer] == total == probs.shape[0]
        expected = probs.mean(0)
        assert torch.allclose(torch.tensor(scores.scores[layer], dtype=torch.float64), expected,
                              rtol=1e-12, atol=0)
        # The shared expert has its own softmax: a weight of exactly 1 for every token.
        assert scores.scores[layer][15] == pytest.approx(1.0, abs=1e-12)
        counts = torch.cat([r.weights > 0 for _, r in seen[layer]]).sum(0)
        assert scores.counts[layer] == counts.tolist()


def test_frequency_equals_topk_counts_exactly(ckpt, sequences):
    scores = profile(ckpt, EXAMPLES, method="frequency", progress=False)
    seen = brute_routing(ckpt, sequences)
    top_k = ckpt.config.num_experts_per_tok
    for layer in range(ckpt.config.num_hidden_layers):
        selected = torch.cat([r.weights > 0 for _, r in seen[layer]])
        assert (selected.sum(1) == top_k).all()
        counts = selected.sum(0)
        assert scores.counts[layer] == counts.tolist()
        assert scores.scores[layer] == (counts.double() / selected.shape[0]).tolist()  # exact


def test_layerwise_equals_reference_with_earlier_layers_restricted(ckpt, sequences):
    k = 4
    scores = profile(ckpt, EXAMPLES, method="layerwise", layerwise_size=k, progress=False)
    cfg = ckpt.config
    assert scores.kept is not None and scores.sizes == [k] * cfg.num_hidden_layers
    for layer in range(cfg.num_hidden_layers):
        earlier = [scores.kept[i] + cfg.layer_routing(i).shared_ids if i < layer else list(range(16))
                   for i in range(cfg.num_hidden_layers)]
        seen = brute_routing(ckpt, sequences, keep=reference.keep_masks(cfg, earlier))
        expected = torch.cat([r.probs for _, r in seen[layer]]).double().mean(0)
        got = torch.tensor(scores.scores[layer], dtype=torch.float64)
        assert torch.allclose(got, expected, rtol=1e-12, atol=0)
        routed = expected[:15]
        assert scores.kept[layer] == sorted(routed.argsort(descending=True)[:k].tolist())
    # Restricting earlier layers changes what later layers see (else the method would be `usage`).
    usage = profile(ckpt, EXAMPLES, method="usage", progress=False)
    assert usage.scores[0] == scores.scores[0]
    assert usage.scores[-1] != scores.scores[-1]


def test_easy_ep_equals_formula(ckpt, sequences):
    scores = profile(ckpt, EXAMPLES, method="easy_ep", progress=False)
    seen = brute_routing(ckpt, sequences)
    cfg = ckpt.config
    for layer in range(cfg.num_hidden_layers):
        w = load_layer(ckpt, layer)
        total = torch.zeros(16, dtype=torch.float64)
        tokens = 0
        for h, r in seen[layer]:
            moe_out, _ = reference.moe(h, w, cfg.layer_routing(layer))
            change = 1 - F.cosine_similarity(h, h + moe_out, dim=-1)  # [T]
            for e in range(16):  # every expert on every token, kept where the router picked it
                norm = reference.expert(h, w, e).norm(dim=-1)
                total[e] += (r.weights[:, e] * norm * change).double().sum()
            tokens += h.shape[0]
        assert torch.allclose(torch.tensor(scores.scores[layer], dtype=torch.float64), total / tokens,
                              rtol=1e-4, atol=1e-9)


def test_deterministic_and_random_is_seeded(ckpt):
    a = profile(ckpt, EXAMPLES, method="usage", progress=False)
    b = profile(ckpt, EXAMPLES, method="usage", progress=False)
    assert a.scores == b.scores and a.counts == b.counts
    r0 = profile(ckpt, EXAMPLES, method="random", seed=0, progress=False)
    r0b = profile(ckpt, EXAMPLES[:1], method="random", seed=0, progress=False)
    r1 = profile(ckpt, EXAMPLES, method="random", seed=1, progress=False)
    assert r0.scores == r0b.scores != r1.scores
    assert r0.to_subset(4, name="r0").experts != r1.to_subset(4, name="r1").experts
    assert r0.tokens == [0] * 4  # no forward pass for the baseline


def test_example_order_does_not_matter_but_content_does(ckpt):
    a = profile(ckpt, EXAMPLES, progress=False)
    b = profile(ckpt, EXAMPLES[::-1], progress=False)
    c = profile(ckpt, EXAMPLES[:1], progress=False)
    assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), rtol=1e-12, atol=0)
    assert sorted(a.example_fingerprints) == sorted(b.example_fingerprints)
    assert not torch.allclose(torch.tensor(a.scores), torch.tensor(c.scores))


def test_remote_base_over_http_gives_the_same_scores(ckpt, tiny_ckpt, range_server):
    import shutil

    dest = range_server.root / "profiled-tiny"
    if not dest.exists():
        shutil.copytree(tiny_ckpt, dest)
    range_server.reset()
    remote = profile(range_server.url(dest), EXAMPLES, progress=False)
    local = profile(ckpt, EXAMPLES, progress=False)
    assert remote.scores == local.scores
    assert remote.base.fingerprint == local.base.fingerprint
    assert "/profiled-tiny/tokenizer.json" in range_server.paths_requested()
    # Everything came by ranged reads: no more than the checkpoint's bytes (each read once).
    assert range_server.bytes_served <= ckpt.total_tensor_bytes * 1.05 + 2_000_000
