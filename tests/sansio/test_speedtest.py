"""Speed-test core: receiver loss, ordering and jitter; pacing; requests, limits, wire formats
and results."""

from __future__ import annotations

import json

import pytest

from netlib.sansio import speedtest as st
from netlib.sansio.reliable.wire import MAX_MESSAGE
from netlib.sansio.speedtest import (
    REORDER_WINDOW,
    DatagramCounts,
    LatencySamples,
    Pacer,
    ReceiverStats,
    SpeedtestLimits,
    SpeedtestRequest,
    SpeedtestResult,
    Tally,
    TransferTotals,
)

# -- ReceiverStats ----------------------------------------------------------------------------


def test_in_order_stream_has_no_loss_and_no_jitter() -> None:
    stats = ReceiverStats()
    for seq in range(10):
        stats.record(seq, sent=seq * 0.01, arrived=seq * 0.01 + 0.002, size=100)
    assert (stats.packets, stats.received, stats.lost, stats.out_of_order) == (10, 10, 0, 0)
    assert stats.bytes == 1000
    assert stats.jitter == pytest.approx(0.0)
    assert stats.lost_percent == 0.0
    assert (stats.first_arrival, stats.last_arrival) == pytest.approx((0.002, 0.092))


def test_gaps_count_as_loss() -> None:
    stats = ReceiverStats()
    for seq in (0, 1, 3, 4, 9):
        stats.record(seq, sent=0.0, arrived=0.0)
    assert stats.packets == 10
    assert stats.lost == 5
    assert stats.lost_percent == pytest.approx(50.0)


def test_late_datagram_is_out_of_order_and_not_lost() -> None:
    stats = ReceiverStats()
    for seq in (0, 2, 1, 3):
        stats.record(seq, sent=0.0, arrived=0.0)
    assert stats.out_of_order == 1
    assert stats.lost == 0


def test_duplicate_counts_only_as_duplicate() -> None:
    stats = ReceiverStats()
    for seq in (0, 1, 1, 2):
        stats.record(seq, sent=0.0, arrived=0.0, size=10)
    assert (stats.received, stats.duplicates, stats.lost, stats.bytes) == (3, 1, 0, 30)


def test_a_reordered_duplicate_inside_the_window_is_still_a_duplicate() -> None:
    stats = ReceiverStats()
    for seq in (5, 3, 3, 0, 5, 4):
        stats.record(seq, sent=0.0, arrived=0.0)
    assert (stats.received, stats.duplicates, stats.out_of_order) == (4, 2, 3)
    assert stats.lost == 2  # 1 and 2


def test_sequence_numbers_at_the_window_edge_are_still_told_apart() -> None:
    stats = ReceiverStats()
    stats.record(0, sent=0.0, arrived=0.0)
    stats.record(REORDER_WINDOW - 1, sent=0.0, arrived=0.0)
    stats.record(0, sent=0.0, arrived=0.0)  # REORDER_WINDOW - 1 behind: still remembered
    stats.record(1, sent=0.0, arrived=0.0)  # in the window, never seen: received late
    assert (stats.duplicates, stats.late, stats.received) == (1, 0, 3)


def test_sequence_numbers_older_than_the_window_are_late_not_new() -> None:
    stats = ReceiverStats()
    stats.record(0, sent=0.0, arrived=0.0)
    stats.record(REORDER_WINDOW + 5, sent=0.0, arrived=0.0)
    stats.record(0, sent=0.0, arrived=0.0)  # a duplicate the window can no longer tell
    stats.record(3, sent=0.0, arrived=0.0)  # never seen, but too late to tell
    assert (stats.late, stats.out_of_order, stats.duplicates) == (2, 2, 0)
    assert stats.received == 2  # neither late one counted as new
    assert stats.lost == REORDER_WINDOW + 6 - 2


def test_memory_stays_bounded_whatever_the_sequence_numbers() -> None:
    stats = ReceiverStats()
    for seq in (0, 10**15, 2**63, 2**63 - 500):
        stats.record(seq, sent=0.0, arrived=0.0)
    assert stats._window.bit_length() <= REORDER_WINDOW
    assert (stats.received, stats.out_of_order, stats.late) == (4, 1, 0)
    for seq in range(2**63 + 1, 2**63 + 3 * REORDER_WINDOW):
        stats.record(seq, sent=0.0, arrived=0.0)
    assert stats._window.bit_length() <= REORDER_WINDOW
    assert stats._window == (1 << REORDER_WINDOW) - 1  # the last REORDER_WINDOW all arrived


def test_jitter_follows_rfc_3550() -> None:
    stats = ReceiverStats()
    stats.record(0, sent=0.0, arrived=1.0)
    stats.record(1, sent=0.01, arrived=1.02)  # D = 0.02 - 0.01 = 0.01
    assert stats.jitter == pytest.approx(0.01 / 16)
    stats.record(2, sent=0.02, arrived=1.02)  # D = 0.0 - 0.01 = -0.01
    j = 0.01 / 16
    assert stats.jitter == pytest.approx(j + (0.01 - j) / 16)


def test_negative_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="seq"):
        ReceiverStats().record(-1, 0.0, 0.0)


# -- Pacer ------------------------------------------------------------------------------------


def test_pacer_spaces_sends_to_the_bitrate() -> None:
    pacer = Pacer(bitrate=8000.0, now=0.0)  # 1,000 bytes a second
    assert pacer.delay(0.0) == 0.0
    pacer.sent(100, now=0.0)
    assert pacer.delay(0.0) == pytest.approx(0.1)
    assert pacer.delay(0.05) == pytest.approx(0.05)
    pacer.sent(100, now=0.1)
    assert pacer.delay(0.1) == pytest.approx(0.1)


def test_pacer_does_not_burst_a_long_backlog() -> None:
    pacer = Pacer(bitrate=8000.0, now=0.0, max_burst=0.01)
    pacer.sent(100, now=5.0)  # five seconds late: at most 10 ms of credit kept
    assert pacer.delay(5.0) == pytest.approx(0.09)


def test_pacer_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="bitrate"):
        Pacer(0.0, now=0.0)
    with pytest.raises(ValueError, match="max_burst"):
        Pacer(1.0, now=0.0, max_burst=-1.0)


# -- requests and limits ----------------------------------------------------------------------


def test_a_request_gets_each_protocols_defaults() -> None:
    udp = SpeedtestRequest.default("udp", duration=None, size=None)
    assert (udp.size, udp.bitrate, udp.duration) == (1400, st.DEFAULT_UDP_BITRATE, 3.0)
    tcp = SpeedtestRequest.default("tcp", parallel=4, reverse=True)
    assert (tcp.size, tcp.bitrate, tcp.parallel, tcp.reverse) == (128 * 1024, 0.0, 4, True)
    assert SpeedtestRequest.default("rudp").size == 16 * 1024


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"protocol": "sctp"}, "unknown protocol 'sctp'"),
        ({"duration": -1.0}, "duration must be > 0"),
        ({"duration": float("nan")}, "duration must be > 0"),
        ({"protocol": "udp", "size": 27}, "udp size must be 28..65507"),
        ({"protocol": "udp", "size": 70_000}, "udp size must be 28..65507"),
        ({"size": 0}, "tcp size must be 1..1048576"),
        ({"bitrate": -5.0}, "bitrate must be >= 0"),
        ({"protocol": "udp", "bitrate": 0.0}, "udp needs a bitrate above 0"),
        ({"parallel": 0}, "parallel must be 1..128"),
        ({"parallel": 129}, "parallel must be 1..128"),
    ],
)
def test_bad_requests_say_what_is_wrong(fields: dict[str, object], error: str) -> None:
    base: dict[str, object] = {"protocol": "tcp", "duration": 1.0, "size": 100, "bitrate": 1e6}
    with pytest.raises(ValueError, match=error):
        SpeedtestRequest(**{**base, **fields})  # type: ignore[arg-type]


def test_the_largest_message_is_reliable_udps() -> None:
    assert st.MAX_MESSAGE_SIZE <= MAX_MESSAGE


def test_a_request_survives_the_control_line() -> None:
    request = SpeedtestRequest("udp", 0.5, 1200, 2e6, parallel=3, reverse=True)
    line = st.encode_control("start", **request.to_message())
    message = st.decode_control(line.rstrip(b"\n"))
    assert message["op"] == "start"
    assert SpeedtestRequest.from_message(message) == request


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"version": 2}, "unsupported version 2"),
        ({"protocol": 7}, "protocol must be a string"),
        ({"reverse": "yes"}, "reverse must be true or false"),
        ({"duration": "1"}, "duration must be a number"),
        ({"size": 1.5}, "size must be a whole number"),
        ({"parallel": True}, "parallel must be a whole number"),
        ({"bitrate": None}, "bitrate must be a number"),
    ],
)
def test_a_malformed_start_is_refused(change: dict[str, object], error: str) -> None:
    message = {**SpeedtestRequest.default("tcp").to_message(), **change}
    with pytest.raises(ValueError, match=error):
        SpeedtestRequest.from_message(message)


@pytest.mark.parametrize(
    "line", [b"not json", b"[1, 2]", b'{"no": "op"}', b'{"op": 3}', b"\xff\xfe"]
)
def test_control_lines_must_be_objects_with_an_op(line: bytes) -> None:
    with pytest.raises(ValueError, match="control line"):
        st.decode_control(line)


def test_a_control_line_is_bounded() -> None:
    with pytest.raises(ValueError, match="exceeds 4096"):
        st.encode_control("refused", error="x" * st.CONTROL_LINE_LIMIT)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"duration": 61.0}, "duration 61 s is above the server's limit of 60 s"),
        ({"parallel": 17}, "17 streams are above the server's limit of 16"),
        ({"size": 1024 * 1024, "protocol": "rudp"}, None),
        ({"bitrate": 600e6, "parallel": 2}, "bitrate 1.2 Gbit/s for the test is above"),
    ],
)
def test_limits_refuse_what_is_beyond_them(fields: dict[str, object], why: str | None) -> None:
    request = SpeedtestRequest.default(str(fields.pop("protocol", "tcp")), **fields)
    refusal = SpeedtestLimits().refusal(request)
    if why is None:
        assert refusal is None
    else:
        assert refusal is not None
        assert refusal.startswith(why)


def test_a_smaller_size_limit_applies_to_tcp_not_udp() -> None:
    limits = SpeedtestLimits(max_size=1000)
    assert limits.refusal(SpeedtestRequest.default("tcp", size=1001)) == (
        "size 1001 bytes is above the server's limit of 1000"
    )
    assert limits.refusal(SpeedtestRequest.default("udp", size=1400)) is None


def test_limits_themselves_are_checked() -> None:
    with pytest.raises(ValueError, match="max_tests"):
        SpeedtestLimits(max_tests=0)
    with pytest.raises(ValueError, match="max_parallel"):
        SpeedtestLimits(max_parallel=200)


# -- wire formats -----------------------------------------------------------------------------


def test_stream_hello_round_trip_and_rejections() -> None:
    hello = st.pack_stream_hello(st.ROLE_PROBE, 3, b"12345678")
    assert len(hello) == 16
    assert st.unpack_stream_hello(hello + b"data") == (st.ROLE_PROBE, 3, b"12345678")
    assert st.unpack_stream_hello(hello[:15]) is None
    assert st.unpack_stream_hello(b"GET / HTTP/1.1\r\n") is None
    assert st.unpack_stream_hello(hello[:5] + b"\x07" + hello[6:]) is None  # unknown role


def test_datagrams_are_padded_to_the_size() -> None:
    data = st.pack_datagram(st.KIND_DATA, 2, b"abcdefgh", 41, 1.5, size=100)
    assert len(data) == 100
    assert st.DATAGRAM.unpack_from(data) == (b"NS", st.KIND_DATA, 2, b"abcdefgh", 41, 1.5)
    assert len(st.pack_datagram(st.KIND_HELLO, 0, b"abcdefgh", 0, 0.0)) == st.DATAGRAM.size


# -- counting and results ---------------------------------------------------------------------


def test_transfer_sums_streams_from_the_start() -> None:
    a, b = Tally(), Tally()
    a.add(1000, now=10.5)
    a.add(1000, now=11.0)
    b.add(500, now=10.8, messages=2)
    total = TransferTotals.of([a, b, Tally()], start=10.0)
    assert total == TransferTotals(seconds=1.0, bytes=2500, messages=4)
    assert total.bits_per_second == 20_000
    assert TransferTotals.of([a], start=10.9).seconds == pytest.approx(0.5)  # first before start
    assert TransferTotals.of([Tally()], start=1.0) == TransferTotals()
    assert TransferTotals().bits_per_second == 0.0


def test_totals_from_a_peer_are_checked() -> None:
    assert TransferTotals.from_message(TransferTotals(1.0, 10, 1).to_message()) == TransferTotals(
        1.0, 10, 1
    )
    bad: object
    for bad in ([], {"seconds": 1.0, "bytes": -1, "messages": 0}, {"seconds": "x"}):
        with pytest.raises(ValueError, match=r"totals|seconds"):
            TransferTotals.from_message(bad)
    counts = DatagramCounts(jitter=0.001, out_of_order=2, duplicates=1, late=0)
    back = DatagramCounts.from_message(counts.to_message(), sent=100, received=95)
    assert (back.packets, back.lost_packets, back.out_of_order) == (100, 5, 2)
    with pytest.raises(ValueError, match="negative"):
        DatagramCounts.from_message({**counts.to_message(), "late": -1}, 1, 1)


def test_datagram_counts_use_the_senders_count() -> None:
    streams = [ReceiverStats(), ReceiverStats()]
    for seq in range(8):
        streams[0].record(seq, 0.0, 0.0)
    streams[1].record(0, 0.0, 0.0)  # the tail of stream 1 was lost: no gap shows it
    counts = DatagramCounts.of(streams, sent=20)
    assert (counts.packets, counts.lost_packets) == (20, 11)
    assert counts.lost_percent == pytest.approx(55.0)


def test_latency_percentiles_are_nearest_rank_and_bounded() -> None:
    samples = LatencySamples(limit=200)
    for i in range(1, 101):
        samples.add(i / 1000)
    samples.sent = 120
    summary = samples.summary()
    assert (summary.samples, summary.probes) == (100, 120)
    assert (summary.p50, summary.p99) == (0.05, 0.099)
    for _ in range(500):
        samples.add(1.0)
    assert len(samples) == 200
    assert LatencySamples().summary().p50 is None


def test_end_grace_follows_the_slowest_round_trip_within_bounds() -> None:
    assert st.end_grace(0.1) == pytest.approx(0.2)
    assert st.end_grace(0.0001) == st.MIN_END_GRACE
    assert st.end_grace(10.0) == st.MAX_END_GRACE
    assert st.end_grace(None) == st.MAX_END_GRACE


def test_result_json_uses_iperf3_names() -> None:
    request = SpeedtestRequest("udp", 1.0, 1000, 8e6)
    result = SpeedtestResult(
        request,
        sent=TransferTotals(1.0, 1_000_000, 1000),
        received=TransferTotals(1.0, 950_000, 950),
        latency=LatencySamples().summary(),
        datagrams=DatagramCounts(1000, 50, 0.0002, 3, 0, 0),
    )
    document = json.loads(json.dumps(result.to_json()))
    assert document["sum_received"]["bits_per_second"] == 7_600_000
    assert document["sum_received"]["lost_percent"] == 5.0
    assert document["sum_received"]["jitter_ms"] == 0.2
    assert document["sum_received"]["packets"] == document["sum_sent"]["packets"] == 1000
    assert (document["num_streams"], document["blksize"], document["protocol"]) == (1, 1000, "udp")
    assert document["latency_ms"]["p99"] is None
    tcp = SpeedtestResult(SpeedtestRequest.default("tcp"), TransferTotals(), TransferTotals())
    assert "lost_percent" not in tcp.to_json()["sum_received"]
