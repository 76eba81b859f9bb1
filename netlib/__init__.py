"""netlib: fast, bounded, safe TCP and UDP networking for asyncio.

Import everything from here; ``netlib.__all__`` is the public API.
"""

from netlib.aio.datagram import DatagramStatistics
from netlib.aio.echo import (
    DatagramEchoProtocol,
    DatagramEchoStatistics,
    EchoProtocol,
    UpperEchoProtocol,
)
from netlib.chat import ChatServer, open_chat_server, serve_chat
from netlib.client import connect_tcp, open_udp_endpoint
from netlib.errors import (
    BrokenResourceError,
    ClosedResourceError,
    DigestMismatch,
    EndOfStream,
    FrameTooLarge,
    IncompleteFrame,
    LimitExceeded,
    NetlibError,
    PeerTimedOut,
    ProtocolError,
    RequestRefused,
    ServiceUnavailable,
    SlowConsumer,
    WouldBlock,
)
from netlib.files import (
    DownloadResult,
    FileServer,
    download_file,
    list_files,
    open_file_server,
    serve_files,
)
from netlib.nats_server import LocalNatsServer, find_nats_server
from netlib.rudp import (
    ReliableConfig,
    ReliableUDPServer,
    ReliableUDPServerStatistics,
    connect_reliable_udp,
    open_reliable_udp_server,
    serve_reliable_udp,
)
from netlib.runner import loop_factory, run
from netlib.sansio.datagram import ReplyBudget, ReplyBudgetStatistics
from netlib.sansio.echo import EchoMode
from netlib.sansio.framing import (
    Framing,
    LengthPrefixFraming,
    LineFraming,
    RawFraming,
)
from netlib.server import (
    Server,
    ServerStatistics,
    open_tcp_server,
    serve_tcp,
)
from netlib.services.chat import (
    ChatLimits,
    ChatProtocol,
    ChatService,
    ChatServiceStatistics,
    DatagramChatProtocol,
    make_chat_handler,
)
from netlib.services.echo import (
    echo_handler,
    make_udp_echo_handler,
    udp_echo_handler,
    upper_echo_handler,
)
from netlib.services.files import FileService, FileServiceLimits, FileServiceStatistics
from netlib.services.hub import ClusterNode, Directory, Hub, MemoryHub, Subscriber
from netlib.services.nats_hub import NatsHub, NatsHubConfig, NatsHubStatistics
from netlib.speedtest import (
    DatagramCounts,
    LatencySummary,
    SpeedtestLimits,
    SpeedtestRequest,
    SpeedtestResult,
    SpeedtestServer,
    SpeedtestService,
    SpeedtestServiceStatistics,
    TransferTotals,
    format_speedtest_results,
    open_speedtest_server,
    run_speedtest,
    serve_speedtest,
)
from netlib.streams import Datagram, DatagramEndpoint, DatagramHandler, Handler, MessageStream
from netlib.udp import (
    DatagramServer,
    DatagramServerStatistics,
    open_udp_server,
    serve_udp,
)

__version__ = "0.1.0"

__all__ = [
    "BrokenResourceError",
    "ChatLimits",
    "ChatProtocol",
    "ChatServer",
    "ChatService",
    "ChatServiceStatistics",
    "ClosedResourceError",
    "ClusterNode",
    "Datagram",
    "DatagramChatProtocol",
    "DatagramCounts",
    "DatagramEchoProtocol",
    "DatagramEchoStatistics",
    "DatagramEndpoint",
    "DatagramHandler",
    "DatagramServer",
    "DatagramServerStatistics",
    "DatagramStatistics",
    "DigestMismatch",
    "Directory",
    "DownloadResult",
    "EchoMode",
    "EchoProtocol",
    "EndOfStream",
    "FileServer",
    "FileService",
    "FileServiceLimits",
    "FileServiceStatistics",
    "FrameTooLarge",
    "Framing",
    "Handler",
    "Hub",
    "IncompleteFrame",
    "LatencySummary",
    "LengthPrefixFraming",
    "LimitExceeded",
    "LineFraming",
    "LocalNatsServer",
    "MemoryHub",
    "MessageStream",
    "NatsHub",
    "NatsHubConfig",
    "NatsHubStatistics",
    "NetlibError",
    "PeerTimedOut",
    "ProtocolError",
    "RawFraming",
    "ReliableConfig",
    "ReliableUDPServer",
    "ReliableUDPServerStatistics",
    "ReplyBudget",
    "ReplyBudgetStatistics",
    "RequestRefused",
    "Server",
    "ServerStatistics",
    "ServiceUnavailable",
    "SlowConsumer",
    "SpeedtestLimits",
    "SpeedtestRequest",
    "SpeedtestResult",
    "SpeedtestServer",
    "SpeedtestService",
    "SpeedtestServiceStatistics",
    "Subscriber",
    "TransferTotals",
    "UpperEchoProtocol",
    "WouldBlock",
    "__version__",
    "connect_reliable_udp",
    "connect_tcp",
    "download_file",
    "echo_handler",
    "find_nats_server",
    "format_speedtest_results",
    "list_files",
    "loop_factory",
    "make_chat_handler",
    "make_udp_echo_handler",
    "open_chat_server",
    "open_file_server",
    "open_reliable_udp_server",
    "open_speedtest_server",
    "open_tcp_server",
    "open_udp_endpoint",
    "open_udp_server",
    "run",
    "run_speedtest",
    "serve_chat",
    "serve_files",
    "serve_reliable_udp",
    "serve_speedtest",
    "serve_tcp",
    "serve_udp",
    "udp_echo_handler",
    "upper_echo_handler",
]
