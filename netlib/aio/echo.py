"""Echo services as plain asyncio Protocols: EchoProtocol, UpperEchoProtocol (TCP) and
DatagramEchoProtocol (UDP).

They work on their own with ``loop.create_server(EchoProtocol, host, port)`` and are as
cheap as a hand-written echo Protocol, with two safety additions that cost nothing on the
fast path:

* explicit write-buffer limits (high ``DEFAULT_WRITE_HIGH``, low ``DEFAULT_WRITE_LOW``) on
  both loops, and *read* backpressure tied to them: while the peer does not read its
  echoes, the protocol stops reading its input, so a client that sends without reading
  cannot make the server buffer without bound;
* writes after the connection is lost are silent no-ops on both loops.

``DatagramEchoProtocol`` answers each datagram in one of three modes: ``echo`` (unchanged),
``upper`` (upper-cased) or ``timestamp`` (``[<time.ctime()>] <message>``). Every reply
passes a ``ReplyBudget`` first, so a forged source address cannot turn the server into an
amplifier: echo replies are never larger than the request, the 27-byte prefix of a timestamp
reply to an unverified address is paid from its own credit or from the budget's one shared
allowance, and a per-address token bucket caps what any one address is sent. The sans-I/O
``ReplyGrants`` hands each address a batch of replies at a time, charged when granted, so the
per-datagram cost is two subtractions and nothing is ever sent uncharged. Datagrams above
``max_size`` are dropped, not cut; empty ones are answered with empty (or prefix-only)
replies. Every drop is counted in ``statistics()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, cast

from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import (
    DEFAULT_DATAGRAM_WRITE_HIGH,
    DEFAULT_MAX_DATAGRAM,
    EmptyDatagramSender,
)
from netlib.sansio.datagram import ReplyBudget, ReplyBudgetStatistics, ReplyGrants
from netlib.sansio.echo import TIMESTAMP_PREFIX_SIZE, EchoMode, EchoReplies
from netlib.sansio.stream import DEFAULT_WRITE_HIGH, DEFAULT_WRITE_LOW

__all__ = [
    "DatagramEchoProtocol",
    "DatagramEchoStatistics",
    "EchoProtocol",
    "UpperEchoProtocol",
]

logger = logging.getLogger("netlib.aio.echo")


class EchoProtocol(asyncio.Protocol):
    """Send every byte received back to the sender (raw, unframed)."""

    __slots__ = ("_lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=DEFAULT_WRITE_HIGH, low=DEFAULT_WRITE_LOW)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False  # close once the echoes are flushed

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        if not self._lost:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True


class UpperEchoProtocol(EchoProtocol):
    """Send every byte received back upper-cased (ASCII letters only, byte for byte)."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if not self._lost:
            self.transport.write(data.upper())  # type: ignore[union-attr]


@dataclass(frozen=True, slots=True)
class DatagramEchoStatistics:
    """Counters of a ``DatagramEchoProtocol`` (a snapshot).

    Attributes:
        received: datagrams received (any size).
        replied: replies handed to the kernel.
        dropped_too_large: datagrams above ``max_size`` or whose reply would be (a
            timestamp adds 27 bytes), dropped unanswered.
        send_dropped: replies dropped because the send buffer was full or the send failed.
        errors_received: ICMP and socket errors reported by the kernel.
        budget: the reply budget's counters (replies refused per reason, sources tracked).
    """

    received: int
    replied: int
    dropped_too_large: int
    send_dropped: int
    errors_received: int
    budget: ReplyBudgetStatistics


class DatagramEchoProtocol(asyncio.DatagramProtocol):
    """Answer every datagram: unchanged, upper-cased, or prefixed with a timestamp.

    Args:
        mode: ``"echo"``, ``"upper"`` or ``"timestamp"`` (``[Mon Nov 23 10:00:00 2026] hi``).
        budget: the reply policy (default: ``ReplyBudget()`` with its named defaults).
        max_size: largest datagram answered, in bytes.

    Works on its own: ``loop.create_datagram_endpoint(DatagramEchoProtocol, local_addr=...)``.
    """

    def __init__(
        self,
        mode: EchoMode = "echo",
        *,
        budget: ReplyBudget | None = None,
        max_size: int = DEFAULT_MAX_DATAGRAM,
    ) -> None:
        self.mode = mode
        self._budget = budget = budget if budget is not None else ReplyBudget()
        self._max_size = max_size
        self._loop = asyncio.get_running_loop()
        self._log = ThrottledLog(logger, self._loop)
        self._transport: asyncio.DatagramTransport | None = None
        self._empty: EmptyDatagramSender | None = None
        self._paused = False
        self.make_reply = EchoReplies(mode, time.time).make
        self._unchanged = mode == "echo"
        # A reply is this many bytes longer than its request (the timestamp prefix).
        extra = TIMESTAMP_PREFIX_SIZE if mode == "timestamp" else 0
        self._grants = ReplyGrants(budget, extra=extra)
        self._table = self._grants.table  # addr -> [replies left, bytes left, granted]
        self._last_addr: Any = None
        self._last_grant: list[int] | None = None
        self.dropped_too_large = self.send_dropped = self.errors_received = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)
        self._transport.set_write_buffer_limits(high=DEFAULT_DATAGRAM_WRITE_HIGH)  # type: ignore[attr-defined]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        reply = data if self._unchanged else self.make_reply(data)
        size = len(reply)  # never less than the request's
        # bursts come from one peer: comparing with the last one avoids hashing the address
        grant = self._last_grant if addr == self._last_addr else self._table.get(addr)
        if grant is not None and grant[0] and grant[1] >= size and size <= self._max_size:
            grant[0] -= 1  # the fast path: spend the grant; nothing else is counted here
            grant[1] -= size
        else:
            grant = self._renew(addr, grant, len(data), size)
            if grant is None:
                return
        self._last_addr, self._last_grant = addr, grant
        if self._paused:
            self.send_dropped += 1
            self._grants.unsent += 1
        elif reply:
            self._transport.sendto(reply, addr)  # type: ignore[union-attr]
        else:
            self._send_empty(addr)

    def _renew(
        self, addr: Any, grant: list[int] | None, size: int, reply_size: int
    ) -> list[int] | None:
        """Renew ``addr``'s grant, spending one reply now; None if the datagram is dropped
        (too large, or refused by the budget; both counted)."""
        if reply_size > self._max_size:
            self.dropped_too_large += 1  # a timestamp prefix can push a reply over
            return None
        grant = self._grants.renew(addr, grant, size, reply_size, self._loop.time())
        if grant is None:
            self._last_addr = self._last_grant = None
        return grant

    def _send_empty(self, addr: Any) -> None:
        if self._empty is None:
            self._empty = EmptyDatagramSender(self._transport)  # type: ignore[arg-type]
        if not self._empty.sent(self._empty.send(addr), self):
            self._grants.unsent += 1

    def error_received(self, exc: Exception) -> None:
        self.errors_received += 1
        self._log.warning("UDP echo: %r", exc)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._empty is not None:
            self._empty.detach()

    @property
    def received(self) -> int:
        """Datagrams received (any size)."""
        return self._grants.used + self.dropped_too_large + self._grants.refused

    @property
    def replied(self) -> int:
        """Replies handed to the kernel."""
        return self._grants.used - self._grants.unsent

    def statistics(self) -> DatagramEchoStatistics:
        """Return a snapshot of the counters."""
        return DatagramEchoStatistics(
            received=self.received,
            replied=self.replied,
            dropped_too_large=self.dropped_too_large,
            send_dropped=self.send_dropped,
            errors_received=self.errors_received,
            budget=self._budget.statistics(),
        )
