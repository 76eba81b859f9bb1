"""DeadlineTimer: one event-loop timer for the deadlines of many connections.

A per-connection ``TimerHandle`` costs about 0.5 KiB on uvloop and a heap operation on every
re-arm. ``DeadlineTimer`` keeps the connections of a server in a ``DeadlineWheel`` and arms a
single timer for its earliest slot. When the slot is due, each of its connections gets
``check_deadlines(now)``, which either closes the connection or calls ``schedule()`` again
with its current deadline (the idle deadline moves with traffic, which never touches the
wheel).
"""

from __future__ import annotations

import asyncio
import math
from typing import Final, Protocol

from netlib.sansio.deadlines import DeadlineWheel

__all__ = ["MAX_RESOLUTION", "DeadlineTimer", "HasDeadlines", "resolution_for"]

MAX_RESOLUTION: Final = 0.5
"""Coarsest slot width (seconds): a deadline fires at most this late."""
_SLOTS_PER_TIMEOUT: Final = 20
_MIN_RESOLUTION: Final = 0.001


def resolution_for(*timeouts: float | None) -> float:
    """The slot width for these timeouts: 1/20 of the shortest, within 1 ms .. 0.5 s."""
    shortest = min((t for t in timeouts if t is not None), default=MAX_RESOLUTION)
    return min(MAX_RESOLUTION, max(_MIN_RESOLUTION, shortest / _SLOTS_PER_TIMEOUT))


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
