"""A real PostgreSQL server for tests: Debian's own binaries, a throwaway cluster in a temporary
directory, listening on a free port of 127.0.0.1 (never the packaged cluster on 5432).

PostgreSQL comes from Debian's `postgresql` package (installed here with apt-get when missing, as
browser.py installs Chromium). The server refuses to run as root, so as root every PostgreSQL
program runs as the `postgres` user the package creates (`runuser`); as anyone else, as them.
Authentication is `trust`: tests connect as `postgres` with no password.

In a conftest: `from postgres_server import postgres_fixture  # noqa: F401` gives its tests a
session-wide `postgres` fixture; `postgres.create_database("name")` returns the URL of a fresh
database, so tests need not share tables.
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from debian_packages import apt_install
from router_process import free_port

PG_LIB = Path("/usr/lib/postgresql")
DATABASE = "emo"  # the database `url` names, created on the first start
# fsync and full-page writes only guard against the machine going down, which no test does; a
# killed server still loses nothing committed (synchronous_commit stays on: off, a crash could).
SETTINGS = {"listen_addresses": "127.0.0.1", "fsync": "off", "full_page_writes": "off", "max_connections": "200"}


def _newest_bindir() -> Path | None:
    majors = [p for p in PG_LIB.glob("*/bin") if p.parent.name.isdigit() and (p / "pg_ctl").is_file()]
    return max(majors, key=lambda p: int(p.parent.name), default=None)


def pg_bindir() -> Path:
    """Newest `/usr/lib/postgresql/<major>/bin`, installing Debian's postgresql first if needed."""
    found = _newest_bindir()
    if found:
        return found
    # The package may create and start its own cluster on 5432; ours never uses it.
    apt_install("postgresql", needed_by="the store and fleet tests")
    found = _newest_bindir()
    if not found:
        pytest.fail("apt-get installed postgresql, but no /usr/lib/postgresql/<major>/bin/pg_ctl appeared")
    return found


class PostgresServer:
    """One PostgreSQL cluster in its own temporary directory, started and stopped on demand.

    `start()` creates the cluster on first use (initdb, then the database `emo`); `stop()` is a
    fast shutdown (sessions ended, checkpoint written); `kill()` an immediate one, like a crash
    (recovery at the next start); `restart()` stops and starts on the same port and data. `close()`
    stops the server and removes the directory; it also runs at interpreter exit.
    """

    def __init__(self) -> None:
        self.bindir = pg_bindir()
        self.as_postgres = os.geteuid() == 0  # the server refuses to run as root
        # mkdtemp makes it 0700; the postgres user must reach its data, log and socket in it.
        self.root = Path(tempfile.mkdtemp(prefix="emo-pg-", dir="/tmp"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self.port = 0
        if self.as_postgres:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                self.close()
                pytest.fail("PostgreSQL refuses to run as root and there is no `postgres` user: "
                            "run the tests as another user, or `apt-get install postgresql` to create it")
            os.chown(self.root, user.pw_uid, user.pw_gid)
        atexit.register(self.close)

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def running(self) -> bool:
        if not (self.data / "postmaster.pid").is_file():
            return False
        return self._pg("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    def log_text(self) -> str:
        """The server's log so far (start-up, errors, shutdowns): for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> None:
        """Start the server (creating the cluster and `emo` on first use); wait until it accepts."""
        first = not self.data.exists()
        if first:
            self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                     "--locale=C", "--no-sync")
        for _ in range(3):  # another process may take the free port before the server binds it
            self.port = self.port or free_port()
            options = " ".join([f"-p {self.port}", f"-k {self.root}", *(f"-c {k}={v}" for k, v in SETTINGS.items())])
            done = self._pg("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log_path),
                            "-w", "-t", "60", "start", check=False)
            if done.returncode == 0:
                break
            if not first or "could not bind" not in self.log_text():
                raise AssertionError(f"pg_ctl start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                                     f"{self.log_text()[-4000:]}")
            self.port = 0
        else:
            raise AssertionError(f"PostgreSQL found no free port:\n{self.log_text()[-4000:]}")
        if first:
            self._psql("postgres", f'CREATE DATABASE "{DATABASE}"')

    def stop(self) -> None:
        """Fast shutdown: open sessions are ended, a checkpoint is written; no-op if not running."""
        if self.running():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def kill(self) -> None:
        """Immediate shutdown, as in a crash: no checkpoint; the next start runs crash recovery."""
        if self.running():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop (fast) and start again on the same port, with the same data."""
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        """Create the database `name` (letters, digits, `_`) and return its URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: only letters, digits and _")
        self._psql("postgres", f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def close(self) -> None:
        """Stop the server (hard if it will not stop) and remove its directory; idempotent."""
        if self.data.exists():
            try:
                self.stop()
            except (AssertionError, subprocess.TimeoutExpired):
                self._kill_postmaster()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # the postmaster's immediate shutdown, children included
        except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
            pass

    def _psql(self, database: str, sql: str) -> None:
        self._pg("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", "postgres", "-d", database, "-c", sql)

    def _pg(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / program), *args]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        # cwd: the postgres user may not be able to enter the caller's (e.g. /root).
        done = subprocess.run(argv, cwd=self.root, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "LC_ALL": "C", "PGCONNECT_TIMEOUT": "10"})
        if check and done.returncode != 0:
            raise AssertionError(f"{program} {' '.join(args)} failed ({done.returncode}):\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{self.log_text()[-3000:]}")
        return done


def postgres_server() -> Iterator[PostgresServer]:
    """A started server for as long as the generator is suspended; stopped and removed after."""
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


# Importing this into a conftest (or a test module) registers the fixture `postgres` there.
postgres_fixture = pytest.fixture(scope="session", name="postgres")(postgres_server)
