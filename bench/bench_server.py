"""Front end vs vLLM's own OpenAI server on the same model directory, same machine, same run.

    .venv/bin/python bench/bench_server.py [--model DIR] [--rounds 3]
    .venv/bin/python bench/bench_server.py --subset-only --model /work/bigckpt/emo-1b14b

Per round, each side is started alone (never two engines at once), in alternating order:
`direct` is `python -m vllm.entrypoints.openai.api_server` on TCP; `emo-serve` is `emo-serve
serve` with one engine, the same vLLM server behind a Unix socket. Measured with the same async
client: time to first token (TTFT) and aggregate streamed tokens/s with 1 and 16 concurrent
streaming clients, and requests/s of short non-streaming completions (16 concurrent clients).
Reported: the median over rounds, and the spread (min-max of the round values).

Also: seconds from `POST /v1/subsets` (5 examples, load) to the first streamed token of the new
subset, broken into profiling, engine load and the first request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

EXAMPLES = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.getcwd())\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "def mean(xs):\n    return sum(xs) / len(xs)\n",
]  # plain text: the emo-1b14b demo checkpoint ships no chat template
PROMPT = "def fibonacci(n):\n    "
ENGINE_FLAGS = ["--dtype", "float32", "--max-model-len", "512"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Side:
    name: str
    cmd: list[str]
    url: str
    model: str
    log: Path
    proc: subprocess.Popen | None = None

    def start(self, timeout: float = 1200) -> float:
        t0 = time.monotonic()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited; see {self.log}")
            try:
                probe = "/ready" if self.name == "emo-serve" else "/health"
                if httpx.get(self.url + probe, timeout=5).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@dataclass
class Stream:
    ttft: float
    tokens: int
    seconds: float


async def stream_once(client: httpx.AsyncClient, model: str, max_tokens: int) -> Stream:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if first is None:
                    first = time.perf_counter()
                tokens += 1
    end = time.perf_counter()
    assert first is not None
    return Stream(first - t0, tokens, end - t0)


async def streams(url: str, model: str, clients: int, per_client: int, max_tokens: int) -> tuple[list[float], float]:
    """TTFTs of every request and the aggregate tokens/s of the whole run."""
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        await stream_once(c, model, 4)  # warm the connection and the engine

        async def worker() -> list[Stream]:
            return [await stream_once(c, model, max_tokens) for _ in range(per_client)]

        t0 = time.perf_counter()
        results = [s for w in await asyncio.gather(*(worker() for _ in range(clients))) for s in w]
        wall = time.perf_counter() - t0
    return [s.ttft for s in results], sum(s.tokens for s in results) / wall


async def short_requests(url: str, model: str, total: int, clients: int) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as c:
        body = {"model": model, "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        (await c.post("/v1/completions", json=body)).raise_for_status()
        queue = list(range(total))

        async def worker() -> None:
            while queue:
                queue.pop()
                (await c.post("/v1/completions", json=body)).raise_for_status()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return total / (time.perf_counter() - t0)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


def measure(side: Side, args: argparse.Namespace) -> dict[str, float]:
    out: dict[str, float] = {}
    ttft1, tps1 = asyncio.run(streams(side.url, side.model, 1, args.requests_1, args.max_tokens))
    ttft16, tps16 = asyncio.run(streams(side.url, side.model, 16, args.requests_16, args.max_tokens))
    out["TTFT p50, 1 stream (ms)"] = pct(ttft1, 50) * 1000
    out["TTFT p99, 1 stream (ms)"] = pct(ttft1, 99) * 1000
    out["tokens/s, 1 stream"] = tps1
    out["TTFT p50, 16 streams (ms)"] = pct(ttft16, 50) * 1000
    out["TTFT p99, 16 streams (ms)"] = pct(ttft16, 99) * 1000
    out["tokens/s, 16 streams"] = tps16
    out["short completions req/s (16 clients)"] = asyncio.run(short_requests(side.url, side.model, args.short, 16))
    return out


def sides(model: str, work: Path) -> list[Side]:
    p1, p2 = free_port(), free_port()
    direct = Side("direct", [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                             "--served-model-name", "m", "--host", "127.0.0.1", "--port", str(p1),
                             "--enforce-eager", "--kv-cache-memory-bytes", str(1024**3),
                             "--disable-uvicorn-access-log", *ENGINE_FLAGS],
                  f"http://127.0.0.1:{p1}", "m", work / "direct.log")
    front = Side("emo-serve", [sys.executable, "-c", "import sys; from emo_serve.cli import main; sys.exit(main())",
                               "serve", "--model", model, "--served-model-name", "m", "--port", str(p2),
                               "--state-dir", str(work / "state"), "--max-engines", "1", "--log-level", "warning",
                               "--kv-cache-gb", "1", *ENGINE_FLAGS],
                 f"http://127.0.0.1:{p2}", "m", work / "emo-serve.log")
    return [direct, front]


def compare(args: argparse.Namespace, model: str, work: Path) -> None:
    env_clean = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    os.environ.clear()
    os.environ.update(env_clean)
    results: dict[str, list[dict[str, float]]] = {"direct": [], "emo-serve": []}
    order = sides(model, work)
    for r in range(args.rounds):
        for side in (order if r % 2 == 0 else order[::-1]):
            try:
                secs = side.start()
                values = measure(side, args)
                values["start to ready (s)"] = secs
                results[side.name].append(values)
                print(f"round {r + 1} {side.name}: " + ", ".join(f"{k}={v:.1f}" for k, v in values.items()),
                      flush=True)
            finally:
                side.stop()
    print()
    print(f"model: {model}; {args.rounds} rounds, sides alternated; median (min-max over rounds)")
    print("| metric | vLLM server direct | emo-serve front end | front end vs direct |")
    print("|---|---|---|---|")
    for key in results["direct"][0]:
        d = [x[key] for x in results["direct"]]
        f = [x[key] for x in results["emo-serve"]]
        md, mf = statistics.median(d), statistics.median(f)
        delta = (mf - md) / md * 100 if md else float("nan")
        unit = " ms" if "(ms)" in key else ""
        diff = f"{mf - md:+.1f}{unit} ({delta:+.1f} %)"
        print(f"| {key} | {md:.1f} ({min(d):.1f}-{max(d):.1f}) | {mf:.1f} ({min(f):.1f}-{max(f):.1f}) | {diff} |")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def paired_run(url: str, socket_path: str, model: str, pairs: int, max_tokens: int,
                     pids: dict[str, int]) -> dict[str, dict[str, float]]:
    """Requests alternate between the front end and its engine's own socket (order flipped every
    pair), so both see the same machine load; CPU time of each server process is read around."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as fe, \
            httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=socket_path), base_url="http://engine",
                              timeout=600) as de:
        body = {"model": model, "prompt": "hi", "max_tokens": 2, "ignore_eos": True}
        for c in (fe, de):
            await stream_once(c, model, 4)
            (await c.post("/v1/completions", json=body)).raise_for_status()
        res: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "short": []} for k in ("front end", "engine socket")}
        for i in range(pairs):
            order = [("front end", fe), ("engine socket", de)]
            for name, c in (order if i % 2 == 0 else order[::-1]):
                res[name]["ttft"].append((await stream_once(c, model, max_tokens)).ttft)
                t0 = time.perf_counter()
                (await c.post("/v1/completions", json=body)).raise_for_status()
                res[name]["short"].append(time.perf_counter() - t0)
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        n = 50
        for _ in range(n):
            (await fe.post("/v1/completions", json=body)).raise_for_status()
        cpu_short = {k: (cpu_seconds(p) - cpu0[k]) / n * 1e3 for k, p in pids.items()}
        cpu0 = {k: cpu_seconds(p) for k, p in pids.items()}
        tokens = 0
        for _ in range(10):
            tokens += (await stream_once(fe, model, max_tokens)).tokens
        cpu_token = {k: (cpu_seconds(p) - cpu0[k]) / tokens * 1e3 for k, p in pids.items()}
    out = {name: {"TTFT p50 (ms)": statistics.median(v["ttft"]) * 1e3,
                  "short completion latency p50 (ms)": statistics.median(v["short"]) * 1e3}
           for name, v in res.items()}
    out["paired difference"] = {
        "TTFT p50 (ms)": statistics.median(a - b for a, b in zip(res["front end"]["ttft"], res["engine socket"]["ttft"])) * 1e3,
        "short completion latency p50 (ms)": statistics.median(
            a - b for a, b in zip(res["front end"]["short"], res["engine socket"]["short"])) * 1e3}
    out["cpu"] = {**{f"{k} CPU ms per short request": v for k, v in cpu_short.items()},
                  **{f"{k} CPU ms per streamed token": v for k, v in cpu_token.items()}}
    return out


def paired(args: argparse.Namespace, model: str, work: Path) -> None:
    front = sides(model, work)[1]
    front.start()
    try:
        engine = httpx.get(front.url + "/v1/engines", timeout=30).json()["data"][0]
        pids = {"front end": front.proc.pid, "vLLM API server": engine["pid"]}
        out = asyncio.run(paired_run(front.url, engine["socket"], front.model, args.pairs, args.max_tokens, pids))
    finally:
        front.stop()
    print()
    print(f"paired, same engine: {args.pairs} pairs, front end (TCP) vs the engine's own socket, interleaved")
    print("| metric | via front end | engine socket direct | paired difference (median) |")
    print("|---|---|---|---|")
    for key in out["front end"]:
        print(f"| {key} | {out['front end'][key]:.1f} | {out['engine socket'][key]:.1f} | "
              f"{out['paired difference'][key]:+.1f} ms |")
    print()
    print("| CPU time (load-dependent; both Python ASGI servers) | ms |")
    print("|---|---|")
    for key, value in out["cpu"].items():
        print(f"| {key} | {value:.2f} |")


def subset_to_first_token(model: str, work: Path, size: int, label: str) -> None:
    port = free_port()
    side = Side("emo-serve", [sys.executable, "-c", "import sys; from emo_serve.cli import main; sys.exit(main())",
                              "serve", "--model", model, "--no-serve-base", "--port", str(port),
                              "--state-dir", str(work / f"state-{label}"), "--max-engines", "1",
                              "--log-level", "warning", "--kv-cache-gb", "1", "--max-model-len", "512"],
                f"http://127.0.0.1:{port}", "", work / f"subset-{label}.log")
    side.start()
    try:
        with httpx.Client(base_url=side.url, timeout=3600) as c:
            t0 = time.perf_counter()
            r = c.post("/v1/subsets", json={"name": "task", "examples": EXAMPLES, "size": size, "load": True})
            assert r.status_code == 202, r.text
            while (s := c.get("/v1/subsets/task").json())["state"] == "profiling":
                time.sleep(0.1)
            assert s["state"] != "failed", s
            t_profiled = time.perf_counter()
            body = {"model": "task", "prompt": PROMPT, "max_tokens": 8, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        break
            t_first = time.perf_counter()
            load = [l for l in c.get("/metrics").text.splitlines() if l.startswith("emo_engine_load_seconds_sum")]
            load_s = float(load[0].rsplit(" ", 1)[1]) if load else float("nan")
        sub = s["bytes"]["subset"] / 1e9
        base = s["bytes"]["base"] / 1e9
        print(f"| {label} | {size} routed + shared | {sub:.2f} / {base:.2f} | {t_profiled - t0:.1f} | "
              f"{load_s:.1f} | {t_first - t0:.1f} |", flush=True)
    finally:
        side.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the tiny demo, generated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-1", type=int, default=20, help="sequential streams per round (1 client)")
    ap.add_argument("--requests-16", type=int, default=3, help="streams per client per round (16 clients)")
    ap.add_argument("--short", type=int, default=200, help="short completions per round")
    ap.add_argument("--subset-size", type=int, default=4, help="routed experts per layer for the subset timing")
    ap.add_argument("--subset-only", action="store_true", help="only time POST /v1/subsets -> first token")
    ap.add_argument("--no-subset", action="store_true")
    ap.add_argument("--pairs", type=int, default=40, help="interleaved request pairs (paired mode)")
    ap.add_argument("--paired-only", action="store_true", help="only the paired same-engine overhead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from emo_serve.demo import write_demo_checkpoint

            model = str(write_demo_checkpoint(work / "tiny", "tiny", seed=0))
        if not args.subset_only and not args.paired_only:
            compare(args, model, work)
        if not args.subset_only:
            paired(args, model, work)
        if args.paired_only:
            return
        if not args.no_subset:
            print()
            print("| model | subset | subset / base GB | POST -> ready (profiling, s) | engine load (s) | "
                  "POST -> first token (s) |")
            print("|---|---|---|---|---|---|")
            subset_to_first_token(model, work, args.subset_size, Path(model).name)


if __name__ == "__main__":
    main()
