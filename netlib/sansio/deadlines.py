"""DeadlineWheel: coarse deadlines for many items, O(1) to add or cancel.

Rules
-----
* Time is a float the caller passes in; the wheel never reads a clock.
* A deadline is rounded *up* to a multiple of ``resolution``, so an item is never due early
  and at most ``resolution`` late.
* ``add()`` returns the slot the item went into; ``discard(item, slot)`` takes it out. An item
  should be in one slot at a time: the owner keeps the slot and discards before adding again.
* ``pop_due(now)`` removes and returns every item whose slot is due. Deadlines are checked
  lazily: activity never touches the wheel, the owner re-checks the real deadline of each
  item popped and adds it back if it moved.

A server with ten thousand connections thus keeps one event-loop timer (for the earliest slot)
instead of ten thousand, and a connection's deadlines cost one dictionary entry.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

__all__ = ["DeadlineWheel"]

T = TypeVar("T")

_EPSILON = 1e-9


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
        slot = self._slots.get(tick)
        if slot is None:
            slot = self._slots[tick] = {}
        slot[item] = None
        return slot

    @staticmethod
    def discard(item: T, slot: dict[T, None]) -> None:
        """Take ``item`` out of ``slot`` (no-op if it is not there, or the slot was popped)."""
        slot.pop(item, None)

    def next_time(self) -> float | None:
        """The time the earliest non-empty slot is due, or None if there is none."""
        ticks = [tick for tick, slot in self._slots.items() if slot]
        if not ticks:
            self._slots.clear()
            return None
        return min(ticks) * self.resolution

    def pop_due(self, now: float) -> list[T]:
        """Remove and return the items of every slot due at ``now``, earliest slot first."""
        last = math.floor(now / self.resolution + _EPSILON)  # now may be a tick's own time
        due = sorted(tick for tick in self._slots if tick <= last)
        items: list[T] = []
        for tick in due:
            items.extend(self._slots.pop(tick))
        return items

    def __len__(self) -> int:
        return sum(len(slot) for slot in self._slots.values())
