"""What a coroutine handler costs per read and per idle connection, without the kernel.

Usage::

    .venv/bin/python benchmarks/handler_costs.py [--quick] [--loop uvloop|asyncio]

Two measurements that explain the ``serve_tcp`` rows of ``tcp_echo.py``:

* **Python per read.** A 640-byte chunk is fed to ``data_received`` of a protocol on a fake
  transport (``write`` does nothing) from a loop callback, as a transport does, then the loop
  runs one iteration
  (``asyncio.sleep(0)``), during which the handler wakes, echoes and waits again. Three
  servers: the smallest coroutine handler possible (``minimal``: await a future that
  ``data_received`` resolves with the chunk, write it), ``netlib`` (``serve_tcp``'s
  ``StreamProtocol`` + ``MessageStream`` + ``echo_handler``, raw framing, default deadlines)
  and ``streams`` (``StreamReaderProtocol``, ``read(65536)``, ``write``, ``drain``). The
  driver's own cost (the same loop without feeding) is subtracted; the minimum over the
  repeats is reported, in ns per read.
* **Memory per idle connection.** tracemalloc over ``--connections`` idle ``serve_tcp`` echo
  connections on real loopback sockets (each proven by one echo, the clients in a
  subprocess), against a raw ``asyncio.Protocol`` server, grouped by where the memory was
  allocated.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import linecache
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from harness.tcp import RawEcho

import netlib
from netlib.aio.stream import StreamProtocol  # internal: serve_tcp's adapter
from netlib.sansio.stream import StreamLimits

CHUNK = b"x" * 640
Feed = Callable[[bytes], None]


class FakeTransport(asyncio.Transport):
    """Accepts everything and sends nothing."""

    def write(self, data: Any) -> None:
        pass

    def writelines(self, list_of_data: Any) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


# -- Python per read ---------------------------------------------------------------------


class _Minimal:
    def __init__(self) -> None:
        self.waiter: asyncio.Future[bytes] | None = None
        self.transport = FakeTransport()

    def data_received(self, data: bytes) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.set_result(data)

    async def handler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            waiter = self.waiter = loop.create_future()
            self.transport.write(await waiter)


async def _minimal() -> tuple[Feed, asyncio.Task[None]]:
    server = _Minimal()
    return server.data_received, asyncio.create_task(server.handler())


async def _netlib() -> tuple[Feed, asyncio.Task[None]]:
    limits = StreamLimits(first_frame_timeout=10.0, idle_timeout=60.0)
    protocol = StreamProtocol(netlib.RawFraming(), limits)
    protocol.connection_made(FakeTransport())
    stream = netlib.MessageStream(protocol, linger=True)
    return protocol.data_received, asyncio.create_task(netlib.echo_handler(stream))


async def _streams() -> tuple[Feed, asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
    transport = FakeTransport()
    protocol.connection_made(transport)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    async def echo() -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    return protocol.data_received, asyncio.create_task(echo())


def _nothing(data: bytes) -> None:
    pass


async def _drive(feed: Feed | None, reads: int) -> float:
    # The chunk is fed from a loop callback, as a transport does (never from inside a task).
    call_soon = asyncio.get_running_loop().call_soon
    feed = feed or _nothing
    started = time.perf_counter_ns()
    for _ in range(reads):
        call_soon(feed, CHUNK)
        await asyncio.sleep(0)
    return (time.perf_counter_ns() - started) / reads


SERVERS: dict[str, Callable[[], Awaitable[tuple[Feed, asyncio.Task[None]]]]] = {
    "minimal": _minimal,
    "netlib": _netlib,
    "streams": _streams,
}


async def per_read(reads: int, repeats: int) -> dict[str, float]:
    """ns of Python per read and echo for each server (minimum over ``repeats``)."""
    best = dict.fromkeys(["driver", *SERVERS], float("inf"))
    for _ in range(repeats):
        best["driver"] = min(best["driver"], await _drive(None, reads))
        for name, start in SERVERS.items():
            feed, task = await start()
            await asyncio.sleep(0)  # the handler waits for its first read
            best[name] = min(best[name], await _drive(feed, reads))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return {name: best[name] - best["driver"] for name in SERVERS}


# -- memory per idle connection ----------------------------------------------------------

_CLIENTS = r"""
import socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(2):  # a warm batch, then the measured one
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        held.append(sock)
    print("ok", flush=True)
    sys.stdin.readline()
"""


async def _serve_and_measure(port: int, count: int) -> list[tracemalloc.StatisticDiff]:
    clients = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENTS, str(port), str(count),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert clients.stdin is not None
    assert clients.stdout is not None
    try:
        assert await asyncio.wait_for(clients.stdout.readline(), 60) == b"ok\n"
        gc.collect()
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        clients.stdin.write(b"\n")
        assert await asyncio.wait_for(clients.stdout.readline(), 60) == b"ok\n"
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        return after.compare_to(before, "traceback")
    finally:
        clients.stdin.write(b"\n")
        await clients.wait()


def _where(stat: tracemalloc.StatisticDiff) -> str:
    frames = [
        f"{Path(f.filename).name}:{f.lineno} {linecache.getline(f.filename, f.lineno).strip()}"
        for f in stat.traceback
        if "asyncio/runners" not in f.filename and "uvloop/__init__" not in f.filename
    ]
    return frames[-1][:90] if frames else "?"


async def idle_memory(name: str, count: int) -> list[tracemalloc.StatisticDiff]:
    """Allocation differences for ``count`` more idle connections to server ``name``."""
    if name == "raw":
        loop = asyncio.get_running_loop()
        server = await loop.create_server(RawEcho, "127.0.0.1", 0)
        try:
            return await _serve_and_measure(server.sockets[0].getsockname()[1], count)
        finally:
            server.close()
            await server.wait_closed()
    async with netlib.open_tcp_server(  # --connections from loopback, above the per-host cap
        netlib.echo_handler, framing="raw", max_connections_per_host=None
    ) as tcp:
        return await _serve_and_measure(tcp.addresses[0][1], count)


# -- report ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    costs = await per_read(args.reads, args.repeats)
    print(f"Python per read and echo, fake transport, {args.loop} (min of {args.repeats}):")
    for name, ns in costs.items():
        print(f"  {name:8s} {ns:7.0f} ns   x streams {ns / costs['streams']:.2f}")
    totals = {}
    for name in ("raw", "serve_tcp"):
        stats = await idle_memory(name, args.connections)
        totals[name] = sum(s.size_diff for s in stats) / args.connections
        print(f"\nmemory per idle connection, {name}: {totals[name]:.0f} B, of which:")
        for stat in stats[: args.top]:
            print(f"  {stat.size_diff / args.connections:7.0f} B  {_where(stat)}")
    print(f"\nserve_tcp / raw idle memory: {totals['serve_tcp'] / totals['raw']:.2f}x")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few reads and connections")
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--reads", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--top", type=int, default=12, help="allocation sites listed")
    args = p.parse_args(argv)
    if args.quick:
        args.reads, args.repeats, args.connections = 2_000, 2, 50
    return args


if __name__ == "__main__":
    arguments = parse_args()
    netlib.run(main(arguments), loop=arguments.loop)
