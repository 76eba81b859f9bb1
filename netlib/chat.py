"""open_chat_server / serve_chat: the chat service over TCP, UDP or both.

The rooms live in a ``ChatService`` (``netlib.services.chat``); TCP clients are
``ChatProtocol`` connections (line based, usable from ``nc`` and ``telnet``) on netlib's
``Server``, UDP clients are peers of a ``DatagramChatProtocol``. One service can serve
both at once, and they share its rooms.
``make_chat_handler(service)`` runs the same chat as a ``serve_tcp`` handler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from netlib.aio.sockets import DatagramSocketOptions, open_datagram_socket
from netlib.server import DEFAULT_MAX_CONNECTIONS_PER_HOST, Server, open_tcp_server
from netlib.services.chat import ChatService, DatagramChatProtocol
from netlib.services.chat.service import CHAT_CLOSE_GRACE
from netlib.services.chat.tcp import chat_framing, chat_protocol_factory, chat_stream_limits

__all__ = ["ChatServer", "open_chat_server", "serve_chat"]

ChatProto = Literal["tcp", "udp", "both"]


@dataclass
class ChatServer:
    """A running chat server (from ``open_chat_server``).

    Attributes:
        service: the chat (rooms, sessions, statistics).
        tcp: the TCP ``Server`` (connection statistics), when serving TCP.
        tcp_addresses: bound TCP addresses (empty when not serving TCP).
        udp_addresses: bound UDP addresses (empty when not serving UDP).
    """

    service: ChatService
    tcp: Server | None = None
    tcp_addresses: list[Any] = field(default_factory=list)
    udp_addresses: list[Any] = field(default_factory=list)
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    def close(self) -> None:
        """Make ``serve_forever`` return; the ``async with`` block then closes everything."""
        self._closed.set()

    async def serve_forever(self) -> None:
        """Wait until ``close()`` (or cancel this)."""
        await self._closed.wait()


@asynccontextmanager
async def open_chat_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    proto: ChatProto = "tcp",
    udp_port: int | None = None,
    service: ChatService | None = None,
    max_connections_per_host: int | None = DEFAULT_MAX_CONNECTIONS_PER_HOST,
) -> AsyncIterator[ChatServer]:
    """Serve a chat on ``host``:``port`` (TCP and/or UDP) for the ``async with`` block.

    Args:
        host: address to bind (default loopback).
        port: TCP port, and UDP port too unless ``udp_port`` is given (0: a free port).
        proto: ``"tcp"``, ``"udp"`` or ``"both"`` (sharing one set of rooms).
        udp_port: UDP port when it must differ from ``port``.
        service: the chat to serve (default: a new ``ChatService`` with a ``MemoryHub``).
        max_connections_per_host: cap on TCP members from one IP address (default 256;
            None: no cap, for members behind one proxy or NAT).
    """
    loop = asyncio.get_running_loop()
    own_service = service is None
    chat = service if service is not None else ChatService()
    server = ChatServer(chat)
    async with AsyncExitStack() as stack:
        if proto in ("tcp", "both"):
            # Members are ChatProtocol connections on netlib's Server: lines are handled
            # as callbacks (no task per member), with the accept loop, caps, memory
            # budget and shutdown of every netlib server.
            # The server's stream limits are its members' own (no first-message or idle
            # deadline: a member may only listen, and keepalive notices a vanished one).
            tcp = await stack.enter_async_context(
                open_tcp_server(
                    None,
                    host,
                    port,
                    protocol=chat_protocol_factory(chat),
                    framing=chat_framing(chat.limits),
                    **asdict(chat_stream_limits(chat.limits)),
                    shutdown_grace=CHAT_CLOSE_GRACE,
                    max_connections_per_host=max_connections_per_host,
                )
            )
            server.tcp = tcp
            server.tcp_addresses = list(tcp.addresses)
        # The chat closes first: members hear the server is going, then the servers stop.
        stack.push_async_callback(chat.aclose if own_service else chat.close_sessions)
        if proto in ("udp", "both"):
            if udp_port is None:
                udp_port = server.tcp_addresses[0][1] if server.tcp_addresses else port
            sock = await open_datagram_socket(DatagramSocketOptions(local=(host, udp_port)))
            transport, _ = await loop.create_datagram_endpoint(
                lambda: DatagramChatProtocol(chat), sock=sock
            )
            stack.callback(transport.close)
            # Callbacks run last in, first out: UDP peers too hear the server is going
            # before their transport closes.
            stack.push_async_callback(chat.close_sessions)
            server.udp_addresses = [transport.get_extra_info("sockname")]
        yield server


async def serve_chat(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    proto: ChatProto = "tcp",
    udp_port: int | None = None,
    service: ChatService | None = None,
) -> None:
    """Serve a chat until cancelled. Takes the same arguments as ``open_chat_server``."""
    async with open_chat_server(
        host, port, proto=proto, udp_port=udp_port, service=service
    ) as server:
        await server.serve_forever()
