"""The echo service for handlers: ``echo_handler`` and ``upper_echo_handler`` for
``serve_tcp`` and ``serve_reliable_udp`` (any framing), ``udp_echo_handler`` and
``make_udp_echo_handler(mode)`` for ``serve_udp``; and the same stream echo as callbacks,
``EchoStreamProtocol`` and ``UpperEchoStreamProtocol``, for a server's ``protocol=``.

netlib names handlers one way: a ``*_handler`` is a handler, passed as it is; a function
that builds one from options is ``make_*_handler(...)``.

The same replies as the minimal Protocols in ``netlib.aio.echo``, as handlers that run on
any transport netlib hands a ``MessageStream`` or a ``Datagram``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from netlib.aio.stream import StreamProtocol
from netlib.errors import LimitExceeded, ProtocolError
from netlib.sansio.echo import EchoMode, EchoReplies
from netlib.sansio.framing import Framing
from netlib.sansio.stream import StreamLimits
from netlib.streams import DEFAULT_CLOSE_TIMEOUT, Datagram, DatagramHandler, MessageStream

__all__ = [
    "EchoStreamProtocol",
    "UpperEchoStreamProtocol",
    "echo_handler",
    "make_udp_echo_handler",
    "udp_echo_handler",
    "upper_echo_handler",
]


async def echo_handler(stream: MessageStream) -> None:
    """Send every message back unchanged until the peer finishes."""
    async for message in stream:
        await stream.send(message)
        del message  # not kept while waiting for the next one (a raw read is up to 64 KiB)


async def upper_echo_handler(stream: MessageStream) -> None:
    """Send every message back upper-cased (ASCII letters) until the peer finishes."""
    async for message in stream:
        await stream.send(message.upper())
        del message


async def udp_echo_handler(datagram: Datagram) -> None:
    """Send every datagram back unchanged to its source."""
    datagram.reply(datagram.data)


def make_udp_echo_handler(mode: EchoMode = "echo") -> DatagramHandler:
    """Return a UDP handler that answers like ``DatagramEchoProtocol(mode)``: ``"echo"``,
    ``"upper"`` or ``"timestamp"``."""
    make_reply = EchoReplies(mode, time.time).make

    async def echo(datagram: Datagram) -> None:
        datagram.reply(make_reply(datagram.data))

    return echo


class EchoStreamProtocol(StreamProtocol):
    """``echo_handler`` as callbacks: each message goes back as it is read, with no task
    per connection. A ``protocol`` factory for ``open_tcp_server``, ``serve_tcp``,
    ``open_reliable_udp_server`` and ``serve_reliable_udp``, any framing::

        await netlib.serve_reliable_udp(None, port=7000, protocol=netlib.EchoStreamProtocol)

    Everything else is the server's, as with a handler: limits, deadlines, the memory
    budget, graceful shutdown, statistics. While the peer does not read its echoes
    (writing is paused), messages wait in the queue, and reading stops at the read limit.

    A reply written in the callback leaves without the wake-up of a task (over reliable
    UDP with the request's acknowledgement, as a handler's does): with one message every
    10 ms, a fifth less server CPU per echo over TCP, a seventh over reliable UDP
    (``benchmarks/paced_echo.py``).
    """

    __slots__ = ("_closing",)

    def __init__(self, framing: Framing, limits: StreamLimits, **wiring: Any) -> None:
        super().__init__(framing, limits, **wiring)
        self._closing: asyncio.Future[None] | None = None

    def reply(self, message: bytes) -> bytes:
        """The reply to ``message`` (a subclass may change it)."""
        return message

    def messages_received(self) -> None:
        conn = self.conn
        encode = self.encoder
        try:
            while conn.frames and not self.write_paused:
                reply = self.reply(self.take())
                self.write(reply if encode is None else encode(reply))
        except LimitExceeded as exc:  # a line longer than reliable UDP's max_message
            self.fail(ProtocolError(f"a message's echo cannot be sent: {exc}"))  # counted
            return
        if conn.input_ended and not conn.frames and self._closing is None:
            # the peer finished, or the server ended the input: flush, then close (over TCP
            # after EOF, reading and dropping until the peer closes too, as for a handler)
            self._closing = self.finish_soon(DEFAULT_CLOSE_TIMEOUT)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.conn.frames:
            self.messages_received()


class UpperEchoStreamProtocol(EchoStreamProtocol):
    """``upper_echo_handler`` as callbacks: every message back upper-cased (ASCII)."""

    __slots__ = ()

    def reply(self, message: bytes) -> bytes:
        return message.upper()
