"""DeadlineWheel: coarse deadlines for many items, O(1) to add or cancel.

Rules
-----
* Time is a float the caller passes in; the wheel never reads a clock.
* A deadline is rounded *up* to a multiple of ``resolution``, so an item is never due early
  and at most ``resolution`` late. ``resolution_for(timeouts)`` picks the width: 1/20 of the
  shortest timeout, at most ``MAX_RESOLUTION`` (0.1 s), so a deadline is due at most 0.1 s
  late whatever the timeout: well inside the 0.5 s tolerance of robustness.md, with room
  left for the event loop's timer granularity and latency. (The first version capped the
  width at 0.5 s, a whole tolerance: a 10 s deadline then overshot by up to 0.5 s plus
  the loop's latency.) Finer slots cost more timer wake-ups, at most 1/``MAX_RESOLUTION`` =
  10 per second for a server whatever its number of connections.
* ``add()`` returns the slot the item went into; ``discard(item, slot)`` takes it out. An item
  should be in one slot at a time: the owner keeps the slot and discards before adding again.
* Slots are numbered by integer ticks (slot time = tick * resolution, never less than the
  deadlines in it). ``pop_through(tick)`` removes and returns the items of every slot up to
  ``tick``, so an owner that armed a timer for ``next_tick()`` pops exactly that slot,
  whatever the float rounding of the clock. Deadlines are checked lazily: activity never
  touches the wheel, the owner re-checks the real deadline of each item popped and adds it
  back if it moved.

A server with ten thousand connections thus keeps one event-loop timer (for the earliest slot)
instead of ten thousand, and a connection's deadlines cost one dictionary entry.
"""

from __future__ import annotations

import math
from typing import Final, Generic, TypeVar

__all__ = [
    "MAX_RESOLUTION",
    "MIN_RESOLUTION",
    "SLOTS_PER_TIMEOUT",
    "DeadlineWheel",
    "resolution_for",
]

T = TypeVar("T")

MAX_RESOLUTION: Final = 0.1
"""Coarsest slot width (seconds): a deadline is due at most this late."""
MIN_RESOLUTION: Final = 0.001
"""Finest slot width (seconds): the event loops' timers are no finer (uvloop: 1 ms)."""
SLOTS_PER_TIMEOUT: Final = 20
"""Slots per shortest timeout: a deadline is due at most 5% of its timeout late."""


def resolution_for(*timeouts: float | None) -> float:
    """The slot width for these timeouts: 1/20 of the shortest, within 1 ms .. 0.1 s."""
    shortest = min((t for t in timeouts if t is not None), default=MAX_RESOLUTION)
    return min(MAX_RESOLUTION, max(MIN_RESOLUTION, shortest / SLOTS_PER_TIMEOUT))


class DeadlineWheel(Generic[T]):
    """Items bucketed by deadline, rounded up to ``resolution`` seconds.

    A slot is a dict used as an ordered set of the items due at the same tick.

    Args:
        resolution: width of a slot in seconds (> 0): deadlines fire at most this late.
    """

    __slots__ = ("_slots", "resolution")

    def __init__(self, resolution: float) -> None:
        if not resolution > 0:
            raise ValueError(f"resolution must be > 0, got {resolution}")
        self.resolution = resolution
        self._slots: dict[int, dict[T, None]] = {}

    def add(self, item: T, deadline: float) -> dict[T, None]:
        """Put ``item`` in the slot of ``deadline``; return that slot (for ``discard``)."""
        tick = math.ceil(deadline / self.resolution)
        if self.time_of(tick) < deadline:  # float rounding: the slot must not be early
            tick += 1
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = {}
        slot[item] = None
        return slot

    @staticmethod
    def discard(item: T, slot: dict[T, None]) -> None:
        """Take ``item`` out of ``slot`` (no-op if it is not there, or the slot was popped)."""
        slot.pop(item, None)

    def time_of(self, tick: int) -> float:
        """The time slot ``tick`` is due."""
        return tick * self.resolution

    def next_tick(self) -> int | None:
        """The tick of the earliest non-empty slot, or None if there is none."""
        ticks = [tick for tick, slot in self._slots.items() if slot]
        if not ticks:
            self._slots.clear()
            return None
        return min(ticks)

    def pop_through(self, tick: int) -> list[T]:
        """Remove and return the items of every slot up to ``tick``, earliest slot first."""
        due = sorted(t for t in self._slots if t <= tick)
        items: list[T] = []
        for t in due:
            items.extend(self._slots.pop(t))
        return items

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())
