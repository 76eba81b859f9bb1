"""Chat over TCP and UDP: ChatService, ChatProtocol and DatagramChatProtocol.

Theory of operation
-------------------
A ``ChatService`` owns one ``ChatCore`` (nicks, rooms, commands) and a ``Hub`` (room
fan-out). Connections are *sessions*: they feed decoded lines to the service and receive
lines through ``deliver()``. The core's effects are carried out by one task per service,
in the order the core produced them, so a publisher's lines reach every room member in
order even when the hub is asynchronous (a broker); ``MemoryHub`` completes each step
without suspending.

Fairness to the room comes from never waiting on a consumer:

* TCP (``ChatProtocol``): a delivery is appended to the connection's pending list and
  written with one ``writelines`` per loop iteration (or as soon as 64 KiB are pending).
  The transport's buffer is the outbound queue. A connection whose buffer would pass
  ``hard_limit`` is disconnected with reason ``slow_consumer`` at once (so it never holds
  more than the hard limit plus one line); one whose buffer stays above ``soft_limit``
  for ``soft_time`` seconds (the transport's pause/resume callbacks, low mark half the
  soft limit) is disconnected too. The kernel's socket buffers come first: on loopback
  they absorb a few MiB before netlib's limits start to count.
* UDP (``DatagramChatProtocol``): each line is one datagram. A new address gets a single
  ``*** hello <cookie>`` (a keyed hash of the address: no state is kept for it) and
  becomes a session only after sending ``/hello <cookie>`` back, which proves the address
  is not forged. Verified peers are exempt from the amplification cap but not from the
  per-address rate; unverified ones get at most the UDP reply budget. Peers keep alive
  with empty datagrams and expire after ``peer_timeout`` seconds of silence; the peers
  table is bounded.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import os
import socket
import weakref
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Protocol, cast

from netlib.aio.hub import Hub, MemoryHub
from netlib.aio.logs import ThrottledLog
from netlib.errors import ProtocolError
from netlib.sansio.chat import (
    FLOOD_BURST,
    FLOOD_RATE,
    Broadcast,
    ChatCore,
    Close,
    Effect,
    Joined,
    Left,
    Send,
)
from netlib.sansio.datagram import ReplyBudget
from netlib.sansio.framing import LineFraming

__all__ = [
    "CHAT_CLOSE_GRACE",
    "CHAT_HARD_LIMIT",
    "CHAT_MAX_LINE_BYTES",
    "CHAT_PEER_TIMEOUT",
    "CHAT_SOCKET_SEND_BUFFER",
    "CHAT_SOFT_LIMIT",
    "CHAT_SOFT_TIME",
    "MAX_UDP_PEERS",
    "ChatLimits",
    "ChatProtocol",
    "ChatService",
    "ChatServiceStatistics",
    "DatagramChatProtocol",
]

logger = logging.getLogger("netlib.aio.chat")

CHAT_SOFT_LIMIT: Final = 256 * 1024
"""Outbound bytes a chat connection may hold for ``CHAT_SOFT_TIME`` seconds at most."""
CHAT_SOFT_TIME: Final = 10.0
"""Seconds a connection may stay above the soft limit before it is disconnected."""
CHAT_HARD_LIMIT: Final = 1024 * 1024
"""Outbound bytes at which a chat connection is disconnected at once."""
CHAT_SOCKET_SEND_BUFFER: Final = 128 * 1024
"""SO_SNDBUF of a chat connection: bounds what the kernel holds for a slow reader (Linux
doubles it), so the outbound limits start to count after at most this much, not after the
several MiB loopback autotuning allows. None leaves the kernel's autotuning on."""
CHAT_MAX_LINE_BYTES: Final = 16 * 1024
"""Longest line read from a TCP chat client, in bytes; a longer one ends the connection."""
CHAT_PEER_TIMEOUT: Final = 30.0
"""Seconds of silence after which a UDP chat peer expires (clients heartbeat every 5 s)."""
MAX_UDP_PEERS: Final = 10_000
"""UDP chat sessions at once; a verified address beyond it is told the server is full."""
UDP_CHAT_RATE: Final = 1000.0
"""Datagrams per second a UDP chat peer may be sent (burst twice that)."""
FLUSH_THRESHOLD: Final = 64 * 1024
"""Pending outbound bytes at which a chat connection writes at once, not at loop end."""
CHAT_CLOSE_GRACE: Final = 5.0
"""Seconds a closing chat server waits for connections to flush before aborting them."""
SLOW_CONSUMER: Final = "slow_consumer"


@dataclass(frozen=True, slots=True)
class ChatLimits:
    """Per-connection outbound limits and per-client flood control of a chat service."""

    soft_limit: int = CHAT_SOFT_LIMIT
    soft_time: float = CHAT_SOFT_TIME
    hard_limit: int = CHAT_HARD_LIMIT
    flood_rate: float = FLOOD_RATE
    flood_burst: int = FLOOD_BURST
    max_line_bytes: int = CHAT_MAX_LINE_BYTES
    socket_send_buffer: int | None = CHAT_SOCKET_SEND_BUFFER

    def __post_init__(self) -> None:
        if not 0 < self.soft_limit <= self.hard_limit:
            raise ValueError(f"need 0 < soft_limit <= hard_limit, got {self}")


@dataclass(frozen=True, slots=True)
class ChatServiceStatistics:
    """Counters of a chat service (a snapshot).

    Attributes:
        sessions: sessions open now.
        opened: sessions opened since start.
        lines_received: lines handed to the chat core.
        slow_consumers: sessions disconnected as slow consumers.
        flood_dropped: lines dropped by flood control.
        effect_errors: effects that failed (a hub error, say), logged and skipped.
    """

    sessions: int
    opened: int
    lines_received: int
    slow_consumers: int
    flood_dropped: int
    effect_errors: int


class Session(Protocol):
    """One chat client as the service sees it."""

    session_id: int

    def deliver(self, line: bytes, origin: Hashable) -> None: ...

    def end(self, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class _Forget:
    """Internal effect: a closed session's Left effects are done; drop it."""

    client: int


def encode_line(text: str) -> bytes:
    return text.encode("utf-8", "replace") + b"\n"


class ChatService:
    """One chat: a ``ChatCore``, a hub, and the sessions of this process.

    Args:
        hub: room fan-out (default: a new ``MemoryHub``).
        limits: outbound limits and flood control.

    Use ``ChatProtocol(service)`` with ``loop.create_server`` and
    ``DatagramChatProtocol(service)`` with ``loop.create_datagram_endpoint``; TCP and UDP
    clients of one service share its rooms.
    """

    _defaults: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ChatService]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, *, hub: Hub | None = None, limits: ChatLimits | None = None) -> None:
        self.limits = limits or ChatLimits()
        self.hub: Hub = hub if hub is not None else MemoryHub()
        self.core = ChatCore(
            flood_rate=self.limits.flood_rate, flood_burst=self.limits.flood_burst
        )
        self._loop = asyncio.get_running_loop()
        self._sessions: dict[int, Session] = {}
        self._gone: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._effects: deque[Effect | _Forget] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._worker = self._loop.create_task(self._run())
        self._errors_log = ThrottledLog(logger, self._loop)
        self.opened = self.slow_consumers = self._errors = 0

    @classmethod
    def default(cls) -> ChatService:
        """The service shared by protocols created without one, per event loop."""
        loop = asyncio.get_running_loop()
        service = cls._defaults.get(loop)
        if service is None or service._worker.done():
            service = cls._defaults[loop] = cls()
        return service

    # -- sessions ---------------------------------------------------------------------------

    def open(self, session: Session) -> int:
        """Register ``session``; it lands in the default room. Returns its id."""
        session_id = next(self._ids)
        self._sessions[session_id] = session
        self.opened += 1
        self._schedule(self.core.connect(session_id, self._loop.time()))
        return session_id

    def receive(self, session_id: int, text: str) -> None:
        """Hand one decoded line from ``session_id`` to the chat core."""
        self._schedule(self.core.receive_line(session_id, text, self._loop.time()))

    def close(self, session_id: int, reason: str) -> None:
        """Forget ``session_id`` (idempotent); its rooms hear it left with ``reason``."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        if reason == SLOW_CONSUMER:
            self.slow_consumers += 1
        self._gone[session_id] = session  # until its Left effects are carried out
        self._schedule([*self.core.disconnect(session_id, reason), _Forget(session_id)])

    def statistics(self) -> ChatServiceStatistics:
        """Return a snapshot of the counters."""
        core = self.core.statistics()
        return ChatServiceStatistics(
            sessions=len(self._sessions),
            opened=self.opened,
            lines_received=core.lines_received,
            slow_consumers=self.slow_consumers,
            flood_dropped=core.lines_flood_dropped,
            effect_errors=self._errors,
        )

    async def close_sessions(self, grace: float = CHAT_CLOSE_GRACE) -> None:
        """Tell every session the server is going, close them, abort what is left.

        Waits at most ``grace`` seconds for TCP connections to flush and close.
        """
        sessions = list(self._sessions.values())
        for session in sessions:
            session.end("server shutting down")
        waits = [s.wait_closed() for s in sessions if isinstance(s, ChatProtocol)]
        if waits:
            tasks = [asyncio.ensure_future(w) for w in waits]
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for session in sessions:
                if isinstance(session, ChatProtocol):
                    session.abort()
            await asyncio.wait(tasks)

    async def aclose(self) -> None:
        """Close every session, stop carrying out effects and close the hub."""
        await self.close_sessions()
        self._worker.cancel()
        await asyncio.wait([self._worker])
        await self.hub.aclose()

    # -- effects, in order ------------------------------------------------------------------

    def _schedule(self, effects: Sequence[Effect | _Forget]) -> None:
        if not effects:
            return
        self._effects.extend(effects)
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _run(self) -> None:
        effects = self._effects
        while True:
            while effects:
                effect = effects.popleft()
                try:
                    await self._carry_out(effect)
                except Exception:  # one failed effect (a hub error) must not stop the chat
                    self._errors += 1
                    self._errors_log.exception("chat effect %r failed", effect)
            self._wakeup = self._loop.create_future()
            await self._wakeup
            self._wakeup = None

    async def _carry_out(self, effect: Effect | _Forget) -> None:
        match effect:
            case Broadcast(room, text, exclude):
                await self.hub.publish(room, encode_line(text), exclude)
            case Send(client, text):
                session = self._sessions.get(client)
                if session is not None:
                    session.deliver(encode_line(text), None)
            case Joined(client, room):
                await self._subscription(client, room, join=True)
            case Left(client, room):
                await self._subscription(client, room, join=False)
            case Close(client, reason):
                session = self._sessions.pop(client, None)
                if session is not None:
                    session.end(reason)
            case _Forget(client):
                self._gone.pop(client, None)

    async def _subscription(self, client: int, room: str, *, join: bool) -> None:
        session = self._sessions.get(client) or self._gone.get(client)
        if session is None:
            return
        if join:
            await self.hub.join(room, session)
        else:
            await self.hub.leave(room, session)


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
