"""Helpers of the API tests: start a real `emo-serve serve` process (the CLI, uvicorn, and its
vLLM engine children) on 127.0.0.1, talk to it, stop it and check that no child outlived it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
CLI = [sys.executable, "-c", "import sys; from emo_serve.cli import main; sys.exit(main())"]
START_SECONDS = 120  # front end up (torch import, checkpoint headers); engines come later


EXAMPLES = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i * i)\n",
            "import os\nprint(os.getcwd())\n"]


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, contains: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    assert contains in body["error"]["message"], body
    return body["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (engines and their engine-core/worker children)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class Server:
    """A running `emo-serve serve` process."""

    proc: subprocess.Popen
    url: str
    state_dir: Path
    log_path: Path
    headers: dict[str, str] = field(default_factory=lambda: {"Authorization": f"Bearer {ADMIN_KEY}"})

    def client(self, key: str | None = ADMIN_KEY, **kw) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 600), **kw)

    def openai(self, key: str = API_KEY, **kw):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=kw.pop("timeout", 600), **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}) waiting for {what}:\n{self.log()[-4000:]}")
            if check():
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.log()[-4000:]}")

    def wait_ready(self, timeout: float = 900) -> None:
        def ok() -> bool:
            try:
                return httpx.get(f"{self.url}/ready", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False
        self.wait_until(ok, timeout, "/ready")

    def stop(self) -> set[int]:
        """SIGTERM and wait; returns the processes below the server that outlived it."""
        below = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in below):
            time.sleep(0.2)
        left = {p for p in below if alive(p)}
        for p in left:  # never leave strays to the rest of the session, even when the test fails
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def start_server(model: Path | None, state_dir: Path, log_path: Path, *args: str,
                 env: dict[str, str] | None = None, keys: bool = True) -> Server:
    port = free_port()
    cmd = [*CLI, "serve", "--port", str(port), "--state-dir", str(state_dir)]
    if model is not None:
        cmd += ["--model", str(model)]
    if keys:
        cmd += ["--api-key", API_KEY, "--admin-key", ADMIN_KEY]
    # The tests written for one engine per model pin that mode; the shared engine's tests
    # (test_shared_engine.py) pass EMO_ENGINE_MODE=shared.
    full_env = {**os.environ, "EMO_ENGINE_MODE": "dedicated", **(env or {})}
    logf = open(log_path, "ab")
    proc = subprocess.Popen([*cmd, *args], stdout=logf, stderr=subprocess.STDOUT, env=full_env)
    logf.close()
    server = Server(proc, f"http://127.0.0.1:{port}", state_dir, log_path)

    def up() -> bool:
        try:
            return httpx.get(f"{server.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        server.wait_until(up, START_SECONDS, "/health")
    except BaseException:
        server.stop()
        raise
    return server


def engine_of(server: Server, model: str) -> dict:
    with server.client() as c:
        return next(e for e in c.get("/v1/engines").json()["data"] if e["model"] == model)


def installed_rows(server: Server, engine: str) -> dict[str, str]:
    """The mask rows the engine itself holds (its worker extension, over its private socket)."""
    sock = engine_of(server, engine)["socket"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://engine", timeout=30) as c:
        r = c.post("/collective_rpc", json={"method": "emo_installed"})
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def engine_metrics(server: Server, model: str) -> dict[str, float]:
    """vLLM's own Prometheus metrics of `model`'s engine (read over its private socket), summed
    over labels: sample name -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    sock = engine_of(server, model)["socket"]
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://engine", timeout=30) as c:
        text = c.get("/metrics").text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if "finished_reason" in sample.labels:
                key += ":" + sample.labels["finished_reason"]
            out[key] = out.get(key, 0.0) + sample.value
    return out


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP a process and everything below it (a stalled engine: its requests stay in flight
    however fast the model is), SIGCONT on leaving. A fault injected on purpose, so that tests of
    what happens while requests are in flight do not depend on how fast a request finishes."""
    pids = [pid, *descendants(pid)]
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        yield
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
