"""MemoryBudget: a server-wide cap on what its connections hold, largest holders evicted.

Rules
-----
* Per-connection limits bound each connection; this bounds their sum. A server with ten
  thousand connections each within its own limits could otherwise hold gigabytes.
* Holders report what they hold with ``update(holder, size)`` when it changes in a way that
  matters (a connection's input has grown by a step, it stalls or recovers);
  ``forget(holder)`` when they are gone. A holder that reports 0 is not tracked.
* When the total passes ``cap``, ``update`` returns the holders to evict, largest first,
  until the total is back under the cap (Redis ``maxmemory-clients`` style), counting on the
  caller to free what they hold. The caller disconnects them, and reports what each still
  holds until it is gone (``update`` again: a transport that frees its write buffer only
  once closed, a handler still holding its last message). An evicted holder counts until
  ``forget``, is never chosen again, and its own reports evict nobody (what it holds only
  shrinks); the next report of another holder past the cap evicts more, if evicting freed
  too little for now. So the total is what is really held, not what should be soon.
* No I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

__all__ = ["DEFAULT_MEMORY_BUDGET", "MemoryBudget", "MemoryBudgetStatistics"]

DEFAULT_MEMORY_BUDGET: Final = 256 * 1024 * 1024
"""Bytes a server's connections may hold in user space, in all (what they report)."""

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True, slots=True)
class MemoryBudgetStatistics:
    """Counters of a memory budget (a snapshot).

    Attributes:
        cap: the cap, in bytes.
        held: bytes held now by the tracked holders.
        holders: holders tracked now (those that reported more than 0), evicted ones
            still counted included.
        peak: the most ever held at once.
        evicted: holders evicted since the start.
    """

    cap: int
    held: int
    holders: int
    peak: int
    evicted: int


class MemoryBudget(Generic[H]):
    """Tracks what holders report and names the largest ones to evict past ``cap``.

    Args:
        cap: bytes all holders together may hold.

    Raises:
        ValueError: ``cap`` is not positive.
    """

    __slots__ = ("_evicted", "_held", "_peak", "cap", "evicted", "total")

    def __init__(self, cap: int = DEFAULT_MEMORY_BUDGET) -> None:
        if cap < 1:
            raise ValueError(f"cap must be >= 1 byte, got {cap}")
        self.cap = cap
        self._held: dict[H, int] = {}
        self._evicted: dict[H, int] = {}  # evicted, still holding something until forget()
        self.total = 0
        self._peak = 0
        self.evicted = 0

    def update(self, holder: H, size: int) -> list[H]:
        """Record that ``holder`` holds ``size`` bytes now.

        Returns:
            The holders to evict (possibly ``holder`` itself), largest first; empty while
            the total is within the cap, and always for a holder evicted already.
        """
        if holder in self._evicted:  # tracked until forget(), whatever its size
            self.total += size - self._evicted[holder]
            self._evicted[holder] = size
            self._peak = max(self._peak, self.total)
            return []
        self.total -= self._held.pop(holder, 0)
        if size > 0:
            self._held[holder] = size
            self.total += size
            self._peak = max(self._peak, self.total)
        if self.total <= self.cap:
            return []
        return self._evict()

    def _evict(self) -> list[H]:
        victims: list[H] = []
        ranked = sorted(self._held.items(), key=lambda item: item[1], reverse=True)
        for holder, size in ranked:
            if self.total <= self.cap:
                break
            del self._held[holder]  # freed, the caller reports otherwise: update()
            self._evicted[holder] = 0
            self.total -= size
            victims.append(holder)
        self.evicted += len(victims)
        return victims

    def forget(self, holder: H) -> None:
        """Stop tracking ``holder`` (it is gone)."""
        self.total -= self._held.pop(holder, 0)
        self.total -= self._evicted.pop(holder, 0)

    def statistics(self) -> MemoryBudgetStatistics:
        """Return a snapshot of the counters."""
        return MemoryBudgetStatistics(
            cap=self.cap,
            held=self.total,
            holders=len(self._held) + sum(1 for size in self._evicted.values() if size),
            peak=self._peak,
            evicted=self.evicted,
        )
