"""Bulk goodput on loopback: netlib's reliable UDP against TCP, on both loops.

::

    .venv/bin/python benchmarks/rudp_bulk.py [--mib 128] [--message 16384] [--runs 5]

For each loop (uvloop, asyncio), two sink servers run in subprocesses: a ``serve_tcp``
handler and an ``open_reliable_udp_server`` handler that count the bytes of the messages
they receive and send one byte back when they have ``--mib`` MiB. The client, in this
process, sends ``--mib`` MiB in ``--message``-byte messages as fast as ``send()`` lets it,
each transfer on a new connection, and measures from its first send to the sink's reply.

Each server first takes one transfer that is not measured (its lazy imports and first
allocations), then the rounds alternate TCP and reliable UDP. Reported per loop: MiB/s and
the server process's CPU seconds per MiB (psutil) for each transport, medians over the
rounds, and reliable UDP's goodput as a ratio to TCP's measured in the same round. The
issue's goal: at least 0.5x TCP.

A transfer includes its connection's start (TCP's receive-window growth; reliable UDP's
congestion window from 12,000 bytes and its path MTU probes from 1,200-byte datagrams), so
short transfers measure the start more than the goodput: at 2 GB/s, 32 MiB is 16 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from typing import Literal

import psutil

import netlib
from netlib.sansio.reliable import core_kind

SERVER = """
import sys
import netlib

TOTAL = int(sys.argv[3])

async def sink(stream: netlib.MessageStream) -> None:
    received = 0
    async for message in stream:
        received += len(message)
        if received >= TOTAL:
            await stream.send(b"!")
            received = 0

async def main() -> None:
    if sys.argv[2] == "tcp":
        opened = netlib.open_tcp_server(sink, "127.0.0.1", 0, max_memory=None)
    else:
        opened = netlib.open_reliable_udp_server(sink, "127.0.0.1", 0)
    async with opened as server:
        print(server.addresses[0][1], flush=True)
        await server.serve_forever()

netlib.run(main(), loop=sys.argv[1])
"""

Loop = Literal["uvloop", "asyncio"]
TRANSPORTS = ("tcp", "rudp")


async def send_all(transport: str, port: int, total: int, size: int) -> float:
    """Send ``total`` bytes; return the seconds until the sink confirmed them all."""
    chunk = b"x" * size
    connect = netlib.connect_tcp if transport == "tcp" else netlib.connect_reliable_udp
    async with connect("127.0.0.1", port) as stream:
        started = time.perf_counter()
        for _ in range(total // size):
            await stream.send(chunk)
        assert await asyncio.wait_for(stream.receive(), 120) == b"!"
        return time.perf_counter() - started


class Sink:
    """One sink server subprocess."""

    def __init__(self, loop: Loop, transport: str, total: int) -> None:
        self.loop, self.transport, self.total = loop, transport, total
        self.process = subprocess.Popen(
            [sys.executable, "-c", SERVER, loop, transport, str(total)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        self.port = int(self.process.stdout.readline())
        self.cpu = psutil.Process(self.process.pid)

    def transfer(self, size: int) -> tuple[float, float]:
        """MiB/s and server CPU seconds per MiB of one transfer on a new connection."""
        before = sum(self.cpu.cpu_times()[:2])
        seconds = netlib.run(send_all(self.transport, self.port, self.total, size), loop=self.loop)
        cpu = sum(self.cpu.cpu_times()[:2]) - before
        mib = self.total / 2**20
        return mib / seconds, cpu / mib

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


def measure(loop: Loop, total: int, size: int, runs: int) -> None:
    """The rounds of one loop, and its report lines."""
    sinks = [Sink(loop, transport, total) for transport in TRANSPORTS]
    try:
        for sink in sinks:
            sink.transfer(size)  # the warm-up, not measured
        rows: dict[str, list[tuple[float, float]]] = {t: [] for t in TRANSPORTS}
        ratios: list[float] = []
        for _ in range(runs):
            for sink in sinks:
                rows[sink.transport].append(sink.transfer(size))
            ratios.append(rows["rudp"][-1][0] / rows["tcp"][-1][0])
    finally:
        for sink in sinks:
            sink.stop()
    for transport, samples in rows.items():
        rate = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples) * 1000
        print(f"{loop:<8} {transport:<5} {rate:8.1f} MiB/s  server {cpu:6.2f} ms CPU/MiB")
    ratio = statistics.median(ratios)
    verdict = "PASS" if ratio >= 0.5 else "FAIL"
    each = ", ".join(f"{r:.3f}" for r in ratios)
    print(f"goal: {loop} rudp goodput >= 0.5x tcp: {verdict} {ratio:.3f}x ({each})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=128, help="MiB per transfer")
    parser.add_argument("--message", type=int, default=16384, help="bytes per message")
    parser.add_argument("--runs", type=int, default=5, help="rounds (medians are reported)")
    args = parser.parse_args()
    total = args.mib * 2**20 // args.message * args.message
    print(f"reliable core: {core_kind()}")
    for loop in ("uvloop", "asyncio"):
        measure(loop, total, args.message, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
