"""StreamConnection: the protocol state of one message stream, with no I/O.

Rules
-----
* Bytes and ``now`` in; messages, a state and deadlines out. No clock is read and nothing
  is sent from here: the adapter that owns the transport asks ``next_deadline()``, calls
  ``handle_timer(now)``, and reads ``read_paused`` to pause or resume its transport.
* Transport-neutral: the same object sits on a TCP byte stream (``receive_data``) and on a
  message channel that already delivers whole messages (``receive_messages``).
* One ``state`` (``StreamState``) says where the connection is; ``error`` says why it
  failed. A peer's fault (malformed or oversized frame, a deadline passed, a reset) never
  raises out of here: it becomes ``state == FAILED`` with ``error`` set, and the messages
  completed before the fault stay readable.
* Every buffer is bounded: queued input by ``read_limit`` (plus one read), a partial frame
  by the framing's ``max_size``.

Theory of operation
-------------------
Received messages go to ``frames``, a list read from ``head`` on; it is cleared when the
consumer has taken them all (a list costs 56 bytes while empty, a deque 760). ``queued``
counts the bytes of the reads that completed messages since the list was last empty; past
``read_limit`` the connection wants reading paused (``read_paused``), until the consumer
empties the queue. Bytes of a partial frame are not counted there, since the decoder bounds
them and counting them would pause reading while the consumer waits for the rest of that
frame.

Deadlines: the first-message deadline is set when the connection opens and lifted by the
first complete message; trickled bytes never extend it (slowloris). The message deadline
(optional) does the same for every later message, from its first byte; it is suspended while
the consumer holds the input (``hold()``: a chat pacing a flooding client). The idle deadline
moves with ``last_activity`` (updated per read and per write batch), so traffic never
re-arms a timer: the owner checks lazily when the earliest deadline it was told is due. The
send deadline runs while the write buffer stays above its high mark: a peer that stops
reading is cut off as a slow consumer instead of holding its buffers for ever.

States::

    OPEN ──peer EOF / end_input()──> INPUT_ENDED ──start_linger()──> LINGERING
      │                                   │                              │ peer EOF
      │                                   └──────────── lost() ──────────┴──> CLOSED
      └── malformed frame, deadline, reset (any state but CLOSED) ──────────> FAILED
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from netlib.errors import (
    BrokenResourceError,
    EndOfStream,
    FrameTooLarge,
    NetlibError,
    PeerTimedOut,
    ProtocolError,
    SlowConsumer,
)
from netlib.sansio.framing import Framing, RawFraming

__all__ = [
    "DEFAULT_READ_LIMIT",
    "DEFAULT_WRITE_HIGH",
    "DEFAULT_WRITE_LOW",
    "StreamConnection",
    "StreamLimits",
    "StreamState",
]

DEFAULT_WRITE_HIGH: Final = 64 * 1024
"""Transport write buffer size above which senders wait (bytes)."""
DEFAULT_WRITE_LOW: Final = 16 * 1024
"""Transport write buffer size below which waiting senders resume (bytes)."""
DEFAULT_READ_LIMIT: Final = 256 * 1024
"""Received bytes not yet consumed by the handler above which reading pauses."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    """Per-connection limits and deadlines (seconds; None disables a deadline).

    Attributes:
        first_frame_timeout: seconds from opening to the first complete message.
        idle_timeout: seconds without traffic either way.
        message_timeout: seconds a message may take from its first byte to its last, so a
            peer trickling a message byte by byte cannot hold it open (first_frame_timeout
            covers the first message).
        send_timeout: seconds the write buffer may stay above ``write_high`` (the peer does
            not read) before the connection fails with ``SlowConsumer``.
        write_high, write_low: write-buffer marks for backpressure: above ``write_high``
            senders wait and the send deadline runs, until the buffer is down to
            ``write_low``.
        transport_high: None (the default), or a lower high mark for the transport alone
            (its low mark a quarter of it), for fan-out services that queue the same message
            to many connections: past it the writes wait in the connection's own list, as
            references to the one message, instead of as a copy in each transport's buffer
            (asyncio's is a ``bytearray`` before Python 3.12). Senders then wait at this mark;
            ``write_high`` and ``write_low``, counted over the list and the transport
            together, still start and lift the send deadline.
        read_limit: unconsumed received bytes above which reading pauses.
    """

    first_frame_timeout: float | None = None
    idle_timeout: float | None = None
    message_timeout: float | None = None
    send_timeout: float | None = None
    write_high: int = DEFAULT_WRITE_HIGH
    write_low: int = DEFAULT_WRITE_LOW
    transport_high: int | None = None
    read_limit: int = DEFAULT_READ_LIMIT

    def __post_init__(self) -> None:
        if not 0 <= self.write_low <= self.write_high:
            raise ValueError(f"need 0 <= write_low <= write_high, got {self}")
        if self.transport_high is not None and not 0 < self.transport_high <= self.write_high:
            raise ValueError(f"need 0 < transport_high <= write_high, got {self}")
        if self.read_limit < 1:
            raise ValueError(f"read_limit must be >= 1, got {self.read_limit}")

    @property
    def timeouts(self) -> tuple[float | None, ...]:
        """Every timeout, set or not."""
        return (
            self.first_frame_timeout,
            self.idle_timeout,
            self.message_timeout,
            self.send_timeout,
        )

    @property
    def has_deadlines(self) -> bool:
        """True if any deadline is set."""
        return any(timeout is not None for timeout in self.timeouts)


class StreamState(enum.Enum):
    """Where a stream connection is."""

    OPEN = "open"
    """Both directions open."""
    INPUT_ENDED = "input ended"
    """No more input (peer EOF, or ``end_input()``); queued messages stay readable and
    replies can still be sent."""
    LINGERING = "lingering"
    """This side sent EOF and discards input until the peer closes too."""
    CLOSED = "closed"
    """The connection is gone, cleanly."""
    FAILED = "failed"
    """The connection failed: ``error`` says why (protocol error, deadline, reset)."""


# Module-level names for the states: ``StreamState.OPEN`` costs an enum lookup (about 250 ns
# on CPython 3.11), which the per-read path cannot afford.
_OPEN: Final = StreamState.OPEN
_INPUT_ENDED: Final = StreamState.INPUT_ENDED
_LINGERING: Final = StreamState.LINGERING
_CLOSED: Final = StreamState.CLOSED
_FAILED: Final = StreamState.FAILED


class StreamConnection:
    """The state of one message stream: framing, read accounting, state and deadlines.

    Args:
        framing: the framing of the messages (its decoder is made here).
        limits: read limit and deadlines.
        now: the time the connection opened.

    The adapter feeds it (``receive_data``, ``receive_eof``, ``lost``, ``handle_timer``), the
    consumer takes messages (``frames`` non-empty, then ``take()``), and both read
    ``state``, ``error`` and ``read_paused``. The adapter also sets ``last_activity`` when it
    hands a write batch to the transport (the idle deadline counts traffic both ways).
    """

    __slots__ = (
        "_decoder",
        "_eof",
        "_first_deadline",
        "_limits",
        "_message_deadline",
        "_raw",
        "_write_paused_at",
        "discarded",
        "error",
        "frames",
        "head",
        "held_until",
        "last_activity",
        "peer_eof",
        "queued",
        "read_paused",
        "rearm",
        "state",
    )

    def __init__(self, framing: Framing, limits: StreamLimits, now: float) -> None:
        self._decoder = framing.decoder()
        self._raw = isinstance(framing, RawFraming)
        self._limits = limits
        self.frames: list[bytes] = []
        self.head = 0  # frames[:head] are consumed; take() clears the list at the end
        self.queued = 0
        self.read_paused = False
        self.state = _OPEN
        self.error: NetlibError | None = None
        self.last_activity = now
        self.discarded = 0
        self._eof = False  # the input ended cleanly (EOF or end_input), not by a failure
        self.peer_eof = False
        timeout = limits.first_frame_timeout
        self._first_deadline = None if timeout is None else now + timeout
        self._message_deadline: float | None = None
        self._write_paused_at: float | None = None
        self.held_until: float | None = None  # see hold()
        self.rearm = False  # a deadline earlier than next_deadline() said before was set

    # -- input ------------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> bool:
        """Feed bytes read from the peer.

        Returns:
            True if the consumer has something new to look at: messages were queued, or
            the connection failed (a malformed or oversized frame).
        """
        self.last_activity = now
        if self.state is not _OPEN:
            self.discarded += len(data)  # input ended: read and dropped, never left unread
            return False
        if self._raw:  # each chunk is a message: no decoder call
            self.frames.append(data)
        else:
            try:
                frames = self._decoder.feed(data)
            except ProtocolError as exc:
                if isinstance(exc, FrameTooLarge) and exc.frames:
                    self.frames.extend(exc.frames)
                self.fail(exc)
                return True
            if self._limits.message_timeout is not None:
                self._track_partial(now)
            if not frames:
                return False  # a partial frame is bounded by the decoder instead
            self.frames.extend(frames)
        self._first_deadline = None
        queued = self.queued = self.queued + len(data)
        if queued > self._limits.read_limit:
            self.read_paused = True
        return True

    def _track_partial(self, now: float) -> None:
        """Start the message deadline when a partial message appears, lift it when none
        is left; a message that continues keeps the deadline it started with."""
        if self.held_until is not None:
            return  # held by this side: the message deadline waits for release()
        if not self._decoder.in_message:
            self._message_deadline = None
        elif self._message_deadline is None:
            self._message_deadline = now + self._limits.message_timeout  # type: ignore[operator]
            self.rearm = True

    @property
    def raw(self) -> bool:
        """True if the framing is raw: each chunk received is a message."""
        return self._raw

    def receive_messages(self, messages: list[bytes], size: int, now: float) -> bool:
        """Feed whole messages from a transport that frames them itself (``size`` bytes).

        Returns:
            True if messages were queued.
        """
        self.last_activity = now
        if self.state is not _OPEN or not messages:
            self.discarded += size
            return False
        self.frames.extend(messages)
        self._queued(size)
        return True

    def _queued(self, size: int) -> None:
        self._first_deadline = None
        queued = self.queued = self.queued + size
        if queued > self._limits.read_limit:
            self.read_paused = True

    def receive_eof(self) -> None:
        """The peer finished sending. A partial frame left behind fails the connection."""
        self.peer_eof = True
        if self.state is _LINGERING:
            self.state = _CLOSED
            return
        if self.state is not _OPEN:
            return
        try:
            self._decoder.feed_eof()
        except ProtocolError as exc:
            self.fail(exc)
            return
        self._eof = True
        self.state = _INPUT_ENDED

    def lost(self, cause: BaseException | None) -> None:
        """The transport is gone; with a ``cause``, abruptly (the connection failed)."""
        if self.state is _FAILED:
            return
        if cause is None:
            self.state = _CLOSED
            return
        if isinstance(cause, NetlibError):  # a transport that knows why (a peer timed out)
            self.fail(cause)
            return
        error = BrokenResourceError(f"connection lost: {cause!r}")
        error.__cause__ = cause
        self.fail(error)

    def fail(self, error: NetlibError) -> None:
        """Record ``error`` and move to ``FAILED`` (the first error is kept)."""
        if self.error is None:
            self.error = error
        self.state = _FAILED

    # -- the consumer -----------------------------------------------------------------------

    def take(self) -> bytes:
        """Pop the oldest queued message (``frames`` must not be empty).

        When the last one is taken, the queue is cleared and ``read_paused`` drops.
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
            self.read_paused = False
        return frame

    def take_up_to(self, limit: int) -> bytes:
        """Pop at most ``limit`` bytes of the oldest queued message (``frames`` must not be
        empty; raw streams, whose messages are chunks): the rest of it stays first."""
        frame = self.frames[self.head]
        if len(frame) <= limit:
            return self.take()
        self.frames[self.head] = frame[limit:]
        return frame[:limit]

    @property
    def input_ended(self) -> bool:
        """True once no more messages will be queued (EOF, end of input, failure)."""
        return self.state is not _OPEN

    def end_error(self) -> NetlibError:
        """The error that says why no more messages will come."""
        if self.error is not None:
            return self.error
        if self._eof:
            return EndOfStream()
        return BrokenResourceError("connection closed")

    def end_input(self) -> None:
        """Stop taking input: queued messages stay readable, later bytes are discarded."""
        if self.state is _OPEN:
            self._eof = True
            self.state = _INPUT_ENDED
        self.queued = 0
        self.read_paused = False

    def start_linger(self) -> None:
        """This side sent EOF: discard input until the peer's EOF (``receive_eof``)."""
        if self.state in (_OPEN, _INPUT_ENDED):
            self.state = _LINGERING
            self.discard_queued()

    def discard_queued(self) -> None:
        """Drop the queued messages nobody will read (the state does not change)."""
        self.frames.clear()
        self.head = self.queued = 0
        self.read_paused = False

    def hold(self, until: float) -> None:
        """The consumer takes no message before ``until`` (it paces the peer, e.g. flood
        control); the adapter stops reading meanwhile. ``next_deadline()`` includes
        ``until`` and the message deadline is suspended: the peer is not the one holding
        its message. ``release(now)`` ends the hold."""
        self.held_until = until
        self._message_deadline = None
        self.rearm = True

    def release(self, now: float) -> bool:
        """End the hold if ``now`` has reached it; return whether it ended. A partial
        message gets a new message deadline from ``now``."""
        if self.held_until is None or now < self.held_until:
            return False
        self.held_until = None
        if self._limits.message_timeout is not None:
            self._track_partial(now)
        return True

    # -- output -----------------------------------------------------------------------------

    def writing_paused(self, now: float) -> None:
        """The write buffer passed its high mark: the send deadline starts."""
        if self._write_paused_at is None:
            self._write_paused_at = now
            self.rearm = self._limits.send_timeout is not None

    def writing_resumed(self) -> None:
        """The write buffer fell below its low mark: the send deadline is lifted."""
        self._write_paused_at = None

    # -- deadlines --------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time ``handle_timer`` may have work, or None (clears ``rearm``)."""
        self.rearm = False
        if self.state in (_CLOSED, _FAILED):
            return None
        limits = self._limits
        candidates = [self._first_deadline, self._message_deadline, self.held_until]
        if limits.idle_timeout is not None:
            candidates.append(self.last_activity + limits.idle_timeout)
        if limits.send_timeout is not None and self._write_paused_at is not None:
            candidates.append(self._write_paused_at + limits.send_timeout)
        return min((c for c in candidates if c is not None), default=None)

    def handle_timer(self, now: float) -> bool:
        """Check the deadlines at ``now``.

        Returns:
            True if one passed: the connection is ``FAILED`` with ``PeerTimedOut``.
        """
        if self.state in (_CLOSED, _FAILED):
            return False
        error = self._passed(now)
        if error is None:
            return False
        self.fail(error)
        return True

    def _passed(self, now: float) -> NetlibError | None:
        """The error of the first deadline passed at ``now``, if any."""
        limits = self._limits
        if self._first_deadline is not None and now >= self._first_deadline:
            return PeerTimedOut(f"no complete message within {limits.first_frame_timeout}s")
        if self._message_deadline is not None and now >= self._message_deadline:
            return PeerTimedOut(f"a message took longer than {limits.message_timeout}s")
        idle = limits.idle_timeout
        if idle is not None and now >= self.last_activity + idle:
            return PeerTimedOut(f"no traffic for {idle}s")
        paused_at, send_timeout = self._write_paused_at, limits.send_timeout
        if paused_at is not None and send_timeout is not None and now >= paused_at + send_timeout:
            held = now - paused_at
            return SlowConsumer(
                f"held above the soft limit ({limits.write_high} bytes) for {held:.2f} s"
            )
        return None

    @property
    def partial_size(self) -> int:
        """Bytes of a partial frame held by the decoder."""
        return self._decoder.buffered
