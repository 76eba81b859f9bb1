"""Helpers for the reliable-UDP core tests: an echo server, event records, transfers."""

from __future__ import annotations

import struct
from collections.abc import Hashable

from netlib.errors import WouldBlock
from netlib.sansio.reliable.connection import (
    ConnectionEvent,
    ConnectionState,
    MessageReceived,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import ReliableServerCore
from netlib.sansio.reliable.simulation import LinkProfile, Simulation
from netlib.sansio.reliable.wire import MSG, FrameType, PacketType, encode_packet

__all__ = [
    "CLIENT",
    "ETHERNET",
    "KEY",
    "Recorder",
    "connected_pair",
    "data_packet",
    "echo",
    "number_of",
    "numbered",
    "stream_messages",
]

KEY = bytes(range(16))
ETHERNET = 1472
"""The largest UDP payload over IPv4 on Ethernet (1,500 bytes less 28 of headers): the path
MTU of the links that measure loss recovery in datagrams, as before path MTU discovery."""
CLIENT: Hashable = ("192.0.2.10", 40000)
_NUMBER = struct.Struct("!I")


def echo(conn: ReliableConnection, event: ConnectionEvent) -> None:
    """A server event handler that sends every message back on its channel."""
    if isinstance(event, MessageReceived):
        conn.send(event.data, event.channel)


class Recorder:
    """An event handler that keeps every event with its time."""

    def __init__(self) -> None:
        self.events: list[tuple[float, ConnectionEvent]] = []
        self.sim: Simulation | None = None

    def __call__(self, conn: ReliableConnection, event: ConnectionEvent) -> None:
        self.events.append((self.sim.now if self.sim else 0.0, event))

    @property
    def messages(self) -> list[bytes]:
        return [e.data for _, e in self.events if isinstance(e, MessageReceived)]


def numbered(i: int, size: int) -> bytes:
    """A message of ``size`` bytes (at least 4) that starts with its number."""
    return _NUMBER.pack(i) + bytes([i & 0xFF]) * (size - _NUMBER.size)


def number_of(message: bytes) -> int:
    return int(_NUMBER.unpack_from(message)[0])


def connected_pair(
    *,
    up: LinkProfile | None = None,
    down: LinkProfile | None = None,
    seed: int = 1,
    config: ReliableConfig | None = None,
    server_events: Recorder | None = None,
    server: ReliableServerCore | None = None,
) -> tuple[Simulation, ReliableConnection, Recorder]:
    """A simulation with one client connected; the server echoes unless given a recorder."""
    core = server or ReliableServerCore(KEY, config=config)
    client_events = Recorder()
    sim = Simulation(
        core,
        up=up,
        down=down,
        seed=seed,
        on_client_event=client_events,
        on_server_event=server_events or echo,
    )
    client_events.sim = sim
    if server_events is not None:
        server_events.sim = sim
    client = sim.connect(0x1234, CLIENT, config)
    assert sim.run(lambda: client.state is ConnectionState.ESTABLISHED, limit=sim.now + 300)
    return sim, client, client_events


def stream_messages(sim: Simulation, conn: ReliableConnection, messages: list[bytes]) -> None:
    """Send ``messages`` in order as the send buffer allows (retrying every 5 ms)."""
    queue = list(reversed(messages))

    def feed() -> None:
        while queue:
            try:
                conn.send(queue[-1])
            except WouldBlock:
                sim.at(sim.now + 0.005, feed)
                return
            queue.pop()

    sim.at(sim.now, feed)


def data_packet(conn: ReliableConnection, pn: int, *frames: tuple[int, int, bytes]) -> bytes:
    """A DATA packet to ``conn`` carrying MSG frames of ``(flags, dseq, payload)``."""
    body = b"".join(MSG.pack(FrameType.MSG, flags, dseq, len(p)) + p for flags, dseq, p in frames)
    return encode_packet(PacketType.DATA, conn.cid, pn, body)
