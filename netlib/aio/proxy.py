"""The impairment proxies: real sockets in front of a real server, mistreating the traffic.

Theory of operation
-------------------
**UDP.** One listening socket faces the clients. Each client address gets its own upstream
socket, connected to the target, so the target's replies come back to the right client.
Every datagram, either way, is handed to a ``LossyLink`` (the same seeded, sans-I/O link the
reliable-UDP tests use, ``netlib.sansio.reliable.simulation``), which says when each copy
arrives, if any: the proxy sends it then, with one ``call_at`` per copy. So loss, bursts,
duplication, delay, jitter, reordering, corruption and blackhole periods behave as in the
in-process simulation, on real sockets, reproducibly for a given seed (the order of
arrival of the clients' datagrams is the only thing the seed does not fix). Clients are
bounded (``max_clients``) and forgotten after ``idle_timeout`` seconds of silence.

**TCP.** A byte stream has no datagrams to lose: loss below TCP shows as delay, and needs
packet loss in the kernel (network namespaces and ``iptables``, as the project's loss
benchmark does). The TCP proxy delays each chunk by the link's ``delay`` plus ``jitter``
and keeps the order; a direction holding more than ``TCP_BUFFER`` bytes stops reading its
source until the delayed bytes are written, so the proxy's memory per connection is
bounded.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from netlib.sansio.reliable.simulation import LinkProfile, LossyLink, SplitMix64

__all__ = [
    "DEFAULT_PROXY_CLIENTS",
    "DEFAULT_PROXY_IDLE",
    "TCP_BUFFER",
    "LinkCounts",
    "ProxyStatistics",
    "TcpImpairmentProxy",
    "UdpImpairmentProxy",
]

DEFAULT_PROXY_CLIENTS: Final = 1024
"""UDP client addresses a proxy serves at once (each has its own upstream socket)."""
DEFAULT_PROXY_IDLE: Final = 60.0
"""Seconds of silence after which a UDP client's upstream socket is closed."""
TCP_BUFFER: Final = 256 * 1024
"""Bytes one direction of a proxied TCP connection may hold before it stops reading."""


@dataclass(frozen=True, slots=True)
class LinkCounts:
    """What one direction of the proxy did to the datagrams (or chunks) it got.

    Attributes:
        received: datagrams (TCP: chunks) that entered this direction.
        dropped: lost (random loss and its bursts).
        blackholed: lost in a blackhole period.
        duplicated: delivered twice.
        corrupted: delivered with one bit flipped.
        overflowed: dropped because the link's queue was full (bandwidth limit).
    """

    received: int = 0
    dropped: int = 0
    blackholed: int = 0
    duplicated: int = 0
    corrupted: int = 0
    overflowed: int = 0

    @classmethod
    def of(cls, link: LossyLink) -> LinkCounts:
        return cls(
            received=link.sent,
            dropped=link.dropped,
            blackholed=link.blackholed,
            duplicated=link.duplicated,
            corrupted=link.corrupted,
            overflowed=link.overflowed,
        )


@dataclass(frozen=True, slots=True)
class ProxyStatistics:
    """Counters of an impairment proxy (a snapshot).

    Attributes:
        up: clients to target.
        down: target to clients.
        clients: client addresses (UDP) or connections (TCP) now.
        clients_total: client addresses (connections) served since the start.
        clients_refused: UDP client addresses refused at ``max_clients``; TCP connections
            whose target refused them.
    """

    up: LinkCounts = field(default_factory=LinkCounts)
    down: LinkCounts = field(default_factory=LinkCounts)
    clients: int = 0
    clients_total: int = 0
    clients_refused: int = 0


# -- UDP ---------------------------------------------------------------------------------------


class _Upstream(asyncio.DatagramProtocol):
    """One client's socket towards the target."""

    def __init__(self, proxy: UdpImpairmentProxy, client: Any) -> None:
        self.proxy = proxy
        self.client = client
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: list[bytes] | None = []  # sent before the socket was ready
        self.last_seen = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        waiting, self.waiting = self.waiting, None
        for data in waiting or ():
            self.transport.sendto(data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.proxy.from_target(self, data)

    def error_received(self, exc: Exception) -> None:
        pass  # the target's port is closed: the client sees silence, as on a real path

    def send(self, data: bytes) -> None:
        if self.waiting is not None:
            self.waiting.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data)


class UdpImpairmentProxy(asyncio.DatagramProtocol):
    """The client-facing socket of a UDP impairment proxy (see the module docstring)."""

    def __init__(
        self,
        target: tuple[str, int],
        family: int,
        up: LinkProfile,
        down: LinkProfile,
        *,
        seed: int,
        max_clients: int = DEFAULT_PROXY_CLIENTS,
        idle_timeout: float = DEFAULT_PROXY_IDLE,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        seeds = SplitMix64(seed)
        self.up = LossyLink(up, seeds.next())
        self.down = LossyLink(down, seeds.next())
        self._target = target
        self._family = family
        self._max_clients = max_clients
        self._idle = idle_timeout
        self._clients: dict[Any, _Upstream] = {}
        self._total = self._refused = 0
        self._transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._sweeper = self._loop.call_later(self._idle / 2, self._sweep)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        upstream = self._clients.get(addr)
        if upstream is None:
            upstream = self._open(addr)
            if upstream is None:
                return
        now = upstream.last_seen = self._loop.time()
        self._deliver(self.up.transmit(data, now), upstream.send)

    def error_received(self, exc: Exception) -> None:
        pass  # a client went away; its upstream socket idles out

    def from_target(self, upstream: _Upstream, data: bytes) -> None:
        transport, client = self._transport, upstream.client
        if transport is None or transport.is_closing():
            return
        now = upstream.last_seen = self._loop.time()
        self._deliver(self.down.transmit(data, now), lambda d: transport.sendto(d, client))

    def _deliver(self, copies: list[tuple[float, bytes]], send: Callable[[bytes], None]) -> None:
        for arrival, copy in copies:
            self._loop.call_at(arrival, self._send_unless_closed, send, copy)

    def _send_unless_closed(self, send: Callable[[bytes], None], data: bytes) -> None:
        if not self._closed:
            send(data)

    def _open(self, client: Any) -> _Upstream | None:
        if len(self._clients) >= self._max_clients:
            self._refused += 1
            return None
        upstream = _Upstream(self, client)
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect(self._target)
        except OSError:
            sock.close()
            self._refused += 1
            return None
        self._clients[client] = upstream
        self._total += 1
        self._loop.create_task(self._loop.create_datagram_endpoint(lambda: upstream, sock=sock))
        return upstream

    def _sweep(self) -> None:
        deadline = self._loop.time() - self._idle
        for client, upstream in list(self._clients.items()):
            if upstream.last_seen < deadline:
                del self._clients[client]
                if upstream.transport is not None:
                    upstream.transport.close()
        self._sweeper = self._loop.call_later(self._idle / 2, self._sweep)

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            up=LinkCounts.of(self.up),
            down=LinkCounts.of(self.down),
            clients=len(self._clients),
            clients_total=self._total,
            clients_refused=self._refused,
        )

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for upstream in self._clients.values():
            if upstream.transport is not None:
                upstream.transport.close()
            upstream.waiting = None
        self._clients.clear()
        if self._transport is not None:
            self._transport.close()


# -- TCP ---------------------------------------------------------------------------------------


class _Direction:
    """Bytes from one side, written to the other after the link's delay, in order."""

    def __init__(self, proxy: TcpImpairmentProxy, link: _TcpLink) -> None:
        self.proxy = proxy
        self.link = link
        self.source: asyncio.Transport | None = None
        self.sink: asyncio.Transport | None = None
        self.held = 0
        self.last_arrival = 0.0
        self.source_done = False

    def feed(self, data: bytes) -> None:
        loop = self.proxy.loop
        now = loop.time()
        self.link.sent += 1
        profile = self.link.profile
        jitter = profile.jitter * self.link.rng.random() if profile.jitter else 0.0
        arrival = max(now + profile.delay + jitter, self.last_arrival)
        self.last_arrival = arrival
        self.held += len(data)
        if self.held > TCP_BUFFER and self.source is not None:
            self.source.pause_reading()
        loop.call_at(arrival, self._write, data)

    def _write(self, data: bytes) -> None:
        self.held -= len(data)
        if self.sink is not None and not self.sink.is_closing():
            self.sink.write(data)
        source = self.source
        if self.held <= TCP_BUFFER // 2 and source is not None and not source.is_closing():
            source.resume_reading()
        if self.held == 0 and self.source_done:
            self._finish()

    def eof(self) -> None:
        self.source_done = True
        if self.held == 0:
            self._finish()

    def _finish(self) -> None:
        sink = self.sink
        if sink is not None and not sink.is_closing() and sink.can_write_eof():
            sink.write_eof()


class _TcpSide(asyncio.Protocol):
    def __init__(
        self, outgoing: _Direction, incoming: _Direction, on_lost: Callable[[], None]
    ) -> None:
        self.outgoing = outgoing  # what this side sends
        self.incoming = incoming  # what this side receives
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.wait_for_peer = False  # the client: not read until the target is connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.outgoing.source = self.transport
        self.incoming.sink = self.transport
        if self.wait_for_peer:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.outgoing.feed(data)

    def eof_received(self) -> bool:
        self.outgoing.eof()
        return True  # the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost()


class TcpImpairmentProxy:
    """Accepts clients, connects each to the target, and delays what flows (see above)."""

    def __init__(
        self, target: tuple[str, int], up: LinkProfile, down: LinkProfile, *, seed: int
    ) -> None:
        self.loop = asyncio.get_running_loop()
        seeds = SplitMix64(seed)
        self.up = _TcpLink(up, seeds.next())
        self.down = _TcpLink(down, seeds.next())
        self._target = target
        self._open: set[asyncio.Transport] = set()
        self._total = self._refused = 0

    def client_connected(self) -> asyncio.Protocol:
        """A protocol for an accepted client; the target connection is opened for it."""
        up, down = _Direction(self, self.up), _Direction(self, self.down)
        client = _TcpSide(up, down, lambda: self._lost(client, target))
        target = _TcpSide(down, up, lambda: self._lost(target, client))
        client.wait_for_peer = True
        self._total += 1
        self.loop.create_task(self._connect(client, target))
        return client

    async def _connect(self, client: _TcpSide, target: _TcpSide) -> None:
        try:
            await self.loop.create_connection(lambda: target, *self._target)
        except OSError:
            self._refused += 1
            if client.transport is not None:
                client.transport.abort()
            return
        for side in (client, target):
            if side.transport is not None:
                self._open.add(side.transport)
        if client.transport is not None and not client.transport.is_closing():
            client.transport.resume_reading()

    def _lost(self, side: _TcpSide, other: _TcpSide) -> None:
        if side.transport is not None:
            self._open.discard(side.transport)
        if other.transport is not None and not other.transport.is_closing():
            other.transport.close()

    def statistics(self) -> ProxyStatistics:
        return ProxyStatistics(
            up=LinkCounts(received=self.up.sent),
            down=LinkCounts(received=self.down.sent),
            clients=len(self._open) // 2,
            clients_total=self._total,
            clients_refused=self._refused,
        )

    def close(self) -> None:
        for transport in list(self._open):
            transport.abort()
        self._open.clear()


class _TcpLink:
    """The delay and jitter of one TCP direction, with a seeded generator."""

    def __init__(self, profile: LinkProfile, seed: int) -> None:
        self.profile = profile
        self.rng = SplitMix64(seed)
        self.sent = 0
