"""Reliable UDP: serve_reliable_udp / open_reliable_udp_server and connect_reliable_udp.

Handlers get the same ``MessageStream`` as over TCP: each connection is a
``ReliableTransport`` (``aio/reliable.py``) under the ``StreamProtocol`` that carries TCP
connections, and the server is netlib's ``Server`` (handler tasks, deadlines, memory
budget, graceful shutdown, counters) fed by one ``ReliableEndpoint`` instead of an accept
loop. See docs/reliable-udp.md.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from typing_extensions import Unpack

from netlib.aio.reliable import (
    HANDSHAKE_RATE,
    SERVER_HANDSHAKE_RATE,
    ReliableEndpoint,
    ReliableTransport,
)
from netlib.aio.sockets import (
    DatagramSocketOptions,
    datagram_peers,
    open_datagram_socket,
    open_dual_stack_datagram_socket,
)
from netlib.aio.stream import StreamProtocol
from netlib.errors import PeerTimedOut
from netlib.sansio.budget import DEFAULT_MEMORY_BUDGET
from netlib.sansio.framing import Framing, framing_from_name
from netlib.sansio.reliable.connection import ReliableConfig
from netlib.sansio.reliable.endpoint import DEFAULT_MAX_SESSIONS, DEFAULT_MAX_SESSIONS_PER_HOST
from netlib.sansio.stream import DEFAULT_READ_LIMIT, StreamLimits
from netlib.server import (
    DEFAULT_FIRST_FRAME_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_SHUTDOWN_GRACE,
    ProtocolFactory,
    Server,
    _Config,
)
from netlib.streams import DEFAULT_CLOSE_TIMEOUT, Handler, MessageStream

__all__ = [
    "DEFAULT_RUDP_WRITE_HIGH",
    "DEFAULT_RUDP_WRITE_LOW",
    "ReliableConfig",
    "ReliableUDPServer",
    "ReliableUDPServerStatistics",
    "connect_reliable_udp",
    "open_reliable_udp_server",
    "serve_reliable_udp",
]

DEFAULT_RUDP_WRITE_HIGH: Final = 2 * 1024 * 1024
"""Bytes sent and not yet acknowledged (plus what waits for the connection's send buffer)
above which ``send()`` waits: the peer's default receive window (``ReliableConfig``'s
``receive_buffer``), so a bulk sender keeps the path full."""
DEFAULT_RUDP_WRITE_LOW: Final = 1024 * 1024
"""Bytes below which waiting senders resume: half of ``DEFAULT_RUDP_WRITE_HIGH``, so that
a resumed sender has its next datagrams out before the peer has read what is in flight
(at a quarter, 1 MiB / 256 KiB, both processes of a loopback transfer sat idle 13-23 % of
the time and it ran 20 % slower: benchmarks/README.md, "The sender's resume mark")."""
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds ``connect_reliable_udp`` waits for the handshake."""


@dataclass(frozen=True, slots=True)
class ReliableUDPServerStatistics:
    """Counters of a reliable-UDP server since it started (a snapshot).

    Attributes:
        accepted: connections made (handshakes completed) and served.
        active: connections open now.
        timeouts: connections ended by a deadline (the stream's, or the peer fell silent).
        resets: connections the peer closed with an error, or lost otherwise.
        handler_errors: handlers that raised an unexpected exception.
        protocol_errors: connections closed for a malformed or oversized message (a line
            over the framing's limit; a message whose echo is too large to send).
        aborted_at_shutdown: connections still open when the shutdown grace ended.
        datagrams_sent, datagrams_received: by every connection (not the handshakes).
        retransmissions: fragments sent again.
        spurious_retransmissions: fragments acknowledged twice (the copy was not needed).
        losses_detected: packets declared lost.
        smoothed_rtt: the mean smoothed RTT of the open connections (seconds; 0: none).
        min_rtt: the smallest RTT seen on any connection (seconds; 0: none).
        cookies_sent: handshake cookies sent (a HELLO from an address not yet verified).
        handshakes_refused: verified HELLOs refused because the server or host was full.
        corrupt_dropped: datagrams whose checksum or version failed.
        unknown_dropped: datagrams for no connection (or from the wrong address).
        rate_limited: connection attempts dropped by the per-source or the server-wide
            rate limit.
        send_dropped: datagrams the socket's send buffer refused (resent like losses).
        datagram_size: the largest datagram size (bytes) a connection reached by path MTU
            discovery (1,200 until a probe proves more; ``ReliableConfig.max_datagram``).
    """

    accepted: int
    active: int
    timeouts: int
    resets: int
    handler_errors: int
    protocol_errors: int
    aborted_at_shutdown: int
    datagrams_sent: int
    datagrams_received: int
    retransmissions: int
    spurious_retransmissions: int
    losses_detected: int
    smoothed_rtt: float
    min_rtt: float
    cookies_sent: int
    handshakes_refused: int
    corrupt_dropped: int
    unknown_dropped: int
    rate_limited: int
    send_dropped: int
    datagram_size: int


class ReliableUDPServer:
    """A running reliable-UDP server (from ``open_reliable_udp_server``).

    ``close()`` aborts every connection at once; ``shutdown(grace)`` stops accepting, ends
    each connection's input, lets handlers finish within ``grace`` and closes each
    connection cleanly (its data delivered, CLOSE acknowledged), then aborts the rest.
    """

    def __init__(
        self, server: Server, endpoint: ReliableEndpoint, addresses: list[Any] | None = None
    ) -> None:
        self._server = server
        self._endpoint = endpoint
        self.addresses: list[Any] = addresses or [endpoint.sockname]
        """The bound address, with the real port when bound to port 0; for a dual-stack
        socket (``host=None``) IPv4's and IPv6's every-interface addresses."""

    def statistics(self) -> ReliableUDPServerStatistics:
        """Return a snapshot of the counters."""
        served = self._server.statistics()
        endpoint = self._endpoint
        totals = endpoint.totals
        core = endpoint.core
        assert core is not None
        sent, received, retransmitted, spurious, losses = (
            totals.datagrams_sent,
            totals.datagrams_received,
            totals.retransmissions,
            totals.spurious_retransmissions,
            totals.losses_detected,
        )
        rtts: list[float] = []
        min_rtt = totals.min_rtt
        datagram_size = totals.datagram_size
        for conn in endpoint.connections():
            stats = conn.statistics()
            sent += stats.datagrams_sent
            received += stats.datagrams_received
            retransmitted += stats.retransmissions
            spurious += stats.spurious_retransmissions
            losses += stats.losses_detected
            datagram_size = max(datagram_size, stats.datagram_size)
            if stats.min_rtt:
                rtts.append(stats.smoothed_rtt)
                min_rtt = stats.min_rtt if not min_rtt else min(min_rtt, stats.min_rtt)
        return ReliableUDPServerStatistics(
            accepted=served.accepted,
            active=served.active,
            timeouts=served.timeouts,
            resets=served.resets,
            handler_errors=served.handler_errors,
            protocol_errors=served.protocol_errors,
            aborted_at_shutdown=served.aborted_at_shutdown,
            datagrams_sent=sent,
            datagrams_received=received,
            retransmissions=retransmitted,
            spurious_retransmissions=spurious,
            losses_detected=losses,
            smoothed_rtt=sum(rtts) / len(rtts) if rtts else 0.0,
            min_rtt=min_rtt,
            cookies_sent=core.cookies_sent,
            handshakes_refused=core.refused_full + core.refused_host_full,
            corrupt_dropped=core.corrupt_dropped,
            unknown_dropped=core.unknown_dropped + core.small_hello_dropped,
            rate_limited=totals.rate_limited,
            send_dropped=endpoint.send_dropped,
            datagram_size=datagram_size,
        )

    @property
    def is_serving(self) -> bool:
        """True until ``close()`` or ``shutdown()`` is called."""
        return self._server.is_serving

    def close(self) -> None:
        """Stop accepting and abort every connection now (one CLOSE to each peer)."""
        self._endpoint.accepting = False
        self._server.close()
        self._endpoint.close()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let handlers finish within ``grace`` seconds, then abort.

        Returns within ``grace`` plus ``CANCEL_TIMEOUT`` seconds whatever peers and
        handlers do.
        """
        self._endpoint.accepting = False
        try:
            await self._server.shutdown(grace)
        finally:
            self._endpoint.close()
            await self._endpoint.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until every connection task has ended and the socket is closed."""
        await self._server.wait_closed()
        await self._endpoint.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancel this to stop waiting)."""
        await self._server.serve_forever()

    def __repr__(self) -> str:
        return f"<ReliableUDPServer addresses={self.addresses!r}>"


def _accept_with(server_of: Callable[[], Server]) -> Callable[[ReliableTransport], None]:
    def accept(transport: ReliableTransport) -> None:
        server = server_of()
        protocol = server.new_protocol()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        server.serve_connection(protocol)

    return accept


@asynccontextmanager
async def open_reliable_udp_server(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    protocol: ProtocolFactory | None = None,
    framing: Framing | str = "raw",
    config: ReliableConfig | None = None,
    max_connections: int = DEFAULT_MAX_SESSIONS,
    max_connections_per_host: int = DEFAULT_MAX_SESSIONS_PER_HOST,
    handshake_rate: float = HANDSHAKE_RATE,
    server_handshake_rate: float = SERVER_HANDSHAKE_RATE,
    first_frame_timeout: float | None = DEFAULT_FIRST_FRAME_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    message_timeout: float | None = None,
    send_timeout: float | None = None,
    max_memory: int | None = DEFAULT_MEMORY_BUDGET,
    write_high: int = DEFAULT_RUDP_WRITE_HIGH,
    write_low: int = DEFAULT_RUDP_WRITE_LOW,
    read_limit: int = DEFAULT_READ_LIMIT,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> AsyncIterator[ReliableUDPServer]:
    """Serve ``handler`` over reliable UDP for the duration of the ``async with``.

    Every connection shares one UDP socket; each runs ``handler`` with a ``MessageStream``,
    as ``open_tcp_server`` does (each ``send()`` is one message, delivered once, in order).

    Args:
        handler: ``async def handler(stream: MessageStream)``, run once per connection.
        host: address to bind (default loopback). None binds every interface, IPv4 and IPv6,
            on one dual-stack socket (IPv4 peers appear as ``::ffff:a.b.c.d``; IPv4 alone
            where the platform has no dual-stack sockets), so one core, one set of caps and
            one handshake limiter serve both.
        port: UDP port (0 picks a free one: see ``addresses``).
        protocol: with ``handler=None``, a ``StreamProtocol`` factory (as for
            ``open_tcp_server``) that serves each connection itself.
        framing: ``"raw"`` (default: one message per ``send()``), ``"line"``, ``"length"``
            or a ``Framing`` object, applied to the bytes the messages carry.
        config: the reliable connections' knobs (``ReliableConfig``: ack delay, idle
            timeout, keepalive, buffers, largest message, largest datagram).
        max_connections: connections at once (verified handshakes beyond it are refused).
        max_connections_per_host: connections from one IP address at once.
        handshake_rate: connection attempts one source address may make per second; more
            are dropped unread.
        server_handshake_rate: connection attempts all sources together may make per
            second; more are dropped unread, so that a flood of them from many addresses
            cannot delay the established connections.
        first_frame_timeout, idle_timeout, message_timeout, send_timeout: the stream
            deadlines, as for ``open_tcp_server``.
        max_memory: bytes all connections together may hold in user space (None: no bound).
        write_high, write_low: unacknowledged bytes above which ``send()`` waits, and below
            which it resumes.
        read_limit: received bytes not yet taken by the handler above which the connection
            stops taking messages (flow control then holds the sender).
        shutdown_grace: grace period of the shutdown done when the block exits.

    Yields:
        The running ``ReliableUDPServer``. Leaving the block shuts it down gracefully.
    """
    server_config = _Config.serving(
        "open_reliable_udp_server",
        handler,
        protocol,
        framing,
        limits=StreamLimits(
            first_frame_timeout=first_frame_timeout,
            idle_timeout=idle_timeout,
            message_timeout=message_timeout,
            send_timeout=send_timeout,
            write_high=write_high,
            write_low=write_low,
            read_limit=read_limit,
        ),
        ssl=None,
        tls_handshake_timeout=0.0,
        max_connections=max_connections,
        max_connections_per_host=None,
        keepalive=None,
        max_memory=max_memory,
        shutdown_grace=shutdown_grace,
    )
    server = Server(server_config, [])
    endpoint = ReliableEndpoint(
        config or ReliableConfig(),
        on_accept=_accept_with(lambda: server),
        max_sessions=max_connections,
        max_sessions_per_host=max_connections_per_host,
        handshake_rate=handshake_rate,
        server_handshake_rate=server_handshake_rate,
    )
    addresses: list[Any] | None = None
    try:
        sock = open_dual_stack_datagram_socket(port) if host is None else None
        if sock is None:
            local = (host or "0.0.0.0", port)
            sock = await open_datagram_socket(DatagramSocketOptions(local=local))
        else:
            bound = sock.getsockname()[1]
            addresses = [("0.0.0.0", bound), ("::", bound, 0, 0)]
        endpoint.open(sock)
    except BaseException:
        server.close()
        raise
    rudp = ReliableUDPServer(server, endpoint, addresses)
    try:
        yield rudp
    finally:
        await rudp.shutdown()


class ReliableUDPServerOptions(TypedDict, total=False):
    """The keyword options of ``open_reliable_udp_server``, accepted by
    ``serve_reliable_udp`` too."""

    protocol: ProtocolFactory | None
    framing: Framing | str
    config: ReliableConfig | None
    max_connections: int
    max_connections_per_host: int
    handshake_rate: float
    server_handshake_rate: float
    first_frame_timeout: float | None
    idle_timeout: float | None
    message_timeout: float | None
    send_timeout: float | None
    max_memory: int | None
    write_high: int
    write_low: int
    read_limit: int
    shutdown_grace: float


async def serve_reliable_udp(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    **options: Unpack[ReliableUDPServerOptions],
) -> None:
    """Serve ``handler`` over reliable UDP until cancelled; then shut down gracefully.

    Takes the same arguments as ``open_reliable_udp_server``.
    """
    async with open_reliable_udp_server(handler, host, port, **options) as server:
        await server.serve_forever()


@asynccontextmanager
async def connect_reliable_udp(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    framing: Framing | str = "raw",
    config: ReliableConfig | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    idle_timeout: float | None = None,
    write_high: int = DEFAULT_RUDP_WRITE_HIGH,
    write_low: int = DEFAULT_RUDP_WRITE_LOW,
    read_limit: int = DEFAULT_READ_LIMIT,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> AsyncIterator[MessageStream]:
    """Connect to a reliable-UDP server; yield a ``MessageStream`` for the ``async with``.

    Leaving the block closes the connection cleanly (what was sent is delivered first,
    within ``close_timeout`` seconds) and the socket. A name's addresses are tried in
    turn, as a TCP client does: one whose port is closed passes to the next.

    Raises:
        ConnectionRefusedError: the port is closed (ICMP; at every address) or the
            server is full.
        PeerTimedOut: no handshake within ``connect_timeout`` seconds.
        OSError: the name does not resolve, or the socket cannot be made.
    """
    endpoint, transport = await _handshake(
        await datagram_peers(host, port), config or ReliableConfig(), connect_timeout
    )
    try:
        limits = StreamLimits(
            idle_timeout=idle_timeout,
            write_high=write_high,
            write_low=write_low,
            read_limit=read_limit,
        )
        protocol = StreamProtocol(framing_from_name(framing), limits)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        stream = MessageStream(protocol, close_timeout=close_timeout)
        try:
            yield stream
        finally:
            await stream.aclose()
    finally:
        endpoint.close()
        await endpoint.wait_closed()


async def _handshake(
    peers: list[tuple[str, int]], config: ReliableConfig, connect_timeout: float
) -> tuple[ReliableEndpoint, ReliableTransport]:
    """Connect to the first of ``peers`` that answers, as a TCP client tries each address
    of a name: an address whose port is closed (ICMP) passes to the next; a server's
    refusal (full), or silence until ``connect_timeout`` (for them all), ends it. Returns
    the open endpoint and its connection."""
    deadline = asyncio.get_running_loop().time() + connect_timeout
    for index, peer in enumerate(peers):
        endpoint = ReliableEndpoint(config)
        try:
            sock = await open_datagram_socket(DatagramSocketOptions(remote=peer))
            endpoint.open(sock)
            transport = endpoint.connect(sock.getpeername())
            try:
                async with asyncio.timeout_at(deadline):
                    await transport.connected  # type: ignore[misc]
            except TimeoutError:
                raise PeerTimedOut(f"no handshake within {connect_timeout}s") from None
        except BaseException as exc:
            endpoint.close()
            await endpoint.wait_closed()
            port_closed = isinstance(exc, ConnectionRefusedError) and exc.errno is not None
            if not port_closed or index == len(peers) - 1:  # the server said no, or last
                raise
            continue
        return endpoint, transport
    raise OSError(f"no address to connect to ({len(peers)} resolved)")
