"""One shared vLLM engine for four task subsets against one engine per subset, same machine, same run.

    .venv/bin/python bench/bench_shared.py [--rounds 2]
    .venv/bin/python bench/bench_shared.py --model /work/bigckpt/emo-1b14b --subset-size 16 \\
        --dtype bfloat16 --sides a --skip-dedicated

Four task subsets are profiled once, before any server starts, with the server's own profiler
(`usage`, the first 5 shipped examples of each domain: code, prose, legal, maths; `--subset-size`
routed experts per layer, plus the shared expert), and written as manifests. Every side then
preloads the same four manifests (`--preload-subset`), so all sides serve identical subsets.

Sides, each one `emo-serve serve --dtype float32 --max-model-len 512 --kv-cache-gb 1`, started
alone (never two servers at once), in alternating order over the rounds:
  a  shared, base not served: one engine holding the union of the four subsets' experts
  b  shared, base served: the base's engine, the four subsets as per-request expert masks
  c  dedicated, base not served, --max-engines 4: one engine per subset
  d  the base alone (dedicated, no subsets): traffic goes to the base

Measured per side and round:
- time from the server's start to all four subsets (or the base) answering a first completion;
- memory once loaded and warmed: RSS summed over every process below the server (the engines'
  process trees), and PSS (shared pages split between processes), and the front end's own RSS;
- mixed traffic: streaming completions over the four subsets round-robin (the base alone on side
  d), 1 and 16 concurrent clients, fixed prompts, `max_tokens` 64 with `ignore_eos`: aggregate
  tokens/s and TTFT p50/p99;
- subset creation to first token: `POST /v1/subsets` with explicit experts (a seeded random subset,
  never one of the four) -> first streamed token; and from 5 examples (the first 5 held-out code
  documents, `usage`) -> first token, with the profiling time apart. Sides a-c only.

Reported: the median over rounds and the spread (min-max), side by side, against the targets:
shared engine RSS <= 1.2 x (non-expert weights + union of resident experts + one engine's runtime
and KV cache, the last read off side d: its engines' RSS minus the base's weights); mixed-traffic
tokens/s >= 0.9 x the dedicated engines; creation to first token < 2 s plus profiling. The raw
numbers go to `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "emo_serve" / "data" / "models"
DOMAINS = ["code", "prose", "legal", "math"]
SIDE_NAMES = {"a": "shared, no base", "b": "shared + base", "c": "dedicated x4", "d": "base alone"}
EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
CLI = "import sys; from emo_serve.cli import main; sys.exit(main())"


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
    return values[k]


# -- subsets and weight sizes -----------------------------------------------------------------------
@dataclass
class Plan:
    model: str
    base_id: str
    manifests: dict[str, Path]          # domain -> manifest file
    experts: dict[str, list[list[int]]]  # domain -> experts per layer (shared included)
    union: list[list[int]]
    prompts: dict[str, str]              # domain -> fixed prompt of the mixed traffic
    fresh: list[list[int]]               # explicit experts of the creation test (routed only)
    fresh_examples: list[str]            # the 5 examples of the creation test
    weights: dict[str, float] = field(default_factory=dict)  # bytes at the serving dtype
    profile_seconds: dict[str, float] = field(default_factory=dict)


def plan_subsets(args: argparse.Namespace, work: Path) -> Plan:
    """Profile the four subsets with the server's profiler, write their manifests, and size the
    weights (non-expert, per expert) at the engines' dtype."""
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.profiler import profile
    from emo_serve.settings import derive_model_id

    ckpt = Checkpoint(args.model)
    cfg = ckpt.config
    manifests, experts, seconds = {}, {}, {}
    (work / "manifests").mkdir()
    for domain in DOMAINS:
        examples = read_jsonl(MODELS_DIR / "examples" / f"{domain}.jsonl")[:5]
        t0 = time.perf_counter()
        scores = profile(ckpt, examples, method="usage", progress=False)
        spec = scores.to_subset(args.subset_size, name=domain, checkpoint=ckpt)
        seconds[domain] = time.perf_counter() - t0
        manifests[domain] = work / "manifests" / f"{domain}.json"
        spec.save(manifests[domain])
        experts[domain] = [list(e) for e in spec.experts]
        print(f"profiled {domain}: {seconds[domain]:.1f} s, experts per layer "
              f"{[len(e) for e in spec.experts]}: {spec.experts}", flush=True)
    n = cfg.num_hidden_layers
    union = [sorted(set().union(*(experts[d][i] for d in DOMAINS))) for i in range(n)]
    rng = random.Random(1)
    routed = [cfg.layer_routing(i).routed_ids for i in range(n)]
    fresh = [sorted(rng.sample(ids, args.subset_size)) if ids else [] for ids in routed]
    heldout = {d: read_jsonl(MODELS_DIR / "heldout" / f"{d}.jsonl") for d in DOMAINS}
    prompts = {d: heldout[d][10][:160] for d in DOMAINS}

    # Bytes at the engines' dtype: float32 = 4 per parameter, else 2.
    per_param = 4 if args.dtype in ("float32", "float") else 2
    expert_params: dict[tuple[int, int], int] = {}
    other = 0
    for name, info in ckpt.tensors.items():
        m = EXPERT.match(name)
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            expert_params[key] = expert_params.get(key, 0) + info.numel
        else:
            other += info.numel
    union_params = sum(expert_params[(i, e)] for i, ids in enumerate(union) for e in ids)
    weights = {"non-expert": other * per_param, "union experts": union_params * per_param,
               "all experts": sum(expert_params.values()) * per_param,
               "one subset experts": statistics.mean(
                   sum(expert_params[(i, e)] for i, ids in enumerate(experts[d]) for e in ids) for d in DOMAINS)
               * per_param}
    weights["base"] = weights["non-expert"] + weights["all experts"]
    return Plan(model=args.model, base_id=derive_model_id(args.model), manifests=manifests, experts=experts,
                union=union, prompts=prompts, fresh=fresh, fresh_examples=heldout["code"][:5], weights=weights,
                profile_seconds=seconds)


def run_recorded(label: str, res: dict[str, Any], log: Path, run: Callable[..., None], *args: Any) -> None:
    """`run(*args)`, one server's measurements: a failure is recorded in `res` (with its server
    log's tail) rather than raised, so one failed server does not lose the others' numbers."""
    try:
        run(*args)
    except Exception as exc:
        print(f"{label}: FAILED: {exc!r}", flush=True)
        res["error"] = repr(exc)
        if log.exists():
            print("  server log tail:\n    " + "\n    ".join(log.read_text().splitlines()[-20:]), flush=True)


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds so far of these processes (those that have exited count 0)."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


# -- one server ---------------------------------------------------------------------------------------
class ServerProcess:
    """One `emo-serve serve` started in its own session and always stopped: SIGTERM, then every
    engine process it started is waited for (and killed if it outlives its server). Subclasses
    set cmd, env, log, url and label."""

    cmd: list[str]
    env: dict[str, str]
    log: Path
    url: str
    label: str

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.t0 = 0.0
        self.engine_pids: set[int] = set()

    def start(self, timeout: float) -> float:
        """Start the server; seconds until its HTTP front end answers /health."""
        self.t0 = time.perf_counter()
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: server exited with {self.proc.returncode}; see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.perf_counter() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.label}: front end not up after {timeout} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.engine_pids |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
        except psutil.Error:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(180)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        # Engines run in their own sessions: make sure none that this server started outlives it.
        deadline = time.monotonic() + 60
        for pid in sorted(self.engine_pids):
            try:
                p = psutil.Process(pid)
                while p.is_running() and p.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                    time.sleep(0.2)
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    print(f"{self.label}: engine process {pid} outlived its server; killing it", flush=True)
                    p.kill()
            except psutil.Error:
                pass


class Server(ServerProcess):
    def __init__(self, side: str, plan: Plan, args: argparse.Namespace, work: Path, rnd: int) -> None:
        super().__init__()
        self.label = f"side {side}"
        self.side, self.plan = side, plan
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / f"server-{side}-{rnd}.log"
        mode = "dedicated" if side in "cd" else "shared"
        preload = [] if side == "d" else [a for d in DOMAINS for a in ("--preload-subset", str(plan.manifests[d]))]
        base = ["--serve-base"] if side in "bd" else ["--no-serve-base"]
        # --max-engines counts startup *models* in the server's start-up check, even in shared
        # mode (one engine): 4 subsets (+ the base) must fit under it.
        max_engines = {"a": 4, "b": 5, "c": 4, "d": 1}[side]
        self.cmd = [sys.executable, "-c", CLI, "serve", "--model", plan.model, "--port", str(self.port),
                    "--state-dir", str(work / f"state-{side}-{rnd}"), "--dtype", args.dtype,
                    "--max-model-len", "512", "--kv-cache-gb", str(args.kv_cache_gb),
                    "--max-engines", str(max_engines), "--log-level", "warning", *base, *preload]
        self.env = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"},
                    "EMO_ENGINE_MODE": mode, "HF_HUB_OFFLINE": "1"}
        if args.engine_cpus:  # vLLM's own variable, inherited by every engine (default: auto, core 0 here)
            self.env["VLLM_CPU_OMP_THREADS_BIND"] = args.engine_cpus
        self.models = [plan.base_id] if side == "d" else list(DOMAINS)

    def engines(self) -> list[dict[str, Any]]:
        data = httpx.get(self.url + "/v1/engines", timeout=30).json()["data"]
        self.engine_pids |= {e["pid"] for e in data if e.get("pid")}
        return data


# -- requests -----------------------------------------------------------------------------------------
@dataclass
class Stream:
    model: str
    ttft: float   # seconds from the request to the first token
    tokens: int   # completion tokens (the usage's, else one per chunk)
    seconds: float  # from the request to the stream's end
    text: str
    first: float  # perf_counter of the first token
    last: float   # perf_counter of the last token (a chunk per engine step; its text may be empty,
                  # a partial UTF-8 sequence held back, e.g. by the random-weight 14B model)


async def stream_once(c: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Stream:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    chunks, usage, text = 0, None, []
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"{model}: error event {chunk['error']}")
            if chunk.get("choices"):
                last = time.perf_counter()
                first = first or last
                chunks += 1
                text.append(chunk["choices"][0].get("text") or "")
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{model}: stream ended without a token")
    tokens = usage["completion_tokens"] if usage else chunks
    return Stream(model, first - t0, tokens, end - t0, "".join(text), first, last)


def client(url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=64))


async def first_answers(server: Server, timeout: float) -> dict[str, Any]:
    """Every model's first completion (greedy, 16 tokens), retried while the server says the model
    is not placed or not loaded yet; seconds from the server's start to each answer."""
    plan = server.plan

    async def one(c: httpx.AsyncClient, model: str, prompt: str) -> tuple[float, str]:
        while True:
            try:
                s = await stream_once(c, model, prompt, 16)
                return time.perf_counter() - server.t0, s.text
            except (RuntimeError, httpx.HTTPError) as exc:
                if server.proc.poll() is not None:
                    raise RuntimeError(f"side {server.side}: server exited; see {server.log}") from exc
                if time.perf_counter() - server.t0 > timeout:
                    raise RuntimeError(f"side {server.side}: {model} never answered: {exc}") from exc
                await asyncio.sleep(0.5)

    async with client(server.url) as c:
        prompts = [plan.prompts[d] for d in DOMAINS]
        if server.side == "d":
            results = [await one(c, plan.base_id, prompts[0])]
            texts = {}
        else:
            results = await asyncio.gather(*(one(c, d, plan.prompts[d]) for d in DOMAINS))
            texts = {d: t for d, (_, t) in zip(DOMAINS, results)}
    return {"all answered (s)": max(t for t, _ in results), "texts": texts}


async def mixed_traffic(server: Server, clients: int, per_client: int, max_tokens: int) -> dict[str, float]:
    """`clients` concurrent streaming clients; request j of client w goes to model (w + j) mod 4."""
    plan = server.plan
    targets = [(plan.base_id if server.side == "d" else d, plan.prompts[d]) for d in DOMAINS]
    async with client(server.url) as c:
        for model, prompt in targets:  # warm each model (and the connection)
            await stream_once(c, model, prompt, 4)

        async def worker(w: int) -> list[Stream]:
            return [await stream_once(c, *targets[(w + j) % len(targets)], max_tokens) for j in range(per_client)]

        t0 = time.perf_counter()
        results = [s for ws in await asyncio.gather(*(worker(w) for w in range(clients))) for s in ws]
        wall = time.perf_counter() - t0
    ttfts = [s.ttft for s in results]
    short = [s for s in results if s.tokens != max_tokens]
    if short:
        print(f"  warning: {len(short)} of {len(results)} streams had != {max_tokens} tokens", flush=True)
    return {"tokens/s": sum(s.tokens for s in results) / wall, "TTFT p50 (ms)": pct(ttfts, 50) * 1e3,
            "TTFT p99 (ms)": pct(ttfts, 99) * 1e3, "requests": len(results)}


async def create_to_first_token(server: Server, rnd: int, size: int, out: dict[str, Any]) -> None:
    """POST /v1/subsets (explicit experts, then 5 examples), each with load, to the first token."""
    plan = server.plan
    prompt = plan.prompts["code"]
    async with client(server.url) as c:
        name = f"fresh-{rnd}"
        t0 = time.perf_counter()
        r = await c.post("/v1/subsets", json={"name": name, "experts": plan.fresh, "load": True})
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/subsets {name}: {r.status_code} {r.text[:300]}")
        out["explicit: POST answered (s)"] = time.perf_counter() - t0
        out["explicit: to first token (s)"] = await first_token_time(c, name, prompt, t0)
        out["explicit: engine"] = (await c.get(f"/v1/subsets/{name}")).json().get("engine_id")

        name = f"examples-{rnd}"
        t0 = time.perf_counter()
        r = await c.post("/v1/subsets", json={"name": name, "examples": plan.fresh_examples, "size": size,
                                              "method": "usage", "load": True})
        if r.status_code != 202:
            raise RuntimeError(f"POST /v1/subsets {name}: {r.status_code} {r.text[:300]}")
        while (s := (await c.get(f"/v1/subsets/{name}")).json())["state"] == "profiling":
            await asyncio.sleep(0.05)
        if s["state"] == "failed":
            raise RuntimeError(f"subset {name} failed: {s.get('error')}")
        t_ready = time.perf_counter()
        out["examples: profiling (s)"] = t_ready - t0
        out["examples: to first token (s)"] = await first_token_time(c, name, prompt, t0)
        s = (await c.get(f"/v1/subsets/{name}")).json()
        out["examples: engine"] = s.get("engine_id")
        out["examples: experts"] = s.get("experts")
        out["engines after"] = [(e["model"], e["state"], e["starts"]) for e in server.engines()]


async def first_token_time(c: httpx.AsyncClient, model: str, prompt: str, t0: float) -> float:
    """Seconds from `t0` to the first streamed token of `model` (the stream is read to its end)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 8, "stream": True, "temperature": 0}
    async with c.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{model}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        first = None
        async for line in r.aiter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{model}: stream ended without a token")
    return first - t0
    raise RuntimeError(f"{model}: no token")


# -- memory -------------------------------------------------------------------------------------------
def proc_mem(p: psutil.Process) -> tuple[int, int]:
    try:
        info = p.memory_full_info()
        return info.rss, getattr(info, "pss", info.rss)
    except psutil.AccessDenied:
        return p.memory_info().rss, p.memory_info().rss


def memory(server: Server) -> dict[str, Any]:
    """RSS and PSS of the front end, of all processes below it, and of each engine's tree."""
    front = psutil.Process(server.proc.pid)
    below = front.children(recursive=True)
    out: dict[str, Any] = {}
    out["front end RSS (GB)"] = proc_mem(front)[0] / 1e9
    rss = pss = 0
    for p in below:
        try:
            r, s = proc_mem(p)
        except psutil.Error:
            continue
        rss, pss = rss + r, pss + s
    out["engines RSS (GB)"] = rss / 1e9
    out["engines PSS (GB)"] = pss / 1e9
    out["processes below the front end"] = len(below)
    per_engine = {}
    for e in server.engines():
        if not e.get("pid"):
            continue
        try:
            root = psutil.Process(e["pid"])
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        per_engine[e["model"]] = {"RSS (GB)": sum(proc_mem(p)[0] for p in tree) / 1e9, "processes": len(tree),
                                  "state": e["state"], "starts": e["starts"]}
    out["engines"] = per_engine
    # CPU the idle engines burn (vLLM's CPU engines poll): % of one core over a few seconds.
    c0, t0 = cpu_seconds(below), time.perf_counter()
    time.sleep(3)
    out["idle engines CPU (% of a core)"] = (cpu_seconds(below) - c0) / (time.perf_counter() - t0) * 100
    out["load average (1 min)"] = os.getloadavg()[0]
    return out


# -- one side, one round --------------------------------------------------------------------------------
def run_side(side: str, plan: Plan, args: argparse.Namespace, work: Path, rnd: int, creation: bool,
             res: dict[str, Any]) -> None:
    """Fills `res` as it goes, so that a failure keeps what was measured before it."""
    server = Server(side, plan, args, work, rnd)

    def note(what: str, value: Any) -> None:
        print(f"  [{side}] {what}: {json.dumps(value, default=str)}", flush=True)

    try:
        res["front end up (s)"] = server.start(args.start_timeout)
        first = asyncio.run(first_answers(server, args.start_timeout))
        res["time to serve all four (s)"] = first["all answered (s)"]
        res["texts"] = first["texts"]
        res["engines at start"] = [(e["model"], e["state"], e["starts"]) for e in server.engines()]
        res["/ready"] = httpx.get(server.url + "/ready", timeout=30).status_code
        note("start", {k: res[k] for k in ("front end up (s)", "time to serve all four (s)", "engines at start",
                                           "/ready")})
        for conc, per_client in ((1, args.requests_1), (16, args.requests_16)):
            res[f"traffic c{conc}"] = asyncio.run(mixed_traffic(server, conc, per_client, args.max_tokens))
            note(f"traffic c{conc}", res[f"traffic c{conc}"])
        res["memory"] = memory(server)
        note("memory", res["memory"])
        if creation and side != "d":
            res["creation"] = {}
            asyncio.run(create_to_first_token(server, rnd, args.subset_size, res["creation"]))
            note("creation", {k: v for k, v in res["creation"].items() if k != "examples: experts"})
    finally:
        server.stop()


# -- report -------------------------------------------------------------------------------------------
def cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "–"
    m = statistics.median(values)
    if len(values) == 1:
        return format(m, fmt)
    return f"{format(m, fmt)} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(title: str, rows: list[tuple[str, dict[str, list[float]]]], sides: list[str], fmt: str = ".1f") -> None:
    print()
    print(title)
    print("| metric | " + " | ".join(f"{s}: {SIDE_NAMES[s]}" for s in sides) + " |")
    print("|---|" + "---|" * len(sides))
    for label, by_side in rows:
        print(f"| {label} | " + " | ".join(cell(by_side.get(s, []), fmt) for s in sides) + " |")


def collect(results: dict[str, list[dict[str, Any]]], path: list[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for side, rounds in results.items():
        vals = []
        for r in rounds:
            v: Any = r
            for k in path:
                v = v.get(k) if isinstance(v, dict) else None
            if isinstance(v, (int, float)):
                vals.append(float(v))
        out[side] = vals
    return out


def report(results: dict[str, list[dict[str, Any]]], plan: Plan, args: argparse.Namespace) -> dict[str, Any]:
    sides = [s for s in args.sides if results.get(s)]
    w = plan.weights
    print()
    print(f"model: {plan.model}; subsets: {', '.join(DOMAINS)} ({args.subset_size} routed experts per layer "
          f"+ shared, profiled from 5 examples each); union per layer {[len(u) for u in plan.union]}; "
          f"{args.rounds} rounds, sides alternated; median (min-max over rounds)")
    def size(b: float) -> str:
        return f"{b / 1e9:.2f} GB" if b >= 1e9 else f"{b / 1e6:.1f} MB"

    print(f"weights at {args.dtype}: non-expert {size(w['non-expert'])}, union of the four subsets' experts "
          f"{size(w['union experts'])}, all experts {size(w['all experts'])}, one subset's experts "
          f"{size(w['one subset experts'])}")
    for side in args.sides:
        for i, r in enumerate(results.get(side, [])):
            if "error" in r:
                print(f"side {side} ({SIDE_NAMES[side]}), round {i + 1} FAILED: {r['error']} "
                      "(its numbers before the failure are kept)")
    if args.skip_dedicated:
        print("side c (four dedicated engines) skipped (--skip-dedicated): four engines of this shape do not "
              "fit in this machine's memory")
    table("Time to serve all four (server start -> every subset answered a first completion)", [
        ("front end up (s)", collect(results, ["front end up (s)"])),
        ("all four answered (s) [d: the base]", collect(results, ["time to serve all four (s)"])),
    ], sides)
    table("Memory once loaded and warmed (after the mixed traffic)", [
        ("engines' process trees RSS (GB)", collect(results, ["memory", "engines RSS (GB)"])),
        ("engines' process trees PSS (GB)", collect(results, ["memory", "engines PSS (GB)"])),
        ("front end RSS (GB)", collect(results, ["memory", "front end RSS (GB)"])),
    ], sides, ".2f")
    table("Machine while measuring (the engines idle)", [
        ("processes below the front end", collect(results, ["memory", "processes below the front end"])),
        ("idle engines' CPU (% of one core, 3 s)", collect(results, ["memory", "idle engines CPU (% of a core)"])),
        ("load average, 1 min", collect(results, ["memory", "load average (1 min)"])),
    ], sides)
    for conc in (1, 16):
        table(f"Mixed traffic, {conc} concurrent streaming client(s), the four subsets round-robin "
              f"(d: the base), {args.max_tokens} tokens each", [
                  ("tokens/s", collect(results, [f"traffic c{conc}", "tokens/s"])),
                  ("TTFT p50 (ms)", collect(results, [f"traffic c{conc}", "TTFT p50 (ms)"])),
                  ("TTFT p99 (ms)", collect(results, [f"traffic c{conc}", "TTFT p99 (ms)"])),
              ], sides)
    csides = [s for s in sides if any("creation" in r for r in results[s])]
    if csides:
        table("Subset creation to first token (POST /v1/subsets with load -> first streamed token)", [
            ("explicit experts (s)", collect(results, ["creation", "explicit: to first token (s)"])),
            ("5 examples: profiling (s)", collect(results, ["creation", "examples: profiling (s)"])),
            ("5 examples: to first token (s)", collect(results, ["creation", "examples: to first token (s)"])),
        ], csides)
        fits = all(set(e) <= set(u) for e, u in zip(plan.fresh, plan.union))
        print()
        print(f"explicit experts: seeded random, {args.subset_size} per layer, "
              f"{'inside' if fits else 'NOT inside'} the union of the four subsets"
              + ("" if fits else " (side a builds a new engine for the larger union)"))

    # Targets.
    summary: dict[str, Any] = {}
    print()
    print("Against the targets")
    runtime = None
    d_rss = collect(results, ["memory", "engines RSS (GB)"]).get("d", [])
    if d_rss:
        runtime = statistics.median(d_rss) * 1e9 - w["base"]
        print(f"- one engine's runtime + KV cache (side d's RSS minus the base's weights): {runtime / 1e9:.2f} GB")
    for side, resident in (("a", w["union experts"]), ("b", w["all experts"])):
        rss = collect(results, ["memory", "engines RSS (GB)"]).get(side, [])
        if rss and runtime is not None:
            bound = w["non-expert"] + resident + runtime
            ratio = statistics.median(rss) * 1e9 / bound
            summary[f"RSS ratio {side}"] = ratio
            print(f"- side {side} RSS {statistics.median(rss):.2f} GB = {ratio:.2f} x (non-expert + resident experts "
                  f"+ one runtime = {bound / 1e9:.2f} GB): {'met' if ratio <= 1.2 else 'NOT met'} (<= 1.2)")
    for conc in (1, 16):
        tps = collect(results, [f"traffic c{conc}", "tokens/s"])
        if tps.get("c"):
            for side in ("a", "b"):
                if tps.get(side):
                    ratio = statistics.median(tps[side]) / statistics.median(tps["c"])
                    summary[f"tokens/s ratio {side}/c c{conc}"] = ratio
                    print(f"- tokens/s at {conc} client(s), side {side} / dedicated: {ratio:.2f} "
                          f"({'met' if ratio >= 0.9 else 'NOT met'}, >= 0.9)")
    for side in csides:
        ex = collect(results, ["creation", "explicit: to first token (s)"])[side]
        pr = collect(results, ["creation", "examples: profiling (s)"])[side]
        ft = collect(results, ["creation", "examples: to first token (s)"])[side]
        if ex and ft:
            after = statistics.median(ft) - statistics.median(pr)
            ok = statistics.median(ex) < 2 and after < 2
            print(f"- side {side}: explicit {statistics.median(ex):.2f} s; examples {statistics.median(ft):.2f} s = "
                  f"{statistics.median(pr):.2f} s profiling + {after:.2f} s: {'met' if ok else 'NOT met'} (< 2 s)")

    # Same subsets, same answers: greedy texts of the four subsets on every side.
    texts = {s: [r["texts"] for r in results[s] if r.get("texts")] for s in sides if s != "d"}
    flat = {(s, i): t for s, ts in texts.items() for i, t in enumerate(ts)}
    if len(flat) > 1:
        ref = next(iter(flat.values()))
        same = {d: all(t.get(d) == ref.get(d) for t in flat.values()) for d in DOMAINS}
        summary["greedy texts identical across sides"] = same
        print(f"- greedy 16-token answers identical on every side and round: {same}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(MODELS_DIR / "emo-demo"), help="base checkpoint (default: the shipped "
                    "trained emo-demo)")
    ap.add_argument("--subset-size", type=int, default=4, help="routed experts per layer of each subset "
                    "(4 of 15 = ~25 %% on the demo; 16 on emo-1b14b)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sides", default="abcd", help="which sides to run (a b c d, see above)")
    ap.add_argument("--skip-dedicated", action="store_true", help="skip side c (four dedicated engines do not "
                    "fit in 24 GB at the emo-1b14b shape)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-1", type=int, default=16, help="sequential streams (1 client) per side and round")
    ap.add_argument("--requests-16", type=int, default=4, help="streams per client (16 clients) per side and round")
    ap.add_argument("--creation-rounds", type=int, default=None, help="rounds that also time subset creation "
                    "(default: all)")
    ap.add_argument("--engine-cpus", help="VLLM_CPU_OMP_THREADS_BIND for the engines, e.g. 1 (default: vLLM's "
                    "auto binding, which puts every engine's threads on core 0 of a 2-core machine)")
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "bench-shared.json"),
                    help="where to write the raw results (default: %(default)s)")
    args = ap.parse_args()
    args.sides = [s for s in args.sides if s in SIDE_NAMES and not (s == "c" and args.skip_dedicated)]
    os.environ["HF_HUB_OFFLINE"] = "1"
    creation_rounds = args.rounds if args.creation_rounds is None else args.creation_rounds
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        work = Path(tmp)
        plan = plan_subsets(args, work)
        results: dict[str, list[dict[str, Any]]] = {s: [] for s in args.sides}
        for rnd in range(args.rounds):
            order = args.sides if rnd % 2 == 0 else args.sides[::-1]
            for side in order:
                t0 = time.perf_counter()
                res: dict[str, Any] = {}
                results[side].append(res)
                print(f"round {rnd + 1} side {side} ({SIDE_NAMES[side]})", flush=True)
                run_recorded(f"round {rnd + 1} side {side}", res, work / f"server-{side}-{rnd}.log",
                             run_side, side, plan, args, work, rnd, rnd < creation_rounds, res)
                print(f"round {rnd + 1} side {side}: {time.perf_counter() - t0:.0f} s", flush=True)
        summary = report(results, plan, args)
    out = {"model": plan.model, "subset_size": args.subset_size, "rounds": args.rounds, "dtype": args.dtype,
           "experts": plan.experts, "union": plan.union, "fresh": plan.fresh, "weights_bytes": plan.weights,
           "profile_seconds": plan.profile_seconds, "sides": {s: SIDE_NAMES[s] for s in args.sides},
           "results": results, "summary": summary, "wall_seconds": time.perf_counter() - t_start,
           "engine_cpus": args.engine_cpus, "machine": {"cpus": os.cpu_count(), "mem_gb": psutil.virtual_memory().total / 1e9,
                       "loadavg_end": os.getloadavg()}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nraw results: {args.json}; total {out['wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
