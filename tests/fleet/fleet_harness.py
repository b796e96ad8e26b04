"""The fleet tests' fixtures and parts: a real PostgreSQL (tests/postgres_server.py), three real
`emo-serve serve` replicas sharing it on 127.0.0.1 (one shared engine each, the demo model), and
the real `vllm-router` in front of them (tests/router_process.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from api.api_harness import ADMIN_KEY, API_KEY, CLI, START_SECONDS, Server
from postgres_server import PostgresServer, postgres_fixture  # noqa: F401
from router_process import RouterProcess, free_port, start_router

REPLICAS = ("a", "b", "c")
# Short intervals, so what one replica does reaches the others within a test's patience: the store
# polled every second, counters saved every second.
REPLICA_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--kv-cache-gb", "1", "--probe-interval", "600",
                "--store-poll-interval", "1", "--routing-interval", "1", "--routing-save-interval", "1")


@dataclass
class Replica:
    """One replica's fixed place (port, state dir, log) and its current process."""

    name: str
    port: int
    state_dir: Path
    log_path: Path
    store: str
    server: Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start (or restart after a kill) on the same port, state dir and replica id."""
        cmd = [*CLI, "serve", "--port", str(self.port), "--state-dir", str(self.state_dir), "--api-key", API_KEY,
               "--admin-key", ADMIN_KEY, "--store", self.store, "--replica-id", self.name, *REPLICA_ARGS]
        env = {**os.environ, "EMO_ENGINE_MODE": "shared"}
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.server = Server(proc, self.url, self.state_dir, self.log_path)
        return self.server


@dataclass
class Fleet:
    replicas: dict[str, Replica]
    router: RouterProcess
    postgres: PostgresServer
    store: str

    def server(self, name: str) -> Server:
        server = self.replicas[name].server
        assert server is not None
        return server


@pytest.fixture(scope="module")
def fleet(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    store = postgres.create_database("fleet")
    root = tmp_path_factory.mktemp("fleet")
    replicas = {n: Replica(n, free_port(), root / f"state-{n}", root / f"{n}.log", store) for n in REPLICAS}
    try:
        for replica in replicas.values():  # all three start their engines at once
            replica.start()
        for replica in replicas.values():
            assert replica.server is not None
            replica.server.wait_ready(timeout=START_SECONDS + 600)
        # /ready: a replica whose engine is down takes no traffic; a breaker off, as a test that
        # kills a replica on purpose would otherwise have the router shun it for a minute after.
        router = start_router([r.url for r in replicas.values()], log_path=root / "router.log",
                              extra=["--health-check-endpoint", "/ready"])
        yield Fleet(replicas, router, postgres, store)
        router.stop()
    finally:
        for replica in replicas.values():
            if replica.server is not None:
                replica.server.stop()


@pytest.fixture
def wait() -> Callable[[Callable[[], bool], float, str], float]:
    """`wait(check, timeout, what)`: poll until `check()` is true; the seconds it took."""
    import time

    def run(check: Callable[[], bool], timeout: float, what: str) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if check():
                return time.monotonic() - start
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    return run
