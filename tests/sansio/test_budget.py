"""MemoryBudget: the sum of what holders report stays under the cap, largest evicted first."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netlib.sansio.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget


def test_within_the_cap_nobody_is_evicted() -> None:
    budget: MemoryBudget[str] = MemoryBudget(100)
    assert budget.update("a", 60) == []
    assert budget.update("b", 40) == []
    assert budget.total == 100


def test_past_the_cap_the_largest_holders_go_first() -> None:
    budget: MemoryBudget[str] = MemoryBudget(100)
    budget.update("small", 10)
    budget.update("big", 70)
    assert budget.update("medium", 30) == ["big"]
    assert budget.total == 40
    assert budget.statistics().evicted == 1
    assert budget.statistics().peak == 110


def test_reports_replace_and_zero_forgets() -> None:
    budget: MemoryBudget[str] = MemoryBudget(100)
    budget.update("a", 90)
    budget.update("a", 20)
    assert budget.total == 20
    budget.update("a", 0)
    assert budget.statistics().holders == 0
    budget.update("b", 5)
    budget.forget("b")
    budget.forget("never seen")
    assert budget.total == 0


def test_cap_must_be_positive_and_has_a_named_default() -> None:
    assert MemoryBudget().cap == DEFAULT_MEMORY_BUDGET == 256 * 1024 * 1024
    with pytest.raises(ValueError, match="cap"):
        MemoryBudget(0)


@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 500)), max_size=200))
def test_total_never_stays_above_the_cap_and_is_exact(reports: list[tuple[int, int]]) -> None:
    budget: MemoryBudget[int] = MemoryBudget(1000)
    held: dict[int, int] = {}
    for holder, size in reports:
        held[holder] = size
        for victim in budget.update(holder, size):
            assert held[victim] == max(held.values())  # largest first
            del held[victim]
        held = {h: s for h, s in held.items() if s}
        assert budget.total == sum(held.values()) <= 1000
