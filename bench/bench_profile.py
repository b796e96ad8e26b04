"""Profiler wall time and peak memory: 5 examples of ~512 tokens, one fresh process per run.

    .venv/bin/python bench/bench_profile.py [--big /work/bigckpt/emo-1b14b] [--methods usage layerwise]

Each run is a subprocess (so peak RSS is that run's own: `VmHWM`, imports included) that opens
the checkpoint, profiles, and builds a subset. The tiny demo model is generated into a temp dir;
the big one must exist (`emo-serve demo-model DIR --preset emo-1b14b`, ~28 GB bf16). A script
that loads the whole model first needs > 28 GB and cannot run on a 24 GB machine at all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

RUN = textwrap.dedent("""
    import json, re, resource, sys, time
    import torch
    t0 = time.perf_counter()
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.layers import release_memory_eagerly
    from emo_serve.profiler import profile
    base, method, size, dtype, threads, texts = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
    torch.set_num_threads(threads)
    if sys.argv[7] == "1":
        release_memory_eagerly()  # as `emo-serve profile` does
    ckpt = Checkpoint(base)
    t1 = time.perf_counter()
    scores = profile(ckpt, texts, method=method, dtype=dtype, layerwise_size=size, progress=False)
    spec = scores.to_subset(size, name="bench")
    t2 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    print(json.dumps({"seconds": t2 - t1, "cpu": usage.ru_utime + usage.ru_stime, "startup": t1 - t0, "peak_rss": hwm, "tokens": scores.example_tokens,
                      "read": ckpt.stats.bytes_read, "kept_layer0": spec.experts[0][:8]}))
""")


def example_texts(n: int = 5) -> list[str]:
    """Five different ~512-token texts from Python's standard library (present everywhere)."""
    stdlib = Path(shutil.__file__).parent
    texts = []
    for name in ("textwrap.py", "argparse.py", "csv.py", "json/decoder.py", "shutil.py")[:n]:
        source = (stdlib / name).read_text(errors="replace")
        texts.append(source[2000:2000 + 2400])  # ~2,400 characters ~ 512+ tokens; capped at 512
    return texts


def run_one(base: Path, method: str, size: int, dtype: str, threads: int, texts: list[str],
            eager: bool = True) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", RUN, str(base), method, str(size), dtype, str(threads),
                           json.dumps(texts), "1" if eager else "0"], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{method} on {base} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big", type=Path, help="emo-1b14b demo checkpoint (skipped if not given)")
    ap.add_argument("--methods", nargs="+", default=["usage", "layerwise"])
    ap.add_argument("--tiny-methods", nargs="+", default=["usage", "frequency", "layerwise", "easy_ep", "random"])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--size", type=int, default=16, help="routed experts kept per layer (layerwise needs it)")
    ap.add_argument("--no-eager-release", action="store_true",
                    help="skip release_memory_eagerly() (glibc's adaptive mmap threshold)")
    args = ap.parse_args()

    texts = example_texts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from emo_serve.demo import write_demo_checkpoint

        tiny = write_demo_checkpoint(Path(tmp) / "tiny", "tiny")
        for method in args.tiny_methods:
            rows.append(("tiny (16 MB f32)", method, run_one(tiny, method, 4, args.dtype, args.threads, texts, not args.no_eager_release)))
    if args.big:
        for method in args.methods:
            rows.append((f"{args.big.name} (bf16 on disk)", method,
                         run_one(args.big, method, args.size, args.dtype, args.threads, texts,
                                 not args.no_eager_release)))

    print(f"examples: {len(texts)}, tokens each: {rows[0][2]['tokens']}, compute dtype {args.dtype}, "
          f"torch threads {args.threads}, eager release {not args.no_eager_release}, load average at end {os.getloadavg()[0]:.1f}")
    print("| checkpoint | method | wall time (s) | CPU time (s) | peak RSS (GB) | tensor bytes read (GB) |")
    print("|---|---|---|---|---|---|")
    for ckpt, method, r in rows:
        print(f"| {ckpt} | {method} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['peak_rss'] / 1e9:.2f} "
              f"| {r['read'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
