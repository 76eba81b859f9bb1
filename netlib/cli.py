"""The ``netlib`` command line (also ``python -m netlib``).

::

    netlib [--loop auto|uvloop|asyncio] echo serve [--proto tcp|udp] [--mode echo|upper|timestamp]
                                       [--upper] [--host H] [--port P]
    netlib [--loop ...] echo send [--proto tcp|udp] [--host H] [--port P] [--timeout S]
                                  [--retries N] MESSAGE...
    netlib [--loop ...] chat serve [--proto tcp|udp|both] [--host H] [--port P]
    netlib [--loop ...] chat join [--proto tcp|udp] [--host H] [--port P] [--nick N]
    netlib [--loop ...] demo

Bad arguments (an invalid host or port, say) print a one-line usage error and exit with
status 2; network failures print one line and exit with status 1. No tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import socket
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, Final, NoReturn

import netlib
from netlib.chat_client import run_chat_client
from netlib.demo import run_demo
from netlib.runner import LOOP_CHOICES

__all__ = ["DEFAULT_CHAT_PORT", "DEFAULT_ECHO_PORT", "main"]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_ECHO_PORT: Final = 7007
DEFAULT_CHAT_PORT: Final = 7077
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


class UsageError(Exception):
    """Bad input found after parsing (e.g. a host that does not resolve): exit status 2."""


def host_type(value: str) -> str:
    """Accept an IPv4/IPv6 literal or a syntactically valid host name."""
    try:
        ipaddress.ip_address(value.strip("[]"))
        return value.strip("[]")
    except ValueError:
        pass
    if _HOSTNAME.match(value) and not value.replace(".", "").isdigit():
        return value
    raise argparse.ArgumentTypeError(f"invalid host {value!r}: expected an IP address or name")


def port_type(value: str) -> int:
    """Accept a port number 0..65535 (0: pick a free port, for servers)."""
    try:
        port = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0..65535")
    return port


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="netlib", description="Fast, bounded, safe TCP and UDP networking for asyncio."
    )
    parser.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default=None,
        help="event loop (default: $NETLIB_LOOP or auto = uvloop if installed)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_echo(commands)
    _add_chat(commands)
    commands.add_parser("demo", help="run the demo: servers on loopback driven by clients")
    return parser


def _add_network_options(
    parser: argparse.ArgumentParser, port: int, protos: Sequence[str] = ("tcp", "udp")
) -> None:
    parser.add_argument("--proto", choices=protos, default="tcp", help="transport")
    parser.add_argument(
        "--host",
        type=host_type,
        default=DEFAULT_HOST,
        help=f"address or name (default {DEFAULT_HOST})",
    )
    parser.add_argument("--port", type=port_type, default=port, help=f"port (default {port})")


def _add_echo(commands: Any) -> None:
    echo = commands.add_parser("echo", help="echo server and client")
    actions = echo.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="run an echo server until interrupted")
    _add_network_options(serve, DEFAULT_ECHO_PORT)
    serve.add_argument(
        "--mode",
        choices=["echo", "upper", "timestamp"],
        default="echo",
        help="reply unchanged, upper-cased, or timestamped (timestamp: udp only)",
    )
    serve.add_argument("--upper", action="store_true", help="same as --mode upper")
    serve.add_argument(
        "--max-connections-per-host",
        type=per_host_type,
        default=netlib.server.DEFAULT_MAX_CONNECTIONS_PER_HOST,
        metavar="N",
        help="tcp: connections one peer address may hold open; 0 for no limit "
        f"(default {netlib.server.DEFAULT_MAX_CONNECTIONS_PER_HOST})",
    )
    send = actions.add_parser("send", help="send messages and print each reply")
    _add_network_options(send, DEFAULT_ECHO_PORT)
    send.add_argument(
        "--timeout",
        type=positive_float,
        default=2.0,
        help="seconds to wait for each reply (udp: per attempt; default 2)",
    )
    send.add_argument(
        "--retries",
        type=retries_type,
        default=3,
        help="udp: times to resend a request that got no reply (default 3)",
    )
    send.add_argument("messages", nargs="+", metavar="MESSAGE", help="text to send")


def _add_chat(commands: Any) -> None:
    chat = commands.add_parser("chat", help="chat server and interactive client")
    actions = chat.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = actions.add_parser("serve", help="run a chat server until interrupted")
    _add_network_options(serve, DEFAULT_CHAT_PORT, ("tcp", "udp", "both"))
    join = actions.add_parser("join", help="join a chat (interactive, or lines from a pipe)")
    _add_network_options(join, DEFAULT_CHAT_PORT)
    join.add_argument("--nick", help="nickname to take after joining")


def per_host_type(value: str) -> int | None:
    try:
        count = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {value!r}: not a number") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"invalid count {count}: must be >= 0")
    return count or None


def retries_type(value: str) -> int:
    try:
        retries = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid retries {value!r}: not a number") from None
    if not 0 <= retries <= 100:
        raise argparse.ArgumentTypeError(f"invalid retries {retries}: must be 0..100")
    return retries


def _announce(args: argparse.Namespace, mode: str, addresses: list[Any]) -> None:
    where = ", ".join(_format_address(a) for a in addresses)
    name = {"echo": "echo", "upper": "upper-case echo", "timestamp": "timestamp echo"}[mode]
    print(f"netlib {name} server ({args.proto}) listening on {where}; Ctrl-C to stop", flush=True)


async def echo_serve(args: argparse.Namespace) -> None:
    mode: netlib.EchoMode = "upper" if args.upper else args.mode
    if args.proto == "udp":
        async with netlib.open_udp_server(
            netlib.make_udp_echo_handler(mode), args.host, args.port
        ) as udp_server:
            _announce(args, mode, udp_server.addresses)
            await udp_server.serve_forever()
        return
    if mode == "timestamp":
        raise UsageError("--mode timestamp is a UDP service: use --proto udp")
    handler = netlib.upper_echo_handler if mode == "upper" else netlib.echo_handler
    async with netlib.open_tcp_server(
        handler, args.host, args.port, max_connections_per_host=args.max_connections_per_host
    ) as server:
        _announce(args, mode, server.addresses)
        await server.serve_forever()


async def echo_send_udp(args: argparse.Namespace) -> None:
    async with netlib.open_udp_endpoint(args.host, args.port) as endpoint:
        for message in args.messages:
            reply = await endpoint.request(
                message.encode(), timeout=args.timeout, retries=args.retries
            )
            print(reply.decode(errors="replace"), flush=True)


async def echo_send(args: argparse.Namespace) -> None:
    if args.proto == "udp":
        await echo_send_udp(args)
        return
    async with netlib.connect_tcp(args.host, args.port, framing="line") as stream:
        for message in args.messages:
            await stream.send(message.encode())
            try:
                reply = await asyncio.wait_for(stream.receive(), args.timeout)
            except TimeoutError:
                raise netlib.PeerTimedOut(f"no reply within {args.timeout}s") from None
            print(reply.decode(errors="replace"), flush=True)


def _format_address(address: Any) -> str:
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def _run(coro: Coroutine[Any, Any, None], args: argparse.Namespace) -> int:
    try:
        netlib.loop_factory(args.loop)
    except ValueError as exc:  # e.g. --loop uvloop where uvloop is not installed
        coro.close()
        raise UsageError(str(exc)) from None
    try:
        netlib.run(coro, loop=args.loop)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 0
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {args.host!r}: {exc.strerror}") from None
    except (OSError, netlib.NetlibError) as exc:
        return _fail(_describe(exc, args))
    return 0


def _describe(exc: BaseException, args: argparse.Namespace) -> str:
    where = f"{args.host}:{args.port}"
    match exc:
        case ConnectionRefusedError() if args.proto == "udp":
            return f"nothing listens on {where} (udp port unreachable)"
        case ConnectionRefusedError():
            return f"connection refused by {where}"
        case netlib.PeerTimedOut() if args.proto == "udp":
            return f"no reply from {where} after {args.retries + 1} attempts of {args.timeout}s"
        case netlib.EndOfStream():
            return f"{where} closed the connection"
        case OSError() if exc.strerror:
            return f"{where}: {exc.strerror}"
    return f"{where}: {exc}"


def _fail(message: str) -> int:
    print(f"netlib: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        return _dispatch(args)
    except UsageError as exc:
        _usage_error(parser, str(exc))


async def chat_serve(args: argparse.Namespace) -> None:
    async with netlib.open_chat_server(args.host, args.port, proto=args.proto) as server:
        where = ", ".join(
            f"{_format_address(a)} ({kind})"
            for kind, addresses in (("tcp", server.tcp_addresses), ("udp", server.udp_addresses))
            for a in addresses
        )
        print(f"netlib chat server listening on {where}; Ctrl-C to stop", flush=True)
        await server.serve_forever()


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _run(run_demo(), args)
    if args.command == "chat" and args.action == "join":
        return _join(args)
    if args.command == "chat":
        return _run(chat_serve(args), args)
    if args.action == "serve":
        return _run(echo_serve(args), args)
    return _run(echo_send(args), args)


def _join(args: argparse.Namespace) -> int:
    status = 0

    async def join() -> None:
        nonlocal status
        status = await run_chat_client(args.host, args.port, proto=args.proto, nick=args.nick)

    code = _run(join(), args)
    return code or status


def _usage_error(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.print_usage(sys.stderr)
    print(f"netlib: error: {message}", file=sys.stderr)
    raise SystemExit(2)
