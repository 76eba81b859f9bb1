"""Shared helpers for integration tests: loopback servers, raw sockets, timing."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from typing import Any

from netlib import Server

__all__ = ["address_of", "open_raw", "reset", "wait_for_eof", "wait_until"]


def address_of(server: Server) -> tuple[str, int]:
    """Host and port of the server's first listening socket."""
    host, port = server.addresses[0][:2]
    return host, port


async def open_raw(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A plain asyncio stream connection: a client that netlib does not control."""
    return await asyncio.open_connection(host, port)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0, so the peer sees a reset (RST) instead of EOF."""
    sock: Any = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def wait_for_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until EOF (raises ConnectionResetError if the peer reset instead)."""
    return await reader.read()


async def wait_until(predicate: Callable[[], bool], timeout: float = 1.0) -> None:
    """Poll ``predicate`` (a cheap counter check) until true; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)
