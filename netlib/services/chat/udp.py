"""The chat service over UDP: DatagramChatProtocol, the adapter of ``UdpChatCore``.

Each line is one datagram. The sans-I/O ``UdpChatCore`` (``netlib.sansio.chat_udp``) runs
the cookie handshake, the bounded peer table and the reply budget; this protocol feeds it
datagrams and the loop's clock, sends what it allows, opens and closes the chat sessions of
its peers, and runs its expiry sweep on a timer. A new address sends ``/hello`` padded to at
least ``HELLO_REPLY_SIZE`` bytes, gets ``*** hello <cookie>`` (with what to send back, if
the request was at least ``HELLO_GUIDE_SIZE`` bytes) and becomes a session after sending
``/hello <cookie>`` back. Every datagram sent is one line ending in ``\\n``; at shutdown each
peer gets ``*** server shutting down``. Peers keep alive with empty datagrams (or the padded hello)
and expire after ``peer_timeout`` seconds of silence.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Hashable
from typing import Any

from netlib.aio.datagram import DatagramEndpointProtocol, DatagramLimits
from netlib.sansio.chat_udp import (
    CHAT_PEER_TIMEOUT,
    MAX_UDP_PEERS,
    MAX_UDP_PEERS_PER_HOST,
    UDP_CHAT_RATE,
    PeerJoined,
    PeerLine,
    SendDatagram,
    UdpChatCore,
    UdpChatStatistics,
)
from netlib.sansio.datagram import ReplyBudget
from netlib.services.chat.service import (
    SHUTDOWN_NOTICE,
    SHUTDOWN_REASON,
    ChatService,
    address_text,
)

__all__ = [
    "CHAT_PEER_TIMEOUT",
    "MAX_UDP_PEERS",
    "MAX_UDP_PEERS_PER_HOST",
    "UDP_CHAT_RATE",
    "DatagramChatProtocol",
]


class _UdpPeer:
    """A verified UDP chat peer: a session whose lines are datagrams."""

    __slots__ = ("addr", "owner", "session_id")

    def __init__(self, owner: DatagramChatProtocol, addr: Any) -> None:
        self.owner = owner
        self.addr = addr
        self.session_id = 0

    def deliver(self, line: bytes, origin: Hashable) -> None:
        if origin != self.session_id:
            self.owner.send_line(line, self.addr)

    def end(self, reason: str) -> None:
        if reason == SHUTDOWN_REASON:
            self.owner.send_line(SHUTDOWN_NOTICE, self.addr)
        self.owner.forget(self.addr)
        self.owner.service.close(self.session_id, reason)  # a no-op after /quit

    def abort(self) -> None:
        self.owner.forget(self.addr)

    async def wait_closed(self) -> None:
        return


class DatagramChatProtocol(DatagramEndpointProtocol):
    """A UDP chat endpoint: one line per datagram, cookie handshake, heartbeats.

    It consumes datagrams on netlib's one datagram adapter (``DatagramEndpointProtocol``),
    so the size policy, the ICMP policy and the counted send drops (a full socket buffer
    drops a delivery rather than buffering it) are those of every netlib UDP endpoint.

    Args:
        service: the chat to join (default: ``ChatService.default()``).
        peer_timeout: seconds of silence after which a peer expires.
        max_peers: sessions at once.
        max_peers_per_host: sessions from one host (IP address) at once.
        budget: the reply policy for every datagram sent (default: ``UDP_CHAT_RATE`` per
            peer; an unverified address is never sent more than it sent).
        limits: datagram size and send-buffer limits.
    """

    def __init__(
        self,
        service: ChatService | None = None,
        *,
        peer_timeout: float = CHAT_PEER_TIMEOUT,
        max_peers: int = MAX_UDP_PEERS,
        max_peers_per_host: int = MAX_UDP_PEERS_PER_HOST,
        budget: ReplyBudget | None = None,
        limits: DatagramLimits | None = None,
    ) -> None:
        super().__init__(limits or DatagramLimits())
        self.service = service if service is not None else ChatService.default()
        self.core = UdpChatCore(
            os.urandom(16),
            peer_timeout=peer_timeout,
            max_peers=max_peers,
            max_peers_per_host=max_peers_per_host,
            budget=budget,
        )
        self._sessions: dict[Any, _UdpPeer] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.consumer = self._consume

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sweeper = self._loop.call_later(self.core.sweep_interval, self._sweep)

    def _consume(self, data: bytes, addr: Any) -> bool:
        match self.core.datagram_received(data, addr, self._loop.time()):
            case PeerLine(text=text):
                peer = self._sessions.get(addr)
                if peer is not None:
                    self.service.receive(peer.session_id, text)
            case SendDatagram(data=reply):
                self.sendto(reply, addr)
            case PeerJoined():
                peer = self._sessions[addr] = _UdpPeer(self, addr)
                peer.session_id = self.service.open(peer, address=f"{address_text(addr)} (udp)")
        return True  # every datagram is the chat's: nothing is queued

    def send_line(self, line: bytes, addr: Any) -> None:
        """Send one line (with its ``\\n``, so lines never run together in ``nc -u``) as one
        datagram, within the budget."""
        if self.core.send(line, addr, self._loop.time()):
            self.sendto(line, addr)

    def forget(self, addr: Any) -> None:
        """End the session of ``addr`` (after /quit, or when it expired)."""
        self._sessions.pop(addr, None)
        self.core.forget(addr)

    def _sweep(self) -> None:
        for addr in self.core.handle_timer(self._loop.time()):
            peer = self._sessions.pop(addr, None)
            if peer is not None:
                self.service.close(peer.session_id, "timed out")
        self._sweeper = self._loop.call_later(self.core.sweep_interval, self._sweep)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._sweeper is not None:
            self._sweeper.cancel()
        sessions, self._sessions = self._sessions, {}
        for peer in sessions.values():
            self.core.forget(peer.addr)
            self.service.close(peer.session_id, "server closed")

    @property
    def peers(self) -> int:
        """Sessions open now."""
        return self.core.peers

    @property
    def dropped(self) -> int:
        """Datagrams the reply budget refused."""
        return self.core.replies_dropped

    def chat_statistics(self) -> UdpChatStatistics:
        """Return a snapshot of the chat's counters (handshakes, drops, peers, budget);
        ``statistics()`` gives the endpoint's (sent, received, send drops)."""
        return self.core.statistics()
