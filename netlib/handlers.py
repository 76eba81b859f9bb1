"""Ready-made handlers for ``serve_tcp``: the echo services over any framing."""

from __future__ import annotations

from netlib.streams import MessageStream

__all__ = ["echo_handler", "upper_echo_handler"]


async def echo_handler(stream: MessageStream) -> None:
    """Send every message back unchanged until the peer finishes."""
    async for message in stream:
        await stream.send(message)


async def upper_echo_handler(stream: MessageStream) -> None:
    """Send every message back upper-cased (ASCII letters) until the peer finishes."""
    async for message in stream:
        await stream.send(message.upper())
