"""netlib: fast, bounded, safe TCP and UDP networking for asyncio.

Import everything from here; ``netlib.__all__`` is the public API.
"""

import typing as _typing
from importlib import import_module as _import_module
from importlib.util import find_spec as _find_spec

if _typing.TYPE_CHECKING:  # the names load on first use (``__getattr__``): see _HOMES
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
        EchoStreamProtocol,
        UpperEchoStreamProtocol,
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
    "EchoStreamProtocol",
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
    "UpperEchoStreamProtocol",
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

_HOMES: _typing.Final[dict[str, str]] = {
    "DatagramStatistics": "netlib.aio.datagram",
    "DatagramEchoProtocol": "netlib.aio.echo",
    "DatagramEchoStatistics": "netlib.aio.echo",
    "EchoProtocol": "netlib.aio.echo",
    "UpperEchoProtocol": "netlib.aio.echo",
    "EchoStreamProtocol": "netlib.services.echo",
    "UpperEchoStreamProtocol": "netlib.services.echo",
    "ChatServer": "netlib.chat",
    "open_chat_server": "netlib.chat",
    "serve_chat": "netlib.chat",
    "connect_tcp": "netlib.client",
    "open_udp_endpoint": "netlib.client",
    "BrokenResourceError": "netlib.errors",
    "ClosedResourceError": "netlib.errors",
    "DigestMismatch": "netlib.errors",
    "EndOfStream": "netlib.errors",
    "FrameTooLarge": "netlib.errors",
    "IncompleteFrame": "netlib.errors",
    "LimitExceeded": "netlib.errors",
    "NetlibError": "netlib.errors",
    "PeerTimedOut": "netlib.errors",
    "ProtocolError": "netlib.errors",
    "RequestRefused": "netlib.errors",
    "ServiceUnavailable": "netlib.errors",
    "SlowConsumer": "netlib.errors",
    "WouldBlock": "netlib.errors",
    "DownloadResult": "netlib.files",
    "FileServer": "netlib.files",
    "download_file": "netlib.files",
    "list_files": "netlib.files",
    "open_file_server": "netlib.files",
    "serve_files": "netlib.files",
    "LocalNatsServer": "netlib.nats_server",
    "find_nats_server": "netlib.nats_server",
    "ReliableConfig": "netlib.rudp",
    "ReliableUDPServer": "netlib.rudp",
    "ReliableUDPServerStatistics": "netlib.rudp",
    "connect_reliable_udp": "netlib.rudp",
    "open_reliable_udp_server": "netlib.rudp",
    "serve_reliable_udp": "netlib.rudp",
    "loop_factory": "netlib.runner",
    "run": "netlib.runner",
    "ReplyBudget": "netlib.sansio.datagram",
    "ReplyBudgetStatistics": "netlib.sansio.datagram",
    "EchoMode": "netlib.sansio.echo",
    "Framing": "netlib.sansio.framing",
    "LengthPrefixFraming": "netlib.sansio.framing",
    "LineFraming": "netlib.sansio.framing",
    "RawFraming": "netlib.sansio.framing",
    "Server": "netlib.server",
    "ServerStatistics": "netlib.server",
    "open_tcp_server": "netlib.server",
    "serve_tcp": "netlib.server",
    "ChatLimits": "netlib.services.chat",
    "ChatProtocol": "netlib.services.chat",
    "ChatService": "netlib.services.chat",
    "ChatServiceStatistics": "netlib.services.chat",
    "DatagramChatProtocol": "netlib.services.chat",
    "make_chat_handler": "netlib.services.chat",
    "echo_handler": "netlib.services.echo",
    "make_udp_echo_handler": "netlib.services.echo",
    "udp_echo_handler": "netlib.services.echo",
    "upper_echo_handler": "netlib.services.echo",
    "FileService": "netlib.services.files",
    "FileServiceLimits": "netlib.services.files",
    "FileServiceStatistics": "netlib.services.files",
    "ClusterNode": "netlib.services.hub",
    "Directory": "netlib.services.hub",
    "Hub": "netlib.services.hub",
    "MemoryHub": "netlib.services.hub",
    "Subscriber": "netlib.services.hub",
    "NatsHub": "netlib.services.nats_hub",
    "NatsHubConfig": "netlib.services.nats_hub",
    "NatsHubStatistics": "netlib.services.nats_hub",
    "DatagramCounts": "netlib.speedtest",
    "LatencySummary": "netlib.speedtest",
    "SpeedtestLimits": "netlib.speedtest",
    "SpeedtestRequest": "netlib.speedtest",
    "SpeedtestResult": "netlib.speedtest",
    "SpeedtestServer": "netlib.speedtest",
    "SpeedtestService": "netlib.speedtest",
    "SpeedtestServiceStatistics": "netlib.speedtest",
    "TransferTotals": "netlib.speedtest",
    "format_speedtest_results": "netlib.speedtest",
    "open_speedtest_server": "netlib.speedtest",
    "run_speedtest": "netlib.speedtest",
    "serve_speedtest": "netlib.speedtest",
    "Datagram": "netlib.streams",
    "DatagramEndpoint": "netlib.streams",
    "DatagramHandler": "netlib.streams",
    "Handler": "netlib.streams",
    "MessageStream": "netlib.streams",
    "DatagramServer": "netlib.udp",
    "DatagramServerStatistics": "netlib.udp",
    "open_udp_server": "netlib.udp",
    "serve_udp": "netlib.udp",
}
"""Where each public name lives. ``import netlib`` loads none of them: a name's module is
imported when the name is first used, so a command line or a program that needs the echo
client does not pay for the file server, the chat cluster and h11 (``netlib --version``
took 0.36-0.42 s importing every module, 0.21-0.29 s now). ``tests/test_architecture.py``
checks that this table, the imports above and ``__all__`` agree."""


def __getattr__(name: str) -> _typing.Any:
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(_import_module(home), name)
    elif _find_spec(f"netlib.{name}") is not None:
        value = _import_module(f"netlib.{name}")  # a module: ``netlib.server``
    else:
        raise AttributeError(f"module 'netlib' has no attribute {name!r}")
    globals()[name] = value  # the next use is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
