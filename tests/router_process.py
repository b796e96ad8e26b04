"""The real `vllm-router` (the `vllm-router==0.1.17` wheel in pyproject) as a process for tests.

`start_router(worker_urls, log_path=...)` runs it on a free port of 127.0.0.1 and returns once
its own `GET /liveness` answers 200. What the fleet tests can rely on, read in vllm-project/router
(`src/policies/consistent_hash.rs`, `src/policies/hash_key.rs`, `src/routers/http/router.rs`,
`src/server.rs`, `src/core/retry.rs`) and seen with this wheel in front of two stand-in HTTP
workers (times with the settings below: health checks every 1 s, one failure or success flips):

- Start-up: the router listens only once at least one worker answers `GET /health` (polled every
  `--worker-startup-check-interval`, 30 s by default, 1 s here); none within
  `--worker-startup-timeout-secs` and it exits 1. The others start unhealthy and join by health
  check (seen: 0.6 s after a late worker came up). Own routes: `/liveness` (200 once listening),
  `/readiness` (503 while no worker is healthy), `/health` (503 if any worker is unhealthy),
  `GET /workers` (each worker's `is_healthy`).
- `consistent_hash` key, first found: headers `x-session-id`, `x-user-id`, `x-tenant-id`,
  `x-correlation-id`, `x-request-id`, `x-trace-id`; else, for `/v1/completions`, the prompt text
  (seen: key `request:hi`; the body's `user` field is not used), for `/v1/chat/completions` an
  empty text (every chat without a header lands on one worker), for other POSTs the JSON body, for
  GETs `request:null` (one worker). A ring of 160 virtual nodes per worker URL; an unhealthy or
  circuit-open target falls back to the first healthy worker, and goes back once healthy again.
- Typed routes (`/v1/completions`, `/v1/chat/completions`, ...) parse the body into the router's
  own request type (a body it cannot parse: 422 from the router, plain text) and re-serialize it:
  unknown fields pass, but defaults are added (seen: `stream`, `echo`, `ignore_eos`,
  `skip_special_tokens`, `no_stop_trim`, `return_hidden_states`). The client's `Authorization`
  passes through unchanged; `--api-key` is not added there.
- Any other path (`/v1/subsets`, `/ui`, `/metrics`, DELETEs) is proxied as-is to one worker chosen
  by the policy, never retried. The client's `Authorization` is dropped there; with `--api-key K`
  the worker gets `Authorization: Bearer K` instead. `GET /v1/models` goes to one healthy worker
  with the client's headers. Health checks send no `Authorization`.
- Retries (typed routes only): a 408/429/500/502/503/504 answer, or a failed connection (which
  the router turns into 500 "Request failed: error sending request ..."), is retried up to
  `--retry-max-retries` (5) attempts in all, backoff 50 ms x1.5 (~0.4 s together); each attempt
  re-selects, so the same key goes to the same worker until it is marked unhealthy. Seen: a worker
  returning 500 got the request 5 times; the client got its last answer.
- Circuit breaker: every 5xx attempt (connection failures too) counts; 10 within 120 s open the
  worker's circuit for 60 s (`--cb-*`): no traffic even while its health checks pass. Seen: two
  requests that each answered 500 five times cut a healthy worker off for ~60 s.
- A killed worker (seen, SIGKILL): its in-flight request got 500 "Request failed" 0.4 s later
  (retried on the dead worker, not moved); a request sent at once also got 500; 0.7-0.9 s after
  the kill the health check marked it unhealthy and its keys went to the other worker (200). A
  worker answering 503 on `/health` was marked unhealthy after 1.0 s; with every worker unhealthy
  the router answers 503 "No available workers". Restarted, it was healthy again 0.8 s later and
  got its keys back at once (circuit still closed).
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the router colours its log lines whatever the terminal


def router_binary() -> str:
    """The `vllm-router` launcher of this interpreter's environment, else the one on PATH."""
    beside = Path(sys.executable).with_name("vllm-router")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("vllm-router")
    if not found:
        pytest.fail("the fleet tests need the router: `pip install vllm-router==0.1.17` into this environment")
    return found


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, *, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; a refused or timed-out connection is status 0."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (OSError, TimeoutError):
        return 0, b""


@dataclass
class RouterProcess:
    """A running router; `stop()` (or leaving the `with` block, or interpreter exit) ends it."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    argv: list[str]
    worker_urls: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        """The router's log so far (stdout and stderr), without colour codes."""
        try:
            return _ANSI.sub("", self.log_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.process.poll() is None

    def workers(self) -> dict[str, bool]:
        """Worker URL -> healthy, as the router sees it now (its `GET /workers`)."""
        status, body = http_get(f"{self.url}/workers")
        if status != 200:
            raise AssertionError(f"GET /workers answered {status}: {body[:500]!r}\n{self.log_text()[-3000:]}")
        return {w["url"]: bool(w["is_healthy"]) for w in json.loads(body)["workers"]}

    def wait_worker(self, worker_url: str, *, healthy: bool, timeout: float = 30.0) -> float:
        """Wait until the router marks `worker_url` healthy (or unhealthy); the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.workers().get(worker_url) is healthy:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"the router never marked {worker_url} healthy={healthy} in {timeout:.0f} s: "
                             f"{self.workers()}\n{self.log_text()[-3000:]}")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (it exits 0 within ~0.1 s), SIGKILL after `timeout` seconds; idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_router(
    worker_urls: Sequence[str],
    *,
    log_path: Path,
    policy: str = "consistent_hash",
    api_key: str | None = None,
    health_interval_s: int = 1,
    health_failure_threshold: int = 1,
    health_success_threshold: int = 1,
    startup_timeout_s: int = 60,
    extra: Sequence[str] = (),
) -> RouterProcess:
    """Start `vllm-router` in front of `worker_urls` and wait until it answers `/liveness`.

    Start the workers first: the router listens only once one of them answers `GET /health`
    (checked every second here), and exits after `startup_timeout_s` if none does. At run time it
    checks every worker's `/health` each `health_interval_s`; `health_failure_threshold` failures
    in a row mark a worker unhealthy, `health_success_threshold` successes healthy again (the
    router's defaults, 60 s, 3 and 2, would make every failover test wait minutes). Retries and the
    circuit breaker keep the router's defaults (see the module docstring); `extra` adds any other
    flag, e.g. `["--disable-circuit-breaker"]`. The log goes to `log_path` (appended).
    """
    argv: list[str] = []
    for _ in range(3):  # another process may take the free port before the router binds it
        port = free_port()
        argv = [
            router_binary(), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy,
            "--worker-startup-timeout-secs", str(startup_timeout_s), "--worker-startup-check-interval", "1",
            "--health-check-endpoint", "/health", "--health-check-interval-secs", str(health_interval_s),
            "--health-check-timeout-secs", "2",
            "--health-failure-threshold", str(health_failure_threshold),
            "--health-success-threshold", str(health_success_threshold),
            # The CLI's metrics port is a fixed 29000 by default: two routers at once would collide.
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            *(["--api-key", api_key] if api_key else []),
            *extra,
        ]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        router = RouterProcess(process, port, log_path, argv, list(worker_urls))
        atexit.register(router.stop)
        deadline = time.monotonic() + startup_timeout_s + 30
        while time.monotonic() < deadline and process.poll() is None:
            if http_get(f"{router.url}/liveness", timeout=1.0)[0] == 200:
                return router
            time.sleep(0.1)
        router.stop()
        if "Address already in use" not in router.log_text():
            break
    raise AssertionError(f"vllm-router never answered /liveness (exit status {process.returncode}):\n"
                         f"{' '.join(argv)}\n{router.log_text()[-4000:]}")
