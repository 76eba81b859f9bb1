"""FramedProtocol: an asyncio Protocol that turns a byte stream into bounded message queues.

Theory of operation
-------------------
``data_received`` feeds each chunk to the connection's decoder and appends the completed
messages to ``frames``, a list the public ``MessageStream`` reads from ``head`` on without
suspending while it is non-empty; it clears the list when it has read it all (a list costs
56 bytes while empty, a deque 760). Nothing is done per message here: one decoder call
per chunk.

Read flow control: ``queued`` counts the bytes of the chunks that completed messages since
``frames`` was last empty (a partial frame is bounded by the decoder's own limit). Past
``read_limit`` the transport stops reading, and reading resumes when the consumer empties
the queue, so a handler that falls behind is never buried: at most ``read_limit`` plus one
read chunk plus one partial frame is held in user space.

Write path: while received messages are still queued, ``write()`` appends to ``pending``
(and schedules one ``flush()`` with ``call_soon`` as a backstop); the reply to the last
queued message flushes them all. A handler that answers a batch of pipelined messages
therefore produces one ``writelines`` (one system call) per batch instead of one per
message, and a request/response handler writes at once, with no scheduling. ``pending``
is also flushed at the high-water mark, before the consumer waits for input, and before
close. The transport's own buffer has explicit limits on both loops (uvloop's
default low-water mark is 16 bytes); while it is above the high mark ``write_paused`` is set
and senders wait in ``drain()``.

Deadlines live in a ``DeadlineTimer`` (one event-loop timer per server, see
``aio/deadlines.py``): the first-frame deadline is not extended by trickled bytes
(slowloris); the idle deadline is checked lazily against ``last_activity`` (updated per
chunk read or batch written), so nothing is re-armed per packet.

Objects only some connections need (the pending-write list, the drain waiters, the closed
future) are created on first use: an idle connection holds as little as possible.

After the connection is lost, writes are silent no-ops on both loops (uvloop raises and
asyncio warns if a closing transport is written to, so the transport is never touched).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

from netlib.aio.deadlines import DeadlineTimer, HasDeadlines, resolution_for
from netlib.aio.flow import DEFAULT_WRITE_HIGH, DEFAULT_WRITE_LOW, WriteFlowControl
from netlib.errors import (
    BrokenResourceError,
    EndOfStream,
    FrameTooLarge,
    NetlibError,
    PeerTimedOut,
    ProtocolError,
)
from netlib.sansio.framing import Decoder

__all__ = [
    "DEFAULT_READ_LIMIT",
    "FramedProtocol",
    "StreamLimits",
]

logger = logging.getLogger("netlib.aio.framed")

DEFAULT_READ_LIMIT: Final = 256 * 1024
"""Received bytes not yet consumed by the handler above which reading pauses."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection limits and deadlines (seconds; None disables a deadline)."""

    first_frame_timeout: float | None = None
    idle_timeout: float | None = None
    write_high: int = DEFAULT_WRITE_HIGH
    write_low: int = DEFAULT_WRITE_LOW
    read_limit: int = DEFAULT_READ_LIMIT

    def __post_init__(self) -> None:
        if not 0 <= self.write_low <= self.write_high:
            raise ValueError(f"need 0 <= write_low <= write_high, got {self}")
        if self.read_limit < 1:
            raise ValueError(f"read_limit must be >= 1, got {self.read_limit}")

    @property
    def has_deadlines(self) -> bool:
        return self.first_frame_timeout is not None or self.idle_timeout is not None

    def deadline_timer(self) -> DeadlineTimer:
        """A ``DeadlineTimer`` fine enough for these deadlines (for a server's connections)."""
        resolution = resolution_for(self.first_frame_timeout, self.idle_timeout)
        return DeadlineTimer(asyncio.get_running_loop(), resolution)


class FramedProtocol(WriteFlowControl, asyncio.Protocol):
    """Bridges a stream transport and a decoder to a message queue, with flow control.

    Args:
        decoder: this connection's framing decoder.
        limits: flow-control limits and deadlines.
        raw: each chunk received is a message (the decoder is not called).
        deadlines: the timer that checks this connection's deadlines (a server shares one
            between its connections); by default the connection gets its own if it has
            deadlines.
        on_lost: called with this protocol when the connection is lost (a server counts
            how its connections end).

    The public ``MessageStream`` is the intended consumer: it takes messages from ``frames``
    (``take()``), calls ``readable_waiter()`` when the queue is empty, ``write()`` /
    ``drain()`` to send, and ``close()`` / ``finish()`` to end the connection.
    """

    __slots__ = (
        "_closed",
        "_deadline_slot",
        "_deadlines",
        "_decoder",
        "_discarding",
        "_first_deadline",
        "_flush_handle",
        "_limits",
        "_loop",
        "_on_lost",
        "_own_deadlines",
        "_peer_done",
        "_pending",
        "_pending_size",
        "_raw",
        "_waiter",
        "discarded",
        "eof",
        "error",
        "frames",
        "head",
        "last_activity",
        "lost",
        "peer_eof",
        "queued",
        "reading_paused",
        "transport",
    )

    def __init__(
        self,
        decoder: Decoder,
        limits: StreamLimits,
        *,
        raw: bool = False,
        deadlines: DeadlineTimer | None = None,
        on_lost: Callable[[FramedProtocol], None] | None = None,
    ) -> None:
        self._decoder = decoder
        self._raw = raw
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.frames: list[bytes] = []
        self.head = 0  # frames[:head] are consumed; the consumer clears frames at the end
        self.queued = 0
        self.reading_paused = False
        self.eof = False  # no more input for the consumer (peer EOF, or stop_reading)
        self.peer_eof = False
        self._peer_done: asyncio.Future[None] | None = None
        self.lost = False
        self.error: NetlibError | None = None
        self.write_paused = False
        self.last_activity = 0.0
        self.discarded = 0
        self._discarding = False
        self._pending: list[bytes] | None = None
        self._pending_size = 0
        self._flush_handle: asyncio.Handle | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] | None = None
        self._own_deadlines = deadlines is None and limits.has_deadlines
        if self._own_deadlines:
            deadlines = limits.deadline_timer()
        self._deadlines = deadlines
        self._deadline_slot: dict[HasDeadlines, None] | None = None
        self._first_deadline: float | None = None
        self._closed: asyncio.Future[None] | None = None
        self._on_lost = on_lost

    # -- asyncio.Protocol callbacks ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=self._limits.write_high, low=self._limits.write_low)
        now = self.last_activity = self._loop.time()
        if self._limits.first_frame_timeout is not None:
            self._first_deadline = now + self._limits.first_frame_timeout
        self._schedule_deadlines()

    def data_received(self, data: bytes) -> None:
        self.last_activity = self._loop.time()
        if self._discarding:
            self.discarded += len(data)
            return
        if self._raw:  # each chunk is a message: no decoder call, no list
            self.frames.append(data)
        else:
            try:
                frames = self._decoder.feed(data)
            except ProtocolError as exc:
                if isinstance(exc, FrameTooLarge) and exc.frames:
                    self.frames.extend(exc.frames)
                    self._queued(0)
                self.fail(exc)
                return
            if not frames:
                return  # a partial frame is bounded by the decoder instead
            self.frames.extend(frames)
        self._queued(len(data))

    def _queued(self, size: int) -> None:
        """Messages were queued from ``size`` bytes: lift the first-frame deadline, wake the
        consumer, and pause reading past ``read_limit``."""
        self._first_deadline = None  # lifted; the wheel finds out lazily
        self._wake()
        queued = self.queued = self.queued + size
        if queued > self._limits.read_limit and not self.reading_paused:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        try:
            self._decoder.feed_eof()
        except ProtocolError as exc:
            self.error = exc
        self.eof = self.peer_eof = True
        self._wake()
        self._resolve_peer_done()
        return True  # keep the transport open: replies may still be sent (half-close)

    def _resolve_peer_done(self) -> None:
        if self._peer_done is not None and not self._peer_done.done():
            self._peer_done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.error is None and exc is not None:
            error = BrokenResourceError(f"connection lost: {exc!r}")
            error.__cause__ = exc
            self.error = error
        self._pending = None
        self._pending_size = 0
        self._cancel_deadlines()
        self._wake()
        self._wake_drainers()
        self._resolve_peer_done()
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)
        if self._on_lost is not None:
            self._on_lost(self)

    # -- reading ----------------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes:
        """Pop the oldest queued message (``frames`` must not be empty).

        When the last one is taken, ``frames`` is cleared and reading resumes if it paused.
        ``MessageStream.__anext__`` inlines this (hot path): keep the two in step.
        """
        frames = self.frames
        head = self.head
        frame = frames[head]
        head += 1
        if head < len(frames):
            self.head = head
        else:
            frames.clear()
            self.head = self.queued = 0
            if self.reading_paused:
                self.consumed()
        return frame

    def consumed(self) -> None:
        """Record that ``frames`` was emptied: reset the count and resume reading."""
        self.queued = 0
        if self.reading_paused and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def readable_waiter(self) -> asyncio.Future[None] | None:
        """Flush, then return a future resolved when input arrives, or None if it ended."""
        if self._pending:
            self.flush()
        if self.eof or self.lost or self.error is not None:
            return None
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def end_error(self) -> NetlibError:
        """Return the error that describes why no more frames will come."""
        if self.error is not None:
            return self.error
        if self.eof:
            return EndOfStream()
        return BrokenResourceError("connection closed")

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data``, coalesced with the other replies to the queued messages.

        While received messages are still queued, replies are held and written together
        (when the queue empties, at the high-water mark, or at the end of this loop
        iteration); otherwise at once. A no-op once the connection is lost.
        """
        pending = self._pending
        if not pending and not self.frames:  # nothing to coalesce with: write at once
            transport = self.transport
            if self.lost or transport is None or transport.is_closing():
                return
            transport.write(data)
            self.last_activity = self._loop.time()
            return
        if self.lost:
            return
        if pending is None:
            pending = self._pending = []
        pending.append(data)
        self._pending_size += len(data)
        if not self.frames or self._pending_size >= self._limits.write_high:
            self.flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the pending writes to the transport in one call."""
        self._flush_handle = None
        pending = self._pending
        if not pending:
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if len(pending) == 1:
                transport.write(pending[0])
            else:
                transport.writelines(pending)
            self.last_activity = self._loop.time()
        pending.clear()  # the transports keep the buffers, not the list
        self._pending_size = 0

    def buffered_size(self) -> int:
        """Bytes written but not yet handed to the kernel: pending plus transport buffer."""
        transport = self.transport
        if transport is None or self.lost:
            return self._pending_size
        return self._pending_size + transport.get_write_buffer_size()

    async def drain(self) -> None:
        """Wait while the transport's write buffer is above its high-water mark.

        Raises:
            BrokenResourceError: the connection is lost (or ``PeerTimedOut``).
        """
        await super().drain()
        if self.lost:
            raise self._lost_error()

    def _lost_error(self) -> BrokenResourceError:
        if isinstance(self.error, BrokenResourceError):
            return self.error
        return BrokenResourceError("connection lost")

    # -- closing ----------------------------------------------------------------------------

    def fail(self, error: NetlibError) -> None:
        """Record ``error`` for the consumer and abort the connection at once."""
        if self.error is None:
            self.error = error
        self._wake()
        if self.transport is not None and not self.lost:
            self.transport.abort()

    def stop_reading(self) -> None:
        """End the input here: queued frames stay readable, later bytes are discarded.

        The consumer sees ``EndOfStream`` after the queued frames, while its replies can
        still be sent. Used by graceful shutdown.
        """
        self._discarding = True
        self.eof = True
        self._wake()
        self.consumed()

    def close(self) -> None:
        """Flush pending writes and close the transport (the transport drains its buffer)."""
        self.flush()
        self._cancel_deadlines()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close at once, discarding whatever is buffered."""
        if self.transport is not None and not self.lost:
            self.transport.abort()

    async def finish(self, grace: float, *, linger: bool) -> None:
        """Close gracefully within ``grace`` seconds, then abort.

        With ``linger``, send EOF first and keep reading (and discarding) until the peer
        closes too, so unread input never turns the close into a reset.
        """
        try:
            async with asyncio.timeout(grace):
                if linger and not self.peer_eof and self._can_write_eof():
                    self._discarding = True
                    self.consumed()
                    self.flush()
                    self._peer_done = self._loop.create_future()
                    self.transport.write_eof()  # type: ignore[union-attr]
                    await self._peer_done  # the peer's EOF, or the connection's end
                self.close()
                await self.wait_closed()
        except TimeoutError:
            self.abort()
            await self.wait_closed()

    def _can_write_eof(self) -> bool:
        transport = self.transport
        if transport is None or self.lost or transport.is_closing():
            return False
        return transport.can_write_eof()

    async def wait_closed(self) -> None:
        """Wait until ``connection_lost`` has run."""
        if self.lost or self.transport is None:
            return
        if self._closed is None:
            self._closed = self._loop.create_future()
        await asyncio.shield(self._closed)

    # -- deadlines --------------------------------------------------------------------------

    def _schedule_deadlines(self) -> None:
        deadline = self._first_deadline
        idle = self._limits.idle_timeout
        if idle is not None and (deadline is None or self.last_activity + idle < deadline):
            deadline = self.last_activity + idle
        if deadline is not None and self._deadlines is not None:
            self._deadline_slot = self._deadlines.schedule(self, deadline)

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
        limits = self._limits
        if self._first_deadline is not None and now >= self._first_deadline:
            self.fail(PeerTimedOut(f"no complete message within {limits.first_frame_timeout}s"))
        elif limits.idle_timeout is not None and now >= self.last_activity + limits.idle_timeout:
            self.fail(PeerTimedOut(f"no traffic for {limits.idle_timeout}s"))
        else:
            self._schedule_deadlines()
