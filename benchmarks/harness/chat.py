"""Chat fan-out load: N clients in one room, M of them publishers, checked line by line.

A publisher sends lines ``<pub_id> <seq> <send_time_ns>`` (``time.monotonic_ns()``, one
clock for every process on Linux); every other client receives ``[#lobby] <guestK> <pub_id>
<seq> <t>`` and checks, per publisher, that the sequence numbers arrive in order without
gaps or duplicates, and records the delivery latency. A *delivery* is one line received by
one client. All clients live in the benchmark's process, on uvloop. A phase is either
saturation (each publisher keeps a bounded window of lines that a few designated
subscribers have not yet received) or a fixed offered rate; after every phase the
publishers stop and the clients drain, and lines still missing then are lost.

A room may span the nodes of a chat cluster: given several ports, client ``i`` connects to
node ``i % len(ports)``, and the latency of a line is recorded apart when the publisher's
node is not the receiver's (a *cross-node* delivery) and reported as ``cross_*`` beside
the *same-node* ``same_*``. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from harness import CpuWatch, proc_cpu_seconds, wait_quiet_async
from harness.bench import CLIENT_CPU, HOST, SERVER_CPU

__all__ = ["ERRORS", "measure_pair"]

ERRORS = ["gaps", "dups", "lost_after_drain", "disconnected"]
LINE = re.compile(rb"> (\d+) (\d+) (\d+)\n")  # a publisher's line: pub_id seq send_time_ns
SMALL_READ = 4  # lines in a read up to which the client parses line by line
CONNECT_BATCH = 50  # connections opened at once


class Client(asyncio.Protocol):
    """One chat connection: counts and checks the publishers' lines it receives."""

    def __init__(self, room: Room, node: int = 0) -> None:
        self.room = room
        self.node = node  # index of the port (the cluster node) it is connected to
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.greeted = False
        self.lost = False
        self.acker = False
        self.received = 0
        self.next: list[int] = []  # per publisher: the next sequence number expected
        self.patterns: list[tuple[int, re.Pattern[bytes]]] = []  # publishers but itself
        self.own = -1  # its publisher id, if it is a publisher
        self.cross: list[bool] = []  # per publisher: on another node than this client

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
                    lats = room.cross_latencies if self.cross[pub] else room.latencies
                    lats.append(now - int(time_b))
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
                lats = room.cross_latencies if self.cross[pub] else room.latencies
                lats.extend(map(now.__sub__, map(int, times_b)))
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
    """N clients of one server (or spread over the nodes of a cluster), M of them publishers.

    ``port``: the server's port, or the ports of the cluster's nodes (client ``i`` on node
    ``i % len(ports)``). ``max_window``: the most lines per publisher the saturation window
    may hold (default: ``--inflight`` alone sets it).
    """

    def __init__(
        self,
        name: str,
        port: int | Sequence[int],
        clients: int,
        publishers: int,
        max_window: int | None = None,
    ) -> None:
        self.name = name
        self.ports = [port] if isinstance(port, int) else list(port)
        self.max_window = max_window
        self.size = clients
        self.clients: list[Client] = []
        self.publishers: list[Publisher] = []
        self.ackers: list[Client] = []
        self.pub_count = publishers
        self.raw_bytes = 0
        self.delivered = 0
        self.recording = False
        self.latencies: list[int] = []  # same-node deliveries (every one, on one server)
        self.cross_latencies: list[int] = []  # publisher and receiver on different nodes
        self.windowed = False
        self.window = 1
        self.gaps = 0
        self.dups = 0
        self.lost_connections = 0

    # -- set-up ---------------------------------------------------------------------------

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()

        async def one(i: int) -> Client:
            node = i % len(self.ports)
            _transport, client = await loop.create_connection(
                lambda: Client(self, node), HOST, self.ports[node]
            )
            return client

        for start in range(0, self.size, CONNECT_BATCH):  # within the listen backlog (100)
            batch = range(start, min(start + CONNECT_BATCH, self.size))
            clients = await asyncio.wait_for(asyncio.gather(*(one(i) for i in batch)), 10)
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
            client.cross = [pub.client.node != client.node for pub in self.publishers]
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
            if self.max_window is not None:
                self.window = min(self.window, self.max_window)
            self.windowed = True
            self.refill()
        else:
            pacer = asyncio.create_task(self._pace(rate, stop))
        try:
            await asyncio.sleep(args.warmup)
            self.latencies.clear()
            self.cross_latencies.clear()
            self.recording = rate is not None
            watch = CpuWatch(proc, args.cpus)
            d0, p0 = self.delivered, self.published()
            s0, c0 = proc_cpu_seconds(proc), time.process_time()
            t0 = time.perf_counter()
            await asyncio.sleep(args.duration)
            t1 = time.perf_counter()
            d1, p1 = self.delivered, self.published()
            s1, c1 = proc_cpu_seconds(proc), time.process_time()
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
            same, cross = sorted(self.latencies), sorted(self.cross_latencies)
            self.latencies.clear()
            self.cross_latencies.clear()
            lat = sorted(same + cross) if cross else same
            result["latency_samples"] = len(lat)
            result["p50_us"] = quantile(lat, 0.50) / 1000 if lat else None
            result["p99_us"] = quantile(lat, 0.99) / 1000 if lat else None
            result["max_us"] = lat[-1] / 1000 if lat else None
            if len(self.ports) > 1:
                for kind, found in (("same", same), ("cross", cross)):
                    result[f"{kind}_samples"] = len(found)
                    for q, name in ((0.50, "p50"), (0.99, "p99")):
                        value = quantile(found, q) / 1000 if found else None
                        result[f"{kind}_{name}_us"] = value
                    result[f"{kind}_max_us"] = found[-1] / 1000 if found else None
        return result

    def published(self) -> int:
        return sum(pub.seq for pub in self.publishers)


def quantile(samples: list[int], q: float) -> float:
    return float(samples[max(0, min(len(samples) - 1, int(q * len(samples))))])


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
        if attempt and not await wait_quiet_async(proc, args):
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
    ports: Mapping[str, int | Sequence[int]],
    procs: dict[str, Any],
    n: int,
    order: list[str],
    args: argparse.Namespace,
    *,
    max_window: int | None = None,
    fixed_rate: Callable[[dict[str, dict[str, Any]]], float] | None = None,
) -> dict[str, dict[str, Any]]:
    """Both servers of one (room size, loop), in ``order``: saturation, then fixed rate.

    The fixed rate, in deliveries/s, is ``fixed_rate(results)`` of the saturation results
    (default: ``--fixed-share`` of the ``baseline`` server's). ``max_window``: see ``Room``.
    """
    rooms = {name: Room(name, ports[name], n, args.publishers, max_window) for name in order}
    try:
        for room in rooms.values():
            await room.connect()
        results: dict[str, dict[str, Any]] = {name: {} for name in order}
        for name in order:
            sat = await quiet_phase(rooms[name], procs[name], args, None)
            results[name].update({f"sat_{k}": v for k, v in sat.items()})
            await asyncio.sleep(0.2)
        if fixed_rate is None:
            deliveries = args.fixed_share * results["baseline"]["sat_deliveries_per_s"]
        else:
            deliveries = fixed_rate(results)
        rate = deliveries / (n - 1)  # lines/s
        for name in order:
            fixed = await quiet_phase(rooms[name], procs[name], args, rate)
            results[name].update({f"fix_{k}": v for k, v in fixed.items()})
            await asyncio.sleep(0.2)
        for r in results.values():  # what the runner's report and rounds read
            for share in ("server_cpu_share", "client_cpu_share", "client_core_busy"):
                r[share] = r[f"sat_{share}"]
            r["disturbed"] = r["sat_disturbed"] or r["fix_disturbed"]
            r["attempts"] = max(r["sat_attempts"], r["fix_attempts"])
            r["foreign_cores"] = max(r["sat_foreign_cores"], r["fix_foreign_cores"])
            for err in ERRORS:
                r[err] = r[f"sat_{err}"] + r[f"fix_{err}"]
        return results
    finally:
        for room in rooms.values():
            room.close()
        await asyncio.sleep(0.1)
