"""What routing capture costs a decode step, measured inside one engine so that nothing else differs.

    .venv/bin/python bench/bench_capture_ab.py --model DIR [--model DIR2 ...] [--pairs 30]

Server-level runs (bench/bench_routing.py) compare two engines started apart; on this 2-core
machine two starts of the same 14B-shape engine differ by +-20 % in decode tokens/s, far more
than the 3 % the capture may cost. Here one vLLM engine (offline `LLM`, the server's settings:
`--enforce-eager`, the plugin's masks and capture on) decodes the same greedy requests with
capture switched on and off between requests, ON/OFF pairs in alternating order: off means the
MoE blocks no longer record and tally (the forward is eager, so that holds from the next step:
the same forward as `--no-routing-capture`) and the step inputs no longer write tally keys. Batch 1 and 16 (16 prompts in one `generate`), `max_tokens`
64, `ignore_eos`. Reported per model and batch: median tokens/s each way and the median of the
per-pair ON/OFF ratios (target >= 0.97); and the same for the worker's decode step time
(`execute_model`, which runs the step-inputs fill too), per pair and pooled over every decode step
of each side. On this 2-core VM (vCPUs with steal time) a batch-1 run's tokens/s swings by
+-20 % from one run to the next; many short pairs, interleaved, and the medians of all their
steps resolve a few per cent where one long run each way cannot; their 10th percentiles too,
as noise on a VM only ever adds time to a step.

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
    """On the worker: capture on or off (the MoE blocks' tally, the step inputs' tally keys)."""
    import emo_vllm.usage as usage
    from emo_vllm.step_inputs import step_inputs_of

    inputs = step_inputs_of(worker.model_runner.get_model())
    assert inputs is not None, "the engine has neither masks nor capture"
    saved = getattr(usage, "_bench_saved", None)
    if saved is None:
        saved = usage._bench_saved = (usage._USAGE, inputs.keys)
    tallies, keys = saved
    for block in tallies.blocks.values():  # eager forward: the tally runs or not, step by step
        block.routing_usage = tallies if on else None
    inputs.keys = keys if on else None
    return on


def step_times(worker: Any, reset: bool) -> list[float]:
    """On the worker: the wall time of each `execute_model` since the last reset (the timer is
    installed at the first call). The step-inputs fill runs inside it, so a step's time holds
    everything capture adds to it, without the engine core's scheduling and IPC around it."""
    runner = worker.model_runner
    times = getattr(runner, "_bench_step_times", None)
    if times is None:
        times = runner._bench_step_times = []
        execute = runner.execute_model

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return execute(*args, **kwargs)
            finally:
                times.append(time.perf_counter() - t0)

        runner.execute_model = timed
    out = list(times)
    if reset:
        times.clear()
    return out


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
    llm.collective_rpc(step_times, args=(True,))
    out: dict[str, dict[str, list[float]]] = {}
    for batch in (1, 16):
        runs: dict[str, list[float]] = {"on": [], "off": [], "ratio": [], "step_on": [], "step_off": [],
                                        "step_ratio": [], "steps_on": [], "steps_off": []}
        for pair in range(pairs):
            speed, step = {}, {}
            for on in ((True, False) if pair % 2 == 0 else (False, True)):
                llm.collective_rpc(switch, args=(on,))
                llm.collective_rpc(step_times, args=(True,))
                t0 = time.perf_counter()
                llm.generate(prompts[:batch], params, use_tqdm=False)
                speed[on] = batch * max_tokens / (time.perf_counter() - t0)
                # decode steps only: the first step of a generate is its prefill
                steps = llm.collective_rpc(step_times, args=(True,))[0][1:]
                runs["steps_on" if on else "steps_off"] += steps
                step[on] = statistics.median(steps) * 1e3
            runs["on"].append(speed[True])
            runs["off"].append(speed[False])
            runs["ratio"].append(speed[True] / speed[False])
            runs["step_on"].append(step[True])
            runs["step_off"].append(step[False])
            runs["step_ratio"].append(step[False] / step[True])  # as a speed ratio: ON/OFF
            print(f"  {os.path.basename(model)} batch {batch} pair {pair}: on {speed[True]:.1f} off {speed[False]:.1f} "
                  f"tokens/s; decode step on {step[True]:.3f} off {step[False]:.3f} ms", flush=True)
        out[str(batch)] = runs
    llm.collective_rpc(switch, args=(True,))
    return out


def p10(xs: list[float]) -> float:
    """The 10th percentile: a step's cost with little of the VM's noise on it (steal time, other
    processes on the core only ever add), so a fixed cost that capture adds shows in it."""
    return statistics.quantiles(xs, n=10)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True, help="model dir (a base, subset or engine dir)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--pairs", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"load average at start {os.getloadavg()}", flush=True)
    results = {m: measure(m, args.dtype, args.pairs, args.max_tokens) for m in args.model}
    print(f"\nDecode tokens/s, capture ON vs OFF in one engine, {args.pairs} alternating pairs per cell, "
          f"{args.max_tokens} tokens per request: median (min-max)")
    print("| model | batch | capture ON tokens/s | capture OFF tokens/s | ON/OFF (median of pairs) "
          "| decode step ON (ms) | decode step OFF (ms) | step speed ON/OFF (median of pairs) "
          "| step speed ON/OFF (all steps' medians) | step speed ON/OFF (all steps' 10th percentiles) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model, cells in results.items():
        for batch, runs in cells.items():
            def cell(xs: list[float], fmt: str = ".1f") -> str:
                return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"
            print(f"| {os.path.basename(model.rstrip('/'))} | {batch} | {cell(runs['on'])} | {cell(runs['off'])} | "
                  f"{cell(runs['ratio'], '.3f')} | {cell(runs['step_on'], '.3f')} | {cell(runs['step_off'], '.3f')} | "
                  f"{cell(runs['step_ratio'], '.3f')} | "
                  f"{statistics.median(runs['steps_off']) / statistics.median(runs['steps_on']):.3f} "
                  f"({len(runs['steps_on'])} / {len(runs['steps_off'])} steps) | "
                  f"{p10(runs['steps_off']) / p10(runs['steps_on']):.3f} ({p10(runs['steps_on']) * 1e3:.3f} / "
                  f"{p10(runs['steps_off']) * 1e3:.3f} ms) |")
    print(f"\nload average at end {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
