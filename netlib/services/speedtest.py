"""The speed test service: both ends of a test, over the streams and datagrams netlib opens.

Theory of operation
-------------------
A test runs on a TCP **control connection** and the **streams** it attaches (the wire
formats and the rules are ``netlib.sansio.speedtest``'s):

* ``SpeedtestService`` is the server. ``handle_tcp`` serves every TCP connection: a first
  line starting with ``{`` makes it a control connection, a ``STREAM_HELLO`` a TCP stream of
  a test; ``handle_rudp`` serves reliable-UDP connections (streams only); ``consume`` takes
  the datagrams of the UDP socket (hellos, confirms, data, probes). A test is registered
  under a random cookie when accepted and forgotten when its control connection's handler
  ends, whatever the reason; a stream or datagram naming no registered test is dropped and
  counted.
* ``run_test`` is the client: it sends the request, attaches the streams (opened by the
  functions the public floor passes in), sends or receives for the duration while it
  probes the round trip on the same protocol every ``PROBE_INTERVAL``, and puts the
  sender's and the receiver's totals together into a ``SpeedtestResult``.
* The receiver measures: bytes and messages from the test's start (``ready``) to the last
  arrival, and for UDP the loss against the sender's count, ordering and jitter. A TCP or
  reliable-UDP receiver is done at each stream's end; a UDP receiver once every datagram
  the sender counted has arrived, or after ``end_grace`` of the slowest probe's round trip.
* Time is ``time.monotonic()``, not ``loop.time()``: uvloop's loop clock advances once per
  loop iteration in whole milliseconds, too coarse for a loopback round trip or jitter.

Everything is bounded: tests at once (``SpeedtestLimits``), streams per test, a test's
duration and rate, each control line, each phase's wait (``CONTROL_TIMEOUT``,
``ATTACH_TIMEOUT``, ``END_TIMEOUT``), the latency samples, and a receiver's memory of
sequence numbers (``REORDER_WINDOW`` bits).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from netlib.aio.datagram import DatagramEndpointProtocol, address_key
from netlib.aio.sockets import format_address
from netlib.errors import BrokenResourceError, NetlibError, ProtocolError, RequestRefused
from netlib.sansio.framing import LineFraming
from netlib.sansio.speedtest import (
    ATTACH_TIMEOUT,
    CONTROL_LINE_LIMIT,
    CONTROL_TIMEOUT,
    COOKIE_SIZE,
    DATAGRAM,
    DATAGRAM_MAGIC,
    END_TIMEOUT,
    HANDSHAKE_RETRY,
    KIND_CHALLENGE,
    KIND_CONFIRM,
    KIND_DATA,
    KIND_HELLO,
    KIND_PROBE,
    MAX_END_GRACE,
    MIN_END_GRACE,
    PROBE,
    PROBE_INTERVAL,
    PROBE_STREAM,
    ROLE_DATA,
    ROLE_PROBE,
    STREAM_HELLO,
    DatagramCounts,
    LatencySamples,
    Pacer,
    ReceiverStats,
    SpeedtestLimits,
    SpeedtestRequest,
    SpeedtestResult,
    Tally,
    TransferTotals,
    decode_control,
    encode_control,
    end_grace,
    format_bitrate,
    pack_datagram,
    pack_stream_hello,
    unpack_stream_hello,
)
from netlib.streams import MessageStream

__all__ = [
    "DatagramOpener",
    "SpeedtestService",
    "SpeedtestServiceStatistics",
    "StreamOpener",
    "run_test",
]

logger = logging.getLogger("netlib.services.speedtest")

_now = time.monotonic
YIELD_EVERY: Final = 32
"""Messages a sender sends between two turns it gives the event loop (a send that never has
to wait would otherwise starve the probes and everything else on the loop)."""
PACING_BURST: Final = 0.005
"""Seconds of sending a paced sender may catch up at once after a late wake-up (loop
timers have millisecond resolution)."""

StreamOpener: TypeAlias = Callable[[str, int], AbstractAsyncContextManager[MessageStream]]
"""Opens a stream of a test: ``(protocol, port)`` with protocol ``"tcp"`` (port 0: the
control connection's) or ``"rudp"``."""
DatagramOpener: TypeAlias = Callable[
    [int, Callable[[bytes, Any], bool], Callable[[Exception], None]],
    AbstractAsyncContextManager[DatagramEndpointProtocol],
]
"""Opens a UDP socket connected to ``port`` whose datagrams go to the given consumer, and
the errors the kernel reports (an unreachable port) to the last callable."""


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Lines:
    """JSON lines on a raw ``MessageStream``: the control connection."""

    def __init__(self, stream: MessageStream, first: bytes = b"") -> None:
        self._stream = stream
        self._decoder = LineFraming(CONTROL_LINE_LIMIT).decoder()
        self._lines: deque[bytes] = deque()
        self._first = first  # bytes read before the connection was known to be control

    async def receive(self, within: float | None) -> dict[str, Any]:
        """The next message.

        Raises:
            TimeoutError: none within ``within`` seconds.
            ProtocolError: the line is too long or not a control message.
            EndOfStream, BrokenResourceError: the connection ended.
        """
        if self._first:
            first, self._first = self._first, b""
            self._lines.extend(self._decoder.feed(first))
        async with asyncio.timeout(within):
            while not self._lines:
                self._lines.extend(self._decoder.feed(await self._stream.receive()))
        try:
            return decode_control(self._lines.popleft())
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None

    async def send(self, op: str, **fields: Any) -> None:
        await self._stream.send(encode_control(op, **fields))


async def _expect(lines: _Lines, op: str, within: float) -> dict[str, Any]:
    """The next control message, which must be ``op`` (a ``refused`` is raised)."""
    message = await lines.receive(within)
    if message["op"] == "refused":
        status, reason = message.get("status"), message.get("error")
        raise RequestRefused(
            status if isinstance(status, int) else 500,
            reason if isinstance(reason, str) else "refused",
        )
    if message["op"] != op:
        raise ProtocolError(f"expected {op!r} from the peer, got {message['op']!r}")
    return message


# -- what both ends do on a stream ------------------------------------------------------------


async def _send_messages(
    stream: MessageStream, request: SpeedtestRequest, tally: Tally, start: float
) -> None:
    """Send messages of the test's size from ``start`` for its duration, paced if asked."""
    message = bytes(request.size)
    size = request.size
    deadline = start + request.duration
    pacer = Pacer(request.bitrate, start, PACING_BURST) if request.bitrate else None
    turn = 0
    while (now := _now()) < deadline:
        if pacer is not None:
            wait = pacer.delay(now)
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            pacer.sent(size, now)
        await stream.send(message)
        tally.add(size, now)
        turn += 1
        if turn == YIELD_EVERY:
            turn = 0
            await asyncio.sleep(0)
    tally.stop(_now())


async def _receive_messages(stream: MessageStream, tally: Tally, first: bytes, size: int) -> None:
    """Count what arrives until the stream ends. TCP (``size`` > 0) counts messages of
    ``size`` bytes in the byte stream, without copying it (``discard``); reliable UDP
    (``size`` 0) counts its messages."""
    add = tally.add
    if first:
        add(len(first), _now(), 0 if size else 1)
    if size:
        await stream.discard(lambda nbytes: add(nbytes, _now(), 0))
        tally.messages = tally.bytes // size
        return
    async for message in stream:
        add(len(message), _now())


async def _send_datagrams(
    endpoint: DatagramEndpointProtocol,
    addr: Any,
    request: SpeedtestRequest,
    test: tuple[bytes, int],
    tally: Tally,
    start: float,
) -> None:
    """Send the numbered datagrams of stream ``test[1]`` (cookie ``test[0]``), paced."""
    cookie, index = test
    size = request.size
    deadline = start + request.duration
    pacer = Pacer(request.bitrate, start, PACING_BURST)
    seq = turn = 0
    while (now := _now()) < deadline:
        wait = pacer.delay(now)
        if wait > 0:
            await asyncio.sleep(wait)
            continue
        if endpoint.write_paused:
            await endpoint.drain()
            continue
        endpoint.sendto(pack_datagram(KIND_DATA, index, cookie, seq, now, size), addr)
        pacer.sent(size, now)
        tally.add(size, now)
        seq += 1
        turn += 1
        if turn == YIELD_EVERY:
            turn = 0
            await asyncio.sleep(0)
    tally.stop(_now())
    if endpoint.lost:
        raise BrokenResourceError("the UDP socket closed during the test")


def _received(receivers: list[ReceiverStats], start: float) -> TransferTotals:
    firsts = [r.first_arrival for r in receivers if r.first_arrival is not None]
    if not firsts:
        return TransferTotals()
    return TransferTotals(
        seconds=max(r.last_arrival for r in receivers) - min(start, *firsts),
        bytes=sum(r.bytes for r in receivers),
        messages=sum(r.received for r in receivers),
    )


def _grace(message: dict[str, Any]) -> float:
    grace = message.get("grace")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)):
        return MAX_END_GRACE
    return min(MAX_END_GRACE, max(MIN_END_GRACE, float(grace)))


# -- the server -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeedtestServiceStatistics:
    """Counters of a speed-test server since it started (a snapshot).

    Attributes:
        tests: tests accepted.
        completed: tests that ran to their end.
        refused: tests refused (outside the limits, busy, malformed, streams not attached).
        failed: accepted tests that ended early (a lost connection, a timeout).
        active: tests running now.
        bytes_received, bytes_sent: test data, every protocol together.
        streams_refused: streams and datagram handshakes naming no test, or not fitting it.
        datagrams_dropped: datagrams that were malformed or named no test.
    """

    tests: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    active: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    streams_refused: int = 0
    datagrams_dropped: int = 0


class _ServerTest:
    """One accepted test: its streams, counts and phases."""

    def __init__(self, request: SpeedtestRequest, cookie: bytes) -> None:
        n = request.parallel
        self.request = request
        self.cookie = cookie
        self.streams: list[MessageStream | None] = [None] * (n + 1)  # the probe last
        self.tallies = [Tally() for _ in range(n)]
        self.receivers = [ReceiverStats() for _ in range(n)]
        self.addresses: list[Any] = [None] * (n + 1)  # UDP: confirmed, the probe's last
        self.nonces: dict[int, tuple[Any, int]] = {}  # UDP: challenged, not yet confirmed
        self.attached = asyncio.Event()
        self.started = asyncio.Event()
        self.ended = asyncio.Event()  # every data stream ended (received or sent)
        self.arrived = asyncio.Event()  # UDP: every datagram the sender counted arrived
        self.over = False
        self.start = 0.0
        self.received = TransferTotals()  # the receiver's totals, once known
        self.expected: int | None = None
        self._received = 0
        self._missing = n + 1
        self._running = n

    def slot(self, role: int, index: int) -> int | None:
        """The stream slot a hello names, if it fits this test and is free."""
        n = self.request.parallel
        slot = n if role == ROLE_PROBE else index
        if self.over or index >= (1 if role == ROLE_PROBE else n):
            return None
        return slot if self.streams[slot] is None and self.addresses[slot] is None else None

    def attach(self, slot: int) -> None:
        self._missing -= 1
        if self._missing == 0:
            self.attached.set()

    def stream_ended(self) -> None:
        self._running -= 1
        if self._running == 0:
            self.ended.set()

    def record(self, index: int, seq: int, stamp: float, size: int) -> None:
        if index >= self.request.parallel or not self.started.is_set() or self.over:
            return
        stats = self.receivers[index]
        before = stats.received
        stats.record(seq, stamp, _now(), size)
        self._received += stats.received - before
        if self.expected is not None and self._received >= self.expected:
            self.arrived.set()

    def expect(self, count: int) -> None:
        self.expected = count
        if self._received >= count:
            self.arrived.set()

    def moved(self) -> int:
        """Test data bytes this server received (sent, in a reverse test) so far."""
        return sum(t.bytes for t in self.tallies) + sum(r.bytes for r in self.receivers)

    def abort(self) -> None:
        self.over = True
        self.started.set()  # a stream waiting to send finds the test over
        for stream in self.streams:
            if stream is not None:
                stream.abort()


class SpeedtestService:
    """The server side of the speed test, for every protocol.

    Serve ``handle_tcp`` on a TCP server, ``handle_rudp`` on a reliable-UDP server and give
    the UDP socket's protocol to ``attach_udp``; ``ports`` tells clients where the UDP and
    reliable-UDP streams go. ``netlib.open_speedtest_server`` does all of it.

    Args:
        limits: what a test may ask for, and how many run at once.
    """

    def __init__(self, limits: SpeedtestLimits | None = None) -> None:
        self.limits = limits or SpeedtestLimits()
        self.ports: dict[str, int] = {"udp": 0, "rudp": 0}
        self._tests: dict[bytes, _ServerTest] = {}
        self._udp: DatagramEndpointProtocol | None = None
        self._moved = [0, 0]  # bytes received, sent by the tests that ended
        self._counts = dict.fromkeys(
            ("tests", "completed", "refused", "failed", "streams_refused", "datagrams_dropped"),
            0,
        )

    def statistics(self) -> SpeedtestServiceStatistics:
        """Return a snapshot of the counters."""
        moved = list(self._moved)
        for test in self._tests.values():
            moved[test.request.reverse] += test.moved()
        return SpeedtestServiceStatistics(
            active=len(self._tests), bytes_received=moved[0], bytes_sent=moved[1], **self._counts
        )

    def attach_udp(self, endpoint: DatagramEndpointProtocol) -> None:
        """Take the datagrams of ``endpoint``, the server's UDP socket for tests."""
        self._udp = endpoint
        endpoint.consumer = self.consume

    # -- connections ----------------------------------------------------------------------------

    async def handle_tcp(self, stream: MessageStream) -> None:
        """Serve one TCP connection: a control connection, or a stream of a test."""
        first = b""
        while len(first) < STREAM_HELLO.size and not first.startswith(b"{"):
            first += await stream.receive()
        if first.startswith(b"{"):
            await self._control(stream, first)
        else:
            await self._stream(stream, first, "tcp")

    async def handle_rudp(self, stream: MessageStream) -> None:
        """Serve one reliable-UDP connection: a stream of a test."""
        await self._stream(stream, await stream.receive(), "rudp")

    async def _stream(self, stream: MessageStream, first: bytes, protocol: str) -> None:
        hello = unpack_stream_hello(first)
        test = self._tests.get(hello[2]) if hello is not None else None
        slot = test.slot(*hello[:2]) if test is not None and hello is not None else None
        if test is None or slot is None or test.request.protocol != protocol:
            self._counts["streams_refused"] += 1
            return
        test.streams[slot] = stream
        test.attach(slot)
        rest = first[STREAM_HELLO.size :]
        try:
            if slot == test.request.parallel:
                await _echo(stream, rest)
            elif test.request.reverse:
                await self._send_stream(test, slot, stream)
            else:
                size = test.request.size if protocol == "tcp" else 0
                await _receive_messages(stream, test.tallies[slot], rest, size)
                test.stream_ended()
        except (NetlibError, OSError):
            if not test.over:
                logger.debug("a stream of a %s test ended early", protocol, exc_info=True)

    async def _send_stream(self, test: _ServerTest, slot: int, stream: MessageStream) -> None:
        await test.started.wait()
        if not test.over:
            await _send_messages(stream, test.request, test.tallies[slot], test.start)
            test.stream_ended()

    # -- control ----------------------------------------------------------------------------

    async def _control(self, stream: MessageStream, first: bytes) -> None:
        lines = _Lines(stream, first)
        peer = format_address(stream.remote_address or "?")
        try:
            test = self._accept(await lines.receive(CONTROL_TIMEOUT))
        except (_Refused, ProtocolError, TimeoutError) as exc:
            refused = exc if isinstance(exc, _Refused) else _Refused(400, str(exc) or "no request")
            await self._refuse(lines, peer, refused)
            return
        logger.info("%s test from %s: %s", test.request.protocol, peer, _describe(test.request))
        try:
            op, fields = await self._run(test, lines)
        except _Refused as refused:
            self._forget(test)
            await self._refuse(lines, peer, refused)
            return
        except (NetlibError, OSError, TimeoutError) as exc:
            self._counts["failed"] += 1
            logger.info(
                "%s test from %s ended early: %s", test.request.protocol, peer, exc or "timed out"
            )
            return
        finally:
            self._forget(test)  # before the last message: the client may start its next test
        self._counts["completed"] += 1
        received = test.received
        logger.info(
            "%s test from %s done: %s, %.0f messages/s received",
            test.request.protocol,
            peer,
            format_bitrate(round(received.bits_per_second, -3)),
            received.messages_per_second,
        )
        await lines.send(op, **fields)

    async def _refuse(self, lines: _Lines, peer: str, refused: _Refused) -> None:
        self._counts["refused"] += 1
        logger.info("refused a test from %s: %s", peer, refused.reason)
        await lines.send("refused", status=refused.status, error=refused.reason)

    def _accept(self, message: dict[str, Any]) -> _ServerTest:
        if message["op"] != "start":
            raise _Refused(400, f"expected a start request, got {message['op']!r}")
        try:
            request = SpeedtestRequest.from_message(message)
        except ValueError as exc:
            raise _Refused(400, str(exc)) from None
        why = self.limits.refusal(request)
        if why is not None:
            raise _Refused(400, why)
        if len(self._tests) >= self.limits.max_tests:
            raise _Refused(
                503, f"the server is busy: it runs {self.limits.max_tests} test(s) at a time"
            )
        test = _ServerTest(request, secrets.token_bytes(COOKIE_SIZE))
        self._tests[test.cookie] = test
        self._counts["tests"] += 1
        return test

    def _forget(self, test: _ServerTest) -> None:
        if self._tests.pop(test.cookie, None) is None:
            return
        if not test.over:
            test.abort()
        self._moved[test.request.reverse] += test.moved()

    async def _run(self, test: _ServerTest, lines: _Lines) -> tuple[str, dict[str, Any]]:
        """Run an accepted test; return the last message to send, once it is forgotten."""
        request = test.request
        await lines.send(
            "accepted", cookie=test.cookie.hex(), udp_port=self.ports["udp"],
            rudp_port=self.ports["rudp"],
        )  # fmt: skip
        await self._attached(test, lines)
        test.start = _now()
        test.started.set()
        await lines.send("ready")
        if request.reverse:
            last = await self._serve_reverse(test, lines)
        else:
            last = await self._serve_forward(test, lines)
        test.over = True
        return last

    async def _attached(self, test: _ServerTest, lines: _Lines) -> None:
        """Wait for every stream of ``test``, watching the control connection meanwhile: a
        client that leaves (its UDP port unreachable, say) frees the server at once."""
        watch = asyncio.ensure_future(lines.receive(None))
        attached = asyncio.ensure_future(test.attached.wait())
        try:
            await asyncio.wait(
                (watch, attached), timeout=ATTACH_TIMEOUT, return_when="FIRST_COMPLETED"
            )
        finally:
            for task in (watch, attached):
                task.cancel()
            outcome = await asyncio.gather(watch, attached, return_exceptions=True)
        if not test.attached.is_set():
            if watch.done() and not watch.cancelled():
                left = outcome[0]
                raise (
                    left
                    if isinstance(left, Exception)
                    else ProtocolError("the client spoke out of turn while its streams attached")
                )
            raise _Refused(
                408, f"the test's streams did not all reach the server within {ATTACH_TIMEOUT:g} s"
            )

    async def _serve_forward(self, test: _ServerTest, lines: _Lines) -> tuple[str, dict[str, Any]]:
        request = test.request
        done = await _expect(lines, "done", request.duration + END_TIMEOUT)
        try:
            sent = TransferTotals.from_message(done.get("sent"))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if request.protocol == "udp":
            test.expect(sent.messages)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(test.arrived.wait(), _grace(done))
            received = test.received = _received(test.receivers, test.start)
            details = DatagramCounts.of(test.receivers, sent.messages).to_message()
            return "result", {"received": received.to_message(), "datagrams": details}
        await asyncio.wait_for(test.ended.wait(), END_TIMEOUT)
        received = test.received = TransferTotals.of(test.tallies, test.start)
        return "result", {"received": received.to_message()}

    async def _serve_reverse(self, test: _ServerTest, lines: _Lines) -> tuple[str, dict[str, Any]]:
        request = test.request
        senders = []
        if request.protocol == "udp":
            senders = [
                asyncio.create_task(self._send_udp(test, index))
                for index in range(request.parallel)
            ]
        watch = asyncio.ensure_future(lines.receive(None))
        try:
            ended = asyncio.ensure_future(test.ended.wait())
            await asyncio.wait(
                (watch, ended),
                timeout=request.duration + END_TIMEOUT,
                return_when="FIRST_COMPLETED",
            )
            ended.cancel()
            if not test.ended.is_set():
                raise BrokenResourceError("the client left before the end of the test")
            sent = TransferTotals.of(test.tallies, test.start)
            await lines.send("done", sent=sent.to_message())
            message = await asyncio.wait_for(watch, END_TIMEOUT + MAX_END_GRACE)
            if message["op"] != "result":
                raise ProtocolError(f"expected 'result' from the client, got {message['op']!r}")
            with contextlib.suppress(ValueError):  # only logged
                test.received = TransferTotals.from_message(message.get("received"))
            return "bye", {}
        finally:
            watch.cancel()
            for sender in senders:
                sender.cancel()
            await asyncio.gather(watch, *senders, return_exceptions=True)

    async def _send_udp(self, test: _ServerTest, index: int) -> None:
        assert self._udp is not None
        request, tally = test.request, test.tallies[index]
        address = test.addresses[index]
        await _send_datagrams(self._udp, address, request, (test.cookie, index), tally, test.start)
        test.stream_ended()

    # -- datagrams --------------------------------------------------------------------------

    def consume(self, data: bytes, addr: Any) -> bool:
        """Take one datagram of the server's UDP socket (every one is taken)."""
        if len(data) < DATAGRAM.size:
            self._counts["datagrams_dropped"] += 1
            return True
        magic, kind, index, cookie, seq, stamp = DATAGRAM.unpack_from(data)
        test = self._tests.get(cookie)
        if magic != DATAGRAM_MAGIC or test is None or test.request.protocol != "udp":
            self._counts["datagrams_dropped"] += 1
        elif kind == KIND_DATA:
            test.record(index, seq, stamp, len(data))
        elif kind == KIND_PROBE:
            if address_key(addr) == test.addresses[-1] and self._udp is not None:
                self._udp.sendto(data, addr)  # the same bytes, to a confirmed address
        elif kind == KIND_HELLO:
            self._hello(test, index, addr)
        elif kind == KIND_CONFIRM:
            self._confirm(test, index, addr, seq)
        else:
            self._counts["datagrams_dropped"] += 1
        return True

    def _hello(self, test: _ServerTest, index: int, addr: Any) -> None:
        slot = test.slot(ROLE_PROBE, 0) if index == PROBE_STREAM else test.slot(ROLE_DATA, index)
        if slot is None or self._udp is None:
            self._counts["streams_refused"] += 1
            return
        key = address_key(addr)
        pending = test.nonces.get(slot)
        nonce = pending[1] if pending is not None and pending[0] == key else secrets.randbits(64)
        test.nonces[slot] = (key, nonce)
        # no larger than the hello (which is at least a header): no amplification
        self._udp.sendto(pack_datagram(KIND_CHALLENGE, index, test.cookie, nonce, 0.0), addr)

    def _confirm(self, test: _ServerTest, index: int, addr: Any, nonce: int) -> None:
        slot = test.request.parallel if index == PROBE_STREAM else index
        if index == test.request.parallel or test.nonces.get(slot) != (address_key(addr), nonce):
            return  # a repeat after the address was confirmed, or a forgery
        del test.nonces[slot]
        test.addresses[slot] = address_key(addr)
        test.attach(slot)


def _describe(request: SpeedtestRequest) -> str:
    streams = f"{request.parallel} stream{'s' if request.parallel > 1 else ''}"
    paced = f", paced to {format_bitrate(request.bitrate)}" if request.bitrate else ""
    sender = "server" if request.reverse else "client"
    return (
        f"{streams} of {request.size}-byte messages for {request.duration:g} s{paced}, "
        f"{sender} sending"
    )


async def _echo(stream: MessageStream, first: bytes) -> None:
    """Echo the latency probes until the client closes the stream."""
    if first:
        await stream.send(first)
    async for chunk in stream:
        await stream.send(chunk)


# -- the client -------------------------------------------------------------------------------


class _ClientTest:
    """The client's side of one test, from the server's ``accepted`` to the result."""

    def __init__(self, request: SpeedtestRequest, cookie: bytes, port: int) -> None:
        n = request.parallel
        self.request = request
        self.cookie = cookie
        self.port = port
        self.tallies = [Tally() for _ in range(n)]
        self.receivers = [ReceiverStats() for _ in range(n)]
        self.latency = LatencySamples()
        self.challenges: dict[int, int] = {}
        self.endpoint: DatagramEndpointProtocol | None = None
        self.streams: list[MessageStream] = []  # TCP, reliable UDP: the data, then the probe
        self.error: Exception | None = None
        self.start = 0.0
        self.arrived = asyncio.Event()
        self.expected: int | None = None
        self._received = 0
        self._slowest = 0.0

    def sample(self, stamp: float) -> None:
        rtt = _now() - stamp
        self.latency.add(rtt)
        self._slowest = max(self._slowest, rtt)

    def grace(self) -> float:
        return end_grace(self._slowest if len(self.latency) else None)

    # -- datagrams --------------------------------------------------------------------------

    def consume(self, data: bytes, _addr: Any) -> bool:
        if len(data) < DATAGRAM.size:
            return True
        magic, kind, index, cookie, seq, stamp = DATAGRAM.unpack_from(data)
        if magic != DATAGRAM_MAGIC or cookie != self.cookie:
            return True
        if kind == KIND_DATA and index < self.request.parallel:
            stats = self.receivers[index]
            before = stats.received
            stats.record(seq, stamp, _now(), len(data))
            self._received += stats.received - before
            if self.expected is not None and self._received >= self.expected:
                self.arrived.set()
        elif kind == KIND_PROBE:
            self.sample(stamp)
        elif kind == KIND_CHALLENGE and self.endpoint is not None:
            self.challenges[index] = seq
            self.endpoint.sendto(pack_datagram(KIND_CONFIRM, index, self.cookie, seq, 0.0))
        return True

    def on_error(self, exc: Exception) -> None:
        self.error = exc

    async def handshake(self) -> None:
        """Repeat each UDP stream's hello (or confirm) until cancelled (the test is ready)."""
        assert self.endpoint is not None
        indexes = [*range(self.request.parallel), PROBE_STREAM]
        while True:
            if isinstance(self.error, ConnectionRefusedError):
                raise ConnectionRefusedError(f"nothing answers on udp port {self.port}")
            for index in indexes:
                nonce = self.challenges.get(index)
                kind = KIND_HELLO if nonce is None else KIND_CONFIRM
                self.endpoint.sendto(pack_datagram(kind, index, self.cookie, nonce or 0, 0.0))
            await asyncio.sleep(HANDSHAKE_RETRY)

    # -- probes -----------------------------------------------------------------------------

    async def probe_datagrams(self) -> None:
        assert self.endpoint is not None
        seq = 0
        while True:
            self.endpoint.sendto(pack_datagram(KIND_PROBE, PROBE_STREAM, self.cookie, seq, _now()))
            self.latency.sent = seq = seq + 1
            await asyncio.sleep(PROBE_INTERVAL)

    async def probe_stream(self, stream: MessageStream) -> None:
        reading = asyncio.create_task(self._probe_replies(stream))
        try:
            seq = 0
            while not reading.done():
                await stream.send(PROBE.pack(seq, _now()))
                self.latency.sent = seq = seq + 1
                await asyncio.sleep(PROBE_INTERVAL)
            await reading  # the stream failed: say why
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)

    async def _probe_replies(self, stream: MessageStream) -> None:
        pending = b""
        async for chunk in stream:
            pending += chunk
            whole = len(pending) - len(pending) % PROBE.size
            for _seq, stamp in PROBE.iter_unpack(pending[:whole]):
                self.sample(stamp)
            pending = pending[whole:]


async def run_test(
    control: MessageStream,
    request: SpeedtestRequest,
    open_stream: StreamOpener,
    open_datagrams: DatagramOpener,
    *,
    ports: dict[str, int | None] | None = None,
) -> SpeedtestResult:
    """Run one test with the server at the other end of ``control`` (a raw TCP stream).

    Args:
        control: a new connection to the server's TCP port.
        request: what to measure.
        open_stream: opens a TCP or reliable-UDP stream to a port of the server.
        open_datagrams: opens a UDP socket connected to a port of the server.
        ports: ``{"udp": port, "rudp": port}`` to use instead of the ports the server
            announces (a proxy in front of them); None values keep the server's.

    Raises:
        RequestRefused: the server refused the test (its status and reason).
        ProtocolError: the server broke the protocol.
        TimeoutError: a phase did not end in time.
        OSError, BrokenResourceError: a connection failed.
    """
    lines = _Lines(control)
    await lines.send("start", **request.to_message())
    accepted = await _expect(lines, "accepted", CONTROL_TIMEOUT)
    cookie, port = _cookie_and_port(accepted, request.protocol, ports or {})
    test = _ClientTest(request, cookie, port)
    async with AsyncExitStack() as stack:
        if request.protocol == "udp":
            probe = await _attach_datagrams(test, lines, stack, open_datagrams, port)
        else:
            probe = await _attach_streams(test, lines, stack, open_stream, port)
        probing = asyncio.create_task(probe)
        try:
            result = await _measure(test, lines)
        finally:
            probing.cancel()
            await asyncio.gather(probing, return_exceptions=True)
        return result


def _cookie_and_port(
    accepted: dict[str, Any], protocol: str, ports: dict[str, int | None]
) -> tuple[bytes, int]:
    try:
        cookie = bytes.fromhex(accepted["cookie"])
    except (KeyError, TypeError, ValueError):
        cookie = b""
    announced = 0 if protocol == "tcp" else accepted.get(f"{protocol}_port")
    port = ports.get(protocol) or announced
    if len(cookie) != COOKIE_SIZE or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ProtocolError("the server's acceptance is malformed")
    return cookie, port


async def _attach_streams(
    test: _ClientTest,
    lines: _Lines,
    stack: AsyncExitStack,
    open_stream: StreamOpener,
    port: int,
) -> Coroutine[Any, Any, None]:
    request = test.request
    streams = test.streams
    for index in range(request.parallel + 1):
        stream = await stack.enter_async_context(open_stream(request.protocol, port))
        role, number = (ROLE_PROBE, 0) if index == request.parallel else (ROLE_DATA, index)
        await stream.send(pack_stream_hello(role, number, test.cookie))
        streams.append(stream)
    await _expect(lines, "ready", ATTACH_TIMEOUT + CONTROL_TIMEOUT)
    test.start = _now()
    return test.probe_stream(streams[-1])


async def _attach_datagrams(
    test: _ClientTest,
    lines: _Lines,
    stack: AsyncExitStack,
    open_datagrams: DatagramOpener,
    port: int,
) -> Coroutine[Any, Any, None]:
    test.endpoint = await stack.enter_async_context(
        open_datagrams(port, test.consume, test.on_error)
    )
    handshake = asyncio.create_task(test.handshake())
    ready = asyncio.ensure_future(_expect(lines, "ready", ATTACH_TIMEOUT + CONTROL_TIMEOUT))
    try:
        await asyncio.wait((handshake, ready), return_when="FIRST_COMPLETED")
        if handshake.done():
            await handshake  # raises what stopped it
        await ready
    finally:
        for task in (handshake, ready):
            task.cancel()
        await asyncio.gather(handshake, ready, return_exceptions=True)
    test.start = _now()
    return test.probe_datagrams()


async def _measure(test: _ClientTest, lines: _Lines) -> SpeedtestResult:
    request = test.request
    if request.reverse:
        sent = await _receive_all(test, lines)
        received = (
            _received(test.receivers, test.start)
            if request.protocol == "udp"
            else TransferTotals.of(test.tallies, test.start)
        )
        details = (
            DatagramCounts.of(test.receivers, sent.messages) if request.protocol == "udp" else None
        )
        extra = {} if details is None else {"datagrams": details.to_message()}
        await lines.send("result", received=received.to_message(), **extra)
        await _expect(lines, "bye", CONTROL_TIMEOUT)
        return SpeedtestResult(
            request, sent, received.spanning(sent.seconds), test.latency.summary(), details
        )
    sent = await _send_all(test)
    done = {"sent": sent.to_message(), "grace": test.grace()}
    await lines.send("done", **done)
    reply = await _expect(lines, "result", END_TIMEOUT + MAX_END_GRACE)
    try:
        received = TransferTotals.from_message(reply.get("received"))
        details = (
            DatagramCounts.from_message(reply.get("datagrams"), sent.messages, received.messages)
            if request.protocol == "udp"
            else None
        )
    except ValueError as exc:
        raise ProtocolError(f"the server's result is malformed: {exc}") from None
    return SpeedtestResult(
        request, sent, received.spanning(sent.seconds), test.latency.summary(), details
    )


async def _all(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``coroutines`` together; the first error cancels the others (and is raised as
    it is, not in an exception group), and none is left running."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _send_all(test: _ClientTest) -> TransferTotals:
    request = test.request
    if request.protocol == "udp":
        assert test.endpoint is not None
        endpoint = test.endpoint
        await _all(
            [
                _send_datagrams(endpoint, None, request, (test.cookie, i), tally, test.start)
                for i, tally in enumerate(test.tallies)
            ]
        )
        return TransferTotals.of(test.tallies, test.start)
    streams = test.streams[:-1]
    await _all(
        [
            _send_messages(stream, request, tally, test.start)
            for stream, tally in zip(streams, test.tallies, strict=True)
        ]
    )
    await _all([stream.aclose() for stream in streams])  # flushed, then EOF
    return TransferTotals.of(test.tallies, test.start)


async def _receive_all(test: _ClientTest, lines: _Lines) -> TransferTotals:
    """Receive until the server is done and everything it sent arrived; its totals."""
    request = test.request
    readers: list[asyncio.Task[None]] = []
    if request.protocol != "udp":
        size = request.size if request.protocol == "tcp" else 0
        readers = [
            asyncio.create_task(_receive_messages(stream, tally, b"", size))
            for stream, tally in zip(test.streams[:-1], test.tallies, strict=True)
        ]
    try:
        done = await _expect(lines, "done", request.duration + END_TIMEOUT)
        try:
            sent = TransferTotals.from_message(done.get("sent"))
        except ValueError as exc:
            raise ProtocolError(f"the server's totals are malformed: {exc}") from None
        if readers:
            await asyncio.wait_for(asyncio.gather(*readers), END_TIMEOUT)
        else:
            test.expected = sent.messages
            if test._received >= sent.messages:
                test.arrived.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(test.arrived.wait(), test.grace())
        return sent
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
