"""Shared helpers for integration tests: loopback servers, raw sockets, timing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from netlib import Server

__all__ = [
    "NonReader",
    "address_of",
    "non_readers",
    "open_raw",
    "paced_lines",
    "poll_until",
    "reset",
    "wait_for_eof",
    "wait_until",
]


def address_of(server: Server) -> tuple[str, int]:
    """Host and port of the server's first listening socket."""
    host, port = server.addresses[0][:2]
    return host, port


async def open_raw(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain asyncio stream connection: a client that netlib does not control."""
    return await asyncio.open_connection(host, port)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a reset (RST) instead of EOF."""
    sock: Any = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def wait_for_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until EOF (raises ConnectionResetError if the peer reset instead)."""
    return await reader.read()


async def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> None:
    """Poll ``predicate`` (a cheap counter check) until true; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


async def poll_until(
    check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.01
) -> None:
    """Await ``check`` (a query, such as a round trip to a server process) every
    ``interval`` seconds until it returns true; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(interval)


_CHUNK = b"x" * 65536


@dataclass(frozen=True)
class NonReader:
    """A client that sends and never reads: its socket, local port and sending task."""

    sock: socket.socket
    port: int
    pump: asyncio.Task[None]


async def _open_non_reader(address: tuple[str, int]) -> socket.socket:
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _pump(sock: socket.socket, chunks: int) -> None:
    """Send ``chunks`` x 64 KiB without reading a byte; ends early when the connection
    fails (the server cut it off), blocks while the server does not read."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError):
        for _ in range(chunks):
            await loop.sock_sendall(sock, _CHUNK)


@contextlib.asynccontextmanager
async def non_readers(
    address: tuple[str, int], count: int, *, send: int = 4 << 20
) -> AsyncIterator[list[NonReader]]:
    """``count`` clients with a 4 KiB receive buffer that each send up to ``send`` bytes
    (64 KiB at a time, all starting once every one is connected) and never read, for the
    block; their sockets are closed when it ends."""
    socks: list[socket.socket] = []
    clients: list[NonReader] = []
    try:
        for _ in range(count):
            socks.append(await _open_non_reader(address))  # noqa: PERF401 (closed if the next fails)
        for sock in socks:
            pump = asyncio.create_task(_pump(sock, send // len(_CHUNK)))
            clients.append(NonReader(sock, sock.getsockname()[1], pump))
        yield clients
    finally:
        for client in clients:
            client.pump.cancel()
        if clients:
            await asyncio.wait([client.pump for client in clients])
        for sock in socks:
            sock.close()


async def paced_lines(
    transport: asyncio.BaseTransport, publisher: int, count: int, rate: float, size: int
) -> None:
    """Write ``count`` chat lines of ``size`` bytes at ``rate`` a second, each starting
    ``publisher seq send-time-ns`` (so a receiver can check order and measure latency)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    pad = b"x" * size
    write = cast(asyncio.Transport, transport).write
    for seq in range(count):
        delay = start + seq / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing the publisher at its rate
        head = b"%d %d %d " % (publisher, seq, time.monotonic_ns())
        write(head + pad[: size - len(head)] + b"\n")
