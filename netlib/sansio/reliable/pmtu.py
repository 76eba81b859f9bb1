"""Path MTU discovery for reliable UDP: how large a datagram the path carries (RFC 8899).

Rules of this module:

* No I/O, no clock, no randomness, no logging: times are floats passed in, sizes are UDP
  payload bytes.
* ``PathMtu`` decides; the connection sends the probes, reports what happened to them and
  to its other packets, and cuts its datagrams to ``size``.

Theory of operation
-------------------
This is datagram packetization-layer path MTU discovery (DPLPMTUD, RFC 8899), as QUIC does
it (RFC 9000 section 14). A connection sends datagrams of at most ``size`` bytes: first
``BASE_DATAGRAM`` (1,200), which every IPv6 path carries. Once it is established it probes
larger sizes, one probe at a time. A probe is a DATA packet holding a PING, padded to
exactly the size tried: it elicits an acknowledgement, carries no data (nothing waits for
it, nothing is resent when it is lost), and it is outside the congestion window (its loss
is no sign of congestion). The adapter forbids IP fragmentation (``IP_PMTUDISC_PROBE``,
``IPV6_DONTFRAG``), so a probe arrives whole or not at all. An acknowledged probe raises
``size`` to its size. A size has failed once ``MAX_PROBES`` probes of it are lost, or at
once when the local stack refuses to send it (``EMSGSIZE``: larger than the interface
allows), which also lowers the ceiling for good.

*Search.* ``ceiling`` is the largest size allowed: the smaller of the two sides'
``max_datagram`` and what the adapter learnt of the local interface (``limit()``). The
ceiling is tried first: on loopback and on most LANs the local MTU is the path's, and one
probe settles the search. If it fails, the common sizes of ``PROBE_SIZES`` above the
current size and below the smallest failed one are tried from the bottom up (each success
raises the floor) until none is left. The search is then complete; ``RAISE_INTERVAL``
(10 minutes, RFC 8899's PMTU_RAISE_TIMER) later it starts again from the ceiling, in case
the path changed for the better.

*Black holes.* A path may stop carrying large datagrams (a new route, a tunnel). A lost
packet is *explained* when a packet at least as large, sent after it, was acknowledged:
the path carries that size, and the loss was random or a queue overflowing. The
connection reports the packets it declares lost together (a burst); a burst is suspicious
when every packet in it is larger than the base and unexplained, as when a narrower path
drops the large packets while the probe timer's packets, never above the base size, get
through. Sizes alone cannot tell a black hole from congestion when packets differ by an
ACK frame's bytes, so a suspicious burst makes the connection confirm the current size
with a probe (RFC 8899 section 4.3): an acknowledged one (or an acknowledged packet as
large as the suspicious ones) clears the suspicion; ``MAX_PROBES`` lost ones make ``size``
fall back to ``BASE_DATAGRAM``. In a black hole each probe timeout loses one, so the
fallback comes about three probe timeouts after the path narrowed. Persistent congestion
(three probe timeouts in a row with nothing acknowledged) above the base size falls back
at once: the large packets may be all the path drops. After a fallback the search starts
again: on a healthy path its first probe restores the size a round trip later; on a
narrowed one it finds the new size.

To tell explained losses, ``acked`` keeps the acknowledged packets above the base that no
other acknowledged packet beats on both counts (later and at least as large): at most
``_MAX_MARKS`` of them, in packet number order, so their sizes decrease. A bulk transfer of
full datagrams keeps one, moved along by each acknowledgement.
"""

from __future__ import annotations

from typing import Final

from netlib.sansio.reliable.wire import BASE_DATAGRAM

__all__ = [
    "MAX_PROBES",
    "PROBE_SIZES",
    "RAISE_INTERVAL",
    "PathMtu",
]

PROBE_SIZES: Final = (1372, 1452, 1472, 8952, 8972, 16384, 32768, 65488, 65507)
"""Sizes tried after the ceiling failed, smallest first (UDP payloads): a 1,420-byte tunnel
MTU over IPv4 (WireGuard), Ethernet's 1,500 over IPv6 and IPv4, jumbo frames' 9,000 over
IPv6 and IPv4, two steps between, and Linux loopback's 65,536 over IPv6 and IPv4."""
MAX_PROBES: Final = 3
"""Probes of one size lost before that size counts as too large (RFC 8899 MAX_PROBES)."""
RAISE_INTERVAL: Final = 600.0
"""Seconds after a completed search before the next one (RFC 8899 PMTU_RAISE_TIMER)."""
_NONE: Final = 1 << 20  # larger than any datagram
_MAX_MARKS: Final = 8  # acknowledged (packet number, size) pairs kept to explain losses


class PathMtu:
    """The datagram size of one connection and its search (see the module notes).

    Args:
        limit: the largest datagram this side sends (``ReliableConfig.max_datagram``).
    """

    __slots__ = (
        "_confirm_lost",
        "_confirming",
        "_failed",
        "_lost",
        "_marks",
        "_raise_at",
        "_searching",
        "_suspect",
        "_target",
        "_tried_top",
        "ceiling",
        "fallbacks",
        "probe",
        "probes_lost",
        "probes_sent",
        "size",
    )

    def __init__(self, limit: int) -> None:
        self.size = BASE_DATAGRAM
        self.ceiling = max(limit, BASE_DATAGRAM)
        self.probe = 0
        """The size of the probe in flight (0: none)."""
        self.probes_sent = self.probes_lost = self.fallbacks = 0
        self._failed = self.ceiling + 1  # the smallest size known to fail
        self._target = 0  # the size being tried (0: choose the next)
        self._lost = 0  # probes of the target lost so far
        self._confirm_lost = 0  # probes of the size being confirmed lost so far
        self._tried_top = False
        self._searching = False
        self._confirming = False
        self._raise_at: float | None = None
        self._marks: list[tuple[int, int]] = []  # (pn, size): pn up, size down
        self._suspect = _NONE  # the smallest size in the suspicious bursts

    # -- limits ---------------------------------------------------------------------------------

    def start(self, peer_limit: int) -> None:
        """The connection is established; the peer accepts datagrams up to ``peer_limit``."""
        self.limit(peer_limit)
        self._restart()

    def limit(self, ceiling: int) -> bool:
        """Lower the ceiling to ``ceiling`` (the local interface, the peer); never below the
        base. Return True if ``size`` had to come down with it."""
        self.ceiling = max(BASE_DATAGRAM, min(self.ceiling, ceiling))
        self._failed = min(self._failed, self.ceiling + 1)
        if self._target > self.ceiling:
            self._target = 0
        if self.size <= self.ceiling:
            return False
        self._fall_back()
        return True

    def refused(self, size: int) -> bool:
        """The local stack refused a packet (not a probe) of ``size`` bytes: the interface
        got narrower. Return True if ``size`` fell."""
        return self.limit(size - 1)

    # -- probes ---------------------------------------------------------------------------------

    @property
    def searching(self) -> bool:
        """True while sizes are being tried (or the current one confirmed)."""
        return self._searching or self._confirming

    def next_probe(self, now: float) -> int:
        """The size of the probe to send now, or 0 (one in flight, or nothing to try)."""
        if self.probe:
            return 0
        if self._confirming:
            return self.size
        if not self._searching:
            if self._raise_at is None or now < self._raise_at:
                return 0
            self._restart()
        if not self._target:
            self._target = self._candidate()
            self._lost = 0
            if not self._target:
                self._searching = False
                self._raise_at = now + RAISE_INTERVAL
        return self._target

    def _candidate(self) -> int:
        top = self._failed - 1
        if top <= self.size:
            return 0
        if not self._tried_top:
            self._tried_top = True
            return top
        for size in PROBE_SIZES:
            if self.size < size < self._failed:
                return size
        return 0

    def probe_sent(self, size: int) -> None:
        """A probe of ``size`` bytes went out."""
        self.probe = size
        self.probes_sent += 1

    def probe_acked(self, size: int) -> bool:
        """A probe of ``size`` bytes was acknowledged (perhaps late); True if ``size`` rose."""
        if size == self.probe:
            self.probe = 0
        if size >= self.size:
            self._confirming = False
            self._suspect = _NONE
        if size == self._target:
            self._target = 0
        if self.size < size <= self.ceiling:
            self.size = size
            return True
        return False

    def probe_lost(self, size: int, *, refused: bool = False) -> bool:
        """A probe of ``size`` bytes was lost, or ``refused`` by the local stack (EMSGSIZE:
        the size is out of reach for this interface, so the ceiling comes down too). Return
        True if ``size`` fell (a black hole confirmed, or the interface narrowed)."""
        if size == self.probe:
            self.probe = 0
        self.probes_lost += 1
        if refused:
            fell = self.limit(size - 1)
            if size == self._target:
                self._target = 0
            return fell
        if self._confirming and size == self.size:
            self._confirm_lost += 1
            if self._confirm_lost >= MAX_PROBES:
                self._fall_back()
                return True
            return False
        if size == self._target:
            self._lost += 1
            if self._lost >= MAX_PROBES:
                self._failed = min(self._failed, size)
                self._target = 0
        return False

    # -- black holes ----------------------------------------------------------------------------

    def acked(self, pn: int, size: int) -> None:
        """Packet ``pn`` (not a probe) of ``size`` bytes, above the base, was acknowledged."""
        if size >= self._suspect:
            self._suspect = _NONE
            self._confirming = False
        marks = self._marks
        if marks:
            last_pn, last_size = marks[-1]
            if pn > last_pn and size == last_size:  # the usual case: the next full datagram
                marks[-1] = (pn, size)
                return
            if any(p >= pn and s >= size for p, s in marks):
                return  # a later packet at least as large is known already
            marks[:] = [(p, s) for p, s in marks if p > pn or s > size]
        marks.append((pn, size))
        marks.sort()
        del marks[:-_MAX_MARKS]

    def loss_burst(self, lost: list[tuple[int, int]]) -> None:
        """Packets (not probes) were declared lost together: ``(pn, size)`` each."""
        if self.size == BASE_DATAGRAM:
            return
        marks = self._marks
        for pn, size in lost:
            if size <= BASE_DATAGRAM or any(p > pn and s >= size for p, s in marks):
                return  # a loss a narrower path does not explain
        self._suspect = min(self._suspect, min(size for _, size in lost))
        if not self._confirming:
            self._confirming = True
            self._confirm_lost = 0

    def persistent_congestion(self) -> bool:
        """Several probe timeouts in a row, nothing acknowledged: fall back if above the
        base (the large packets may be what the path drops). True if ``size`` fell."""
        if self.size == BASE_DATAGRAM:
            return False
        self._fall_back()
        return True

    def _fall_back(self) -> None:
        self.size = BASE_DATAGRAM
        self.fallbacks += 1
        self._restart()

    def _restart(self) -> None:
        """Search again from the ceiling (a probe in flight still counts when answered)."""
        self._failed = self.ceiling + 1
        self._target = 0
        self._lost = 0
        self._tried_top = False
        self._confirming = False
        self._suspect = _NONE
        self._raise_at = None
        self._searching = self.ceiling > self.size
