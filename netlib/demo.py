"""``make demo`` / ``netlib demo``: netlib's services on loopback, driven by its clients.

Starts a TCP echo server and an upper-case echo server on free loopback ports, drives them
with ``connect_tcp`` clients (one conversation, then several clients at once and one that
vanishes mid-stream), then a UDP timestamp echo server driven by ``open_udp_endpoint``
(an empty datagram included, and a flood the reply budget cuts down), then a short scripted
chat between two TCP clients and a UDP client sharing one room, then a chat cluster (a
nats-server with JetStream and two chat servers on it, with a client on each; skipped, in
one line, when nats-server or nats-py is not installed), a file download (a generated file
served by netlib's file server and fetched by its client, with a progress bar on a
terminal, verified against the server's SHA-256), and last a short speed test of TCP, UDP
and reliable UDP side by side. It prints what happened and the servers' statistics, and
stops by itself.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any, Final

import netlib
from netlib.cli.files import ProgressBar

__all__ = ["DEMO_FILE_SIZE", "run_demo"]

DEMO_FILE_SIZE: Final = 8 * 1024 * 1024
"""Bytes of the file the demo serves and downloads."""


def _port(server: netlib.Server) -> int:
    port: int = server.addresses[0][1]
    return port


async def _conversation(port: int, messages: list[bytes]) -> None:
    async with netlib.connect_tcp("127.0.0.1", port, framing="line") as stream:
        for message in messages:
            await stream.send(message)
            reply = await stream.receive()
            print(f"  > {message.decode():<28} < {reply.decode()}")


async def _client(port: int, n: int) -> int:
    async with netlib.connect_tcp("127.0.0.1", port, framing="line") as stream:
        for i in range(100):
            await stream.send(b"client %d message %d" % (n, i))
        replies = [await stream.receive() for _ in range(100)]
    return sum(reply == b"client %d message %d" % (n, i) for i, reply in enumerate(replies))


async def _vanish(port: int) -> None:
    """Send half a line, then reset the connection without a goodbye."""
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"half a line with no end")
    await writer.drain()
    sock: Any = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _show(name: str, stats: netlib.ServerStatistics) -> None:
    counts = ("accepted", "resets", "protocol_errors", "handler_errors")
    print(f"  {name}: " + " ".join(f"{c}={getattr(stats, c)}" for c in counts))


async def _udp_demo() -> None:
    async with netlib.open_udp_server(netlib.make_udp_echo_handler("timestamp")) as server:
        host, port = server.addresses[0][:2]
        print(f"\nUDP timestamp echo server on {host}:{port}")
        async with netlib.open_udp_endpoint(host, port) as endpoint:
            for message in [b"hello", b"datagrams keep their boundaries", b""]:
                reply = await endpoint.request(message, timeout=1.0)
                shown = message.decode() or "(empty datagram)"
                print(f"  > {shown:<32} < {reply.decode()}")
            print("\n1000 datagrams from one address as fast as it can send them:")
            for _ in range(10):
                for _ in range(100):
                    await endpoint.send(b"flood")
                await asyncio.sleep(0.01)  # pace the batches so the kernel buffer holds them
        stats = server.statistics()
        print(
            f"  handled={stats.handled} replies={stats.budget.replies_allowed} "
            f"dropped by the per-address reply budget={stats.budget.replies_dropped}"
        )


class _ChatUser:
    """A scripted chat client over TCP (as ``nc`` would be) or UDP."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.endpoint: netlib.DatagramEndpoint | None = None

    async def say(self, line: str) -> None:
        print(f"  {self.name:>5} types: {line}")
        if self.writer is not None:
            self.writer.write(line.encode() + b"\n")
        elif self.endpoint is not None:
            await self.endpoint.send(line.encode())

    async def sees(self, fragment: str) -> None:
        while True:
            if self.reader is not None:
                raw = await asyncio.wait_for(self.reader.readline(), 2.0)
            else:
                assert self.endpoint is not None
                raw, _addr = await asyncio.wait_for(self.endpoint.receive(), 2.0)
            line = raw.decode().rstrip()
            if fragment in line:
                print(f"  {self.name:>5} sees:  {line}")
                return


async def _tcp_user(name: str, port: int) -> _ChatUser:
    user = _ChatUser(name)
    user.reader, user.writer = await asyncio.open_connection("127.0.0.1", port)
    await user.sees("*** welcome")
    return user


async def _chat_demo() -> None:
    async with netlib.open_chat_server(proto="both") as server:
        port = server.tcp_addresses[0][1]
        print(f"\nchat server on 127.0.0.1:{port} (tcp and udp, one set of rooms)")
        alice, bob = await _tcp_user("alice", port), await _tcp_user("bob", port)
        await alice.say("/nick alice")
        await alice.sees("you are now known as alice")
        await bob.say("/nick bob")
        await alice.sees("is now known as bob")
        async with netlib.open_udp_endpoint(*server.udp_addresses[0][:2]) as endpoint:
            carol = _ChatUser("carol")
            carol.endpoint = endpoint
            # join: a cookie round trip; the server answers no hello smaller than its reply
            hello = await endpoint.request(b"/hello".ljust(32), timeout=1.0)
            await endpoint.send(b"/hello " + hello.split()[-1])
            await carol.sees("*** welcome")
            await carol.say("/nick carol")
            await bob.sees("is now known as carol")
            await alice.say("hi everyone")
            await bob.sees("<alice> hi everyone")
            await carol.sees("<alice> hi everyone")
            await carol.say("hello from udp")
            await alice.sees("<carol> hello from udp")
            await bob.say("/msg alice psst, over here")
            await alice.sees("-bob- psst")
            await alice.say("/quit see you")
            await carol.sees("alice quit")
        for user in (alice, bob):
            assert user.writer is not None
            user.writer.close()
        stats = server.service.statistics()
        print(f"  sessions opened={stats.opened} lines={stats.lines_received}")


def _demo_file(tmp: str) -> tuple[Path, bytes]:
    """The directory served, holding ``demo.bin`` (``DEMO_FILE_SIZE`` generated bytes)."""
    data = random.Random(12).randbytes(DEMO_FILE_SIZE)
    root = Path(tmp, "served")
    root.mkdir()
    (root / "demo.bin").write_bytes(data)
    return root, data


async def _files_demo() -> None:
    """A generated file served by netlib's file server on loopback, downloaded by its client
    with a progress bar (on a terminal, where the finished bar stays, showing the size and
    the rate; elsewhere nothing is drawn), verified against the server's SHA-256."""
    with tempfile.TemporaryDirectory(prefix="netlib-demo-") as tmp:
        root, data = await asyncio.to_thread(_demo_file, tmp)
        async with netlib.open_file_server(root) as server:
            host, port = server.addresses[0][:2]
            mib = DEMO_FILE_SIZE / 2**20
            print(
                f"\nfile server on {host}:{port}; netlib's client downloads an {mib:g} MiB file:"
            )
            path = os.path.join(tmp, "demo.bin")
            with ProgressBar("demo.bin", transient=False) as bar:
                result = await netlib.download_file(
                    server.url + "demo.bin", path, progress=bar.update
                )
            stats = server.statistics()
        same = await asyncio.to_thread(Path(path).read_bytes) == data
    digest = result.sha256 or ""
    verified = "verified" if result.verified else "NOT verified"
    print(
        f"  saved {result.size} bytes in {result.seconds:.2f}s; SHA-256 {digest[:16]}... "
        f"{verified} against the server's Repr-Digest"
    )
    print(
        f"  identical to the file served: {same}; file server: requests={stats.requests} "
        f"bytes_sent={stats.bytes_sent}"
    )


async def _cluster_demo() -> None:
    """Two chat servers sharing one chat through NATS JetStream, a client on each."""
    try:
        nats = netlib.LocalNatsServer()
        nats.start()
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"\nchat cluster: skipped ({exc})")
        return
    try:
        async with (
            netlib.open_chat_server(nats=nats.url) as one,
            netlib.open_chat_server(nats=nats.url) as two,
        ):
            ports = one.tcp_addresses[0][1], two.tcp_addresses[0][1]
            print(f"\nchat cluster: nats-server (JetStream) on {nats.url}, chat servers on")
            print(f"  127.0.0.1:{ports[0]} and 127.0.0.1:{ports[1]}, one chat between them")
            alice, bob = await _tcp_user("alice", ports[0]), await _tcp_user("bob", ports[1])
            await alice.say("/nick alice")
            await bob.sees("is now known as alice")
            await bob.say("/nick bob")
            await alice.sees("is now known as bob")
            await alice.say("hello from the first server")
            await bob.sees("<alice> hello from the first server")
            await bob.say("/who")
            await bob.sees("*** #lobby (2 members)")
            await bob.say("/msg alice and this is the second")
            await alice.sees("-bob- and this is the second")
            for user in (alice, bob):
                assert user.writer is not None
                user.writer.close()
            hub = one.service.hub
            if isinstance(hub, netlib.NatsHub):
                stats = hub.statistics()
                print(f"  first server: lines published={stats.published} read={stats.received}")
    except (netlib.ServiceUnavailable, ModuleNotFoundError) as exc:
        print(f"\nchat cluster: skipped ({exc})")
    finally:
        nats.close()


async def run_demo() -> None:
    """Run the demo and print a transcript."""
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(f"netlib {netlib.__version__} demo on {loop_name}")
    async with (
        netlib.open_tcp_server(netlib.echo_handler, framing="line") as echo,
        netlib.open_tcp_server(netlib.upper_echo_handler, framing="line") as upper,
    ):
        print(f"\nTCP echo server on 127.0.0.1:{_port(echo)}")
        await _conversation(_port(echo), [b"hello", b"sticky packets stay apart"])
        print(f"\nTCP upper-case echo server on 127.0.0.1:{_port(upper)}")
        await _conversation(_port(upper), [b"hello", b"shout it"])
        print("\n20 clients at once, 100 messages each, while one client vanishes mid-line:")
        async with asyncio.TaskGroup() as clients:  # an interrupt cancels and awaits them all
            correct = [clients.create_task(_client(_port(echo), n)) for n in range(20)]
            await _vanish(_port(echo))
        print(f"  {sum(task.result() for task in correct)} of 2000 echoes correct")
        print("\nserver statistics:")
        _show("echo ", echo.statistics())
        _show("upper", upper.statistics())
    await _udp_demo()
    await _chat_demo()
    await _cluster_demo()
    await _files_demo()
    await _speedtest_demo()
    print("\nservers shut down; demo done")


SPEEDTEST_SECONDS = 0.25
"""Seconds each protocol sends for in the demo's speed test."""


async def _speedtest_demo() -> None:
    """Last: a speed test of each protocol on loopback (the table of ``netlib speedtest``)."""
    async with netlib.open_speedtest_server(shutdown_grace=0.2) as server:
        port = server.addresses[0][1]
        print(
            f"\nlast, a speed test on 127.0.0.1:{port}, {SPEEDTEST_SECONDS:g} s per protocol "
            "(client and server in this one process):"
        )
        results = [
            await netlib.run_speedtest(
                "127.0.0.1", port, protocol=protocol, duration=SPEEDTEST_SECONDS
            )
            for protocol in ("tcp", "udp", "rudp")
        ]
    print(netlib.format_speedtest_results(results))
