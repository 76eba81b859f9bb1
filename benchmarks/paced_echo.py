"""Paced echo on loopback: round trip and server CPU per message, server form by form.

::

    .venv/bin/python benchmarks/paced_echo.py [--count 1000] [--interval 0.01] [--rounds 3]
        [--forms tcp-protocol,tcp-handler,...] [--loop uvloop|asyncio]

A client sends a 100-byte message, waits for its echo, then for ``--interval`` (10 ms: the
cadence of ``loss_latency.py``, without its loss), ``--count`` times, against an echo server
in a process of its own. Reported per form: p50 and p99 round trip, and the server's CPU
time per echo (from ``/proc/PID/schedstat``, in ns; from ``psutil`` where there is none),
medians over the rounds, which alternate the forms in the same minutes. Ratios are to
``tcp-protocol``, measured in the same run.

Forms (the server, then the client):

* ``tcp-protocol``: an ``asyncio.Protocol`` that writes back what it reads (the baseline a
  user would write by hand); an asyncio streams client.
* ``tcp-handler``: ``netlib.open_tcp_server(netlib.echo_handler)``; the same client.
* ``tcp-callbacks``: ``netlib.open_tcp_server(None, protocol=netlib.EchoStreamProtocol)``.
* ``rudp-handler``: ``netlib.open_reliable_udp_server(netlib.echo_handler)``;
  ``netlib.connect_reliable_udp``.
* ``rudp-callbacks``: ``open_reliable_udp_server(None, protocol=netlib.EchoStreamProtocol)``.
* ``rudp-core``: the compiled reliable-UDP core on both sides, driven inline by a bare
  ``DatagramProtocol`` (``harness/paced.py``: no endpoint, transport or stream layer): the
  floor of any adapter over this core.
* ``kcp``: the ``kcp`` package's C core on both sides in its fastest mode, under the same
  kind of bare ``DatagramProtocol`` (``harness/paced.py``; needs the ``bench`` extra).

At 10 ms apart each message meets a server that was asleep, with cold caches: on a VM this
costs several times what back-to-back echoes cost (``--interval 0``), and more the more code
a message runs through. That is the latency without loss that ``loss_latency.py`` compares.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harness.paced import CoreClient, CoreEcho, KcpClient, KcpEcho, kcp_available
from harness.tcp import RawEcho

import netlib
from netlib.sansio.reliable import core_kind

FORMS = (
    "tcp-protocol",
    "tcp-handler",
    "tcp-callbacks",
    "rudp-handler",
    "rudp-callbacks",
    "rudp-core",
    "kcp",
)
DATAGRAM_FORMS = {"rudp-core": CoreEcho, "kcp": KcpEcho}
HOST = "127.0.0.1"
SIZE = 100


async def serve(form: str) -> None:
    if form == "tcp-protocol":
        server = await asyncio.get_running_loop().create_server(RawEcho, HOST, 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.Event().wait()  # until terminated
    if form in DATAGRAM_FORMS:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            DATAGRAM_FORMS[form], local_addr=(HOST, 0)
        )
        print(transport.get_extra_info("sockname")[1], flush=True)
        await asyncio.Event().wait()
    callbacks = form.endswith("callbacks")
    handler = None if callbacks else netlib.echo_handler
    protocol = netlib.EchoStreamProtocol if callbacks else None
    opener: Any = (
        netlib.open_tcp_server if form.startswith("tcp") else netlib.open_reliable_udp_server
    )
    async with opener(handler, HOST, 0, protocol=protocol) as opened:
        print(opened.addresses[0][1], flush=True)
        await asyncio.Event().wait()


async def pace(form: str, port: int, count: int, interval: float) -> list[float]:
    """Round trips in seconds, one message at a time, ``interval`` apart."""
    message = b"x" * SIZE
    rtts: list[float] = []
    clock = time.perf_counter
    if form.startswith("tcp"):
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for _ in range(count):
                sent = clock()
                writer.write(message)
                await reader.readexactly(SIZE)
                rtts.append(clock() - sent)
                await asyncio.sleep(interval)
        finally:
            writer.close()
        return rtts
    if form in DATAGRAM_FORMS:
        return await _pace_datagrams(form, port, count, interval)
    async with netlib.connect_reliable_udp(HOST, port) as stream:
        for _ in range(count):
            sent = clock()
            await stream.send(message)
            await stream.receive()
            rtts.append(clock() - sent)
            await asyncio.sleep(interval)
    return rtts


async def _pace_datagrams(form: str, port: int, count: int, interval: float) -> list[float]:
    loop = asyncio.get_running_loop()
    echoed: asyncio.Future[bytes] | None = None

    def on_message(message: bytes) -> None:
        if echoed is not None and not echoed.done():
            echoed.set_result(message)

    client = CoreClient(on_message) if form == "rudp-core" else KcpClient(on_message)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, port))
    sock.setblocking(False)
    transport, _ = await loop.create_datagram_endpoint(lambda: client, sock=sock)
    try:
        if isinstance(client, CoreClient):
            await asyncio.wait_for(client.connected, 5)
        message = b"x" * SIZE
        rtts: list[float] = []
        clock = time.perf_counter
        for _ in range(count):
            echoed = loop.create_future()
            sent = clock()
            client.send(message)
            await echoed
            rtts.append(clock() - sent)
            await asyncio.sleep(interval)
        return rtts
    finally:
        transport.close()


def cpu_seconds(pid: int) -> float:
    """The CPU time process ``pid`` has used."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)


def measure(form: str, args: argparse.Namespace) -> dict[str, float]:
    me = [sys.executable, __file__, "--loop", args.loop]
    server = subprocess.Popen([*me, "--serve", form], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        warm = netlib.run(pace(form, port, 20, 0.0), loop=args.loop)  # imports, first calls
        assert len(warm) == 20
        before = cpu_seconds(server.pid)
        rtts = netlib.run(pace(form, port, args.count, args.interval), loop=args.loop)
        cpu = cpu_seconds(server.pid) - before
    finally:
        server.kill()
        server.wait(10)
    ordered = sorted(rtts)
    return {
        "p50_us": 1e6 * statistics.median(ordered),
        "p99_us": 1e6 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "server_cpu_us": 1e6 * cpu / len(rtts),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--forms", help="default: every form (kcp where it is installed)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", type=Path, help="write every round to this file")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        netlib.run(serve(args.serve), loop=args.loop)
        return 0
    if args.forms:
        forms = args.forms.split(",")
    else:
        forms = [form for form in FORMS if form != "kcp" or kcp_available()]
        if "kcp" not in forms:
            print("paced_echo: the kcp package is not installed: the kcp form left out")
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)}; expected some of {', '.join(FORMS)}")
    if "kcp" in forms and not kcp_available():
        parser.error("the kcp form needs the kcp package: pip install -e '.[bench]'")
    print(
        f"{args.count} echoes of {SIZE} B, {1000 * args.interval:g} ms apart, {args.loop},"
        f" reliable core: {core_kind()}; {args.rounds} rounds, forms alternated"
    )
    rounds: dict[str, list[dict[str, float]]] = {form: [] for form in forms}
    for number in range(1, args.rounds + 1):
        for form in forms:
            row = measure(form, args)
            rounds[form].append(row)
            print(
                f"round {number} {form:<15} p50 {row['p50_us']:6.0f} us  p99"
                f" {row['p99_us']:6.0f} us  server CPU {row['server_cpu_us']:5.0f} us/echo",
                flush=True,
            )
    medians = {
        form: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        for form, rows in rounds.items()
    }
    base = medians.get("tcp-protocol")
    print(f"\nmedians over {args.rounds} rounds" + (", ratio to tcp-protocol" if base else ""))
    for form, m in medians.items():
        line = f"{form:<15} p50 {m['p50_us']:6.0f} us  p99 {m['p99_us']:6.0f} us  server CPU"
        line += f" {m['server_cpu_us']:5.0f} us/echo"
        if base:
            line += (
                f"   ({m['p50_us'] / base['p50_us']:.2f}x, {m['p99_us'] / base['p99_us']:.2f}x,"
                f" {m['server_cpu_us'] / base['server_cpu_us']:.2f}x)"
            )
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
