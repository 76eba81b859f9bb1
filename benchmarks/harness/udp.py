"""UDP load client: connected sockets keeping a window of datagrams in flight.

The client runs in the benchmark's own process (pinned to the client CPU), on uvloop. Each
of ``--sockets`` connected UDP sockets (distinct source addresses) keeps ``--window``
datagrams in flight. It reads a burst with ``recvmmsg`` and refills its window with one
``sendmmsg`` (both through ctypes); a 20 ms timer refills a socket whose window stalled on
lost datagrams. Datagrams sent in the measured window carry a mark in their last byte, so
loss is counted exactly. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import socket
import time
from pathlib import Path
from typing import Any

from harness import CpuWatch, proc_cpu_times
from harness.bench import CLIENT_CPU, HOST, SERVER_CPU

__all__ = ["measure_throughput", "ready"]

WARM_MARK = ord("w")  # last byte of datagrams sent during the warm-up
MEASURE_MARK = ord("m")  # last byte of datagrams sent in the measured window
PROBE_MARK = ord("p")
RECV_BATCH = 64  # datagrams per recvmmsg call
STALL_TICK = 0.02  # s; a socket with no reply for two ticks gets its window refilled


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _MsgHdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_IoVec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _MsgHdr), ("msg_len", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


class SendVector:
    """``count`` mmsghdr entries that all send ``payload`` (one sendmmsg sends a batch)."""

    def __init__(self, payload: bytes, count: int) -> None:
        self._payload = ctypes.create_string_buffer(payload, len(payload))
        self._iov = _IoVec(ctypes.addressof(self._payload), len(payload))
        self._msgs = (_MMsgHdr * count)()
        for msg in self._msgs:
            msg.msg_hdr.msg_iov = ctypes.pointer(self._iov)
            msg.msg_hdr.msg_iovlen = 1
        self.address = ctypes.addressof(self._msgs)


class RecvVector:
    """``RECV_BATCH`` receive buffers of ``slot`` bytes, and views of lengths and data."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.data = bytearray(RECV_BATCH * slot)
        self._cdata = (ctypes.c_char * len(self.data)).from_buffer(self.data)
        self._iovs = (_IoVec * RECV_BATCH)()
        self._raw = bytearray(ctypes.sizeof(_MMsgHdr) * RECV_BATCH)
        self._msgs = (_MMsgHdr * RECV_BATCH).from_buffer(self._raw)
        base = ctypes.addressof(self._cdata)
        for i in range(RECV_BATCH):
            self._iovs[i].iov_base = base + i * slot
            self._iovs[i].iov_len = slot
            self._msgs[i].msg_hdr.msg_iov = ctypes.pointer(self._iovs[i])
            self._msgs[i].msg_hdr.msg_iovlen = 1
        self.address = ctypes.addressof(self._msgs)
        # msg_len of entry i is lengths[i * len_step + len_off] (it follows the msghdr)
        self.lengths = memoryview(self._raw).cast("I")
        self.len_step = ctypes.sizeof(_MMsgHdr) // 4
        self.len_off = ctypes.sizeof(_MsgHdr) // 4
        self.view = memoryview(self.data)


class LoadSocket:
    """One connected UDP socket keeping ``window`` datagrams in flight."""

    def __init__(self, client: LoadClient, port: int) -> None:
        self.client = client
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.connect((HOST, port))
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.inflight = 0
        self.replied = False  # a reply arrived since the last stall tick
        self.quiet_ticks = 0

    def on_readable(self) -> None:
        client = self.client
        rv = client.recv
        total = 0
        while True:
            n = _recvmmsg(self.fd, rv.address, RECV_BATCH, socket.MSG_DONTWAIT, None)
            if n <= 0:
                if n < 0:
                    client.note_errno()
                break
            total += n
            if client.classify:
                client.classify_batch(n)
            if n < RECV_BATCH:
                break
        if total:
            client.received += total
            self.replied = True
            self.inflight = max(0, self.inflight - total)
            if client.sending:
                self.refill()

    def refill(self) -> None:
        client = self.client
        want = client.window - self.inflight
        if want <= 0:
            return
        sent = _sendmmsg(self.fd, client.send_vector.address, want, 0)
        if sent > 0:
            self.inflight += sent
            client.sent += sent
            if client.classify:
                client.sent_measured += sent
        elif sent < 0:
            client.note_errno()

    def close(self) -> None:
        self.sock.close()


class LoadClient:
    """The load generator: ``sockets`` LoadSockets, a stall timer, and the counters."""

    def __init__(self, port: int, args: argparse.Namespace, reply_extra: int, window: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.window = window
        self.expected = args.size + reply_extra  # reply length
        self.recv = RecvVector(_round_up(self.expected + 1, 64))
        self.warm_vector = SendVector(_payload(args.size, WARM_MARK), window)
        self.measure_vector = SendVector(_payload(args.size, MEASURE_MARK), window)
        self.send_vector = self.warm_vector
        self.sending = True
        self.classify = False  # from the start of the measured window
        self.received = self.sent = self.sent_measured = self.echoed_measured = 0
        self.bad_replies = self.errors = self.stall_refills = 0
        self.last_errno = 0
        self.sockets: list[LoadSocket] = []
        self._timer: asyncio.TimerHandle | None = None
        try:
            for _ in range(args.sockets):
                s = LoadSocket(self, port)
                self.sockets.append(s)
                self.loop.add_reader(s.fd, s.on_readable)
        except BaseException:
            self.close()
            raise
        for s in self.sockets:
            s.refill()
        self._timer = self.loop.call_later(STALL_TICK, self._on_tick)

    def start_measuring(self) -> None:
        self.send_vector = self.measure_vector
        self.classify = True

    def stop_sending(self) -> None:
        self.sending = False

    def note_errno(self) -> None:
        err = ctypes.get_errno()
        if err not in (0, 11):  # EAGAIN: nothing to read / send buffer full
            self.errors += 1
            self.last_errno = err

    def classify_batch(self, n: int) -> None:
        """Count the replies to measured-window datagrams among the ``n`` just received."""
        rv = self.recv
        lengths = rv.lengths[rv.len_off : n * rv.len_step : rv.len_step].tolist()
        expected = self.expected
        if lengths.count(expected) == n:
            marks = rv.view[expected - 1 : n * rv.slot : rv.slot].tobytes()
            self.echoed_measured += marks.count(MEASURE_MARK)
            return
        data = rv.data
        for i, length in enumerate(lengths):
            if length != expected:
                self.bad_replies += 1
            elif data[i * rv.slot + length - 1] == MEASURE_MARK:
                self.echoed_measured += 1

    def _on_tick(self) -> None:
        if self.sending:
            for s in self.sockets:
                if s.replied:
                    s.replied = False
                    s.quiet_ticks = 0
                elif s.inflight:
                    s.quiet_ticks += 1
                    if s.quiet_ticks >= 2:  # presumed lost: refill the whole window
                        self.stall_refills += 1
                        s.inflight = 0
                        s.quiet_ticks = 0
                        s.refill()
                else:
                    s.refill()  # a send failed earlier
        self._timer = self.loop.call_later(STALL_TICK, self._on_tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for s in self.sockets:
            self.loop.remove_reader(s.fd)
            s.close()


def _payload(size: int, mark: int) -> bytes:
    return b"x" * (size - 1) + bytes([mark])


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def minor_faults(pid: int) -> int:
    """Minor page faults of a process so far (/proc/PID/stat field 10)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[7])


async def measure_throughput(
    port: int, proc: Any, args: argparse.Namespace, reply_extra: int, window: int
) -> dict[str, Any]:
    """Datagrams/s, the server's CPU (user and system) per datagram, and loss."""
    client = LoadClient(port, args, reply_extra, window)
    try:
        await asyncio.sleep(args.warmup)
        watch = CpuWatch(proc, args.cpus)
        client.start_measuring()
        t0 = time.perf_counter()
        r0 = client.received
        u0, s0 = proc_cpu_times(proc)
        f0 = minor_faults(proc.pid)
        c0 = time.process_time()
        deadline = t0 + args.duration
        while True:
            now = time.perf_counter()
            if now >= deadline or client.received - r0 >= args.max_dgrams:
                break
            await asyncio.sleep(min(0.05, deadline - now))
        t1 = time.perf_counter()
        r1 = client.received
        u1, s1 = proc_cpu_times(proc)
        f1 = minor_faults(proc.pid)
        c1 = time.process_time()
        cpu = watch.stop()
        client.stop_sending()
        drain_end = time.perf_counter() + args.drain
        while client.echoed_measured < client.sent_measured and time.perf_counter() < drain_end:
            await asyncio.sleep(0.005)
    finally:
        client.close()
    elapsed = t1 - t0
    dgrams = r1 - r0
    if dgrams == 0:
        raise RuntimeError(
            f"no datagram echoed in the measured window (errno {client.last_errno})"
        )
    server_cpu = (u1 - u0) + (s1 - s0)
    lost = client.sent_measured - client.echoed_measured
    return {
        "dgrams": dgrams,
        "elapsed_s": elapsed,
        "dgrams_per_s": dgrams / elapsed,
        "server_cpu_s": server_cpu,
        "server_us_per_dgram": server_cpu * 1e6 / dgrams,
        "server_user_us_per_dgram": (u1 - u0) * 1e6 / dgrams,
        "server_sys_us_per_dgram": (s1 - s0) * 1e6 / dgrams,
        "server_faults_per_dgram": (f1 - f0) / dgrams,
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_share": (c1 - c0) / elapsed,
        "client_us_per_dgram": (c1 - c0) * 1e6 / dgrams,
        "server_core_busy": cpu["core_busy"].get(SERVER_CPU),
        "client_core_busy": cpu["core_busy"].get(CLIENT_CPU),
        "foreign_cores": cpu["foreign_cores"],
        "sent_measured": client.sent_measured,
        "lost": lost,
        "loss": lost / client.sent_measured if client.sent_measured else 0.0,
        "stall_refills": client.stall_refills,
        "bad_replies": client.bad_replies,
        "socket_errors": client.errors,
    }


def _probe(port: int, size: int) -> int | None:
    """One echo round trip; returns the reply's extra length (0 for echo), None if no reply."""
    payload = _payload(size, PROBE_MARK)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        sock.connect((HOST, port))
        sock.send(payload)
        try:
            reply = sock.recv(65536)
        except (TimeoutError, ConnectionRefusedError):
            return None
    if not reply.endswith(payload):
        raise RuntimeError(f"bad echo reply: {reply[:80]!r}")
    return len(reply) - len(payload)


def ready(port: int, size: int) -> tuple[int, int] | None:
    """The port and the reply's extra size once a first echo came back, else None."""
    extra = _probe(port, size)
    return None if extra is None else (port, extra)
