"""Automatic sizing on planted checkpoints, where the right answer is known by construction
(see conftest.py): 3 routed experts per layer carry everything, or every expert is needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from emo_serve.sizing import SizingError, auto_subset

TOLERANCE = 1e-3


def test_smallest_size_within_tolerance_is_the_planted_one(planted: tuple[Path, list[str]]) -> None:
    path, examples = planted
    spec = auto_subset(path, examples, name="auto", max_loss_increase=TOLERANCE, folds=3, progress=False)
    assert spec.provenance.size == 3
    assert spec.experts == [[0, 1, 2, 15]] * 4  # the dominant experts and the shared one
    quality = spec.provenance.details["quality"]
    assert quality["estimate"] == "k-fold" and quality["folds"] == 3 and quality["examples"] == len(examples)
    assert quality["max_loss_increase"] == TOLERANCE and quality["sizes"] == [3] * 4
    assert quality["relative_change"] == pytest.approx(0.0, abs=1e-6)
    by_size = {c["sizes"][0]: c["relative_change"] for c in quality["candidates"]}
    assert by_size[2] > TOLERANCE  # one size smaller fails, measured on held-out folds


def test_one_example_gives_an_in_sample_estimate(planted: tuple[Path, list[str]]) -> None:
    path, examples = planted
    spec = auto_subset(path, examples[:1], name="one", max_loss_increase=TOLERANCE, progress=False)
    quality = spec.provenance.details["quality"]
    assert quality["estimate"] == "in-sample" and quality["folds"] == 1 and quality["examples"] == 1
    assert spec.provenance.size <= 3  # one text may need fewer experts than all of them


def test_a_tolerance_no_subset_meets_is_refused(all_needed: tuple[Path, list[str]]) -> None:
    path, examples = all_needed
    with pytest.raises(SizingError, match=r"no subset smaller than the base stays within a 0\.1%"):
        auto_subset(path, examples, name="never", max_loss_increase=TOLERANCE, folds=3, progress=False)


def test_budget_is_spent_where_it_lowers_the_loss(planted: tuple[Path, list[str]]) -> None:
    path, examples = planted
    spec = auto_subset(path, examples, name="budget", budget=12, folds=3, progress=False)
    quality = spec.provenance.details["quality"]
    assert quality["sizes"] == [3, 3, 3, 3] and quality["budget"] == 12
    assert spec.experts == [[0, 1, 2, 15]] * 4
    assert quality["estimate"] == "k-fold"
    assert quality["relative_change"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_loss_increase=-0.1), "must be a number >= 0"),
    (dict(max_loss_increase=0.1, budget=8), "exactly one of"),
    (dict(), "exactly one of"),
    (dict(budget=3), "budget 3: needs between 4"),
    (dict(budget=61), "and 60"),
    (dict(max_loss_increase=0.1, method="random"), "ranks no expert"),
    (dict(budget=8, method="layerwise"), "use 'usage' with a budget"),
])
def test_bad_requests_are_refused(planted: tuple[Path, list[str]], kwargs: dict, message: str) -> None:
    path, examples = planted
    with pytest.raises(SizingError, match=message):
        auto_subset(path, examples, name="bad", progress=False, **kwargs)
