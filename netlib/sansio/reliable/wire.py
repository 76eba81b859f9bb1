"""The reliable-UDP wire format: packets, frames, limits and the checksum.

Rules of this module:

* No I/O, no clock, no randomness, no logging: bytes in, bytes and tuples out.
* Every structure is a precompiled ``struct.Struct`` in network byte order; the hot path of
  the connection uses them directly (``unpack_from`` with offsets, no per-frame objects).
* A datagram is checked before it is parsed: ``check_datagram`` verifies the length, the
  CRC-32C trailer and the version. A datagram that fails is dropped and counted by the caller,
  never parsed further, so a corrupt datagram can never be delivered.

Theory of operation
-------------------
Every datagram is one packet::

    +---------+------+------------------+--------------------+---------+----------+
    | version | type | destination cid  | packet number      | body    | CRC-32C  |
    | 1 byte  | 1    | 4 (0 in a HELLO) | 4, per direction   | ...     | 4        |
    +---------+------+------------------+--------------------+---------+----------+

The CRC-32C (Castagnoli polynomial, as in iSCSI, SCTP and ext4; computed by the ``crc32c``
package, with the CPU's CRC instruction where there is one) covers everything before it.
It is an integrity check, not authentication: it catches every 1-, 2- and 3-bit error in a
datagram of any size (Hamming distance 4 up to 2^31 bits; the IEEE CRC-32 of ``zlib`` keeps
that only up to 11 KiB) and every burst up to 32 bits that the UDP checksum let through (or
that a path without one introduced). It is also the faster: 17 GB/s on 64 KiB datagrams
here, where ``zlib.crc32`` ran at 2 GB/s and took a third of a bulk transfer's CPU. Packet
numbers count up per direction and are never reused: a retransmitted fragment goes in a new
packet (as in QUIC), so an acknowledgement names exactly one transmission, RTT samples are
never ambiguous (Karn's problem disappears) and a late acknowledgement of a packet declared
lost proves that loss spurious.

Packet types and bodies:

* ``HELLO`` (client to server, destination cid 0): client cid, max ack delay, initial
  window, largest message it accepts, largest datagram it accepts, then a cookie token
  (empty in the first HELLO), padded with zeros to at least ``MIN_HELLO_SIZE`` bytes. A
  server answers nothing to a smaller one.
* ``COOKIE`` (server to client, stateless): the token. Its packet number echoes the HELLO's,
  so the client takes an exact RTT sample from it.
* ``ACCEPT`` (server to client): server cid, max ack delay, initial window, largest message
  it accepts, largest datagram it accepts, then frames.
  Every packet of a server connection is an ACCEPT until the client has used the server's
  cid, so an ACCEPT lost is repeated by the ordinary loss recovery.
* ``DATA``: frames.
* ``REFUSE`` (server to client, stateless): a CLOSE frame (code and reason), for a validated
  HELLO the server cannot take (full). Its packet number echoes the HELLO's too.

Frames (a type byte, then fixed fields)::

    ACK      largest(4) ack_delay(2, units of 100 us) window(4) first_range(2) count(1)
             then count x (gap(2), length(2)): QUIC-style descending ranges
    MSG      flags(1: FIRST, LAST, UNORDERED) dseq(4) length(2) payload
    PING     (nothing): elicits an acknowledgement
    CLOSE    code(2) reason_length(1) reason (UTF-8)
    PADDING  0x00: the rest of the packet is padding

Data sequence numbers (``dseq``) count units of ``UNIT`` (1,156) bytes of a message: a
message of ``n`` bytes takes ``max(1, ceil(n / UNIT))`` consecutive numbers. A MSG frame
carries a run of consecutive units of one message, its first number in ``dseq``: FIRST if
the run starts the message, LAST if it ends it; a run that does not end its message is a
whole number of units. So a frame is as large as the datagram allows (one unit at 1,200
bytes, up to 56 in a 65,527-byte datagram), and a run that no longer fits after the
datagram size fell is resent cut into smaller runs with the same numbers. ``window`` in an
ACK is the receiver's flow-control credit: the first ``dseq`` the sender may not send yet.

Datagram sizes. Every datagram is at most ``BASE_DATAGRAM`` (1,200) bytes, which any IPv6
path carries, until path MTU discovery (``pmtu.py``) has proved a larger size with a probe:
a DATA packet holding a PING, padded with PADDING to the size tried. Neither side ever
sends more than the other accepts (its ``max_datagram`` parameter in HELLO and ACCEPT, at
most ``MAX_DATAGRAM``). Version 1 had no datagram parameter and one unit per MSG frame.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from netlib.errors import ProtocolError

__all__ = [
    "ACK",
    "ACK_RANGE",
    "BASE_DATAGRAM",
    "CLOSE",
    "CRC",
    "FLAG_FIRST",
    "FLAG_LAST",
    "FLAG_UNORDERED",
    "HEADER",
    "HELLO",
    "MAX_ACK_RANGES",
    "MAX_DATAGRAM",
    "MAX_MESSAGE",
    "MAX_REASON",
    "MIN_HELLO_SIZE",
    "MSG",
    "OVERHEAD",
    "PARAMS",
    "UNIT",
    "VERSION",
    "FrameType",
    "PacketType",
    "check_datagram",
    "decode_ack",
    "decode_close",
    "encode_ack",
    "encode_close",
    "encode_hello",
    "encode_packet",
    "encode_probe",
    "load_checksum",
    "seal",
]

VERSION: Final = 3
"""Wire format version; a datagram with another version is dropped (and counted). Version 2
added the largest datagram to HELLO and ACCEPT, and MSG frames of several units; version 3
replaced the CRC-32 with the CRC-32C."""
BASE_DATAGRAM: Final = 1200
"""Datagram size (UDP payload bytes) every connection starts with and falls back to: it
fits the IPv6 minimum MTU (1,280) with the IP and UDP headers, so IP never fragments it on
any common path. Larger sizes are used only once a probe of that size was acknowledged."""
MAX_DATAGRAM: Final = 65527
"""Largest datagram either side sends or accepts: the largest UDP payload IPv6 allows
(65,535 less the 8-byte UDP header), QUIC's ``max_udp_payload_size`` limit."""
MIN_HELLO_SIZE: Final = 1200
"""Smallest HELLO a server answers: its reply (a cookie, 35 bytes) is then far below 3x what
the unverified address sent, so a forged source cannot use the server as an amplifier."""
MAX_MESSAGE: Final = 1024 * 1024
"""Largest message ``send()`` accepts (1 MiB, about 900 fragments)."""

HEADER: Final = struct.Struct("!BBII")
"""version, packet type, destination connection id, packet number."""
CRC: Final = struct.Struct("!I")
OVERHEAD: Final = HEADER.size + CRC.size
"""Bytes of header and trailer in every packet (14)."""
PARAMS: Final = struct.Struct("!IHIIH")
"""Transport parameters in ACCEPT: a cid, max ack delay (100 us units), window, max message,
max datagram."""
HELLO: Final = struct.Struct("!IHIIHB")
"""HELLO body: the transport parameters (``PARAMS``), then the token length and token."""
ACK: Final = struct.Struct("!BIHIHB")
"""type, largest acknowledged, ack delay (100 us units), window, first range, range count."""
ACK_RANGE: Final = struct.Struct("!HH")
"""gap (unacknowledged packets below the previous range, minus one), range length - 1."""
MSG: Final = struct.Struct("!BBIH")
"""type, flags, data sequence number, payload length."""
CLOSE: Final = struct.Struct("!BHB")
"""type, close code, reason length (reason follows)."""

MAX_ACK_RANGES: Final = 32
"""Ranges of received packet numbers remembered and reported: older gaps are forgotten."""
MAX_REASON: Final = 255
"""Bytes of a close reason on the wire (longer ones are cut at a character boundary)."""
UNIT: Final = BASE_DATAGRAM - OVERHEAD - MSG.size - ACK.size - 2 * ACK_RANGE.size
"""Message bytes per data sequence number (1,156): one unit fits a ``BASE_DATAGRAM`` with an
ACK of up to three ranges, so acknowledgements ride on full-size data packets too."""

FLAG_FIRST: Final = 0x01
FLAG_LAST: Final = 0x02
FLAG_UNORDERED: Final = 0x04


class PacketType(enum.IntEnum):
    """The packet type byte."""

    HELLO = 1
    COOKIE = 2
    ACCEPT = 3
    DATA = 4
    REFUSE = 5


class FrameType(enum.IntEnum):
    """The frame type byte."""

    PADDING = 0
    ACK = 1
    MSG = 2
    PING = 3
    CLOSE = 4


def load_checksum() -> None:
    """Import ``crc32c`` now (idempotent). Its package imports ``importlib.metadata``,
    about 45 ms, which every ``import netlib`` and every CLI start would pay if this module
    imported it; an endpoint calls this when it opens its socket, so that its first
    datagram does not pay it instead (a fresh server's first handshake took 28-45 ms more
    than the next ones)."""
    global crc32c
    if crc32c is _load_crc32c:
        from crc32c import crc32c as hardware

        crc32c = hardware


def _load_crc32c(data: bytes | memoryview, value: int = 0) -> int:
    """The first CRC, where ``load_checksum`` was not called (the sans-I/O core alone)."""
    load_checksum()
    return crc32c(data, value)


crc32c = _load_crc32c
"""The CRC-32C of a bytes-like object, continuing from ``value``."""


def seal(parts: list[bytes | memoryview]) -> bytes:
    """Join the parts of a packet and append the CRC-32C of it."""
    crc = 0
    for part in parts:
        crc = crc32c(part, crc)
    parts.append(CRC.pack(crc))
    return b"".join(parts)


def check_datagram(data: bytes) -> tuple[int, int, int] | None:
    """Return ``(type, destination cid, packet number)`` of a sound datagram, else None.

    Sound means: long enough for a header and a trailer, the CRC-32C matches, and the version
    is ``VERSION``. Nothing else of the datagram is read.
    """
    end = len(data) - CRC.size
    if end < HEADER.size:
        return None
    if crc32c(memoryview(data)[:end]) != CRC.unpack_from(data, end)[0]:
        return None
    version, ptype, dcid, pn = HEADER.unpack_from(data)
    if version != VERSION:
        return None
    return ptype, dcid, pn


def encode_packet(ptype: int, dcid: int, pn: int, body: bytes = b"") -> bytes:
    """A whole packet: header, body and checksum."""
    return seal([HEADER.pack(VERSION, ptype, dcid, pn), body])


def encode_hello(
    cid: int,
    pn: int,
    ack_delay: int,
    window: int,
    max_message: int,
    token: bytes,
    max_datagram: int = BASE_DATAGRAM,
) -> bytes:
    """A HELLO padded to ``MIN_HELLO_SIZE`` bytes (``ack_delay`` in 100 us units)."""
    body = HELLO.pack(cid, ack_delay, window, max_message, max_datagram, len(token)) + token
    padding = bytes(MIN_HELLO_SIZE - OVERHEAD - len(body))
    return encode_packet(PacketType.HELLO, 0, pn, body + padding)


def encode_ack(
    ranges: list[list[int]], delay: int, window: int, space: int = BASE_DATAGRAM
) -> bytes:
    """An ACK frame for ``ranges`` (descending ``[low, high]``), in at most ``space`` bytes.

    Ranges that do not fit, or whose gap or length does not fit 16 bits, are left out: the
    frame then under-reports, which only delays an acknowledgement.
    """
    low, high = ranges[0]
    first = min(high - low, 0xFFFF)
    extra: list[bytes] = []
    room = (space - ACK.size) // ACK_RANGE.size
    previous = high - first
    for low, high in ranges[1:]:
        gap = previous - high - 2
        if len(extra) >= room or gap > 0xFFFF or high - low > 0xFFFF:
            break
        extra.append(ACK_RANGE.pack(gap, high - low))
        previous = low
    top = ranges[0][1]
    return ACK.pack(FrameType.ACK, top, min(max(delay, 0), 0xFFFF), window, first, len(extra)) + (
        b"".join(extra)
    )


def decode_ack(data: bytes, offset: int) -> tuple[int, int, int, list[tuple[int, int]], int]:
    """Parse an ACK frame at ``offset``: ``(largest, delay, window, ranges, next offset)``.

    ``ranges`` are ``(low, high)`` pairs, highest first.

    Raises:
        ProtocolError: the ranges go below packet number 0 or past the datagram.
    """
    _, largest, delay, window, first, count = ACK.unpack_from(data, offset)
    offset += ACK.size
    low = largest - first
    ranges = [(low, largest)]
    for _ in range(count):
        gap, length = ACK_RANGE.unpack_from(data, offset)
        offset += ACK_RANGE.size
        high = low - gap - 2
        low = high - length
        ranges.append((low, high))
    if low < 0:
        raise ProtocolError("ACK frame acknowledges a negative packet number")
    return largest, delay, window, ranges, offset


def encode_probe(dcid: int, pn: int, size: int) -> bytes:
    """A path MTU probe of exactly ``size`` bytes: a DATA packet holding a PING, padded."""
    padding = bytes(size - OVERHEAD - 1)
    return encode_packet(PacketType.DATA, dcid, pn, bytes([FrameType.PING]) + padding)


def encode_close(code: int, reason: str) -> bytes:
    """A CLOSE frame; the reason is cut to ``MAX_REASON`` bytes at a character boundary."""
    raw = reason.encode()[:MAX_REASON].decode(errors="ignore").encode()
    return CLOSE.pack(FrameType.CLOSE, code, len(raw)) + raw


def decode_close(data: bytes, offset: int) -> tuple[int, str, int]:
    """Parse a CLOSE frame at ``offset``: ``(code, reason, next offset)``.

    Raises:
        ProtocolError: the reason runs past the datagram.
    """
    _, code, length = CLOSE.unpack_from(data, offset)
    start = offset + CLOSE.size
    end = start + length
    if end > len(data) - CRC.size:
        raise ProtocolError("CLOSE reason runs past the packet")
    return code, data[start:end].decode(errors="replace"), end
