"""Soak (robustness row R18): mixed traffic at half of measured capacity, checked for drift.

``make soak`` runs it for 30 minutes; ``tests/test_soak.py`` runs a 2-minute version.

One server process (``--serve``) runs netlib's services on loopback, in one event loop:
a TCP echo server (line framing), a reliable-UDP echo server, a file server, a chat
server on the in-memory hub, and two chat nodes of one cluster on a nats-server it starts
(JetStream, a free loopback port). Every ``--sample`` seconds it prints one JSON line: its
RSS, open descriptors, pending tasks, calls to the loop's exception handler and log
records at ERROR level.

The driver (this process, uvloop) first measures the echo capacity (closed loop, as fast
as replies come), then offers, for ``--minutes``, echo at half the capacity, as paced
lines over ``ECHO_CONNECTIONS`` connections, every reply checked (same bytes, in order)
and its round trip recorded. A load process (``--load``, uvloop) offers the rest at the
same time, so that its own bursts (hashing a download, reading a chat line's fan-out) do
not show as the server's latency:

* connection churn: ``CHURN_RATE`` connections a second, each one echo then a close;
* reliable UDP: ``RUDP_CONNECTIONS`` connections at ``RUDP_RATE`` messages a second each;
* downloads: a ``DOWNLOAD_SIZE`` file every ``DOWNLOAD_EVERY`` seconds, SHA-256 verified;
* chat: ``CHAT_MEMBERS`` members of one room, ``CHAT_PUBLISHERS`` of them posting numbered
  lines below the flood rate; every member checks every publisher's lines arrive once and
  in order; the same again across the two cluster nodes, members and publishers spread
  over both, so every line crosses NATS to half of its readers;
* misbehaving clients, 1 % of the churn: in turn a malformed (over-long) line, a slowloris
  trickle, and a reset with a large reply pending (rows R2, R4, R9).

After the warm-up, the verdict (all must hold): RSS slope under 1 MiB per 10 minutes,
descriptors within ±5 and pending tasks within ±5 (mean of the last third of the samples
against the first third), echo p99 drift under 20 % (the median of the one-second windows'
p99 in the last third against the first third: a stall of a few milliseconds moves the
p99 of the window it falls in, not the median; counting only windows in which other
processes used at most ``QUIET_FOREIGN`` of a core: on a shared 2-core machine another
process's load moves a millisecond-scale p99 more than the soak does; with fewer than
``MIN_QUIET_WINDOWS`` quiet windows per third the drift is reported as not judged),
0 unexpected exceptions (exception-handler calls, ERROR log records, tracebacks on the
server's stderr, failures in the driver or the load process), 0 lost acknowledged
messages (echo and reliable UDP replies, downloads, chat lines on one node and across
nodes). ``--json`` prints the figures for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

import netlib

ECHO_CONNECTIONS = 16
CAPACITY_SECONDS = 3.0
LOAD_FRACTION = 0.5
CHURN_RATE = 20.0
MISBEHAVING_FRACTION = 0.01
RUDP_CONNECTIONS = 4
RUDP_RATE = 50.0
DOWNLOAD_SIZE = 4 * 1024 * 1024
DOWNLOAD_EVERY = 2.0
CHAT_MEMBERS = 12
CHAT_PUBLISHERS = 4
CHAT_RATE = 4.0  # lines a second per publisher: below the chat's flood rate (5)
MAX_OUTSTANDING = 10_000  # echo lines in flight on one connection before it counts a stall
FIRST_FRAME_TIMEOUT = 2.0  # the soak server's first-line deadline: slowloris is cut at it
RSS_SLOPE_LIMIT = 1.0  # MiB per 10 minutes
FD_TOLERANCE = 5
TASK_TOLERANCE = 5
P99_DRIFT_LIMIT = 0.20
P99_WINDOW = 1.0  # seconds of echo round trips per p99; the drift compares their medians
QUIET_FOREIGN = 0.15  # cores other processes may use in a window that judges p99 drift
MIN_QUIET_WINDOWS = 10  # quiet windows each third needs for the drift to be judged
NODES_READY_TIMEOUT = 30.0  # seconds the two cluster nodes may take to hear each other


# --- the server process ------------------------------------------------------------------


class _ErrorCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


async def _serve(root: str, sample: float) -> None:
    loop = asyncio.get_running_loop()
    exceptions = 0

    def on_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal exceptions
        exceptions += 1
        loop.default_exception_handler(context)

    loop.set_exception_handler(on_exception)
    errors = _ErrorCount()
    logging.getLogger().addHandler(errors)
    process = psutil.Process()
    with netlib.LocalNatsServer() as nats:
        async with (
            netlib.open_tcp_server(
                netlib.echo_handler, framing="line", first_frame_timeout=FIRST_FRAME_TIMEOUT
            ) as echo,
            netlib.open_reliable_udp_server(netlib.echo_handler) as rudp,
            netlib.open_file_server(root) as files,
            netlib.open_chat_server() as chat,
            netlib.open_chat_server(nats=nats.url) as node_a,
            netlib.open_chat_server(nats=nats.url) as node_b,
        ):
            nodes = (node_a, node_b)
            async with asyncio.timeout(NODES_READY_TIMEOUT):
                while not all(_nodes_heard(node) == len(nodes) for node in nodes):
                    await asyncio.sleep(0.05)  # polling the hubs' heartbeats (ready in ~0.1 s)
            ports = {
                "echo": echo.addresses[0][1],
                "rudp": rudp.addresses[0][1],
                "files": files.addresses[0][1],
                "chat": chat.tcp_addresses[0][1],
                "cluster": [node.tcp_addresses[0][1] for node in nodes],
            }
            print(json.dumps({"ports": ports, "nats_pid": nats.pid}), flush=True)
            await _sample(process, sample, echo, lambda: exceptions, errors)


def _nodes_heard(node: netlib.ChatServer) -> int:
    hub = node.service.hub
    assert isinstance(hub, netlib.NatsHub)
    return hub.statistics().nodes


async def _sample(
    process: psutil.Process,
    sample: float,
    echo: netlib.Server,
    exceptions: Callable[[], int],
    errors: _ErrorCount,
) -> None:
    while True:
        record = {
            "t": time.monotonic(),  # the same clock as the driver's (Linux)
            "rss": process.memory_info().rss,
            "fds": len(os.listdir("/proc/self/fd")),
            "tasks": len(asyncio.all_tasks()),
            "exceptions": exceptions(),
            "errors": errors.count,
            "echo": asdict(echo.statistics()),
        }
        print(json.dumps(record), flush=True)
        await asyncio.sleep(sample)  # a sampling period, not a wait for an event


# --- the driver --------------------------------------------------------------------------


@dataclass
class ChatCount:
    """One chat's lines: every member but the poster should get each one once, in order."""

    members: int = 0
    posted: int = 0
    delivered: int = 0
    irregular: int = 0  # a line out of order, duplicated or after a gap

    @property
    def missing(self) -> int:
        return self.posted * (self.members - 1) - self.delivered


@dataclass
class Tally:
    """What the driver saw; every field but the latencies must end at 0 where it says so."""

    echo_sent: int = 0
    echo_replies: int = 0
    echo_wrong: int = 0  # replies that differ from the line at the head of the queue
    echo_stalls: int = 0
    rudp_sent: int = 0
    rudp_replies: int = 0
    rudp_wrong: int = 0
    churned: int = 0
    churn_failed: int = 0
    downloads: int = 0
    downloads_failed: int = 0
    chat: ChatCount = field(default_factory=ChatCount)
    cluster_chat: ChatCount = field(default_factory=ChatCount)
    misbehaved: int = 0
    misbehaving_kept: int = 0  # misbehaving connections the server did not close
    failures: list[str] = field(default_factory=list)
    window: list[float] = field(default_factory=list)  # round trips of the current window
    window_end: float = 0.0
    windows: list[Window] = field(default_factory=list)
    cpu: Foreign | None = None

    def add_load(self, counted: dict[str, Any]) -> None:
        """Take in what the load process counted (its ``LOAD_FIELDS``)."""
        for name in LOAD_FIELDS:
            value = counted[name]
            if name in ("chat", "cluster_chat"):
                value = ChatCount(**value)
            elif name == "failures":
                value = self.failures + value
            setattr(self, name, value)

    def round_trip(self, now: float, seconds: float) -> None:
        """Record one echo round trip; every ``P99_WINDOW`` seconds keep only the p99 (and
        the CPU other processes used meanwhile)."""
        if now >= self.window_end:
            foreign = self.cpu.cores() if self.cpu is not None else 0.0
            if self.window:
                self.windows.append(Window(self.window_end, _p99(self.window), foreign))
            self.window = []
            self.window_end = now + P99_WINDOW
        self.window.append(seconds)


LOAD_FIELDS = (
    *("rudp_sent", "rudp_replies", "rudp_wrong", "churned", "churn_failed", "downloads"),
    *("downloads_failed", "chat", "cluster_chat", "misbehaved", "misbehaving_kept", "failures"),
)
"""The counts of the load process (everything but echo), reported to the driver."""


@dataclass(frozen=True)
class Window:
    end: float
    p99: float
    foreign: float  # cores used by processes other than the soak's own


class Foreign:
    """CPU used on the machine by processes other than the soak's own (server, driver,
    nats-server)."""

    def __init__(self, *pids: int) -> None:
        self.own = [psutil.Process(pid) for pid in pids] + [psutil.Process()]
        self.last = self._now()

    def _now(self) -> tuple[float, float, float]:
        total = psutil.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
        own = sum(sum(process.cpu_times()[:4]) for process in self.own)
        return time.monotonic(), busy, own

    def cores(self) -> float:
        """Cores the others used since the last call."""
        now = self._now()
        (t0, busy0, own0), self.last = self.last, now
        return max(0.0, (now[1] - busy0) - (now[2] - own0)) / max(1e-3, now[0] - t0)


class Pacer:
    """Wakes at a fixed rate, catching up without bursts beyond what was missed."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate
        self.next = time.monotonic()

    async def tick(self) -> None:
        self.next += self.interval
        delay = self.next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing: the send schedule, not a wait for an event


async def _echo_connection(
    port: int, rate: float | None, until: float, tally: Tally, record: bool
) -> int:
    """One echo connection; closed loop when ``rate`` is None. Returns replies received."""
    pending: deque[tuple[bytes, float]] = deque()
    done = asyncio.Event()
    replies = 0
    seq = 0
    async with netlib.connect_tcp("127.0.0.1", port, framing="line") as stream:

        async def send() -> None:
            nonlocal seq
            line = b"soak %d" % seq
            seq += 1
            pending.append((line, time.monotonic()))
            if record:
                tally.echo_sent += 1
            await stream.send(line)

        async def read() -> None:
            nonlocal replies
            async for reply in stream:
                line, sent = pending.popleft()
                now = time.monotonic()
                replies += 1
                if reply != line:
                    tally.echo_wrong += 1
                if record:
                    tally.echo_replies += 1
                    tally.round_trip(now, now - sent)
                if not pending and done.is_set():
                    return
                if rate is None and now < until:
                    await send()

        reader = asyncio.create_task(read())
        try:
            if rate is None:
                await send()  # one line in flight, as the paced load mostly has
                await asyncio.wait({reader}, timeout=until - time.monotonic())
            else:
                pacer = Pacer(rate)
                while time.monotonic() < until:
                    await pacer.tick()
                    if len(pending) > MAX_OUTSTANDING:
                        tally.echo_stalls += 1
                        continue
                    await send()
            done.set()
            if pending:
                await asyncio.wait_for(reader, timeout=10.0)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
    return replies


async def measure_capacity(port: int) -> float:
    """Echo replies a second with ``ECHO_CONNECTIONS`` closed-loop connections."""
    tally = Tally()
    until = time.monotonic() + CAPACITY_SECONDS
    start = time.monotonic()
    counts = await asyncio.gather(
        *(_echo_connection(port, None, until, tally, False) for _ in range(ECHO_CONNECTIONS))
    )
    return sum(counts) / (time.monotonic() - start)


async def _churn(port: int, until: float, tally: Tally) -> None:
    pacer = Pacer(CHURN_RATE)
    every = round(1 / MISBEHAVING_FRACTION)
    kinds = (_malformed, _slowloris, _reset_mid_write)
    tasks: list[asyncio.Task[None]] = []
    n = 0
    while time.monotonic() < until:
        await pacer.tick()
        n += 1
        if n % every == 0:
            kind = kinds[(n // every) % len(kinds)]
            task = asyncio.create_task(_misbehave(kind, port, tally))
        else:
            task = asyncio.create_task(_one_echo(port, tally))
        tasks.append(task)
    if tasks:
        done, late = await asyncio.wait(tasks, timeout=FIRST_FRAME_TIMEOUT + 10)
        for task in late:
            task.cancel()
            tally.failures.append("churn: a client still running 12 s after the load")
        for task in done:
            if task.exception() is not None:
                tally.failures.append(f"churn: {task.exception()!r}")


async def _one_echo(port: int, tally: Tally) -> None:
    try:
        async with netlib.connect_tcp("127.0.0.1", port, framing="line") as stream:
            await stream.send(b"churn")
            if await asyncio.wait_for(stream.receive(), 5.0) != b"churn":
                tally.churn_failed += 1
        tally.churned += 1
    except (OSError, netlib.NetlibError, TimeoutError) as exc:
        tally.churn_failed += 1
        tally.failures.append(f"churn: {exc!r}")


async def _misbehave(
    kind: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]],
    port: int,
    tally: Tally,
) -> None:
    """Run one misbehaving client; count it, and count it as kept if the server did not
    close it when it should have."""
    tally.misbehaved += 1
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if not await kind(reader, writer):
            tally.misbehaving_kept += 1
    finally:
        writer.transport.abort()


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """True when the server closes (or resets) the connection within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        pass  # a reset is a close too
    return True


async def _malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """A line over the 64 KiB limit: the server must close the connection."""
    writer.write(b"x" * (65 * 1024))
    return await _closed_by_server(reader, 5.0)


async def _slowloris(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """One byte every 0.2 s of a line that never ends: cut at the first-line deadline."""
    deadline = time.monotonic() + FIRST_FRAME_TIMEOUT + 3.0
    while time.monotonic() < deadline:
        try:
            writer.write(b"s")
            if await _closed_by_server(reader, 0.2):
                return True
        except OSError:
            return True
    return False


async def _reset_mid_write(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """Ask for 4 MiB of replies, read none, reset (the caller aborts)."""
    writer.write((b"y" * 1023 + b"\n") * 4096)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(writer.drain(), 2.0)
    sock: socket.socket = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    return True


async def _rudp(port: int, until: float, tally: Tally) -> None:
    async with netlib.connect_reliable_udp("127.0.0.1", port) as stream:
        pacer = Pacer(RUDP_RATE)
        seq = 0
        while time.monotonic() < until:
            await pacer.tick()
            message = b"rudp %d" % seq
            seq += 1
            tally.rudp_sent += 1
            await stream.send(message)
            reply = await asyncio.wait_for(stream.receive(), 10.0)
            tally.rudp_replies += 1
            if reply != message:
                tally.rudp_wrong += 1


async def _downloads(port: int, until: float, digest: bytes, tally: Tally, out: str) -> None:
    url = f"http://127.0.0.1:{port}/soak.bin"
    pacer = Pacer(1 / DOWNLOAD_EVERY)
    while time.monotonic() < until:
        await pacer.tick()
        path = os.path.join(out, "soak.bin")
        try:
            result = await netlib.download_file(url, path, resume=False)
            ok = await asyncio.to_thread(_sha256, path) == digest
            tally.downloads += 1
            if not ok or result.size != DOWNLOAD_SIZE:
                tally.downloads_failed += 1
        except (OSError, netlib.NetlibError) as exc:
            tally.downloads_failed += 1
            tally.failures.append(f"download: {exc!r}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _sha256(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


class ChatMember:
    """A raw TCP chat member that checks every publisher's numbered lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.expected: dict[int, int] = {}

    @classmethod
    async def join(cls, port: int, nick: str) -> ChatMember:
        """Connect and take ``nick``: once the server says so, the member is in the room."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"/nick %s\n" % nick.encode())
        granted = b"*** you are now known as %s\n" % nick.encode()
        async with asyncio.timeout(10.0):
            while (line := await reader.readline()) != granted:
                if not line:
                    raise ConnectionError(f"chat on port {port} closed before {nick} joined")
        return cls(reader, writer)

    async def read(self, count: ChatCount) -> None:
        while line := await self.reader.readline():
            words = line.split()
            if b"soakchat" not in words:
                continue
            at = words.index(b"soakchat")
            publisher, seq = int(words[at + 1]), int(words[at + 2])
            expected = self.expected.get(publisher)
            if expected is not None and seq != expected:
                count.irregular += 1
            self.expected[publisher] = seq + 1
            count.delivered += 1


async def _chat(ports: Sequence[int], until: float, count: ChatCount, name: str) -> None:
    """``CHAT_MEMBERS`` members spread over ``ports`` (the nodes of one chat) in turn, the
    first ``CHAT_PUBLISHERS`` of them posting."""
    members = [
        await ChatMember.join(ports[i % len(ports)], f"{name}{i}") for i in range(CHAT_MEMBERS)
    ]
    count.members = len(members)
    readers = [asyncio.create_task(m.read(count)) for m in members]
    try:

        async def publish(index: int) -> None:
            pacer = Pacer(CHAT_RATE)
            seq = 0
            writer = members[index].writer
            while time.monotonic() < until:
                await pacer.tick()
                writer.write(b"soakchat %d %d\n" % (index, seq))
                seq += 1
                count.posted += 1

        await asyncio.gather(*(publish(i) for i in range(CHAT_PUBLISHERS)))
        deadline = time.monotonic() + 10.0
        while count.missing > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # draining: the readers count; this bounds the wait
    finally:
        for member in members:
            member.writer.close()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


@dataclass
class Verdict:
    capacity: float
    offered: float
    minutes: float
    rss_slope_mib_per_10min: float
    fd_change: float
    task_change: float
    p99_first_ms: float
    p99_last_ms: float
    p99_drift: float
    p99_judged: bool
    p99_windows: int
    p99_quiet_windows: tuple[int, int]
    foreign_cores: tuple[float, float]
    unexpected_exceptions: int
    lost: int
    tally: dict[str, Any]
    samples: int
    failed: list[str]


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    return statistics.linear_regression(xs, ys).slope


def _thirds(values: Sequence[Any]) -> tuple[Sequence[Any], Sequence[Any]]:
    third = max(1, len(values) // 3)
    return values[:third], values[-third:]


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def judge(
    samples: list[dict[str, Any]],
    tally: Tally,
    warmup_end: float,
    load_end: float,
    capacity: float,
    offered: float,
    minutes: float,
    server_stderr: str,
) -> Verdict:
    kept = [s for s in samples if warmup_end <= s["t"] <= load_end]
    if len(kept) < 6:
        raise RuntimeError(f"only {len(kept)} samples after the warm-up")
    slope = _slope([(s["t"], s["rss"] / 2**20) for s in kept]) * 600
    first, last = _thirds(kept)
    fd_change = statistics.fmean(s["fds"] for s in last) - statistics.fmean(
        s["fds"] for s in first
    )
    task_change = statistics.fmean(s["tasks"] for s in last) - statistics.fmean(
        s["tasks"] for s in first
    )
    windows = [w for w in tally.windows if warmup_end <= w.end - P99_WINDOW and w.end <= load_end]
    if len(windows) < 3:
        raise RuntimeError(f"only {len(windows)} latency windows after the warm-up")
    first_w, last_w = _thirds(windows)
    quiet_first = [w.p99 for w in first_w if w.foreign <= QUIET_FOREIGN]
    quiet_last = [w.p99 for w in last_w if w.foreign <= QUIET_FOREIGN]
    judged = min(len(quiet_first), len(quiet_last)) >= MIN_QUIET_WINDOWS
    if judged:
        p99_first, p99_last = statistics.median(quiet_first), statistics.median(quiet_last)
    else:
        p99_first = statistics.median(w.p99 for w in first_w)
        p99_last = statistics.median(w.p99 for w in last_w)
    drift = (p99_last - p99_first) / p99_first
    unexpected = (
        samples[-1]["exceptions"]
        + samples[-1]["errors"]
        + server_stderr.count("Traceback")
        + len(tally.failures)
    )
    lost = (
        (tally.echo_sent - tally.echo_replies)
        + tally.echo_wrong
        + (tally.rudp_sent - tally.rudp_replies)
        + tally.rudp_wrong
        + tally.downloads_failed
        + tally.churn_failed
        + sum(chat.missing + chat.irregular for chat in (tally.chat, tally.cluster_chat))
        + tally.misbehaving_kept
    )
    failed = []
    if slope >= RSS_SLOPE_LIMIT:
        failed.append(f"RSS slope {slope:.2f} MiB per 10 min (limit {RSS_SLOPE_LIMIT})")
    if abs(fd_change) > FD_TOLERANCE:
        failed.append(f"descriptors changed by {fd_change:+.1f} (limit ±{FD_TOLERANCE})")
    if abs(task_change) > TASK_TOLERANCE:
        failed.append(f"pending tasks changed by {task_change:+.1f} (limit ±{TASK_TOLERANCE})")
    if judged and drift >= P99_DRIFT_LIMIT:
        failed.append(f"p99 drifted {drift:+.0%} (limit {P99_DRIFT_LIMIT:.0%})")
    if unexpected:
        failed.append(f"{unexpected} unexpected exceptions")
    if lost:
        failed.append(f"{lost} acknowledged messages lost or wrong")
    data = {k: v for k, v in vars(tally).items() if k not in ("window", "windows", "cpu")}
    for chat in ("chat", "cluster_chat"):
        data[chat] = asdict(data[chat])
    return Verdict(
        capacity=capacity,
        offered=offered,
        minutes=minutes,
        rss_slope_mib_per_10min=slope,
        fd_change=fd_change,
        task_change=task_change,
        p99_first_ms=p99_first * 1000,
        p99_last_ms=p99_last * 1000,
        p99_drift=drift,
        p99_judged=judged,
        p99_windows=len(windows),
        p99_quiet_windows=(len(quiet_first), len(quiet_last)),
        foreign_cores=(
            statistics.fmean(w.foreign for w in first_w),
            statistics.fmean(w.foreign for w in last_w),
        ),
        unexpected_exceptions=unexpected,
        lost=lost,
        tally=data,
        samples=len(kept),
        failed=failed,
    )


def _write_download(root: str) -> None:
    """The file the soak downloads."""
    with open(os.path.join(root, "soak.bin"), "wb") as f:
        f.write(os.urandom(DOWNLOAD_SIZE))


async def _load(ports: dict[str, Any], until: float, root: str) -> Tally:
    """Everything but the measured echo: churn and misbehaving clients, reliable UDP,
    downloads and the two chats, in a process of its own so that its bursts (a download's
    hashing, a chat line's fan-out) do not delay the driver's echo round trips."""
    tally = Tally()
    digest = await asyncio.to_thread(_sha256, os.path.join(root, "soak.bin"))
    with tempfile.TemporaryDirectory(prefix="netlib-soak-out-") as out:
        jobs = [
            _churn(ports["echo"], until, tally),
            *(_rudp(ports["rudp"], until, tally) for _ in range(RUDP_CONNECTIONS)),
            _downloads(ports["files"], until, digest, tally, out),
            _chat([ports["chat"]], until, tally.chat, "soak"),
            _chat(ports["cluster"], until, tally.cluster_chat, "node"),
        ]
        for result in await asyncio.gather(*jobs, return_exceptions=True):
            if isinstance(result, BaseException):
                tally.failures.append(f"load: {result!r}")
    return tally


async def drive(args: argparse.Namespace) -> Verdict:
    with tempfile.TemporaryDirectory(prefix="netlib-soak-") as root:
        _write_download(root)
        command = [sys.executable, __file__, "--serve", root, "--loop", args.loop]
        command += ["--sample", str(args.sample)]
        server = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert server.stdout is not None
        assert server.stderr is not None
        samples: list[dict[str, Any]] = []
        stderr = bytearray()
        try:
            first = await asyncio.wait_for(server.stdout.readline(), 30.0)
            if not first:
                await server.wait()
                error = (await server.stderr.read()).decode(errors="replace")
                raise RuntimeError(f"the soak server did not start:\n{error}")
            started = json.loads(first)
            ports = started["ports"]

            async def collect() -> None:
                assert server.stdout is not None
                while line := await server.stdout.readline():
                    samples.append(json.loads(line))

            async def errors() -> None:
                assert server.stderr is not None
                while chunk := await server.stderr.read(65536):
                    stderr.extend(chunk[: max(0, 1 << 20 - len(stderr))])

            collector = asyncio.create_task(collect())
            error_reader = asyncio.create_task(errors())
            capacity = await measure_capacity(ports["echo"])
            offered = capacity * LOAD_FRACTION
            _say(args, f"echo capacity {capacity:,.0f} replies/s; offering {offered:,.0f}/s")
            tally = Tally()
            start = time.monotonic()
            until = start + args.minutes * 60
            warmup_end = start + args.warmup * 60
            per_connection = offered / ECHO_CONNECTIONS
            command = [sys.executable, __file__, "--load", json.dumps(ports), "--root", root]
            load = await asyncio.create_subprocess_exec(
                *command, "--until", str(until), stdout=subprocess.PIPE
            )
            tally.cpu = Foreign(server.pid, started["nats_pid"], load.pid)
            jobs = [
                *(
                    _echo_connection(ports["echo"], per_connection, until, tally, True)
                    for _ in range(ECHO_CONNECTIONS)
                ),
                _progress(args, start, until, samples),
            ]
            results = await asyncio.gather(*jobs, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    tally.failures.append(f"driver: {result!r}")
            counted, _ = await asyncio.wait_for(load.communicate(), 60.0)
            if load.returncode != 0 or not counted:
                raise RuntimeError(f"the load process failed (exit {load.returncode})")
            tally.add_load(json.loads(counted))
            # one more sample after the load, so the last third ends at the end
            count = len(samples)
            while len(samples) == count:
                await asyncio.sleep(args.sample / 4)  # polling the sampler's next line
        finally:
            if server.returncode is None:
                server.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait(), 15.0)
            if server.returncode is None:
                server.kill()
                await server.wait()
        collector.cancel()
        await asyncio.gather(collector, error_reader, return_exceptions=True)
        return judge(
            samples, tally, warmup_end, until, capacity, offered, args.minutes, stderr.decode()
        )


async def _progress(
    args: argparse.Namespace, start: float, until: float, samples: list[Any]
) -> None:
    while (now := time.monotonic()) < until:
        await asyncio.sleep(min(60.0, until - now))
        if samples:
            s = samples[-1]
            _say(
                args,
                f"{(time.monotonic() - start) / 60:5.1f} min: rss {s['rss'] / 2**20:.1f} MiB, "
                f"fds {s['fds']}, tasks {s['tasks']}",
            )


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the soak")
    parser.add_argument("--warmup", type=float, default=5.0, help="minutes not judged")
    parser.add_argument("--sample", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.add_argument("--serve", metavar="ROOT", help=argparse.SUPPRESS)
    parser.add_argument("--load", metavar="PORTS", help=argparse.SUPPRESS)
    parser.add_argument("--until", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            netlib.run(_serve(args.serve, args.sample), loop=args.loop)
        return 0
    if args.load:
        tally = netlib.run(_load(json.loads(args.load), args.until, args.root), loop="uvloop")
        print(json.dumps({name: getattr(tally, name) for name in LOAD_FIELDS}, default=asdict))
        return 0
    if args.warmup >= args.minutes:
        parser.error("--warmup must be shorter than --minutes")
    verdict = netlib.run(drive(args), loop="uvloop")
    if args.json:
        print(json.dumps(asdict(verdict)))
    else:
        print(
            f"soak {verdict.minutes:g} min at {verdict.offered:,.0f} echo/s "
            f"(capacity {verdict.capacity:,.0f}/s), {verdict.samples} samples after warm-up"
        )
        print(f"  RSS slope      {verdict.rss_slope_mib_per_10min:+.3f} MiB per 10 min")
        print(f"  descriptors    {verdict.fd_change:+.1f}")
        print(f"  pending tasks  {verdict.task_change:+.1f}")
        quiet = "/".join(map(str, verdict.p99_quiet_windows))
        others = " -> ".join(f"{c:.2f}" for c in verdict.foreign_cores)
        print(
            f"  echo p99       {verdict.p99_first_ms:.2f} -> {verdict.p99_last_ms:.2f} ms "
            f"({verdict.p99_drift:+.0%}; quiet windows {quiet} of {verdict.p99_windows}, "
            f"other processes {others} cores)"
            + ("" if verdict.p99_judged else " NOT JUDGED: the machine was busy")
        )
        print(f"  unexpected     {verdict.unexpected_exceptions}")
        print(f"  lost           {verdict.lost}")
        print(f"  traffic        {verdict.tally}")
        if verdict.failed:
            print("FAIL: " + "; ".join(verdict.failed))
        else:
            print("PASS" if verdict.p99_judged else "PASS, but the p99 drift was not judged")
    return 0 if not verdict.failed else 1


if __name__ == "__main__":
    sys.exit(main())
