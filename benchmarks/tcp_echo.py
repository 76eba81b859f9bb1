"""TCP echo benchmark: netlib's echo servers against raw asyncio/uvloop baselines.

Usage::

    .venv/bin/python benchmarks/tcp_echo.py [--quick] [--runs N] [--json FILE]

Six servers, each on both event loops (12 configurations), every one a separate subprocess
of this script (``--serve NAME --loop LOOP --port-file F``) pinned to CPU 0, bound to
127.0.0.1 only:

* ``raw``            hand-written ``asyncio.Protocol``: ``transport.write(data)`` (the baseline)
* ``streams``        asyncio streams, unframed: ``read(65536)``, ``write``, ``drain``
* ``streams_line``   asyncio streams, line-framed: ``readline``, ``write``, ``drain``
* ``echo_protocol``  ``netlib.EchoProtocol`` via ``loop.create_server``
* ``serve_raw``      ``netlib.serve_tcp(netlib.echo_handler, ..., framing="raw")``
* ``serve_line``     ``netlib.serve_tcp(netlib.echo_handler, ..., framing="line")``

The load client is this process, pinned to CPU 1, on uvloop. For each configuration it
measures idle-connection memory, pipelined throughput with the server's CPU time per
message, and single-connection round-trip latency. Several rounds each measure every
configuration once; the report gives medians across rounds and the median of the per-round
ratios to the raw uvloop Protocol server. See ``benchmarks/README.md`` for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import harness
import psutil

HOST = "127.0.0.1"
MSG_SIZE = 64
MESSAGE = b"x" * (MSG_SIZE - 1) + b"\n"
SERVER_CPU = 0
CLIENT_CPU = 1
SERVER_LIFETIME = 900  # seconds; a server subprocess never outlives this (SIGALRM)
BASELINE = "raw/uvloop"

SERVERS: dict[str, str] = {
    "raw": "raw Protocol",
    "streams": "streams read()",
    "streams_line": "streams readline()",
    "echo_protocol": "netlib.EchoProtocol",
    "serve_raw": "serve_tcp raw",
    "serve_line": "serve_tcp line",
}
LOOPS = ("uvloop", "asyncio")
SATURATED = 0.90  # client CPU share above which the client, not the server, is the limit


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
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def streams_line_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def _serve(name: str, port_file: Path, profile_out: str | None) -> None:
    import netlib  # imported here so the client process stays lean

    loop = asyncio.get_running_loop()
    profiler = harness.install_exit_handlers(loop, profile_out)

    server: asyncio.Server | None = None
    serving: asyncio.Task[None] | None = None
    if name == "raw":
        server = await loop.create_server(RawEcho, HOST, 0)
    elif name == "streams":
        server = await asyncio.start_server(streams_echo, HOST, 0)
    elif name == "streams_line":
        server = await asyncio.start_server(streams_line_echo, HOST, 0)
    elif name == "echo_protocol":
        server = await loop.create_server(netlib.EchoProtocol, HOST, 0)
    elif name in ("serve_raw", "serve_line"):
        port = _free_port()
        framing = "raw" if name == "serve_raw" else "line"
        serving = asyncio.create_task(
            netlib.serve_tcp(
                netlib.echo_handler,
                HOST,
                port,
                framing=framing,
                max_connections_per_host=None,  # every load client is on loopback
            )
        )
    else:
        raise SystemExit(f"unknown server {name!r}")
    if server is not None:
        port = server.sockets[0].getsockname()[1]
    harness.write_port_file(port_file, port)  # the parent also probes until a connect succeeds
    if profiler is not None:
        profiler.enable()
    if serving is not None:
        await serving
    elif server is not None:
        await server.serve_forever()


def server_main(args: argparse.Namespace) -> None:
    import netlib

    harness.pin_server(args, SERVER_LIFETIME)
    loop = harness.server_loop(args)
    netlib.run(_serve(args.serve, Path(args.port_file), args.profile_out), loop=loop)


# =============================================================================================
# Load client (this process)
# =============================================================================================


class LoadProtocol(asyncio.Protocol):
    """Keeps ``window`` messages in flight; sends one new message per message echoed."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.block = MESSAGE * window
        self.transport: asyncio.Transport | None = None
        self.received = 0  # bytes echoed
        self.sent = 0  # messages sent
        self.running = True
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.block)
        self.sent = self.window

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.running:
            new = self.received // MSG_SIZE + self.window - self.sent
            if new > 0:
                self.sent += new
                # one write per read: new < window, so a slice of the block (a batch)
                self.transport.write(  # type: ignore[union-attr]
                    self.block if new >= self.window else self.block[: new * MSG_SIZE]
                )
        elif (
            self.drained is not None
            and self.received >= self.sent * MSG_SIZE
            and not self.drained.done()
        ):
            self.drained.set_result(None)

    def stop(self) -> asyncio.Future[None]:
        """Stop sending; the returned future completes once every echo came back."""
        self.running = False
        self.drained = asyncio.get_running_loop().create_future()
        if self.received >= self.sent * MSG_SIZE:
            self.drained.set_result(None)
        return self.drained

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


async def measure_throughput(port: int, proc: Any, args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    window = args.window
    protocols: list[LoadProtocol] = []
    for _ in range(args.connections):
        _transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: LoadProtocol(window), HOST, port), 5
        )
        protocols.append(protocol)

    def received() -> int:
        return sum(p.received for p in protocols)

    try:
        await asyncio.sleep(args.warmup)
        watch = harness.CpuWatch(proc, args.cpus)
        t0 = time.perf_counter()
        b0 = received()
        s0 = harness.proc_cpu_seconds(proc)
        c0 = time.process_time()
        deadline = t0 + args.duration
        max_bytes = args.max_msgs * MSG_SIZE
        while True:
            now = time.perf_counter()
            if now >= deadline or received() - b0 >= max_bytes:
                break
            await asyncio.sleep(min(0.05, deadline - now))
        t1 = time.perf_counter()
        b1 = received()
        s1 = harness.proc_cpu_seconds(proc)
        c1 = time.process_time()
        cpu = watch.stop()
        waiters = [p.stop() for p in protocols]
        await asyncio.wait_for(asyncio.gather(*waiters), 5)
    finally:
        for p in protocols:
            if p.transport is not None:
                p.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), 2)
    elapsed = t1 - t0
    msgs = (b1 - b0) // MSG_SIZE
    if msgs == 0:
        raise RuntimeError("no message echoed in the measured window")
    return {
        "msgs": msgs,
        "elapsed_s": elapsed,
        "msgs_per_s": msgs / elapsed,
        "server_cpu_s": s1 - s0,
        "server_us_per_msg": (s1 - s0) * 1e6 / msgs,
        "server_cpu_share": (s1 - s0) / elapsed,
        "client_cpu_share": (c1 - c0) / elapsed,
        "server_core_busy": cpu["core_busy"].get(SERVER_CPU),
        "client_core_busy": cpu["core_busy"].get(CLIENT_CPU),
        "foreign_cores_throughput": cpu["foreign_cores"],
    }


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _round_trip(sock: socket.socket) -> None:
    sock.sendall(MESSAGE)
    if _recv_exact(sock, MSG_SIZE) != MESSAGE:
        raise RuntimeError("echo mismatch")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure_latency(port: int, args: argparse.Namespace) -> dict[str, Any]:
    """Ping-pong on one connection with one message in flight (blocking socket client)."""
    samples: list[int] = []
    with _connect(port) as sock:
        for _ in range(args.latency_warmup):
            _round_trip(sock)
        clock = time.perf_counter_ns
        for _ in range(args.round_trips):
            start = clock()
            _round_trip(sock)
            samples.append(clock() - start)
    samples.sort()

    def quantile(q: float) -> float:
        return samples[max(0, math.ceil(q * len(samples)) - 1)] / 1000

    return {"round_trips": len(samples), "p50_us": quantile(0.50), "p99_us": quantile(0.99)}


def _open_idle(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections, one by one, each proven accepted by one echo round trip."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _connect(port)
            socks.append(sock)
            _round_trip(sock)
    except BaseException:
        _close_all(socks)
        raise
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def measure_memory(port: int, proc: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Marginal server RSS per idle connection.

    A first batch of ``--mem-warm`` connections stays open while the next
    ``--idle-connections`` are counted: the first batch soaks up memory the server freed at
    start-up (import garbage), which would otherwise be reused and make the first
    connections look cheaper than they are.
    """
    count = args.idle_connections
    warm = _open_idle(port, args.mem_warm)
    try:
        time.sleep(0.2)
        before = int(proc.memory_info().rss)
        socks = _open_idle(port, count)
        try:
            time.sleep(0.2)
            after = int(proc.memory_info().rss)
        finally:
            _close_all(socks)
    finally:
        _close_all(warm)
    time.sleep(0.3)  # let the server process the closes before the next measurement
    return {
        "idle_connections": count,
        "warm_connections": args.mem_warm,
        "rss_before": before,
        "rss_after": after,
        "kib_per_conn": (after - before) / count / 1024,
    }


# =============================================================================================
# Orchestration
# =============================================================================================


def start_server(name: str, loop: str, workdir: Path, args: argparse.Namespace) -> harness.Child:
    key = f"{name}-{loop}"
    profile = Path(args.profile_dir) / f"{key}.pstats" if args.profile_dir else None
    return harness.start_server(
        __file__, key, name, loop, workdir,
        cpu=SERVER_CPU if args.pin else None, profile_out=profile,
    )  # fmt: skip


def _accepts(port: int) -> int | None:
    """The port once a TCP connect to it succeeds, else None."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return None
    return port


def measure_config(
    name: str, loop: str, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Memory, throughput and latency of one server configuration (one fresh subprocess).

    Throughput and latency are measured again (up to ``--retries`` times) when other
    processes used more than ``--max-foreign`` of a core on the benchmark CPUs meanwhile;
    before each new attempt it waits for the CPUs to be quiet, all within ``--retry-budget``
    seconds per run; the least disturbed attempt is kept, with its foreign load recorded.
    """
    import uvloop

    child = start_server(name, loop, workdir, args)
    try:
        port = harness.wait_ready(child, _accepts)
        proc = psutil.Process(child.proc.pid)
        result: dict[str, Any] = {}
        result.update(measure_memory(port, proc, args))
        best: tuple[float, dict[str, Any]] | None = None
        for attempt in range(1 + args.retries):
            if attempt:  # disturbed: wait for quiet CPUs, within the run's budget
                if not harness.wait_quiet(proc, args):
                    break
                started = time.monotonic()
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                sample = runner.run(measure_throughput(port, proc, args))
            watch = harness.CpuWatch(proc, args.cpus)
            sample.update(measure_latency(port, args))
            latency_foreign = watch.stop()["foreign_cores"]
            load = max(sample["foreign_cores_throughput"], latency_foreign)
            sample.update(attempts=attempt + 1, foreign_cores_latency=latency_foreign)
            if best is None or load < best[0]:
                best = (load, sample)
            if attempt:
                args.retry_budget -= time.monotonic() - started
            if load <= args.max_foreign:
                break
        assert best is not None
        result.update(best[1])
        result["disturbed"] = best[0] > args.max_foreign
    finally:
        harness.stop_server(child)
    problems = harness.server_log_problems(child)
    if problems:
        print(f"\n  !! server {child.name} logged problems:\n{problems}", file=sys.stderr)
        result["server_log"] = problems
    return result


# ---- reporting ---------------------------------------------------------------------------

# metric key, column title, format
METRICS: list[tuple[str, str, str]] = [
    ("msgs_per_s", "msgs/s", "{:,.0f}"),
    ("server_us_per_msg", "srv us/msg", "{:.3f}"),
    ("p50_us", "p50 us", "{:.1f}"),
    ("p99_us", "p99 us", "{:.1f}"),
    ("kib_per_conn", "KiB/conn", "{:.2f}"),
]
SHARES = ["server_cpu_share", "client_cpu_share", "client_core_busy", "foreign_cores_throughput"]

Rounds = harness.Rounds


def config_keys(args: argparse.Namespace) -> list[str]:
    names = [n for n in SERVERS if not args.only or n in args.only.split(",") or n == "raw"]
    return [f"{n}/{loop}" for loop in LOOPS for n in names]


def label(key: str) -> str:
    name, loop = key.split("/")
    return f"{SERVERS[name]} ({loop})"


def client_bound(entry: dict[str, Any]) -> bool:
    busy = entry.get("client_core_busy")
    return busy is not None and busy >= SATURATED


def summarize(rounds: Rounds, keys: list[str]) -> dict[str, Any]:
    """Per config: medians across rounds, and medians of the per-round ratios to BASELINE.

    Disturbed samples (other processes used the benchmark CPUs) are left out whenever an
    undisturbed one exists; ``clean`` says whether that was possible.
    """
    summary: dict[str, Any] = {}
    for key in keys:
        own, clean = harness.usable(rounds, key)
        pair, pair_clean = harness.usable(rounds, key, BASELINE)
        entry: dict[str, Any] = {"rounds": len(own), "clean": clean, "ratio_clean": pair_clean}
        for metric in [m[0] for m in METRICS] + SHARES:
            values = [r[key][metric] for r in own if r[key].get(metric) is not None]
            entry[metric] = harness.median_or_none(values)
        for metric, _title, _fmt in METRICS:
            ratios = [r[key][metric] / r[BASELINE][metric] for r in pair if r[BASELINE][metric]]
            entry[f"{metric}_ratio"] = harness.median_or_none(ratios)
        summary[key] = entry
    return summary


def print_table(summary: dict[str, Any]) -> None:
    head = f"{'server (loop)':34}"
    for _key, title, _fmt in METRICS:
        head += f" {title:>10} {'x raw-uv':>8}"
    head += f" {'srv CPU':>7} {'cli CPU':>7} {'cli core':>8}"
    print(head)
    print("-" * len(head))
    for key, entry in summary.items():
        line = f"{label(key):34}"
        for metric, _title, fmt in METRICS:
            line += f" {fmt.format(entry[metric]):>10} {entry[f'{metric}_ratio']:>8.2f}"
        line += f" {entry['server_cpu_share']:>7.0%} {entry['client_cpu_share']:>7.0%}"
        busy = entry["client_core_busy"]
        line += f" {busy:>8.0%}" if busy is not None else f" {'?':>8}"
        if client_bound(entry):
            line += " C"
        if not entry["clean"] or not entry["ratio_clean"]:
            line += " D"
        print(line)
    print(
        f"\nx raw-uv: median of the per-round ratios to {label(BASELINE)} (msgs/s: higher is"
        " better; the other columns: lower is better).\n"
        "srv CPU / cli CPU: share of a core used by the server / load-client process in the"
        " window; cli core: how busy the client's CPU was in all (with the kernel's softirq"
        " time for loopback TCP, charged to no process).\n"
        f"C: client-bound, the client's CPU was >= {SATURATED:.0%} busy, so the server's real"
        " msgs/s limit is higher (compare srv us/msg instead).\n"
        "D: only disturbed samples were available (other processes used the benchmark CPUs)."
    )


def acceptance(rounds: Rounds, summary: dict[str, Any]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def check(text: str, a: str, b: str, metric: str, limit: float, at_least: bool) -> None:
        if a not in summary or b not in summary:
            return
        ratio, clean = harness.pair_ratio(rounds, a, b, metric)
        ok = ratio >= limit if at_least else ratio <= limit
        notes = []
        if metric == "msgs_per_s":
            cpu, _ = harness.pair_ratio(rounds, a, b, "server_us_per_msg")
            notes.append(f"server CPU/msg ratio {cpu:.2f}x")
            bound = [label(k) for k in (a, b) if client_bound(summary[k])]
            if bound:
                notes.append("client-bound: " + ", ".join(bound))
        if not clean:
            notes.append("from disturbed samples only")
        op = ">=" if at_least else "<="
        line = f"{'PASS' if ok else 'FAIL'}: {text}: {ratio:.2f}x ({op} {limit}x)"
        line += f"; {'; '.join(notes)}" if notes else ""
        checks.append(
            {
                "check": text,
                "ratio": ratio,
                "limit": limit,
                "pass": ok,
                "clean": clean,
                "line": line,
            }
        )

    check(
        "netlib.EchoProtocol msgs/s vs raw uvloop Protocol (uvloop)",
        "echo_protocol/uvloop", BASELINE, "msgs_per_s", 0.95, True,
    )  # fmt: skip
    check(
        "serve_tcp raw handler msgs/s vs streams read() (uvloop)",
        "serve_raw/uvloop", "streams/uvloop", "msgs_per_s", 1.25, True,
    )  # fmt: skip
    check(
        "serve_tcp line handler msgs/s vs streams readline() (uvloop)",
        "serve_line/uvloop", "streams_line/uvloop", "msgs_per_s", 1.25, True,
    )  # fmt: skip
    for name in ("echo_protocol", "serve_raw", "serve_line"):
        check(
            f"idle connection memory, {SERVERS[name]} vs raw uvloop Protocol (uvloop)",
            f"{name}/uvloop", BASELINE, "kib_per_conn", 1.5, False,
        )  # fmt: skip
    return checks


def bench_main(args: argparse.Namespace) -> int:
    if args.quick:
        args.warmup, args.duration = 0.3, 0.5
        args.idle_connections, args.round_trips = 200, 500
        args.retry_budget = min(args.retry_budget, 20.0)
    budget = args.retry_budget
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    harness.pin_client(args, SERVER_CPU, CLIENT_CPU)
    info = harness.machine_info()
    keys = config_keys(args)
    print(
        f"tcp_echo: {len(keys)} configurations x {runs} rounds; {info['cpus']} CPUs"
        f" ({info['cpu_model']}), Python {info['python']}, uvloop {info['uvloop']}"
    )
    print(
        f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}"
        f"{'' if args.pin else ' (NOT pinned)'}; {args.connections} connections x window"
        f" {args.window} x {MSG_SIZE}-byte messages; warm-up {args.warmup}s, window"
        f" {args.duration}s (max {args.max_msgs:,} msgs); latency {args.round_trips} round"
        f" trips; memory {args.idle_connections} idle connections\n"
    )
    started = time.monotonic()
    rounds: Rounds = []
    with (
        tempfile.TemporaryDirectory(prefix="tcp_echo.") as tmp,
        harness.servers_always_killed(Path(tmp)),
    ):
        for index in range(runs):
            order = keys if index % 2 == 0 else keys[::-1]  # alternate to cancel drift
            results: dict[str, dict[str, Any]] = {}
            for key in order:
                name, loop = key.split("/")
                print(f"round {index + 1}/{runs} {label(key):36}", end=" ", flush=True)
                r = measure_config(name, loop, Path(tmp), args)
                results[key] = r
                print(
                    f"{r['msgs_per_s']:>10,.0f} msgs/s  {r['server_us_per_msg']:6.3f} us/msg"
                    f"  cli {r['client_cpu_share']:4.0%} (core {r['client_core_busy'] or 0:4.0%})"
                    f"  p50 {r['p50_us']:6.1f} us"
                    f"  {r['kib_per_conn']:5.2f} KiB/conn"
                    f"  foreign {r['foreign_cores_throughput']:4.2f}"
                    f"{'  DISTURBED' if r['disturbed'] else ''}"
                    f"{' (retried)' if r['attempts'] > 1 else ''}",
                    flush=True,
                )
            rounds.append(results)
    elapsed = time.monotonic() - started
    summary = summarize(rounds, keys)
    print(f"\nmedians over {runs} rounds ({elapsed:.0f}s):\n")
    print_table(summary)
    checks = acceptance(rounds, summary)
    harness.print_retry_summary(rounds, budget, args)
    print("\nacceptance checks (median of per-round ratios):")
    for c in checks:
        print("  " + c["line"])
    if args.json:
        data = {
            "machine": info,
            "settings": harness.settings(args, runs=runs, retry_budget=budget),
            "message": {"size": MSG_SIZE, "bytes": MESSAGE.decode()},
            "baseline": BASELINE,
            "elapsed_s": elapsed,
            "rounds": rounds,
            "summary": summary,
            "checks": checks,
        }
        harness.write_json(args.json, data)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--connections", type=int, default=10, help="throughput connections (10)")
    p.add_argument("--window", type=int, default=64, help="messages in flight per connection")
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
    p.add_argument("--only", metavar="NAMES", help="comma-separated servers (raw always runs)")
    p.add_argument("--profile-dir", metavar="DIR", help="cProfile each server into DIR")
    # server subprocess mode
    harness.add_server_args(p, SERVERS, LOOPS)
    return p.parse_args(argv)


def main() -> int:
    return harness.run_main(parse_args(), server_main, bench_main)


if __name__ == "__main__":
    sys.exit(main())
