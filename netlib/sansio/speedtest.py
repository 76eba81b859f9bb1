"""The speed test's pure rules: requests and limits, the wire formats, and the arithmetic.

Rules of this module:

* No clock is read here: every call takes ``now`` or timestamps (float seconds).
* A test is negotiated on a TCP **control connection** of JSON lines (``encode_control``,
  ``decode_control``; at most ``CONTROL_LINE_LIMIT`` bytes a line), as iperf3 negotiates
  its tests: the client sends ``start`` with a ``SpeedtestRequest``; the server answers
  ``refused`` (a status and a one-line reason) or ``accepted`` (a random cookie and its
  UDP and reliable-UDP ports); the client attaches its streams; the server says ``ready``
  when every stream is there; the sender says ``done`` with its totals; in a client-sending
  test the server answers ``result`` with the receiver's totals, in a server-sending one
  the client ends with ``bye``.
* A **stream** (TCP or reliable UDP) starts with ``STREAM_HELLO``: ``NLST``, the version,
  the role (data or latency probe), the stream's index and the cookie. Then data streams
  carry messages of the test's size, and the probe stream 16-byte probes (``PROBE``: a
  sequence number and the client's send time) that the server echoes.
* A **UDP datagram** starts with ``DATAGRAM`` (28 bytes): ``NS``, its kind, the stream's
  index, the cookie, a sequence number and the sender's clock. Before a UDP test, each
  stream's address is checked with a return trip: the client's ``HELLO`` gets a
  ``CHALLENGE`` carrying a random nonce (never larger than the hello), which the client
  sends back in a ``CONFIRM``; a server sends test traffic only to a confirmed address, so
  a forged source address cannot turn it into a flood toward someone else.
* ``ReceiverStats`` sees each datagram's sequence number (from 0), the sender's timestamp
  and the arrival time. It remembers which of the last ``REORDER_WINDOW`` sequence numbers
  below the highest arrived, in a bitmap: a number seen before is a duplicate; a number
  below the highest is out of order; a number further behind than the window is ``late``
  (also out of order) and is not counted as received, since the window can no longer tell
  it from a duplicate: like a playout buffer, the test counts it as lost. Loss is what the
  sender sent minus the distinct datagrams received in time.
* Jitter is RFC 3550's interarrival jitter: for consecutive arrivals i-1, i,
  ``D = (R_i - R_{i-1}) - (S_i - S_{i-1})`` and ``J += (|D| - J) / 16``. The clocks of the
  two hosts need not agree: only differences of each one are used.
* ``Pacer`` spaces sends so the bytes sent never run ahead of ``bitrate`` (bits per
  second) from the start; a sender late by more than ``max_burst`` seconds drops the
  backlog instead of bursting it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = [
    "ATTACH_TIMEOUT",
    "CONTROL_LINE_LIMIT",
    "CONTROL_TIMEOUT",
    "COOKIE_SIZE",
    "DATAGRAM",
    "DATAGRAM_MAGIC",
    "DEFAULT_DURATION",
    "DEFAULT_MAX_BITRATE",
    "DEFAULT_MAX_DURATION",
    "DEFAULT_MAX_PARALLEL",
    "DEFAULT_MAX_SIZE",
    "DEFAULT_MAX_TESTS",
    "DEFAULT_SIZES",
    "DEFAULT_SPEEDTEST_PORT",
    "DEFAULT_UDP_BITRATE",
    "END_TIMEOUT",
    "HANDSHAKE_RETRY",
    "KIND_CHALLENGE",
    "KIND_CONFIRM",
    "KIND_DATA",
    "KIND_HELLO",
    "KIND_PROBE",
    "MAX_END_GRACE",
    "MAX_LATENCY_SAMPLES",
    "MAX_MESSAGE_SIZE",
    "MAX_PARALLEL",
    "MAX_UDP_SIZE",
    "MIN_END_GRACE",
    "PROBE",
    "PROBE_INTERVAL",
    "PROBE_STREAM",
    "PROTOCOLS",
    "REORDER_WINDOW",
    "ROLE_DATA",
    "ROLE_PROBE",
    "STREAM_HELLO",
    "STREAM_MAGIC",
    "VERSION",
    "DatagramCounts",
    "LatencySamples",
    "LatencySummary",
    "Pacer",
    "ReceiverStats",
    "SpeedtestLimits",
    "SpeedtestRequest",
    "SpeedtestResult",
    "Tally",
    "TransferTotals",
    "decode_control",
    "encode_control",
    "end_grace",
    "format_bitrate",
    "pack_datagram",
    "pack_stream_hello",
    "unpack_stream_hello",
]

# -- what a test may be ------------------------------------------------------------------------

PROTOCOLS: Final = ("tcp", "udp", "rudp")
"""The protocols a test measures: TCP, plain UDP, and netlib's reliable UDP."""
DEFAULT_SPEEDTEST_PORT: Final = 7201
"""The speed-test server's TCP port (control and TCP streams) and UDP port; reliable UDP
listens on the next one."""
DEFAULT_DURATION: Final = 3.0
"""Seconds each protocol's test sends for."""
DEFAULT_SIZES: Final = {"tcp": 128 * 1024, "udp": 1400, "rudp": 16 * 1024}
"""Bytes of each message by protocol: TCP writes of 128 KiB (iperf3's default); UDP
datagrams of 1,400 bytes, which cross a 1,500-byte path unfragmented over IPv4 and IPv6;
reliable-UDP messages of 16 KiB."""
DEFAULT_UDP_BITRATE: Final = 10_000_000
"""Bits per second each UDP stream is paced to when no bitrate is given (UDP has no
congestion control: an unpaced sender would only measure its socket buffer's drops)."""
MAX_MESSAGE_SIZE: Final = 1024 * 1024
"""Largest TCP or reliable-UDP message of a test (reliable UDP's own largest message)."""
MAX_UDP_SIZE: Final = 65_507
"""Largest UDP datagram of a test: the largest UDP payload over IPv4."""
MAX_PARALLEL: Final = 128
"""Most streams a test may ask for on the wire (a server's own limit is usually lower)."""

# -- what a server accepts (its limits: SpeedtestLimits) --------------------------------------

DEFAULT_MAX_TESTS: Final = 1
"""Tests a server runs at once. One, as iperf3: tests running side by side would measure
each other. Others are refused as busy."""
DEFAULT_MAX_DURATION: Final = 60.0
"""Longest test a server accepts, in seconds."""
DEFAULT_MAX_PARALLEL: Final = 16
"""Most streams in one test a server accepts."""
DEFAULT_MAX_SIZE: Final = MAX_MESSAGE_SIZE
"""Largest message a server accepts for TCP and reliable UDP (UDP: ``MAX_UDP_SIZE``)."""
DEFAULT_MAX_BITRATE: Final = 1_000_000_000
"""Highest paced rate a server accepts for a whole test (bitrate x streams), in bits per
second. UDP tests are always paced; TCP and reliable UDP may ask for no pacing, their
congestion control then sets the pace."""

# -- timing -----------------------------------------------------------------------------------

CONTROL_LINE_LIMIT: Final = 4096
"""Longest control line, in bytes."""
CONTROL_TIMEOUT: Final = 10.0
"""Seconds either side waits for the other's next control message outside a test."""
ATTACH_TIMEOUT: Final = 5.0
"""Seconds the client has to attach every stream (and confirm every UDP address) once the
server accepted its test."""
END_TIMEOUT: Final = 10.0
"""Seconds after a test's duration within which its streams must have ended and its
sender must have said ``done``."""
MIN_END_GRACE: Final = 0.05
MAX_END_GRACE: Final = 2.0
"""The UDP receiver waits for datagrams still in flight when the sender says ``done``:
twice the slowest probe's round trip, kept between these bounds (seconds)."""
PROBE_INTERVAL: Final = 0.01
"""Seconds between two latency probes during a test."""
HANDSHAKE_RETRY: Final = 0.05
"""Seconds between repeats of a UDP stream's hello or confirm until the test is ready."""
MAX_LATENCY_SAMPLES: Final = 10_000
"""Round trips a test keeps for its percentiles (a 60 s test probes 6,000 times)."""
REORDER_WINDOW: Final = 1024
"""Sequence numbers below the highest one seen that a UDP receiver still tells apart
(received, or not yet): one bit each. A datagram further behind is counted ``late``."""
_WINDOW_MASK: Final = (1 << REORDER_WINDOW) - 1

# -- wire formats -----------------------------------------------------------------------------

VERSION: Final = 1
"""The version of the speed test's wire formats, in every start and stream hello."""
STREAM_MAGIC: Final = b"NLST"
STREAM_HELLO: Final = struct.Struct("!4sBBH8s")
"""A stream's first bytes: magic, version, role, stream index, cookie (16 bytes)."""
ROLE_DATA: Final = 0
ROLE_PROBE: Final = 1
PROBE: Final = struct.Struct("!Qd")
"""A latency probe on a TCP or reliable-UDP probe stream: sequence, client send time."""
DATAGRAM_MAGIC: Final = b"NS"
DATAGRAM: Final = struct.Struct("!2sBB8sQd")
"""A UDP datagram's header: magic, kind, stream index, cookie, sequence (the nonce in a
challenge or confirm), sender's time (28 bytes; data datagrams are padded to the size)."""
KIND_DATA: Final = 1
KIND_PROBE: Final = 2
KIND_HELLO: Final = 3
KIND_CHALLENGE: Final = 4
KIND_CONFIRM: Final = 5
PROBE_STREAM: Final = 255
"""The stream index of the latency probes in a UDP test's handshake."""
COOKIE_SIZE: Final = 8


def pack_stream_hello(role: int, index: int, cookie: bytes) -> bytes:
    return STREAM_HELLO.pack(STREAM_MAGIC, VERSION, role, index, cookie)


def unpack_stream_hello(data: bytes) -> tuple[int, int, bytes] | None:
    """``(role, index, cookie)`` of a stream's first bytes, or None if they are not a hello."""
    if len(data) < STREAM_HELLO.size:
        return None
    magic, version, role, index, cookie = STREAM_HELLO.unpack_from(data)
    if magic != STREAM_MAGIC or version != VERSION or role not in (ROLE_DATA, ROLE_PROBE):
        return None
    return role, index, cookie


def pack_datagram(
    kind: int, index: int, cookie: bytes, seq: int, stamp: float, size: int = 0
) -> bytes:
    """A datagram of at least the header's size, padded with zeros to ``size`` bytes."""
    header = DATAGRAM.pack(DATAGRAM_MAGIC, kind, index, cookie, seq, stamp)
    return header + bytes(size - DATAGRAM.size) if size > DATAGRAM.size else header


# -- control messages -------------------------------------------------------------------------


def encode_control(op: str, **fields: Any) -> bytes:
    """One control line: a JSON object with ``op`` and the fields, ending in ``\\n``."""
    line = json.dumps({"op": op, **fields}, separators=(",", ":")).encode() + b"\n"
    if len(line) > CONTROL_LINE_LIMIT:
        raise ValueError(f"control line of {len(line)} bytes exceeds {CONTROL_LINE_LIMIT}")
    return line


def decode_control(line: bytes) -> dict[str, Any]:
    """The object a control line carries.

    Raises:
        ValueError: the line is not a JSON object with a string ``op``.
    """
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("a control line is not JSON") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("a control line is not an object with an op")
    return message


def _number(message: dict[str, Any], name: str) -> float:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _integer(message: dict[str, Any], name: str) -> int:
    value = message.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


# -- a request and the limits it meets --------------------------------------------------------


def format_bitrate(bits_per_second: float) -> str:
    """``10 Mbit/s``, ``1.5 Gbit/s``: the shortest exact form."""
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_second >= scale:
            return f"{bits_per_second / scale:g} {unit}"
    return f"{bits_per_second:g} bit/s"


@dataclass(frozen=True, slots=True)
class SpeedtestRequest:
    """What one test measures (checked when made: ``ValueError`` says what is wrong).

    Attributes:
        protocol: ``"tcp"``, ``"udp"`` or ``"rudp"``.
        duration: seconds the sender sends for.
        size: bytes of each message (UDP: each datagram, header included).
        bitrate: bits per second each stream is paced to; 0 for no pacing (TCP and
            reliable UDP only).
        parallel: streams at once.
        reverse: the server sends and the client receives.
    """

    protocol: str
    duration: float
    size: int
    bitrate: float
    parallel: int = 1
    reverse: bool = False

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}: expected tcp, udp or rudp")
        if not (self.duration > 0 and math.isfinite(self.duration)):
            raise ValueError(f"duration must be > 0 seconds, got {self.duration:g}")
        low, high = (
            (DATAGRAM.size, MAX_UDP_SIZE) if self.protocol == "udp" else (1, MAX_MESSAGE_SIZE)
        )
        if not low <= self.size <= high:
            raise ValueError(f"{self.protocol} size must be {low}..{high} bytes, got {self.size}")
        if not (self.bitrate >= 0 and math.isfinite(self.bitrate)):
            raise ValueError(f"bitrate must be >= 0, got {self.bitrate:g}")
        if self.bitrate == 0 and self.protocol == "udp":
            raise ValueError("udp needs a bitrate above 0: it has no congestion control")
        if not 1 <= self.parallel <= MAX_PARALLEL:
            raise ValueError(f"parallel must be 1..{MAX_PARALLEL}, got {self.parallel}")

    @classmethod
    def default(cls, protocol: str, **fields: Any) -> SpeedtestRequest:
        """A request with the defaults for ``protocol`` where ``fields`` give None or nothing."""
        given = {name: value for name, value in fields.items() if value is not None}
        given.setdefault("duration", DEFAULT_DURATION)
        given.setdefault("size", DEFAULT_SIZES.get(protocol, 1))
        given.setdefault("bitrate", DEFAULT_UDP_BITRATE if protocol == "udp" else 0.0)
        return cls(protocol, **given)

    def to_message(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "protocol": self.protocol,
            "duration": self.duration,
            "size": self.size,
            "bitrate": self.bitrate,
            "parallel": self.parallel,
            "reverse": self.reverse,
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> SpeedtestRequest:
        """The request a ``start`` message carries.

        Raises:
            ValueError: a field is missing, of the wrong type, or out of range.
        """
        if message.get("version") != VERSION:
            raise ValueError(f"unsupported version {message.get('version')!r}")
        if not isinstance(message.get("protocol"), str):
            raise ValueError("protocol must be a string")
        if not isinstance(message.get("reverse"), bool):
            raise ValueError("reverse must be true or false")
        return cls(
            protocol=message["protocol"],
            duration=_number(message, "duration"),
            size=_integer(message, "size"),
            bitrate=_number(message, "bitrate"),
            parallel=_integer(message, "parallel"),
            reverse=message["reverse"],
        )

    @property
    def paced_bitrate(self) -> float:
        """Bits per second of the whole test when paced (0 when it is not)."""
        return self.bitrate * self.parallel


@dataclass(frozen=True, slots=True)
class SpeedtestLimits:
    """What a speed-test server accepts; a request beyond a limit is refused, saying which.

    Attributes:
        max_tests: tests at once (``DEFAULT_MAX_TESTS``); more are refused as busy.
        max_duration: seconds (``DEFAULT_MAX_DURATION``).
        max_parallel: streams in one test (``DEFAULT_MAX_PARALLEL``).
        max_size: bytes of a TCP or reliable-UDP message (``DEFAULT_MAX_SIZE``).
        max_bitrate: bits per second of a whole paced test (``DEFAULT_MAX_BITRATE``).
    """

    max_tests: int = DEFAULT_MAX_TESTS
    max_duration: float = DEFAULT_MAX_DURATION
    max_parallel: int = DEFAULT_MAX_PARALLEL
    max_size: int = DEFAULT_MAX_SIZE
    max_bitrate: float = DEFAULT_MAX_BITRATE

    def __post_init__(self) -> None:
        if self.max_tests < 1:
            raise ValueError(f"max_tests must be >= 1, got {self.max_tests}")
        if not 1 <= self.max_parallel <= MAX_PARALLEL:
            raise ValueError(f"max_parallel must be 1..{MAX_PARALLEL}, got {self.max_parallel}")
        if not (self.max_duration > 0 and self.max_size > 0 and self.max_bitrate > 0):
            raise ValueError("max_duration, max_size and max_bitrate must be > 0")

    def refusal(self, request: SpeedtestRequest) -> str | None:
        """Why ``request`` is beyond these limits, in one line; None if it is within them."""
        if request.duration > self.max_duration:
            return (
                f"duration {request.duration:g} s is above the server's limit of "
                f"{self.max_duration:g} s"
            )
        if request.parallel > self.max_parallel:
            return (
                f"{request.parallel} streams are above the server's limit of {self.max_parallel}"
            )
        if request.protocol != "udp" and request.size > self.max_size:
            return f"size {request.size} bytes is above the server's limit of {self.max_size}"
        if request.paced_bitrate > self.max_bitrate:
            asked, limit = format_bitrate(request.paced_bitrate), format_bitrate(self.max_bitrate)
            return f"bitrate {asked} for the test is above the server's limit of {limit}"
        return None


# -- counting ---------------------------------------------------------------------------------


class Tally:
    """Bytes and messages that went one way on one stream, and when the first and the last
    went (or arrived)."""

    __slots__ = ("bytes", "first", "last", "messages")

    def __init__(self) -> None:
        self.bytes = 0
        self.messages = 0
        self.first: float | None = None
        self.last = 0.0

    def add(self, size: int, now: float, messages: int = 1) -> None:
        if self.first is None:
            self.first = now
        self.bytes += size
        self.messages += messages
        self.last = now

    def stop(self, now: float) -> None:
        """The sender stopped at ``now``: its time runs to here, not to its last message's
        start (a paced sender's last message takes its share of the time too)."""
        if self.first is None:
            self.first = now
        self.last = max(self.last, now)


class ReceiverStats:
    """Loss, out-of-order and jitter counts for one stream of numbered datagrams.

    Memory is bounded: a bitmap of ``REORDER_WINDOW`` bits remembers which sequence numbers
    below the highest arrived (see the module's rules).
    """

    __slots__ = (
        "_last_sent",
        "_window",
        "bytes",
        "duplicates",
        "first_arrival",
        "highest",
        "jitter",
        "last_arrival",
        "late",
        "out_of_order",
        "received",
    )

    def __init__(self) -> None:
        self._window = 0  # bit i: sequence number highest - i arrived
        self._last_sent: float | None = None
        self.first_arrival: float | None = None
        self.last_arrival = 0.0
        self.highest = -1
        self.received = 0
        self.bytes = 0
        self.out_of_order = 0
        self.duplicates = 0
        self.late = 0
        self.jitter = 0.0

    def record(self, seq: int, sent: float, arrived: float, size: int = 0) -> None:
        """Count one datagram numbered ``seq``, sent at ``sent``, arrived at ``arrived``."""
        if seq < 0:
            raise ValueError("seq must be >= 0")
        ahead = seq - self.highest
        if ahead > 0:
            self._window = (
                ((self._window << ahead) | 1) & _WINDOW_MASK if ahead < REORDER_WINDOW else 1
            )
            self.highest = seq
        elif -ahead >= REORDER_WINDOW:
            self.late += 1
            self.out_of_order += 1
            return
        else:
            bit = 1 << -ahead
            if self._window & bit:
                self.duplicates += 1
                return
            self._window |= bit
            self.out_of_order += 1
        self._arrived(sent, arrived, size)

    def _arrived(self, sent: float, arrived: float, size: int) -> None:
        self.received += 1
        self.bytes += size
        if self._last_sent is not None:
            d = (arrived - self.last_arrival) - (sent - self._last_sent)
            self.jitter += (abs(d) - self.jitter) / 16.0
        else:
            self.first_arrival = arrived
        self._last_sent = sent
        self.last_arrival = arrived

    @property
    def packets(self) -> int:
        """Datagrams the sender must have sent at least: the highest sequence seen plus one."""
        return self.highest + 1

    @property
    def lost(self) -> int:
        """Datagrams up to the highest seen that were not received (in time)."""
        return self.packets - self.received

    @property
    def lost_percent(self) -> float:
        """``lost`` as a percentage of ``packets`` (0 when nothing was expected)."""
        return 100.0 * self.lost / self.packets if self.packets else 0.0


class Pacer:
    """When the next send is due so that ``bitrate`` bits per second are not exceeded."""

    __slots__ = ("_due", "_max_burst", "bitrate")

    def __init__(self, bitrate: float, now: float, max_burst: float = 0.01) -> None:
        if bitrate <= 0:
            raise ValueError("bitrate must be > 0")
        if max_burst < 0:
            raise ValueError("max_burst must be >= 0")
        self.bitrate = bitrate
        self._max_burst = max_burst
        self._due = now

    def delay(self, now: float) -> float:
        """Seconds to wait before the next send may go (0 when it may go now)."""
        return max(0.0, self._due - now)

    def sent(self, size: int, now: float) -> None:
        """Account for ``size`` bytes sent at ``now``."""
        if self._due < now - self._max_burst:
            self._due = now - self._max_burst
        self._due += size * 8 / self.bitrate


class LatencySamples:
    """Round-trip times of a test's probes, at most ``limit`` of them kept."""

    __slots__ = ("_limit", "_samples", "sent")

    def __init__(self, limit: int = MAX_LATENCY_SAMPLES) -> None:
        self._limit = limit
        self._samples: list[float] = []
        self.sent = 0

    def add(self, rtt: float) -> None:
        if len(self._samples) < self._limit and rtt >= 0:
            self._samples.append(rtt)

    def __len__(self) -> int:
        return len(self._samples)

    def summary(self) -> LatencySummary:
        ordered = sorted(self._samples)
        return LatencySummary(
            samples=len(ordered),
            probes=max(self.sent, len(ordered)),
            p50=_nearest_rank(ordered, 50),
            p99=_nearest_rank(ordered, 99),
        )


def _nearest_rank(ordered: list[float], percent: float) -> float | None:
    if not ordered:
        return None
    return ordered[max(0, math.ceil(percent / 100 * len(ordered)) - 1)]


def end_grace(slowest_rtt: float | None) -> float:
    """Seconds a UDP receiver waits for datagrams in flight once the sender is done."""
    if slowest_rtt is None:
        return MAX_END_GRACE
    return min(MAX_END_GRACE, max(MIN_END_GRACE, 2 * slowest_rtt))


# -- results ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferTotals:
    """What went one way in a test, every stream together.

    Attributes:
        seconds: from the test's start to the last message sent (or received).
        bytes: bytes of the messages (UDP: of the datagrams, headers included).
        messages: messages (TCP: writes of the test's size; UDP: datagrams).
    """

    seconds: float = 0.0
    bytes: int = 0
    messages: int = 0

    @property
    def bits_per_second(self) -> float:
        return self.bytes * 8 / self.seconds if self.seconds > 0 else 0.0

    @property
    def messages_per_second(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @classmethod
    def of(cls, tallies: list[Tally], start: float) -> TransferTotals:
        """The sum of ``tallies``, timed from ``start`` (or the first message, if earlier)."""
        firsts = [t.first for t in tallies if t.first is not None]
        if not firsts:
            return cls()
        begin = min(start, *firsts)
        end = max(t.last for t in tallies)
        return cls(
            seconds=end - begin,
            bytes=sum(t.bytes for t in tallies),
            messages=sum(t.messages for t in tallies),
        )

    def spanning(self, seconds: float) -> TransferTotals:
        """These totals over at least ``seconds``: a receiver's time runs until the sender
        stopped, even when the last message arrived earlier (a paced sender)."""
        return (
            self if self.seconds >= seconds else TransferTotals(seconds, self.bytes, self.messages)
        )

    def to_message(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "bytes": self.bytes, "messages": self.messages}

    @classmethod
    def from_message(cls, message: object) -> TransferTotals:
        """Raises ``ValueError`` for anything but the object ``to_message`` makes."""
        if not isinstance(message, dict):
            raise ValueError("totals must be an object")
        seconds, size, count = (
            _number(message, "seconds"),
            _integer(message, "bytes"),
            _integer(message, "messages"),
        )
        if seconds < 0 or size < 0 or count < 0:
            raise ValueError("totals cannot be negative")
        return cls(seconds, size, count)


@dataclass(frozen=True, slots=True)
class DatagramCounts:
    """What a UDP receiver saw, every stream together.

    Attributes:
        packets: datagrams the sender sent.
        lost_packets: sent and not received (in time).
        jitter: RFC 3550 interarrival jitter, seconds (the mean of the streams').
        out_of_order: received after a higher sequence number (``late`` ones included).
        duplicates: received again.
        late: further behind the highest than ``REORDER_WINDOW``: counted as lost.
    """

    packets: int = 0
    lost_packets: int = 0
    jitter: float = 0.0
    out_of_order: int = 0
    duplicates: int = 0
    late: int = 0

    @property
    def lost_percent(self) -> float:
        return 100.0 * self.lost_packets / self.packets if self.packets else 0.0

    @classmethod
    def of(cls, streams: list[ReceiverStats], sent: int) -> DatagramCounts:
        received = sum(s.received for s in streams)
        return cls(
            packets=sent,
            lost_packets=max(0, sent - received),
            jitter=sum(s.jitter for s in streams) / len(streams) if streams else 0.0,
            out_of_order=sum(s.out_of_order for s in streams),
            duplicates=sum(s.duplicates for s in streams),
            late=sum(s.late for s in streams),
        )

    def to_message(self) -> dict[str, Any]:
        return {
            "jitter": self.jitter,
            "out_of_order": self.out_of_order,
            "duplicates": self.duplicates,
            "late": self.late,
        }

    @classmethod
    def from_message(cls, message: object, sent: int, received: int) -> DatagramCounts:
        """The counts a receiver's ``result`` carries, for ``sent`` datagrams of which
        ``received`` arrived. Raises ``ValueError`` for a malformed message."""
        if not isinstance(message, dict):
            raise ValueError("datagram counts must be an object")
        jitter = _number(message, "jitter")
        counts = [_integer(message, name) for name in ("out_of_order", "duplicates", "late")]
        if jitter < 0 or min(counts) < 0:
            raise ValueError("datagram counts cannot be negative")
        return cls(sent, max(0, sent - received), jitter, *counts)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Round trips of the latency probes sent during a test (seconds; None: no sample).

    Attributes:
        samples: probes answered (and kept, at most ``MAX_LATENCY_SAMPLES``).
        probes: probes sent.
        p50, p99: the median and the 99th percentile (nearest rank).
    """

    samples: int = 0
    probes: int = 0
    p50: float | None = None
    p99: float | None = None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 6)


@dataclass(frozen=True, slots=True)
class SpeedtestResult:
    """The outcome of one test.

    Attributes:
        request: what was measured.
        sent: what the sender sent; received: what the receiver got, timed by it.
        latency: round trips of the probes sent on the same protocol during the test.
        datagrams: loss, jitter and ordering (UDP only; None otherwise).
    """

    request: SpeedtestRequest
    sent: TransferTotals
    received: TransferTotals
    latency: LatencySummary = field(default_factory=LatencySummary)
    datagrams: DatagramCounts | None = None

    @property
    def protocol(self) -> str:
        return self.request.protocol

    @property
    def bits_per_second(self) -> float:
        """The throughput, in bits received per second."""
        return self.received.bits_per_second

    @property
    def messages_per_second(self) -> float:
        """Messages received per second (for TCP, writes of the test's size)."""
        return self.received.messages_per_second

    def to_json(self) -> dict[str, Any]:
        """The result as iperf3 names its JSON fields, where the meaning is the same."""
        request = self.request
        received: dict[str, Any] = _side(self.received)
        sent = _side(self.sent)
        if self.datagrams is not None:
            counts = self.datagrams
            sent["packets"] = counts.packets
            received.update(
                packets=counts.packets,
                lost_packets=counts.lost_packets,
                lost_percent=round(counts.lost_percent, 6),
                jitter_ms=_ms(counts.jitter),
                out_of_order=counts.out_of_order,
                duplicates=counts.duplicates,
                late=counts.late,
            )
        return {
            "protocol": request.protocol,
            "reverse": request.reverse,
            "num_streams": request.parallel,
            "blksize": request.size,
            "duration": request.duration,
            "target_bitrate": request.bitrate,
            "sum_sent": sent,
            "sum_received": received,
            "messages_per_second": round(self.messages_per_second, 3),
            "latency_ms": {
                "p50": _ms(self.latency.p50),
                "p99": _ms(self.latency.p99),
                "samples": self.latency.samples,
                "probes": self.latency.probes,
            },
        }


def _side(transfer: TransferTotals) -> dict[str, Any]:
    return {
        "seconds": round(transfer.seconds, 6),
        "bytes": transfer.bytes,
        "bits_per_second": round(transfer.bits_per_second, 3),
        "messages": transfer.messages,
    }
