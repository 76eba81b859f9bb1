"""Chat fan-out benchmark: netlib's chat server against a hand-written broadcast server.

Usage::

    .venv/bin/python benchmarks/chat_fanout.py [--quick] [--runs N] [--clients 100,1000]
        [--publishers M] [--loops uvloop,asyncio] [--json FILE]

N clients sit in one room (``#lobby``); M of them are publishers. A publisher sends lines
``<pub_id> <seq> <send_time_ns>`` (``time.monotonic_ns()``, one clock for every process on
Linux); every other client receives ``[#lobby] <guestK> <pub_id> <seq> <t>`` and checks, per
publisher, that the sequence numbers arrive in order without gaps or duplicates, and records
the delivery latency. A *delivery* is one line received by one client, so one published
line makes N - 1 deliveries.

Two servers, each a separate subprocess of this script (``--serve NAME``) pinned to CPU 0,
bound to 127.0.0.1 only, on the event loop under test:

* ``baseline``  a minimal hand-written ``asyncio.Protocol``: for each received line, one
  ``transport.write(b"[#lobby] <nick> line\\n")`` to every other connection (no batching).
* ``netlib``    ``netlib.open_chat_server(service=ChatService(limits=ChatLimits(
  flood_rate=1e6, flood_burst=1_000_000)))``: flood control is opened wide for the
  benchmark (its default is 5 lines/s, burst 20), every other limit is the default.

All N clients (publishers included) live in this process, pinned to CPU 1, on uvloop. Per
(room size, loop) both servers are started and the clients connect to both; then, in one
round, each server is measured at

* saturation: each publisher keeps a bounded window of lines that a few designated
  subscribers have not yet received (``--inflight`` deliveries in flight in all), so it
  sends as fast as the server fans out; deliveries/s counted from what the clients
  actually received, server CPU time per delivery from the server process's own CPU time;
* a fixed offered rate, ``--fixed-share`` (50%) of the baseline's saturation rate measured
  in the same round, the same rate for both servers: delivery latency p50/p99.

After every phase the publishers stop and the clients drain; lines still missing then are
lost. Rounds alternate the order of the servers; the report gives medians across rounds and
the medians of the per-round ratios netlib / baseline. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import harness
import psutil

HOST = "127.0.0.1"
ROOM_PREFIX = b"[#lobby] <"
SERVER_CPU = 0
CLIENT_CPU = 1
SERVER_LIFETIME = 600  # seconds; a server subprocess never outlives this (SIGALRM)
SERVERS: dict[str, str] = {"baseline": "hand-written broadcast", "netlib": "netlib chat"}
LOOPS = ("uvloop", "asyncio")
LINE = re.compile(rb"> (\d+) (\d+) (\d+)\n")  # a publisher's line: pub_id seq send_time_ns
SMALL_READ = 4  # lines in a read up to which the client parses line by line
CONNECT_BATCH = 50  # connections opened at once
SATURATED = 0.90  # client core share above which the client, not the server, is the limit
TARGET_DELIVERIES = 200_000.0  # acceptance: netlib, 100-client room, uvloop
TARGET_RATIO = 1.5  # acceptance: netlib / baseline deliveries per second


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


class BaselineChat(asyncio.Protocol):
    """The baseline: the obvious hand-written broadcast Protocol, one write per delivery."""

    room: dict[BaselineChat, None] = {}  # noqa: RUF012  (one room per server process)
    count = 0
    transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        BaselineChat.count += 1
        nick = b"guest%d" % BaselineChat.count
        self.prefix = ROOM_PREFIX + nick + b"> "
        self.buffer = b""
        self.room[self] = None
        self.transport.write(b"*** welcome, " + nick + b"! you are in #lobby\n")

    def data_received(self, data: bytes) -> None:
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            out = self.prefix + line.rstrip(b"\r") + b"\n"
            for other in self.room:
                if other is not self:
                    other.transport.write(out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.room.pop(self, None)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(name: str, port_file: Path, profile_out: str | None) -> None:
    import netlib  # imported here so the client process stays lean

    loop = asyncio.get_running_loop()
    service: netlib.ChatService | None = None

    def print_stats() -> None:  # on SIGTERM
        if service is not None:
            stats = dataclasses.asdict(service.statistics())
            print("STATS " + json.dumps(stats), flush=True)

    profiler = harness.install_exit_handlers(loop, profile_out, print_stats)

    if name == "baseline":
        server = await loop.create_server(BaselineChat, HOST, 0)
        harness.write_port_file(port_file, server.sockets[0].getsockname()[1])
        if profiler is not None:
            profiler.enable()
        await server.serve_forever()
        return
    limits = netlib.ChatLimits(flood_rate=1e6, flood_burst=1_000_000)
    service = netlib.ChatService(limits=limits)
    async with netlib.open_chat_server(HOST, 0, service=service) as chat:
        harness.write_port_file(port_file, chat.tcp_addresses[0][1])
        if profiler is not None:
            profiler.enable()
        await chat.serve_forever()


def server_main(args: argparse.Namespace) -> None:
    import netlib

    harness.pin_server(args, SERVER_LIFETIME)
    raise_nofile()
    loop = harness.server_loop(args)
    netlib.run(_serve(args.serve, Path(args.port_file), args.profile_out), loop=loop)


# =============================================================================================
# Clients (this process)
# =============================================================================================


class Client(asyncio.Protocol):
    """One chat connection: counts and checks the publishers' lines it receives."""

    def __init__(self, room: Room) -> None:
        self.room = room
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.greeted = False
        self.lost = False
        self.acker = False
        self.received = 0
        self.next: list[int] = []  # per publisher: the next sequence number expected
        self.patterns: list[tuple[int, re.Pattern[bytes]]] = []  # publishers but itself
        self.own = -1  # its publisher id, if it is a publisher

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        room = self.room
        now = time.monotonic_ns()
        room.raw_bytes += len(data)
        if self.buffer:
            data = self.buffer + data
        end = data.rfind(b"\n") + 1
        if end < len(data):
            self.buffer = data[end:]
            if not end:
                return
        else:
            self.buffer = b""
        self.greeted = True
        expected = self.next
        got = 0
        if data.count(b"\n", 0, end) <= SMALL_READ:  # few lines: one pass, line by line
            own = self.own
            for pub_b, seq_b, time_b in LINE.findall(data, 0, end):
                pub = int(pub_b)
                if pub == own:
                    continue
                seq = int(seq_b)
                if seq == expected[pub]:
                    expected[pub] = seq + 1
                else:
                    room.irregular(expected, pub, [seq])
                got += 1
                if room.recording:
                    room.latencies.append(now - int(time_b))
            patterns: list[tuple[int, re.Pattern[bytes]]] = []
        else:
            patterns = self.patterns
        for pub, pattern in patterns:
            found: Any = pattern.findall(data, 0, end)
            if not found:
                continue
            seqs_b, times_b = zip(*found, strict=True)
            seqs = list(map(int, seqs_b))
            count = len(seqs)
            first = expected[pub]
            if seqs[0] == first and seqs == list(range(first, first + count)):
                expected[pub] = first + count
            else:
                room.irregular(expected, pub, seqs)
            got += count
            if room.recording:
                room.latencies.extend(map(now.__sub__, map(int, times_b)))
        self.received += got
        room.delivered += got
        if self.acker and room.windowed:
            room.refill()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.room.on_lost(self)


class Publisher:
    """The sending side of one client: lines ``<pub_id> <seq> <send_time_ns>``."""

    def __init__(self, client: Client, pub_id: int) -> None:
        self.client = client
        self.pub_id = pub_id
        self.seq = 0  # lines sent so far (the next sequence number)

    def send(self, count: int) -> None:
        transport = self.client.transport
        if count <= 0 or transport is None or transport.is_closing():
            return
        now = time.monotonic_ns()
        pub, first = self.pub_id, self.seq
        transport.write(
            b"".join([b"%d %d %d\n" % (pub, s, now) for s in range(first, first + count)])
        )
        self.seq = first + count


class Room:
    """N clients of one server, M of them publishers."""

    def __init__(self, name: str, port: int, clients: int, publishers: int) -> None:
        self.name = name
        self.port = port
        self.size = clients
        self.clients: list[Client] = []
        self.publishers: list[Publisher] = []
        self.ackers: list[Client] = []
        self.pub_count = publishers
        self.raw_bytes = 0
        self.delivered = 0
        self.recording = False
        self.latencies: list[int] = []
        self.windowed = False
        self.window = 1
        self.gaps = 0
        self.dups = 0
        self.lost_connections = 0

    # -- set-up ---------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()

        async def one() -> Client:
            _transport, client = await loop.create_connection(
                lambda: Client(self), HOST, self.port
            )
            return client

        for start in range(0, self.size, CONNECT_BATCH):  # within the listen backlog (100)
            batch = min(CONNECT_BATCH, self.size - start)
            clients = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(batch))), 10)
            self.clients.extend(clients)
        # publishers spread over the room; a few other clients pace the saturation window
        step = self.size / self.pub_count
        pub_index = [int(i * step) for i in range(self.pub_count)]
        self.publishers = [Publisher(self.clients[i], p) for p, i in enumerate(pub_index)]
        others = [i for i in range(self.size) if i not in pub_index]
        for i in sorted({others[0], others[len(others) // 2], others[-1]}):
            self.clients[i].acker = True
            self.ackers.append(self.clients[i])
        patterns = [(p, re.compile(b"> %d (\\d+) (\\d+)\n" % p)) for p in range(self.pub_count)]
        for i, client in enumerate(self.clients):
            own = pub_index.index(i) if i in pub_index else -1
            client.patterns = [(p, pat) for p, pat in patterns if p != own]
            client.own = own
            client.next = [0] * self.pub_count
        # wait for every welcome line, then for the join notices to stop flowing
        deadline = time.monotonic() + 30
        while not all(c.greeted for c in self.clients):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: clients not greeted after 30 s")
            await asyncio.sleep(0.02)
        before = -1
        while before != self.raw_bytes and time.monotonic() < deadline:
            before = self.raw_bytes
            await asyncio.sleep(0.2)

    def close(self) -> None:
        for client in self.clients:
            if client.transport is not None:
                client.transport.abort()

    # -- checks ---------------------------------------------------------------------------

    def irregular(self, expected: list[int], pub: int, seqs: list[int]) -> None:
        """Slow path: a gap, a duplicate or a line out of order."""
        nxt = expected[pub]
        for s in seqs:
            if s == nxt:
                nxt += 1
            elif s > nxt:
                self.gaps += s - nxt
                nxt = s + 1
            else:
                self.dups += 1
        expected[pub] = nxt

    def on_lost(self, client: Client) -> None:
        self.lost_connections += 1
        if client in self.ackers:
            self.ackers.remove(client)

    def missing(self) -> int:
        """Lines sent that a connected client has not received (yet)."""
        total = 0
        for client in self.clients:
            if client.lost:
                continue
            for pub, _pattern in client.patterns:
                total += max(0, self.publishers[pub].seq - client.next[pub])
        return total

    # -- load -----------------------------------------------------------------------------

    def refill(self) -> None:
        """Windowed sending: keep ``window`` lines per publisher not yet seen by the ackers."""
        ackers = self.ackers
        if not ackers:
            return
        window = self.window
        for pub in self.publishers:
            p = pub.pub_id
            acked = min(a.next[p] for a in ackers)
            room = window - (pub.seq - acked)
            if room > 0:
                pub.send(room)

    async def _pace(self, rate: float, stop: asyncio.Event) -> None:
        """Fixed rate: ``rate`` lines/s in all, spread evenly over the publishers."""
        loop = asyncio.get_running_loop()
        per_pub = rate / len(self.publishers)
        start = loop.time()
        base = [pub.seq for pub in self.publishers]
        while not stop.is_set():
            due = int(per_pub * (loop.time() - start))
            for pub, first in zip(self.publishers, base, strict=True):
                pub.send(first + due - pub.seq)
            await asyncio.sleep(0.001)

    async def phase(
        self, proc: Any, args: argparse.Namespace, rate: float | None
    ) -> dict[str, Any]:
        """One measurement: saturation (``rate`` None) or a fixed offered rate in lines/s."""
        self.gaps = self.dups = 0
        lost_before = self.lost_connections
        stop = asyncio.Event()
        pacer: asyncio.Task[None] | None = None
        if rate is None:
            recipients = self.size - 1
            self.window = max(2, round(args.inflight / recipients / len(self.publishers)))
            self.windowed = True
            self.refill()
        else:
            pacer = asyncio.create_task(self._pace(rate, stop))
        try:
            await asyncio.sleep(args.warmup)
            self.latencies = []
            self.recording = rate is not None
            watch = harness.CpuWatch(proc, args.cpus)
            d0, p0 = self.delivered, self.published()
            s0, c0 = harness.proc_cpu_seconds(proc), time.process_time()
            t0 = time.perf_counter()
            await asyncio.sleep(args.duration)
            t1 = time.perf_counter()
            d1, p1 = self.delivered, self.published()
            s1, c1 = harness.proc_cpu_seconds(proc), time.process_time()
            cpu = watch.stop()
            self.recording = False
        finally:
            self.windowed = False
            stop.set()
            if pacer is not None:
                await pacer
        # drain: every line sent must reach every connected client
        deadline = time.monotonic() + args.drain_timeout
        while self.missing() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        elapsed = t1 - t0
        deliveries = d1 - d0
        if deliveries <= 0:
            raise RuntimeError(f"{self.name}: no delivery in the measured window")
        result: dict[str, Any] = {
            "deliveries": deliveries,
            "elapsed_s": elapsed,
            "deliveries_per_s": deliveries / elapsed,
            "published_per_s": (p1 - p0) / elapsed,
            "server_cpu_s": s1 - s0,
            "server_us_per_delivery": (s1 - s0) * 1e6 / deliveries,
            "server_core_us_per_delivery": (cpu["core_busy"].get(SERVER_CPU) or 0.0)
            * elapsed
            * 1e6
            / deliveries,
            "server_cpu_share": (s1 - s0) / elapsed,
            "client_cpu_share": (c1 - c0) / elapsed,
            "server_core_busy": cpu["core_busy"].get(SERVER_CPU),
            "client_core_busy": cpu["core_busy"].get(CLIENT_CPU),
            "foreign_cores": cpu["foreign_cores"],
            "gaps": self.gaps,
            "dups": self.dups,
            "lost_after_drain": self.missing(),
            "disconnected": self.lost_connections - lost_before,
        }
        if rate is None:
            result["window_lines_per_pub"] = self.window
        else:
            result["offered_lines_per_s"] = rate
            result["offered_deliveries_per_s"] = rate * (self.size - 1)
            lat = sorted(self.latencies)
            self.latencies = []
            result["latency_samples"] = len(lat)
            result["p50_us"] = quantile(lat, 0.50) / 1000 if lat else None
            result["p99_us"] = quantile(lat, 0.99) / 1000 if lat else None
            result["max_us"] = lat[-1] / 1000 if lat else None
        return result

    def published(self) -> int:
        return sum(pub.seq for pub in self.publishers)


def quantile(samples: list[int], q: float) -> float:
    return float(samples[max(0, min(len(samples) - 1, int(q * len(samples))))])


# =============================================================================================
# Orchestration
# =============================================================================================


def start_server(name: str, loop: str, workdir: Path, args: argparse.Namespace) -> harness.Child:
    key = f"{name}-{loop}-{len(list(workdir.iterdir()))}"
    profile = None
    if args.profile_dir:
        profile = Path(args.profile_dir).absolute() / f"{key}.pstats"
    return harness.start_server(
        __file__, key, name, loop, workdir,
        cpu=SERVER_CPU if args.pin else None, profile_out=profile,
    )  # fmt: skip


def server_log(child: harness.Child) -> tuple[dict[str, Any] | None, str]:
    """The server's final statistics line, and the log's tail if it shows a problem."""
    text = child.log.read_text(errors="replace")
    stats = None
    for line in text.splitlines():
        if line.startswith("STATS "):
            stats = json.loads(line[6:])
    return stats, harness.log_problems(text)


async def quiet_phase(
    room: Room, proc: Any, args: argparse.Namespace, rate: float | None
) -> dict[str, Any]:
    """``room.phase``, measured again (up to ``--retries`` times, after waiting for quiet
    CPUs, within the run's ``--retry-budget``) when other processes used more than
    ``--max-foreign`` of a core on the benchmark CPUs; the least disturbed sample is kept."""
    best: dict[str, Any] | None = None
    errors = dict.fromkeys(ERRORS, 0)  # over every attempt: a bad line is never measured away
    for attempt in range(1 + args.retries):
        started = time.monotonic()
        if attempt and not await harness.wait_quiet_async(proc, args):
            break
        sample = await room.phase(proc, args, rate)
        sample["attempts"] = attempt + 1
        if attempt:
            args.retry_budget -= time.monotonic() - started
        for err in ERRORS:
            errors[err] += sample[err]
        if best is None or sample["foreign_cores"] < best["foreign_cores"]:
            best = sample
        if sample["foreign_cores"] <= args.max_foreign or args.retry_budget <= 0:
            break
    assert best is not None
    best.update(errors)
    best["disturbed"] = best["foreign_cores"] > args.max_foreign
    return best


async def measure_pair(
    ports: dict[str, int],
    procs: dict[str, Any],
    n: int,
    order: list[str],
    args: argparse.Namespace,
) -> dict[str, dict[str, Any]]:
    """Both servers of one (room size, loop), in ``order``: saturation, then fixed rate."""
    rooms = {name: Room(name, ports[name], n, args.publishers) for name in order}
    try:
        for room in rooms.values():
            await room.connect()
        results: dict[str, dict[str, Any]] = {name: {} for name in order}
        for name in order:
            sat = await quiet_phase(rooms[name], procs[name], args, None)
            results[name].update({f"sat_{k}": v for k, v in sat.items()})
            await asyncio.sleep(0.2)
        base = results["baseline"]["sat_deliveries_per_s"]
        rate = args.fixed_share * base / (n - 1)  # lines/s
        for name in order:
            fixed = await quiet_phase(rooms[name], procs[name], args, rate)
            results[name].update({f"fix_{k}": v for k, v in fixed.items()})
            await asyncio.sleep(0.2)
        return results
    finally:
        for room in rooms.values():
            room.close()
        await asyncio.sleep(0.1)


def _port(port: int) -> int:
    """The port as soon as the server wrote it (chat servers accept at once)."""
    return port


def measure_config(
    n: int, loop: str, index: int, workdir: Path, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    import uvloop

    order = list(SERVERS) if index % 2 == 0 else list(SERVERS)[::-1]
    children = {name: start_server(name, loop, workdir, args) for name in order}
    try:
        ports = {name: harness.wait_ready(child, _port) for name, child in children.items()}
        procs = {name: psutil.Process(child.proc.pid) for name, child in children.items()}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            results = runner.run(measure_pair(ports, procs, n, order, args))
    finally:
        for child in children.values():
            harness.stop_server(child, timeout=5.0)
    for name, child in children.items():
        stats, problems = server_log(child)
        if stats is not None:
            results[name]["server_stats"] = stats
        if problems:
            print(f"\n  !! server {child.name} logged problems:\n{problems}", file=sys.stderr)
            results[name]["server_log"] = problems
    return results


# ---- reporting ---------------------------------------------------------------------------

Rounds = harness.Rounds
METRICS = [
    "sat_deliveries_per_s",
    "sat_published_per_s",
    "sat_server_us_per_delivery",
    "sat_server_core_us_per_delivery",
    "sat_server_cpu_share",
    "sat_server_core_busy",
    "sat_client_cpu_share",
    "sat_client_core_busy",
    "fix_deliveries_per_s",
    "fix_server_us_per_delivery",
    "fix_p50_us",
    "fix_p99_us",
]
ERRORS = ["gaps", "dups", "lost_after_drain", "disconnected"]


def summarize(rounds: Rounds, groups: list[tuple[int, str]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for n, loop in groups:
        for name in SERVERS:
            key = f"{n}/{loop}/{name}"
            base_key = f"{n}/{loop}/baseline"
            samples = [r[key] for r in rounds if key in r]
            entry: dict[str, Any] = {"rounds": len(samples)}
            for metric in METRICS:
                entry[metric] = harness.median_or_none(
                    [s[metric] for s in samples if s.get(metric) is not None]
                )
            for metric in ("sat_deliveries_per_s", "sat_server_us_per_delivery", "fix_p50_us"):
                ratios = [
                    r[key][metric] / r[base_key][metric]
                    for r in rounds
                    if key in r and r[key].get(metric) and r[base_key].get(metric)
                ]
                entry[f"{metric}_ratio"] = harness.median_or_none(ratios)
            entry["foreign_max"] = max(
                max(s["sat_foreign_cores"], s["fix_foreign_cores"]) for s in samples
            )
            entry["disturbed"] = sum(s["sat_disturbed"] + s["fix_disturbed"] for s in samples)
            for err in ERRORS:
                entry[err] = sum(s[f"sat_{err}"] + s[f"fix_{err}"] for s in samples)
            summary[key] = entry
    return summary


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def client_bound(entry: dict[str, Any]) -> bool:
    """The client's core was full while the server process was not: the client is the limit."""
    client = entry.get("sat_client_core_busy") or 0.0
    server = entry.get("sat_server_cpu_share") or 0.0
    return client >= SATURATED and server < SATURATED


def print_table(summary: dict[str, Any]) -> None:
    head = (
        f"{'clients/loop/server':24} {'sat deliv/s':>11} {'x base':>6} {'lines/s':>8}"
        f" {'srv us/dlv':>10} {'x base':>6} {'core us':>7} {'srv CPU':>7} {'cli core':>8}"
        f" {'fixed dlv/s':>11} {'p50 us':>8} {'p99 us':>8} {'gap/dup/lost/disc':>17}"
    )
    print(head)
    print("-" * len(head))
    for key, e in summary.items():
        errors = "/".join(str(e[err]) for err in ERRORS)
        line = (
            f"{key:24} {fmt(e['sat_deliveries_per_s'], ',.0f'):>11}"
            f" {fmt(e['sat_deliveries_per_s_ratio'], '.2f'):>6}"
            f" {fmt(e['sat_published_per_s'], ',.0f'):>8}"
            f" {fmt(e['sat_server_us_per_delivery'], '.3f'):>10}"
            f" {fmt(e['sat_server_us_per_delivery_ratio'], '.2f'):>6}"
            f" {fmt(e['sat_server_core_us_per_delivery'], '.3f'):>7}"
            f" {fmt(e['sat_server_cpu_share'], '.0%'):>7}"
            f" {fmt(e['sat_client_core_busy'], '.0%'):>8}"
            f" {fmt(e['fix_deliveries_per_s'], ',.0f'):>11}"
            f" {fmt(e['fix_p50_us'], ',.0f'):>8} {fmt(e['fix_p99_us'], ',.0f'):>8}"
            f" {errors:>17}"
        )
        if client_bound(e):
            line += " C"
        if e["disturbed"]:
            line += " D"
        print(line)
    print(
        "\nsat: saturation (windowed publishers); fixed: the same offered rate for both"
        " servers, a share of the baseline's saturation in that round. x base: median of the"
        " per-round ratios netlib / baseline. srv us/dlv: server process CPU time per"
        " delivery at saturation; core us: the same from how busy the server's CPU was, with"
        " the kernel's softirq time for loopback TCP (charged to no process; includes other"
        " processes' load if any); srv CPU: its share of a core; cli core: how busy the"
        " client's CPU was (softirq included). gap/dup/lost/disc: lines skipped, duplicated"
        " or out of order, still missing after the drain, and connections lost, summed over"
        f" rounds and phases. C: client core >= {SATURATED:.0%} busy, the client may be the"
        " limit (compare srv us/dlv). D: some samples disturbed by other processes."
    )


def acceptance(
    rounds: Rounds, summary: dict[str, Any], groups: list[tuple[int, str]]
) -> list[str]:
    lines: list[str] = []
    key = "100/uvloop/netlib"
    if key in summary:
        value = summary[key]["sat_deliveries_per_s"]
        ok = value >= TARGET_DELIVERIES
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: netlib deliveries/s, 100-client room, uvloop, server"
            f" on one core: {value:,.0f} (>= {TARGET_DELIVERIES:,.0f})"
        )
    for n, loop in groups:
        entry = summary[f"{n}/{loop}/netlib"]
        ratio = entry["sat_deliveries_per_s_ratio"]
        cpu = entry["sat_server_us_per_delivery_ratio"]
        if ratio is None:
            continue
        ok = ratio >= TARGET_RATIO
        note = f"; server CPU/delivery ratio {cpu:.2f}x" if cpu is not None else ""
        bound = [name for name in SERVERS if client_bound(summary[f"{n}/{loop}/{name}"])]
        if bound:
            note += f"; client-bound: {', '.join(bound)}"
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: netlib / baseline deliveries/s, {n} clients, {loop}:"
            f" {ratio:.2f}x (>= {TARGET_RATIO}x){note}"
        )
    bad = {k: [e[err] for err in ERRORS] for k, e in summary.items() if k.endswith("/netlib")}
    total = sum(sum(v) for v in bad.values())
    lines.append(
        f"{'PASS' if total == 0 else 'FAIL'}: netlib gaps/dups/lost/disconnects = 0 in every"
        f" phase: {total} ({', '.join(f'{k}: {v}' for k, v in bad.items() if sum(v))})"
        if total
        else "PASS: netlib gaps/dups/lost/disconnects = 0 in every phase"
    )
    return lines


def bench_main(args: argparse.Namespace) -> int:
    if args.quick:
        args.warmup, args.duration = 0.3, 1.0
        args.retry_budget = min(args.retry_budget, 20.0)
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    sizes = [int(x) for x in args.clients.split(",")]
    loops = args.loops.split(",")
    if any(loop not in LOOPS for loop in loops) or min(sizes) <= args.publishers:
        raise SystemExit("--loops: uvloop,asyncio; --clients must exceed --publishers")
    raise_nofile()
    harness.pin_client(args, SERVER_CPU, CLIENT_CPU)
    info = harness.machine_info()
    groups = [(n, loop) for n in sizes for loop in loops]
    print(
        f"chat_fanout: rooms of {args.clients} clients, {args.publishers} publishers, loops"
        f" {args.loops}, {runs} rounds; {info['cpus']} CPUs ({info['cpu_model']}), Python"
        f" {info['python']}, uvloop {info['uvloop']}"
    )
    print(
        f"server on CPU {SERVER_CPU}, clients on CPU {CLIENT_CPU}"
        f"{'' if args.pin else ' (NOT pinned)'}; warm-up {args.warmup}s, window"
        f" {args.duration}s; saturation: {args.inflight:,} deliveries in flight; fixed rate"
        f" {args.fixed_share:.0%} of the baseline's saturation\n"
    )
    started = time.monotonic()
    rounds: Rounds = []
    with (
        tempfile.TemporaryDirectory(prefix="chat_fanout.") as tmp,
        harness.servers_always_killed(Path(tmp)),
    ):
        for index in range(runs):
            results: dict[str, dict[str, Any]] = {}
            for n, loop in groups:
                pair_started = time.monotonic()
                pair = measure_config(n, loop, index, Path(tmp), args)
                pair_s = time.monotonic() - pair_started
                for name in SERVERS:
                    r = pair[name]
                    results[f"{n}/{loop}/{name}"] = r
                    print(
                        f"round {index + 1}/{runs} {n:>5} clients {loop:8} {name:9}"
                        f" sat {r['sat_deliveries_per_s']:>10,.0f} dlv/s"
                        f" ({r['sat_published_per_s']:>7,.0f} lines/s)"
                        f" {r['sat_server_us_per_delivery']:6.3f} us/dlv"
                        f" srv {r['sat_server_cpu_share']:4.0%}"
                        f" (core {r['sat_server_core_busy'] or 0:4.0%})"
                        f" cli {r['sat_client_cpu_share']:4.0%}"
                        f" (core {r['sat_client_core_busy'] or 0:4.0%})"
                        f" | fixed {r['fix_deliveries_per_s']:>9,.0f} dlv/s"
                        f" p50 {fmt(r['fix_p50_us'], ',.0f'):>6} us"
                        f" p99 {fmt(r['fix_p99_us'], ',.0f'):>7} us"
                        f" | err {'/'.join(str(r[f'sat_{e}'] + r[f'fix_{e}']) for e in ERRORS)}"
                        f" foreign {max(r['sat_foreign_cores'], r['fix_foreign_cores']):.2f}"
                        f"{' DISTURBED' if r['sat_disturbed'] or r['fix_disturbed'] else ''}"
                        f"{' (retried)' if r['sat_attempts'] + r['fix_attempts'] > 2 else ''}"
                        f" [{pair_s:.0f}s]",
                        flush=True,
                    )
            rounds.append(results)
    elapsed = time.monotonic() - started
    summary = summarize(rounds, groups)
    print(f"\nmedians over {runs} rounds ({elapsed:.0f}s):\n")
    print_table(summary)
    checks = acceptance(rounds, summary, groups)
    print("\nacceptance checks (medians; ratios: median of per-round ratios):")
    for line in checks:
        print("  " + line)
    if args.json:
        data = {
            "machine": info,
            "settings": harness.settings(args, runs=runs),
            "elapsed_s": elapsed,
            "rounds": rounds,
            "summary": summary,
            "checks": checks,
        }
        harness.write_json(args.json, data)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--clients", default="100,1000", help="room sizes (100,1000)")
    p.add_argument("--publishers", type=int, default=4, help="publishers per room (4)")
    p.add_argument("--loops", default="uvloop,asyncio", help="server loops (uvloop,asyncio)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before counting (0.5)")
    p.add_argument("--duration", type=float, default=3.0, help="measured window, s (3.0)")
    p.add_argument(
        "--inflight",
        type=int,
        default=200_000,
        help="saturation: deliveries in flight in all (200000)",
    )
    p.add_argument(
        "--fixed-share",
        type=float,
        default=0.5,
        help="fixed offered rate as a share of the baseline's saturation (0.5)",
    )
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain (10)")
    harness.add_retry_args(p, 60.0, "phase")
    p.add_argument("--profile-dir", metavar="DIR", help="cProfile each server into DIR")
    # server subprocess mode
    harness.add_server_args(p, SERVERS, LOOPS)
    return p.parse_args(argv)


def main() -> int:
    return harness.run_main(parse_args(), server_main, bench_main)


if __name__ == "__main__":
    sys.exit(main())
