"""The server-wide memory budget (docs/robustness.md, R5b and F1): stalled connections
together hold at most ``max_memory``; the largest are cut off as slow consumers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import netlib
from tests.helpers import address_of, wait_until

CAP = 2 * 1024 * 1024
CLIENTS = 16
CHUNK = b"x" * 65536


async def _non_reader(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, address)
    return sock


async def _pump(sock: socket.socket) -> None:
    """Send up to 4 MiB without reading a byte (stops when the server stops reading)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        for _ in range(64):
            await loop.sock_sendall(sock, CHUNK)


@contextlib.asynccontextmanager
async def non_readers(address: tuple[str, int], count: int) -> AsyncIterator[None]:
    """``count`` clients that send up to 4 MiB each and never read, for the block."""
    socks = [await _non_reader(address) for _ in range(count)]
    pumps = [asyncio.create_task(_pump(sock)) for sock in socks]
    try:
        yield
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.wait(pumps)
        for sock in socks:
            sock.close()


async def test_stalled_connections_are_held_to_the_memory_budget() -> None:
    async with netlib.open_tcp_server(
        netlib.echo_handler, max_memory=CAP, max_connections_per_host=None
    ) as server:
        address = address_of(server)
        async with non_readers(address, CLIENTS):
            # Each stalled echo connection holds about 0.3-0.6 MiB (read_limit of queued
            # input plus unsent echoes): 16 of them are well over the 2 MiB budget.
            await wait_until(lambda: server.statistics().slow_consumers >= 1, timeout=15.0)
            stats = server.statistics()
            assert stats.memory_held <= CAP
            assert stats.slow_consumers < CLIENTS  # the largest go, not everyone
            async with netlib.connect_tcp(*address) as client:  # a reader is still served
                await client.send(b"still here")
                assert await client.receive() == b"still here"


async def test_no_budget_means_no_eviction_for_memory() -> None:
    async with (
        netlib.open_tcp_server(
            netlib.echo_handler, max_memory=None, max_connections_per_host=None
        ) as server,
        non_readers(address_of(server), 4),
    ):
        await wait_until(
            lambda: (
                all(p.reading_paused for p in server._connections.values())
                and len(server._connections) == 4
            ),
            timeout=15.0,
        )
        stats = server.statistics()
        assert stats.slow_consumers == 0
        assert stats.memory_held == 0
