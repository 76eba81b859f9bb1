"""TCP load clients: pipelined throughput, latency, idle memory and connection rate.

Every client runs in the benchmark's own process (pinned to the client CPU); the
asynchronous ones on uvloop. A message is ``size - 1`` bytes of ``x`` and a newline, so the
same traffic suits line-framed and unframed servers. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import math
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from harness import CpuWatch, proc_cpu_seconds
from harness.bench import CLIENT_CPU, HOST, SERVER_CPU

__all__ = [
    "RawEcho",
    "accepts",
    "measure_connect_rate",
    "measure_latency",
    "measure_memory",
    "measure_throughput",
    "message",
]


class RawEcho(asyncio.Protocol):
    """The baseline echo server: a hand-written ``asyncio.Protocol`` that writes back what
    it reads."""

    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


def message(size: int) -> bytes:
    """``size`` bytes: ``x`` * (size - 1) and a newline."""
    return b"x" * (size - 1) + b"\n"


def accepts(port: int) -> int | None:
    """The port once a TCP connect to it succeeds, else None."""
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return None
    return port


def _shares(
    proc: Any, watch: CpuWatch, t0: float, s0: float, c0: float, count: int
) -> dict[str, Any]:
    """Server CPU per item and the CPU shares of a window that started at ``t0``."""
    elapsed = time.perf_counter() - t0
    server = proc_cpu_seconds(proc) - s0
    cpu = watch.stop()
    return {
        "elapsed_s": elapsed,
        "server_cpu_s": server,
        "server_us_per_item": server * 1e6 / count if count else None,
        "server_cpu_share": server / elapsed,
        "client_cpu_share": (time.process_time() - c0) / elapsed,
        "server_core_busy": cpu["core_busy"].get(SERVER_CPU),
        "client_core_busy": cpu["core_busy"].get(CLIENT_CPU),
        "foreign_cores": cpu["foreign_cores"],
    }


async def _window(
    proc: Any, args: argparse.Namespace, counter: Callable[[], int], cap: int
) -> tuple[int, dict[str, Any]]:
    """Warm up, then count ``counter()`` over ``--duration`` s (or until ``cap``)."""
    await asyncio.sleep(args.warmup)
    watch = CpuWatch(proc, args.cpus)
    t0, s0, c0 = time.perf_counter(), proc_cpu_seconds(proc), time.process_time()
    n0 = counter()
    deadline = t0 + args.duration
    while (now := time.perf_counter()) < deadline and counter() - n0 < cap:
        await asyncio.sleep(min(0.05, deadline - now))
    count = counter() - n0
    return count, _shares(proc, watch, t0, s0, c0, count)


# =============================================================================================
# Throughput: a fixed window of pipelined messages per connection
# =============================================================================================


class LoadProtocol(asyncio.Protocol):
    """Keeps ``window`` messages in flight; sends one new message per message echoed."""

    def __init__(self, msg: bytes, window: int) -> None:
        self.size = len(msg)
        self.window = window
        self.block = msg * window
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
            new = self.received // self.size + self.window - self.sent
            if new > 0:
                self.sent += new
                # one write per read: new < window, so a slice of the block (a batch)
                self.transport.write(  # type: ignore[union-attr]
                    self.block if new >= self.window else self.block[: new * self.size]
                )
        elif (
            self.drained is not None
            and self.received >= self.sent * self.size
            and not self.drained.done()
        ):
            self.drained.set_result(None)

    def stop(self) -> asyncio.Future[None]:
        """Stop sending; the returned future completes once every echo came back."""
        self.running = False
        self.drained = asyncio.get_running_loop().create_future()
        if self.received >= self.sent * self.size:
            self.drained.set_result(None)
        return self.drained

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)


async def measure_throughput(
    port: int, proc: Any, args: argparse.Namespace, msg: bytes, window: int
) -> dict[str, Any]:
    """Messages/s over ``--duration`` and the server's CPU per message (``--connections``)."""
    loop = asyncio.get_running_loop()
    protocols: list[LoadProtocol] = []
    try:
        for _ in range(args.connections):
            _transport, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: LoadProtocol(msg, window), HOST, port), 5
            )
            protocols.append(protocol)
        size = len(msg)
        msgs, sample = await _window(
            proc, args, lambda: sum(p.received for p in protocols) // size, args.max_msgs
        )
        await asyncio.wait_for(asyncio.gather(*[p.stop() for p in protocols]), 5)
    finally:
        for p in protocols:
            if p.transport is not None:
                p.transport.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.done for p in protocols)), 2)
    if msgs == 0:
        raise RuntimeError("no message echoed in the measured window")
    sample["msgs"] = msgs
    sample["msgs_per_s"] = msgs / sample["elapsed_s"]
    sample["server_us_per_msg"] = sample.pop("server_us_per_item")
    return sample


# =============================================================================================
# Latency: one connection, one message in flight
# =============================================================================================


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("server closed the connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _round_trip(sock: socket.socket, msg: bytes) -> None:
    sock.sendall(msg)
    if _recv_exact(sock, len(msg)) != msg:
        raise RuntimeError("echo mismatch")


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def measure_latency(port: int, args: argparse.Namespace, msg: bytes) -> dict[str, Any]:
    """Ping-pong on one connection with one message in flight (blocking socket client)."""
    samples: list[int] = []
    with _connect(port) as sock:
        for _ in range(args.latency_warmup):
            _round_trip(sock, msg)
        clock = time.perf_counter_ns
        for _ in range(args.round_trips):
            start = clock()
            _round_trip(sock, msg)
            samples.append(clock() - start)
    samples.sort()

    def quantile(q: float) -> float:
        return samples[max(0, math.ceil(q * len(samples)) - 1)] / 1000

    return {"round_trips": len(samples), "p50_us": quantile(0.50), "p99_us": quantile(0.99)}


# =============================================================================================
# Idle memory: RSS per connection after a warm batch
# =============================================================================================


def _open_idle(port: int, count: int, msg: bytes) -> list[socket.socket]:
    """Open ``count`` connections, one by one, each proven accepted by one echo round trip."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _connect(port)
            socks.append(sock)
            _round_trip(sock, msg)
    except BaseException:
        _close_all(socks)
        raise
    return socks


def _close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        sock.close()


def measure_memory(port: int, proc: Any, args: argparse.Namespace, msg: bytes) -> dict[str, Any]:
    """Marginal server RSS per idle connection.

    A first batch of ``--mem-warm`` connections stays open while the next
    ``--idle-connections`` are counted: the first batch soaks up memory the server freed at
    start-up (import garbage), which would otherwise be reused and make the first
    connections look cheaper than they are.
    """
    count = args.idle_connections
    warm = _open_idle(port, args.mem_warm, msg)
    try:
        time.sleep(0.2)
        before = int(proc.memory_info().rss)
        socks = _open_idle(port, count, msg)
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
# Connection rate: connect, one echo, close; a few connections in parallel
# =============================================================================================


class _OneEcho(asyncio.Protocol):
    """Sends ``msg`` on connect; closes once it is echoed whole."""

    def __init__(self, msg: bytes, done: asyncio.Future[None]) -> None:
        self.msg, self.done, self.received = msg, done, 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.msg)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received >= len(self.msg) and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():
            return
        if self.received >= len(self.msg):
            self.done.set_result(None)
        else:
            self.done.set_exception(exc or ConnectionError("closed before the echo"))


async def measure_connect_rate(
    port: int, proc: Any, args: argparse.Namespace, msg: bytes
) -> dict[str, Any]:
    """Connections/s: ``--parallel`` workers each connect, echo ``msg`` once, close, repeat.

    A connection counts when its echo came back and it is closed. The server's CPU time over
    the window per connection is reported beside the rate.
    """
    loop = asyncio.get_running_loop()
    completed = failed = 0
    running = True

    async def worker() -> None:
        nonlocal completed, failed
        while running:
            done: asyncio.Future[None] = loop.create_future()
            try:
                await loop.create_connection(functools.partial(_OneEcho, msg, done), HOST, port)
                await asyncio.wait_for(done, 5)
                completed += 1
            except OSError:
                failed += 1

    workers = [asyncio.create_task(worker()) for _ in range(args.parallel)]
    try:
        count, sample = await _window(proc, args, lambda: completed, 1 << 62)
    finally:
        running = False
        await asyncio.wait_for(asyncio.gather(*workers, return_exceptions=True), 10)
    if count == 0:
        raise RuntimeError("no connection completed in the measured window")
    sample["connections"] = count
    sample["failed"] = failed
    sample["conns_per_s"] = count / sample["elapsed_s"]
    sample["server_us_per_conn"] = sample.pop("server_us_per_item")
    return sample
