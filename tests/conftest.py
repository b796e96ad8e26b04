"""Session-wide fixtures: tiny demo checkpoints and a byte-counting HTTP range server.

Everything here is real: checkpoints are written by `emo-serve`'s own generator, and the server
is a real HTTP/1.1 server on 127.0.0.1 that answers `Range` requests the way a CDN or the Hub does.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset (float32, 4 layers, 16 experts incl. 1 shared, top-4, 2 shards)."""
    from emo_serve.demo import write_demo_checkpoint

    return write_demo_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0)


_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class RangeServer:
    """Serves `root` over HTTP with byte ranges and counts every body byte it sends."""

    root: Path
    host: str = "127.0.0.1"
    port: int = 0
    bytes_served: int = 0
    requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)  # method, path, range, bytes
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, relpath: str | os.PathLike[str] = "") -> str:
        rel = Path(relpath).relative_to(self.root) if Path(relpath).is_absolute() else Path(relpath)
        return f"http://{self.host}:{self.port}/{rel.as_posix()}".rstrip("/.")

    def reset(self) -> None:
        with self.lock:
            self.bytes_served = 0
            self.requests.clear()

    def paths_requested(self) -> set[str]:
        with self.lock:
            return {p for _, p, _, _ in self.requests}

    def record(self, method: str, path: str, rng: str | None, n: int) -> None:
        with self.lock:
            self.bytes_served += n
            self.requests.append((method, path, rng, n))


def _handler(server: RangeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _resolve(self) -> Path | None:
            rel = self.path.split("?", 1)[0].lstrip("/")
            path = (server.root / rel).resolve()
            if server.root.resolve() not in path.parents or not path.is_file():
                return None
            return path

        def _send(self, send_body: bool) -> None:
            path = self._resolve()
            if path is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                server.record(self.command, self.path, None, 0)
                return
            size = path.stat().st_size
            rng = self.headers.get("Range")
            start, end = 0, size  # end exclusive
            status = 200
            if rng and (m := _RANGE.match(rng.strip())):
                start = int(m[1])
                end = min(size, int(m[2]) + 1) if m[2] else size  # HTTP ranges are inclusive
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    server.record(self.command, self.path, rng, 0)
                    return
                status = 206
            self.send_response(status)
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
            self.end_headers()
            data = b""
            if send_body:
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
            # Count before sending, so a client that has its bytes always sees them counted.
            server.record(self.command, self.path, rng, len(data))
            if data:
                self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(True)

        def do_HEAD(self) -> None:
            self._send(False)

    return Handler


@pytest.fixture(scope="session")
def range_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    """A byte-counting range server over a session directory; copy checkpoints into `.root`."""
    state = RangeServer(root=tmp_path_factory.mktemp("served"))
    httpd = ThreadingHTTPServer((state.host, 0), _handler(state))
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, name="range-server", daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
