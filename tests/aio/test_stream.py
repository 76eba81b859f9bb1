"""StreamProtocol against a fake transport: flow control and writes after loss, no sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from netlib.aio.stream import StreamProtocol
from netlib.errors import BrokenResourceError, EndOfStream, FrameTooLarge
from netlib.sansio.framing import LineFraming
from netlib.sansio.stream import StreamLimits


class FakeTransport(asyncio.Transport):
    """Records what the protocol asks of its transport."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.writes = 0
        self.reading = True
        self.closing = False
        self.aborted = False
        self.limits: tuple[int, int] = (0, 0)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        assert high is not None
        assert low is not None
        self.limits = (low, high)

    def write(self, data: Any) -> None:
        self.writes += 1
        self.written.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self.writes += 1
        self.written.extend(bytes(d) for d in list_of_data)

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.aborted = self.closing = True


def make(**limits: Any) -> tuple[StreamProtocol, FakeTransport]:
    protocol = StreamProtocol(LineFraming(max_size=100), StreamLimits(**limits))
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def test_limits_are_set_explicitly() -> None:
    _protocol, transport = make(write_high=1000, write_low=10)
    assert transport.limits == (10, 1000)


async def test_reading_pauses_above_the_limit_and_resumes_when_consumed() -> None:
    protocol, transport = make(read_limit=50)
    protocol.data_received(b"x" * 30 + b"\n")
    assert transport.reading
    protocol.data_received(b"y" * 30 + b"\n")
    assert not transport.reading
    assert protocol.conn.queued == 62
    assert protocol.take() == b"x" * 30
    assert not transport.reading
    assert protocol.take() == b"y" * 30  # the last one: reading resumes
    assert transport.reading
    assert protocol.conn.queued == 0


async def test_partial_frame_does_not_pause_reading() -> None:
    protocol, transport = make(read_limit=10)
    protocol.data_received(b"z" * 90)  # no line end yet: bounded by the decoder instead
    assert transport.reading


async def test_replies_to_queued_messages_are_coalesced() -> None:
    protocol, transport = make()
    protocol.data_received(b"".join(b"%d\n" % i for i in range(100)))
    while protocol.conn.frames:
        protocol.write(protocol.take() + b"!")
    assert transport.writes == 1  # the reply to the last queued message flushed them all
    assert transport.written == [b"%d!" % i for i in range(100)]


async def test_write_with_nothing_queued_goes_out_at_once() -> None:
    protocol, transport = make()
    protocol.write(b"greeting\n")
    assert transport.written == [b"greeting\n"]


async def test_held_replies_are_flushed_by_the_end_of_the_iteration() -> None:
    protocol, transport = make()
    protocol.data_received(b"one\ntwo\n")
    protocol.write(protocol.take())  # "two" is still queued: held
    assert transport.writes == 0
    await asyncio.sleep(0)  # one loop iteration runs the backstop flush
    assert transport.written == [b"one"]


async def test_flush_at_high_water_mark() -> None:
    protocol, transport = make(write_high=100, write_low=10)
    protocol.data_received(b"queued\n")  # replies are held while input is queued
    protocol.write(b"a" * 60)
    assert transport.writes == 0
    protocol.write(b"b" * 60)
    assert transport.writes == 1


async def test_writes_after_loss_are_silent_no_ops() -> None:
    protocol, transport = make()
    protocol.connection_lost(ConnectionResetError())
    protocol.write(b"late")
    protocol.flush()
    assert transport.writes == 0
    with pytest.raises(BrokenResourceError):
        await protocol.drain()


async def test_writes_to_a_closing_transport_are_dropped() -> None:
    protocol, transport = make()
    protocol.data_received(b"pending\n")
    protocol.write(b"queued")
    transport.closing = True
    protocol.flush()
    assert transport.writes == 0


async def test_drain_waits_while_paused() -> None:
    protocol, _transport = make()
    protocol.pause_writing()
    drained = asyncio.ensure_future(protocol.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    protocol.resume_writing()
    await drained


async def test_oversized_frame_keeps_earlier_frames_and_aborts() -> None:
    protocol, transport = make()
    protocol.data_received(b"ok\n" + b"x" * 200)
    assert list(protocol.conn.frames) == [b"ok"]
    assert isinstance(protocol.conn.error, FrameTooLarge)
    assert transport.aborted


async def test_eof_ends_input_after_queued_frames() -> None:
    protocol, _transport = make()
    protocol.data_received(b"last\n")
    assert protocol.eof_received() is True  # stay open for replies (half-close)
    assert list(protocol.conn.frames) == [b"last"]
    assert isinstance(protocol.conn.end_error(), EndOfStream)


async def test_fan_out_writes_wait_in_the_list_while_paused_and_go_on_resume() -> None:
    protocol, transport = make(write_high=100, write_low=10)
    line = b"shared line\n"
    protocol.pause_writing()  # the transport's buffer passed its high mark
    for _ in range(50):
        protocol.write_soon(line, limit=0)  # a limit of 0 would flush at once if not paused
    await asyncio.sleep(0)
    assert transport.writes == 0  # held as references to one bytes object, not copied
    assert protocol.buffered_size() == 50 * len(line)  # still counted (hard limits, budget)
    protocol.resume_writing()
    assert transport.writes == 1
    assert transport.written == [line] * 50


class HoldingTransport(FakeTransport):
    """A transport whose peer reads nothing until ``drain()``: it buffers what it is given
    and pauses its protocol above its high mark, as asyncio's and uvloop's do."""

    def __init__(self, protocol: StreamProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.buffered = 0
        self.paused = False

    def write(self, data: Any) -> None:
        super().write(data)
        self._grew(len(data))

    def writelines(self, list_of_data: Any) -> None:
        list_of_data = list(list_of_data)
        super().writelines(list_of_data)
        self._grew(sum(map(len, list_of_data)))

    def _grew(self, size: int) -> None:
        self.buffered += size
        if not self.paused and self.buffered > self.limits[1]:
            self.paused = True
            self.protocol.pause_writing()

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closing = True

    def drain(self) -> None:
        self.buffered = 0
        if self.paused:
            self.paused = False
            self.protocol.resume_writing()


def make_holding(**limits: Any) -> tuple[StreamProtocol, HoldingTransport]:
    protocol = StreamProtocol(LineFraming(max_size=100), StreamLimits(**limits))
    transport = HoldingTransport(protocol)
    protocol.connection_made(transport)
    return protocol, transport


async def test_a_transport_mark_keeps_fan_out_writes_as_references_past_it() -> None:
    protocol, transport = make_holding(
        write_high=1000, write_low=500, transport_high=100, send_timeout=5.0
    )
    assert transport.limits == (25, 100)  # the transport's own marks
    line = b"a shared line of the room\n"  # 26 bytes, one object for every member
    for _ in range(30):
        protocol.write_soon(line, limit=10_000)
    await asyncio.sleep(0)  # the end-of-iteration flush
    assert 100 < transport.buffered <= 100 + 4 * len(line)  # a batch of transport_high
    assert protocol.buffered_size() == 30 * len(line)  # the rest waits in the list
    assert all(item is line for item in protocol._pending or [])  # references, no copies
    assert protocol.conn.next_deadline() is None  # under write_high: no send deadline
    for _ in range(20):
        protocol.write_soon(line, limit=10_000)
    assert protocol.buffered_size() == 50 * len(line) > 1000
    assert protocol.conn.next_deadline() is not None  # above write_high: it runs
    while transport.buffered:  # the member reads: one batch per resume
        writes, waiting = transport.writes, bool(protocol._pending)
        transport.drain()
        assert transport.writes == writes + waiting
        assert transport.buffered <= 100 + 4 * len(line)
    assert protocol.buffered_size() == 0
    assert protocol.conn.next_deadline() is None  # below write_low: lifted
    assert b"".join(transport.written) == line * 50


async def test_close_hands_the_whole_list_to_a_transport_with_a_mark() -> None:
    protocol, transport = make_holding(write_high=1000, write_low=500, transport_high=100)
    for index in range(40):
        protocol.write_soon(b"%02d\n" % index, limit=10_000)
    protocol.flush()
    assert protocol.buffered_size() > transport.buffered  # some wait in the list
    protocol.close()
    assert b"".join(transport.written) == b"".join(b"%02d\n" % i for i in range(40))


def test_the_transport_mark_is_at_most_the_high_mark() -> None:
    with pytest.raises(ValueError, match="transport_high"):
        StreamLimits(write_high=100, write_low=10, transport_high=200)
    with pytest.raises(ValueError, match="transport_high"):
        StreamLimits(transport_high=0)


async def test_a_cancelled_iteration_takes_no_message() -> None:
    protocol, _transport = make()
    waiter = protocol.message_waiter()
    waiter.cancel()  # the consumer was cancelled while waiting
    protocol.data_received(b"kept\n")
    assert protocol.conn.frames  # the message stays queued for the next receive
    assert await protocol.message_waiter() == b"kept"


async def test_iteration_waiter_ends_at_eof_and_fails_on_loss() -> None:
    protocol, _transport = make()
    ending = protocol.message_waiter()
    protocol.eof_received()
    with pytest.raises(StopAsyncIteration):
        await ending
    protocol, _transport = make()
    failing = protocol.message_waiter()
    protocol.connection_lost(ConnectionResetError())
    with pytest.raises(BrokenResourceError):
        await failing
