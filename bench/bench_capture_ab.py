"""What routing capture costs a decode step, measured inside one engine so that nothing else differs.

    .venv/bin/python bench/bench_capture_ab.py --model DIR [--model DIR2 ...] [--pairs 8]

Server-level runs (bench/bench_routing.py) compare two engines started apart; on this 2-core
machine two starts of the same 14B-shape engine differ by +-20 % in decode tokens/s, far more
than the 3 % the capture may cost. Here one vLLM engine (offline `LLM`, the server's settings:
`--enforce-eager`, the plugin's masks and capture on) decodes the same greedy requests with
capture switched on and off between requests, ON/OFF pairs in alternating order: off means the
worker's tallies are detached and the runner hook's filler removed (the custom op then only
clones the router logits, a few microseconds per layer). Batch 1 and 16 (16 prompts in one
`generate`), `max_tokens` 32, `ignore_eos`. Reported per model and batch: median tokens/s each
way and the median of the per-pair ON/OFF ratios (target >= 0.97).

Switching is done with `collective_rpc` of a function, which vLLM allows only with
`VLLM_ALLOW_INSECURE_SERIALIZATION=1` (set here, for this benchmark process only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any


def switch(worker: Any, on: bool) -> bool:
    """On the worker: attach or detach the capture's tallies and runner filler."""
    import emo_vllm.usage as usage

    runner = worker.model_runner
    saved = getattr(usage, "_bench_saved", None)
    if saved is None:
        saved = usage._bench_saved = (usage._USAGE, runner._emo_step_fillers["usage"])
    tallies, filler = saved
    usage._USAGE = tallies if on else None
    if on:
        runner._emo_step_fillers["usage"] = filler
    else:
        runner._emo_step_fillers.pop("usage", None)
    return on


def measure(model: str, dtype: str, pairs: int, max_tokens: int) -> dict[str, dict[str, list[float]]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, max_model_len=512, enforce_eager=True, seed=0,
              kv_cache_memory_bytes=1 << 30, worker_extension_cls="emo_vllm.worker.EmoWorkerExtension",
              additional_config={"emo_subset_slots": 4, "emo_usage": True})
    llm.collective_rpc("emo_masks_attach")
    llm.collective_rpc("emo_usage_attach")
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"emo_model": "ab"})
    prompts = [f"Request {i}: the court held that the" for i in range(16)]
    llm.generate(prompts, params)  # warm-up
    out: dict[str, dict[str, list[float]]] = {}
    for batch in (1, 16):
        runs: dict[str, list[float]] = {"on": [], "off": [], "ratio": []}
        for pair in range(pairs):
            speed = {}
            for on in ((True, False) if pair % 2 == 0 else (False, True)):
                llm.collective_rpc(switch, args=(on,))
                t0 = time.perf_counter()
                llm.generate(prompts[:batch], params, use_tqdm=False)
                speed[on] = batch * max_tokens / (time.perf_counter() - t0)
            runs["on"].append(speed[True])
            runs["off"].append(speed[False])
            runs["ratio"].append(speed[True] / speed[False])
            print(f"  {os.path.basename(model)} batch {batch} pair {pair}: on {speed[True]:.1f} off {speed[False]:.1f} "
                  f"tokens/s", flush=True)
        out[str(batch)] = runs
    llm.collective_rpc(switch, args=(True,))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model dir (a base, subset or engine dir)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average at start {os.getloadavg()}", flush=True)
    results = {m: measure(m, args.dtype, args.pairs, args.max_tokens) for m in args.model}
    print(f"\nDecode tokens/s, capture ON vs OFF in one engine, {args.pairs} alternating pairs per cell, "
          f"{args.max_tokens} tokens per request: median (min-max)")
    print("| model | batch | capture ON | capture OFF | ON/OFF (median of pairs) |")
    print("|---|---|---|---|---|")
    for model, cells in results.items():
        for batch, runs in cells.items():
            def cell(xs: list[float], fmt: str = ".1f") -> str:
                return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"
            print(f"| {os.path.basename(model.rstrip('/'))} | {batch} | {cell(runs['on'])} | {cell(runs['off'])} | "
                  f"{cell(runs['ratio'], '.3f')} |")
    print(f"\nload average at end {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
