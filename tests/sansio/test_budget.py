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


def test_an_evicted_holder_counts_until_forgotten_and_is_never_chosen_again() -> None:
    budget: MemoryBudget[str] = MemoryBudget(100)
    budget.update("a", 60)
    assert budget.update("b", 50) == ["a"]
    assert budget.total == 50  # counted as freed until it reports otherwise
    assert budget.update("a", 70) == []  # what "a" still holds while it goes: no eviction
    assert budget.total == 120
    assert budget.update("c", 1) == ["b"]  # the next report past the cap: "a" is not chosen
    assert budget.total == 71
    assert budget.statistics().holders == 2
    budget.forget("a")
    budget.forget("b")
    assert budget.total == 1
    assert budget.statistics().holders == 1


Op = tuple[int, int, int, bool]


@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 500), st.integers(0, 300), st.booleans()),
        max_size=200,
    )
)
def test_total_is_exact_and_within_the_cap_while_anyone_can_be_evicted(ops: list[Op]) -> None:
    """Each op: a holder reports ``size`` (or is gone and forgotten); each victim then
    reports ``remaining``, what it still holds until it is gone, as StreamProtocol does."""
    budget: MemoryBudget[int] = MemoryBudget(1000)
    held: dict[int, int] = {}  # holders that can be evicted
    leaving: dict[int, int] = {}  # evicted, not yet forgotten
    for holder, size, remaining, gone in ops:
        if gone:
            budget.forget(holder)
            held.pop(holder, None)
            leaving.pop(holder, None)
            continue
        if holder in leaving:
            leaving[holder] = size
            assert budget.update(holder, size) == []  # an evicted holder evicts nobody
            assert budget.total == sum(held.values()) + sum(leaving.values())
            continue
        if size:
            held[holder] = size
        else:
            held.pop(holder, None)
        victims = budget.update(holder, size)
        for victim in victims:
            assert held[victim] == max(held.values())  # largest first, each once
            del held[victim]
            leaving[victim] = 0
        assert budget.total == sum(held.values()) + sum(leaving.values())
        assert budget.total <= 1000 or not held
        for victim in victims:
            leaving[victim] = remaining
            assert budget.update(victim, remaining) == []
        assert budget.total == sum(held.values()) + sum(leaving.values())
