"""DatagramEndpointProtocol: a UDP (or Unix datagram) endpoint with explicit policies.

Theory of operation
-------------------
Stock asyncio gives a datagram protocol no queue, no size policy and no way to send an
empty datagram. This adapter adds each, and counts everything it drops:

* **Bounded receive queue.** ``datagram_received`` appends ``(data, addr)`` to ``queue``
  while it holds fewer than ``queue_size`` datagrams and ``queue_bytes`` bytes; past either
  limit the datagram is dropped and counted (``dropped_queue_full``). Nothing blocks, so a
  flood costs at most the queue.
* **Size policy.** A datagram above ``max_size`` is dropped and counted
  (``dropped_too_large``), never handed over cut short. The kernel truncates a datagram
  only when the read buffer is smaller than it; asyncio reads with a 256 KiB buffer and
  uvloop (libuv) with 64 KiB, both above the largest UDP payload (65,507 bytes over IPv4,
  65,527 over IPv6), so UDP datagrams always arrive whole. A Unix datagram above 64 KiB is
  cut to 64 KiB by libuv without notice, which ``max_size`` (at most 65,535) turns into a
  counted drop.
* **Empty datagrams** are valid messages: received ones are queued as ``b""``. Both loops
  silently discard ``sendto(b"")`` (CPython gh-113812, uvloop #594), so an empty datagram
  is sent with a plain ``socket`` object sharing the transport's descriptor.
* **ICMP errors** (``ConnectionRefusedError`` after sending to a closed port) arrive in
  ``error_received``. They never close the endpoint; they are counted, logged at INFO level
  at most once a second, and handed to ``on_error`` so a waiting request fails fast (Linux
  reports them on connected sockets only).
* **Sends** go straight to the kernel; when it pushes back, the transport buffers and calls
  ``pause_writing`` above ``write_high``. Senders that can wait use ``drain()``; replies
  that cannot (servers) are dropped and counted (``send_dropped``) instead of buffered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, cast

from netlib.aio.flow import WriteFlowControl
from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import (
    DEFAULT_DATAGRAM_WRITE_HIGH,
    DEFAULT_MAX_DATAGRAM,
    MAX_DATAGRAM_LIMIT,
    EmptyDatagramSender,
)
from netlib.errors import BrokenResourceError, LimitExceeded

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "DatagramEndpointProtocol",
    "DatagramLimits",
    "DatagramStatistics",
    "address_key",
]

logger = logging.getLogger("netlib.aio.datagram")

DEFAULT_QUEUE_SIZE: Final = 1024
"""Datagrams an endpoint holds for ``receive()`` before dropping new ones."""
DEFAULT_QUEUE_BYTES: Final = 4 * 1024 * 1024
"""Bytes an endpoint holds for ``receive()`` before dropping new datagrams."""


@dataclass(frozen=True, slots=True)
class DatagramLimits:
    """Size and queue limits of a datagram endpoint (bytes and datagram counts)."""

    max_size: int = DEFAULT_MAX_DATAGRAM
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_bytes: int = DEFAULT_QUEUE_BYTES
    write_high: int = DEFAULT_DATAGRAM_WRITE_HIGH

    def __post_init__(self) -> None:
        if not 0 <= self.max_size <= MAX_DATAGRAM_LIMIT:
            raise ValueError(f"max_size must be in [0, {MAX_DATAGRAM_LIMIT}], got {self.max_size}")
        if self.queue_size < 1 or self.queue_bytes < 1:
            raise ValueError(f"queue limits must be >= 1, got {self}")


@dataclass(frozen=True, slots=True)
class DatagramStatistics:
    """Counters of a datagram endpoint since it opened (a snapshot).

    Attributes:
        received: datagrams received and queued (or consumed by a waiting request).
        sent: datagrams handed to the kernel.
        dropped_queue_full: datagrams dropped because the receive queue was full.
        dropped_too_large: datagrams dropped because they exceeded ``max_size``.
        send_dropped: datagrams not sent because the send buffer was full.
        errors_received: ICMP and socket errors reported by the kernel.
        queued: datagrams waiting in the receive queue now.
    """

    received: int = 0
    sent: int = 0
    dropped_queue_full: int = 0
    dropped_too_large: int = 0
    send_dropped: int = 0
    errors_received: int = 0
    queued: int = 0


class DatagramEndpointProtocol(WriteFlowControl, asyncio.DatagramProtocol):
    """Bounded receive queue, size policy, empty datagrams and ICMP policy for one socket.

    Args:
        limits: size and queue limits.
        on_error: called with each error the kernel reports (e.g. ConnectionRefusedError).

    The public ``DatagramEndpoint`` and the UDP server are its consumers.
    """

    def __init__(
        self,
        limits: DatagramLimits,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._limits = limits
        self._on_error = on_error
        self._loop = asyncio.get_running_loop()
        self._log = ThrottledLog(logger, self._loop)
        self.transport: asyncio.DatagramTransport | None = None
        self.queue: deque[tuple[bytes, Any]] = deque()
        self.queued_bytes = 0
        self.lost = False
        self.write_paused = False
        self.expected: dict[Any, asyncio.Future[bytes]] = {}
        self.consumer: Callable[[bytes, Any], bool] | None = None
        """Called with each accepted datagram before it is queued; True means it was taken
        (a server starts its handler), False queues it as usual."""
        self._empty: EmptyDatagramSender | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._closed = self._loop.create_future()
        self.received = self.sent = self.errors_received = 0
        self.dropped_queue_full = self.dropped_too_large = self.send_dropped = 0

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.transport.set_write_buffer_limits(high=self._limits.write_high)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if len(data) > self._limits.max_size:
            self.dropped_too_large += 1
            return
        if self.expected:
            waiter = self.expected.pop(address_key(addr), None)
            if waiter is not None and not waiter.done():
                self.received += 1
                waiter.set_result(data)
                return
        if self.consumer is not None and self.consumer(data, addr):
            self.received += 1
            return
        if len(self.queue) >= self._limits.queue_size or (
            self.queued_bytes + len(data) > self._limits.queue_bytes
        ):
            self.dropped_queue_full += 1
            return
        self.received += 1
        self.queue.append((data, addr))
        self.queued_bytes += len(data)
        self._wake()

    def error_received(self, exc: Exception) -> None:
        self.errors_received += 1
        self._log.log(logging.INFO, "datagram endpoint error: %r", exc)
        if self._on_error is not None:
            self._on_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._empty is not None:
            self._empty.detach()
        self._wake()
        self._wake_drainers()
        for waiter in self.expected.values():
            if not waiter.done():
                waiter.set_exception(BrokenResourceError("endpoint closed"))
        self.expected.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    # -- receiving --------------------------------------------------------------------------

    def pop(self) -> tuple[bytes, Any]:
        """Take the oldest queued datagram (the queue must not be empty)."""
        item = self.queue.popleft()
        self.queued_bytes -= len(item[0])
        return item

    async def wait_readable(self) -> None:
        """Wait until a datagram is queued or the endpoint is closed."""
        while not self.queue and not self.lost:
            self._waiter = self._loop.create_future()
            await self._waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- sending ----------------------------------------------------------------------------

    @property
    def max_size(self) -> int:
        """Largest datagram received or sent, in bytes."""
        return self._limits.max_size

    def check_size(self, data: bytes) -> None:
        """Raise ``LimitExceeded`` if ``data`` is larger than ``max_size``."""
        if len(data) > self._limits.max_size:
            raise LimitExceeded(
                f"datagram of {len(data)} bytes exceeds max_size {self._limits.max_size}"
            )

    def sendto(self, data: bytes, addr: Any = None) -> bool:
        """Send one datagram now; return False (and count it) if it had to be dropped."""
        transport = self.transport
        if self.lost or transport is None or transport.is_closing():
            self.send_dropped += 1
            return False
        if self.write_paused:
            self.send_dropped += 1
            return False
        if data:
            transport.sendto(data, addr)
        elif not self._send_empty(addr):
            return False
        self.sent += 1
        return True

    def _send_empty(self, addr: Any) -> bool:
        if self._empty is None:
            self._empty = EmptyDatagramSender(self.transport)  # type: ignore[arg-type]
        return self._empty.sent(self._empty.send(addr), self)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the transport (idempotent)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until ``connection_lost`` has run."""
        await asyncio.shield(self._closed)

    def statistics(self) -> DatagramStatistics:
        """Return a snapshot of the counters."""
        return DatagramStatistics(
            received=self.received,
            sent=self.sent,
            dropped_queue_full=self.dropped_queue_full,
            dropped_too_large=self.dropped_too_large,
            send_dropped=self.send_dropped,
            errors_received=self.errors_received,
            queued=len(self.queue),
        )


def address_key(addr: Any) -> Any:
    """The part of an address that identifies a peer: (host, port) for IP, else as is.

    IPv6 addresses arrive as (host, port, flowinfo, scope_id); requests name them by
    (host, port).
    """
    return addr[:2] if isinstance(addr, tuple) else addr
