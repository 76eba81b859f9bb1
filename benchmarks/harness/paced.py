"""Echo peers for the paced benchmarks that are neither TCP nor netlib's endpoint: KCP's C
core, and netlib's reliable-UDP core driven inline by a bare ``DatagramProtocol``.

* ``kcp_session``, ``KcpEcho``, ``KcpClient``: the ``kcp`` package in its fastest mode
  (nodelay, 10 ms update interval, fast resend after 2 duplicate acks, no congestion
  window), flushed at once after each send and each received datagram, as low-latency KCP
  users do.
* ``CoreEcho``, ``CoreClient``: the compiled core (``ReliableServerCore``,
  ``ReliableConnection``) with nothing of ``netlib/aio/reliable.py`` around it: each
  datagram goes to the core, its messages are answered and its datagrams sent within the
  one callback, and one timer follows the core's next deadline. The floor of any adapter
  over this core: what the core itself costs a round trip.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from collections.abc import Callable
from typing import Any

from netlib.sansio.reliable.connection import ReliableConfig, ReliableConnection
from netlib.sansio.reliable.endpoint import RESCHEDULE_SLACK, ReliableServerCore
from netlib.sansio.reliable.wire import load_checksum

__all__ = [
    "KCP_INTERVAL_MS",
    "CoreClient",
    "CoreEcho",
    "KcpClient",
    "KcpEcho",
    "kcp_available",
    "kcp_session",
]

KCP_CONV = 0x4E4C
KCP_INTERVAL_MS = 10
_BURST = 32


def kcp_available() -> bool:
    """Whether the ``kcp`` package is installed (the ``bench`` extra)."""
    try:
        import kcp  # noqa: F401
    except ImportError:
        return False
    return True


def kcp_session(send: Callable[[bytes], Any]) -> Any:
    """A KCP session in its fastest mode that sends its datagrams with ``send``."""
    from kcp.extension import KCP

    session = KCP(
        KCP_CONV,
        no_delay=True,
        update_interval=KCP_INTERVAL_MS,
        resend_count=2,
        no_congestion_control=True,
        send_window_size=256,
        receive_window_size=256,
    )
    session.include_outbound_handler(lambda _kcp, data: send(data))
    return session


class KcpEcho(asyncio.DatagramProtocol):
    """A KCP echo server: a session per source address, updated every 10 ms."""

    def __init__(self) -> None:
        self.sessions: dict[Any, Any] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        asyncio.get_running_loop().call_later(KCP_INTERVAL_MS / 1000, self._tick)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.sessions.get(addr)
        if session is None:
            session = self.sessions[addr] = kcp_session(
                functools.partial(self._send_to, addr=addr)
            )
        session.receive(data)
        for message in session.get_all_received():
            session.enqueue(bytes(message))
        session.flush()

    def _send_to(self, datagram: bytes, addr: Any) -> None:
        self.transport.sendto(datagram, addr)

    def _tick(self) -> None:
        for session in self.sessions.values():
            session.update()
        asyncio.get_running_loop().call_later(KCP_INTERVAL_MS / 1000, self._tick)


class KcpClient(asyncio.DatagramProtocol):
    """A KCP client on a connected socket: ``send(message)``; each message received goes
    to ``on_message``."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        self.on_message = on_message
        self.session: Any = None
        self._tick: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.session = kcp_session(transport.sendto)  # type: ignore[attr-defined]
        self._update()

    def _update(self) -> None:
        self.session.update()
        self._tick = asyncio.get_running_loop().call_later(KCP_INTERVAL_MS / 1000, self._update)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        session = self.session
        session.receive(data)
        for message in session.get_all_received():
            self.on_message(bytes(message))
        session.flush()

    def send(self, message: bytes) -> None:
        self.session.enqueue(message)
        self.session.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._tick is not None:
            self._tick.cancel()


class _CoreTimer:
    """One loop timer at a core's next deadline, moved only when earlier or later by
    ``RESCHEDULE_SLACK`` or more (the endpoint's rule)."""

    def __init__(self, fire: Callable[[float], None]) -> None:
        self._fire = fire
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0

    def arm(self, deadline: float | None) -> None:
        if deadline is None:
            return
        if self._handle is not None:
            if 0 <= deadline - self._at < RESCHEDULE_SLACK:
                return
            self._handle.cancel()
        self._at = deadline
        self._handle = asyncio.get_running_loop().call_at(deadline, self._due)

    def _due(self) -> None:
        self._handle = None
        self._fire(max(time.monotonic(), self._at))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class CoreEcho(asyncio.DatagramProtocol):
    """netlib's server core, inline: each message received is sent back at once."""

    def __init__(self) -> None:
        load_checksum()
        self.core = ReliableServerCore(os.urandom(32), config=ReliableConfig())
        self.timer = _CoreTimer(self._timer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        core = self.core
        conn = core.datagram_received(data, addr, now)
        core.accepted()  # nothing to set up: the echo is below
        if conn is not None:
            while (event := conn.next_data()) is not None:
                if type(event) is bytes:
                    conn.send(event)
            self._send(conn, now)
        for datagram, to in core.datagrams_to_send():
            self.transport.sendto(datagram, to)
        self.timer.arm(core.next_deadline())

    def _send(self, conn: ReliableConnection, now: float) -> None:
        for datagram in conn.datagrams_to_send(now, _BURST):
            self.transport.sendto(datagram, conn.peer_address)
        self.core.schedule(conn)

    def _timer(self, now: float) -> None:
        for conn in self.core.handle_timer(now):
            self._send(conn, now)
        self.timer.arm(self.core.next_deadline())

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()


class CoreClient(asyncio.DatagramProtocol):
    """netlib's connection core, inline, on a connected socket: ``await connected``, then
    ``send(message)``; each message received goes to ``on_message``."""

    def __init__(self, on_message: Callable[[bytes], None]) -> None:
        load_checksum()
        self.on_message = on_message
        self.conn = ReliableConnection.connect(1, time.monotonic(), ReliableConfig())
        self.connected = asyncio.get_running_loop().create_future()
        self.timer = _CoreTimer(self._timer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self._send(time.monotonic())

    def datagram_received(self, data: bytes, addr: Any) -> None:
        now = time.monotonic()
        conn = self.conn
        conn.datagram_received(data, now)
        while (event := conn.next_data()) is not None:
            if type(event) is bytes:
                self.on_message(event)
            elif not self.connected.done():
                self.connected.set_result(None)  # Connected
        self._send(now)

    def send(self, message: bytes) -> None:
        self.conn.send(message)
        self._send(time.monotonic())

    def _send(self, now: float) -> None:
        for datagram in self.conn.datagrams_to_send(now, _BURST):
            self.transport.sendto(datagram)
        self.timer.arm(self.conn.next_deadline())

    def _timer(self, now: float) -> None:
        self.conn.handle_timer(now)
        self._send(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.timer.cancel()
