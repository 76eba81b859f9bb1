"""``netlib echo serve`` and ``netlib echo send``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any, Final

import netlib
from netlib.cli._common import (
    STOP_HINT,
    Signals,
    UsageError,
    add_command,
    add_reporting,
    add_server_limits,
    add_tls_client,
    add_tls_server,
    client_tls,
    count_type,
    emit,
    format_address,
    host_type,
    in_group,
    port_type,
    positive_float,
    rudp_core,
    seconds_or_none,
    serve_until_stopped,
    server_tls,
    show_statistics,
)
from netlib.cli._workers import add_workers

__all__ = ["DEFAULT_ECHO_PORT", "add_echo"]

DEFAULT_ECHO_PORT: Final = 7007
DEFAULT_HOST: Final = "127.0.0.1"
CLI_FIRST_MESSAGE_TIMEOUT: Final = 300.0
"""The echo server's first-message deadline from the command line: 5 minutes, so a person
typing into ``nc`` is not cut off (the API's default, 10 s, suits programs)."""
CLI_IDLE_TIMEOUT: Final = 300.0
"""The echo server's idle deadline from the command line (the API's default is 60 s)."""
CLI_MESSAGE_TIMEOUT: Final = 10.0
"""Seconds a line may take from its first byte to its end. ``nc`` and ``telnet`` send a
line at once when Enter is pressed, so this keeps the slowloris guarantee (a trickled,
never-ending line is cut off) while people get minutes between lines."""

SERVE_EXAMPLES = """\
examples:
  netlib echo serve                          # TCP line echo on 127.0.0.1:7007
  netlib echo serve --proto udp --mode timestamp --port 7008
  netlib echo serve --proto rudp             # reliable UDP: one message per send
  netlib echo serve --host '*' --upper       # every interface, IPv4 and IPv6
  netlib echo serve --unix /tmp/echo.sock
  netlib echo serve --tls-cert cert.pem --tls-key key.pem
  netlib echo serve --workers 2              # two processes on one port (Linux)
"""
SEND_EXAMPLES = """\
examples:
  netlib echo send hello world               # one line each, prints each reply
  printf 'a\\nb\\n' | netlib echo send -       # lines from stdin
  netlib echo send --proto udp --port 7008 --json ping
  netlib echo send --proto rudp hello        # to an echo serve --proto rudp
"""


def add_echo(commands: Any, common: argparse.ArgumentParser) -> None:
    echo = add_command(
        commands,
        "echo",
        common,
        help="echo server and client",
        description="An echo server (TCP lines or UDP datagrams) and a client for it.",
    )
    actions = echo.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = add_command(
        actions,
        "serve",
        common,
        help="run an echo server until interrupted",
        description="Serve echo until Ctrl-C or SIGTERM, then shut down gracefully and "
        "print the statistics. TCP echoes lines; UDP echoes datagrams.",
        epilog=SERVE_EXAMPLES,
    )
    _add_address(serve)
    modes = serve.add_mutually_exclusive_group()
    modes.add_argument(
        "--mode",
        choices=["echo", "upper", "timestamp"],
        default="echo",
        help="reply unchanged, upper-cased, or timestamped (timestamp: udp only)",
    )
    modes.add_argument("--upper", action="store_true", help="same as --mode upper")
    timeouts = serve.add_argument_group("timeouts (tcp; 0 for none)")
    timeouts.add_argument(
        "--first-message-timeout",
        type=seconds_or_none,
        default=CLI_FIRST_MESSAGE_TIMEOUT,
        metavar="S",
        help="seconds a new connection has to send its first line",
    )
    timeouts.add_argument(
        "--idle-timeout",
        type=seconds_or_none,
        default=CLI_IDLE_TIMEOUT,
        metavar="S",
        help="seconds without traffic before a connection is closed",
    )
    timeouts.add_argument(
        "--message-timeout",
        type=seconds_or_none,
        default=CLI_MESSAGE_TIMEOUT,
        metavar="S",
        help="seconds a line may take from its first byte to its end",
    )
    add_server_limits(serve)
    add_reporting(serve)
    add_tls_server(serve)
    add_workers(serve, echo_serve, name="tcp echo", check=_check_workers)
    serve.set_defaults(server=True)

    send = add_command(
        actions,
        "send",
        common,
        help="send messages and print each reply",
        description="Send each MESSAGE (or each line of stdin, with - or no MESSAGE and a "
        "pipe) and print each reply. Exits 1 if a reply does not come.",
        epilog=SEND_EXAMPLES,
    )
    _add_address(send)
    send.add_argument(
        "--timeout",
        type=positive_float,
        default=2.0,
        help="seconds to wait for each reply (udp: per attempt)",
    )
    send.add_argument(
        "--retries",
        type=count_type(0, 100),
        default=3,
        help="udp: times to resend a request that got no reply",
    )
    send.add_argument("--json", action="store_true", help="one JSON object per reply")
    add_tls_client(send)
    send.add_argument(
        "messages", nargs="*", metavar="MESSAGE", help="text to send; - reads lines from stdin"
    )
    send.set_defaults(run=echo_send, server=False)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--proto",
        choices=["tcp", "udp", "rudp"],
        default="tcp",
        help="transport (rudp: reliable messages over UDP)",
    )
    parser.add_argument(
        "--host",
        type=host_type,
        default=DEFAULT_HOST,
        help="address or name; '*' for every interface",
    )
    parser.add_argument("--port", type=port_type, default=DEFAULT_ECHO_PORT, help="port")
    parser.add_argument("--unix", metavar="PATH", help="tcp: a Unix socket instead of a port")


# -- serve ------------------------------------------------------------------------------------


def _check_workers(args: argparse.Namespace) -> None:
    if args.proto != "tcp":
        raise UsageError(
            f"--workers serves TCP: --proto {args.proto} runs in one process (a datagram "
            "server's peers would move between workers when one restarts)"
        )
    if args.unix:
        raise UsageError("--workers serves a TCP port: a --unix socket runs in one process")


def _announce(args: argparse.Namespace, mode: str, addresses: list[Any]) -> None:
    where = ", ".join(format_address(a) for a in addresses)
    name = {"echo": "echo", "upper": "upper-case echo", "timestamp": "timestamp echo"}[mode]
    label, core = rudp_core() if args.proto == "rudp" else (args.proto, None)
    emit(
        args,
        f"netlib {name} server ({label}) listening on {where}{STOP_HINT}",
        event="listening",
        proto=args.proto,
        mode=mode,
        addresses=[format_address(a) for a in addresses],
        **({} if core is None else {"core": core}),
    )


async def echo_serve(args: argparse.Namespace, signals: Signals) -> int:
    mode: netlib.EchoMode = "upper" if args.upper else args.mode
    if args.proto == "udp":
        if args.unix or args.tls_cert:
            raise UsageError("--unix and --tls-cert are for --proto tcp")
        async with netlib.open_udp_server(
            netlib.make_udp_echo_handler(mode), args.host, args.port
        ) as udp_server:
            _announce(args, mode, udp_server.addresses)
            await serve_until_stopped(args, signals, "udp echo", udp_server.statistics)
        show_statistics(args, "udp echo", udp_server.statistics())
        return 0
    if mode == "timestamp":
        raise UsageError("--mode timestamp is a UDP service: use --proto udp")
    # each message echoed in a callback (no task per connection)
    protocol = netlib.UpperEchoStreamProtocol if mode == "upper" else netlib.EchoStreamProtocol
    if args.proto == "rudp":
        return await _serve_rudp(args, signals, protocol, mode)
    async with netlib.open_tcp_server(
        None,
        args.host,
        args.port,
        path=args.unix,
        protocol=protocol,
        framing="line",
        ssl=server_tls(args),
        max_connections=args.max_connections,
        max_connections_per_host=args.max_connections_per_host,
        first_frame_timeout=args.first_message_timeout,
        idle_timeout=args.idle_timeout,
        message_timeout=args.message_timeout,
        shutdown_grace=args.shutdown_grace,
        reuse_port=in_group(args),
    ) as server:
        signals.on_force(server.close)
        _announce(args, mode, server.addresses)
        await serve_until_stopped(
            args,
            signals,
            "tcp echo",
            server.statistics,
            open_connections=lambda: server.statistics().active,
            grace=args.shutdown_grace,
        )
    show_statistics(args, "tcp echo", server.statistics())
    return 0


async def _serve_rudp(
    args: argparse.Namespace,
    signals: Signals,
    protocol: type[netlib.EchoStreamProtocol],
    mode: netlib.EchoMode,
) -> int:
    """Echo over reliable UDP: each message is echoed as one message."""
    if args.unix or args.tls_cert:
        raise UsageError("--unix and --tls-cert are for --proto tcp")
    async with netlib.open_reliable_udp_server(
        None,
        args.host,  # None ('*'): IPv4 and IPv6, on one dual-stack socket
        args.port,
        protocol=protocol,
        max_connections=args.max_connections or 10_000,
        max_connections_per_host=args.max_connections_per_host or 10_000,
        first_frame_timeout=args.first_message_timeout,
        idle_timeout=args.idle_timeout,
        shutdown_grace=args.shutdown_grace,
    ) as server:
        signals.on_force(server.close)
        _announce(args, mode, server.addresses)
        await serve_until_stopped(
            args,
            signals,
            "rudp echo",
            server.statistics,
            open_connections=lambda: server.statistics().active,
            grace=args.shutdown_grace,
        )
    show_statistics(args, "rudp echo", server.statistics())
    return 0


# -- send -------------------------------------------------------------------------------------


def _messages(args: argparse.Namespace) -> list[str]:
    """The messages to send: the arguments, or stdin's lines for ``-`` or a pipe."""
    if args.messages and args.messages != ["-"]:
        if "-" in args.messages:
            raise UsageError("- (read stdin) cannot be mixed with MESSAGE arguments")
        return list(args.messages)
    if not args.messages and sys.stdin.isatty():
        raise UsageError("nothing to send: give MESSAGE arguments, or - and lines on stdin")
    return [line.rstrip("\r\n") for line in sys.stdin]


def _check_lines(messages: list[str]) -> list[bytes]:
    """Every message as one line of the TCP echo's framing, or a usage error saying why."""
    framing = netlib.LineFraming()
    lines = []
    for number, message in enumerate(messages, 1):
        data = message.encode()
        if "\n" in message or message.endswith("\r"):
            raise UsageError(
                f"message {number} contains a line break: TCP echo is line-based, so give "
                "each line as its own MESSAGE (or pipe them with -)"
            )
        if len(data) > framing.max_size:
            raise UsageError(
                f"message {number} is {len(data)} bytes: over the TCP echo's line limit of "
                f"{framing.max_size} bytes (use --proto udp, or shorter lines)"
            )
        lines.append(data)
    return lines


def _show_reply(args: argparse.Namespace, message: bytes, reply: bytes, started: float) -> None:
    text = reply.decode(errors="replace")
    rtt = round((time.perf_counter() - started) * 1000, 3)
    emit(args, text, message=message.decode(errors="replace"), reply=text, rtt_ms=rtt)


async def echo_send(args: argparse.Namespace, _signals: Signals) -> int:
    if args.proto == "udp":
        messages = [m.encode() for m in _messages(args)]
        async with netlib.open_udp_endpoint(args.host, args.port) as endpoint:
            for number, message in enumerate(messages, 1):
                started = time.perf_counter()
                try:
                    reply = await endpoint.request(
                        message, timeout=args.timeout, retries=args.retries
                    )
                except netlib.LimitExceeded as exc:
                    raise UsageError(f"message {number} cannot be sent: {exc}") from None
                _show_reply(args, message, reply, started)
        return 0
    if args.proto == "rudp":
        if args.unix or args.tls or args.cacert or args.insecure:
            raise UsageError("--unix and the TLS options are for --proto tcp")
        messages = [m.encode() for m in _messages(args)]
        connecting = netlib.connect_reliable_udp(
            args.host or "127.0.0.1", args.port, connect_timeout=args.timeout
        )
    else:
        messages = _check_lines(_messages(args))
        connecting = netlib.connect_tcp(
            args.host or "127.0.0.1",
            args.port,
            path=args.unix,
            framing="line",
            ssl=client_tls(args),
        )
    async with connecting as stream:
        for line in messages:
            started = time.perf_counter()
            await stream.send(line)
            try:
                reply = await asyncio.wait_for(stream.receive(), args.timeout)
            except TimeoutError:
                raise netlib.PeerTimedOut(f"no reply within {args.timeout:g}s") from None
            _show_reply(args, line, reply, started)
    return 0
