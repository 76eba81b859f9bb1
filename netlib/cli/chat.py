"""``netlib chat serve`` and ``netlib chat join``."""

from __future__ import annotations

import argparse
from typing import Any, Final

import netlib
from netlib.cli._common import (
    STOP_HINT,
    Signals,
    UsageError,
    add_command,
    add_reporting,
    count_or_none,
    emit,
    format_address,
    host_type,
    in_group,
    port_type,
    serve_until_stopped,
    show_statistics,
)
from netlib.cli._workers import add_workers

__all__ = ["DEFAULT_CHAT_PORT", "add_chat"]

DEFAULT_CHAT_PORT: Final = 7077
DEFAULT_HOST: Final = "127.0.0.1"

SERVE_EXAMPLES = """\
examples:
  netlib chat serve                          # TCP and UDP on 127.0.0.1:7077
  netlib chat serve --host '*' --proto tcp   # TCP only, every interface
  netlib chat serve --proto rudp             # reliable UDP (join --proto rudp)
  nc 127.0.0.1 7077                          # join from nc (or telnet)
"""
JOIN_EXAMPLES = """\
examples:
  netlib chat join --nick alice              # interactive, with line editing
  printf '/join #ops\\nhello\\n' | netlib chat join --nick bot
  netlib chat join --nick logger --stay < /dev/null > chat.log   # listen only
  netlib chat join --proto rudp --nick alice # to a chat serve --proto rudp
"""


def add_chat(commands: Any, common: argparse.ArgumentParser) -> None:
    chat = add_command(
        commands,
        "chat",
        common,
        help="chat server and client",
        description="A chat with nicknames, rooms and private messages over TCP and UDP.",
    )
    actions = chat.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = add_command(
        actions,
        "serve",
        common,
        help="run a chat server until interrupted",
        description="Serve chat rooms over TCP and UDP (one set of rooms) until Ctrl-C or "
        "SIGTERM. Clients: netlib chat join, nc, telnet.",
        epilog=SERVE_EXAMPLES,
    )
    _add_address(serve, ("tcp", "udp", "both", "rudp"), "both")
    serve.add_argument(
        "--max-connections-per-host",
        type=count_or_none,
        default=netlib.server.DEFAULT_MAX_CONNECTIONS_PER_HOST,
        metavar="N",
        help="tcp members one peer address may have; 0 for no limit",
    )
    add_reporting(serve)
    add_workers(serve, chat_serve, name="chat", check=_check_workers)
    serve.set_defaults(server=True)

    join = add_command(
        actions,
        "join",
        common,
        help="join a chat (interactive, or lines from a pipe)",
        description="Join a chat server. On a terminal: a prompt with line editing (needs "
        "the cli extra). With a pipe: each line of stdin is sent at the pace the server "
        "states, then the client leaves; it exits 1 if a line was not delivered.",
        epilog=JOIN_EXAMPLES,
    )
    _add_address(join, ("tcp", "udp", "rudp"), "tcp")
    join.add_argument(
        "--nick", help="nickname to take after joining; a refused one ends the client (status 1)"
    )
    join.add_argument(
        "--stay",
        action="store_true",
        help="with a pipe: keep printing what arrives after the end of input, until the "
        "server ends the session or Ctrl-C (a listen-only logger: --stay < /dev/null)",
    )
    join.set_defaults(run=chat_join, server=False)


def _add_address(parser: argparse.ArgumentParser, protos: tuple[str, ...], proto: str) -> None:
    parser.add_argument("--proto", choices=protos, default=proto, help="transport")
    parser.add_argument(
        "--host",
        type=host_type,
        default=DEFAULT_HOST,
        help="address or name; '*' for every interface",
    )
    parser.add_argument("--port", type=port_type, default=DEFAULT_CHAT_PORT, help="port")


def _check_workers(args: argparse.Namespace) -> None:
    """Chat workers must share their rooms, or members of one worker could not talk with
    those of another: they share them through NATS (``--nats URL``, when it exists)."""
    if not getattr(args, "nats", None):
        raise UsageError(
            "chat --workers needs --nats URL: the workers share their rooms through NATS "
            "(without it, members on different workers could not see each other)"
        )
    if args.proto != "tcp":
        raise UsageError(
            f"--workers serves TCP: add --proto tcp (--proto {args.proto} runs in one "
            "process: a UDP member would move between workers when one restarts)"
        )


async def chat_serve(args: argparse.Namespace, signals: Signals) -> int:
    async with netlib.open_chat_server(
        args.host,
        args.port,
        proto=args.proto,
        max_connections_per_host=args.max_connections_per_host,
        reuse_port=in_group(args),
    ) as server:
        addresses = [
            (f"{format_address(a)} ({kind})", kind, format_address(a))
            for kind, found in (
                ("tcp", server.tcp_addresses),
                ("udp", server.udp_addresses),
                ("rudp", server.rudp_addresses),
            )
            for a in found
        ]
        emit(
            args,
            f"netlib chat server listening on {', '.join(a[0] for a in addresses)}{STOP_HINT}",
            event="listening",
            addresses=[{"proto": kind, "address": address} for _, kind, address in addresses],
        )
        await serve_until_stopped(args, signals, "chat", server.service.statistics)
    show_statistics(args, "chat", server.service.statistics())
    return 0


async def chat_join(args: argparse.Namespace, _signals: Signals) -> int:
    from netlib.chat_client import run_chat_client  # prompt_toolkit only when joining

    return await run_chat_client(
        args.host or "127.0.0.1", args.port, proto=args.proto, nick=args.nick, stay=args.stay
    )
