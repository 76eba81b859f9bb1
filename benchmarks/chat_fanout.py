"""Chat fan-out benchmark: netlib's chat server against a hand-written broadcast server.

Usage::

    .venv/bin/python benchmarks/chat_fanout.py [--quick] [--runs N] [--clients 100,1000]
        [--publishers M] [--loops uvloop,asyncio] [--json FILE]

N clients sit in one room (``#lobby``); M of them are publishers (see ``harness/chat.py``
for the lines and their checks). Two servers, each a subprocess of this script pinned to
CPU 0, bound to 127.0.0.1 only, on the event loop under test:

* ``baseline``  a minimal hand-written ``asyncio.Protocol``: for each received line, one
  ``transport.write(b"[#lobby] <nick> line\\n")`` to every other connection (no batching).
* ``netlib``    ``netlib.open_chat_server(service=ChatService(limits=ChatLimits(
  flood_rate=1e6, flood_burst=1_000_000)), max_connections_per_host=None)``: flood
  control is opened wide for the benchmark (its default is 5 lines/s, burst 20), and every
  client comes from one address (the default cap is 256 connections per host); every other
  limit is the default.

Per (room size, loop) both servers are started and the clients connect to both; then, in
one round, each server is measured at saturation (deliveries/s, server CPU per delivery),
then at a fixed offered rate, ``--fixed-share`` of the baseline's saturation in the same
round, the same for both servers (delivery latency p50/p99). Rounds alternate the order of
the servers. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any, cast

import harness
from harness import bench, chat
from harness.bench import HOST, Column, Config, Goal, Served, Spec

ROOM_PREFIX = b"[#lobby] <"
LOOPS = ("uvloop", "asyncio")
SATURATED = 0.90  # client core share above which the client, not the server, is the limit
TARGET_DELIVERIES = 200_000.0  # goal: netlib, 100-client room, uvloop
TARGET_RATIO = 1.5  # goal: netlib / baseline deliveries per second


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


class BaselineChat(asyncio.Protocol):
    """The baseline: the obvious hand-written broadcast Protocol, one write per delivery."""

    room: dict[BaselineChat, None] = {}  # noqa: RUF012  (one room per server process)
    count = 0
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        BaselineChat.count += 1
        nick = b"guest%d" % BaselineChat.count
        self.prefix = ROOM_PREFIX + nick + b"> "
        self.buffer = b""
        self.room[self] = None
        self.transport.write(b"*** welcome, " + nick + b"! you are in #lobby\n")

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            out = self.prefix + line.rstrip(b"\r") + b"\n"
            for other in self.room:
                if other is not self:
                    other.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.pop(self, None)


async def baseline(_stack: contextlib.AsyncExitStack) -> Served:
    server = await asyncio.get_running_loop().create_server(BaselineChat, HOST, 0)
    return server.sockets[0].getsockname()[1], None


async def netlib_chat(stack: contextlib.AsyncExitStack) -> Served:
    import netlib

    limits = netlib.ChatLimits(flood_rate=1e6, flood_burst=1_000_000)
    service = netlib.ChatService(limits=limits)
    server = await stack.enter_async_context(  # every client comes from 127.0.0.1
        netlib.open_chat_server(HOST, 0, service=service, max_connections_per_host=None)
    )
    return server.tcp_addresses[0][1], service.statistics


SERVERS = {"baseline": baseline, "netlib": netlib_chat}
LABELS = {"baseline": "hand-written broadcast", "netlib": "netlib chat"}


# =============================================================================================
# Scenarios: room sizes x loops, netlib against the baseline of the same room and loop
# =============================================================================================


def configs(args: argparse.Namespace) -> list[Config]:
    return [
        Config(
            f"room{n}", server, loop, f"{n} clients, {LABELS[server]} ({loop})",
            baseline=f"room{n}:baseline/{loop}",
        )
        for n in args.sizes
        for loop in args.loops
        for server in SERVERS
    ]  # fmt: skip


_COLUMNS = [
    Column("sat_deliveries_per_s", "sat dlv/s", "{:,.0f}", ratio=True),
    Column("sat_published_per_s", "lines/s", "{:,.0f}"),
    Column("sat_server_us_per_delivery", "srv us/dlv", "{:.3f}", ratio=True),
    Column("sat_server_core_us_per_delivery", "core us", "{:.3f}"),
    Column("fix_deliveries_per_s", "fixed dlv/s", "{:,.0f}"),
    Column("fix_p50_us", "p50 us", "{:,.0f}", ratio=True),
    Column("fix_p99_us", "p99 us", "{:,.0f}"),
    *(Column(err, err[:10], "{:,}", total=True) for err in chat.ERRORS),
]


def goals(args: argparse.Namespace) -> list[Goal]:
    found = [
        Goal(
            "netlib deliveries/s, 100-client room, uvloop, server on one core",
            "room100:netlib/uvloop", None, "sat_deliveries_per_s", TARGET_DELIVERIES, unit="",
        )
    ]  # fmt: skip
    found += [
        Goal(
            f"netlib / baseline deliveries/s, {n} clients, {loop}",
            f"room{n}:netlib/{loop}", f"room{n}:baseline/{loop}", "sat_deliveries_per_s",
            TARGET_RATIO, cpu_metric="sat_server_us_per_delivery",
        )
        for n in args.sizes
        for loop in args.loops
    ]  # fmt: skip
    return found


def no_errors(rounds: harness.Rounds, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Gaps, duplicates, lines lost and disconnects of netlib, summed over every phase."""
    bad = {k: [e[err] for err in chat.ERRORS] for k, e in summary.items() if ":netlib/" in k}
    total = sum(sum(v) for v in bad.values())
    detail = ", ".join(f"{k}: {v}" for k, v in bad.items() if sum(v))
    line = f"{'PASS' if total == 0 else 'FAIL'}: netlib gaps/dups/lost/disconnects = 0 in every"
    line += f" phase{f': {total} ({detail})' if total else ''}"
    return [{"check": "netlib gaps/dups/lost/disconnects", "pass": total == 0, "line": line}]


# =============================================================================================
# Measuring one (room size, loop): both servers at once
# =============================================================================================


def units(order: list[Config]) -> list[list[Config]]:
    """The two servers of each (room size, loop), in this round's order."""
    groups: dict[tuple[str, str], list[Config]] = {}
    for config in order:
        groups.setdefault((config.workload, config.loop), []).append(config)
    return list(groups.values())


def measure(unit: list[Config], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import uvloop

    n = int(unit[0].workload.removeprefix("room"))
    children = {c.server: bench.start(c, workdir, args, SPEC) for c in unit}
    results: dict[str, dict[str, Any]] = {c.server: {} for c in unit}
    try:
        ports = {name: harness.wait_ready(child, int) for name, child in children.items()}
        procs = {name: psutil.Process(child.proc.pid) for name, child in children.items()}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            order = [c.server for c in unit]
            results = runner.run(chat.measure_pair(ports, procs, n, order, args))
    finally:
        for name, child in children.items():
            results[name] = bench.finish(child, results[name])
    return {c.key: results[c.server] for c in unit}


def client_bound(entry: dict[str, Any]) -> bool:
    """The client's core was full while the server process was not: the client is the limit."""
    client = entry.get("client_core_busy") or 0.0
    server = entry.get("server_cpu_share") or 0.0
    return client >= SATURATED and server < SATURATED


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def progress(r: dict[str, Any]) -> str:
    return (
        f"sat {r['sat_deliveries_per_s']:>10,.0f} dlv/s"
        f" ({r['sat_published_per_s']:>7,.0f} lines/s)"
        f" {r['sat_server_us_per_delivery']:6.3f} us/dlv"
        f" srv {r['sat_server_cpu_share']:4.0%} (core {r['sat_server_core_busy'] or 0:4.0%})"
        f" cli {r['sat_client_cpu_share']:4.0%} (core {r['sat_client_core_busy'] or 0:4.0%})"
        f" | fixed {r['fix_deliveries_per_s']:>9,.0f} dlv/s"
        f" p50 {_fmt(r['fix_p50_us'], ',.0f'):>6} us p99 {_fmt(r['fix_p99_us'], ',.0f'):>7} us"
        f" | err {'/'.join(str(r[e]) for e in chat.ERRORS)} foreign {r['foreign_cores']:.2f}"
    )


def setup(args: argparse.Namespace) -> str:
    return (
        f"rooms of {args.clients} clients, {args.publishers} publishers, loops"
        f" {','.join(args.loops)}; warm-up {args.warmup}s, window {args.duration}s;"
        f" saturation: {args.inflight:,} deliveries in flight; fixed rate"
        f" {args.fixed_share:.0%} of the baseline's saturation"
    )


SPEC = Spec(
    name="chat_fanout",
    servers=SERVERS,
    configs=[],
    columns={},
    goals=[],
    measure=measure,
    progress=progress,
    client_bound=client_bound,
    shares=["server_cpu_share", "client_cpu_share", "client_core_busy", "sat_server_core_busy"],
    units=units,
    extra_checks=no_errors,
    legend="sat: saturation (windowed publishers); fixed: the same offered rate for both"
    " servers, a share of the baseline's saturation in that round. srv us/dlv: server"
    " process CPU per delivery at saturation; core us: the same from how busy the server's"
    " CPU was (softirq included). gaps/dups/lost/disconnected: summed over rounds and phases.",
    server_lifetime=600,
    raise_nofile=True,
    setup=setup,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--clients", default="100,1000", help="room sizes (100,1000)")
    p.add_argument("--publishers", type=int, default=4, help="publishers per room (4)")
    p.add_argument("--loops", default="uvloop,asyncio", help="server loops (uvloop,asyncio)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before counting (0.5)")
    p.add_argument("--duration", type=float, default=3.0, help="measured window, s (3.0)")
    p.add_argument(
        "--inflight",
        type=int,
        default=200_000,
        help="saturation: deliveries in flight in all (200000)",
    )
    p.add_argument(
        "--fixed-share",
        type=float,
        default=0.5,
        help="fixed offered rate as a share of the baseline's saturation (0.5)",
    )
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain (10)")
    harness.add_retry_args(p, 60.0, "phase")
    bench.add_common_args(p)
    harness.add_server_args(p, SERVERS, LOOPS)
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.clients.split(",")]
    args.loops = args.loops.split(",")
    if any(loop not in LOOPS for loop in args.loops) or min(args.sizes) <= args.publishers:
        p.error("--loops: uvloop,asyncio; --clients must exceed --publishers")
    if args.quick:
        args.warmup, args.duration = 0.3, 1.0
        args.retry_budget = min(args.retry_budget, 20.0)
    SPEC.configs = configs(args)
    SPEC.columns = {c.workload: _COLUMNS for c in SPEC.configs}
    SPEC.goals = goals(args)
    return args


if __name__ == "__main__":
    sys.exit(bench.main(SPEC, parse_args()))
