"""What routing capture costs a decode step, measured inside one engine so that nothing else differs.

    .venv/bin/python bench/bench_capture_ab.py --model DIR [--model DIR2 ...] [--pairs 30]

Server-level runs (bench/bench_routing.py) compare two engines started apart; on this 2-core
machine two starts of the same 14B-shape engine differ by +-20 % in decode tokens/s, far more
than the 3 % the capture may cost. Here one vLLM engine (offline `LLM`, the server's settings:
`--enforce-eager`, the plugin's masks and capture on) decodes the same greedy requests with
capture switched between requests, in rounds of rotating order: off (the MoE blocks no longer
record and tally, and the step inputs no longer write tally keys: the forward is eager, so that
holds from the next step, the same forward as `--no-routing-capture`); on with each step tallied
in its own forward (as on a GPU); on with steps tallied together every `CPU_TALLY_TOKENS` tokens
(what a CPU engine does). Batch 1 and 16 (16 prompts in one `generate`), `max_tokens` 64,
`ignore_eos`. Reported per model, batch and capture side: median tokens/s, the median of the
per-round ratios to OFF (target >= 0.97), and the worker's decode step time (`execute_model`,
which runs the step-inputs fill too), per round and pooled over every decode step of each side.
On this 2-core VM (vCPUs with steal time) a batch-1 run's tokens/s swings by
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

# Sides of the comparison: capture off; on, each step tallied in its forward; on, steps tallied
# together every CPU_TALLY_TOKENS tokens (what a CPU engine does).
MODES = ("off", "on, per step", "on, buffered")


def switch(worker: Any, mode: str) -> str:
    """On the worker: capture off or on (the MoE blocks' tally, the step inputs' tally keys), and
    on, whether steps are tallied one by one or buffered."""
    import emo_vllm.usage as usage
    from emo_vllm.routing_ops import CPU_TALLY_TOKENS
    from emo_vllm.step_inputs import step_inputs_of

    inputs = step_inputs_of(worker.model_runner.get_model())
    assert inputs is not None, "the engine has neither masks nor capture"
    saved = getattr(usage, "_bench_saved", None)
    if saved is None:
        saved = usage._bench_saved = (usage._USAGE, inputs.keys)
    tallies, keys = saved
    on = mode != "off"
    for block in tallies.blocks.values():  # eager forward: the tally runs or not, step by step
        block.routing_usage = tallies if on else None
    inputs.keys = keys if on else None
    tallies.tally.flush()
    tallies.tally.buffer_tokens = CPU_TALLY_TOKENS if mode == "on, buffered" else 0
    return mode


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


def measure(model: str, dtype: str, pairs: int, max_tokens: int) -> dict[str, dict[str, dict[str, list[float]]]]:
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
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for batch in (1, 16):
        runs: dict[str, dict[str, list[float]]] = {m: {"speed": [], "step": [], "steps": []} for m in MODES}
        for pair in range(pairs):
            order = MODES[pair % len(MODES):] + MODES[:pair % len(MODES)]
            for mode in order:
                llm.collective_rpc(switch, args=(mode,))
                llm.collective_rpc(step_times, args=(True,))
                t0 = time.perf_counter()
                llm.generate(prompts[:batch], params, use_tqdm=False)
                runs[mode]["speed"].append(batch * max_tokens / (time.perf_counter() - t0))
                # decode steps only: the first step of a generate is its prefill
                steps = llm.collective_rpc(step_times, args=(True,))[0][1:]
                runs[mode]["steps"] += steps
                runs[mode]["step"].append(statistics.median(steps) * 1e3)
            print(f"  {os.path.basename(model)} batch {batch} round {pair}: " + "; ".join(
                f"{m} {runs[m]['speed'][-1]:.1f} tokens/s, step {runs[m]['step'][-1]:.3f} ms" for m in MODES),
                flush=True)
        out[str(batch)] = runs
    llm.collective_rpc(switch, args=("on, buffered",))
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
    print(f"\nDecode tokens/s in one engine, capture off and on (each step tallied alone, or steps "
          f"tallied together), {args.pairs} rounds per cell in rotating order, {args.max_tokens} tokens per "
          "request: median (min-max); ratios are the capture side's speed over OFF's")
    print("| model | batch | capture | tokens/s | OFF tokens/s | ON/OFF (median of rounds) "
          "| decode step (ms) | decode step OFF (ms) | step speed ON/OFF (all steps' medians) "
          "| (all steps' 10th percentiles) |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def cell(xs: list[float], fmt: str = ".1f") -> str:
        return f"{statistics.median(xs):{fmt}} ({min(xs):{fmt}}-{max(xs):{fmt}})"

    for model, cells in results.items():
        for batch, runs in cells.items():
            off = runs["off"]
            for mode in MODES[1:]:
                on = runs[mode]
                ratios = [a / b for a, b in zip(on["speed"], off["speed"], strict=True)]
                print(f"| {os.path.basename(model.rstrip('/'))} | {batch} | {mode} | {cell(on['speed'])} | "
                      f"{cell(off['speed'])} | {cell(ratios, '.3f')} | {cell(on['step'], '.3f')} | "
                      f"{cell(off['step'], '.3f')} | "
                      f"{statistics.median(off['steps']) / statistics.median(on['steps']):.3f} | "
                      f"{p10(off['steps']) / p10(on['steps']):.3f} ({p10(on['steps']) * 1e3:.3f} / "
                      f"{p10(off['steps']) * 1e3:.3f} ms) |")
    print(f"\nload average at end {os.getloadavg()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
