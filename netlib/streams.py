"""MessageStream (ordered, reliable, one connection) and DatagramEndpoint (unreliable).

A ``MessageStream`` is what a ``serve_tcp`` handler receives and what ``connect_tcp``
yields. It sends and receives whole messages in the connection's framing (raw chunks,
lines, or length-prefixed frames), applies backpressure both ways, and raises errors from
``netlib.errors``:

* ``receive()`` raises ``EndOfStream`` when the peer has finished, ``ProtocolError`` for a
  malformed or oversized frame, ``PeerTimedOut`` when a deadline passed, and
  ``BrokenResourceError`` when the connection is gone. Iteration stops at ``EndOfStream``.
* ``send()`` waits while the peer is slow to read; it raises ``BrokenResourceError`` once
  the connection is lost and ``ClosedResourceError`` after ``aclose()``.

Receiving never suspends while messages are buffered, and consecutive sends are written in
one system call per event-loop iteration, which is where netlib gains over asyncio streams.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, Self, TypeAlias

from netlib.aio.datagram import DatagramEndpointProtocol, DatagramStatistics, address_key
from netlib.aio.sockets import extra_info
from netlib.aio.stream import Digest, StreamProtocol
from netlib.errors import ClosedResourceError, PeerTimedOut, WouldBlock

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_FANOUT_FLUSH",
    "DEFAULT_REQUEST_RETRIES",
    "DEFAULT_REQUEST_TIMEOUT",
    "Datagram",
    "DatagramEndpoint",
    "DatagramHandler",
    "Handler",
    "MessageStream",
]

DEFAULT_CLOSE_TIMEOUT: Final = 10.0
"""Seconds ``aclose()`` waits for buffered data to reach the peer before aborting."""
DEFAULT_REQUEST_TIMEOUT: Final = 1.0
"""Seconds ``DatagramEndpoint.request()`` waits for a reply before retransmitting."""
DEFAULT_FANOUT_FLUSH: Final = 64 * 1024
"""Pending bytes at which ``send_framed`` writes at once rather than at the iteration's end."""
DEFAULT_REQUEST_RETRIES: Final = 3
"""Retransmissions ``DatagramEndpoint.request()`` makes before giving up."""


def as_bytes(data: object) -> bytes:
    """``data`` as ``bytes`` for a send: bytes-like objects are copied (a later change to
    the caller's buffer must not change what is sent); anything else is a ``TypeError``
    that says what to do."""
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, bytes):  # a subclass
        return data
    if isinstance(data, str):
        raise TypeError("send() takes bytes, not str: encode text first, as in text.encode()")
    raise TypeError(f"send() takes bytes, not {type(data).__name__}")


def _ignore(_nbytes: int) -> None:
    pass


class MessageStream:
    """Send and receive whole messages on one connection.

    Created by netlib (``serve_tcp`` handlers, ``connect_tcp``), not by users.
    """

    __slots__ = (
        "_close_timeout",
        "_closed",
        "_conn",
        "_encode",
        "_linger",
        "_protocol",
    )

    def __init__(
        self,
        protocol: StreamProtocol,
        *,
        linger: bool = False,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._protocol = protocol
        self._conn = protocol.conn
        self._encode = protocol.encoder
        self._linger = linger
        self._close_timeout = close_timeout
        self._closed = False

    # -- receiving --------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """Return the next message.

        Raises:
            EndOfStream: the peer finished sending.
            ProtocolError: the peer sent a malformed or oversized frame (connection closed).
            PeerTimedOut: the first-message or idle deadline passed (connection closed).
            SlowConsumer: the server's memory budget evicted this connection.
            BrokenResourceError: the connection is gone.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        conn = self._conn
        while not conn.frames:
            if self._closed:
                raise ClosedResourceError("stream closed")
            waiter = self._protocol.readable_waiter()
            if waiter is None:
                raise conn.end_error()
            await waiter
        return self._protocol.take()

    async def discard(self, count: Callable[[int], object] | None = None) -> None:
        """Read and drop everything until the peer finishes, keeping nothing.

        ``count(nbytes)`` is called with the size of each read (messages already received
        first). The bytes are counted where the kernel put them: no copy, no queue, and
        no wake-up of this task per read, so a sink keeps up with the socket (the speed
        test's TCP receiver is one). Meant for raw framing: nothing is decoded.

        Raises:
            PeerTimedOut, BrokenResourceError: the connection failed before its end.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        self._check_open()
        await self._protocol.sink(count or _ignore)

    def __aiter__(self) -> Self:
        return self

    def __anext__(self) -> Awaitable[bytes]:
        """The next message; iteration ends at ``EndOfStream`` and raises every other error
        ``receive()`` raises."""
        # A future, not a coroutine: the hot path allocates no frame per message, and an
        # idle handler holds no frame of netlib's while it waits.
        if self._closed:
            raise ClosedResourceError("stream closed")
        return self._protocol.message_waiter()

    # -- sending ----------------------------------------------------------------------------

    async def send(self, message: bytes) -> None:
        """Send one message, waiting while the peer is slow to read.

        Raises:
            LimitExceeded: the message is larger than the framing's ``max_size``.
            ValueError: a line message contains a line end.
            BrokenResourceError: the connection is gone.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        if message.__class__ is not bytes:
            message = as_bytes(message)
        protocol = self._protocol
        if protocol.write_paused or protocol.lost or self._closed:
            self._check_open()
            await protocol.drain(len(message))
        encode = self._encode
        protocol.write(message if encode is None else encode(message))

    def send_nowait(self, message: bytes) -> None:
        """Send one message now, or raise ``WouldBlock`` if the peer is slow to read."""
        self._check_open()
        if self._protocol.lost:
            raise self._protocol.lost_error()
        if self._protocol.write_paused:
            raise WouldBlock("the peer is not reading fast enough")
        self.send_queued(message)

    def send_queued(self, message: bytes) -> None:
        """Queue one message without waiting, whatever the peer's pace.

        For fan-out services that bound each consumer themselves with ``buffered_size``
        instead of waiting on it (a chat room must not wait for its slowest member).
        A no-op once the connection is lost.

        Raises:
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        self._check_open()
        if message.__class__ is not bytes:
            message = as_bytes(message)
        encode = self._encode
        self._protocol.write(message if encode is None else encode(message))

    def send_framed(self, wire: bytes, *, limit: int = DEFAULT_FANOUT_FLUSH) -> None:
        """Queue bytes already in this connection's framing, written at the end of this loop
        iteration together with whatever else is queued by then, or at once past ``limit``
        pending bytes.

        For fan-out services that frame a message once for many streams, and bound each
        consumer themselves with ``buffered_size``. A no-op once the connection is lost.

        Raises:
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        self._check_open()
        self._protocol.write_soon(wire, limit)

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of the file open on descriptor ``fd``, from ``offset``, as
        they are (no framing: for raw streams).

        The kernel copies the bytes: with ``loop.sendfile`` where the loop has it
        (asyncio), with ``os.sendfile`` on the socket where it does not (uvloop; 64 KiB go
        through the transport when the socket is full). With TLS the file is read 64 KiB
        at a time and each piece written once the peer has taken the previous ones. Either
        way a download holds at most about 128 KiB whatever the peer's pace. The
        descriptor stays the caller's to close. Returns the bytes sent (fewer if the file
        is shorter).

        Raises:
            BrokenResourceError: the connection was lost, or the peer stopped reading for
                the send (or idle) deadline.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        self._check_open()
        if self._protocol.lost:
            raise self._protocol.lost_error()
        return await self._protocol.sendfile(fd, offset, count)

    async def receive_file(
        self,
        fd: int,
        count: int,
        *,
        digest: Digest | None = None,
        progress: Callable[[int], object] | None = None,
        idle_timeout: float | None = None,
    ) -> int:
        """Receive exactly ``count`` bytes as they are (no framing: for raw streams) and
        write them to the file open on descriptor ``fd``, at its current position.

        The counterpart of ``sendfile``: the transport reads straight into buffers of 4 MiB
        (``aio.stream.RECEIVE_FILE_BUFFER``), each written with one ``os.write``; with a
        ``digest`` (a ``hashlib`` object) each buffer is hashed in a worker thread while
        the next one fills. At most 16 MiB are held (``RECEIVE_FILE_BUFFERS``): reading
        pauses until the digest frees a buffer. Messages already received go first; bytes
        past ``count`` are not read, and stay for ``receive()``. ``progress(n)`` is called
        with the bytes written so far after each write. The descriptor stays the caller's
        to close. Returns ``count``.

        Whatever ends the call, the bytes received are in the file: an interrupted
        transfer leaves a prefix of it. After an error or a cancellation the connection is
        aborted (its input stopped in the middle of the bytes).

        Raises:
            BrokenResourceError: the connection closed or was lost first.
            PeerTimedOut: no byte came for ``idle_timeout`` seconds.
            OSError: the file could not be written.
            ClosedResourceError: this stream was closed with ``aclose()``.
        """
        self._check_open()
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        return await self._protocol.receive_file(
            fd, count, digest=digest, progress=progress, idle_timeout=idle_timeout
        )

    def end_input(self) -> None:
        """Stop receiving: messages already received stay readable, then iteration ends.

        Later input is read and discarded; replies can still be sent. Graceful shutdown
        does this to every connection.
        """
        self._protocol.end_input()

    @property
    def buffered_size(self) -> int:
        """Bytes sent but not yet handed to the kernel (netlib's and the transport's)."""
        return self._protocol.buffered_size()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError("stream closed")

    # -- closing ----------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Flush what was sent and close the connection (idempotent).

        Waits at most ``close_timeout`` seconds for the data to reach the peer, then aborts.
        """
        if self._closed:
            return
        self._closed = True
        await self._protocol.finish(self._close_timeout, linger=self._linger)

    def abort(self) -> None:
        """Close the connection at once, discarding buffered data."""
        self._closed = True
        self._protocol.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is closed (by either side)."""
        await self._protocol.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- introspection ----------------------------------------------------------------------

    @property
    def local_address(self) -> Any:
        """This side's socket address (a tuple for IP, a path for Unix sockets)."""
        return self.extra("sockname")

    @property
    def remote_address(self) -> Any:
        """The peer's socket address (a tuple for IP, a path or '' for Unix sockets)."""
        return self.extra("peername")

    def extra(self, name: str, default: Any = None) -> Any:
        """Return transport information: ``peername``, ``sockname``, ``ssl_object``, ..."""
        return extra_info(self._protocol.transport, name, default)

    @property
    def socket(self) -> socket.socket | None:
        """The underlying socket object, for options netlib does not wrap."""
        sock: socket.socket | None = self.extra("socket")
        return sock

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<MessageStream {state} peer={self.remote_address!r}>"


Handler: TypeAlias = Callable[[MessageStream], Awaitable[object]]
"""A stream handler: ``async def handler(stream: MessageStream)``, run once per connection."""


class DatagramEndpoint:
    """Send and receive datagrams on one UDP (or Unix datagram) socket.

    Created by ``open_udp_endpoint``. Datagrams are unreliable: they may be lost, duplicated
    or reordered by the network; ``request()`` adds timeouts and retries for request/reply.

    ``next_address``, given by ``open_udp_endpoint`` for a name with several addresses,
    connects the endpoint to the name's next address and returns False when none is left:
    ``request()`` calls it when the port is closed (ICMP) where nothing has answered yet.
    """

    __slots__ = ("_closed", "_lock", "_next_address", "_protocol")

    def __init__(
        self,
        protocol: DatagramEndpointProtocol,
        next_address: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        self._protocol = protocol
        self._next_address = next_address
        self._lock = asyncio.Lock()
        self._closed = False

    async def send(self, data: bytes, addr: Any = None) -> None:
        """Send one datagram to ``addr`` (None: the connected peer).

        Waits while the kernel's send buffer is full. An empty datagram is sent as one.

        Raises:
            LimitExceeded: ``data`` is larger than ``max_size``.
            ClosedResourceError: the endpoint is closed.
        """
        self._check_open()
        if data.__class__ is not bytes:
            data = as_bytes(data)
        self._protocol.check_size(data)
        await self._protocol.drain()
        self._protocol.sendto(data, addr)

    def send_nowait(self, data: bytes, addr: Any = None) -> None:
        """Send one datagram now, or raise ``WouldBlock`` if the send buffer is full."""
        self._check_open()
        if data.__class__ is not bytes:
            data = as_bytes(data)
        self._protocol.check_size(data)
        if self._protocol.write_paused:
            raise WouldBlock("the send buffer is full")
        self._protocol.sendto(data, addr)

    async def receive(self) -> tuple[bytes, Any]:
        """Return the next datagram and its source address.

        Raises:
            ClosedResourceError: the endpoint is closed.
        """
        protocol = self._protocol
        if not protocol.queue:
            self._check_open()
            await protocol.wait_readable()
            if not protocol.queue:
                raise ClosedResourceError("endpoint closed")
        return protocol.pop()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[bytes, Any]:
        """The next datagram. netlib's one iteration rule: ``async for`` ends where
        ``receive()`` raises ``EndOfStream`` and raises every other error. Datagrams have no
        end of stream, so iterating a closed endpoint raises ``ClosedResourceError``, as
        iterating a closed ``MessageStream`` does."""
        return await self.receive()

    async def request(
        self,
        data: bytes,
        addr: Any = None,
        *,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,  # noqa: ASYNC109 (per attempt, then resend)
        retries: int = DEFAULT_REQUEST_RETRIES,
    ) -> bytes:
        """Send ``data`` and return the next datagram from the same peer, retrying on loss.

        Each attempt waits ``timeout`` seconds; after ``retries`` retransmissions the call
        gives up. Requests on one endpoint run one at a time; datagrams from other peers
        stay queued for ``receive()``. A late reply to an earlier attempt counts as the
        reply: protocols that must tell replies apart carry their own request ids.

        An endpoint connected by a name with several addresses (``localhost``: ::1 and
        127.0.0.1) moves to the next one when the port is closed at the first (ICMP) and
        nothing has come from it yet, as a TCP client tries each address in turn.

        Raises:
            PeerTimedOut: no reply after ``retries + 1`` attempts.
            ConnectionRefusedError: the peer's port is closed (ICMP, connected endpoints;
                at every address of its name).
            LimitExceeded: ``data`` is larger than ``max_size``.
        """
        peer = address_key(addr if addr is not None else self.remote_address)
        if peer is None:
            raise ValueError("request() needs addr on an endpoint without a remote address")
        async with self._lock:
            attempts = 0
            while attempts <= retries:
                try:
                    reply = await self._attempt(data, addr, peer, timeout)
                except ConnectionRefusedError:
                    if addr is not None or not await self._moved_on():
                        raise
                    peer = address_key(self.remote_address)
                    continue
                if reply is not None:
                    return reply
                attempts += 1
        raise PeerTimedOut(f"no reply from {peer!r} after {retries + 1} attempts")

    async def _moved_on(self) -> bool:
        """Connect to the name's next address, if there is one and nothing came from this
        one (a peer that answered and then closed its port is not passed over)."""
        if self._next_address is None or self._protocol.received:
            return False
        return await self._next_address()

    async def _attempt(self, data: bytes, addr: Any, peer: Any, wait: float) -> bytes | None:
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._protocol.expected[peer] = waiter
        try:
            await self.send(data, addr)
            async with asyncio.timeout(wait):
                return await waiter
        except TimeoutError:
            return None
        finally:
            if self._protocol.expected.get(peer) is waiter:
                del self._protocol.expected[peer]

    def fail_request(self, exc: Exception) -> None:
        """Fail the waiting ``request()`` with ``exc`` (an ICMP error for the peer)."""
        peer = address_key(self.remote_address)
        waiter = self._protocol.expected.pop(peer, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _check_open(self) -> None:
        if self._closed or self._protocol.lost:
            raise ClosedResourceError("endpoint closed")

    def close(self) -> None:
        """Close the endpoint (sync; idempotent). Queued datagrams are discarded."""
        self._closed = True
        self._protocol.close()

    async def aclose(self) -> None:
        """Close the endpoint and wait until its socket is released."""
        self.close()
        await self._protocol.wait_closed()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def statistics(self) -> DatagramStatistics:
        """Counters: received, sent, drops by reason, errors, queued."""
        return self._protocol.statistics()

    @property
    def local_address(self) -> Any:
        """This side's socket address."""
        return extra_info(self._protocol.transport, "sockname")

    @property
    def remote_address(self) -> Any:
        """The connected peer's address, or None for an unconnected endpoint."""
        return extra_info(self._protocol.transport, "peername")


class _Replier(Protocol):
    def send(self, data: bytes, addr: Any) -> bool: ...


class Datagram:
    """One received datagram, handed to a UDP handler.

    Attributes:
        data: the payload (``b""`` for an empty datagram).
        addr: the source address.
    """

    __slots__ = ("_server", "addr", "data")

    def __init__(self, data: bytes, addr: Any, server: _Replier) -> None:
        self.data = data
        self.addr = addr
        self._server = server

    def reply(self, data: bytes) -> bool:
        """Send ``data`` back to the source now.

        Returns:
            True if sent; False if the reply budget or a full send buffer dropped it
            (counted in the server's statistics).

        Raises:
            LimitExceeded: ``data`` is larger than the server's ``max_size``.
        """
        return self._server.send(data, self.addr)

    def __repr__(self) -> str:
        return f"<Datagram {len(self.data)} bytes from {self.addr!r}>"


DatagramHandler: TypeAlias = Callable[[Datagram], Awaitable[object]]
