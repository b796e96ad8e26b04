"""The front end's routing book (emo_serve.usage): engine tallies in the base's ids, windows,
users (bounded), persistence and its refusals. No engine: the engine side is
tests/api/test_live_routing.py, the collector's tests/store/test_routing_collector.py."""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from emo_serve.errors import InvalidInput
from emo_serve.usage import (
    MAX_USER_CHARS,
    NotEnoughTraffic,
    Tally,
    UsageBook,
    UsageEncoder,
    WindowOutOfRange,
    budget_sizes,
    check_window,
    from_engine,
)

SHAPE = [4, 0, 4]  # a dense layer in the middle
BOUNDS = [0.1, 0.5, 1.0]


def drained(mass: list[list[float]], counts: list[list[int]], tokens: int, outside: float = 0.0,
            hist: list[int] | None = None) -> dict:
    """One key as `emo_vllm.usage.RoutingUsage.drain` hands it out (MoE layers 0 and 2)."""
    return {"model": "m", "user": "", "tokens": [tokens, tokens], "mass": mass, "counts": counts,
            "outside_sum": outside, "outside_tokens": tokens if hist else 0, "hist": hist or [0, 0, 0]}


def test_engine_ids_become_base_ids() -> None:
    """A union engine numbers its experts 0..n-1; the tally puts them back at their base ids."""
    entry = drained([[0.5, 1.5], [2.0, 1.0]], [[1, 2], [2, 1]], tokens=2, outside=0.4, hist=[1, 1, 0])
    tally = from_engine(entry, [0, 2], BOUNDS, SHAPE, local_ids=[[1, 3], [], [0, 3]])
    assert tally.tokens.tolist() == [2, 0, 2]
    assert tally.mass[0].tolist() == [0.0, 0.5, 0.0, 1.5] and tally.mass[2].tolist() == [2.0, 0.0, 0.0, 1.0]
    assert tally.counts[0].tolist() == [0, 1, 0, 2] and tally.mass[1].size == 0
    assert tally.drift == pytest.approx(0.2) and tally.seen == 2
    assert tally.scores("usage")[0] == [0.0, 0.25, 0.0, 0.75] and tally.scores("frequency")[2] == [1.0, 0, 0, 0.5]
    same = from_engine(drained([[0, 0.5, 0, 1.5], [2, 0, 0, 1]], [[0, 1, 0, 2], [2, 0, 0, 1]], 2), [0, 2],
                       BOUNDS, SHAPE, local_ids=None)
    assert same.mass[0].tolist() == tally.mass[0].tolist()


def test_windows_users_and_retention() -> None:
    book = UsageBook(SHAPE, retention=100, bucket=10)
    one = from_engine(drained([[1, 0, 0, 0], [0, 1, 0, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]], 1), [0, 2], BOUNDS,
                      SHAPE, None)
    book.add("m", "alice", one, now=1000)
    book.add("m", "", one, now=1005)      # same bucket
    book.add("m", "bob", one, now=1050)   # a new one
    assert book.tally("m", now=1050).seen == 3
    assert book.tally("m", window=20, now=1060).seen == 1
    assert book.tally("m", user="alice", now=1060).seen == 1 and book.tally("m", user="carol", now=0).seen == 0
    assert [t.seen for _, t in book.series("m")] == [2, 1]
    book.add("m", "", one, now=1200)      # the first buckets fall out of the retention...
    assert [start for start, _ in book.series("m")] == [1200]
    assert book.tally("m", now=1200).seen == 4  # ...but the total keeps them


def test_snapshot_round_trip_and_a_file_from_another_base(tmp_path) -> None:
    book = UsageBook(SHAPE)
    tally = from_engine(drained([[1, 2, 3, 4], [4, 3, 2, 1]], [[1, 1, 0, 1], [0, 1, 1, 1]], 3, 0.9, [1, 1, 1]),
                        [0, 2], BOUNDS, SHAPE, None)
    book.add("m", "alice", tally, now=5.0)
    assert list(book.dirty()) == ["m"]
    path = tmp_path / "m.json"
    path.write_text(UsageEncoder().encode(book.snapshot("m")))
    assert list(book.dirty()) == []
    again = UsageBook(SHAPE)
    again.load("m", path)
    got = again.tally("m", now=10)
    assert got.seen == 3 and got.drift == pytest.approx(0.3) and got.hist.tolist() == [1, 1, 1]
    assert np.array_equal(got.mass[2], tally.mass[2]) and again.tally("m", user="alice", now=10).seen == 3
    with pytest.raises(ValueError, match="unreadable routing counters"):
        UsageBook([4, 4, 4]).load("m", path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="m.json"):
        again.load("m", path)


@pytest.mark.parametrize("window", [0, 0.5, -1, 3601, float("inf"), float("nan")])
def test_windows_out_of_range(window: float) -> None:
    with pytest.raises(WindowOutOfRange, match="out of range") as info:
        check_window(window, 3600)
    assert isinstance(info.value, InvalidInput) and info.value.param == "window"


def test_window_in_range_and_none() -> None:
    assert check_window(None, 3600) is None and check_window(60, 3600) == 60


def test_budget_spreads_by_score_with_one_per_layer() -> None:
    scores = [[0.9, 0.8, 0.1, 0.0], [], [0.2, 0.1, 0.05, 0.0]]
    routed = [[0, 1, 2], [], [0, 1, 2]]
    assert budget_sizes(scores, routed, 2) == [1, 0, 1]
    assert budget_sizes(scores, routed, 3) == [2, 0, 1]
    assert budget_sizes(scores, routed, 4) == [2, 0, 2]


def test_not_enough_traffic_is_a_400_kind() -> None:
    assert issubclass(NotEnoughTraffic, InvalidInput) and NotEnoughTraffic.code == "not_enough_traffic"


def test_empty_tally_has_no_drift() -> None:
    t = Tally.empty(SHAPE, BOUNDS)
    assert t.drift is None and t.seen == 0 and t.scores("usage")[0] == [0.0] * 4


# -- users: a bounded number per model ----------------------------------------------------------------
def tokens(n: int = 1, expert: int = 0) -> Tally:
    """`n` tokens routed to `expert` at both MoE layers."""
    mass = [[float(n) if e == expert else 0.0 for e in range(4)]] * 2
    return from_engine(drained(mass, [[n if e == expert else 0 for e in range(4)]] * 2, n), [0, 2], BOUNDS, SHAPE, None)


def users_of(book: UsageBook, model: str = "m") -> list[str]:
    return list(book.models[model].users)


def test_users_beyond_the_cap_are_folded_into_other_users() -> None:
    """The least recently seen user goes first; its tokens stay in the model's total and in an
    "other users" tally that no user name reaches."""
    book = UsageBook(SHAPE, max_users=3)
    for i, user in enumerate(("a", "b", "c")):
        book.add("m", user, tokens(1, expert=i), now=1)
    book.add("m", "a", tokens(1), now=2)          # a is seen again: b is now the least recent
    book.add("m", "d", tokens(2, expert=3), now=3)
    assert users_of(book) == ["c", "a", "d"]
    assert book.tally("m", user="b", now=3).seen == 0
    assert book.tally("m", user="a", now=3).seen == 2 and book.tally("m", user="d", now=3).seen == 2
    others = book.other_users("m")
    assert others.seen == 1 and others.counts[0].tolist() == [0, 1, 0, 0]
    for name in ("other", "others", "other users", "__other__", "*"):
        assert book.tally("m", user=name, now=3).seen == 0
    # The model's total is exact: every user kept, plus the others.
    total = book.tally("m", now=3)
    assert total.seen == 6
    kept = sum(book.tally("m", user=u, now=3).counts[0] for u in users_of(book)) + others.counts[0]
    assert np.array_equal(kept, total.counts[0])


def test_a_user_longer_than_a_query_can_name_is_not_kept_by_name() -> None:
    book = UsageBook(SHAPE)
    book.add("m", "u" * (MAX_USER_CHARS + 1), tokens(), now=1)
    book.add("m", "u" * MAX_USER_CHARS, tokens(), now=1)
    assert users_of(book) == ["u" * MAX_USER_CHARS]
    assert book.other_users("m").seen == 1 and book.tally("m", now=1).seen == 2


def test_20000_users_grow_neither_memory_nor_the_file(tmp_path: Path) -> None:
    """What the issue measured (20,000 distinct users: 301 -> 470 MB, a file 100x larger), on
    the book: after the first `max_users` users, more distinct users cost nothing."""
    book, encoder = UsageBook(SHAPE, max_users=100), UsageEncoder()
    one = tokens()

    def users(first: int, last: int) -> tuple[int, int]:
        for i in range(first, last):
            book.add("m", f"user-{i}", one, now=1000 + i / 1000)
        text = encoder.encode(book.snapshot("m"))
        gc.collect()
        return tracemalloc.get_traced_memory()[0], len(text)

    tracemalloc.start()
    try:
        memory_1k, file_1k = users(0, 1000)
        memory_20k, file_20k = users(1000, 20_000)
    finally:
        tracemalloc.stop()
    assert len(users_of(book)) == 100 and users_of(book)[-1] == "user-19999"
    assert book.tally("m", now=1020).seen == 20_000 and book.other_users("m").seen == 19_900
    assert file_20k < 1.1 * file_1k, (file_1k, file_20k)  # longer names and numbers; 20x more users
    assert memory_20k - memory_1k < 100_000, (memory_1k, memory_20k)  # one user's tally is ~1.5 kB


def test_users_other_users_and_identity_survive_a_round_trip(tmp_path: Path) -> None:
    book = UsageBook(SHAPE, max_users=3)
    for user in ("a", "b", "c", "d"):
        book.add("m", user, tokens(), now=1, identity="s-1")
    path = tmp_path / "m.json"
    path.write_text(UsageEncoder().encode(book.snapshot("m")))
    again = UsageBook(SHAPE, max_users=3)
    again.load("m", path, identity="s-1")
    assert users_of(again) == ["b", "c", "d"] and again.other_users("m").seen == 1
    assert again.models["m"].identity == "s-1" and again.tally("m", now=1).seen == 4
    # A smaller cap at the next start folds the least recent users in at once.
    smaller = UsageBook(SHAPE, max_users=2)
    smaller.load("m", path, identity="s-1")
    assert users_of(smaller) == ["c", "d"] and smaller.other_users("m").seen == 2
    # A file of another subset that had the same name is not read as this one's.
    with pytest.raises(ValueError, match="another incarnation"):
        UsageBook(SHAPE).load("m", path, identity="s-2")
    # A file written before counters had identities is kept.
    legacy = json.loads(path.read_text())
    del legacy["identity"], legacy["other_users"]
    path.write_text(json.dumps(legacy))
    UsageBook(SHAPE).load("m", path, identity="s-2")


def test_another_identity_starts_the_model_afresh() -> None:
    """Counts booked for a re-created subset of the same name start from nothing."""
    book = UsageBook(SHAPE)
    book.add("s", "oldtenant", tokens(5), now=1, identity="s-1")
    book.add("s", "newtenant", tokens(1), now=2, identity="s-2")
    assert book.tally("s", now=2).seen == 1 and book.tally("s", user="oldtenant", now=2).seen == 0
    assert book.models["s"].identity == "s-2"


# -- persistence: cheap on the event loop --------------------------------------------------------------
def reloaded(text: str, tmp_path: Path) -> UsageBook:
    path = tmp_path / "reloaded.json"
    path.write_text(text)
    book = UsageBook(SHAPE)
    book.load("m", path)
    return book


def test_a_snapshot_copies_only_what_changed_and_is_isolated_from_later_counts(tmp_path: Path) -> None:
    book, encoder = UsageBook(SHAPE, bucket=10), UsageEncoder()
    for i in range(50):
        book.add("m", f"user-{i}", tokens(), now=100 + i)   # five buckets
    first = book.snapshot("m")
    assert len(first.changed) == 50 and first.complete     # nothing of the model encoded yet
    encoder.encode(first)
    book.add("m", "user-7", tokens(3), now=150)
    second = book.snapshot("m")
    assert set(second.changed) == {"user-7"} and not second.complete
    book.add("m", "user-7", tokens(100), now=151)          # after the snapshot: not in its file
    book.add("m", "user-8", tokens(100), now=151)
    again = reloaded(encoder.encode(second), tmp_path)
    assert again.tally("m", user="user-7", now=151).seen == 4
    assert again.tally("m", user="user-8", now=151).seen == 1
    assert again.tally("m", now=151).seen == 53 and len(again.series("m")) == 6
    # ...and the next snapshot, incremental again, holds everything.
    third = reloaded(encoder.encode(book.snapshot("m")), tmp_path)
    assert third.tally("m", user="user-8", now=151).seen == 101 and third.tally("m", now=151).seen == 253
    for name, t in book.models["m"].users.items():
        assert np.array_equal(third.tally("m", user=name, now=151).mass[0], t.mass[0]), name
