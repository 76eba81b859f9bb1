"""netlib's exception tree: one root, subclassing built-ins callers already catch.

::

    NetlibError(Exception)
    ├── ProtocolError(NetlibError, ValueError)        the peer broke the wire protocol
    │   ├── FrameTooLarge                             a frame or line is above its limit
    │   ├── IncompleteFrame                           the stream ended inside a frame
    │   └── DigestMismatch                            a download is not what the server said
    ├── RequestRefused(NetlibError)                   a server answered a request with an error
    ├── EndOfStream(NetlibError, EOFError)            the peer finished sending (clean EOF)
    ├── ClosedResourceError(NetlibError, RuntimeError)  this side closed the object already
    ├── BrokenResourceError(NetlibError, ConnectionError)  the connection is gone
    │   ├── PeerTimedOut(BrokenResourceError, TimeoutError)  a deadline passed
    │   └── SlowConsumer                              the peer read too slowly and was cut off
    ├── ServiceUnavailable(NetlibError, ConnectionError)  a service netlib depends on (the
    │                                                 chat cluster's broker) is out of reach
    ├── WouldBlock(NetlibError, BlockingIOError)      a *_nowait call cannot proceed now
    └── LimitExceeded(NetlibError, OverflowError)     a local, named limit stops the call

Errors caused by the peer (``ProtocolError``, ``BrokenResourceError``) are expected in a
network service; a handler that does not catch them ends its connection and the server
counts them, it does not crash.
"""

from __future__ import annotations

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "DigestMismatch",
    "EndOfStream",
    "FrameTooLarge",
    "IncompleteFrame",
    "LimitExceeded",
    "NetlibError",
    "PeerTimedOut",
    "ProtocolError",
    "RequestRefused",
    "ServiceUnavailable",
    "SlowConsumer",
    "WouldBlock",
]


class NetlibError(Exception):
    """Root of every exception netlib raises on purpose."""


class ProtocolError(NetlibError, ValueError):
    """The peer sent bytes that break the wire protocol."""


class FrameTooLarge(ProtocolError):
    """A frame or line is larger than its named limit.

    Raised before the oversized payload is buffered: ``limit`` is the configured maximum
    and ``size`` the size the peer announced (or the bytes seen so far without a line end).
    ``frames`` holds the messages the same ``feed()`` call completed before the bad one, so
    nothing valid is lost and the outcome is the same however the input was split.
    """

    def __init__(self, kind: str, size: int, limit: int, frames: list[bytes] | None = None):
        super().__init__(f"{kind} of {size} bytes exceeds the limit of {limit} bytes")
        self.kind = kind
        self.size = size
        self.limit = limit
        self.frames: list[bytes] = frames if frames is not None else []


class IncompleteFrame(ProtocolError):
    """The stream ended with a partial frame buffered (``buffered`` bytes)."""

    def __init__(self, buffered: int) -> None:
        super().__init__(f"stream ended inside a frame ({buffered} bytes buffered)")
        self.buffered = buffered


class EndOfStream(NetlibError, EOFError):
    """The peer finished sending; no more messages will arrive."""

    def __init__(self, message: str = "the peer closed its side of the connection") -> None:
        super().__init__(message)


class ClosedResourceError(NetlibError, RuntimeError):
    """The object was closed by this side and cannot be used any more."""


class BrokenResourceError(NetlibError, ConnectionError):
    """The connection is gone (reset, aborted, or closed by a limit)."""


class PeerTimedOut(BrokenResourceError, TimeoutError):
    """A deadline passed: first frame, idle, send or request timeout."""


class SlowConsumer(BrokenResourceError):
    """The peer read too slowly and was disconnected to protect the others."""


class ServiceUnavailable(NetlibError, ConnectionError):
    """A service netlib depends on cannot be reached now (the message broker of a chat
    cluster, say); the same call may succeed later."""


class WouldBlock(NetlibError, BlockingIOError):
    """A ``*_nowait`` call cannot proceed without waiting."""


class LimitExceeded(NetlibError, OverflowError):
    """A local, named limit refuses the call (queue full, message too large to send)."""


class DigestMismatch(ProtocolError):
    """A downloaded file's SHA-256 differs from the digest its server sent."""


class RequestRefused(NetlibError):
    """A server answered a request with an error status (a file server's 404, say).

    Attributes:
        status: the status code (404, 403, ...).
        reason: the server's explanation, one line.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
