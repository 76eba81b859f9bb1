"""UdpChatCore: the UDP chat's cookie handshake and bounded peer table, without I/O.

Rules of this module:

* No I/O, no clock, no randomness, no logging: time arrives as ``now`` and the HMAC key is
  passed in by the adapter (``os.urandom`` lives there).
* Inputs: ``datagram_received(data, addr, now)``, ``handle_timer(now)``, ``send(payload,
  addr, now)`` and ``forget(addr)``. Outputs: one event (or None) per datagram, the
  addresses that expired, and whether a payload may go.
* A reply to an unverified address is never larger than the datagram it answers. The cookie
  reply (``*** hello <cookie>``, ``HELLO_REPLY_SIZE`` bytes) goes only in answer to a hello
  request (``/hello``, padded with spaces or any other text that is not a cookie) at least
  that large, and a request of at least ``HELLO_GUIDE_SIZE`` bytes gets the reply that also
  says what to send back (``*** hello <cookie>; to join, send: /hello <cookie>``: for a
  person typing into ``nc -u``); anything else from an unknown address (empty, junk, a short
  hello, a wrong cookie) gets no reply at all and is counted in ``dropped_unverified``. Such
  datagrams create no state.
* Every datagram the chat sends is one line ending in ``\\n``, so that lines read by ``nc -u``
  do not run together.
* Every table is bounded: ``max_peers`` sessions, ``max_peers_per_host`` of them per host.

Theory of operation
-------------------
A new address asks for a cookie; the cookie is a keyed hash (HMAC-SHA-256) of the address,
so the server keeps nothing for it and a forged source never sees it. An address that sends
``/hello <cookie>`` back has proven it receives what is sent to it: it becomes a peer,
exempt from the reply budget's amplification cap (not from its rate). Answering only padded
hello requests keeps the handshake from amplifying anything: the largest reply a forged
source can get is its own size, at the budget's per-address rate.

A proven address proves its host and port only, and one host can use thousands of ports: at
most ``max_peers_per_host`` sessions per host (IP address), so that filling the table takes
that many hosts. Peers keep alive with heartbeats, empty datagrams or padded hello requests,
and expire after ``peer_timeout`` seconds of silence; ``handle_timer`` sweeps them and should
run every ``sweep_interval``. A client whose session expired learns it from the cookie that
its next padded heartbeat gets (an empty one gets nothing: it is smaller than any reply).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from netlib.sansio.datagram import ReplyBudget, ReplyBudgetStatistics

__all__ = [
    "CHAT_PEER_TIMEOUT",
    "COOKIE_SIZE",
    "HELLO_GUIDE_SIZE",
    "HELLO_REPLY_SIZE",
    "HELLO_REQUEST",
    "MAX_UDP_PEERS",
    "MAX_UDP_PEERS_PER_HOST",
    "UDP_CHAT_RATE",
    "PeerJoined",
    "PeerLine",
    "SendDatagram",
    "UdpChatCore",
    "UdpChatEvent",
    "UdpChatStatistics",
    "host_of",
]

CHAT_PEER_TIMEOUT: Final = 30.0
"""Seconds of silence after which a UDP chat peer expires (clients heartbeat every 5 s)."""
MAX_UDP_PEERS: Final = 10_000
"""UDP chat sessions at once; a verified address beyond it is told ``!!! server full``."""
MAX_UDP_PEERS_PER_HOST: Final = 64
"""UDP chat sessions from one host (IP address) at once: a NAT can hide a few dozen users,
and filling ``MAX_UDP_PEERS`` then takes at least 157 hosts that each completed the
handshake from their real address. Beyond it the address is told ``!!! host full``."""
UDP_CHAT_RATE: Final = 1000.0
"""Datagrams per second a UDP chat peer may be sent (burst twice that)."""
HELLO_REQUEST: Final = b"/hello"
"""A cookie request, padded (spaces, or any text but a cookie) to at least
``HELLO_REPLY_SIZE`` bytes."""
COOKIE_SIZE: Final = 16
"""Hex digits of a cookie (64 bits of HMAC-SHA-256)."""
_HELLO_PREFIX: Final = b"*** hello "
HELLO_REPLY_SIZE: Final = len(_HELLO_PREFIX) + COOKIE_SIZE + 1
"""Bytes of the cookie reply (27, its ``\\n`` included), and so the smallest hello request
that gets one."""
_GUIDE: Final = b"; to join, send: " + HELLO_REQUEST + b" "
HELLO_GUIDE_SIZE: Final = HELLO_REPLY_SIZE + len(_GUIDE) + COOKIE_SIZE
"""Bytes of the cookie reply that says what to send back (67), and so the smallest hello
request that gets it: ``/hello`` and at least 60 more characters, typed into ``nc -u``."""
_SERVER_FULL: Final = b"!!! server full\n"
_HOST_FULL: Final = b"!!! host full\n"
MIN_KEY_SIZE: Final = 16


@dataclass(frozen=True, slots=True)
class SendDatagram:
    """Send ``data`` to ``addr`` (it has passed the reply budget)."""

    data: bytes
    addr: Hashable


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """``addr`` proved its address and is now a peer: open its session."""

    addr: Hashable


@dataclass(frozen=True, slots=True)
class PeerLine:
    """A peer sent a line (decoded as UTF-8 with replacement, line end removed)."""

    addr: Hashable
    text: str


UdpChatEvent = SendDatagram | PeerJoined | PeerLine


@dataclass(frozen=True, slots=True)
class UdpChatStatistics:
    """Counters of a ``UdpChatCore`` (a snapshot; all cumulative except ``peers``).

    Attributes:
        peers: sessions now.
        joined: addresses that completed the handshake.
        cookies_sent: cookie replies sent.
        dropped_unverified: datagrams from unknown addresses left unanswered (empty, junk,
            hello requests smaller than the reply, wrong cookies).
        refused_full: handshakes refused because the table was full.
        refused_host_full: handshakes refused by the per-host cap.
        expired: peers that fell silent for ``peer_timeout``.
        replies_dropped: datagrams the reply budget refused.
        budget: the reply budget's counters.
    """

    peers: int
    joined: int
    cookies_sent: int
    dropped_unverified: int
    refused_full: int
    refused_host_full: int
    expired: int
    replies_dropped: int
    budget: ReplyBudgetStatistics


def host_of(addr: Hashable) -> Hashable:
    """The host part of an address: the IP address of ``(host, port, ...)``, else as is."""
    return addr[0] if isinstance(addr, tuple) else addr


class UdpChatCore:
    """The UDP chat's handshake, peer table and reply budget.

    Args:
        key: the HMAC key for cookies (at least 16 random bytes, e.g. ``os.urandom(16)``).
        peer_timeout: seconds of silence after which a peer expires.
        max_peers: sessions at once.
        max_peers_per_host: sessions per host at once.
        budget: the reply policy for every datagram sent (default: ``UDP_CHAT_RATE`` per
            peer and no shared allowance: no reply here needs more than 1x).

    Raises:
        ValueError: the key is too short or a limit is out of range.
    """

    __slots__ = (
        "_budget",
        "_hosts",
        "_key",
        "_max_peers",
        "_max_per_host",
        "_peers",
        "_timeout",
        "cookies_sent",
        "dropped_unverified",
        "expired",
        "joined",
        "refused_full",
        "refused_host_full",
        "replies_dropped",
    )

    def __init__(
        self,
        key: bytes,
        *,
        peer_timeout: float = CHAT_PEER_TIMEOUT,
        max_peers: int = MAX_UDP_PEERS,
        max_peers_per_host: int = MAX_UDP_PEERS_PER_HOST,
        budget: ReplyBudget | None = None,
    ) -> None:
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"key must be at least {MIN_KEY_SIZE} bytes, got {len(key)}")
        if peer_timeout <= 0 or max_peers < 1 or max_peers_per_host < 1:
            raise ValueError("peer_timeout, max_peers and max_peers_per_host must be positive")
        self._key = key
        self._timeout = peer_timeout
        self._max_peers = max_peers
        self._max_per_host = max_peers_per_host
        self._budget = budget or ReplyBudget(
            rate=UDP_CHAT_RATE, burst=2 * UDP_CHAT_RATE, allowance=0
        )
        self._peers: dict[Hashable, float] = {}  # addr -> last seen
        self._hosts: dict[Hashable, int] = {}  # host -> peers
        self.joined = self.cookies_sent = self.dropped_unverified = self.expired = 0
        self.refused_full = self.refused_host_full = self.replies_dropped = 0

    # -- inputs -----------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Hashable, now: float) -> UdpChatEvent | None:
        """Take one datagram; return what to do about it, or None (heartbeat or drop)."""
        if addr in self._peers:
            self._peers[addr] = now
            if not data or (data.startswith(HELLO_REQUEST) and data.split()[0] == HELLO_REQUEST):
                return None  # a heartbeat (or a handshake datagram sent once more)
            return PeerLine(addr, data.decode("utf-8", "replace").rstrip("\r\n"))
        return self._handshake(data, addr, now)

    def handle_timer(self, now: float) -> list[Hashable]:
        """Forget the peers silent for ``peer_timeout``; return their addresses."""
        deadline = now - self._timeout
        gone = [addr for addr, seen in self._peers.items() if seen < deadline]
        for addr in gone:
            self.forget(addr)
        self.expired += len(gone)
        return gone

    def send(self, payload: bytes, addr: Hashable, now: float) -> bool:
        """Ask whether ``payload`` may go to ``addr`` now (charged if so; counted if not)."""
        if addr in self._peers:
            self._budget.exempt(addr, now)  # the peer table, not the budget's LRU, decides
        if self._budget.try_send(addr, len(payload), now):
            return True
        self.replies_dropped += 1
        return False

    def forget(self, addr: Hashable) -> None:
        """End the peer ``addr`` (after /quit, or expiry); nothing if it is not a peer."""
        if self._peers.pop(addr, None) is not None:
            host = host_of(addr)
            left = self._hosts[host] - 1
            if left:
                self._hosts[host] = left
            else:
                del self._hosts[host]

    # -- queries ----------------------------------------------------------------------------

    @property
    def sweep_interval(self) -> float:
        """Seconds between ``handle_timer`` calls: a third of the peer timeout."""
        return self._timeout / 3

    @property
    def peers(self) -> int:
        """Sessions now."""
        return len(self._peers)

    def peers_of(self, host: Hashable) -> int:
        """Sessions of one host now."""
        return self._hosts.get(host, 0)

    def cookie(self, addr: Hashable) -> bytes:
        """The cookie of ``addr``: hex digits of a keyed hash, the same for the key's life."""
        digest = hmac.new(self._key, repr(addr).encode(), hashlib.sha256).hexdigest()
        return digest[:COOKIE_SIZE].encode()

    def statistics(self) -> UdpChatStatistics:
        """Return a snapshot of the counters."""
        return UdpChatStatistics(
            peers=len(self._peers),
            joined=self.joined,
            cookies_sent=self.cookies_sent,
            dropped_unverified=self.dropped_unverified,
            refused_full=self.refused_full,
            refused_host_full=self.refused_host_full,
            expired=self.expired,
            replies_dropped=self.replies_dropped,
            budget=self._budget.statistics(),
        )

    # -- the handshake ----------------------------------------------------------------------

    def _handshake(self, data: bytes, addr: Hashable, now: float) -> UdpChatEvent | None:
        words = data.split()
        if words[:1] != [HELLO_REQUEST]:
            self.dropped_unverified += 1
            return None
        cookie = self.cookie(addr)
        if len(words) != 2 or len(words[1]) != COOKIE_SIZE:  # a request, padded
            if len(data) < HELLO_REPLY_SIZE:  # the reply must not be larger than the request
                self.dropped_unverified += 1
                return None
            reply = _HELLO_PREFIX + cookie
            if len(data) >= HELLO_GUIDE_SIZE:
                reply += _GUIDE + cookie
            sent = self._reply(reply + b"\n", data, addr, now)
            self.cookies_sent += sent is not None
            return sent
        if not hmac.compare_digest(words[1], cookie):
            self.dropped_unverified += 1
            return None
        return self._admit(data, addr, now)

    def _admit(self, data: bytes, addr: Hashable, now: float) -> UdpChatEvent | None:
        host = host_of(addr)
        if len(self._peers) >= self._max_peers:
            self.refused_full += 1
            return self._reply(_SERVER_FULL, data, addr, now)
        if self._hosts.get(host, 0) >= self._max_per_host:
            self.refused_host_full += 1
            return self._reply(_HOST_FULL, data, addr, now)
        self._peers[addr] = now
        self._hosts[host] = self._hosts.get(host, 0) + 1
        self._budget.exempt(addr, now)
        self.joined += 1
        return PeerJoined(addr)

    def _reply(
        self, reply: bytes, request: bytes, addr: Hashable, now: float
    ) -> SendDatagram | None:
        """A reply to an unverified address, paid by the request it answers."""
        self._budget.on_received(addr, len(request), now)
        return SendDatagram(reply, addr) if self.send(reply, addr, now) else None
