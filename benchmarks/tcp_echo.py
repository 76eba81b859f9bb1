"""TCP echo benchmark: netlib's echo servers against raw asyncio/uvloop baselines.

Usage::

    .venv/bin/python benchmarks/tcp_echo.py [--quick] [--runs N] [--json FILE] [--only NAMES]

Servers (each a subprocess of this script pinned to CPU 0, bound to 127.0.0.1 only, on
uvloop and on stock asyncio):

* ``raw``            hand-written ``asyncio.Protocol``: ``transport.write(data)``
* ``streams``        asyncio streams, unframed: ``read(65536)``, ``write``, ``drain``
* ``streams_line``   asyncio streams, line-framed: ``readline``, ``write``, ``drain``
* ``echo_protocol``  ``netlib.EchoProtocol`` via ``loop.create_server``
* ``serve_raw``      ``netlib.serve_tcp(netlib.echo_handler, ..., framing="raw")``
* ``serve_line``     ``netlib.serve_tcp(netlib.echo_handler, ..., framing="line")``

Workloads (the load client is this process, pinned to CPU 1, on uvloop):

* ``echo64``   every server; 64-byte messages: idle memory per connection, pipelined
               throughput with the server's CPU per message, latency p50/p99
* ``line16k``  the line servers; 16 KiB lines: throughput, server CPU, latency
* ``connect``  ``streams`` and ``serve_raw``: connections/s (connect, one 64-byte echo,
               close; ``--parallel`` connections at once) and server CPU per connection

See ``benchmarks/README.md`` for the method and the recorded results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from pathlib import Path
from typing import Any, cast

import harness
from harness import bench, tcp
from harness.bench import HOST, Column, Config, Goal, Served, Spec

LOOPS = ("uvloop", "asyncio")
SATURATED = 0.90  # client core share from which the client, not the server, is the limit
SMALL = tcp.message(64)
BIG = tcp.message(16 * 1024)


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


class RawEcho(asyncio.Protocol):
    """The baseline: a hand-written echo Protocol."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


async def streams_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def streams_line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _port(server: asyncio.Server) -> Served:
    return server.sockets[0].getsockname()[1], None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def raw(_stack: contextlib.AsyncExitStack) -> Served:
    return _port(await asyncio.get_running_loop().create_server(RawEcho, HOST, 0))


async def streams(_stack: contextlib.AsyncExitStack) -> Served:
    return _port(await asyncio.start_server(streams_echo, HOST, 0))


async def streams_line(_stack: contextlib.AsyncExitStack) -> Served:
    return _port(await asyncio.start_server(streams_line_echo, HOST, 0))


async def echo_protocol(_stack: contextlib.AsyncExitStack) -> Served:
    import netlib

    return _port(await asyncio.get_running_loop().create_server(netlib.EchoProtocol, HOST, 0))


def _serve_tcp(framing: str) -> bench.ServerStart:
    async def start(stack: contextlib.AsyncExitStack) -> Served:
        import netlib

        port = _free_port()  # serve_tcp runs until cancelled: it is given a free port
        serving = asyncio.create_task(
            netlib.serve_tcp(
                netlib.echo_handler,
                HOST,
                port,
                framing=framing,
                max_connections_per_host=None,  # every load client is on loopback
            )
        )
        stack.callback(serving.cancel)
        return port, None  # the parent probes until a connect succeeds

    return start


SERVERS = {
    "raw": raw,
    "streams": streams,
    "streams_line": streams_line,
    "echo_protocol": echo_protocol,
    "serve_raw": _serve_tcp("raw"),
    "serve_line": _serve_tcp("line"),
}
LABELS = {
    "raw": "raw Protocol",
    "streams": "streams read()",
    "streams_line": "streams readline()",
    "echo_protocol": "netlib.EchoProtocol",
    "serve_raw": "serve_tcp raw",
    "serve_line": "serve_tcp line",
}


# =============================================================================================
# Scenarios: which server, which workload, compared with which baseline
# =============================================================================================


def _config(workload: str, server: str, loop: str, baseline: str) -> Config:
    label = f"{LABELS[server]} ({loop})"
    return Config(workload, server, loop, label, baseline=f"{workload}:{baseline}")


CONFIGS = (
    [_config("echo64", s, loop, "raw/uvloop") for loop in LOOPS for s in SERVERS]
    + [
        _config("line16k", s, loop, f"streams_line/{loop}")
        for loop in LOOPS
        for s in ("streams_line", "serve_line")
    ]
    + [
        _config("connect", s, loop, f"streams/{loop}")
        for loop in LOOPS
        for s in ("streams", "serve_raw")
    ]
)

RATE = Column("msgs_per_s", "msgs/s", "{:,.0f}", ratio=True)
CPU = Column("server_us_per_msg", "srv us/msg", "{:.3f}", ratio=True)
P50 = Column("p50_us", "p50 us", "{:.1f}", ratio=True)
P99 = Column("p99_us", "p99 us", "{:.1f}", ratio=True)
COLUMNS = {
    "echo64": [RATE, CPU, P50, P99, Column("kib_per_conn", "KiB/conn", "{:.2f}", ratio=True)],
    "line16k": [RATE, CPU, P50, P99],
    "connect": [
        Column("conns_per_s", "conns/s", "{:,.0f}", ratio=True),
        Column("server_us_per_conn", "srv us/conn", "{:.1f}", ratio=True),
        Column("failed", "failed", "{:,}", total=True),
    ],
}


def _goal(text: str, a: str, b: str, metric: str, limit: float | None, **kw: Any) -> Goal:
    cpu = {"msgs_per_s": "server_us_per_msg", "conns_per_s": "server_us_per_conn"}.get(metric)
    return Goal(text, a, b, metric, limit, cpu_metric=cpu, **kw)


GOALS = [
    _goal(
        "serve_tcp raw msgs/s vs streams read() (uvloop)",
        "echo64:serve_raw/uvloop", "echo64:streams/uvloop", "msgs_per_s", 1.25,
    ),
    _goal(
        "serve_tcp raw server CPU/msg vs raw Protocol (uvloop)",
        "echo64:serve_raw/uvloop", "echo64:raw/uvloop", "server_us_per_msg", 1.35,
        at_least=False,
    ),
    _goal(
        "serve_tcp line 64 B msgs/s vs streams readline() (uvloop)",
        "echo64:serve_line/uvloop", "echo64:streams_line/uvloop", "msgs_per_s", 1.2,
    ),
    _goal(
        "serve_tcp line 16 KiB msgs/s vs streams readline() (uvloop)",
        "line16k:serve_line/uvloop", "line16k:streams_line/uvloop", "msgs_per_s", 1.2,
    ),
    _goal(
        "serve_tcp line 16 KiB msgs/s vs streams readline() (asyncio)",
        "line16k:serve_line/asyncio", "line16k:streams_line/asyncio", "msgs_per_s", None,
    ),
    _goal(
        "serve_tcp raw connections/s vs streams (uvloop)",
        "connect:serve_raw/uvloop", "connect:streams/uvloop", "conns_per_s", 1.2,
    ),
    _goal(
        "serve_tcp raw connections/s vs streams (asyncio)",
        "connect:serve_raw/asyncio", "connect:streams/asyncio", "conns_per_s", None,
    ),
    _goal(
        "idle connection memory, serve_tcp raw vs raw Protocol (uvloop)",
        "echo64:serve_raw/uvloop", "echo64:raw/uvloop", "kib_per_conn", 2.5, at_least=False,
    ),
    _goal(
        "idle connection memory, serve_tcp raw vs streams read() (uvloop)",
        "echo64:serve_raw/uvloop", "echo64:streams/uvloop", "kib_per_conn", 0.6,
        at_least=False,
    ),
    _goal(
        "netlib.EchoProtocol msgs/s vs raw Protocol (uvloop)",
        "echo64:echo_protocol/uvloop", "echo64:raw/uvloop", "msgs_per_s", 0.95,
    ),
    _goal(
        "idle connection memory, netlib.EchoProtocol vs raw Protocol (uvloop)",
        "echo64:echo_protocol/uvloop", "echo64:raw/uvloop", "kib_per_conn", 1.5,
        at_least=False,
    ),
]  # fmt: skip


# =============================================================================================
# Measuring one configuration (one fresh server subprocess)
# =============================================================================================


def measure(unit: list[Config], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Memory (echo64 only) once, then the workload with its latency, retried if disturbed."""
    import uvloop

    (config,) = unit

    def run(port: int, proc: Any) -> dict[str, Any]:
        result: dict[str, Any] = {}
        if config.workload == "echo64":
            result.update(tcp.measure_memory(port, proc, args, SMALL))

        def attempt() -> tuple[dict[str, Any], float]:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                if config.workload == "connect":
                    sample = runner.run(tcp.measure_connect_rate(port, proc, args, SMALL))
                    return sample, sample["foreign_cores"]
                msg, window = (
                    (SMALL, args.window) if config.workload == "echo64" else (BIG, args.big_window)
                )
                sample = runner.run(tcp.measure_throughput(port, proc, args, msg, window))
            watch = harness.CpuWatch(proc, args.cpus)
            sample.update(tcp.measure_latency(port, args, msg))
            latency_foreign = watch.stop()["foreign_cores"]
            sample["foreign_cores_latency"] = latency_foreign
            return sample, max(sample["foreign_cores"], latency_foreign)

        result.update(bench.least_disturbed(proc, args, attempt))
        return result

    def ready(child: harness.Child) -> int:
        return harness.wait_ready(child, tcp.accepts)

    return bench.run_unit(SPEC, config, workdir, args, ready, run)


def client_bound(entry: dict[str, Any]) -> bool:
    busy = entry.get("client_core_busy")
    return busy is not None and busy >= SATURATED


def progress(r: dict[str, Any]) -> str:
    if "conns_per_s" in r:
        head = f"{r['conns_per_s']:>10,.0f} conns/s {r['server_us_per_conn']:7.1f} us/conn"
    else:
        head = f"{r['msgs_per_s']:>10,.0f} msgs/s  {r['server_us_per_msg']:6.3f} us/msg"
        head += f"  p50 {r['p50_us']:6.1f} us"
    if "kib_per_conn" in r:
        head += f"  {r['kib_per_conn']:5.2f} KiB/conn"
    return (
        f"{head}  cli {r['client_cpu_share']:4.0%} (core {r['client_core_busy'] or 0:4.0%})"
        f"  foreign {r['foreign_cores']:4.2f}"
    )


def setup(args: argparse.Namespace) -> str:
    return (
        f"{args.connections} connections x window {args.window} x 64-byte messages (16 KiB"
        f" lines: window {args.big_window}); warm-up {args.warmup}s, window {args.duration}s"
        f" (max {args.max_msgs:,} msgs); latency {args.round_trips} round trips; memory"
        f" {args.idle_connections} idle connections after {args.mem_warm}; connection rate:"
        f" {args.parallel} in parallel"
    )


SPEC = Spec(
    name="tcp_echo",
    servers=SERVERS,
    configs=CONFIGS,
    columns=COLUMNS,
    goals=GOALS,
    measure=measure,
    progress=progress,
    client_bound=client_bound,
    shares=["server_cpu_share", "client_cpu_share", "client_core_busy", "foreign_cores"],
    setup=setup,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--connections", type=int, default=10, help="throughput connections (10)")
    p.add_argument("--window", type=int, default=64, help="64 B messages in flight per conn")
    p.add_argument("--big-window", type=int, default=8, help="16 KiB lines in flight (8)")
    p.add_argument("--parallel", type=int, default=8, help="connection rate: at once (8)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before counting (0.5)")
    p.add_argument("--duration", type=float, default=2.0, help="measured window, s (2.0)")
    p.add_argument("--max-msgs", type=int, default=20_000_000, help="cap on counted messages")
    p.add_argument("--round-trips", type=int, default=2000, help="latency samples (2000)")
    p.add_argument("--latency-warmup", type=int, default=200, help="unmeasured round trips")
    p.add_argument("--idle-connections", type=int, default=1000, help="memory test (1000)")
    p.add_argument(
        "--mem-warm", type=int, default=1000, help="idle connections opened before counting"
    )
    harness.add_retry_args(p, 150.0)
    bench.add_common_args(p)
    harness.add_server_args(p, SERVERS, LOOPS)
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.3, 0.5
        args.idle_connections, args.round_trips = 200, 500
        args.retry_budget = min(args.retry_budget, 20.0)
    return args


if __name__ == "__main__":
    sys.exit(bench.main(SPEC, parse_args()))
