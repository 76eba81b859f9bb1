"""DeadlineTimer: one event-loop timer for the deadlines of many connections.

A per-connection ``TimerHandle`` costs about 0.5 KiB on uvloop and a heap operation on every
re-arm. ``DeadlineTimer`` keeps the connections of a server in a ``DeadlineWheel`` and arms a
single timer for its earliest slot. When the slot is due, each of its connections gets
``check_deadlines(now)``, which either closes the connection or calls ``schedule()`` again
with its current deadline (the idle deadline moves with traffic, which never touches the
wheel).

Lateness: a deadline fires at most one slot (``MAX_RESOLUTION``, 0.1 s) plus the loop's
timer granularity (``TIMER_GRANULARITY``, 1 ms on uvloop) late, i.e. ``MAX_LATENESS``, plus
whatever callbacks run before the timer on a busy loop.
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, Protocol

from netlib.sansio.deadlines import MAX_RESOLUTION, DeadlineWheel, resolution_for

__all__ = [
    "MAX_LATENESS",
    "MAX_RESOLUTION",
    "TIMER_GRANULARITY",
    "DeadlineTimer",
    "HasDeadlines",
    "resolution_for",
]

TIMER_GRANULARITY: Final = 0.001
"""Seconds by which the loop may run a timer off its time (uvloop rounds to milliseconds)."""
MAX_LATENESS: Final = MAX_RESOLUTION + TIMER_GRANULARITY
"""Worst-case lateness of a deadline (seconds), loop latency aside: one slot plus the timer
granularity, well inside the +-0.5 s deadline tolerance."""


class HasDeadlines(Protocol):
    def check_deadlines(self, now: float) -> None: ...


class DeadlineTimer:
    """Calls ``check_deadlines(now)`` on each scheduled item once its deadline has passed.

    Args:
        loop: the event loop of the items.
        resolution: slot width in seconds; deadlines fire at most this late.
    """

    __slots__ = ("_armed_at", "_armed_tick", "_handle", "_loop", "_wheel")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float) -> None:
        self._loop = loop
        self._wheel: DeadlineWheel[HasDeadlines] = DeadlineWheel(resolution)
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = float("inf")
        self._armed_tick = -1

    def schedule(self, item: HasDeadlines, deadline: float) -> dict[HasDeadlines, None]:
        """Check ``item`` at ``deadline`` (rounded up); returns the slot, for ``cancel``."""
        slot = self._wheel.add(item, deadline)
        if deadline < self._armed_at:
            self._arm()
        return slot

    def cancel(self, item: HasDeadlines, slot: dict[HasDeadlines, None]) -> None:
        """Forget ``item`` (a timer left armed for an emptied slot just finds nothing)."""
        self._wheel.discard(item, slot)

    def close(self) -> None:
        """Cancel the timer (the items are not checked any more)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = float("inf")

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = float("inf")
        tick = self._wheel.next_tick()
        if tick is not None:
            self._armed_tick = tick
            self._armed_at = self._wheel.time_of(tick)
            self._handle = self._loop.call_at(self._armed_at, self._fire)

    def _fire(self) -> None:
        # The loop may run a timer a fraction of a millisecond before its time (uvloop
        # rounds to milliseconds): the slot it was armed for counts as due, by its tick.
        now = max(self._loop.time(), self._armed_at)
        through = max(self._armed_tick, math.floor(now / self._wheel.resolution))
        self._handle = None
        self._armed_at = float("inf")
        for item in self._wheel.pop_through(through):
            try:
                item.check_deadlines(now)
            except Exception as exc:  # one broken item must not cost the others their deadlines
                self._loop.call_exception_handler(
                    {"message": "deadline check failed", "exception": exc, "item": item}
                )
        if self._handle is None:
            self._arm()
