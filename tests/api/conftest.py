"""Fixtures of the API tests: real `emo-serve serve` processes on 127.0.0.1, driven over HTTP
and with the official `openai` client.

Engine starts cost ~30-60 s (more when the machine is busy), so the engine-backed tests share one
server per module and keep the number of distinct models small.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from api_harness import Server, start_server


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    """`server_factory(model, *args, state_dir=None, env=None)` starts a server; all are stopped
    at the end of the session."""
    started: list[Server] = []

    def make(model: Path | None, *args: str, state_dir: Path | None = None,
             env: dict[str, str] | None = None, keys: bool = True) -> Server:
        state = state_dir or tmp_path_factory.mktemp("state")
        log = tmp_path_factory.mktemp("logs") / "server.log"
        server = start_server(model, state, log, *args, env=env, keys=keys)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def frontend(server_factory, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A server with no engine running: the base (a private copy, which one test damages) is not
    served, and nothing here asks a model to generate, so every test here runs in seconds."""
    root = tmp_path_factory.mktemp("frontend")
    base = Path(shutil.copytree(tiny_ckpt, root / "base"))
    return server_factory(base, "--no-serve-base", "--served-model-name", "tiny", "--max-body-bytes",
                          "65536", "--max-n", "4", state_dir=root / "state")
