"""Chat over TCP and UDP on real loopback sockets, on both loops (issue: chat)."""

from __future__ import annotations

import asyncio
import logging
import random
import re
import socket
from collections.abc import AsyncIterator, Hashable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

import netlib
from netlib import ChatLimits, ChatService, DatagramChatProtocol, SlowConsumer
from netlib.aio.stream import READ_SIZE
from netlib.sansio.chat_udp import HELLO_REPLY_SIZE, MAX_UDP_PEERS, MAX_UDP_PEERS_PER_HOST
from netlib.sansio.datagram import DEFAULT_MAX_SOURCES
from netlib.services.chat.service import CHAT_LOG_BURST
from tests.helpers import reset, wait_until


class LineClient:
    """A raw socket chat client, as ``nc`` would be: it reads all the time, lines out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.seen: list[str] = []
        self.lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while raw := await reader.readline():
                self.lines.put_nowait(raw.decode().rstrip("\r\n"))
        except ConnectionError:
            pass
        self.lines.put_nowait(None)

    @classmethod
    async def connect(cls, port: int) -> LineClient:
        client = cls(*await asyncio.open_connection("127.0.0.1", port))
        await client.expect("*** welcome")
        return client

    def send(self, *lines: str, end: bytes = b"\n") -> None:
        for line in lines:
            self.writer.write(line.encode() + end)

    async def expect(self, fragment: str, timeout: float = 2.0) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = await self.lines.get()
                if line is None:
                    raise EOFError(f"closed while waiting for {fragment!r}; saw {self.seen}")
                self.seen.append(line)
                if fragment in line:
                    return line

    async def closed(self, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while await self.lines.get() is not None:
                pass

    async def aclose(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
        await self._reader


@asynccontextmanager
async def chat_server(
    proto: netlib.ChatServer | str = "tcp", **limits: Any
) -> AsyncIterator[netlib.ChatServer]:
    service = ChatService(limits=ChatLimits(**limits)) if limits else None
    async with netlib.open_chat_server(proto=proto, service=service) as server:  # type: ignore[arg-type]
        yield server
    if service is not None:
        await service.aclose()


def tcp_port(server: netlib.ChatServer) -> int:
    port: int = server.tcp_addresses[0][1]
    return port


async def test_raw_socket_session_nick_join_broadcast_private_quit() -> None:
    async with chat_server() as server:
        alice = await LineClient.connect(tcp_port(server))
        bob = await LineClient.connect(tcp_port(server))
        alice.send("/nick alice")
        bob.send("/nick Bob", end=b"\r\n")  # telnet and nc -C send CRLF
        await alice.expect("[#lobby] *** guest2 is now known as Bob")
        alice.send("hello, room")
        assert await bob.expect("<alice>") == "[#lobby] <alice> hello, room"
        bob.send("/msg alice just you and me")
        assert await alice.expect("-Bob-") == "-Bob- just you and me"
        assert await bob.expect("->") == "-> alice: just you and me"
        alice.send("/join #rust", "/who")
        assert await alice.expect("*** #rust") == "*** #rust (1 member): alice"
        bob.send("/join rust")
        await alice.expect("[#rust] *** Bob joined")
        bob.send("/me waves")
        assert await alice.expect("* Bob") == "[#rust] * Bob waves"
        bob.send("/quit see you")
        await bob.expect("*** goodbye")
        await bob.closed()
        assert await alice.expect("quit") == "[#lobby] *** Bob quit (see you)"
        alice.send("over")
        await alice.expect("*** goodbye")
        await alice.closed()
        await alice.aclose()
        await bob.aclose()
        await wait_until(lambda: server.service.statistics().sessions == 0)


async def test_errors_are_clear_replies() -> None:
    async with chat_server() as server:
        alice = await LineClient.connect(tcp_port(server))
        bob = await LineClient.connect(tcp_port(server))
        alice.send("/nick alice")
        await alice.expect("you are now known as alice")
        bob.send("/nick ALICE", "/frobnicate", "/msg nobody hi", "/join", "/nick 9lives")
        assert "already taken" in await bob.expect("!!!")
        assert "unknown command" in await bob.expect("!!!")
        assert "nobody" in await bob.expect("!!!")
        assert "usage" in (await bob.expect("!!!")).lower()
        assert "9lives" in await bob.expect("!!!")
        await alice.aclose()
        await bob.aclose()


async def test_invalid_utf8_is_replaced_and_control_characters_stripped() -> None:
    async with chat_server() as server:
        alice = await LineClient.connect(tcp_port(server))
        bob = await LineClient.connect(tcp_port(server))
        alice.writer.write(b"caf\xc3\xa9 \xff\xfe ok \x1b[31mred\x07\n")
        line = await bob.expect("<guest1>")
        assert line == "[#lobby] <guest1> café \ufffd\ufffd ok [31mred"
        await alice.aclose()
        await bob.aclose()


class PeakProtocol(netlib.ChatProtocol):
    """A chat connection that records the most bytes its line decoder ever held."""

    peak = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.peak = max(self.peak, self.conn.partial_size)


async def test_overlong_line_is_refused_with_a_notice_and_the_sender_stays() -> None:
    service = ChatService(limits=ChatLimits(max_line_bytes=1024))
    protocols: list[PeakProtocol] = []

    def protocol() -> PeakProtocol:
        protocols.append(PeakProtocol(service))
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    alice = await LineClient.connect(port)
    bob = await LineClient.connect(port)
    alice.writer.write(b"x" * 2000)  # a paste: refused as soon as it passes the limit
    notice = await alice.expect("!!!")
    assert notice == "!!! line too long (limit 1024 bytes): not sent"
    for _ in range(64):  # 1 MiB more of the same line is read and discarded
        alice.writer.write(b"y" * 16384)
        await alice.writer.drain()
    alice.send("", "after the paste")
    assert await bob.expect("<guest1>") == "[#lobby] <guest1> after the paste"
    assert not any("yyy" in line for line in bob.seen)
    assert max(p.peak for p in protocols) <= 1024 + 1  # nothing above the limit was held
    stats = service.statistics()
    assert (stats.sessions, stats.lines_too_long) == (2, 1)
    await alice.aclose()
    await bob.aclose()
    server.close()
    await server.wait_closed()
    await service.aclose()


async def test_flood_control_paces_tcp_lines_instead_of_dropping_them() -> None:
    rate, burst, lines = 20.0, 5, 30
    async with chat_server(flood_rate=rate, flood_burst=burst) as server:
        alice = await LineClient.connect(tcp_port(server))
        bob = await LineClient.connect(tcp_port(server))
        loop = asyncio.get_running_loop()
        start = loop.time()
        alice.send(*(f"line {i}" for i in range(lines)))
        for i in range(lines):  # every line, in order
            assert await bob.expect("<guest1>", 5.0) == f"[#lobby] <guest1> line {i}"
        elapsed = loop.time() - start
        assert elapsed >= (lines - burst) / rate - 0.1  # paced to the rate, not dropped
        stats = server.service.statistics()
        assert stats.flood_dropped == 0
        assert not any(line.startswith("!!!") for line in alice.seen)
        alice.send("/who")
        assert await alice.expect("*** #lobby") == "*** #lobby (2 members): guest1 guest2"
        await alice.aclose()
        await bob.aclose()


class HeldInputProtocol(netlib.ChatProtocol):
    """A chat connection that records the most input it ever held (queued and partial)."""

    peak = 0

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.peak = max(self.peak, self.conn.queued + self.conn.partial_size)


async def test_a_paced_flooder_is_not_read_so_its_input_stays_bounded() -> None:
    service = ChatService(limits=ChatLimits(flood_rate=1.0, flood_burst=1))
    protocols: list[HeldInputProtocol] = []

    def protocol() -> HeldInputProtocol:
        protocols.append(HeldInputProtocol(service))
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    flooder = await LineClient.connect(server.sockets[0].getsockname()[1])
    transport = flooder.writer.transport
    line = b"f" * 99 + b"\n"
    async with asyncio.timeout(10.0):
        while not transport.get_write_buffer_size():  # until the kernel's buffers are full
            flooder.writer.write(line * 1000)
            await asyncio.sleep(0)  # let the server run: it must stop reading the flooder
    held = protocols[0]
    assert held.conn.held_until is not None
    assert held.reading_paused
    assert held.peak <= READ_SIZE + len(line)  # one read, not the megabytes sent
    assert service.statistics().flood_dropped == 0
    transport.abort()
    await flooder.closed()
    await flooder.aclose()
    server.close()
    await server.wait_closed()
    await service.aclose()


async def test_flood_paced_lines_before_eof_are_all_delivered() -> None:
    async with chat_server(flood_rate=50.0, flood_burst=2) as server:
        bob = await LineClient.connect(tcp_port(server))
        _reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
        writer.write(b"".join(f"piped {i}\n".encode() for i in range(20)))
        writer.write_eof()  # as `printf ... | nc -N` does
        for i in range(20):
            assert await bob.expect("piped", 5.0) == f"[#lobby] <guest2> piped {i}"
        assert "guest2 quit (connection closed)" in await bob.expect("quit", 5.0)
        writer.close()
        await bob.aclose()


async def test_udp_flood_control_drops_with_a_notice_and_counts() -> None:
    async with chat_server("udp", flood_rate=0.1, flood_burst=5) as server:
        udp_endpoint = netlib.open_udp_endpoint(*server.udp_addresses[0][:2])
        async with udp_endpoint as endpoint:
            udp = UdpChatClient(endpoint)
            await udp.join()
            for i in range(20):
                await endpoint.send(f"line {i}".encode())
            assert "flood control" in await udp.expect("!!!")
            await wait_until(lambda: server.service.statistics().flood_dropped == 15)


async def test_reset_and_vanishing_clients_never_disturb_the_room() -> None:
    async with chat_server() as server:
        port = tcp_port(server)
        watcher = await LineClient.connect(port)
        for _ in range(10):
            ghost = await LineClient.connect(port)
            ghost.send("hello then gone")
            reset(ghost.writer)
        await wait_until(lambda: server.service.statistics().sessions == 1)
        talker = await LineClient.connect(port)
        talker.send("still fine")
        await watcher.expect("still fine")
        await watcher.aclose()
        await talker.aclose()


async def test_slow_consumer_is_disconnected_at_the_hard_limit() -> None:
    async with chat_server(
        soft_limit=64 * 1024,
        hard_limit=256 * 1024,
        soft_time=60.0,
        flood_rate=1e6,
        flood_burst=10**6,
    ) as server:
        port = tcp_port(server)
        sleeper = await _non_reading_client(port)
        talker = await LineClient.connect(port)
        listener = await LineClient.connect(port)
        line = "z" * 1000
        for n in range(30_000):  # the kernel's buffers absorb a few MiB first
            talker.send(f"{n} {line}")
            if n % 50 == 49:
                await talker.writer.drain()
                await asyncio.sleep(0)  # let the server and the listener run
                if server.service.statistics().slow_consumers:
                    break
        assert "quit (slow_consumer)" in await listener.expect("quit (slow_consumer)", 10.0)
        assert server.service.statistics().slow_consumers == 1  # the listener kept up
        sleeper.close()
        await talker.aclose()
        await listener.aclose()


async def test_slow_consumer_is_disconnected_after_the_soft_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft_time = 0.5
    caplog.set_level(logging.INFO, logger="netlib.chat")
    async with chat_server(
        soft_limit=16 * 1024,
        hard_limit=1 << 30,
        soft_time=soft_time,
        flood_rate=1e6,
        flood_burst=10**6,
    ) as server:
        port = tcp_port(server)
        sleeper = await _non_reading_client(port)
        talker = await LineClient.connect(port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        while not server.service.statistics().slow_consumers and sent < 60_000:
            talker.send("q" * 1000)
            sent += 1
            if sent % 50 == 0:
                await asyncio.sleep(0.01)  # a steady talker, about 5,000 lines per second
        elapsed = loop.time() - start
        sleeper.close()
        await talker.aclose()
    assert server.service.statistics().slow_consumers == 1
    assert soft_time <= elapsed < soft_time + 2.0  # after the kernel buffer fills, then 0.5 s
    held = [
        r.getMessage() for r in caplog.records if "held above the soft limit" in r.getMessage()
    ]
    assert len(held) == 1
    assert abs(float(held[0].split(" for ")[1].split()[0]) - soft_time) < 0.1


async def _non_reading_client(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_chat_runs_on_netlibs_server_and_cuts_a_trickled_line_at_its_deadline() -> None:
    # open_chat_server serves members on netlib's Server (its accept loop, caps, budget,
    # keepalive and statistics), with the chat's line deadline as the message deadline.
    async with chat_server(line_timeout=0.5) as server:
        assert server.tcp is not None
        port = tcp_port(server)
        trickler = await LineClient.connect(port)
        listener = await LineClient.connect(port)
        loop = asyncio.get_running_loop()
        start = loop.time()
        trickler.send("a line that never ends", end=b"")
        await trickler.closed(timeout=2.0)
        assert 0.5 <= loop.time() - start < 1.5
        await listener.expect("quit")
        stats = server.tcp.statistics()
        assert stats.timeouts == 1
        assert stats.accepted == 2
        assert stats.active == 1
        await trickler.aclose()
        await listener.aclose()


async def test_a_member_cut_off_by_a_deadline_is_told_why() -> None:
    async with chat_server(line_timeout=0.3) as server:
        trickler = await LineClient.connect(tcp_port(server))
        trickler.send("a line that never ends", end=b"")
        last = await trickler.expect("disconnected")
        assert last == "*** disconnected: timed out (a message took longer than 0.3s)"
        await trickler.closed()
        await trickler.aclose()


async def test_a_member_evicted_by_the_memory_budget_is_told_why() -> None:
    service = ChatService()
    protocols: list[netlib.ChatProtocol] = []

    def protocol() -> netlib.ChatProtocol:
        protocols.append(netlib.ChatProtocol(service))
        return protocols[-1]

    server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0)
    member = await LineClient.connect(server.sockets[0].getsockname()[1])
    protocols[0].fail(SlowConsumer("evicted: the server's memory budget is used up"))
    last = await member.expect("disconnected")
    assert last == (
        "*** disconnected: slow_consumer (evicted: the server's memory budget is used up)"
    )
    await member.closed()
    await member.aclose()
    server.close()
    await server.wait_closed()
    await service.aclose()


async def test_connections_over_the_per_host_cap_are_told_why() -> None:
    async with netlib.open_chat_server(max_connections_per_host=1) as server:
        first = await LineClient.connect(tcp_port(server))
        reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port(server))
        async with asyncio.timeout(2.0):
            assert await reader.read() == (
                b"*** disconnected: too many connections from your address (limit 1)\n"
            )
        writer.close()
        await first.aclose()


async def test_the_chat_logs_joins_quits_with_reasons_and_statistics_at_shutdown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="netlib.chat")
    async with chat_server(line_timeout=0.3) as server:
        port = tcp_port(server)
        alice = await LineClient.connect(port)
        alice.send("/nick alice", "/quit")
        await alice.closed()
        trickler = await LineClient.connect(port)
        trickler.send("never ends", end=b"")
        await trickler.closed()
        broken = await LineClient.connect(port)
        broken.send("half a line", end=b"")
        broken.writer.write_eof()
        await broken.closed()
        await wait_until(lambda: server.service.statistics().sessions == 0)
        for client in (alice, trickler, broken):
            await client.aclose()
    logged = [r.getMessage() for r in caplog.records if r.name == "netlib.chat"]
    joins = [line for line in logged if line.startswith("join: ")]
    assert len(joins) == 3
    assert re.fullmatch(r"join: guest1 from 127\.0\.0\.1:\d+ \(session 1\)", joins[0])
    quits = [line for line in logged if line.startswith("quit: ")]
    assert quits[0] == "quit: alice (session 1): quit"
    assert quits[1] == ("quit: guest2 (session 2): timed out (a message took longer than 0.3s)")
    assert quits[2].startswith("quit: guest3 (session 3): protocol error: ")
    assert logged[-1].startswith("chat statistics: chat: 3 sessions opened, 0 open, ")
    assert "tcp: 3 accepted, 0 open" in logged[-1]


class NullSession:
    session_id = 0

    def deliver(self, line: bytes, origin: Hashable) -> None:
        return None

    def end(self, reason: str) -> None:
        return None

    def abort(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None


async def test_a_flood_of_connections_cannot_flood_the_chat_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="netlib.chat")
    service = ChatService()
    ids = [service.open(NullSession(), address=f"192.0.2.1:{port}") for port in range(500)]
    for session_id in ids:
        service.close(session_id, "connection lost")
    logged = [r.getMessage() for r in caplog.records if r.name == "netlib.chat"]
    assert len([line for line in logged if line.startswith("join: ")]) == CHAT_LOG_BURST
    assert len([line for line in logged if line.startswith("quit: ")]) == CHAT_LOG_BURST
    await service.aclose()


async def test_protocol_on_its_own_with_create_server() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(netlib.ChatProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    alice = await LineClient.connect(port)
    bob = await LineClient.connect(port)
    alice.send("shared default service")
    await bob.expect("shared default service")
    await alice.aclose()
    await bob.aclose()
    server.close()
    await server.wait_closed()
    await ChatService.default().aclose()


async def test_chat_handler_through_serve_tcp() -> None:
    service = ChatService()
    async with netlib.open_tcp_server(netlib.make_chat_handler(service), framing="line") as server:
        port = server.addresses[0][1]
        alice = await LineClient.connect(port)
        bob = await LineClient.connect(port)
        alice.send("/nick alice", "through serve_tcp")
        assert await bob.expect("<alice>") == "[#lobby] <alice> through serve_tcp"
        alice.send("/quit")
        await alice.expect("*** goodbye")
        await alice.closed()
        await bob.expect("alice quit")
        await alice.aclose()
        await bob.aclose()
    await service.aclose()


# -- UDP ------------------------------------------------------------------------------------


class UdpChatClient:
    def __init__(self, endpoint: netlib.DatagramEndpoint) -> None:
        self.endpoint = endpoint

    async def join(self) -> None:
        await self.endpoint.send(b"/hello".ljust(HELLO_REPLY_SIZE))
        hello, _ = await asyncio.wait_for(self.endpoint.receive(), 2.0)
        assert hello.startswith(b"*** hello ")
        await self.endpoint.send(b"/hello " + hello.split()[-1])
        await self.expect("*** welcome")

    async def expect(self, fragment: str) -> str:
        async with asyncio.timeout(2.0):
            while True:
                data, _ = await self.endpoint.receive()
                if fragment in data.decode():
                    return data.decode().removesuffix("\n")


async def test_udp_and_tcp_clients_share_a_room() -> None:
    async with chat_server("both") as server:
        tcp = await LineClient.connect(tcp_port(server))
        async with netlib.open_udp_endpoint(*server.udp_addresses[0][:2]) as endpoint:
            udp = UdpChatClient(endpoint)
            await udp.join()
            await endpoint.send(b"/nick carol")
            await tcp.expect("now known as carol")
            await endpoint.send(b"hi from udp")
            assert await tcp.expect("<carol>") == "[#lobby] <carol> hi from udp"
            tcp.send("hi from tcp")
            assert await udp.expect("hi from tcp") == "[#lobby] <guest1> hi from tcp"
            await endpoint.send(b"/quit")
            await udp.expect("*** goodbye")
            await tcp.expect("carol quit")
        await tcp.aclose()


async def test_an_nc_user_joins_over_udp_gets_whole_lines_and_hears_the_shutdown() -> None:
    async with AsyncExitStack() as stack:
        async with chat_server("both") as server:
            tcp = await LineClient.connect(tcp_port(server))
            address = server.udp_addresses[0][:2]
            nc = await stack.enter_async_context(netlib.open_udp_endpoint(*address))
            await nc.send(b"hi\n")  # unverified: no reply could be smaller than this
            await nc.send(b"/hello " + b"." * 59 + b"\n")  # what docs/chat.md says to type
            guide = (await asyncio.wait_for(nc.receive(), 2.0))[0].decode()
            assert guide.startswith("*** hello ")
            assert guide.endswith("\n")
            assert len(guide) <= 67
            await nc.send(guide.split("to join, send: ")[1].encode())  # copied, with its \n
            welcome = (await asyncio.wait_for(nc.receive(), 2.0))[0].decode()
            assert welcome.startswith("*** welcome, guest2!")
            assert welcome.endswith("\n")
            await nc.send(b"hello from nc\n")
            assert await tcp.expect("<guest2>") == "[#lobby] <guest2> hello from nc"
            tcp.send("hi nc")
            data, _ = await asyncio.wait_for(nc.receive(), 2.0)
            assert data == b"[#lobby] <guest1> hi nc\n"
            await tcp.aclose()
        data, _ = await asyncio.wait_for(nc.receive(), 2.0)
        assert data == b"*** server shutting down\n"
    assert server.service.statistics().sessions == 0


async def test_udp_peers_expire_when_silent_and_heartbeats_keep_them() -> None:
    service = ChatService()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DatagramChatProtocol(service, peer_timeout=0.3), local_addr=("127.0.0.1", 0)
    )
    address = transport.get_extra_info("sockname")
    async with (
        netlib.open_udp_endpoint(*address) as keeper_ep,
        netlib.open_udp_endpoint(*address) as silent_ep,
    ):
        keeper, silent = UdpChatClient(keeper_ep), UdpChatClient(silent_ep)
        await keeper.join()
        await silent.join()
        assert protocol.peers == 2
        for _ in range(8):  # heartbeats every 0.1 s for 0.8 s
            await keeper_ep.send(b"")
            await asyncio.sleep(0.1)  # the client's heartbeat interval
        assert protocol.peers == 1
        assert "guest2 quit (timed out)" in await keeper.expect("quit")
    transport.close()
    await service.aclose()


class RecordingTransport(asyncio.DatagramTransport):
    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[Any, int] = {}

    def sendto(self, data: Any, addr: Any = None) -> None:
        self.sent[addr] = self.sent.get(addr, 0) + len(data)

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def close(self) -> None:
        return None


async def test_spoofed_sources_cannot_amplify_through_udp_chat() -> None:
    service = ChatService()
    protocol = DatagramChatProtocol(service)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    rng = random.Random(5)
    received: dict[Any, int] = {}
    for _ in range(10_000):
        addr = (f"198.51.100.{rng.randrange(256)}", rng.randrange(1, 65536))
        data = rng.randbytes(rng.randint(1, 1500))
        received[addr] = received.get(addr, 0) + len(data)
        protocol.datagram_received(data, addr)
    assert protocol.peers == 0  # no forged source became a session
    assert service.statistics().opened == 0
    for addr, size in transport.sent.items():
        assert size <= received[addr]  # never more than an unverified address sent
    protocol.connection_lost(None)
    await service.aclose()


def forged_chat_source(i: int) -> tuple[str, int]:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + i % 50_000


async def test_udp_chat_never_answers_empty_or_short_datagrams_from_unknown_sources() -> None:
    """The chat answered every datagram from an unknown address, even an empty one, with a
    26-byte cookie: 50,000 of 50,000 forged sources were answered."""
    service = ChatService()
    protocol = DatagramChatProtocol(service)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    sources = 5 * DEFAULT_MAX_SOURCES
    short_hello = b"/hello".ljust(HELLO_REPLY_SIZE - 1)
    for i in range(sources):
        for data in (b"", b"x", b"/hello", short_hello):
            protocol.datagram_received(data, forged_chat_source(i))
    assert transport.sent == {}  # not one reply
    stats = protocol.chat_statistics()
    assert stats.dropped_unverified == 4 * sources
    assert stats.cookies_sent == 0
    assert stats.budget.sources == 0  # and no state for any of them
    protocol.datagram_received(b"/hello".ljust(HELLO_REPLY_SIZE), ("192.0.2.1", 5))
    assert transport.sent == {("192.0.2.1", 5): HELLO_REPLY_SIZE}  # a padded hello: 1x
    protocol.connection_lost(None)
    await service.aclose()


def handshake(protocol: DatagramChatProtocol, addr: tuple[str, int]) -> None:
    protocol.datagram_received(b"/hello" + b" " * 26, addr)
    protocol.datagram_received(b"/hello " + protocol.core.cookie(addr), addr)


async def test_handshakes_from_one_host_cannot_fill_the_udp_peer_table() -> None:
    service = ChatService()
    protocol = DatagramChatProtocol(service)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for port in range(1, 2_001):  # one host, many ports, each proven by its cookie
        handshake(protocol, ("192.0.2.1", port))
    stats = protocol.chat_statistics()
    assert protocol.peers == stats.joined == MAX_UDP_PEERS_PER_HOST
    assert stats.refused_host_full == 2_000 - MAX_UDP_PEERS_PER_HOST
    handshake(protocol, ("192.0.2.2", 1))  # other hosts still join
    assert protocol.peers == MAX_UDP_PEERS_PER_HOST + 1
    protocol.connection_lost(None)
    await service.aclose()


async def test_udp_deliveries_are_dropped_and_counted_while_the_send_buffer_is_full() -> None:
    service = ChatService()
    protocol = DatagramChatProtocol(service)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    talker, listener = ("192.0.2.1", 1), ("192.0.2.2", 2)
    handshake(protocol, talker)
    handshake(protocol, listener)
    await wait_until(lambda: transport.sent.get(listener, 0) > HELLO_REPLY_SIZE)  # welcome
    protocol.pause_writing()  # the socket's buffer is above its high mark
    before = dict(transport.sent)
    protocol.datagram_received(b"nobody hears this now", talker)
    await wait_until(lambda: protocol.statistics().send_dropped >= 1)
    assert transport.sent == before  # dropped at once, not buffered in user space
    protocol.resume_writing()
    protocol.datagram_received(b"heard again", talker)
    await wait_until(lambda: transport.sent[listener] > before[listener])
    protocol.connection_lost(None)
    await service.aclose()


async def test_udp_peer_table_is_bounded() -> None:
    service = ChatService()
    protocol = DatagramChatProtocol(service, max_peers=500)
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for i in range(600):
        handshake(protocol, (f"198.51.100.{i % 250}", 1000 + i))
    stats = protocol.chat_statistics()
    assert protocol.peers == 500
    assert stats.refused_full == 100
    assert MAX_UDP_PEERS >= 10_000 > 0
    protocol.connection_lost(None)
    await service.aclose()


@pytest.mark.parametrize("lines", [["/quit"], ["over"]])
async def test_ending_words(lines: list[str]) -> None:
    async with chat_server() as server:
        client = await LineClient.connect(tcp_port(server))
        client.send(*lines)
        await client.expect("*** goodbye")
        await client.closed()
        await client.aclose()


class FailingHub(netlib.MemoryHub):
    """A hub whose broker refuses one publish."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = False

    async def publish(
        self, room: str, line: bytes, origin: Hashable, *, said: bool = False
    ) -> None:
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("broker unavailable")
        await super().publish(room, line, origin, said=said)


async def test_a_failed_hub_publish_does_not_stop_the_chat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hub = FailingHub()
    service = ChatService(hub=hub)
    async with netlib.open_chat_server(service=service) as server:
        alice = await LineClient.connect(tcp_port(server))
        bob = await LineClient.connect(tcp_port(server))
        hub.fail_next = True
        alice.send("lost to the broker", "after the outage")
        assert await bob.expect("<guest1>") == "[#lobby] <guest1> after the outage"
        await alice.aclose()
        await bob.aclose()
    assert service.statistics().effect_errors == 1
    assert any("chat effect" in r.getMessage() for r in caplog.records)
    await service.aclose()
