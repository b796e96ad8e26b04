"""`emo_vllm.torch_moe`: the shared engine's MoE layer in plain torch (the plugin's routing_ops with
a dense expert computation) against a token-by-token oracle with no masks or slots, eagerly and
under `torch.compile(fullgraph=True)`, across steps that change per-token rows, mask rows, slot
contents and input in place; and `scripts/gpu-check.py --device cpu`, which does the same at a
larger size (on a GPU it replays a CUDA graph instead)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from emo_vllm.routing_ops import TRASH_KEY
from emo_vllm.torch_moe import (
    EmoMoeStack,
    ExpertWeights,
    SharedExpertRouting,
    load_slots,
    reference_moe,
    reference_tally,
    set_mask_row,
)

ROOT = Path(__file__).resolve().parents[2]
ROUTING = SharedExpertRouting(num_experts=16, top_k=4)  # 15 routed, top-3 of them + the shared one
HIDDEN, INTER, SLOTS, ROWS, LAYERS, KEYS = 32, 16, 8, 4, 2, 5
MAX_TOKENS, TOKENS = 24, 20  # the last 4 tokens are padding: row 0, the trash key, zero input


@dataclass
class Model:
    stack: EmoMoeStack
    weights: list[ExpertWeights]
    kept: list[dict[int, list[int]]]  # per layer: mask row -> kept routed ids (row 0: all)


@dataclass
class Step:
    x: torch.Tensor  # [MAX_TOKENS, HIDDEN]
    rows: list[int]  # per real token
    keys: list[int]


def build() -> Model:
    """Row 1 keeps 4 routed experts, row 2 three, row 3 two (fewer than top-3: a pick weighs 0),
    all 8 resident in the 8 slots (rows 1 and 3 share one). Same seed, same model."""
    torch.manual_seed(0)
    stack = EmoMoeStack(ROUTING, num_layers=LAYERS, hidden_size=HIDDEN, intermediate_size=INTER,
                        num_slots=SLOTS, mask_rows=ROWS, max_tokens=MAX_TOKENS, tally_keys=KEYS)
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    weights, kept = [], []
    for block in stack.moe_blocks():
        w = ExpertWeights.random(ROUTING, HIDDEN, INTER, generator=gen)
        w.load_into(block)
        ids = rng.sample(range(ROUTING.num_routed), SLOTS)
        rows = {1: ids[0:4], 2: ids[4:7], 3: [ids[0], ids[7]]}
        for row, row_ids in rows.items():
            set_mask_row(block, row, row_ids)
        load_slots(block, range(SLOTS), ids, w.w13[ids], w.w2[ids])
        weights.append(w)
        kept.append(rows)
    return Model(stack, weights, kept)


def change(model: Model) -> None:
    """Between steps: row 2 becomes three experts that are not resident, loaded into row 2's
    old slots (evicting them), and row 1 drops one expert."""
    for block, w, rows in zip(model.stack.moe_blocks(), model.weights, model.kept):
        fresh = sorted(set(range(ROUTING.num_routed)) - set(block.slot_occupant.tolist()))[:3]
        old_slots = [block.slot_occupant.tolist().index(e) for e in rows[2]]
        assert load_slots(block, old_slots, fresh, w.w13[fresh], w.w2[fresh]) == 3
        rows[2] = fresh
        rows[1] = rows[1][1:]
        set_mask_row(block, 2, rows[2])
        set_mask_row(block, 1, rows[1])


def make_step(seed: int) -> Step:
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(MAX_TOKENS, HIDDEN)
    x[:TOKENS] = torch.randn(TOKENS, HIDDEN, generator=gen)
    rows = torch.randint(0, ROWS, (TOKENS,), generator=gen).tolist()
    keys = torch.randint(1, KEYS, (TOKENS,), generator=gen).tolist()
    return Step(x, rows, keys)


def write_inputs(model: Model, step: Step) -> None:
    """What `step_inputs` does before a forward: each token's row and tally key, padding on row 0
    and the trash key."""
    pad = MAX_TOKENS - TOKENS
    model.stack.token_rows.copy_(torch.tensor(step.rows + [0] * pad))
    assert model.stack.tally is not None
    model.stack.tally.token_keys.copy_(torch.tensor(step.keys + [TRASH_KEY] * pad))


def run(model: Model, step: Step, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stack's output and, when eager, each MoE layer's input (the oracle routes from the same
    bits). No hooks on a compiled run: adding one would change what its guards saw."""
    inputs: list[torch.Tensor] = []
    hooks = [] if forward is not None else [
        b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
        for b in model.stack.moe_blocks()]
    write_inputs(model, step)
    try:
        with torch.no_grad():
            out = (model.stack if forward is None else forward)(step.x)
    finally:
        for h in hooks:
            h.remove()
    return out, inputs


def take(model: Model) -> dict[str, torch.Tensor]:
    assert model.stack.tally is not None
    return model.stack.tally.take(range(KEYS))


def check_reference(model: Model, step: Step, out: torch.Tensor, inputs: list[torch.Tensor]
                    ) -> dict[str, torch.Tensor]:
    """Each MoE layer against the oracle from that layer's input, and the step's tallies against
    the oracle's (the tallies it returns)."""
    layers = []
    for j, (block, w) in enumerate(zip(model.stack.moe_blocks(), model.weights)):
        x = inputs[j][:TOKENS]
        ref = reference_moe(x, w, ROUTING, [model.kept[j].get(r) for r in step.rows],
                            resident=set(block.slot_occupant.tolist()))
        torch.testing.assert_close(x + ref.out, inputs[j + 1][:TOKENS] if j + 1 < LAYERS else out[:TOKENS],
                                   atol=1e-5, rtol=1e-5)
        layers.append(ref)
    expected = reference_tally(layers, step.keys, KEYS, ROUTING)
    got = take(model)
    for name in ("counts0", "tokens", "hist"):  # keys 1..: the padding went to the trash key
        assert torch.equal(got[name][1:], expected[name][1:]), name
    for name in ("mass0", "outside_sum"):
        torch.testing.assert_close(got[name][1:].double(), expected[name][1:], atol=1e-5, rtol=1e-5)
    assert got["tokens"][TRASH_KEY] == MAX_TOKENS - TOKENS
    return expected


def test_eager_block_matches_reference_across_changes() -> None:
    model = build()
    step = make_step(10)
    # Every kind of token is there: unmasked (row 0), each subset row, several keys.
    assert set(step.rows) == set(range(ROWS)) and len(set(step.keys)) == KEYS - 1
    expected = check_reference(model, step, *run(model, step))
    assert expected["outside_sum"].sum() > 0  # some tokens' unmasked top-k fell outside their row
    change(model)
    for seed in (11, 12):
        step = make_step(seed)
        check_reference(model, step, *run(model, step))
    # A forward nobody prepared (a dummy run) counts nothing but trash.
    with torch.no_grad():
        model.stack(torch.randn(MAX_TOKENS, HIDDEN))
    got = take(model)
    assert got["tokens"].tolist() == [MAX_TOKENS] + [0] * (KEYS - 1)


def test_non_resident_pick_weighs_nothing() -> None:
    """An unmasked token may pick an expert that is in no slot: it adds nothing, but the tally
    still counts it as routed (the routing chose it; the slots are the engine's business)."""
    model = build()
    step = make_step(10)
    step.rows = [0] * TOKENS
    out, inputs = run(model, step)
    block, w = model.stack.moe_blocks()[0], model.weights[0]
    resident = set(block.slot_occupant.tolist())
    full = reference_moe(inputs[0][:TOKENS], w, ROUTING, [None] * TOKENS)
    assert any(set(c) - resident for c in full.chosen)
    assert not torch.allclose(inputs[0][:TOKENS] + full.out, inputs[1][:TOKENS], atol=1e-3)
    check_reference(model, step, out, inputs)


def buffers(model: Model) -> dict[str, int]:
    found = {name: t.data_ptr() for name, t in model.stack.named_buffers()}
    found |= {name: t.data_ptr() for name, t in model.stack.named_parameters()}
    assert model.stack.tally is not None
    found |= {f"tally.{i}": t.data_ptr() for i, t in enumerate(model.stack.tally.tensors())}
    found["tally.token_keys"] = model.stack.tally.token_keys.data_ptr()
    for i, group in enumerate(model.stack.tally.groups):
        found[f"tally.logits{i}"] = group.logits.data_ptr()
        if group.tables is not None:
            found[f"tally.tables{i}"] = group.tables.data_ptr()
    for block in model.stack.moe_blocks():
        assert block.token_rows.data_ptr() == model.stack.token_rows.data_ptr()  # one shared index
    return found


@dataclass
class Compiled:
    eager: Model
    compiled: Model
    forward: Callable[[torch.Tensor], torch.Tensor]
    seconds: float  # first call: trace + compile + run


def compile_backend() -> str:
    """Inductor where this machine can build its C++ kernels, else AOT autograd's eager graphs."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return "inductor"
    except Exception:  # no C++ compiler: inductor cannot run here
        return "aot_eager"


@pytest.fixture(scope="module")
def compiled() -> Iterator[Compiled]:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager, other = build(), build()
    forward = torch.compile(other.stack, fullgraph=True, backend=compile_backend())
    step = make_step(10)
    start = time.perf_counter()
    run(other, step, forward)
    seconds = time.perf_counter() - start
    take(other)
    yield Compiled(eager, other, forward, seconds)
    torch._dynamo.reset()


def test_compiled_matches_eager_without_recompiling(compiled: Compiled, record_property) -> None:
    record_property("compile_seconds", round(compiled.seconds, 1))
    record_property("backend", compile_backend())
    before = buffers(compiled.compiled)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, between in ((10, False), (11, True), (12, False)):
            if between:
                change(compiled.eager)
                change(compiled.compiled)
            step = make_step(seed)
            out_e, _ = run(compiled.eager, step)
            out_c, _ = run(compiled.compiled, step, compiled.forward)
            torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
            tally_e, tally_c = take(compiled.eager), take(compiled.compiled)
            assert tally_c.keys() == tally_e.keys()
            for name in tally_e:
                if name.startswith("mass") or name == "outside_sum":
                    torch.testing.assert_close(tally_c[name], tally_e[name], atol=1e-5, rtol=1e-5)
                else:
                    assert torch.equal(tally_c[name], tally_e[name]), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames  # one graph, reused
    assert buffers(compiled.compiled) == before


def test_compiled_with_a_dynamic_token_count() -> None:
    """As vLLM compiles: the token dimension marked dynamic, traced once at the largest batch, then
    run at other sizes with no recompilation (the tally slices its buffers at the step's count).
    AOT autograd's eager backend: what is checked is the trace and its guards, not the kernels."""
    eager, other = build(), build()
    forward = torch.compile(other.stack, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(5)
    for i, n in enumerate((MAX_TOKENS, 17, 5, 2)):
        x = torch.randn(n, HIDDEN, generator=gen)
        rows, keys = torch.randint(0, ROWS, (n,), generator=gen), torch.randint(1, KEYS, (n,), generator=gen)
        if i == 0:
            torch._dynamo.mark_dynamic(x, 0)
        for model in (eager, other):
            assert model.stack.tally is not None
            model.stack.token_rows[:n] = rows
            model.stack.tally.token_keys[:n] = keys
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=i > 0):
            torch.testing.assert_close(forward(x), eager.stack(x), atol=1e-5, rtol=1e-5)
        tally_e, tally_c = take(eager), take(other)
        for name in tally_e:
            torch.testing.assert_close(tally_c[name], tally_e[name], atol=1e-5, rtol=1e-5)
        assert int(tally_e["tokens"].sum()) == n


def test_buffers_keep_their_addresses() -> None:
    model = build()
    before = buffers(model)
    for seed in (10, 11):
        run(model, make_step(seed))
        take(model)
        change(model)
    assert buffers(model) == before


@pytest.mark.timeout(300)
def test_gpu_check_script_on_cpu() -> None:
    """The GPU check's CPU mode (eager, torch.compile and the oracle, no graph capture) passes."""
    # One thread: on a busy 2-core runner two OpenMP threads spin against each other (40x slower).
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu-check.py"), "--device", "cpu", "--small",
                           "--backend", "aot_eager", "--repeats", "2"],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
