"""A fleet of replicas behind `vllm-router`: throughput and latency with 1, 2 and 3 replicas, and
the time from creating a subset on one replica to its first token on another.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_fleet.py            # the demo model, 3 replicas

Three `emo-serve serve` replicas (shared engine, the built-in demo model, float32) share one
PostgreSQL store (a throwaway server from Debian's packages, `tests/postgres_server.py`); the real
`vllm-router` (`--policy consistent_hash`, health checks on `/ready`) is started in front of the
first 1, then 2, then 3 of them, then 1 again (`--sizes`), and the same load goes through it each time: `--concurrency`
clients of the official async `openai` client, streamed completions of `--max-tokens` tokens
(greedy, `ignore_eos`) spread over `--subsets` subsets, distinct prompts (the router hashes a
completion's prompt). Reported per fleet size: requests/s, time to first token p50/p99 and the
per-replica efficiency (requests/s per replica over one replica's). All replicas run the whole
time (an idle replica costs memory, not CPU), so only the router's worker list changes.

Then, `--creates` times: `POST /v1/subsets` on replica A, and at once a streamed completion of the
new subset on replica B (which has not seen it: it looks it up in the store on that request); the
seconds from the POST to B's first token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_server import pct  # noqa: E402
from postgres_server import PostgresServer  # noqa: E402
from router_process import free_port, start_router  # noqa: E402

KEY = "bench-key"
CLI = [sys.executable, "-c", "import sys; from emo_serve.cli import main; sys.exit(main())"]
ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "1", "--engine-mode", "shared")


def start_replica(name: str, store: str, work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [*CLI, "serve", "--port", str(port), "--state-dir", str(work / f"state-{name}"), "--api-key", KEY,
           "--store", store, "--replica-id", name, *ARGS]
    with open(work / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"replica at {url} exited ({proc.returncode})")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"replica at {url} not ready after {timeout} s")


def create(url: str, name: str, experts: list[int]) -> None:
    r = httpx.post(f"{url}/v1/subsets", json={"name": name, "experts": experts},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    if r.status_code != 201:
        raise SystemExit(f"creating {name}: {r.status_code} {r.text}")


async def first_token(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> float:
    """Seconds to the first streamed token of one completion (the stream is read to its end)."""
    t0 = time.perf_counter()
    ttft = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, extra_body={"ignore_eos": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].text:
            ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError(f"no token from {model}")
    return ttft


async def load(url: str, models: list[str], args: argparse.Namespace) -> dict[str, float]:
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    ttfts: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        while not queue.empty():
            i = queue.get_nowait()
            try:
                ttfts.append(await first_token(client, models[i % len(models)], f"# task {i}\ndef f_{i}(x):",
                                               args.max_tokens))
            except Exception:  # counted: a benchmark reports failures, it does not hide them
                failures += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    seconds = time.perf_counter() - t0
    await client.close()
    return {"rps": len(ttfts) / seconds, "p50": pct(ttfts, 50), "p99": pct(ttfts, 99), "failed": failures}


async def create_then_serve(a: str, b: str, count: int) -> list[float]:
    """Seconds from `POST /v1/subsets` on `a` to the new subset's first token on `b`, per subset."""
    client = AsyncOpenAI(base_url=f"{b}/v1", api_key=KEY, max_retries=0, timeout=600)
    seconds = []
    for i in range(count):
        name = f"fresh-{i}"
        t0 = time.perf_counter()
        await asyncio.to_thread(create, a, name, [(i + j) % 15 for j in range(6)])
        await first_token(client, name, "def main():", 1)
        seconds.append(time.perf_counter() - t0)
    await client.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=384)
    parser.add_argument("--sizes", default="1,2,3,1", help="fleet sizes in the order run (the last 1 brackets "
                        "the run: it shows how much the machine drifted)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--subsets", type=int, default=3)
    parser.add_argument("--creates", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    flags = sorted({f for f in ("avx2", "avx512f", "amx_tile") if f in Path("/proc/cpuinfo").read_text()})
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {os.cpu_count()} CPUs {', '.join(flags)}")
    with PostgresServer() as postgres:
        store = postgres.create_database("bench")
        replicas = [start_replica(chr(ord("a") + i), store, work) for i in range(args.replicas)]
        try:
            for proc, url in replicas:
                wait_ready(url, proc)
            urls = [url for _, url in replicas]
            models = [f"task-{i}" for i in range(args.subsets)]
            for i, model in enumerate(models):
                create(urls[0], model, [4 * i + j for j in range(4)])
            rows = []
            for n in [int(x) for x in args.sizes.split(",") if int(x) <= args.replicas]:
                router = start_router(urls[:n], log_path=work / "router.log",
                                      extra=["--health-check-endpoint", "/ready"])
                try:
                    asyncio.run(load(router.url, models, argparse.Namespace(**{**vars(args), "requests": 8})))
                    rows.append((n, asyncio.run(load(router.url, models, args))))
                finally:
                    router.stop()
                print(f"{n} replica(s): {rows[-1][1]}", flush=True)
            one = rows[0][1]["rps"]
            print("\n| replicas | requests/s | TTFT p50 s | TTFT p99 s | per-replica efficiency | failed |")
            print("|---|---|---|---|---|---|")
            for n, r in rows:
                print(f"| {n} | {r['rps']:.2f} | {r['p50']:.3f} | {r['p99']:.3f} | {r['rps'] / n / one:.2f} | "
                      f"{r['failed']:.0f} |")
            if args.replicas >= 2:
                seconds = asyncio.run(create_then_serve(urls[0], urls[1], args.creates))
                listed = ", ".join(f"{s:.3f}" for s in seconds)
                print(f"\ncreate on A -> first token on B: p50 {statistics.median(seconds):.3f} s, "
                      f"max {max(seconds):.3f} s over {len(seconds)} subsets ({listed})")
        finally:
            for proc, _ in replicas:
                proc.terminate()
            for proc, _ in replicas:
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    main()
