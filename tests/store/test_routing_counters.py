"""The front end's routing book (emo_serve.usage): engine tallies in the base's ids, windows,
users, persistence and its refusals. No engine: the engine side is tests/api/test_live_routing.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from emo_serve.errors import InvalidInput
from emo_serve.usage import NotEnoughTraffic, Tally, UsageBook, WindowOutOfRange, budget_sizes, check_window, from_engine

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
    path.write_text(json.dumps(book.snapshot("m")))
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
