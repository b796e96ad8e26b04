"""The engine-side routing tallies (emo_vllm.usage.RoutingUsage) against the reference routing,
driven as the runner and the model drive them, without an engine: the engine path is covered in
tests/api/test_live_routing.py (float32 engines), so this also builds the tallies the way vLLM builds a
bfloat16 model (under that default dtype), which those tests cannot reach cheaply."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from emo_serve import reference
from emo_serve.default_model import shipped_default_model
from emo_serve.checkpoint import Checkpoint
from emo_vllm import usage

CFG = Checkpoint(shipped_default_model()).config
LAYERS = CFG.num_hidden_layers


def request_state(model: str, user: str = "") -> SimpleNamespace:
    return SimpleNamespace(sampling_params=SimpleNamespace(extra_args={usage.MODEL_ARG: model, usage.USER_ARG: user}))


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def tallies(request: pytest.FixtureRequest):
    dtype = request.param
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # as vLLM does while it builds the model
    try:
        u = usage.RoutingUsage(max_tokens=16)
        blocks = []
        for layer in range(LAYERS):
            masks = torch.zeros(4, 16)
            masks[1, [0, 1, 2, 3, 4, 5, 6, 7]] = float("-inf")  # row 1: a subset keeping 8..15
            block = SimpleNamespace(routing=CFG.layer_routing(layer), subset_masks=masks,
                                    token_rows=torch.zeros(16, dtype=torch.long))
            u.add_block(layer, block)
            blocks.append(block)
    finally:
        torch.set_default_dtype(previous)
    return u, blocks, dtype


def step(u, blocks, states, token_batch_rows, rows, logits) -> None:
    """One engine step: the runner fills keys and rows, then each MoE layer captures."""
    u.fill(states, np.asarray(token_batch_rows))
    for b in blocks:
        b.token_rows[: len(rows)] = torch.tensor(rows)
    for layer, x in enumerate(logits):
        u.capture(layer, x)


def test_tallies_equal_the_reference(tallies) -> None:
    u, blocks, dtype = tallies
    gen = torch.Generator().manual_seed(0)
    states = [request_state("base", "alice"), request_state("sub")]
    seen: dict[str, list[torch.Tensor]] = {"base": [], "sub": []}
    for _ in range(20):  # more tokens than the buffer holds: it is flushed on the way
        logits = [torch.randn(3, 16, generator=gen).to(dtype) for _ in range(LAYERS)]
        step(u, blocks, states, [0, 0, 1], [0, 0, 1], logits)
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


def test_a_failing_tally_never_fails_the_step(tallies, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault injected on purpose (a tally that raises): the buffered tokens are dropped and
    logged, and the engine's step goes on."""
    u, blocks, _ = tallies
    logits = [torch.randn(3, 16) for _ in range(LAYERS)]
    for _ in range(5):  # 15 of 16 buffered tokens
        step(u, blocks, [request_state("m")], [0, 0, 0], [0, 0, 0], logits)
    monkeypatch.setattr(usage.RoutingUsage, "flush", lambda self: 1 / 0)
    step(u, blocks, [request_state("m")], [0, 0, 0], [0, 0, 0], logits)  # needs a flush: it raises
    monkeypatch.undo()
    assert u.pos == 3  # only this step's tokens are buffered
    assert u.drain()["keys"][0]["tokens"] == [3] * LAYERS


def test_steps_outside_the_runner_are_not_counted(tallies) -> None:
    """Warm-up and dummy runs call the model without the runner's step: nothing is tallied."""
    u, blocks, _ = tallies
    for layer in range(LAYERS):
        u.capture(layer, torch.randn(5, 16))
    assert u.drain()["keys"] == []


def test_capture_is_a_plain_call_eager_and_the_custom_op_when_compiled(tallies, monkeypatch) -> None:
    """Engines run eagerly (a plain call, the logits handed on as they are); a model traced by
    torch.compile keeps the opaque custom op in its graph (a copy comes out), and both tally alike."""
    u, blocks, dtype = tallies
    monkeypatch.setattr(usage, "_USAGE", u)
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(3, 16, generator=gen).to(dtype) for _ in range(LAYERS)]
    compiled = torch.compile(usage.capture_routing, backend="eager", fullgraph=True, dynamic=False)
    drained = []
    for run in (usage.capture_routing, compiled):
        u.fill([request_state("m", "u")], np.zeros(3, dtype=np.int64))
        for layer, x in enumerate(logits):
            out = run(x, layer)
            assert torch.equal(out, x)
            assert (out is x) == (run is usage.capture_routing), "eager hands the logits on; the op copies"
        drained.append(u.drain())
    eager, traced = drained
    assert eager["keys"][0]["tokens"] == [3] * LAYERS
    assert traced == eager
