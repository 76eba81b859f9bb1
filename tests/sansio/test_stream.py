"""StreamConnection without sockets or a loop: states, EOF, half-close, linger, limits and
deadlines, driven by bytes and a ``now`` passed in."""

from __future__ import annotations

import pytest

from netlib.errors import (
    BrokenResourceError,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    PeerTimedOut,
    SlowConsumer,
)
from netlib.sansio.framing import LengthPrefixFraming, LineFraming, RawFraming
from netlib.sansio.stream import StreamConnection, StreamLimits, StreamState


def line(now: float = 0.0, **limits: float | int | None) -> StreamConnection:
    return StreamConnection(LineFraming(max_size=16), StreamLimits(**limits), now)  # type: ignore[arg-type]


def test_messages_are_queued_and_taken_in_order() -> None:
    conn = line()
    assert conn.receive_data(b"a\nb\nc", 1.0)
    assert [conn.take(), conn.take()] == [b"a", b"b"]
    assert conn.frames == []
    assert conn.queued == 0
    assert conn.state is StreamState.OPEN
    assert conn.partial_size == 1


def test_partial_data_is_not_news_for_the_consumer() -> None:
    conn = line()
    assert not conn.receive_data(b"abc", 1.0)
    assert conn.frames == []


def test_raw_framing_makes_each_chunk_a_message() -> None:
    conn = StreamConnection(RawFraming(), StreamLimits(), 0.0)
    assert conn.receive_data(b"x\ny", 0.0)
    assert conn.take() == b"x\ny"


def test_read_pauses_past_the_limit_and_resumes_when_emptied() -> None:
    conn = line(read_limit=5)
    conn.receive_data(b"aaa\n", 0.0)
    assert not conn.read_paused
    conn.receive_data(b"bbb\n", 0.0)
    assert conn.read_paused
    conn.take()
    assert conn.read_paused  # one message still queued
    conn.take()
    assert not conn.read_paused


def test_eof_ends_input_after_the_queued_messages() -> None:
    conn = line()
    conn.receive_data(b"last\n", 0.0)
    conn.receive_eof()
    assert conn.state is StreamState.INPUT_ENDED
    assert conn.peer_eof
    assert conn.take() == b"last"
    assert isinstance(conn.end_error(), EndOfStream)


def test_eof_inside_a_frame_fails_the_connection() -> None:
    conn = line()
    conn.receive_data(b"half", 0.0)
    conn.receive_eof()
    assert conn.state is StreamState.FAILED
    assert isinstance(conn.error, IncompleteFrame)
    assert conn.end_error() is conn.error


def test_oversized_frame_keeps_the_messages_before_it_and_fails() -> None:
    conn = line()
    assert conn.receive_data(b"ok\n" + b"x" * 40, 0.0)
    assert conn.frames == [b"ok"]
    assert conn.state is StreamState.FAILED
    assert isinstance(conn.error, FrameTooLarge)
    assert not conn.receive_data(b"more\n", 0.0)  # nothing is taken after a failure
    assert conn.frames == [b"ok"]


def test_oversized_length_header_fails_before_the_payload() -> None:
    conn = StreamConnection(LengthPrefixFraming(max_size=10), StreamLimits(), 0.0)
    assert conn.receive_data((11).to_bytes(4, "big"), 0.0)
    assert isinstance(conn.error, FrameTooLarge)
    assert conn.partial_size == 0


def test_end_input_discards_later_bytes_but_keeps_queued_messages() -> None:
    conn = line(read_limit=1)
    conn.receive_data(b"kept\n", 0.0)
    assert conn.read_paused
    conn.end_input()
    assert not conn.read_paused  # discarding input needs reading
    assert not conn.receive_data(b"dropped\n", 0.0)
    assert conn.discarded == 8
    assert conn.take() == b"kept"
    assert isinstance(conn.end_error(), EndOfStream)


def test_half_close_then_linger_until_the_peer_closes() -> None:
    conn = line()
    conn.end_input()
    conn.start_linger()
    assert conn.state is StreamState.LINGERING
    conn.receive_data(b"ignored\n", 0.0)
    assert conn.frames == []
    conn.receive_eof()
    assert conn.state.value == "closed"


def test_peer_eof_first_needs_no_linger() -> None:
    conn = line()
    conn.receive_eof()
    conn.start_linger()  # the peer already finished: the state says input ended
    assert conn.state is StreamState.LINGERING
    conn.lost(None)
    assert conn.state.value == "closed"


def test_loss_with_a_cause_fails_with_a_broken_resource() -> None:
    conn = line()
    cause = ConnectionResetError()
    conn.lost(cause)
    assert conn.state is StreamState.FAILED
    assert isinstance(conn.error, BrokenResourceError)
    assert conn.error.__cause__ is cause


def test_clean_close_without_eof_is_not_an_end_of_stream() -> None:
    conn = line()
    conn.lost(None)
    assert conn.state is StreamState.CLOSED
    assert type(conn.end_error()) is BrokenResourceError


def test_first_message_deadline_is_not_extended_by_trickled_bytes() -> None:
    conn = line(now=100.0, first_frame_timeout=10.0, idle_timeout=60.0)
    assert conn.next_deadline() == 110.0
    for t in range(101, 110):
        conn.receive_data(b"x", float(t))  # a byte a second, never a whole line
        assert not conn.handle_timer(float(t))
    assert conn.next_deadline() == 110.0
    assert conn.handle_timer(110.0)
    assert isinstance(conn.error, PeerTimedOut)
    assert conn.next_deadline() is None


def test_the_first_message_lifts_the_first_deadline_and_idle_takes_over() -> None:
    conn = line(now=0.0, first_frame_timeout=10.0, idle_timeout=60.0)
    conn.receive_data(b"hi\n", 5.0)
    assert conn.next_deadline() == 65.0
    conn.last_activity = 30.0  # the adapter wrote a batch
    assert conn.next_deadline() == 90.0
    assert not conn.handle_timer(89.9)
    assert conn.handle_timer(90.0)
    assert "no traffic" in str(conn.error)


def test_message_deadline_runs_from_the_first_byte_of_each_message() -> None:
    conn = line(now=0.0, message_timeout=3.0)
    assert conn.next_deadline() is None  # a member who only reads is never timed out
    conn.receive_data(b"a", 10.0)
    assert conn.rearm
    assert conn.next_deadline() == 13.0
    conn.receive_data(b"b", 12.0)  # the same message: the deadline stays
    assert not conn.rearm
    assert conn.next_deadline() == 13.0
    conn.receive_data(b"\n", 12.5)  # complete: lifted
    assert conn.next_deadline() is None
    conn.receive_data(b"c", 20.0)
    assert conn.handle_timer(23.0)
    assert "took longer than 3.0s" in str(conn.error)


def test_a_hold_is_a_deadline_and_suspends_the_message_deadline() -> None:
    conn = line(now=0.0, message_timeout=3.0)
    conn.receive_data(b"a\nb\npartial", 1.0)  # two lines queued, one begun
    assert conn.next_deadline() == 4.0
    conn.hold(2.0)  # the consumer paces the peer: not the peer's fault
    assert conn.rearm
    assert conn.next_deadline() == 2.0
    assert not conn.release(1.9)
    conn.hold(50.0)  # held far longer than the message deadline
    assert not conn.handle_timer(49.0)
    assert conn.release(50.0)
    assert conn.held_until is None
    assert conn.next_deadline() == 53.0  # a new message deadline for the partial line
    assert conn.handle_timer(53.0)


def test_a_hold_skipping_an_overlong_line_keeps_its_deadline_running() -> None:
    conn = StreamConnection(
        LineFraming(max_size=4, skip_overlong=True), StreamLimits(message_timeout=3.0), 0.0
    )
    conn.receive_data(b"toolong", 1.0)  # reported, then skipped up to its line end
    assert conn.partial_size == 0
    assert conn.next_deadline() == 4.0  # a trickled over-long line is still timed
    conn.receive_data(b"more", 2.0)
    assert conn.handle_timer(4.0)


def test_send_deadline_cuts_off_a_peer_that_stopped_reading() -> None:
    conn = line(now=0.0, send_timeout=10.0, write_high=100, write_low=10)
    conn.writing_paused(5.0)
    assert conn.rearm
    assert conn.next_deadline() == 15.0
    conn.writing_resumed()
    assert conn.next_deadline() is None
    conn.writing_paused(20.0)
    assert not conn.handle_timer(29.9)
    assert conn.handle_timer(30.5)
    assert isinstance(conn.error, SlowConsumer)
    assert "held above the soft limit (100 bytes) for 10.50 s" in str(conn.error)


@pytest.mark.parametrize("state_change", ["lost", "fail"])
def test_closed_or_failed_connections_have_no_deadlines(state_change: str) -> None:
    conn = line(now=0.0, first_frame_timeout=1.0)
    if state_change == "lost":
        conn.lost(None)
    else:
        conn.fail(PeerTimedOut("x"))
    assert conn.next_deadline() is None
    assert not conn.handle_timer(100.0)


def test_the_first_error_is_kept() -> None:
    conn = line()
    first = PeerTimedOut("first")
    conn.fail(first)
    conn.fail(PeerTimedOut("second"))
    conn.lost(ConnectionResetError())
    assert conn.error is first


def test_receive_messages_for_transports_that_frame_themselves() -> None:
    conn = line(read_limit=4)
    assert conn.receive_messages([b"ab", b"cd", b"e"], 5, 1.0)
    assert conn.read_paused
    assert conn.last_activity == 1.0
    assert [conn.take(), conn.take(), conn.take()] == [b"ab", b"cd", b"e"]
    conn.end_input()
    assert not conn.receive_messages([b"late"], 4, 2.0)
    assert conn.discarded == 4
