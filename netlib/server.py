"""serve_tcp / open_tcp_server: message servers with safe defaults, and the Server object.

Theory of operation
-------------------
netlib runs its own accept loop on each listening socket (``loop.add_reader`` plus
non-blocking ``accept()``, up to ``ACCEPT_BATCH`` per wake-up) and hands each accepted socket
to ``loop.connect_accepted_socket``; this behaves the same on asyncio and uvloop and puts
three policies in netlib's hands:

* **File-descriptor exhaustion** (EMFILE/ENFILE/ENOBUFS/ENOMEM): the listener stops watching
  the socket and retries after ``ACCEPT_RETRY_DELAY`` (100 ms), or as soon as one of its
  connections closes and frees a descriptor, instead of spinning or waiting a whole second;
  the condition is logged at most once a second.
* **max_connections**: a connection above the cap is closed at once and counted.
* **TCP keepalive** on every accepted TCP socket (not Unix sockets): silent for
  ``keepalive_idle`` (30 s), then ``keepalive_count`` (4) probes ``keepalive_interval`` (5 s)
  apart, so a peer whose network vanished is noticed within about 50 s even on a connection
  with no deadline (a chat member that only listens).
* **max_connections_per_host**: so that one address cannot take every slot of the cap, a
  connection from a peer IP address that already has that many open is closed at once and
  counted (``rejected_per_host``). The key is the whole address, IPv4 or IPv6 (a host
  with many IPv6 addresses is not caught: a /64 key would be the next step); loopback is
  not exempt; Unix-socket peers are not limited (they have no address).
* **Graceful shutdown**: ``shutdown(grace)`` closes the listeners (new connections are
  refused), ends each connection's input after the messages already received, lets the
  handlers answer them, sends EOF and waits for the peers to close, and aborts whatever is
  left when the grace period ends.

A connection's setup (with the TLS handshake) is driven without a task; the user's
handler then runs with a ``MessageStream`` in a task of its own (a ``protocol`` factory
such as the chat's consumes messages as callbacks instead, with no task at all). A
graceful close that must wait for the peer's EOF is a second short task, started by the
handler's done callback. Errors the peer causes (malformed frames, resets, timeouts)
end that connection and are counted; an unexpected exception in a handler is counted and
logged with its traceback, at most once a second (``LOG_INTERVAL``; the lines in between
are counted in the next one and at close), so a handler that fails on every connection
cannot flood the log. Neither disturbs other connections.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import logging
import resource
import socket
import ssl as _ssl
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Any, Final, Protocol, TypedDict

from typing_extensions import Unpack

from netlib.aio.deadlines import DeadlineTimer
from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import (
    DEFAULT_KEEPALIVE_COUNT,
    DEFAULT_KEEPALIVE_IDLE,
    DEFAULT_KEEPALIVE_INTERVAL,
    bind,
    extra_info,
    format_address,
    remove_socket_file,
    set_tcp_keepalive,
)
from netlib.aio.stream import StreamProtocol, deadline_timer_for
from netlib.errors import (
    BrokenResourceError,
    EndOfStream,
    PeerTimedOut,
    ProtocolError,
    SlowConsumer,
)
from netlib.sansio.budget import DEFAULT_MEMORY_BUDGET, MemoryBudget
from netlib.sansio.framing import Framing, framing_from_name
from netlib.sansio.stream import (
    DEFAULT_READ_LIMIT,
    DEFAULT_WRITE_HIGH,
    DEFAULT_WRITE_LOW,
    StreamLimits,
)
from netlib.streams import DEFAULT_CLOSE_TIMEOUT, Handler, MessageStream

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_RETRY_DELAY",
    "CANCEL_TIMEOUT",
    "DEFAULT_BACKLOG",
    "DEFAULT_FIRST_FRAME_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE_COUNT",
    "DEFAULT_KEEPALIVE_IDLE",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_CONNECTIONS_PER_HOST",
    "DEFAULT_SHUTDOWN_GRACE",
    "Handler",
    "ProtocolFactory",
    "Server",
    "ServerStatistics",
    "TCPServerOptions",
    "default_max_connections",
    "open_tcp_server",
    "serve_tcp",
]

logger = logging.getLogger("netlib.server")

DEFAULT_FIRST_FRAME_TIMEOUT: Final = 10.0
"""Seconds a new connection has to complete its first message (slowloris guard)."""
DEFAULT_IDLE_TIMEOUT: Final = 60.0
"""Seconds without traffic either way after which a connection is closed."""
DEFAULT_MAX_CONNECTIONS_PER_HOST: Final = 256
"""Connections one peer IP address may hold open at once; more are closed at once. 256 is
far above what one client needs (browsers open 6 per host, connection pools tens) and
leaves room for a NAT gateway of a small office, while one address can take at most 2.6%
of the default 10,000-connection cap. None disables the limit."""
DEFAULT_SHUTDOWN_GRACE: Final = 10.0
"""Seconds ``shutdown()`` lets handlers finish before aborting their connections."""
DEFAULT_BACKLOG: Final = 1024
"""Listen backlog."""
ACCEPT_BATCH: Final = 8
"""Most connections accepted per readiness event, so accepting cannot starve other work."""
ACCEPT_RETRY_DELAY: Final = 0.1
"""Seconds the accept loop pauses after running out of file descriptors."""
CANCEL_TIMEOUT: Final = 0.5
"""Seconds a cancelled connection task (a handler) may take to end once its connection is
aborted; a task still running then (one that swallows ``CancelledError``) is counted,
logged and no longer waited for, so ``shutdown()`` returns within ``grace`` plus this."""
_RESERVED_FDS: Final = 32
_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def default_max_connections() -> int:
    """Return the default connection cap: min(10000, RLIMIT_NOFILE - 32)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 10_000
    return max(1, min(10_000, soft - _RESERVED_FDS))


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """Counters of a server since it started (a snapshot).

    Attributes:
        accepted: connections accepted and served.
        active: connections open now.
        rejected: connections closed at once because ``max_connections`` was reached.
        rejected_per_host: connections closed at once because their peer address already
            had ``max_connections_per_host`` open.
        accept_errors: accept() failures (EMFILE and similar), each followed by a pause.
        tls_failures: connections whose TLS handshake failed or timed out.
        protocol_errors: connections closed for a malformed or oversized message.
        timeouts: connections closed by the first-message or idle deadline.
        resets: connections lost abruptly (reset, broken pipe).
        handler_errors: handlers that raised an unexpected exception.
        slow_consumers: connections cut off as ``SlowConsumer``: evicted by the memory
            budget, or held above ``write_high`` for ``send_timeout``.
        memory_held: bytes the connections hold in user space now, as they last reported
            it (what the ``max_memory`` budget counts; cut-off connections count until
            they are gone).
        aborted_at_shutdown: connections still open when the shutdown grace ended.
        abandoned_tasks: connection tasks still running ``CANCEL_TIMEOUT`` seconds after
            ``close()`` cancelled them (their connections are closed): no longer waited for.
    """

    accepted: int = 0
    active: int = 0
    rejected: int = 0
    rejected_per_host: int = 0
    accept_errors: int = 0
    tls_failures: int = 0
    protocol_errors: int = 0
    timeouts: int = 0
    resets: int = 0
    handler_errors: int = 0
    slow_consumers: int = 0
    memory_held: int = 0
    aborted_at_shutdown: int = 0
    abandoned_tasks: int = 0


@dataclass(slots=True)
class _Counters:
    """What a server counts as it happens (``ServerStatistics`` without the gauges)."""

    accepted: int = 0
    rejected: int = 0
    rejected_per_host: int = 0
    accept_errors: int = 0
    tls_failures: int = 0
    protocol_errors: int = 0
    timeouts: int = 0
    resets: int = 0
    handler_errors: int = 0
    slow_consumers: int = 0
    aborted_at_shutdown: int = 0
    abandoned_tasks: int = 0

    def snapshot(self, active: int, memory_held: int) -> ServerStatistics:
        return ServerStatistics(active=active, memory_held=memory_held, **asdict(self))


class _Listener:
    """Accept loop for one listening socket."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self._server = server
        self.sock = sock
        self._loop = server._loop
        self._retry: asyncio.TimerHandle | None = None
        # What accepted sockets are made of, read once (socket.accept() reads each of these
        # through an enum conversion, per connection).
        self._kind = (int(sock.family), int(sock.type), sock.proto)
        self._ip = sock.family != socket.AF_UNIX
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        family, kind, proto = self._kind
        on_accepted = self._server._on_accepted
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = self.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_error(exc)
                return
            on_accepted(socket.socket(family, kind, proto, fd), addr, self._ip)

    def _on_error(self, exc: OSError) -> None:
        self._server._counters.accept_errors += 1
        if exc.errno in _EXHAUSTED:
            self._server._accept_log.warning("accept() failed: %s; retrying in 100 ms", exc)
            self._loop.remove_reader(self.sock.fileno())
            self._retry = self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume)
        else:  # e.g. ECONNABORTED: that peer gave up; keep accepting the others
            self._server._accept_log.warning("accept() failed: %s", exc)

    def _resume(self) -> None:
        self._retry = None
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._on_readable()

    def descriptor_freed(self) -> None:
        """A connection closed: if paused by EMFILE, retry now rather than at the timer."""
        if self._retry is not None:
            self._retry.cancel()
            self._resume()

    def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
        else:
            self._loop.remove_reader(self.sock.fileno())
        if self.sock.family == socket.AF_UNIX:
            remove_socket_file(self.sock.getsockname())
        self.sock.close()


class ProtocolFactory(Protocol):
    """Makes the ``StreamProtocol`` of an accepted connection: called as
    ``StreamProtocol`` itself is, with the server's framing, limits and wiring."""

    def __call__(
        self,
        framing: Framing,
        limits: StreamLimits,
        *,
        deadlines: DeadlineTimer | None,
        budget: MemoryBudget[StreamProtocol] | None,
        on_lost: Callable[[StreamProtocol], None],
    ) -> StreamProtocol: ...


@dataclass(frozen=True, slots=True)
class _Config:
    handler: Handler | None
    protocol: ProtocolFactory
    framing: Framing
    limits: StreamLimits
    ssl: _ssl.SSLContext | None
    tls_handshake_timeout: float
    max_connections: int
    max_connections_per_host: int | None
    keepalive: tuple[float, float, int] | None  # idle, interval, count
    max_memory: int | None
    shutdown_grace: float
    reject_notice: Callable[[str], bytes] | None = None

    @classmethod
    def serving(
        cls,
        opener: str,
        handler: Handler | None,
        protocol: ProtocolFactory | None,
        framing: Framing | str,
        **options: Any,
    ) -> _Config:
        """The config of a server that runs ``handler`` on each connection, or serves it
        with ``protocol`` (exactly one of the two), opened by the function ``opener``."""
        if (handler is None) == (protocol is None):
            raise TypeError(f"{opener} needs a handler or a protocol factory, not both")
        return cls(
            handler=handler,
            protocol=StreamProtocol if protocol is None else protocol,
            framing=framing_from_name(framing),
            **options,
        )


class Server:
    """A running message server (from ``open_tcp_server``).

    ``close()`` stops accepting and aborts every connection at once; ``shutdown()`` does it
    gracefully; ``wait_closed()`` waits until every connection task has ended.
    """

    def __init__(self, config: _Config, socks: list[socket.socket]) -> None:
        self._config = config
        self._loop = asyncio.get_running_loop()
        self._counters = _Counters()
        self._accept_log = ThrottledLog(logger, self._loop)
        self._handler_log = ThrottledLog(logger, self._loop)
        self._cut_log = ThrottledLog(logger, self._loop)  # connections closed by a limit
        self._connections: dict[asyncio.Future[Any], StreamProtocol] = {}
        # Open connections per peer address, and each connection's address (only while
        # max_connections_per_host is set, and only for IP peers).
        self._per_host: dict[str, int] = {}
        self._host_of: dict[StreamProtocol, str] = {}
        limits = config.limits
        self._deadlines = deadline_timer_for(limits) if limits.has_deadlines else None
        self._budget: MemoryBudget[StreamProtocol] | None = (
            None if config.max_memory is None else MemoryBudget(config.max_memory)
        )
        # A connection's setup (_start: transport, TLS) is driven without a task (_drive),
        # then its handler runs in a task, then, if the peer has not half-closed yet,
        # protocol.finish (a graceful close) in a short second one. With a protocol
        # factory: setup, then the protocol's closed future. Each phase's done callback
        # starts the next.
        self._context = contextvars.copy_context()
        self._started_cb = self._on_started
        self._handled_cb = self._on_handled
        self._closed_cb = self._on_closed
        self._lost_cb = self._on_lost
        self._closing = False
        self._aborted = False
        self._settled: asyncio.Future[None] | None = None  # see _wait_settled
        self._stopped = self._loop.create_future()
        self.addresses: list[Any] = [sock.getsockname() for sock in socks]
        """The bound addresses (with the real ports when bound to port 0)."""
        if config.keepalive is not None:
            for sock in socks:
                if sock.family != socket.AF_UNIX:
                    _set_keepalive(sock, config.keepalive)  # Linux: inherited when accepted
        self._listeners = [_Listener(self, sock) for sock in socks]

    # -- accepting --------------------------------------------------------------------------

    def _reject(self, conn: socket.socket, reason: str) -> None:
        """Close a connection above a cap, after the ``reject_notice`` if any: one send
        that never waits (a full buffer, or a peer already gone, loses it)."""
        notice = self._config.reject_notice
        if notice is not None:
            try:
                conn.setblocking(False)
                conn.send(notice(reason))
            except OSError:
                pass
        conn.close()

    def _on_accepted(self, conn: socket.socket, addr: Any, ip: bool) -> None:
        if len(self._connections) >= self._config.max_connections:
            self._counters.rejected += 1
            self._reject(conn, f"server full ({self._config.max_connections} connections)")
            return
        host = None
        per_host = self._config.max_connections_per_host
        if per_host is not None and ip:
            host = str(addr[0])  # the peer's IP address, IPv4 or IPv6 alike
            if self._per_host.get(host, 0) >= per_host:
                self._counters.rejected_per_host += 1
                self._reject(conn, f"too many connections from your address (limit {per_host})")
                return
        conn.setblocking(False)
        if ip and not _KEEPALIVE_INHERITED and (keepalive := self._config.keepalive):
            try:
                _set_keepalive(conn, keepalive)
            except OSError as exc:  # e.g. the peer is already gone: setup will find out
                logger.debug("setting keepalive failed: %r", exc)
        self._counters.accepted += 1
        protocol = self.new_protocol()
        if host is not None:
            self._per_host[host] = self._per_host.get(host, 0) + 1
            self._host_of[protocol] = host
        setup: asyncio.Future[bool] = self._loop.create_future()
        self._connections[setup] = protocol
        _drive(self._start(conn, protocol), setup, self._started_cb)

    def new_protocol(self) -> StreamProtocol:
        """A connection's protocol, with this server's framing, limits, deadline timer,
        memory budget and counters: for accepted sockets, and for the connections another
        transport makes (reliable UDP)."""
        return self._config.protocol(
            self._config.framing,
            self._config.limits,
            deadlines=self._deadlines,
            budget=self._budget,
            on_lost=self._lost_cb,
        )

    def serve_connection(self, protocol: StreamProtocol) -> None:
        """Serve a connection whose transport is made (``connection_made`` ran): start its
        handler, track it for ``statistics()``, ``shutdown()`` and ``close()``."""
        self._counters.accepted += 1
        setup: asyncio.Future[bool] = self._loop.create_future()
        setup.set_result(True)
        self._connections[setup] = protocol
        self._on_started(setup)

    def _release(self, protocol: StreamProtocol | None) -> None:
        """``protocol``'s connection has no task left: free its per-host slot."""
        if protocol is None:
            return
        protocol.consumer_done()  # a no-op after a handler; else (no handler started, or
        # a protocol that served itself) it frees the buffers and leaves the budget
        host = self._host_of.pop(protocol, None)
        if host is not None:
            if (count := self._per_host[host] - 1) > 0:
                self._per_host[host] = count
            else:
                del self._per_host[host]

    def _track(
        self,
        task: asyncio.Future[Any],
        protocol: StreamProtocol,
        then: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self._connections[task] = protocol
        # The callbacks are bound once per server and run in one context copied once:
        # nothing is allocated per connection to hold them.
        task.add_done_callback(then, context=self._context)

    async def _start(self, conn: socket.socket, protocol: StreamProtocol) -> bool:
        config = self._config
        try:
            await self._loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=config.ssl,
                ssl_handshake_timeout=config.tls_handshake_timeout if config.ssl else None,
            )
        except (OSError, _ssl.SSLError, TimeoutError) as exc:
            conn.close()
            if config.ssl:
                self._counters.tls_failures += 1
            else:
                self._counters.resets += 1
            logger.debug("connection setup failed: %r", exc)
            return False
        except BaseException:
            conn.close()
            raise
        return True

    def _untrack(self, task: asyncio.Future[Any]) -> StreamProtocol | None:
        """Forget ``task``; None if it was abandoned (its connection is closed already)."""
        protocol = self._connections.pop(task, None)
        if protocol is None and not task.cancelled() and task.exception() is not None:
            logger.debug("abandoned connection task ended: %r", task.exception())
        return protocol

    # Each phase's done callback returns the protocol when the connection has no next task
    # (its chain ended: free its per-host slot), else None.

    def _on_started(self, task: asyncio.Future[Any]) -> None:
        self._release(self._started(task))
        self._settle()

    def _started(self, task: asyncio.Future[Any]) -> StreamProtocol | None:
        protocol = self._untrack(task)
        if protocol is None or task.cancelled():
            return protocol
        if (exc := task.exception()) is not None:
            logger.error("connection setup failed", exc_info=exc)
            return protocol
        if not task.result():
            return protocol
        if self._aborted:  # close() ran while this connection was being set up
            protocol.abort()
            return protocol
        handler = self._config.handler
        if handler is None:  # the protocol serves itself: wait for the connection's end
            self._track(protocol.closed_future(), protocol, self._closed_cb)
            return None
        # The handler runs in a copy of the server's context, as a task's first step would:
        # what it sets stays with this connection.
        stream = MessageStream(protocol, linger=True)
        handling = self._context.copy().run(_start_handler, handler, stream)
        self._track(handling, protocol, self._handled_cb)
        return None

    def _on_handled(self, task: asyncio.Future[Any]) -> None:
        self._release(self._handled(task))
        self._settle()

    def _handled(self, task: asyncio.Future[Any]) -> StreamProtocol | None:
        protocol = self._untrack(task)
        if protocol is None:
            return None
        if not task.cancelled() and (exc := task.exception()) is not None:
            peer = extra_info(protocol.transport, "peername")
            if isinstance(exc, (EndOfStream, ProtocolError, BrokenResourceError)):
                logger.debug("connection %s ended: %r", peer, exc)
            else:
                self._counters.handler_errors += 1
                self._handler_log.log(logging.ERROR, "handler failed for %s", peer, exc_info=exc)
        protocol.consumer_done()
        if protocol.lost or self._aborted:  # nothing left to close gracefully
            return protocol
        self._track(protocol.finish_soon(DEFAULT_CLOSE_TIMEOUT), protocol, self._closed_cb)
        return None

    def _on_closed(self, task: asyncio.Future[Any]) -> None:
        protocol = self._untrack(task)
        if protocol is not None and not task.cancelled() and (exc := task.exception()):
            logger.error("closing the connection failed", exc_info=exc)
        self._release(protocol)
        self._settle()

    def _settle(self) -> None:
        """Wake ``_wait_settled()`` once no connection task is left or ``close()`` ran."""
        settled = self._settled
        if settled is not None and (self._aborted or not self._connections):
            self._settled = None
            settled.set_result(None)

    def _on_lost(self, protocol: StreamProtocol) -> None:
        """A connection's transport is gone: count why, and retry accept if fds ran out."""
        self._count_end(protocol)

        if not self._closing:
            for listener in self._listeners:
                listener.descriptor_freed()

    def _count_end(self, protocol: StreamProtocol) -> None:
        error = protocol.conn.error
        match error:
            case PeerTimedOut():
                self._counters.timeouts += 1
            case ProtocolError():
                self._counters.protocol_errors += 1
            case SlowConsumer():
                self._counters.slow_consumers += 1
            case BrokenResourceError():
                self._counters.resets += 1
                return
            case _:
                return
        # A limit closed it: say so where the operator looks (INFO, at most one line a
        # second, counting the rest), so a deadline does not cut people off unexplained.
        peer = extra_info(protocol.transport, "peername")
        self._cut_log.log(logging.INFO, "closed %s: %s", format_address(peer), error)

    # -- public API -------------------------------------------------------------------------

    def statistics(self) -> ServerStatistics:
        """Return a snapshot of the server's counters."""
        held = 0 if self._budget is None else self._budget.total
        return self._counters.snapshot(active=len(self._connections), memory_held=held)

    @property
    def is_serving(self) -> bool:
        """True until ``close()`` or ``shutdown()`` is called."""
        return not self._closing

    def _stop_accepting(self) -> None:
        if self._closing:
            return
        self._closing = True
        for listener in self._listeners:
            listener.close()
        if not self._stopped.done():
            self._stopped.set_result(None)

    def close(self) -> None:
        """Stop accepting and abort every connection now (see ``shutdown`` for grace)."""
        self._aborted = True
        self._stop_accepting()
        for task, protocol in list(self._connections.items()):
            protocol.abort()
            if isinstance(task, asyncio.Task):  # not a protocol's own closed future
                task.cancel()
        self._settle()

    async def _wait_settled(self) -> None:
        """Wait until no connection task is left, or until ``close()`` runs."""
        while self._connections and not self._aborted:
            if self._settled is None:
                self._settled = self._loop.create_future()
            await asyncio.shield(self._settled)  # shared by every waiter: never cancel it

    async def _reap(self) -> None:
        """After ``close()``: wait ``CANCEL_TIMEOUT`` for the cancelled tasks, then give up
        on those still running (they swallowed the cancellation): count, log, forget."""
        deadline = self._loop.time() + CANCEL_TIMEOUT
        while self._connections and (remaining := deadline - self._loop.time()) > 0:
            await asyncio.wait(list(self._connections), timeout=remaining)
        stubborn = list(self._connections)
        if not stubborn:
            return
        self._counters.abandoned_tasks += len(stubborn)
        logger.error(
            "%d connection task(s) did not end within %ss of being cancelled (does the "
            "handler catch CancelledError?); their connections are closed and they are no "
            "longer waited for: %r",
            len(stubborn),
            CANCEL_TIMEOUT,
            stubborn[:3],
        )
        for task in stubborn:
            self._release(self._connections.pop(task, None))

    async def wait_closed(self) -> None:
        """Wait until the listeners are closed and every connection task has ended.

        Once ``close()`` has run, waits at most ``CANCEL_TIMEOUT`` for the cancelled tasks:
        a handler that swallows ``CancelledError`` is abandoned (counted in
        ``abandoned_tasks`` and logged), not waited for.
        """
        await asyncio.shield(self._stopped)
        await self._wait_settled()
        if self._connections:
            await self._reap()
        if self._deadlines is not None:
            self._deadlines.close()
        self._handler_log.flush(logging.ERROR, "handlers failed")
        self._cut_log.flush(logging.INFO, "connections closed by a limit")

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let handlers finish within ``grace`` seconds, then abort.

        Each connection's input ends after the messages already received (its handler sees
        ``EndOfStream`` next); replies still flow; the connection then closes with EOF.
        Returns within ``grace`` plus ``CANCEL_TIMEOUT`` seconds whatever peers and handlers
        do: when a peer never reads, or a handler ignores cancellation (see ``wait_closed``).
        """
        grace = self._config.shutdown_grace if grace is None else grace
        self._stop_accepting()
        for protocol in self._connections.values():
            protocol.end_input()
        if self._connections:
            try:
                async with asyncio.timeout(grace):
                    await self._wait_settled()  # each phase's callback adds the next task
            except TimeoutError:
                self._counters.aborted_at_shutdown += len(self._connections)
            self.close()
        await self.wait_closed()

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancel this to stop waiting)."""
        await asyncio.shield(self._stopped)

    def __repr__(self) -> str:
        return f"<Server addresses={self.addresses!r} active={len(self._connections)}>"


_KEEPALIVE_INHERITED: Final = sys.platform == "linux"
"""Whether accepted sockets inherit the listening socket's keepalive options (Linux copies
them, as it does ``TCP_NODELAY``), so none has to be set per connection."""


def _set_keepalive(sock: socket.socket, keepalive: tuple[float, float, int]) -> None:
    idle, interval, count = keepalive
    set_tcp_keepalive(sock, idle=idle, interval=interval, count=count)


def _start_handler(handler: Handler, stream: MessageStream) -> asyncio.Future[Any]:
    """Start ``handler(stream)`` as a task; a handler that fails to start gives a failed
    future instead of an exception in a done callback (so it is counted and closed)."""
    try:
        return asyncio.ensure_future(handler(stream))
    except Exception as exc:
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(exc)
        return failed


def _drive(
    coro: Coroutine[Any, Any, bool],
    result: asyncio.Future[bool],
    then: Callable[[asyncio.Future[bool]], None],
) -> None:
    """Run ``coro`` (a connection's setup) to its end without a task, resolve ``result``
    and call ``then(result)`` at once (not one loop iteration later, as a done callback).

    A task costs a connection about 40 µs of server CPU in all (registration, a scheduled
    first step, done callbacks) and, were the handler run in the same task, a frame kept
    for the connection's life. Setup needs neither: it only awaits futures (the transport's
    ``connection_made``, a TLS handshake), so each is given a done callback that resumes the
    coroutine, as a task would. The first step runs at once, in the accept loop.
    """

    def step(_done: object = None) -> None:
        try:
            waiting = coro.send(None)
        except StopIteration as end:
            result.set_result(end.value)
            then(result)
            return
        except asyncio.CancelledError:  # a future it awaited was cancelled
            result.cancel()
            then(result)
            return
        except BaseException as exc:  # _start lets only unexpected errors through
            result.set_exception(exc)
            then(result)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise  # as a task would: these stop the loop
            return
        if waiting is None:  # a bare yield: resume on the next iteration
            asyncio.get_running_loop().call_soon(step)
        else:
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(step)

    step()


# -- binding ----------------------------------------------------------------------------------


def _listen(family: int, address: Any, *, backlog: int, reuse_port: bool) -> socket.socket:
    # IPPROTO_TCP named explicitly: accepted sockets inherit it, and asyncio sets
    # TCP_NODELAY only on sockets whose proto says TCP (with proto 0, Nagle's algorithm
    # held small replies back: chat fan-out latency tripled on asyncio).
    proto = 0 if family == socket.AF_UNIX else socket.IPPROTO_TCP
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        bind(sock, address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def _bind(
    host: str | None, port: int, path: str | None, *, backlog: int, reuse_port: bool
) -> list[socket.socket]:
    if path is not None:
        remove_socket_file(path)
        return [_listen(socket.AF_UNIX, path, backlog=backlog, reuse_port=False)]
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    try:
        for family, _type, _proto, _name, address in dict.fromkeys(
            (i[0], i[1], i[2], i[3], i[4]) for i in infos
        ):
            socks.append(_listen(family, address, backlog=backlog, reuse_port=reuse_port))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


@asynccontextmanager
async def open_tcp_server(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    protocol: ProtocolFactory | None = None,
    path: str | None = None,
    framing: Framing | str = "raw",
    ssl: _ssl.SSLContext | None = None,
    max_connections: int | None = None,
    max_connections_per_host: int | None = DEFAULT_MAX_CONNECTIONS_PER_HOST,
    first_frame_timeout: float | None = DEFAULT_FIRST_FRAME_TIMEOUT,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    message_timeout: float | None = None,
    send_timeout: float | None = None,
    max_memory: int | None = DEFAULT_MEMORY_BUDGET,
    keepalive_idle: float | None = DEFAULT_KEEPALIVE_IDLE,
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
    keepalive_count: int = DEFAULT_KEEPALIVE_COUNT,
    tls_handshake_timeout: float = DEFAULT_FIRST_FRAME_TIMEOUT,
    write_high: int = DEFAULT_WRITE_HIGH,
    write_low: int = DEFAULT_WRITE_LOW,
    transport_high: int | None = None,
    read_limit: int = DEFAULT_READ_LIMIT,
    backlog: int = DEFAULT_BACKLOG,
    reuse_port: bool = False,
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    reject_notice: Callable[[str], bytes] | None = None,
) -> AsyncIterator[Server]:
    """Serve ``handler`` on a TCP (or Unix) socket for the duration of the ``async with``.

    Args:
        handler: ``async def handler(stream: MessageStream)``, run once per connection; the
            connection closes when it returns.
        host: address or name to bind (default loopback; None binds every interface).
        port: TCP port (0 picks a free one: see ``Server.addresses``).
        protocol: with ``handler=None``, serve each connection with the ``StreamProtocol``
            subclass this makes, which consumes messages as callbacks (no task per
            connection; ``ChatProtocol`` is one); the connection is served until it closes.
        path: bind a Unix domain socket at this path instead of ``host``/``port``.
        framing: ``"raw"``, ``"line"``, ``"length"`` or a ``Framing`` object.
        ssl: a server ``SSLContext`` to serve TLS.
        max_connections: cap on open connections (default ``default_max_connections()``).
        max_connections_per_host: cap on open connections from one peer IP address
            (default 256; None: no per-host cap). Excess connections are closed at once.
        first_frame_timeout: seconds to receive the first complete message (None: no limit).
        idle_timeout: seconds without traffic before closing (None: no limit).
        message_timeout: seconds a message may take from its first byte to its last, so
            trickling cannot hold a partial message open (None: no limit; the first
            message is bounded by ``first_frame_timeout``).
        send_timeout: seconds the write buffer may stay above ``write_high`` while the peer
            does not read, before the connection is cut off as ``SlowConsumer`` (None: the
            handler just waits in ``send()``).
        max_memory: bytes all connections together may hold in user space (queued input,
            partial frames, unsent output, a message a handler waits to send; default
            256 MiB, None: no bound); past it the largest holders are cut off as
            ``SlowConsumer``. RSS runs above it by the server's own overhead (measured:
            +250 to +280 MiB of RSS with 1,000 stalled echo connections at the default;
            row R5b of docs/robustness.md).
        keepalive_idle: TCP keepalive on accepted TCP sockets: seconds of silence before
            the kernel probes the peer (default 30; None: no keepalive).
        keepalive_interval: seconds between keepalive probes (default 5).
        keepalive_count: unanswered probes that end the connection (default 4): a vanished
            peer is noticed after idle + count x interval seconds (50 s by default).
            Timings are whole seconds (rounded up).
        tls_handshake_timeout: seconds for the TLS handshake.
        write_high, write_low: write-buffer marks for backpressure (and the send deadline).
        transport_high: for fan-out services (``send_framed`` of one message to many
            connections): a lower high mark for the transport alone; past it the messages
            wait as references, not copied into each transport's buffer (see
            ``StreamLimits``; the chat uses 64 KiB).
        read_limit: unconsumed received bytes above which reading pauses.
        backlog: listen backlog.
        reuse_port: set SO_REUSEPORT, so several processes can serve one port.
        shutdown_grace: grace period of the shutdown done when the block exits.
        reject_notice: makes the bytes a connection closed by ``max_connections`` or
            ``max_connections_per_host`` is sent first, from the reason (e.g. "server full
            (10000 connections)"); sent only if the socket takes them at once.

    Yields:
        The running ``Server``. Leaving the block shuts it down gracefully.
    """
    config = _Config.serving(
        "open_tcp_server",
        handler,
        protocol,
        framing,
        limits=StreamLimits(
            first_frame_timeout=first_frame_timeout,
            idle_timeout=idle_timeout,
            message_timeout=message_timeout,
            send_timeout=send_timeout,
            write_high=write_high,
            write_low=write_low,
            transport_high=transport_high,
            read_limit=read_limit,
        ),
        ssl=ssl,
        tls_handshake_timeout=tls_handshake_timeout,
        max_connections=max_connections or default_max_connections(),
        max_connections_per_host=_positive_or_none(
            "max_connections_per_host", max_connections_per_host
        ),
        max_memory=_positive_or_none("max_memory", max_memory),
        keepalive=None
        if keepalive_idle is None
        else (keepalive_idle, keepalive_interval, keepalive_count),
        shutdown_grace=shutdown_grace,
        reject_notice=reject_notice,
    )
    socks = await _bind(host, port, path, backlog=backlog, reuse_port=reuse_port)
    server = Server(config, socks)
    try:
        yield server
    finally:
        await server.shutdown()


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1 or None, got {value}")
    return value


class TCPServerOptions(TypedDict, total=False):
    """The keyword options of ``open_tcp_server``, accepted by ``serve_tcp`` too."""

    protocol: ProtocolFactory | None
    path: str | None
    framing: Framing | str
    ssl: _ssl.SSLContext | None
    max_connections: int | None
    max_connections_per_host: int | None
    first_frame_timeout: float | None
    idle_timeout: float | None
    message_timeout: float | None
    send_timeout: float | None
    max_memory: int | None
    keepalive_idle: float | None
    keepalive_interval: float
    keepalive_count: int
    tls_handshake_timeout: float
    write_high: int
    write_low: int
    transport_high: int | None
    read_limit: int
    backlog: int
    reuse_port: bool
    shutdown_grace: float
    reject_notice: Callable[[str], bytes] | None


async def serve_tcp(
    handler: Handler | None,
    host: str | None = "127.0.0.1",
    port: int = 0,
    **options: Unpack[TCPServerOptions],
) -> None:
    """Serve ``handler`` until cancelled; then shut down gracefully.

    Takes the same arguments as ``open_tcp_server``.
    """
    async with open_tcp_server(handler, host, port, **options) as server:
        await server.serve_forever()
