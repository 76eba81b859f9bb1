"""``EchoStreamProtocol``: the stream echo as callbacks, served by ``open_tcp_server`` and
``open_reliable_udp_server`` through ``protocol=``, on both loops."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

import netlib
from netlib import EchoStreamProtocol, EndOfStream, MessageStream, UpperEchoStreamProtocol
from netlib.aio.stream import StreamProtocol
from netlib.sansio.stream import StreamState
from tests.helpers import wait_until

TRANSPORTS = ["tcp", "rudp"]


@asynccontextmanager
async def echo_server(
    transport: str, protocol: Callable[..., StreamProtocol], **options: Any
) -> AsyncIterator[tuple[Any, Callable[[], AbstractAsyncContextManager[MessageStream]]]]:
    """A server of ``protocol`` on loopback, and a function that connects a line client."""
    if transport == "tcp":
        opened: Any = netlib.open_tcp_server(None, protocol=protocol, framing="line", **options)
        connect: Any = netlib.connect_tcp
    else:
        opened = netlib.open_reliable_udp_server(
            None, protocol=protocol, framing="line", **options
        )
        connect = netlib.connect_reliable_udp
    async with opened as server:
        host, port = server.addresses[0][:2]
        yield server, lambda: connect(host, port, framing="line")


def served_protocols(server: Any) -> list[StreamProtocol]:
    """The protocols of a server's open connections."""
    inner = getattr(server, "_server", server)  # a ReliableUDPServer wraps a Server
    return list(inner._connections.values())


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("protocol", "reply"),
    [(EchoStreamProtocol, bytes), (UpperEchoStreamProtocol, bytes.upper)],
    ids=["echo", "upper"],
)
async def test_each_line_comes_back_as_the_handler_would_send_it(
    transport: str, protocol: type[EchoStreamProtocol], reply: Callable[[bytes], bytes]
) -> None:
    lines = [b"hello", b"", b"Mixed Case 123", b"x" * 5000, "\u00e9t\u00e9".encode()]
    async with echo_server(transport, protocol) as (server, connect):
        async with connect() as stream:
            for line in lines:  # one at a time
                await stream.send(line)
                assert await stream.receive() == reply(line)
            for line in lines:  # all at once: the replies of one read go out together
                await stream.send(line)
            assert [await stream.receive() for _ in lines] == [reply(x) for x in lines]
        await wait_until(lambda: server.statistics().active == 0, timeout=5.0)
        stats = server.statistics()
    assert stats.accepted == 1
    assert stats.handler_errors == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_peer_that_does_not_read_its_echoes_is_held_back_and_loses_nothing(
    transport: str,
) -> None:
    """Writing pauses, the messages wait in the queue, reading stops at the read limit and
    the peer's sends wait; once it reads, every echo comes, in order."""
    read_limit = 64 * 1024
    count = 32_000
    line = b"z" * 1000
    async with echo_server(transport, EchoStreamProtocol, read_limit=read_limit) as (
        server,
        connect,
    ):
        async with connect() as stream:

            async def offer() -> None:
                for i in range(count):
                    await stream.send(b"%06d" % i + line)

            offering = asyncio.create_task(offer())
            await wait_until(lambda: bool(served_protocols(server)), timeout=5.0)
            protocol = served_protocols(server)[0]
            await wait_until(lambda: protocol.reading_paused, timeout=10.0)
            assert protocol.write_paused
            assert protocol.conn.queued <= read_limit + 256 * 1024
            assert not offering.done()  # held back: 32 MB offered, more than every buffer holds
            for i in range(count):
                assert await stream.receive() == b"%06d" % i + line
            await offering
        await wait_until(lambda: server.statistics().active == 0, timeout=5.0)
        assert server.statistics().handler_errors == 0


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_graceful_shutdown_ends_the_stream_cleanly(transport: str) -> None:
    """The peer gets its echoes, then the end of the stream (over TCP: EOF, and what it
    sends meanwhile is read and dropped until it closes, never met by a reset)."""
    async with echo_server(transport, EchoStreamProtocol) as (server, connect):
        async with connect() as stream:
            await stream.send(b"before")
            assert await stream.receive() == b"before"
            shutting_down = asyncio.create_task(server.shutdown(grace=5.0))
            async with asyncio.timeout(5.0):
                with pytest.raises(EndOfStream):
                    await stream.receive()
        async with asyncio.timeout(5.0):
            await shutting_down
        assert server.statistics().aborted_at_shutdown == 0
        assert server.statistics().active == 0


async def test_over_tcp_input_sent_during_the_shutdown_is_dropped_not_reset() -> None:
    """After the server's EOF the peer may still send: the server reads and drops it until
    the peer closes too, as it does for a handler; a socket closed at once would answer
    with a reset, which the peer sees instead of the end of the stream."""
    loop = asyncio.get_running_loop()
    async with echo_server("tcp", EchoStreamProtocol) as (server, _connect):
        with socket.create_connection(server.addresses[0][:2]) as sock:
            sock.setblocking(False)
            await loop.sock_sendall(sock, b"before\n")
            assert await loop.sock_recv(sock, 100) == b"before\n"
            (protocol,) = served_protocols(server)
            shutting_down = asyncio.create_task(server.shutdown(grace=5.0))
            async with asyncio.timeout(5.0):
                assert await loop.sock_recv(sock, 100) == b""  # the server's EOF
            # the server reads on, dropping what comes, until this peer closes
            assert protocol.conn.state is StreamState.LINGERING
            assert not protocol.lost
            await loop.sock_sendall(sock, b"during the shutdown\n")
            assert not shutting_down.done()
        async with asyncio.timeout(5.0):
            await shutting_down
        assert protocol.lost
        assert server.statistics().aborted_at_shutdown == 0


async def test_a_line_whose_echo_is_too_large_to_send_is_a_counted_protocol_error() -> None:
    """Over reliable UDP a line may come in several messages and be longer than one
    message may be (``max_message``): its echo cannot be sent, the connection is closed
    and counted, and the server goes on."""
    config = netlib.ReliableConfig(max_message=1000)
    async with netlib.open_reliable_udp_server(
        None, protocol=EchoStreamProtocol, framing="line", config=config
    ) as server:
        port = server.addresses[0][1]
        async with netlib.connect_reliable_udp("127.0.0.1", port) as stream:
            await stream.send(b"a" * 900)
            await stream.send(b"b" * 900 + b"\n")
            with pytest.raises(netlib.BrokenResourceError):
                async with asyncio.timeout(5.0):
                    await stream.receive()
        async with netlib.connect_reliable_udp("127.0.0.1", port) as stream:
            await stream.send(b"short\n")
            assert await stream.receive() == b"short\n"
        await wait_until(lambda: server.statistics().active == 0, timeout=5.0)
        assert server.statistics().protocol_errors == 1
