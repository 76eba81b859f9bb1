"""Speed-test arithmetic: receiver loss, out-of-order, jitter; pacing to a bitrate."""

from __future__ import annotations

import pytest

from netlib.sansio.speedtest import Pacer, ReceiverStats


def test_in_order_stream_has_no_loss_and_no_jitter() -> None:
    stats = ReceiverStats()
    for seq in range(10):
        stats.record(seq, sent=seq * 0.01, arrived=seq * 0.01 + 0.002, size=100)
    assert (stats.packets, stats.received, stats.lost, stats.out_of_order) == (10, 10, 0, 0)
    assert stats.bytes == 1000
    assert stats.jitter == pytest.approx(0.0)
    assert stats.lost_percent == 0.0


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
