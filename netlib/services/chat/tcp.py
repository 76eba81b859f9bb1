"""The chat service over TCP: ChatProtocol (for ``loop.create_server``) and chat_handler
(for ``serve_tcp``).

A delivery is appended to the connection's pending list and written with one
``writelines`` per loop iteration (or as soon as 64 KiB are pending): the transport's
buffer is the outbound queue. A connection whose buffer would pass ``hard_limit`` is
disconnected with reason ``slow_consumer`` at once; one that stays above ``soft_limit`` for
``soft_time`` seconds is disconnected too.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Hashable
from typing import cast

from netlib.errors import ProtocolError
from netlib.sansio.framing import LineFraming
from netlib.services.chat.service import FLUSH_THRESHOLD, SLOW_CONSUMER, ChatService
from netlib.streams import Handler, MessageStream

__all__ = ["ChatProtocol", "chat_handler"]

logger = logging.getLogger("netlib.services.chat")


class ChatProtocol(asyncio.Protocol):
    """A TCP chat client: UTF-8 lines (CRLF tolerated), bounded outbound buffer.

    Args:
        service: the chat to join (default: ``ChatService.default()``, one per loop).

    Works on its own: ``loop.create_server(ChatProtocol, host, port)``.
    """

    def __init__(self, service: ChatService | None = None) -> None:
        self._service = service if service is not None else ChatService.default()
        self._limits = self._service.limits
        self._loop = self._service._loop
        self._decoder = LineFraming(max_size=self._limits.max_line_bytes).decoder()
        self.transport: asyncio.Transport | None = None
        self.session_id = 0
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._buffered = 0
        self._flush_handle: asyncio.Handle | None = None
        self._soft_timer: asyncio.TimerHandle | None = None
        self._soft_since = 0.0
        self._ended = False
        self._closed = self._loop.create_future()

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        soft = self._limits.soft_limit
        self.transport.set_write_buffer_limits(high=soft, low=soft // 2)
        sock = transport.get_extra_info("socket")
        if self._limits.socket_send_buffer is not None and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._limits.socket_send_buffer)
        self.session_id = self._service.open(self)

    def data_received(self, data: bytes) -> None:
        if self._ended:
            return
        try:
            lines = self._decoder.feed(data)
        except ProtocolError as exc:
            self._finish(f"protocol error: {exc}", abort=True)
            return
        receive = self._service.receive
        for line in lines:
            receive(self.session_id, line.decode("utf-8", "replace"))

    def eof_received(self) -> bool:
        self._finish("connection closed", abort=False)
        self._flush()
        return False  # the transport closes once its buffer is flushed

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended = True
        if not self._closed.done():
            self._closed.set_result(None)
        self._cancel_timers()
        self._pending.clear()
        self._service.close(self.session_id, "connection lost" if exc else "connection closed")

    def pause_writing(self) -> None:  # the buffer passed the soft limit
        if self._soft_timer is None and not self._ended:
            self._soft_since = self._loop.time()
            self._soft_timer = self._loop.call_later(self._limits.soft_time, self._soft_expired)

    def resume_writing(self) -> None:  # back under half the soft limit
        if self._soft_timer is not None:
            self._soft_timer.cancel()
            self._soft_timer = None

    # -- session ----------------------------------------------------------------------------

    def deliver(self, line: bytes, origin: Hashable) -> None:
        """Queue ``line`` unless it came from this session; never blocks."""
        if origin == self.session_id or self._ended:
            return
        size = self._buffered + self._pending_size + len(line)
        if size > self._limits.hard_limit:
            self._slow(f"hard limit: outbound buffer would reach {size} bytes")
            return
        self._pending.append(line)
        self._pending_size += len(line)
        if self._pending_size >= FLUSH_THRESHOLD:
            self._flush()  # let the kernel take it now: a batch is not a slow consumer
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = None
        transport = self.transport
        if not self._pending or transport is None or transport.is_closing():
            return
        pending, self._pending, self._pending_size = self._pending, [], 0
        transport.writelines(pending)
        self._buffered = transport.get_write_buffer_size()

    def end(self, reason: str) -> None:
        """Close this session after flushing what is queued (``/quit``, server shutdown)."""
        if reason == "server shutting down" and not self._ended:
            self.deliver(b"*** server shutting down\n", None)
        self._ended = True
        self._flush()
        self._cancel_timers()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await asyncio.shield(self._closed)

    def abort(self) -> None:
        """Close the connection now, discarding what is buffered."""
        self._ended = True
        if self.transport is not None and not self._closed.done():
            self.transport.abort()

    def _finish(self, reason: str, *, abort: bool) -> None:
        self._service.close(self.session_id, reason)
        if abort and self.transport is not None:
            self._ended = True
            self.transport.abort()

    def _soft_expired(self) -> None:
        self._soft_timer = None
        held = self._loop.time() - self._soft_since
        self._slow(f"held above the soft limit ({self._limits.soft_limit} bytes) for {held:.2f} s")

    def _slow(self, why: str) -> None:
        logger.info("slow consumer, session %d disconnected: %s", self.session_id, why)
        self._ended = True
        self._pending.clear()
        self._service.close(self.session_id, SLOW_CONSUMER)
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timers(self) -> None:
        if self._soft_timer is not None:
            self._soft_timer.cancel()
            self._soft_timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None


class _StreamSession:
    """A chat session on a ``MessageStream`` (line framing), for ``serve_tcp``."""

    def __init__(self, stream: MessageStream, service: ChatService) -> None:
        self.stream = stream
        self.service = service
        self.session_id = 0
        self.ended = False
        self._soft_since: float | None = None

    def deliver(self, line: bytes, origin: Hashable) -> None:
        if origin == self.session_id or self.ended:
            return
        limits = self.service.limits
        buffered = self.stream.buffered_size + len(line)
        if buffered > limits.hard_limit or self._soft_expired(buffered):
            self._slow()
            return
        self.stream.send_queued(line.rstrip(b"\n"))

    def _soft_expired(self, buffered: int) -> bool:
        limits = self.service.limits
        now = asyncio.get_running_loop().time()
        if buffered <= limits.soft_limit:
            self._soft_since = None
            return False
        if self._soft_since is None:
            self._soft_since = now
        return now - self._soft_since >= limits.soft_time

    def _slow(self) -> None:
        self.ended = True
        self.service.close(self.session_id, SLOW_CONSUMER)
        self.stream.abort()

    def end(self, reason: str) -> None:
        self.ended = True
        self.stream.end_input()  # the handler's loop ends; the goodbye is still flushed

    def abort(self) -> None:
        self.ended = True
        self.stream.abort()

    async def wait_closed(self) -> None:
        return  # the server that runs the handler closes the connection


def chat_handler(service: ChatService) -> Handler:
    """Return a ``serve_tcp`` handler (use ``framing="line"``) that joins ``service``.

    The soft limit is checked as lines are delivered, so a consumer that stays over it
    is disconnected at the first delivery after ``soft_time`` (``ChatProtocol`` uses a
    timer instead).
    """

    async def handler(stream: MessageStream) -> None:
        session = _StreamSession(stream, service)
        session.session_id = service.open(session)
        try:
            async for line in stream:
                service.receive(session.session_id, line.decode("utf-8", "replace"))
        finally:
            service.close(session.session_id, "connection closed")

    return handler
