"""The echo service for handlers: ``echo_handler`` and ``upper_echo_handler`` for
``serve_tcp`` (any framing), ``udp_echo_handler`` and ``make_udp_echo_handler(mode)`` for
``serve_udp``.

netlib names handlers one way: a ``*_handler`` is a handler, passed as it is; a function
that builds one from options is ``make_*_handler(...)``.

The same replies as the minimal Protocols in ``netlib.aio.echo``, as handlers that run on
any transport netlib hands a ``MessageStream`` or a ``Datagram``.
"""

from __future__ import annotations

import time

from netlib.sansio.echo import EchoMode, EchoReplies
from netlib.streams import Datagram, DatagramHandler, MessageStream

__all__ = ["echo_handler", "make_udp_echo_handler", "udp_echo_handler", "upper_echo_handler"]


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
