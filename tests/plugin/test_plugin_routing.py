"""EMO routing as the plugin computes it vs the reference `route` (DESIGN.md, "Routing").

The plugin never re-implements routing for the released model's case (one shared expert): it
runs vLLM's own CPU router (softmax -> top-k, `renormalize=False`) over the routed logits and
adds the shared expert with weight 1.0. These tests check that equivalence, and the plugin's
routing functions for the other paths, as dense [tokens, experts] combine weights.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from emo_serve.config import LayerRouting
from emo_serve.reference import route
from emo_vllm.emo import always_active_topk, split_softmax_topk

TOKENS = 64


def dense(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(weights.shape[0], num_experts)
    return out.scatter_(1, ids.long(), weights.float())


def vllm_cpu_router(num_experts: int, top_k: int, *, renormalize: bool, fn=None):
    from vllm.model_executor.layers.fused_moe.router.cpu_router import CPURouter

    router = CPURouter(top_k=top_k, global_num_experts=num_experts, renormalize=renormalize,
                       custom_routing_function=fn)
    return lambda logits: router._compute_routing(torch.zeros(logits.shape[0], 8), logits, None)


@pytest.fixture
def logits() -> torch.Tensor:
    return 2.0 * torch.randn(TOKENS, 16, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kept", [16, 5, 3])
def test_one_shared_is_fused_moe_over_routed_plus_weight_one(logits: torch.Tensor, kept: int) -> None:
    """s = 1: vLLM's router over the routed logits (no renormalisation) + the shared expert at
    1.0 equals the reference, also when fewer experts are kept than top-k (kept=3, top-k 4)."""
    logits = logits[:, -kept:]
    r = LayerRouting(kept, 1, min(4, kept), False)
    w, ids = vllm_cpu_router(r.num_routed, r.routed_top_k, renormalize=False)(logits[:, :-1])
    plugin = torch.cat([dense(w, ids, r.num_routed), torch.ones(TOKENS, 1)], dim=1)
    torch.testing.assert_close(plugin, route(logits, r).weights, rtol=0, atol=1e-6)


def test_two_shared_split_softmax(logits: torch.Tensor) -> None:
    r = LayerRouting(16, 2, 5, False)
    fn = partial(split_softmax_topk, num_shared=2)
    w, ids = vllm_cpu_router(16, r.top_k, renormalize=False, fn=fn)(logits)
    torch.testing.assert_close(dense(w, ids, 16), route(logits, r).weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("always", [(0, 5), (7,), (1, 2, 3, 4)])
def test_always_active(logits: torch.Tensor, always: tuple[int, ...]) -> None:
    r = LayerRouting(16, 1, 4, False, always)
    fn = partial(always_active_topk, always=torch.tensor(always))
    w, ids = vllm_cpu_router(16, r.top_k, renormalize=False, fn=fn)(logits)
    torch.testing.assert_close(dense(w, ids, 16), route(logits, r).weights, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm", [False, True])
def test_no_shared_is_vllm_standard_routing(logits: torch.Tensor, norm: bool) -> None:
    r = LayerRouting(16, 0, 4, norm)
    w, ids = vllm_cpu_router(16, 4, renormalize=norm)(logits)
    torch.testing.assert_close(dense(w, ids, 16), route(logits, r).weights, rtol=0, atol=1e-6)
