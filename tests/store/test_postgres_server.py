"""The fleet harness itself: tests/postgres_server.py runs a real PostgreSQL that keeps its data
across a restart and a crash, and tests/router_process.py runs the real vllm-router.

The router test puts two stand-in HTTP workers (a few lines of `http.server`) behind it, because
what is tested here is the harness, not emo-serve: that the router starts, spreads session keys
over its workers, drops a worker that went away and takes it back. The fleet tests put real
emo-serve replicas behind it.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest
from postgres_server import PostgresServer, postgres_fixture  # noqa: F401  (the `postgres` fixture)
from router_process import start_router


def test_postgres_keeps_committed_data_across_restart_and_crash() -> None:
    with PostgresServer() as pg:
        assert pg.url == f"postgresql://postgres@127.0.0.1:{pg.port}/emo"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (k text PRIMARY KEY, v int)")
            conn.execute("INSERT INTO t VALUES ('a', 1)")
            pg.restart()
            with pytest.raises(psycopg.OperationalError):  # a fast stop ends open sessions
                conn.execute("SELECT 1")
        with psycopg.connect(pg.url, autocommit=True) as conn:
            assert conn.execute("SELECT k, v FROM t").fetchall() == [("a", 1)]
            conn.execute("INSERT INTO t VALUES ('b', 2)")
        pg.kill()
        assert not pg.running()
        pg.start()  # crash recovery replays what was committed
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT k, v FROM t ORDER BY k").fetchall() == [("a", 1), ("b", 2)]
        assert "database system is ready to accept connections" in pg.log_text()
        root = pg.root
    assert not root.exists()


def test_create_database_gives_each_test_its_own(postgres: PostgresServer) -> None:
    url = postgres.create_database("harness_own")
    assert url == postgres.url_for("harness_own")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE only_here (x int)")
    with psycopg.connect(postgres.url) as conn:
        assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    with pytest.raises(ValueError):
        postgres.create_database("no; DROP")


class StandIn:
    """A stand-in worker on 127.0.0.1: `GET /health` 200; every POST answers its name and the
    `Authorization` it got. `down()` closes the port (connections refused), `up()` reopens it."""

    def __init__(self, name: str) -> None:
        self.name, self.port = name, 0
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        name = self.name

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer({"worker": name, "path": self.path})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self._answer({"worker": name, "path": self.path, "auth": self.headers.get("Authorization")})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name=f"stand-in-{name}", daemon=True).start()

    def down(self) -> None:
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def stand_ins() -> Iterator[tuple[StandIn, StandIn]]:
    a, b = StandIn("a"), StandIn("b")
    a.up()
    b.up()
    yield a, b
    a.down()
    b.down()


def complete(router_url: str, session: str, auth: str = "Bearer client-key") -> dict[str, object]:
    request = urllib.request.Request(
        f"{router_url}/v1/completions", data=json.dumps({"model": "m", "prompt": "hi"}).encode(),
        headers={"Content-Type": "application/json", "X-Session-ID": session, "Authorization": auth})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_router_spreads_sessions_and_fails_over(stand_ins: tuple[StandIn, StandIn], tmp_path: Path) -> None:
    a, b = stand_ins
    with start_router([a.url, b.url], log_path=tmp_path / "router.log") as router:
        assert router.workers() == {a.url: True, b.url: True}
        first = {s: complete(router.url, s) for s in (f"s{i}" for i in range(16))}
        assert {r["auth"] for r in first.values()} == {"Bearer client-key"}  # passed through as-is
        on = {w: [s for s, r in first.items() if r["worker"] == w] for w in ("a", "b")}
        assert on["a"] and on["b"], first  # 16 keys on a ring of 2 x 160 nodes: both get some
        assert all(complete(router.url, s)["worker"] == r["worker"] for s, r in first.items())  # sticky

        a.down()
        router.wait_worker(a.url, healthy=False, timeout=10)
        assert {complete(router.url, s)["worker"] for s in on["a"]} == {"b"}

        a.up()  # same port
        router.wait_worker(a.url, healthy=True, timeout=10)
        assert {complete(router.url, s)["worker"] for s in on["a"]} == {"a"}
    assert not router.running() and "Router ready" in router.log_text()
