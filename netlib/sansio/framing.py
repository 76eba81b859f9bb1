"""Message framing for byte streams: bytes in, whole messages out, every buffer bounded.

TCP is a byte stream without record boundaries: two sends can arrive as one read and one
send as two. A framing turns the stream back into messages. Three are offered:

* ``RawFraming``: no boundaries; each chunk read is a message (for echo-like services).
* ``LineFraming``: a message is the bytes before ``\\n``; a ``\\r`` before the ``\\n`` is
  dropped, so CRLF from ``telnet`` or ``nc -C`` works. A message cannot contain ``\\n`` nor
  end with ``\\r``. Limit: ``max_size`` bytes per line (default ``DEFAULT_MAX_LINE``, 64 KiB).
* ``LengthPrefixFraming``: a 4-byte big-endian length, then that many bytes. Any payload is
  allowed. Limit: ``max_size`` bytes per frame (default ``DEFAULT_MAX_FRAME``, 1 MiB).

Rules of this module:

* No I/O, no clock: a decoder is fed bytes and returns the messages completed so far.
* One decoder per connection (``framing.decoder()``); a framing object itself is immutable
  and shared.
* A decoder never buffers more than ``max_size`` plus the framing overhead. It raises
  ``FrameTooLarge`` as soon as a frame is known to exceed the limit (length prefix: when the
  header arrives, before any payload; line: when ``max_size`` bytes have no ``\\n``), and
  its buffer is cleared: the connection must then be closed, as the stream is out of sync.
* ``feed_eof()`` raises ``IncompleteFrame`` if a partial frame is buffered.
* ``LineFraming(skip_overlong=True)`` is the one exception to "an oversized frame ends the
  stream": a line is still in sync after its ``\\n``, so its decoder reports an over-long
  line as the marker ``OVERLONG_LINE`` (in its place among the messages, test it with
  ``is``), buffers none of it and discards its bytes up to the next ``\\n`` (a chat
  refuses a pasted page without cutting its sender off).
* Theory of operation: the fast path handles a chunk with no partial frame pending using
  ``bytes`` slicing only (one ``split`` for lines); a partial frame is kept in a
  ``bytearray`` and grown in place, so a frame arriving in many pieces costs linear time.
"""

from __future__ import annotations

from typing import Final, Protocol

from netlib.errors import FrameTooLarge, IncompleteFrame, LimitExceeded

__all__ = [
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_LINE",
    "OVERLONG_LINE",
    "Decoder",
    "Framing",
    "LengthPrefixFraming",
    "LineFraming",
    "RawFraming",
    "framing_from_name",
]

DEFAULT_MAX_LINE: Final = 64 * 1024
"""Longest line ``LineFraming`` accepts, in bytes, without its line end."""

DEFAULT_MAX_FRAME: Final = 1024 * 1024
"""Largest payload ``LengthPrefixFraming`` accepts, in bytes, without its header."""

_HEADER: Final = 4
_MAX_HEADER_VALUE: Final = 2**32 - 1


class Decoder(Protocol):
    """A per-connection, stateful decoder: bytes in, complete messages out."""

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the messages it completes (``[]``: need more bytes).

        Raises:
            FrameTooLarge: a frame exceeds the limit; the decoder is reset.
        """
        ...

    def feed_eof(self) -> None:
        """Signal the end of the stream.

        Raises:
            IncompleteFrame: a partial frame was buffered.
        """
        ...

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame."""
        ...

    @property
    def in_message(self) -> bool:
        """True while a message has begun and not ended (buffered, or being skipped)."""
        ...


class Framing(Protocol):
    """A message framing: an encoder and a factory of per-connection decoders."""

    @property
    def raw(self) -> bool:
        """True if messages are sent as they are and each chunk read is one (no framing)."""
        ...

    @property
    def max_size(self) -> int | None:
        """Largest message in bytes, or None for no limit (raw chunks)."""
        ...

    def decoder(self) -> Decoder:
        """Return a fresh decoder for one connection."""
        ...

    def encode(self, message: bytes) -> bytes:
        """Return the wire bytes for ``message``.

        Raises:
            LimitExceeded: the message is larger than ``max_size``.
            ValueError: the message cannot be framed (a line with a line end).
        """
        ...


class _RawDecoder:
    __slots__ = ()

    def feed(self, data: bytes) -> list[bytes]:
        return [data] if data else []

    def feed_eof(self) -> None:
        return None

    @property
    def buffered(self) -> int:
        return 0

    @property
    def in_message(self) -> bool:
        return False


_RAW_DECODER: Final = _RawDecoder()


class RawFraming:
    """No framing: each chunk received is one message, and a message is sent as is."""

    __slots__ = ()
    max_size = None
    raw = True

    def decoder(self) -> Decoder:
        return _RAW_DECODER  # stateless: one for all connections

    def encode(self, message: bytes) -> bytes:
        return message

    def __repr__(self) -> str:
        return "RawFraming()"


_SHORT_LINE: Final = 256
"""Below this length a line decoder splits a read in one ``bytes.split()``; above it, it
finds each line end with ``bytes.find()``, a memchr (break-even near 300 bytes)."""


class _OverlongLine(bytes):
    """The type of ``OVERLONG_LINE``: an empty ``bytes`` that no decoded line can be."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OVERLONG_LINE"


OVERLONG_LINE: Final[bytes] = _OverlongLine()
"""Stands for a line above ``max_size`` in the messages of a ``LineFraming(skip_overlong=True)``
decoder; its bytes were discarded. Compare with ``is`` (it equals ``b""``)."""


class _LineDecoder:
    __slots__ = ("_max", "_partial")
    _skip = False  # see _SkippingLineDecoder

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._partial = bytearray()

    @property
    def in_message(self) -> bool:
        return bool(self._partial)

    @property
    def buffered(self) -> int:
        return len(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            return self._feed_partial(data)
        end = data.find(b"\n")  # a memchr
        if end < 0:
            lines: list[bytes] = []
            tail = data
        elif end < _SHORT_LINE:  # short lines: split() cuts them all in one C loop
            lines = data.split(b"\n")
            tail = lines.pop()
        else:  # long lines: split() would test every byte (9 µs for a 16 KiB line)
            lines = []
            start = 0
            while end >= 0:
                lines.append(data[start:end])
                start = end + 1
                end = data.find(b"\n", start)
            tail = data[start:]
        self._finish(lines)
        if tail:
            self._keep(tail, lines, unfinished=True)
        return lines

    def _feed_partial(self, data: bytes) -> list[bytes]:
        end = data.find(b"\n")
        lines: list[bytes] = []
        if end < 0:
            self._keep(data, lines, unfinished=True)
            return lines
        if self._keep(data[:end], lines, unfinished=False):
            lines.append(bytes(self._partial))
            self._partial.clear()
            self._finish(lines)
        try:
            lines.extend(self.feed(data[end + 1 :]))
        except FrameTooLarge as exc:
            exc.frames[:0] = lines
            raise
        return lines

    def _keep(self, data: bytes, done: list[bytes], *, unfinished: bool) -> bool:
        """Buffer ``data`` as the start of a line and return True, or, if it cannot fit the
        limit, raise (or when skipping: report the line, skip the rest of it if
        ``unfinished``, and return False)."""
        size = len(self._partial) + len(data)
        if size > self._max + 1:  # one byte more for the '\r' of a CRLF line end
            self._partial.clear()
            if not self._skip:
                raise FrameTooLarge("line", size, self._max, done)
            done.append(OVERLONG_LINE)
            self._skip_rest(unfinished)
            return False
        self._partial += data
        return True

    def _skip_rest(self, skipping: bool) -> None:
        """Discard input up to the next line end (only a skipping decoder does)."""

    def _finish(self, lines: list[bytes]) -> None:
        """Drop the CR of CRLF line ends in place; raise on a line above the limit (or
        when skipping, put ``OVERLONG_LINE`` in its place)."""
        limit = self._max
        for i, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = lines[i] = line[:-1]
            if len(line) > limit:
                if self._skip:
                    lines[i] = OVERLONG_LINE
                    continue
                self._partial.clear()
                raise FrameTooLarge("line", len(line), limit, lines[:i])

    def feed_eof(self) -> None:
        if self._partial:
            buffered = len(self._partial)
            self._partial.clear()
            raise IncompleteFrame(buffered)


class _SkippingLineDecoder(_LineDecoder):
    """A line decoder that reports an over-long line as ``OVERLONG_LINE`` and discards its
    bytes up to the next line end, instead of failing."""

    __slots__ = ("_skipping",)
    _skip = True

    def __init__(self, max_size: int) -> None:
        super().__init__(max_size)
        self._skipping = False  # inside an over-long line: discard up to its '\n'

    @property
    def in_message(self) -> bool:
        return self._skipping or bool(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self._skipping:
            end = data.find(b"\n")
            if end < 0:
                return []
            self._skipping = False
            data = data[end + 1 :]
        return super().feed(data)

    def _skip_rest(self, skipping: bool) -> None:
        self._skipping = skipping

    def feed_eof(self) -> None:
        self._skipping = False  # the over-long line was reported already
        super().feed_eof()


class LineFraming:
    """Messages are lines ending in ``\\n`` (a ``\\r`` before it is tolerated and dropped).

    Args:
        max_size: longest line in bytes, without the line end (default 64 KiB).
        skip_overlong: report a longer line as ``OVERLONG_LINE`` and skip its bytes up to
            the next line end, instead of failing with ``FrameTooLarge``.
    """

    __slots__ = ("_max_size", "_skip_overlong")

    def __init__(self, max_size: int = DEFAULT_MAX_LINE, *, skip_overlong: bool = False) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self._max_size = max_size
        self._skip_overlong = skip_overlong

    raw = False

    @property
    def max_size(self) -> int:
        return self._max_size

    @property
    def skip_overlong(self) -> bool:
        """Whether an over-long line is reported and skipped rather than an error."""
        return self._skip_overlong

    def decoder(self) -> Decoder:
        if self._skip_overlong:
            return _SkippingLineDecoder(self._max_size)
        return _LineDecoder(self._max_size)

    def encode(self, message: bytes) -> bytes:
        if b"\n" in message or message.endswith(b"\r"):
            raise ValueError("a line message cannot contain b'\\n' nor end with b'\\r'")
        if len(message) > self._max_size:
            raise LimitExceeded(f"line of {len(message)} bytes exceeds max_size {self._max_size}")
        return message + b"\n"

    def __repr__(self) -> str:
        skip = ", skip_overlong=True" if self._skip_overlong else ""
        return f"LineFraming(max_size={self._max_size}{skip})"


class _LengthPrefixDecoder:
    __slots__ = ("_max", "_need", "_partial")

    def __init__(self, max_size: int) -> None:
        self._max = max_size
        self._partial = bytearray()
        self._need = 0  # total bytes (header + payload) the partial frame needs; 0: unknown

    @property
    def buffered(self) -> int:
        return len(self._partial)

    @property
    def in_message(self) -> bool:
        return bool(self._partial)

    def feed(self, data: bytes) -> list[bytes]:
        if self._partial:
            data = self._join(data)
            if not data:
                return []
        frames: list[bytes] = []
        pos, end = 0, len(data)
        limit = self._max
        while end - pos >= _HEADER:
            size = int.from_bytes(data[pos : pos + _HEADER], "big")
            if size > limit:
                self._reset()
                raise FrameTooLarge("frame", size, limit, frames)
            stop = pos + _HEADER + size
            if stop > end:
                self._need = stop - pos
                break
            frames.append(data[pos + _HEADER : stop])
            pos = stop
        if pos < end:
            self._partial += data[pos:] if pos else data
        return frames

    def _join(self, data: bytes) -> bytes:
        """Grow the partial frame; return the bytes to parse once it can complete."""
        self._partial += data
        if len(self._partial) < max(self._need, _HEADER):
            return b""
        joined = bytes(self._partial)
        self._reset()
        return joined

    def _reset(self) -> None:
        self._partial.clear()
        self._need = 0

    def feed_eof(self) -> None:
        if self._partial:
            buffered = len(self._partial)
            self._reset()
            raise IncompleteFrame(buffered)


class LengthPrefixFraming:
    """Messages are a 4-byte big-endian length followed by that many bytes.

    Args:
        max_size: largest payload in bytes (default 1 MiB, at most 2**32 - 1).
    """

    __slots__ = ("_max_size",)

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        if not 0 <= max_size <= _MAX_HEADER_VALUE:
            raise ValueError(f"max_size must be in [0, {_MAX_HEADER_VALUE}], got {max_size}")
        self._max_size = max_size

    raw = False

    @property
    def max_size(self) -> int:
        return self._max_size

    def decoder(self) -> Decoder:
        return _LengthPrefixDecoder(self._max_size)

    def encode(self, message: bytes) -> bytes:
        size = len(message)
        if size > self._max_size:
            raise LimitExceeded(f"frame of {size} bytes exceeds max_size {self._max_size}")
        return size.to_bytes(_HEADER, "big") + message

    def __repr__(self) -> str:
        return f"LengthPrefixFraming(max_size={self._max_size})"


_NAMED: Final[dict[str, type[RawFraming | LineFraming | LengthPrefixFraming]]] = {
    "raw": RawFraming,
    "line": LineFraming,
    "length": LengthPrefixFraming,
}


def framing_from_name(framing: Framing | str) -> Framing:
    """Return ``framing``, or the framing with default limits named ``raw``/``line``/``length``.

    Raises:
        ValueError: an unknown name.
    """
    if not isinstance(framing, str):
        return framing
    try:
        return _NAMED[framing]()
    except KeyError:
        names = ", ".join(sorted(_NAMED))
        raise ValueError(f"unknown framing {framing!r}; expected one of: {names}") from None
