"""`reference.route` against a direct, per-token transcription of DESIGN.md's routing rules, and
the MoE block against the fused-MoE reading of those rules that the vLLM plugin relies on."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from emo_serve.config import LayerRouting
from emo_serve.reference import moe, route, swiglu


def softmax(logits: list[float], ids: list[int]) -> dict[int, float]:
    m = max(logits[i] for i in ids)
    ex = {i: math.exp(logits[i] - m) for i in ids}
    z = sum(ex.values())
    return {i: v / z for i, v in ex.items()}


def top(p: dict[int, float], n: int) -> list[int]:
    return sorted(p, key=lambda i: -p[i])[:n]


def design_route(logits: list[float], r: LayerRouting, keep: list[bool] | None) -> dict[int, float]:
    """DESIGN.md, literally: returns {expert id: combine weight} for one token."""
    E, s = r.num_experts, r.num_shared
    ids = [e for e in range(E) if keep is None or keep[e]]
    k = min(r.top_k, len(ids))  # "top-k shrinks to what is kept"
    if r.always_active:
        # "one softmax over all experts, the always-active ids always selected with their softmax
        # weights, plus top-(k - len) of the others, no renormalisation"
        p = softmax(logits, ids)
        others = {i: v for i, v in p.items() if i not in r.always_active}
        return {i: p[i] for i in [*r.always_active, *top(others, k - len(r.always_active))]}
    if s > 0:
        # "softmax is taken over each part separately; top-(k-s) of the routed part plus the
        # top-s of the shared part are used; weights are not renormalised"
        routed = softmax(logits, [i for i in ids if i < E - s])
        shared = softmax(logits, [i for i in ids if i >= E - s])
        return {**{i: routed[i] for i in top(routed, k - s)}, **{i: shared[i] for i in top(shared, s)}}
    # "one softmax, top-k, and renormalise only if norm_topk_prob"
    p = softmax(logits, ids)
    chosen = {i: p[i] for i in top(p, k)}
    if r.norm_topk_prob:
        z = sum(chosen.values())
        chosen = {i: v / z for i, v in chosen.items()}
    return chosen


ROUTINGS = {
    "released (s=1, k=8 of 128)": LayerRouting(128, 1, 8, False),
    "two shared": LayerRouting(16, 2, 5, False),
    "s=0": LayerRouting(16, 0, 4, False),
    "s=0 renormalised": LayerRouting(16, 0, 4, True),
    "always-active wins over shared": LayerRouting(16, 1, 4, False, (15, 3)),
    "always-active only": LayerRouting(8, 0, 3, False, (0,)),
    "top-k = all": LayerRouting(4, 1, 4, False),
}


def random_keep(E: int, required: list[int], n_routed: int, gen: torch.Generator) -> list[bool]:
    pool = [e for e in range(E) if e not in required]
    chosen = [pool[i] for i in torch.randperm(len(pool), generator=gen)[:n_routed].tolist()]
    return [e in chosen or e in required for e in range(E)]


@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("kept", [None, 1, 2, 6])
def test_route_follows_design(name: str, kept: int | None) -> None:
    r = ROUTINGS[name]
    gen = torch.Generator().manual_seed(hash((name, kept)) % 2**31)
    logits = 3 * torch.randn(40, r.num_experts, generator=gen)
    required = sorted(set(range(r.num_routed, r.num_experts)) | set(r.always_active))
    keep = None if kept is None else random_keep(r.num_experts, required, kept, gen)
    got = route(logits, r, None if keep is None else torch.tensor(keep))
    for t in range(logits.shape[0]):
        want = design_route(logits[t].tolist(), r, keep)
        row = got.weights[t]
        assert set(row.nonzero().flatten().tolist()) == set(want), (t, want)
        for e, w in want.items():
            assert row[e].item() == pytest.approx(w, rel=1e-5, abs=1e-7)
    if keep is not None:
        assert torch.all(got.probs[:, ~torch.tensor(keep)] == 0)


def test_route_with_keep_equals_routing_the_sliced_router() -> None:
    """What a subset checkpoint computes: its router is the kept rows, in order."""
    r = LayerRouting(16, 1, 4, False)
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 16, generator=gen)
    kept = [2, 5, 9, 15]
    keep = torch.zeros(16, dtype=torch.bool)
    keep[kept] = True
    full = route(logits, r, keep)
    sub = route(logits[:, kept], LayerRouting(4, 1, 4, False))
    # Same selection; values equal up to float summation order (softmax over 16 with -inf vs 4).
    assert torch.equal(full.weights[:, kept] > 0, sub.weights > 0)
    assert torch.all(full.weights.sum(0)[~keep] == 0)
    torch.testing.assert_close(full.weights[:, kept], sub.weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(full.probs[:, kept], sub.probs, rtol=1e-6, atol=1e-7)


def test_shared_weight_is_exactly_one_for_a_single_shared_expert() -> None:
    got = route(torch.randn(10, 16) * 50, LayerRouting(16, 1, 4, False))
    assert torch.all(got.weights[:, 15] == 1.0)


def expert_weights(E: int, h: int, d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    w = {"gate": torch.randn(E, h, generator=gen)}
    for e in range(E):
        w[f"experts.{e}.gate_proj"] = torch.randn(d, h, generator=gen) / h**0.5
        w[f"experts.{e}.up_proj"] = torch.randn(d, h, generator=gen) / h**0.5
        w[f"experts.{e}.down_proj"] = torch.randn(h, d, generator=gen) / d**0.5
    return w


@pytest.mark.parametrize("s", [1, 2])
def test_moe_equals_fused_routed_experts_plus_dense_shared(s: int) -> None:
    """DESIGN.md: routed part = softmax over routed logits -> top-(k-s), renormalize=False (what a
    fused-MoE kernel computes); shared part = sum_j softmax(shared logits)_j * E_shared_j(x)."""
    E, h, d, k = 12, 32, 16, 5
    gen = torch.Generator().manual_seed(s)
    w = expert_weights(E, h, d, gen)
    x = torch.randn(30, h, generator=gen)
    got, _ = moe(x, w, LayerRouting(E, s, k, False))

    def run(e: int, rows: torch.Tensor) -> torch.Tensor:
        return swiglu(rows, w[f"experts.{e}.gate_proj"], w[f"experts.{e}.up_proj"], w[f"experts.{e}.down_proj"])

    logits = F.linear(x, w["gate"])
    vals, idx = logits[:, : E - s].softmax(-1).topk(k - s, dim=-1)  # fused_topk(renormalize=False)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for v, e in zip(vals[t], idx[t].tolist()):
            want[t] += v * run(e, x[t : t + 1])[0]
    shared_p = logits[:, E - s :].softmax(-1)
    for j in range(s):
        want += shared_p[:, j : j + 1] * run(E - s + j, x)
    assert (got - want).abs().max().item() < 1e-5
