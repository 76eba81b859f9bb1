"""``netlib echo serve --workers N`` throughput against one process and against baselines.

Usage::

    .venv/bin/python benchmarks/workers.py [--quick] [--runs N] [--workers N] [--json FILE]

Servers (subprocesses, on 127.0.0.1, uvloop; none pinned: the workers need every CPU):

* ``single``    ``netlib echo serve``: one process (``--workers 1``, the default)
* ``workers``   ``netlib echo serve --workers N`` (2 by default): N processes on one port
* ``raw``       a hand-written uvloop ``asyncio.Protocol`` echo: the fastest one Python
                process serves, the single-process baseline
* ``go``        a Go line echo server (``harness/goecho.go``, a goroutine per connection),
                with every CPU (GOMAXPROCS = CPU count), when ``go`` is installed
* ``go1``       the same with GOMAXPROCS=1: one core, as one Python process has

Load: the C load generator (``harness/loadgen.c``), ``--connections`` connections each with
one ``--size``-byte line in flight (ping-pong), one ``--warmup`` then a ``--duration``
window per sample. Each round measures every server once, in alternating order; the report
gives medians and, for each comparison, the median of the per-round ratios.

On a machine with as many cores as workers, the load generator competes with the servers
for the CPUs: the report shows how much of a core each side used. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import harness
import psutil
from harness import loadgen

HOST = "127.0.0.1"
GO_SOURCE = Path(__file__).parent / "harness" / "goecho.go"
START_TIMEOUT = 30.0  # seconds a server has to print its listening line


# =============================================================================================
# Servers
# =============================================================================================


def serve_raw() -> None:
    """The ``raw`` server (this script with ``--serve-raw``): a uvloop Protocol echo."""
    import uvloop

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, HOST, 0, backlog=1024)
        print(f"listening on {HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
        harness.install_exit_handlers(loop, None)
        await asyncio.Event().wait()

    uvloop.run(main())


def build_go(build_dir: Path = loadgen.BUILD_DIR) -> Path | None:
    """The Go server's binary, built with ``go build`` when missing or older than its
    source; None without ``go``."""
    binary = build_dir / "goecho"
    if binary.exists() and binary.stat().st_mtime >= GO_SOURCE.stat().st_mtime:
        return binary
    go = shutil.which("go")
    if go is None:
        return None
    build_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "GOCACHE": str(build_dir / "gocache"), "GO111MODULE": "off"}
    done = subprocess.run(
        [go, "build", "-o", str(binary), str(GO_SOURCE)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"go build failed:\n{done.stderr[-3000:]}")
    return binary


@dataclass
class Server:
    name: str
    label: str
    proc: subprocess.Popen[str]
    port: int
    tree: Tree


class Tree:
    """A process and its children, as one ``psutil.Process`` for ``harness.CpuWatch``:
    ``cpu_times()`` sums user and system time over all of them."""

    def __init__(self, pid: int) -> None:
        root = psutil.Process(pid)
        self.members = [root, *root.children(recursive=True)]

    def cpu_times(self) -> SimpleNamespace:
        user = system = 0.0
        for member in self.members:
            with contextlib.suppress(psutil.NoSuchProcess):
                times = member.cpu_times()
                user += times.user
                system += times.system
        return SimpleNamespace(user=user, system=system)


def start(name: str, label: str, command: list[str], env: dict[str, str] | None = None) -> Server:
    """Start a server; its port from the first line it prints (``listening on H:P`` or a
    netlib JSON listening line)."""
    proc = subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    ready = select.select([proc.stdout], [], [], START_TIMEOUT)[0]
    line = proc.stdout.readline() if ready else ""
    if not line:
        stop(proc)
        raise RuntimeError(f"{label} did not start: {proc.stderr.read() if proc.stderr else ''}")
    if line.startswith("{"):
        port = int(json.loads(line)["addresses"][0].rsplit(":", 1)[1])
    else:
        port = int(line.rsplit(":", 1)[1])
    return Server(name, label, proc, port, Tree(proc.pid))


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[list[Server]]:
    netlib = [sys.executable, "-m", "netlib", "--loop", "uvloop", "-q", "echo", "serve"]
    netlib += ["--port", "0", "--json", "--max-connections-per-host", "0"]
    raw = [sys.executable, __file__, "--serve-raw"]
    wanted: list[tuple[str, str, list[str], dict[str, str] | None]] = [
        ("single", "netlib echo serve (1 process)", netlib, None),
        (
            "workers",
            f"netlib echo serve --workers {args.workers}",
            [*netlib, "--workers", str(args.workers)],
            None,
        ),
        ("raw", "raw uvloop Protocol (1 process)", raw, None),
    ]
    go = build_go()
    if go is None:
        print("go is not installed: the Go baselines are left out\n")
    else:
        cpus = os.cpu_count() or 1
        wanted.append(("go", f"Go, GOMAXPROCS={cpus}", [str(go)], None))
        wanted.append(("go1", "Go, GOMAXPROCS=1", [str(go)], {**os.environ, "GOMAXPROCS": "1"}))
    started: list[Server] = []
    try:
        for name, label, command, env in wanted:
            started.append(start(name, label, command, env))
        yield started
    finally:
        for server in started:
            stop(server.proc)


# =============================================================================================
# Measuring
# =============================================================================================


def measure(binary: Path, server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """One sample; re-measured (up to ``--retries`` times) while other processes use more
    than ``--max-foreign`` cores, keeping the least disturbed."""
    best: dict[str, Any] | None = None
    for attempt in range(1, args.retries + 2):
        if attempt > 1:
            harness.wait_quiet(server.tree, args)  # spends --retry-budget
        sample = loadgen.pingpong(
            binary,
            server.port,
            server.tree,
            args.cpus,
            connections=args.connections,
            size=args.size,
            warmup=args.warmup,
            duration=args.duration,
            pin=False,
        )
        sample["attempts"] = attempt
        sample["disturbed"] = sample["foreign_cores"] > args.max_foreign
        if best is None or sample["foreign_cores"] < best["foreign_cores"]:
            best = sample
        if not sample["disturbed"]:
            break
    assert best is not None
    return best


COMPARISONS = [
    ("workers", "single", "--workers N against one process"),
    ("workers", "raw", "--workers N against the raw uvloop Protocol (one process)"),
    ("workers", "go", "--workers N against Go with every CPU"),
    ("single", "go1", "one netlib process against Go on one core"),
]


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(rounds: list[dict[str, dict[str, Any]]], servers: list[Server]) -> dict[str, Any]:
    """Medians over the rounds where a server's sample was undisturbed (all rounds when
    none was), and the median ratios over the rounds where both sides were."""
    head = (
        f"{'server':36} {'msgs/s':>9} {'srv cores':>9} {'cli cores':>9} {'µs/msg':>7}"
        f" {'p50 µs':>7} {'p99 µs':>7} {'errors':>6} {'rounds':>6}"
    )
    print(f"\n{head}\n{'-' * len(head)}")
    summary: dict[str, Any] = {}
    for server in servers:
        used, clean = harness.usable(rounds, server.name)
        samples = [r[server.name] for r in used]
        entry: dict[str, Any] = {
            metric: median([s[metric] for s in samples])
            for metric in (
                "msgs_per_s",
                "server_cpu_share",
                "client_cpu_share",
                "server_us_per_msg",
                "p50_us",
                "p99_us",
                "foreign_cores",
            )
        }
        entry["errors"] = sum(r[server.name]["errors"] for r in rounds)
        entry["rounds"] = len(used)
        entry["clean"] = clean
        summary[server.name] = entry
        print(
            f"{server.label:36} {entry['msgs_per_s']:>9,.0f} {entry['server_cpu_share']:>9.2f}"
            f" {entry['client_cpu_share']:>9.2f} {entry['server_us_per_msg']:>7.1f}"
            f" {entry['p50_us']:>7.0f} {entry['p99_us']:>7.0f} {entry['errors']:>6}"
            f" {len(used):>6}{'' if clean else ' D'}"
        )
    print(
        "\nsrv cores / cli cores: CPU used by the server (all its processes) / the load"
        " generator in the window, in cores; µs/msg: server CPU per message; rounds: the"
        " rounds in the medians, those where no other process used more than --max-foreign"
        " cores (D: none was, all are used)."
    )
    print("\nratios of msgs/s (median of the per-round ratios; then each round's):")
    ratios: dict[str, Any] = {}
    names = {s.name for s in servers}
    for a, b, title in COMPARISONS:
        if a not in names or b not in names:
            continue
        pair, clean = harness.usable(rounds, a, b)
        per_round = [r[a]["msgs_per_s"] / r[b]["msgs_per_s"] for r in pair]
        value = statistics.median(per_round)
        ratios[f"{a}/{b}"] = {"median": value, "rounds": per_round, "clean": clean}
        rounds_text = ", ".join(f"{x:.2f}" for x in per_round)
        print(f"  {title}: {value:.2f}x ({rounds_text}){'' if clean else ' D'}")
    return {"servers": summary, "ratios": ratios}


def main() -> int:
    p = harness.new_parser(__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    p.add_argument("--connections", type=int, default=100, help="connections (100)")
    p.add_argument("--size", type=int, default=64, help="message size in bytes (64)")
    p.add_argument("--warmup", type=float, default=None, help="seconds (1; 0.5 with --quick)")
    p.add_argument("--duration", type=float, default=None, help="seconds (3; 1 with --quick)")
    harness.add_retry_args(p, budget=120.0)
    args = p.parse_args()
    args.cpus = set(os.sched_getaffinity(0))  # the CPUs watched for other processes' load
    if args.serve_raw:
        serve_raw()
        return 0
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.duration = args.duration if args.duration is not None else (1.0 if args.quick else 3.0)
    binary = loadgen.build()
    if binary is None:
        print("no C compiler: the C load generator cannot be built; nothing measured")
        return 0
    info = harness.machine_info()
    print(
        f"workers.py: {args.connections} connections x one {args.size}-byte line in flight"
        f" (C load generator), {args.warmup:g} s warm-up + {args.duration:g} s window,"
        f" {runs} round(s); {info['cpus']} CPUs ({info['cpu_model']}), Python"
        f" {info['python']}, uvloop {info['uvloop']}; nothing pinned: the servers and the"
        " load generator share the CPUs"
    )
    rounds: list[dict[str, dict[str, Any]]] = []
    with servers(args) as running:
        for number in range(runs):
            order = running if number % 2 == 0 else running[::-1]
            rounds.append({s.name: measure(binary, s, args) for s in order})
            print(f"round {number + 1}/{runs} done", flush=True)
    result = report(rounds, running)
    if args.json:
        harness.write_json(
            args.json,
            {
                "machine": info,
                "settings": harness.settings(args),
                "rounds": rounds,
                **result,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
