"""Datagram socket creation: resolve, bind or connect, and set the options netlib offers;
sending empty datagrams, which neither loop's transport can; TCP keepalive; forbidding IP
fragmentation and reading a route's MTU (for path MTU discovery).

netlib creates its datagram sockets itself and hands them to
``loop.create_datagram_endpoint(sock=...)``, so both loops get the same options: broadcast,
multicast membership (IPv4 and IPv6), SO_REUSEPORT, and Unix datagram sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import platform
import socket
import stat
import struct
import sys
from dataclasses import dataclass
from typing import Any, Final, Protocol

__all__ = [
    "DEFAULT_DATAGRAM_WRITE_HIGH",
    "DEFAULT_KEEPALIVE_COUNT",
    "DEFAULT_KEEPALIVE_IDLE",
    "DEFAULT_KEEPALIVE_INTERVAL",
    "DEFAULT_MAX_DATAGRAM",
    "MAX_DATAGRAM_LIMIT",
    "DatagramSocketOptions",
    "EmptyDatagramSender",
    "allow_fragmentation",
    "ask_socket_buffers",
    "bind",
    "datagram_peers",
    "extra_info",
    "forbid_fragmentation",
    "format_address",
    "open_datagram_socket",
    "open_dual_stack_datagram_socket",
    "receive_buffer_size",
    "remove_socket_file",
    "route_payload_limit",
    "scoped_ip",
    "set_tcp_keepalive",
]

DEFAULT_MAX_DATAGRAM: Final = 65_507
"""Largest datagram accepted or sent, in bytes: the largest UDP payload over IPv4."""
MAX_DATAGRAM_LIMIT: Final = 65_535
"""Highest ``max_size`` allowed: above it a uvloop read may have been cut short."""
DEFAULT_DATAGRAM_WRITE_HIGH: Final = 256 * 1024
"""Transport send-buffer size above which ``send()`` waits and server replies are dropped."""
DEFAULT_KEEPALIVE_IDLE: Final = 30.0
"""Seconds a TCP connection is silent before the kernel probes the peer (Linux: 2 hours)."""
DEFAULT_KEEPALIVE_INTERVAL: Final = 5.0
"""Seconds between two keepalive probes (Linux: 75 s)."""
DEFAULT_KEEPALIVE_COUNT: Final = 4
"""Unanswered probes after which the connection is dropped: a vanished peer is detected
after idle + count x interval = 30 + 4 x 5 = 50 s of silence (Linux defaults: 2 h 11 min)."""


def set_tcp_keepalive(sock: Any, *, idle: float, interval: float, count: int) -> None:
    """Turn on TCP keepalive with these timings (seconds, rounded up to whole seconds).

    The kernel then probes a silent peer and, after ``count`` unanswered probes, fails the
    connection with ``ETIMEDOUT``: the adapter sees a lost connection. The timings are set
    where the platform has ``TCP_KEEPIDLE``/``TCP_KEEPINTVL``/``TCP_KEEPCNT`` (Linux, macOS
    13+, Windows 10+); elsewhere only ``SO_KEEPALIVE`` is, with the system's timings.
    ``sock`` is a socket, or a transport's ``get_extra_info("socket")``.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", _whole_seconds(idle)),
        ("TCP_KEEPINTVL", _whole_seconds(interval)),
        ("TCP_KEEPCNT", max(1, count)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


_LINUX: Final = sys.platform.startswith("linux")
# Linux's numbers (linux/in.h, linux/in6.h), which Python does not all export
_IP_MTU_DISCOVER: Final = 10
_IP_MTU: Final = 14
_IPV6_MTU_DISCOVER: Final = 23
_IPV6_MTU: Final = 24
_PMTUDISC_WANT: Final = 1  # IP_PMTUDISC_WANT and IPV6_PMTUDISC_WANT: the default
_PMTUDISC_PROBE: Final = 3  # IP_PMTUDISC_PROBE and IPV6_PMTUDISC_PROBE
_IPV6_DONTFRAG: Final = getattr(socket, "IPV6_DONTFRAG", 62)
_IP_DONTFRAG: Final = 28  # macOS and the BSDs
_UDP_IPV4_LIMIT: Final = 65_507  # 65,535 less the IPv4 and UDP headers
_UDP_IPV6_LIMIT: Final = 65_527  # 65,535 less the UDP header (the IPv6 header is apart)


# Linux's SO_SNDBUFFORCE and SO_RCVBUFFORCE (not named by Python's socket module), where
# the architecture uses the generic numbers (MIPS, SPARC, PA-RISC and Alpha have others)
_BUFFER_FORCE: Final = (
    {socket.SO_SNDBUF: 32, socket.SO_RCVBUF: 33}
    if _LINUX
    and platform.machine()
    in {"x86_64", "i686", "i386", "aarch64", "armv7l", "riscv64", "ppc64le", "s390x"}
    else {}
)


def ask_socket_buffers(sock: socket.socket, size: int) -> None:
    """Ask ``size`` bytes for ``sock``'s receive and send buffers. The kernel caps what is
    asked at ``net.core.rmem_max`` / ``wmem_max`` (208 KiB on most Linux systems); a process
    with ``CAP_NET_ADMIN`` (root) gets past the cap on Linux with ``SO_RCVBUFFORCE`` /
    ``SO_SNDBUFFORCE``, as quic-go and wireguard-go do. Whatever is refused is left as the
    kernel set it."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        force = _BUFFER_FORCE.get(option)
        if force is not None:
            with contextlib.suppress(OSError):  # EPERM without CAP_NET_ADMIN
                sock.setsockopt(socket.SOL_SOCKET, force, size)


def receive_buffer_size(sock: socket.socket) -> int | None:
    """The receive buffer the kernel granted ``sock``, in bytes (Linux reports twice what
    it granted: the half is returned), or None if it cannot be read."""
    try:
        reported = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    except OSError:
        return None
    return reported // 2 if _LINUX else reported


def forbid_fragmentation(sock: socket.socket) -> bool:
    """Make every datagram ``sock`` sends go whole or not at all: IP never fragments it.

    The Don't Fragment bit is set (IPv4) and the host does not fragment (IPv6), so a
    datagram larger than the path carries is dropped on the way, and one larger than the
    interface allows fails at once with ``EMSGSIZE``. On Linux the mode is
    ``IP_PMTUDISC_PROBE``: the path MTU the kernel learnt from ICMP messages is not applied
    (a forged ICMP cannot shrink the datagrams; the caller finds the path's size itself).
    Return False where the platform offers no way (the caller then keeps to datagrams that
    need no fragmentation).
    """
    return _fragmentation(sock, forbid=True)


def allow_fragmentation(sock: socket.socket) -> None:
    """Undo ``forbid_fragmentation``: the system's default again (the host fragments what
    its interface cannot carry). For an interface too narrow for the smallest datagram the
    caller sends."""
    _fragmentation(sock, forbid=False)


def _fragmentation(sock: socket.socket, *, forbid: bool) -> bool:
    family = sock.family
    mode = _PMTUDISC_PROBE if forbid else _PMTUDISC_WANT
    try:
        if _LINUX:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, mode)
                sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, int(forbid))
                with contextlib.suppress(OSError):  # its IPv4 peers, on a dual-stack socket
                    sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, mode)
            else:
                sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, mode)
        elif family == socket.AF_INET6 and hasattr(socket, "IPV6_DONTFRAG"):
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_DONTFRAG, int(forbid))
        elif family == socket.AF_INET and sys.platform == "darwin":
            sock.setsockopt(socket.IPPROTO_IP, _IP_DONTFRAG, int(forbid))
        else:
            return False
    except OSError:
        return False
    return True


def route_payload_limit(address: Any) -> int | None:
    """The largest UDP payload the local route to ``address`` lets out: the route's MTU
    (the interface's, or a smaller one the kernel knows) less the IP and UDP headers, at
    most what IP allows. None where the platform does not tell (Linux does, through
    ``IP_MTU``/``IPV6_MTU`` on a socket connected to the address: no packet is sent)."""
    if not _LINUX or not isinstance(address, tuple):
        return None
    try:
        ip = ipaddress.ip_address(str(address[0]).split("%")[0])
    except ValueError:
        return None
    version = ip.version
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    if mapped is not None:
        version, address = 4, (str(mapped), address[1])
    if version == 4:
        family, level, option, header, limit = (
            socket.AF_INET,
            socket.IPPROTO_IP,
            _IP_MTU,
            28,
            _UDP_IPV4_LIMIT,
        )
    else:
        family, level, option, header, limit = (
            socket.AF_INET6,
            socket.IPPROTO_IPV6,
            _IPV6_MTU,
            48,
            _UDP_IPV6_LIMIT,
        )
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(address)
            mtu = probe.getsockopt(level, option)
    except OSError:
        return None
    return min(mtu - header, limit)


class _EmptySendOwner(Protocol):
    send_dropped: int

    def error_received(self, exc: Exception) -> None: ...


class EmptyDatagramSender:
    """Sends zero-length datagrams, which both loops' ``sendto`` silently discard.

    Uses a ``socket`` object that shares the transport's descriptor; it is detached, never
    closed, so the transport keeps sole ownership of the descriptor.
    """

    __slots__ = ("_sock",)

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        info = transport.get_extra_info("socket")
        self._sock: socket.socket | None = socket.socket(
            info.family, info.type, info.proto, fileno=info.fileno()
        )

    def send(self, addr: Any) -> OSError | None:
        """Send an empty datagram to ``addr`` (None: the connected peer).

        Returns:
            None when sent, else the kernel's error (``BlockingIOError``: buffer full).
        """
        if self._sock is None:
            return BrokenPipeError("endpoint closed")
        try:
            if addr is None:
                self._sock.send(b"")
            else:
                self._sock.sendto(b"", addr)
        except OSError as exc:
            return exc
        return None

    @staticmethod
    def sent(error: OSError | None, owner: _EmptySendOwner) -> bool:
        """Count the outcome of ``send()`` on ``owner``; return whether it was sent.

        A full buffer is a counted drop (``send_dropped``); any other error is reported to
        ``owner.error_received`` (ICMP and friends, never fatal).
        """
        if error is None:
            return True
        if isinstance(error, BlockingIOError):
            owner.send_dropped += 1
        else:
            owner.error_received(error)
        return False

    def detach(self) -> None:
        """Forget the descriptor without closing it."""
        if self._sock is not None:
            self._sock.detach()
            self._sock = None


@dataclass(frozen=True, slots=True)
class DatagramSocketOptions:
    """Where a datagram socket binds or connects, and its options.

    Attributes:
        local: (host, port) to bind, or None.
        remote: (host, port) to connect to (a "connected" endpoint), or None.
        path: Unix datagram socket path to bind, or None.
        remote_path: Unix datagram socket path to connect to, or None.
        allow_broadcast: set SO_BROADCAST.
        multicast_group: join this group (bind ``local`` to the group or a wildcard).
        multicast_interface: interface for multicast: an IPv4 address (default 0.0.0.0,
            the kernel's choice), or for IPv6 an interface name or index.
        multicast_ttl: hops a multicast datagram may travel (1: the local network).
        reuse_port: set SO_REUSEPORT (several processes on one port).
    """

    local: tuple[str, int] | None = None
    remote: tuple[str, int] | None = None
    path: str | None = None
    remote_path: str | None = None
    allow_broadcast: bool = False
    multicast_group: str | None = None
    multicast_interface: str | int = "0.0.0.0"
    multicast_ttl: int = 1
    reuse_port: bool = False


async def open_datagram_socket(options: DatagramSocketOptions) -> socket.socket:
    """Return a non-blocking datagram socket set up as ``options`` says.

    Raises:
        OSError: resolution, bind or connect failed (``socket.gaierror`` for names).
    """
    if options.path is not None or options.remote_path is not None:
        return _unix_socket(options)
    family, local, remote = await _resolve(options)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        _configure(sock, family, options)
        if local is not None:
            bind(sock, local)
        if remote is not None:
            sock.connect(remote)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_dual_stack_datagram_socket(port: int) -> socket.socket | None:
    """A non-blocking UDP socket on every interface, IPv4 and IPv6 at once: IPv6's ``::``
    with ``IPV6_V6ONLY`` off, so IPv4 peers arrive as ``::ffff:a.b.c.d``. None where the
    platform has no IPv6 or no dual-stack sockets (the caller binds IPv4 alone).

    Raises:
        OSError: the port is taken (the message names it).
    """
    if not socket.has_ipv6:
        return None
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return None
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    except OSError:
        sock.close()
        return None
    try:
        bind(sock, ("::", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind(sock: socket.socket, address: Any) -> None:
    """``sock.bind(address)``, with an error that names the address (``OSError``'s own
    says only "Address already in use")."""
    try:
        sock.bind(address)
    except OSError as exc:
        where = format_address(address)
        raise type(exc)(exc.errno, f"cannot bind {where}: {exc.strerror}") from None


def format_address(address: Any) -> str:
    """``host:port``, with an IPv6 host in brackets; a Unix socket's path as it is (an
    unnamed one, a client's, as ``unnamed``)."""
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address) if address else "unnamed"


def remove_socket_file(path: object) -> None:
    """Remove ``path`` if it is a Unix socket file (a stale one from an earlier run)."""
    if not isinstance(path, str) or not path or path.startswith("\0"):
        return
    try:
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def _unix_socket(options: DatagramSocketOptions) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if options.path is not None:
            remove_socket_file(options.path)
            bind(sock, options.path)
        if options.remote_path is not None:
            sock.connect(options.remote_path)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def datagram_peers(host: str | None, port: int) -> list[tuple[str, int]]:
    """The addresses ``host`` resolves to for UDP, in the resolver's order, each once (an
    IPv6 link-local one keeps its scope: ``fe80::1%2``), for a client that tries them in
    turn as a TCP client does. ``""`` or None: this host's loopback addresses."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_DGRAM)
    peers: list[tuple[str, int]] = []
    for *_, address in infos:
        peer = (scoped_ip(address), int(address[1]))
        if peer not in peers:
            peers.append(peer)
    return peers


def scoped_ip(address: tuple[Any, ...]) -> str:
    """The IP address of a socket address, with an IPv6 link-local address's scope
    (``fe80::1%2``), as a socket needs it to reach that address again."""
    ip = str(address[0])
    return f"{ip}%{address[3]}" if len(address) == 4 and address[3] else ip


async def _resolve(
    options: DatagramSocketOptions,
) -> tuple[int, Any | None, Any | None]:
    loop = asyncio.get_running_loop()
    remote = local = None
    family: int = socket.AF_UNSPEC
    if options.remote is not None:
        family, remote = await _lookup(loop, options.remote, socket.AF_UNSPEC, passive=False)
    if options.local is not None:
        family, local = await _lookup(loop, options.local, family, passive=True)
    if family == socket.AF_UNSPEC:
        family, local = await _lookup(loop, ("127.0.0.1", 0), family, passive=True)
    return family, local, remote


async def _lookup(
    loop: asyncio.AbstractEventLoop, address: tuple[str, int], family: int, *, passive: bool
) -> tuple[int, Any]:
    host, port = address
    infos = await loop.getaddrinfo(
        host or None,
        port,
        family=family,
        type=socket.SOCK_DGRAM,
        flags=socket.AI_PASSIVE if passive else 0,
    )
    if not infos:
        raise socket.gaierror(f"no address for {host!r}")
    found_family, _type, _proto, _name, sockaddr = infos[0]
    return found_family, sockaddr


def _configure(sock: socket.socket, family: int, options: DatagramSocketOptions) -> None:
    if options.reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if options.allow_broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if options.multicast_group is not None:
        if family == socket.AF_INET6:
            _join_ipv6(sock, options)
        else:
            _join_ipv4(sock, options)


def _join_ipv4(sock: socket.socket, options: DatagramSocketOptions) -> None:
    assert options.multicast_group is not None
    interface = socket.inet_aton(str(ipaddress.IPv4Address(options.multicast_interface)))
    group = socket.inet_aton(str(ipaddress.IPv4Address(options.multicast_group)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, interface)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, options.multicast_ttl)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)


def _join_ipv6(sock: socket.socket, options: DatagramSocketOptions) -> None:
    assert options.multicast_group is not None
    interface = options.multicast_interface
    if isinstance(interface, str):
        interface = 0 if interface in ("", "0.0.0.0") else socket.if_nametoindex(interface)
    group = socket.inet_pton(socket.AF_INET6, options.multicast_group)
    index = struct.pack("@I", interface)  # ipv6_mreq: in6_addr, then the index in host order
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group + index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, interface)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, options.multicast_ttl)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 1)


def extra_info(transport: asyncio.BaseTransport | None, name: str, default: Any = None) -> Any:
    """``transport.get_extra_info(name)``, or ``default`` once there is no socket."""
    if transport is None:
        return default
    try:
        return transport.get_extra_info(name, default)
    except (AttributeError, OSError):  # uvloop, once the socket is closed
        return default
