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
at that victim (the memcached reflection attacks of 2018 reached 50,000x). ``ReplyBudget``
keeps a small entry per address and lets a reply to it go only if three checks pass, in this
order; the first check that fails names the drop:

1. rate: a token bucket of reply datagrams per address (``rate`` per second, ``burst``);
2. bytes: a token bucket of reply payload bytes per address (``byte_rate``, ``byte_burst``);
3. amplification: each byte received from the address earns ``factor`` (at most 1) byte of
   credit (banked up to ``byte_burst``). A reply spends that credit first; what it needs
   beyond comes from ONE allowance shared by every unverified address of the budget, a token
   bucket of ``allowance`` bytes refilled every ``window`` seconds. Hence, per address and in
   total::

       sent(addr) <= received(addr) + drawn(addr)
       sum(drawn) <= allowance * (1 + elapsed / window)

   Forged sources in any number extract at most the allowance's rate in bytes beyond what
   they sent themselves, and a human-pace client still gets its short timestamped replies
   (27 bytes beyond each request) while the server is not flooded. Under a flood that
   drains the allowance, replies larger than their requests stop until it refills: the
   price of never being an amplifier. ``exempt(addr, now)`` marks an address proven by a
   handshake: it skips this check, not the first two.

Entries live in an LRU table of at most ``max_sources`` (``OrderedDict``: O(1) lookup,
``move_to_end`` and eviction per datagram). A full table evicts the least recently seen
address, counted in ``evictions``. Eviction never hands out anything: a fresh entry has no
credit, and the allowance belongs to the budget, not to entries, so churning through the
table gains an attacker nothing; an exemption is lost with its entry (fail safe).

The previous rule gave each address 3x its bytes plus its own 1,200-byte allowance per
second. Both parts multiplied with the number of forged addresses, and eviction reset them:
1-byte timestamp requests from ever new addresses got 28x back without bound.

Grants serve the per-datagram fast path. ``ReplyGrants`` is for a service whose every reply
answers one request and is at most ``extra`` bytes larger than it (the echo Protocol): the
budget grants an address a batch of replies at once, charged up front, and the service
spends it with two subtractions per datagram. ``SourceGrants`` is for services whose replies
may be anything (``serve_udp`` handlers): the grant also carries the address's credit, grown
by 1x each request, and whatever it does not cover is decided by ``try_send``. Unspent
grants go back to the budget, so the counters stay exact.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "AMPLIFICATION_ALLOWANCE",
    "AMPLIFICATION_FACTOR",
    "AMPLIFICATION_WINDOW",
    "DEFAULT_MAX_SOURCES",
    "DEFAULT_SOURCE_BURST",
    "DEFAULT_SOURCE_BYTE_BURST",
    "DEFAULT_SOURCE_BYTE_RATE",
    "DEFAULT_SOURCE_RATE",
    "GRANT_BYTES",
    "GRANT_DATAGRAMS",
    "MAX_GRANT_BYTES",
    "MAX_GRANT_DATAGRAMS",
    "ReplyBudget",
    "ReplyBudgetStatistics",
    "ReplyGrants",
    "SourceGrants",
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

AMPLIFICATION_FACTOR: Final = 1.0
"""Credit earned per byte received: an unverified address is sent at most what it sent (1x),
beyond which only the shared allowance pays. It cannot be set higher."""

AMPLIFICATION_ALLOWANCE: Final = 4096
"""Bytes beyond their own credit that ALL unverified addresses of a budget may receive
together per ``AMPLIFICATION_WINDOW`` (a token bucket of that size, shared): about 150
timestamp prefixes (27 bytes) a second, plenty for people typing, and the most any number of
forged sources can extract from the server beyond their own bytes (4 KiB/s)."""

AMPLIFICATION_WINDOW: Final = 1.0
"""Seconds in which ``AMPLIFICATION_ALLOWANCE`` refills (continuously, as a token bucket)."""

DEFAULT_MAX_SOURCES: Final = 10_000
"""Addresses tracked at once: about 300 bytes each with its table slot (plus the address key
itself), so about 3 MiB in all. Beyond it the least recently seen address is evicted and
counted."""

GRANT_DATAGRAMS: Final = 32
"""Replies a ``ReplyGrants`` asks the budget for at a time; more, up to
``MAX_GRANT_DATAGRAMS``, when an eighth of the budget's burst is larger."""
GRANT_BYTES: Final = 64 * 1024
"""Reply bytes a ``ReplyGrants`` asks for at a time, at most; more, up to ``MAX_GRANT_BYTES``,
when an eighth of the budget's byte burst is larger."""
MAX_GRANT_DATAGRAMS: Final = 256
"""Most replies one grant holds, however generous the budget."""
MAX_GRANT_BYTES: Final = 256 * 1024
"""Most reply bytes one grant holds, however generous the budget."""
_GRANT_SHARE: Final = 8  # a grant takes at most 1/8 of the budget's bursts beyond the defaults


@dataclass(frozen=True, slots=True)
class ReplyBudgetStatistics:
    """A snapshot of a ``ReplyBudget``'s counters (all cumulative except ``sources``).

    Attributes:
        sources: addresses tracked now (at most ``max_sources``).
        replies_allowed: replies allowed (``try_send`` answered True, or granted).
        bytes_allowed: payload bytes of the allowed replies (for grants: bytes granted).
        dropped_by_rate: replies refused by the per-address datagram bucket.
        dropped_by_bytes: replies refused by the per-address byte bucket.
        dropped_by_amplification: replies refused by the amplification cap.
        evictions: addresses evicted because the table was full.
        bytes_unearned: bytes paid from the shared allowance (beyond the sources' own
            bytes), over all unverified addresses.
    """

    sources: int
    replies_allowed: int
    bytes_allowed: int
    dropped_by_rate: int
    dropped_by_bytes: int
    dropped_by_amplification: int
    evictions: int
    bytes_unearned: int = 0

    @property
    def replies_dropped(self) -> int:
        """Replies refused for any reason."""
        return self.dropped_by_rate + self.dropped_by_bytes + self.dropped_by_amplification


class _Source:
    """Per-address state: four floats and a flag, refilled lazily at ``stamp``."""

    __slots__ = ("byte_tokens", "credit", "datagram_tokens", "stamp", "verified")

    def __init__(self, now: float, datagrams: float, size: float) -> None:
        self.stamp = now
        self.datagram_tokens = datagrams
        self.byte_tokens = size
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
        factor: credit earned per byte received (0 to 1; 0 leaves only the allowance).
        allowance: bytes beyond their credit that all unverified addresses together may
            receive per ``window`` (>= 0): one bucket for the whole budget.
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
        "_bytes_unearned",
        "_dropped_by_amplification",
        "_dropped_by_bytes",
        "_dropped_by_rate",
        "_evictions",
        "_factor",
        "_max_sources",
        "_rate",
        "_replies_allowed",
        "_shared",
        "_shared_stamp",
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
        _require("factor", factor, 0 <= factor <= 1)
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
        self._shared = float(allowance)
        self._shared_stamp: float | None = None
        self._max_sources = max_sources
        self._sources: OrderedDict[Hashable, _Source] = OrderedDict()
        self._replies_allowed = self._bytes_allowed = self._evictions = 0
        self._dropped_by_rate = self._dropped_by_bytes = self._dropped_by_amplification = 0
        self._bytes_unearned = 0

    def on_received(self, addr: Hashable, size: int, now: float) -> None:
        """Record a datagram of ``size`` payload bytes from ``addr`` at ``now``.

        It earns ``factor * size`` bytes of credit for replies to ``addr``.

        Raises:
            ValueError: ``size`` is negative.
        """
        _require_size(size)
        self._earn(self._touch(addr, now), size)

    def try_send(self, addr: Hashable, size: int, now: float) -> bool:
        """Ask whether a reply of ``size`` payload bytes may go to ``addr`` at ``now``.

        Returns:
            ``True`` to send it (it has been charged), ``False`` to drop it (the refusal
            is counted).

        Raises:
            ValueError: ``size`` is negative.
        """
        _require_size(size)
        source = self._touch(addr, now)
        self._refill(source, now)
        if self._refused(source, size, now):
            return False
        self._charge(source, 1, size)
        self._spend(source, size)
        return True

    def lease(
        self,
        addr: Hashable,
        request: int,
        reply: int,
        now: float,
        *,
        extra: int,
        datagrams: int,
        nbytes: int,
        unused: tuple[int, int] = (0, 0),
    ) -> tuple[int, int]:
        """Answer a request of ``request`` bytes with ``reply`` bytes, granting more replies.

        The per-datagram fast path of a service whose every reply answers one request from
        the same address and is at most ``extra`` bytes larger than it (``ReplyGrants``).
        The request earns credit and the reply is checked and charged as by ``on_received``
        and ``try_send``. The grant adds up to ``datagrams - 1`` further replies, ``nbytes``
        bytes in all, charged now to the datagram and byte buckets. Each further reply is
        paid by its own request (1x, by the caller's promise) plus ``extra`` bytes, which
        for an unverified address come from its credit only, never from the shared
        allowance: a grant never holds unearned bytes beyond its first reply. A grant left
        unspent is lost, which only ever sends less, unless the caller returns it: pass the
        replies and bytes left of the address's previous grant as ``unused``, and they are
        refunded (with their prepaid ``extra``) if the address's entry is still there.

        Returns:
            ``(count, nbytes)`` reply datagrams and bytes granted (at least one reply of
            ``reply`` bytes), or ``(0, 0)`` if that reply may not go, counted as for
            ``try_send``.
        """
        source = self._sources.get(addr)
        if source is None:
            self._uncount(*unused)  # nothing to refund: its grant went with its entry
            source = self._admit(addr, now)
        else:
            self._sources.move_to_end(addr)
            self._refund(source, unused, extra)
        self._earn(source, request)
        self._refill(source, now)
        if self._refused(source, reply, now):
            return 0, 0
        self._spend(source, reply)
        count = min(datagrams, int(source.datagram_tokens))
        if extra and not source.verified:
            count = 1 + min(count - 1, int(source.credit // extra))
            source.credit -= (count - 1) * extra
        granted = reply if count == 1 else max(reply, min(nbytes, int(source.byte_tokens)))
        self._charge(source, count, granted)
        return count, granted

    def open_grant(
        self, addr: Hashable, now: float, *, datagrams: int, nbytes: int
    ) -> tuple[int, int, float, bool]:
        """Move up to ``datagrams`` replies, ``nbytes`` bytes and all the credit of ``addr``
        into a grant that its holder spends on its own (``SourceGrants``).

        Nothing is refused or counted as dropped here: the holder asks ``try_send`` when its
        grant does not cover a reply.

        Returns:
            ``(replies, nbytes, credit, verified)``: what the grant holds, and whether the
            address is exempt from the amplification cap.
        """
        source = self._touch(addr, now)
        self._refill(source, now)
        count = max(0, min(datagrams, int(source.datagram_tokens)))
        granted = max(0, min(nbytes, int(source.byte_tokens)))
        self._charge(source, count, granted)
        credit, source.credit = source.credit, 0.0
        return count, granted, credit, source.verified

    def return_grant(self, addr: Hashable, replies: int, nbytes: int, credit: float) -> None:
        """Give back what a grant of ``open_grant`` did not spend. If the address's entry
        was evicted meanwhile, it is lost: eviction never hands anything out."""
        source = self._sources.get(addr)
        if source is None:
            self._uncount(replies, nbytes)
        else:
            self._refund(source, (replies, nbytes), 0)
            source.credit = min(self._byte_burst, source.credit + credit)

    def _uncount(self, replies: int, nbytes: int) -> None:
        """Take granted but unspent replies out of the allowed counts."""
        self._replies_allowed -= replies
        self._bytes_allowed -= nbytes

    def _refund(self, source: _Source, unused: tuple[int, int], extra: int) -> None:
        """Give back what a grant charged and did not spend, each up to its cap."""
        replies, nbytes = unused
        if replies or nbytes:
            source.datagram_tokens = min(self._burst, source.datagram_tokens + replies)
            source.byte_tokens = min(self._byte_burst, source.byte_tokens + nbytes)
            self._uncount(replies, nbytes)
            if extra and not source.verified:
                source.credit = min(self._byte_burst, source.credit + replies * extra)

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
            bytes_unearned=self._bytes_unearned,
        )

    def _earn(self, source: _Source, size: int) -> None:
        source.credit = min(self._byte_burst, source.credit + self._factor * size)

    def _refused(self, source: _Source, size: int, now: float) -> bool:
        """Count and return whether a reply of ``size`` bytes to ``source`` must be dropped."""
        if source.datagram_tokens < 1:
            self._dropped_by_rate += 1
        elif source.byte_tokens < size:
            self._dropped_by_bytes += 1
        elif (
            not source.verified
            and source.credit < size
            and (source.credit + self._shared_at(now) < size)
        ):
            self._dropped_by_amplification += 1
        else:
            return False
        return True

    def _shared_at(self, now: float) -> float:
        """Refill the shared allowance up to ``now`` and return it."""
        stamp = self._shared_stamp
        if stamp is None or now > stamp:
            if stamp is not None:
                refill = (now - stamp) * self._allowance_rate
                self._shared = min(self._allowance, self._shared + refill)
            self._shared_stamp = now
        return self._shared

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
        source = _Source(now, self._burst, self._byte_burst)
        self._sources[addr] = source
        return source

    def _refill(self, source: _Source, now: float) -> None:
        """Add the tokens earned since ``source.stamp``, each up to its cap."""
        elapsed = now - source.stamp
        if elapsed <= 0:
            return
        source.stamp = now
        source.datagram_tokens = min(self._burst, source.datagram_tokens + elapsed * self._rate)
        source.byte_tokens = min(self._byte_burst, source.byte_tokens + elapsed * self._byte_rate)

    def _charge(self, source: _Source, count: int, size: int) -> None:
        """Take ``count`` datagrams and ``size`` bytes from the rate buckets, and count them."""
        source.datagram_tokens -= count
        source.byte_tokens -= size
        self._replies_allowed += count
        self._bytes_allowed += size

    def _spend(self, source: _Source, size: int) -> None:
        """Pay ``size`` bytes from credit, then from the shared allowance (nothing when
        exempt). ``_refused`` has checked that they suffice."""
        if not source.verified:
            from_credit = min(source.credit, size)
            source.credit -= from_credit
            if size > from_credit:
                self._shared -= size - from_credit
                self._bytes_unearned += int(size - from_credit)


class ReplyGrants:
    """A replying service's grants from a ``ReplyBudget``, one per address, and their count.

    Args:
        budget: the budget that grants (and counts refusals).
        extra: the most bytes a reply is larger than its request (0 for an echo, 27 for a
            timestamp echo).
        max_grants: addresses holding a grant at once; when full, all grants are settled
            and dropped (what they left unspent goes back to the budget). A grant
            renewed while still in the table gives back what it did not spend.

    Calling protocol, per datagram (the service's fast path)::

        grant = grants.table.get(addr)
        if grant is not None and grant[0] and grant[1] >= len(reply):
            grant[0] -= 1               # one reply
            grant[1] -= len(reply)      # its bytes; send it
        else:
            grant = grants.renew(addr, grant, len(request), len(reply), now)
            # None: drop (counted); else send the reply, already counted

    A grant is a list ``[replies left, bytes left, replies left when granted]``: what it has
    spent is the difference of the first and third, so the replies a service sent are
    counted exactly (``used``) with no counter on the fast path. The service adds to
    ``unsent`` a granted reply that could not go (paused writing, a failed send).
    """

    __slots__ = (
        "_budget",
        "_datagrams",
        "_extra",
        "_max_grants",
        "_nbytes",
        "_settled",
        "refused",
        "table",
        "unsent",
    )

    def __init__(
        self, budget: ReplyBudget, *, extra: int, max_grants: int = DEFAULT_MAX_SOURCES
    ) -> None:
        self._budget = budget
        self._extra = extra
        self._max_grants = max_grants
        # Grants as large as an eighth of the budget's bursts: a generous budget is asked
        # less often; the default one gets the defaults.
        share = budget.burst // _GRANT_SHARE
        self._datagrams = int(max(GRANT_DATAGRAMS, min(MAX_GRANT_DATAGRAMS, share)))
        share = budget.byte_burst // _GRANT_SHARE
        self._nbytes = int(max(GRANT_BYTES, min(MAX_GRANT_BYTES, share)))
        self.table: dict[Hashable, list[int]] = {}
        self._settled = 0
        self.refused = 0
        """Requests whose reply the budget refused."""
        self.unsent = 0
        """Granted replies that were not sent (the service counts them here)."""

    def renew(
        self, addr: Hashable, grant: list[int] | None, request: int, reply: int, now: float
    ) -> list[int] | None:
        """Settle ``addr``'s grant and ask the budget for a new one, spending one reply now.

        Args:
            addr: the request's source.
            grant: the grant the caller holds for ``addr`` (None if none).
            request, reply: sizes of the request and of its reply.
            now: the time.

        Returns:
            The new grant, its first reply already spent and counted; or None if the
            budget refused the reply (counted in ``refused`` and by the budget).
        """
        unused = (0, 0)
        if grant is not None and self.table.pop(addr, None) is grant:  # else settled already
            self._settled += grant[2] - grant[0]
            unused = (grant[0], grant[1])
        count, nbytes = self._budget.lease(
            addr,
            request,
            reply,
            now,
            extra=self._extra,
            datagrams=self._datagrams,
            nbytes=self._nbytes,
            unused=unused,
        )
        if not count:
            self.refused += 1
            return None
        if len(self.table) >= self._max_grants:
            self.settle_all()
        self._settled += 1  # this request's reply; the grant counts from the next one
        left = count - 1
        grant = self.table[addr] = [left, nbytes - reply, left]
        return grant

    def settle_all(self) -> None:
        """Count what every grant spent, give back the rest, and drop them all."""
        for addr, grant in self.table.items():
            self._settled += grant[2] - grant[0]
            self._budget.return_grant(addr, grant[0], grant[1], grant[0] * self._extra)
        self.table.clear()

    @property
    def used(self) -> int:
        """Replies granted and spent so far (sent, or counted in ``unsent``)."""
        return self._settled + sum(grant[2] - grant[0] for grant in self.table.values())


class SourceGrants:
    """Per-address grants for a service whose replies are not tied to its requests (any
    handler of ``serve_udp``): the budget's checks, paid mostly without calling it.

    Args:
        budget: the budget the grants come from.
        max_grants: addresses holding a grant at once; when full, all grants are settled.

    A grant is a list ``[replies, bytes, credit, verified]`` moved out of the budget
    (``ReplyBudget.open_grant``): the datagram and byte tokens charged up front, and the
    address's amplification credit, which ``on_received`` then grows by 1x each request's
    size. ``try_send`` spends a grant when it covers the reply (credit too, unless the
    address is verified) and otherwise gives the grant back to the budget, asks
    ``ReplyBudget.try_send`` (the shared allowance, refusals and their counts live there)
    and opens a new grant if that reply may go. Every bound of the budget therefore holds
    exactly; ``settle_all()`` gives every grant back (call it before reading the budget's
    counters, which count the replies a grant holds as allowed until then).
    """

    __slots__ = ("_budget", "_datagrams", "_max_grants", "_nbytes", "table")

    def __init__(self, budget: ReplyBudget, *, max_grants: int = DEFAULT_MAX_SOURCES) -> None:
        self._budget = budget
        self._max_grants = max_grants
        share = budget.burst // _GRANT_SHARE
        self._datagrams = int(max(GRANT_DATAGRAMS, min(MAX_GRANT_DATAGRAMS, share)))
        share = budget.byte_burst // _GRANT_SHARE
        self._nbytes = int(max(GRANT_BYTES, min(MAX_GRANT_BYTES, share)))
        self.table: dict[Hashable, list[Any]] = {}

    def on_received(self, addr: Hashable, size: int, now: float) -> None:
        """Record a request of ``size`` bytes from ``addr``: 1x credit for its replies."""
        grant = self.table.get(addr)
        if grant is None:
            self._budget.on_received(addr, size, now)
        else:
            grant[2] += size

    def try_send(self, addr: Hashable, size: int, now: float) -> bool:
        """Ask whether a reply of ``size`` bytes may go to ``addr``; charged if True."""
        grant = self.table.get(addr)
        if grant is not None and grant[0] and grant[1] >= size and (grant[3] or grant[2] >= size):
            grant[0] -= 1
            grant[1] -= size
            if not grant[3]:
                grant[2] -= size
            return True
        return self._renew(addr, grant, size, now)

    def _renew(self, addr: Hashable, grant: list[Any] | None, size: int, now: float) -> bool:
        """Give ``addr``'s grant back, decide this reply by the budget, and open a new grant
        if it may go."""
        budget = self._budget
        if grant is not None and self.table.pop(addr, None) is grant:  # else settled already
            budget.return_grant(addr, grant[0], grant[1], grant[2])
        if not budget.try_send(addr, size, now):
            return False
        if len(self.table) >= self._max_grants:
            self.settle_all()
        self.table[addr] = list(
            budget.open_grant(addr, now, datagrams=self._datagrams, nbytes=self._nbytes)
        )
        return True

    def settle_all(self) -> None:
        """Give every grant back to the budget (what is unspent returns to it)."""
        for addr, grant in self.table.items():
            self._budget.return_grant(addr, grant[0], grant[1], grant[2])
        self.table.clear()  # the same dict: holders may keep a reference to it


def _require(name: str, value: float, ok: bool) -> None:
    """Raise ValueError naming ``name`` unless ``ok`` and ``value`` is finite."""
    if not ok or not math.isfinite(value):
        raise ValueError(f"{name} out of range or not finite: {value!r}")


def _require_size(size: int) -> None:
    """Raise ValueError if ``size`` is negative."""
    if size < 0:
        raise ValueError(f"datagram size must be >= 0, got {size}")
