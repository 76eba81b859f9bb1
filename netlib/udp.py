"""serve_udp / open_udp_server: datagram services with a reply policy, and their handlers.

Theory of operation
-------------------
A UDP server is one socket, one ``DatagramEndpointProtocol`` (bounded queue, size policy,
ICMP policy) and the handler, called with a ``Datagram`` for each datagram. A handler answers
with ``datagram.reply(data)``, which is synchronous and never buffers: the reply goes to the
kernel at once or is dropped and counted. Every reply passes the server's ``ReplyBudget``
(each datagram handed to a handler first earns its source credit), so no handler can be
turned into an amplifier by a forged source.

**Handlers start at once, in ``datagram_received``.** The server calls the handler and runs
its coroutine's first step right there (``coro.send(None)``). Most handlers (an echo, a
lookup) finish in that step: then nothing is scheduled at all, no task, no queue, no
future. A handler that suspends hands the future it waits on, with the rest of the
coroutine, to a Task (``_Rest`` first gives the Task that same future), so it runs on as
any task does. At most ``workers`` handlers are suspended at once; while they are, new
datagrams wait in the endpoint's bounded queue (drops counted) and start, in arrival order,
as handlers finish. With ``workers=1`` datagrams are therefore handled one at a time in
arrival order.

During that first step ``asyncio.current_task()`` is a stand-in (``_StandIn``) whose
``cancel()``, ``uncancel()`` and ``cancelling()`` reach the Task that later runs the rest,
so ``asyncio.timeout()`` and ``asyncio.TaskGroup`` work from a handler's first line; other
Task methods (``get_name()``, ``add_done_callback()``...) are there only after the first
suspension. Each handler runs in a fresh copy of the context (its Task too), so what it sets
stays with it, as in ``serve_tcp``. A reply is paid from the source's ``SourceGrants``
grant with a few list operations, inlined here; what the grant does not cover goes to the
``ReplyBudget``.

A handler that raises is logged (at most once a second) and counted; the server goes on.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator, Coroutine, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import CoroutineType, TracebackType
from typing import Any, Final, TypedDict

from typing_extensions import Unpack

from netlib.aio.datagram import (
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DatagramEndpointProtocol,
    DatagramLimits,
    DatagramStatistics,
)
from netlib.aio.logs import ThrottledLog
from netlib.aio.sockets import (
    DEFAULT_MAX_DATAGRAM,
    DatagramSocketOptions,
    open_datagram_socket,
    remove_socket_file,
)
from netlib.sansio.datagram import ReplyBudget, ReplyBudgetStatistics, SourceGrants
from netlib.streams import Datagram, DatagramHandler

__all__ = [
    "DEFAULT_UDP_WORKERS",
    "DatagramServer",
    "DatagramServerStatistics",
    "UDPServerOptions",
    "open_udp_server",
    "serve_udp",
]

logger = logging.getLogger("netlib.udp")

DEFAULT_UDP_WORKERS: Final = 16
"""Handlers a UDP server lets wait (suspended) at once; later datagrams queue meanwhile."""

_FIRST: Final = object()  # _Rest has not given the Task its first future yet
_enter_task: Any = asyncio.tasks._enter_task  # private, in CPython since 3.7
_leave_task: Any = asyncio.tasks._leave_task


@dataclass(frozen=True, slots=True)
class DatagramServerStatistics:
    """Counters of a UDP server (a snapshot).

    Attributes:
        endpoint: the socket's counters (received, sent, drops by reason, errors).
        budget: the reply budget's counters (replies refused per reason).
        handled: datagrams handed to the handler.
        handler_errors: handler calls that raised.
    """

    endpoint: DatagramStatistics
    budget: ReplyBudgetStatistics
    handled: int
    handler_errors: int


class DatagramServer:
    """A running UDP (or Unix datagram) server, from ``open_udp_server``."""

    def __init__(
        self,
        handler: DatagramHandler,
        protocol: DatagramEndpointProtocol,
        budget: ReplyBudget,
        workers: int,
    ) -> None:
        self._handler = handler
        self._protocol = protocol
        self._budget = budget
        self._grants = SourceGrants(budget)
        self._grant_table = self._grants.table
        self._max_size = protocol.max_size
        self._workers = workers
        self._loop = asyncio.get_running_loop()
        self._errors_log = ThrottledLog(logger, self._loop)
        self.handled = self.handler_errors = 0
        self._waiting: dict[asyncio.Task[Any], Any] = {}  # suspended handler -> source
        self._closed = False
        self._stand_in = _StandIn()
        protocol.consumer = self._consume
        if protocol.queue:  # arrived before the server was attached
            self._loop.call_soon(self._start_queued)
        transport = protocol.transport
        self.addresses: list[Any] = [transport.get_extra_info("sockname") if transport else None]
        """The bound address (with the real port when bound to port 0)."""

    # -- running handlers -------------------------------------------------------------------

    def _consume(self, data: bytes, addr: Any) -> bool:
        """Start the handler for a datagram now: run its first step, and hand it to a Task
        if it waits. False (queue the datagram) while ``workers`` handlers wait."""
        if len(self._waiting) >= self._workers or self._closed:
            return False
        context = contextvars.copy_context()  # what a handler sets stays with it
        context.run(self._start, data, addr, context)
        return True

    def _start(self, data: bytes, addr: Any, context: contextvars.Context) -> None:
        self.handled += 1
        loop = self._loop
        grant = self._grant_table.get(addr)  # SourceGrants.on_received, its fast path inline
        if grant is None:
            self._grants.on_received(addr, len(data), loop.time())
        else:
            grant[2] += len(data)
        try:
            coro = self._handler(Datagram(data, addr, self))
        except Exception:
            self._failed(addr)
            return
        if type(coro) is not CoroutineType:
            self._wait(asyncio.ensure_future(coro), addr)
            return
        stand_in = self._stand_in
        outer = _enter(loop, stand_in)
        try:
            pending = coro.send(None)
        except StopIteration:
            if stand_in.asked:  # it was asked to cancel: never hand it to another handler
                self._stand_in = _StandIn()
            return
        except Exception:
            self._stand_in = _StandIn()
            self._failed(addr)
            return
        finally:
            _leave_task(loop, stand_in)
            if outer is not None:
                _enter_task(loop, outer)
        self._stand_in = _StandIn()
        task = loop.create_task(_Rest(coro, pending), context=context)
        stand_in.bind(task)
        self._wait(task, addr)

    def _wait(self, task: asyncio.Future[Any], addr: Any) -> None:
        self._waiting[task] = addr  # type: ignore[index]
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[Any]) -> None:
        addr = self._waiting.pop(task, None)  # type: ignore[call-overload]
        if not task.cancelled() and task.exception() is not None:
            self._failed(addr, task.exception())
        self._start_queued()

    def _start_queued(self) -> None:
        protocol = self._protocol
        while protocol.queue and len(self._waiting) < self._workers and not self._closed:
            data, addr = protocol.pop()
            self._consume(data, addr)

    def _failed(self, addr: Any, exc: BaseException | None = None) -> None:
        self.handler_errors += 1
        if exc is None:
            self._errors_log.exception("UDP handler failed for %r", addr)
            return
        try:
            raise exc
        except Exception:
            self._errors_log.exception("UDP handler failed for %r", addr)

    # -- replies and the rest ---------------------------------------------------------------

    def send(self, data: bytes, addr: Any) -> bool:
        """Send ``data`` to ``addr`` through the reply budget; False if dropped."""
        size = len(data)
        if size > self._max_size:
            self._protocol.check_size(data)  # raises LimitExceeded
        grant = self._grant_table.get(addr)  # SourceGrants.try_send, its fast path inline
        if grant is not None and grant[0] and grant[1] >= size and (grant[3] or grant[2] >= size):
            grant[0] -= 1
            grant[1] -= size
            if not grant[3]:
                grant[2] -= size
        elif not self._grants.try_send(addr, size, self._loop.time()):
            return False
        return self._protocol.sendto(data, addr)

    def statistics(self) -> DatagramServerStatistics:
        """Return a snapshot of the counters."""
        self._grants.settle_all()  # the budget counts what a grant holds until it is back
        return DatagramServerStatistics(
            endpoint=self._protocol.statistics(),
            budget=self._budget.statistics(),
            handled=self.handled,
            handler_errors=self.handler_errors,
        )

    def close(self) -> None:
        """Stop the handlers and close the socket now (idempotent)."""
        self._closed = True
        for task in self._waiting:
            task.cancel()
        self._protocol.close()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed and the handlers have stopped."""
        await self._protocol.wait_closed()
        while self._waiting:
            await asyncio.wait(list(self._waiting))

    async def serve_forever(self) -> None:
        """Wait until the server is closed (cancel this to stop waiting)."""
        await self._protocol.wait_closed()

    def __repr__(self) -> str:
        return f"<DatagramServer addresses={self.addresses!r}>"


def _enter(loop: asyncio.AbstractEventLoop, task: Any) -> Any:
    """Make ``task`` the loop's current task; return the task it steps aside for, if any
    (as when a test calls ``datagram_received`` from a coroutine)."""
    try:
        _enter_task(loop, task)
    except RuntimeError:
        outer = asyncio.current_task(loop)
        _leave_task(loop, outer)
        _enter_task(loop, task)
        return outer
    return None


class _StandIn:
    """``asyncio.current_task()`` during a handler's first step, before it has a Task.

    ``cancel()``, ``uncancel()`` and ``cancelling()`` (what ``asyncio.timeout`` and
    ``TaskGroup`` use) are kept until ``bind()`` and then forwarded to the Task. One that
    was never asked anything serves the next handler too.
    """

    __slots__ = ("_cancels", "_messages", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self._cancels = 0
        self._messages: list[Any] | None = None

    @property
    def asked(self) -> bool:
        """Whether ``cancel()`` was called before a Task was bound."""
        return self._messages is not None

    def bind(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        messages = self._messages or []
        for message in messages:
            task.cancel(message)
        for _ in range(self._cancels, len(messages)):
            task.uncancel()

    def cancel(self, msg: Any = None) -> bool:
        if self.task is not None:
            return self.task.cancel(msg)
        self._cancels += 1
        if self._messages is None:
            self._messages = []
        self._messages.append(msg)
        return True

    def uncancel(self) -> int:
        if self.task is not None:
            return self.task.uncancel()
        self._cancels = max(0, self._cancels - 1)
        return self._cancels

    def cancelling(self) -> int:
        return self.task.cancelling() if self.task is not None else self._cancels

    def done(self) -> bool:
        return self.task.done() if self.task is not None else False


class _Rest(Coroutine[Any, Any, Any]):
    """The rest of a handler coroutine that suspended in its first step, for a Task.

    The Task's first step gets ``pending``, the future the coroutine is waiting on, exactly
    as if the Task had run that first step itself; then every step goes to the coroutine.
    """

    __slots__ = ("_coro", "_pending")

    def __init__(self, coro: Coroutine[Any, Any, Any], pending: Any) -> None:
        self._coro = coro
        self._pending = pending

    def send(self, value: Any) -> Any:
        pending = self._pending
        if pending is not _FIRST:
            self._pending = _FIRST
            return pending
        return self._coro.send(value)

    def throw(
        self,
        typ: type[BaseException] | BaseException,
        val: BaseException | object = None,
        tb: TracebackType | None = None,
    ) -> Any:
        pending, self._pending = self._pending, _FIRST
        if isinstance(pending, asyncio.Future):  # cancelled before its first step
            pending.cancel()
        return self._coro.throw(typ, val, tb)  # type: ignore[arg-type]

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Any]:
        raise TypeError("the rest of a handler runs in its Task only")


class UDPServerOptions(TypedDict, total=False):
    """The keyword options of ``open_udp_server``, accepted by ``serve_udp`` too."""

    path: str | None
    workers: int
    max_size: int
    queue_size: int
    queue_bytes: int
    budget: ReplyBudget | None
    allow_broadcast: bool
    multicast_group: str | None
    multicast_interface: str | int
    reuse_port: bool


@asynccontextmanager
async def open_udp_server(
    handler: DatagramHandler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    path: str | None = None,
    workers: int = DEFAULT_UDP_WORKERS,
    max_size: int = DEFAULT_MAX_DATAGRAM,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    queue_bytes: int = DEFAULT_QUEUE_BYTES,
    budget: ReplyBudget | None = None,
    allow_broadcast: bool = False,
    multicast_group: str | None = None,
    multicast_interface: str | int = "0.0.0.0",
    reuse_port: bool = False,
) -> AsyncIterator[DatagramServer]:
    """Serve ``handler`` on a UDP (or Unix datagram) socket for the ``async with`` block.

    Args:
        handler: ``async def handler(datagram: Datagram)``, called for each datagram.
        host, port: address to bind (default loopback; port 0 picks a free port).
        path: bind a Unix datagram socket at this path instead.
        workers: handlers that may wait at once (1: one at a time, in arrival order);
            handlers that do not wait finish inside the datagram callback.
        max_size: largest datagram handled or sent (bigger ones are dropped and counted).
        queue_size, queue_bytes: bound of the receive queue (drops beyond are counted).
        budget: the reply policy (default ``ReplyBudget()``: 100 replies/s per address,
            burst 200, at most 1x the bytes received from an unverified address, plus one
            shared allowance of 4 KiB/s for all of them).
        allow_broadcast: set SO_BROADCAST (bind to a broadcast address to receive them).
        multicast_group, multicast_interface: join a multicast group on an interface.
        reuse_port: set SO_REUSEPORT.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    options = DatagramSocketOptions(
        local=None if path is not None else (host or "", port),
        path=path,
        allow_broadcast=allow_broadcast,
        multicast_group=multicast_group,
        multicast_interface=multicast_interface,
        reuse_port=reuse_port,
    )
    limits = DatagramLimits(max_size=max_size, queue_size=queue_size, queue_bytes=queue_bytes)
    sock = await open_datagram_socket(options)
    loop = asyncio.get_running_loop()
    try:
        _transport, protocol = await loop.create_datagram_endpoint(
            lambda: DatagramEndpointProtocol(limits), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    server = DatagramServer(handler, protocol, budget or ReplyBudget(), workers)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
        remove_socket_file(path)


async def serve_udp(
    handler: DatagramHandler,
    host: str | None = "127.0.0.1",
    port: int = 0,
    **options: Unpack[UDPServerOptions],
) -> None:
    """Serve ``handler`` until cancelled. Takes the same arguments as ``open_udp_server``."""
    async with open_udp_server(handler, host, port, **options) as server:
        await server.serve_forever()
