"""The chat service over UDP: DatagramChatProtocol.

Each line is one datagram. A new address gets a single ``*** hello <cookie>`` (a keyed hash
of the address: no state is kept for it) and becomes a session only after sending
``/hello <cookie>`` back, which proves the address is not forged. Verified peers are exempt
from the amplification cap but not from the per-address rate; unverified ones get at most
the UDP reply budget. Peers keep alive with empty datagrams and expire after
``peer_timeout`` seconds of silence; the peers table is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections.abc import Hashable
from typing import Any, Final, cast

from netlib.aio.logs import ThrottledLog
from netlib.sansio.datagram import ReplyBudget
from netlib.services.chat.service import ChatService

__all__ = ["CHAT_PEER_TIMEOUT", "MAX_UDP_PEERS", "UDP_CHAT_RATE", "DatagramChatProtocol"]

logger = logging.getLogger("netlib.services.chat")

CHAT_PEER_TIMEOUT: Final = 30.0
"""Seconds of silence after which a UDP chat peer expires (clients heartbeat every 5 s)."""
MAX_UDP_PEERS: Final = 10_000
"""UDP chat sessions at once; a verified address beyond it is told the server is full."""
UDP_CHAT_RATE: Final = 1000.0
"""Datagrams per second a UDP chat peer may be sent (burst twice that)."""


class _UdpPeer:
    """A verified UDP chat peer: a session whose lines are datagrams."""

    __slots__ = ("addr", "last_seen", "owner", "session_id")

    def __init__(self, owner: DatagramChatProtocol, addr: Any, now: float) -> None:
        self.owner = owner
        self.addr = addr
        self.last_seen = now
        self.session_id = 0

    def deliver(self, line: bytes, origin: Hashable) -> None:
        if origin != self.session_id:
            self.owner.send_line(line, self.addr)

    def end(self, reason: str) -> None:
        self.owner.forget(self.addr)

    def abort(self) -> None:
        self.owner.forget(self.addr)

    async def wait_closed(self) -> None:
        return


class DatagramChatProtocol(asyncio.DatagramProtocol):
    """A UDP chat endpoint: one line per datagram, cookie handshake, heartbeats.

    Args:
        service: the chat to join (default: ``ChatService.default()``).
        peer_timeout: seconds of silence after which a peer expires.
        max_peers: sessions at once.
        budget: the reply policy for every datagram sent (default: ``ReplyBudget`` with
            ``UDP_CHAT_RATE``; the amplification cap applies until an address is verified).
    """

    def __init__(
        self,
        service: ChatService | None = None,
        *,
        peer_timeout: float = CHAT_PEER_TIMEOUT,
        max_peers: int = MAX_UDP_PEERS,
        budget: ReplyBudget | None = None,
    ) -> None:
        self._service = service if service is not None else ChatService.default()
        self._loop = self._service._loop
        self._peer_timeout = peer_timeout
        self._max_peers = max_peers
        self._budget = budget or ReplyBudget(rate=UDP_CHAT_RATE, burst=2 * UDP_CHAT_RATE)
        self._secret = os.urandom(16)
        self._peers: dict[Any, _UdpPeer] = {}
        self._log = ThrottledLog(logger, self._loop)
        self.transport: asyncio.DatagramTransport | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.dropped = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._sweeper = self._loop.call_later(self._peer_timeout / 3, self._sweep)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = self._loop.time()
        self._budget.on_received(addr, len(data), now)
        peer = self._peers.get(addr)
        if peer is not None:
            peer.last_seen = now
            if data:  # an empty datagram is a heartbeat
                text = data.decode("utf-8", "replace").rstrip("\r\n")
                self._service.receive(peer.session_id, text)
            return
        self._handshake(data, addr, now)

    def _handshake(self, data: bytes, addr: Any, now: float) -> None:
        cookie = self._cookie(addr)
        if data.strip() != b"/hello " + cookie:
            self.send_line(b"*** hello " + cookie + b"\n", addr)
            return
        if len(self._peers) >= self._max_peers:
            self.send_line(b"!!! server full\n", addr)
            return
        self._budget.exempt(addr, now)
        peer = self._peers[addr] = _UdpPeer(self, addr, now)
        peer.session_id = self._service.open(peer)

    def _cookie(self, addr: Any) -> bytes:
        digest = hmac.new(self._secret, repr(addr).encode(), hashlib.sha256).hexdigest()
        return digest[:16].encode()

    def send_line(self, line: bytes, addr: Any) -> None:
        """Send one line as one datagram (without its line end), within the budget."""
        payload = line.rstrip(b"\n")
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._budget.try_send(addr, len(payload), self._loop.time()):
            self.dropped += 1
            return
        transport.sendto(payload, addr)

    def forget(self, addr: Any) -> None:
        """End the session of ``addr`` (after /quit, or when it expired)."""
        self._peers.pop(addr, None)

    def _sweep(self) -> None:
        deadline = self._loop.time() - self._peer_timeout
        for addr, peer in list(self._peers.items()):
            if peer.last_seen < deadline:
                del self._peers[addr]
                self._service.close(peer.session_id, "timed out")
        self._sweeper = self._loop.call_later(self._peer_timeout / 3, self._sweep)

    def error_received(self, exc: Exception) -> None:
        self._log.log(logging.INFO, "UDP chat: %r", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for peer in self._peers.values():
            self._service.close(peer.session_id, "server closed")
        self._peers.clear()

    @property
    def peers(self) -> int:
        """Sessions open now."""
        return len(self._peers)
