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

Workloads driven by the C load generator (``harness/loadgen.c``, built with ``cc`` on first
use; skipped without a C compiler), a subprocess pinned to CPU 1, uvloop servers only:

* ``pp64``     every server; ``--pp-connections`` (100) connections, each with one 64-byte
               message in flight (ping-pong): msgs/s, server CPU per message, p50/p99
* ``pp16k``    the line servers; ``--pp16k-connections`` (10) x one 16 KiB line in flight
* ``cconnect`` ``raw``, ``streams``, ``serve_raw``: connections/s (connect, one 64-byte
               echo, close; ``--parallel`` at once) and server CPU per connection

See ``benchmarks/README.md`` for the method and the recorded results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from pathlib import Path
from typing import Any

import harness
from harness import bench, loadgen, tcp
from harness.bench import HOST, Column, Config, Goal, Served, Spec
from harness.tcp import RawEcho

LOOPS = ("uvloop", "asyncio")
SATURATED = 0.90  # client core share from which the client, not the server, is the limit
SMALL = tcp.message(64)
BIG = tcp.message(16 * 1024)
C_WORKLOADS = ("pp64", "pp16k", "cconnect")  # driven by the C load generator


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


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
    + [_config("pp64", s, "uvloop", "raw/uvloop") for s in SERVERS]
    + [
        _config("pp16k", s, "uvloop", "streams_line/uvloop")
        for s in ("streams_line", "serve_line")
    ]
    + [_config("cconnect", s, "uvloop", "streams/uvloop") for s in ("raw", "streams", "serve_raw")]
)

RATE = Column("msgs_per_s", "msgs/s", "{:,.0f}", ratio=True)
CPU = Column("server_us_per_msg", "srv us/msg", "{:.3f}", ratio=True)
P50 = Column("p50_us", "p50 us", "{:.1f}", ratio=True)
P99 = Column("p99_us", "p99 us", "{:.1f}", ratio=True)
CONNS = Column("conns_per_s", "conns/s", "{:,.0f}", ratio=True)
CONN_CPU = Column("server_us_per_conn", "srv us/conn", "{:.1f}", ratio=True)
FAILED = Column("failed", "failed", "{:,}", total=True)
ERRORS = Column("errors", "errors", "{:,}", total=True)
COLUMNS = {
    "echo64": [RATE, CPU, P50, P99, Column("kib_per_conn", "KiB/conn", "{:.2f}", ratio=True)],
    "line16k": [RATE, CPU, P50, P99],
    "connect": [CONNS, CONN_CPU, FAILED],
    "pp64": [RATE, CPU, P50, P99, ERRORS],
    "pp16k": [RATE, CPU, P50, P99, ERRORS],
    "cconnect": [CONNS, CONN_CPU, P50, P99, FAILED],
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
    # the same goals, measured the independent way: the C load generator as the client
    _goal(
        "C client, pp64: serve_tcp raw msgs/s vs streams read() (uvloop)",
        "pp64:serve_raw/uvloop", "pp64:streams/uvloop", "msgs_per_s", 1.25,
    ),
    _goal(
        "C client, pp64: serve_tcp raw server CPU/msg vs raw Protocol (uvloop)",
        "pp64:serve_raw/uvloop", "pp64:raw/uvloop", "server_us_per_msg", 1.35,
        at_least=False,
    ),
    _goal(
        "C client, pp64: serve_tcp line msgs/s vs streams readline() (uvloop)",
        "pp64:serve_line/uvloop", "pp64:streams_line/uvloop", "msgs_per_s", 1.2,
    ),
    _goal(
        "C client, pp16k: serve_tcp line 16 KiB msgs/s vs streams readline() (uvloop)",
        "pp16k:serve_line/uvloop", "pp16k:streams_line/uvloop", "msgs_per_s", 1.2,
    ),
    _goal(
        "C client, cconnect: serve_tcp raw connections/s vs streams (uvloop)",
        "cconnect:serve_raw/uvloop", "cconnect:streams/uvloop", "conns_per_s", 1.2,
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

    def run_c(port: int, proc: Any) -> dict[str, Any]:
        binary = Path(args.loadgen)
        common = {"warmup": args.warmup, "duration": args.duration, "pin": args.pin}

        def attempt() -> tuple[dict[str, Any], float]:
            if config.workload == "cconnect":
                sample = loadgen.connect(
                    binary, port, proc, args.cpus, parallel=args.parallel, size=64, **common
                )
            else:
                pp16k = config.workload == "pp16k"
                sample = loadgen.pingpong(
                    binary, port, proc, args.cpus, **common,
                    connections=args.pp16k_connections if pp16k else args.pp_connections,
                    size=len(BIG if pp16k else SMALL),
                )  # fmt: skip
            return sample, sample["foreign_cores"]

        return bench.least_disturbed(proc, args, attempt)

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

    c_client = config.workload in C_WORKLOADS
    return bench.run_unit(SPEC, config, workdir, args, ready, run_c if c_client else run)


def prepare(configs: list[Config], args: argparse.Namespace) -> list[Config]:
    """Build the C load generator if a selected workload needs it; without cc, skip those."""
    if not any(c.workload in C_WORKLOADS for c in configs):
        return configs
    binary = loadgen.build()
    if binary is None:
        print(
            "C load generator: no C compiler found ($CC or cc), so the C-client workloads"
            f" ({', '.join(C_WORKLOADS)}) are SKIPPED; install a C compiler to run them.\n"
        )
        return [c for c in configs if c.workload not in C_WORKLOADS]
    args.loadgen = str(binary)
    return configs


def c_client_errors(rounds: harness.Rounds, _summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One check: the C load generator saw no error and no failed connection anywhere."""
    samples = [(key, r[key]) for r in rounds for key in r if key.split(":")[0] in C_WORKLOADS]
    if not samples:
        return []
    bad = [
        f"{key}: {s.get('errors', 0)} errors, {s.get('failed', 0)} failed ({s['first_error']})"
        for key, s in samples
        if s.get("errors") or s.get("failed")
    ]
    ok = not bad
    text = "C load generator: 0 errors and 0 failed connections in every sample"
    detail = f"{len(samples)} samples" if ok else "; ".join(bad)
    return [
        {
            "check": text,
            "pass": ok,
            "value": len(bad),
            "line": f"{'PASS' if ok else 'FAIL'}: {text}: {detail}",
        }
    ]


def client_bound(entry: dict[str, Any]) -> bool:
    busy = entry.get("client_core_busy")
    return busy is not None and busy >= SATURATED


def progress(r: dict[str, Any]) -> str:
    if "conns_per_s" in r:
        head = f"{r['conns_per_s']:>10,.0f} conns/s {r['server_us_per_conn']:7.1f} us/conn"
        if "p50_us" in r:  # the C client times each connection
            head += f"  p50 {r['p50_us']:6.1f} us"
    else:
        head = f"{r['msgs_per_s']:>10,.0f} msgs/s  {r['server_us_per_msg']:6.3f} us/msg"
        head += f"  p50 {r['p50_us']:6.1f} us"
    if "kib_per_conn" in r:
        head += f"  {r['kib_per_conn']:5.2f} KiB/conn"
    if r.get("errors") or r.get("failed"):
        head += f"  ERRORS {r.get('errors', 0) + r.get('failed', 0):,}"
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
        f" {args.parallel} in parallel; C client: ping-pong {args.pp_connections} x 64 B,"
        f" {args.pp16k_connections} x 16 KiB"
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
    prepare=prepare,
    extra_checks=c_client_errors,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--connections", type=int, default=10, help="throughput connections (10)")
    p.add_argument("--window", type=int, default=64, help="64 B messages in flight per conn")
    p.add_argument("--big-window", type=int, default=8, help="16 KiB lines in flight (8)")
    p.add_argument("--parallel", type=int, default=8, help="connection rate: at once (8)")
    p.add_argument(
        "--pp-connections", type=int, default=100, help="C ping-pong, 64 B: connections (100)"
    )
    p.add_argument(
        "--pp16k-connections", type=int, default=10, help="C ping-pong, 16 KiB: connections (10)"
    )
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
    p.set_defaults(loadgen=None)  # the C load generator's binary, once built
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.duration = 0.3, 0.5
        args.idle_connections, args.round_trips = 200, 500
        args.retry_budget = min(args.retry_budget, 20.0)
    return args


if __name__ == "__main__":
    sys.exit(bench.main(SPEC, parse_args()))
