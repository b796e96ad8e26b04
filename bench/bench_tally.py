"""What the in-forward routing tally costs one engine step, at the released model's shape.

    .venv/bin/python bench/bench_tally.py [--threads 2] [--reps 20]

Routing capture adds each step up inside the forward (`emo_vllm.routing_ops.RoutingTally`):
every MoE layer copies its router logits into a buffer and the last one routes the step's
tokens of all layers at once (with the mask rows of a shared engine) and adds them to the
per-key tallies. This times exactly that, with torch alone, at emo-1b14b's routing (16 MoE
layers, 128 experts incl. the shared one, top-8, float32 logits) and the server's tally size
(vLLM's default 128 sequences per step + 1 trash + 64 spare keys), for steps of 1 to 8192
tokens, with and without mask rows. The design it replaces buffered 8192 tokens and then
routed them all in one flush that stalled that step 0.4-1.1 s at this shape
(docs/benchmarks/routing.md); per step it only copied.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from emo_serve.config import LayerRouting
from emo_vllm.routing_ops import RoutingTally

LAYERS, EXPERTS, TOP_K, KEYS, ROWS = 16, 128, 8, 128 + 1 + 64, 65


def time_steps(tokens: int, masked: bool, reps: int) -> float:
    """Median CPU seconds of one step's record (all layers) + tally (this thread's CPU time: robust to
    other jobs on the machine)."""
    routing = LayerRouting(num_experts=EXPERTS, num_shared=1, top_k=TOP_K, norm_topk_prob=False)
    rows = torch.zeros(8192, dtype=torch.long)
    tables = {i: torch.zeros(ROWS, EXPERTS) for i in range(LAYERS)} if masked else None
    if tables is not None:
        for t in tables.values():
            t[1:, :96] = float("-inf")  # every subset keeps 31 routed experts + the shared one
        rows[:tokens] = torch.randint(0, ROWS, (tokens,))
    tally = RoutingTally({i: routing for i in range(LAYERS)}, max_tokens=8192, keys=KEYS, mask_tables=tables,
                         token_rows=rows if masked else None)
    logits = [torch.randn(tokens, EXPERTS) for _ in range(LAYERS)]
    times = []
    for _ in range(reps + 2):
        tally.token_keys[:tokens] = torch.randint(1, KEYS, (tokens,))
        t0 = time.thread_time()
        for layer, x in enumerate(logits):
            tally.record(layer, x)
        times.append(time.thread_time() - t0)
    return statistics.median(times[2:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (an engine's worker uses its cores)")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average at start {os.getloadavg()}; torch threads {args.threads}", flush=True)
    print("\n| step tokens | tally, no masks (ms) | tally, mask rows (ms) | per token, mask rows (us) |")
    print("|---|---|---|---|")
    for tokens in (1, 8, 32, 256, 2048, 8192):
        reps = args.reps if tokens <= 2048 else max(3, args.reps // 4)
        plain, masked = time_steps(tokens, False, reps), time_steps(tokens, True, reps)
        print(f"| {tokens} | {plain * 1e3:.3f} | {masked * 1e3:.3f} | {masked / tokens * 1e6:.1f} |", flush=True)
    print(f"\nload average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
