"""The front end's map of expert slots: what a load fills, what it evicts and what it never may.

Pure bookkeeping (no engine): the engine side, and the two together, are
tests/api/test_expert_slots.py.
"""

from __future__ import annotations

import pytest

from emo_serve.engines.slots import LoadPlan, SlotTable, SubsetTooLarge

# Two MoE layers of 6 routed experts (ids 0..5) + a shared one (id 6), and a dense layer.
ROUTED = [list(range(6)), list(range(6)), []]
SHARED = 6


def subset(*layers: list[int]) -> list[list[int]]:
    """Per layer the routed ids plus the shared expert, as subset specs list them."""
    return [[*ids, SHARED] for ids in layers] + [[]]


def load(table: SlotTable, experts: list[list[int]], pinned: set[tuple[int, int]] | None = None) -> LoadPlan:
    plan = table.plan(experts, pinned or set())
    assert isinstance(plan, LoadPlan), f"no room at layer {plan}"
    table.begin(plan)
    table.finish(plan, ok=True)
    return plan


def test_free_slots_fill_first_and_shared_experts_need_none() -> None:
    table = SlotTable(ROUTED, 3)
    plan = load(table, subset([0, 1], [2]))
    assert plan.pairs == {0: [(0, 0), (1, 1)], 1: [(0, 2)]} and not plan.evicted
    assert table.is_resident(subset([0, 1], [2])) and table.count() == 3
    assert table.plan(subset([0, 1], [2]), set()) == LoadPlan({})  # nothing missing


def test_the_least_recently_used_expert_is_evicted() -> None:
    table = SlotTable(ROUTED, 3)
    load(table, subset([0], [0]))
    load(table, subset([1], [1]))
    load(table, subset([2], [2]))
    table.touch(subset([0], [0]))  # 0 used again: 1 is now the oldest
    plan = load(table, subset([3], [3]))
    assert plan.evicted == {0: [1], 1: [1]}
    assert table.resident(subset([0, 1, 2, 3], [0, 1, 2, 3])) == [[0, 2, 3], [0, 2, 3], []]


def test_experts_of_busy_subsets_and_of_the_subset_itself_are_never_evicted() -> None:
    table = SlotTable(ROUTED, 3)
    load(table, subset([0, 1, 2], [0, 1, 2]))
    # Needs 3 and 4 at layer 0, keeps 0; 1 is pinned by a request in flight: only 2 can go.
    assert table.plan(subset([0, 3, 4], [0]), {(0, 1)}) == 0
    plan = load(table, subset([0, 3], [0]), {(0, 1)})
    assert plan.evicted == {0: [2]} and table.resident(subset([0, 1, 3], [0])) == [[0, 1, 3], [0], []]


def test_slots_being_loaded_are_neither_resident_nor_reused() -> None:
    table = SlotTable(ROUTED, 2)
    plan = table.plan(subset([0, 1], [0]), set())
    assert isinstance(plan, LoadPlan)
    table.begin(plan)
    assert not table.is_resident(subset([0], [0])) and table.count() == 0
    assert table.plan(subset([2], [2]), set()) == 0  # layer 0's two slots are both loading
    table.finish(plan, ok=False)  # the engine died: the slots hold nothing
    assert table.occupancy() == [[None, None], [None, None], []]


def test_a_subset_larger_than_the_slots_is_named_with_its_layer() -> None:
    table = SlotTable(ROUTED, 3)
    table.check_fits(subset([0, 1, 2], [0]), where="subset `ok`")
    with pytest.raises(SubsetTooLarge, match=r"subset `big` keeps 4 routed experts at layer 1.* 3 expert slots"):
        table.check_fits(subset([0], [0, 1, 2, 3]), where="subset `big`")


def test_a_restarted_engine_starts_empty() -> None:
    table = SlotTable(ROUTED, 6)
    load(table, subset([0, 1, 2, 3, 4, 5], [0]))
    table.reset()
    assert table.count() == 0 and not table.is_resident(subset([0], [0]))
