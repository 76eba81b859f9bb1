"""The chat service over TCP: ChatProtocol (served by ``open_chat_server``, or with
``loop.create_server``) and make_chat_handler (for ``serve_tcp``), one session class for both.

Both ride on netlib's one stream adapter (``StreamProtocol``) with line framing, and both use
``StreamChatSession``, so their limits are the same:

* A delivery is queued with ``write_soon``: one ``writelines`` per loop iteration (or at once
  past ``DEFAULT_FANOUT_FLUSH``), so a room's burst costs one system call per member, and the
  connection (its list, then its transport) is the outbound queue.
* **Hard limit**: a delivery that would take the member's unsent bytes past ``hard_limit``
  disconnects it as a slow consumer at once (it never holds more than the hard limit plus one
  line).
* **Soft limit**: the stream's high mark is ``soft_limit`` (low mark half of it); a member
  whose unsent bytes stay above it for ``soft_time`` seconds is cut off by the connection's
  send deadline (``StreamLimits.send_timeout``), as a slow consumer. The transport itself
  holds at most ``CHAT_TRANSPORT_HIGH``; the rest waits as references to the room's lines.
* A line must arrive whole within ``CHAT_LINE_TIMEOUT`` of its first byte (a peer trickling a
  line is cut off); a member who only reads is never timed out for that.
* A line above ``max_line_bytes`` is refused with a notice and skipped up to its line end
  (``LineFraming(skip_overlong=True)``): nothing above the limit is buffered, the member stays.
* **Flood control paces, it does not drop**: when a member's token bucket is empty its
  connection stops being read (``hold_input``) and its queued lines wait until the server's
  deadline timer says a token is there; the kernel's buffers and then the member's own
  ``send()`` absorb the rest. Queued input stays bounded by the stream's read limit.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Hashable
from typing import Any, Final

from netlib.aio.stream import StreamProtocol
from netlib.errors import BrokenResourceError, NetlibError, PeerTimedOut, SlowConsumer
from netlib.sansio.framing import OVERLONG_LINE, LineFraming
from netlib.sansio.stream import StreamLimits
from netlib.services.chat.service import (
    SHUTDOWN_NOTICE,
    SHUTDOWN_REASON,
    SLOW_CONSUMER,
    ChatLimits,
    ChatService,
    address_text,
    encode_line,
)
from netlib.streams import Handler, MessageStream

__all__ = [
    "CHAT_TRANSPORT_HIGH",
    "ChatProtocol",
    "StreamChatSession",
    "chat_framing",
    "chat_protocol_factory",
    "chat_stream_limits",
    "farewell",
    "make_chat_handler",
    "peer_host",
    "quit_reason",
]

CHAT_TRANSPORT_HIGH: Final = 64 * 1024
"""Bytes a member's transport holds at most (its high mark). Past it, the lines a member
has not taken wait in its connection's list as references to the room's one copy of each
line: asyncio before Python 3.12 copies what a transport holds into a ``bytearray`` per
connection, and at the 256 KiB soft limit 1,000 silent members held about 250 MiB of copies
(RSS +243 to +304 MiB against the 300 MiB row; +73 to +133 MiB with this mark)."""


def peer_host(stream: MessageStream) -> str | None:
    """The peer's IP address (the chat's per-host limits key), or None (Unix sockets)."""
    address = stream.remote_address
    return str(address[0]) if isinstance(address, tuple) else None


def chat_framing(limits: ChatLimits) -> LineFraming:
    """The framing of a TCP chat connection: lines of at most ``max_line_bytes``; a longer
    one is reported (``OVERLONG_LINE``) and skipped, never buffered."""
    return LineFraming(max_size=limits.max_line_bytes, skip_overlong=True)


def chat_stream_limits(limits: ChatLimits) -> StreamLimits:
    """The stream limits of a TCP chat connection: the soft limit is the write high mark
    (the send deadline runs above it), and the transport itself holds at most
    ``CHAT_TRANSPORT_HIGH``; the rest of a member's backlog waits as references to the
    room's lines (one copy for the whole room, not one per member)."""
    return StreamLimits(
        message_timeout=limits.line_timeout,
        send_timeout=limits.soft_time,
        write_high=limits.soft_limit,
        write_low=limits.soft_limit // 2,
        transport_high=min(CHAT_TRANSPORT_HIGH, limits.soft_limit),
    )


class StreamChatSession:
    """One chat member on a ``MessageStream``: delivers room lines within the limits.

    Args:
        stream: the member's connection.
        service: the chat.
        on_end: closes the connection gracefully when the chat ends the session (``/quit``,
            server shutdown).
    """

    __slots__ = ("_on_end", "_service", "_stream", "ended", "session_id")

    def __init__(
        self, stream: MessageStream, service: ChatService, on_end: Callable[[], None]
    ) -> None:
        self._stream = stream
        self._service = service
        self._on_end = on_end
        self.session_id = 0
        self.ended = False
        sock = stream.socket
        size = service.limits.socket_send_buffer
        if size is not None and sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def deliver(self, line: bytes, origin: Hashable) -> None:
        """Queue ``line`` unless it came from this member; never blocks."""
        if origin == self.session_id or self.ended:
            return
        size = self._stream.buffered_size + len(line)
        if size > self._service.limits.hard_limit:
            self._stream.abort()
            self.closed(SlowConsumer(f"hard limit: outbound buffer would reach {size} bytes"))
            return
        self._stream.send_framed(line)

    def end(self, reason: str) -> None:
        """Close this member's connection after flushing what is queued."""
        if reason == SHUTDOWN_REASON and not self.ended:
            self._stream.send_framed(SHUTDOWN_NOTICE, limit=0)
        self.ended = True
        self._on_end()

    def abort(self) -> None:
        """Close now, discarding what is queued."""
        self.ended = True
        self._stream.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed."""
        await self._stream.wait_closed()

    def closed(self, error: NetlibError | None) -> None:
        """The connection ended (with ``error``, if it failed): leave the chat, once."""
        if self.session_id == 0:
            return
        session_id, self.session_id = self.session_id, 0
        self.ended = True
        detail = "" if error is None else str(error)
        self._service.close(session_id, quit_reason(error), detail)


def quit_reason(error: NetlibError | None) -> str:
    """The reason a TCP member's rooms hear when its connection ended with ``error``."""
    if isinstance(error, SlowConsumer):
        return SLOW_CONSUMER
    if isinstance(error, PeerTimedOut):
        return "timed out"
    if isinstance(error, BrokenResourceError):
        return "connection lost"
    if error is not None:
        return f"protocol error: {error}"
    return "connection closed"


def farewell(error: NetlibError) -> bytes:
    """The last line a member cut off by the server gets, saying why."""
    return encode_line(f"*** disconnected: {quit_reason(error)} ({error})")


class ChatProtocol(StreamProtocol):
    """A TCP chat member for ``loop.create_server``: UTF-8 lines (CRLF tolerated), bounded
    outbound buffer; lines are handled as callbacks, with no task per member.

    Args:
        service: the chat to join (default: ``ChatService.default()``, one per loop).
        wiring: a server's deadline timer, memory budget and ``on_lost`` callback (see
            ``StreamProtocol``); ``chat_protocol_factory`` passes them.

    Works on its own: ``loop.create_server(ChatProtocol, host, port)``. ``open_chat_server``
    serves it on netlib's own ``Server`` (accept loop, caps, memory budget, shutdown).
    """

    __slots__ = ("_service", "session")

    def __init__(self, service: ChatService | None = None, **wiring: Any) -> None:
        self._service = service if service is not None else ChatService.default()
        limits = self._service.limits
        super().__init__(chat_framing(limits), chat_stream_limits(limits), **wiring)
        self.session: StreamChatSession | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stream = MessageStream(self)
        self.session = StreamChatSession(stream, self._service, self.close)
        self.session.session_id = self._service.open(
            self.session, source=peer_host(stream), address=address_text(stream.remote_address)
        )

    def messages_received(self) -> None:
        session, conn = self.session, self.conn
        if session is None:
            return
        service = self._service
        while conn.frames:
            if session.session_id and (wait := service.flood_wait(session.session_id)) > 0:
                # Flood control: stop reading this member and let its lines wait, as IRC
                # servers do; the deadline timer calls this again when a token is there.
                self.hold_input(self._loop.time() + wait)
                return
            receive_line(service, session.session_id, conn.take())
        self.resume()
        if conn.input_ended and session.session_id:
            session.closed(conn.error)
            # The peer finished (or broke off a line at its EOF): flush, then close. A
            # connection cut off by a deadline or the budget is being aborted already.
            self.close()

    def fail(self, error: NetlibError) -> None:
        """Cut off by the server (a deadline, the memory budget): tell the member why first,
        if its transport can take the line at once. A slow consumer's buffer is not empty,
        so it does not get the line: nothing is queued beyond the outbound limits."""
        transport = self.transport
        if (
            self.conn.error in (None, error)  # a deadline has recorded it already
            and not self.lost
            and transport is not None
            and not transport.is_closing()
            and not self.buffered_size()
        ):
            transport.write(farewell(error))
        super().fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.session is not None:
            self.session.closed(self.conn.error)


def receive_line(service: ChatService, session_id: int, line: bytes) -> None:
    """Hand one line read from a TCP member to the chat (``OVERLONG_LINE``: refused)."""
    if line is OVERLONG_LINE:
        service.receive_overlong(session_id)
    else:
        service.receive(session_id, line.decode("utf-8", "replace"))


def chat_protocol_factory(service: ChatService) -> Callable[..., ChatProtocol]:
    """Return a ``protocol`` factory for ``open_tcp_server`` that serves ``service``
    (with ``framing=chat_framing(...)`` and the limits of ``chat_stream_limits``)."""

    def protocol(_framing: object, _limits: object, **wiring: Any) -> ChatProtocol:
        return ChatProtocol(service, **wiring)

    return protocol


def make_chat_handler(service: ChatService) -> Handler:
    """Return a ``serve_tcp`` handler that joins ``service``.

    Serve it with ``framing=chat_framing(service.limits)`` and the stream limits of
    ``chat_stream_limits`` (``open_chat_server`` does both).
    """

    async def handler(stream: MessageStream) -> None:
        session = StreamChatSession(stream, service, stream.end_input)
        session.session_id = service.open(
            session, source=peer_host(stream), address=address_text(stream.remote_address)
        )
        error: NetlibError | None = None
        try:
            async for line in stream:
                if (wait := service.flood_wait(session.session_id)) > 0:
                    await asyncio.sleep(wait)  # flood control: the member's lines wait
                receive_line(service, session.session_id, line)
        except NetlibError as exc:
            error = exc
        finally:
            session.closed(error)

    return handler
