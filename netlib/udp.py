"""serve_udp / open_udp_server: datagram services with a reply policy, and their handlers.

Theory of operation
-------------------
A UDP server is one socket, one ``DatagramEndpointProtocol`` (bounded queue, size policy,
ICMP policy) and ``workers`` tasks that take datagrams from the queue and run the handler
with a ``Datagram``. A handler answers with ``datagram.reply(data)``, which is synchronous
and never buffers: the reply goes to the kernel at once or is dropped and counted. Every
reply passes the server's ``ReplyBudget`` (each datagram handed to a handler first earns
its source credit), so no handler can be turned into an amplifier by a forged source.

Handlers run concurrently up to ``workers``; with ``workers=1`` datagrams are handled one
at a time in arrival order. A handler that raises is logged (at most once a second) and
counted; the server goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypedDict

from typing_extensions import Unpack

from netlib.aio.datagram import (
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DatagramEndpointProtocol,
    DatagramLimits,
    DatagramStatistics,
)
from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import (
    DEFAULT_MAX_DATAGRAM,
    DatagramSocketOptions,
    open_datagram_socket,
    remove_socket_file,
)
from netlib.sansio.datagram import ReplyBudget, ReplyBudgetStatistics
from netlib.streams import Datagram, DatagramHandler

__all__ = [
    "DEFAULT_UDP_WORKERS",
    "DatagramServer",
    "DatagramServerStatistics",
    "UDPServerOptions",
    "open_udp_server",
    "serve_udp",
]

logger = logging.getLogger("netlib.udp")

DEFAULT_UDP_WORKERS: Final = 16
"""Handlers a UDP server runs at once."""


@dataclass(frozen=True, slots=True)
class DatagramServerStatistics:
    """Counters of a UDP server (a snapshot).

    Attributes:
        endpoint: the socket's counters (received, sent, drops by reason, errors).
        budget: the reply budget's counters (replies refused per reason).
        handled: datagrams handed to the handler.
        handler_errors: handler calls that raised.
    """

    endpoint: DatagramStatistics
    budget: ReplyBudgetStatistics
    handled: int
    handler_errors: int


class DatagramServer:
    """A running UDP (or Unix datagram) server, from ``open_udp_server``."""

    def __init__(
        self,
        handler: DatagramHandler,
        protocol: DatagramEndpointProtocol,
        budget: ReplyBudget,
        workers: int,
    ) -> None:
        self._handler = handler
        self._protocol = protocol
        self._budget = budget
        self._loop = asyncio.get_running_loop()
        self._errors_log = ThrottledLog(logger, self._loop)
        self.handled = self.handler_errors = 0
        self._workers = [self._loop.create_task(self._work()) for _ in range(workers)]
        transport = protocol.transport
        self.addresses: list[Any] = [transport.get_extra_info("sockname") if transport else None]
        """The bound address (with the real port when bound to port 0)."""

    async def _work(self) -> None:
        protocol = self._protocol
        while True:
            if not protocol.queue:
                await protocol.wait_readable()
                if not protocol.queue:
                    return
            data, addr = protocol.pop()
            self._budget.on_received(addr, len(data), self._loop.time())
            self.handled += 1
            try:
                await self._handler(Datagram(data, addr, self))
            except Exception:
                self.handler_errors += 1
                self._errors_log.exception("UDP handler failed for %r", addr)

    def send(self, data: bytes, addr: Any) -> bool:
        """Send ``data`` to ``addr`` through the reply budget; False if dropped."""
        self._protocol.check_size(data)
        if not self._budget.try_send(addr, len(data), self._loop.time()):
            return False
        return self._protocol.sendto(data, addr)

    def statistics(self) -> DatagramServerStatistics:
        """Return a snapshot of the counters."""
        return DatagramServerStatistics(
            endpoint=self._protocol.statistics(),
            budget=self._budget.statistics(),
            handled=self.handled,
            handler_errors=self.handler_errors,
        )

    def close(self) -> None:
        """Stop the handlers and close the socket now (idempotent)."""
        for worker in self._workers:
            worker.cancel()
        self._protocol.close()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed and the handlers have stopped."""
        await self._protocol.wait_closed()
        await asyncio.wait(self._workers)

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancel this to stop waiting)."""
        await self._protocol.wait_closed()

    def __repr__(self) -> str:
        return f"<DatagramServer addresses={self.addresses!r}>"


class UDPServerOptions(TypedDict, total=False):
    """The keyword options of ``open_udp_server``, accepted by ``serve_udp`` too."""

    path: str | None
    workers: int
    max_size: int
    queue_size: int
    queue_bytes: int
    budget: ReplyBudget | None
    allow_broadcast: bool
    multicast_group: str | None
    multicast_interface: str | int
    reuse_port: bool


@asynccontextmanager
async def open_udp_server(
    handler: DatagramHandler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    path: str | None = None,
    workers: int = DEFAULT_UDP_WORKERS,
    max_size: int = DEFAULT_MAX_DATAGRAM,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    queue_bytes: int = DEFAULT_QUEUE_BYTES,
    budget: ReplyBudget | None = None,
    allow_broadcast: bool = False,
    multicast_group: str | None = None,
    multicast_interface: str | int = "0.0.0.0",
    reuse_port: bool = False,
) -> AsyncIterator[DatagramServer]:
    """Serve ``handler`` on a UDP (or Unix datagram) socket for the ``async with`` block.

    Args:
        handler: ``async def handler(datagram: Datagram)``, called for each datagram.
        host, port: address to bind (default loopback; port 0 picks a free port).
        path: bind a Unix datagram socket at this path instead.
        workers: handlers run at once (1: one at a time, in arrival order).
        max_size: largest datagram handled or sent (bigger ones are dropped and counted).
        queue_size, queue_bytes: bound of the receive queue (drops beyond are counted).
        budget: the reply policy (default ``ReplyBudget()``: 100 replies/s per address,
            burst 200, at most 3x the bytes received plus a small allowance).
        allow_broadcast: set SO_BROADCAST (bind to a broadcast address to receive them).
        multicast_group, multicast_interface: join a multicast group on an interface.
        reuse_port: set SO_REUSEPORT.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    options = DatagramSocketOptions(
        local=None if path is not None else (host or "", port),
        path=path,
        allow_broadcast=allow_broadcast,
        multicast_group=multicast_group,
        multicast_interface=multicast_interface,
        reuse_port=reuse_port,
    )
    limits = DatagramLimits(max_size=max_size, queue_size=queue_size, queue_bytes=queue_bytes)
    sock = await open_datagram_socket(options)
    loop = asyncio.get_running_loop()
    try:
        _transport, protocol = await loop.create_datagram_endpoint(
            lambda: DatagramEndpointProtocol(limits), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    server = DatagramServer(handler, protocol, budget or ReplyBudget(), workers)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
        remove_socket_file(path)


async def serve_udp(
    handler: DatagramHandler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    **options: Unpack[UDPServerOptions],
) -> None:
    """Serve ``handler`` until cancelled. Takes the same arguments as ``open_udp_server``."""
    async with open_udp_server(handler, host, port, **options) as server:
        await server.serve_forever()
