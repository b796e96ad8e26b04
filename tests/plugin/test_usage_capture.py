"""The engine-side routing tallies (emo_vllm.usage / routing_ops.RoutingTally) and the per-step
inputs that key them (emo_vllm.step_inputs), against the reference routing, driven as a runner
adapter and the model drive them, without an engine: the engine path is covered in
tests/api/test_live_routing.py (float32 engines), so this also builds the tallies the way vLLM
builds a bfloat16 model (under that default dtype), which those tests cannot reach cheaply."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emo_serve import reference
from emo_serve.checkpoint import Checkpoint
from emo_serve.config import LayerRouting
from emo_serve.default_model import shipped_default_model
from emo_vllm import usage
from emo_vllm.routing_ops import RoutingTally
from emo_vllm.step_inputs import MODEL_ARG, ROW_ARG, USER_ARG, StepInputs

CFG = Checkpoint(shipped_default_model()).config
LAYERS = CFG.num_hidden_layers
MAX_TOKENS = 16


def args(model: str, user: str = "", row: int = 0) -> dict:
    return {MODEL_ARG: model, USER_ARG: user, ROW_ARG: row}


def build(max_reqs: int = 4) -> tuple[usage.RoutingUsage, StepInputs, list[SimpleNamespace]]:
    """The tallies and step inputs as `EmoModel.__init__` builds them (row 1: a subset keeping 8..15)."""
    u = usage.RoutingUsage(max_tokens=MAX_TOKENS, max_reqs=max_reqs)
    token_rows = torch.zeros(MAX_TOKENS, dtype=torch.long)
    blocks = []
    for layer in range(LAYERS):
        masks = torch.zeros(4, 16)
        masks[1, [0, 1, 2, 3, 4, 5, 6, 7]] = float("-inf")
        block = SimpleNamespace(routing=CFG.layer_routing(layer), subset_masks=masks)
        u.add_block(layer, block)
        blocks.append(block)
    tally = u.build(token_rows)
    inputs = StepInputs(token_rows=token_rows, installed_rows={1: "sub"}, token_keys=tally.token_keys,
                        key_index=u.key_index)
    return u, inputs, blocks


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def tallies(request: pytest.FixtureRequest):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)  # as vLLM does while it builds the model
    try:
        u, inputs, blocks = build()
    finally:
        torch.set_default_dtype(previous)
    return u, inputs, blocks, request.param


def step(u, inputs, requests, num_scheduled, logits) -> None:
    """One engine step: the runner's adapter fills rows and keys, then each MoE layer records."""
    inputs.fill(requests, np.asarray(num_scheduled))
    for layer, x in enumerate(logits):
        u.record(layer, x)


def test_tallies_equal_the_reference(tallies) -> None:
    u, inputs, blocks, dtype = tallies
    gen = torch.Generator().manual_seed(0)
    requests = [args("base", "alice"), args("sub", row=1)]
    seen: dict[str, list[torch.Tensor]] = {"base": [], "sub": []}
    for _ in range(20):  # more tokens than a step holds: the tallies add up step by step
        logits = [torch.randn(3, 16, generator=gen).to(dtype) for _ in range(LAYERS)]
        step(u, inputs, requests, [2, 1], logits)
        seen["base"].append(torch.stack([x[:2].float() for x in logits]))
        seen["sub"].append(torch.stack([x[2:].float() for x in logits]))
    out = {entry["model"]: entry for entry in u.drain()["keys"]}
    assert set(out) == {"base", "sub"} and out["base"]["user"] == "alice"
    assert out["base"]["tokens"] == [40] * LAYERS and out["sub"]["tokens"] == [20] * LAYERS
    for model, row in (("base", 0), ("sub", 1)):
        x = torch.cat(seen[model], dim=1)  # [layers, tokens, experts]
        shares = []
        for layer in range(LAYERS):
            r = CFG.layer_routing(layer)
            full = reference.route(x[layer], r)
            chosen = reference.route(x[layer] + blocks[layer].subset_masks[row].float(), r)
            assert np.allclose(out[model]["mass"][layer], full.probs.sum(0).double().numpy(), atol=1e-4)
            assert out[model]["counts"][layer] == (chosen.weights > 0).sum(0).tolist()
            dropped = torch.isinf(blocks[layer].subset_masks[row])
            shares.append((full.weights * dropped).sum(-1) / full.weights[:, :-1].sum(-1))
        assert out[model]["outside_tokens"] == x.shape[1]
        assert out[model]["outside_sum"] == pytest.approx(float(torch.stack(shares).mean(0).sum()), rel=1e-5)
    assert out["base"]["outside_sum"] == 0.0 and sum(out["sub"]["hist"]) == 20
    assert u.drain()["keys"] == []  # drained means zeroed


def test_keys_beyond_the_tallies_places_are_spilled_and_lose_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eleven users, one request each, through tallies with room for 3 keys: the idle keys go to
    host memory when their place is needed, and the drain adds both up exactly."""
    monkeypatch.setattr(usage, "SPARE_KEYS", 0)
    u, inputs, _ = build(max_reqs=2)  # keys 1 and 2 (0 is the trash key)
    assert u.key_index.capacity == 3
    logits = [torch.randn(2, 16) for _ in range(LAYERS)]
    for i in range(11):
        step(u, inputs, [args("m", f"user-{i % 5}"), args("m", "steady")], [1, 1], logits)
    out = {entry["user"]: entry for entry in u.drain()["keys"]}
    assert out["steady"]["tokens"] == [11] * LAYERS
    assert {user: entry["tokens"][0] for user, entry in out.items() if user != "steady"} == {
        "user-0": 3, "user-1": 2, "user-2": 2, "user-3": 2, "user-4": 2}
    once = out["user-1"]["counts"]
    assert out["user-0"]["counts"] == [[3 * c // 2 for c in layer] for layer in once]  # same logits every step


def test_a_step_holding_more_keys_than_the_tallies_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(usage, "SPARE_KEYS", 0)
    u, inputs, _ = build(max_reqs=1)
    with pytest.raises(RuntimeError, match="more than 1 tally keys"):
        inputs.fill([args("m", "a"), args("m", "b")], np.array([1, 1]))


def test_forwards_nobody_prepared_are_not_counted(tallies) -> None:
    """Warm-up and dummy runs call the model without a step's inputs: the trash key takes them,
    also right after a real step (its keys are reset once tallied)."""
    u, inputs, _, _ = tallies
    for layer in range(LAYERS):
        u.record(layer, torch.randn(5, 16))
    assert u.drain()["keys"] == []
    step(u, inputs, [args("m")], [2], [torch.randn(2, 16) for _ in range(LAYERS)])
    for layer in range(LAYERS):  # a dummy run after it
        u.record(layer, torch.randn(4, 16))
    assert [entry["tokens"][0] for entry in u.drain()["keys"]] == [2]


def test_rows_are_per_token_and_unknown_rows_route_unmasked(tallies) -> None:
    u, inputs, _, _ = tallies
    inputs.fill([args("a", row=1), args("b", row=7), args("c")], np.array([2, 3, 1]))
    assert inputs.rows is not None and inputs.rows.np[:8].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    inputs.fill([args("a", row=1)], np.array([1]), padded=4)  # CUDA-graph padding: row 0, trash key
    assert inputs.rows.np[:6].tolist() == [1, 0, 0, 0, 0, 0]
    assert inputs.keys is not None and inputs.keys.np[1:6].tolist() == [0] * 5


@pytest.mark.parametrize("routing", [
    LayerRouting(num_experts=16, num_shared=1, top_k=4, norm_topk_prob=False),  # EMO's: the fast path
    LayerRouting(num_experts=16, num_shared=2, top_k=5, norm_topk_prob=False),
    LayerRouting(num_experts=16, num_shared=0, top_k=4, norm_topk_prob=True),
    LayerRouting(num_experts=16, num_shared=1, top_k=4, norm_topk_prob=False, always_active=(3,)),
], ids=["one-shared", "two-shared", "plain-renormalised", "always-active"])
def test_every_routing_kind_tallies_as_the_reference(routing: LayerRouting) -> None:
    """The tally's routing paths (EMO's one-shared-expert fast path and the general one), masked
    and unmasked tokens mixed in one step, against `reference.route` token by token."""
    gen = torch.Generator().manual_seed(2)
    rows = torch.tensor([0, 1, 2, 1, 0, 2])
    tables = {}
    for layer in range(3):
        t = torch.zeros(3, 16)
        t[1, routing.routed_ids[:9]] = float("-inf")  # keeps 9 - or fewer than top-k at row 2:
        t[2, routing.routed_ids[2:]] = float("-inf")
        tables[layer] = t
    token_rows = torch.zeros(8, dtype=torch.long)
    token_rows[:6] = rows
    tally = RoutingTally({i: routing for i in range(3)}, max_tokens=8, keys=3, mask_tables=tables,
                         token_rows=token_rows)
    logits = [torch.randn(6, 16, generator=gen) for _ in range(3)]
    tally.token_keys[:6] = torch.tensor([1, 2, 2, 1, 1, 2])
    for layer, x in enumerate(logits):
        tally.record(layer, x)
    out = tally.take([1, 2])
    for k, key in enumerate((1, 2)):
        mine = (tally.token_keys.new_tensor([1, 2, 2, 1, 1, 2]) == key).nonzero().flatten()
        for layer in range(3):
            x = logits[layer][mine]
            full = reference.route(x, routing)
            chosen = reference.route(x + tables[layer][rows[mine]], routing)
            assert torch.allclose(out["mass0"][k, layer], full.probs.sum(0), atol=1e-5)
            assert out["counts0"][k, layer].tolist() == (chosen.weights > 0).sum(0).tolist()
        assert int(out["tokens"][k]) == len(mine) == int(out["outside_tokens"][k])


def _emo_tallies(buffer_tokens: int) -> tuple[RoutingTally, dict[int, torch.Tensor]]:
    routing = LayerRouting(num_experts=16, num_shared=1, top_k=4, norm_topk_prob=False)
    tables = {layer: torch.zeros(3, 16) for layer in range(3)}
    for t in tables.values():
        t[1, :8] = float("-inf")
    token_rows = torch.zeros(8, dtype=torch.long)
    tally = RoutingTally({i: routing for i in range(3)}, max_tokens=8, keys=4, mask_tables=tables,
                         token_rows=token_rows, buffer_tokens=buffer_tokens)
    return tally, {layer: tally.stacked_table(layer) for layer in range(3)}


def _run_steps(tally: RoutingTally, tables: dict[int, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Decode-like and prefill-like steps of mixed keys and rows; row 2 is installed halfway, as
    `emo_set_subset` does it (flushing the buffered steps first)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(40):
        n = 7 if i % 9 == 0 else 1 + i % 3
        assert tally.token_rows is not None
        tally.token_keys[:n] = torch.randint(0, 4, (n,), generator=gen)
        tally.token_rows[:n] = torch.randint(0, 3, (n,), generator=gen)
        for layer in range(3):
            tally.record(layer, torch.randn(n, 16, generator=gen))
        if i == 20:
            tally.flush()
            for t in tables.values():
                t[2, 4:12] = float("-inf")
    return tally.take([1, 2, 3])


def test_buffered_steps_tally_as_step_by_step() -> None:
    """On a CPU steps are tallied together (every `buffer_tokens` tokens, when the next step
    would not fit, before a read): the same mass, counts and drift as tallying each step alone."""
    per_step = _run_steps(*_emo_tallies(0), seed=3)
    buffered_tally, tables = _emo_tallies(5)
    buffered = _run_steps(buffered_tally, tables, seed=3)
    assert buffered_tally.buffered == 0  # the read tallied what was left
    for name, want in per_step.items():
        assert torch.allclose(buffered[name].double(), want.double(), atol=1e-5), name
    assert int(per_step["tokens"].sum()) > 0 and int(per_step["counts0"].sum()) > 0


def test_a_buffered_step_nobody_prepared_is_not_counted() -> None:
    tally, _ = _emo_tallies(64)
    tally.token_keys[:2] = torch.tensor([1, 1])
    for layer in range(3):
        tally.record(layer, torch.randn(2, 16))
    for layer in range(3):  # a dummy run: its keys were reset to the trash key
        tally.record(layer, torch.randn(3, 16))
    assert tally.take([1])["tokens"].tolist() == [2]


def test_a_step_tallied_alone_after_buffered_ones_loses_none_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward traced by torch.compile tallies its step alone: steps buffered by eager forwards
    before it are tallied first, not overwritten."""
    per_step, _ = _emo_tallies(0)
    buffered, _ = _emo_tallies(64)
    gen = torch.Generator().manual_seed(5)
    steps = [(torch.randint(1, 4, (n,), generator=gen), [torch.randn(n, 16, generator=gen) for _ in range(3)])
             for n in (2, 3, 1)]
    for k, (keys, logits) in enumerate(steps):
        if k == 2:  # the last step as if traced: compiled forwards tally step by step
            monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        for tally in (per_step, buffered):
            tally.token_keys[: len(keys)] = keys
            for layer, x in enumerate(logits):
                tally.record(layer, x)
    want, got = per_step.take([1, 2, 3]), buffered.take([1, 2, 3])
    for name in want:
        assert torch.allclose(got[name].double(), want[name].double(), atol=1e-5), name
