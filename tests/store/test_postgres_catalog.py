"""The PostgreSQL catalog (`--store postgresql://...`) with a real PostgreSQL server: two stores on
one database behave as two replicas of a fleet (no engines; the API-level fleet tests are in
tests/fleet)."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest
from postgres_server import PostgresServer, postgres_fixture  # noqa: F401

from emo_serve.catalog import NameTaken, StoreUnavailable, SubsetNotFound
from emo_serve.catalog.postgres import MIGRATIONS, PostgresCatalog, redact
from emo_serve.checkpoint import Checkpoint
from emo_serve.store import SubsetState, SubsetStore
from emo_serve.subset import make_subset

BASE_ID = "tiny"


@pytest.fixture(scope="module")
def base(tiny_ckpt: Path) -> Checkpoint:
    return Checkpoint(str(tiny_ckpt))


@pytest.fixture
def url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    return postgres.create_database(request.node.name.replace("[", "_").replace("]", "")[:40].lower())


def replica(base: Checkpoint, url: str, tmp_path: Path, name: str) -> SubsetStore:
    catalog = PostgresCatalog(url, base=base.fingerprint, replica=name)
    return SubsetStore(base, BASE_ID, tmp_path / name, catalog)


def test_a_subset_made_on_one_replica_is_read_by_another(base: Checkpoint, url: str, tmp_path: Path) -> None:
    a, b = replica(base, url, tmp_path, "a"), replica(base, url, tmp_path, "b")
    spec = make_subset(base, [[0, 1, 2]] * 4, "code")
    a.add(spec)
    (entry,) = b.catalog.entries()
    assert (entry.name, entry.state) == ("code", "ready")
    record = b.from_entry(entry)
    assert record.state is SubsetState.READY and record.spec is not None and record.spec.experts == spec.experts
    assert record.model_dir is not None and record.model_dir.is_dir() and tmp_path / "b" in record.model_dir.parents
    assert record.token == a.records["code"].token
    # A replica restarted on an empty state dir gets it all back from the database.
    again = replica(base, url, tmp_path, "a2")
    assert [r.name for r in again.load_existing()] == ["code"]


def test_a_name_is_created_once_across_replicas(base: Checkpoint, url: str, tmp_path: Path) -> None:
    """Two replicas claim one name at the same moment: the database's unique key lets one win."""
    stores = [replica(base, url, tmp_path, n) for n in ("a", "b")]
    barrier, results = threading.Barrier(2), {}

    def claim(i: int) -> None:
        barrier.wait()
        try:
            stores[i].catalog.claim("same", f"token-{i}", {"method": "usage"})
            results[i] = "claimed"
        except NameTaken as exc:
            results[i] = str(exc)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values())[0] == "claimed", results
    assert "already taken" in sorted(results.values())[1], results
    assert [e.name for e in stores[0].catalog.entries()] == ["same"]


def test_a_job_cannot_publish_into_a_name_deleted_meanwhile(base: Checkpoint, url: str, tmp_path: Path) -> None:
    a, b = replica(base, url, tmp_path, "a"), replica(base, url, tmp_path, "b")
    spec = make_subset(base, [[0, 1]] * 4, "racy")
    a.catalog.claim("racy", "first", {"method": "usage"})
    b.catalog.delete("racy")  # deleted on B while A profiles
    b.catalog.claim("racy", "second", {"method": "usage"})  # and made again there
    with pytest.raises(SubsetNotFound, match="deleted while it was being created"):
        a.catalog.publish("racy", "first", spec.to_json(), None)
    (entry,) = b.catalog.entries()
    assert (entry.state, entry.token) == ("profiling", "second")  # the successor is untouched


def test_failures_scores_and_counters(base: Checkpoint, url: str, tmp_path: Path) -> None:
    a, b = replica(base, url, tmp_path, "a"), replica(base, url, tmp_path, "b")
    a.catalog.claim("bad", "t1", {"method": "usage"})
    a.catalog.fail("bad", "t1", "no examples fit")
    record = b.from_entry(b.catalog.get("bad"))  # type: ignore[arg-type]
    assert record.state is SubsetState.FAILED and record.error == "no examples fit"
    a.catalog.claim("good", "t2", {"method": "usage"})
    a.catalog.publish("good", "t2", make_subset(base, [[0, 1]] * 4, "good").to_json(), '{"not": "scores"}')
    assert b.catalog.scores("good") == '{"not": "scores"}'
    # Routing counters: each replica its own row; the others' read as the fleet's.
    a.catalog.write_counters("good", "from-a")
    b.catalog.write_counters("good", "from-b")
    a.catalog.write_counters("good", "from-a-again")
    assert a.catalog.read_counters("good") == "from-a-again"
    assert b.catalog.other_counters("good") == ["from-a-again"]
    assert a.catalog.other_counters("good") == ["from-b"]
    b.catalog.delete("good")  # a delete takes every replica's counters with it
    assert a.catalog.read_counters("good") is None and b.catalog.other_counters("good") == []


def test_jobs_of_a_replica_that_is_gone_are_failed(base: Checkpoint, url: str, tmp_path: Path) -> None:
    a, b = replica(base, url, tmp_path, "a"), replica(base, url, tmp_path, "b")
    a.catalog.claim("mine", "t1", {"method": "usage"})
    a.catalog.claim("lost", "t3", {"method": "usage"})  # its failure never reached the store
    b.catalog.claim("theirs", "t2", {"method": "usage"})
    a.catalog.heartbeat(["mine"])
    assert {e.name: e.state for e in a.catalog.entries()} == {"mine": "profiling", "lost": "profiling",
                                                               "theirs": "profiling"}
    with psycopg.connect(url, autocommit=True) as conn:  # two minutes pass: only A's live job says so
        conn.execute("UPDATE emo_subsets SET updated = now() - interval '2 minutes'")
    a.catalog.heartbeat(["mine"])
    states = {e.name: (e.state, e.error) for e in a.catalog.entries()}
    assert states["mine"] == ("profiling", None)
    assert states["theirs"][0] == "failed" and "(b) stopped" in states["theirs"][1]
    assert states["lost"][0] == "failed" and "(a) stopped or lost it" in states["lost"][1]
    # A replica restarting under its name fails its own jobs at once: they died with it.
    replica(base, url, tmp_path, "a").load_existing()
    assert {e.name: e.state for e in b.catalog.entries()}["mine"] == "failed"


def test_the_schema_is_migrated_once_by_replicas_starting_together(url: str, base: Checkpoint) -> None:
    errors: list[BaseException] = []

    def connect(i: int) -> None:
        try:
            PostgresCatalog(url, base=base.fingerprint, replica=f"r{i}").close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with psycopg.connect(url) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM emo_schema ORDER BY version")]
    assert versions == list(range(1, len(MIGRATIONS) + 1))


def test_a_newer_schema_is_refused(url: str, base: Checkpoint) -> None:
    PostgresCatalog(url, base=base.fingerprint, replica="r").close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO emo_schema (version) VALUES (%s)", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreUnavailable, match="newer than this emo-serve knows"):
        PostgresCatalog(url, base=base.fingerprint, replica="r")


def test_a_database_that_goes_down_answers_unavailable_then_recovers(postgres: PostgresServer, url: str,
                                                                      base: Checkpoint, tmp_path: Path) -> None:
    a = replica(base, url, tmp_path, "a")
    a.add(make_subset(base, [[0, 1]] * 4, "kept"))
    postgres.stop()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            a.catalog.entries()
        assert "password" not in str(caught.value) and "127.0.0.1" in str(caught.value)
        with pytest.raises(StoreUnavailable):
            a.catalog.claim("new", "t", {})
        assert a.records["kept"].state is SubsetState.READY  # what is cached is untouched
    finally:
        postgres.start()
    a.catalog.claim("new", "t", {})  # the next call opens a new connection
    assert {e.name for e in a.catalog.entries()} == {"kept", "new"}


def test_a_wrong_url_stops_the_start_with_a_clear_error(postgres: PostgresServer, base: Checkpoint) -> None:
    url = postgres.url_for("no_such_database").replace("postgres@", "postgres:secret@")
    with pytest.raises(StoreUnavailable) as caught:
        PostgresCatalog(url, base=base.fingerprint, replica="r")
    assert "secret" not in str(caught.value) and "no_such_database" in str(caught.value)
    assert redact(url) == f"postgresql://postgres@127.0.0.1:{postgres.port}/no_such_database"


def test_the_first_call_after_a_database_restart_succeeds(postgres: PostgresServer, url: str,
                                                           base: Checkpoint, tmp_path: Path) -> None:
    """A connection opened before the restart is dead; the call that finds out retries on a new
    one rather than failing a request that came after the database was back."""
    a = replica(base, url, tmp_path, "a")
    a.catalog.entries()
    postgres.restart()
    a.catalog.claim("after", "t", {"method": "usage"})
    # A write may run twice (its first answer lost with a connection): the second finds its own claim.
    a.catalog.claim("after", "t", {"method": "usage"})
    assert [e.name for e in a.catalog.entries()] == ["after"]
    with pytest.raises(NameTaken):
        replica(base, url, tmp_path, "b").catalog.claim("after", "other", {})
