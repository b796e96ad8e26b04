"""The catalog in PostgreSQL (`--store postgresql://...`): a fleet of replicas shares one database.

Why PostgreSQL through psycopg 3: transactions and unique keys give "a name is created once" across
replicas for free (a second INSERT of the name conflicts, whichever replica sends it), and psycopg
is the maintained driver (binary wheels, no compiler). The schema is versioned in `emo_schema`
and brought up to date at connect under an advisory lock, so replicas starting together migrate it
once. Rows are keyed by the base checkpoint's fingerprint: one database may serve several bases.

One connection per catalog, used by one thread at a time (calls are short; the server makes them
off the event loop). A dropped connection is opened again on the next call; while the database
is down every call raises `StoreUnavailable` (503) within `connect_timeout`, and what a replica
has cached keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.rows import tuple_row

from .base import Catalog, Entry, NameTaken, StoreUnavailable, SubsetNotFound

log = logging.getLogger(__name__)
T = TypeVar("T")

CONNECT_TIMEOUT_S = 3
STATEMENT_TIMEOUT_MS = 5000
# A profiling row whose replica has not said it is alive for this long is failed by any replica.
ORPHAN_JOB_S = 60

# Each entry brings the schema from version i to i + 1; never edit one that has shipped.
MIGRATIONS = (
    """
    CREATE TABLE emo_subsets (
        base     text NOT NULL,
        name     text NOT NULL,
        token    text NOT NULL,
        state    text NOT NULL CHECK (state IN ('profiling', 'ready', 'failed')),
        manifest text,
        scores   text,
        error    text,
        job      jsonb,
        owner    text NOT NULL,
        created  timestamptz NOT NULL DEFAULT now(),
        updated  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (base, name)
    );
    CREATE TABLE emo_counters (
        base     text NOT NULL,
        model    text NOT NULL,
        replica  text NOT NULL,
        body     text NOT NULL,
        updated  timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (base, model, replica)
    );
    """,
)
_MIGRATION_LOCK = 0x656D6F  # pg_advisory_xact_lock key: "emo"


def redact(url: str) -> str:
    """The URL without its password, for logs and errors."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://..."
    host, port = info.get("host", ""), info.get("port", 5432)
    return f"postgresql://{info.get('user', '')}@{host}:{port}/{info.get('dbname', '')}"


class PostgresCatalog(Catalog):
    shared = True

    def __init__(self, url: str, *, base: str, replica: str) -> None:
        self.url, self.base, self.replica = url, base, replica
        self.location = redact(url)
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()
        with self._session():  # at start: a wrong URL or a database that is down stops the server
            pass

    # -- connection ----------------------------------------------------------------------------
    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True,
                               row_factory=tuple_row, application_name=f"emo-serve {self.replica}"[:63],
                               options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        with conn.transaction():
            # The lock first: two replicas' CREATE TABLE IF NOT EXISTS at once can still collide.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS emo_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM emo_schema").fetchone()
            version = (row[0] if row else None) or 0
            if version > len(MIGRATIONS):
                raise StoreUnavailable(f"the store at {self.location} has schema version {version}, newer than this "
                                       f"emo-serve knows ({len(MIGRATIONS)}): upgrade emo-serve")
            for number in range(version, len(MIGRATIONS)):
                conn.execute(MIGRATIONS[number])
                conn.execute("INSERT INTO emo_schema (version) VALUES (%s)", (number + 1,))
                log.info("store schema migrated", extra={"store": self.location, "version": number + 1})
        return conn

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection, opened if needed; an error of the server or the network (down, restarted,
        a timeout) closes it and becomes `StoreUnavailable`. Other database errors are bugs and
        stay what they are."""
        with self._lock:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                yield self._conn
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # the server or the network
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                raise StoreUnavailable(f"the store at {self.location} is unavailable "
                                       f"({type(exc).__name__}); retry later") from None

    def _run(self, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`work` on the connection. A connection opened before the database restarted fails on
        its next use: then once more on a new one (every call here may run twice: writes are
        keyed by token or replace what they wrote)."""
        reused = self._conn is not None and not self._conn.closed
        try:
            with self._session() as conn:
                return work(conn)
        except StoreUnavailable:
            if not reused:
                raise
        with self._session() as conn:
            return work(conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    # -- subsets -------------------------------------------------------------------------------
    def _entry(self, row: tuple[Any, ...]) -> Entry:
        name, state, token, manifest, error, job = row
        return Entry(name, state, token, self.where("manifest", name), manifest=manifest, error=error, job=job)

    def where(self, kind: str, name: str) -> str:
        return f"{kind} of `{name}` in the store at {self.location}"

    def entries(self, *, manifests: bool = True) -> list[Entry]:
        column = "manifest" if manifests else "NULL"
        rows = self._run(lambda c: c.execute(
            f"SELECT name, state, token, {column}, error, job FROM emo_subsets WHERE base = %s ORDER BY name",
            (self.base,)).fetchall())
        return [self._entry(r) for r in rows]

    def get(self, name: str) -> Entry | None:
        row = self._run(lambda c: c.execute(
            "SELECT name, state, token, manifest, error, job FROM emo_subsets WHERE base = %s AND name = %s",
            (self.base, name)).fetchone())
        return self._entry(row) if row else None

    def _insert(self, name: str, token: str, state: str, manifest: str | None, job: dict[str, Any] | None) -> None:
        def work(c: psycopg.Connection[Any]) -> bool:
            cur = c.execute(
                "INSERT INTO emo_subsets (base, name, token, state, manifest, job, owner) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (self.base, name, token, state, manifest, json.dumps(job) if job is not None else None,
                 self.replica))
            if cur.rowcount == 1:
                return True
            # Taken, unless by this very call's first try (its answer lost with the connection).
            row = c.execute("SELECT token FROM emo_subsets WHERE base = %s AND name = %s", (self.base, name)).fetchone()
            return row is not None and row[0] == token

        if not self._run(work):
            raise NameTaken(f"the name `{name}` is already taken by a subset")

    def claim(self, name: str, token: str, job: dict[str, Any]) -> None:
        self._insert(name, token, "profiling", None, job)

    def put(self, name: str, token: str, manifest: str) -> None:
        self._insert(name, token, "ready", manifest, None)

    def _update(self, name: str, token: str, sql: str, params: tuple[Any, ...]) -> int:
        return self._run(lambda c: c.execute(
            f"UPDATE emo_subsets SET {sql}, updated = now() WHERE base = %s AND name = %s AND token = %s",
            (*params, self.base, name, token)).rowcount)

    def publish(self, name: str, token: str, manifest: str, scores: str | None) -> None:
        if not self._update(name, token, "state = 'ready', manifest = %s, scores = %s, error = NULL",
                            (manifest, scores)):
            raise SubsetNotFound(f"the subset `{name}` was deleted while it was being created")

    def fail(self, name: str, token: str, error: str) -> None:
        self._update(name, token, "state = 'failed', error = %s", (error,))

    def release(self, name: str, token: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM emo_subsets WHERE base = %s AND name = %s AND token = %s",
                                      (self.base, name, token)))

    def delete(self, name: str) -> None:
        def work(c: psycopg.Connection[Any]) -> None:
            with c.transaction():
                c.execute("DELETE FROM emo_subsets WHERE base = %s AND name = %s", (self.base, name))
                c.execute("DELETE FROM emo_counters WHERE base = %s AND model = %s", (self.base, name))

        self._run(work)

    def scores(self, name: str) -> str | None:
        row = self._run(lambda c: c.execute("SELECT scores FROM emo_subsets WHERE base = %s AND name = %s",
                                            (self.base, name)).fetchone())
        return row[0] if row else None

    def heartbeat(self, alive: list[str]) -> None:
        def work(c: psycopg.Connection[Any]) -> None:
            c.execute("UPDATE emo_subsets SET updated = now() WHERE base = %s AND owner = %s AND state = 'profiling' "
                      "AND name = ANY(%s)", (self.base, self.replica, alive))
            c.execute("UPDATE emo_subsets SET state = 'failed', updated = now(), error = 'the replica that was "
                      "profiling it (' || owner || ') stopped or lost it; delete it and create it again' "
                      "WHERE base = %s AND state = 'profiling' AND updated < now() - make_interval(secs => %s)",
                      (self.base, ORPHAN_JOB_S))

        self._run(work)

    def fail_own_jobs(self) -> None:
        self._run(lambda c: c.execute(
            "UPDATE emo_subsets SET state = 'failed', updated = now(), error = 'the server restarted while "
            "profiling; delete it and create it again' WHERE base = %s AND owner = %s AND state = 'profiling'",
            (self.base, self.replica)))

    # -- routing counters ----------------------------------------------------------------------
    def write_counters(self, model: str, text: str) -> None:
        self._run(lambda c: c.execute(
            "INSERT INTO emo_counters (base, model, replica, body) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (base, model, replica) DO UPDATE SET body = excluded.body, updated = now()",
            (self.base, model, self.replica, text)))

    def read_counters(self, model: str) -> str | None:
        row = self._run(lambda c: c.execute(
            "SELECT body FROM emo_counters WHERE base = %s AND model = %s AND replica = %s",
            (self.base, model, self.replica)).fetchone())
        return row[0] if row else None

    def other_counters(self, model: str) -> list[str | bytes]:
        rows = self._run(lambda c: c.execute(
            "SELECT body FROM emo_counters WHERE base = %s AND model = %s AND replica <> %s ORDER BY replica",
            (self.base, model, self.replica)).fetchall())
        return [r[0] for r in rows]

    def forget_counters(self, model: str) -> None:
        self._run(lambda c: c.execute("DELETE FROM emo_counters WHERE base = %s AND model = %s AND replica = %s",
                                      (self.base, model, self.replica)))
