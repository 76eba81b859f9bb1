"""Echo services as plain asyncio Protocols: EchoProtocol and UpperEchoProtocol.

They work on their own with ``loop.create_server(EchoProtocol, host, port)`` and are as
cheap as a hand-written echo Protocol, with two safety additions that cost nothing on the
fast path:

* explicit write-buffer limits (high ``DEFAULT_WRITE_HIGH``, low ``DEFAULT_WRITE_LOW``) on
  both loops, and *read* backpressure tied to them: while the peer does not read its
  echoes, the protocol stops reading its input, so a client that sends without reading
  cannot make the server buffer without bound;
* writes after the connection is lost are silent no-ops on both loops.
"""

from __future__ import annotations

import asyncio
from typing import cast

from netlib.aio.framed import DEFAULT_WRITE_HIGH, DEFAULT_WRITE_LOW

__all__ = ["EchoProtocol", "UpperEchoProtocol"]


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
