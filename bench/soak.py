"""Soak and chaos: sustained mixed traffic over the base and its subsets while engines are killed,
stopped and restarted and subsets are created, deleted, unloaded and loaded.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py [--minutes 10] [--concurrency 16] [--out DIR]

One `emo-serve serve` (shared engine mode, the built-in `emo-demo`, no keys, a fresh state dir) is
started and driven for `--minutes`:

- load: `--concurrency` async workers, each in a loop: a model picked at random among the base
  and the live subsets, the endpoint cycling through completions / streamed completions / chat /
  streamed chat, 16-64 new tokens. Every request is recorded (model, endpoint, status, how a
  stream ended, latency, the first error message).
- chaos, every 40-60 s, cycling: SIGKILL the shared engine's process group; SIGSTOP its process
  tree for 15 s (the health probe must kill it) then SIGCONT; create a subset of random experts;
  force-delete a subset; unload a subset (forced if it has requests in flight) then load it.
- every 10 s: the front end's RSS, the processes below the server, the engines' pid/state/
  starts/crashes, the size of its routing counters (`STATE/usage/`), and processes carrying this
  server's `EMO_PARENT_PID` that are no longer below it.

Beside them, each on by default and off with its `--no-...` flag (issue 18: no single client may
starve the front end):

- many users (`--many-users`): every load request carries an OpenAI `user`: a fresh `user-{i}`
  (with `max_tokens` 1) for `--fresh-share` of them, else one of a few repeated tenants; and
  `--user-workers` more workers send 1-token completions to the base, each with a fresh `user`,
  paced so that `--users` (20,000) distinct values are out by 80 % of the run (then on at that
  rate), which drives the per-model cap on distinct users and its "other" bucket. One of their
  requests in LONG_USER_EVERY carries a `user` over 256 characters: a 400 naming `user` is the
  expected answer (counted apart, not as an error).
- prompt lists (`--prompt-lists`): every `--prompt-list-every` s, the bodies that once got around
  `--max-n` (`["hi"] * 1000` with `n` 16; `["hello there"] * 200` with `n` 16 and 64 tokens), each
  expected to be a 400 naming `prompt`, and a legal list (`["a", "b"]`, `n` 2: 4 choices).
- live profiling (`--live-profiling`): `--profilers` loops, each creating a subset of the base
  from 16-64 examples of 200-400 tokens (`fraction` 0.25, `method` usage) under a name of its
  own, waiting for it (201, or 202 then polling) and deleting it. 201/202 are expected; 429 (job
  limit), a 400 over the per-request token bound and 503 are counted; another 5xx is a failure.
- a /health prober (`--health-probe`): `GET /health` every `--health-every` s (0.2) from a process
  of its own with its own connection, so that the soak's event loop (and its GIL) adds nothing,
  in a session of its own: Linux's autogroup scheduler shares the CPU between sessions first, and
  in the soak's session the prober waited up to 0.7 s for a CPU behind the load workers (as a
  probe from another machine or a kubelet would not). Each probe also records how long the prober
  itself sat runnable without a CPU, and the summary sets that apart, beside the front end's own
  event-loop lag (`emo_event_loop_lag_seconds` from its `/metrics`) and the stalls its watchdog
  logged.

A request is *lost without an error* when it got no HTTP status (transport error), when a stream
ended without `data: [DONE]` and without an error event, when a 200 body is not a completion, or
when it hung past `--client-timeout` (120 s). A 404 for a subset that the chaos task deleted is
counted apart. Pass criteria: nothing lost, no 5xx other than 503 (listed if any), front-end RSS
flat after warm-up, no process of the server's tree alive after SIGTERM, no temp files (the
`.NAME.XXXX.tmp` of `emo_serve/files.py`) in the state dir and the server's `/tmp/emo-engines-*`
socket dir gone; with the clients above: /health p99 under 100 ms, every oversized prompt list
answered 400 naming `prompt`, no 5xx other than 503 from the prompt-list, profiling or /health
clients. The summary is printed as a table and written to `OUT/summary.json`; per-request
records (`requests.jsonl`; the other clients' calls in `calls.jsonl`, /health probes in
`health.jsonl`), chaos events and samples go next to it, with the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import httpx

BASE = "emo-demo"
CLI = [sys.executable, "-c", "import sys; from emo_serve.cli import main; sys.exit(main())"]
SERVER_ARGS = ["--engine-mode", "shared", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "1",
               "--probe-interval", "2", "--probe-timeout", "2", "--probe-misses", "3", "--log-level", "info"]
TEMP_NAME = re.compile(r"^\..+\.tmp$")  # emo_serve/files.py: mkstemp/mkdtemp(prefix=".NAME.", suffix=".tmp")
PROMPTS = [
    "def fibonacci(n):\n    ",
    "This program is free software; you can redistribute it and/or modify it under the terms of",
    "What is 12 plus 30? 12 + 30 =",
    "The quick brown fox",
]
CHATS = ["Write a Python function that adds two numbers.", "What is 7 times 6?", "Say hello."]
ENDPOINTS = [("completions", False), ("completions", True), ("chat", False), ("chat", True)]
SAMPLE_SECONDS = 10.0
WARMUP_SECONDS = 60.0
STOP_SECONDS = 15.0
ATTRIBUTE_SECONDS = 150.0  # a 503 this long after a kill/stop/delete/unload is put down to it
TENANTS = 4                # repeated `user` values beside the fresh ones
LONG_USER_EVERY = 200      # one users-client request in this many has a `user` over 256 characters
USERS_BY = 0.8             # share of the run by which `--users` distinct values have been sent
HEALTH_TARGET = 0.100      # seconds: the /health p99 to stay under (issue 18)
# (what, body, choices expected: None means a 400 naming `prompt`). The first two once got around
# `--max-n`: 16,000 choices from a 6 kB body; 204,800 tokens that held up every other request.
PROMPT_LISTS = [
    ("1000 prompts, n 16", {"prompt": ["hi"] * 1000, "n": 16, "max_tokens": 1}, None),
    ("200 prompts, n 16, 64 tokens", {"prompt": ["hello there"] * 200, "n": 16, "max_tokens": 64}, None),
    ("2 prompts, n 2", {"prompt": ["a", "b"], "n": 2, "max_tokens": 4}, 4),
]


def now() -> str:
    return time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- processes -------------------------------------------------------------------------------------
def _ppids() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    return children


def descendants(pid: int) -> set[int]:
    children, out, todo = _ppids(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def tagged(server_pid: int) -> set[int]:
    """Live processes whose environment names `server_pid` as EMO_PARENT_PID (engines and every
    process they started, wherever they were re-parented to)."""
    tag = f"EMO_PARENT_PID={server_pid}".encode()
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if tag in (entry / "environ").read_bytes().split(b"\0") and alive(int(entry.name)):
                    out.add(int(entry.name))
            except OSError:
                continue
    return out


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# glibc maps each thread arena's heap at a multiple of HEAP_MAX_SIZE (64 MiB on 64-bit), of which
# the used part is read-write and the rest reserved (`---p`).
ARENA_ALIGN = 64 << 20


def memory_parts(pid: int) -> dict[str, float] | None:
    """Where the process's RSS lies (MB), from /proc/PID/smaps: glibc's main heap (`[heap]`), its
    per-thread arenas (anonymous read-write mappings at a 64 MiB boundary), other anonymous memory (large mallocs,
    thread stacks, numpy buffers), and file-backed pages (libraries); and its thread count. What
    grows tells an allocator that spreads over more arenas apart from objects that pile up."""
    parts = {"heap_mb": 0.0, "arenas_mb": 0.0, "arenas": 0.0, "other_anon_mb": 0.0, "files_mb": 0.0}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None
    name, arena = "", False
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's header: range perms offset dev inode [path]
            fields = line.split(None, 5)
            name = fields[5].strip() if len(fields) == 6 else ""
            start, end = (int(x, 16) for x in head.split("-"))
            arena = not name and fields[1].startswith("rw") and start % ARENA_ALIGN == 0 and end - start <= ARENA_ALIGN
            parts["arenas"] += arena
        elif head == "Rss:":
            mb = int(rest.split()[0]) / 1024
            if name == "[heap]":
                parts["heap_mb"] += mb
            elif not name or name.startswith("[anon"):
                parts["arenas_mb" if arena else "other_anon_mb"] += mb
            else:
                parts["files_mb"] += mb
    return {**{k: round(v, 1) for k, v in parts.items()}, "threads": threads}


def memory_change(first: dict | None, last: dict | None) -> str:
    if not first or not last:
        return "-"
    mb = ", ".join(f"{first[k]:.0f} → {last[k]:.0f}" for k in ("heap_mb", "arenas_mb", "other_anon_mb", "files_mb"))
    return (f"{mb} MB; {first['arenas']:.0f} → {last['arenas']:.0f} arenas; "
            f"{first['threads']} → {last['threads']} threads")


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


def shm_mapped(pids: set[int] | list[int]) -> set[str]:
    """The /dev/shm segments (vLLM's `psm_*` message queues, `sem.*`) that these processes map."""
    out = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    out.add(line.split("/dev/shm/", 1)[1].removesuffix(" (deleted)").strip())
        except OSError:
            continue
    return out


def temp_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if TEMP_NAME.match(p.name))


# -- records ---------------------------------------------------------------------------------------
@dataclass
class Req:
    t: float             # seconds since the load began
    at: str              # wall clock (UTC)
    model: str
    endpoint: str
    stream: bool
    status: int | None = None   # HTTP status; None: none received
    # ok | http_error | expected_400 (a long `user` refused) | stream_error_event | lost_transport | lost_cut
    # | lost_hang | bad_body
    outcome: str = ""
    error_status: int | None = None  # the status inside a stream's error event
    latency: float = 0.0
    deleted: bool = False       # the model had been deleted by the chaos task when the answer came
    model_ok: bool = True       # the answer named the model asked for
    message: str = ""
    client: str = "load"        # load | users
    user_kind: str = ""         # the `user` sent: fresh | tenant | long (over 256 characters) | "" (none)


@dataclass
class Call:
    """One call of the prompt-list or profiling client."""
    client: str          # prompt-list | profile
    what: str
    t: float
    at: str
    status: int | None = None
    verdict: str = ""    # expected | limited (429, or a 400 over a bound) | unavailable (503) | failure
    latency: float = 0.0
    param: str | None = None
    state: str = ""      # profile: the subset's state when waiting for it ended
    message: str = ""


@dataclass
class State:
    url: str
    server_pid: int
    t0: float = 0.0
    live: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    requests: list[Req] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    orphans: set[int] = field(default_factory=set)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    socket_dirs: set[str] = field(default_factory=set)
    shm: dict[str, str] = field(default_factory=dict)  # segment -> how its engine ended ("running" until known)
    shm_by_pid: dict[int, set[str]] = field(default_factory=dict)
    state_dir: Path | None = None
    calls: list[Call] = field(default_factory=list)
    # (t, seconds, status, seconds the prober itself waited for a CPU meanwhile or None)
    health: list[tuple[float, float, int | None, float | None]] = field(default_factory=list)
    lag: dict[str, float] = field(default_factory=dict)  # the front end's loop-lag histogram: le -> count
    out: Path | None = None
    users_sent: int = 0       # fresh `user` values sent (user-1 .. user-N)
    users_target: int = 0     # --users
    users_reached_at: float | None = None  # when the users_target-th was sent
    user_requests: int = 0    # requests of the users client
    profiling: set[str] = field(default_factory=set)  # subsets the profiling client may have left

    def fresh_user(self) -> str:
        self.users_sent += 1
        if self.users_sent == self.users_target:
            self.users_reached_at = self.elapsed()
        return f"user-{self.users_sent}"

    def record(self, call: Call) -> None:
        self.calls.append(call)
        if call.verdict == "failure":
            print(f"[{call.at}] !! {call.client} {call.what}: {call.status} {call.message}", flush=True)

    def track_shm(self, engine_pid: int | None) -> None:
        if engine_pid:
            seen = shm_mapped({engine_pid, *descendants(engine_pid)})
            self.shm_by_pid.setdefault(engine_pid, set()).update(seen)
            for name in seen:
                self.shm.setdefault(name, f"engine {engine_pid}")

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    event_start: float | None = None  # when the chaos event being logged began

    def event(self, kind: str, **info) -> dict:
        start, self.event_start = self.event_start, None
        ev = {"t": round(self.elapsed(), 1), "at": now(), "kind": kind,
              **({"began": round(start, 1)} if start is not None else {}), **info}
        self.events.append(ev)
        print(f"[{ev['at']} +{ev['t']:6.1f}s] chaos {kind}: " + json.dumps(info), flush=True)
        return ev


def error_message(text: str) -> str:
    try:
        body = json.loads(text)
        return str((body.get("error") or {}).get("message") or body.get("detail") or text)[:300]
    except (ValueError, AttributeError):
        return text[:300]


def error_param(text: str) -> str | None:
    try:
        return (json.loads(text).get("error") or {}).get("param")
    except (ValueError, AttributeError):
        return None


# -- load ------------------------------------------------------------------------------------------
def http_error(rec: Req, text: str) -> None:
    rec.outcome, rec.message = "http_error", error_message(text)
    if rec.user_kind == "long" and rec.status == 400 and error_param(text) == "user":
        rec.outcome = "expected_400"


async def one_request(c: httpx.AsyncClient, st: State, model: str, kind: str, stream: bool, rng: random.Random,
                      rec: Req, user: str | None = None, max_tokens: int | None = None) -> None:
    max_tokens = max_tokens or rng.randint(16, 64)
    if kind == "completions":
        path, body = "/v1/completions", {"model": model, "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens}
    else:
        path, body = "/v1/chat/completions", {"model": model, "max_tokens": max_tokens,
                                              "messages": [{"role": "user", "content": rng.choice(CHATS)}]}
    body["temperature"] = rng.choice([0.0, 0.8])
    if user is not None:
        body["user"] = user
    if stream:
        body["stream"] = True
        async with c.stream("POST", path, json=body) as r:
            rec.status = r.status_code
            if r.status_code != 200:
                http_error(rec, (await r.aread()).decode(errors="replace"))
                return
            done, first = False, True
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    event = json.loads(data)
                except ValueError:
                    rec.outcome, rec.message = "bad_body", data[:300]
                    continue
                if "error" in event:
                    rec.outcome = "stream_error_event"
                    rec.error_status = _status_of(event["error"])
                    rec.message = str(event["error"].get("message"))[:300]
                elif first:
                    first = False
                    rec.model_ok = event.get("model") == model
            if rec.outcome:
                return
            rec.outcome = "ok" if done else "lost_cut"
            if not done:
                rec.message = "stream ended without [DONE] and without an error event"
    else:
        r = await c.post(path, json=body)
        rec.status = r.status_code
        if r.status_code != 200:
            http_error(rec, r.text)
            return
        try:
            out = r.json()
            assert isinstance(out["choices"], list) and out["choices"]
            rec.model_ok = out.get("model") == model
            rec.outcome = "ok"
        except (ValueError, KeyError, TypeError, AssertionError):
            rec.outcome, rec.message = "bad_body", r.text[:300]


def _status_of(error: dict) -> int | None:
    """The HTTP status an error event stands for: the front end's events carry it in `code`'s
    type (model_unavailable -> 503, upstream_timeout -> 504); vLLM's carry an int `code`."""
    code = error.get("code")
    return {"model_unavailable": 503, "upstream_timeout": 504}.get(code) if isinstance(code, str) else code


def pick_user(st: State, rng: random.Random, args: argparse.Namespace) -> tuple[str | None, str, int | None]:
    """(user, its kind, max_tokens or None for the usual 16-64) of a load worker's request."""
    if not args.many_users:
        return None, "", None
    if rng.random() < args.fresh_share:
        return st.fresh_user(), "fresh", 1
    return f"tenant-{rng.randrange(TENANTS)}", "tenant", None


async def send(c: httpx.AsyncClient, st: State, args: argparse.Namespace, rng: random.Random, rec: Req,
               user: str | None, max_tokens: int | None) -> None:
    """One request, recorded (and a pause after a failed one: a downed engine answers at once)."""
    t = time.monotonic()
    try:
        await asyncio.wait_for(one_request(c, st, rec.model, rec.endpoint, rec.stream, rng, rec, user, max_tokens),
                               args.client_timeout)
    except TimeoutError:
        rec.outcome, rec.message = "lost_hang", f"no complete answer after {args.client_timeout:.0f} s"
    except httpx.HTTPError as exc:  # transport errors: with no status, or a stream cut mid-way
        rec.outcome = "lost_transport" if rec.status is None else "lost_cut"
        rec.message = f"{type(exc).__name__}: {exc}"[:300]
    rec.latency = time.monotonic() - t
    rec.deleted = rec.model in st.deleted
    st.requests.append(rec)
    if rec.outcome.startswith("lost") or rec.outcome == "bad_body" or (rec.status or 0) >= 500 and rec.status != 503:
        print(f"[{now()}] !! {rec.client} {rec.outcome} {rec.status} {rec.model} {rec.endpoint} "
              f"stream={rec.stream}: {rec.message}", flush=True)
    if rec.outcome not in ("ok", "expected_400"):
        await asyncio.sleep(0.5)


async def worker(i: int, c: httpx.AsyncClient, st: State, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + i)
    n = i  # workers start at different endpoints
    while not st.stop.is_set():
        model = rng.choice([BASE, *st.live])
        kind, stream = ENDPOINTS[n % len(ENDPOINTS)]
        n += 1
        user, user_kind, max_tokens = pick_user(st, rng, args)
        rec = Req(t=round(st.elapsed(), 2), at=now(), model=model, endpoint=kind, stream=stream, user_kind=user_kind)
        await send(c, st, args, rng, rec, user, max_tokens)


async def users_worker(i: int, c: httpx.AsyncClient, st: State, args: argparse.Namespace) -> None:
    """1-token requests to the base, each with a fresh `user`, paced to `--users` by USERS_BY of the run
    (and on at that rate), so that the per-model cap on distinct users is reached and held."""
    rng = random.Random(args.seed * 1000 + 500 + i)
    span = USERS_BY * args.minutes * 60
    while not st.stop.is_set():
        if st.users_sent >= args.users * st.elapsed() / span:
            await asyncio.sleep(0.05)
            continue
        st.user_requests += 1
        if st.user_requests % LONG_USER_EVERY == 0:
            user, user_kind = f"long-{st.user_requests}-" + "x" * 300, "long"
        else:
            user, user_kind = st.fresh_user(), "fresh"
        kind, stream = ENDPOINTS[st.user_requests % len(ENDPOINTS)]
        rec = Req(t=round(st.elapsed(), 2), at=now(), model=BASE, endpoint=kind, stream=stream, client="users",
                  user_kind=user_kind)
        await send(c, st, args, rng, rec, user, 1)


# -- the other clients -----------------------------------------------------------------------------
def verdict_of(status: int, expected: tuple[int, ...], limited: tuple[int, ...] = ()) -> str:
    if status in expected:
        return "expected"
    if status in limited:
        return "limited"
    return "unavailable" if status == 503 else "failure"


async def prompt_lists(c: httpx.AsyncClient, st: State, args: argparse.Namespace) -> None:
    """The prompt-list bodies of PROMPT_LISTS, one after another, every `--prompt-list-every` s."""
    while not st.stop.is_set():
        for what, body, choices in PROMPT_LISTS:
            call = Call("prompt-list", what, t=round(st.elapsed(), 2), at=now())
            t = time.monotonic()
            try:
                r = await c.post("/v1/completions", json={"model": BASE, **body}, timeout=args.client_timeout)
                call.status, call.param = r.status_code, error_param(r.text)
                if choices is None:
                    call.verdict = "expected" if r.status_code == 400 and call.param == "prompt" else "failure"
                    call.message = error_message(r.text)
                elif r.status_code == 200:
                    got = len(r.json().get("choices") or [])
                    call.verdict = "expected" if got == choices else "failure"
                    call.message = f"{got} choices"
                else:
                    call.verdict, call.message = verdict_of(r.status_code, (), (429,)), error_message(r.text)
            except (httpx.HTTPError, ValueError, AttributeError) as exc:
                call.verdict, call.message = "failure", f"{type(exc).__name__}: {exc}"[:300]
            call.latency = time.monotonic() - t
            st.record(call)
        try:
            await asyncio.wait_for(st.stop.wait(), args.prompt_list_every)
        except TimeoutError:
            pass


def example_text(rng: random.Random, tokens: int) -> str:
    """About `tokens` tokens of the soak's prompts' words (the demo's tokenizer: ~3.5 characters a token)."""
    words = " ".join(PROMPTS + CHATS).split()
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < tokens * 3.5:
        out.append(rng.choice(words))
    return " ".join(out)


async def profiler(i: int, c: httpx.AsyncClient, st: State, args: argparse.Namespace) -> None:
    """Create a subset of the base from examples (the live engine scores them), wait for it, delete it."""
    rng = random.Random(args.seed * 1000 + 900 + i)
    k = 0
    while not st.stop.is_set():
        k += 1
        name = f"prof-{i}-{k}"
        examples = [example_text(rng, rng.randint(200, 400)) for _ in range(rng.randint(16, 64))]
        call = Call("profile", f"create ({len(examples)} examples)", t=round(st.elapsed(), 2), at=now())
        st.profiling.add(name)
        t = time.monotonic()
        try:
            r = await c.post("/v1/subsets", json={"name": name, "examples": examples, "fraction": 0.25,
                                                  "method": "usage"}, timeout=args.profile_timeout)
            call.status, call.param = r.status_code, error_param(r.text)
            call.verdict = verdict_of(r.status_code, (201, 202), (429,))
            if r.status_code == 400 and "token" in r.text:  # over --max-profile-tokens
                call.verdict = "limited"
            if r.status_code in (201, 202):
                call.state = r.json().get("state", "")
            else:
                call.message = error_message(r.text)
                st.profiling.discard(name)
        except httpx.TimeoutException:
            call.verdict, call.message = "failure", f"no answer after {args.profile_timeout:.0f} s"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            call.verdict, call.message = "failure", f"{type(exc).__name__}: {exc}"[:300]
        call.latency = time.monotonic() - t
        if call.state == "profiling":  # 202: a job of its own; wait for it
            call.state = await wait_profiled(c, st, name, t + args.profile_timeout)
            call.latency = time.monotonic() - t
        st.record(call)
        if name in st.profiling:
            await delete_profiled(c, st, name)
        if call.verdict in ("limited", "unavailable", "failure"):
            await asyncio.sleep(2)


async def wait_profiled(c: httpx.AsyncClient, st: State, name: str, deadline: float) -> str:
    state = "profiling"
    while state == "profiling" and time.monotonic() < deadline and not st.stop.is_set():
        await asyncio.sleep(1)
        try:
            r = await c.get(f"/v1/subsets/{name}", timeout=30)
            state = r.json().get("state", "") if r.status_code == 200 else f"GET {r.status_code}"
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            state = f"GET {type(exc).__name__}"
    return state


async def delete_profiled(c: httpx.AsyncClient, st: State, name: str) -> None:
    call = Call("profile", "delete", t=round(st.elapsed(), 2), at=now())
    t = time.monotonic()
    try:
        r = await c.delete(f"/v1/subsets/{name}", params={"force": "true"}, timeout=120)
        call.status, call.verdict = r.status_code, verdict_of(r.status_code, (200, 404))
        if r.status_code != 200:
            call.message = error_message(r.text)
        if r.status_code in (200, 404):
            st.profiling.discard(name)
    except httpx.HTTPError as exc:
        call.verdict, call.message = "failure", f"{type(exc).__name__}: {exc}"[:300]
    call.latency = time.monotonic() - t
    st.record(call)


def run_queue_wait() -> float | None:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), or None."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def health_prober(url: str, t0: float, every: float, path: Path, stop: Connection) -> None:
    """GET /health every `every` s until `stop` is readable (a message, or the soak gone), one JSON
    line a probe to `path`; run in a process of its own (time.monotonic is the machine's, so `t`
    counts from the soak's t0). A pipe, not a multiprocessing Event: no semaphore in /dev/shm."""
    os.setsid()  # a scheduling group of its own (see the module's docstring)
    slow, printed = 0, 0.0  # slow probes since the last line printed about them, and when that was
    with httpx.Client(base_url=url, timeout=10) as c, open(path, "w") as f:
        while True:
            t, waited = time.monotonic(), run_queue_wait()
            try:
                status: int | None = c.get("/health").status_code
            except httpx.HTTPError:
                status = None
            seconds = time.monotonic() - t
            # How long the prober itself sat runnable without a CPU during the probe: a slow probe
            # with as much wait is the measuring process starved, not the server.
            wait_ms = round((run_queue_wait() - waited) * 1000, 2) if waited is not None else None
            f.write(json.dumps({"t": round(t - t0, 2), "ms": round(seconds * 1000, 2), "status": status,
                                "prober_wait_ms": wait_ms}) + "\n")
            f.flush()
            slow += seconds > HEALTH_TARGET or status != 200
            if slow and time.monotonic() - printed >= 5:
                print(f"[{now()}] /health: {slow} probe(s) over {HEALTH_TARGET * 1000:.0f} ms or not 200 "
                      f"since the last line; the last {seconds * 1000:.0f} ms, status {status}", flush=True)
                slow, printed = 0, time.monotonic()
            if stop.poll(max(0.0, every - seconds)):
                return


def read_health(path: Path) -> list[tuple[float, float, int | None, float | None]]:
    out = []
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            d = json.loads(line)
            wait = d.get("prober_wait_ms")
            out.append((d["t"], d["ms"] / 1000, d["status"], None if wait is None else wait / 1000))
        except (ValueError, KeyError):
            continue  # a line cut by the end of the run
    return out


# -- chaos -----------------------------------------------------------------------------------------
async def engines(c: httpx.AsyncClient) -> list[dict]:
    r = await c.get("/v1/engines", timeout=30)
    r.raise_for_status()
    return r.json()["data"]


async def base_engine(c: httpx.AsyncClient) -> dict:
    return next(e for e in await engines(c) if e["model"] == BASE)


async def ready_engine(c: httpx.AsyncClient, st: State, timeout: float = 240) -> dict | None:
    """The base's engine once ready with a pid (nudging it with a request if it is down)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not st.stop.is_set():
        e = await base_engine(c)
        if e["state"] == "ready" and e["pid"]:
            return e
        await asyncio.sleep(1)
    return None


def random_experts(rng: random.Random, cfg: dict) -> list[list[int]]:
    routed = cfg["num_experts"] - cfg.get("num_shared_experts", 0)
    return [sorted(rng.sample(range(routed), rng.randint(2, 8))) for _ in range(cfg["num_hidden_layers"])]


async def create_subset(c: httpx.AsyncClient, st: State, rng: random.Random, cfg: dict, n: int) -> None:
    name, experts = f"soak-{n}", random_experts(rng, cfg)
    t = time.monotonic()
    r = await c.post("/v1/subsets", json={"name": name, "experts": experts}, timeout=120)
    if r.status_code == 201:
        st.live.append(name)
    st.event("create", subset=name, status=r.status_code, seconds=round(time.monotonic() - t, 2),
             routed_per_layer=[len(x) for x in experts], **({} if r.status_code == 201 else {"body": r.text[:300]}))


async def chaos_kill(c: httpx.AsyncClient, st: State) -> None:
    e = await ready_engine(c, st)
    if e is None:
        st.event("kill", skipped="engine not ready")
        return
    pid = e["pid"]
    st.socket_dirs.add(str(Path(e["socket"]).parent))
    st.track_shm(pid)
    for name in st.shm_by_pid.get(pid, ()):
        st.shm[name] = f"engine {pid}, SIGKILLed by the soak"
    group = os.getpgid(pid)
    members = [p for p in [pid, *descendants(pid)] if alive(p)]
    os.killpg(group, signal.SIGKILL)
    t = time.monotonic()
    while any(alive(p) for p in members) and time.monotonic() - t < 10:
        await asyncio.sleep(0.1)
    st.event("kill", pid=pid, pgid=group, processes=len(members), crashes_before=e["crashes"],
             survivors=[p for p in members if alive(p)])


async def chaos_stop(c: httpx.AsyncClient, st: State) -> None:
    e = await ready_engine(c, st)
    if e is None:
        st.event("stop", skipped="engine not ready")
        return
    pid = e["pid"]
    st.track_shm(pid)
    for name in st.shm_by_pid.get(pid, ()):
        st.shm[name] = f"engine {pid}, SIGSTOPped by the soak (then killed by the probe)"
    pids = [pid, *descendants(pid)]
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    t = time.monotonic()
    left_ready = None
    try:
        while time.monotonic() - t < STOP_SECONDS:
            await asyncio.sleep(0.5)
            if left_ready is None:
                now_e = await base_engine(c)
                if now_e["pid"] != pid or now_e["state"] != "ready":
                    left_ready = round(time.monotonic() - t, 1)
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    after = await base_engine(c)
    st.event("stop", pid=pid, processes=len(pids), seconds=STOP_SECONDS, probe_killed=not alive(pid),
             engine_left_ready_after_s=left_ready, crashes_before=e["crashes"], crashes_after=after["crashes"],
             state_after=after["state"])


async def chaos_delete(c: httpx.AsyncClient, st: State, rng: random.Random) -> None:
    if len(st.live) < 2:
        st.event("delete", skipped="fewer than 2 live subsets")
        return
    name = rng.choice(st.live[:-1])  # never the newest
    st.deleted.add(name)  # from now on a 404 for it is expected
    t = time.monotonic()
    r = await c.delete(f"/v1/subsets/{name}", params={"force": "true"}, timeout=120)
    if r.status_code == 200:
        st.live.remove(name)
    else:
        st.deleted.discard(name)
    st.event("delete", subset=name, status=r.status_code, seconds=round(time.monotonic() - t, 2),
             **({} if r.status_code == 200 else {"body": r.text[:300]}))


async def chaos_unload_load(c: httpx.AsyncClient, st: State, rng: random.Random) -> None:
    if not st.live:
        st.event("unload+load", skipped="no live subset")
        return
    name = rng.choice(st.live)
    t = time.monotonic()
    r1 = await c.post(f"/v1/subsets/{name}/unload", timeout=120)
    forced = None
    if r1.status_code == 409:  # requests in flight
        forced = (await c.post(f"/v1/subsets/{name}/unload", params={"force": "true"}, timeout=120)).status_code
    r2 = await c.post(f"/v1/subsets/{name}/load", timeout=120)
    st.event("unload+load", subset=name, unload=r1.status_code, forced_unload=forced, load=r2.status_code,
             state=r2.json().get("state") if r2.headers.get("content-type", "").startswith("application/json")
             else None,
             seconds=round(time.monotonic() - t, 2),
             **({} if r1.status_code in (200, 409) and r2.status_code in (200, 202) else {"body": r2.text[:300]}))


async def chaos(c: httpx.AsyncClient, st: State, args: argparse.Namespace, cfg: dict) -> None:
    rng = random.Random(args.seed)
    cycle = args.chaos_cycle.split(",")
    n, created = 0, 2  # soak-1 and soak-2 exist
    while True:
        try:
            await asyncio.wait_for(st.stop.wait(), rng.uniform(args.chaos_min, args.chaos_max))
            return
        except TimeoutError:
            pass
        kind = cycle[n % len(cycle)]
        n += 1
        st.event_start = st.elapsed()
        try:
            if kind == "kill":
                await chaos_kill(c, st)
            elif kind == "stop":
                await chaos_stop(c, st)
            elif kind == "create":
                created += 1
                await create_subset(c, st, rng, cfg, created)
            elif kind == "delete":
                await chaos_delete(c, st, rng)
            else:
                await chaos_unload_load(c, st, rng)
        except Exception as exc:  # a failing admin call is a finding, not a reason to stop
            st.event(kind, failed=f"{type(exc).__name__}: {exc}"[:300])


# -- sampling --------------------------------------------------------------------------------------
def usage_mb(state_dir: Path | None) -> float:
    """The size of the server's routing counters (STATE/usage/)."""
    total = 0
    for f in (state_dir / "usage").rglob("*") if state_dir else ():
        try:
            total += f.stat().st_size if f.is_file() else 0
        except OSError:
            continue
    return total / 2**20


async def sampler(c: httpx.AsyncClient, st: State) -> None:
    while True:
        below = descendants(st.server_pid)
        orphans = tagged(st.server_pid) - below
        st.orphans |= orphans
        try:
            eng = [{k: e[k] for k in ("model", "pid", "state", "inflight", "starts", "crashes")}
                   for e in await engines(c)]
            for e in await engines(c):
                if e.get("socket"):
                    st.socket_dirs.add(str(Path(e["socket"]).parent))
                if e.get("state") == "ready":
                    st.track_shm(e.get("pid"))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            eng = [{"error": f"{type(exc).__name__}: {exc}"[:200]}]
        try:
            st.lag = loop_lag_buckets((await c.get("/metrics")).text) or st.lag
        except httpx.HTTPError:
            pass  # the last scrape stands
        s = {"t": round(st.elapsed(), 1), "at": now(), "rss_mb": rss_mb(st.server_pid),
             "memory": memory_parts(st.server_pid), "processes": len(below),
             "orphans": sorted(orphans), "load1": os.getloadavg()[0], "requests": len(st.requests),
             "users_sent": st.users_sent, "usage_mb": usage_mb(st.state_dir), "engines": eng}
        st.samples.append(s)
        print(f"[{s['at']} +{s['t']:6.1f}s] rss={s['rss_mb']:.1f} MB procs={s['processes']} "
              f"load={s['load1']:.1f} requests={s['requests']} users={s['users_sent']} usage={s['usage_mb']:.2f} MB "
              f"calls={len(st.calls)} live={len(st.live)} engines={eng}", flush=True)
        try:
            await asyncio.wait_for(st.stop.wait(), SAMPLE_SECONDS)
            return
        except TimeoutError:
            pass


def loop_lag_buckets(text: str) -> dict[str, float]:
    """The front end's `emo_event_loop_lag_seconds` histogram: bucket bound -> cumulative count."""
    out = {}
    for line in text.splitlines():
        m = re.match(r'emo_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)', line)
        if m:
            out[m[1]] = float(m[2])
    return out


def loop_lag_figures(lag: dict[str, float]) -> dict:
    """From the histogram: how many heartbeats, the bucket holding the 99th percentile, and how
    many ran over 100 ms late."""
    total = lag.get("+Inf")
    if not total:
        return {"loop_lag_beats": None, "loop_lag_p99_at_most_ms": None, "loop_lag_over_100ms": None}
    bounds = sorted((float(k), v) for k, v in lag.items() if k != "+Inf")
    p99 = next((b for b, count in bounds if count >= 0.99 * total), None)
    over = total - lag.get("0.1", total)
    return {"loop_lag_beats": int(total), "loop_lag_p99_at_most_ms": None if p99 is None else p99 * 1000,
            "loop_lag_over_100ms": int(over)}


def loop_stalls(server_log: Path) -> dict:
    """The front end's watchdog lines (`event loop stalled`): how many, the longest, and where the
    three longest were (innermost frame)."""
    stalls = []
    for line in server_log.read_text(errors="replace").splitlines() if server_log.exists() else ():
        if '"event loop stalled"' not in line:
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        stalls.append(d)
    stalls.sort(key=lambda d: -d.get("stalled_s", 0))
    return {"loop_stalls": len(stalls), "loop_stall_max_s": stalls[0]["stalled_s"] if stalls else None,
            "loop_stalls_longest": [{"time": d.get("time"), "stalled_s": d.get("stalled_s"),
                                     "loop_cpu_s": d.get("loop_cpu_s"),
                                     "waited_for_cpu_s": d.get("loop_waited_for_cpu_s"),
                                     "where": (d.get("where") or ["?"])[-1][:200]} for d in stalls[:3]]}


# -- the run ---------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


def slope_mb_per_min(samples: list[dict]) -> float | None:
    pts = [(s["t"] / 60, s["rss_mb"]) for s in samples if s["rss_mb"] is not None]
    if len(pts) < 3:
        return None
    mx, my = statistics.fmean(p[0] for p in pts), statistics.fmean(p[1] for p in pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


async def drive(st: State, args: argparse.Namespace, cfg: dict) -> dict:
    def pool(n: int) -> httpx.Limits:
        return httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)

    timeout = httpx.Timeout(args.client_timeout + 10)
    async with httpx.AsyncClient(base_url=st.url, timeout=timeout, limits=pool(args.concurrency)) as c, \
            httpx.AsyncClient(base_url=st.url, timeout=timeout, limits=pool(args.user_workers)) as users, \
            httpx.AsyncClient(base_url=st.url, timeout=timeout, limits=pool(args.profilers + 1)) as aux, \
            httpx.AsyncClient(base_url=st.url, timeout=60) as admin:
        st.t0 = time.monotonic()
        st.users_target = args.users if args.many_users else 0
        rng = random.Random(args.seed + 1)
        for n in (1, 2):  # subsets to start with, so that delete and unload have something to act on
            await create_subset(admin, st, rng, cfg, n)
        e = await base_engine(admin)
        st.socket_dirs.add(str(Path(e["socket"]).parent))
        st.track_shm(e["pid"])
        start_rss = rss_mb(st.server_pid)
        tasks = [asyncio.create_task(worker(i, c, st, args)) for i in range(args.concurrency)]
        if args.many_users:
            tasks += [asyncio.create_task(users_worker(i, users, st, args)) for i in range(args.user_workers)]
        if args.prompt_lists:
            tasks.append(asyncio.create_task(prompt_lists(aux, st, args)))
        if args.live_profiling:
            tasks += [asyncio.create_task(profiler(i, aux, st, args)) for i in range(args.profilers)]
        side = [asyncio.create_task(chaos(admin, st, args, cfg)), asyncio.create_task(sampler(admin, st))]
        spawn = multiprocessing.get_context("spawn")
        stop_r, stop_w = spawn.Pipe(duplex=False)
        prober = None
        if args.health_probe and st.out is not None:
            prober = spawn.Process(target=health_prober, daemon=True,
                                   args=(st.url, st.t0, args.health_every, st.out / "health.jsonl", stop_r))
            prober.start()
        stop_r.close()
        try:
            await asyncio.wait_for(st.stop.wait(), args.minutes * 60)
        except TimeoutError:
            pass
        st.stop.set()
        try:
            stop_w.send(None)
        except OSError:  # the prober is gone: its probes so far are in health.jsonl
            print(f"[{now()}] !! the /health prober exited early (code {prober and prober.exitcode})", flush=True)
        print(f"[{now()}] load stopped; waiting for requests in flight", flush=True)
        if prober is not None:
            await asyncio.to_thread(prober.join, 30)
            st.health = read_health(st.out / "health.jsonl")
        await asyncio.gather(*side, return_exceptions=True)
        await asyncio.gather(*tasks, return_exceptions=True)
        for name in sorted(st.profiling):  # left by a profiling call that failed or was waited for no longer
            await delete_profiled(aux, st, name)
        final_engines = await engines(admin)
        for e in final_engines:
            st.track_shm(e.get("pid"))
            for name in st.shm_by_pid.get(e.get("pid") or -1, ()):
                st.shm[name] = f"engine {e.get('pid')}, stopped by the server at SIGTERM"
        end_rss = rss_mb(st.server_pid)
        # a last sample, after the load
        st.samples.append({"t": round(st.elapsed(), 1), "at": now(), "rss_mb": end_rss,
                           "processes": len(descendants(st.server_pid)), "orphans": [], "load1": os.getloadavg()[0],
                           "requests": len(st.requests), "users_sent": st.users_sent,
                           "usage_mb": usage_mb(st.state_dir), "engines": final_engines, "final": True})
    return {"start_rss": start_rss, "end_rss": end_rss, "engines": final_engines}


def summarize(st: State, args: argparse.Namespace, run: dict, stop_info: dict, cmd: list[str]) -> dict:
    reqs = st.requests
    by_status = Counter(str(r.status) if r.status is not None else "none" for r in reqs)
    by_outcome = Counter(r.outcome for r in reqs)
    lost = [r for r in reqs if r.outcome.startswith("lost") or r.outcome == "bad_body"]
    # 5xx other than 503: HTTP statuses, and the statuses of streams' error events
    bad5xx = [r for r in reqs if ((r.status or 0) >= 500 and r.status != 503)
              or (r.outcome == "stream_error_event" and (r.error_status or 0) >= 500 and r.error_status != 503)]
    other_errors = [r for r in reqs if r.outcome == "stream_error_event" and not (r.error_status or 0) >= 500]
    deleted_404 = [r for r in reqs if r.status == 404 and r.deleted]
    unexpected_4xx = [r for r in reqs if r.status is not None and 400 <= r.status < 500
                      and not (r.status == 404 and r.deleted) and r.outcome != "expected_400"]
    load = [r for r in reqs if r.client == "load"]
    ok = [r.latency for r in load if r.outcome == "ok"]
    warm = [s for s in st.samples if s["t"] >= WARMUP_SECONDS and not s.get("final") and s["rss_mb"] is not None]
    base = next((e for e in run["engines"] if e["model"] == BASE), {})
    # Each 503 (answer or stream error event) next to the chaos event that explains it: one that
    # began at most 1 s after the answer and ended at most ATTRIBUTE_SECONDS before it.
    faults = [e for e in st.events if e["kind"] in ("kill", "stop", "delete", "unload+load")
              and "skipped" not in e and "failed" not in e]
    unexplained_503 = []
    by_event: Counter = Counter()
    for r in reqs:
        if r.status == 503 or r.error_status == 503:
            end = r.t + r.latency
            near = [e for e in faults if e.get("began", e["t"]) - 1 <= end <= e["t"] + ATTRIBUTE_SECONDS]
            if near:
                by_event[near[-1]["kind"]] += 1
            else:
                unexplained_503.append(asdict(r))
    msgs_503 = Counter(re.sub(r"\d+", "N", r.message)[:120] for r in reqs
                       if r.status == 503 or r.error_status == 503)
    summary = {
        "command": " ".join(cmd),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() - st.elapsed())),
        "minutes": args.minutes, "concurrency": args.concurrency,
        "requests_total": len(reqs),
        "requests_by_status": dict(sorted(by_status.items())),
        "requests_by_outcome": dict(sorted(by_outcome.items())),
        "ok": len(ok),
        "streams_ended_with_error_event": sum(r.outcome == "stream_error_event" for r in reqs),
        "lost_without_error": len(lost),
        "lost_detail": [asdict(r) for r in lost[:50]],
        "5xx_other_than_503": len(bad5xx),
        "5xx_other_than_503_detail": [asdict(r) for r in bad5xx[:50]],
        "503_messages": dict(msgs_503.most_common(10)),
        "503_by_chaos_event": dict(by_event),
        "503_unexplained": len(unexplained_503),
        "503_unexplained_detail": unexplained_503[:20],
        "404_of_deleted_subsets": len(deleted_404),
        "unexpected_4xx": len(unexpected_4xx),
        "unexpected_4xx_detail": [asdict(r) for r in unexpected_4xx[:20]],
        "other_stream_error_events": [asdict(r) for r in other_errors[:20]],
        "wrong_model_in_answer": sum(not r.model_ok for r in reqs if r.outcome == "ok"),
        # latencies of the load workers only: the users client's 1-token requests would pull them down
        "latency_ok_p50_s": pct(ok, 50), "latency_ok_p99_s": pct(ok, 99),
        "latency_all_p50_s": pct([r.latency for r in load], 50),
        "latency_all_p99_s": pct([r.latency for r in load], 99),
        "requests_per_s": len(reqs) / (args.minutes * 60),
        "ok_per_s": sum(r.outcome == "ok" for r in reqs) / (args.minutes * 60),
        "rss_mb_start": run["start_rss"],
        "rss_mb_after_warmup": warm[0]["rss_mb"] if warm else None,
        "rss_mb_end": run["end_rss"],
        "rss_mb_max": max((s["rss_mb"] for s in st.samples if s["rss_mb"]), default=None),
        "rss_slope_after_warmup_mb_per_min": slope_mb_per_min(warm),
        # Growth that settles (allocator arenas, caches filling to their caps) shows in the first
        # half only; a leak shows in both.
        "rss_slope_second_half_mb_per_min": slope_mb_per_min(warm[len(warm) // 2:]),
        # Where the RSS after minute 1 went: the parts at minute 1 and at the last sample.
        "memory_after_warmup": warm[0].get("memory") if warm else None,
        "memory_end": warm[-1].get("memory") if warm else None,
        "processes_under_server": sorted(Counter(s["processes"] for s in st.samples).items()),
        "load1_median": statistics.median(s["load1"] for s in st.samples) if st.samples else None,
        "engine_starts": base.get("starts"), "engine_restarts": (base.get("starts") or 1) - 1,
        "engine_crashes": base.get("crashes"),
        "engines_at_end": run["engines"],
        "chaos_events": dict(Counter(e["kind"] for e in st.events if "skipped" not in e and "failed" not in e)),
        "chaos_events_total": sum("skipped" not in e and "failed" not in e for e in st.events),
        "chaos_failed_or_skipped": [e for e in st.events if "failed" in e or "skipped" in e],
        "subsets_created": sum(e["kind"] == "create" and e.get("status") == 201 for e in st.events),
        "subsets_deleted": sum(e["kind"] == "delete" and e.get("status") == 200 for e in st.events),
        "orphans_during_run": sorted(st.orphans),
        "usage_mb_end": st.samples[-1].get("usage_mb") if st.samples else None,
        "usage_mb_max": max((s.get("usage_mb") or 0 for s in st.samples), default=None),
        **client_figures(st, args),
        **(loop_stalls(st.out / "server.log") if st.out is not None else {}),
        **stop_info,
    }
    return summary


def client_figures(st: State, args: argparse.Namespace) -> dict:
    """The many-users, prompt-list, profiling and /health clients' figures."""
    def by(items, key) -> dict:
        return dict(sorted(Counter(str(key(x)) for x in items).items()))

    clients: dict[str, dict] = {}
    for client in sorted({r.client for r in st.requests}):
        rs = [r for r in st.requests if r.client == client]
        clients[client] = {"total": len(rs), "by_status": by(rs, lambda r: r.status if r.status is not None
                                                              else "none"),
                           "by_outcome": by(rs, lambda r: r.outcome)}
    for client, what in sorted({(x.client, x.what.split(" (")[0]) for x in st.calls}):
        cs = [x for x in st.calls if x.client == client and x.what.split(" (")[0] == what]
        clients[f"{client}: {what}"] = {"total": len(cs), "by_status": by(cs, lambda x: x.status),
                                        "by_verdict": by(cs, lambda x: x.verdict)}
    long_users = [r for r in st.requests if r.user_kind == "long"]
    oversized = [x for x in st.calls if x.client == "prompt-list" and x.what != PROMPT_LISTS[-1][0]]
    legal = [x for x in st.calls if x.what == PROMPT_LISTS[-1][0]]
    creates = [x for x in st.calls if x.client == "profile" and x.what.startswith("create")]
    new_5xx = [asdict(x) for x in st.calls if (x.status or 0) >= 500 and x.status != 503]
    new_5xx += [{"client": "health", "t": t, "status": code} for t, _, code, _ in st.health if (code or 0) >= 500]
    health = [sec for _, sec, _, _ in st.health]
    after = [sec for t, sec, _, _ in st.health if st.users_reached_at is not None and t >= st.users_reached_at]
    slow = [(sec, wait) for _, sec, _, wait in st.health if sec > HEALTH_TARGET]
    # A probe less the time its own process sat waiting for a CPU: what the server took.
    served = [sec - wait for _, sec, _, wait in st.health if wait is not None]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    return {
        "clients": clients,
        "users_target": st.users_target, "users_distinct_sent": st.users_sent,
        "users_target_reached_at_s": None if st.users_reached_at is None else round(st.users_reached_at, 1),
        "users_long_sent": len(long_users),
        "users_long_answered_400": sum(r.outcome == "expected_400" for r in long_users),
        "users_long_other": by([r for r in long_users if r.outcome != "expected_400"],
                               lambda r: f"{r.status} {r.outcome}"),
        "prompt_list_oversized_sent": len(oversized),
        "prompt_list_oversized_400": sum(x.verdict == "expected" for x in oversized),
        "prompt_list_bodies_all_400": all(x.verdict == "expected" for x in oversized) if oversized else None,
        "prompt_list_legal_by_verdict": by(legal, lambda x: x.verdict),
        "profile_creates_by_status": by(creates, lambda x: x.status),
        "profile_creates_final_state": by([x for x in creates if x.state], lambda x: x.state),
        "profile_create_seconds_p50": pct([x.latency for x in creates if x.status in (201, 202)], 50),
        "profile_create_seconds_max": max((x.latency for x in creates if x.status in (201, 202)), default=None),
        "profile_deletes_by_status": by([x for x in st.calls if x.what == "delete"], lambda x: x.status),
        "new_clients_failures": len([x for x in st.calls if x.verdict == "failure"]),
        "new_clients_failures_detail": [asdict(x) for x in st.calls if x.verdict == "failure"][:30],
        "new_clients_5xx_other_than_503": len(new_5xx),
        "new_clients_5xx_other_than_503_detail": new_5xx[:30],
        "health_probes": len(health),
        "health_p50_ms": ms(pct(health, 50)), "health_p99_ms": ms(pct(health, 99)),
        "health_max_ms": ms(max(health, default=None)),
        "health_over_100ms": sum(sec > HEALTH_TARGET for sec in health),
        "health_not_200": sum(code != 200 for _, _, code, _ in st.health),
        "health_over_100ms_prober_starved": sum(wait is not None and wait >= sec / 2 for sec, wait in slow),
        "health_less_prober_wait_p99_ms": ms(pct(served, 99)),
        "health_less_prober_wait_over_100ms": sum(sec > HEALTH_TARGET for sec in served),
        "health_p99_after_users_target_ms": ms(pct(after, 99)),
        "health_slowest": [{"t": t, "ms": ms(sec), "status": code, "prober_wait_ms": ms(wait)}
                           for t, sec, code, wait in sorted(st.health, key=lambda h: -h[1])[:10]],
        **loop_lag_figures(st.lag),
        "health_p99_under_100ms": (pct(health, 99) or 0) < HEALTH_TARGET if health else None,
    }


def table(s: dict) -> str:
    def f(v, unit=""):
        return "–" if v is None else (f"{v:,.1f}{unit}" if isinstance(v, float) else f"{v}{unit}")
    rows = [
        ("duration / concurrency", f"{s['minutes']} min / {s['concurrency']} workers"),
        ("requests total (ok)", f"{s['requests_total']:,} ({s['ok']:,}; {s['ok_per_s']:.2f} ok/s)"),
        ("by HTTP status", ", ".join(f"{k}: {v:,}" for k, v in s["requests_by_status"].items())),
        ("by outcome", ", ".join(f"{k}: {v:,}" for k, v in s["requests_by_outcome"].items())),
        ("lost without an error (must be 0)", s["lost_without_error"]),
        ("5xx other than 503 (must be 0)", s["5xx_other_than_503"]),
        ("503s (answers + stream error events), by the chaos event before them",
         ", ".join(f"{k}: {v}" for k, v in s["503_by_chaos_event"].items()) + f"; unexplained: {s['503_unexplained']}"),
        ("404 for a just-deleted subset", s["404_of_deleted_subsets"]),
        ("other 4xx", s["unexpected_4xx"]),
        ("answers naming another model", s["wrong_model_in_answer"]),
        ("latency p50 / p99, ok requests (load workers)",
         f"{f(s['latency_ok_p50_s'])} / {f(s['latency_ok_p99_s'])} s"),
        ("latency p50 / p99, all requests (load workers)",
         f"{f(s['latency_all_p50_s'])} / {f(s['latency_all_p99_s'])} s"),
        *client_rows(s, f),
        ("front-end RSS start / minute 1 / end (max)",
         f"{f(s['rss_mb_start'])} / {f(s['rss_mb_after_warmup'])} / {f(s['rss_mb_end'])} ({f(s['rss_mb_max'])}) MB"),
        ("front-end RSS slope after minute 1; over its second half",
         f"{f(s['rss_slope_after_warmup_mb_per_min'])}; {f(s['rss_slope_second_half_mb_per_min'])} MB/min"),
        ("front-end memory minute 1 → end (main heap, thread arenas, other anonymous, files; threads)",
         memory_change(s["memory_after_warmup"], s["memory_end"])),
        ("routing counters (state dir usage/) end (max)", f"{f(s['usage_mb_end'])} ({f(s['usage_mb_max'])}) MB"),
        ("engine starts / restarts / crashes",
         f"{s['engine_starts']} / {s['engine_restarts']} / {s['engine_crashes']}"),
        ("chaos events",
         f"{s['chaos_events_total']} ({', '.join(f'{k}: {v}' for k, v in s['chaos_events'].items())})"),
        ("subsets created / deleted", f"{s['subsets_created']} / {s['subsets_deleted']}"),
        ("processes under the server (samples)", ", ".join(f"{k}: {v}" for k, v in s["processes_under_server"])),
        ("orphaned engine processes during the run", len(s["orphans_during_run"])),
        ("server exit after SIGTERM", f"code {s['server_exit_code']} in {f(s['server_stop_seconds'])} s"),
        ("leaked processes", len(s["leaked_processes"])),
        ("leaked temp files (state dir, socket dir)", len(s["leaked_temp_files"])),
        ("/dev/shm segments of its engines left behind",
         f"{len(s['leaked_shm_segments'])} of {s['shm_segments_seen']}"),
        ("machine load (1-min average, median)", f(s["load1_median"])),
    ]
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def client_rows(s: dict, f) -> list[tuple[str, object]]:
    def counts(d: dict) -> str:
        return ", ".join(f"{k}: {v:,}" for k, v in d.items()) or "–"

    c = s["clients"]
    rows: list[tuple[str, object]] = [
        (f"client {name}: total (by status; by {'verdict' if 'by_verdict' in v else 'outcome'})",
         f"{v['total']:,} ({counts(v['by_status'])}; {counts(v.get('by_verdict') or v['by_outcome'])})")
        for name, v in c.items()]
    if s["users_target"]:
        reached = s["users_target_reached_at_s"]
        rows += [("distinct `user` values sent (target)",
                  f"{s['users_distinct_sent']:,} ({s['users_target']:,}: "
                  + (f"reached at +{reached:.0f} s)" if reached is not None else "not reached)")),
                 ("`user` over 256 characters: answered 400 / sent",
                  f"{s['users_long_answered_400']} / {s['users_long_sent']}"
                  + (f" (other: {counts(s['users_long_other'])})" if s["users_long_other"] else ""))]
    if s["prompt_list_oversized_sent"] or s["prompt_list_legal_by_verdict"]:
        rows += [("oversized prompt lists answered 400 naming `prompt` (must be all)",
                  f"{s['prompt_list_oversized_400']} of {s['prompt_list_oversized_sent']}"),
                 ("legal prompt list (4 choices)", counts(s["prompt_list_legal_by_verdict"]))]
    if s["profile_creates_by_status"]:
        rows += [("live profiling: creates by status; final states",
                  f"{counts(s['profile_creates_by_status'])}; {counts(s['profile_creates_final_state'])}"),
                 ("live profiling: create seconds p50 / max; deletes by status",
                  f"{f(s['profile_create_seconds_p50'])} / {f(s['profile_create_seconds_max'])} s; "
                  f"{counts(s['profile_deletes_by_status'])}")]
    if s["health_probes"]:
        rows += [("/health p50 / p99 / max (p99 must be < 100 ms)",
                  f"{f(s['health_p50_ms'])} / {f(s['health_p99_ms'])} / {f(s['health_max_ms'])} ms "
                  f"({s['health_probes']:,} probes)"),
                 ("/health over 100 ms; not 200", f"{s['health_over_100ms']}; {s['health_not_200']}"),
                 ("  of those, the prober itself waiting for a CPU for half or more",
                  s["health_over_100ms_prober_starved"]),
                 ("/health less the prober's own CPU wait: p99; over 100 ms",
                  f"{f(s['health_less_prober_wait_p99_ms'])} ms; {s['health_less_prober_wait_over_100ms']}"),
                 ("/health p99 once the users target was reached", f"{f(s['health_p99_after_users_target_ms'])} ms")]
    if s.get("loop_lag_beats"):
        rows += [("front end's event-loop lag: heartbeats; p99 at most; over 100 ms",
                  f"{s['loop_lag_beats']:,}; {f(s['loop_lag_p99_at_most_ms'])} ms; {s['loop_lag_over_100ms']}")]
    if "loop_stalls" in s:
        rows += [("front end's loop stalls over 100 ms logged; longest",
                  f"{s['loop_stalls']}; {f(s['loop_stall_max_s'], ' s')}")]
    rows += [("5xx other than 503 from the prompt-list, profiling, /health clients (must be 0)",
              s["new_clients_5xx_other_than_503"]),
             ("other clients' unexpected answers", s["new_clients_failures"])]
    return rows


def start_server(out: Path, port: int, extra: list[str]) -> tuple[subprocess.Popen, list[str]]:
    state = out / "state"
    cmd = [*CLI, "serve", "--port", str(port), "--state-dir", str(state), *SERVER_ARGS, *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMO_")}
    env["HF_HUB_OFFLINE"] = "1"
    with open(out / "server.log", "ab") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return proc, cmd


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before /ready")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready after {timeout} s")


def stop_server(proc: subprocess.Popen, server_pid: int, state_dir: Path, socket_dirs: set[str]) -> dict:
    below = descendants(server_pid) | tagged(server_pid)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(150)
    except subprocess.TimeoutExpired:
        code = None
    seconds = time.monotonic() - t
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in below):
        time.sleep(0.2)
    leaked = sorted(p for p in below | tagged(server_pid) if alive(p))
    leaked_info = [{"pid": p, "cmd": cmdline(p)} for p in leaked]
    for p in leaked:  # leave nothing behind on the shared machine
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if code is None:
        proc.kill()
        proc.wait()
    temps = temp_files(state_dir)
    for d in socket_dirs:
        if Path(d).exists():
            temps.append(d + " (socket dir still present: " + ", ".join(os.listdir(d)) + ")")
    return {"server_exit_code": code, "server_stop_seconds": seconds, "leaked_processes": leaked_info,
            "leaked_temp_files": temps, "socket_dirs": sorted(socket_dirs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--client-timeout", type=float, default=120, help="seconds before a request counts as hung")
    ap.add_argument("--chaos-min", type=float, default=40)
    ap.add_argument("--chaos-max", type=float, default=60)
    ap.add_argument("--chaos-cycle", default="kill,create,stop,delete,unload+load",
                    help="chaos events, in the order they are cycled through")
    ap.add_argument("--seed", type=int, default=0)
    on = argparse.BooleanOptionalAction
    ap.add_argument("--many-users", action=on, default=True, help="send OpenAI `user` values (see --users)")
    ap.add_argument("--users", type=int, default=20000, help="distinct `user` values to send over the run")
    ap.add_argument("--user-workers", type=int, default=8, help="workers sending 1-token requests, fresh users")
    ap.add_argument("--fresh-share", type=float, default=0.25,
                    help="share of the load workers' requests with a fresh `user` (and max_tokens 1)")
    ap.add_argument("--prompt-lists", action=on, default=True, help="send the oversized prompt-list bodies")
    ap.add_argument("--prompt-list-every", type=float, default=5.0)
    ap.add_argument("--live-profiling", action=on, default=True, help="create subsets from examples meanwhile")
    ap.add_argument("--profilers", type=int, default=3, help="concurrent profiling loops")
    ap.add_argument("--profile-timeout", type=float, default=600, help="seconds a profiled subset is waited for")
    ap.add_argument("--health-probe", action=on, default=True, help="time GET /health every --health-every s")
    ap.add_argument("--health-every", type=float, default=0.2)
    ap.add_argument("--out", type=Path, default=None, help="results dir (default: a new /tmp/emo-soak-*)")
    ap.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                    help="one more `emo-serve serve` argument, e.g. --server-arg=--routing-retention=60 (repeatable)")
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="emo-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = Path(__file__).resolve().parent.parent / "emo_serve" / "data" / "models" / BASE / "config.json"
    cfg = json.loads(cfg_path.read_text())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    shm_before = set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()
    proc, server_cmd = start_server(out, port, args.server_arg)
    print(f"[{now()}] results in {out}; server pid {proc.pid}: {' '.join(server_cmd[3:])}", flush=True)
    st = State(url, proc.pid, state_dir=out / "state", out=out)
    stop_info: dict = {}
    run: dict | None = None
    try:
        ready_s = wait_ready(proc, url)
        print(f"[{now()}] ready after {ready_s:.1f} s", flush=True)
        run = asyncio.run(drive(st, args, cfg))
    finally:
        stop_info = stop_server(proc, proc.pid, out / "state", st.socket_dirs)
        stop_info["ready_seconds"] = locals().get("ready_s")
        shm_after = set(os.listdir("/dev/shm")) if Path("/dev/shm").is_dir() else set()
        stop_info["new_dev_shm_entries"] = sorted(shm_after - shm_before)  # informational: others share /dev/shm
        # segments that this server's engines mapped and that nobody removed: by how the engine ended
        stop_info["leaked_shm_segments"] = {n: how for n, how in sorted(st.shm.items()) if n in shm_after}
        stop_info["shm_segments_seen"] = len(st.shm)
        with open(out / "requests.jsonl", "w") as f:
            for r in st.requests:
                f.write(json.dumps(asdict(r)) + "\n")
        with open(out / "calls.jsonl", "w") as f:
            for call in st.calls:
                f.write(json.dumps(asdict(call)) + "\n")
        (out / "chaos.json").write_text(json.dumps(st.events, indent=1))
        (out / "samples.json").write_text(json.dumps(st.samples, indent=1))
    cmd = [".venv/bin/python", "bench/soak.py", *sys.argv[1:]]
    summary = summarize(st, args, run, stop_info, cmd)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print()
    print(table(summary))
    print()
    for key in ("lost_detail", "5xx_other_than_503_detail", "503_unexplained_detail", "unexpected_4xx_detail",
                "other_stream_error_events", "new_clients_5xx_other_than_503_detail", "new_clients_failures_detail",
                "users_long_other", "chaos_failed_or_skipped", "leaked_processes",
                "leaked_temp_files", "orphans_during_run", "leaked_shm_segments", "new_dev_shm_entries"):
        if summary.get(key):
            print(f"{key}: {json.dumps(summary[key], indent=1)[:4000]}")
    print(f"503 messages: {json.dumps(summary['503_messages'], indent=1)}")
    print(f"summary: {out / 'summary.json'}")
    failed = summary["lost_without_error"] or summary["5xx_other_than_503"] or summary["leaked_processes"] \
        or summary["leaked_temp_files"] or summary["health_p99_under_100ms"] is False \
        or summary["prompt_list_bodies_all_400"] is False or summary["new_clients_5xx_other_than_503"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
