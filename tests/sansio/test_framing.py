"""Framing codecs: round trips at every split point, limits, and fuzzed input.

Robustness rows R1 and R3 in docs/robustness.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netlib.errors import FrameTooLarge, IncompleteFrame, LimitExceeded, ProtocolError
from netlib.sansio.framing import (
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_LINE,
    OVERLONG_LINE,
    Framing,
    LengthPrefixFraming,
    LineFraming,
    RawFraming,
)

FUZZ = settings(max_examples=2000, suppress_health_check=[HealthCheck.too_slow], deadline=200)
SMALL_LIMIT = 48

Outcome = tuple[list[bytes], type[Exception] | None]


def decode_chunks(framing: Framing, chunks: list[bytes], *, eof: bool = True) -> Outcome:
    """Feed ``chunks``; return the messages seen and the error type raised, if any.

    Also checks the bound on buffered bytes after every step.
    """
    decoder = framing.decoder()
    bound = (framing.max_size or 0) + 4
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out.extend(decoder.feed(chunk))
            assert decoder.buffered <= bound
        if eof:
            decoder.feed_eof()
    except FrameTooLarge as exc:
        return out + exc.frames, type(exc)
    except ProtocolError as exc:
        return out, type(exc)
    return out, None


def split_patterns(data: bytes) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and split in two at every point."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def assert_same_for_all_splits(framing: Framing, data: bytes) -> Outcome:
    expected = decode_chunks(framing, [data])
    for chunks in split_patterns(data):
        assert decode_chunks(framing, chunks) == expected
    return expected


line_messages = st.lists(
    st.binary(max_size=SMALL_LIMIT)
    .map(lambda b: b.replace(b"\n", b""))
    .filter(lambda b: not b.endswith(b"\r")),
    max_size=6,
)
frame_messages = st.lists(st.binary(max_size=SMALL_LIMIT), max_size=6)


@FUZZ
@given(line_messages)
def test_line_round_trip_at_every_split(messages: list[bytes]) -> None:
    framing = LineFraming(max_size=SMALL_LIMIT)
    wire = b"".join(framing.encode(m) for m in messages)
    assert assert_same_for_all_splits(framing, wire) == (messages, None)


@FUZZ
@given(frame_messages)
def test_length_prefix_round_trip_at_every_split(messages: list[bytes]) -> None:
    framing = LengthPrefixFraming(max_size=SMALL_LIMIT)
    wire = b"".join(framing.encode(m) for m in messages)
    assert assert_same_for_all_splits(framing, wire) == (messages, None)


def mutate(wire: bytes, junk: bytes, position: int) -> bytes:
    position %= len(wire) + 1
    return wire[:position] + junk + wire[position:]


@FUZZ
@given(line_messages, st.binary(max_size=120), st.integers(min_value=0))
def test_line_fuzz_only_protocol_errors(messages: list[bytes], junk: bytes, pos: int) -> None:
    framing = LineFraming(max_size=SMALL_LIMIT)
    wire = mutate(b"".join(framing.encode(m) for m in messages), junk, pos)
    frames, error = assert_same_for_all_splits(framing, wire)
    assert error in (None, FrameTooLarge, IncompleteFrame)
    assert all(len(f) <= SMALL_LIMIT and b"\n" not in f for f in frames)


@FUZZ
@given(frame_messages, st.binary(max_size=120), st.integers(min_value=0))
def test_length_prefix_fuzz_only_protocol_errors(
    messages: list[bytes], junk: bytes, pos: int
) -> None:
    framing = LengthPrefixFraming(max_size=SMALL_LIMIT)
    wire = mutate(b"".join(framing.encode(m) for m in messages), junk, pos)
    frames, error = assert_same_for_all_splits(framing, wire)
    assert error in (None, FrameTooLarge, IncompleteFrame)
    assert all(len(f) <= SMALL_LIMIT for f in frames)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_raw_chunks_pass_through(chunks: list[bytes]) -> None:
    framing = RawFraming()
    frames, error = decode_chunks(framing, chunks)
    assert error is None
    assert frames == [c for c in chunks if c]
    assert framing.encode(b"".join(chunks)) == b"".join(chunks)


def test_named_defaults() -> None:
    assert DEFAULT_MAX_LINE == 64 * 1024
    assert DEFAULT_MAX_FRAME == 1024 * 1024
    assert LineFraming().max_size == DEFAULT_MAX_LINE
    assert LengthPrefixFraming().max_size == DEFAULT_MAX_FRAME


def test_crlf_is_tolerated() -> None:
    decoder = LineFraming().decoder()
    assert decoder.feed(b"one\r\ntwo\nthree\r") == [b"one", b"two"]
    assert decoder.feed(b"\n") == [b"three"]
    assert decoder.feed(b"\r\n\n") == [b"", b""]


@pytest.mark.parametrize("max_size", [1, 100, DEFAULT_MAX_LINE])
def test_line_exactly_at_limit_is_accepted(max_size: int) -> None:
    framing = LineFraming(max_size=max_size)
    line = b"x" * max_size
    assert assert_same_for_all_splits(framing, line + b"\r\n")[0] == [line]


def test_line_one_byte_over_limit_is_rejected_and_cleared() -> None:
    framing = LineFraming(max_size=100)
    decoder = framing.decoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"ok\n" + b"x" * 101 + b"\n")
    assert (info.value.limit, info.value.size, info.value.frames) == (100, 101, [b"ok"])
    assert decoder.buffered == 0


def test_line_over_limit_without_line_end_raises_before_buffering_more() -> None:
    decoder = LineFraming(max_size=100).decoder()
    decoder.feed(b"x" * 101)  # 100 bytes and a possible '\r'
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"x")
    assert decoder.buffered == 0


def test_length_prefix_exactly_at_limit_is_accepted() -> None:
    framing = LengthPrefixFraming()
    payload = bytes(DEFAULT_MAX_FRAME)
    decoder = framing.decoder()
    wire = framing.encode(payload)
    chunks = [wire[i : i + 65536] for i in range(0, len(wire), 65536)]
    frames = [f for c in chunks for f in decoder.feed(c)]
    assert frames == [payload]
    assert decoder.buffered == 0


@pytest.mark.parametrize("declared", [DEFAULT_MAX_FRAME + 1, 2**31, 2**32 - 1])
def test_length_prefix_oversized_header_rejected_before_payload(declared: int) -> None:
    decoder = LengthPrefixFraming().decoder()
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(declared.to_bytes(4, "big") + b"p")
    assert (info.value.size, info.value.limit) == (declared, DEFAULT_MAX_FRAME)
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("framing", "wire", "buffered"),
    [
        (LineFraming(), b"no line end", 11),
        (LengthPrefixFraming(), b"\x00\x00\x00\x05abc", 7),
        (LengthPrefixFraming(), b"\x00\x00", 2),
    ],
)
def test_eof_inside_a_frame(framing: Framing, wire: bytes, buffered: int) -> None:
    decoder = framing.decoder()
    assert decoder.feed(wire) == []
    with pytest.raises(IncompleteFrame) as info:
        decoder.feed_eof()
    assert info.value.buffered == buffered


@pytest.mark.parametrize("message", [b"a\nb", b"ends with cr\r"])
def test_encode_rejects_a_line_end_inside_a_line(message: bytes) -> None:
    with pytest.raises(ValueError, match="line"):
        LineFraming().encode(message)


@pytest.mark.parametrize(
    "make", [lambda: LineFraming(max_size=3), lambda: LengthPrefixFraming(max_size=3)]
)
def test_encode_of_a_message_above_max_size_raises_limit_exceeded(
    make: Callable[[], Framing],
) -> None:
    with pytest.raises(LimitExceeded, match=r"4 bytes exceeds max_size 3"):
        make().encode(b"four")
    assert make().decoder().feed(make().encode(b"thr")) == [b"thr"]  # max_size exactly


def test_only_raw_framing_is_raw() -> None:
    assert RawFraming().raw
    assert not LineFraming().raw
    assert not LengthPrefixFraming().raw


def test_large_frame_in_small_pieces() -> None:
    framing = LengthPrefixFraming()
    wire = framing.encode(b"y" * DEFAULT_MAX_FRAME)
    decoder = framing.decoder()
    out = [f for i in range(0, len(wire), 1000) for f in decoder.feed(wire[i : i + 1000])]
    assert out == [b"y" * DEFAULT_MAX_FRAME]


# -- skipping over-long lines (chat) ---------------------------------------------------------


def skip_outcome(framing: Framing, chunks: list[bytes]) -> list[bytes | str]:
    """Messages of a skipping decoder, ``OVERLONG_LINE`` shown as the string "overlong"."""
    decoder = framing.decoder()
    out: list[bytes | str] = []
    for chunk in chunks:
        out += ["overlong" if m is OVERLONG_LINE else m for m in decoder.feed(chunk)]
        assert decoder.buffered <= (framing.max_size or 0) + 1
    decoder.feed_eof()
    return out


@FUZZ
@given(st.lists(st.binary(max_size=3 * SMALL_LIMIT), max_size=6))
def test_skipping_decoder_reports_overlong_lines_the_same_at_every_split(
    lines: list[bytes],
) -> None:
    framing = LineFraming(max_size=SMALL_LIMIT, skip_overlong=True)
    lines = [line.replace(b"\n", b"") for line in lines]
    wire = b"".join(line + b"\n" for line in lines)
    expected = skip_outcome(framing, [wire])
    want = [
        "overlong" if len(line.removesuffix(b"\r")) > SMALL_LIMIT else line.removesuffix(b"\r")
        for line in lines
    ]
    assert expected == want
    for chunks in split_patterns(wire):
        assert skip_outcome(framing, chunks) == expected


def test_skipping_decoder_discards_an_endless_line_without_buffering_it() -> None:
    framing = LineFraming(max_size=100, skip_overlong=True)
    decoder = framing.decoder()
    assert decoder.feed(b"a" * 60) == []
    assert decoder.in_message
    assert decoder.feed(b"b" * 60) == [OVERLONG_LINE]  # reported as soon as it is known
    assert decoder.buffered == 0
    for _ in range(1000):  # 1 MB more of the same line: nothing kept, nothing reported
        assert decoder.feed(b"c" * 1000) == []
        assert decoder.buffered == 0
        assert decoder.in_message
    assert decoder.feed(b"c\nnext\n") == [b"next"]
    assert not decoder.in_message
    assert decoder.feed(b"x" * 200 + b"\r\nok\r\n") == [OVERLONG_LINE, b"ok"]
    decoder.feed(b"y" * 200)
    decoder.feed_eof()  # reported already: not an incomplete frame


def test_skip_overlong_is_off_by_default_and_shown() -> None:
    assert not LineFraming().skip_overlong
    assert (
        repr(LineFraming(10, skip_overlong=True)) == "LineFraming(max_size=10, skip_overlong=True)"
    )
    with pytest.raises(FrameTooLarge):
        LineFraming(max_size=10).decoder().feed(b"x" * 20 + b"\n")
