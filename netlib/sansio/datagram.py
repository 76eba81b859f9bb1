"""Reply budget for UDP services: may this reply go to that address, and at what cost.

Rules of this module:

* No I/O, no clock, no randomness, no logging: time arrives as ``now`` (float seconds, any
  monotonic origin), and ``now`` going backwards counts as no time passing, never a refund.
* The caller reports every datagram it accepts with ``on_received(addr, size, now)`` and asks
  ``try_send(addr, size, now)`` before every reply. False means "drop this reply": it is never
  queued or delayed, and the refusal is counted under one named reason in ``statistics()``.
* A refused reply is charged nothing; an allowed one is charged to every check at once.
* Sizes are UDP payload bytes. An empty datagram earns no credit and its empty echo costs
  none, so it passes the amplification check and spends only a datagram token: payload bytes
  are never amplified, and the header of each reply is bounded by the datagram rate.
* Every limit is a named module constant below; every table is bounded.

Theory of operation
-------------------
A UDP source address proves nothing: anyone can send a datagram that claims to come from a
victim, and a server that answers with more bytes than it received becomes an amplifier aimed
at that victim (the memcached reflection attacks of 2018 reached 50,000x; QUIC caps an
unvalidated peer at 3x, RFC 9000 section 8.1). ``ReplyBudget`` keeps a small entry per
address and lets a reply to it go only if three checks pass, in this order; the first check
that fails names the drop:

1. rate: a token bucket of reply datagrams per address (``rate`` per second, ``burst``);
2. bytes: a token bucket of reply payload bytes per address (``byte_rate``, ``byte_burst``);
3. amplification: each byte received from the address earns ``factor`` bytes of credit
   (banked up to ``byte_burst``), and a reply spends that credit first, then a small
   ``allowance`` that refills at ``allowance`` bytes per ``window`` seconds up to
   ``allowance``. The allowance lets short requests with slightly longer replies flow at a
   human pace (``hello``, 5 bytes, earns 15; its timestamped echo is 32), while a forged
   flood gets at most ``factor`` times its own bytes back plus the allowance. Hence, over the
   lifetime of an entry created at ``t0``::

       sent(addr) <= factor * received(addr) + allowance * (1 + (now - t0) / window)

   ``exempt(addr, now)`` marks an address proven by a handshake: it skips this check, not
   the first two.

Entries live in an LRU table of at most ``max_sources`` (``OrderedDict``: O(1) lookup,
``move_to_end`` and eviction per datagram). A full table evicts the least recently seen
address, counted in ``evictions``. An evicted address starts afresh, which is safe: a fresh
entry has no credit, so it only allows what that address itself sends times ``factor`` plus
one allowance; an exemption is lost with its entry (fail safe, not fail open).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AMPLIFICATION_ALLOWANCE",
    "AMPLIFICATION_FACTOR",
    "AMPLIFICATION_WINDOW",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_SOURCE_BURST",
    "DEFAULT_SOURCE_BYTE_BURST",
    "DEFAULT_SOURCE_BYTE_RATE",
    "DEFAULT_SOURCE_RATE",
    "ReplyBudget",
    "ReplyBudgetStatistics",
]

DEFAULT_SOURCE_RATE: Final = 100.0
"""Reply datagrams per second to one address: far above any human or request-reply client,
far below what makes a server a useful reflector (the design's safe-defaults table)."""

DEFAULT_SOURCE_BURST: Final = 200
"""Reply datagrams one address may receive back to back: two seconds of ``DEFAULT_SOURCE_RATE``,
so a client that pipelines a batch of requests is not cut short."""

DEFAULT_SOURCE_BYTE_RATE: Final = 256 * 1024
"""Reply payload bytes per second to one address. 100 datagrams/s of 1,472 B (the largest
unfragmented IPv4 payload on Ethernet) is 144 KiB/s, so this never binds on MTU-sized traffic
within the datagram rate; it binds on large fragmented datagrams (up to 65,507 B), which the
datagram rate alone would let through at 6.4 MB/s."""

DEFAULT_SOURCE_BYTE_BURST: Final = 512 * 1024
"""Reply payload bytes one address may receive back to back: two seconds of
``DEFAULT_SOURCE_BYTE_RATE``, or eight maximum-size (65,507 B) datagrams. It also caps the
amplification credit an address can bank. A reply larger than this is always dropped."""

AMPLIFICATION_FACTOR: Final = 3.0
"""Credit earned per byte received: an unproven address gets at most 3x its bytes back (plus
the allowance), QUIC's anti-amplification limit (RFC 9000 section 8.1)."""

AMPLIFICATION_ALLOWANCE: Final = 1200
"""Bytes an address may receive beyond its earned credit, refilled every
``AMPLIFICATION_WINDOW``: one reply of QUIC's minimum datagram size, so a human-pace client
with short messages gets every timestamped reply (1-byte requests need 25 bytes of it), while
a forged victim receives at most 1.2 kB/s of unearned bytes per server."""

AMPLIFICATION_WINDOW: Final = 1.0
"""Seconds in which ``AMPLIFICATION_ALLOWANCE`` refills (continuously, as a token bucket)."""

DEFAULT_MAX_SOURCES: Final = 10_000
"""Addresses tracked at once: about 320 bytes each with its table slot (plus the address key
itself), so about 3 MiB in all. Beyond it the least recently seen address is evicted and
counted."""


@dataclass(frozen=True, slots=True)
class ReplyBudgetStatistics:
    """A snapshot of a ``ReplyBudget``'s counters (all cumulative except ``sources``).

    Attributes:
        sources: addresses tracked now (at most ``max_sources``).
        replies_allowed: ``try_send`` calls answered True.
        bytes_allowed: payload bytes of the allowed replies.
        dropped_by_rate: replies refused by the per-address datagram bucket.
        dropped_by_bytes: replies refused by the per-address byte bucket.
        dropped_by_amplification: replies refused by the amplification cap.
        evictions: addresses evicted because the table was full.
    """

    sources: int
    replies_allowed: int
    bytes_allowed: int
    dropped_by_rate: int
    dropped_by_bytes: int
    dropped_by_amplification: int
    evictions: int

    @property
    def replies_dropped(self) -> int:
        """Replies refused for any reason."""
        return self.dropped_by_rate + self.dropped_by_bytes + self.dropped_by_amplification


class _Source:
    """Per-address state: five floats and a flag, refilled lazily at ``stamp``."""

    __slots__ = ("allowance", "byte_tokens", "credit", "datagram_tokens", "stamp", "verified")

    def __init__(self, now: float, datagrams: float, size: float, allowance: float) -> None:
        self.stamp = now
        self.datagram_tokens = datagrams
        self.byte_tokens = size
        self.allowance = allowance
        self.credit = 0.0
        self.verified = False


class ReplyBudget:
    """Decides, per destination address, whether a UDP reply may be sent.

    Args:
        rate: reply datagrams per second per address (> 0).
        burst: reply datagrams per address back to back (>= 1).
        byte_rate: reply payload bytes per second per address (> 0).
        byte_burst: reply payload bytes per address back to back (>= 1); also the most
            amplification credit an address can bank.
        factor: credit earned per byte received (>= 0; 0 leaves only the allowance).
        allowance: unearned bytes per ``window`` per address (>= 0).
        window: seconds in which the allowance refills (> 0).
        max_sources: addresses tracked at once (>= 1); the least recently seen is evicted.

    Raises:
        ValueError: a limit is out of range or not finite.

    Calling protocol: ``on_received(addr, len(data), now)`` for each datagram the service
    accepts, then ``try_send(addr, len(reply), now)`` before each reply, sending it only on
    True. Addresses are any hashable value (the ``addr`` of ``datagram_received``).
    """

    __slots__ = (
        "_allowance",
        "_allowance_rate",
        "_burst",
        "_byte_burst",
        "_byte_rate",
        "_bytes_allowed",
        "_dropped_by_amplification",
        "_dropped_by_bytes",
        "_dropped_by_rate",
        "_evictions",
        "_factor",
        "_max_sources",
        "_rate",
        "_replies_allowed",
        "_sources",
    )

    def __init__(
        self,
        *,
        rate: float = DEFAULT_SOURCE_RATE,
        burst: float = DEFAULT_SOURCE_BURST,
        byte_rate: float = DEFAULT_SOURCE_BYTE_RATE,
        byte_burst: float = DEFAULT_SOURCE_BYTE_BURST,
        factor: float = AMPLIFICATION_FACTOR,
        allowance: float = AMPLIFICATION_ALLOWANCE,
        window: float = AMPLIFICATION_WINDOW,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        _require("rate", rate, rate > 0)
        _require("burst", burst, burst >= 1)
        _require("byte_rate", byte_rate, byte_rate > 0)
        _require("byte_burst", byte_burst, byte_burst >= 1)
        _require("factor", factor, factor >= 0)
        _require("allowance", allowance, allowance >= 0)
        _require("window", window, window > 0)
        _require("max_sources", max_sources, max_sources >= 1)
        self._rate = float(rate)
        self._burst = float(burst)
        self._byte_rate = float(byte_rate)
        self._byte_burst = float(byte_burst)
        self._factor = float(factor)
        self._allowance = float(allowance)
        self._allowance_rate = allowance / window
        self._max_sources = max_sources
        self._sources: OrderedDict[Hashable, _Source] = OrderedDict()
        self._replies_allowed = self._bytes_allowed = self._evictions = 0
        self._dropped_by_rate = self._dropped_by_bytes = self._dropped_by_amplification = 0

    def on_received(self, addr: Hashable, size: int, now: float) -> None:
        """Record a datagram of ``size`` payload bytes from ``addr`` at ``now``.

        It earns ``factor * size`` bytes of credit for replies to ``addr``.

        Raises:
            ValueError: ``size`` is negative.
        """
        _require_size(size)
        source = self._touch(addr, now)
        source.credit = min(self._byte_burst, source.credit + self._factor * size)

    def try_send(self, addr: Hashable, size: int, now: float) -> bool:
        """Ask whether a reply of ``size`` payload bytes may go to ``addr`` at ``now``.

        Returns:
            True: send it; it has been charged. False: drop it; the refusal is counted.

        Raises:
            ValueError: ``size`` is negative.
        """
        _require_size(size)
        return self._decide(self._touch(addr, now), size, now)

    def lease(
        self, addr: Hashable, received: int, size: int, now: float, *, datagrams: int, nbytes: int
    ) -> tuple[int, int]:
        """Record ``received`` bytes from ``addr``, then grant a batch of replies, charged now.

        The per-datagram fast path of a replying service: the caller spends the grant with
        two subtractions and asks again when it runs out, reporting the bytes it received
        meanwhile as ``received``. Granted replies are charged before they are sent, so
        every bound of the budget holds for what is actually sent; a grant left unspent is
        simply lost. Credit earned by datagrams received during a grant counts only at the
        next call, which errs on the safe side.

        Returns:
            ``(count, nbytes)`` reply datagrams and bytes granted (at most ``datagrams`` and
            ``nbytes``), enough for at least one reply of ``size`` bytes; ``(0, 0)`` if that
            reply may not go, counted as for ``try_send``.
        """
        source = self._touch(addr, now)
        source.credit = min(self._byte_burst, source.credit + self._factor * received)
        self._refill(source, now)
        if self._refused(source, size):
            return 0, 0
        count = min(datagrams, int(source.datagram_tokens))
        room = source.byte_tokens
        if not source.verified:
            room = min(room, source.credit + source.allowance)
        granted = max(size, min(nbytes, int(room)))
        source.datagram_tokens -= count
        source.byte_tokens -= granted
        self._spend(source, granted)
        self._replies_allowed += count
        self._bytes_allowed += granted
        return count, granted

    def _decide(self, source: _Source, size: int, now: float) -> bool:
        """Charge and allow a reply of ``size`` bytes to ``source``, or count the refusal."""
        self._refill(source, now)
        if self._refused(source, size):
            return False
        self._charge(source, size)
        return True

    def _refused(self, source: _Source, size: int) -> bool:
        """Count and return whether a reply of ``size`` bytes to ``source`` must be dropped."""
        if source.datagram_tokens < 1:
            self._dropped_by_rate += 1
        elif source.byte_tokens < size:
            self._dropped_by_bytes += 1
        elif not source.verified and source.credit + source.allowance < size:
            self._dropped_by_amplification += 1
        else:
            return False
        return True

    def exempt(self, addr: Hashable, now: float) -> None:
        """Exempt ``addr``, proven by a handshake, from the amplification cap.

        The rate and byte buckets still apply. The exemption lasts as long as the address's
        entry: once evicted, the address is capped again.
        """
        self._touch(addr, now).verified = True

    @property
    def burst(self) -> float:
        """Reply datagrams one address may receive back to back."""
        return self._burst

    @property
    def byte_burst(self) -> float:
        """Reply bytes one address may receive back to back."""
        return self._byte_burst

    def statistics(self) -> ReplyBudgetStatistics:
        """Return a snapshot of the counters."""
        return ReplyBudgetStatistics(
            sources=len(self._sources),
            replies_allowed=self._replies_allowed,
            bytes_allowed=self._bytes_allowed,
            dropped_by_rate=self._dropped_by_rate,
            dropped_by_bytes=self._dropped_by_bytes,
            dropped_by_amplification=self._dropped_by_amplification,
            evictions=self._evictions,
        )

    def _touch(self, addr: Hashable, now: float) -> _Source:
        """Return the entry of ``addr``, now the most recently seen, creating it if needed."""
        source = self._sources.get(addr)
        if source is None:
            return self._admit(addr, now)
        self._sources.move_to_end(addr)
        return source

    def _admit(self, addr: Hashable, now: float) -> _Source:
        """Create a fresh entry for ``addr``, evicting the least recently seen if full."""
        if len(self._sources) >= self._max_sources:
            self._sources.popitem(last=False)
            self._evictions += 1
        source = _Source(now, self._burst, self._byte_burst, self._allowance)
        self._sources[addr] = source
        return source

    def _refill(self, source: _Source, now: float) -> None:
        """Add the tokens and allowance earned since ``source.stamp``, each up to its cap."""
        elapsed = now - source.stamp
        if elapsed <= 0:
            return
        source.stamp = now
        source.datagram_tokens = min(self._burst, source.datagram_tokens + elapsed * self._rate)
        source.byte_tokens = min(self._byte_burst, source.byte_tokens + elapsed * self._byte_rate)
        source.allowance = min(self._allowance, source.allowance + elapsed * self._allowance_rate)

    def _charge(self, source: _Source, size: int) -> None:
        """Take one datagram, ``size`` bytes, and (unless exempt) credit then allowance."""
        source.datagram_tokens -= 1
        source.byte_tokens -= size
        self._spend(source, size)
        self._replies_allowed += 1
        self._bytes_allowed += size

    @staticmethod
    def _spend(source: _Source, size: int) -> None:
        """Pay ``size`` bytes from credit, then allowance (nothing for an exempt source)."""
        if not source.verified:
            from_credit = min(source.credit, size)
            source.credit -= from_credit
            source.allowance -= size - from_credit


def _require(name: str, value: float, ok: bool) -> None:
    """Raise ValueError naming ``name`` unless ``ok`` and ``value`` is finite."""
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} out of range or not finite: {value!r}")


def _require_size(size: int) -> None:
    """Raise ValueError if ``size`` is negative."""
    if size < 0:
        raise ValueError(f"datagram size must be >= 0, got {size}")
