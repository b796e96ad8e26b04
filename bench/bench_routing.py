"""What live routing capture costs in decode speed, and what engine-side profiling saves, same run.

    .venv/bin/python bench/bench_routing.py [--rounds 2] [--skip-big] [--json /tmp/bench-routing.json]
    # the 14B-shape part needs the real-size demo checkpoint, made once (~27 GB bf16):
    .venv/bin/emo-serve demo-model /work/bigckpt/emo-1b14b --preset emo-1b14b

Servers, each one `emo-serve serve --engine-mode shared`, started alone (never two at once), with
routing capture on (the default) or off (`--no-routing-capture`), ON/OFF order alternated over the
rounds (round 1 ON first, round 2 OFF first, ...):
  demo  the built-in demo model `emo-demo` (no --model), base served, `--dtype float32
        --max-model-len 1024 --kv-cache-gb 1`; the traffic goes to a subset made over HTTP from
        explicit experts (`{"name": "s", "experts": [0..7]}`: 8 of 15 routed experts + the shared
        one, a per-request mask on the base's engine: masks and capture both run) and to the base;
  big   the 14B-shape demo checkpoint (`--big-model`, emo-1b14b: 16 layers, 128 experts, top-8),
        `--no-serve-base --preload-subset <16 routed experts per layer> --dtype bfloat16
        --max-model-len 512 --kv-cache-gb 1`: one engine holding only the subset's experts (the
        base does not fit in 24 GB).

Measured:
1. decode tokens/s, capture ON against OFF, at batch 1 and batch 16: waves of B streaming
   completions started together (B = 1: one stream at a time; B = 16: 16 concurrent clients),
   fixed prompts (160 characters of held-out documents: code, prose, legal, maths, round-robin),
   `max_tokens` 64 with `ignore_eos`, greedy. A wave's decode window runs from its first stream's
   first token to its last stream's last token; its decode tokens are each stream's tokens after
   its first. tokens/s = decode tokens summed over the waves / windows summed. One warm-up wave of
   each batch size first. Also the engine's CPU time (user + system, every process below the front
   end, the waves' prefills included) per decode token, and the decode speed timed by the engine
   itself (vLLM's `vllm:request_decode_time_seconds`, engine-core timestamps from a request's
   first token to its last, read on the engine's socket): B x decode tokens / summed request
   decode times. Both are immune to the client and the front end's relay being descheduled, which
   on a loaded 2-core machine bunches a stream's chunks and shrinks the client-timed window.
2. examples -> first token (demo servers, first round): `POST /v1/subsets` with the first 5
   shipped code examples (`emo_serve/data/models/examples/code.jsonl`), `fraction` 0.25, `usage`,
   `load`, then a streamed completion on the new subset: seconds from the POST to the first
   streamed token, 3 repetitions (a new subset name each). Capture ON with the base's engine
   warmed: engine-side profiling (a prefill of the examples in the running engine; the POST
   answers 201 with a ready subset). Capture OFF: the layer-streamed profiler in the background
   (202, `GET /v1/subsets/{name}` polled every 50 ms until `ready`/`loaded`). The POST's own
   latency and the time to ready apart, and whether both paths keep the same experts.

Reported: median over rounds and the spread (min-max), ON and OFF side by side, the ratio ON/OFF of
the medians (and of each round's pair). Targets: capture costs <= 3 % of decode tokens/s (ratio
>= 0.97); engine-side profiling to first token well under the layer-streamed profiler's. Also
each server's start to first answer, engines' RSS, and the 1-minute load average while measuring.
The raw numbers go to `--json`.
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
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_shared import (MODELS_DIR, ServerProcess, Stream, client, cpu_seconds, first_token_time, free_port,  # noqa: E402
                          proc_mem, read_jsonl, run_recorded, stream_once)

EMO_SERVE = str(Path(sys.executable).parent / "emo-serve")
DOMAINS = ["code", "prose", "legal", "math"]
DEMO_SUBSET = "s"
DEMO_SUBSET_EXPERTS = list(range(8))


def prompts() -> list[str]:
    heldout = {d: read_jsonl(MODELS_DIR / "heldout" / f"{d}.jsonl") for d in DOMAINS}
    return [heldout[d][10][:160] for d in DOMAINS]


# -- one server ---------------------------------------------------------------------------------------
class Server(ServerProcess):
    """One `emo-serve serve`, started alone and always stopped (SIGTERM, then its engines checked)."""

    def __init__(self, kind: str, capture: bool, args: argparse.Namespace, work: Path, rnd: int) -> None:
        super().__init__()
        self.kind, self.capture = kind, capture
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tag = self.label = f"{kind}-{'on' if capture else 'off'}-{rnd}"
        self.log = work / f"server-{tag}.log"
        common = ["--engine-mode", "shared", "--kv-cache-gb", "1", "--log-level", "warning"]
        if kind == "demo":
            model = ["--dtype", "float32", "--max-model-len", "1024"]
        else:
            model = ["--model", args.big_model, "--no-serve-base", "--preload-subset", str(args.big_manifest),
                     "--dtype", "bfloat16", "--max-model-len", "512"]
        self.cmd = [EMO_SERVE, "serve", *model, *common, "--port", str(self.port),
                    "--state-dir", str(work / f"state-{tag}"), *([] if capture else ["--no-routing-capture"])]
        self.env = {**{k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}, "HF_HUB_OFFLINE": "1"}

    def cpu_seconds(self) -> float:
        """User + system CPU seconds so far of every process below the front end."""
        return cpu_seconds(psutil.Process(self.proc.pid).children(recursive=True))

    def engine_metrics(self) -> dict[str, float]:
        """vLLM's own request counters, summed over this server's engines (read on their sockets):
        decode time (engine-core timestamps, first token to last), generated tokens, requests."""
        want = {"vllm:request_decode_time_seconds_sum": "decode s", "vllm:request_generation_tokens_sum": "tokens",
                "vllm:request_decode_time_seconds_count": "requests"}
        out = dict.fromkeys(want.values(), 0.0)
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "--uds" not in cmd or "vllm.entrypoints.openai.api_server" not in cmd:
                continue
            sock = cmd[cmd.index("--uds") + 1]
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=30) as c:
                for line in c.get("http://engine/metrics").text.splitlines():
                    name = line.split("{", 1)[0].split(" ", 1)[0]
                    if name in want:
                        out[want[name]] += float(line.rsplit(" ", 1)[1])
        return out

    def rss_gb(self) -> float:
        """RSS summed over every process below the front end (the engine's process tree)."""
        total = 0
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                total += proc_mem(p)[0]
            except psutil.Error:
                pass
        return total / 1e9


# -- requests -----------------------------------------------------------------------------------------
async def wait_answers(server: Server, models: list[str], timeout: float) -> float:
    """Seconds from the server's start until every model answered a 4-token completion."""
    async with client(server.url) as c:
        for model in models:
            while True:
                try:
                    await stream_once(c, model, "def add(a, b):", 4)
                    break
                except (RuntimeError, httpx.HTTPError) as exc:
                    if not server.alive():
                        raise RuntimeError(f"server exited; see {server.log}") from exc
                    if time.perf_counter() - server.t0 > timeout:
                        raise RuntimeError(f"{model} never answered: {exc}") from exc
                    await asyncio.sleep(0.5)
    return time.perf_counter() - server.t0


async def decode(server: Server, model: str, batch: int, waves: int, max_tokens: int,
                 texts: list[str]) -> dict[str, Any]:
    """`waves` waves of `batch` concurrent streams (one warm-up wave first); see the docstring."""
    async with client(server.url) as c:
        async def wave(n_tokens: int) -> list[Stream]:
            return list(await asyncio.gather(*(stream_once(c, model, texts[i % len(texts)], n_tokens)
                                               for i in range(batch))))

        await wave(16)  # warm-up
        tokens, window, short = 0, 0.0, 0
        load0, cpu0, m0 = os.getloadavg()[0], server.cpu_seconds(), server.engine_metrics()
        for _ in range(waves):
            streams = await wave(max_tokens)
            short += sum(s.tokens != max_tokens for s in streams)
            tokens += sum(s.tokens - 1 for s in streams)
            window += max(s.last for s in streams) - min(s.first for s in streams)
        cpu = server.cpu_seconds() - cpu0
        for _ in range(20):  # vLLM records a request's stats just after its last chunk: let them land
            m = {k: v - m0[k] for k, v in server.engine_metrics().items()}
            if m["requests"] >= batch * waves:
                break
            await asyncio.sleep(0.25)
    if short:
        print(f"  warning: {short} streams had != {max_tokens} tokens", flush=True)
    engine_tps = batch * (m["tokens"] - m["requests"]) / m["decode s"] if m["decode s"] > 0 else None
    if m["requests"] != batch * waves:
        print(f"  warning: the engine counted {m['requests']:.0f} requests, {batch * waves} sent", flush=True)
    return {"tokens/s": tokens / window, "engine-timed tokens/s": engine_tps, "engine metrics": m,
            "decode tokens": tokens, "window (s)": window, "streams": batch * waves,
            "short streams": short,
            "engine CPU ms/token": cpu / tokens * 1e3, "load avg 1 min": (load0 + os.getloadavg()[0]) / 2}


async def examples_to_first_token(server: Server, name: str, examples: list[str], prompt: str) -> dict[str, Any]:
    """POST /v1/subsets from 5 examples (usage, fraction 0.25, load) -> ready -> first streamed token."""
    out: dict[str, Any] = {}
    async with client(server.url) as c:
        t0 = time.perf_counter()
        r = await c.post("/v1/subsets", json={"name": name, "examples": examples, "fraction": 0.25,
                                              "method": "usage", "load": True})
        out["POST (s)"] = time.perf_counter() - t0
        out["status"] = r.status_code
        if r.status_code not in (201, 202):
            raise RuntimeError(f"POST /v1/subsets {name}: {r.status_code} {r.text[:300]}")
        s = r.json()
        while s["state"] not in ("ready", "loaded", "loading"):
            if s["state"] == "failed":
                raise RuntimeError(f"subset {name} failed: {s.get('error')}")
            await asyncio.sleep(0.05)
            s = (await c.get(f"/v1/subsets/{name}")).json()
        out["ready (s)"] = time.perf_counter() - t0
        out["first token (s)"] = await first_token_time(c, name, prompt, t0)
        s = (await c.get(f"/v1/subsets/{name}")).json()
        out["experts"] = s.get("experts")
        out["state after"] = s.get("state")
        out["scored_by"] = s.get("scored_by")
        out["profile_seconds"] = s.get("profile_seconds")
    return out


# -- one server, one round ----------------------------------------------------------------------------
def run_server(kind: str, capture: bool, args: argparse.Namespace, work: Path, rnd: int,
               res: dict[str, Any]) -> None:
    server = Server(kind, capture, args, work, rnd)
    res["command"] = " ".join(server.cmd)
    texts = prompts()

    def note(what: str, value: Any) -> None:
        print(f"  [{kind} {'ON' if capture else 'OFF'}] {what}: {json.dumps(value, default=str)}", flush=True)

    try:
        res["front end up (s)"] = server.start(args.start_timeout)
        if kind == "demo":
            base = (httpx.get(server.url + "/v1/models", timeout=30).json()["data"][0]["id"])
            asyncio.run(wait_answers(server, [base], args.start_timeout))
            r = httpx.post(server.url + "/v1/subsets", json={"name": DEMO_SUBSET, "experts": DEMO_SUBSET_EXPERTS},
                           timeout=120)
            if r.status_code != 201:
                raise RuntimeError(f"POST /v1/subsets {DEMO_SUBSET}: {r.status_code} {r.text[:300]}")
            models = {"subset s": DEMO_SUBSET, "base": base}
            waves = {1: args.waves_1, 16: args.waves_16}
        else:
            models = {"subset r16": args.big_name}
            waves = {1: args.big_waves_1, 16: args.big_waves_16}
        res["first answer (s)"] = asyncio.run(wait_answers(server, list(models.values()), args.start_timeout))
        note("start", {k: res[k] for k in ("front end up (s)", "first answer (s)")})
        res["decode"] = {}
        for label, model in models.items():
            for batch in (1, 16):
                d = asyncio.run(decode(server, model, batch, waves[batch], args.max_tokens, texts))
                res["decode"][f"{label} b{batch}"] = d
                note(f"decode {label} batch {batch}", d)
        res["engines RSS (GB)"] = server.rss_gb()
        if kind == "demo" and rnd < args.creation_rounds:
            examples = read_jsonl(MODELS_DIR / "examples" / "code.jsonl")[:5]
            res["creation"] = []
            for i in range(args.creation_reps):
                name = f"code-{'on' if capture else 'off'}-{rnd}-{i}"
                cr = asyncio.run(examples_to_first_token(server, name, examples, texts[0]))
                res["creation"].append(cr)
                note(f"examples -> first token #{i + 1}", {k: v for k, v in cr.items() if k != "experts"})
    finally:
        server.stop()


# -- the 14B-shape subset --------------------------------------------------------------------------
def big_manifest(args: argparse.Namespace, work: Path) -> Path:
    from emo_serve.checkpoint import Checkpoint
    from emo_serve.subset import make_subset

    ckpt = Checkpoint(args.big_model)
    n = ckpt.config.num_hidden_layers
    spec = make_subset(ckpt, [list(range(args.big_size))] * n, args.big_name)
    path = work / f"{args.big_name}.json"
    spec.save(path)
    print(f"big subset: {args.big_name}, routed experts 0..{args.big_size - 1} at each of {n} layers "
          f"(+ shared {ckpt.config.layer_routing(0).shared_ids}); manifest {path}", flush=True)
    return path


# -- report -------------------------------------------------------------------------------------------
def cell(values: list[float], fmt: str = ".1f") -> str:
    if not values:
        return "–"
    m = format(statistics.median(values), fmt)
    return m if len(values) == 1 else f"{m} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def report(results: dict[str, dict[str, list[dict[str, Any]]]], args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    print()
    print(f"{args.rounds} round(s), ON/OFF order alternated; median (min–max over rounds); ratio = median ON / "
          "median OFF (per-round ON/OFF ratios in brackets)")
    for kind in results:
        for cap in ("on", "off"):
            for i, r in enumerate(results[kind][cap]):
                if "error" in r:
                    print(f"{kind} capture {cap.upper()}, round {i + 1} FAILED: {r['error']}")
    print()
    for metric, fmt, title in (
            ("tokens/s", ".1f", f"Decode tokens/s timed by the client, {args.max_tokens} tokens per stream, "
             "ignore_eos, greedy (higher is better; target ON/OFF >= 0.97)"),
            ("engine-timed tokens/s", ".1f", "Decode tokens/s timed by the engine (vLLM's request decode time; "
             "higher is better; target ON/OFF >= 0.97)"),
            ("engine CPU ms/token", ".2f", "Engine CPU time per decode token, ms (lower is better; prefills of "
             "the waves included)")):
        print(title)
        print("| model | batch | capture ON | capture OFF | ON/OFF |")
        print("|---|---|---|---|---|")
        for kind, label_model in (("demo", "emo-demo"), ("big", "emo-1b14b shape")):
            if kind not in results:
                continue
            keys: list[str] = []
            for r in results[kind]["on"] + results[kind]["off"]:
                keys += [k for k in r.get("decode", {}) if k not in keys]
            for key in keys:
                def value(r: dict[str, Any], key: str = key, metric: str = metric) -> float | None:
                    return r.get("decode", {}).get(key, {}).get(metric)

                on = [v for r in results[kind]["on"] if (v := value(r)) is not None]
                off = [v for r in results[kind]["off"] if (v := value(r)) is not None]
                pairs = [a / b for ra, rb in zip(results[kind]["on"], results[kind]["off"])
                         if (a := value(ra)) is not None and (b := value(rb))]
                ratio = statistics.median(on) / statistics.median(off) if on and off else None
                summary[f"{kind} {key} {metric} ON/OFF"] = ratio
                what, batch = key.rsplit(" b", 1)
                rtxt = "–" if ratio is None else f"{ratio:.3f}" + (
                    f" [{', '.join(f'{p:.3f}' for p in pairs)}]" if len(pairs) > 1 else "")
                print(f"| {label_model}, {what} | {batch} | {cell(on, fmt)} | {cell(off, fmt)} | {rtxt} |")
        print()
    print("Servers")
    print("| server | start -> first answer (s) | engines' RSS (GB) | load avg 1 min while decoding |")
    print("|---|---|---|---|")
    for kind in results:
        for cap in ("on", "off"):
            rs = results[kind][cap]
            loads = [d["load avg 1 min"] for r in rs for d in r.get("decode", {}).values()]
            first = [r["first answer (s)"] for r in rs if "first answer (s)" in r]
            rss = [r["engines RSS (GB)"] for r in rs if "engines RSS (GB)" in r]
            print(f"| {kind}, capture {cap.upper()} | {cell(first)} | {cell(rss, '.2f')}"
                  f" | {cell(loads)} |")
    if "demo" in results:
        cr = {cap: [c for r in results["demo"][cap] for c in r.get("creation", [])] for cap in ("on", "off")}
        if cr["on"] or cr["off"]:
            print()
            print("Examples -> first token (emo-demo, 5 code examples, fraction 0.25, usage, load; "
                  f"{max(len(cr['on']), len(cr['off']))} repetitions: median (min–max))")
            print("| path | POST status | POST answered (s) | subset ready (s) | first streamed token (s) |")
            print("|---|---|---|---|---|")
            for cap, label in (("on", "engine-side (capture ON, base's engine warm)"),
                               ("off", "layer-streamed profiler (capture OFF)")):
                cs = cr[cap]
                if not cs:
                    continue
                status = "/".join(sorted({str(c["status"]) for c in cs}))
                post, ready = [c["POST (s)"] for c in cs], [c["ready (s)"] for c in cs]
                first = [c["first token (s)"] for c in cs]
                print(f"| {label} | {status} | {cell(post, '.3f')} | {cell(ready, '.3f')} | {cell(first, '.3f')} |")
            if cr["on"] and cr["off"]:
                on_ft = statistics.median(c["first token (s)"] for c in cr["on"])
                off_ft = statistics.median(c["first token (s)"] for c in cr["off"])
                summary["examples first token speed-up"] = off_ft / on_ft
                sets = [c["experts"] for c in cr["on"] + cr["off"] if c.get("experts")]
                same = all(s == sets[0] for s in sets)
                summary["same experts"] = same
                print()
                print(f"engine-side to first token {on_ft:.3f} s against {off_ft:.3f} s: {off_ft / on_ft:.1f}x faster; "
                      f"scored_by {sorted({str(c.get('scored_by')) for c in cr['on']})} (ON) / "
                      f"{sorted({str(c.get('scored_by')) for c in cr['off']})} (OFF); the same experts on every "
                      f"repetition and both paths: {same}")
                if not same:
                    for c in cr["on"][:1] + cr["off"][:1]:
                        print(f"  experts ({c['status']}): {c['experts']}")
    print()
    print("Against the target (capture costs <= 3 %: ON/OFF >= 0.97)")
    for k, v in summary.items():
        if k.endswith("tokens/s ON/OFF") and v is not None:
            print(f"- {k}: {v:.3f} {'met' if v >= 0.97 else 'NOT met'}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--skip-big", action="store_true", help="the demo model only")
    ap.add_argument("--skip-demo", action="store_true", help="the 14B-shape subset only")
    ap.add_argument("--big-model", default="/work/bigckpt/emo-1b14b")
    ap.add_argument("--big-size", type=int, default=16, help="routed experts per layer of the 14B-shape subset")
    ap.add_argument("--big-name", default="r16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--waves-1", type=int, default=24, help="demo: streams at batch 1 per model and server")
    ap.add_argument("--waves-16", type=int, default=6, help="demo: waves of 16 streams per model and server")
    ap.add_argument("--big-waves-1", type=int, default=2)
    ap.add_argument("--big-waves-16", type=int, default=1)
    ap.add_argument("--creation-rounds", type=int, default=1, help="rounds that also time examples -> first token")
    ap.add_argument("--creation-reps", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=1800)
    ap.add_argument("--work", help="keep servers' logs and state here (default: a temporary directory)")
    ap.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "bench-routing.json"))
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"

    def terminated(signum: int, frame: Any) -> None:  # SIGTERM: unwind, so that `finally` stops the server
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    kinds = [k for k, skip in (("demo", args.skip_demo), ("big", args.skip_big)) if not skip]
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parent.parent, capture_output=True,
                              text=True).stdout.strip()

    code_at_start = {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--short").splitlines()}
    print(f"code: {code_at_start}", flush=True)
    print(f"load average at start: {load_start}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if "big" in kinds:
            args.big_manifest = big_manifest(args, work)
        results: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"on": [], "off": []} for k in kinds}
        interrupted = None
        try:
            for kind in kinds:
                for rnd in range(args.rounds):
                    for capture in ((True, False) if rnd % 2 == 0 else (False, True)):
                        cap = "on" if capture else "off"
                        t0 = time.perf_counter()
                        print(f"{kind} round {rnd + 1} capture {cap.upper()}", flush=True)
                        res: dict[str, Any] = {"round": rnd + 1}
                        results[kind][cap].append(res)
                        run_recorded(f"{kind} round {rnd + 1} capture {cap.upper()}", res,
                                     work / f"server-{kind}-{cap}-{rnd}.log",
                                     run_server, kind, capture, args, work, rnd, res)
                        res["seconds"] = time.perf_counter() - t0
                        print(f"{kind} round {rnd + 1} capture {cap.upper()}: {res['seconds']:.0f} s", flush=True)
        except (KeyboardInterrupt, SystemExit) as exc:  # stopped from outside: report what was measured
            interrupted = repr(exc)
            print(f"INTERRUPTED ({interrupted}): the report covers the servers measured before it", flush=True)
        summary = report(results, args)
    load_end = os.getloadavg()
    wall = time.perf_counter() - t_start
    print(f"\nload average at start {load_start}, at end {load_end}")
    code_at_end = {"commit": git("rev-parse", "--short", "HEAD"), "dirty": git("status", "--short").splitlines()}
    print(f"code at start {code_at_start}, at end {code_at_end}")
    out = {"code at start": code_at_start, "code at end": code_at_end,
           "interrupted": interrupted,
           "rounds": args.rounds, "max_tokens": args.max_tokens, "results": results, "summary": summary,
           "wall_seconds": wall, "loadavg_start": load_start, "loadavg_end": load_end,
           "machine": {"cpus": os.cpu_count(), "mem_gb": psutil.virtual_memory().total / 1e9},
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv}
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"raw results: {args.json}; total {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
