"""Bulk goodput on loopback: netlib's reliable UDP against TCP, on both loops.

::

    .venv/bin/python benchmarks/rudp_bulk.py [--mib 32] [--message 16384] [--runs 3]

For each loop (uvloop, asyncio) and transport, a sink server runs in a subprocess: a
``serve_tcp`` handler or an ``open_reliable_udp_server`` handler that counts the bytes of
the messages it receives and sends one byte back when it has them all. The client, in this
process, sends ``--mib`` MiB in ``--message``-byte messages as fast as ``send()`` lets it,
and measures from its first send to the sink's reply. Reported per run: MiB/s, the server
process's CPU seconds per MiB (psutil), and reliable UDP's goodput as a ratio to TCP's
measured in the same round. The issue's goal: at least 0.5x TCP.
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


def measure(
    loop: Literal["uvloop", "asyncio"], transport: str, total: int, size: int
) -> tuple[float, float]:
    """MiB/s and server CPU seconds per MiB of one transfer."""
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, loop, transport, str(total)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        process = psutil.Process(server.pid)
        before = sum(process.cpu_times()[:2])
        seconds = netlib.run(send_all(transport, port, total, size), loop=loop)
        cpu = sum(process.cpu_times()[:2]) - before
    finally:
        server.kill()
        server.wait(10)
    mib = total / 2**20
    return mib / seconds, cpu / mib


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=32, help="MiB per transfer")
    parser.add_argument("--message", type=int, default=16384, help="bytes per message")
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    args = parser.parse_args()
    total = args.mib * 2**20 // args.message * args.message
    for loop in ("uvloop", "asyncio"):
        ratios: list[float] = []
        rows: dict[str, list[tuple[float, float]]] = {"tcp": [], "rudp": []}
        for _ in range(args.runs):
            for transport in ("tcp", "rudp"):
                rows[transport].append(measure(loop, transport, total, args.message))
            ratios.append(rows["rudp"][-1][0] / rows["tcp"][-1][0])
        for transport, samples in rows.items():
            rate = statistics.median(s[0] for s in samples)
            cpu = statistics.median(s[1] for s in samples) * 1000
            print(f"{loop:<8} {transport:<5} {rate:8.1f} MiB/s  server {cpu:6.2f} ms CPU/MiB")
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio >= 0.5 else "FAIL"
        runs = ", ".join(f"{r:.3f}" for r in ratios)
        print(f"goal: {loop} rudp goodput >= 0.5x tcp: {verdict} {ratio:.3f}x ({runs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
