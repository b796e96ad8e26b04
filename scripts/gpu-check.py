#!/usr/bin/env python3
"""Check that a shared engine's routing work (plugin/emo_vllm/routing_ops.py) gives the same answers
replayed from a CUDA graph as run eagerly, while masks, slots and per-token rows change in place.

    python scripts/gpu-check.py                        # CUDA, near the emo-1b14b shape, float32
    python scripts/gpu-check.py --dtype bfloat16       # the serving dtype (looser tolerances)
    python scripts/gpu-check.py --device cpu --small   # no GPU: eager vs torch.compile vs oracle (CI)

Needs torch only (no vLLM, no emo_serve): it builds `emo_vllm.torch_moe.EmoMoeStack`, the
plugin's MoE forward around the same routing_ops with a dense expert computation in torch, at the
released model's routing (128 experts, the last one shared, top-8; hidden 2048, intermediate
1024) with 32 expert slots, two MoE layers sharing one per-token row index and one routing tally.

On cuda the stack's forward is captured in a `torch.cuda.CUDAGraph` with static inputs (and,
where triton is installed, the `torch.compile`d forward is captured too, as vLLM compiles then
captures); then each step writes new per-token rows, tally keys and input into the persistent
buffers, and between steps mask rows are reinstalled and experts loaded into slots
(`load_slots`, evicting others), as the plugin's control calls do. Each replay is compared with
an eager run of an identical stack and with a token-by-token oracle from full expert weights
(`torch_moe.reference_moe`: no masks, no slots), and after the last step the tallies of the
replays with the eager ones and the oracle's. On cpu the same steps run eagerly and under
`torch.compile(fullgraph=True)`, without capture.

Prints a markdown table (check, max abs diff, tolerance, result), the versions and device, and
the time per step eagerly and replayed (or compiled); exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugin"))

import torch  # noqa: E402

from emo_vllm.routing_ops import TRASH_KEY, RoutingTally  # noqa: E402
from emo_vllm.torch_moe import (  # noqa: E402
    EmoMoeBlock,
    EmoMoeStack,
    ExpertWeights,
    ReferenceLayer,
    SharedExpertRouting,
    load_slots,
    reference_moe,
    reference_tally,
    set_mask_row,
)


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    experts: int  # incl. the shared one (the last id)
    top_k: int  # incl. the shared one
    slots: int
    layers: int
    tokens: int  # real tokens per step
    max_tokens: int  # the captured batch: the rest is padding (row 0, the trash key)
    rows: int  # mask rows incl. row 0 (unmasked)
    keys: int  # tally keys incl. the trash key
    routed: int  # at most this many routed experts per subset row (rows - 1 of them fit the slots)


# The released emo-1b14b MoE layer (emo_serve/demo.py's preset), 32 slots.
FULL = Shape(hidden=2048, intermediate=1024, experts=128, top_k=8, slots=32, layers=2, tokens=200,
             max_tokens=256, rows=4, keys=8, routed=10)
SMALL = Shape(hidden=64, intermediate=32, experts=16, top_k=4, slots=9, layers=2, tokens=40,
              max_tokens=48, rows=4, keys=6, routed=3)
# Absolute tolerance per unit of the compared output's largest magnitude.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


# -- the scenario: the same changes, applied to every stack ---------------------------------------
@dataclass
class Change:
    """One layer's control calls between steps: a mask row's new kept ids and the slot loads."""

    layer: int
    row: int
    kept: list[int]
    slots: list[int]
    ids: list[int]


@dataclass
class Step:
    name: str
    changes: list[Change]
    x: torch.Tensor  # [max_tokens, hidden], zero past the real tokens
    rows: list[int]  # per real token
    keys: list[int]
    kept: list[dict[int, list[int]]]  # what the oracle sees: per layer, row -> kept routed ids
    resident: list[set[int]]  # per layer, the experts in slots
    token_rows: torch.Tensor  # [max_tokens] on the device: `rows`, then padding on row 0
    token_keys: torch.Tensor  # [max_tokens] on the device: `keys`, then padding on the trash key


def make_steps(shape: Shape, routing: SharedExpertRouting, steps: int, seed: int, device: torch.device,
               dtype: torch.dtype) -> list[Step]:
    """Step 0 installs every subset row and loads its experts; odd steps change only the inputs
    (per-token rows, keys, hidden states); other even steps reinstall one row with experts not
    resident, loaded into slots that no other row needs (evicting their experts)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kept: list[dict[int, list[int]]] = [{} for _ in range(shape.layers)]
    occupant = [[-1] * shape.slots for _ in range(shape.layers)]
    out = []
    for s in range(steps):
        changes: list[Change] = []
        name = "inputs"
        if s % 2 == 0:
            rows = range(1, shape.rows) if s == 0 else [1 + (s // 2 - 1) % (shape.rows - 1)]
            name = "install all rows" if s == 0 else f"row {rows[0]} reinstalled, slots loaded"
            for layer in range(shape.layers):
                for row in rows:
                    changes.append(_reinstall(shape, rng, routing, kept[layer], occupant[layer], layer, row))
        x = torch.zeros(shape.max_tokens, shape.hidden)
        x[: shape.tokens] = torch.randn(shape.tokens, shape.hidden, generator=gen)
        token_rows = [rng.randrange(shape.rows) for _ in range(shape.tokens)]
        token_keys = [rng.randrange(1, shape.keys) for _ in range(shape.tokens)]
        pad = shape.max_tokens - shape.tokens
        out.append(Step(f"{s} ({name})", changes, x.to(device=device, dtype=dtype), token_rows, token_keys,
                        [dict(k) for k in kept], [set(o) - {-1} for o in occupant],
                        torch.tensor(token_rows + [0] * pad, device=device),
                        torch.tensor(token_keys + [TRASH_KEY] * pad, device=device)))
    return out


def _reinstall(shape: Shape, rng: random.Random, routing: SharedExpertRouting, kept: dict[int, list[int]],
               occupant: list[int], layer: int, row: int) -> Change:
    others = {e for r, ids in kept.items() if r != row for e in ids}
    choices = [e for e in range(routing.num_routed) if e not in others and e not in kept.get(row, ())]
    new = sorted(rng.sample(choices, rng.randint(1, shape.routed)))
    load = [e for e in new if e not in occupant]
    free = [s for s, e in enumerate(occupant) if e not in others and e not in new]
    rng.shuffle(free)
    slots = free[: len(load)]
    for s, e in zip(slots, load):
        occupant[s] = e
    kept[row] = new
    return Change(layer, row, new, slots, load)


def apply(stack: EmoMoeStack, weights: Sequence[ExpertWeights], changes: Sequence[Change]) -> None:
    blocks = stack.moe_blocks()
    for c in changes:
        set_mask_row(blocks[c.layer], c.row, c.kept)
        if c.ids:
            w = weights[c.layer]
            load_slots(blocks[c.layer], c.slots, c.ids, w.w13[c.ids], w.w2[c.ids])


def write_inputs(stack: EmoMoeStack, step: Step) -> None:
    """What the runner's `step_inputs` writes before each forward (the last layer resets the keys)."""
    stack.token_rows.copy_(step.token_rows)
    tally_of(stack).token_keys.copy_(step.token_keys)


def tally_of(stack: EmoMoeStack) -> RoutingTally:
    assert stack.tally is not None, "the stacks here are built with a tally"
    return stack.tally


# -- the runs -------------------------------------------------------------------------------------
Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Variant:
    """A stack and how a step runs on it (eagerly, compiled, or by replaying a graph)."""

    name: str
    stack: EmoMoeStack
    run: Runner


def graph_runner(stack: EmoMoeStack, forward: Runner, shape: Shape) -> Runner:
    """Capture `forward` on static input; the returned runner copies the input in and replays."""
    static_x = torch.zeros(shape.max_tokens, shape.hidden, device=stack.token_rows.device,
                           dtype=stack.moe_blocks()[0].w13.dtype)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up (and, compiled, the compile) off the capture; counts go to trash
            forward(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_x)
    tally_of(stack).take(range(shape.keys))  # the warm-up runs' trash

    def replay(x: torch.Tensor) -> torch.Tensor:
        static_x.copy_(x)
        graph.replay()
        return static_out.clone()
    return replay


@dataclass
class Row:
    check: str
    diff: float | None
    tol: float | None
    ok: bool | None  # None: skipped
    note: str = ""

    def cells(self) -> list[str]:
        result = "skip" if self.ok is None else ("pass" if self.ok else "**FAIL**")
        diff = "" if self.diff is None else f"{self.diff:.2e}"
        tol = "" if self.tol is None else f"{self.tol:.1e}"
        return [self.check, diff, tol, result + (f" ({self.note})" if self.note else "")]


def compare(check: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> Row:
    scale = max(1.0, float(want.abs().max()))
    diff = float((got.double() - want.double()).abs().max())
    return Row(check, diff, tol * scale, diff <= tol * scale and bool(torch.isfinite(got).all()))


def compare_tallies(check: str, got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                    keys: slice = slice(None)) -> list[Row]:
    """Each of `want`'s tallies (indexed by key first): counts exactly, sums of probabilities closely."""
    rows = []
    for name in sorted(want):
        g, w = got[name][keys], want[name][keys]
        if g.is_floating_point() or w.is_floating_point():
            rows.append(compare(f"{check}: {name}", g, w, 1e-5))
        else:
            diff = float((g.double() - w.double()).abs().max()) if g.numel() else 0.0
            rows.append(Row(f"{check}: {name}", diff, 0.0, g.shape == w.shape and bool(torch.equal(g, w))))
    return rows


def run_checks(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Every check's row, and the timing lines."""
    shape = SMALL if args.small else FULL
    device = torch.device(args.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    tol = TOLERANCE[dtype]
    routing = SharedExpertRouting(num_experts=shape.experts, top_k=shape.top_k)
    gen = torch.Generator().manual_seed(args.seed)
    weights = [ExpertWeights.random(routing, shape.hidden, shape.intermediate, generator=gen, device=device,
                                    dtype=dtype) for _ in range(shape.layers)]
    steps = make_steps(shape, routing, args.steps, args.seed + 1, device, dtype)

    def new_stack() -> EmoMoeStack:
        stack = EmoMoeStack(routing, num_layers=shape.layers, hidden_size=shape.hidden,
                            intermediate_size=shape.intermediate, num_slots=shape.slots, mask_rows=shape.rows,
                            max_tokens=shape.max_tokens, tally_keys=shape.keys, device=device, dtype=dtype)
        for block, w in zip(stack.moe_blocks(), weights):
            w.load_into(block)
        apply(stack, weights, steps[0].changes)
        return stack

    rows: list[Row] = []
    eager_stack = new_stack()
    eager = Variant("eager", eager_stack, eager_stack)
    others: list[Variant] = []
    compile_seconds: dict[str, float] = {}
    if device.type == "cuda":
        kinds = [("graph", False)]
        from torch.utils._triton import has_triton
        if not has_triton():
            rows.append(Row("compiled + graph", None, None, None, "no triton here: torch.compile skipped"))
        else:
            kinds.append(("compiled + graph", True))
        for name, compiled in kinds:
            stack = new_stack()
            forward: Runner = torch.compile(stack, fullgraph=True, backend=args.backend) if compiled else stack
            start = time.perf_counter()
            try:
                runner = graph_runner(stack, forward, shape)
            except Exception as exc:  # reported as the check's failure, with the reason
                rows.append(Row(f"{name}: capture", None, None, False, f"{type(exc).__name__}: {exc}"[:300]))
                continue
            compile_seconds[name] = time.perf_counter() - start
            rows.append(Row(f"{name}: capture", None, None, True))
            others.append(Variant(name, stack, runner))
    else:
        stack = new_stack()
        compiled_fn = torch.compile(stack, fullgraph=True, backend=args.backend)
        others.append(Variant(f"compiled ({args.backend})", stack, compiled_fn))

    reference_layers: list[list[ReferenceLayer]] = [[] for _ in range(shape.layers)]
    all_keys: list[int] = []
    maps_ok = True
    # Buffer contents change between steps, never what a trace guards on: a recompile is a failure.
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, step in enumerate(steps):
            if i:  # step 0's changes went in as the stacks were built
                for v in (eager, *others):
                    apply(v.stack, weights, step.changes)
            for v in (eager, *others):
                maps_ok &= all(slot_maps_match(b, resident) for b, resident in zip(v.stack.moe_blocks(), step.resident))
            write_inputs(eager.stack, step)
            out_eager, inputs = run_with_layer_inputs(eager.stack, step.x)
            n = shape.tokens
            for j in range(shape.layers):
                ref = reference_moe(inputs[j][:n], weights[j], routing,
                                    [step.kept[j].get(r) for r in step.rows], resident=step.resident[j])
                after = inputs[j + 1] if j + 1 < shape.layers else out_eager
                rows.append(compare(f"step {step.name}: eager vs oracle, layer {j}", after[:n],
                                    inputs[j][:n] + ref.out, tol))
                reference_layers[j].append(ref)
            all_keys += step.keys
            for v in others:
                write_inputs(v.stack, step)
                if v.name.startswith("compiled ("):
                    start = time.perf_counter()
                    out = v.run(step.x)
                    compile_seconds.setdefault(v.name, time.perf_counter() - start)
                else:
                    out = v.run(step.x)
                rows.append(compare(f"step {step.name}: {v.name} vs eager", out[:n], out_eager[:n], tol))
    rows.append(Row("slot maps (slot_of, slot_resident, slot_occupant) as planned, every step", None, None,
                    maps_ok))
    eager_tally = tally_of(eager.stack).take(range(shape.keys))
    merged = [ReferenceLayer(torch.cat([r.out for r in layer]), [c for r in layer for c in r.chosen],
                             torch.cat([r.probs for r in layer]), torch.cat([r.outside for r in layer]))
              for layer in reference_layers]
    want = reference_tally(merged, all_keys, shape.keys, routing)
    rows += compare_tallies("tally after all steps: eager vs oracle (keys 1..)", eager_tally, want, slice(1, None))
    for v in others:
        got = tally_of(v.stack).take(range(shape.keys))
        rows += compare_tallies(f"tally after all steps: {v.name} vs eager", got, eager_tally)

    timing = [f"compile/capture (incl. warm-up): {name} {s:.1f} s" for name, s in compile_seconds.items()]
    timing += time_steps(eager, others, shape, steps[-1], device, args.repeats)
    return rows, timing


def run_with_layer_inputs(stack: EmoMoeStack, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """An eager forward, and each MoE layer's input (the oracle routes from the same bits)."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: inputs.append(a[0].clone())) for b in stack.moe_blocks()]
    try:
        return stack(x), inputs
    finally:
        for h in hooks:
            h.remove()


def slot_maps_match(block: EmoMoeBlock, resident: set[int]) -> bool:
    occupant = block.slot_occupant.tolist()
    held = {e for e in occupant if e >= 0}
    of = block.slot_of.tolist()
    return (held == resident and set(block.slot_resident.nonzero().flatten().tolist()) == resident
            and all(occupant[of[e]] == e for e in resident))


def time_steps(eager: Variant, others: Sequence[Variant], shape: Shape, step: Step, device: torch.device,
               repeats: int) -> list[str]:
    """Mean wall time per step (tallies keep counting into the step's keys: checks are done)."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
    lines = []
    for v in (eager, *others):
        write_inputs(v.stack, step)
        v.run(step.x)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            write_inputs(v.stack, step)
            v.run(step.x)
        sync()
        lines.append(f"{v.name}: {(time.perf_counter() - start) / repeats * 1e3:.3f} ms per step "
                     f"({shape.max_tokens} tokens, {shape.layers} layers, mean of {repeats})")
    return lines


def describe(device: torch.device) -> str:
    where = (f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}" if device.type == "cuda"
             else f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    return f"torch {torch.__version__}, {where}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="a tiny shape (16 experts, hidden 64): CI")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--repeats", type=int, default=20, help="runs per timing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    # Exact float32 matmuls: TF32 would make eager and the oracle differ by ~1e-3.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        rows, timing = run_checks(args)
    shape = SMALL if args.small else FULL
    print(f"# gpu-check: {describe(torch.device(args.device))}")
    print(f"shape: {shape}, dtype {args.dtype}, {args.steps} steps\n")
    print("| check | max abs diff | tolerance | result |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")
    print()
    for line in timing:
        print(f"- {line}")
    failed = [r for r in rows if r.ok is False]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
