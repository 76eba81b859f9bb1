"""DeadlineWheel: never early, at most one slot late, O(1) add and discard."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netlib.sansio.deadlines import DeadlineWheel, resolution_for

TOLERANCE = 0.5
"""robustness.md: a deadline fires at deadline +-0.5 s."""
SLOT_BOUND = 0.1
"""What the wheel may add of that tolerance: the rest is the loop's timer and latency."""


def test_items_are_due_at_their_slot_and_not_before() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(0.5)
    wheel.add("a", 1.2)  # slot 1.5
    wheel.add("b", 1.5)  # slot 1.5
    wheel.add("c", 3.01)  # slot 3.5
    assert wheel.next_tick() == 3
    assert wheel.time_of(3) == 1.5
    assert wheel.pop_through(2) == []  # slot 1.0: before any deadline
    assert wheel.pop_through(3) == ["a", "b"]
    assert wheel.next_tick() == 7
    assert wheel.pop_through(20) == ["c"]
    assert wheel.next_tick() is None
    assert len(wheel) == 0


def test_discard_takes_an_item_out_and_tolerates_a_popped_slot() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(1.0)
    slot_a = wheel.add("a", 5.0)
    wheel.add("b", 5.0)
    wheel.discard("a", slot_a)
    assert len(wheel) == 1
    assert wheel.pop_through(5) == ["b"]
    wheel.discard("a", slot_a)  # the slot is gone already: nothing happens
    assert wheel.next_tick() is None


def test_emptied_slots_are_skipped_by_next_tick() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(1.0)
    slot = wheel.add("early", 1.0)
    wheel.add("late", 9.0)
    wheel.discard("early", slot)
    assert wheel.next_tick() == 9


@pytest.mark.parametrize("resolution", [0.0, -1.0, math.nan])
def test_resolution_must_be_positive(resolution: float) -> None:
    with pytest.raises(ValueError, match="resolution"):
        DeadlineWheel(resolution)


@given(
    resolution=st.sampled_from([0.001, 0.01, 0.1, 0.3, 0.5]),
    deadlines=st.lists(st.floats(min_value=0, max_value=1e7), min_size=1, max_size=50),
)
def test_popped_at_their_tick_never_early_at_most_one_slot_late(
    resolution: float, deadlines: list[float]
) -> None:
    wheel: DeadlineWheel[int] = DeadlineWheel(resolution)
    for item, deadline in enumerate(deadlines):
        wheel.add(item, deadline)
    seen: dict[int, float] = {}
    while (tick := wheel.next_tick()) is not None:
        popped = wheel.pop_through(tick)
        assert popped  # the earliest slot is never empty, whatever the magnitude
        for item in popped:
            seen[item] = wheel.time_of(tick)
    assert sorted(seen) == list(range(len(deadlines)))
    for item, when in seen.items():
        assert deadlines[item] <= when  # never early, exactly
        assert when <= deadlines[item] + resolution * (1 + 1e-6)  # at most one slot late


def test_a_slot_is_due_at_its_own_time_at_large_clock_values() -> None:
    wheel: DeadlineWheel[str] = DeadlineWheel(0.001)
    wheel.add("a", 32768.005)
    tick = wheel.next_tick()
    assert tick is not None
    assert wheel.pop_through(tick) == ["a"]
    assert wheel.time_of(tick) >= 32768.005


@pytest.mark.parametrize(
    "timeouts",
    [(10.0, 60.0), (10.0, None), (None, 60.0), (3600.0, None), (None, None), (2.5, 60.0)],
)
def test_slots_are_at_most_a_tenth_of_a_second_for_every_timeout(
    timeouts: tuple[float | None, float | None],
) -> None:
    resolution = resolution_for(*timeouts)
    assert resolution <= SLOT_BOUND
    assert resolution + 0.001 < TOLERANCE / 4  # one slot plus uvloop's 1 ms timer rounding


@given(
    timeout=st.one_of(st.floats(min_value=0.001, max_value=86_400), st.sampled_from([10.0])),
    starts=st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=30),
)
def test_fake_clock_deadlines_fire_never_early_and_within_the_slot_bound(
    timeout: float, starts: list[float]
) -> None:
    """A fake clock jumps to each armed slot, as the timer would: lateness <= 0.1 s."""
    resolution = resolution_for(timeout, 60.0)
    assert resolution <= SLOT_BOUND
    wheel: DeadlineWheel[int] = DeadlineWheel(resolution)
    deadlines = {item: start + timeout for item, start in enumerate(starts)}
    for item, deadline in deadlines.items():
        wheel.add(item, deadline)
    while (tick := wheel.next_tick()) is not None:
        now = wheel.time_of(tick)  # the fake clock: the time the timer was armed for
        for item in wheel.pop_through(tick):
            lateness = now - deadlines[item]
            assert 0 <= lateness <= resolution * (1 + 1e-6)
