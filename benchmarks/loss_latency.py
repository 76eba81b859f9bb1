"""Round trips under real packet loss: TCP, netlib's reliable UDP and KCP, side by side.

::

    sudo .venv/bin/python benchmarks/loss_latency.py [--loss 0,1,5,10] [--count 1500]
        [--protos tcp,rudp,kcp] [--loop uvloop] [--json FILE]

Two network namespaces joined by a veth pair (``harness/netns.py``); ``iptables`` drops a
random share of the packets arriving in each, so each direction loses that share, in the
kernel. For each loss level and each protocol, an echo server starts in one namespace and
a client in the other sends a 100-byte message every 10 ms (open loop: each leaves on time,
whatever happened to the earlier ones), 1,500 messages, and measures each message's round
trip. Reported: p50 / p99 / max round trip, messages delivered, and packets on the wire
per message (both directions, from the veth counters).

* **tcp**: an asyncio ``Protocol`` that writes back what it reads (TCP_NODELAY), the
  baseline a user would write by hand; its client reads fixed 100-byte messages.
* **rudp**: ``netlib.open_reliable_udp_server(None, protocol=netlib.EchoStreamProtocol)``
  (the echo in callbacks, as ``netlib echo serve --proto rudp`` serves it, as the tcp
  server is a ``Protocol``) and ``netlib.connect_reliable_udp``.
* **kcp**: the ``kcp`` package in its fastest mode (nodelay, 10 ms update interval, fast
  resend after 2 duplicate acks, no congestion window), flushed at once after each send
  and each received datagram, as low-latency KCP users do.

Needs root, ``ip``, ``iptables`` and the ``kcp`` package (the ``bench`` extra:
``pip install -e '.[bench]'``; without it
the kcp rows are left out and said so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from harness.netns import SERVER_ADDRESS, Namespaces, check_tools, namespaces
from harness.paced import KcpClient, KcpEcho, kcp_available
from harness.tcp import RawEcho

import netlib
from netlib.sansio.reliable import core_kind

HEADER = struct.Struct("!Id")  # sequence number, send time


# -- servers ------------------------------------------------------------------------------------


async def serve(proto: str, host: str) -> None:
    loop = asyncio.get_running_loop()
    if proto == "tcp":
        server = await loop.create_server(RawEcho, host, 0)
        port = server.sockets[0].getsockname()[1]
    elif proto == "kcp":
        transport, _ = await loop.create_datagram_endpoint(KcpEcho, local_addr=(host, 0))
        port = transport.get_extra_info("sockname")[1]
    else:
        opened = netlib.open_reliable_udp_server(None, host, 0, protocol=netlib.EchoStreamProtocol)
        rudp = await opened.__aenter__()
        port = rudp.addresses[0][1]
    print(port, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()  # until terminated: a rudp server reports its counters first
    if proto not in ("tcp", "kcp"):
        stats = rudp.statistics()
        counters = {"retransmissions": stats.retransmissions}
        counters["spurious_retransmissions"] = stats.spurious_retransmissions
        counters["datagram_size"] = stats.datagram_size
        print(json.dumps(counters), flush=True)


# -- clients ------------------------------------------------------------------------------------


class _Recorder:
    """Send times and round trips of one run."""

    def __init__(self, count: int, size: int) -> None:
        self.count = count
        self.size = size
        self.rtts: dict[int, float] = {}
        self.done = asyncio.Event()

    def message(self, seq: int) -> bytes:
        return HEADER.pack(seq, time.perf_counter()).ljust(self.size, b"x")

    def echoed(self, message: bytes) -> None:
        seq, sent = HEADER.unpack_from(message)
        if seq not in self.rtts:
            self.rtts[seq] = (time.perf_counter() - sent) * 1000
        if len(self.rtts) == self.count:
            self.done.set()


async def _open_loop(recorder: _Recorder, send: Any, interval: float, linger: float) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    for seq in range(recorder.count):
        delay = start + seq * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # open loop: each message leaves at its time
        await send(recorder.message(seq))
    try:
        await asyncio.wait_for(recorder.done.wait(), linger)
    except TimeoutError:
        pass


async def client(proto: str, host: str, port: int, count: int, size: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    recorder = _Recorder(count, size)
    linger = 5.0
    counters: dict[str, int] = {}
    if proto == "tcp":
        reader, writer = await asyncio.open_connection(host, port)

        async def read() -> None:
            while True:
                recorder.echoed(await reader.readexactly(size))

        reading = asyncio.create_task(read())

        async def send_tcp(message: bytes) -> None:
            writer.write(message)

        await _open_loop(recorder, send_tcp, interval, linger)
        reading.cancel()
        writer.close()
    elif proto == "kcp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect((host, port))
        sock.setblocking(False)
        transport, kcp = await loop.create_datagram_endpoint(
            lambda: KcpClient(recorder.echoed), sock=sock
        )

        async def send_kcp(message: bytes) -> None:
            kcp.send(message)

        await _open_loop(recorder, send_kcp, interval, linger)
        transport.close()
    else:
        async with netlib.connect_reliable_udp(host, port) as stream:

            async def read_rudp() -> None:
                async for message in stream:
                    recorder.echoed(message)

            reading = asyncio.create_task(read_rudp())
            await _open_loop(recorder, stream.send, interval, linger)
            reading.cancel()
            stats = stream.extra("reliable_statistics")
            counters = {"retransmissions": stats.retransmissions}
            counters["spurious_retransmissions"] = stats.spurious_retransmissions
            counters["datagram_size"] = stats.datagram_size
    print(json.dumps({"rtts": list(recorder.rtts.values()), **counters}), flush=True)


# -- the run ------------------------------------------------------------------------------------


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(pair: Namespaces, proto: str, args: argparse.Namespace) -> dict[str, Any]:
    me = [sys.executable, __file__, "--loop", args.loop]
    server = subprocess.Popen(
        [*pair.exec(pair.server), *me, "--serve", proto], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        if not port:
            raise RuntimeError(f"the {proto} server did not start")
        before = pair.packets_sent()
        settings = ["--count", str(args.count), "--size", str(args.size)]
        settings += ["--interval", str(args.interval)]
        done = subprocess.run(
            [*pair.exec(pair.client), *me, "--client", proto, "--port", port, *settings],
            capture_output=True,
            text=True,
            timeout=args.count * args.interval + 60,
        )
        packets = pair.packets_sent() - before
        server.terminate()  # a rudp server prints its counters on SIGTERM
        rest, _ = server.communicate(timeout=10)
    finally:
        server.kill()
        server.wait(10)
    if done.returncode != 0:
        raise RuntimeError(f"the {proto} client failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.splitlines()[-1])
    rtts: list[float] = result["rtts"]
    row = {
        "proto": proto,
        "delivered": len(rtts),
        "sent": args.count,
        "p50_ms": statistics.median(rtts) if rtts else None,
        "p99_ms": _percentile(rtts, 0.99) if rtts else None,
        "max_ms": max(rtts) if rtts else None,
        "packets_per_message": packets / args.count,
    }
    if proto == "rudp":  # both sides' counters: fragments acknowledged twice (a lower bound)
        served = json.loads(rest.strip().splitlines()[-1])
        spurious = result["spurious_retransmissions"] + served["spurious_retransmissions"]
        row["retransmissions"] = result["retransmissions"] + served["retransmissions"]
        row["spurious_retransmissions"] = spurious
        row["spurious_share"] = spurious / (2 * args.count)  # of the messages, both ways
        row["datagram_size"] = max(result["datagram_size"], served["datagram_size"])
    return row


def _line(row: dict[str, Any]) -> str:
    if not row["delivered"]:
        return f"loss {row['loss_pct']:>4g}% {row['proto']:<5} delivered nothing"
    line = (
        f"loss {row['loss_pct']:>4g}% {row['proto']:<5} delivered {row['delivered']}/"
        f"{row['sent']}  p50 {row['p50_ms']:.1f} ms  p99 {row['p99_ms']:.1f} ms  "
        f"max {row['max_ms']:.1f} ms  packets/msg {row['packets_per_message']:.2f}"
    )
    if "spurious_retransmissions" in row:
        line += (
            f"  retransmitted {row['retransmissions']}, spurious"
            f" {row['spurious_retransmissions']} ({100 * row['spurious_share']:.2f}%)"
            f"  datagrams up to {row['datagram_size']} B"
        )
    return line


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="0,1,5,10", help="loss percentages each way")
    parser.add_argument("--protos", default="tcp,rudp,kcp")
    parser.add_argument("--count", type=int, default=1500)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path, help="write every row to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        netlib.run(serve(args.serve, SERVER_ADDRESS), loop=args.loop)
        return 0
    if args.client:
        coro = client(args.client, SERVER_ADDRESS, args.port, args.count, args.size, args.interval)
        netlib.run(coro, loop=args.loop)
        return 0
    problem = check_tools()
    if problem:
        print(f"loss_latency: {problem}", file=sys.stderr)
        return 2
    protos = args.protos.split(",")
    if "kcp" in protos and not kcp_available():
        print("loss_latency: the kcp package is not installed: kcp rows left out")
        protos.remove("kcp")
    print(f"reliable core: {core_kind()}")
    rows = []
    with namespaces() as pair:
        for loss in (float(x) for x in args.loss.split(",")):
            pair.set_loss(loss / 100)
            for proto in protos:
                row = {"loss_pct": loss, **measure(pair, proto, args)}
                rows.append(row)
                print(_line(row), flush=True)
    goals = check_goals(rows)
    for line in goals:
        print(line)
    if args.json:
        document = {"loop": args.loop, "core": core_kind(), "rows": rows, "goals": goals}
        args.json.write_text(json.dumps(document, indent=1))
    return 0


def check_goals(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 11's goals, each a ratio or a figure from this run's rows."""
    p99 = {(r["proto"], r["loss_pct"]): r["p99_ms"] for r in rows if r["delivered"]}
    packets = {(r["proto"], r["loss_pct"]): r["packets_per_message"] for r in rows}
    lines = []

    def goal(text: str, value: float | None, limit: float, unit: str = "") -> None:
        if value is None:
            lines.append(f"goal: {text}: not measured")
            return
        verdict = "PASS" if value <= limit else "FAIL"
        lines.append(f"goal: {text} <= {limit:g}{unit}: {verdict} {value:.2f}{unit}")

    for loss, limit in ((5.0, 20.0), (10.0, 30.0)):
        goal(f"rudp p99 at {loss:g}% loss", p99.get(("rudp", loss)), limit, " ms")
    for loss in (5.0, 10.0):
        rudp, kcp = p99.get(("rudp", loss)), p99.get(("kcp", loss))
        ratio = None if rudp is None or not kcp else rudp / kcp
        goal(f"rudp p99 / kcp p99 at {loss:g}% loss", ratio, 0.6, "x")
    for loss in (0.0, 1.0):
        rudp, tcp = p99.get(("rudp", loss)), p99.get(("tcp", loss))
        ratio = None if rudp is None or not tcp else rudp / tcp
        goal(f"rudp p99 / tcp p99 at {loss:g}% loss", ratio, 1.1, "x")
    goal("rudp packets per echoed message at 0% loss", packets.get(("rudp", 0.0)), 3.0)
    spurious = [r["spurious_share"] for r in rows if "spurious_share" in r]
    worst = 100 * max(spurious) if spurious else None
    goal("rudp spurious retransmissions, % of messages (worst loss level)", worst, 2.0, "%")
    return lines


if __name__ == "__main__":
    sys.exit(main())
