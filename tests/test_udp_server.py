"""How serve_udp runs handlers: started in datagram_received, a Task only when they wait."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

import netlib
from netlib import Datagram, DatagramServer
from netlib.aio.datagram import DatagramEndpointProtocol, DatagramLimits
from tests.helpers import wait_until
from tests.test_udp import RecordingTransport

PEER = ("192.0.2.1", 4000)
Handler = Callable[[Datagram], Any]


@asynccontextmanager
async def server_on_fake(
    handler: Handler, workers: int = 4
) -> AsyncIterator[tuple[DatagramServer, DatagramEndpointProtocol, RecordingTransport]]:
    protocol = DatagramEndpointProtocol(DatagramLimits())
    transport = RecordingTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    server = DatagramServer(handler, protocol, netlib.ReplyBudget(), workers)
    try:
        yield server, protocol, transport
    finally:
        server.close()
        await server.wait_closed()


async def feed(protocol: DatagramEndpointProtocol, *datagrams: bytes) -> None:
    """Deliver datagrams from a loop callback, as the loop does (no task is running)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def deliver() -> None:
        for data in datagrams:
            protocol.datagram_received(data, PEER)
        done.set_result(None)

    loop.call_soon(deliver)
    await done


async def test_a_handler_that_does_not_wait_runs_inside_datagram_received() -> None:
    seen: list[asyncio.Task[Any] | None] = []

    async def echo(datagram: Datagram) -> None:
        seen.append(asyncio.current_task())
        datagram.reply(datagram.data)

    async with server_on_fake(echo) as (server, protocol, transport):
        await feed(protocol, b"a", b"bb")
        assert transport.sent[PEER] == 3  # both answered before feed() returned
        assert server._waiting == {}
        assert len(seen) == 2
        assert not isinstance(seen[0], asyncio.Task)


async def test_a_handler_that_waits_goes_on_in_a_task() -> None:
    async def slow(datagram: Datagram) -> None:
        await asyncio.sleep(0)
        task = asyncio.current_task()
        assert task is not None
        assert isinstance(task, asyncio.Task)
        await asyncio.sleep(0.01)
        datagram.reply(datagram.data.upper())

    async with server_on_fake(slow) as (server, protocol, transport):
        await feed(protocol, b"abc")
        assert len(server._waiting) == 1
        await wait_until(lambda: transport.sent[PEER] == 3, timeout=5.0)
        assert server.statistics().handled == 1


@pytest.mark.parametrize("expires", [False, True])
async def test_asyncio_timeout_before_the_first_await(expires: bool) -> None:
    outcomes: list[str] = []

    async def bounded(datagram: Datagram) -> None:
        try:
            async with asyncio.timeout(0.01 if expires else 5.0):
                await asyncio.sleep(5.0 if expires else 0.01)
            outcomes.append("done")
        except TimeoutError:
            outcomes.append("timed out")
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        datagram.reply(b"x")

    async with server_on_fake(bounded) as (server, protocol, _transport):
        await feed(protocol, b"go")
        await wait_until(lambda: bool(outcomes), timeout=5.0)
        await wait_until(lambda: not server._waiting, timeout=5.0)
    assert outcomes == ["timed out" if expires else "done"]
    assert server.handler_errors == 0


async def test_timeout_that_never_waits_and_task_group() -> None:
    results: list[int] = []

    async def grouped(datagram: Datagram) -> None:
        async with asyncio.timeout(1.0):  # noqa: ASYNC100  (on purpose: no await inside)
            results.append(1)  # leaves the timeout without waiting
        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(0))
        results.append(2)

    async with server_on_fake(grouped) as (server, protocol, _transport):
        await feed(protocol, b"go")
        await wait_until(lambda: results == [1, 2], timeout=5.0)
        await wait_until(lambda: not server._waiting, timeout=5.0)
        assert server.handler_errors == 0


async def test_cancel_asked_in_the_first_step_reaches_the_task() -> None:
    cancelled: list[bool] = []

    async def self_cancelling(datagram: Datagram) -> None:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        try:
            await asyncio.sleep(5.0)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    async with server_on_fake(self_cancelling) as (server, protocol, _transport):
        await feed(protocol, b"go")
        await wait_until(lambda: not server._waiting, timeout=5.0)
        assert cancelled == [True]
        assert server.handler_errors == 0


async def test_at_most_workers_wait_and_the_rest_queue_in_order() -> None:
    release = asyncio.Event()
    order: list[bytes] = []

    async def held(datagram: Datagram) -> None:
        order.append(datagram.data)
        await release.wait()

    async with server_on_fake(held, workers=2) as (server, protocol, _transport):
        await feed(protocol, b"1", b"2", b"3", b"4")
        assert order == [b"1", b"2"]
        assert protocol.statistics().queued == 2
        release.set()
        await wait_until(lambda: len(order) == 4 and not server._waiting, timeout=5.0)
        assert order == [b"1", b"2", b"3", b"4"]
        assert server.statistics().handled == 4


async def test_errors_before_and_after_waiting_are_counted() -> None:
    async def broken(datagram: Datagram) -> None:
        if datagram.data == b"later":
            await asyncio.sleep(0)
        raise RuntimeError("handler bug")

    async with server_on_fake(broken) as (server, protocol, _transport):
        await feed(protocol, b"now", b"later")
        await wait_until(lambda: server.handler_errors == 2, timeout=5.0)


async def test_close_cancels_waiting_handlers() -> None:
    cancelled = asyncio.Event()

    async def forever(datagram: Datagram) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with server_on_fake(forever) as (server, protocol, _transport):
        await feed(protocol, b"a", b"b")
        assert len(server._waiting) == 2
    assert cancelled.is_set()
    assert server._waiting == {}


REQUEST_ID: contextvars.ContextVar[bytes] = contextvars.ContextVar("request_id")


async def test_context_set_in_the_first_step_follows_the_handler_into_its_task() -> None:
    seen: list[bytes] = []

    async def tagged(datagram: Datagram) -> None:
        REQUEST_ID.set(datagram.data)
        await asyncio.sleep(0)
        seen.append(REQUEST_ID.get())

    async with server_on_fake(tagged) as (_server, protocol, _transport):
        await feed(protocol, b"a", b"b")
        await wait_until(lambda: len(seen) == 2, timeout=5.0)
    assert seen == [b"a", b"b"]


async def test_handlers_returning_other_awaitables() -> None:
    loop = asyncio.get_running_loop()

    def plain(datagram: Datagram) -> asyncio.Future[None]:
        future = loop.create_future()
        loop.call_soon(future.set_result, None)
        datagram.reply(b"ok")
        return future

    async with server_on_fake(plain) as (server, protocol, transport):
        await feed(protocol, b"x")
        await wait_until(lambda: not server._waiting, timeout=5.0)
        assert transport.sent[PEER] == 2


async def test_real_socket_handler_that_waits() -> None:
    async def delayed(datagram: Datagram) -> None:
        async with asyncio.timeout(2.0):
            await asyncio.sleep(0.001)
        datagram.reply(datagram.data)

    async with (
        netlib.open_udp_server(delayed) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        for i in range(20):
            assert await endpoint.request(b"%d" % i, timeout=2.0) == b"%d" % i
