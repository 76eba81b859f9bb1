"""serve_speedtest / open_speedtest_server, and the client: run_speedtest.

A speed test measures TCP, UDP and netlib's reliable UDP between two hosts, as iperf3 does:
a TCP control connection negotiates each test, then the client (or, with ``reverse``, the
server) sends for the test's duration on one or more streams while the client probes the
round trip on the same protocol. The receiver measures throughput and messages per second,
and for UDP the loss, jitter (RFC 3550) and reordering; UDP is paced to a bitrate so the
loss is the path's, not the sender's. See docs/speedtest.md.

The server listens on one TCP port (control and TCP streams), one UDP port (UDP tests, by
default the same number) and one reliable-UDP port (by default the next number), and runs
``netlib.services.speedtest.SpeedtestService`` on them with netlib's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final

from netlib.aio.datagram import DatagramEndpointProtocol, DatagramLimits
from netlib.aio.sockets import (
    DatagramSocketOptions,
    ask_socket_buffers,
    format_address,
    open_datagram_socket,
    scoped_ip,
)
from netlib.aio.stream import StreamProtocol
from netlib.errors import PeerTimedOut
from netlib.rudp import ReliableUDPServer, connect_reliable_udp, open_reliable_udp_server
from netlib.sansio.framing import RawFraming
from netlib.sansio.speedtest import (
    CONTROL_TIMEOUT,
    DEFAULT_SPEEDTEST_PORT,
    MAX_UDP_SIZE,
    DatagramCounts,
    LatencySummary,
    SpeedtestLimits,
    SpeedtestRequest,
    SpeedtestResult,
    TransferTotals,
)
from netlib.sansio.stream import DEFAULT_WRITE_HIGH, DEFAULT_WRITE_LOW, StreamLimits
from netlib.server import DEFAULT_SHUTDOWN_GRACE, Server, open_tcp_server
from netlib.services.speedtest import (
    SpeedtestService,
    SpeedtestServiceStatistics,
    run_test,
)
from netlib.streams import MessageStream

__all__ = [
    "COLUMNS",
    "DEFAULT_SPEEDTEST_PORT",
    "SPARE_CONNECTIONS",
    "STREAM_WRITE_HIGH",
    "UDP_SOCKET_BUFFER",
    "DatagramCounts",
    "LatencySummary",
    "SpeedtestLimits",
    "SpeedtestRequest",
    "SpeedtestResult",
    "SpeedtestServer",
    "SpeedtestService",
    "SpeedtestServiceStatistics",
    "TransferTotals",
    "format_speedtest_results",
    "open_speedtest_server",
    "rate",
    "run_speedtest",
    "serve_speedtest",
    "table_rows",
]

STREAM_WRITE_HIGH: Final = 4 * 1024 * 1024
"""Bytes a TCP stream of a test may hold unsent before its sender waits, on uvloop (both
ends): with netlib's default 64 KiB each 128 KiB write paused the sender, and the test ran
at a third of the rate. asyncio's transports keep the default: their one send buffer
grows slower to drain past it (measured: 64 KiB 14-17 Gbit/s, 4 MiB 5-7 Gbit/s)."""
UDP_SOCKET_BUFFER: Final = 4 * 1024 * 1024
"""Bytes asked for a UDP test socket's receive and send buffers (``ask_socket_buffers``:
the kernel caps them at ``net.core.rmem_max`` / ``wmem_max`` unless the process has
``CAP_NET_ADMIN``): so the loss measured is the path's, not that of a 200 KiB buffer
behind a receiver that paused for a few milliseconds."""
SPARE_CONNECTIONS: Final = 16
"""Connections a server accepts beyond what its tests can use (``max_tests`` times
``max_parallel`` plus a probe and a control connection each): clients being refused."""


@dataclass
class SpeedtestServer:
    """A running speed-test server (from ``open_speedtest_server``).

    Attributes:
        server: the TCP ``Server`` (control connections and TCP streams).
        rudp: the reliable-UDP server (its streams).
        service: the speed-test service (``statistics()``).
        udp_address: the UDP socket's address (UDP tests).
    """

    server: Server
    rudp: ReliableUDPServer
    service: SpeedtestService
    udp_address: Any

    @property
    def addresses(self) -> list[Any]:
        """The TCP addresses clients connect to."""
        return self.server.addresses

    @property
    def rudp_address(self) -> Any:
        return self.rudp.addresses[0]

    def statistics(self) -> SpeedtestServiceStatistics:
        return self.service.statistics()


def _write_limits() -> tuple[int, int]:
    """The high and low marks of a test's TCP streams on the running loop."""
    if type(asyncio.get_running_loop()).__module__.startswith("uvloop"):
        return STREAM_WRITE_HIGH, STREAM_WRITE_HIGH // 4
    return DEFAULT_WRITE_HIGH, DEFAULT_WRITE_LOW


@asynccontextmanager
async def _datagram_endpoint(
    options: DatagramSocketOptions,
    consumer: Callable[[bytes, Any], bool],
    on_error: Callable[[Exception], None] | None = None,
) -> AsyncIterator[DatagramEndpointProtocol]:
    sock = await open_datagram_socket(options)
    ask_socket_buffers(sock, UDP_SOCKET_BUFFER)
    protocol = DatagramEndpointProtocol(DatagramLimits(max_size=MAX_UDP_SIZE), on_error)
    protocol.consumer = consumer
    try:
        await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol, sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield protocol
    finally:
        protocol.close()
        await protocol.wait_closed()


@asynccontextmanager
async def open_speedtest_server(
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    udp_port: int | None = None,
    rudp_port: int | None = None,
    limits: SpeedtestLimits | None = None,
    max_connections_per_host: int | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> AsyncIterator[SpeedtestServer]:
    """Serve speed tests for the duration of the ``async with``.

    Args:
        host: address or name to bind (default loopback; None: every interface).
        port: TCP port of the control connections and TCP streams (0: a free one).
        udp_port: UDP port of UDP tests (default: ``port``'s number; a free one if 0, or
            if ``port`` is 0 and its number is taken for UDP).
        rudp_port: UDP port of reliable-UDP tests (default: ``port`` + 1; a free one if
            ``port`` is 0).
        limits: what a test may ask for and how many run at once (``SpeedtestLimits``).
        max_connections_per_host: TCP connections one address may hold (default: what its
            tests can use, plus ``SPARE_CONNECTIONS``).
        shutdown_grace: seconds running tests get to finish when the block exits.
    """
    service = SpeedtestService(limits)
    limits = service.limits
    most = limits.max_tests * (limits.max_parallel + 2) + SPARE_CONNECTIONS
    high, low = _write_limits()
    async with contextlib.AsyncExitStack() as stack:
        server = await stack.enter_async_context(
            open_tcp_server(
                service.handle_tcp,
                host,
                port,
                first_frame_timeout=CONTROL_TIMEOUT,
                idle_timeout=None,
                max_connections=most,
                max_connections_per_host=max_connections_per_host or most,
                write_high=high,
                write_low=low,
                shutdown_grace=shutdown_grace,
            )
        )
        bound = server.addresses[0][1]
        where = host if host is not None else ""
        udp_at = (where, bound if udp_port is None else udp_port)
        try:
            udp = await stack.enter_async_context(
                _datagram_endpoint(DatagramSocketOptions(local=udp_at), service.consume)
            )
        except OSError as exc:
            if port or udp_port is not None or exc.errno != errno.EADDRINUSE:
                raise
            # the free TCP port's number is taken for UDP: any free one (a client is told)
            udp = await stack.enter_async_context(
                _datagram_endpoint(DatagramSocketOptions(local=(where, 0)), service.consume)
            )
        service.attach_udp(udp)
        rudp = await stack.enter_async_context(
            open_reliable_udp_server(
                service.handle_rudp,
                where,
                (port and port + 1) if rudp_port is None else rudp_port,
                # twice a full test's: a test's connections drain for about a second after
                # it ends (reliable UDP's closing period), while the next one starts
                max_connections=2 * limits.max_tests * (limits.max_parallel + 1)
                + SPARE_CONNECTIONS,
                first_frame_timeout=CONTROL_TIMEOUT,
                idle_timeout=None,
                shutdown_grace=shutdown_grace,
            )
        )
        assert udp.transport is not None
        udp_address = udp.transport.get_extra_info("sockname")
        service.ports = {"udp": udp_address[1], "rudp": rudp.addresses[0][1]}
        yield SpeedtestServer(server, rudp, service, udp_address)


async def serve_speedtest(
    host: str | None = "127.0.0.1",
    port: int = DEFAULT_SPEEDTEST_PORT,
    *,
    udp_port: int | None = None,
    rudp_port: int | None = None,
    limits: SpeedtestLimits | None = None,
    max_connections_per_host: int | None = None,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
) -> None:
    """Serve speed tests until cancelled; then shut down gracefully.

    Takes the same arguments as ``open_speedtest_server`` (``port`` defaults to
    ``DEFAULT_SPEEDTEST_PORT`` here).
    """
    async with open_speedtest_server(
        host,
        port,
        udp_port=udp_port,
        rudp_port=rudp_port,
        limits=limits,
        max_connections_per_host=max_connections_per_host,
        shutdown_grace=shutdown_grace,
    ) as server:
        await server.server.serve_forever()


# -- the client -------------------------------------------------------------------------------


@asynccontextmanager
async def _connect(host: str, port: int, within: float) -> AsyncIterator[MessageStream]:
    """A raw TCP stream (what ``connect_tcp`` does; the public verbs do not import each
    other), with a bulk sender's write buffer (``STREAM_WRITE_HIGH``)."""
    high, low = _write_limits()
    protocol = StreamProtocol(RawFraming(), StreamLimits(write_high=high, write_low=low))
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(within):
            await loop.create_connection(lambda: protocol, host, port)
    except BaseException:
        protocol.abort()
        raise
    stream = MessageStream(protocol)
    try:
        yield stream
    finally:
        await stream.aclose()


@asynccontextmanager
async def _connect_rudp(host: str, port: int, within: float) -> AsyncIterator[MessageStream]:
    """A reliable-UDP stream, with errors that say which port did not answer."""
    where = format_address((host, port))
    async with contextlib.AsyncExitStack() as stack:
        try:
            stream = await stack.enter_async_context(
                connect_reliable_udp(host, port, connect_timeout=within)
            )
        except ConnectionRefusedError:
            raise ConnectionRefusedError(f"nothing answers on {where} (reliable udp)") from None
        except PeerTimedOut:
            raise PeerTimedOut(f"no reliable-udp handshake with {where} in {within:g} s") from None
        yield stream


async def run_speedtest(
    host: str = "127.0.0.1",
    port: int = DEFAULT_SPEEDTEST_PORT,
    *,
    protocol: str = "tcp",
    duration: float | None = None,
    size: int | None = None,
    bitrate: float | None = None,
    parallel: int = 1,
    reverse: bool = False,
    udp_port: int | None = None,
    rudp_port: int | None = None,
    connect_timeout: float = CONTROL_TIMEOUT,
) -> SpeedtestResult:
    """Run one test against the speed-test server at ``host:port`` and return its result.

    Args:
        host, port: the server's TCP address.
        protocol: ``"tcp"``, ``"udp"`` or ``"rudp"`` (netlib's reliable UDP).
        duration: seconds of sending (default ``DEFAULT_DURATION``).
        size: bytes of each message or datagram (default: the protocol's,
            ``DEFAULT_SIZES``).
        bitrate: bits per second each stream is paced to (default: unpaced for TCP and
            reliable UDP, ``DEFAULT_UDP_BITRATE`` for UDP); 0: unpaced (TCP, reliable UDP).
        parallel: streams at once.
        reverse: the server sends and this client receives.
        udp_port, rudp_port: send UDP or reliable-UDP traffic to this port of ``host``
            instead of the one the server announces (a proxy in front of it).
        connect_timeout: seconds to connect each stream.

    Raises:
        ValueError: the request itself is invalid (an unknown protocol, a duration <= 0).
        RequestRefused: the server refused the test (outside its limits, busy).
        OSError, NetlibError: a connection failed, or the server broke the protocol.
    """
    request = SpeedtestRequest.default(
        protocol,
        duration=duration,
        size=size,
        bitrate=bitrate,
        parallel=parallel,
        reverse=reverse,
    )

    data_host = host  # the address the control connection reached, once it has

    def open_stream(kind: str, at: int) -> contextlib.AbstractAsyncContextManager[MessageStream]:
        if kind == "tcp":
            return _connect(data_host, at or port, connect_timeout)
        return _connect_rudp(data_host, at, connect_timeout)

    def open_datagrams(
        at: int, consumer: Callable[[bytes, Any], bool], on_error: Callable[[Exception], None]
    ) -> contextlib.AbstractAsyncContextManager[DatagramEndpointProtocol]:
        options = DatagramSocketOptions(remote=(data_host, at))
        return _datagram_endpoint(options, consumer, on_error)

    async with _connect(host, port, connect_timeout) as control:
        # a name with several addresses (localhost: ::1, 127.0.0.1): the test's streams
        # and datagrams go where the control connection got through, not to the first
        peer = control.remote_address
        data_host = scoped_ip(peer) if isinstance(peer, tuple) else host
        return await run_test(
            control,
            request,
            open_stream,
            open_datagrams,
            ports={"udp": udp_port, "rudp": rudp_port},
        )


# -- a table ----------------------------------------------------------------------------------

COLUMNS: Final = (
    "proto",
    "sent",
    "received",
    "msgs/s",
    "rtt p50",
    "rtt p99",
    "lost",
    "jitter",
    "reordered",
)
"""The columns of the results table, one row per protocol: throughput sent and received,
messages received per second, the probes' round trips, and for UDP the receiver's loss,
jitter and datagrams out of order."""
_WIDTHS: Final = (5, 11, 11, 7, 8, 8, 13, 8, 9)  # usual values fit: a steady header


def rate(bits_per_second: float) -> str:
    """``14.6 Gbit/s``: three significant digits."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:#.3g} {unit}".replace(". ", " ")
    return f"{bits_per_second:.0f} bit/s"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.2f} ms" if ms >= 1 else f"{ms:.3f} ms"


def table_rows(results: Sequence[SpeedtestResult]) -> list[list[str]]:
    """One row of ``COLUMNS`` per result, as text."""
    rows = []
    for result in results:
        counts = result.datagrams
        rows.append(
            [
                result.protocol,
                rate(result.sent.bits_per_second),
                rate(result.bits_per_second),
                f"{result.messages_per_second:,.0f}",
                _ms(result.latency.p50),
                _ms(result.latency.p99),
                "-"
                if counts is None
                else f"{counts.lost_packets}/{counts.packets} ({counts.lost_percent:.2g}%)",
                "-" if counts is None else _ms(counts.jitter),
                "-" if counts is None else str(counts.out_of_order),
            ]
        )
    return rows


def format_speedtest_results(results: Sequence[SpeedtestResult]) -> str:
    """The results as a plain-text table, one row per protocol (no trailing newline)."""
    rows = [list(COLUMNS), *table_rows(results)]
    widths = [max(least, *(len(row[i]) for row in rows)) for i, least in enumerate(_WIDTHS)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
