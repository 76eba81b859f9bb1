"""UDP echo benchmark: netlib's datagram echo servers against raw asyncio/uvloop baselines.

Usage::

    .venv/bin/python benchmarks/udp_echo.py [--quick] [--runs N] [--json FILE] [--size B]

Servers (each a subprocess of this script pinned to CPU 0, bound to 127.0.0.1 only):

* ``raw``                hand-written ``asyncio.DatagramProtocol``:
                         ``transport.sendto(data, addr)`` (the baseline)
* ``echo_protocol``      ``netlib.DatagramEchoProtocol()`` via ``create_datagram_endpoint``
* ``timestamp_protocol`` ``netlib.DatagramEchoProtocol("timestamp")`` (informational)
* ``udp_server``         ``netlib.open_udp_server(netlib.udp_echo_handler, ...)``
                         (informational)
* ``serve_udp``          ``netlib.serve_udp(netlib.udp_echo_handler, ...)``

The netlib servers get an explicit, effectively unlimited ``ReplyBudget`` (the default
allows 100 replies/s per source address): the budget checks still run for every datagram,
which is the cost measured, but never refuse a reply.

Workloads (the load client is this process, pinned to CPU 1, on uvloop; ``--sockets``
connected sockets, see ``harness/udp.py``):

* ``window``  every server but ``serve_udp``; ``--window`` datagrams in flight per socket
              (16 x 12 = 192 by default)
* ``in32``    ``raw`` and ``serve_udp`` on uvloop; 32 datagrams in flight in all
              (``--in32-window`` per socket: 16 x 2)

See ``benchmarks/README.md`` for the method and the recorded results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import harness
from harness import bench, udp
from harness.bench import HOST, Column, Config, Goal, Served, Spec

if TYPE_CHECKING:
    import netlib

LOOPS = ("uvloop", "asyncio")
MIN_ROUNDS = 3  # clean rounds an acceptance ratio needs to be conclusive
SATURATED = 0.90  # client CPU share above which the client, not the server, is the limit
SERVER_SATURATED = 0.97  # server CPU share above which the server is the limit
# glibc malloc pinned in every server subprocess (unless --no-malloc-pin): asyncio receives
# each datagram into a fresh 256 KiB bytes object, and with glibc's dynamic mmap threshold
# that allocation is served by mmap+mremap+munmap (and a page fault) in some processes and
# by the heap in others, depending on their allocation history: a 2-3x bimodal cost on the
# asyncio rows that has nothing to do with the protocol under test.
MALLOC_PIN = "glibc.malloc.mmap_threshold=1048576:glibc.malloc.trim_threshold=4194304"


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


class RawDatagramEcho(asyncio.DatagramProtocol):
    """The baseline: a hand-written datagram echo Protocol."""

    transport: asyncio.DatagramTransport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


def bench_budget() -> netlib.ReplyBudget:
    """A budget that never refuses at benchmark rates but still runs every check."""
    import netlib

    return netlib.ReplyBudget(rate=1e9, burst=1e9, byte_rate=1e12, byte_burst=1e12, allowance=1e12)


async def raw(_stack: contextlib.AsyncExitStack) -> Served:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(RawDatagramEcho, local_addr=(HOST, 0))
    return transport.get_extra_info("sockname")[1], None


def _echo_protocol(mode: Literal["echo", "timestamp"]) -> bench.ServerStart:
    async def start(_stack: contextlib.AsyncExitStack) -> Served:
        import netlib

        transport, protocol = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: netlib.DatagramEchoProtocol(mode, budget=bench_budget()),
            local_addr=(HOST, 0),
        )
        return transport.get_extra_info("sockname")[1], protocol.statistics

    return start


async def udp_server(stack: contextlib.AsyncExitStack) -> Served:
    import netlib

    server = await stack.enter_async_context(
        netlib.open_udp_server(netlib.udp_echo_handler, HOST, 0, budget=bench_budget())
    )
    return server.addresses[0][1], server.statistics


async def serve_udp(stack: contextlib.AsyncExitStack) -> Served:
    import netlib

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))  # serve_udp runs until cancelled: it is given a free port
        port: int = sock.getsockname()[1]
    serving = asyncio.create_task(
        netlib.serve_udp(netlib.udp_echo_handler, HOST, port, budget=bench_budget())
    )
    stack.callback(serving.cancel)
    return port, None  # the parent probes until an echo comes back


SERVERS = {
    "raw": raw,
    "echo_protocol": _echo_protocol("echo"),
    "timestamp_protocol": _echo_protocol("timestamp"),
    "udp_server": udp_server,
    "serve_udp": serve_udp,
}
LABELS = {
    "raw": "raw DatagramProtocol",
    "echo_protocol": "netlib.DatagramEchoProtocol",
    "timestamp_protocol": "DatagramEchoProtocol(timestamp)",
    "udp_server": "open_udp_server+udp_echo_handler",
    "serve_udp": "serve_udp+udp_echo_handler",
}


# =============================================================================================
# Scenarios
# =============================================================================================


def _config(workload: str, server: str, loop: str) -> Config:
    label = f"{LABELS[server]} ({loop})" + (" 32 in flight" if workload == "in32" else "")
    return Config(workload, server, loop, label, baseline=f"{workload}:raw/uvloop")


CONFIGS = [
    _config("window", "raw", "asyncio"),
    _config("window", "raw", "uvloop"),
    _config("window", "echo_protocol", "asyncio"),
    _config("window", "echo_protocol", "uvloop"),
    _config("window", "timestamp_protocol", "uvloop"),
    _config("window", "udp_server", "uvloop"),
    _config("in32", "raw", "uvloop"),
    _config("in32", "serve_udp", "uvloop"),
]

_COLUMNS = [
    Column("dgrams_per_s", "dgrams/s", "{:,.0f}", ratio=True),
    Column("server_us_per_dgram", "srv us/dg", "{:.2f}", ratio=True),
    Column("server_user_us_per_dgram", "user us/dg", "{:.2f}", ratio=True),
    Column("loss", "loss", "{:.2%}"),
    Column("budget_refusals", "refused", "{:,}", total=True),
]
COLUMNS = {"window": _COLUMNS, "in32": _COLUMNS}


def _goal(text: str, a: str, b: str, limit: float | None) -> Goal:
    return Goal(text, a, b, "dgrams_per_s", limit, cpu_metric="server_us_per_dgram")


GOALS = [
    _goal(
        "netlib.DatagramEchoProtocol datagrams/s vs raw DatagramProtocol (uvloop)",
        "window:echo_protocol/uvloop", "window:raw/uvloop", 0.95,
    ),
    _goal(
        "serve_udp echo datagrams/s vs raw DatagramProtocol, 32 in flight (uvloop)",
        "in32:serve_udp/uvloop", "in32:raw/uvloop", 0.8,
    ),
    _goal(
        "netlib.DatagramEchoProtocol datagrams/s vs raw DatagramProtocol (asyncio)",
        "window:echo_protocol/asyncio", "window:raw/asyncio", None,
    ),
]  # fmt: skip


def server_saturated(entry: dict[str, Any]) -> bool:
    share = entry.get("server_cpu_share")
    return share is not None and share >= SERVER_SATURATED


def client_bound(entry: dict[str, Any]) -> bool:
    busy = entry.get("client_core_busy")
    return busy is not None and busy >= SATURATED


def notes(goal: Goal, summary: dict[str, Any]) -> list[str]:
    """Which side was the limit, and the user-space share of the server CPU ratio."""
    assert goal.b is not None
    a, b = summary[goal.a], summary[goal.b]
    out = [f"user-space CPU ratio {a['server_user_us_per_dgram_ratio'] or 0:.2f}x"]
    if server_saturated(a) and client_bound(b) and not server_saturated(b):
        out.append(
            "the baseline's server had idle CPU (limited by the client) while this one was"
            " saturated: the true datagrams/s ratio is at most this"
        )
    elif client_bound(a) and client_bound(b):
        out.append("both client-bound: the server CPU/dgram ratio is the better measure")
    return out


# =============================================================================================
# Measuring one configuration (one fresh server subprocess)
# =============================================================================================


def budget_refusals(result: dict[str, Any]) -> int | None:
    """Replies the netlib server's ReplyBudget refused (None without statistics)."""
    budget = result.get("server_stats", {}).get("budget")
    if budget is None:
        return None
    return int(
        budget["dropped_by_rate"] + budget["dropped_by_bytes"] + budget["dropped_by_amplification"]
    )


def measure(unit: list[Config], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import uvloop

    (config,) = unit
    window = args.window if config.workload == "window" else args.in32_window

    def run(info: tuple[int, int], proc: Any) -> dict[str, Any]:
        port, extra = info

        def attempt() -> tuple[dict[str, Any], float]:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                sample = runner.run(udp.measure_throughput(port, proc, args, extra, window))
            return sample, sample["foreign_cores"]

        result = bench.least_disturbed(proc, args, attempt)
        result.update(reply_extra_bytes=extra, window=window)
        return result

    def ready(child: harness.Child) -> tuple[int, int]:
        return harness.wait_ready(child, lambda p: udp.ready(p, args.size), pause=False)

    results = bench.run_unit(SPEC, config, workdir, args, ready, run)
    results[config.key]["budget_refusals"] = budget_refusals(results[config.key])
    return results


def progress(r: dict[str, Any]) -> str:
    refused = r["budget_refusals"]
    return (
        f"{r['dgrams_per_s']:>9,.0f} dg/s  srv {r['server_us_per_dgram']:5.2f} us/dg"
        f" (user {r['server_user_us_per_dgram']:4.2f})"
        f"  cli {r['client_cpu_share']:4.0%} (core {r['client_core_busy'] or 0:4.0%})"
        f"  loss {r['loss']:6.2%}  faults/dg {r['server_faults_per_dgram']:4.2f}"
        f"  foreign {r['foreign_cores']:4.2f}"
        + ("" if refused is None else f"  budget refused {refused}")
    )


def setup(args: argparse.Namespace) -> str:
    malloc = f"pinned (GLIBC_TUNABLES={MALLOC_PIN})" if args.malloc_pin else "NOT pinned"
    return (
        f"{args.sockets} client sockets x window {args.window} (32 in flight: window"
        f" {args.in32_window}) x {args.size}-byte datagrams; warm-up {args.warmup}s, window"
        f" {args.duration}s (max {args.max_dgrams:,} dgrams), drain {args.drain}s; netlib"
        " servers: ReplyBudget(rate=1e9, burst=1e9, byte_rate=1e12, byte_burst=1e12,"
        " allowance=1e12);"
        f" server malloc {malloc}"
    )


def server_env(args: argparse.Namespace) -> dict[str, str] | None:
    if not args.malloc_pin:
        return None
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES"), MALLOC_PIN) if t)
    return env


SPEC = Spec(
    name="udp_echo",
    servers=SERVERS,
    configs=CONFIGS,
    columns=COLUMNS,
    goals=GOALS,
    measure=measure,
    progress=progress,
    client_bound=client_bound,
    shares=[
        "server_cpu_share",
        "client_cpu_share",
        "client_core_busy",
        "client_us_per_dgram",
        "server_sys_us_per_dgram",
        "server_faults_per_dgram",
        "foreign_cores",
    ],
    notes=notes,
    min_rounds=MIN_ROUNDS,
    legend="loss: datagrams sent in the measured window and not echoed after the drain;"
    " refused: replies the netlib server's ReplyBudget refused (must be 0).",
    setup=setup,
    server_env=server_env,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--size", type=int, default=64, help="datagram payload bytes (64)")
    p.add_argument("--sockets", type=int, default=16, help="client UDP sockets (16)")
    p.add_argument(
        "--window",
        type=int,
        default=12,
        help="datagrams in flight per socket (12; keep sockets x window under what the\n"
        "server's receive buffer holds: 256 64-byte datagrams with the default 208 KiB)",
    )
    p.add_argument("--in32-window", type=int, default=2, help="in32 workload: per socket (2)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before counting (1.0)")
    p.add_argument("--duration", type=float, default=2.0, help="measured window, s (2.0)")
    p.add_argument("--drain", type=float, default=0.2, help="wait for late echoes, s (0.2)")
    p.add_argument("--max-dgrams", type=int, default=10_000_000, help="cap on counted dgrams")
    harness.add_retry_args(p, 90.0)
    bench.add_common_args(p)
    p.add_argument(
        "--no-malloc-pin",
        dest="malloc_pin",
        action="store_false",
        help="do not pin glibc's malloc thresholds in the servers (see MALLOC_PIN)",
    )
    harness.add_server_args(p, SERVERS, LOOPS)
    args = p.parse_args(argv)
    if not 1 <= args.size <= 65_000:
        p.error("--size must be in [1, 65000]")
    if not 1 <= args.window <= 4096 or args.sockets < 1:
        p.error("--window must be in [1, 4096] and --sockets >= 1")
    if args.quick:
        args.warmup, args.duration = 0.3, 0.5
        args.retry_budget = min(args.retry_budget, 20.0)
    return args


if __name__ == "__main__":
    sys.exit(bench.main(SPEC, parse_args()))
