"""open_chat_server / serve_chat: the chat service over TCP, UDP, both, or reliable UDP.

The rooms live in a ``ChatService`` (``netlib.services.chat``); TCP clients are
``ChatProtocol`` connections (line based, usable from ``nc`` and ``telnet``) on netlib's
``Server``, UDP clients are peers of a ``DatagramChatProtocol``, reliable-UDP clients are
the same ``ChatProtocol`` on a reliable-UDP server (one line per message). One service can
serve TCP and UDP at once, and they share its rooms.
``make_chat_handler(service)`` runs the same chat as a ``serve_tcp`` handler.
``open_chat_server(nats=URL)`` makes the server one node of a chat cluster: its rooms,
nicks, ``/who`` and ``/list`` are shared with every server on the same NATS (``NatsHub``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from netlib.aio.sockets import DatagramSocketOptions, open_datagram_socket
from netlib.rudp import ReliableUDPServer, open_reliable_udp_server
from netlib.sansio.stream import StreamLimits
from netlib.server import DEFAULT_MAX_CONNECTIONS_PER_HOST, Server, open_tcp_server
from netlib.services.chat import ChatService, DatagramChatProtocol
from netlib.services.chat.service import CHAT_CLOSE_GRACE, encode_line
from netlib.services.chat.tcp import chat_framing, chat_protocol_factory, chat_stream_limits
from netlib.services.nats_hub import NatsHub, NatsHubConfig

__all__ = ["ChatServer", "open_chat_server", "serve_chat"]

logger = logging.getLogger("netlib.chat")

ChatProto = Literal["tcp", "udp", "both", "rudp"]


@dataclass
class ChatServer:
    """A running chat server (from ``open_chat_server``).

    Attributes:
        service: the chat (rooms, sessions, statistics).
        tcp: the TCP ``Server`` (connection statistics), when serving TCP.
        tcp_addresses: bound TCP addresses (empty when not serving TCP).
        udp_addresses: bound UDP addresses (empty when not serving UDP).
        udp: the UDP endpoint (``chat_statistics()``: handshakes, drops), when serving UDP.
        rudp: the reliable-UDP server, when serving reliable UDP (``rudp_addresses``).

    ``summary()`` gives every counter as one line; ``open_chat_server`` logs it (logger
    ``netlib.chat``, info level) when the server has closed.
    """

    service: ChatService
    tcp: Server | None = None
    tcp_addresses: list[Any] = field(default_factory=list)
    udp_addresses: list[Any] = field(default_factory=list)
    udp: DatagramChatProtocol | None = None
    rudp: ReliableUDPServer | None = None
    rudp_addresses: list[Any] = field(default_factory=list)
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    def summary(self) -> str:
        """The chat's, the TCP server's and the UDP endpoint's counters, as one line."""
        parts = [f"chat: {self.service.summary()}"]
        if isinstance(self.service.hub, NatsHub):
            parts.append(self.service.hub.summary())
        if self.tcp is not None:
            tcp = self.tcp.statistics()
            parts.append(
                f"tcp: {tcp.accepted} accepted, {tcp.active} open, "
                f"{tcp.rejected + tcp.rejected_per_host} rejected at the connection caps, "
                f"{tcp.timeouts} timed out, {tcp.protocol_errors} protocol errors, "
                f"{tcp.resets} reset, {tcp.slow_consumers} slow consumers"
            )
        if self.udp is not None:
            udp = self.udp.chat_statistics()
            parts.append(
                f"udp: {udp.joined} joined, {udp.peers} open, {udp.expired} timed out, "
                f"{udp.cookies_sent} cookies sent, {udp.dropped_unverified} unverified "
                f"datagrams dropped, {udp.replies_dropped} replies dropped"
            )
        if self.rudp is not None:
            rudp = self.rudp.statistics()
            parts.append(
                f"rudp: {rudp.accepted} accepted, {rudp.active} open, "
                f"{rudp.timeouts} timed out, {rudp.resets} reset, "
                f"{rudp.retransmissions} retransmissions, {rudp.cookies_sent} cookies sent"
            )
        return "; ".join(parts)

    def close(self) -> None:
        """Make ``serve_forever`` return; the ``async with`` block then closes everything."""
        self._closed.set()

    async def serve_forever(self) -> None:
        """Wait until ``close()`` (or cancel this)."""
        await self._closed.wait()


def _rudp_limits(limits: StreamLimits) -> dict[str, Any]:
    """``limits`` as ``open_reliable_udp_server`` arguments: its transport queues messages
    by reference already, so it has no ``transport_high``."""
    options = asdict(limits)
    del options["transport_high"]
    return options


def _reject_notice(reason: str) -> bytes:
    """The line a TCP connection closed by a connection cap gets."""
    return encode_line(f"*** disconnected: {reason}")


@asynccontextmanager
async def open_chat_server(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    proto: ChatProto = "tcp",
    udp_port: int | None = None,
    service: ChatService | None = None,
    max_connections_per_host: int | None = DEFAULT_MAX_CONNECTIONS_PER_HOST,
    reuse_port: bool = False,
    nats: str | Sequence[str] | None = None,
    nats_config: NatsHubConfig | None = None,
) -> AsyncIterator[ChatServer]:
    """Serve a chat on ``host``:``port`` (TCP and/or UDP) for the ``async with`` block.

    Args:
        host: address to bind (default loopback).
        port: TCP port, and UDP port too unless ``udp_port`` is given (0: a free port).
        proto: ``"tcp"``, ``"udp"`` or ``"both"`` (sharing one set of rooms), or
            ``"rudp"`` (reliable UDP on ``port``: one line per message).
        udp_port: UDP port when it must differ from ``port``.
        service: the chat to serve (default: a new ``ChatService`` with a ``MemoryHub``).
        max_connections_per_host: cap on TCP members from one IP address (default 256;
            None: no cap, for members behind one proxy or NAT).
        reuse_port: bind TCP with SO_REUSEPORT, so several processes serve one port (their
            members share rooms only through a shared hub).
        nats: NATS server URL(s): the server becomes a node of the chat cluster on that
            NATS (a ``ChatService`` on a ``NatsHub``; needs ``netlib[nats]``).
        nats_config: the cluster's names and limits (``NatsHubConfig``), with ``nats``.

    Raises:
        ServiceUnavailable: ``nats`` was given and NATS cannot be reached.
        ValueError: both ``nats`` and ``service`` were given.
    """
    if nats is not None and service is not None:
        raise ValueError("give open_chat_server a service or a NATS URL, not both")
    loop = asyncio.get_running_loop()
    own_service = service is None
    async with AsyncExitStack() as stack:
        if nats is not None:
            hub = NatsHub(nats, config=nats_config)
            await hub.start()
            stack.push_async_callback(hub.aclose)
            chat = ChatService(hub=hub)
        else:
            chat = service if service is not None else ChatService()
        server = ChatServer(chat)
        served = False

        def log_statistics() -> None:  # runs last: the statistics of the whole run
            if served:  # not for a server that could not start (a port in use, say)
                logger.info("chat statistics: %s", server.summary())

        stack.callback(log_statistics)
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
                    reject_notice=_reject_notice,
                    reuse_port=reuse_port,
                )
            )
            server.tcp = tcp
            server.tcp_addresses = list(tcp.addresses)
        if proto == "rudp":
            rudp = await stack.enter_async_context(
                open_reliable_udp_server(
                    None,
                    host,  # None: IPv4 and IPv6, on one dual-stack socket
                    port,
                    protocol=chat_protocol_factory(chat),
                    framing=chat_framing(chat.limits),
                    **_rudp_limits(chat_stream_limits(chat.limits)),
                    shutdown_grace=CHAT_CLOSE_GRACE,
                )
            )
            server.rudp = rudp
            server.rudp_addresses = list(rudp.addresses)
        # The chat closes first: members hear the server is going, then the servers stop.
        stack.push_async_callback(chat.aclose if own_service else chat.close_sessions)
        if proto in ("udp", "both"):
            if udp_port is None:
                udp_port = server.tcp_addresses[0][1] if server.tcp_addresses else port
            sock = await open_datagram_socket(DatagramSocketOptions(local=(host, udp_port)))
            transport, server.udp = await loop.create_datagram_endpoint(
                lambda: DatagramChatProtocol(chat), sock=sock
            )
            stack.callback(transport.close)
            # Callbacks run last in, first out: UDP peers too hear the server is going
            # before their transport closes.
            stack.push_async_callback(chat.close_sessions)
            server.udp_addresses = [transport.get_extra_info("sockname")]
        served = True
        yield server


async def serve_chat(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    proto: ChatProto = "tcp",
    udp_port: int | None = None,
    service: ChatService | None = None,
    nats: str | Sequence[str] | None = None,
) -> None:
    """Serve a chat until cancelled. Takes the same arguments as ``open_chat_server``."""
    async with open_chat_server(
        host, port, proto=proto, udp_port=udp_port, service=service, nats=nats
    ) as server:
        await server.serve_forever()
