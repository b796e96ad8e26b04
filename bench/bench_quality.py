"""What a subset costs, end to end on our own stack: the EMO paper's table at toy scale, and
`eval` on the full-size emo-1b14b demo preset.

Part 1, per domain x model (the shipped EMO demo model and its standard-MoE twin): subsets
picked by the profiler (`usage` and `layerwise`) from the 5 shipped profiling examples at 50 /
25 / 12.5 % of routed experts, plus random subsets of the same size (mean of 3 seeds) as the
floor, all scored by `evaluate` on the domain's 20 held-out documents: perplexity change and
next-token top-1 accuracy change vs the full model.

Part 2: wall time and peak RSS of `emo-serve eval` (a fresh process) with two 16-expert subsets
of a 28 GB emo-1b14b checkpoint, which does not fit in this machine's memory.

    .venv/bin/python bench/bench_quality.py [--big /work/bigckpt/emo-1b14b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "emo_serve" / "data" / "models"
DOMAINS = ("code", "prose", "legal", "math")
FRACTIONS = (0.5, 0.25, 0.125)
MAX_TOKENS = 256
RANDOM_SEEDS = (0, 1, 2)


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def quality_rows(model: str, domain: str) -> dict:
    """One row: the full model and every subset's change, on the held-out documents."""
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.evaluate import evaluate
    from emo_serve.profiler import profile
    from emo_serve.subset import random_subset

    ckpt = Checkpoint(MODELS_DIR / model)
    examples = read_jsonl(MODELS_DIR / "examples" / f"{domain}.jsonl")
    heldout = read_jsonl(MODELS_DIR / "heldout" / f"{domain}.jsonl")
    kw = dict(max_tokens_per_example=MAX_TOKENS, progress=False)
    usage = profile(ckpt, examples, method="usage", **kw)
    specs = []
    for f in FRACTIONS:
        specs.append(usage.to_subset(fraction=f, name=f"usage-{f}", checkpoint=ckpt))
        layerwise = profile(ckpt, examples, method="layerwise", layerwise_size=f, **kw)
        specs.append(layerwise.to_subset(fraction=f, name=f"layerwise-{f}", checkpoint=ckpt))
        size = usage.resolve_sizes(fraction=f)[0]
        specs += [random_subset(ckpt, size, f"random-{f}-{s}", seed=s) for s in RANDOM_SEEDS]
    report = evaluate(ckpt, specs, heldout, **kw)
    row = {"model": model, "domain": domain, "tokens": report.tokens, "ppl": report.base.perplexity,
           "acc": report.base.accuracy}
    by_name = {s.name: s for s in report.subsets}
    for f in FRACTIONS:
        for method in ("usage", "layerwise"):
            s = by_name[f"{method}-{f}"]
            row[f"{method}-{f}"] = {"routed": s.routed_experts[0], "dppl": s.relative_change,
                                    "dacc": s.accuracy_change, "mass": statistics.mean(
                                        m for m in s.router_mass if m is not None)}
        rand = [by_name[f"random-{f}-{seed}"] for seed in RANDOM_SEEDS]
        row[f"random-{f}"] = {"routed": rand[0].routed_experts[0],
                              "dppl": statistics.mean(s.relative_change for s in rand),
                              "dacc": statistics.mean(s.accuracy_change for s in rand)}
    return row


def quality_table(rows: list[dict], method: str) -> str:
    head = "| domain | model | full ppl | full acc | " + " | ".join(
        f"{f:.1%} ({rows[0][f'{method}-{f}']['routed']}) Δppl / Δacc" for f in FRACTIONS) + " |"
    lines = [head, "|" + "---|" * (4 + len(FRACTIONS))]
    for r in rows:
        cells = [f"{r[f'{method}-{f}']['dppl']:+.1%} / {r[f'{method}-{f}']['dacc']:+.1f}" for f in FRACTIONS]
        lines.append(f"| {r['domain']} | {r['model']} | {r['ppl']:.2f} | {r['acc']:.1%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_check(rows: list[dict]) -> list[str]:
    """The issue's goal at 25 %: EMO within 1 point / 5 % of its full model on every domain, and
    the standard MoE losing at least ten times more."""
    out = []
    for method in ("usage", "layerwise"):
        key = f"{method}-0.25"
        emo = {r["domain"]: r[key] for r in rows if r["model"] == "emo-demo"}
        moe = {r["domain"]: r[key] for r in rows if r["model"] == "moe-demo"}
        worst_acc = min(v["dacc"] for v in emo.values())
        worst_ppl = max(v["dppl"] for v in emo.values())
        ratio = min(-moe[d]["dacc"] / max(1e-9, -emo[d]["dacc"]) if emo[d]["dacc"] < 0 else float("inf")
                    for d in emo)
        out.append(f"{method} at 25 %: EMO worst Δacc {worst_acc:+.1f} points (goal >= -1), worst Δppl "
                   f"{worst_ppl:+.1%} (goal <= +5 %); standard MoE loses >= {ratio:.1f}x EMO's accuracy drop "
                   "on every domain (goal >= 10x)")
    return out


# -- part 2: the full-size demo preset --------------------------------------------------------
def big_eval(big: Path, dtype: str) -> dict:
    """`emo-serve eval` in a fresh process: wall time and its peak RSS (from the kernel)."""
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.subset import random_subset

    ckpt = Checkpoint(big)
    with tempfile.TemporaryDirectory() as tmp:
        subsets = []
        for seed in (0, 1):
            path = Path(tmp) / f"r16-{seed}.json"
            random_subset(ckpt, 16, f"r16-{seed}", seed=seed).save(path)
            subsets += ["--subset", str(path)]
        examples = Path(tmp) / "examples.jsonl"
        texts = read_jsonl(MODELS_DIR / "heldout" / "code.jsonl")[:1] + read_jsonl(MODELS_DIR / "heldout" / "prose.jsonl")[:1]
        examples.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        cli = "import sys; from emo_serve.cli import main; sys.exit(main())"
        cmd = [sys.executable, "-c", cli, "eval", "--base", str(big), *subsets, "--examples", str(examples),
               "--max-tokens-per-example", "128", "--dtype", dtype, "--quiet", "-o", str(Path(tmp) / "report.json")]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.monotonic() - t0
        if out.returncode:
            raise RuntimeError(f"emo-serve eval failed ({out.returncode}): {out.stderr[-2000:]}")
        report = json.loads((Path(tmp) / "report.json").read_text())
    # This process runs one such child only (see --measure-big), so this is that child's peak.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"dtype": dtype, "wall_s": wall, "peak_rss": peak, "tokens": report["tokens"],
            "checkpoint_bytes": ckpt.total_tensor_bytes, "table": out.stdout.strip()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--big", type=Path, help="an emo-1b14b demo checkpoint for part 2 (skipped if absent)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes for part 2")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--json", type=Path, help="also write all numbers as JSON")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine a second thread mostly spins)")
    p.add_argument("--measure-big", metavar="DTYPE", help=argparse.SUPPRESS)  # one part-2 run, in a child
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.measure_big:
        print(json.dumps(big_eval(args.big, args.measure_big)))
        return
    results: dict = {}
    if not args.skip_quality:
        t0 = time.monotonic()
        rows = []
        for domain in DOMAINS:
            for model in ("emo-demo", "moe-demo"):
                t1 = time.monotonic()
                rows.append(quality_rows(model, domain))
                print(f"{domain} {model}: {time.monotonic() - t1:.0f} s", file=sys.stderr, flush=True)
        results["quality"] = rows
        print(f"Held-out documents per domain: 20 (<= {MAX_TOKENS} tokens each); profiling examples: 5; "
              f"random = mean of {len(RANDOM_SEEDS)} seeds; Δacc in points. ({time.monotonic() - t0:.0f} s)\n")
        for method in ("usage", "layerwise", "random"):
            print(f"### {method}\n\n{quality_table(rows, method)}\n")
        for line in goal_check(rows):
            print(line)
    if args.big is not None and args.big.exists():
        runs = []
        for dtype in args.dtypes.split(","):
            # Each in a fresh parent too: RUSAGE_CHILDREN keeps the largest child seen so far.
            out = subprocess.run([sys.executable, __file__, "--big", str(args.big), "--measure-big", dtype],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        results["big"] = runs
        print("\n| emo-1b14b eval, 2 subsets x 16 experts | dtype | tokens | wall | peak RSS | checkpoint |")
        print("|---|---|---|---|---|---|")
        for r in runs:
            print(f"| base + 2 subsets, one streamed pass | {r['dtype']} | {r['tokens']} | {r['wall_s']:.0f} s | "
                  f"{r['peak_rss'] / 2**30:.2f} GiB | {r['checkpoint_bytes'] / 2**30:.1f} GiB |")
        print("\n" + runs[0]["table"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
