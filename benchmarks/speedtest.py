"""The speed test's TCP throughput on loopback against iperf3, measured in the same run.

::

    .venv/bin/python benchmarks/speedtest.py [--duration 3] [--runs 3] [--parallel 1]
                                             [--loops uvloop,asyncio] [--reverse]

Each round measures, one after the other, iperf3 (``iperf3 -s -1 -p PORT`` and
``iperf3 -c 127.0.0.1 -p PORT -t S -J``) and, for each loop, netlib (``netlib speedtest
serve`` and ``netlib speedtest --proto tcp --json``), each server pinned to CPU 0 and each
client to CPU 1. The throughput is what the receiver measured (iperf3's
``end.sum_received``, netlib's ``sum_received``); also printed: the CPU seconds the server
and the client processes spent per GB (psutil), which tell which side limits the rate.
The goal (issue 12): netlib's TCP throughput at least 0.5x iperf3's, the median of the
per-round ratios. Without iperf3 installed, netlib is measured alone and no ratio is given.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil

NETLIB = [sys.executable, "-m", "netlib"]
SERVER_CPU, CLIENT_CPU = 0, 1
GOAL = 0.5
STARTUP = 30.0  # seconds a server has to listen, and a client to end after its test


@dataclass
class Sample:
    """One measurement: the receiver's bits per second and the CPU seconds per GB."""

    bits_per_second: float
    server_cpu: float
    client_cpu: float


PIN = True  # --no-pin turns it off


def _pinned(cpu: int) -> Callable[[], None] | None:
    if not PIN or not hasattr(os, "sched_setaffinity") or cpu >= (os.cpu_count() or 1):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _measure(server_argv: list[str], ready: Callable[[str], int | None], client_argv: Any) -> Any:
    """Start the server, wait for ``ready`` to find its port in a line of its output, run
    the client made by ``client_argv(port)``; return the client's stdout and both CPU
    times."""
    server = subprocess.Popen(
        server_argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=_pinned(SERVER_CPU),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert server.stdout is not None
        port = None
        watchdog = threading.Timer(STARTUP, server.kill)  # a server that never listens
        watchdog.start()
        while port is None:
            line = server.stdout.readline()
            if not line:
                raise RuntimeError(f"{server_argv[0]} server ended before listening")
            port = ready(line)
        watchdog.cancel()
        before = _cpu(psutil.Process(server.pid))
        client = subprocess.Popen(
            client_argv(port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_pinned(CLIENT_CPU),
        )
        watched = psutil.Process(client.pid)
        client_cpu = 0.0
        while client.poll() is None:  # its CPU time while it runs (gone once reaped)
            try:
                client_cpu = _cpu(watched)
            except psutil.Error:
                break
            try:
                client.wait(0.05)
            except subprocess.TimeoutExpired:
                pass
        out, err = client.communicate(timeout=STARTUP)
        if client.returncode != 0:
            raise RuntimeError(f"{client_argv(port)[0]} client failed: {err.strip()}")
        server_cpu = _cpu(psutil.Process(server.pid)) - before
        return out, server_cpu, client_cpu
    finally:
        server.terminate()
        server.communicate(timeout=30)


def iperf3(args: argparse.Namespace) -> Sample:
    port = _free_port()
    out, server_cpu, client_cpu = _measure(
        ["iperf3", "-s", "-1", "-p", str(port), "--forceflush"],
        lambda line: port if "listening" in line else None,
        lambda p: [
            *f"iperf3 -c 127.0.0.1 -p {p} -t {args.duration} -J -P {args.parallel}".split(),
            *(["-R"] if args.reverse else []),
        ],
    )
    received = json.loads(out)["end"]["sum_received"]
    return _sample(received["bits_per_second"], received["bytes"], server_cpu, client_cpu)


def netlib_speedtest(args: argparse.Namespace, loop: str) -> Sample:
    def ready(line: str) -> int | None:
        listening = json.loads(line)
        return int(listening["addresses"][0].rsplit(":", 1)[1])

    out, server_cpu, client_cpu = _measure(
        [*NETLIB, "--loop", loop, "-q", "speedtest", "serve", "--port", "0", "--json"],
        ready,
        lambda p: [
            *NETLIB,
            *f"--loop {loop} speedtest --proto tcp --port {p} --json".split(),
            *f"--duration {args.duration} --parallel {args.parallel}".split(),
            *(["--reverse"] if args.reverse else []),
        ],
    )
    received = json.loads(out)["sum_received"]
    return _sample(received["bits_per_second"], received["bytes"], server_cpu, client_cpu)


def _sample(bits_per_second: float, size: int, server_cpu: float, client_cpu: float) -> Sample:
    gb = max(size, 1) / 1e9
    return Sample(bits_per_second, server_cpu / gb, client_cpu / gb)


def _show(name: str, samples: list[Sample]) -> float:
    rate = statistics.median(s.bits_per_second for s in samples)
    server = statistics.median(s.server_cpu for s in samples)
    client = statistics.median(s.client_cpu for s in samples)
    rounds = ", ".join(f"{s.bits_per_second / 1e9:.2f}" for s in samples)
    print(
        f"{name:<16} {rate / 1e9:6.2f} Gbit/s  CPU s/GB: server {server:.3f} "
        f"client {client:.3f}   (rounds: {rounds})"
    )
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds of each test (>= 1)")
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--parallel", type=int, default=1, help="streams")
    parser.add_argument("--reverse", action="store_true", help="the server sends")
    parser.add_argument("--loops", default="uvloop,asyncio", help="netlib's event loops")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the kernel place servers and clients"
    )
    args = parser.parse_args()
    global PIN
    PIN = not args.no_pin
    loops = args.loops.split(",")
    have_iperf3 = shutil.which("iperf3") is not None
    if not have_iperf3:
        print("iperf3 is not installed: netlib is measured alone, with no ratio")
    samples: dict[str, list[Sample]] = {"iperf3": [], **{f"netlib {loop}": [] for loop in loops}}
    ratios: dict[str, list[float]] = {loop: [] for loop in loops}
    for _ in range(args.runs):
        baseline = iperf3(args) if have_iperf3 else None
        if baseline is not None:
            samples["iperf3"].append(baseline)
        for loop in loops:
            sample = netlib_speedtest(args, loop)
            samples[f"netlib {loop}"].append(sample)
            if baseline is not None:
                ratios[loop].append(sample.bits_per_second / baseline.bits_per_second)
    direction = "server to client" if args.reverse else "client to server"
    placed = (
        "not pinned" if args.no_pin else f"servers on CPU {SERVER_CPU}, clients on {CLIENT_CPU}"
    )
    print(f"TCP on loopback, {args.parallel} stream(s), {args.duration} s, {direction}, {placed}:")
    for name, taken in samples.items():
        if taken:
            _show(name, taken)
    for loop, values in ratios.items():
        if values:
            ratio = statistics.median(values)
            verdict = "PASS" if ratio >= GOAL else "FAIL"
            rounds = ", ".join(f"{r:.2f}" for r in values)
            print(f"goal: netlib {loop} tcp >= {GOAL}x iperf3: {verdict} {ratio:.2f}x ({rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
