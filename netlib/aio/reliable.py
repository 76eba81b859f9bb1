"""The reliable-UDP adapter: one UDP socket, the sans-I/O cores, one timer, per-connection
transports.

Theory of operation
-------------------
A ``ReliableEndpoint`` owns one non-blocking UDP socket and reads it itself
(``loop.add_reader``, up to ``RECV_BATCH`` datagrams per wake-up: asyncio's datagram
transport reads one per wake-up, a loop iteration per datagram). On a server it owns a
``ReliableServerCore`` (its HMAC key from ``os.urandom``); on a client, one
``ReliableConnection`` (its connection id from ``secrets``). Each connection is presented to
the layer above as a ``ReliableTransport``: an ``asyncio.Transport`` whose ``write`` sends one
reliable message, so the stream protocol that carries TCP connections (a
``StreamProtocol``, or a subclass such as the chat's) runs on it unchanged: framing, read
limits, deadlines, the memory budget and ``MessageStream`` come with it.

* **Receiving.** Each datagram read goes to the core, and the messages it completed go
  up to the connection's protocol at once (a ``StreamProtocol`` takes the ordered ones as
  one list, ``receive_messages``: one wake-up of its consumer); nothing is sent from
  there. The connection is marked, and one ``call_soon`` per loop iteration (``flush``),
  scheduled after the wake-ups of the consumers, pumps every marked connection: other
  events, then ``datagrams_to_send(now, BURST)`` to the socket. So the acknowledgements
  for a batch of datagrams coalesce, and a handler woken by a message writes its reply
  before the flush, which sends reply and acknowledgement in one datagram. Datagrams are
  read into one buffer and copied out, or, after one of at least ``LARGE_DATAGRAM``
  bytes, into a bytes object of their own.
* **Bursts.** At most ``BURST`` datagrams, and ``BURST_BYTES`` bytes, per connection per
  iteration; a connection with more to send is marked again for the next one, so a whole
  congestion window never lands in the socket buffer at once, and other connections get
  their turn. A datagram the socket's buffer refuses (``EAGAIN``) is dropped and counted,
  as the network would drop it: the core's loss recovery resends it and its congestion
  control slows down.
* **Datagram size.** The socket forbids IP fragmentation (``forbid_fragmentation``:
  ``IP_PMTUDISC_PROBE``, ``IPV6_DONTFRAG``), each connection is told what the local route
  lets out (``route_payload_limit``: the interface MTU less the headers), and the core
  probes for the path's size within it (``sansio/reliable/pmtu.py``). A datagram the stack
  refuses as too long (``EMSGSIZE``) goes back to the core (``datagram_too_large``): a
  failed probe, or a narrower interface. Where fragmentation cannot be forbidden, or the
  interface refuses even a ``BASE_DATAGRAM`` (an MTU below 1,228 bytes), the socket lets
  the host fragment and the connections keep to ``BASE_DATAGRAM`` (1,200 bytes). Reads go
  into one buffer of ``config.max_datagram`` bytes (a longer datagram is cut, fails its
  checksum, and is dropped), and what was read is copied out.
* **Timers.** One event-loop timer per endpoint, at the core's ``next_deadline()``. It is
  moved when the deadline is earlier than the one armed, or later by ``TIMER_SLACK`` or
  more; within that it is left to fire early, find nothing due and re-arm. (Moved only
  when earlier, the probe timeout of every request, made moot by its reply's
  acknowledgement, woke the loop for nothing: 1.5 timer wake-ups per echo of a client
  sending every 10 ms, against 0.45 with the move.) A server's core does the same for its
  connections' deadlines (``ReliableServerCore.schedule``).
* **The clock.** The cores read ``time.monotonic()``, the clock of asyncio's ``loop.time()``,
  not ``loop.time()`` itself: uvloop's counts whole milliseconds, read once per iteration.
  On it, every RTT sample on a LAN was 0 or 1 ms, and a deadline set from a reading up to
  1 ms old fell due up to 1 ms early: a client's acknowledgement, due 10 ms after a reply,
  often left alone just before a request sent every 10 ms would have carried it (2.5
  datagrams per echo against 2.1-2.2 with the exact clock). Timers are still armed with
  ``loop.call_at``: on uvloop, with a deadline of the exact clock, one fires 0.1 to 2 ms
  late, never early. A loop whose clock is another (a test's virtual time) is read as it
  is.
* **Backpressure.** A message the core cannot take (``WouldBlock``: its send buffer is full)
  waits in the transport's backlog, which is fed to the core as acknowledgements free
  room. Above ``write_high`` (the core's buffer plus the backlog) the protocol is paused,
  below ``write_low`` resumed: ``MessageStream.send`` waits as it does over TCP. Reading is
  paused by leaving the core's events where they are: what it holds for the application
  fills its receive buffer, and flow control stops the sender.
* **Ending.** A clean CLOSE from the peer is the peer's EOF (``eof_received``: the handler
  sees ``EndOfStream``); the connection is lost once the core is CLOSED. An idle or
  handshake timeout becomes ``PeerTimedOut``, any other close by the peer
  ``BrokenResourceError``. ``close()`` is the core's clean close (flush, CLOSE until
  acknowledged); ``abort()`` sends one CLOSE and drops the rest. The transport cannot
  half-close: after ``close()`` nothing more is received.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

from netlib.aio.sockets import (
    allow_fragmentation,
    ask_socket_buffers,
    forbid_fragmentation,
    receive_buffer_size,
    route_payload_limit,
)
from netlib.errors import (
    BrokenResourceError,
    ClosedResourceError,
    LimitExceeded,
    NetlibError,
    PeerTimedOut,
    WouldBlock,
)
from netlib.sansio.ratelimit import TokenBucket
from netlib.sansio.reliable.connection import (
    CloseCode,
    Connected,
    ConnectionClosed,
    ConnectionState,
    MessageReceived,
    ReliableConfig,
    ReliableConnection,
    ReliableStatistics,
)
from netlib.sansio.reliable.endpoint import RESCHEDULE_SLACK, ReliableServerCore
from netlib.sansio.reliable.wire import BASE_DATAGRAM, load_checksum

__all__ = [
    "BURST",
    "BURST_BYTES",
    "HANDSHAKE_RATE",
    "LARGE_DATAGRAM",
    "RECV_BATCH",
    "RECV_BYTES",
    "SERVER_HANDSHAKE_RATE",
    "SOCKET_BUFFER",
    "TIMER_SLACK",
    "ReliableEndpoint",
    "ReliableTotals",
    "ReliableTransport",
    "report_short_buffer",
]

TIMER_SLACK: Final = RESCHEDULE_SLACK
"""Seconds by which the endpoint's timer may be early for the next deadline before it is
moved (cancelled and armed again): the server core's rule for its heap, 1 ms."""
BURST: Final = 32
"""Datagrams one connection sends at most per event-loop iteration (38 KiB at 1,200 bytes)."""
BURST_BYTES: Final = 128 * 1024
"""Bytes one connection sends at most per event-loop iteration (at least one datagram):
two datagrams of 65,507 bytes on loopback. (At 256 KiB, under Linux's usual 208 KiB
receive-buffer cap a loopback bulk transfer lost more datagrams at the receiving socket
and ran 4-15 % slower; with 4 MiB buffers the two are even.)"""
RECV_BATCH: Final = 64
"""Datagrams read at most per wake-up, so one busy socket cannot starve the loop."""
RECV_BYTES: Final = 256 * 1024
"""Bytes read at most per wake-up (at least one datagram): the acknowledgements and the
messages of what was read go at the end of the iteration, so a sender of large datagrams
hears about the first ones while it is still sending, instead of after a whole batch."""
LARGE_DATAGRAM: Final = 16 * 1024
"""Datagrams of at least this size are read into a bytes object of their own (no copy out
of the endpoint's read buffer); smaller ones are copied out of it."""
SOCKET_BUFFER: Final = 4 * 1024 * 1024
"""Bytes asked for the socket's receive and send buffers (``ask_socket_buffers``: the
kernel caps them at ``net.core.rmem_max`` / ``wmem_max`` unless the process has
``CAP_NET_ADMIN``): a burst of every connection's window must fit, or the kernel drops
datagrams that the congestion control then reads as losses."""
HANDSHAKE_RATE: Final = 100.0
"""Connection attempts (datagrams for no connection) a second one source address may make,
with a burst of as many, before the server drops its datagrams unread (R13)."""
SERVER_HANDSHAKE_RATE: Final = 1000.0
"""Connection attempts a second a server takes from all sources together, with a burst of
as many; past it, datagrams for no connection are dropped unread (R13). Without it a flood
of HELLOs from many addresses, each under its own rate, cost the server 20 us each (the
check, an HMAC, a cookie and its send): at 80,000 a second it fell behind, its socket's
queue filled, and an established client's datagrams waited up to 58 ms behind the HELLOs.
Dropped, one costs the read and a comparison. A new connection takes two attempts (its
HELLO, then the one that returns the cookie): 500 new connections a second, or at once."""
MAX_RATE_SOURCES: Final = 4096
"""Source addresses the handshake rate limiter tracks; past it the table starts afresh."""
logger = logging.getLogger("netlib.rudp")
_SAME_CLOCK: Final = 0.1  # seconds: a loop clock this close to time.monotonic() is that clock
_KEY_SIZE: Final = 32
_NO_CID: Final = b"\0\0\0\0"
_CLOSED: Final = ConnectionState.CLOSED
_NORMAL: Final = int(CloseCode.NORMAL)


def _clock_of(loop: asyncio.AbstractEventLoop) -> Callable[[], float]:
    """The clock the cores read (see ``The clock`` in the module's docstring):
    ``time.monotonic`` where the loop's clock is that clock, if perhaps in whole
    milliseconds (asyncio, uvloop); the loop's own otherwise (a loop with a clock of its
    own, such as a test's virtual time), so that deadlines and timers agree."""
    if abs(loop.time() - time.monotonic()) < _SAME_CLOCK:
        return time.monotonic
    return loop.time


_short_buffer_logged = False


def report_short_buffer(sock: socket.socket) -> None:
    """Log once per process (INFO) that the kernel gave ``sock`` a smaller receive buffer
    than ``SOCKET_BUFFER``: ``net.core.rmem_max`` caps it, 208 KiB on most systems, and with
    that a loopback bulk transfer loses 3-5 % of its datagrams at the socket and runs
    about a fifth slower (docs/reliable-udp.md, "Socket buffers")."""
    global _short_buffer_logged
    if _short_buffer_logged:
        return
    granted = receive_buffer_size(sock)
    if granted is None or granted >= SOCKET_BUFFER:
        return
    _short_buffer_logged = True
    logger.info(
        "reliable UDP: the kernel capped the socket's receive buffer at %d KiB of the %d KiB"
        " asked, so bulk transfers lose datagrams at the socket and run slower; to raise"
        " the cap: sysctl -w net.core.rmem_max=%d",
        granted // 1024,
        SOCKET_BUFFER // 1024,
        SOCKET_BUFFER,
    )


def _burst(datagram_size: int) -> int:
    """Datagrams of ``datagram_size`` bytes in one burst (``BURST``, ``BURST_BYTES``)."""
    return BURST if datagram_size * BURST <= BURST_BYTES else BURST_BYTES // datagram_size or 1


class _StreamSink(Protocol):
    """What a ``ReliableTransport`` drives: an ``asyncio.Protocol`` (``StreamProtocol``)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def eof_received(self) -> bool | None: ...
    def connection_lost(self, exc: Exception | None) -> None: ...
    def pause_writing(self) -> None: ...
    def resume_writing(self) -> None: ...


class ReliableTotals:
    """Counters of the connections an endpoint has had (the closed ones summed)."""

    __slots__ = (
        "datagram_size",
        "datagrams_received",
        "datagrams_sent",
        "losses_detected",
        "min_rtt",
        "rate_limited",
        "retransmissions",
        "spurious_retransmissions",
    )

    def __init__(self) -> None:
        self.datagrams_sent = self.datagrams_received = 0
        self.retransmissions = self.spurious_retransmissions = self.losses_detected = 0
        self.rate_limited = 0
        self.min_rtt = 0.0
        self.datagram_size = 0  # the largest datagram size any connection reached

    def add(self, stats: ReliableStatistics) -> None:
        """Add one connection's counters."""
        self.datagrams_sent += stats.datagrams_sent
        self.datagrams_received += stats.datagrams_received
        self.retransmissions += stats.retransmissions
        self.spurious_retransmissions += stats.spurious_retransmissions
        self.losses_detected += stats.losses_detected
        self.datagram_size = max(self.datagram_size, stats.datagram_size)
        if stats.min_rtt and (not self.min_rtt or stats.min_rtt < self.min_rtt):
            self.min_rtt = stats.min_rtt


class ReliableTransport(asyncio.Transport):
    """One reliable-UDP connection as an ``asyncio.Transport``: ``write`` sends a message.

    Made by a ``ReliableEndpoint``; the layer above sets its protocol (``set_protocol``,
    then ``protocol.connection_made(transport)``).
    """

    def __init__(self, endpoint: ReliableEndpoint, conn: ReliableConnection, peer: Any) -> None:
        super().__init__({"peername": peer, "sockname": endpoint.sockname})
        self._endpoint = endpoint
        self.conn = conn
        self._protocol: _StreamSink | None = None
        self._take_messages: Callable[[list[bytes], int], None] | None = None
        self._max_message = endpoint.config.max_message
        self._backlog: list[bytes] = []
        self._backlog_size = 0
        self._high = 64 * 1024
        self._low = 16 * 1024
        self._write_paused = False
        self._unflushed = 0  # bytes written since the last flush
        self._reading_paused = False
        self._closing = False
        self.lost = False
        self._error: NetlibError | None = None
        self.connected: asyncio.Future[None] | None = None  # a client's handshake

    # -- asyncio.Transport ----------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``peername``, ``sockname``, or ``reliable_statistics``: the connection's
        ``ReliableStatistics`` now (RTT, retransmissions, datagram size, ...)."""
        if name == "reliable_statistics":
            return self.conn.statistics()
        return super().get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]
        # a StreamProtocol takes messages in batches (one wake-up of its consumer each)
        self._take_messages = getattr(protocol, "receive_messages", None)
        self._endpoint.mark(self.conn)  # deliver what waited for it

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol  # type: ignore[return-value]

    def is_closing(self) -> bool:
        return self._closing or self.lost

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one message (a no-op once closing or lost).

        Raises:
            LimitExceeded: larger than the connection's ``max_message``.
        """
        if self._closing or self.lost:
            return
        message = bytes(data) if data.__class__ is not bytes else data
        size = len(message)
        if size > self._max_message:
            raise LimitExceeded(
                f"message of {size} bytes exceeds the limit of {self._max_message} bytes"
            )
        conn = self.conn
        if self._backlog:
            self._queue(message)
        else:
            try:
                conn.send(message)
            except WouldBlock:
                self._queue(message)
            except ClosedResourceError:  # the peer closed: what is written goes nowhere
                return
            self._unflushed += size
            if self._unflushed >= BURST_BYTES:  # a burst's worth within one iteration: it
                self._unflushed = 0  # goes now, so the peer starts on it while we write on
                self._endpoint.send_burst(conn)
        self._endpoint.mark(conn)
        if not self._write_paused and self.get_write_buffer_size() > self._high:
            self._write_paused = True
            if self._protocol is not None:
                self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _queue(self, message: bytes) -> None:
        self._backlog.append(message)
        self._backlog_size += len(message)

    def get_write_buffer_size(self) -> int:
        return self.conn.send_buffered + self._backlog_size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 64 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low, self._high)

    def can_write_eof(self) -> bool:
        return False  # a reliable-UDP connection closes both ways at once

    def write_eof(self) -> None:
        raise NotImplementedError("reliable UDP has no half-close")

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if self._reading_paused:
            self._reading_paused = False
            self._endpoint.mark(self.conn)

    def is_reading(self) -> bool:
        return not self._reading_paused

    def close(self) -> None:
        """Close cleanly: what was written is delivered first, then CLOSE."""
        if self._closing or self.lost:
            return
        self._closing = True
        self._feed_backlog()
        self._backlog.clear()  # what the core could not take by now is dropped
        self._backlog_size = 0
        self.conn.close()
        self._endpoint.mark(self.conn)

    def abort(self) -> None:
        """Close at once: one CLOSE to the peer, the rest dropped."""
        if self.lost:
            return
        self._closing = True
        self._backlog.clear()
        self._backlog_size = 0
        self.conn.abort()
        self._endpoint.send_now(self.conn)  # before the socket may close
        self._endpoint.mark(self.conn)

    # -- the endpoint's side --------------------------------------------------------------------

    def _feed_backlog(self) -> None:
        backlog = self._backlog
        taken = 0
        try:
            for message in backlog:
                self.conn.send(message)
                taken += 1
                self._backlog_size -= len(message)
        except (WouldBlock, ClosedResourceError):
            pass
        del backlog[:taken]

    def pumped(self) -> None:
        """After the core took input: feed it the backlog and deliver its events."""
        self._unflushed = 0
        if self._backlog:
            self._feed_backlog()
        protocol = self._protocol
        if self._write_paused and self.get_write_buffer_size() <= self._low:
            self._write_paused = False
            if protocol is not None:
                protocol.resume_writing()
        conn = self.conn
        closed = conn.state is _CLOSED
        take = self._take_messages
        while protocol is not None and (closed or not self._reading_paused):
            event = conn.next_data() if take is None else conn.next_batch(RECV_BYTES)
            if event is None:
                break
            if type(event) is list:
                take(event, sum(map(len, event)))  # type: ignore[misc]
            elif type(event) is bytes:
                protocol.data_received(event)
            elif type(event) is MessageReceived:
                protocol.data_received(event.data)
            else:
                self._on_event(event, protocol)
        if conn.state is _CLOSED and not self.lost:
            connected = self.connected
            if connected is not None and not connected.done():
                self._fail_connect()
            elif protocol is not None:
                self.lost = True
                protocol.connection_lost(self._error)
            elif connected is None:  # a server's connection closed before it was served
                self.lost = True

    def _on_event(self, event: object, protocol: _StreamSink) -> None:
        if isinstance(event, ConnectionClosed):
            if not event.by_peer:
                return
            if event.code == _NORMAL:
                protocol.eof_received()
            else:
                reason = event.reason or f"code {event.code}"
                self._error = BrokenResourceError(f"closed by the peer: {reason}")
        elif isinstance(event, Connected):
            return
        else:  # ConnectionTimedOut
            what = getattr(event, "reason", "idle")
            self._error = PeerTimedOut(f"the peer fell silent ({what} timeout)")

    def peer_gone(self, exc: Exception) -> None:
        """The peer's port is closed: abort, reporting ``BrokenResourceError``."""
        error = BrokenResourceError(f"the peer's port is closed: {exc}")
        error.__cause__ = exc
        self._error = error
        self.conn.abort()
        self._endpoint.mark(self.conn)

    def handshake_done(self) -> None:
        """A client's ``Connected`` event: the connection is up."""
        if self.connected is not None and not self.connected.done():
            self.connected.set_result(None)

    def _fail_connect(self, exc: Exception | None = None) -> None:
        if exc is None:
            event = self.conn.next_event()
            if isinstance(event, ConnectionClosed):
                reason = event.reason or f"code {event.code}"
                exc = ConnectionRefusedError(f"connection refused by the server: {reason}")
            else:
                exc = PeerTimedOut("no answer from the server (handshake timeout)")
        self.lost = True
        assert self.connected is not None
        self.connected.set_exception(exc)


class ReliableEndpoint:
    """One reliable-UDP socket: its reader, the cores, the timer (see the module's docstring).

    Args:
        config: the connections' knobs.
        on_accept: a server's callback for each new connection's transport (it sets the
            transport's protocol); None for a client endpoint.
        max_sessions, max_sessions_per_host: a server core's caps.
        handshake_rate: datagrams for no connection a source may send per second.
        server_handshake_rate: datagrams for no connection all sources together may send
            per second.
    """

    def __init__(
        self,
        config: ReliableConfig,
        *,
        on_accept: Callable[[ReliableTransport], None] | None = None,
        max_sessions: int = 10_000,
        max_sessions_per_host: int = 64,
        handshake_rate: float = HANDSHAKE_RATE,
        server_handshake_rate: float = SERVER_HANDSHAKE_RATE,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._clock = _clock_of(self._loop)
        self.config = config
        self._on_accept = on_accept
        self.core: ReliableServerCore | None = None
        if on_accept is not None:
            self.core = ReliableServerCore(
                os.urandom(_KEY_SIZE),
                config=config,
                max_sessions=max_sessions,
                max_sessions_per_host=max_sessions_per_host,
            )
        self._transports: dict[ReliableConnection, ReliableTransport] = {}
        self._dirty: dict[ReliableConnection, None] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.send_dropped = 0  # datagrams the socket's buffer refused (the core resends)
        self._rate = handshake_rate
        self._sources: dict[Any, TokenBucket] = {}
        self._all_sources = TokenBucket(
            server_handshake_rate, server_handshake_rate, self._clock()
        )
        self.accepting = True
        self._sock: socket.socket | None = None
        self._whole = False  # the socket forbids IP fragmentation
        # one read buffer per endpoint: ``recvfrom(65527)`` would allocate that much per
        # datagram and shrink it, which spreads small datagrams kept for a while over the
        # heap (measured: 3,000 held 100-byte datagrams cost 1.8 MiB of RSS that way, 0.5
        # with one buffer and a copy of what was read). Large datagrams (after one of at
        # least ``LARGE_DATAGRAM`` bytes, until a smaller one) are read into their own
        # bytes instead, which saves copying each once more.
        self._buffer = bytearray(config.max_datagram)
        self._view = memoryview(self._buffer)
        self._large = False
        self._peer: Any = None  # a client's server, or None on a server
        self.sockname: Any = None
        self.totals = ReliableTotals()
        self._closed: asyncio.Future[None] = self._loop.create_future()

    # -- the socket ---------------------------------------------------------------------------

    def open(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (a non-blocking UDP socket, connected on a client): the
        endpoint owns it from now on and closes it in ``close()``."""
        load_checksum()
        self._sock = sock
        self.sockname = sock.getsockname()
        self._whole = forbid_fragmentation(sock)
        with contextlib.suppress(OSError):
            self._peer = sock.getpeername()
        ask_socket_buffers(sock, SOCKET_BUFFER)
        report_short_buffer(sock)
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        """Read up to ``RECV_BATCH`` datagrams: asyncio's datagram transport reads one per
        wake-up, which made a loop iteration per datagram the cost of a bulk transfer."""
        sock = self._sock
        if sock is None:
            return
        receive = self._received
        buffer, view = self._buffer, self._view
        largest = self.config.max_datagram
        budget = RECV_BYTES
        now = self._clock()  # one clock reading per wake-up
        for _ in range(RECV_BATCH):
            try:
                if self._large:
                    data, addr = sock.recvfrom(largest)
                    size = len(data)
                else:
                    size, addr = sock.recvfrom_into(buffer)
                    data = bytes(view[:size])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error (a client's peer port is closed)
                self.error_received(exc)
                return
            self._large = size >= LARGE_DATAGRAM
            receive(data, addr, now)
            budget -= size
            if budget <= 0:
                return

    def _send(self, datagram: bytes, addr: Any, conn: ReliableConnection | None = None) -> None:
        sock = self._sock
        if sock is None:
            return
        try:
            if addr is None:
                sock.send(datagram)
            else:
                sock.sendto(datagram, addr)
        except (BlockingIOError, InterruptedError):
            self.send_dropped += 1  # as if the network lost it: the core resends
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                self.error_received(exc)
            elif len(datagram) <= BASE_DATAGRAM:
                self._narrow_interface()  # the datagram is lost: the core resends it
            elif conn is not None:
                conn.datagram_too_large(datagram, self._clock())  # a probe, or narrower
                self.mark(conn)

    def _narrow_interface(self) -> None:
        """The interface cannot carry even a base-size datagram whole (an MTU below 1,228
        bytes): let the host fragment again, and keep every connection at the base size."""
        if not self._whole or self._sock is None:
            return
        self._whole = False
        allow_fragmentation(self._sock)
        for conn in self._transports:
            conn.limit_datagram(BASE_DATAGRAM)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Take one datagram from ``addr``."""
        self._received(data, addr, self._clock())

    def _received(self, data: bytes, addr: Any, now: float) -> None:
        core = self.core
        if core is None:
            client = next(iter(self._transports), None)
            if client is None:
                return
            client.datagram_received(data, now)
            conn = client
        else:
            if data[2:6] == _NO_CID and not self._handshake_allowed(addr, now):
                return
            found = core.datagram_received(data, addr, now)
            if found is None:  # perhaps a stateless reply (a cookie) to send
                self._want_flush()
                return
            conn = found
        transport = self._transports.get(conn)
        if transport is not None:
            connected = transport.connected
            if connected is None or connected.done():
                # its messages go up now, before the flush is scheduled: a handler woken by
                # them runs first, so the flush sends its reply with the acknowledgement
                transport.pumped()
        self._dirty[conn] = None
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def _handshake_allowed(self, addr: Any, now: float) -> bool:
        """R13: a server-wide and a per-source rate limit on datagrams for no connection,
        in front of the core (so a flood of forged HELLOs costs neither HMACs nor replies).
        The server-wide one is only looked at first and taken last: a source refused by
        its own limit takes nothing from the others'."""
        if not self.accepting:
            return False
        everyone = self._all_sources
        if everyone.tokens(now) >= 1:
            bucket = self._sources.get(addr)
            if bucket is None:
                if len(self._sources) >= MAX_RATE_SOURCES:
                    self._sources.clear()
                bucket = self._sources[addr] = TokenBucket(self._rate, self._rate, now)
            if bucket.try_take(1, now):
                everyone.try_take(1, now)
                return True
        self.totals.rate_limited += 1
        return False

    def error_received(self, exc: Exception) -> None:
        """An ICMP error on a client's connected socket: a refused port ends the handshake
        at once, and an established connection too (the server is gone: a crash or a
        restart), as a reset does over TCP, instead of after the idle timeout."""
        if self.core is not None:
            return
        for transport in list(self._transports.values()):
            connected = transport.connected
            if connected is not None and not connected.done():
                transport.conn.abort()
                transport._fail_connect(exc)
            elif (
                isinstance(exc, ConnectionRefusedError)
                and transport.conn.state is ConnectionState.ESTABLISHED
            ):
                transport.peer_gone(exc)

    def _socket_closed(self) -> None:
        self._cancel_timers()
        for transport in list(self._transports.values()):
            if not transport.lost:
                transport.conn.abort()
                transport.pumped()
        self._transports.clear()
        if not self._closed.done():
            self._closed.set_result(None)

    # -- connections ----------------------------------------------------------------------------

    def connect(self, peer: Any) -> ReliableTransport:
        """A client endpoint's one connection; its HELLO goes at the next flush."""
        conn = ReliableConnection.connect(secrets.randbits(32) or 1, self._clock(), self.config)
        transport = ReliableTransport(self, conn, peer)
        transport.connected = self._loop.create_future()
        self._transports[conn] = transport
        self._limit_datagram(conn, peer)
        self.mark(conn)
        return transport

    def _limit_datagram(self, conn: ReliableConnection, peer: Any) -> None:
        """Tell ``conn`` what the local route to ``peer`` lets out (or the base size, where
        the socket cannot forbid fragmentation)."""
        if self.config.max_datagram <= BASE_DATAGRAM:
            return
        if not self._whole:
            conn.limit_datagram(BASE_DATAGRAM)
            return
        limit = route_payload_limit(peer)
        if limit is not None:
            conn.limit_datagram(limit)

    def mark(self, conn: ReliableConnection) -> None:
        """``conn`` has something to send or deliver: pump it at the end of this iteration."""
        self._dirty[conn] = None
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def _want_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def send_now(self, conn: ReliableConnection) -> None:
        """Send what ``conn`` has at once (an abort's CLOSE)."""
        addr = conn.peer_address if self.core is not None else None
        for datagram in conn.datagrams_to_send(self._clock()):
            self._send(datagram, addr, conn)

    def send_burst(self, conn: ReliableConnection) -> None:
        """Send one burst of ``conn``'s datagrams now, without waiting for the flush: a
        writer that queued a burst's worth within one iteration. The flush that ``mark``
        scheduled does the rest (events, timers, further bursts)."""
        if self._sock is None:
            return
        burst = _burst(conn.datagram_size)
        addr = conn.peer_address if self.core is not None else None
        for datagram in conn.datagrams_to_send(self._clock(), burst):
            self._send(datagram, addr, conn)

    def flush(self) -> None:
        """Pump every marked connection, send the core's replies, re-arm the timer."""
        self._flush_handle = None
        now = self._clock()
        core = self.core
        if core is not None:
            for conn in core.accepted():
                self._accept(conn)
        dirty, self._dirty = self._dirty, {}
        for conn in dirty:
            self._pump(conn, now)
        if core is not None:
            for datagram, addr in core.datagrams_to_send():
                self._send(datagram, addr)
        self._arm()

    def _accept(self, conn: ReliableConnection) -> None:
        transport = self._transports[conn] = ReliableTransport(self, conn, conn.peer_address)
        self._limit_datagram(conn, conn.peer_address)
        if not self.accepting:
            transport.abort()
            return
        self._on_accept(transport)  # type: ignore[misc]
        self._dirty[conn] = None

    def _pump(self, conn: ReliableConnection, now: float) -> None:
        transport = self._transports.get(conn)
        connected = None if transport is None else transport.connected
        if (
            connected is not None
            and not connected.done()
            and conn.state is ConnectionState.ESTABLISHED
        ):
            conn.next_event()  # the first event of a client: Connected
            transport.handshake_done()  # type: ignore[union-attr]
        if transport is not None:
            transport.pumped()
        if self._sock is not None:
            burst = _burst(conn.datagram_size)
            out = conn.datagrams_to_send(now, burst)
            addr = conn.peer_address if self.core is not None else None
            send = self._send
            for datagram in out:
                send(datagram, addr, conn)
            if len(out) >= burst:
                self.mark(conn)
        if transport is not None and conn.state is _CLOSED and not transport.lost:
            transport.pumped()  # an end the sends above found
        if self.core is not None:
            self.core.schedule(conn)
        if conn.state is _CLOSED:
            self._forget(conn)

    def _forget(self, conn: ReliableConnection) -> None:
        transport = self._transports.get(conn)
        if transport is not None and transport.lost:  # else its protocol is still to come
            del self._transports[conn]
            self.totals.add(conn.statistics())

    def _arm(self) -> None:
        if self.core is not None:
            deadline = self.core.next_deadline()
        elif len(self._transports) == 1:  # a client: its one connection
            deadline = next(iter(self._transports)).next_deadline()
        else:
            deadline = min(
                (d for c in self._transports if (d := c.next_deadline()) is not None),
                default=None,
            )
        if deadline is None:
            return
        timer = self._timer
        if timer is not None:
            if 0 <= deadline - self._timer_at < TIMER_SLACK:
                return  # it fires a little early, finds nothing due and re-arms
            timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = max(self._clock(), self._timer_at)  # a timer may fire a little early
        if self.core is not None:
            for conn in self.core.handle_timer(now):
                self._dirty[conn] = None
        else:
            for conn in self._transports:
                conn.handle_timer(now)
                self._dirty[conn] = None
        self.flush()

    # -- statistics and closing -------------------------------------------------------------

    def connections(self) -> list[ReliableConnection]:
        """The connections now."""
        return list(self._transports)

    def _cancel_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None

    def close(self) -> None:
        """Send what is pending and close the socket (connections left are aborted)."""
        if self._flush_handle is not None:
            self.flush()
        for transport in list(self._transports.values()):
            if not transport.lost:
                transport.abort()
        sock, self._sock = self._sock, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._socket_closed()

    async def wait_closed(self) -> None:
        """Wait until the socket is closed."""
        await asyncio.shield(self._closed)
