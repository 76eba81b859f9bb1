"""MessageStream: an ordered, reliable stream of messages over one connection.

A ``MessageStream`` is what a ``serve_tcp`` handler receives and what ``connect_tcp``
yields. It sends and receives whole messages in the connection's framing (raw chunks,
lines, or length-prefixed frames), applies backpressure both ways, and raises errors from
``netlib.errors``:

* ``receive()`` raises ``EndOfStream`` when the peer has finished, ``ProtocolError`` for a
  malformed or oversized frame, ``PeerTimedOut`` when a deadline passed, and
  ``BrokenResourceError`` when the connection is gone. Iteration stops at ``EndOfStream``.
* ``send()`` waits while the peer is slow to read; it raises ``BrokenResourceError`` once
  the connection is lost and ``ClosedResourceError`` after ``aclose()``.

Receiving never suspends while messages are buffered, and consecutive sends are written in
one system call per event-loop iteration, which is where netlib gains over asyncio streams.
"""

from __future__ import annotations

import socket
from typing import Any, Final, Self

from netlib.aio.framed import FramedProtocol
from netlib.errors import ClosedResourceError, EndOfStream, WouldBlock
from netlib.sansio.framing import Framing

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "MessageStream"]

DEFAULT_CLOSE_TIMEOUT: Final = 10.0
"""Seconds ``aclose()`` waits for buffered data to reach the peer before aborting."""


class MessageStream:
    """Send and receive whole messages on one connection.

    Created by netlib (``serve_tcp`` handlers, ``connect_tcp``), not by users.
    """

    __slots__ = ("_close_timeout", "_closed", "_encode", "_frames", "_linger", "_protocol")

    def __init__(
        self,
        protocol: FramedProtocol,
        framing: Framing,
        *,
        linger: bool = False,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._protocol = protocol
        self._frames = protocol.frames
        self._encode = framing.encode
        self._linger = linger
        self._close_timeout = close_timeout
        self._closed = False

    # -- receiving --------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """Return the next message.

        Raises:
            EndOfStream: the peer finished sending.
            ProtocolError: the peer sent a malformed or oversized frame (connection closed).
            PeerTimedOut: the first-message or idle deadline passed (connection closed).
            BrokenResourceError: the connection is gone.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        frames = self._frames
        if not frames:
            if self._closed:
                raise ClosedResourceError("stream closed")
            await self._protocol.wait_readable()
            if not frames:
                raise self._protocol.end_error()
        frame = frames.popleft()
        if not frames:
            self._protocol.consumed()
        return frame

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self.receive()
        except EndOfStream:
            raise StopAsyncIteration from None

    # -- sending ----------------------------------------------------------------------------

    async def send(self, message: bytes) -> None:
        """Send one message, waiting while the peer is slow to read.

        Raises:
            ValueError: the framing cannot carry ``message`` (too large, or a line end in a
                line message).
            BrokenResourceError: the connection is gone.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        protocol = self._protocol
        if protocol.write_paused or protocol.lost or self._closed:
            self._check_open()
            await protocol.drain()
        protocol.write(self._encode(message))

    def send_nowait(self, message: bytes) -> None:
        """Send one message now, or raise ``WouldBlock`` if the peer is slow to read."""
        self._check_open()
        if self._protocol.lost:
            raise self._protocol.end_error()
        if self._protocol.write_paused:
            raise WouldBlock("the peer is not reading fast enough")
        self._protocol.write(self._encode(message))

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream closed")

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Flush what was sent and close the connection (idempotent).

        Waits at most ``close_timeout`` seconds for the data to reach the peer, then aborts.
        """
        if self._closed:
            return
        self._closed = True
        await self._protocol.finish(self._close_timeout, linger=self._linger)

    def abort(self) -> None:
        """Close the connection at once, discarding buffered data."""
        self._closed = True
        self._protocol.abort()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- introspection ----------------------------------------------------------------------

    @property
    def local_address(self) -> Any:
        """This side's socket address (a tuple for IP, a path for Unix sockets)."""
        return self.extra("sockname")

    @property
    def remote_address(self) -> Any:
        """The peer's socket address (a tuple for IP, a path or '' for Unix sockets)."""
        return self.extra("peername")

    def extra(self, name: str, default: Any = None) -> Any:
        """Return transport information: ``peername``, ``sockname``, ``ssl_object``, ..."""
        transport = self._protocol.transport
        if transport is None:
            return default
        try:
            return transport.get_extra_info(name, default)
        except (AttributeError, OSError):  # uvloop, once the socket is closed
            return default

    @property
    def socket(self) -> socket.socket | None:
        """The underlying socket object, for options netlib does not wrap."""
        sock: socket.socket | None = self.extra("socket")
        return sock

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MessageStream {state} peer={self.remote_address!r}>"
