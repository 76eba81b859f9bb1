"""Speed-test arithmetic: receiver statistics for numbered datagrams, and pacing.

Rules of this module:

* No clock is read here: every call takes ``now`` or timestamps (float seconds).
* ``ReceiverStats`` sees each datagram's sequence number (from 0), the sender's timestamp
  and the arrival time. Loss is counted at the receiver: expected (highest sequence + 1)
  minus distinct sequences received. A datagram with a sequence below the highest seen is
  out of order; a sequence seen before is a duplicate and counts for nothing else.
* Jitter is RFC 3550's interarrival jitter: for consecutive arrivals i-1, i,
  ``D = (R_i - R_{i-1}) - (S_i - S_{i-1})`` and ``J += (|D| - J) / 16``.
* ``Pacer`` spaces sends so the bytes sent never run ahead of ``bitrate`` (bits per
  second) from the start; a sender late by more than ``max_burst`` seconds drops the
  backlog instead of bursting it.
"""

from __future__ import annotations

__all__ = ["Pacer", "ReceiverStats"]


class ReceiverStats:
    """Loss, out-of-order and jitter counts for one stream of numbered datagrams."""

    __slots__ = (
        "_last_arrival",
        "_last_sent",
        "_seen",
        "bytes",
        "duplicates",
        "highest",
        "jitter",
        "out_of_order",
        "received",
    )

    def __init__(self) -> None:
        self._seen: set[int] = set()
        self._last_sent: float | None = None
        self._last_arrival = 0.0
        self.highest = -1
        self.received = 0
        self.bytes = 0
        self.out_of_order = 0
        self.duplicates = 0
        self.jitter = 0.0

    def record(self, seq: int, sent: float, arrived: float, size: int = 0) -> None:
        """Count one datagram numbered ``seq``, sent at ``sent``, arrived at ``arrived``."""
        if seq < 0:
            raise ValueError("seq must be >= 0")
        if seq in self._seen:
            self.duplicates += 1
            return
        self._seen.add(seq)
        self.received += 1
        self.bytes += size
        if seq < self.highest:
            self.out_of_order += 1
        else:
            self.highest = seq
        if self._last_sent is not None:
            d = (arrived - self._last_arrival) - (sent - self._last_sent)
            self.jitter += (abs(d) - self.jitter) / 16.0
        self._last_sent = sent
        self._last_arrival = arrived

    @property
    def packets(self) -> int:
        """Datagrams the sender must have sent: the highest sequence seen plus one."""
        return self.highest + 1

    @property
    def lost(self) -> int:
        """Datagrams expected and never received."""
        return self.packets - self.received

    @property
    def lost_percent(self) -> float:
        """``lost`` as a percentage of ``packets`` (0 when nothing was expected)."""
        return 100.0 * self.lost / self.packets if self.packets else 0.0


class Pacer:
    """When the next send is due so that ``bitrate`` bits per second are not exceeded."""

    __slots__ = ("_due", "_max_burst", "bitrate")

    def __init__(self, bitrate: float, now: float, max_burst: float = 0.01) -> None:
        if bitrate <= 0:
            raise ValueError("bitrate must be > 0")
        if max_burst < 0:
            raise ValueError("max_burst must be >= 0")
        self.bitrate = bitrate
        self._max_burst = max_burst
        self._due = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next send may go (0 when it may go now)."""
        return max(0.0, self._due - now)

    def sent(self, size: int, now: float) -> None:
        """Account for ``size`` bytes sent at ``now``."""
        if self._due < now - self._max_burst:
            self._due = now - self._max_burst
        self._due += size * 8 / self.bitrate
