"""ReliableConnection: one reliable-UDP connection (client or server side), with no I/O.

Rules of this module:

* No I/O, no clock, no randomness, no logging. Time arrives as ``now`` (float seconds, any
  monotonic origin); connection ids are chosen by the caller (the adapter draws them from
  ``secrets``, the server core derives them from its key).
* Inputs: ``send()``, ``close()``, ``datagram_received(data, now)`` (or, from the server
  core, ``packet_received``) and ``handle_timer(now)``. Outputs: ``datagrams_to_send(now)``,
  ``next_event()``, ``next_deadline()``, ``state`` and ``statistics()``. After any input the
  owner calls ``datagrams_to_send(now)``, drains ``next_event()`` and re-arms its timer for
  ``next_deadline()``; calling ``handle_timer`` early is harmless.
* A peer's fault never raises out of here: a malformed packet that passed the checksum
  closes the connection with ``CloseCode.PROTOCOL_ERROR``; a corrupt datagram is dropped and
  counted. Local misuse raises: ``LimitExceeded`` above the message limit, ``WouldBlock``
  when the send buffer is full, ``ClosedResourceError`` after close.
* Every buffer is bounded and charged ``bytes + FRAGMENT_CHARGE`` per unit: the send
  buffer by ``send_buffer`` (one message is always accepted into an empty buffer), received
  data (out of order, being reassembled, or delivered but not yet taken with
  ``next_event()``) by ``receive_buffer``, through the flow-control window.

Theory of operation
-------------------
*Sending.* ``send()`` gives a message consecutive data sequence numbers (dseq), one per
``UNIT`` (1,156) bytes, and queues it whole. Each datagram built by ``datagrams_to_send``
gets a new packet number and carries, in order: an ACK frame whenever something received is
not yet acknowledged (acknowledgements ride on data), runs to retransmit, new runs cut off
the front of the queued messages to fill the datagram (up to the peer's window and the
congestion window), then PING or CLOSE frames when due. A run is a frame of consecutive
whole units of one message (the last one may be short); the objects called fragments here
are runs. A packet with any frame but ACK is ack-eliciting and is remembered until
acknowledged or declared lost. The packet that empties the queue while more than
``_DRAIN_PING`` bytes are in flight carries a PING, so the peer acknowledges it at once.

*Datagram size.* Datagrams are at most ``BASE_DATAGRAM`` (1,200) bytes until path MTU
discovery (``pmtu.PathMtu``) proves a larger size: after the handshake the connection sends
probes (a padded PING, then a PING) outside the congestion window, reports their fate and
the losses of its other packets, and takes up the size ``PathMtu`` settles on. A run to
resend that no longer fits after the size fell is cut in place. Packets sent on the probe
timer stay at the base size.

*Acknowledging.* The receiver remembers received packet numbers as at most
``MAX_ACK_RANGES`` ranges. It acknowledges at once when an ack-eliciting packet arrives
after a gap or out of order, or within ``PACKET_THRESHOLD`` packets of a gap (the sender is
recovering and needs to know fast), on a PING, after a duplicate, or when two ack-eliciting
packets are unacknowledged; otherwise within ``max_ack_delay``, so that a reply, or the next
request, carries the acknowledgement: a request-reply exchange costs two datagrams, not
four. An ACK the peer has not yet acknowledged (it rode on a packet that may be lost) is
repeated in the first packet of every later batch, so one lost request does not also lose
the acknowledgement of the previous reply.

*Loss recovery* (RFC 9002, with two additions). A packet is lost when a packet sent
``PACKET_THRESHOLD`` (3) later is acknowledged, or when a later one is acknowledged and
``9/8 * RTT`` has passed since it was sent (fast retransmit without a timer). Addition one,
from RACK (RFC 8985): an ACK that arrives in the newest packet from the peer was made when
that packet was sent, so a packet sent ``9/8 * RTT`` before it arrived and not in it is lost
even if nothing later was acknowledged: the request after a lost reply reveals the loss.
Lost fragments not acknowledged since go to the retransmit queue and travel in new packets.
When nothing is acknowledged for a probe timeout (PTO), one probe goes out and the PTO
doubles (up to ``MAX_PROBE_INTERVAL``) until something is acknowledged. The probe is a PING,
which the peer acknowledges at once, and the acknowledgement shows what was lost: a late
acknowledgement, not a loss, is the usual reason for a timeout, so resending data there
would mostly be spurious. Addition two: right after a loss (the newest packet sent is within
``PACKET_THRESHOLD`` of the last one lost) the peer sees a gap and acknowledges without
delay, so the PTO leaves the peer's ack delay out, and from the second probe on the newest
packet's data goes again. A fragment acknowledged in two packets counts as a spurious
retransmission.

*Flow and congestion control.* The receiver grants credit in dseq units: the peer may send
fragments below ``window``, carried in every ACK. The window is the first dseq not received
plus the free receive buffer divided by the charge of a full unit, and it never
shrinks, so what is buffered never exceeds ``receive_buffer``. A sender blocked by the window
with nothing in flight keeps probing on the PTO timer (a persist timer). The congestion
window (``recovery.CongestionWindow``) limits bytes in flight.

*Reassembly and channels.* A unit is a duplicate if its dseq is below the first one not
received or already held: each message is delivered exactly once. A run at the cumulative
point is taken whole (units of it held already, from smaller runs, are dropped); one that
arrives ahead of it is held one unit per entry, so runs cut differently overlap safely.
Ordered messages are delivered when every unit up to their last has arrived, so they come
out in the order they were sent; an unordered message is delivered as soon as its own
units are all there.

*Handshake* (client). HELLO (padded to 1,200 bytes) is repeated with back-off until a COOKIE
or an ACCEPT arrives; the COOKIE's token goes into the next HELLO. ACCEPT carries the
server's connection id; the client acknowledges it at once so the server learns that its id
is in use. The server side is created by ``ReliableServerCore`` once the cookie checks.

*Ending.* ``close()`` flushes: the CLOSE frame goes once every fragment sent is
acknowledged, and is retransmitted like data until acknowledged or for three probe timeouts.
The peer acknowledges it and drains for three probe timeouts (acknowledging repeats, sending
nothing else). Silence for ``idle_timeout`` ends a connection with ``ConnectionTimedOut``; a
PING goes out after ``keepalive`` seconds without traffic so an idle but live connection is
kept.

States::

    CONNECTING ──ACCEPT──> ESTABLISHED ──close()──> CLOSING ──CLOSE acked / 3 PTO──> CLOSED
        │                       │                     │
        │                       └──peer CLOSE──> DRAINING ──3 PTO──> CLOSED
        └── REFUSE, timeout, idle timeout, protocol error (any state) ──────────> CLOSED
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, cast

from netlib.errors import ClosedResourceError, LimitExceeded, ProtocolError, WouldBlock
from netlib.sansio.reliable.pmtu import PathMtu
from netlib.sansio.reliable.recovery import (
    INITIAL_RTT,
    MIN_WINDOW,
    PACKET_THRESHOLD,
    CongestionWindow,
    RttEstimator,
)
from netlib.sansio.reliable.wire import (
    ACK,
    ACK_RANGE,
    BASE_DATAGRAM,
    CLOSE,
    CRC,
    FLAG_FIRST,
    FLAG_LAST,
    FLAG_UNORDERED,
    HEADER,
    MAX_ACK_RANGES,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    MSG,
    OVERHEAD,
    PARAMS,
    UNIT,
    VERSION,
    FrameType,
    PacketType,
    check_datagram,
    decode_ack,
    decode_close,
    encode_ack,
    encode_close,
    encode_hello,
    encode_probe,
    seal,
)

__all__ = [
    "DEFAULT_ACK_DELAY",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_RECEIVE_BUFFER",
    "DEFAULT_SEND_BUFFER",
    "DEFAULT_SERVER_ACK_DELAY",
    "FRAGMENT_CHARGE",
    "Channel",
    "CloseCode",
    "Connected",
    "ConnectionClosed",
    "ConnectionEvent",
    "ConnectionState",
    "ConnectionTimedOut",
    "MessageReceived",
    "ReliableConfig",
    "ReliableConnection",
    "ReliableStatistics",
]

DEFAULT_ACK_DELAY: Final = 0.010
"""Most a client holds an acknowledgement for a packet to ride on (seconds): long enough for
the next request of a 10 ms exchange to carry the acknowledgement of the reply, short enough
to keep the server's probe timeout low (it includes this delay)."""
DEFAULT_SERVER_ACK_DELAY: Final = 0.002
"""Most a server (the side that accepted) holds an acknowledgement (seconds). A server
answers: a handler's reply leaves within a fraction of a millisecond and carries the
acknowledgement of its request, so holding it longer saves nothing, while the client's probe
timeout includes this delay: a lost request is probed about 2 ms after a round trip, not
10 ms (p99 of an echo every 10 ms at 10 % loss each way: 11-15 ms instead of 21-30)."""
DEFAULT_IDLE_TIMEOUT: Final = 60.0
"""Seconds without a packet from the peer after which a connection times out."""
DEFAULT_KEEPALIVE: Final = 15.0
"""Seconds without traffic after which a PING goes out (None in the config: never)."""
DEFAULT_HANDSHAKE_TIMEOUT: Final = 30.0
"""Seconds a client keeps trying to connect."""
DEFAULT_SEND_BUFFER: Final = 2 * 1024 * 1024
"""Bytes (plus unit charges) of messages sent but not yet acknowledged."""
DEFAULT_RECEIVE_BUFFER: Final = 2 * 1024 * 1024
"""Bytes (plus unit charges) received and not yet taken with ``next_event()``."""
FRAGMENT_CHARGE: Final = 64
"""Bytes charged per unit on top of its payload, for the objects that hold it: a flood
of empty messages fills the buffers as surely as large ones."""
_SLOT: Final = UNIT + FRAGMENT_CHARGE
_ACK_DELAY_UNIT: Final = 1e-4  # ack delays travel in units of 100 us
_MAX_PN: Final = 0xFFFF_FFFF
_MAX_DSEQ: Final = 0xFFFF_FFFF
_MAX_LOST: Final = 64  # packets declared lost remembered, to spot spurious retransmissions
_CLOSE_PTOS: Final = 3  # probe timeouts a closing or draining connection lingers
_PERSISTENT_CONGESTION: Final = 3  # consecutive probe timeouts that reset the window
_ELICITING_BEFORE_ACK: Final = 2
_DUPLICATE: Final = 0
_IN_ORDER: Final = 1
_DISORDER: Final = 2
_FLAG_PING: Final = 1
_FLAG_CLOSE: Final = 2
_FLAG_PROBE: Final = 4  # a path MTU probe (its loss is no congestion; nothing is resent)
_FIT: Final = OVERHEAD + ACK.size + MSG.size  # a packet's bytes around one run of units
_DRAIN_PING: Final = MIN_WINDOW  # bytes in flight above which the packet that empties the
# send queue carries a PING: the peer acknowledges it at once instead of after its ack delay
# (a bulk sender waiting for its buffer to drain would idle for that delay); below it, as
# in a request-reply exchange, the acknowledgement rides on the reply
_F_ACK: Final = int(FrameType.ACK)
_F_MSG: Final = int(FrameType.MSG)
_F_PING: Final = int(FrameType.PING)
_F_CLOSE: Final = int(FrameType.CLOSE)
_F_PADDING: Final = int(FrameType.PADDING)
_PING_FRAME: Final = bytes([_F_PING])
_T_DATA: Final = int(PacketType.DATA)
_T_ACCEPT: Final = int(PacketType.ACCEPT)
_T_COOKIE: Final = int(PacketType.COOKIE)
_T_REFUSE: Final = int(PacketType.REFUSE)
_T_HELLO: Final = int(PacketType.HELLO)


class Channel(enum.IntEnum):
    """How a message is delivered (both reliably, exactly once)."""

    ORDERED = 0
    """In the order sent, after every earlier message."""
    UNORDERED = 1
    """As soon as its own fragments are all there."""


class CloseCode(enum.IntEnum):
    """Why a connection closed (the CLOSE frame's and REFUSE packet's code)."""

    NORMAL = 0
    PROTOCOL_ERROR = 1
    SERVER_FULL = 2
    HOST_FULL = 3
    EXHAUSTED = 4
    """The connection used up its packet or data sequence numbers (2**32 of either)."""
    ABORTED = 5
    """The application aborted the connection (what it had sent may be lost)."""


class ConnectionState(enum.Enum):
    """Where a reliable connection is."""

    CONNECTING = "connecting"
    """Client: the handshake is under way."""
    ESTABLISHED = "established"
    """Messages flow both ways."""
    CLOSING = "closing"
    """``close()`` was called: what was sent is flushed, then CLOSE goes until acknowledged."""
    DRAINING = "draining"
    """The peer closed: its CLOSE is acknowledged for a while, nothing else is sent."""
    CLOSED = "closed"
    """Gone: nothing is sent or received any more."""


_CONNECTING: Final = ConnectionState.CONNECTING
_ESTABLISHED: Final = ConnectionState.ESTABLISHED
_CLOSING: Final = ConnectionState.CLOSING
_DRAINING: Final = ConnectionState.DRAINING
_CLOSED: Final = ConnectionState.CLOSED


@dataclass(frozen=True, slots=True)
class Connected:
    """The handshake completed: messages may flow."""


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A whole message arrived (exactly once) on ``channel``."""

    data: bytes
    channel: Channel


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The connection closed; ``by_peer`` tells who closed it."""

    code: int
    reason: str
    by_peer: bool


@dataclass(frozen=True, slots=True)
class ConnectionTimedOut:
    """The peer fell silent (``reason`` is ``"idle"`` or ``"handshake"``)."""

    reason: str


ConnectionEvent = Connected | MessageReceived | ConnectionClosed | ConnectionTimedOut


@dataclass(frozen=True, slots=True)
class ReliableConfig:
    """Per-connection knobs (seconds and bytes).

    Attributes:
        max_ack_delay: most an acknowledgement is held for a packet to ride on (None,
            the default: ``DEFAULT_ACK_DELAY``, 10 ms, on a client and
            ``DEFAULT_SERVER_ACK_DELAY``, 2 ms, on a server).
        idle_timeout: silence from the peer after which the connection times out.
        keepalive: traffic-free seconds before a PING (None: never; below idle_timeout).
        handshake_timeout: how long a client tries to connect.
        send_buffer: cap of unacknowledged sent data.
        receive_buffer: cap of received data not yet taken.
        max_message: largest message sent or accepted (at most ``MAX_MESSAGE``).
        initial_rtt: RTT assumed before the first sample.
        max_datagram: largest datagram (UDP payload bytes) sent or accepted, from
            ``BASE_DATAGRAM`` (1,200: no path MTU discovery, every datagram that size at
            most) to ``MAX_DATAGRAM`` (65,527, the default). The size actually used is
            found by probing, within the smaller of the two sides' values.
        ordered: True (the default): the messages this side sends are delivered in the
            order they were sent (the ordered channel). False: each is delivered as soon
            as it is complete, not held back behind an earlier one still being
            retransmitted (the unordered channel: still every message exactly once, and
            intact). ``send()`` can choose the channel per message.
    """

    max_ack_delay: float | None = None
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    keepalive: float | None = DEFAULT_KEEPALIVE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    send_buffer: int = DEFAULT_SEND_BUFFER
    receive_buffer: int = DEFAULT_RECEIVE_BUFFER
    max_message: int = MAX_MESSAGE
    initial_rtt: float = INITIAL_RTT
    max_datagram: int = MAX_DATAGRAM
    ordered: bool = True

    def __post_init__(self) -> None:
        if self.max_ack_delay is not None and not 0 < self.max_ack_delay <= 1.0:
            raise ValueError(f"max_ack_delay must be in (0, 1] s, got {self.max_ack_delay}")
        if self.idle_timeout <= 0 or self.handshake_timeout <= 0 or self.initial_rtt <= 0:
            raise ValueError("timeouts and initial_rtt must be positive")
        if self.keepalive is not None and not 0 < self.keepalive < self.idle_timeout:
            raise ValueError("keepalive must be positive and below idle_timeout")
        if not 0 <= self.max_message <= MAX_MESSAGE:
            raise ValueError(f"max_message must be in 0..{MAX_MESSAGE}, got {self.max_message}")
        if not BASE_DATAGRAM <= self.max_datagram <= MAX_DATAGRAM:
            raise ValueError(
                f"max_datagram must be in {BASE_DATAGRAM}..{MAX_DATAGRAM}, got {self.max_datagram}"
            )
        need = _charge_of(self.max_message) + _SLOT
        if self.receive_buffer < need or self.send_buffer < need:
            raise ValueError(f"buffers must hold max_message and a fragment: {need} bytes")

    @property
    def window_slots(self) -> int:
        """How many full fragments the receive buffer holds (the flow-control window)."""
        return self.receive_buffer // _SLOT


def _units(size: int) -> int:
    """Data sequence numbers taken by ``size`` bytes of a message (an empty one takes one)."""
    return 1 if size <= UNIT else -(-size // UNIT)


def _charge_of(size: int) -> int:
    """Bytes charged for ``size`` bytes of a message: payload plus a charge per unit."""
    return size + _units(size) * FRAGMENT_CHARGE


@dataclass(frozen=True, slots=True)
class ReliableStatistics:
    """A snapshot of a connection's counters and estimates (times in seconds).

    Attributes:
        datagrams_sent, datagrams_received, bytes_sent, bytes_received: all datagrams.
        messages_sent, messages_received: whole messages.
        retransmissions: fragments sent again (after a loss or in a probe).
        spurious_retransmissions: fragments acknowledged in two packets (the copy was not
            needed); a lower bound, since a lost copy is never acknowledged.
        spurious_losses: packets declared lost and acknowledged later.
        losses_detected: packets declared lost.
        probes_sent: probe timeouts that expired (one probe each).
        corrupt_dropped: datagrams whose checksum or version failed, or longer than
            ``max_datagram``.
        duplicates_dropped: packets received twice; duplicate_fragments: fragments so.
        smoothed_rtt, rttvar, min_rtt, latest_rtt: RFC 9002 estimates.
        congestion_window, bytes_in_flight: bytes.
        send_buffered, receive_buffered: charged bytes held now.
        datagram_size: the largest datagram this side sends now (path MTU discovery).
        mtu_probes_sent, mtu_probes_lost: path MTU probes (lost ones: too large, or
            lost like any packet).
        datagram_fallbacks: times the datagram size fell back to ``BASE_DATAGRAM`` (a
            black hole, persistent congestion, or a size the local stack refused).
    """

    datagrams_sent: int
    datagrams_received: int
    bytes_sent: int
    bytes_received: int
    messages_sent: int
    messages_received: int
    retransmissions: int
    spurious_retransmissions: int
    spurious_losses: int
    losses_detected: int
    probes_sent: int
    corrupt_dropped: int
    duplicates_dropped: int
    duplicate_fragments: int
    smoothed_rtt: float
    rttvar: float
    min_rtt: float
    latest_rtt: float
    congestion_window: int
    bytes_in_flight: int
    send_buffered: int
    receive_buffered: int
    datagram_size: int
    mtu_probes_sent: int
    mtu_probes_lost: int
    datagram_fallbacks: int


class _Fragment:
    """A run of units of one message (``last_pn`` -1: queued to resend). Unsent, it holds
    what is left of its message; ``payload`` may be a ``memoryview`` of the message."""

    __slots__ = ("acked", "dseq", "flags", "last_pn", "payload")

    def __init__(self, dseq: int, flags: int, payload: bytes | memoryview) -> None:
        self.dseq = dseq
        self.flags = flags
        self.payload = payload
        self.acked = False
        self.last_pn = -1


class _Sent:
    """An ack-eliciting packet in flight."""

    __slots__ = ("flags", "fragments", "pn", "size", "time")

    def __init__(
        self, pn: int, time: float, size: int, fragments: list[_Fragment], flags: int
    ) -> None:
        self.pn = pn
        self.time = time
        self.size = size
        self.fragments = fragments
        self.flags = flags


def _covered(pn: int, ranges: list[tuple[int, int]]) -> bool:
    for low, high in ranges:  # noqa: SIM110 (a loop, not any() over a generator: per ACK)
        if low <= pn <= high:
            return True
    return False


def _only_ack(data: bytes, offset: int) -> bool:
    """True if the packet's frames are one ACK frame (it elicits no acknowledgement)."""
    if data[offset] != _F_ACK:
        return False
    try:
        return decode_ack(data, offset)[4] == len(data) - CRC.size
    except (ProtocolError, struct.error):
        return False


class ReliableConnection:
    """One reliable-UDP connection. Make one with ``connect()`` (client side); the server
    side comes from ``ReliableServerCore``.

    Args:
        cid: this side's connection id (32 bits, not 0): the peer addresses packets to it.
        now: the time the connection starts.
        config: the knobs.
        client: True for the side that sends HELLO.
    """

    __slots__ = (
        "_ack_carrier",
        "_ack_confirmed",
        "_ack_deadline",
        "_ack_delay",
        "_ack_eliciting",
        "_ack_mark",
        "_ack_now",
        "_ack_unsent",
        "_assembled",
        "_assembled_charge",
        "_assembling",
        "_bytes_in_flight",
        "_cc",
        "_close_code",
        "_close_deadline",
        "_close_frame",
        "_close_pending",
        "_closed_reported",
        "_config",
        "_confirmed",
        "_datagram",
        "_events",
        "_fresh",
        "_handshake_deadline",
        "_held",
        "_hello_count",
        "_hello_deadline",
        "_hello_pending",
        "_hello_times",
        "_largest_acked",
        "_largest_rx_time",
        "_last_eliciting",
        "_last_lost",
        "_last_rx",
        "_loss_time",
        "_lost",
        "_max_dseq",
        "_next_dseq",
        "_next_pn",
        "_ooo",
        "_ooo_bytes",
        "_peer_ack_delay",
        "_peer_max_dseq",
        "_pending_out",
        "_ping_pending",
        "_pmtu",
        "_probe_pending",
        "_probe_pn",
        "_pto_count",
        "_rcv_next",
        "_retransmit",
        "_rtt",
        "_rx_ranges",
        "_send_buffered",
        "_send_flags",
        "_send_limit",
        "_sent",
        "_token",
        "_unsent",
        "_window_sent",
        "_window_step",
        "bytes_received",
        "bytes_sent",
        "cid",
        "client",
        "corrupt_dropped",
        "datagrams_received",
        "datagrams_sent",
        "duplicate_fragments",
        "duplicates_dropped",
        "losses_detected",
        "messages_received",
        "messages_sent",
        "peer_address",
        "peer_cid",
        "probes_sent",
        "retransmissions",
        "spurious_losses",
        "spurious_retransmissions",
        "state",
    )

    def __init__(self, cid: int, now: float, config: ReliableConfig, *, client: bool) -> None:
        if not 0 < cid <= 0xFFFF_FFFF:
            raise ValueError(f"connection id must be a non-zero 32-bit number, got {cid}")
        self._config = config
        self.cid = cid
        self.client = client
        self.peer_cid = 0
        self.peer_address: object = None
        self.state = _CONNECTING if client else _ESTABLISHED
        self._confirmed = client  # server side: the client has used our cid
        # (event, charge): an ordered message is its bytes until ``next_event()`` wraps it
        self._events: deque[tuple[bytes | ConnectionEvent, int]] = deque()
        self._pending_out: list[bytes] = []
        self._closed_reported = False
        # handshake (client)
        self._token = b""
        self._hello_pending = client
        self._hello_count = 0
        self._hello_deadline = now
        self._hello_times: dict[int, float] = {}
        self._handshake_deadline = now + config.handshake_timeout
        # sending
        self._next_pn = 0
        self._next_dseq = 0
        self._unsent: deque[_Fragment] = deque()
        self._retransmit: deque[_Fragment] = deque()
        self._sent: dict[int, _Sent] = {}
        self._lost: dict[int, _Sent] = {}
        self._send_buffered = 0
        self._peer_max_dseq = 0
        self._send_limit = config.max_message  # and the peer's, once the handshake tells
        self._send_flags = (0 if config.ordered else FLAG_UNORDERED) | FLAG_FIRST | FLAG_LAST
        delay = config.max_ack_delay
        if delay is None:
            delay = DEFAULT_ACK_DELAY if client else DEFAULT_SERVER_ACK_DELAY
        self._ack_delay = delay
        self._peer_ack_delay = delay
        self._bytes_in_flight = 0
        self._largest_acked = -1
        self._last_eliciting = now
        self._loss_time: float | None = None
        self._pto_count = 0
        self._probe_pending = False
        self._ping_pending = False
        self._close_frame: bytes | None = None
        self._close_code: tuple[int, str] = (CloseCode.NORMAL, "")
        self._close_pending = False
        self._close_deadline: float | None = None
        self._rtt = RttEstimator(config.initial_rtt)
        self._cc = CongestionWindow()
        self._pmtu = PathMtu(config.max_datagram)
        self._probe_pn = -1  # the MTU probe in flight
        self._datagram = BASE_DATAGRAM
        # receiving
        self._rx_ranges: list[list[int]] = []
        self._largest_rx_time = now
        self._ack_unsent = False
        self._ack_eliciting = 0
        self._ack_now = False
        self._ack_deadline: float | None = None
        self._ack_carrier = -1
        self._ack_confirmed = True
        self._ack_mark = 0
        self._fresh = False
        self._last_lost = -(1 << 40)
        self._last_rx = now
        self._rcv_next = 0
        self._ooo: dict[int, tuple[int, bytes] | None] = {}
        self._ooo_bytes = 0
        self._assembling: list[bytes | memoryview] = []
        self._assembled = self._assembled_charge = 0
        self._held = 0
        self._max_dseq = self._window_sent = config.window_slots
        self._window_step = config.window_slots // 4  # a window update worth an ACK
        # counters
        self.datagrams_sent = self.datagrams_received = 0
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        self.retransmissions = self.spurious_retransmissions = self.spurious_losses = 0
        self.losses_detected = self.probes_sent = self.corrupt_dropped = 0
        self.duplicates_dropped = self.duplicate_fragments = 0

    @classmethod
    def connect(
        cls, cid: int, now: float, config: ReliableConfig | None = None
    ) -> ReliableConnection:
        """A client connection that starts its handshake at ``now`` (its first HELLO is in
        the next ``datagrams_to_send``)."""
        return cls(cid, now, config or ReliableConfig(), client=True)

    @classmethod
    def accept(
        cls,
        cid: int,
        now: float,
        config: ReliableConfig,
        *,
        peer_cid: int,
        peer_ack_delay: float,
        peer_window: int,
        peer_max_message: int,
        hello_pn: int,
        peer_address: object,
        peer_max_datagram: int = BASE_DATAGRAM,
    ) -> ReliableConnection:
        """The server side of a validated HELLO (``ReliableServerCore`` calls this)."""
        conn = cls(cid, now, config, client=False)
        conn.peer_cid = peer_cid
        conn.peer_address = peer_address
        conn._peer_ack_delay = peer_ack_delay
        conn._peer_max_dseq = peer_window
        conn._send_limit = min(config.max_message, peer_max_message)
        conn._pmtu.start(peer_max_datagram)
        conn._record_pn(hello_pn, now)
        conn._ack_now = True  # the ACCEPT goes at once, acknowledging the HELLO
        conn._events.append((Connected(), 0))
        return conn

    # -- the application's side ---------------------------------------------------------------

    def send(self, message: bytes, channel: Channel | None = None) -> None:
        """Queue ``message`` for reliable delivery on ``channel`` (default: the one
        ``ReliableConfig.ordered`` names).

        Raises:
            LimitExceeded: the message is larger than ``max_message``, or than the peer's
                (known once connected; a larger one queued before that makes the peer
                close the connection with ``PROTOCOL_ERROR``).
            WouldBlock: the send buffer cannot take it now (wait until it drains: see
                ``send_buffered``); an empty buffer always takes one message.
            ClosedResourceError: the connection is closing or closed.
        """
        state = self.state
        if state is not _ESTABLISHED and state is not _CONNECTING:
            raise ClosedResourceError(f"cannot send: the connection is {state.value}")
        size = len(message)
        if size > self._send_limit:
            limit = self._send_limit
            raise LimitExceeded(f"message of {size} bytes exceeds the limit of {limit} bytes")
        units = _units(size)
        charge = size + units * FRAGMENT_CHARGE
        buffered = self._send_buffered
        if buffered and buffered + charge > self._config.send_buffer:
            cap = self._config.send_buffer
            raise WouldBlock(f"send buffer full: {buffered} + {charge} bytes > {cap} bytes")
        if channel is None:
            flags = self._send_flags
        else:
            flags = (FLAG_UNORDERED if channel else 0) | FLAG_FIRST | FLAG_LAST
        dseq = self._next_dseq
        if dseq + units > _MAX_DSEQ:
            self._abort(CloseCode.EXHAUSTED, "data sequence numbers exhausted")
            raise ClosedResourceError("the connection used up its data sequence numbers")
        data = message if message.__class__ is bytes else bytes(message)
        # a message goes whole into the queue; packets take runs of units off its front
        self._unsent.append(_Fragment(dseq, flags, data if units == 1 else memoryview(data)))
        self._next_dseq = dseq + units
        self._send_buffered = buffered + charge
        self.messages_sent += 1

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close cleanly: flush what was sent, then send CLOSE (idempotent).

        A connection still connecting closes at once.
        """
        if self.state is _CONNECTING:
            self._finish(ConnectionClosed(code, reason, by_peer=False))
        elif self.state is _ESTABLISHED:
            self.state = _CLOSING
            self._close_frame = encode_close(code, reason)
            self._close_code = (code, reason)

    def abort(self, code: int = CloseCode.ABORTED, reason: str = "aborted") -> None:
        """Close at once, discarding what is unsent or unacknowledged: one CLOSE goes in the
        next ``datagrams_to_send`` (if the peer's id is known), and the connection is
        CLOSED with a ``ConnectionClosed(by_peer=False)`` event (idempotent)."""
        self._abort(code, reason)

    def next_event(self) -> ConnectionEvent | None:
        """The next event, or None. Taking a message frees its share of the receive buffer."""
        event = self.next_data()
        if type(event) is bytes:
            return MessageReceived(event, Channel.ORDERED)
        return event  # type: ignore[return-value]

    def next_batch(self, limit: int) -> list[bytes] | ConnectionEvent | None:
        """``next_data()`` for adapters that hand messages up in batches: the ordered
        messages at the head of the events as a list, up to ``limit`` bytes (at least one),
        else the next event (as ``next_data()`` has it), else None. Taking messages frees
        their share of the receive buffer."""
        events = self._events
        if not events:
            return None
        event, charge = events[0]
        if type(event) is not bytes:  # an event (or an unordered message): not bytes
            return self.next_data()  # type: ignore[return-value]
        messages: list[bytes] = []
        size = freed = 0
        while True:
            events.popleft()
            messages.append(event)
            size += len(event)
            freed += charge
            if not events or size >= limit:
                break
            event, charge = events[0]
            if type(event) is not bytes:
                break
        if freed:
            self._held -= freed
            self._grow_window()
        return messages

    def next_data(self) -> bytes | ConnectionEvent | None:
        """``next_event()`` for adapters: a message of the ordered channel comes as its
        bytes (no event object per message); everything else as ``next_event()`` has it."""
        if not self._events:
            return None
        event, charge = self._events.popleft()
        if charge:
            self._held -= charge
            self._grow_window()
        return event

    @property
    def send_buffered(self) -> int:
        """Charged bytes of messages sent and not yet acknowledged (``send_buffer`` caps it)."""
        return self._send_buffered

    @property
    def receive_buffered(self) -> int:
        """Charged bytes received and not yet taken with ``next_event()`` (capped by
        ``receive_buffer``)."""
        return self._held + self._ooo_bytes

    @property
    def peer_window(self) -> int:
        """The first data sequence number the peer does not accept yet."""
        return self._peer_max_dseq

    @property
    def datagram_size(self) -> int:
        """The largest datagram this side sends now (``BASE_DATAGRAM`` until a larger size
        is proved by a probe)."""
        return self._datagram

    def limit_datagram(self, size: int) -> None:
        """Send no datagram above ``size`` bytes (at least ``BASE_DATAGRAM``): the adapter
        calls it with what the local interface allows (its MTU less the IP and UDP
        headers), or ``BASE_DATAGRAM`` when it cannot forbid IP fragmentation."""
        if self._pmtu.limit(size):
            self._set_datagram()

    def datagram_too_large(self, datagram: bytes, now: float) -> None:
        """The local stack refused to send ``datagram`` (``EMSGSIZE``): it is larger than
        the interface allows. A probe has failed; data goes again in smaller datagrams."""
        header = check_datagram(datagram)
        if header is None or self.state is _CLOSED:
            return
        pn = header[2]
        record = self._sent.pop(pn, None)
        if record is None:
            return
        if record.flags & _FLAG_PROBE:
            if self._pmtu.probe_lost(record.size, refused=True):
                self._set_datagram()
            return
        self._bytes_in_flight -= record.size
        for fragment in record.fragments:  # as if lost, with no congestion response
            if not fragment.acked and fragment.last_pn == pn:
                fragment.last_pn = -1
                self._retransmit.append(fragment)
        if record.flags & _FLAG_CLOSE:
            self._close_pending = True
        if self._pmtu.refused(record.size):
            self._set_datagram()

    # -- the adapter's side -------------------------------------------------------------------

    def datagram_received(self, data: bytes, now: float) -> None:
        """Take one datagram from the peer (``bytes``: parts of a message being reassembled
        may stay views of it)."""
        header = check_datagram(data)
        if header is None:
            self.corrupt_dropped += 1
            return
        ptype, dcid, pn = header
        if dcid != self.cid:
            self.corrupt_dropped += 1
            return
        self.packet_received(data, ptype, pn, now)

    def packet_received(self, data: bytes, ptype: int, pn: int, now: float) -> None:
        """Take a datagram whose checksum, version and destination were checked already."""
        if len(data) > self._config.max_datagram:
            self.corrupt_dropped += 1  # larger than this side announced it accepts
            return
        self.datagrams_received += 1
        self.bytes_received += len(data)
        state = self.state
        if state is _CLOSED:
            return
        offset = HEADER.size
        if ptype == _T_DATA:
            if state is _CONNECTING:
                return
            self._confirmed = True
        elif ptype == _T_ACCEPT:
            if not self.client or len(data) < OVERHEAD + PARAMS.size:
                return
            if state is _CONNECTING:
                self._establish(*PARAMS.unpack_from(data, offset))
            offset += PARAMS.size
        elif ptype == _T_HELLO and not self.client:
            self._last_rx = now  # the client repeats HELLO: our ACCEPT was lost
            self._record_pn(pn, now)
            self._ack_unsent = self._ack_now = True
            return
        else:
            if state is _CONNECTING:
                self._handshake_reply(data, ptype, pn, now)
            return
        self._last_rx = now
        order = self._record_pn(pn, now)
        if order == _DUPLICATE:
            self.duplicates_dropped += 1
            # repeat the acknowledgement (ours may have been lost), unless it was only an ACK
            self._ack_now = self._ack_now or not _only_ack(data, offset)
            return
        try:
            # an ACK in the newest packet from the peer was made when it was sent: fresh
            self._fresh = pn == self._rx_ranges[0][1]
            eliciting = self._read_frames(data, offset, now)
        except (ProtocolError, struct.error, ValueError) as exc:
            self._abort(CloseCode.PROTOCOL_ERROR, f"malformed packet: {exc}")
            return
        if eliciting and self.state is not _CLOSED:
            self._ack_eliciting += 1
            top = self._rx_ranges[0]
            if (
                order == _DISORDER
                or self._ack_eliciting >= _ELICITING_BEFORE_ACK
                or (top[1] - top[0] < PACKET_THRESHOLD and len(self._rx_ranges) > 1)
            ):
                self._ack_now = True  # after a recent gap the sender must hear at once
            elif self._ack_deadline is None:
                self._ack_deadline = now + self._ack_delay

    def datagrams_to_send(self, now: float, limit: int | None = None) -> list[bytes]:
        """The datagrams to send now (acknowledgements, data, probes, handshake, close).

        Args:
            now: the time.
            limit: at most this many datagrams of data (None: as many as the windows
                allow). An adapter that sends in bursts of bounded size (so a whole
                congestion window does not overflow a socket buffer at once) calls again
                on its next turn; what did not go stays queued.
        """
        out = self._pending_out
        self._pending_out = []
        state = self.state
        if state is _CLOSED:
            return out
        if state is _CONNECTING:
            if self._hello_pending:
                out.append(self._hello(now))
            return out
        if state is _CLOSING and self._close_deadline is None and not self._send_buffered:
            self._close_pending = True  # everything sent was acknowledged: now CLOSE
            self._close_deadline = now + _CLOSE_PTOS * self._rtt.pto(self._peer_ack_delay)
        first = True
        budget = -1 if limit is None else limit
        while budget and (
            # what _packet needs to send anything (cheaper than the call that finds nothing)
            self._unsent
            or self._retransmit
            or self._ack_unsent
            or self._probe_pending
            or self._ping_pending
            or self._close_pending
        ):
            packet = self._packet(now, first)
            if packet is None:
                break
            out.append(packet)
            first = False
            budget -= 1
        if budget and state is _ESTABLISHED and self._confirmed and not self._pmtu.probe:
            size = self._pmtu.next_probe(now)
            if size:
                out.append(self._mtu_probe(now, size))
                if self.state is not _CLOSED:
                    out.append(self._ping_packet(now))
        if self._pending_out:  # the connection failed while building (numbers ran out)
            out += self._pending_out
            self._pending_out = []
        return out

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` should run next (None: never, the connection is closed)."""
        state = self.state
        if state is _CLOSED:
            return None
        if state is _CONNECTING:
            return min(self._hello_deadline, self._handshake_deadline)
        # (comparisons, not min(): this runs after every datagram in and every batch out)
        last_rx = self._last_rx
        config = self._config
        deadline = last_rx + config.idle_timeout
        other = self._close_deadline
        if other is not None and other < deadline:
            deadline = other
        other = self._ack_deadline
        if other is not None and other < deadline:
            deadline = other
        other = self._loss_deadline()
        if other is not None and other < deadline:
            deadline = other
        keepalive = config.keepalive
        if keepalive is not None and state is _ESTABLISHED:
            other = (
                last_rx if last_rx > self._last_eliciting else self._last_eliciting
            ) + keepalive
            if other < deadline:
                deadline = other
        return deadline

    def handle_timer(self, now: float) -> None:
        """Run whatever is due at ``now`` (nothing if nothing is)."""
        state = self.state
        if state is _CLOSED:
            return
        if state is _CONNECTING:
            self._handshake_timer(now)
            return
        if now >= self._last_rx + self._config.idle_timeout:
            self._finish(ConnectionTimedOut("idle"))
            return
        if self._close_deadline is not None and now >= self._close_deadline:
            self._finish(ConnectionClosed(*self._close_code, by_peer=False))
            return
        if self._ack_deadline is not None and now >= self._ack_deadline:
            self._ack_now = True
        if self._loss_time is not None:
            if now >= self._loss_time:
                self._detect_losses(now)
        else:
            probe_at = self._loss_deadline()
            if probe_at is not None and now >= probe_at:
                self._probe(now)
        keepalive = self._config.keepalive
        if (
            keepalive is not None
            and state is _ESTABLISHED
            and now >= max(self._last_rx, self._last_eliciting) + keepalive
        ):
            self._ping_pending = True
            self._last_eliciting = now

    def statistics(self) -> ReliableStatistics:
        """Return a snapshot of the counters and estimates."""
        rtt = self._rtt
        return ReliableStatistics(
            datagrams_sent=self.datagrams_sent,
            datagrams_received=self.datagrams_received,
            bytes_sent=self.bytes_sent,
            bytes_received=self.bytes_received,
            messages_sent=self.messages_sent,
            messages_received=self.messages_received,
            retransmissions=self.retransmissions,
            spurious_retransmissions=self.spurious_retransmissions,
            spurious_losses=self.spurious_losses,
            losses_detected=self.losses_detected,
            probes_sent=self.probes_sent,
            corrupt_dropped=self.corrupt_dropped,
            duplicates_dropped=self.duplicates_dropped,
            duplicate_fragments=self.duplicate_fragments,
            smoothed_rtt=rtt.smoothed_rtt,
            rttvar=rtt.rttvar,
            min_rtt=rtt.min_rtt,
            latest_rtt=rtt.latest_rtt,
            congestion_window=self._cc.window,
            bytes_in_flight=self._bytes_in_flight,
            send_buffered=self._send_buffered,
            receive_buffered=self.receive_buffered,
            datagram_size=self._datagram,
            mtu_probes_sent=self._pmtu.probes_sent,
            mtu_probes_lost=self._pmtu.probes_lost,
            datagram_fallbacks=self._pmtu.fallbacks,
        )

    # -- handshake ----------------------------------------------------------------------------

    def _hello(self, now: float) -> bytes:
        self._hello_pending = False
        pn = self._take_pn()
        self._hello_deadline = now + self._rtt.backoff(0.0, self._hello_count)
        if len(self._hello_times) >= 8:
            del self._hello_times[next(iter(self._hello_times))]
        self._hello_times[pn] = now
        config = self._config
        packet = encode_hello(
            self.cid,
            pn,
            self._delay_units,
            self._max_dseq,
            config.max_message,
            self._token,
            config.max_datagram,
        )
        self._count_sent(packet)
        return packet

    def _handshake_timer(self, now: float) -> None:
        if now >= self._handshake_deadline:
            self._finish(ConnectionTimedOut("handshake"))
        elif now >= self._hello_deadline:
            self._hello_pending = True
            self._hello_count += 1
            self._hello_deadline = self._handshake_deadline  # until it is sent

    def _handshake_reply(self, data: bytes, ptype: int, pn: int, now: float) -> None:
        """A COOKIE or REFUSE while connecting (anything else is ignored)."""
        body = HEADER.size
        end = len(data) - CRC.size
        if ptype == _T_COOKIE and end > body:
            length = data[body]
            if body + 1 + length != end:
                return
            sent = self._hello_times.pop(pn, None)
            if sent is not None:
                self._rtt.update(now - sent, 0.0)
            self._token = data[body + 1 : end]
            self._hello_pending = True
            self._hello_count = 0
            self._hello_deadline = self._handshake_deadline  # until it is sent
        elif ptype == _T_REFUSE and end >= body + CLOSE.size and data[body] == _F_CLOSE:
            try:
                code, reason, _ = decode_close(data, body)
            except (ProtocolError, struct.error):
                return
            self._finish(ConnectionClosed(code, reason, by_peer=True))

    def _establish(
        self, server_cid: int, ack_delay: int, window: int, max_message: int, max_datagram: int
    ) -> None:
        self.peer_cid = server_cid
        self._peer_ack_delay = ack_delay * _ACK_DELAY_UNIT
        self._peer_max_dseq = max(self._peer_max_dseq, window)
        self._send_limit = min(self._config.max_message, max_message)
        self._pmtu.start(max_datagram)
        self.state = _ESTABLISHED
        self._ack_now = True  # tell the server at once that its cid is in use
        self._events.append((Connected(), 0))

    # -- receiving ----------------------------------------------------------------------------

    def _record_pn(self, pn: int, now: float) -> int:
        """Remember a received packet number: ``_DUPLICATE``, ``_IN_ORDER`` or
        ``_DISORDER`` (after a gap, or reordered)."""
        ranges = self._rx_ranges
        if not ranges:
            ranges.append([pn, pn])
            self._largest_rx_time = now
            self._ack_unsent = True
            return _IN_ORDER
        top = ranges[0]
        if pn == top[1] + 1:
            top[1] = pn
            self._largest_rx_time = now
            self._ack_unsent = True
            return _IN_ORDER
        if pn > top[1]:
            ranges.insert(0, [pn, pn])
            del ranges[MAX_ACK_RANGES:]
            self._largest_rx_time = now
            self._ack_unsent = True
            return _DISORDER
        if self._record_old_pn(pn):
            self._ack_unsent = True
            return _DISORDER
        return _DUPLICATE

    def _record_old_pn(self, pn: int) -> bool:
        ranges = self._rx_ranges
        for i, (low, high) in enumerate(ranges):
            if pn > high:  # in the gap above this range (below ranges[i - 1])
                above = ranges[i - 1]
                if pn == high + 1:
                    ranges[i][1] = pn
                    if pn + 1 == above[0]:
                        above[0] = low
                        del ranges[i]
                elif pn + 1 == above[0]:
                    above[0] = pn
                else:
                    ranges.insert(i, [pn, pn])
                    del ranges[MAX_ACK_RANGES:]
                return True
            if pn >= low:
                return False
        if len(ranges) < MAX_ACK_RANGES:
            if pn + 1 == ranges[-1][0]:
                ranges[-1][0] = pn
            else:
                ranges.append([pn, pn])
        return True  # older than what is remembered: fragments are deduplicated by dseq

    def _read_frames(self, data: bytes, offset: int, now: float) -> bool:
        """Process the frames of a packet; return True if it elicits an acknowledgement."""
        end = len(data) - CRC.size
        eliciting = False
        view: memoryview | None = None
        while offset < end:
            frame = data[offset]
            if frame == _F_MSG:
                _, flags, dseq, length = MSG.unpack_from(data, offset)
                offset += MSG.size
                stop = offset + length
                if stop > end:
                    raise ProtocolError("MSG frame runs past the packet")
                # a run of at least half the datagram is a view of it (no copy until the
                # message is whole); a smaller one is copied out, so that what is held
                # never keeps more than twice its size alive
                if 2 * length >= end:
                    if view is None:
                        view = memoryview(data)
                    self._on_fragment(flags, dseq, view[offset:stop])
                else:
                    self._on_fragment(flags, dseq, data[offset:stop])
                offset = stop
                eliciting = True
            elif frame == _F_ACK:
                largest, delay, window, ranges, offset = decode_ack(data, offset)
                if offset > end:
                    raise ProtocolError("ACK frame runs past the packet")
                self._on_ack(largest, delay * _ACK_DELAY_UNIT, window, ranges, now)
            elif frame == _F_PING:
                offset += 1
                eliciting = True
                self._ack_now = True  # a probe or keepalive: answer at once
            elif frame == _F_CLOSE:
                code, reason, offset = decode_close(data, offset)
                self._on_close(code, reason, now)
                return True
            elif frame == _F_PADDING:
                break
            else:
                raise ProtocolError(f"unknown frame type {frame}")
        return eliciting

    def _on_fragment(self, flags: int, dseq: int, payload: bytes | memoryview) -> None:
        """A run of units (``dseq`` and on) of one message (a view of the datagram, if it
        is at least half of it)."""
        if self.state is _DRAINING:
            return
        size = len(payload)
        units = _units(size)
        if not flags & FLAG_LAST and size != units * UNIT:
            raise ProtocolError("a MSG frame that does not end its message is not whole units")
        end = dseq + units
        rcv_next = self._rcv_next
        if end <= rcv_next:
            self.duplicate_fragments += 1
            return
        if end > self._max_dseq:
            raise ProtocolError(f"fragment {end - 1} beyond the window {self._max_dseq}")
        if dseq < rcv_next:  # its start came in a smaller run (resent after a fallback)
            payload = payload[(rcv_next - dseq) * UNIT :]
            flags &= ~FLAG_FIRST
            dseq = rcv_next
        if dseq == rcv_next:
            if flags & 3 == 3 and not self._assembling and not self._ooo:
                self._rcv_next = end  # the common case: a whole message, in order
                self._deliver(payload, flags, len(payload) + units * FRAGMENT_CHARGE)
                return
            self._in_order(flags, payload, end)
            if self._ooo:
                self._advance()
            return
        self._hold(flags, dseq, payload, end)

    def _in_order(self, flags: int, payload: bytes | memoryview, end: int) -> None:
        """Take a run that starts at the cumulative point and ends before ``end``."""
        start = self._rcv_next
        self._rcv_next = end
        ooo = self._ooo
        if ooo and end - start > 1:  # units of this run held already, from smaller runs
            for n in range(start + 1, end):
                if n in ooo and (entry := ooo.pop(n)) is not None:
                    self._ooo_bytes -= len(entry[1]) + FRAGMENT_CHARGE
        self._append(flags, payload, len(payload) + (end - start) * FRAGMENT_CHARGE)

    def _append(self, flags: int, payload: bytes | memoryview, charge: int) -> None:
        """Add an in-order run to the message being assembled; deliver it when whole."""
        assembling = self._assembling
        if flags & 3 == 3 and not assembling:
            self._deliver(payload, flags, charge)
            return
        if bool(flags & FLAG_FIRST) == bool(assembling):
            raise ProtocolError("fragment flags do not frame a message")
        if type(payload) is memoryview and 2 * len(payload) < len(cast(bytes, payload.obj)):
            payload = bytes(payload)  # a run cut down to its new units: keep no datagram alive
        self._held += charge
        assembling.append(payload)
        self._assembled += len(payload)
        self._assembled_charge += charge
        if self._assembled > self._config.max_message:
            raise ProtocolError("message above max_message")
        if flags & FLAG_LAST:
            message = assembling[0] if len(assembling) == 1 else b"".join(assembling)
            charge = self._assembled_charge
            self._held -= charge
            self._deliver(message, flags, charge)
            assembling.clear()
            self._assembled = self._assembled_charge = 0

    def _hold(self, flags: int, dseq: int, payload: bytes | memoryview, end: int) -> None:
        """Keep a run that arrived ahead of the cumulative point, one entry per unit (each
        a copy: a unit held must not keep its whole datagram alive)."""
        ooo = self._ooo
        if end - dseq == 1:
            if dseq in ooo:
                self.duplicate_fragments += 1
                return
            ooo[dseq] = (flags, bytes(payload))
            self._ooo_bytes += len(payload) + FRAGMENT_CHARGE
        else:
            fresh = False
            channel = flags & FLAG_UNORDERED
            last = end - 1
            for i, n in enumerate(range(dseq, end)):
                if n in ooo:
                    continue
                piece = bytes(payload[i * UNIT : (i + 1) * UNIT])
                edge = (flags & FLAG_FIRST if n == dseq else 0) | (
                    flags & FLAG_LAST if n == last else 0
                )
                ooo[n] = (channel | edge, piece)
                self._ooo_bytes += len(piece) + FRAGMENT_CHARGE
                fresh = True
            if not fresh:
                self.duplicate_fragments += 1
                return
        if flags & FLAG_UNORDERED:
            self._deliver_unordered(dseq)

    def _deliver(self, payload: bytes | memoryview, flags: int, charge: int) -> None:
        if type(payload) is not bytes:
            payload = bytes(payload)  # the one copy of a run that was a view of its datagram
        self._held += charge
        self.messages_received += 1
        if flags & FLAG_UNORDERED:
            self._events.append((MessageReceived(payload, Channel.UNORDERED), charge))
        else:
            self._events.append((payload, charge))

    def _advance(self) -> None:
        """Move the cumulative point over units held, delivering whole messages."""
        ooo = self._ooo
        n = self._rcv_next
        while n in ooo:
            entry = ooo.pop(n)
            n += 1
            if entry is None:
                continue  # part of an unordered message delivered already
            flags, payload = entry
            charge = len(payload) + FRAGMENT_CHARGE
            self._ooo_bytes -= charge
            self._rcv_next = n
            self._append(flags, payload, charge)
        self._rcv_next = n

    def _deliver_unordered(self, dseq: int) -> None:
        """Deliver the unordered message around ``dseq`` if all its fragments are held."""
        ooo = self._ooo
        first = dseq
        while True:
            entry = ooo.get(first)
            if entry is None:
                return
            if entry[0] & FLAG_FIRST:
                break
            first -= 1
        last = dseq
        while True:
            entry = ooo.get(last)
            if entry is None:
                return
            if entry[0] & FLAG_LAST:
                break
            last += 1
        pieces: list[bytes] = []
        for n in range(first, last + 1):
            entry = ooo[n]
            assert entry is not None
            pieces.append(entry[1])
            ooo[n] = None
        message = b"".join(pieces)
        if len(message) > self._config.max_message:
            raise ProtocolError("message above max_message")
        charge = len(message) + len(pieces) * FRAGMENT_CHARGE
        self._ooo_bytes -= charge
        self._deliver(message, FLAG_UNORDERED, charge)

    def _grow_window(self) -> None:
        """Open the window as the application takes messages; announce a large change."""
        free = (self._config.receive_buffer - self._held - self._ooo_bytes) // _SLOT
        limit = self._rcv_next + free
        if limit > self._max_dseq:
            self._max_dseq = limit
            if limit - self._window_sent >= self._window_step:
                self._ack_now = True
                self._ack_unsent = bool(self._rx_ranges)

    def _on_close(self, code: int, reason: str, now: float) -> None:
        if self.state is _DRAINING:
            return
        self._finish(ConnectionClosed(code, reason, by_peer=True), keep=True)
        self.state = _DRAINING
        self._ack_now = True
        self._close_deadline = now + _CLOSE_PTOS * self._rtt.pto(self._peer_ack_delay)

    # -- acknowledgements and loss ------------------------------------------------------------

    def _on_ack(
        self, largest: int, delay: float, window: int, ranges: list[tuple[int, int]], now: float
    ) -> None:
        if window > self._peer_max_dseq:
            self._peer_max_dseq = window
        if largest >= self._next_pn:
            raise ProtocolError(f"ACK of packet {largest}, never sent")
        sent = self._sent
        previous = self._largest_acked
        acked: list[_Sent] = []
        sample: _Sent | None = None
        if largest > previous:
            self._largest_acked = largest
            for low, high in ranges:
                if high <= previous:
                    break
                for pn in range(max(low, previous + 1), high + 1):
                    record = sent.pop(pn, None)
                    if record is not None:
                        acked.append(record)
                        if pn == largest:
                            sample = record
        if sent and previous >= 0:
            old = []
            for pn in sent:
                if pn > previous:
                    break
                if _covered(pn, ranges):
                    old.append(pn)
            acked.extend(sent.pop(pn) for pn in old)
        if self._lost:
            self._late_acks(ranges)
        if not acked:
            if self._fresh and sent and self._bytes_in_flight <= MIN_WINDOW:
                self._detect_losses(now, fresh=True)
            return
        if not self._ack_confirmed and _covered(self._ack_carrier, ranges):
            self._ack_confirmed = True  # the peer has our acknowledgements up to then
            if len(self._rx_ranges) > 1:
                self._prune_ranges()
        if sample is not None:
            self._rtt.update(now - sample.time, delay)
        for record in acked:
            self._acked(record)
        self._pto_count = 0
        self._detect_losses(now, fresh=self._fresh and self._bytes_in_flight <= MIN_WINDOW)

    def _acked(self, record: _Sent) -> None:
        size = record.size
        flags = record.flags
        if flags & _FLAG_PROBE:  # outside the congestion window
            if self._pmtu.probe_acked(size):
                self._set_datagram()
            return
        self._bytes_in_flight -= size
        self._cc.on_acked(size, record.time)
        for fragment in record.fragments:
            if fragment.acked:
                self.spurious_retransmissions += 1
            else:
                fragment.acked = True
                self._send_buffered -= _charge_of(len(fragment.payload))
        if size > BASE_DATAGRAM:
            self._pmtu.acked(record.pn, size)
        if flags & _FLAG_CLOSE and self.state is _CLOSING:
            self._finish(ConnectionClosed(*self._close_code, by_peer=False))

    def _late_acks(self, ranges: list[tuple[int, int]]) -> None:
        """Packets declared lost and acknowledged after all: the loss was spurious."""
        lowest, highest = ranges[-1][0], ranges[0][1]  # ranges descend
        late = [pn for pn in self._lost if lowest <= pn <= highest and _covered(pn, ranges)]
        for pn in late:
            record = self._lost.pop(pn)
            if record.flags & _FLAG_PROBE:  # the size works after all
                if self._pmtu.probe_acked(record.size):
                    self._set_datagram()
                continue
            self.spurious_losses += 1
            for fragment in record.fragments:
                if fragment.acked:
                    self.spurious_retransmissions += 1
                else:
                    fragment.acked = True
                    self._send_buffered -= _charge_of(len(fragment.payload))

    def _detect_losses(self, now: float, *, fresh: bool = False) -> None:
        """Declare lost what the packet or time threshold says (RFC 9002 section 6.1).

        With ``fresh`` (the ACK came in the newest packet from the peer, so it tells what
        the peer had when it sent it), the time threshold also applies to packets above
        the largest acknowledged: one sent ``loss_delay`` before now would have been in
        that ACK had it arrived (the RACK idea of RFC 8985). A request-reply exchange thus
        sees a lost reply from the next request, without waiting for a probe. The caller
        passes it only while at most ``MIN_WINDOW`` bytes are in flight: a sender that
        fills the path may have packets waiting in a queue longer than that.
        """
        self._loss_time = None
        sent = self._sent
        largest = self._largest_acked
        delay = self._rtt.loss_delay()
        lost = []
        for pn, record in sent.items():
            if pn > largest:
                if fresh and record.time + delay <= now:
                    lost.append(pn)
                    continue
                break
            # the same expression as the timer's deadline, so float rounding cannot leave
            # a deadline in the past with nothing due
            if record.time + delay <= now or largest - pn >= PACKET_THRESHOLD:
                lost.append(pn)
            else:
                self._loss_time = record.time + delay
                break
        probe = self._probe_pn  # lost once a packet sent after it is acknowledged: a PING
        if 0 <= probe < largest and probe in sent and probe not in lost:  # follows each
            lost.append(probe)
        burst = []
        for pn in lost:
            record = sent.pop(pn)
            self._on_lost(pn, record, now)
            if not record.flags & _FLAG_PROBE:
                burst.append((pn, record.size))
        if burst and self._datagram > BASE_DATAGRAM:
            self._pmtu.loss_burst(burst)  # perhaps a black hole: see pmtu.py

    def _on_lost(self, pn: int, record: _Sent, now: float) -> None:
        if record.flags & _FLAG_PROBE:  # too large, or lost like any packet: no congestion
            if self._pmtu.probe_lost(record.size):
                self._set_datagram()  # the current size failed its confirmation
            self._lost[pn] = record  # a late acknowledgement still proves the size
            if len(self._lost) > _MAX_LOST:
                del self._lost[next(iter(self._lost))]
            return
        self.losses_detected += 1
        self._last_lost = max(self._last_lost, pn)
        self._bytes_in_flight -= record.size
        for fragment in record.fragments:
            if not fragment.acked and fragment.last_pn == pn:
                fragment.last_pn = -1
                self._retransmit.append(fragment)
        if record.flags & _FLAG_CLOSE:
            self._close_pending = True
        self._cc.on_lost(record.time, now)
        self._lost[pn] = record
        if len(self._lost) > _MAX_LOST:
            del self._lost[next(iter(self._lost))]

    def _loss_deadline(self) -> float | None:
        """The loss timer, else the probe timer (also armed while the window blocks)."""
        if self._loss_time is not None:
            return self._loss_time
        blocked = bool(self._unsent) and self._unsent[0].dseq >= self._peer_max_dseq
        if not self._sent and not blocked:
            return None
        return self._last_eliciting + self.probe_timeout

    @property
    def _delay_units(self) -> int:
        """This side's max ack delay as it travels (100 us units)."""
        return round(self._ack_delay / _ACK_DELAY_UNIT)

    @property
    def probe_timeout(self) -> float:
        """The current probe timeout, with its back-off (seconds)."""
        delay = 0.0 if self._in_recovery() else self._peer_ack_delay
        if self._pto_count:
            return self._rtt.backoff(delay, self._pto_count)
        return self._rtt.pto(delay)

    def _in_recovery(self) -> bool:
        """True while the newest packet sent is within ``PACKET_THRESHOLD`` of the last one
        lost: the peer then sees a recent gap and acknowledges at once, without its ack
        delay, so the probe timeout leaves that delay out and a lost retransmission is
        probed (with its data) after about one round trip."""
        return 0 <= self._next_pn - 1 - self._last_lost <= PACKET_THRESHOLD

    def _probe(self, now: float) -> None:
        """The probe timer expired: one probe goes out, and the timer backs off.

        Outside recovery the probe is a PING (the peer acknowledges it at once, and the
        acknowledgement shows what was lost): a late acknowledgement is the usual cause of
        a timeout there, and resending data would be spurious. In recovery, the data of the
        newest packet goes again.
        """
        recovering = self._in_recovery()
        self._pto_count += 1
        self.probes_sent += 1
        self._probe_pending = True
        self._last_eliciting = now
        if self._pto_count >= _PERSISTENT_CONGESTION:
            self._cc.on_persistent_congestion(now)
            if self._pmtu.persistent_congestion():
                self._set_datagram()  # perhaps only the large datagrams are dropped
        if not recovering or self._retransmit or not self._sent or self._pto_count < 2:
            return
        newest = self._sent[next(reversed(self._sent))]
        for fragment in reversed(newest.fragments):
            if not fragment.acked and fragment.last_pn >= 0:
                fragment.last_pn = -1
                self._retransmit.appendleft(fragment)

    # -- building packets ---------------------------------------------------------------------

    def _take_pn(self) -> int:
        pn = self._next_pn
        if pn >= _MAX_PN:
            self._abort(CloseCode.EXHAUSTED, "packet numbers exhausted")
        self._next_pn = pn + 1
        return pn

    def _count_sent(self, packet: bytes) -> None:
        self.datagrams_sent += 1
        self.bytes_sent += len(packet)

    def _ack_due(self, now: float) -> bool:
        if not self._ack_unsent:
            return False
        deadline = self._ack_deadline
        return self._ack_now or (deadline is not None and now >= deadline)

    def _packet(self, now: float, first: bool) -> bytes | None:
        """Build the next datagram, or return None if nothing needs to go now.

        An ACK goes in whenever something received is unacknowledged; an acknowledgement
        the peer has not confirmed is repeated in the first packet of each batch that goes
        anyway. With data to follow, the ACK is cut to the ranges that leave room for the
        next fragment. A probe timer's packet is at most ``BASE_DATAGRAM`` bytes, so that it
        passes a path that stopped carrying large datagrams (and reveals the black hole).
        """
        data, control = self._wants(now)
        if not (data or control or self._ack_due(now)):
            return None
        pn = self._take_pn()
        if self.state is _CLOSED:
            return None
        parts, size = self._header(pn)
        cap = BASE_DATAGRAM if self._probe_pending else self._datagram
        with_ack = self._ack_unsent or (
            first and (data or control) and not self._ack_confirmed and bool(self._rx_ranges)
        )
        if with_ack:
            ack = self._ack_frame(now, self._ack_space(size, cap) if data else cap - size)
            parts.append(ack)
            size += len(ack)
        bare = len(parts)
        fragments: list[_Fragment] = []
        if data:
            size = self._fill(parts, fragments, size, pn, cap)
            if (
                fragments
                and not self._unsent
                and not self._retransmit
                and self._bytes_in_flight + size > _DRAIN_PING
                and size < cap
            ):
                parts.append(_PING_FRAME)  # the last of a bulk: no delayed acknowledgement
                size += 1
        flags = (
            self._control_frames(parts, size, bool(fragments), cap)
            if control or self._close_pending
            else 0
        )
        if len(parts) == bare and not with_ack:
            return None  # nothing fitted (cannot happen with the sizes chosen): stop here
        self._probe_pending = False
        packet = seal(parts)
        if fragments or flags:
            self._ping_pending = False
            self._in_flight(now, pn, packet, fragments, flags, with_ack)
        self._count_sent(packet)
        return packet

    def _wants(self, now: float) -> tuple[bool, bool]:
        """Whether data, and whether a control frame (probe, PING, CLOSE), should go now."""
        if self.state is _DRAINING:
            return False, False  # only acknowledgements, when due
        probe = self._probe_pending
        if not (probe or self._bytes_in_flight + self._datagram <= self._cc.window):
            data = False
        else:
            unsent = self._unsent
            data = bool(self._retransmit) or (
                bool(unsent) and unsent[0].dseq < self._peer_max_dseq
            )
        return data, probe or self._ping_pending or self._close_pending

    def _header(self, pn: int) -> tuple[list[bytes | memoryview], int]:
        """The first parts of a packet and their size (an ACCEPT until confirmed)."""
        if self._confirmed:
            return [HEADER.pack(VERSION, _T_DATA, self.peer_cid, pn)], OVERHEAD
        config = self._config
        params = PARAMS.pack(
            self.cid, self._delay_units, self._max_dseq, config.max_message, config.max_datagram
        )
        return [HEADER.pack(VERSION, _T_ACCEPT, self.peer_cid, pn), params], OVERHEAD + len(params)

    def _control_frames(
        self, parts: list[bytes | memoryview], size: int, has_data: bool, cap: int
    ) -> int:
        """Add CLOSE (if due and it fits), or a PING for a probe or keepalive; the flags."""
        flags = 0
        close = self._close_frame
        if self._close_pending and close is not None and size + len(close) <= cap:
            parts.append(close)
            self._close_pending = False
            flags |= _FLAG_CLOSE
        if (self._probe_pending or self._ping_pending) and not (has_data or flags):
            parts.append(_PING_FRAME)
            flags |= _FLAG_PING
        return flags

    def _in_flight(
        self,
        now: float,
        pn: int,
        packet: bytes,
        fragments: list[_Fragment],
        flags: int,
        with_ack: bool,
    ) -> None:
        """Remember an ack-eliciting packet until it is acknowledged or lost."""
        if with_ack:  # repeated in every packet until the peer acknowledges one
            self._ack_carrier = pn
            self._ack_confirmed = False
            self._ack_mark = self._rx_ranges[0][0]
        self._sent[pn] = _Sent(pn, now, len(packet), fragments, flags)
        self._bytes_in_flight += len(packet)
        self._last_eliciting = now

    def _prune_ranges(self) -> None:
        """Forget the ranges below the top one of an ACK the peer has acknowledged: it
        knows them (QUIC's ack-of-ack), and gaps never fill since packet numbers are never
        reused. Without this every ACK would carry ``MAX_ACK_RANGES`` ranges after that
        many losses."""
        mark = self._ack_mark
        ranges = self._rx_ranges
        while len(ranges) > 1 and ranges[-1][1] < mark:
            ranges.pop()

    def _ack_space(self, size: int, cap: int) -> int:
        """Bytes an ACK may take in a packet of ``size`` bytes so far that will carry the
        next fragment to send (or one unit of it)."""
        queue = self._retransmit or self._unsent
        payload = min(len(queue[0].payload), UNIT) if queue else 0
        return cap - size - MSG.size - payload

    def _ack_frame(self, now: float, space: int) -> bytes:
        self._grow_window()
        delay = round((now - self._largest_rx_time) / _ACK_DELAY_UNIT)
        frame = encode_ack(self._rx_ranges, delay, self._max_dseq, space)
        self._window_sent = self._max_dseq
        self._ack_unsent = False
        self._ack_now = False
        self._ack_eliciting = 0
        self._ack_deadline = None
        return frame

    def _fill(
        self,
        parts: list[bytes | memoryview],
        fragments: list[_Fragment],
        size: int,
        pn: int,
        cap: int,
    ) -> int:
        """Add runs to resend, then new ones, while they fit in ``cap`` bytes; return the
        size.

        New messages are cut to fill the packet (runs of whole units, up to the peer's
        window); a run to resend goes as it went, unless the datagram size fell below it,
        when it is cut in place into runs that fit (not for a probe timer's small packet).
        """
        pack = MSG.pack
        retransmit = self._retransmit
        while retransmit:
            fragment = retransmit[0]
            if fragment.acked:
                retransmit.popleft()
                continue
            need = MSG.size + len(fragment.payload)
            if size + need > cap:
                if _FIT + len(fragment.payload) <= cap or cap < self._datagram:
                    return size  # it fits the next packet
                self._cut_retransmit(fragment)
                need = MSG.size + len(fragment.payload)
                if size + need > cap:
                    return size
            retransmit.popleft()
            parts.append(pack(_F_MSG, fragment.flags, fragment.dseq, len(fragment.payload)))
            parts.append(fragment.payload)
            fragment.last_pn = pn
            fragments.append(fragment)
            size += need
            self.retransmissions += 1
        unsent = self._unsent
        limit = self._peer_max_dseq
        while unsent:
            fragment = unsent[0]
            dseq = fragment.dseq
            if dseq >= limit:
                return size
            payload = fragment.payload
            length = len(payload)
            room = cap - size - MSG.size
            if length <= room and (length <= UNIT or dseq + _units(length) <= limit):
                unsent.popleft()
            else:  # cut a run of whole units off the front of the message
                units = min(room // UNIT, limit - dseq)
                if units <= 0:
                    return size
                length = units * UNIT
                piece = _Fragment(dseq, fragment.flags & ~FLAG_LAST, payload[:length])
                fragment.dseq = dseq + units
                fragment.flags &= ~FLAG_FIRST
                fragment.payload = payload[length:]
                fragment = piece
            parts.append(pack(_F_MSG, fragment.flags, dseq, length))
            parts.append(fragment.payload)
            fragment.last_pn = pn
            fragments.append(fragment)
            size += MSG.size + length
        return size

    def _cut_retransmit(self, fragment: _Fragment) -> None:
        """Cut a run queued to resend, which no longer fits a datagram, into runs that do:
        ``fragment`` keeps the first, the others follow it in the queue. (An
        acknowledgement of the whole run sent before then counts for the first only; the
        others are resent, harmlessly.)"""
        fit = max(1, (self._datagram - _FIT - 2 * ACK_RANGE.size) // UNIT) * UNIT
        payload = fragment.payload
        pieces = [
            _Fragment(
                fragment.dseq + start // UNIT,
                fragment.flags & ~FLAG_FIRST,
                payload[start : start + fit],
            )
            for start in range(fit, len(payload), fit)
        ]
        for piece in pieces[:-1]:
            piece.flags &= ~FLAG_LAST
        if pieces:
            fragment.flags &= ~FLAG_LAST
        fragment.payload = payload[:fit]
        retransmit = self._retransmit
        retransmit.popleft()  # ``fragment``, at the front
        retransmit.extendleft(reversed(pieces))
        retransmit.appendleft(fragment)

    def _mtu_probe(self, now: float, size: int) -> bytes:
        """A path MTU probe of ``size`` bytes: a PING padded, ack-eliciting, carrying no
        data (see ``pmtu.py``). It is outside the congestion window (one at a time, and
        neither its loss nor its acknowledgement moves the window), but in ``_sent``, so
        the loss detection and probe timer that find every loss find its loss too."""
        pn = self._probe_pn = self._take_pn()
        packet = encode_probe(self.peer_cid, pn, size)
        self._sent[pn] = _Sent(pn, now, size, [], _FLAG_PROBE)
        self._last_eliciting = now
        self._pmtu.probe_sent(size)
        self._count_sent(packet)
        return packet

    def _ping_packet(self, now: float) -> bytes:
        """A PING alone, right after an MTU probe: the peer acknowledges both at once, so
        an acknowledgement of the PING without the probe shows the probe lost one round
        trip after it went, not a probe timeout later."""
        pn = self._take_pn()
        parts, _ = self._header(pn)
        parts.append(_PING_FRAME)
        packet = seal(parts)
        self._in_flight(now, pn, packet, [], _FLAG_PING, False)
        self._count_sent(packet)
        return packet

    def _set_datagram(self) -> None:
        """Take up the size path MTU discovery settled on (higher, or back to the base)."""
        self._datagram = size = self._pmtu.size
        self._cc.set_datagram(size)

    # -- ending -------------------------------------------------------------------------------

    def _finish(self, event: ConnectionEvent, *, keep: bool = False) -> None:
        """Report the end once; unless ``keep``, the connection is CLOSED now."""
        if not self._closed_reported:
            self._closed_reported = True
            self._events.append((event, 0))
        self._unsent.clear()
        self._retransmit.clear()
        self._sent.clear()
        self._lost.clear()
        self._send_buffered = self._bytes_in_flight = 0
        self._loss_time = None
        self._probe_pending = self._ping_pending = self._close_pending = False
        if not keep:
            self.state = _CLOSED

    def _abort(self, code: int, reason: str) -> None:
        """Close at once on an error, with one CLOSE packet to the peer."""
        if self.state is _CLOSED:
            return
        if self.peer_cid:
            ptype = _T_DATA if self._confirmed else _T_ACCEPT
            pn = min(self._next_pn, _MAX_PN)  # the last number is kept for this CLOSE
            self._next_pn = pn + 1
            parts: list[bytes | memoryview] = [HEADER.pack(VERSION, ptype, self.peer_cid, pn)]
            if ptype == _T_ACCEPT:
                parts.append(PARAMS.pack(self.cid, 0, self._max_dseq, 0, BASE_DATAGRAM))
            parts.append(encode_close(code, reason))
            self._pending_out.append(seal(parts))
        self._finish(ConnectionClosed(code, reason, by_peer=False))
