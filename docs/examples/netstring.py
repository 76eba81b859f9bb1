"""A framing of your own: netstrings (``5:hello,``), bounded like netlib's own framings.

Run it from a clone: ``.venv/bin/python docs/examples/netstring.py`` (or ``python`` wherever
netlib is installed).
"""

from __future__ import annotations

import netlib


class NetstringDecoder:
    """One connection's decoder: bytes in, complete messages out, at most one frame held."""

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._max_digits = len(str(max_size))
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes held for a partial frame."""
        return len(self._buffer)

    @property
    def in_message(self) -> bool:
        """True while a frame has begun and not ended (times the message deadline)."""
        return bool(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the messages it completes (``[]``: need more bytes)."""
        self._buffer += data
        frames: list[bytes] = []
        while self._buffer:
            colon = self._buffer.find(b":", 0, self._max_digits + 1)
            if colon < 0:
                if len(self._buffer) > self._max_digits:  # no ':' where one must be
                    self._fail(f"no length in {bytes(self._buffer[:16])!r}")
                return frames
            header = bytes(self._buffer[:colon])
            if not header.isdigit():
                self._fail(f"bad length {header!r}")
            size = int(header)
            if size > self._max_size:  # refused before the payload is buffered
                self._buffer.clear()
                raise netlib.FrameTooLarge("netstring", size, self._max_size, frames)
            end = colon + 1 + size
            if len(self._buffer) <= end:  # the payload or its ',' is still to come
                return frames
            if self._buffer[end] != ord(","):
                self._fail("a netstring must end with ','")
            frames.append(bytes(self._buffer[colon + 1 : end]))
            del self._buffer[: end + 1]
        return frames

    def feed_eof(self) -> None:
        """The peer finished sending: a partial frame left over is an error."""
        if self._buffer:
            buffered = len(self._buffer)
            self._buffer.clear()
            raise netlib.IncompleteFrame(buffered)

    def _fail(self, reason: str) -> None:
        self._buffer.clear()
        raise netlib.ProtocolError(reason)


class NetstringFraming:
    """Netstrings: ``<length>:<payload>,``; any payload, at most ``max_size`` bytes."""

    raw = False  # messages are framed; True would mean "each chunk read is a message"

    def __init__(self, max_size: int = 64 * 1024) -> None:
        self._max_size = max_size

    @property
    def max_size(self) -> int:
        return self._max_size

    def decoder(self) -> NetstringDecoder:
        return NetstringDecoder(self._max_size)

    def encode(self, message: bytes) -> bytes:
        if len(message) > self._max_size:
            raise netlib.LimitExceeded(f"{len(message)} bytes exceeds {self._max_size}")
        return b"%d:%s," % (len(message), message)


async def main() -> None:
    framing = NetstringFraming(max_size=100)
    wire = framing.encode(b"hello") + framing.encode(b"") + framing.encode(b"a,b:c\n")
    print("on the wire:", wire)
    decoder = framing.decoder()  # the same messages, however the bytes are split
    print("byte by byte:", [m for i in range(len(wire)) for m in decoder.feed(wire[i : i + 1])])

    async with netlib.open_tcp_server(netlib.upper_echo_handler, framing=framing) as server:
        host, port = server.addresses[0][:2]
        async with netlib.connect_tcp(host, port, framing=framing) as client:
            for message in [b"hello", b"", b"a,b:c\n"]:
                await client.send(message)
                print(message, "->", await client.receive())
        # a peer whose frames exceed the server's limit is cut off at the header
        async with netlib.connect_tcp(host, port, framing=NetstringFraming()) as client:
            await client.send(b"x" * 1000)
            try:
                await client.receive()
            except (netlib.EndOfStream, netlib.BrokenResourceError):
                print("the server closed the connection")
        await server.shutdown()
    print("protocol errors:", server.statistics().protocol_errors)


if __name__ == "__main__":
    netlib.run(main())
