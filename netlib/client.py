"""connect_tcp: open a message stream to a TCP (or Unix, or TLS) server.

A connect that is cancelled or times out leaves no socket behind: asyncio closes the
socket it was connecting, and once a transport exists netlib aborts it before re-raising.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

from netlib.aio.framed import (
    DEFAULT_READ_LIMIT,
    DEFAULT_WRITE_HIGH,
    DEFAULT_WRITE_LOW,
    FramedProtocol,
    StreamLimits,
)
from netlib.sansio.framing import Framing, framing_from_name
from netlib.streams import DEFAULT_CLOSE_TIMEOUT, MessageStream

__all__ = ["DEFAULT_CONNECT_TIMEOUT", "connect_tcp"]

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
    protocol = FramedProtocol(chosen.decoder(), limits)
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
    stream = MessageStream(protocol, chosen, close_timeout=close_timeout)
    try:
        yield stream
    finally:
        await stream.aclose()
