"""netlib: fast, bounded, safe TCP and UDP networking for asyncio.

Import everything from here; ``netlib.__all__`` is the public API.
"""

from netlib.aio.echo import EchoProtocol, UpperEchoProtocol
from netlib.client import connect_tcp
from netlib.errors import (
    BrokenResourceError,
    ClosedResourceError,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    LimitExceeded,
    NetlibError,
    PeerTimedOut,
    ProtocolError,
    SlowConsumer,
    WouldBlock,
)
from netlib.handlers import echo_handler, upper_echo_handler
from netlib.runner import loop_factory, run
from netlib.sansio.framing import (
    Framing,
    LengthPrefixFraming,
    LineFraming,
    RawFraming,
)
from netlib.server import (
    Handler,
    Server,
    ServerStatistics,
    open_tcp_server,
    serve_tcp,
)
from netlib.streams import MessageStream

__version__ = "0.1.0"

__all__ = [
    "BrokenResourceError",
    "ClosedResourceError",
    "EchoProtocol",
    "EndOfStream",
    "FrameTooLarge",
    "Framing",
    "Handler",
    "IncompleteFrame",
    "LengthPrefixFraming",
    "LimitExceeded",
    "LineFraming",
    "MessageStream",
    "NetlibError",
    "PeerTimedOut",
    "ProtocolError",
    "RawFraming",
    "Server",
    "ServerStatistics",
    "SlowConsumer",
    "UpperEchoProtocol",
    "WouldBlock",
    "__version__",
    "connect_tcp",
    "echo_handler",
    "loop_factory",
    "open_tcp_server",
    "run",
    "serve_tcp",
    "upper_echo_handler",
]
