"""``make demo`` / ``netlib demo``: netlib's services on loopback, driven by its clients.

Starts a TCP echo server and an upper-case echo server on free loopback ports, drives them
with ``connect_tcp`` clients (one conversation, then several clients at once and one that
vanishes mid-stream), then a UDP timestamp echo server driven by ``open_udp_endpoint``
(an empty datagram included, and a flood the reply budget cuts down), prints what happened
and the servers' statistics, and stops by itself.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import netlib

__all__ = ["run_demo"]


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
    async with netlib.open_udp_server(netlib.udp_echo_handler("timestamp")) as server:
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
        clients = asyncio.gather(*(_client(_port(echo), n) for n in range(20)))
        await _vanish(_port(echo))
        print(f"  {sum(await clients)} of 2000 echoes correct")
        print("\nserver statistics:")
        _show("echo ", echo.statistics())
        _show("upper", upper.statistics())
    await _udp_demo()
    print("\nservers shut down; demo done")
