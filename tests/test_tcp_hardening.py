"""Hardening of the TCP server against attacks found by independent clients.

Each test names the attack it guards against: log flooding by failing handlers, handlers
that refuse to be cancelled at shutdown, deadline lateness, and one host taking every
connection slot.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from pathlib import Path

import pytest

import netlib
from netlib import MessageStream
from tests.helpers import address_of, open_raw, wait_until

pytestmark = pytest.mark.serial  # deadlines measured against the clock


async def _connect_and_wait_for_close(host: str, port: int) -> None:
    reader, writer = await open_raw(host, port)
    try:
        await reader.read()
    except ConnectionResetError:
        pass
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


# -- log flooding -----------------------------------------------------------------------------


async def test_failing_handlers_log_at_most_about_one_traceback_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    connections = 400

    async def handler(stream: MessageStream) -> None:
        raise RuntimeError("handler bug")

    loop = asyncio.get_running_loop()
    caplog.set_level(logging.ERROR, logger="netlib.server")
    async with netlib.open_tcp_server(handler, framing="line") as server:
        host, port = address_of(server)
        window = asyncio.Semaphore(20)

        async def one() -> None:
            async with window:
                await _connect_and_wait_for_close(host, port)

        start = loop.time()
        async with asyncio.timeout(30):
            await asyncio.gather(*(one() for _ in range(connections)))
        elapsed = loop.time() - start
        assert server.statistics().handler_errors == connections  # every one counted
    lines = [r for r in caplog.records if r.name == "netlib.server"]
    tracebacks = [r for r in lines if r.exc_info]
    assert 1 <= len(tracebacks) <= 1 + elapsed  # at most one a second, plus the first
    assert len(lines) <= len(tracebacks) + 1  # and one summary line at close
    suppressed = [re.search(r"\((\d+) similar suppressed\)", r.getMessage()) for r in lines]
    assert sum(int(m[1]) for m in suppressed if m) + len(tracebacks) == connections


# -- shutdown with a handler that swallows cancellation ---------------------------------------


@pytest.mark.parametrize("stop", ["shutdown", "close"])
async def test_shutdown_returns_in_time_when_a_handler_swallows_cancellation(
    stop: str, caplog: pytest.LogCaptureFixture
) -> None:
    grace = 0.5
    release = asyncio.Event()  # lets the stubborn handler end once the test is done
    started = asyncio.Event()
    handlers: list[asyncio.Task[object]] = []

    async def stubborn(stream: MessageStream) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                pass  # the bug under test: cancellation swallowed, the loop goes on

    loop = asyncio.get_running_loop()
    async with netlib.open_tcp_server(stubborn, framing="line") as server:
        reader, writer = await open_raw(*address_of(server))
        try:
            await started.wait()
            start = loop.time()
            async with asyncio.timeout(grace + 3):  # so that the old code fails, not hangs
                if stop == "shutdown":
                    await server.shutdown(grace=grace)
                else:
                    server.close()
                    await server.wait_closed()
            elapsed = loop.time() - start
            assert elapsed < (grace if stop == "shutdown" else 0) + 1
            async with asyncio.timeout(1):  # wait_closed() does not hang afterwards either
                await server.wait_closed()
                assert await reader.read() == b""  # the connection was aborted
            stats = server.statistics()
            assert stats.abandoned_tasks == 1
            assert stats.active == 0
            assert stats.aborted_at_shutdown == (1 if stop == "shutdown" else 0)
            assert not handlers[0].done()  # still running: only no longer waited for
            assert any("did not end" in r.getMessage() for r in caplog.records)
        finally:
            writer.close()
            release.set()
            await asyncio.wait(handlers)


# -- deadline accuracy ------------------------------------------------------------------------


@pytest.mark.slow
async def test_first_frame_deadline_closes_within_a_slot_of_the_deadline() -> None:
    """21 silent connections opened 20 ms apart over 0.4 s: whatever the slot boundaries,
    each is closed no earlier than its deadline and at most 0.1 s (one slot) plus loop
    latency after it. (With the old 0.3 s slots for a 6 s timeout, one was 0.28 s late.)"""
    timeout = 6.0
    loop = asyncio.get_running_loop()

    async def silent_client(host: str, port: int) -> float:
        reader, writer = await open_raw(host, port)
        start = loop.time()
        try:
            await reader.read()
        except ConnectionResetError:
            pass
        waited = loop.time() - start
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
        return waited

    async with netlib.open_tcp_server(
        netlib.echo_handler, framing="line", first_frame_timeout=timeout, idle_timeout=None
    ) as server:
        host, port = address_of(server)
        clients = []
        for _ in range(21):
            clients.append(asyncio.create_task(silent_client(host, port)))
            await asyncio.sleep(0.02)  # pacing the connections, not waiting for an event
        async with asyncio.timeout(timeout + 3):
            waits = await asyncio.gather(*clients)
        assert server.statistics().timeouts == 21
    lateness = [wait - timeout for wait in waits]
    assert min(lateness) > -0.01  # never early (the client starts counting first)
    assert max(lateness) < 0.1 + 0.001 + 0.1, max(lateness)  # slot + timer + loop margin


# -- one host cannot take every connection ----------------------------------------------------


async def test_one_host_is_capped_and_another_address_is_still_served() -> None:
    """127.0.0.2 is another loopback address on Linux: bind the client to it."""
    cap = 4
    async with netlib.open_tcp_server(
        netlib.echo_handler, framing="line", max_connections=10, max_connections_per_host=cap
    ) as server:
        host, port = address_of(server)
        kept = [await open_raw(host, port) for _ in range(cap)]
        for reader, writer in kept:
            writer.write(b"in\n")
            assert await reader.readline() == b"in\n"
        loop = asyncio.get_running_loop()
        excess = [await open_raw(host, port) for _ in range(3)]
        for reader, writer in excess:
            start = loop.time()
            assert await reader.read() == b""  # closed at once
            assert loop.time() - start < 0.1
            writer.close()
        other_reader, other_writer = await asyncio.open_connection(
            host, port, local_addr=("127.0.0.2", 0)
        )
        other_writer.write(b"other host\n")
        assert await other_reader.readline() == b"other host\n"
        stats = server.statistics()
        assert (stats.rejected_per_host, stats.rejected, stats.active) == (3, 0, cap + 1)
        _, kept_writer = kept.pop()
        kept_writer.close()  # a slot of the first host is freed when its connection ends
        await wait_until(lambda: server.statistics().active == cap)
        again_reader, again_writer = await open_raw(host, port)
        again_writer.write(b"again\n")
        assert await again_reader.readline() == b"again\n"
        for _, writer in [*kept, (other_reader, other_writer), (again_reader, again_writer)]:
            writer.close()


def test_the_per_host_cap_has_a_named_default_and_must_be_positive() -> None:
    assert netlib.server.DEFAULT_MAX_CONNECTIONS_PER_HOST == 256
    with pytest.raises(ValueError, match="max_connections_per_host"):
        asyncio.run(_open_with_per_host_cap(0))


async def _open_with_per_host_cap(cap: int) -> None:
    async with netlib.open_tcp_server(netlib.echo_handler, max_connections_per_host=cap):
        pass


# -- TCP keepalive on accepted sockets ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (1, 30, 5, 4)),  # DEFAULT_KEEPALIVE_IDLE / _INTERVAL / _COUNT
        ({"keepalive_idle": 1.5, "keepalive_interval": 1, "keepalive_count": 2}, (1, 2, 1, 2)),
    ],
)
async def test_accepted_sockets_get_tcp_keepalive(
    options: dict[str, float], expected: tuple[int, int, int, int]
) -> None:
    seen: list[tuple[int, int, int, int]] = []

    async def handler(stream: MessageStream) -> None:
        sock = stream.socket
        assert sock is not None
        seen.append(
            (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            )
        )
        await stream.send(b"checked")

    async with (
        netlib.open_tcp_server(handler, framing="line", **options) as server,  # type: ignore[arg-type]
        netlib.connect_tcp(*address_of(server), framing="line") as stream,
    ):
        assert await stream.receive() == b"checked"
    assert seen == [expected]


async def test_keepalive_can_be_turned_off_and_unix_sockets_are_left_alone(
    tmp_path: Path,
) -> None:
    seen: list[int] = []

    async def handler(stream: MessageStream) -> None:
        sock = stream.socket
        assert sock is not None
        if sock.family != socket.AF_UNIX:
            seen.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
        await stream.send(b"ok")

    async with (
        netlib.open_tcp_server(handler, framing="line", keepalive_idle=None) as server,
        netlib.connect_tcp(*address_of(server), framing="line") as stream,
    ):
        assert await stream.receive() == b"ok"
    assert seen == [0]
    path = str(tmp_path / "s")
    async with (
        netlib.open_tcp_server(handler, path=path, framing="line") as server,
        netlib.connect_tcp(path=path, framing="line") as stream,
    ):
        assert await stream.receive() == b"ok"
