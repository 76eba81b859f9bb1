"""StreamProtocol: the one asyncio Protocol that carries netlib's message streams over TCP.

Theory of operation
-------------------
The protocol state (framing, read accounting, the state machine, deadlines) lives in a
sans-I/O ``StreamConnection``; this adapter is the pump around it and the only code that
touches a stream transport:

* **Reading.** The transport reads at most ``READ_SIZE`` bytes at a time into one buffer per
  thread (``get_buffer``); ``buffer_updated`` copies them out into a ``bytes`` (or, for a
  consumer that only counts what arrives, ``sink()``, hands over their size) and
  ``data_received`` feeds it to the connection (one decoder call per chunk, nothing per
  message) and then tells the consumer: ``messages_received()``, which a subclass may
  override to consume messages as callbacks (``ChatProtocol``), or by default resolves the
  future a waiting handler awaits (``readable_waiter()``). Past ``read_limit`` the transport
  stops reading until the consumer empties the queue.
* **Writing.** While received messages are still queued, ``write()`` appends to ``pending``
  (with one ``call_soon`` flush as a backstop); the reply to the last queued message flushes
  them all with one ``writelines``. A request/response handler writes at once. The
  transport's buffer has explicit limits on both loops (uvloop's default low-water mark is
  16 bytes); above the high mark ``write_paused`` is set and senders wait in ``drain()``.
  After the connection is lost, writes are silent no-ops on both loops.
* **Deadlines** live in a ``DeadlineTimer`` (one event-loop timer per server): it calls
  ``check_deadlines(now)``, which asks the connection and re-schedules at its next deadline.
* **Memory budget.** A server may share one ``MemoryBudget`` between its connections. A
  connection reports what it holds in user space (``held()``) each time its input has grown
  by ``REPORT_STEP`` since its last report, and its output too while writing is paused (a
  fan-out service queues past the high mark), when writing pauses or resumes, when reading
  resumes, when its consumer has emptied a queue it reported, and while ``send()`` waits
  with a message in hand; so a thousand connections each a read or two behind their
  handlers count too, not only those that stalled. Past the cap the budget evicts the
  largest holders, as ``SlowConsumer``: an evicted connection drops its queued input at once
  and counts what it still holds (its transport's buffer, the message its handler holds)
  until it is lost and its consumer is done (``consumer_done()``).

Objects only some connections need (the pending-write list, drain waiters, the closed future)
are made on first use: an idle connection holds as little as possible.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Final, Protocol, cast

from netlib.aio.deadlines import DeadlineTimer, HasDeadlines, resolution_for
from netlib.aio.flow import WriteFlowControl
from netlib.aio.sockets import extra_info
from netlib.errors import (
    BrokenResourceError,
    EndOfStream,
    NetlibError,
    PeerTimedOut,
    SlowConsumer,
)
from netlib.sansio.budget import MemoryBudget
from netlib.sansio.framing import Framing
from netlib.sansio.stream import StreamConnection, StreamLimits, StreamState

__all__ = [
    "DIGEST_IN_THREAD_MIN",
    "OUTPUT_REPORT_STEP",
    "RECEIVE_FILE_BUFFER",
    "RECEIVE_FILE_BUFFERS",
    "RECEIVE_FILE_FLUSH_DELAY",
    "REPORT_STEP",
    "SENDFILE_CHUNK",
    "SENDFILE_SLICE",
    "SENDFILE_STEP",
    "Digest",
    "StreamProtocol",
    "deadline_timer_for",
]

_OPEN: Final = StreamState.OPEN  # enum lookups are slow on the per-read path
_FAILED: Final = StreamState.FAILED

READ_SIZE: Final = 64 * 1024
"""Bytes read at most at a time (each read becomes one ``bytes``, one raw message). Left to
themselves the loops read 256 KiB at a time, asyncio allocating 256 KiB for every read and
then shrinking it. With a thousand busy connections one event-loop iteration could then
bring in a quarter of a GiB, and every stalled connection hold a message of up to 256 KiB
besides its limits (in its handler's hands, in its transport); 64 KiB makes both four times
smaller (docs/robustness.md, R5b)."""

SENDFILE_SLICE: Final = 4 * 1024 * 1024
"""Bytes one ``loop.sendfile`` call sends at most: between slices the connection's idle
clock moves on and a stalled peer's deadline is checked."""
SENDFILE_CHUNK: Final = 64 * 1024
"""Bytes read from the file at a time on the chunked path (TLS): with the write buffer's
high mark this bounds what one download holds in user space. Also what the direct path
(uvloop) hands the transport when the socket is full."""
SENDFILE_STEP: Final = 1024 * 1024
"""Bytes one ``os.sendfile`` call of the direct path (uvloop) sends at most before the
other connections get their turn."""
SENDFILE_STALL_TIMEOUT: Final = 60.0
"""Seconds one sendfile slice may take when the connection has no send or idle deadline."""
RECEIVE_FILE_BUFFER: Final = 4 * 1024 * 1024
"""Bytes ``receive_file`` reads into one buffer (the transport reads straight into it, as
much as the socket holds) before writing them to the file with one ``os.write``; each
buffer is one job for the digest's worker thread. A 1 GiB download on loopback with its
SHA-256, medians of 6 on asyncio and uvloop: with 1 MiB buffers 509-555 MiB/s, with 4 MiB
556-599 (a new process per download; 595-627 and 711-905 repeated in one process); 2 and
8 MiB were no better than 4, 128 and 256 KiB slower than 1."""
RECEIVE_FILE_BUFFERS: Final = 4
"""Buffers one ``receive_file`` uses at most: one being filled while full ones wait for the
digest's worker thread. With ``RECEIVE_FILE_BUFFER`` this bounds what a receive holds in
user space (16 MiB); when none is free, reading pauses until the digest returns one."""
RECEIVE_FILE_FLUSH_DELAY: Final = 0.1
"""Seconds received bytes wait at most in a buffer that is not full before ``receive_file``
writes them (and reports them to its ``progress``): a slow or stalled transfer's file and
progress keep up with what came."""
DIGEST_IN_THREAD_MIN: Final = 64 * 1024
"""Buffers at least this large are hashed in a worker thread, at the same time as the next
one is received (hashlib releases the GIL while it hashes a large buffer); smaller ones at
once, where a thread's hand-over would cost more than the hash."""

_thread_buffers = threading.local()


def _read_buffer() -> memoryview:
    """The buffer transports read into, one per thread: a read is copied out of it at once
    (``buffer_updated``), before the thread's event loop can read anything else."""
    try:
        view: memoryview = _thread_buffers.view
    except AttributeError:
        view = _thread_buffers.view = memoryview(bytearray(READ_SIZE))
    return view


REPORT_STEP: Final = 64 * 1024
"""A connection's input (queued messages and a partial frame) is reported to the memory
budget each time it has grown by about this much (at most a read more) since the last
report."""
OUTPUT_REPORT_STEP: Final = 16 * 1024
"""While writing is paused, a connection's output is reported each time it has grown by this
much: a fan-out service queues past the high mark to many connections at once (a chat room),
and a thousand connections each a step behind their reports would hide the step a thousand
times (64 KiB steps hid 60-90 MiB from a 256 MiB budget)."""


def _drop_tracebacks(error: BaseException | None) -> None:
    """Clear the tracebacks of ``error`` and of the errors chained to it (16 at most: the
    bound also ends a chain that loops)."""
    for _ in range(16):
        if error is None:
            return
        error.__traceback__ = None
        error = error.__cause__ or error.__context__


def deadline_timer_for(limits: StreamLimits) -> DeadlineTimer:
    """A ``DeadlineTimer`` fine enough for these limits (a server shares one)."""
    resolution = resolution_for(*limits.timeouts)
    return DeadlineTimer(asyncio.get_running_loop(), resolution)


class Digest(Protocol):
    """What ``receive_file`` feeds the bytes to: a ``hashlib`` object, for one."""

    def update(self, data: bytes | memoryview, /) -> None: ...


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class StreamProtocol(WriteFlowControl, asyncio.BufferedProtocol):
    """The asyncio Protocol of a message stream: pumps a ``StreamConnection``.

    Args:
        framing: the connection's framing.
        limits: read limit, write-buffer marks and deadlines.
        deadlines: the timer that checks this connection's deadlines (a server shares one
            between its connections); by default the connection gets its own if it has
            deadlines.
        budget: the server's memory budget, if any.
        on_lost: called with this protocol when the connection is lost (a server counts
            how its connections end).

    A ``MessageStream`` is the usual consumer; a subclass may consume messages as
    callbacks by overriding ``messages_received()``.
    """

    __slots__ = (
        "_aborted",
        "_budget",
        "_closed",
        "_consumer_done",
        "_deadline_slot",
        "_deadlines",
        "_flush_handle",
        "_holding",
        "_input_reported",
        "_last_write",
        "_limits",
        "_loop",
        "_on_lost",
        "_output_reported",
        "_own_deadlines",
        "_peer_done",
        "_pending",
        "_pending_size",
        "_read_view",
        "_sendfile_native",
        "_sendfile_task",
        "_sink",
        "_waiter",
        "_waiter_takes",
        "conn",
        "encoder",
        "framing",
        "lost",
        "reading_paused",
        "transport",
    )

    def __init__(
        self,
        framing: Framing,
        limits: StreamLimits,
        *,
        deadlines: DeadlineTimer | None = None,
        budget: MemoryBudget[StreamProtocol] | None = None,
        on_lost: Callable[[StreamProtocol], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self.framing = framing
        # what a message is written as: framed by ``framing``, or as it is (raw)
        self.encoder: Callable[[bytes], bytes] | None = None if framing.raw else framing.encode
        self._limits = limits
        self.conn = StreamConnection(framing, limits, self._loop.time())
        self._waiter: asyncio.Future[Any] | None = None
        self._waiter_takes = False  # the waiter is a message_waiter()
        self.transport: asyncio.Transport | None = None
        self.reading_paused = False
        self.lost = False
        self.write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._pending: list[bytes] | None = None
        self._pending_size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._peer_done: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] | None = None
        self._own_deadlines = deadlines is None and limits.has_deadlines
        if self._own_deadlines:
            deadlines = deadline_timer_for(limits)
        self._deadlines = deadlines
        self._deadline_slot: dict[HasDeadlines, None] | None = None
        self._budget = budget
        self._input_reported = 0  # queued + partial input at the last report
        self._output_reported = 0  # buffered output at the last report
        self._holding = 0  # see drain()
        self._last_write = 0  # bytes of the last transport write, see held()
        self._consumer_done = False
        self._aborted = False  # see buffered_size()
        self._read_view = _read_buffer()
        self._on_lost = on_lost
        self._sendfile_native = True  # until the loop or the transport says otherwise
        self._sendfile_task: asyncio.Task[int] | None = None
        self._sink: Callable[[int], object] | None = None  # see sink()

    # -- asyncio.Protocol callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        self._set_transport_marks(transport)
        self.conn.last_activity = self._loop.time()
        self._schedule_deadlines()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is None:
            self.data_received(self._read_view[:nbytes].tobytes())
        else:  # counted where the kernel put it, never copied
            self._sank(nbytes)

    def data_received(self, data: bytes) -> None:
        """Feed ``data`` read from the peer (``buffer_updated`` calls this for each read)."""
        if self._sink is not None:
            self._sank(len(data))
            return
        conn = self.conn
        if conn.receive_data(data, self._loop.time()):
            if conn.state is _FAILED:
                self.messages_received()
                self._abort_transport()
                return
            self._input_queued()
        elif self._budget is not None and conn.partial_size >= self._input_reported + (
            REPORT_STEP
        ):
            self._report()
        if conn.rearm:
            self._schedule_deadlines()

    def receive_messages(self, messages: list[bytes], size: int) -> None:
        """Feed whole messages (``size`` bytes) from a transport that frames them itself
        (reliable UDP): with raw framing, one queue extension and one wake-up for them all;
        with another, each is a chunk of the byte stream, as ``data_received`` takes it."""
        if self._sink is not None:
            self._sank(size)
            return
        conn = self.conn
        if not conn.raw:
            for message in messages:
                self.data_received(message)
            return
        if conn.receive_messages(messages, size, self._loop.time()):
            self._input_queued()
        if conn.rearm:
            self._schedule_deadlines()

    def _input_queued(self) -> None:
        """Messages were queued: stop reading past the read limit, wake the consumer, and
        tell the memory budget once the queue grew by ``REPORT_STEP``."""
        conn = self.conn
        if conn.read_paused and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.messages_received()
        if self._budget is not None and conn.queued >= self._input_reported + REPORT_STEP:
            self._report()

    def messages_received(self) -> None:
        """Messages were queued, or the input ended: wake the consumer."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if waiter.done():  # cancelled: its consumer takes nothing
                return
            if not self._waiter_takes:
                waiter.set_result(None)
                return
            conn = self.conn
            if conn.frames:
                waiter.set_result(self.take())
            elif conn.state is _OPEN:  # nothing to hand over yet: keep waiting
                self._waiter = waiter
            else:
                error = conn.end_error()
                waiter.set_exception(
                    StopAsyncIteration() if isinstance(error, EndOfStream) else error
                )

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self.messages_received()
        self._resolve(self._peer_done)
        # Keep the transport open, replies may still be sent (half-close); TLS has no
        # half-close, and its transports log a warning when asked for one.
        transport = self.transport
        return transport is None or transport.get_extra_info("sslcontext") is None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.conn.lost(exc)
        self._pending = None
        self._pending_size = 0
        self._cancel_deadlines()
        if self._budget is not None:
            if self._consumer_done or not self.held():
                self._budget.forget(self)
            else:  # the consumer may still hold messages: counted until consumer_done()
                self._report()
        self.input_changed()
        self._wake_drainers()
        self._resolve(self._peer_done)
        self._resolve(self._closed)
        if self._on_lost is not None:
            self._on_lost(self)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._limits.transport_high is None:
            self._send_deadline_starts()
        else:
            self._check_send_deadline()
        self._report()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._limits.transport_high is None:
            self.conn.writing_resumed()
            self.flush()  # what write_soon() held while paused
        else:
            self.flush()
            self._check_send_deadline()
        self._report()

    def _set_transport_marks(self, transport: asyncio.WriteTransport) -> None:
        limits = self._limits
        high = limits.transport_high
        if high is None:
            transport.set_write_buffer_limits(high=limits.write_high, low=limits.write_low)
        else:
            transport.set_write_buffer_limits(high=high, low=high // 4)

    def _send_deadline_starts(self) -> None:
        self.conn.writing_paused(self._loop.time())
        if self.conn.rearm:
            self._schedule_deadlines()

    def _check_send_deadline(self) -> None:
        """With a ``transport_high`` mark, the send deadline follows the bytes queued in the
        pending list and the transport together, against ``write_high`` and ``write_low``."""
        size = self.buffered_size()
        if size > self._limits.write_high:
            self._send_deadline_starts()
        elif size <= self._limits.write_low:
            self.conn.writing_resumed()

    @staticmethod
    def _resolve(future: asyncio.Future[None] | None) -> None:
        if future is not None and not future.done():
            future.set_result(None)

    # -- reading ----------------------------------------------------------------------------

    def input_changed(self) -> None:
        """The input ended or failed: wake the consumer."""
        self.messages_received()

    def resume(self) -> None:
        """The consumer emptied the queue: resume reading if it was paused."""
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
            self._report()

    def hold_input(self, until: float) -> None:
        """Stop reading until ``until`` (loop time), then call ``messages_received()`` again:
        a consumer pacing its peer (the chat's flood control) leaves the queued messages
        where they are and lets the peer wait, through the server's deadline timer. Nothing
        once the transport is closing (its input is done)."""
        if self._gone():
            return
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.conn.hold(until)
        if self._deadlines is None:  # a connection without deadlines has no timer yet
            self._own_deadlines = True
            self._deadlines = deadline_timer_for(self._limits)
        self._schedule_deadlines()

    def take(self) -> bytes:
        """Take the next queued message (there must be one); reading resumes once the
        queue is back under the read limit."""
        conn = self.conn
        frame = conn.take()
        if not conn.read_paused and self.reading_paused:
            self.resume()
        return frame

    def _before_wait(self) -> None:
        """The consumer is about to wait for input: hand over what it wrote, and report
        the queue it emptied."""
        if self._pending:
            self.flush()
        if self._input_reported:  # the consumer emptied a queue the budget counts
            self._report()

    def _sank(self, nbytes: int) -> None:
        self.conn.last_activity = self._loop.time()
        self._sink(nbytes)  # type: ignore[misc]

    async def sink(self, count: Callable[[int], object]) -> None:
        """Read until the input ends, handing each read's size to ``count`` and keeping
        nothing: messages already queued are counted first (by their sizes), later reads
        are counted in the read buffer, with no copy, no queue and no wake-up of this
        task per read. Returns at the peer's end of stream; raises what else ended it."""
        conn = self.conn
        while conn.frames:
            count(len(self.take()))
        self._sink = count
        try:
            self.resume()
            while (waiter := self.readable_waiter()) is not None:
                await waiter
        finally:
            self._sink = None
        error = conn.end_error()
        if not isinstance(error, EndOfStream):
            raise error

    def readable_waiter(self) -> asyncio.Future[None] | None:
        """Flush what the consumer wrote, then return a future resolved when input arrives,
        or None if no more will come (``conn.end_error()`` says why)."""
        self._before_wait()
        if self.conn.state is not _OPEN:
            return None
        self._waiter_takes = False
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def message_waiter(self) -> asyncio.Future[bytes]:
        """``async for``'s next message as a future, with no coroutine per message: resolved
        with the next message (taken from the queue as it is resolved, so a cancelled
        waiter takes none), or failed with ``StopAsyncIteration`` at ``EndOfStream`` and
        with any other error that ends the input."""
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        if self.conn.frames:
            waiter.set_result(self.take())
            return waiter
        self._before_wait()
        self._waiter_takes = True
        self._waiter = waiter
        if self.conn.state is not _OPEN:
            self.messages_received()  # fails it at once
        return waiter

    def end_input(self) -> None:
        """End the input here: queued messages stay readable, later bytes are discarded."""
        self.conn.end_input()
        self.resume()
        self.input_changed()

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data``, coalesced with the other replies to the queued messages.

        While received messages are still queued, replies are held and written together
        (when the queue empties, at the high-water mark, or at the end of this loop
        iteration); otherwise at once. A no-op once the connection is lost.
        """
        pending = self._pending
        frames = self.conn.frames
        if not pending and not frames:  # nothing to coalesce with: write at once
            transport = self.transport
            if self.lost or transport is None or transport.is_closing():
                return
            self._last_write = len(data)
            transport.write(data)
            self.conn.last_activity = self._loop.time()
            if self.write_paused:
                self._output_grew()
            return
        if self.lost:
            return
        if pending is None:
            pending = self._pending = []
        pending.append(data)
        self._pending_size += len(data)
        if not frames or self._pending_size >= self._limits.write_high:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def write_soon(self, data: bytes, limit: int) -> None:
        """Write ``data`` at the end of this loop iteration, with whatever else is written
        by then (fan-out: one system call for many deliveries), or at once when ``limit``
        bytes are pending. A no-op once the connection is lost.

        While writing is paused the data stays here, in the pending list, until the
        transport asks for more (``resume_writing``) or the connection closes: a fan-out
        service hands the same ``bytes`` to many connections, and a list holds a reference
        to it where a transport's buffer would hold a copy (asyncio's grows a bytearray
        that keeps its largest size)."""
        if self.lost:
            return
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        pending.append(data)
        self._pending_size += len(data)
        if self.write_paused:
            self._output_grew()
        elif self._pending_size >= limit:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self, *, whole: bool = False) -> None:
        """Hand the pending writes to the transport in one call.

        With a ``transport_high`` mark, unless ``whole`` (before a close, an EOF or a
        file), only while the transport takes more (it is not paused), ``transport_high``
        bytes a call: the rest waits for ``resume_writing``.
        """
        self._flush_handle = None
        pending = self._pending
        if not pending:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            batch = self._limits.transport_high
            if batch is not None and not whole:
                self._flush_batches(pending, transport, batch)
                return
            self._last_write = self._pending_size
            if len(pending) == 1:
                transport.write(pending[0])
            else:
                transport.writelines(pending)
            self.conn.last_activity = self._loop.time()
        pending.clear()  # the transports keep the buffers, not the list
        self._pending_size = 0
        if self.write_paused:
            self._output_grew()

    def _flush_batches(
        self, pending: list[bytes], transport: asyncio.WriteTransport, batch: int
    ) -> None:
        """``flush(whole=False)`` with a ``transport_high`` mark of ``batch`` bytes."""
        while pending and not self.write_paused:
            count, size = 0, 0
            while count < len(pending) and size < batch:
                size += len(pending[count])
                count += 1
            self._last_write = size
            if count == 1:
                transport.write(pending[0])
            else:
                transport.writelines(pending[:count])
            del pending[:count]
            self._pending_size -= size
            self.conn.last_activity = self._loop.time()

    def _output_grew(self) -> None:
        """Writing is paused and more was queued anyway (a fan-out service bounds its
        consumers itself, e.g. the chat's hard limit): report each ``OUTPUT_REPORT_STEP``."""
        if self._limits.transport_high is not None:
            self._check_send_deadline()
        if self._budget is not None and (
            self.buffered_size() >= self._output_reported + OUTPUT_REPORT_STEP
        ):
            self._report()

    def buffered_size(self) -> int:
        """Bytes written but not yet handed to the kernel: pending plus transport buffer.

        Once the transport is aborted its buffer counts no more: it will never be sent, and
        the loop frees it (asyncio at once, uvloop as the handle closes, an iteration later).
        Counted, each connection the memory budget evicts would still seem to hold its
        buffer, and the next report would evict another, then another: all 16 of 16 stalled
        connections cut where 7 were enough.
        """
        transport = self.transport
        if transport is None or self.lost or self._aborted:
            return self._pending_size
        return self._pending_size + transport.get_write_buffer_size()

    async def drain(self, holding: int = 0) -> None:
        """Wait while the transport's write buffer is above its high-water mark.

        Args:
            holding: bytes the caller holds, to write once this returns (a message that
                ``send()`` waits to write); the memory budget counts them meanwhile.

        Raises:
            BrokenResourceError: the connection is lost (or ``PeerTimedOut``).
        """
        if holding and self.write_paused and self._budget is not None and not self.lost:
            self._holding = holding
            self._report()
            try:
                await super().drain()
            finally:
                self._holding = 0
        else:
            await super().drain()
        if self.lost:
            raise self.lost_error()

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of the file open on descriptor ``fd`` from ``offset``.

        Uses ``loop.sendfile`` (the kernel copies the bytes; nothing is held in user space)
        where the loop and transport support it, in slices of ``SENDFILE_SLICE``. Where the
        loop has none (uvloop), ``os.sendfile`` straight to the socket while the
        transport's buffer is empty (``_sendfile_direct``). With TLS, reads
        ``SENDFILE_CHUNK`` bytes at a time and writes each once the transport's buffer is
        below its high mark, so one download holds at most ``write_high`` plus one chunk.
        Returns the bytes sent, fewer than ``count`` if the file ended first.

        Raises:
            BrokenResourceError: the connection was lost (or a deadline passed) meanwhile.
        """
        self.flush(whole=True)
        loop = self._loop
        sent = 0
        native = self._sendfile_native
        tls = extra_info(self.transport, "sslcontext") is not None
        if native and tls:
            native = self._sendfile_native = False  # TLS encrypts in user space
        if not native and not tls:
            return await self._sendfile_direct(fd, offset, count)
        with os.fdopen(os.dup(fd), "rb", buffering=0) as file:
            while sent < count and not self._gone():
                if native:
                    step = min(SENDFILE_SLICE, count - sent)
                    try:
                        done = await self._sendfile_slice(file, offset + sent, step)
                    except (NotImplementedError, asyncio.SendfileNotAvailableError):
                        native = self._sendfile_native = False
                        if not tls:
                            return sent + await self._sendfile_direct(
                                fd, offset + sent, count - sent
                            )
                        continue
                else:
                    await self.drain()
                    chunk = os.pread(fd, min(SENDFILE_CHUNK, count - sent), offset + sent)
                    done = len(chunk)
                    if done:
                        self.write(chunk)
                if not done:
                    break  # the file is shorter than it was
                sent += done
                self.conn.last_activity = loop.time()
        if sent < count and self._gone():
            raise self.lost_error()
        return sent

    async def _sendfile_direct(self, fd: int, offset: int, count: int) -> int:
        """``os.sendfile`` straight to the socket, ``SENDFILE_STEP`` bytes at a time, only
        while the transport holds nothing (so the bytes stay in order), yielding to the loop
        between steps. When the socket is full, one ``SENDFILE_CHUNK`` goes through the
        transport instead, which waits for room: the write buffer's marks are 0 meanwhile,
        so ``drain()`` returns once it is empty (and the send deadline runs while it is
        not). One download holds at most one chunk in user space."""
        transport = self.transport
        sock = extra_info(transport, "socket")
        if transport is None or sock is None or not hasattr(os, "sendfile"):
            raise self.lost_error()
        sock_fd = sock.fileno()
        loop = self._loop
        sent = 0
        transport.set_write_buffer_limits(high=0, low=0)
        try:
            while sent < count:
                await self.drain()
                if self._gone():
                    break
                step = min(SENDFILE_STEP, count - sent)
                try:
                    done = os.sendfile(sock_fd, fd, offset + sent, step)
                except BlockingIOError:
                    chunk = os.pread(fd, min(SENDFILE_CHUNK, step), offset + sent)
                    done = len(chunk)
                    if done:
                        self.write(chunk)
                        self.flush(whole=True)
                except OSError as exc:  # reset mid-file
                    self._abort_transport()
                    raise BrokenResourceError(
                        f"connection lost while sending a file: {exc}"
                    ) from None
                else:
                    await asyncio.sleep(0)  # the other connections' turn
                if not done:
                    break  # the file is shorter than it was
                sent += done
                self.conn.last_activity = loop.time()
        finally:
            if not self._gone():
                self._set_transport_marks(transport)
        if sent < count and self._gone():
            raise self.lost_error()
        return sent

    def _gone(self) -> bool:
        """Lost, or closing: writes would be dropped (the loss may not be reported yet)."""
        transport = self.transport
        return self.lost or transport is None or transport.is_closing()

    async def _sendfile_slice(self, file: Any, offset: int, count: int) -> int:
        """One ``loop.sendfile`` call, as a task of its own that ``_abort_transport`` cancels
        (and whose socket it unregisters) before the transport closes the socket."""
        transport = self.transport
        if transport is None:
            raise self.lost_error()
        limits = self._limits
        stall = limits.send_timeout or limits.idle_timeout or SENDFILE_STALL_TIMEOUT
        try:
            async with asyncio.timeout(stall):
                await self.drain()
                task = self._loop.create_task(
                    self._loop.sendfile(transport, file, offset, count, fallback=False)
                )
                self._sendfile_task = task
                try:
                    sent: int = await task
                finally:
                    self._sendfile_task = None
        except TimeoutError:
            self.fail(SlowConsumer("the peer stopped reading the file"))
            raise self.lost_error() from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            raise self.lost_error() from None  # aborted under it
        except (NotImplementedError, asyncio.SendfileNotAvailableError):
            raise
        except RuntimeError as exc:
            if not transport.is_closing():  # "not supported for transport" (asyncio)
                raise NotImplementedError(str(exc)) from None
            raise self.lost_error() from None
        except OSError as exc:  # reset mid-file
            self._abort_transport()
            raise BrokenResourceError(f"connection lost while sending a file: {exc}") from None
        return sent

    async def receive_file(
        self,
        fd: int,
        count: int,
        *,
        digest: Digest | None = None,
        progress: Callable[[int], object] | None = None,
        idle_timeout: float | None = None,
    ) -> int:
        """Receive exactly ``count`` bytes and write them to the file open on ``fd``
        (at its current position), feeding them to ``digest`` on the way.

        Bytes already received and queued go first. Then the transport reads straight into
        ``RECEIVE_FILE_BUFFER``-byte buffers (no copy per read), each written with one
        ``os.write`` when full, and hashed in a worker thread while the next one fills; at
        most ``RECEIVE_FILE_BUFFERS`` are in use, then reading pauses. Nothing past
        ``count`` is read: later bytes stay for ``receive()``. What was received is written
        to the file whatever ends the call (an error, a cancellation). ``progress(n)`` is
        called with the bytes written so far after each write.

        Raises:
            BrokenResourceError: the connection closed or was lost before ``count`` bytes.
            PeerTimedOut: no byte came for ``idle_timeout`` seconds (the connection is aborted).
            OSError: the file could not be written (the connection is aborted).
        """
        conn = self.conn
        written = 0
        while conn.frames and written < count:
            chunk = self.take_up_to(count - written)
            _write_all(fd, chunk)
            if digest is not None:
                digest.update(chunk)
            written += len(chunk)
            if progress is not None:
                progress(written)
        if written == count:
            return written
        transport = self.transport
        if conn.state is not _OPEN or transport is None or self._gone():
            error = conn.end_error()
            if isinstance(error, EndOfStream):
                raise BrokenResourceError(
                    f"the connection closed after {written} of {count} bytes"
                )
            raise error
        receiver = _FileReceiver(self, fd, written, count, digest, progress, idle_timeout)
        transport.set_protocol(receiver)
        if self.reading_paused:  # held: the receiver reads now (and hands it back reading)
            self.reading_paused = False
            transport.resume_reading()
        try:
            return await receiver.done
        finally:
            receiver.stop()

    def take_up_to(self, limit: int) -> bytes:
        """Take at most ``limit`` bytes of the next queued message (raw streams): the rest
        of it stays first in the queue."""
        frame = self.conn.take_up_to(limit)
        if not self.conn.read_paused and self.reading_paused:
            self.resume()
        return frame

    def lost_error(self) -> BrokenResourceError:
        """The error a send after the loss raises."""
        if isinstance(self.conn.error, BrokenResourceError):
            return self.conn.error
        return BrokenResourceError("connection lost")

    def consumer_done(self) -> None:
        """The consumer (a server's handler) is done with this connection: drop what it
        left unread, unlink the connection's error from the frames it was raised through,
        and once the connection is lost too, leave the memory budget.

        A consumer that stops on ``conn.error`` (its ``send()`` or ``receive()`` raised it)
        leaves a reference cycle: error, traceback, the consumer's frames, its stream, this
        protocol, error (through the error's cause too: an ``OSError`` raised in the
        transport's ``write()`` has every caller's frame). Until the cyclic garbage
        collector next runs, in an idle server possibly never, the cycle would keep this
        connection's queued input and whatever the consumer's frames held, such as its last
        message.
        """
        if self._consumer_done:
            return
        self._consumer_done = True
        self.conn.discard_queued()
        _drop_tracebacks(self.conn.error)
        if self._budget is not None:
            if self.lost:
                self._budget.forget(self)
            else:  # a graceful close follows: count what is still being sent
                self._report()

    # -- memory budget ----------------------------------------------------------------------

    def held(self) -> int:
        """Bytes this connection holds in user space: queued input, a partial frame, writes
        not yet handed to the kernel, and a message its consumer waits to send.

        While writing is paused the last write to the transport counts once more: a
        transport may keep a partly sent write whole while counting only its unsent tail
        (uvloop sends the tail from a memoryview of it), and the oldest write it holds is
        about as large as the last one.
        """
        conn = self.conn
        buffered = self.buffered_size()
        held = conn.queued + conn.partial_size + buffered + self._holding
        return held + self._last_write if buffered and self.write_paused else held

    def _report(self) -> None:
        budget = self._budget
        if budget is None or (self.lost and self._consumer_done):  # forgotten: gone
            return
        conn = self.conn
        self._input_reported = conn.queued + conn.partial_size
        self._output_reported = self.buffered_size()
        for victim in budget.update(self, self.held()):
            victim._evict()
            budget.update(victim, victim.held())  # what it still holds until it is gone

    def _evict(self) -> None:
        """Cut off by the memory budget: drop the queued input at once (freeing memory is
        the point; the consumer sees ``SlowConsumer`` next) and abort the connection."""
        self.conn.discard_queued()
        self.fail(SlowConsumer("evicted: the server's memory budget is used up"))

    # -- closing ----------------------------------------------------------------------------

    def fail(self, error: NetlibError) -> None:
        """Record ``error`` for the consumer and abort the connection at once."""
        self.conn.fail(error)
        self.input_changed()
        self._abort_transport()

    def _abort_transport(self) -> None:
        task = self._sendfile_task
        if task is not None and not task.done() and self.transport is not None:
            # loop.sendfile watches the socket itself: unregister it before it is closed
            task.cancel()
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(RuntimeError):  # the task has not started yet:
                    self._loop.remove_writer(sock.fileno())  # the transport owns the fd
        if self.transport is not None and not self.lost:
            self._aborted = True
            self.transport.abort()

    def close(self) -> None:
        """Flush pending writes and close the transport (the transport drains its buffer)."""
        self.flush(whole=True)
        self._cancel_deadlines()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close at once, discarding whatever is buffered."""
        self._abort_transport()

    async def finish(self, grace: float, *, linger: bool) -> None:
        """Close gracefully within ``grace`` seconds, then abort.

        With ``linger``, send EOF first and keep reading (and discarding) until the peer
        closes too, so unread input never turns the close into a reset.
        """
        try:
            async with asyncio.timeout(grace):
                if linger and not self.conn.peer_eof and self._can_write_eof():
                    self.conn.start_linger()
                    self.resume()
                    self.flush(whole=True)
                    self._peer_done = self._loop.create_future()
                    self.transport.write_eof()  # type: ignore[union-attr]
                    await self._peer_done  # the peer's EOF, or the connection's end
                self.close()
                await self.wait_closed()
        except TimeoutError:
            self.abort()
            await self.wait_closed()

    def finish_soon(self, grace: float) -> asyncio.Future[None]:
        """Close gracefully within ``grace`` seconds, without waiting here: ``finish(grace,
        linger=True)`` in a task while the peer has not finished (so input it still sends
        is read and dropped, never met by a reset), else ``close_within(grace)``. The
        future is done once the connection is closed; keep a reference to it."""
        if self.would_linger():
            return self._loop.create_task(self.finish(grace, linger=True))
        return self.close_within(grace)

    def would_linger(self) -> bool:
        """Whether ``finish(linger=True)`` would linger: the peer has not sent EOF yet and the
        transport can half-close. If not, ``close_within`` does the same job without a task."""
        return not self.conn.peer_eof and self._can_write_eof()

    def close_within(self, grace: float) -> asyncio.Future[None]:
        """``finish(grace, linger=False)`` without a task: flush and close now, abort if the
        transport's buffer has not drained within ``grace`` seconds; returns
        ``closed_future()``."""
        self.close()
        closed = self.closed_future()
        transport = self.transport
        if not self.lost and transport is not None and transport.get_write_buffer_size():
            timer = self._loop.call_later(grace, self.abort)
            closed.add_done_callback(lambda _: timer.cancel())
        return closed

    def _can_write_eof(self) -> bool:
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return False
        return transport.can_write_eof()

    def closed_future(self) -> asyncio.Future[None]:
        """A future resolved once ``connection_lost`` has run (never cancel it)."""
        closed = self._closed
        if closed is None:
            closed = self._closed = self._loop.create_future()
            if self.lost:
                closed.set_result(None)
        return closed

    async def wait_closed(self) -> None:
        """Wait until ``connection_lost`` has run."""
        if self.lost or self.transport is None:
            return
        await asyncio.shield(self.closed_future())

    # -- deadlines --------------------------------------------------------------------------

    def _schedule_deadlines(self) -> None:
        deadlines = self._deadlines
        if deadlines is None:
            return
        if self._deadline_slot is not None:
            deadlines.cancel(self, self._deadline_slot)
            self._deadline_slot = None
        deadline = self.conn.next_deadline()
        if deadline is not None:
            self._deadline_slot = deadlines.schedule(self, deadline)

    def _cancel_deadlines(self) -> None:
        if self._deadline_slot is not None and self._deadlines is not None:
            self._deadlines.cancel(self, self._deadline_slot)
        self._deadline_slot = None
        if self._own_deadlines and self._deadlines is not None:
            self._deadlines.close()  # no timer left armed for a closed connection

    def check_deadlines(self, now: float) -> None:
        """Called by the ``DeadlineTimer`` when a deadline may have passed."""
        self._deadline_slot = None
        if self.lost:
            return
        conn = self.conn
        if conn.handle_timer(now):
            self.fail(conn.error)  # type: ignore[arg-type]
            return
        if conn.held_until is not None and conn.release(now):
            self.messages_received()  # the consumer takes the held input, or holds again
            if self.lost:
                return
        self._schedule_deadlines()


class _FileReceiver(asyncio.BufferedProtocol):
    """The transport's protocol while ``StreamProtocol.receive_file`` runs.

    The transport reads into the buffer being filled (never past the bytes still wanted);
    a full buffer is written to the file at once and queued for the digest, which hashes
    one buffer at a time in the default executor (in order), and hands it back when done.
    When all the bytes are read, the stream's protocol gets the transport back at once (so
    later bytes are its own); ``done`` resolves when they are written and hashed too.
    Everything else the transport reports (EOF, loss, write flow control) is passed on to
    the stream's protocol.
    """

    def __init__(
        self,
        stream: StreamProtocol,
        fd: int,
        written: int,
        count: int,
        digest: Digest | None,
        progress: Callable[[int], object] | None,
        timeout: float | None,
    ) -> None:
        self._stream = stream
        self._loop = loop = stream._loop
        self._transport = cast(asyncio.Transport, stream.transport)
        self._fd = fd
        self._written = written
        self._count = count
        self._left = count - written  # bytes not yet read
        self._digest = digest
        self._progress = progress
        self._size = min(RECEIVE_FILE_BUFFER, self._left)
        self._buffer: memoryview | None = memoryview(bytearray(self._size))
        self._made = 1  # buffers allocated
        self._free: list[memoryview] = []
        self._fill = 0
        self._to_hash: deque[tuple[memoryview, int]] = deque()
        self._hashing = False
        self._paused = False
        self._reading = True
        self._failed = False
        self.done: asyncio.Future[int] = loop.create_future()
        self._timeout = timeout
        self._last_data = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        if timeout is not None:
            self._timer = loop.call_at(self._last_data + timeout, self._check_idle)

    # -- the transport's callbacks ----------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        buffer = self._buffer
        assert buffer is not None  # reading is paused while no buffer is free
        fill = self._fill
        return buffer[fill : fill + min(self._size - fill, self._left)]

    def buffer_updated(self, nbytes: int) -> None:
        self._fill += nbytes
        self._left -= nbytes
        self._last_data = self._loop.time()
        if self._fill == self._size or not self._left:
            self._flush()
            if not self._left:
                self._end_reading()
                self._maybe_done()
        elif self._flush_timer is None:
            self._flush_timer = self._loop.call_later(RECEIVE_FILE_FLUSH_DELAY, self._flush)

    def eof_received(self) -> bool:
        keep_open = self._stream.eof_received()
        self._ended()
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)
        self._ended()

    def pause_writing(self) -> None:
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        self._stream.resume_writing()

    # -- the bytes --------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write the filled part of the buffer and queue it for the digest."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        fill = self._fill
        buffer = self._buffer
        if not fill or buffer is None or self._failed:
            return
        self._fill = 0
        view = buffer[:fill]
        try:
            _write_all(self._fd, view)
        except OSError as exc:
            self._fail(exc)
            return
        self._written += fill
        self._stream.conn.last_activity = self._last_data
        if self._progress is not None:
            try:
                self._progress(self._written)
            except Exception as exc:  # the caller's callback: its error ends the call
                self._fail(exc)
                return
        if self._digest is None:
            return  # the buffer is free again at once
        self._to_hash.append((buffer, fill))
        self._buffer = None
        if self._free:
            self._buffer = self._free.pop()
        elif self._made < RECEIVE_FILE_BUFFERS:
            self._made += 1
            self._buffer = memoryview(bytearray(self._size))
        elif self._reading and not self._stream.lost:
            self._paused = True
            self._transport.pause_reading()
        self._hash_next()

    def _hash_next(self) -> None:
        digest = self._digest
        while self._to_hash and not self._hashing and digest is not None:
            buffer, fill = self._to_hash.popleft()
            if fill < DIGEST_IN_THREAD_MIN:
                digest.update(buffer[:fill])
                self._hashed(buffer)
                continue
            self._hashing = True
            job = self._loop.run_in_executor(None, digest.update, buffer[:fill])
            job.add_done_callback(partial(self._job_done, buffer))

    def _job_done(self, buffer: memoryview, job: asyncio.Future[None]) -> None:
        self._hashing = False
        if self._failed and not self._reading:
            return  # receive_file has returned
        if job.cancelled() or job.exception() is not None:  # the executor is shut down
            self._fail(BrokenResourceError("the digest could not be computed"))
            return
        self._hashed(buffer)
        self._hash_next()
        self._maybe_done()

    def _hashed(self, buffer: memoryview) -> None:
        """A buffer is free: fill it next if reading waits for one."""
        if self._buffer is None:
            self._buffer = buffer
            if self._paused:
                self._paused = False
                self._last_data = self._loop.time()  # the peer was not the one waiting
                if self._reading:
                    self._transport.resume_reading()
        else:
            self._free.append(buffer)

    def _maybe_done(self) -> None:
        if not self._left and not self._hashing and not self._to_hash and not self.done.done():
            self.done.set_result(self._written)

    # -- the end ----------------------------------------------------------------------------

    def _end_reading(self) -> None:
        """Give the transport back to the stream's protocol (it is done with it, or the
        transport is gone)."""
        if self._reading:
            self._reading = False
            if self._timer is not None:
                self._timer.cancel()
            if self._paused:
                self._paused = False
                if not self._stream.lost:
                    self._transport.resume_reading()
            self._transport.set_protocol(self._stream)

    def _ended(self) -> None:
        """The input ended (EOF, loss) before every byte came."""
        self._flush()
        self._end_reading()
        if self._left and not self.done.done():
            error = self._stream.conn.end_error()
            if isinstance(error, EndOfStream):
                received, count = self._count - self._left, self._count
                error = BrokenResourceError(
                    f"the connection closed after {received} of {count} bytes"
                )
            self.done.set_exception(error)

    def _fail(self, error: Exception) -> None:
        """Stop: the receive failed here (a write, the deadline, a cancellation): abort the
        connection, whose input is now in the middle of the file."""
        if self._failed:
            return
        self._flush()
        self._failed = True
        if not self.done.done():
            self.done.set_exception(error)
        self._end_reading()
        if isinstance(error, NetlibError):
            self._stream.fail(error)
        else:
            self._stream.fail(BrokenResourceError(f"receive_file failed: {error}"))

    def _check_idle(self) -> None:
        self._timer = None
        if not self._reading or self._timeout is None:
            return
        now = self._loop.time()
        if self._paused or now < self._last_data + self._timeout:
            self._timer = self._loop.call_at(
                max(now, self._last_data) + self._timeout, self._check_idle
            )
            return
        self._fail(PeerTimedOut(f"no data for {self._timeout:g}s"))

    def stop(self) -> None:
        """``receive_file`` returns: on an early exit (cancelled), write what was received
        and abort the connection. A hash still running in the executor finishes there."""
        if self._reading:
            self._fail(BrokenResourceError("receive_file was cancelled"))
        self._failed = True
