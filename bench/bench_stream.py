"""Streamed and non-streamed completions through emo-serve against vLLM's own server, bracketed.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_stream.py                  # the tiny preset
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_stream.py --model emo_serve/data/models/emo-demo

Servers run one at a time, in this order (the bracket: the two vLLM runs measure the drift of the
machine over the run), or with `--rounds N` all up at once, idle but the one loaded, in N rounds
of every load on each in turn (see `interleave`):

  vLLM            `python -m vllm.entrypoints.openai.api_server` on the model directory (TCP)
  dedicated       `emo-serve serve --engine-mode dedicated --no-routing-capture` (the base)
  shared          `emo-serve serve --engine-mode shared --no-routing-capture`, traffic to a subset
                  (its per-request expert mask in effect)
  shared+capture  the same with `--routing-capture` (the product's default)
  vLLM            again

Every server gets the same engine options (`--dtype float32 --max-model-len 512`, 1 GiB of KV
cache, eager). The client is the official async `openai` client, as users run it: for each of
concurrency 1, 8 and 32, `--requests` completions per client of `--max-tokens` tokens
(`ignore_eos`, greedy), streamed then not. Per server and load: tokens/s over the whole load,
time to first token p50/p99 (streamed; non-streamed: the whole answer), inter-token latency
p50/p99 (the gaps between a stream's chunks) and the CPU seconds of every process of the server
(the front end, vLLM's API server, its engine core) per 1,000 completion tokens.

The subset on the shared sides has every routed expert but one per layer, so its mask is applied
but it computes like the base.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from openai import AsyncOpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import free_port, pct  # noqa: E402

CLI = "import sys; from emo_serve.cli import main; sys.exit(main())"
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "512"]
PROMPT = "def fibonacci(n):\n    "
SUBSET = "task"
IDLE_WAIT = 1.5  # seconds between interleaved runs (vLLM's pollers spin 1 s after their last message)


@dataclass
class Side:
    label: str
    cmd: list[str]
    url: str
    model: str
    log: Path
    emo: bool
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 1200) -> None:
        with open(self.log, "ab") as logf:
            # Its own process group (stopped as one) in this session: with Linux's autogroup
            # scheduler a server in a session of its own shares the CPU with this load generator
            # as one unit, and vLLM's polling engine core then delays its API server (see
            # docs/benchmarks/stream.md). Every side is started the same way.
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         process_group=0)
        probe = "/ready" if self.emo else "/health"
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + probe, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.label} not ready after {timeout} s; see {self.log}")

    def processes(self) -> dict[int, str]:
        """pid -> role of every live process of this server (the engines run in their own sessions
        but are the front end's children)."""
        assert self.proc is not None
        top = psutil.Process(self.proc.pid)
        out = {top.pid: "front end" if self.emo else "vLLM API server"}
        for p in top.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
                name = p.name()
            except psutil.Error:
                continue
            if "api_server" in cmd or "engines.launch" in cmd:
                out[p.pid] = "vLLM API server"
            elif "EngineCore" in name or "EngineCore" in cmd:
                out[p.pid] = "engine core"
            elif "resource_tracker" in cmd or "multiprocessing" in cmd:
                continue
            else:
                out[p.pid] = name
        return out

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pids = list(self.processes())
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(180)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in pids:  # engines outliving their server would load the next side
            try:
                psutil.Process(pid).wait(60)
            except psutil.TimeoutExpired:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def cpu_by_role(pids: dict[int, str]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for pid, role in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return out


@dataclass
class Answer:
    start: float
    chunks: list[float]  # perf_counter of every chunk with text (streamed), or of the answer
    tokens: int


async def one(client: AsyncOpenAI, model: str, max_tokens: int, stream: bool) -> Answer:
    t0 = time.perf_counter()
    extra = {"ignore_eos": True}
    if not stream:
        r = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                            extra_body=extra)
        return Answer(t0, [time.perf_counter()], r.usage.completion_tokens if r.usage else 0)
    times, tokens = [], 0
    s = await client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in s:
        if chunk.choices:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return Answer(t0, times, tokens)


async def load(url: str, model: str, concurrency: int, per_client: int, max_tokens: int,
               stream: bool) -> tuple[list[Answer], float]:
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    try:
        await one(client, model, 4, stream)  # warm this client's connection

        async def worker() -> list[Answer]:
            return [await one(client, model, max_tokens, stream) for _ in range(per_client)]

        t0 = time.perf_counter()
        answers = [a for w in await asyncio.gather(*(worker() for _ in range(concurrency))) for a in w]
        return answers, time.perf_counter() - t0
    finally:
        await client.close()


def measure_load(side: Side, args: argparse.Namespace, concurrency: int, stream: bool) -> dict[str, float]:
    """One load (a concurrency, streamed or not) on one server: its row of figures."""
    per_client = max(1, args.requests // concurrency) if concurrency > 8 else args.requests
    pids = side.processes()
    cpu0 = cpu_by_role(pids)
    answers, wall = asyncio.run(load(side.url, side.model, concurrency, per_client, args.max_tokens, stream))
    cpu1 = cpu_by_role(pids)
    tokens = sum(a.tokens for a in answers)
    first = [(a.chunks[0] - a.start) * 1e3 for a in answers]
    gaps = [(b - a) * 1e3 for x in answers for a, b in zip(x.chunks, x.chunks[1:])]
    row = {"tokens/s": tokens / wall, "TTFT p50 (ms)": pct(first, 50), "TTFT p99 (ms)": pct(first, 99)}
    if gaps:
        row |= {"ITL p50 (ms)": pct(gaps, 50), "ITL p99 (ms)": pct(gaps, 99)}
    for role in sorted(cpu1):
        row[f"CPU s/1k tok: {role}"] = (cpu1[role] - cpu0.get(role, 0.0)) / tokens * 1e3
    return row


def loads(args: argparse.Namespace) -> list[tuple[int, str]]:
    return [(c, kind) for c in args.concurrency for kind in ("stream", "plain")]


def measure(side: Side, args: argparse.Namespace) -> dict[tuple[int, str], dict[str, float]]:
    out = {}
    for key in loads(args):
        out[key] = row = measure_load(side, args, key[0], key[1] == "stream")
        print(f"  {side.label} c={key[0]} {key[1]}: " + ", ".join(f"{k}={v:.1f}" for k, v in row.items()), flush=True)
    return out


def interleave(sides: list[Side], args: argparse.Namespace) -> dict[str, dict[tuple[int, str], list[dict[str, float]]]]:
    """Every server up at once, idle but one: each round runs each load on every server in turn,
    in an order rotated each round, so that the machine's drift (this VM's vCPUs change speed from
    one minute to the next) falls on every side alike and each emo-serve figure is compared with
    vLLM's from the same round. `IDLE_WAIT` between runs lets the last server's vLLM pollers,
    which busy-loop for a second after their last message, go idle first."""
    out: dict[str, dict[tuple[int, str], list[dict[str, float]]]] = {s.label: defaultdict(list) for s in sides}
    for r in range(args.rounds):
        order = sides[r % len(sides):] + sides[: r % len(sides)]
        for key in loads(args):
            for side in order:
                time.sleep(IDLE_WAIT)
                out[side.label][key].append(measure_load(side, args, key[0], key[1] == "stream"))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(
            f"{s.label} {out[s.label][loads(args)[0]][-1]['tokens/s']:.0f} tok/s" for s in sides)
            + f" (c={loads(args)[0][0]} {loads(args)[0][1]})", flush=True)
    return out


def make_sides(model: str, work: Path) -> list[Side]:
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}, "HF_HUB_OFFLINE": "1"}

    def vllm(label: str) -> Side:
        port = free_port()
        return Side(label, [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                            "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(port),
                            "--enforce-eager", "--kv-cache-memory-bytes", str(1024**3),
                            "--disable-uvicorn-access-log", *ENGINE_FLAGS],
                    f"http://127.0.0.1:{port}", "m", work / f"{label}.log", emo=False, env=env)

    def emo(label: str, mode: str, capture: bool, served: str) -> Side:
        port = free_port()
        return Side(label, [sys.executable, "-c", CLI, "serve", "--model", model, "--served-model-name", "m",
                            "--port", str(port), "--state-dir", str(work / f"state-{label}"),
                            "--engine-mode", mode, "--routing-capture" if capture else "--no-routing-capture",
                            "--max-engines", "1", "--log-level", "warning", "--kv-cache-gb", "1", *ENGINE_FLAGS],
                    f"http://127.0.0.1:{port}", served, work / f"{label}.log", emo=True, env=env)

    return [vllm("vLLM (1)"), emo("dedicated", "dedicated", False, "m"),
            emo("shared", "shared", False, SUBSET), emo("shared+capture", "shared", True, SUBSET), vllm("vLLM (2)")]


def create_subset(side: Side) -> None:
    """A subset of every routed expert but the last of each layer: the mask is applied, the
    compute stays the base's."""
    from emo_serve.checkpoint import Checkpoint

    cfg = Checkpoint(side.cmd[side.cmd.index("--model") + 1]).config
    experts = [list(cfg.layer_routing(i).routed_ids)[:-1] for i in range(cfg.num_hidden_layers)]
    r = httpx.post(side.url + "/v1/subsets", json={"name": SUBSET, "experts": experts, "load": True}, timeout=600)
    if r.status_code != 201:
        raise RuntimeError(f"{side.label}: POST /v1/subsets answered {r.status_code}: {r.text[:300]}")


def number(value: float) -> str:
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def write_json(path: str, results: dict) -> None:
    """The raw figures, loads as `c=N stream|plain` (per round, as lists, when interleaved)."""
    Path(path).write_text(json.dumps({label: {f"c={k[0]} {k[1]}": v for k, v in r.items()}
                                      for label, r in results.items()}, indent=1))


def report(results: dict[str, dict[tuple[int, str], dict[str, float]]], args: argparse.Namespace) -> None:
    labels = list(results)
    base = [label for label in labels if label.startswith("vLLM")]
    print()
    print(f"model: {args.model_label}; {args.max_tokens} tokens per completion; servers in the order of the "
          "columns; ratio: emo-serve / mean of the two vLLM runs (tokens/s), or difference (ms)")
    print("| load | metric | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for key in results[labels[0]]:
        metrics = list(dict.fromkeys(m for label in labels for m in results[label].get(key, {})))
        for metric in metrics:
            ref = [results[b][key][metric] for b in base if metric in results[b].get(key, {})]
            ref_mean = statistics.mean(ref) if ref else None
            cells = []
            for label in labels:
                value = results[label].get(key, {}).get(metric)
                if value is None:
                    cells.append("")
                    continue
                cell = number(value)
                if ref_mean and not label.startswith("vLLM") and not metric.startswith("CPU"):
                    if metric == "tokens/s":
                        cell += f" ({value / ref_mean:.2f}x)"
                    else:
                        cell += f" ({value - ref_mean:+.1f})"
                cells.append(cell)
            print(f"| c={key[0]} {key[1]} | {metric} | " + " | ".join(cells) + " |")


def report_interleaved(rounds: dict[str, dict[tuple[int, str], list[dict[str, float]]]],
                       args: argparse.Namespace) -> None:
    labels = list(rounds)
    ref = labels[0]
    print()
    print(f"model: {args.model_label}; {args.max_tokens} tokens per completion; {args.rounds} interleaved rounds, "
          "every server up, one loaded at a time; value: median over rounds; ratio: median over rounds of "
          f"emo-serve / {ref} in the same round (tokens/s), or of the difference (ms), with its range")
    print("| load | metric | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for key in rounds[ref]:
        metrics = list(dict.fromkeys(m for label in labels for row in rounds[label][key] for m in row))
        for metric in metrics:
            cells = []
            for label in labels:
                values = [row[metric] for row in rounds[label][key] if metric in row]
                if not values:
                    cells.append("")
                    continue
                value = statistics.median(values)
                cell = number(value)
                refs = [row.get(metric) for row in rounds[ref][key]]
                if label != ref and not metric.startswith("CPU") and all(v is not None for v in refs):
                    if metric == "tokens/s":
                        ratios = [v / b for v, b in zip(values, refs) if b]
                        cell += f" ({statistics.median(ratios):.2f}x, {min(ratios):.2f}-{max(ratios):.2f})"
                    else:
                        diffs = [v - b for v, b in zip(values, refs) if b is not None]
                        cell += f" ({statistics.median(diffs):+.1f}, {min(diffs):+.1f} to {max(diffs):+.1f})"
                cells.append(cell)
            print(f"| c={key[0]} {key[1]} | {metric} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the tiny preset, generated)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=8,
                    help="completions per client (above concurrency 8: this many x 8 in all)")
    ap.add_argument("--sides", nargs="+", help="only these (labels as in the table)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="interleave: every server up at once (one vLLM), this many rounds of every load on "
                         "each in turn; ratios per round (default: one server at a time, bracketed by vLLM)")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from emo_serve.demo import write_demo_checkpoint

            model = str(write_demo_checkpoint(work / "tiny", "tiny", seed=0))
        args.model_label = args.model or "tiny preset"
        if args.rounds:
            sides = [s for s in make_sides(model, work)[:-1] if not args.sides or s.label in args.sides]
            try:
                for side in sides:
                    print(f"{side.label}: starting", flush=True)
                    side.start()
                    if side.model == SUBSET:
                        create_subset(side)
                rounds = interleave(sides, args)
            finally:
                for side in sides:
                    side.stop()
            report_interleaved(rounds, args)
            if args.json:
                write_json(args.json, rounds)
            return
        results: dict[str, dict[tuple[int, str], dict[str, float]]] = {}
        for side in make_sides(model, work):
            if args.sides and side.label not in args.sides:
                continue
            print(f"{side.label}: starting", flush=True)
            try:
                side.start()
                if side.model == SUBSET:
                    create_subset(side)
                results[side.label] = measure(side, args)
            finally:
                side.stop()
        report(results, args)
        if args.json:
            write_json(args.json, results)


if __name__ == "__main__":
    main()
