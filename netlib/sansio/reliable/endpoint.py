"""ReliableServerCore: one server socket's reliable-UDP connections, with no I/O.

Rules of this module:

* No I/O, no clock, no randomness, no logging: time arrives as ``now`` and the HMAC key is
  passed in (the adapter draws it with ``os.urandom``). Server connection ids are derived
  from the key and a counter, so they are unpredictable without it.
* Inputs: ``datagram_received(data, addr, now)`` and ``handle_timer(now)``. Outputs: the
  connection a datagram went to (its own ``datagrams_to_send``/``next_event`` are then
  pumped, to ``conn.peer_address``), the stateless replies in ``datagrams_to_send()``, new
  connections in ``accepted()``, and ``next_deadline()``: one timer for the whole endpoint.
  After pumping a connection (a datagram went to it, the application sent on it, or it
  was accepted), the owner calls ``schedule(conn)``: its deadline moved.
* Nothing is kept for an address before it proves it receives what is sent to it. Only two
  kinds of datagram are answered: sound packets for a known connection (from its address),
  and sound HELLOs of at least ``MIN_HELLO_SIZE`` bytes; anything else gets no reply and
  leaves no state. The replies to a HELLO (a COOKIE, or REFUSE when full) are smaller than
  it, so an unverified address receives less than it sent (the limit is 3x). Stateless
  replies wait in a queue of at most ``MAX_PENDING_REPLIES``; beyond it they are dropped
  and counted.
* Every table is bounded: ``max_sessions`` connections, ``max_sessions_per_host`` per host.

Theory of operation
-------------------
The handshake is a QUIC Retry / DTLS HelloVerifyRequest: the first HELLO gets a COOKIE,
``HMAC-SHA-256(key, address, client cid, time bucket)`` cut to 16 bytes, with the bucket
(``now // COOKIE_LIFETIME``). A HELLO that brings back a cookie of this bucket or the one
before (so a cookie lives between one and two ``COOKIE_LIFETIME``) for its own address and
cid proves the address; only then is a ``ReliableConnection`` made, and it answers with
ACCEPT. A repeated HELLO (the ACCEPT was lost) goes to the existing connection, found by
address and client cid. A cookie that is stale or wrong gets a fresh COOKIE: still smaller
than the HELLO, so nothing is amplified, and a client that was slow is not stuck.

Packets after the handshake name the server's connection id; a packet from another address
than the connection's is dropped (no connection migration: a NAT rebinding costs a new
handshake after the idle timeout). Unknown ids get no reply: a stateless reset would need an
authenticated token, and an unauthenticated one would let anyone who guesses an id close a
connection.

Timers: ``schedule(conn)`` puts a connection's next deadline in a heap when it is earlier
than the one registered, or later by ``RESCHEDULE_SLACK`` or more, and the endpoint needs one
event-loop timer. The entry a new one replaces stays in the heap, stale: ``handle_timer``
skips stale entries, and ``next_deadline()`` drops them from the top, so the timer follows
a deadline that moved later (a request's acknowledgement deadline, made moot when the
reply carried the acknowledgement, woke a server's loop for nothing once per request). A
deadline later by less than the slack keeps its earlier entry: it fires, finds nothing
due, and the connection is scheduled again. The heap is rebuilt from the registered
deadlines whenever it holds more than two entries per connection (plus a slack): amortized
O(log n) per schedule, and memory for about two entries per connection.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

from netlib.sansio.reliable.connection import (
    CloseCode,
    ConnectionState,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.recovery import GRANULARITY
from netlib.sansio.reliable.wire import (
    CRC,
    HEADER,
    HELLO,
    MIN_HELLO_SIZE,
    PacketType,
    check_datagram,
    encode_close,
    encode_packet,
)

__all__ = [
    "COOKIE_LIFETIME",
    "COOKIE_SIZE",
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_MAX_SESSIONS_PER_HOST",
    "MAX_PENDING_REPLIES",
    "RESCHEDULE_SLACK",
    "ReliableServerCore",
    "ReliableServerStatistics",
]

COOKIE_LIFETIME: Final = 10.0
"""Seconds per cookie bucket: a cookie is accepted for 10 to 20 seconds after it was made."""
COOKIE_SIZE: Final = 20
"""Bytes of a cookie token: the 4-byte bucket and 16 bytes of HMAC-SHA-256."""
DEFAULT_MAX_SESSIONS: Final = 10_000
"""Connections a server core holds at once."""
DEFAULT_MAX_SESSIONS_PER_HOST: Final = 64
"""Connections one host (IP address) holds at once: a NAT hides a few dozen clients, and
filling ``DEFAULT_MAX_SESSIONS`` takes at least 157 hosts that each proved their address."""
MAX_PENDING_REPLIES: Final = 1024
"""Stateless replies (cookies, refusals) queued until ``datagrams_to_send()``."""
MIN_KEY_SIZE: Final = 16
_MAC_SIZE: Final = 16
RESCHEDULE_SLACK: Final = GRANULARITY
"""Seconds by which a connection's deadline must move later to replace its timer entry: the
event loops' timer granularity (1 ms), below which a move is not worth an entry."""
_HEAP_SLACK: Final = 64  # stale timer entries tolerated beyond two per connection
_HELLO: Final = int(PacketType.HELLO)
_CLOSED: Final = ConnectionState.CLOSED


@dataclass(frozen=True, slots=True)
class ReliableServerStatistics:
    """Counters of a ``ReliableServerCore`` (cumulative, except ``sessions``).

    Attributes:
        sessions: connections now.
        accepted: connections made (handshakes completed).
        cookies_sent: COOKIE replies.
        refused_full, refused_host_full: validated HELLOs refused by a cap.
        corrupt_dropped: datagrams whose checksum or version failed.
        unknown_dropped: sound packets for no connection, or not a HELLO, from an unknown
            address or cid; also packets for a connection from another address.
        small_hello_dropped: HELLOs below ``MIN_HELLO_SIZE`` (never answered).
        bad_cookies: HELLOs with a wrong or stale cookie (answered with a fresh one).
        replies_dropped: stateless replies dropped because the queue was full.
    """

    sessions: int
    accepted: int
    cookies_sent: int
    refused_full: int
    refused_host_full: int
    corrupt_dropped: int
    unknown_dropped: int
    small_hello_dropped: int
    bad_cookies: int
    replies_dropped: int


def _host_of(addr: Hashable) -> Hashable:
    return addr[0] if isinstance(addr, tuple) else addr


class ReliableServerCore:
    """The reliable-UDP side of one server socket: handshakes, demultiplexing, timers.

    Args:
        key: HMAC key for cookies and connection ids (at least 16 random bytes).
        config: the knobs of every connection.
        max_sessions: connections at once.
        max_sessions_per_host: connections per host (IP address) at once.

    Raises:
        ValueError: the key is too short or a cap is below 1.
    """

    __slots__ = (
        "_accepted",
        "_by_cid",
        "_by_peer",
        "_cid_counter",
        "_config",
        "_heap",
        "_hosts",
        "_key",
        "_max_per_host",
        "_max_sessions",
        "_registered",
        "_replies",
        "_seq",
        "accepted_total",
        "bad_cookies",
        "cookies_sent",
        "corrupt_dropped",
        "refused_full",
        "refused_host_full",
        "replies_dropped",
        "small_hello_dropped",
        "unknown_dropped",
    )

    def __init__(
        self,
        key: bytes,
        *,
        config: ReliableConfig | None = None,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_sessions_per_host: int = DEFAULT_MAX_SESSIONS_PER_HOST,
    ) -> None:
        if len(key) < MIN_KEY_SIZE:
            raise ValueError(f"key must be at least {MIN_KEY_SIZE} bytes, got {len(key)}")
        if max_sessions < 1 or max_sessions_per_host < 1:
            raise ValueError("max_sessions and max_sessions_per_host must be at least 1")
        self._key = key
        self._config = config or ReliableConfig()
        self._max_sessions = max_sessions
        self._max_per_host = max_sessions_per_host
        self._by_cid: dict[int, ReliableConnection] = {}
        self._by_peer: dict[tuple[Hashable, int], ReliableConnection] = {}
        self._hosts: dict[Hashable, int] = {}
        self._replies: list[tuple[bytes, Hashable]] = []
        self._accepted: list[ReliableConnection] = []
        self._heap: list[tuple[float, int, int]] = []
        self._registered: dict[int, float] = {}
        self._seq = 0
        self._cid_counter = 0
        self.accepted_total = self.cookies_sent = self.bad_cookies = 0
        self.refused_full = self.refused_host_full = self.corrupt_dropped = 0
        self.unknown_dropped = self.small_hello_dropped = self.replies_dropped = 0

    # -- inputs -------------------------------------------------------------------------------

    def datagram_received(
        self, data: bytes, addr: Hashable, now: float
    ) -> ReliableConnection | None:
        """Take one datagram from ``addr``; return the connection it went to, if any.

        The caller then sends that connection's ``datagrams_to_send(now)`` to
        ``conn.peer_address`` and takes its events. A new connection is also listed by
        ``accepted()``.
        """
        header = check_datagram(data)
        if header is None:
            self.corrupt_dropped += 1
            return None
        ptype, dcid, pn = header
        if dcid:
            conn = self._by_cid.get(dcid)
            if conn is None or conn.peer_address != addr:
                self.unknown_dropped += 1
                return None
            conn.packet_received(data, ptype, pn, now)
            return conn  # the owner pumps it, then schedules it
        if ptype != _HELLO:
            self.unknown_dropped += 1
            return None
        if len(data) < MIN_HELLO_SIZE:
            self.small_hello_dropped += 1  # R12: a short datagram never gets a reply
            return None
        return self._hello(data, addr, pn, now)

    def handle_timer(self, now: float) -> list[ReliableConnection]:
        """Run the timers due at ``now``; return the connections to pump."""
        heap = self._heap
        due: list[ReliableConnection] = []
        while heap and heap[0][0] <= now:
            deadline, _, cid = heapq.heappop(heap)
            if self._registered.get(cid) != deadline:
                continue  # a stale entry: an earlier one for this connection was used
            del self._registered[cid]
            conn = self._by_cid.get(cid)
            if conn is not None:
                conn.handle_timer(now)
                due.append(conn)
        for conn in due:
            self.schedule(conn)
        return due

    def schedule(self, conn: ReliableConnection) -> None:
        """Register ``conn``'s next deadline (after any input or send); forget it if closed."""
        if conn.state is _CLOSED:
            self._forget(conn)
            return
        deadline = conn.next_deadline()
        if deadline is None:
            return
        known = self._registered.get(conn.cid)
        if known is None or deadline < known or deadline - known >= RESCHEDULE_SLACK:
            self._registered[conn.cid] = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, conn.cid))
            if len(self._heap) > 2 * len(self._registered) + _HEAP_SLACK:
                self._rebuild()

    def _rebuild(self) -> None:
        """Drop the stale entries: one per connection is left, its registered deadline."""
        self._heap = [(d, i, cid) for i, (cid, d) in enumerate(self._registered.items())]
        heapq.heapify(self._heap)
        self._seq = len(self._heap)

    # -- outputs ------------------------------------------------------------------------------

    def datagrams_to_send(self) -> list[tuple[bytes, Hashable]]:
        """The stateless replies queued since the last call: ``(datagram, address)``."""
        replies, self._replies = self._replies, []
        return replies

    def accepted(self) -> list[ReliableConnection]:
        """Connections made since the last call."""
        accepted, self._accepted = self._accepted, []
        return accepted

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` should run next, or None."""
        heap = self._heap
        registered = self._registered
        while heap:
            deadline, _, cid = heap[0]
            if registered.get(cid) == deadline:
                return deadline
            heapq.heappop(heap)  # stale: its connection's deadline moved, or it closed
        return None

    @property
    def sessions(self) -> int:
        """Connections now."""
        return len(self._by_cid)

    def connection(self, cid: int) -> ReliableConnection | None:
        """The connection with server cid ``cid``, if any."""
        return self._by_cid.get(cid)

    def connections(self) -> list[ReliableConnection]:
        """Every connection now."""
        return list(self._by_cid.values())

    def cookie(self, addr: Hashable, cid: int, now: float) -> bytes:
        """The cookie token for ``addr`` and client cid ``cid`` at ``now``."""
        return self._cookie(addr, cid, int(now // COOKIE_LIFETIME) & 0xFFFF_FFFF)

    def statistics(self) -> ReliableServerStatistics:
        """Return a snapshot of the counters."""
        return ReliableServerStatistics(
            sessions=len(self._by_cid),
            accepted=self.accepted_total,
            cookies_sent=self.cookies_sent,
            refused_full=self.refused_full,
            refused_host_full=self.refused_host_full,
            corrupt_dropped=self.corrupt_dropped,
            unknown_dropped=self.unknown_dropped,
            small_hello_dropped=self.small_hello_dropped,
            bad_cookies=self.bad_cookies,
            replies_dropped=self.replies_dropped,
        )

    # -- the handshake ------------------------------------------------------------------------

    def _hello(
        self, data: bytes, addr: Hashable, pn: int, now: float
    ) -> ReliableConnection | None:
        offset = HEADER.size
        cid, ack_delay, window, max_message, max_datagram, length = HELLO.unpack_from(data, offset)
        offset += HELLO.size
        if cid == 0 or offset + length > len(data) - CRC.size:
            self.unknown_dropped += 1
            return None
        existing = self._by_peer.get((addr, cid))
        if existing is not None:
            existing.packet_received(data, _HELLO, pn, now)
            self.schedule(existing)
            return existing
        token = data[offset : offset + length]
        if not self._valid(token, addr, cid, now):
            if token:
                self.bad_cookies += 1
            self._reply(self._cookie_packet(addr, cid, pn, now), addr)
            self.cookies_sent += 1
            return None
        return self._admit(addr, cid, pn, (ack_delay, window, max_message, max_datagram), now)

    def _admit(
        self, addr: Hashable, cid: int, pn: int, params: tuple[int, int, int, int], now: float
    ) -> ReliableConnection | None:
        ack_delay, window, max_message, max_datagram = params
        host = _host_of(addr)
        if len(self._by_cid) >= self._max_sessions:
            self.refused_full += 1
            self._refuse(addr, cid, pn, CloseCode.SERVER_FULL, "server full")
            return None
        if self._hosts.get(host, 0) >= self._max_per_host:
            self.refused_host_full += 1
            self._refuse(addr, cid, pn, CloseCode.HOST_FULL, "host full")
            return None
        conn = ReliableConnection.accept(
            self._new_cid(),
            now,
            self._config,
            peer_cid=cid,
            peer_ack_delay=ack_delay * 1e-4,
            peer_window=window,
            peer_max_message=max_message,
            hello_pn=pn,
            peer_address=addr,
            peer_max_datagram=max_datagram,
        )
        self._by_cid[conn.cid] = conn
        self._by_peer[(addr, cid)] = conn
        self._hosts[host] = self._hosts.get(host, 0) + 1
        self._accepted.append(conn)
        self.accepted_total += 1
        self.schedule(conn)
        return conn

    def _forget(self, conn: ReliableConnection) -> None:
        if self._by_cid.pop(conn.cid, None) is None:
            return
        self._by_peer.pop((conn.peer_address, conn.peer_cid), None)
        self._registered.pop(conn.cid, None)
        host = _host_of(conn.peer_address)
        left = self._hosts[host] - 1
        if left:
            self._hosts[host] = left
        else:
            del self._hosts[host]

    def _new_cid(self) -> int:
        while True:
            self._cid_counter += 1
            counter = self._cid_counter.to_bytes(8, "big")
            digest = hmac.new(self._key, b"cid" + counter, hashlib.sha256).digest()
            cid = int.from_bytes(digest[:4], "big")
            if cid and cid not in self._by_cid:
                return cid

    def _cookie(self, addr: Hashable, cid: int, bucket: int) -> bytes:
        message = b"%d|%d|" % (bucket, cid) + repr(addr).encode()
        mac = hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_SIZE]
        return bucket.to_bytes(4, "big") + mac

    def _valid(self, token: bytes, addr: Hashable, cid: int, now: float) -> bool:
        if len(token) != COOKIE_SIZE:
            return False
        bucket = int.from_bytes(token[:4], "big")
        current = int(now // COOKIE_LIFETIME) & 0xFFFF_FFFF
        if bucket not in (current, (current - 1) & 0xFFFF_FFFF):
            return False
        return hmac.compare_digest(token, self._cookie(addr, cid, bucket))

    def _cookie_packet(self, addr: Hashable, cid: int, pn: int, now: float) -> bytes:
        token = self.cookie(addr, cid, now)
        return encode_packet(PacketType.COOKIE, cid, pn, bytes([len(token)]) + token)

    def _refuse(self, addr: Hashable, cid: int, pn: int, code: int, reason: str) -> None:
        self._reply(encode_packet(PacketType.REFUSE, cid, pn, encode_close(code, reason)), addr)

    def _reply(self, packet: bytes, addr: Hashable) -> None:
        if len(self._replies) >= MAX_PENDING_REPLIES:
            self.replies_dropped += 1
            return
        self._replies.append((packet, addr))
