"""A load's reads from a cold page cache, with and without a readahead hint for the whole load.

    .venv/bin/python bench/bench_slot_reads.py --model /work/bigckpt/emo-1b14b --dtype bfloat16

What an expert-slot load does on the engine's staging thread (`emo_vllm.slots._stage`), outside the
engine: per layer, read `--routed` routed experts straight into checkpoint-layout tensors
(`Checkpoint.read_into`, the next layer read while this one is laid out) and lay them out for vLLM's
CPU kernel (`cpu_prepack_moe_weight`). Run as the plugin does it (`without prefetch`) and with every
layer's byte ranges handed to the kernel at the start (`posix_fadvise(WILLNEED)`, layer by layer
on a thread: the idea tried for issue 20, not adopted, see docs/benchmarks/slots.md), alternating,
`--rounds` times each, on the same experts. Before every run the checkpoint's shards
are dropped from the page cache (`POSIX_FADV_DONTNEED`, no root needed), so each run reads from the
disk. Prints seconds per run and the medians side by side; the disk's throughput varies between
runs on a shared machine, which is why the two alternate.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emo_serve.checkpoint import Checkpoint  # noqa: E402
from emo_serve.stream import plan_experts  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def drop_page_cache(base: Checkpoint) -> None:
    for shard in sorted({i.shard for i in base.tensors.values()}):
        fd = os.open(base.path(shard.rsplit("/", 1)[-1]), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def hint_whole_load(base: Checkpoint, layers: list[tuple[int, list[int]]]) -> None:
    """`posix_fadvise(WILLNEED)` over every planned tensor, in the order the load reads them."""
    fds: dict[str, int] = {}
    try:
        for layer, ids in layers:
            for planned in plan_experts(base, {layer: ids}):
                info = planned.sources[0]
                if info.shard not in fds:
                    fds[info.shard] = os.open(base.path(info.shard.rsplit("/", 1)[-1]), os.O_RDONLY)
                os.posix_fadvise(fds[info.shard], info.start, info.nbytes, os.POSIX_FADV_WILLNEED)
    finally:
        for fd in fds.values():
            os.close(fd)


def read_layer(base: Checkpoint, layer: int, ids: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inter, hidden = base.config.intermediate_size, base.config.hidden_size
    column = {e: j for j, e in enumerate(ids)}
    w13 = torch.empty(len(ids), 2 * inter, hidden, dtype=dtype)
    w2 = torch.empty(len(ids), hidden, inter, dtype=dtype)
    targets = []
    for planned in plan_experts(base, {layer: ids}):
        _, _, _, _, _, expert, proj, _ = planned.name.split(".")
        j = column[int(expert)]
        targets.append((planned.sources[0], {"gate_proj": w13[j, :inter], "up_proj": w13[j, inter:],
                                             "down_proj": w2[j]}[proj]))
    base.read_into(targets)
    return w13, w2


def one_load(location: str, plan: dict[int, list[int]], dtype: torch.dtype, *, prefetch: bool) -> float:
    from vllm import _custom_ops as ops

    base = Checkpoint(location)
    drop_page_cache(base)
    t0 = time.perf_counter()
    layers = sorted(plan.items())
    if prefetch:
        threading.Thread(target=hint_whole_load, args=(base, layers), daemon=True).start()
    with ThreadPoolExecutor(1) as reader:
        reading = reader.submit(read_layer, base, *layers[0], dtype)
        for k in range(len(layers)):
            w13, w2 = reading.result()
            if k + 1 < len(layers):
                reading = reader.submit(read_layer, base, *layers[k + 1], dtype)
            ops.cpu_prepack_moe_weight(w13, "vec"), ops.cpu_prepack_moe_weight(w2, "vec")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a local base checkpoint (e.g. the emo-1b14b preset)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    ap.add_argument("--routed", type=int, default=16, help="routed experts per layer of the load")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = Checkpoint(args.model)
    cfg = base.config
    rng = random.Random(args.seed)
    plan = {i: sorted(rng.sample(cfg.layer_routing(i).routed_ids, args.routed))
            for i in range(cfg.num_hidden_layers) if cfg.layer_routing(i).routed_ids}
    gib = sum(p.sources[0].nbytes for layer, ids in plan.items() for p in plan_experts(base, {layer: ids})) / 2**30
    print(f"{args.model}: {len(plan)} layers x {args.routed} routed experts, {gib:.2f} GiB, "
          f"torch threads {torch.get_num_threads()}")
    times: dict[str, list[float]] = {"without prefetch": [], "with prefetch": []}
    for r in range(args.rounds):
        for name in times:
            s = one_load(args.model, plan, DTYPES[args.dtype], prefetch=name == "with prefetch")
            times[name].append(s)
            print(f"round {r + 1} {name:17s} {s:6.2f} s  ({gib / s:.2f} GiB/s)", flush=True)
    print(f"{'':17s} {'median s':>9s} {'min s':>7s} {'max s':>7s}")
    for name, ts in times.items():
        print(f"{name:17s} {statistics.median(ts):9.2f} {min(ts):7.2f} {max(ts):7.2f}")


if __name__ == "__main__":
    main()
