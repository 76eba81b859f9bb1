"""connect_tcp (a message stream to a TCP, Unix or TLS server) and open_udp_endpoint.

A connect that is cancelled or times out leaves no socket behind: asyncio closes the
socket it was connecting, and once a transport exists netlib aborts it before re-raising.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import ssl as _ssl
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from netlib.aio.datagram import (
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DatagramEndpointProtocol,
    DatagramLimits,
)
from netlib.aio.sockets import (
    DEFAULT_MAX_DATAGRAM,
    DatagramSocketOptions,
    datagram_peers,
    open_datagram_socket,
    remove_socket_file,
)
from netlib.aio.stream import StreamProtocol
from netlib.sansio.framing import Framing, framing_from_name
from netlib.sansio.stream import (
    DEFAULT_READ_LIMIT,
    DEFAULT_WRITE_HIGH,
    DEFAULT_WRITE_LOW,
    StreamLimits,
)
from netlib.streams import DEFAULT_CLOSE_TIMEOUT, DatagramEndpoint, MessageStream

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "connect_tcp", "open_udp_endpoint"]

DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds to establish a connection, TLS handshake included."""


@asynccontextmanager
async def connect_tcp(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    path: str | None = None,
    framing: Framing | str = "raw",
    ssl: _ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    idle_timeout: float | None = None,
    write_high: int = DEFAULT_WRITE_HIGH,
    write_low: int = DEFAULT_WRITE_LOW,
    read_limit: int = DEFAULT_READ_LIMIT,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> AsyncIterator[MessageStream]:
    """Connect to ``host``:``port`` (or the Unix socket ``path``) and yield a stream.

    Args:
        host, port: the server's address.
        path: connect to a Unix domain socket instead.
        framing: ``"raw"``, ``"line"``, ``"length"`` or a ``Framing`` object.
        ssl: a client ``SSLContext`` for TLS (``ssl.create_default_context()``).
        server_hostname: the name to check the certificate against (default ``host``).
        connect_timeout: seconds for the connection and TLS handshake.
        idle_timeout: seconds without traffic before the connection is closed (None: never).
        write_high, write_low, read_limit: flow-control limits, as for ``open_tcp_server``.
        close_timeout: seconds the close waits for sent data to drain before aborting.

    Raises:
        TimeoutError: the connection was not established within ``connect_timeout``.
        OSError: the connection failed (``ConnectionRefusedError``, name resolution, ...).
    """
    loop = asyncio.get_running_loop()
    chosen = framing_from_name(framing)
    limits = StreamLimits(
        idle_timeout=idle_timeout,
        write_high=write_high,
        write_low=write_low,
        read_limit=read_limit,
    )
    protocol = StreamProtocol(chosen, limits)
    try:
        async with asyncio.timeout(connect_timeout):
            if path is not None:
                await loop.create_unix_connection(
                    lambda: protocol, path, ssl=ssl, server_hostname=server_hostname
                )
            else:
                await loop.create_connection(
                    lambda: protocol, host, port, ssl=ssl, server_hostname=server_hostname
                )
    except BaseException:
        protocol.abort()
        raise
    stream = MessageStream(protocol, close_timeout=close_timeout)
    try:
        yield stream
    finally:
        await stream.aclose()


@asynccontextmanager
async def open_udp_endpoint(
    host: str | None = None,
    port: int | None = None,
    *,
    local_host: str = "127.0.0.1",
    local_port: int = 0,
    path: str | None = None,
    remote_path: str | None = None,
    max_size: int = DEFAULT_MAX_DATAGRAM,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    queue_bytes: int = DEFAULT_QUEUE_BYTES,
    allow_broadcast: bool = False,
    multicast_group: str | None = None,
    multicast_interface: str | int = "0.0.0.0",
    multicast_ttl: int = 1,
    reuse_port: bool = False,
) -> AsyncIterator[DatagramEndpoint]:
    """Open a UDP (or Unix datagram) endpoint and yield it.

    With ``host`` and ``port`` the endpoint is *connected*: ``send(data)`` goes there, only
    that peer's datagrams are received, and ICMP errors (a closed port) reach ``request()``.
    A name with several addresses connects to the first one this host can reach, and
    ``request()`` moves to the next when the port is closed where nothing answered yet.
    Without them it is bound to ``local_host``:``local_port`` and sends with
    ``send(data, addr)``.

    Args:
        host, port: the peer to connect to, or None.
        local_host, local_port: address to bind when not connected (default loopback,
            a free port). Bind ``0.0.0.0`` or a group address to receive broadcast or
            multicast from the network.
        path: bind a Unix datagram socket at this path.
        remote_path: connect to the Unix datagram socket at this path (without ``path``,
            the local side is bound in a private temporary directory, removed on close).
        max_size: largest datagram sent or received (bigger received ones are dropped and
            counted, never cut short).
        queue_size, queue_bytes: bound of the receive queue (drops beyond are counted).
        allow_broadcast: set SO_BROADCAST.
        multicast_group, multicast_interface, multicast_ttl: join a multicast group.
        reuse_port: set SO_REUSEPORT.

    Raises:
        OSError: resolution, bind or connect failed.
    """
    unix = path is not None or remote_path is not None
    peers = [] if unix or host is None or port is None else await datagram_peers(host, port)
    private_dir = None
    if remote_path is not None and path is None:
        # A Unix client must be bound to receive replies. Not to an abstract address: uvloop
        # pads those with NULs when replying, so the reply goes nowhere.
        private_dir = tempfile.mkdtemp(prefix="netlib-")
        path = os.path.join(private_dir, "endpoint.sock")
    remote = peers.pop(0) if peers else None
    options = DatagramSocketOptions(
        local=None if unix or remote else (local_host, local_port),
        remote=None if unix else remote,
        path=path,
        remote_path=remote_path,
        allow_broadcast=allow_broadcast,
        multicast_group=multicast_group,
        multicast_interface=multicast_interface,
        multicast_ttl=multicast_ttl,
        reuse_port=reuse_port,
    )
    limits = DatagramLimits(max_size=max_size, queue_size=queue_size, queue_bytes=queue_bytes)

    async def open_socket() -> socket.socket:
        """A socket for ``options``; connected, to the first of the name's addresses this
        host can reach (one of a family it lacks is passed over, as a TCP client does)."""
        nonlocal options
        while True:
            try:
                return await open_datagram_socket(options)
            except OSError:
                if not peers:
                    raise
                options = dataclasses.replace(options, remote=peers.pop(0))

    try:
        sock = await open_socket()
    except BaseException:
        _remove(path, private_dir)
        raise
    loop = asyncio.get_running_loop()
    endpoint: DatagramEndpoint | None = None

    def on_error(exc: Exception) -> None:
        if endpoint is not None:
            endpoint.fail_request(exc)

    try:
        _transport, protocol = await loop.create_datagram_endpoint(
            lambda: DatagramEndpointProtocol(limits, on_error), sock=sock
        )
    except BaseException:
        sock.close()
        _remove(path, private_dir)
        raise

    async def next_address() -> bool:
        """The port is closed at this address: connect to the name's next one, a new
        socket under the same protocol (its queue and counters go on)."""
        nonlocal options
        if not peers:
            return False
        options = dataclasses.replace(options, remote=peers.pop(0))
        sock = await open_socket()
        old = protocol.transport
        try:
            await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        except BaseException:
            sock.close()
            raise
        if old is not None:
            old.set_protocol(asyncio.DatagramProtocol())  # its end is not the endpoint's
            old.close()
        if protocol.write_paused:
            protocol.resume_writing()
        return True

    endpoint = DatagramEndpoint(protocol, next_address if peers else None)
    try:
        yield endpoint
    finally:
        await endpoint.aclose()
        _remove(path, private_dir)


def _remove(path: str | None, private_dir: str | None) -> None:
    """Remove the socket file this endpoint bound, and its private directory."""
    remove_socket_file(path)
    if private_dir is not None:
        os.rmdir(private_dir)
