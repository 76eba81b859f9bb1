"""UDP end to end on real loopback sockets, on both loops: echo, policies, forged sources.

Robustness rows R12, R13 and R14 in docs/robustness.md.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import socket
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import netlib
from netlib import Datagram, DatagramEchoProtocol, DatagramServer
from netlib.aio.datagram import DatagramEndpointProtocol, DatagramLimits
from netlib.aio.sockets import EmptyDatagramSender
from netlib.sansio.datagram import (
    AMPLIFICATION_ALLOWANCE,
    AMPLIFICATION_WINDOW,
    DEFAULT_MAX_SOURCES,
)
from netlib.sansio.echo import TIMESTAMP_PREFIX_SIZE, EchoReplies
from tests.helpers import wait_until

SIZES = [0, 1, 1200, 1472, 65507]
TIMESTAMP = re.compile(rb"^\[(Mon|Tue|Wed|Thu|Fri|Sat|Sun) \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ")


@asynccontextmanager
async def echo_protocol_server(
    mode: netlib.EchoMode = "echo", host: str = "127.0.0.1"
) -> AsyncIterator[tuple[tuple[str, int], DatagramEchoProtocol]]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DatagramEchoProtocol(mode), local_addr=(host, 0)
    )
    try:
        yield transport.get_extra_info("sockname")[:2], protocol
    finally:
        transport.close()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# -- echo services and sizes (robustness row R14 in docs/robustness.md) -----------------------


async def test_echo_protocol_every_size_intact() -> None:
    async with (
        echo_protocol_server() as (address, protocol),
        netlib.open_udp_endpoint(*address) as endpoint,
    ):
        for size in SIZES:
            payload = random.randbytes(size)
            assert await endpoint.request(payload, timeout=1.0) == payload
        stats = protocol.statistics()
    assert stats.replied == len(SIZES)
    assert stats.dropped_too_large == 0


async def test_serve_udp_echo_handler_every_size_intact() -> None:
    async with (
        netlib.open_udp_server(netlib.udp_echo_handler) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        for size in SIZES:
            payload = random.randbytes(size)
            assert await endpoint.request(payload, timeout=1.0) == payload
        stats = server.statistics()
    assert stats.handled == len(SIZES)
    assert stats.endpoint.sent == len(SIZES)


@pytest.mark.parametrize("use_server", [False, True])
async def test_upper_and_timestamp_modes(use_server: bool) -> None:
    for mode in ("upper", "timestamp"):
        async with _echo(mode, use_server) as address, netlib.open_udp_endpoint(*address) as ep:
            reply = await ep.request(b"hello", timeout=1.0)
            empty = await ep.request(b"", timeout=1.0)
        if mode == "upper":
            assert (reply, empty) == (b"HELLO", b"")
        else:
            assert TIMESTAMP.match(reply)
            assert reply.endswith(b"] hello")
            assert len(reply) == len(b"hello") + 27
            assert TIMESTAMP.match(empty)
            assert len(empty) == 27


@asynccontextmanager
async def _echo(mode: netlib.EchoMode, use_server: bool) -> AsyncIterator[tuple[str, int]]:
    if use_server:
        async with netlib.open_udp_server(netlib.make_udp_echo_handler(mode)) as server:
            yield server.addresses[0]
    else:
        async with echo_protocol_server(mode) as (address, _protocol):
            yield address


@pytest.mark.parametrize("second", [0, 1_000_000_000, 1_785_000_000, 4_102_444_799])
def test_timestamp_prefix_has_a_fixed_size(second: int) -> None:
    # DatagramEchoProtocol derives the bytes its requests earned from this constant size.
    reply = EchoReplies("timestamp", lambda: float(second))(b"hi")
    assert len(reply) == TIMESTAMP_PREFIX_SIZE + 2
    assert reply == f"[{time.ctime(second)}] hi".encode()
    assert re.fullmatch(rb"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] hi", reply)


async def test_timestamp_reply_to_a_maximum_size_datagram_is_dropped_not_cut() -> None:
    async with (
        echo_protocol_server("timestamp") as (address, protocol),
        netlib.open_udp_endpoint(*address) as endpoint,
    ):
        with pytest.raises(netlib.PeerTimedOut):
            await endpoint.request(bytes(65507), timeout=0.1, retries=0)
        fits = bytes(65507 - 27)
        assert (await endpoint.request(fits, timeout=1.0)).endswith(fits)
    assert protocol.statistics().dropped_too_large == 1


async def test_human_pace_client_gets_every_timestamp_reply() -> None:
    async with (
        echo_protocol_server("timestamp") as (address, protocol),
        netlib.open_udp_endpoint(*address) as endpoint,
    ):
        for i in range(50):
            message = b"msg %d" % i
            assert (await endpoint.request(message, timeout=1.0, retries=0)).endswith(message)
    assert protocol.statistics().budget.replies_dropped == 0


async def test_ipv6_echo() -> None:
    async with (
        echo_protocol_server(host="::1") as (address, _protocol),
        netlib.open_udp_endpoint(*address) as endpoint,
    ):
        assert await endpoint.request(b"six", timeout=1.0) == b"six"


async def test_unix_datagram_sockets(tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    async with netlib.open_udp_server(netlib.make_udp_echo_handler("upper"), path=path) as server:
        assert server.addresses == [path]
        async with netlib.open_udp_endpoint(remote_path=path) as endpoint:
            assert await endpoint.request(b"local", timeout=1.0) == b"LOCAL"
            assert await endpoint.request(b"", timeout=1.0) == b""


async def test_broadcast_on_loopback() -> None:
    async with netlib.open_udp_endpoint(local_host="127.255.255.255") as receiver:
        port = receiver.local_address[1]
        async with netlib.open_udp_endpoint(allow_broadcast=True) as sender:
            await sender.send(b"to everyone", ("127.255.255.255", port))
            data, _addr = await asyncio.wait_for(receiver.receive(), 1.0)
    assert data == b"to everyone"


async def test_multicast_group_on_loopback() -> None:
    group = "239.255.42.99"
    async with netlib.open_udp_endpoint(
        local_host=group, multicast_group=group, multicast_interface="127.0.0.1"
    ) as receiver:
        port = receiver.local_address[1]
        async with netlib.open_udp_endpoint(
            multicast_group=group, multicast_interface="127.0.0.1"
        ) as sender:
            await sender.send(b"to the group", (group, port))
            data, _addr = await asyncio.wait_for(receiver.receive(), 1.0)
    assert data == b"to the group"


# -- endpoint policies ----------------------------------------------------------------------


async def test_receive_queue_is_bounded_and_drops_are_counted() -> None:
    async with (
        netlib.open_udp_endpoint(queue_size=10) as receiver,
        netlib.open_udp_endpoint(*receiver.local_address[:2]) as sender,
    ):
        for i in range(50):
            await sender.send(b"%d" % i)
        await wait_until(lambda: _seen(receiver) == 50)
        stats = receiver.statistics()
        assert (stats.received, stats.dropped_queue_full, stats.queued) == (10, 40, 10)
        assert [(await receiver.receive())[0] for _ in range(10)] == [b"%d" % i for i in range(10)]


def _seen(endpoint: netlib.DatagramEndpoint) -> int:
    stats = endpoint.statistics()
    return stats.received + stats.dropped_queue_full


async def test_receive_queue_is_bounded_in_bytes() -> None:
    async with (
        netlib.open_udp_endpoint(queue_bytes=3000) as receiver,
        netlib.open_udp_endpoint(*receiver.local_address[:2]) as sender,
    ):
        for _ in range(5):
            await sender.send(bytes(1000))
        await wait_until(lambda: _seen(receiver) == 5)
        assert receiver.statistics().dropped_queue_full == 2


async def test_oversized_datagram_is_dropped_and_counted_never_cut() -> None:
    async with (
        netlib.open_udp_endpoint(max_size=1000) as receiver,
        netlib.open_udp_endpoint(*receiver.local_address[:2], max_size=2000) as sender,
    ):
        await sender.send(bytes(1001))
        await sender.send(bytes(1000))
        data, _addr = await receiver.receive()
        assert len(data) == 1000
        assert receiver.statistics().dropped_too_large == 1
        with pytest.raises(netlib.LimitExceeded):
            await receiver.send(bytes(1001), sender.local_address)


async def test_empty_datagram_is_a_message() -> None:
    async with (
        netlib.open_udp_endpoint() as receiver,
        netlib.open_udp_endpoint(*receiver.local_address[:2]) as sender,
    ):
        await sender.send(b"")
        sender.send_nowait(b"")
        assert [(await receiver.receive())[0] for _ in range(2)] == [b"", b""]


async def test_iterating_an_endpoint_closed_meanwhile_raises_like_a_stream() -> None:
    # netlib's one iteration rule: ``async for`` ends at EndOfStream and raises every other
    # error; datagrams have no end of stream, so a close raises ClosedResourceError.
    async with (
        netlib.open_udp_server(netlib.udp_echo_handler) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        await endpoint.send(b"one")
        seen: list[bytes] = []

        async def iterate() -> None:
            async for data, _addr in endpoint:
                seen.append(data)

        iterating = asyncio.ensure_future(iterate())
        await wait_until(lambda: seen == [b"one"])
        await endpoint.aclose()
        with pytest.raises(netlib.ClosedResourceError):
            await iterating
        with pytest.raises(netlib.ClosedResourceError):
            await anext(aiter(endpoint))


async def test_icmp_errors_never_break_a_connected_endpoint() -> None:
    port = free_udp_port()  # nothing listens here: each send draws an ICMP port unreachable
    async with netlib.open_udp_endpoint("127.0.0.1", port) as endpoint:
        for _ in range(100):
            await endpoint.send(b"anyone?")
            await asyncio.sleep(0)  # let the ICMP error arrive between sends
        with pytest.raises(ConnectionRefusedError):
            await endpoint.request(b"anyone?", timeout=1.0)
        assert endpoint.statistics().errors_received >= 1
        async with netlib.open_udp_server(netlib.udp_echo_handler, "127.0.0.1", port):
            assert await endpoint.request(b"now?", timeout=1.0) == b"now?"
        assert endpoint.statistics().sent >= 102


async def test_a_request_passes_over_an_address_whose_port_is_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name that resolves to ::1 first and 127.0.0.1 second (``localhost`` on many
    systems), the server on 127.0.0.1 only: ::1 refuses the request (ICMP), and the
    endpoint moves to 127.0.0.1, as a TCP client tries each address in turn."""
    async with netlib.open_udp_server(netlib.udp_echo_handler, "127.0.0.1", 0) as server:
        port = server.addresses[0][1]
        closed = free_udp_port()
        peers = [("::1", port), ("127.0.0.1", port)]

        async def resolve(host: str, port: int) -> list[tuple[str, int]]:
            assert host == "dual.test"
            return list(peers)

        monkeypatch.setattr(netlib.client, "datagram_peers", resolve)
        async with netlib.open_udp_endpoint("dual.test", port) as endpoint:
            assert endpoint.remote_address[0] == "::1"
            assert await endpoint.request(b"over IPv4", timeout=2.0) == b"over IPv4"
            assert endpoint.remote_address[0] == "127.0.0.1"
            assert endpoint.statistics().errors_received == 1
            assert await endpoint.request(b"again", timeout=2.0) == b"again"
        peers[:] = [("127.0.0.1", closed), ("::1", closed)]  # closed at every address
        async with netlib.open_udp_endpoint("dual.test", closed) as endpoint:
            with pytest.raises(ConnectionRefusedError):
                await endpoint.request(b"anyone?", timeout=2.0)
            assert endpoint.remote_address[0] == "::1"
        # an address this host cannot reach (link-local without an interface: EINVAL) is
        # passed over when the endpoint opens
        peers[:] = [("fe80::1", port), ("127.0.0.1", port)]
        async with netlib.open_udp_endpoint("dual.test", port) as endpoint:
            assert endpoint.remote_address[0] == "127.0.0.1"
            assert await endpoint.request(b"v4", timeout=2.0) == b"v4"
        peers[:] = [("fe80::1", port)]
        with pytest.raises(OSError, match="Invalid argument"):
            async with netlib.open_udp_endpoint("dual.test", port):
                pass


async def test_an_empty_host_is_this_host_s_loopback() -> None:
    """``host=""`` connects to the loopback (the resolver's ::1 and 127.0.0.1): the
    request reaches a server on 127.0.0.1 whichever comes first."""
    async with (
        netlib.open_udp_server(netlib.udp_echo_handler, "127.0.0.1", 0) as server,
        netlib.open_udp_endpoint("", server.addresses[0][1]) as endpoint,
    ):
        assert await endpoint.request(b"loopback", timeout=2.0) == b"loopback"
        assert endpoint.remote_address[0] == "127.0.0.1"


async def test_request_retries_through_loss_and_times_out() -> None:
    arrivals: list[bytes] = []

    async def lossy(datagram: Datagram) -> None:
        arrivals.append(datagram.data)
        if len(arrivals) % 3 == 0:  # two of every three requests are "lost"
            datagram.reply(datagram.data.upper())

    async with (
        netlib.open_udp_server(lossy) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        assert await endpoint.request(b"try", timeout=0.05, retries=2) == b"TRY"
        assert arrivals == [b"try"] * 3
        with pytest.raises(netlib.PeerTimedOut):
            await endpoint.request(b"x", timeout=0.05, retries=1)


async def test_handler_errors_are_counted_and_serving_goes_on() -> None:
    async def picky(datagram: Datagram) -> None:
        if datagram.data == b"bad":
            raise RuntimeError("handler bug")
        datagram.reply(datagram.data)

    async with (
        netlib.open_udp_server(picky) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        await endpoint.send(b"bad")
        assert await endpoint.request(b"good", timeout=1.0) == b"good"
        assert server.statistics().handler_errors == 1


async def test_serve_udp_runs_until_cancelled() -> None:
    port = free_udp_port()
    task = asyncio.create_task(netlib.serve_udp(netlib.udp_echo_handler, "127.0.0.1", port))
    async with netlib.open_udp_endpoint("127.0.0.1", port) as endpoint:
        for _ in range(200):
            try:
                assert await endpoint.request(b"up", timeout=0.2) == b"up"
                break
            except ConnectionRefusedError:  # not bound yet: ICMP says so at once
                await asyncio.sleep(0.01)  # polling the port until the server binds it
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_flood_from_one_source_is_cut_to_its_budget() -> None:
    async with (
        netlib.open_udp_server(netlib.udp_echo_handler, workers=1) as server,
        netlib.open_udp_endpoint(*server.addresses[0]) as endpoint,
    ):
        for batch in range(1, 11):  # batches stay within the kernel's receive buffer
            for _ in range(100):
                await endpoint.send(b"flood")
            await wait_until(functools.partial(_handled_all, server, 100 * batch), timeout=5.0)
        stats = server.statistics()
    assert stats.budget.replies_allowed + stats.budget.dropped_by_rate == 1000
    assert 200 <= stats.budget.replies_allowed < 300  # burst 200 plus 100/s while it runs
    assert stats.endpoint.sent == stats.budget.replies_allowed


def _handled_all(server: netlib.DatagramServer, count: int) -> bool:
    stats = server.statistics()
    return stats.handled + stats.endpoint.dropped_queue_full == count


# -- forged sources, injected (robustness row R12 in docs/robustness.md) ----------------------


class RecordingTransport(asyncio.DatagramTransport):
    """Records every sendto per address instead of sending: bytes and datagrams."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[Any, int] = defaultdict(int)
        self.datagrams: dict[Any, int] = defaultdict(int)
        self.protocol: asyncio.DatagramProtocol | None = None
        self.closing = False

    def close(self) -> None:
        if not self.closing and self.protocol is not None:
            self.closing = True
            self.protocol.connection_lost(None)

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent[addr] += len(data)
        self.datagrams[addr] += 1

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def forged_address(rng: random.Random) -> tuple[str, int]:
    return f"198.51.100.{rng.randrange(256)}", rng.randrange(1, 65536)


def inject(
    protocol: asyncio.DatagramProtocol, datagrams: list[tuple[bytes, Any]]
) -> dict[Any, int]:
    received: dict[Any, int] = defaultdict(int)
    for data, addr in datagrams:
        received[addr] += len(data)
        protocol.datagram_received(data, addr)
    return received


def check_amplification(
    sent: dict[Any, int], received: dict[Any, int], mode: str, elapsed: float
) -> None:
    """Echo and upper: never more than 1x per address. Timestamp: 1x per address plus what
    it drew from the one shared allowance, which all addresses together cannot exceed."""
    beyond = 0
    for addr, size in sent.items():
        assert addr in received  # nothing is ever sent to an address that sent nothing
        beyond += max(0, size - received[addr])
    limit = AMPLIFICATION_ALLOWANCE * (1 + elapsed / AMPLIFICATION_WINDOW)
    assert beyond <= (limit if mode == "timestamp" else 0)


class RecordingEmptySender:
    """Stands in for ``EmptyDatagramSender``: records empty replies instead of sending."""

    def __init__(self, transport: RecordingTransport) -> None:
        self.transport = transport

    def send(self, addr: Any) -> OSError | None:
        self.transport.sendto(b"", addr)
        return None

    sent = staticmethod(EmptyDatagramSender.sent)

    def detach(self) -> None:
        return None


@pytest.mark.parametrize("mode", ["echo", "upper", "timestamp"])
async def test_echo_protocol_does_not_amplify_forged_sources(mode: netlib.EchoMode) -> None:
    rng = random.Random(12)
    datagrams = [(rng.randbytes(rng.randint(1, 1500)), forged_address(rng)) for _ in range(10_000)]
    loop = asyncio.get_running_loop()
    start = loop.time()
    protocol = DatagramEchoProtocol(mode)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    received = inject(protocol, datagrams)
    check_amplification(transport.sent, received, mode, loop.time() - start)
    assert sum(transport.sent.values()) > 0


@settings(max_examples=30, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=1500), st.integers(0, 3)),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from(["echo", "upper", "timestamp"]),
)
def test_forged_sources_with_any_contents_are_not_amplified(
    datagrams: list[tuple[bytes, int]], mode: netlib.EchoMode
) -> None:
    asyncio.run(_forged_example(datagrams, mode))


async def _forged_example(datagrams: list[tuple[bytes, int]], mode: netlib.EchoMode) -> None:
    protocol = DatagramEchoProtocol(mode)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    start = asyncio.get_running_loop().time()
    received = inject(protocol, [(d, ("203.0.113.7", 1000 + n)) for d, n in datagrams])
    elapsed = asyncio.get_running_loop().time() - start
    check_amplification(transport.sent, received, mode, elapsed)


def tiny_forged_datagrams(count: int) -> list[tuple[bytes, Any]]:
    """Empty and 1-byte datagrams from three times more forged sources than the reply
    budget's table holds, so that it evicts all the time."""
    sources = 3 * DEFAULT_MAX_SOURCES
    return [
        (b"x" * (i & 1), (f"198.51.{100 + (i % sources) // 65_000}.1", 1 + (i % sources) % 65_000))
        for i in range(count)
    ]


@pytest.mark.parametrize("mode", ["echo", "upper", "timestamp"])
async def test_tiny_datagrams_from_more_sources_than_the_table_echo_protocol(
    mode: netlib.EchoMode,
) -> None:
    """Timestamp replies to 1-byte requests were 28x per address, and eviction handed each
    new forged address a fresh allowance: the total was unbounded."""
    loop = asyncio.get_running_loop()
    protocol = DatagramEchoProtocol(mode)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol._empty = RecordingEmptySender(transport)  # type: ignore[assignment]
    start = loop.time()
    received = inject(protocol, tiny_forged_datagrams(6 * DEFAULT_MAX_SOURCES))
    check_amplification(transport.sent, received, mode, loop.time() - start)
    assert protocol.statistics().budget.evictions >= 3 * DEFAULT_MAX_SOURCES
    if mode != "timestamp":  # every request got its (empty or 1-byte) echo
        assert protocol.statistics().replied == 6 * DEFAULT_MAX_SOURCES


@pytest.mark.parametrize("mode", ["echo", "timestamp"])
async def test_tiny_datagrams_from_more_sources_than_the_table_udp_server(
    mode: netlib.EchoMode,
) -> None:
    datagrams = tiny_forged_datagrams(4 * DEFAULT_MAX_SOURCES)
    limits = DatagramLimits(queue_size=len(datagrams), queue_bytes=1 << 25)
    protocol = DatagramEndpointProtocol(limits)
    transport = RecordingTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    protocol._empty = RecordingEmptySender(transport)  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    start = loop.time()
    server = DatagramServer(netlib.make_udp_echo_handler(mode), protocol, netlib.ReplyBudget(), 4)
    received = inject(protocol, datagrams)
    await wait_until(lambda: server.statistics().handled == len(datagrams), timeout=20.0)
    check_amplification(transport.sent, received, mode, loop.time() - start)
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("mode", ["echo", "upper", "timestamp"])
async def test_udp_server_does_not_amplify_forged_sources(mode: netlib.EchoMode) -> None:
    rng = random.Random(13)
    datagrams = [(rng.randbytes(rng.randint(1, 1500)), forged_address(rng)) for _ in range(10_000)]
    protocol = DatagramEndpointProtocol(DatagramLimits(queue_size=20_000, queue_bytes=1 << 25))
    transport = RecordingTransport()
    transport.protocol = protocol
    protocol.connection_made(transport)
    loop = asyncio.get_running_loop()
    start = loop.time()
    server = DatagramServer(netlib.make_udp_echo_handler(mode), protocol, netlib.ReplyBudget(), 4)
    received = inject(protocol, datagrams)
    await wait_until(lambda: server.statistics().handled == 10_000, timeout=10.0)
    check_amplification(transport.sent, received, mode, loop.time() - start)
    assert sum(transport.sent.values()) > 0
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("burst", "byte_burst", "grant"),
    [(200, 512 * 1024, 32), (8 * 100, 512 * 1024, 100), (1e9, 1e12, 256)],
)
async def test_echo_protocol_grants_grow_with_the_budget(
    burst: float, byte_burst: float, grant: int
) -> None:
    budget = netlib.ReplyBudget(rate=1e9, burst=burst, byte_rate=1e12, byte_burst=byte_burst)
    budget.exempt(("192.0.2.1", 7), 0.0)  # no amplification cap: only the grant size counts
    protocol = DatagramEchoProtocol(budget=budget)
    protocol.connection_made(RecordingTransport())
    protocol.datagram_received(b"x", ("192.0.2.1", 7))
    assert budget.statistics().replies_allowed == grant  # one grant, charged up front
    assert protocol.statistics().replied == 1


async def test_echo_protocol_lease_table_is_bounded() -> None:
    protocol = DatagramEchoProtocol()
    protocol._grants._max_grants = 10
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for port in range(1, 26):
        protocol.datagram_received(b"x", ("192.0.2.1", port))
    assert len(protocol._grants.table) <= 10
    assert protocol.statistics().replied == 25  # every address still got its reply


class CountingTransport(RecordingTransport):
    """Counts sendto calls too (a reply may be empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.calls += 1
        super().sendto(data, addr)


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([1, 64, 1200, 2000]),  # 2000 is above max_size
            st.integers(0, 12),  # address
            st.booleans(),  # writing paused
        ),
        min_size=1,
        max_size=400,
    ),
    st.sampled_from(["echo", "timestamp"]),
    st.sampled_from([0.5, 1_000.0]),  # a budget that refuses, and one that does not
)
def test_echo_protocol_statistics_add_up(
    events: list[tuple[int, int, bool]], mode: netlib.EchoMode, rate: float
) -> None:
    asyncio.run(_statistics_example(events, mode, rate))


async def _statistics_example(
    events: list[tuple[int, int, bool]], mode: netlib.EchoMode, rate: float
) -> None:
    budget = netlib.ReplyBudget(rate=rate, burst=max(1.0, rate))
    protocol = DatagramEchoProtocol(mode, budget=budget, max_size=1500)
    protocol._grants._max_grants = 4  # evictions settle grants early
    transport = CountingTransport()
    protocol.connection_made(transport)
    for size, address, paused in events:
        if paused:
            protocol.pause_writing()
        before = _outcomes(protocol, transport)
        protocol.datagram_received(b"x" * size, ("192.0.2.1", 1000 + address))
        after = _outcomes(protocol, transport)
        protocol.resume_writing()
        received, *outcomes = (new - old for new, old in zip(after, before, strict=True))
        assert received == 1
        assert sorted(outcomes) == [0, 0, 0, 1]  # replied, too large, refused or send_dropped
        assert protocol.statistics().replied == transport.calls
        assert not outcomes[3] or paused
    prefix = 27 if mode == "timestamp" else 0
    too_large = sum(size + prefix > 1500 for size, _, _ in events)
    assert protocol.statistics().dropped_too_large == too_large


def _outcomes(protocol: DatagramEchoProtocol, transport: CountingTransport) -> tuple[int, ...]:
    stats = protocol.statistics()
    budget = stats.budget
    refused = budget.dropped_by_rate + budget.dropped_by_bytes + budget.dropped_by_amplification
    return stats.received, transport.calls, stats.dropped_too_large, refused, stats.send_dropped


async def test_unix_datagram_server_replaces_a_stale_socket_file(tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as crashed:
        crashed.bind(path)  # left behind, as by a process that died
    async with (
        netlib.open_udp_server(netlib.udp_echo_handler, path=path),
        netlib.open_udp_endpoint(remote_path=path) as endpoint,
    ):
        assert await endpoint.request(b"fresh", timeout=1.0) == b"fresh"


async def test_echo_protocol_cuts_a_flood_from_one_address_to_its_budget() -> None:
    budget = netlib.ReplyBudget(rate=0.001, burst=200)  # a burst of 200, then (almost) none
    protocol = DatagramEchoProtocol(budget=budget)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for _ in range(1000):
        protocol.datagram_received(b"flood", ("192.0.2.7", 9))
    stats = protocol.statistics()
    assert (stats.received, stats.replied) == (1000, 200)
    assert transport.sent[("192.0.2.7", 9)] == 200 * len(b"flood")
    assert (stats.budget.replies_allowed, stats.budget.dropped_by_rate) == (200, 800)
