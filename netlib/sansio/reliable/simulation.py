"""A seeded lossy link and a virtual clock joining reliable-UDP cores, with no sockets.

Rules of this module:

* No I/O, no clock, no unseeded randomness: the link draws from ``SplitMix64``, a small
  seeded generator, so a scenario with the same seed replays exactly.
* It drives the real cores (``ReliableConnection``, ``ReliableServerCore``) the way the
  asyncio adapter will: feed datagrams, run due timers, drain events, send what the cores
  return, jump the clock to the next arrival or deadline. Nothing sleeps: a minute of
  virtual time costs only the packets in it.

Theory of operation
-------------------
``LossyLink`` is one direction of a path. Each datagram draws once against the profile's
shares (drop, duplicate, extra delay; the rest is delivered after ``delay`` plus up to
``jitter``); a drop starts a burst of ``burst`` datagrams. Independently, ``corrupt`` flips
one random bit, ``blackhole`` periods drop everything, a datagram above the path's ``mtu``
(UDP payload bytes; ``mtu_after`` lowers it at ``mtu_change``, a route change) is dropped
as a router does with fragmentation forbidden, and with a ``bandwidth`` datagrams queue
behind each other (up to ``queue`` bytes, beyond which they are dropped: congestion loss).
``Simulation`` keeps the datagrams in flight and the application's scheduled calls in one
heap ordered by time, and each step runs everything due at the current instant, so
datagrams that arrive together are processed together and acknowledged together, as in an
event loop.

This module is what ``netlib.testing`` will export for users' own tests of reliable-UDP
services.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Final

from netlib.sansio.reliable.connection import (
    ConnectionEvent,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import ReliableServerCore

__all__ = [
    "EventHandler",
    "LinkProfile",
    "LossyLink",
    "Simulation",
    "SplitMix64",
]

_MASK: Final = (1 << 64) - 1
_TO_SERVER: Final = 0
_TO_CLIENT: Final = 1
_CALL: Final = 2

EventHandler = Callable[[ReliableConnection, ConnectionEvent], None]


class SplitMix64:
    """A small seeded pseudo-random generator (SplitMix64): reproducible, not secure."""

    __slots__ = ("_state",)

    def __init__(self, seed: int) -> None:
        self._state = seed & _MASK

    def next(self) -> int:
        """The next 64-bit number."""
        self._state = z = (self._state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return z ^ (z >> 31)

    def random(self) -> float:
        """A float in [0, 1)."""
        return (self.next() >> 11) * (1.0 / (1 << 53))

    def below(self, n: int) -> int:
        """An int in [0, n)."""
        return self.next() % n

    def bytes(self, n: int) -> bytes:
        """``n`` pseudo-random bytes."""
        return b"".join(self.next().to_bytes(8, "little") for _ in range(n // 8 + 1))[:n]


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """How one direction of a path mistreats datagrams (shares are probabilities).

    Attributes:
        delay: one-way delay (seconds).
        jitter: extra delay, uniform in [0, jitter) (reorders close datagrams).
        loss: share of datagrams dropped; each drop starts a burst of ``burst`` drops.
        duplicate: share of datagrams delivered twice.
        late: share of datagrams delayed by up to ``late_delay`` more (reordering).
        corrupt: share of datagrams with one bit flipped.
        blackhole: ``(on, off)`` seconds: everything is dropped for ``on`` seconds, then
            nothing for ``off``, repeating from ``blackhole_start``.
        bandwidth: bytes per second the link serializes (None: infinite); datagrams wait
            behind each other, so a burst builds a queue.
        queue: bytes that may wait for the link; a datagram that does not fit is dropped
            (drop-tail: congestion loss).
        mtu: the largest datagram (UDP payload bytes) the path carries; larger ones are
            dropped (None: no limit).
        mtu_after, mtu_change: from virtual time ``mtu_change`` on, the path carries at
            most ``mtu_after`` bytes (None: no change).
    """

    delay: float = 0.001
    jitter: float = 0.0
    loss: float = 0.0
    burst: int = 1
    duplicate: float = 0.0
    late: float = 0.0
    late_delay: float = 0.0
    corrupt: float = 0.0
    blackhole: tuple[float, float] | None = None
    blackhole_start: float = 0.0
    bandwidth: float | None = None
    queue: int = 256 * 1024
    mtu: int | None = None
    mtu_after: int | None = None
    mtu_change: float = 0.0

    def __post_init__(self) -> None:
        if self.loss + self.duplicate + self.late > 1 or min(self.delay, self.jitter) < 0:
            raise ValueError(f"impossible link profile: {self}")

    def mtu_at(self, now: float) -> int | None:
        """The largest datagram the path carries at ``now`` (None: no limit)."""
        if self.mtu_after is not None and now >= self.mtu_change:
            return self.mtu_after
        return self.mtu


class LossyLink:
    """One direction of a simulated path.

    Args:
        profile: what the link does to datagrams.
        seed: the seed of its generator.
    """

    __slots__ = (
        "_burst_left",
        "_free_at",
        "_profile",
        "_rng",
        "blackholed",
        "corrupted",
        "dropped",
        "duplicated",
        "overflowed",
        "sent",
        "too_big",
    )

    def __init__(self, profile: LinkProfile, seed: int) -> None:
        self._profile = profile
        self._rng = SplitMix64(seed)
        self._burst_left = 0
        self._free_at = 0.0
        self.sent = self.dropped = self.duplicated = self.corrupted = self.blackholed = 0
        self.overflowed = self.too_big = 0

    def in_blackhole(self, now: float) -> bool:
        """True if the link drops everything at ``now``."""
        hole = self._profile.blackhole
        if hole is None or now < self._profile.blackhole_start:
            return False
        on, off = hole
        return (now - self._profile.blackhole_start) % (on + off) < on

    def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        """Send ``data`` at ``now``: the ``(arrival time, datagram)`` copies that arrive."""
        self.sent += 1
        p = self._profile
        rng = self._rng
        if self.in_blackhole(now):
            self.blackholed += 1
            return []
        mtu = p.mtu_at(now)
        if mtu is not None and len(data) > mtu:
            self.too_big += 1
            return []
        if self._burst_left:
            self._burst_left -= 1
            self.dropped += 1
            return []
        draw = rng.random()
        if draw < p.loss:
            self._burst_left = p.burst - 1
            self.dropped += 1
            return []
        if p.corrupt and rng.random() < p.corrupt:
            self.corrupted += 1
            data = _flip_bit(data, rng.below(len(data) * 8))
        start = now
        if p.bandwidth is not None:
            start = max(now, self._free_at)
            if (start - now) * p.bandwidth + len(data) > p.queue:
                self.overflowed += 1
                return []
            start = self._free_at = start + len(data) / p.bandwidth
        arrival = start + p.delay + (rng.random() * p.jitter if p.jitter else 0.0)
        if draw < p.loss + p.duplicate:
            self.duplicated += 1
            return [(arrival, data), (arrival + rng.random() * max(p.jitter, p.delay), data)]
        if draw < p.loss + p.duplicate + p.late:
            arrival += rng.random() * p.late_delay
        return [(arrival, data)]


def _flip_bit(data: bytes, bit: int) -> bytes:
    changed = bytearray(data)
    changed[bit >> 3] ^= 1 << (bit & 7)
    return bytes(changed)


class Simulation:
    """Clients and one server core joined by two lossy links, on a virtual clock.

    Args:
        server: the server core (its datagrams go down, the clients' go up).
        up: the clients-to-server link profile; down: server-to-clients.
        seed: seeds both links.
        on_client_event, on_server_event: called with each event of a connection; when
            None, events stay in the connection for the test to take.
    """

    def __init__(
        self,
        server: ReliableServerCore,
        *,
        up: LinkProfile | None = None,
        down: LinkProfile | None = None,
        seed: int = 1,
        on_client_event: EventHandler | None = None,
        on_server_event: EventHandler | None = None,
    ) -> None:
        self.server = server
        self.up = LossyLink(up or LinkProfile(), seed)
        self.down = LossyLink(down or up or LinkProfile(), seed * 7919 + 1)
        self.now = 0.0
        self.clients: dict[Hashable, ReliableConnection] = {}
        self.on_client_event = on_client_event
        self.on_server_event = on_server_event
        self.stray_replies = 0
        self._heap: list[tuple[float, int, int, bytes, Hashable, Callable[[], object] | None]] = []
        self._seq = 0

    def connect(
        self, cid: int, address: Hashable, config: ReliableConfig | None = None
    ) -> ReliableConnection:
        """A client at ``address`` that starts connecting now."""
        conn = ReliableConnection.connect(cid, self.now, config)
        self.clients[address] = conn
        self._pump_client(address, conn)
        return conn

    def at(self, when: float, callback: Callable[[], object]) -> None:
        """Call ``callback()`` at virtual time ``when`` (then the cores are pumped)."""
        self._push(when, _CALL, b"", None, callback)

    def inject(self, data: bytes, source: Hashable) -> None:
        """Deliver ``data`` to the server now, as if from ``source`` (forged traffic)."""
        self._push(self.now, _TO_SERVER, data, source)

    def run(self, until: Callable[[], bool] | None = None, *, limit: float) -> bool:
        """Run until ``until()`` is true (True) or virtual time passes ``limit`` (False)."""
        while not (until is not None and until()):
            due = self._next_time()
            if due is None or due > limit:
                self.now = max(self.now, limit)
                return until is None
            self.now = max(self.now, due)
            self._step()
        return True

    # -- internals ----------------------------------------------------------------------------

    def _push(
        self,
        when: float,
        kind: int,
        data: bytes,
        address: Hashable,
        callback: Callable[[], object] | None = None,
    ) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, data, address, callback))

    def _next_time(self) -> float | None:
        times = [conn.next_deadline() for conn in self.clients.values()]
        times.append(self.server.next_deadline())
        if self._heap:
            times.append(self._heap[0][0])
        known = [t for t in times if t is not None]
        return min(known) if known else None

    def _step(self) -> None:
        now = self.now
        heap = self._heap
        server = self.server
        touched: dict[ReliableConnection, None] = dict.fromkeys(server.connections())
        while heap and heap[0][0] <= now:
            _, _, kind, data, address, callback = heapq.heappop(heap)
            if kind == _TO_SERVER:
                conn = server.datagram_received(data, address, now)
                if conn is not None:
                    touched[conn] = None
            elif kind == _TO_CLIENT:
                client = self.clients.get(address)
                if client is None:
                    self.stray_replies += 1
                else:
                    client.datagram_received(data, now)
            elif callback is not None:
                callback()
        deadline = server.next_deadline()
        if deadline is not None and deadline <= now:
            touched.update(dict.fromkeys(server.handle_timer(now)))
        for address, client in list(self.clients.items()):
            deadline = client.next_deadline()
            if deadline is not None and deadline <= now:
                client.handle_timer(now)
            self._pump_client(address, client)
        touched.update(dict.fromkeys(server.accepted()))
        for conn in touched:
            self._pump_server(conn)
        for packet, address in server.datagrams_to_send():
            self._send_down(packet, address)

    def _pump_client(self, address: Hashable, conn: ReliableConnection) -> None:
        handler = self.on_client_event
        if handler is not None:
            while (event := conn.next_event()) is not None:
                handler(conn, event)
        now = self.now
        for packet in conn.datagrams_to_send(now):
            for arrival, data in self.up.transmit(packet, now):
                self._push(arrival, _TO_SERVER, data, address)

    def _pump_server(self, conn: ReliableConnection) -> None:
        handler = self.on_server_event
        if handler is not None:
            while (event := conn.next_event()) is not None:
                handler(conn, event)
        for packet in conn.datagrams_to_send(self.now):
            self._send_down(packet, conn.peer_address)
        self.server.schedule(conn)

    def _send_down(self, packet: bytes, address: Hashable) -> None:
        for arrival, data in self.down.transmit(packet, self.now):
            self._push(arrival, _TO_CLIENT, data, address)
