"""TCP servers and clients end to end on real loopback sockets, on both loops."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import ssl
from collections.abc import Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import trustme

import netlib
from netlib import MessageStream, Server
from netlib.aio.stream import StreamProtocol
from netlib.server import _Counters
from tests.helpers import address_of, open_raw, reset, wait_for_eof, wait_until

FRAMINGS = ["raw", "line", "length"]


async def test_echo_round_trip_in_every_framing() -> None:
    for framing in FRAMINGS:
        async with (
            netlib.open_tcp_server(netlib.echo_handler, framing=framing) as server,
            netlib.connect_tcp(*address_of(server), framing=framing) as stream,
        ):
            await stream.send(b"hello")
            assert await stream.receive() == b"hello"


async def test_upper_echo_line_framing_with_crlf_client() -> None:
    async with netlib.open_tcp_server(netlib.upper_echo_handler, framing="line") as server:
        reader, writer = await open_raw(*address_of(server))
        writer.write(b"hello\r\nsticky\npack")
        writer.write(b"ets\n")
        assert [await reader.readline() for _ in range(3)] == [
            b"HELLO\n",
            b"STICKY\n",
            b"PACKETS\n",
        ]
        writer.close()
        await writer.wait_closed()


async def test_length_prefixed_binary_messages_keep_boundaries() -> None:
    messages = [b"", b"\n\r\x00", os.urandom(70_000), b"x" * 5]
    async with (
        netlib.open_tcp_server(netlib.echo_handler, framing="length") as server,
        netlib.connect_tcp(*address_of(server), framing="length") as stream,
    ):
        for message in messages:
            await stream.send(message)
        assert [await stream.receive() for _ in messages] == messages


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_accepted_connections_send_small_replies_without_nagle_delay(host: str) -> None:
    # Nagle's algorithm holds a small write back while earlier data is unacknowledged: on a
    # chat fan-out that tripled delivery latency. Both loops set TCP_NODELAY, asyncio only
    # on sockets whose protocol number says TCP.
    async def report_nodelay(stream: MessageStream) -> None:
        sock = stream.socket
        assert sock is not None
        await stream.send(b"%d" % sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async with (
        netlib.open_tcp_server(report_nodelay, host, framing="line") as server,
        netlib.connect_tcp(host, server.addresses[0][1], framing="line") as stream,
    ):
        assert int(await stream.receive()) != 0


async def test_a_server_takes_a_handler_or_a_protocol_factory_not_both() -> None:
    for handler, protocol in [(None, None), (netlib.echo_handler, StreamProtocol)]:
        with pytest.raises(TypeError, match="handler or a protocol factory"):
            async with netlib.open_tcp_server(handler, protocol=protocol):
                pass


async def test_ipv6_loopback() -> None:
    async with (
        netlib.open_tcp_server(netlib.echo_handler, "::1", framing="line") as server,
        netlib.connect_tcp("::1", server.addresses[0][1], framing="line") as stream,
    ):
        await stream.send(b"six")
        assert await stream.receive() == b"six"
        assert stream.remote_address[0] == "::1"


async def test_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    async with netlib.open_tcp_server(netlib.echo_handler, path=path, framing="line") as server:
        assert server.addresses == [path]
        async with netlib.connect_tcp(path=path, framing="line") as stream:
            await stream.send(b"unix")
            assert await stream.receive() == b"unix"
    assert not Path(path).exists()  # noqa: ASYNC240 (a local stat, no I/O wait)


async def test_tls_echo() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with (
        netlib.open_tcp_server(netlib.echo_handler, framing="line", ssl=server_context) as server,
        netlib.connect_tcp(
            *address_of(server), framing="line", ssl=client_context, server_hostname="localhost"
        ) as stream,
    ):
        await stream.send(b"secret")
        assert await stream.receive() == b"secret"
        assert stream.extra("ssl_object") is not None


async def test_tls_handshake_failure_is_counted_and_server_keeps_serving() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    async with netlib.open_tcp_server(netlib.echo_handler, ssl=server_context) as server:
        reader, writer = await open_raw(*address_of(server))
        writer.write(b"this is not a TLS client hello\r\n\r\n")
        assert await wait_for_eof(reader) == b""
        writer.close()
        await writer.wait_closed()
        assert server.statistics().tls_failures == 1


async def test_many_clients_at_once_with_some_vanishing() -> None:
    """50 clients echo concurrently while others reset or leave without a goodbye."""

    async def good_client(host: str, port: int, n: int) -> list[bytes]:
        async with netlib.connect_tcp(host, port, framing="line") as stream:
            for i in range(20):
                await stream.send(b"%d-%d" % (n, i))
            return [await stream.receive() for _ in range(20)]

    async def vanishing_client(host: str, port: int, n: int) -> None:
        _reader, writer = await open_raw(host, port)
        writer.write(b"partial line without end" if n % 2 else b"hello\n" * 1000)
        await writer.drain()
        if n % 2:
            reset(writer)
        else:
            writer.close()  # EOF without reading the replies
        await writer.wait_closed()

    async with netlib.open_tcp_server(netlib.echo_handler, framing="line") as server:
        host, port = address_of(server)
        good = [good_client(host, port, n) for n in range(50)]
        bad = [vanishing_client(host, port, n) for n in range(20)]
        results = await asyncio.gather(*good, *bad)
        for n, replies in enumerate(results[:50]):
            assert replies == [b"%d-%d" % (n, i) for i in range(20)]
        assert server.statistics().accepted == 70


async def test_handler_exception_is_logged_counted_and_isolated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(stream: MessageStream) -> None:
        async for message in stream:
            if message == b"boom":
                raise RuntimeError("handler bug")
            await stream.send(message)

    async with netlib.open_tcp_server(handler, framing="line") as server:
        async with netlib.connect_tcp(*address_of(server), framing="line") as other:
            async with netlib.connect_tcp(*address_of(server), framing="line") as victim:
                await victim.send(b"boom")
                with pytest.raises(netlib.EndOfStream):
                    await victim.receive()
            await other.send(b"still here")
            assert await other.receive() == b"still here"
        assert server.statistics().handler_errors == 1
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("failure", ["raises", "not awaitable"])
async def test_handler_that_fails_to_start_is_counted_and_closed(
    failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(stream: MessageStream) -> Any:
        if failure == "raises":
            raise RuntimeError("handler bug")
        return 42  # not awaitable

    async with netlib.open_tcp_server(handler, framing="line") as server:
        reader, writer = await open_raw(*address_of(server))
        assert await wait_for_eof(reader) == b""  # closed, not left open and forgotten
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.statistics().active == 0)
        assert server.statistics().handler_errors == 1
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


async def test_context_set_when_a_handler_starts_stays_with_its_connection() -> None:
    seen: list[str] = []

    class Handler:
        def __init__(self) -> None:
            self.count = 0

        def __call__(self, stream: MessageStream) -> Coroutine[Any, Any, None]:
            seen.append(REQUEST_ID.get())  # what the previous connection left, if anything
            self.count += 1
            REQUEST_ID.set(f"conn-{self.count}")
            return netlib.echo_handler(stream)

    async with netlib.open_tcp_server(Handler(), framing="line") as server:
        for _ in range(3):
            async with netlib.connect_tcp(*address_of(server), framing="line") as stream:
                await stream.send(b"hi")
                assert await stream.receive() == b"hi"
    assert seen == ["", "", ""]


async def test_close_while_a_connection_is_being_set_up_starts_no_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[MessageStream] = []

    async def handler(stream: MessageStream) -> None:
        started.append(stream)
        await asyncio.Event().wait()

    start = Server._start

    async def start_then_close(self: Server, *args: Any) -> bool:
        ok = await start(self, *args)
        self.close()  # the transport is set up, the handler not started yet
        return ok

    monkeypatch.setattr(Server, "_start", start_then_close)
    async with netlib.open_tcp_server(handler, framing="line") as server:
        reader, writer = await open_raw(*address_of(server))
        await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        assert started == []
        assert server.statistics().active == 0
        with contextlib.suppress(ConnectionResetError):  # aborted: EOF or reset
            await reader.read()
        writer.close()


async def test_server_greeting_before_client_speaks() -> None:
    async def greeter(stream: MessageStream) -> None:
        await stream.send(b"welcome")
        await stream.send((await stream.receive()).upper())

    async with (
        netlib.open_tcp_server(greeter, framing="line") as server,
        netlib.connect_tcp(*address_of(server), framing="line") as stream,
    ):
        assert await stream.receive() == b"welcome"
        await stream.send(b"hi")
        assert await stream.receive() == b"HI"
        with pytest.raises(netlib.EndOfStream):
            await stream.receive()


async def test_client_iteration_ends_at_eof_and_errors_after_close() -> None:
    async def two_then_done(stream: MessageStream) -> None:
        await stream.send(b"1")
        await stream.send(b"2")

    async with netlib.open_tcp_server(two_then_done, framing="line") as server:
        async with netlib.connect_tcp(*address_of(server), framing="line") as stream:
            assert [m async for m in stream] == [b"1", b"2"]
        with pytest.raises(netlib.ClosedResourceError):
            await stream.send(b"late")
        with pytest.raises(netlib.ClosedResourceError):
            await stream.receive()
        with pytest.raises(netlib.ClosedResourceError):
            await anext(aiter(stream))


async def test_discard_counts_every_byte_until_the_end_and_keeps_none() -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    counted: list[int] = []
    done: asyncio.Future[tuple[int, int]] = asyncio.get_running_loop().create_future()

    async def sink(stream: MessageStream) -> None:
        first = await stream.receive()  # a message taken the usual way first
        await stream.discard(counted.append)
        done.set_result((len(first), stream.buffered_size))
        await stream.send(b"counted")

    async with netlib.open_tcp_server(sink) as server:
        reader, writer = await open_raw(*address_of(server))
        writer.write(payload)
        writer.write_eof()
        first, _ = await asyncio.wait_for(done, 10)
        assert await asyncio.wait_for(reader.read(), 5) == b"counted"  # replies still go
        writer.close()
        await writer.wait_closed()
    assert first + sum(counted) == len(payload)
    assert max(counted) <= 64 * 1024  # each read's size, as the kernel gave it


async def test_discard_raises_what_ended_the_connection() -> None:
    failed: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def sink(stream: MessageStream) -> None:
        try:
            await stream.discard()
        except netlib.NetlibError as exc:
            failed.set_result(exc)

    async with netlib.open_tcp_server(sink) as server:
        _reader, writer = await open_raw(*address_of(server))
        writer.write(b"x" * 100_000)
        await writer.drain()
        reset(writer)
        assert isinstance(await asyncio.wait_for(failed, 5), netlib.BrokenResourceError)
        await wait_until(lambda: server.statistics().active == 0)
    async with (
        netlib.open_tcp_server(netlib.echo_handler) as server,
        netlib.connect_tcp(*address_of(server)) as stream,
    ):
        await stream.aclose()
        with pytest.raises(netlib.ClosedResourceError):
            await stream.discard()


async def test_client_idle_timeout_ends_a_silent_connection() -> None:
    async def silent(stream: MessageStream) -> None:
        async for _ in stream:  # never answers
            pass

    async with netlib.open_tcp_server(silent, framing="line") as server:
        loop = asyncio.get_running_loop()
        async with netlib.connect_tcp(*address_of(server), idle_timeout=0.2) as stream:
            await stream.send(b"anyone?")
            started = loop.time()
            with pytest.raises(netlib.PeerTimedOut):
                await stream.receive()
            assert 0.15 < loop.time() - started < 0.5  # from the last send, one slot late at most


async def test_connect_refused_raises_oserror() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        async with netlib.connect_tcp("127.0.0.1", port):
            pass


async def test_cancelled_tls_connect_leaks_no_socket() -> None:
    """A server that accepts but never answers the TLS handshake; the connect is cut."""
    silent = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    try:
        port = silent.getsockname()[1]
        for _ in range(5):
            with pytest.raises(TimeoutError):
                async with netlib.connect_tcp(
                    "127.0.0.1", port, ssl=ssl.create_default_context(), connect_timeout=0.05
                ):
                    pass
            accepted.append(silent.accept()[0])
        task = asyncio.ensure_future(_enter_and_hold(port))
        await asyncio.sleep(0)  # let the task start connecting before it is cancelled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        for conn in accepted:
            conn.close()
        silent.close()


async def _enter_and_hold(port: int) -> None:
    async with netlib.connect_tcp("127.0.0.1", port, ssl=ssl.create_default_context()):
        pass


async def test_serve_tcp_runs_until_cancelled() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    task = asyncio.create_task(netlib.serve_tcp(netlib.echo_handler, "127.0.0.1", port))
    for _ in range(200):
        try:
            async with netlib.connect_tcp("127.0.0.1", port) as stream:
                await stream.send(b"up")
                assert await stream.receive() == b"up"
                break
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)  # polling the port until the server binds it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionRefusedError):
        async with netlib.connect_tcp("127.0.0.1", port):
            pass


async def test_echo_protocols_work_with_loop_create_server() -> None:
    loop = asyncio.get_running_loop()
    for factory, expected in [
        (netlib.EchoProtocol, b"mixed Case"),
        (netlib.UpperEchoProtocol, b"MIXED CASE"),
    ]:
        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await open_raw("127.0.0.1", port)
        writer.write(b"mixed Case")
        writer.write_eof()
        assert await wait_for_eof(reader) == expected
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()


def test_every_statistic_but_the_gauges_is_counted() -> None:
    # A statistic the server does not count would read 0 forever, silently.
    counted = {field.name for field in fields(_Counters)}
    reported = {field.name for field in fields(netlib.ServerStatistics)}
    assert reported - counted == {"active", "memory_held"}
    assert counted <= reported
