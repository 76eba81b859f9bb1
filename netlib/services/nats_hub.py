"""NatsHub: the hub and directory of a chat cluster, on NATS JetStream (``netlib[nats]``).

Every chat node (a process running a ``ChatService``) connects to NATS through one
``NatsHub``; together the nodes are one chat. ``nats-py`` is imported when a hub starts,
so netlib works without it.

Theory of operation
-------------------
*Room lines* go through one JetStream stream (``NatsHubConfig.name``, subjects
``<name>.room.<room>``). A node publishes each line once, with a message id
(``Nats-Msg-Id``: node id and a counter) so a line sent again after a fault is stored once
(de-duplication window ``DEDUP_WINDOW``). Each node reads the whole stream through its own
ephemeral pull consumer and delivers every line to its local members of the room, so every
node delivers the lines of a room in the same order: the stream's. The node asks for at
most ``PULL_BATCH`` lines at a time (two requests in flight), so NATS never pushes more
than it can hold (``PENDING_BYTES``), and a slow node falls behind alone: the others read
on. Delivery on the node never waits: ``Subscriber.deliver`` queues a line or cuts its
member off, as on one node. The node tracks stream and consumer sequences as an ordered
consumer does: a gap in the consumer sequence (lines dropped at the subscription), a
missed heartbeat, a deleted consumer or a reconnection makes it create a new consumer from
the last stream sequence it delivered, so nothing is skipped or repeated. A gap in stream
sequences means lines expired from the stream before this node read them: counted as
``lost``.

*Publishing never waits either.* ``publish`` puts the line in the outbox (at most
``OUTBOX_LINES`` lines and ``OUTBOX_BYTES`` bytes); one task sends the outbox in order,
up to ``PUBLISH_WINDOW`` lines unacknowledged. A line not acknowledged within
``ACK_TIMEOUT``, refused, or in flight when the connection broke is sent again, with the
lines after it (go-back-N), under the same message id; when the connection breaks, what
nats-py had not yet written is dropped, since it would go to the next connection ahead
of the resent lines (a line would be stored before one said earlier). While NATS is out
of reach lines wait in the outbox; a line that waited ``OUTBOX_TIMEOUT`` (or found the
outbox full) is dropped and its sender told (``ClusterNode.undelivered``): "not sent" if
it never left, "not confirmed" if it may have been stored. Nothing said is lost silently.

*History*: each node keeps the last ``HISTORY_LINES`` lines said in each room it has read
(``HISTORY_BYTES`` in all); a member joining a room gets them first. A starting node reads
the last ``HISTORY_REPLAY`` lines of the stream before it is ready.

*Nicknames* are keys of a KV bucket (``<name>_nicks``) whose entries live ``NICK_TTL``
seconds unless renewed: a claim is an atomic create, a node renews its own nicks every
quarter of ``NICK_TTL`` (a compare-and-set: a nick found taken by another node is lost,
``ClusterNode.nick_lost``), deletes them on quit, and a node that dies stops renewing, so
its nicks are free within ``NICK_TTL``. Guest numbers come from a counter in a second
bucket (``<name>_ids``), ``GUEST_BLOCK`` at a time, so no two nodes name a guest alike.

*Who is where* is asked, not stored: ``/who`` and ``/list`` are requests every node
answers for its own members (``<name>.who``, ``<name>.list``); the asking node waits for
every node it heard from in the last three heartbeats (``NODE_HEARTBEAT``), at most
``QUERY_TIMEOUT``. A private message looks up the nick's node in the bucket and is a
request to that node (at most once, confirmed: the sender learns whether it arrived).

*Faults*: nats-py reconnects without end (``RECONNECT_WAIT`` between attempts, a ping every
``PING_INTERVAL``). While the connection is down, or the node stops hearing its own
heartbeat, or it cannot make a consumer, the hub is *unavailable*: the node's members are
told (``ClusterNode.cluster_changed``), keep their connection, and their lines wait in the
outbox; nick changes and lookups on other nodes are refused (``ServiceUnavailable``).
When it is back, the hub makes a new consumer from where it stopped, renews its nicks,
sends the outbox, and tells the members.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import secrets
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from netlib.aio.logs import ThrottledLog
from netlib.errors import ServiceUnavailable
from netlib.sansio.chat import history_notice
from netlib.sansio.nats import DEFAULT_NATS_URL, NATS_URL_ENV, NICK_TTL, parse_nats_servers
from netlib.services.hub import ClusterNode, Subscriber

__all__ = [
    "ACK_TIMEOUT",
    "API_TIMEOUT",
    "CLOSE_FLUSH",
    "CONNECT_TIMEOUT",
    "CONSUMER_INACTIVE",
    "DEDUP_WINDOW",
    "DEFAULT_NATS_URL",
    "DISCOVERY_WAIT",
    "GUEST_BLOCK",
    "HISTORY_BYTES",
    "HISTORY_LINES",
    "HISTORY_REPLAY",
    "KV_BACKLOG",
    "MAX_NODES",
    "NATS_URL_ENV",
    "NICK_TTL",
    "NODE_HEARTBEAT",
    "OUTBOX_BYTES",
    "OUTBOX_LINES",
    "OUTBOX_TIMEOUT",
    "PENDING_BYTES",
    "PING_INTERVAL",
    "PUBLISH_WINDOW",
    "PULL_BATCH",
    "PULL_EXPIRES",
    "PULL_HEARTBEAT",
    "QUERY_PENDING",
    "QUERY_TIMEOUT",
    "RECONNECT_WAIT",
    "RETRY_DELAY",
    "START_TIMEOUT",
    "STREAM_MAX_AGE",
    "STREAM_MAX_BYTES",
    "STREAM_MAX_LINE",
    "STREAM_MAX_MSGS",
    "NatsHub",
    "NatsHubConfig",
    "NatsHubStatistics",
    "nats_servers",
]

logger = logging.getLogger("netlib.chat.nats")

HISTORY_LINES: Final = 20
"""Lines said in a room that a member joining it gets first (per room, on every node)."""
HISTORY_BYTES: Final = 4 * 1024 * 1024
"""Bytes of history a node keeps in all; past it, the rooms least recently spoken in lose
theirs."""
HISTORY_REPLAY: Final = 10_000
"""Lines of the stream a starting node reads (delivering none) to learn the rooms' history."""
NODE_HEARTBEAT: Final = 1.0
"""Seconds between a node's heartbeats; a node not heard for three is not waited for."""
OUTBOX_LINES: Final = 1000
"""Lines a node holds for the cluster (waiting to be sent or confirmed) at most."""
OUTBOX_BYTES: Final = 1024 * 1024
"""Bytes a node holds for the cluster at most."""
OUTBOX_TIMEOUT: Final = 60.0
"""Seconds a line may wait for the cluster before its sender is told it was not delivered
(less than ``DEDUP_WINDOW``, so a line sent again is never stored twice)."""
PUBLISH_WINDOW: Final = 256
"""Lines sent and not yet acknowledged, at most."""
ACK_TIMEOUT: Final = 2.0
"""Seconds to wait for JetStream to acknowledge a line before sending it again."""
DEDUP_WINDOW: Final = 120.0
"""Seconds during which JetStream discards a line whose message id it has stored."""
PULL_BATCH: Final = 256
"""Lines one pull request asks for; a node has at most two requests open."""
PULL_EXPIRES: Final = 5.0
"""Seconds a pull request stays open on the server."""
PULL_HEARTBEAT: Final = 1.0
"""Seconds between the server's heartbeats on an open pull request; three missed make the
node replace its consumer."""
PENDING_BYTES: Final = 16 * 1024 * 1024
"""Bytes NATS may have delivered to one subscription of a node and not yet handed to it;
past it lines are dropped there (counted) and the consumer is replaced."""
QUERY_TIMEOUT: Final = 0.5
"""Seconds a node waits for the other nodes' answers to ``/who``, ``/list``, ``/msg``."""
API_TIMEOUT: Final = 2.0
"""Seconds to wait for a JetStream API or KV answer."""
RECONNECT_WAIT: Final = 0.5
"""Seconds between reconnection attempts to one server (attempts never stop)."""
PING_INTERVAL: Final = 5.0
"""Seconds between pings to NATS; two unanswered mark the connection dead."""
CONNECT_TIMEOUT: Final = 2.0
"""Seconds one connection attempt may take."""
START_TIMEOUT: Final = 10.0
"""Seconds ``start()`` may take (connect, set up, read the history) before it gives up."""
RETRY_DELAY: Final = 0.25
"""Seconds before the hub retries an operation NATS refused (a consumer, a publish)."""
GUEST_BLOCK: Final = 100
"""Guest numbers a node takes from the cluster's counter at once."""
STREAM_MAX_MSGS: Final = 1_000_000
"""Lines the stream keeps at most (the oldest go first); a node that falls further behind
than the stream keeps loses the difference (counted as ``lost``)."""
STREAM_MAX_BYTES: Final = 256 * 1024 * 1024
"""Bytes the stream keeps at most."""
STREAM_MAX_AGE: Final = 24 * 3600.0
"""Seconds the stream keeps a line at most."""
STREAM_MAX_LINE: Final = 64 * 1024
"""Largest line the stream accepts, in bytes (a chat line is at most 16 KiB)."""
CONSUMER_INACTIVE: Final = 30.0
"""Seconds after which the server deletes the consumer of a node that stopped pulling."""
QUERY_PENDING: Final = 10_000
"""Requests (``/who``, ``/list``, private messages) or answers a node's subscription holds
before NATS drops more (counted)."""
KV_BACKLOG: Final = 10_000
"""Nick registrations and releases a node queues while the cluster is unreachable; past it
the oldest are dropped (a dropped registration is made by the next renewal, a dropped
release expires within ``nick_ttl``)."""
DISCOVERY_WAIT: Final = 0.05
"""Seconds a starting node waits (at least; four round trips to NATS if longer) for the
other nodes to answer its first heartbeat, so that it knows them when it starts serving."""
CLOSE_FLUSH: Final = 2.0
"""Seconds a closing hub waits for its outbox to be confirmed."""

MAX_NODES: Final = 1000
"""Nodes a node keeps track of (heard from recently) at most."""
_TICK: Final = 0.1  # housekeeping period: ack timeouts, expiry, heartbeats, watchdog
_KV_CONCURRENCY: Final = 16
_ORIGIN: Final = "Netlib-Origin"
_SAID: Final = "Netlib-Said"
_MSG_ID: Final = "Nats-Msg-Id"
_STATUS: Final = "Status"
_GUESTS_KEY: Final = "guests"
_KEY_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")


def nats_servers(servers: str | Sequence[str] | None = None) -> list[str]:
    """The NATS server URLs to use, as the ``nats`` command line finds them.

    ``servers`` (a URL, URLs separated by commas, or a list) or else the ``NATS_URL``
    environment variable or else ``DEFAULT_NATS_URL``. ``host`` and ``host:port`` mean
    ``nats://host:4222`` and ``nats://host:port``.

    Raises:
        ValueError: a URL is not a NATS URL (one line, naming it).
    """
    if servers is None:
        servers = os.environ.get(NATS_URL_ENV) or DEFAULT_NATS_URL
    return parse_nats_servers(servers)


@dataclass(frozen=True, slots=True)
class NatsHubConfig:
    """Names and limits of a chat cluster on NATS (defaults: the module's constants).

    ``name`` names the stream, the two KV buckets (``<name>_nicks``, ``<name>_ids``) and
    the subjects (``<name>.room.<room>``, ...): clusters with different names share a NATS
    server without meeting. ``nick_ttl`` and the stream limits are fixed by the first
    node that creates them.
    """

    name: str = "netlib_chat"
    history_lines: int = HISTORY_LINES
    history_bytes: int = HISTORY_BYTES
    history_replay: int = HISTORY_REPLAY
    nick_ttl: float = NICK_TTL
    heartbeat: float = NODE_HEARTBEAT
    outbox_lines: int = OUTBOX_LINES
    outbox_bytes: int = OUTBOX_BYTES
    outbox_timeout: float = OUTBOX_TIMEOUT
    publish_window: int = PUBLISH_WINDOW
    ack_timeout: float = ACK_TIMEOUT
    pull_batch: int = PULL_BATCH
    pull_heartbeat: float = PULL_HEARTBEAT
    pending_bytes: int = PENDING_BYTES
    query_timeout: float = QUERY_TIMEOUT
    reconnect_wait: float = RECONNECT_WAIT
    ping_interval: float = PING_INTERVAL
    stream_max_msgs: int = STREAM_MAX_MSGS
    stream_max_bytes: int = STREAM_MAX_BYTES
    stream_max_age: float = STREAM_MAX_AGE

    def __post_init__(self) -> None:
        if not self.name or not set(self.name) <= _KEY_SAFE | set("ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
            raise ValueError(f"invalid cluster name {self.name!r}: use letters, digits, _ or -")
        for setting in ("history_lines", "history_replay", "outbox_lines", "publish_window"):
            if getattr(self, setting) < 1:
                raise ValueError(f"{setting} must be >= 1, got {getattr(self, setting)}")
        for setting in ("nick_ttl", "heartbeat", "outbox_timeout", "ack_timeout"):
            if getattr(self, setting) <= 0:
                raise ValueError(f"{setting} must be > 0, got {getattr(self, setting)}")
        if self.pull_batch < 2:
            raise ValueError(f"pull_batch must be >= 2, got {self.pull_batch}")
        if self.outbox_timeout >= DEDUP_WINDOW:
            raise ValueError(f"outbox_timeout must be below {DEDUP_WINDOW:g} s")


@dataclass(frozen=True, slots=True)
class NatsHubStatistics:
    """Counters of a ``NatsHub`` (a snapshot).

    Attributes:
        available: the cluster can be reached now.
        nodes: nodes heard from in the last three heartbeats, this one included.
        published: lines handed to ``publish``.
        acknowledged: lines JetStream confirmed (once each).
        resent: lines sent again (no acknowledgement in time, refused, connection lost).
        undelivered: lines dropped and reported to their senders (outbox full, timed out).
        outbox: lines waiting to be sent or confirmed now.
        received: lines read from the stream.
        delivered: deliveries to members of this node.
        lost: lines that expired from the stream before this node read them.
        lag: lines in the stream this node has not read yet (at the last line read).
        consumer_resets: consumers replaced (gap, heartbeat missed, reconnection).
        dropped: messages NATS dropped at this node's subscriptions (slow consumer).
        outages: times the cluster became unreachable.
        nicks: nicks this node holds in the cluster.
    """

    available: bool
    nodes: int
    published: int
    acknowledged: int
    resent: int
    undelivered: int
    outbox: int
    received: int
    delivered: int
    lost: int
    lag: int
    consumer_resets: int
    dropped: int
    outages: int
    nicks: int


@dataclass(slots=True, eq=False)
class _Line:
    """A line on its way to the stream."""

    msg_id: str
    subject: str
    payload: bytes
    origin: Hashable
    said: bool
    queued: float
    token: str = ""
    sent: float | None = None  # last send; None: never sent

    def headers(self, node: str) -> dict[str, str]:
        origin = f"{node}:{self.origin}" if isinstance(self.origin, int) else node
        headers = {_MSG_ID: self.msg_id, _ORIGIN: origin}
        if self.said:
            headers[_SAID] = "1"
        return headers


@dataclass(slots=True)
class _Nick:
    """A nick this node holds: its spelling and the KV revision it last wrote (0: not
    registered yet)."""

    nick: str
    revision: int = 0


@dataclass(slots=True)
class _Query:
    """A question to every node, waiting for the answers of every node it knows of: those
    the asking node heard from, and those any answering node heard from."""

    expected: set[str]
    done: asyncio.Future[None]
    answers: dict[str, dict[str, Any]] = field(default_factory=dict)  # node -> answer

    def take(self, answer: dict[str, Any]) -> None:
        node, known = answer.get("node"), answer.get("nodes")
        if not isinstance(node, str) or node in self.answers:
            return
        self.answers[node] = answer
        if isinstance(known, list):
            self.expected.update(n for n in known[:MAX_NODES] if isinstance(n, str))
        if self.expected <= self.answers.keys() and not self.done.done():
            self.done.set_result(None)


def nick_key(nick: str) -> str:
    """The KV key of a nick: ``n.`` and the case-folded nick, every character outside
    ``[a-z0-9_-]`` written as ``=`` and its hex code (``[bob]`` is ``n.=5bbob=5d``)."""
    folded = nick.casefold()
    return "n." + "".join(c if c in _KEY_SAFE else f"={ord(c):02x}" for c in folded)


def _import_nats() -> Any:
    try:
        import nats  # the optional extra, imported when a hub starts
        import nats.errors
        import nats.js.errors
    except ImportError:
        raise ModuleNotFoundError(
            "the chat cluster needs nats-py: pip install 'netlib-asyncio[nats]'"
        ) from None
    return nats


class NatsHub:
    """The hub (``netlib.Hub``) and directory (``netlib.Directory``) of a chat node on
    NATS JetStream. A ``ChatService(hub=NatsHub(...))`` is one node of the cluster.

    Args:
        servers: NATS server URLs (see ``nats_servers``: default ``NATS_URL``).
        config: names and limits (``NatsHubConfig``).

    Use ``async with NatsHub(url) as hub`` (or ``await hub.start()`` ... ``await
    hub.aclose()``); ``open_chat_server(nats=url)`` does it for a server. ``start()`` raises
    ``ServiceUnavailable`` if NATS cannot be reached within ``START_TIMEOUT``; after that
    the hub never gives up on NATS.
    """

    def __init__(
        self, servers: str | Sequence[str] | None = None, *, config: NatsHubConfig | None = None
    ) -> None:
        self.servers = nats_servers(servers)
        self.config = config or NatsHubConfig()
        self.node_id = secrets.token_hex(6)
        name = self.config.name
        self._stream = name
        self._subjects = name
        self._nick_bucket = f"{name}_nicks"
        self._ids_bucket = f"{name}_ids"
        self._inbox = f"_INBOX.{self.node_id}"
        self._nc: Any = None
        self._nats: Any = None
        self._nicks_kv: Any = None
        self._ids_kv: Any = None
        self._node: ClusterNode | None = None
        self._rooms: dict[str, dict[Subscriber, None]] = {}
        self._history: OrderedDict[str, deque[bytes]] = OrderedDict()
        self._history_size = 0
        # publishing
        self._outbox: deque[_Line] = deque()
        self._outbox_size = 0
        self._inflight: dict[str, _Line] = {}
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._send_after = 0.0
        self._wake: asyncio.Event | None = None
        # consuming
        self._consumer = ""
        self._epoch = 0
        self._asked = 0  # lines asked for and not received (all requests)
        self._last_sseq = 0
        self._last_cseq = 0
        self._pull_seen = 0.0
        self._ready: asyncio.Event | None = None
        self._keeper: asyncio.Task[None] | None = None  # makes consumers, one at a time
        self._consumer_wanted = False
        self._after_outage = False
        # the directory
        self._owned: dict[str, _Nick] = {}
        self._guests: deque[int] = deque()
        self._guest_fetch: asyncio.Task[None] | None = None
        self._nodes: dict[str, float] = {}
        self._queries: dict[str, _Query] = {}
        self._query_ids = itertools.count(1)
        self._kv_jobs: deque[tuple[str, str, int]] = deque()  # (what, nick, revision)
        self._kv_wake: asyncio.Event | None = None
        # state
        self._connected = False
        self._consumer_ok = False
        self._available = False
        self._down_reason = "not started"
        self._closing = False
        self._started = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log: ThrottledLog | None = None
        self._counts = dict.fromkeys(
            (
                "published",
                "acknowledged",
                "resent",
                "undelivered",
                "received",
                "delivered",
                "lost",
                "consumer_resets",
                "dropped",
                "outages",
            ),
            0,
        )
        self._lag = 0
        self._own_seen = 0.0
        self._ever_available = False
        self._last_error: BaseException | None = None
        self._heard_self: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None

    # -- life cycle -------------------------------------------------------------------------

    async def __aenter__(self) -> NatsHub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect, create the stream and buckets if needed, read the history, and start.

        Raises:
            ServiceUnavailable: NATS (or its JetStream) cannot be reached within
                ``START_TIMEOUT`` seconds.
            ModuleNotFoundError: nats-py is not installed.
        """
        if self._started:
            raise RuntimeError("this NatsHub was started already")
        self._started = True
        self._nats = _import_nats()
        self._loop = asyncio.get_running_loop()
        self._log = ThrottledLog(logger, self._loop)
        self._wake = asyncio.Event()
        self._kv_wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await self._connect()
                await self._set_up()
                self._spawn(self._publisher())
                self._spawn(self._housekeeper())
                self._spawn(self._kv_worker())
                await self._start_consumer()
                await self._take_guest_block()
                await self._ready.wait()
                await self._announce()
        except (TimeoutError, OSError, ServiceUnavailable, self._nats.errors.Error) as exc:
            await self._abort()
            where = ", ".join(self.servers)
            if isinstance(exc, self._nats.errors.NoServersError) and self._last_error:
                exc = self._last_error  # why the servers could not be reached
            raise ServiceUnavailable(f"cannot use NATS at {where}: {_reason(exc)}") from exc
        except BaseException:
            await self._abort()
            raise
        self._own_seen = self._now()
        self._consumer_ok = True
        self._set_available(True, "")
        logger.info(
            "chat node %s joined the cluster %r on %s", self.node_id, self._stream, self.servers
        )

    async def aclose(self) -> None:
        """Send what waits (at most ``CLOSE_FLUSH`` s), free this node's nicks, close."""
        if self._closing:
            return
        self._closing = True
        if self._nc is None:
            return
        if self._connected and self._idle is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_FLUSH):
                    await self._idle.wait()  # the publisher sends what waits meanwhile
        for line in [*self._inflight.values(), *self._outbox]:
            self._give_up(line, "the server closed before the chat cluster confirmed it")
        self._inflight.clear()
        self._outbox.clear()
        await self._cancel_tasks()
        if self._connected:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(API_TIMEOUT):
                    await self._free_everything()
        await self._abort()
        self._rooms.clear()

    async def _abort(self) -> None:
        self._closing = True
        await self._cancel_tasks()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        self._connected = False

    async def _free_everything(self) -> None:
        """Delete this node's nicks and consumer: another node may take them at once."""
        consumer, self._consumer = self._consumer, ""
        await self._gather(
            self._nicks_kv.delete(nick_key(owned.nick), last=owned.revision)
            for owned in self._owned.values()
            if owned.revision
        )
        self._owned.clear()
        if consumer:
            await self._api(f"CONSUMER.DELETE.{self._stream}.{consumer}", {})

    async def _cancel_tasks(self) -> None:
        """Cancel every task, again and again: on Python 3.11 ``asyncio.wait_for`` (which
        nats-py uses) swallows a cancellation that comes as its future completes, and a
        task may spawn another while it ends."""
        while self._tasks:
            for task in self._tasks:
                task.cancel()
            await asyncio.wait(list(self._tasks), timeout=_TICK)
            self._tasks = {task for task in self._tasks if not task.done()}

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        assert self._loop is not None
        task: asyncio.Task[Any] = self._loop.create_task(coroutine)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._log is not None:
            self._log.log(logging.ERROR, "chat cluster task failed", exc_info=task.exception())

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # -- connection ------------------------------------------------------------------------

    async def _connect(self) -> None:
        config = self.config
        nc = self._nats.NATS()
        self._nc = nc
        await nc.connect(
            self.servers,
            name=f"netlib-chat-{self.node_id}",
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            closed_cb=self._on_closed,
            allow_reconnect=True,
            connect_timeout=CONNECT_TIMEOUT,
            reconnect_time_wait=config.reconnect_wait,
            max_reconnect_attempts=1,  # at start: fail fast (start() reports it) ...
            ping_interval=config.ping_interval,
            max_outstanding_pings=2,
        )
        nc.options["max_reconnect_attempts"] = -1  # ... once connected: never give up
        self._connected = True
        await self._subscribe_all()

    async def _subscribe_all(self) -> None:
        """The node's subscriptions (nats-py renews them after a reconnection)."""
        config, inbox, subjects = self.config, self._inbox, self._subjects
        await self._subscribe(f"{inbox}.ack.*", self._on_ack, config.publish_window * 4)
        await self._subscribe(f"{inbox}.pull.>", self._on_pull, config.pull_batch * 4)
        await self._subscribe(f"{inbox}.q.*", self._on_answer, QUERY_PENDING)
        await self._subscribe(f"{subjects}.node", self._on_heartbeat, QUERY_PENDING)
        await self._subscribe(f"{subjects}.who", self._on_who, QUERY_PENDING)
        await self._subscribe(f"{subjects}.list", self._on_list, QUERY_PENDING)
        await self._subscribe(
            f"{subjects}.node.{self.node_id}.msg", self._on_private, QUERY_PENDING
        )

    async def _subscribe(
        self, subject: str, callback: Callable[[Any], Awaitable[None]], pending: int
    ) -> None:
        await self._nc.subscribe(
            subject,
            cb=callback,
            pending_msgs_limit=pending,
            pending_bytes_limit=self.config.pending_bytes,
        )

    async def _on_error(self, error: Exception) -> None:
        self._last_error = error
        if isinstance(error, self._nats.errors.SlowConsumerError):
            self._counts["dropped"] += 1
            if self._log is not None:
                self._log.warning("NATS dropped messages for this node: %s", error)
            return
        if self._log is not None and not self._closing and self._ever_available:
            self._log.warning("NATS: %s", _describe(error))

    async def _on_disconnected(self) -> None:
        self._connected = False
        self._requeue(list(self._inflight))  # sent again, same ids, once reconnected
        self._drop_unwritten()
        if self._keeper is not None:  # its requests went with the connection
            self._keeper.cancel()
        if not self._closing:
            self._set_available(False, "connection to NATS lost")

    def _drop_unwritten(self) -> None:
        """Forget the commands nats-py holds for the broken connection (``_pending``: not
        yet written). It writes them to the next connection before anything else, so a
        line held there, behind one lost with the old socket, would be stored ahead of it,
        and the resend of the lost one after it. Every line in flight was put back in the
        outbox and goes again in order; subscriptions are renewed by nats-py; a request
        among the dropped commands times out as one sent before a crash does."""
        nc = self._nc
        if nc is not None and isinstance(getattr(nc, "_pending", None), list):
            nc._pending = []
            nc._pending_data_size = 0

    async def _on_reconnected(self) -> None:
        self._connected = True
        self._own_seen = self._now()
        self._replace_consumer("reconnected", after_outage=True)

    async def _on_closed(self) -> None:
        self._connected = False
        if not self._closing:
            self._set_available(False, "connection to NATS closed")

    def _replace_consumer(self, why: str, *, after_outage: bool = False) -> None:
        """Have a new consumer made from the last line delivered (by one task: requests
        that come while it works make it go round again)."""
        if self._closing:
            return
        self._consumer_wanted = True
        self._after_outage |= after_outage
        if self._keeper is None or self._keeper.done():
            if not after_outage:
                self._counts["consumer_resets"] += 1
                logger.info(
                    "chat cluster: new consumer from line %d (%s)", self._last_sseq + 1, why
                )
            self._keeper = self._spawn(self._keep_consumer())

    async def _keep_consumer(self) -> None:
        """Make the consumer wanted (after an outage: the stream and buckets first, then
        the nicks renewed); retries until it works or the connection goes."""
        while self._consumer_wanted and self._connected and not self._closing:
            self._consumer_wanted = False
            after_outage, self._after_outage = self._after_outage, False
            while True:
                if not self._connected or self._closing:  # the reconnection asks again
                    self._consumer_wanted = True
                    self._after_outage |= after_outage
                    return
                try:
                    if after_outage:
                        await self._set_up()
                        await self._resume_point()
                    await self._new_consumer()
                    break
                except ServiceUnavailable as exc:
                    self._consumer_ok = False
                    self._set_available(False, f"JetStream not ready ({exc})")
                    after_outage = True  # the stream itself may be gone: make it again
                    await asyncio.sleep(RETRY_DELAY)
            if after_outage:
                await self._renew_nicks()
            self._own_seen = self._now()
            self._update_available()
            assert self._wake is not None
            self._wake.set()

    def _set_available(self, available: bool, reason: str) -> None:
        if not available:
            self._down_reason = reason
        if available == self._available or self._closing:
            return
        self._available = available
        first, self._ever_available = not self._ever_available, True
        if first:
            return  # the start: nobody to tell
        node = self._node
        if available:
            logger.info("chat cluster reachable again")
            if self._kv_wake is not None:
                self._kv_wake.set()
            if node is not None:
                waiting = _count(len(self._outbox) + len(self._inflight), "waiting line")
                node.cluster_changed(True, f"the chat cluster is reachable again ({waiting})")
            return
        self._counts["outages"] += 1
        logger.warning("chat cluster unreachable: %s", reason)
        if node is not None:
            wait = self.config.outbox_timeout
            node.cluster_changed(
                False,
                f"the chat cluster is unreachable ({reason}); what you say waits for it "
                f"(at most {wait:g} s); nick changes and /msg to other servers must wait",
            )

    def _update_available(self) -> None:
        """Available: connected, with a consumer, and hearing its own heartbeat."""
        if not self._connected:
            self._set_available(False, "connection to NATS lost")
        elif not self._consumer_ok:
            self._set_available(False, self._down_reason)
        elif self._now() - self._own_seen > 3 * self.config.heartbeat + PING_INTERVAL:
            self._set_available(False, "NATS does not answer")
        else:
            self._set_available(True, "")

    # -- JetStream set-up ------------------------------------------------------------------

    async def _api(self, call: str, request: dict[str, Any]) -> dict[str, Any]:
        """One JetStream API request; its answer, or ``ServiceUnavailable``."""
        try:
            reply = await self._nc.request(
                f"$JS.API.{call}", json.dumps(request).encode(), timeout=API_TIMEOUT
            )
        except self._nats.errors.NoRespondersError:
            raise ServiceUnavailable("JetStream is not available") from None
        except (self._nats.errors.Error, TimeoutError, OSError) as exc:
            raise ServiceUnavailable(_describe(exc)) from exc
        answer = _json_object(reply.data)
        if "error" in answer:
            error = answer["error"]
            raise ServiceUnavailable(f"JetStream: {error.get('description', error)}")
        return answer

    async def _set_up(self) -> None:
        """The stream and the two buckets, created if missing (kept as they are if another
        node created them with other limits)."""
        config = self.config
        stream = {
            "name": self._stream,
            "subjects": [f"{self._subjects}.room.*"],
            "retention": "limits",
            "storage": "file",
            "discard": "old",
            "max_msgs": config.stream_max_msgs,
            "max_bytes": config.stream_max_bytes,
            "max_age": int(config.stream_max_age * 1e9),
            "max_msg_size": STREAM_MAX_LINE,
            "duplicate_window": int(DEDUP_WINDOW * 1e9),
            "num_replicas": 1,
        }
        await self._ensure(f"STREAM.CREATE.{self._stream}", stream)
        js = self._nc.jetstream(timeout=API_TIMEOUT)
        self._nicks_kv = await self._bucket(js, self._nick_bucket, ttl=config.nick_ttl)
        self._ids_kv = await self._bucket(js, self._ids_bucket, ttl=None)

    async def _ensure(self, call: str, config: dict[str, Any]) -> None:
        try:
            await self._api(call, config)
        except ServiceUnavailable as exc:
            if "already in use" not in str(exc):
                raise
            logger.info("chat cluster: using the existing %s", call.split(".")[-1])

    async def _bucket(self, js: Any, bucket: str, ttl: float | None) -> Any:
        try:
            return await js.key_value(bucket)
        except self._nats.js.errors.BucketNotFoundError:
            pass
        try:
            return await js.create_key_value(bucket=bucket, history=1, ttl=ttl)
        except self._nats.js.errors.BadRequestError:  # created meanwhile by another node
            return await js.key_value(bucket)

    # -- the hub: rooms and history --------------------------------------------------------

    async def join(self, room: str, subscriber: Subscriber) -> None:
        """Deliver ``room``'s lines to ``subscriber``; first the room's last lines."""
        self._rooms.setdefault(room, {})[subscriber] = None
        lines = self._history.get(room)
        if lines:
            subscriber.deliver(f"{history_notice(room, len(lines))}\n".encode(), None)
            for line in list(lines):
                subscriber.deliver(line, None)

    async def leave(self, room: str, subscriber: Subscriber) -> None:
        members = self._rooms.get(room)
        if members is not None:
            members.pop(subscriber, None)
            if not members:
                del self._rooms[room]

    def subscribers(self, room: str) -> int:
        """Subscribers of ``room`` on this node."""
        return len(self._rooms.get(room, ()))

    def _remember(self, room: str, line: bytes) -> None:
        lines = self._history.get(room)
        if lines is None:
            lines = self._history[room] = deque(maxlen=self.config.history_lines)
        elif len(lines) == lines.maxlen:
            self._history_size -= len(lines[0])
        lines.append(line)
        self._history_size += len(line)
        self._history.move_to_end(room)
        while self._history_size > self.config.history_bytes and len(self._history) > 1:
            _room, dropped = self._history.popitem(last=False)
            self._history_size -= sum(map(len, dropped))

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self, room: str, line: bytes, origin: Hashable, *, said: bool = False
    ) -> None:
        """Queue ``line`` for the stream (never waits); if it cannot be queued its sender
        is told (``said`` lines; notices are only counted)."""
        self._counts["published"] += 1
        config = self.config
        entry = _Line(
            msg_id=f"{self.node_id}-{next(self._ids)}",
            subject=f"{self._subjects}.room.{room.lstrip('#')}",
            payload=line,
            origin=origin,
            said=said,
            queued=self._now(),
        )
        waiting = len(self._outbox) + len(self._inflight)
        if self._closing:
            self._give_up(entry, "the server is closing")
        elif waiting >= config.outbox_lines or self._outbox_size + len(line) > config.outbox_bytes:
            self._give_up(
                entry, f"not sent: {_count(waiting, 'line')} already wait for the chat cluster"
            )
        else:
            self._outbox.append(entry)
            self._outbox_size += len(line)
            assert self._wake is not None
            assert self._idle is not None
            self._idle.clear()
            self._wake.set()

    def _give_up(self, line: _Line, detail: str) -> None:
        self._counts["undelivered"] += 1
        if line.said and self._node is not None and not self._closing:
            self._node.undelivered(line.origin, line.payload, detail)

    def _outbox_front(self, line: _Line) -> None:
        line.token = ""
        self._outbox.appendleft(line)
        self._outbox_size += len(line.payload)

    def _requeue(self, tokens: list[str]) -> None:
        """Put the in-flight lines of ``tokens`` (and every later one) back at the front
        of the outbox, in order: go-back-N."""
        order = list(self._inflight)
        position = {token: index for index, token in enumerate(order)}
        first = min((position[token] for token in tokens if token in position), default=None)
        if first is None:
            return
        again = [self._inflight.pop(token) for token in order[first:]]
        for line in reversed(again):
            self._outbox_front(line)
            self._counts["resent"] += 1

    async def _publisher(self) -> None:
        """Send the outbox in order, ``publish_window`` lines unacknowledged at most."""
        assert self._wake is not None
        wake, outbox, inflight = self._wake, self._outbox, self._inflight
        window = self.config.publish_window
        while True:
            await wake.wait()
            wake.clear()
            while outbox and len(inflight) < window and self._can_send():
                line = outbox.popleft()
                self._outbox_size -= len(line.payload)
                line.token = str(next(self._tokens))
                line.sent = self._now()
                inflight[line.token] = line
                try:
                    await self._nc.publish(
                        line.subject,
                        line.payload,
                        reply=f"{self._inbox}.ack.{line.token}",
                        headers=line.headers(self.node_id),
                    )
                except Exception as exc:  # the connection broke: resend from here
                    self._requeue([line.token])
                    self._send_after = self._now() + RETRY_DELAY
                    if self._log is not None:
                        self._log.warning("chat cluster: publish failed: %s", _describe(exc))
                    break

    def _can_send(self) -> bool:
        return (
            self._connected
            and self._nc is not None
            and self._nc.is_connected
            and self._now() >= self._send_after
        )

    async def _on_ack(self, msg: Any) -> None:
        token = msg.subject.rpartition(".")[2]
        line = self._inflight.get(token)
        if line is None:
            return  # sent again meanwhile: the copy's acknowledgement counts
        refused = msg.headers is not None and msg.headers.get(_STATUS) == "503"
        if not refused:
            try:
                refused = "error" in json.loads(msg.data)
            except ValueError:
                refused = True
        if refused:
            self._requeue([token])
            self._send_after = self._now() + RETRY_DELAY
            return
        del self._inflight[token]
        self._counts["acknowledged"] += 1
        if not self._inflight and not self._outbox and self._idle is not None:
            self._idle.set()
        assert self._wake is not None
        self._wake.set()

    def _check_outbox(self, now: float) -> None:
        """Resend what was not acknowledged in time; give up on what waited too long."""
        config = self.config
        late = [
            token
            for token, line in self._inflight.items()
            if line.sent is not None and now - line.sent > config.ack_timeout
        ]
        if late and self._connected:
            self._requeue(late)
            self._send_after = now + RETRY_DELAY  # JetStream is slow: do not pile on
            assert self._wake is not None
            self._wake.set()
        while self._outbox and now - self._outbox[0].queued > config.outbox_timeout:
            line = self._outbox.popleft()
            self._outbox_size -= len(line.payload)
            self._give_up(line, self._timeout_detail(line))
        for token, line in list(self._inflight.items()):
            if now - line.queued > config.outbox_timeout:
                del self._inflight[token]
                self._give_up(line, self._timeout_detail(line))
        if self._outbox and self._can_send():  # after a pause (RETRY_DELAY) the sending resumes
            assert self._wake is not None
            self._wake.set()

    def _timeout_detail(self, line: _Line) -> str:
        waited = f"{self.config.outbox_timeout:g} s"
        if line.sent is None:
            return f"not sent: the chat cluster was unreachable for {waited}"
        return (
            f"not confirmed by the chat cluster within {waited}; it may not have reached everyone"
        )

    # -- consuming -------------------------------------------------------------------------

    async def _resume_point(self) -> None:
        """After an outage: if the stream was made anew (its store lost), start at its
        beginning rather than after a sequence it never reached."""
        state = (await self._api(f"STREAM.INFO.{self._stream}", {})).get("state", {})
        first, last = int(state.get("first_seq", 1) or 1), int(state.get("last_seq", 0))
        if last < self._last_sseq:
            logger.warning("chat cluster: the stream was made anew; reading it from the start")
            self._last_sseq = first - 1

    async def _start_consumer(self) -> None:
        """The first consumer: from the last ``history_replay`` lines of the stream."""
        info = await self._api(f"STREAM.INFO.{self._stream}", {})
        state = info.get("state", {})
        first, last = int(state.get("first_seq", 1) or 1), int(state.get("last_seq", 0))
        self._last_sseq = max(first, last - self.config.history_replay + 1) - 1
        await self._new_consumer()

    async def _new_consumer(self) -> None:
        """A consumer that starts after the last line this node delivered."""
        request = {
            "stream_name": self._stream,
            "config": {
                "ack_policy": "none",
                "deliver_policy": "by_start_sequence",
                "opt_start_seq": self._last_sseq + 1,
                "filter_subject": f"{self._subjects}.room.>",
                "inactive_threshold": int(CONSUMER_INACTIVE * 1e9),
                "mem_storage": True,
                "num_replicas": 1,
            },
        }
        answer = await self._api(f"CONSUMER.CREATE.{self._stream}", request)
        old, self._consumer = self._consumer, str(answer["name"])
        if old:
            self._spawn(self._delete_consumer(old))
        self._epoch += 1
        self._asked = 0
        self._last_cseq = 0
        self._pull_seen = self._now()
        self._consumer_ok = True
        pending = int(answer.get("num_pending", 0))
        assert self._ready is not None
        if pending == 0:
            self._ready.set()
        await self._pull_more()

    async def _delete_consumer(self, name: str) -> None:
        with contextlib.suppress(ServiceUnavailable):
            await self._api(f"CONSUMER.DELETE.{self._stream}.{name}", {})

    async def _pull_more(self) -> None:
        """Keep between one and two batches asked for (a new request once fewer than one
        batch is outstanding)."""
        if not self._consumer or not self._connected:
            return
        batch = self.config.pull_batch
        request = {
            "batch": batch,
            "expires": int(PULL_EXPIRES * 1e9),
            "idle_heartbeat": int(self.config.pull_heartbeat * 1e9),
        }
        while self._asked < batch:
            self._asked += batch
            with contextlib.suppress(Exception):  # a broken connection: recovery pulls again
                await self._nc.publish(
                    f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}",
                    json.dumps(request).encode(),
                    reply=f"{self._inbox}.pull.{self._epoch}",
                )

    async def _on_pull(self, msg: Any) -> None:
        """A line from the consumer (its subject is the line's) or a status for a pull
        request (its subject is the request's inbox, which names the consumer's epoch)."""
        if self._closing:
            return
        headers = msg.headers
        status = headers.get(_STATUS) if headers else None
        if status is not None:
            if msg.subject.rpartition(".")[2] == str(self._epoch):
                self._pull_seen = self._now()
                await self._on_pull_status(status, headers)
            return
        try:
            consumer, sseq, cseq, pending = _sequences(msg.reply)
        except (AttributeError, IndexError, ValueError):
            return  # not a JetStream message: a gap check replaces the consumer if needed
        if consumer != self._consumer:
            return  # from a consumer replaced since
        self._pull_seen = self._now()
        self._asked = max(0, self._asked - 1)
        if cseq != self._last_cseq + 1:
            expected = self._last_cseq + 1
            self._replace_consumer(f"expected line {expected} of the consumer, got {cseq}")
            return
        self._last_cseq = cseq
        self._lag = pending
        if sseq > self._last_sseq:
            if sseq > self._last_sseq + 1 and self._ready is not None and self._ready.is_set():
                self._counts["lost"] += sseq - self._last_sseq - 1
                if self._log is not None:
                    self._log.warning(
                        "chat cluster: %d lines expired before this node read them",
                        sseq - self._last_sseq - 1,
                    )
            self._last_sseq = sseq
            self._deliver(msg.subject, msg.data, headers)
        if pending == 0 and self._ready is not None:
            self._ready.set()
        await self._pull_more()

    async def _on_pull_status(self, status: str, headers: dict[str, str]) -> None:
        if status == "100":  # idle heartbeat: did we miss a line?
            last = headers.get("Nats-Last-Consumer")
            if last is not None and int(last) != self._last_cseq:
                self._replace_consumer(f"heartbeat says line {last}, we have {self._last_cseq}")
            return
        description = headers.get("Description", "")
        if status == "408" or (status == "409" and "Exceeded" in description):
            # A request expired (or was refused): what it did not deliver is not coming.
            unfilled = headers.get("Nats-Pending-Messages", "")
            self._asked -= int(unfilled) if unfilled.isdigit() else self.config.pull_batch
            self._asked = max(0, self._asked)
            await self._pull_more()
        elif "Shutdown" not in description:  # 404 gone, 409 deleted, 503 no JetStream
            self._replace_consumer(f"status {status} {description}".strip())

    def _deliver(self, subject: str, line: bytes, headers: dict[str, str] | None) -> None:
        self._counts["received"] += 1
        room = "#" + subject.rpartition(".")[2]
        origin: Hashable = None
        said = False
        if headers:
            node, _sep, session = headers.get(_ORIGIN, "").partition(":")
            if node == self.node_id and session.isdigit():
                origin = int(session)
            said = headers.get(_SAID) == "1"
        if said:
            self._remember(room, line)
        members = self._rooms.get(room)
        if not members:
            return
        self._counts["delivered"] += len(members)
        for subscriber in list(members):
            subscriber.deliver(line, origin)

    # -- housekeeping ----------------------------------------------------------------------

    async def _housekeeper(self) -> None:
        """Heartbeats, node liveness, ack timeouts and expiry, nick renewal, watchdog."""
        config = self.config
        next_beat = next_renewal = self._now()
        while True:
            await asyncio.sleep(_TICK)
            now = self._now()
            self._check_outbox(now)
            if now >= next_beat:
                next_beat = now + config.heartbeat
                await self._beat(now)
            if now >= next_renewal and self._available:
                next_renewal = now + config.nick_ttl / 4
                self._spawn(self._renew_nicks())
            if self._keeper is not None and not self._keeper.done():
                continue  # a consumer is being made: the keeper updates the availability
            if (
                self._connected
                and self._consumer_ok
                and now - self._pull_seen > 3 * config.pull_heartbeat
            ):
                self._replace_consumer("no heartbeat from the consumer")
            self._update_available()

    async def _beat(self, now: float) -> None:
        horizon = 3 * self.config.heartbeat
        for node, seen in list(self._nodes.items()):
            if now - seen > horizon:
                del self._nodes[node]
        if self._connected:
            with contextlib.suppress(Exception):
                await self._nc.publish(f"{self._subjects}.node", self.node_id.encode())

    async def _announce(self) -> None:
        """Say this node is up and learn who else is: the others answer a new node's
        heartbeat at once. Waits for its own heartbeat to come back, then a few round
        trips (at least ``DISCOVERY_WAIT``) for the others' answers."""
        assert self._loop is not None
        heard = self._heard_self = self._loop.create_future()
        started = self._now()
        await self._nc.publish(f"{self._subjects}.node", self.node_id.encode())
        async with asyncio.timeout(API_TIMEOUT):
            await heard
        await asyncio.sleep(max(DISCOVERY_WAIT, 4 * (self._now() - started)))

    async def _on_heartbeat(self, msg: Any) -> None:
        node = msg.data.decode("ascii", "replace")[:32]
        new = node not in self._nodes
        if new and len(self._nodes) >= MAX_NODES:
            return
        self._nodes[node] = self._now()
        if node == self.node_id:
            self._own_seen = self._now()
            if self._heard_self is not None and not self._heard_self.done():
                self._heard_self.set_result(None)
        elif new and self._connected:  # a node just started: let it know this one at once
            with contextlib.suppress(Exception):
                await self._nc.publish(f"{self._subjects}.node", self.node_id.encode())

    # -- the directory: nicks --------------------------------------------------------------

    def attach(self, node: ClusterNode) -> None:
        """Answer the cluster's questions from ``node`` and report to it."""
        self._node = node

    def is_available(self) -> bool:
        return self._available

    def _require_available(self) -> None:
        if not self._available:
            raise ServiceUnavailable(f"the chat cluster is unreachable ({self._down_reason})")

    def _nick_value(self, nick: str) -> bytes:
        return json.dumps({"node": self.node_id, "nick": nick}).encode()

    async def claim(self, nick: str) -> bool:
        """Take ``nick`` in the cluster (an atomic create of its key)."""
        self._require_available()
        js_errors = self._nats.js.errors
        key, value = nick_key(nick), self._nick_value(nick)
        try:
            try:
                revision = await self._nicks_kv.create(key, value)
            except js_errors.KeyWrongLastSequenceError:
                entry = await self._nicks_kv.get(key)  # ours, from an attempt that timed out?
                if entry.value != value:
                    return False
                revision = entry.revision
        except js_errors.KeyNotFoundError:
            return False  # deleted between the two calls: ask again later
        except (self._nats.errors.Error, TimeoutError, OSError) as exc:
            raise ServiceUnavailable(
                f"the chat cluster did not answer ({_describe(exc)})"
            ) from exc
        self._owned[nick.casefold()] = _Nick(nick, revision)
        return True

    def register(self, nick: str) -> None:
        """Hold ``nick`` (a guest nick from ``next_guest``); registered in the background."""
        self._owned[nick.casefold()] = _Nick(nick)
        self._kv_job("register", nick, 0)

    def release(self, nick: str) -> None:
        """Give ``nick`` back to the cluster (its key is deleted in the background)."""
        owned = self._owned.pop(nick.casefold(), None)
        if owned is not None and owned.revision:
            self._kv_job("release", owned.nick, owned.revision)

    def _kv_job(self, what: str, nick: str, revision: int) -> None:
        self._kv_jobs.append((what, nick, revision))
        if self._kv_wake is not None:
            self._kv_wake.set()

    async def _kv_worker(self) -> None:
        """Registers guest nicks and deletes released ones, in order, while available;
        what cannot be done now waits (a registration) or expires by itself (a release)."""
        assert self._kv_wake is not None
        jobs = self._kv_jobs
        while True:
            await self._kv_wake.wait()
            self._kv_wake.clear()
            while jobs and self._available:
                what, nick, revision = jobs[0]
                try:
                    if what == "register":
                        await self._register_now(nick)
                    else:
                        with contextlib.suppress(self._nats.js.errors.KeyWrongLastSequenceError):
                            await self._nicks_kv.delete(nick_key(nick), last=revision)
                except (self._nats.errors.Error, TimeoutError, OSError):
                    break  # unavailable: the renewal after recovery registers it
                jobs.popleft()
            while len(jobs) > KV_BACKLOG:
                jobs.popleft()  # a registration is redone by the renewal; a release expires

    async def _register_now(self, nick: str) -> None:
        owned = self._owned.get(nick.casefold())
        if owned is None or owned.nick != nick or owned.revision:
            return  # released or registered since
        if not await self._renew(owned):
            self._lose(owned)

    async def _renew(self, owned: _Nick) -> bool:
        """Write ``owned`` again (compare-and-set on its revision, or create it): False if
        another node holds it."""
        js_errors = self._nats.js.errors
        key, value = nick_key(owned.nick), self._nick_value(owned.nick)
        if owned.revision:
            try:
                owned.revision = await self._nicks_kv.update(key, value, last=owned.revision)
                return True
            except js_errors.KeyWrongLastSequenceError:
                pass  # expired (an outage longer than nick_ttl) or taken
        try:
            owned.revision = await self._nicks_kv.create(key, value)
            return True
        except js_errors.KeyWrongLastSequenceError:
            try:
                entry = await self._nicks_kv.get(key)
            except js_errors.KeyNotFoundError:
                return True  # gone again: the next renewal creates it
            if entry.value == value:
                owned.revision = entry.revision
                return True
            return False

    def _lose(self, owned: _Nick) -> None:
        if self._owned.get(owned.nick.casefold()) is owned:
            del self._owned[owned.nick.casefold()]
            logger.info("chat cluster: nick %s was taken by another node", owned.nick)
            if self._node is not None:
                self._node.nick_lost(owned.nick)

    async def _renew_nicks(self) -> None:
        """Renew every nick this node holds (registering those not registered yet)."""
        semaphore = asyncio.Semaphore(_KV_CONCURRENCY)

        async def renew(owned: _Nick) -> None:
            async with semaphore:
                if self._owned.get(owned.nick.casefold()) is owned and not await self._renew(
                    owned
                ):
                    self._lose(owned)

        with contextlib.suppress(self._nats.errors.Error, TimeoutError, OSError):
            await self._gather(renew(owned) for owned in list(self._owned.values()))

    async def _gather(self, coroutines: Any) -> None:
        results = await asyncio.gather(*coroutines, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result

    # -- the directory: guest numbers ------------------------------------------------------

    def next_guest(self) -> int | None:
        """A guest number no other node gives out (None if this node has run out)."""
        if (
            len(self._guests) < GUEST_BLOCK // 2
            and (self._guest_fetch is None or self._guest_fetch.done())
            and self._started
            and not self._closing
        ):
            self._guest_fetch = self._spawn(self._take_guest_block())
        return self._guests.popleft() if self._guests else None

    async def _take_guest_block(self) -> None:
        """Take the next ``GUEST_BLOCK`` numbers from the cluster's counter (a CAS loop)."""
        js_errors = self._nats.js.errors
        for _attempt in range(100):
            try:
                try:
                    entry = await self._ids_kv.get(_GUESTS_KEY)
                    taken = int(entry.value)
                    await self._ids_kv.update(
                        _GUESTS_KEY, str(taken + GUEST_BLOCK).encode(), last=entry.revision
                    )
                except js_errors.KeyNotFoundError:
                    taken = 0
                    await self._ids_kv.create(_GUESTS_KEY, str(GUEST_BLOCK).encode())
            except js_errors.KeyWrongLastSequenceError:
                continue  # another node took a block meanwhile
            except (self._nats.errors.Error, TimeoutError, OSError, ValueError):
                return  # unavailable: the next call tries again
            self._guests.extend(range(taken + 1, taken + GUEST_BLOCK + 1))
            return

    # -- the directory: who is where -------------------------------------------------------

    async def who(self, room: str) -> tuple[int, list[str], str]:
        """Members of ``room`` on every node that answers within ``QUERY_TIMEOUT``."""
        answers, note = await self._ask_everyone("who", {"room": room})
        count = sum(int(answer.get("count", 0)) for answer in answers)
        nicks = [str(nick) for answer in answers for nick in answer.get("nicks", [])[:1000]]
        return count, nicks, note

    async def rooms(self) -> tuple[dict[str, int], str]:
        """Rooms of every node that answers within ``QUERY_TIMEOUT``, with member counts."""
        answers, note = await self._ask_everyone("list", {})
        rooms: dict[str, int] = {}
        for answer in answers:
            for room, count in dict(answer.get("rooms", {})).items():
                rooms[str(room)] = rooms.get(str(room), 0) + int(count)
        return rooms, note

    async def _ask_everyone(
        self, question: str, request: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], str]:
        self._require_available()
        assert self._loop is not None
        now = self._now()
        horizon = 3 * self.config.heartbeat
        expected = {node for node, seen in self._nodes.items() if now - seen <= horizon}
        expected.add(self.node_id)
        query_id = str(next(self._query_ids))
        query = _Query(expected, self._loop.create_future())
        self._queries[query_id] = query
        try:
            await self._nc.publish(
                f"{self._subjects}.{question}",
                json.dumps(request).encode(),
                reply=f"{self._inbox}.q.{query_id}",
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.query_timeout):
                    await query.done
        except (self._nats.errors.Error, OSError) as exc:
            raise ServiceUnavailable(
                f"the chat cluster did not answer ({_describe(exc)})"
            ) from exc
        finally:
            del self._queries[query_id]
        answered, asked = len(query.answers), len(query.expected | query.answers.keys())
        note = "" if answered >= asked else f"{answered} of {asked} servers answered"
        return list(query.answers.values()), note

    async def _on_answer(self, msg: Any) -> None:
        query = self._queries.get(msg.subject.rpartition(".")[2])
        if query is not None:
            query.take(_json_object(msg.data))

    def _known_nodes(self) -> list[str]:
        """The nodes heard from in the last three heartbeats, this one included."""
        now, horizon = self._now(), 3 * self.config.heartbeat
        known = [node for node, seen in self._nodes.items() if now - seen <= horizon]
        return [self.node_id, *(node for node in known if node != self.node_id)][:MAX_NODES]

    async def _on_who(self, msg: Any) -> None:
        request = _json_object(msg.data)
        room = request.get("room")
        if self._node is None or not isinstance(room, str) or not msg.reply:
            return
        count, nicks = self._node.who(room)
        answer = {
            "node": self.node_id,
            "nodes": self._known_nodes(),
            "count": count,
            "nicks": nicks,
        }
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps(answer).encode())

    async def _on_list(self, msg: Any) -> None:
        if self._node is None or not msg.reply:
            return
        answer = {"node": self.node_id, "nodes": self._known_nodes(), "rooms": self._node.rooms()}
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps(answer).encode())

    # -- the directory: private messages ---------------------------------------------------

    async def private(self, sender: str, nick: str, text: str) -> str | None:
        """Deliver a private message to ``nick`` on whichever node holds it."""
        self._require_available()
        js_errors = self._nats.js.errors
        try:
            entry = await self._nicks_kv.get(nick_key(nick))
        except js_errors.KeyNotFoundError:
            return None
        except (self._nats.errors.Error, TimeoutError, OSError) as exc:
            raise ServiceUnavailable(
                f"the chat cluster did not answer ({_describe(exc)})"
            ) from exc
        owner = _json_object(entry.value).get("node")
        if owner == self.node_id:
            return None if self._node is None else self._node.private(sender, nick, text)
        request = json.dumps({"sender": sender, "nick": nick, "text": text}).encode()
        try:
            reply = await self._nc.request(
                f"{self._subjects}.node.{owner}.msg", request, timeout=self.config.query_timeout
            )
        except (self._nats.errors.Error, TimeoutError, OSError):
            raise ServiceUnavailable(f"the server of {nick} did not answer") from None
        delivered = _json_object(reply.data).get("nick")
        return delivered if isinstance(delivered, str) else None

    async def _on_private(self, msg: Any) -> None:
        request = _json_object(msg.data)
        sender, nick, text = (request.get(key) for key in ("sender", "nick", "text"))
        if not (isinstance(sender, str) and isinstance(nick, str) and isinstance(text, str)):
            return
        delivered = None if self._node is None else self._node.private(sender, nick, text)
        with contextlib.suppress(Exception):
            await msg.respond(json.dumps({"nick": delivered}).encode())

    # -- statistics ------------------------------------------------------------------------

    def statistics(self) -> NatsHubStatistics:
        """Return a snapshot of the counters."""
        counts = self._counts
        now = self._now() if self._loop is not None else 0.0
        horizon = 3 * self.config.heartbeat
        nodes = {node for node, seen in self._nodes.items() if now - seen <= horizon}
        return NatsHubStatistics(
            available=self._available,
            nodes=len(nodes | {self.node_id}),
            outbox=len(self._outbox) + len(self._inflight),
            lag=self._lag,
            nicks=len(self._owned),
            **counts,
        )

    def summary(self) -> str:
        """The counters as one line."""
        s = self.statistics()
        return (
            f"nats: node {self.node_id}, {'available' if s.available else 'UNAVAILABLE'}, "
            f"{s.nodes} nodes, {s.published} lines published, {s.acknowledged} confirmed, "
            f"{s.resent} resent, {s.undelivered} not delivered, {s.received} read, "
            f"{s.delivered} deliveries, {s.lost} lost, {s.consumer_resets} consumer resets, "
            f"{s.dropped} dropped by NATS, {s.outages} outages"
        )


def _sequences(reply: str) -> tuple[str, int, int, int]:
    """Consumer name, stream sequence, consumer sequence and pending count from a JetStream
    reply subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<time>.<pending>``,
    or the longer form with a domain and an account hash)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        return tokens[3], int(tokens[5]), int(tokens[6]), int(tokens[8])
    return tokens[5], int(tokens[7]), int(tokens[8]), int(tokens[10])


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _reason(error: BaseException) -> str:
    """Why NATS could not be used, for a person: the system's words for an OSError."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return _describe(error)


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
