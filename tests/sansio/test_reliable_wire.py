"""The reliable-UDP wire format, RTT estimator and congestion window."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netlib.errors import ProtocolError
from netlib.sansio.reliable.recovery import (
    INITIAL_WINDOW,
    MAX_PROBE_INTERVAL,
    MIN_DATAGRAMS,
    MIN_PTO,
    MIN_WINDOW,
    CongestionWindow,
    RttEstimator,
)
from netlib.sansio.reliable.simulation import LinkProfile, SplitMix64
from netlib.sansio.reliable.wire import (
    ACK,
    BASE_DATAGRAM,
    HEADER,
    HELLO,
    MAX_ACK_RANGES,
    MAX_DATAGRAM,
    MIN_HELLO_SIZE,
    MSG,
    OVERHEAD,
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
    encode_packet,
    encode_probe,
)


def test_a_full_unit_fits_a_base_datagram_with_an_ack() -> None:
    assert OVERHEAD + ACK.size + 8 + MSG.size + UNIT == BASE_DATAGRAM == 1200
    assert UNIT == 1156
    assert MAX_DATAGRAM == 65535 - 8  # the largest UDP payload over IPv6
    assert (MAX_DATAGRAM - OVERHEAD - MSG.size) // UNIT == 56  # units in one frame at most


def test_hello_carries_the_largest_datagram_and_stays_at_the_base_size() -> None:
    assert VERSION == 3
    packet = encode_hello(7, 3, 100, 1000, 4096, b"token", 9000)
    assert len(packet) == MIN_HELLO_SIZE == BASE_DATAGRAM
    cid, delay, window, max_message, max_datagram, length = HELLO.unpack_from(packet, HEADER.size)
    assert (cid, delay, window, max_message, max_datagram, length) == (7, 100, 1000, 4096, 9000, 5)


def test_the_trailer_is_the_crc32c_of_the_packet() -> None:
    packet = encode_packet(PacketType.DATA, 0xABCD, 77, b"123456789")
    header = packet[: HEADER.size]
    body = packet[HEADER.size : -4]
    assert body == b"123456789"
    # CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value); over the whole packet:
    assert struct.unpack("!I", packet[-4:])[0] == _crc32c_reference(header + body)
    assert _crc32c_reference(b"123456789") == 0xE3069283
    assert check_datagram(packet) == (PacketType.DATA, 0xABCD, 77)
    ieee = header + body + struct.pack("!I", zlib.crc32(header + body))  # version 2's trailer
    assert check_datagram(ieee) is None


def _crc32c_reference(data: bytes) -> int:
    """CRC-32C bit by bit (reflected polynomial 0x82F63B78), to check the fast one."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("size", [BASE_DATAGRAM + 1, 1472, 8952, MAX_DATAGRAM])
def test_a_probe_is_a_padded_ping_of_exactly_its_size(size: int) -> None:
    probe = encode_probe(0xABCD, 77, size)
    assert len(probe) == size
    assert check_datagram(probe) == (PacketType.DATA, 0xABCD, 77)
    assert probe[HEADER.size] == FrameType.PING
    assert not any(probe[HEADER.size + 1 : -4])  # PADDING to the end


def test_check_datagram_accepts_sound_packets_only() -> None:
    packet = encode_packet(PacketType.DATA, 0xDEADBEEF, 42, b"\x03")
    assert check_datagram(packet) == (PacketType.DATA, 0xDEADBEEF, 42)
    assert check_datagram(packet[:-1]) is None
    assert check_datagram(b"") is None
    assert check_datagram(bytes([1]) + packet[1:]) is None  # version 1 (or any other)


def test_every_single_bit_flip_is_caught() -> None:
    packet = encode_hello(7, 3, 100, 1000, 4096, b"token")
    for bit in range(len(packet) * 8):
        damaged = bytearray(packet)
        damaged[bit >> 3] ^= 1 << (bit & 7)
        assert check_datagram(bytes(damaged)) is None, bit


@st.composite
def descending_ranges(draw: st.DrawFn) -> list[list[int]]:
    high = draw(st.integers(0, 1 << 31))
    ranges = []
    for _ in range(draw(st.integers(1, MAX_ACK_RANGES))):
        low = high - draw(st.integers(0, min(300, high)))
        ranges.append([low, high])
        high = low - draw(st.integers(2, 300))
        if high < 0:
            break
    return ranges


@settings(max_examples=300)
@given(descending_ranges(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF_FFFF))
def test_ack_frames_round_trip(ranges: list[list[int]], delay: int, window: int) -> None:
    frame = encode_ack(ranges, delay, window)
    largest, got_delay, got_window, got, end = decode_ack(frame, 0)
    assert end == len(frame)
    assert (largest, got_delay, got_window) == (ranges[0][1], delay, window)
    assert got == [(low, high) for low, high in ranges]


def test_an_ack_frame_keeps_to_its_space() -> None:
    ranges = [[1000 - 4 * i, 1000 - 4 * i] for i in range(32)]
    frame = encode_ack(ranges, 0, 0, space=ACK.size + 3 * 4)
    assert len(frame) == ACK.size + 12
    assert len(decode_ack(frame, 0)[3]) == 4


def test_an_ack_below_zero_is_a_protocol_error() -> None:
    frame = ACK.pack(1, 5, 0, 0, 10, 0)
    with pytest.raises(ProtocolError):
        decode_ack(frame, 0)


def test_close_frames_round_trip_and_cut_long_reasons() -> None:
    frame = encode_close(3, "é" * 200)
    packet = encode_packet(PacketType.DATA, 1, 1, frame)
    code, reason, _ = decode_close(packet, 10)
    assert code == 3
    assert reason == "é" * 127  # 255 bytes cut at a character boundary


def test_rtt_estimator_follows_rfc_9002() -> None:
    rtt = RttEstimator(0.1)
    assert rtt.pto(0.0) == pytest.approx(0.1 + 4 * 0.05)
    rtt.update(0.010, 0.0)
    assert (rtt.smoothed_rtt, rtt.rttvar, rtt.min_rtt) == (0.010, 0.005, 0.010)
    rtt.update(0.030, 0.015)  # 15 ms of it was the peer's ack delay
    assert rtt.smoothed_rtt == pytest.approx(0.875 * 0.010 + 0.125 * 0.015)
    rtt.update(0.011, 0.005)  # the delay is never taken below min_rtt
    assert rtt.latest_rtt == 0.011
    assert rtt.min_rtt == 0.010
    assert rtt.latest_path_rtt == 0.010  # 11 ms less 5 ms of delay, kept at min_rtt
    expected = 9 / 8 * max(rtt.smoothed_rtt, 0.010) + rtt.rttvar
    assert rtt.loss_delay() == pytest.approx(expected)


def test_probe_timeout_doubles_up_to_its_cap() -> None:
    rtt = RttEstimator(0.1)
    rtt.update(0.002, 0.0)
    base = rtt.pto(0.0)
    assert base == max(0.002 + 0.004, MIN_PTO)
    timeouts = [rtt.backoff(0.0, count) for count in range(12)]
    assert timeouts[:5] == [base * 2**k for k in range(5)]
    assert timeouts[-1] == MAX_PROBE_INTERVAL
    slow = RttEstimator(3.0)
    assert slow.backoff(0.0, 5) == slow.pto(0.0)  # above the cap: no back-off at all


def test_congestion_window_reduces_once_per_round_and_keeps_a_floor() -> None:
    cc = CongestionWindow()
    assert cc.window == INITIAL_WINDOW
    cc.on_acked(1200, 0.0)
    assert cc.window == INITIAL_WINDOW + 1200  # slow start
    assert cc.on_lost(0.5, 1.0)
    reduced = cc.window
    assert reduced == int((INITIAL_WINDOW + 1200) * 0.7)
    assert not cc.on_lost(0.9, 1.1)  # sent before the reduction: the same event
    assert cc.window == reduced
    for t in range(20):
        cc.on_lost(2.0 + t, 2.5 + t)
    assert cc.window == MIN_WINDOW
    cc.on_acked(1200, 100.0)
    assert cc.window > MIN_WINDOW  # congestion avoidance grows it again
    cc.on_persistent_congestion(200.0)
    assert cc.window == MIN_WINDOW


def test_congestion_window_floor_follows_the_datagram_size() -> None:
    cc = CongestionWindow()
    cc.set_datagram(65000)
    assert cc.window == MIN_DATAGRAMS * 65000  # four datagrams of the new size may go
    cc.on_acked(65000, 1.0)
    assert cc.window == MIN_DATAGRAMS * 65000 + 65000  # slow start, in bytes
    for t in range(20):
        cc.on_lost(2.0 + t, 2.5 + t)
    assert cc.window == MIN_DATAGRAMS * 65000
    grown = cc.window
    cc.on_acked(65000, 100.0)
    assert cc.window == grown + 65000 * 65000 // grown  # one datagram per window acked
    cc.set_datagram(BASE_DATAGRAM)  # a fallback: the floor comes down, the window stays
    assert cc.minimum == MIN_WINDOW
    assert cc.window > MIN_WINDOW
    cc.on_persistent_congestion(200.0)
    assert cc.window == MIN_WINDOW


def test_splitmix_is_reproducible() -> None:
    a, b = SplitMix64(5), SplitMix64(5)
    assert [a.next() for _ in range(5)] == [b.next() for _ in range(5)]
    assert 0 <= a.random() < 1
    assert len(a.bytes(13)) == 13


def test_impossible_link_profiles_raise() -> None:
    with pytest.raises(ValueError, match="impossible"):
        LinkProfile(loss=0.6, duplicate=0.6)
