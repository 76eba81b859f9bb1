"""RTT estimation, probe timeout and congestion window for reliable UDP (RFC 6298 / RFC 9002).

Rules of this module:

* No I/O, no clock, no randomness, no logging: every time is a float passed in.
* Times are seconds; sizes are datagram bytes.

Theory of operation
-------------------
``RttEstimator`` follows RFC 9002 section 5: ``min_rtt`` is the smallest sample,
``smoothed_rtt`` and ``rttvar`` are the RFC 6298 moving averages (gains 1/8 and 1/4), and the
peer's reported ack delay is subtracted from a sample, which is then kept at ``min_rtt`` or
above. Unlike RFC 9002 the delay is not capped at the peer's ``max_ack_delay``: an
acknowledgement repeated after the one carrying it was lost reports the whole time the peer
held it, and that time says nothing about the path. Samples come only from the largest newly
acknowledged packet when it elicited an acknowledgement; packet numbers are never reused,
so a sample is never ambiguous.

The probe timeout is ``smoothed_rtt + max(4 * rttvar, GRANULARITY) + max_ack_delay``, at
least ``MIN_PTO``. It doubles with every consecutive expiry (``backoff``), up to
``MAX_PROBE_INTERVAL`` (or the base timeout if that is larger): a dead path costs one small
probe a second, and a path that comes back is found within a second. The loss delay is
``9/8 * max(smoothed_rtt, latest_rtt) + rttvar`` (at least ``GRANULARITY``). Two
departures from RFC 9002 there: the latest sample has the peer's ack delay taken off (the
time the peer held an acknowledgement is not time the path took; with it, a lost reply
waited for a second request, 10 ms later), and ``rttvar`` widens the window on a jittery
path, where packets overtake each other (5 ms of jitter on a 2 ms path: 0.6% spurious
retransmissions instead of 1.5%).

``CongestionWindow`` is NewReno shaped for a message transport that must not collapse under
random loss:

* slow start from ``INITIAL_WINDOW`` doubles per RTT until the first loss;
* a loss reduces the window by ``LOSS_REDUCTION`` (0.7, CUBIC's beta, gentler than Reno's
  0.5) at most once per round trip: losses of packets sent before the reduction belong to
  the same event (the recovery period of RFC 9002 section 7.3.2);
* the window never goes below ``MIN_DATAGRAMS`` (4) datagrams of the current size, so
  random loss of a few percent slows a bulk transfer but never stalls it, and a
  request-reply exchange (one or two datagrams in flight) never feels the window at all;
* persistent congestion (three probe timeouts in a row: the path was dead) resets the
  window to that minimum and restarts slow start.

The window counts bytes, so it means the same whatever the datagram size; only its floor
and the congestion-avoidance step (one datagram per window acknowledged) follow the
datagram size, which path MTU discovery raises (``set_datagram``): when it rises, the
window is raised to the new floor at least, so that four datagrams of the new size may be
in flight (RFC 9002's minimum window is two).
"""

from __future__ import annotations

from typing import Final

from netlib.sansio.reliable.wire import BASE_DATAGRAM

__all__ = [
    "GRANULARITY",
    "INITIAL_RTT",
    "INITIAL_WINDOW",
    "LOSS_REDUCTION",
    "MAX_PROBE_INTERVAL",
    "MIN_DATAGRAMS",
    "MIN_PTO",
    "MIN_WINDOW",
    "PACKET_THRESHOLD",
    "CongestionWindow",
    "RttEstimator",
]

GRANULARITY: Final = 0.001
"""Timer granularity (seconds): the event loops' timers are no finer than 1 ms."""
INITIAL_RTT: Final = 0.1
"""RTT assumed before the first sample (RFC 9002 uses 333 ms; netlib targets LANs and the
handshake takes a sample at once)."""
MIN_PTO: Final = 0.003
"""Smallest probe timeout (seconds): low, for LAN latency, yet above timer jitter."""
MAX_PROBE_INTERVAL: Final = 1.0
"""Largest backed-off probe interval (seconds), unless the base timeout is larger."""
PACKET_THRESHOLD: Final = 3
"""A packet is lost once a packet sent this many packets later is acknowledged."""
_TIME_THRESHOLD: Final = 9 / 8
_DATAGRAM: Final = BASE_DATAGRAM
INITIAL_WINDOW: Final = 10 * _DATAGRAM
"""Congestion window at the start (bytes): ten datagrams of the base size (RFC 9002)."""
MIN_DATAGRAMS: Final = 4
"""Smallest congestion window, in datagrams of the current size."""
MIN_WINDOW: Final = MIN_DATAGRAMS * _DATAGRAM
"""Smallest congestion window at the base datagram size (bytes)."""
LOSS_REDUCTION: Final = 0.7
"""Factor applied to the window on a loss event (at most once per round trip)."""


class RttEstimator:
    """Round-trip time estimates from acknowledgements (RFC 9002 section 5).

    Args:
        initial_rtt: the RTT assumed before the first sample.
    """

    __slots__ = (
        "has_sample",
        "latest_path_rtt",
        "latest_rtt",
        "min_rtt",
        "rttvar",
        "smoothed_rtt",
    )

    def __init__(self, initial_rtt: float = INITIAL_RTT) -> None:
        self.has_sample = False
        self.latest_rtt = initial_rtt
        self.latest_path_rtt = initial_rtt
        self.min_rtt = initial_rtt
        self.smoothed_rtt = initial_rtt
        self.rttvar = initial_rtt / 2

    def update(self, sample: float, ack_delay: float) -> None:
        """Take one RTT sample; ``ack_delay`` is the peer's reported (and capped) delay."""
        sample = max(sample, 0.0)
        self.latest_rtt = sample
        if not self.has_sample:
            self.has_sample = True
            self.min_rtt = self.smoothed_rtt = self.latest_path_rtt = sample
            self.rttvar = sample / 2
            return
        self.min_rtt = min(self.min_rtt, sample)
        # the peer's delay is taken off, but never below min_rtt (the delay travels in
        # 100 us units, so an exact comparison would fail on rounding half the time)
        sample = self.latest_path_rtt = max(sample - ack_delay, self.min_rtt)
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.smoothed_rtt - sample)
        self.smoothed_rtt = 0.875 * self.smoothed_rtt + 0.125 * sample

    def pto(self, max_ack_delay: float) -> float:
        """The base probe timeout (no back-off)."""
        variation = 4 * self.rttvar
        if variation < GRANULARITY:
            variation = GRANULARITY
        timeout = self.smoothed_rtt + variation + max_ack_delay
        return timeout if timeout > MIN_PTO else MIN_PTO

    def backoff(self, max_ack_delay: float, count: int) -> float:
        """The probe timeout after ``count`` consecutive expiries: doubled each, capped."""
        base = self.pto(max_ack_delay)
        return min(base * (1 << min(count, 30)), max(base, MAX_PROBE_INTERVAL))

    def loss_delay(self) -> float:
        """How long after a later packet is acknowledged an earlier one counts as lost.

        RFC 9002 uses the raw latest sample and no variance term; see the module notes.
        """
        rtt = max(self.smoothed_rtt, self.latest_path_rtt)
        return max(_TIME_THRESHOLD * rtt + self.rttvar, GRANULARITY)


class CongestionWindow:
    """A loss-tolerant NewReno congestion window (bytes)."""

    __slots__ = ("_recovery_start", "datagram", "minimum", "ssthresh", "window")

    def __init__(self) -> None:
        self.window = INITIAL_WINDOW
        self.datagram = _DATAGRAM
        self.minimum = MIN_WINDOW
        self.ssthresh = float("inf")
        self._recovery_start = float("-inf")

    def set_datagram(self, size: int) -> None:
        """The largest datagram is now ``size`` bytes: the floor follows, and the window is
        raised to it if below."""
        self.datagram = size
        self.minimum = MIN_DATAGRAMS * size
        self.window = max(self.window, self.minimum)

    def on_acked(self, size: int, sent_time: float) -> None:
        """A packet of ``size`` bytes sent at ``sent_time`` was acknowledged."""
        if sent_time <= self._recovery_start:
            return  # sent before the last reduction: it says nothing about the new window
        if self.window < self.ssthresh:
            self.window += size
        else:
            self.window += self.datagram * size // self.window

    def on_lost(self, sent_time: float, now: float) -> bool:
        """A packet sent at ``sent_time`` was lost; return True if the window was reduced."""
        if sent_time <= self._recovery_start:
            return False  # the same loss event as the last reduction
        self._recovery_start = now
        self.window = max(int(self.window * LOSS_REDUCTION), self.minimum)
        self.ssthresh = float(self.window)
        return True

    def on_persistent_congestion(self, now: float) -> None:
        """The path was dead for several probe timeouts: start again from the minimum."""
        self._recovery_start = now
        self.window = self.minimum
