"""Socket helpers of the adapters: the buffers a UDP socket asks for."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import cast

from netlib.aio import sockets
from netlib.aio.sockets import ask_socket_buffers, receive_buffer_size

SIZE = 4 * 1024 * 1024


class _Options:
    """A socket that records the options set on it and refuses some (``EPERM``)."""

    def __init__(self, refused: set[int]) -> None:
        self.refused = refused
        self.set: list[tuple[int, int, int]] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if option in self.refused:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        self.set.append((level, option, value))


def test_the_buffers_are_asked_then_forced_past_the_cap_where_permitted() -> None:
    force = sockets._BUFFER_FORCE
    permitted = _Options(refused=set())
    ask_socket_buffers(cast(socket.socket, permitted), SIZE)
    expected = []
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        expected.append((socket.SOL_SOCKET, option, SIZE))
        if option in force:
            expected.append((socket.SOL_SOCKET, force[option], SIZE))
    assert permitted.set == expected

    unprivileged = _Options(refused=set(force.values()))  # no CAP_NET_ADMIN: EPERM, ignored
    ask_socket_buffers(cast(socket.socket, unprivileged), SIZE)
    assert unprivileged.set == [
        (socket.SOL_SOCKET, socket.SO_RCVBUF, SIZE),
        (socket.SOL_SOCKET, socket.SO_SNDBUF, SIZE),
    ]


def test_a_udp_socket_gets_its_buffer_as_root_or_under_the_cap_and_the_cap_otherwise() -> None:
    """Root (``CAP_NET_ADMIN``) gets what it asked whatever ``net.core.rmem_max`` says;
    another process gets at most the cap (read back as granted: Linux reports twice)."""
    cap = int(Path("/proc/sys/net/core/rmem_max").read_text())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ask_socket_buffers(sock, SIZE)
        granted = receive_buffer_size(sock)
    if (os.geteuid() == 0 and sockets._BUFFER_FORCE) or cap >= SIZE:
        assert granted == SIZE
    else:
        assert granted == cap
