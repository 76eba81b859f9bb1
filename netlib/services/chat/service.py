"""The chat service: ChatService, its limits and its statistics.

Theory of operation
-------------------
A ``ChatService`` owns one ``ChatCore`` (nicks, rooms, commands) and a ``Hub`` (room
fan-out). Connections are *sessions*: they feed decoded lines to the service and receive
lines through ``deliver()``. The core's effects are carried out by one task per service,
in the order the core produced them, so a publisher's lines reach every room member in
order even when the hub is asynchronous (a broker); ``MemoryHub`` completes each step
without suspending.

Fairness to the room comes from never waiting on a consumer: ``deliver()`` queues a line
or cuts the member off as a slow consumer, it never blocks. TCP members are sessions of
``netlib.services.chat.tcp`` (one session class under ``ChatProtocol`` and
``make_chat_handler``), UDP members of ``DatagramChatProtocol`` (``netlib.services.chat.udp``).

**A node of a cluster.** When the hub is also a ``Directory`` (``NatsHub``), the service
runs its core in cluster mode: what only the cluster knows (is a nick free? who is in a
room on other nodes? where is the nick a private message goes to?) is asked of the
directory in a task of its own, at most ``CHAT_CLUSTER_QUERIES`` at once, and the answer
goes back into the core as a new input; the effects task never waits on the network, so
delivery on this node never waits for the cluster. A member's own lines stay in order
around a question: while one of its questions is out, its next lines wait (at most
``CHAT_HELD_LINES``) and are taken after the answer, and a member who leaves meanwhile
leaves after them, so ``/nick ann`` then ``hi`` says ``hi`` as ann, and ``/who`` then
``/quit`` gets its answer before the goodbye, as on a single server. The directory calls
back through a ``ClusterNode`` (``_ClusterNode`` below): the local half of ``/who`` and
``/list``, private messages for members here, nicks lost, outages (every member is told),
and lines that could not be delivered (their sender is told).

The three line limits, from the wire inwards: a TCP line is at most
``CHAT_MAX_LINE_BYTES`` (16 KiB) on the wire (a longer one is refused with a notice and its
bytes skipped, the connection stays), which is what ``MAX_LINE_LENGTH`` (4,096
characters, the chat core's limit on a message's text) takes in UTF-8 at 4 bytes per
character; the stream framing's own default (``DEFAULT_MAX_LINE``, 64 KiB) is for
``serve_tcp`` handlers and does not apply to chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, Protocol

from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import format_address
from netlib.errors import ServiceUnavailable
from netlib.sansio.chat import (
    ANNOUNCE_MAX_MEMBERS,
    FLOOD_BURST,
    FLOOD_RATE,
    MAX_LINE_LENGTH,
    MAX_ROOMS_PER_HOST,
    Broadcast,
    ChatCore,
    Close,
    Effect,
    Joined,
    Left,
    ListQuery,
    NickClaim,
    NickRelease,
    PrivateQuery,
    Send,
    WhoQuery,
)
from netlib.services.hub import Directory, Hub, MemoryHub

__all__ = [
    "CHAT_CLOSE_GRACE",
    "CHAT_CLUSTER_QUERIES",
    "CHAT_HARD_LIMIT",
    "CHAT_HELD_LINES",
    "CHAT_LINE_TIMEOUT",
    "CHAT_LOG_BURST",
    "CHAT_MAX_LINE_BYTES",
    "CHAT_SOCKET_SEND_BUFFER",
    "CHAT_SOFT_LIMIT",
    "CHAT_SOFT_TIME",
    "SHUTDOWN_NOTICE",
    "SHUTDOWN_REASON",
    "SLOW_CONSUMER",
    "ChatLimits",
    "ChatService",
    "ChatServiceStatistics",
    "Session",
    "address_text",
    "encode_line",
]

logger = logging.getLogger("netlib.chat")
"""The chat's log: joins, quits (with their reason), failed effects, and the statistics
line at shutdown (``open_chat_server``), at info level; joins and quits are throttled."""

CHAT_LOG_BURST: Final = 50
"""Join lines, and quit lines, logged per second at most: a flood of connections cannot
flood the log; the next line logged says how many were suppressed."""

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
CHAT_MAX_LINE_BYTES: Final = 4 * MAX_LINE_LENGTH
"""Longest line read from a TCP chat client, in bytes (16 KiB: the core's 4,096-character
limit at 4 UTF-8 bytes per character); a longer one is refused with a notice to its sender
and its bytes are discarded up to its line end, without being buffered."""
CHAT_CLOSE_GRACE: Final = 5.0
"""Seconds a closing chat server waits for connections to flush before aborting them."""
CHAT_LINE_TIMEOUT: Final = 10.0
"""Seconds a TCP chat line may take from its first byte to its end (a member who only reads
is never timed out; one who trickles a line is)."""
CHAT_CLUSTER_QUERIES: Final = 256
"""Questions to the cluster (nick claims, cluster-wide ``/who`` and ``/list``, private
messages to other nodes) one node has in flight at most; one more is answered at once as
refused (``!!! ... busy``), counted in ``cluster_busy``."""
CHAT_HELD_LINES: Final = 64
"""Lines of one member that wait while its question to the cluster is out (they are taken
in order after the answer); one more is taken at once, ahead of the answer, rather than
lost (flood control still applies to it)."""
UNDELIVERED_EXCERPT: Final = 80
"""Characters of a line quoted back to its sender when it could not be delivered."""
SLOW_CONSUMER: Final = "slow_consumer"
"""The reason a member cut off for reading too slowly is given (``quit (slow_consumer)``)."""
SHUTDOWN_REASON: Final = "server shutting down"
"""The reason members hear when the server closes."""
SHUTDOWN_NOTICE: Final = f"*** {SHUTDOWN_REASON}\n".encode()
"""The last line every member (TCP and UDP) gets when the server closes."""


@dataclass(frozen=True, slots=True)
class ChatLimits:
    """Per-connection outbound limits, per-client flood control and chat-core limits of a
    chat service (``max_rooms_per_host`` and ``announce_max_members``: see ``ChatCore``)."""

    soft_limit: int = CHAT_SOFT_LIMIT
    soft_time: float = CHAT_SOFT_TIME
    hard_limit: int = CHAT_HARD_LIMIT
    flood_rate: float = FLOOD_RATE
    flood_burst: int = FLOOD_BURST
    max_line_bytes: int = CHAT_MAX_LINE_BYTES
    socket_send_buffer: int | None = CHAT_SOCKET_SEND_BUFFER
    line_timeout: float | None = CHAT_LINE_TIMEOUT
    max_rooms_per_host: int = MAX_ROOMS_PER_HOST
    announce_max_members: int = ANNOUNCE_MAX_MEMBERS

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
        flood_dropped: lines dropped by flood control (UDP; TCP members are paced).
        lines_too_long: lines refused as too long (characters, or bytes on the wire).
        effect_errors: effects that failed (a hub error, say), logged and skipped.
        undelivered: lines the hub could not deliver, reported to their senders.
        cluster_busy: questions to the cluster refused at ``CHAT_CLUSTER_QUERIES``.
    """

    sessions: int
    opened: int
    lines_received: int
    slow_consumers: int
    flood_dropped: int
    lines_too_long: int
    effect_errors: int
    undelivered: int = 0
    cluster_busy: int = 0


class Session(Protocol):
    """One chat client as the service sees it."""

    session_id: int

    def deliver(self, line: bytes, origin: Hashable) -> None: ...

    def end(self, reason: str) -> None:
        """Close the session after flushing what is queued."""

    def abort(self) -> None:
        """Close the session now, discarding what is queued."""

    async def wait_closed(self) -> None:
        """Wait until the session's connection is closed."""


@dataclass(frozen=True, slots=True)
class _Forget:
    """Internal effect: a closed session's Left effects are done; drop it."""

    client: int


def address_text(address: object) -> str:
    """An address as the chat's log shows it: ``host:port`` (``[host]:port`` for IPv6)."""
    return format_address(address) if isinstance(address, tuple) else str(address)


def encode_line(text: str) -> bytes:
    return text.encode("utf-8", "replace") + b"\n"


class ChatService:
    """One chat: a ``ChatCore``, a hub, and the sessions of this process.

    Args:
        hub: room fan-out (default: a new ``MemoryHub``). A hub that is also a
            ``Directory`` (``NatsHub``) makes this service a node of a chat cluster.
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
        self.directory: Directory | None = hub if isinstance(hub, Directory) else None
        self.core = ChatCore(
            flood_rate=self.limits.flood_rate,
            flood_burst=self.limits.flood_burst,
            max_rooms_per_host=self.limits.max_rooms_per_host,
            announce_max_members=self.limits.announce_max_members,
            max_line_bytes=self.limits.max_line_bytes,
            clustered=self.directory is not None,
            guest_numbers=None if self.directory is None else self.directory.next_guest,
        )
        self._queries: set[asyncio.Task[None]] = set()
        # members with a question out: their next lines (None: an overlong one), and how
        # those who left meanwhile are to be closed once the lines are taken
        self._held: dict[int, deque[str | None]] = {}
        self._leaving: dict[int, tuple[str, str]] = {}
        self._cluster_notice = ""  # what a member joining during an outage is told
        self.undelivered = self.cluster_busy = 0
        self._loop = asyncio.get_running_loop()
        self._sessions: dict[int, Session] = {}
        self._gone: dict[int, Session] = {}
        self._ids = itertools.count(1)
        self._effects: deque[Effect | _Forget] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._worker = self._loop.create_task(self._run())
        self._errors_log = ThrottledLog(logger, self._loop)
        self._joins_log = ThrottledLog(logger, self._loop, burst=CHAT_LOG_BURST)
        self._quits_log = ThrottledLog(logger, self._loop, burst=CHAT_LOG_BURST)
        self.opened = self.slow_consumers = self._errors = 0
        if self.directory is not None:
            self.directory.attach(_ClusterNode(self))

    @classmethod
    def default(cls) -> ChatService:
        """The service shared by protocols created without one, per event loop."""
        loop = asyncio.get_running_loop()
        service = cls._defaults.get(loop)
        if service is None or service._worker.done():
            service = cls._defaults[loop] = cls()
        return service

    # -- sessions ---------------------------------------------------------------------------

    def open(self, session: Session, source: Hashable = None, address: object = None) -> int:
        """Register ``session``; it lands in the default room. Returns its id.

        Args:
            session: the new client.
            source: the client's host, e.g. its peer IP address, for the chat core's
                per-host limits (``MAX_ROOMS_PER_HOST``); None makes it a host of its own.
            address: the client's address as the log shows it.
        """
        session_id = next(self._ids)
        self._sessions[session_id] = session
        self.opened += 1
        self._schedule(self.core.connect(session_id, self._loop.time(), source))
        nick = self.core.nick_of(session_id)
        if nick is not None:
            self._joins_log.info("join: %s from %s (session %d)", nick, address, session_id)
            if self._cluster_notice:
                self._schedule([Send(session_id, self._cluster_notice)])
        return session_id

    def receive(self, session_id: int, text: str) -> None:
        """Hand one decoded line from ``session_id`` to the chat core."""
        self._take(session_id, text)

    def receive_overlong(self, session_id: int) -> None:
        """``session_id`` sent a line above ``limits.max_line_bytes`` (its bytes were
        discarded): refuse it with a notice to the sender, and count it."""
        self._take(session_id, None)

    def _take(self, session_id: int, text: str | None) -> None:
        """One line (None: an overlong one) into the core, or into the wait of a member
        whose question to the cluster is out."""
        held = self._held.get(session_id)
        if held is not None and len(held) < CHAT_HELD_LINES:
            held.append(text)
            return
        now = self._loop.time()
        if text is None:
            effects = self.core.receive_overlong(session_id, now)
        else:
            effects = self.core.receive_line(session_id, text, now)
        if (
            held is None
            and self.directory is not None
            and any(_asks(e, session_id) for e in effects)
        ):
            self._held[session_id] = deque()
        self._schedule(effects)

    def _answered(self, session_id: int) -> None:
        """The member's question is answered (the answer is scheduled): take the lines that
        waited for it, up to the next question, then close it if it left meanwhile."""
        held = self._held.pop(session_id, None)
        while held:
            self._take(session_id, held.popleft())
            if session_id in self._held:  # another question: the rest waits for it
                self._held[session_id].extend(held)
                return
        leaving = self._leaving.pop(session_id, None)
        if leaving is not None:
            self.close(session_id, *leaving)

    def flood_wait(self, session_id: int) -> float:
        """Seconds until ``session_id``'s next line passes flood control (0: now). A TCP
        member is not read meanwhile, so its lines wait instead of being dropped."""
        return self.core.flood_wait(session_id, self._loop.time())

    def close(self, session_id: int, reason: str, detail: str = "") -> None:
        """Forget ``session_id`` (idempotent); its rooms hear it left with ``reason``, the
        log with ``detail`` too."""
        if session_id in self._held:  # after the lines that wait for an answer
            self._leaving.setdefault(session_id, (reason, detail))
            return
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        if reason == SLOW_CONSUMER:
            self.slow_consumers += 1
        self._log_quit(self.core.nick_of(session_id), session_id, reason, detail)
        self._gone[session_id] = session  # until its Left effects are carried out
        self._schedule([*self.core.disconnect(session_id, reason), _Forget(session_id)])

    def summary(self) -> str:
        """The counters as one line, for a log (``open_chat_server`` logs it at the end)."""
        stats = self.statistics()
        return (
            f"{stats.opened} sessions opened, {stats.sessions} open, "
            f"{stats.lines_received} lines received, {stats.lines_too_long} too long, "
            f"{stats.flood_dropped} dropped by flood control, "
            f"{stats.slow_consumers} slow consumers, {stats.effect_errors} failed effects"
            + (
                f", {stats.undelivered} lines not delivered, "
                f"{stats.cluster_busy} cluster questions refused as busy"
                if self.directory is not None
                else ""
            )
        )

    def statistics(self) -> ChatServiceStatistics:
        """Return a snapshot of the counters."""
        core = self.core.statistics()
        return ChatServiceStatistics(
            sessions=len(self._sessions),
            opened=self.opened,
            lines_received=core.lines_received,
            slow_consumers=self.slow_consumers,
            flood_dropped=core.lines_flood_dropped,
            lines_too_long=core.lines_too_long,
            effect_errors=self._errors,
            undelivered=self.undelivered,
            cluster_busy=self.cluster_busy,
        )

    async def close_sessions(self, grace: float = CHAT_CLOSE_GRACE) -> None:
        """Tell every session the server is going, close them, abort what is left.

        Waits at most ``grace`` seconds for TCP connections to flush and close.
        """
        sessions = list(self._sessions.values())
        for session in sessions:
            session.end(SHUTDOWN_REASON)
        if sessions:
            tasks = [asyncio.ensure_future(s.wait_closed()) for s in sessions]
            _done, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for session in sessions:
                session.abort()
            await asyncio.wait(tasks)

    async def aclose(self) -> None:
        """Close every session, carry out what their leaving caused (at most
        ``CHAT_CLOSE_GRACE`` s: quit notices for other nodes), stop, close the hub."""
        await self.close_sessions()
        if self._effects and not self._worker.done():
            self._drained = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CHAT_CLOSE_GRACE):
                    await self._drained
        tasks = {self._worker, *self._queries}
        while tasks:  # again and again: Python 3.11's wait_for can swallow a cancellation
            for task in tasks:
                task.cancel()
            _done, tasks = await asyncio.wait(tasks, timeout=0.1)
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
            if self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            self._wakeup = self._loop.create_future()
            await self._wakeup
            self._wakeup = None

    async def _carry_out(self, effect: Effect | _Forget) -> None:
        match effect:
            case Broadcast(room, text, exclude, said):
                await self.hub.publish(room, encode_line(text), exclude, said=said)
            case Send(client, text):
                session = self._sessions.get(client)
                if session is not None:
                    session.deliver(encode_line(text), None)
            case Joined(client, room):
                await self._subscription(client, room, join=True)
            case Left(client, room):
                await self._subscription(client, room, join=False)
            case Close(client, reason, nick):
                session = self._sessions.pop(client, None)
                if session is not None:
                    self._log_quit(nick or None, client, reason)
                    session.end(reason)
            case _Forget(client):
                self._gone.pop(client, None)
            case _:
                self._ask_cluster(effect)

    def _log_quit(self, nick: str | None, session_id: int, reason: str, detail: str = "") -> None:
        who = nick if nick is not None else "a client"
        because = f"{reason} ({detail})" if detail else reason
        self._quits_log.info("quit: %s (session %d): %s", who, session_id, because)

    # -- the cluster ------------------------------------------------------------------------

    def _ask_cluster(
        self, effect: NickClaim | NickRelease | WhoQuery | ListQuery | PrivateQuery
    ) -> None:
        """Carry out a cluster effect: registrations at once, questions in a task."""
        directory = self.directory
        assert directory is not None, "only a clustered core emits cluster effects"
        match effect:
            case NickClaim(_client, nick, guest=True):
                directory.register(nick)
            case NickRelease(nick):
                directory.release(nick)
            case _ if len(self._queries) >= CHAT_CLUSTER_QUERIES:
                self.cluster_busy += 1
                self._schedule(self._answer(effect, ServiceUnavailable("this server is busy")))
                self._answered(effect.client)
            case _:
                task = self._loop.create_task(self._question(directory, effect))
                self._queries.add(task)
                task.add_done_callback(self._queries.discard)

    async def _question(
        self, directory: Directory, effect: NickClaim | WhoQuery | ListQuery | PrivateQuery
    ) -> None:
        try:
            match effect:
                case NickClaim(client, nick):
                    taken = not await directory.claim(nick)
                    refusal = f'nick "{nick}" is already taken' if taken else None
                    answer = self.core.nick_claimed(client, nick, refusal)
                case WhoQuery(client, room):
                    count, nicks, note = await directory.who(room)
                    answer = self.core.who_answer(client, room, count, nicks, note)
                case ListQuery(client):
                    rooms, note = await directory.rooms()
                    answer = self.core.list_answer(client, rooms, note)
                case PrivateQuery(client, sender, nick, text):
                    delivered = await directory.private(sender, nick, text)
                    answer = self.core.private_answer(client, nick, text, delivered)
        except Exception as exc:  # the member gets an answer whatever happened
            if not isinstance(exc, ServiceUnavailable):
                self._errors += 1
                self._errors_log.exception("chat cluster question %r failed", effect)
                exc = ServiceUnavailable("the chat cluster failed to answer")
            answer = self._answer(effect, exc)
        except BaseException:  # cancelled (the server closes): the waiting lines go on
            self._answered(effect.client)
            raise
        self._schedule(answer)
        self._answered(effect.client)  # its lines that waited come after the answer

    def _answer(
        self, effect: NickClaim | WhoQuery | ListQuery | PrivateQuery, error: ServiceUnavailable
    ) -> list[Effect]:
        """The answer to a question the cluster could not answer: what this node knows."""
        core = self.core
        match effect:
            case NickClaim(client, nick):
                return core.nick_claimed(client, nick, f"cannot change your nick now: {error}")
            case WhoQuery(client, room):
                return core.who_answer(client, room, *core.local_who(room), _local_only(error))
            case ListQuery(client):
                return core.list_answer(client, core.local_rooms(), _local_only(error))
            case PrivateQuery(client, _sender, nick, text):
                refusal = f'not delivered to "{nick}": {error}'
                return core.private_answer(client, nick, text, None, refusal)

    def _cluster_changed(self, available: bool, detail: str) -> None:
        """Tell every member the chat is degraded, or back to normal."""
        text = f"*** chat {'back to normal' if available else 'degraded'}: {detail}"
        self._cluster_notice = "" if available else text
        line = encode_line(text)
        for session in list(self._sessions.values()):
            session.deliver(line, None)

    def _undelivered(self, origin: Hashable, line: bytes, detail: str) -> None:
        """Tell the sender of ``line`` it was not delivered."""
        self.undelivered += 1
        session = self._sessions.get(origin) if isinstance(origin, int) else None
        if session is None:
            return
        text = line.decode("utf-8", "replace").rstrip("\n")
        if len(text) > UNDELIVERED_EXCERPT:
            text = text[: UNDELIVERED_EXCERPT - 3] + "..."
        session.deliver(encode_line(f"!!! not delivered ({detail}): {text}"), None)

    async def _subscription(self, client: int, room: str, *, join: bool) -> None:
        session = self._sessions.get(client) or self._gone.get(client)
        if session is None:
            return
        if join:
            await self.hub.join(room, session)
        else:
            await self.hub.leave(room, session)


def _asks(effect: Effect, session_id: int) -> bool:
    """True if ``effect`` is a question of ``session_id``'s to the cluster (its answer
    comes back later as the core's new input)."""
    if isinstance(effect, NickClaim):
        return effect.client == session_id and not effect.guest
    return isinstance(effect, WhoQuery | ListQuery | PrivateQuery) and effect.client == session_id


def _local_only(error: ServiceUnavailable) -> str:
    return f"this server only: {error}"


class _ClusterNode:
    """What the cluster asks of this node's chat (``netlib.services.hub.ClusterNode``)."""

    __slots__ = ("_service",)

    def __init__(self, service: ChatService) -> None:
        self._service = service

    def who(self, room: str) -> tuple[int, list[str]]:
        return self._service.core.local_who(room)

    def rooms(self) -> dict[str, int]:
        return self._service.core.local_rooms()

    def private(self, sender: str, nick: str, text: str) -> str | None:
        delivered, effects = self._service.core.deliver_private(sender, nick, text)
        self._service._schedule(effects)
        return delivered

    def nick_lost(self, nick: str) -> None:
        self._service._schedule(self._service.core.nick_lost(nick))

    def cluster_changed(self, available: bool, detail: str) -> None:
        self._service._cluster_changed(available, detail)

    def undelivered(self, origin: Hashable, line: bytes, detail: str) -> None:
        self._service._undelivered(origin, line, detail)
