"""Subset export: bytes read, wall time and peak RSS, ours vs the naive path, side by side.

Ours: `Checkpoint` reads headers, then `export_subset` streams only the subset's byte ranges into
a new sharded checkpoint. Naive: what the EMO repository's pruning script does with the whole
model -- every tensor of every shard loaded into memory, the experts and router rows sliced out
of the full state dict, saved. Mmap: the same recipe on `safetensors.torch.load_file`, whose
tensors are lazily memory-mapped (local files only). Each run is a fresh subprocess, so peak RSS (VmHWM) is its own; sides
alternate within each round and the table gives medians (and the range of wall times).

    .venv/bin/python bench/bench_subset_read.py                  # 16 layers x 128 experts, hidden 512
    .venv/bin/python bench/bench_subset_read.py --ckpt /work/bigckpt/emo-1b14b --sizes 8,16,32 \\
        --rounds 1 --sides ours,mmap                              # the real-size demo model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_CKPT = Path("/work/bigckpt/bench-16x128-h512")
# The real model's layout (16 layers x 128 experts incl. 1 shared, top-8, bf16) at a quarter of
# its hidden size, so the naive side fits in memory many times over.
BENCH_SHAPE = dict(hidden_size=512, intermediate_size=256, num_attention_heads=8, vocab_size=32000)
MB = 1e6


def proc_status(key: str) -> int:
    """A byte count from /proc/self/status (VmHWM = peak RSS, RssFile = file pages mapped in)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_rss() -> int:
    return proc_status("VmHWM")


def subset_for(ckpt: Any, size: int, seed: int) -> Any:
    """`size` experts per layer in total: the shared one plus size - 1 random routed ones."""
    from emo_serve.subset import random_subset

    shared = ckpt.config.layer_routing(ckpt.config.moe_layers()[0]).num_shared
    return random_subset(ckpt, size - shared, f"bench-{size}", seed=seed)


def run_ours(ckpt_dir: str, size: int, seed: int, out: str) -> dict[str, Any]:
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.export import export_subset
    from emo_serve.stream import plan_subset

    base_rss = peak_rss()
    t0 = time.perf_counter()
    ckpt = Checkpoint(ckpt_dir)
    spec = subset_for(ckpt, size, seed)
    plan = plan_subset(ckpt, spec)
    export_subset(ckpt, spec, out)
    wall = time.perf_counter() - t0
    return {"wall": wall, "read": ckpt.stats.bytes_read + ckpt.header_bytes, "requests": ckpt.stats.requests,
            "subset": sum(t.nbytes for t in plan), "largest": max(t.nbytes for t in plan),
            "peak": peak_rss(), "import_rss": base_rss}


def run_naive(ckpt_dir: str, size: int, seed: int, out: str) -> dict[str, Any]:
    """Every tensor materialised in memory (as `from_pretrained` or a full `load_file` would do),
    then pruned and saved."""
    import safetensors.torch

    def load(shard: Path) -> dict[str, Any]:
        return safetensors.torch.load(shard.read_bytes())

    return _prune_whole_model(ckpt_dir, size, seed, out, load)


def run_mmap(ckpt_dir: str, size: int, seed: int, out: str) -> dict[str, Any]:
    """`safetensors.torch.load_file` as it is today: tensors lazily memory-mapped, so only the
    pages the pruning touches are read. Local files only (a remote checkpoint must be
    downloaded in full first)."""
    import safetensors.torch

    return _prune_whole_model(ckpt_dir, size, seed, out, safetensors.torch.load_file)


def _prune_whole_model(ckpt_dir: str, size: int, seed: int, out: str, load: Any) -> dict[str, Any]:
    """The EMO repository's pruning recipe: the whole state dict, then keep, rename, slice."""
    import re

    import safetensors.torch

    from emo_serve.checkpoint import Checkpoint

    base_rss, base_file = peak_rss(), proc_status("RssFile")
    t0 = time.perf_counter()
    ckpt = Checkpoint(ckpt_dir)  # headers only: to draw the same subset as our side
    spec = subset_for(ckpt, size, seed)
    full: dict[str, Any] = {}
    shards = sorted(Path(ckpt_dir).glob("*.safetensors"))
    for shard in shards:
        full.update(load(shard))
    expert = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
    router = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")
    pruned = {}
    for name, t in full.items():
        if m := expert.match(name):
            kept = spec.experts[int(m[1])]
            if int(m[2]) in kept:
                pruned[f"model.layers.{m[1]}.mlp.experts.{kept.index(int(m[2]))}.{m[3]}"] = t
        elif m := router.match(name):
            pruned[name] = t[spec.experts[int(m[1])]].contiguous()
        else:
            pruned[name] = t
    os.makedirs(out)
    safetensors.torch.save_file(pruned, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    wall = time.perf_counter() - t0
    materialised = load is not safetensors.torch.load_file
    read = sum(s.stat().st_size for s in shards) if materialised else proc_status("RssFile") - base_file
    return {"wall": wall, "read": read, "requests": len(shards),
            "subset": sum(t.numel() * t.element_size() for t in pruned.values()),
            "largest": max(t.numel() * t.element_size() for t in full.values()),
            "peak": peak_rss(), "import_rss": base_rss}


SIDES = {"ours": run_ours, "naive": run_naive, "mmap": run_mmap}


def child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401 -- imported before the baseline RSS is taken, on both sides

    import emo_serve.export  # noqa: F401

    result = SIDES[args.side](args.ckpt, args.size, args.seed, args.out)
    print(json.dumps(result))


def measure(ckpt: Path, side: str, size: int, seed: int, work: Path, mem_cap: int | None) -> dict[str, Any]:
    out = work / f"{side}-{size}-{seed}"
    cmd = [sys.executable, __file__, "--child", side, "--ckpt", str(ckpt), "--size", str(size),
           "--seed", str(seed), "--out", str(out)]
    if mem_cap and side == "naive":
        cmd = ["prlimit", f"--as={mem_cap}", *cmd]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {done.returncode}: {last[:120]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def ensure_checkpoint(path: Path) -> None:
    if path.exists():
        return
    from emo_serve.demo import write_demo_checkpoint

    print(f"generating {path} ...", file=sys.stderr)
    os.environ["TQDM_DISABLE"] = "1"
    write_demo_checkpoint(path, "emo-1b14b", **BENCH_SHAPE)


def fmt_row(size: int, side: str, runs: list[dict[str, Any]], ours: dict[str, float] | None) -> str:
    if any("error" in r for r in runs):
        return f"| {size} | {side} | – | – | – | – | – | – | {runs[0].get('error', '')} |"
    med = {k: statistics.median(r[k] for r in runs) for k in ("wall", "read", "subset", "peak", "largest")}
    walls = [r["wall"] for r in runs]
    target = 1.2 * runs[0]["largest"] + 300 * 2**20
    ratios = ""
    if ours:
        ratios = (f"read x{med['read'] / ours['read']:.1f}, time x{med['wall'] / ours['wall']:.1f}, "
                  f"RSS x{med['peak'] / ours['peak']:.1f}")
    return (f"| {size} | {side} | {med['subset'] / MB:,.0f} | {med['read'] / MB:,.0f} | "
            f"{med['read'] / med['subset']:.3f} | {med['wall']:.2f} ({min(walls):.2f}–{max(walls):.2f}) | "
            f"{med['peak'] / MB:,.0f} | {target / MB:,.0f} | {ratios} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, default=DEFAULT_CKPT)
    p.add_argument("--sizes", default="8,16,32,64,128", help="experts kept per layer, shared included")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sides", default="ours,naive,mmap", help="which of ours, naive, mmap to run")
    p.add_argument("--naive-mem-cap", type=int, help="run the naive side under `prlimit --as=BYTES` (so a "
                   "model larger than RAM fails cleanly instead of pushing the machine into OOM)")
    p.add_argument("--work", type=Path, help="where exports are written (default: a temp dir beside --ckpt)")
    p.add_argument("--child", choices=sorted(SIDES), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.side = args.child
        return child(args)

    ensure_checkpoint(args.ckpt)
    sizes = [int(s) for s in args.sizes.split(",")]
    sides = args.sides.split(",")
    assert sides[0] == "ours" and set(sides) <= set(SIDES), "--sides: ours first, then naive and/or mmap"
    results: dict[tuple[int, str], list[dict[str, Any]]] = {(s, side): [] for s in sizes for side in sides}
    with tempfile.TemporaryDirectory(dir=args.work or args.ckpt.parent, prefix=".bench-") as work:
        for r in range(args.rounds):
            for size in sizes:
                order = sides if r % 2 == 0 else sides[::-1]  # alternate who runs first
                for side in order:
                    res = measure(args.ckpt, side, size, seed=r, work=Path(work), mem_cap=args.naive_mem_cap)
                    results[(size, side)].append(res)
                    print(f"round {r} size {size} {side}: {res}", file=sys.stderr)

    from emo_serve.checkpoint import Checkpoint

    base = Checkpoint(args.ckpt)
    cfg = base.config
    print(f"\ncheckpoint: {args.ckpt} ({cfg.num_hidden_layers} layers x {cfg.num_experts} experts, hidden "
          f"{cfg.hidden_size}, {cfg.torch_dtype}, {base.total_tensor_bytes / MB:,.0f} MB of tensors in "
          f"{len({t.shard for t in base.tensors.values()})} shards); {args.rounds} round(s), medians\n")
    print("| experts/layer | side | subset MB | read MB | read / subset | wall s (range) | peak RSS MB | "
          "RSS target MB | naive / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        ours_runs = results[(size, "ours")]
        ours = None
        if not any("error" in r for r in ours_runs):
            ours = {k: statistics.median(r[k] for r in ours_runs) for k in ("wall", "read", "peak")}
        print(fmt_row(size, "ours", ours_runs, None))
        for side in sides[1:]:
            print(fmt_row(size, side, results[(size, side)], ours))
    print("\nread: ours = tensor bytes requested + metadata (config, index, headers, fingerprint sample); "
          "naive = every shard in full; mmap = file pages mapped in (RssFile growth). "
          "RSS target = 1.2 x largest tensor + 300 MB (the export target).")


if __name__ == "__main__":
    main()
