"""Tools for testing networked programs: impairment proxies on real sockets, and a seeded
lossy link on a virtual clock.

* ``open_udp_proxy`` / ``open_tcp_proxy``: a proxy in front of any server (netlib's or
  not) that loses, duplicates, delays, reorders and corrupts what passes, reproducibly for
  a seed; ``netlib proxy`` runs one from the shell.
* ``LinkProfile``, ``LossyLink``, ``SplitMix64``, ``Simulation``: the same link without
  sockets, for tests in virtual time (see ``netlib.sansio.reliable.simulation``).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from netlib.aio.proxy import (
    DEFAULT_PROXY_CLIENTS,
    DEFAULT_PROXY_IDLE,
    LinkCounts,
    ProxyStatistics,
    TcpImpairmentProxy,
    UdpImpairmentProxy,
)
from netlib.aio.sockets import bind
from netlib.sansio.reliable.simulation import LinkProfile, LossyLink, Simulation, SplitMix64

__all__ = [
    "LinkCounts",
    "LinkProfile",
    "LossyLink",
    "ProxyServer",
    "ProxyStatistics",
    "Simulation",
    "SplitMix64",
    "open_tcp_proxy",
    "open_udp_proxy",
]


@dataclass
class ProxyServer:
    """A running impairment proxy.

    Attributes:
        addresses: where clients connect (the listening socket's address).
        target: where the traffic goes.
        statistics: a snapshot of what the proxy did (``ProxyStatistics``).
    """

    addresses: list[Any]
    target: tuple[str, int]
    statistics: Callable[[], ProxyStatistics]


async def _target(host: str, port: int, kind: int) -> tuple[int, tuple[str, int]]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=kind)
    family, _type, _proto, _name, address = infos[0]
    return family, (str(address[0]), int(address[1]))


@asynccontextmanager
async def open_udp_proxy(
    target_host: str,
    target_port: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    up: LinkProfile | None = None,
    down: LinkProfile | None = None,
    seed: int = 1,
    max_clients: int = DEFAULT_PROXY_CLIENTS,
    idle_timeout: float = DEFAULT_PROXY_IDLE,
) -> AsyncIterator[ProxyServer]:
    """Forward UDP datagrams from ``host``:``port`` to the target and back, through links.

    Args:
        target_host, target_port: the server behind the proxy.
        host, port: where the proxy listens (port 0: a free one, see ``addresses``).
        up: what happens to datagrams from clients to the target (default: delivered at
            once); down: from the target to clients (default: the same as ``up``).
        seed: seeds both links: the same seed drops the same datagrams.
        max_clients: client addresses served at once; datagrams from more are dropped.
        idle_timeout: seconds of silence after which a client address is forgotten.
    """
    loop = asyncio.get_running_loop()
    up = up or LinkProfile(delay=0.0)
    family, target = await _target(target_host, target_port, socket.SOCK_DGRAM)
    listen_family, listen = await _target(host, port, socket.SOCK_DGRAM)
    sock = socket.socket(listen_family, socket.SOCK_DGRAM)
    try:
        bind(sock, listen)
    except BaseException:
        sock.close()
        raise
    proxy = UdpImpairmentProxy(
        target,
        family,
        up,
        down or up,
        seed=seed,
        max_clients=max_clients,
        idle_timeout=idle_timeout,
    )
    transport, _ = await loop.create_datagram_endpoint(lambda: proxy, sock=sock)
    try:
        yield ProxyServer([transport.get_extra_info("sockname")], target, proxy.statistics)
    finally:
        proxy.close()


def _packet_effects(profile: LinkProfile) -> list[str]:
    """What ``profile`` does to packets that a TCP stream cannot suffer (their knobs
    that only refine those, such as ``burst`` or ``late_delay``, left out)."""
    effects = {
        "loss": profile.loss,
        "duplication": profile.duplicate,
        "reordering": profile.late,
        "corruption": profile.corrupt,
        "blackholes": profile.blackhole,
        "a bandwidth limit": profile.bandwidth,
        "an MTU": profile.mtu is not None or profile.mtu_after is not None,
    }
    return [name for name, value in effects.items() if value]


@asynccontextmanager
async def open_tcp_proxy(
    target_host: str,
    target_port: int,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    up: LinkProfile | None = None,
    down: LinkProfile | None = None,
    seed: int = 1,
) -> AsyncIterator[ProxyServer]:
    """Forward TCP connections from ``host``:``port`` to the target, delaying what flows.

    Only ``delay`` and ``jitter`` of the profiles apply (the order of bytes is kept): a TCP
    stream has no datagrams to lose; loss below TCP needs packet loss in the kernel.

    Raises:
        ValueError: a profile asks for loss, duplication, reordering, corruption,
            blackholes or a bandwidth limit.
    """
    up = up or LinkProfile(delay=0.0)
    down = down or up
    for profile in (up, down):
        if asked := _packet_effects(profile):
            raise ValueError(
                f"a TCP proxy can only delay (delay, jitter), not {', '.join(asked)}: loss,"
                " duplication, reordering and corruption happen to packets, below TCP"
            )
    loop = asyncio.get_running_loop()
    _family, target = await _target(target_host, target_port, socket.SOCK_STREAM)
    proxy = TcpImpairmentProxy(target, up, down, seed=seed)
    server = await loop.create_server(proxy.client_connected, host, port)
    try:
        yield ProxyServer([s.getsockname() for s in server.sockets], target, proxy.statistics)
    finally:
        server.close()
        proxy.close()
        await server.wait_closed()
