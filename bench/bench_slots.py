"""Expert slots: task subsets created one after another on a server that does not serve the base.

    .venv/bin/python bench/bench_slots.py                      # the shipped demo, 6 slots of 15
    .venv/bin/python bench/bench_slots.py --model /work/bigckpt/emo-1b14b --dtype bfloat16 \\
        --slots 32 --routed 16 --subsets 8

One `emo-serve serve --no-serve-base --expert-slots N` (its engine starts with empty slots). Then
`--subsets` seeded random task subsets of `--routed` routed experts per layer (plus the shared
expert) are created over HTTP one after another (`POST /v1/subsets`), while a client keeps
streaming completions on the subset created just before (`--traffic previous`) or on all earlier
ones in turn (`--traffic all`: with subsets that share few experts, more than the slots hold, so
earlier subsets are reloaded and a new subset's load may queue behind theirs). Per subset: POST ->
first streamed token, its own load's seconds (from the server log), the bytes of the base read
meanwhile (`emo_expert_load_bytes`, reloads included), the process tree's peak RSS so far (sampled
every 0.25 s), and the requests that failed. The RSS target printed beside it is 1.1 x
(non-expert weights + slots + the shared experts + a 3 GiB runtime (`engines.memory.RUNTIME_BYTES`)
+ the KV cache), from the checkpoint's headers. The disk's speed for one cold sequential read is
printed at the start and the end: below ~1 GB/s it, not the engine, decides a 14B-shape load's time.

`--before REV` adds, in the same run and first, what the project did before expert slots: the
tree at git revision REV (e.g. 1334525) serving the first subset (`--preload-subset`) and then the
second one by building an engine for the union of both and switching to it. Measured: the second
subset's POST -> first token and the process tree's peak RSS; the run is stopped if available
memory falls under 1.5 GiB (the kernel's OOM killer would otherwise pick a process).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emo_serve.checkpoint import Checkpoint  # noqa: E402
from emo_serve.default_model import shipped_default_model  # noqa: E402
from emo_serve.engines.memory import GIB, RUNTIME_BYTES, weight_bytes  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeakRss(threading.Thread):
    """The peak RSS of a process and everything below it, sampled until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root, self.peak, self.stopped = psutil.Process(pid), 0, threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.25):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return


def metric(http: httpx.Client, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in http.get("/metrics").text.splitlines()
               if line.startswith(name + "{"))


def stop_server(server: subprocess.Popen, rss: PeakRss) -> None:
    """Stop sampling and the server (SIGTERM, then SIGKILL after 120 s)."""
    rss.stopped.set()
    server.terminate()
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()


def wait_engine_ready(http: httpx.Client, server: subprocess.Popen, log: Path) -> None:
    while True:
        try:
            engines = http.get("/v1/engines").json()["data"]
            if engines and all(e["state"] == "ready" for e in engines):
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        time.sleep(0.5)


def disk_read_rate(base: Checkpoint, nbytes: int = 512 * 2**20) -> float:
    """MB/s of one cold sequential read from the middle of the checkpoint's largest shard (dropped
    from the page cache first, and again after): what a load's time depends on below ~1 GB/s,
    printed with the results because a shared machine's disk speed varies from run to run."""
    paths = [base.path(s.rsplit("/", 1)[-1]) for s in {i.shard for i in base.tensors.values()}]
    path = max(paths, key=os.path.getsize)
    size = os.path.getsize(path)
    start, length = max(0, size // 2 - nbytes // 2), min(nbytes, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
        buf, done, t0 = bytearray(16 * 2**20), 0, time.perf_counter()
        while done < length:
            got = os.preadv(fd, [memoryview(buf)[:min(len(buf), length - done)]], start + done)
            if got == 0:
                break
            done += got
        seconds = time.perf_counter() - t0
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return done / seconds / 1e6


def random_experts(cfg, rng: random.Random, routed: int) -> list[list[int]]:
    return [sorted(rng.sample(cfg.layer_routing(i).routed_ids, routed)) if cfg.layer_routing(i).routed_ids else []
            for i in range(cfg.num_hidden_layers)]


def before(args: argparse.Namespace, model: str, base: Checkpoint) -> None:
    """The union-engine rebuild of revision `args.before`, for the second subset."""
    from emo_serve.subset import make_subset

    tree = Path(tempfile.mkdtemp(prefix="bench-before-"))
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.before], check=True,
                   capture_output=True)
    state = Path(tempfile.mkdtemp(prefix="bench-before-state-"))
    rng = random.Random(args.seed)
    first, second = (random_experts(base.config, rng, args.routed) for _ in range(2))
    make_subset(base, first, "task-0").save(state / "task-0.json")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tree}:{tree / 'plugin'}"}
    cmd = [str(ROOT / ".venv/bin/python"), "-c", "import sys; from emo_serve.cli import main; sys.exit(main())",
           "serve", "--model", model, "--no-serve-base",
           "--engine-mode", "shared", "--preload-subset", str(state / "task-0.json"), "--dtype", args.dtype,
           "--kv-cache-gb", str(args.kv_cache_gb), "--max-model-len", "512", "--port", str(port),
           "--state-dir", str(state / "state")]
    log = state / "server.log"
    t0 = time.monotonic()
    server = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, process_group=0, env=env,
                              cwd=tree)
    rss = PeakRss(server.pid)
    rss.start()
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=900)
    try:
        wait_engine_ready(http, server, log)
        print(f"before ({args.before}): ready with task-0 in {time.monotonic() - t0:.1f} s, "
              f"peak RSS {rss.peak / GIB:.2f} GiB", flush=True)
        t1 = time.monotonic()
        r = http.post("/v1/subsets", json={"name": "task-1", "experts": second})
        if r.status_code != 201:
            raise SystemExit(f"POST /v1/subsets answered {r.status_code}: {r.text}")
        done = threading.Event()
        outcome: list[str] = []

        def first_token() -> None:
            try:
                for _ in client.completions.create(model="task-1", prompt="Hello", max_tokens=1, stream=True):
                    break
                outcome.append(f"{time.monotonic() - t1:.1f} s")
            except openai.APIError as exc:
                outcome.append(f"failed: {exc}")
            done.set()

        threading.Thread(target=first_token, daemon=True).start()
        low = None
        while not done.wait(0.5):
            avail = psutil.virtual_memory().available
            if avail < 1.5 * GIB:
                low = avail
                break
        result = outcome[0] if outcome else f"stopped at {time.monotonic() - t1:.1f} s: {low / GIB:.2f} GiB available"
        print(f"before ({args.before}): task-1 POST -> first token {result}; peak RSS {rss.peak / GIB:.2f} GiB",
              flush=True)
    finally:
        stop_server(server, rss)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def load_seconds(log: Path, subset: str) -> float:
    """Seconds of the first load of `subset`'s experts, from the server's structured log."""
    for line in log.read_text().splitlines():
        if '"experts loaded into slots"' in line and f'"subset": "{subset}"' in line:
            return float(json.loads(line)["seconds"])
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="base checkpoint (default: the shipped demo)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--slots", type=int, default=6)
    ap.add_argument("--routed", type=int, default=4, help="routed experts per layer of each subset")
    ap.add_argument("--subsets", type=int, default=5)
    ap.add_argument("--kv-cache-gb", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traffic", choices=("previous", "all"), default="previous")
    ap.add_argument("--before", default=None, help="git revision of the union-engine rebuild to run first")
    args = ap.parse_args()
    model = args.model or str(shipped_default_model())
    base = Checkpoint(model)
    cfg = base.config
    other, _, one_each = weight_bytes(base, args.dtype)
    if args.before:
        before(args, model, base)
    target = 1.1 * (other + args.slots * one_each + RUNTIME_BYTES + args.kv_cache_gb * GIB)
    port = free_port()
    state = tempfile.mkdtemp(prefix="bench-slots-")
    cmd = [str(ROOT / ".venv/bin/emo-serve"), "serve", "--model", model, "--no-serve-base", "--engine-mode", "shared",
           "--expert-slots", str(args.slots), "--dtype", args.dtype, "--kv-cache-gb", str(args.kv_cache_gb),
           "--max-model-len", "512", "--port", str(port), "--state-dir", state]
    log = open(Path(state) / "server.log", "w")
    t_start = time.monotonic()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, process_group=0)
    rss = PeakRss(server.pid)
    rss.start()
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, timeout=900)
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=900)
    try:
        while True:
            try:
                engines = http.get("/v1/engines").json()["data"]
                if engines and engines[0]["state"] == "ready":
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit(f"the server exited; see {log.name}")
            time.sleep(0.5)
        print(f"engine ready with empty slots: {time.monotonic() - t_start:.1f} s, "
              f"process tree peak RSS {rss.peak / GIB:.2f} GiB; disk {disk_read_rate(base):.0f} MB/s "
              "(one cold sequential read)", flush=True)
        created: list[str] = []
        failures: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                if not created:
                    time.sleep(0.2)
                    continue
                name = created[-1] if args.traffic == "previous" else created[i % len(created)]
                i += 1
                try:
                    for _ in client.completions.create(model=name, prompt="def f(", max_tokens=32, stream=True):
                        pass
                except openai.APIError as exc:
                    failures.append(f"{name}: {exc}")

        threading.Thread(target=traffic, daemon=True).start()
        rng = random.Random(args.seed)  # the same subsets as --before's
        print(f"{'subset':<8} {'POST->1st token s':>18} {'its load s':>11} {'read MiB':>9} {'peak RSS GiB':>13} "
              f"{'target GiB':>11}")
        for k in range(args.subsets):
            name = f"task-{k}"
            experts = random_experts(cfg, rng, args.routed)
            read0 = metric(http, "emo_expert_load_bytes_total")
            t0 = time.monotonic()
            r = http.post("/v1/subsets", json={"name": name, "experts": experts})
            if r.status_code != 201:
                raise SystemExit(f"POST /v1/subsets answered {r.status_code}: {r.text}")
            for _ in client.completions.create(model=name, prompt="Hello", max_tokens=1, stream=True):
                break
            first = time.monotonic() - t0
            created.append(name)
            read = metric(http, "emo_expert_load_bytes_total") - read0
            own = load_seconds(Path(state) / "server.log", name)
            print(f"{name:<8} {first:>18.2f} {own:>11.2f} {read / 2**20:>9.1f} {rss.peak / GIB:>13.2f} "
                  f"{target / GIB:>11.2f}", flush=True)
        time.sleep(2)
        stop.set()
        engines = http.get("/v1/engines").json()["data"]
        print(f"failed requests: {len(failures)}; engines: {[(e['model'], e['starts']) for e in engines]}; "
              f"evictions: {metric(http, 'emo_expert_evictions_total'):.0f}; disk at the end "
              f"{disk_read_rate(base):.0f} MB/s")
        for f in failures[:5]:
            print("  ", f)
    finally:
        stop_server(server, rss)


if __name__ == "__main__":
    main()
