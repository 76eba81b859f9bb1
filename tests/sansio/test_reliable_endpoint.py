"""ReliableServerCore: the stateless cookie handshake, caps, demultiplexing (R12, R13)."""

from __future__ import annotations

import functools
import gc
import hashlib
import tracemalloc
from collections import defaultdict
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netlib.sansio.reliable.connection import (
    CloseCode,
    ConnectionClosed,
    ConnectionState,
    MessageReceived,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import (
    COOKIE_LIFETIME,
    RESCHEDULE_SLACK,
    ReliableServerCore,
)
from netlib.sansio.reliable.simulation import LinkProfile, Simulation, SplitMix64
from netlib.sansio.reliable.wire import (
    HEADER,
    MIN_HELLO_SIZE,
    PacketType,
    check_datagram,
    encode_hello,
    encode_packet,
)

from .rudp import CLIENT, KEY, Recorder, connected_pair, echo

ALICE: Hashable = ("192.0.2.20", 50000)


def hello(cid: int = 7, token: bytes = b"", pn: int = 0) -> bytes:
    return encode_hello(cid, pn, 100, 1000, 65536, token)


def cookie_of(reply: bytes) -> bytes:
    return reply[HEADER.size + 1 : -4]


def test_a_first_hello_gets_a_small_cookie_and_leaves_no_state() -> None:
    core = ReliableServerCore(KEY)
    assert core.datagram_received(hello(), ALICE, 0.0) is None
    ((reply, addr),) = core.datagrams_to_send()
    assert addr == ALICE
    assert len(hello()) == MIN_HELLO_SIZE == 1200
    assert len(reply) == 35  # far below 3x the 1,200-byte HELLO
    assert check_datagram(reply) == (PacketType.COOKIE, 7, 0)
    assert cookie_of(reply) == core.cookie(ALICE, 7, 0.0)
    assert core.sessions == 0


def test_the_cookie_opens_a_connection_that_answers_with_accept() -> None:
    core = ReliableServerCore(KEY)
    core.datagram_received(hello(), ALICE, 0.0)
    token = cookie_of(core.datagrams_to_send()[0][0])
    conn = core.datagram_received(hello(token=token, pn=1), ALICE, 0.01)
    assert conn is not None
    assert core.accepted() == [conn]
    assert core.sessions == 1
    assert conn.peer_address == ALICE
    (accept,) = conn.datagrams_to_send(0.01)
    assert check_datagram(accept) == (PacketType.ACCEPT, 7, 0)
    # the same HELLO again (our ACCEPT was lost) reaches the same connection
    assert core.datagram_received(hello(token=token, pn=2), ALICE, 0.02) is conn
    assert core.sessions == 1
    assert len(conn.datagrams_to_send(0.02)) == 1


@pytest.mark.parametrize(
    ("addr", "cid", "now"),
    [
        (("192.0.2.21", 50000), 7, 0.0),  # another address
        (("192.0.2.20", 50001), 7, 0.0),  # another port
        (ALICE, 8, 0.0),  # another client cid
        (ALICE, 7, 2 * COOKIE_LIFETIME),  # too late
    ],
)
def test_a_cookie_is_bound_to_address_cid_and_time(addr: Hashable, cid: int, now: float) -> None:
    core = ReliableServerCore(KEY)
    token = core.cookie(ALICE, 7, 0.0)
    assert core.datagram_received(hello(cid, token), addr, now) is None
    ((reply, _),) = core.datagrams_to_send()  # a fresh cookie, no session
    assert check_datagram(reply) == (PacketType.COOKIE, cid, 0)
    assert core.sessions == 0
    assert core.statistics().bad_cookies == 1


def test_a_cookie_lives_between_one_and_two_lifetimes() -> None:
    core = ReliableServerCore(KEY)
    token = core.cookie(ALICE, 7, 0.0)
    assert core.datagram_received(hello(7, token), ALICE, COOKIE_LIFETIME * 1.99) is not None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"x",
        hello()[:-1],  # checksum broken
        hello()[: MIN_HELLO_SIZE - 100],
        encode_packet(PacketType.HELLO, 0, 0, bytes(200)),  # a sound but short HELLO
        encode_packet(PacketType.DATA, 0, 0, b"\x03"),  # not a HELLO
        encode_packet(PacketType.DATA, 12345, 0, b"\x03"),  # an unknown connection
        encode_packet(PacketType.COOKIE, 0, 0, bytes(1300)),
        bytes([9]) + hello()[1:],  # another version
    ],
)
def test_anything_else_from_an_unknown_address_gets_nothing(data: bytes) -> None:
    core = ReliableServerCore(KEY)
    assert core.datagram_received(data, ALICE, 0.0) is None
    assert core.datagrams_to_send() == []
    assert core.sessions == 0


def test_packets_for_a_connection_from_another_address_are_dropped() -> None:
    sim, client, _ = connected_pair()
    (conn,) = sim.server.connections()
    client.send(b"hi")
    (packet,) = client.datagrams_to_send(sim.now)
    assert sim.server.datagram_received(packet, ("203.0.113.9", 1), sim.now) is None
    assert sim.server.statistics().unknown_dropped == 1
    assert sim.server.datagram_received(packet, CLIENT, sim.now) is conn


def test_sessions_and_sessions_per_host_are_capped() -> None:
    core = ReliableServerCore(KEY, max_sessions=3, max_sessions_per_host=2)
    sim = Simulation(core, on_server_event=echo)
    clients = [sim.connect(100 + i, ("192.0.2.1", 1000 + i)) for i in range(3)]
    clients.append(sim.connect(200, ("192.0.2.2", 1000)))
    clients.append(sim.connect(300, ("192.0.2.3", 1000)))
    events: dict[int, list[object]] = defaultdict(list)
    sim.on_client_event = lambda conn, event: events[conn.cid].append(event)
    sim.run(limit=1.0)
    states = [c.state for c in clients]
    assert states.count(ConnectionState.ESTABLISHED) == 3
    assert events[102][-1] == ConnectionClosed(CloseCode.HOST_FULL, "host full", by_peer=True)
    assert events[300][-1] == ConnectionClosed(CloseCode.SERVER_FULL, "server full", by_peer=True)
    stats = core.statistics()
    assert (stats.sessions, stats.refused_full, stats.refused_host_full) == (3, 1, 1)


def test_closed_connections_leave_the_tables() -> None:
    sim, client, _ = connected_pair()
    client.close()
    assert sim.run(lambda: sim.server.sessions == 0, limit=sim.now + 5)
    assert client.state is ConnectionState.CLOSED


def test_one_deadline_for_the_endpoint() -> None:
    sim, _client, _ = connected_pair()
    core = sim.server
    (conn,) = core.connections()
    deadline = core.next_deadline()
    assert deadline is not None
    assert deadline <= (conn.next_deadline() or 0)
    assert core.handle_timer(deadline - 1) == []


def test_the_endpoint_s_deadline_follows_a_connection_s_deadline_that_moved_later() -> None:
    """A request sets the server's acknowledgement deadline; a handler answers half a
    millisecond later, as a task woken by the request does, and its reply carries the
    acknowledgement: the connection's deadline moves later, to the reply's probe timeout.
    The endpoint reports that one, not the moot one, which would wake the loop for nothing
    once per request."""
    requests = Recorder()
    sim, client, replies = connected_pair(server_events=requests)
    core = sim.server
    (conn,) = core.connections()
    for i in range(5):
        client.send(b"%d" % i)
        assert sim.run(lambda: len(requests.messages) > len(replies.messages), limit=sim.now + 1)
        moot = conn.next_deadline()
        assert moot is not None
        registered = core.next_deadline()  # the acknowledgement's, a delay away
        assert registered is not None
        assert moot - RESCHEDULE_SLACK < registered <= moot
        sim.at(sim.now + 0.0005, functools.partial(conn.send, requests.messages[-1]))
        assert sim.run(lambda: len(replies.messages) == len(requests.messages), limit=sim.now + 1)
        assert sim.now < moot  # answered within the acknowledgement delay
        deadline = conn.next_deadline()
        assert deadline is not None
        assert deadline - moot >= RESCHEDULE_SLACK
        assert core.next_deadline() == deadline


def test_the_timer_heap_stays_small_on_a_busy_connection() -> None:
    sim, client, _ = connected_pair()
    sizes = []
    for i in range(300):  # an echo every 50 ms: busy, quiet, busy...
        sim.at(sim.now + 0.05 * i, functools.partial(client.send, b"%d" % i))
    for _ in range(300):
        sim.run(limit=sim.now + 0.05)
        sizes.append(len(sim.server._heap))
    assert max(sizes) <= 2 + 64


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="key"):
        ReliableServerCore(b"short")
    with pytest.raises(ValueError, match="max_sessions"):
        ReliableServerCore(KEY, max_sessions=0)


# -- R12: amplification ----------------------------------------------------------------------


class Ledger:
    """Bytes received from and sent to each address, and replies to small datagrams."""

    def __init__(self, core: ReliableServerCore) -> None:
        self.core = core
        self.received: dict[Hashable, int] = defaultdict(int)
        self.sent: dict[Hashable, int] = defaultdict(int)
        self.small_answered = 0

    def feed(self, data: bytes, addr: Hashable, now: float) -> None:
        conn = self.core.datagram_received(data, addr, now)
        assert conn is None  # nobody here proves an address
        self.received[addr] += len(data)
        replies = self.core.datagrams_to_send()
        if replies and len(data) < MIN_HELLO_SIZE:
            self.small_answered += 1
        for reply, to in replies:
            self.sent[to] += len(reply)

    def check(self) -> None:
        assert self.small_answered == 0
        for addr, sent in self.sent.items():
            assert sent <= 3 * self.received[addr], addr
        assert self.core.sessions == 0


def forged(rng: SplitMix64, size: int) -> bytes:
    """A datagram of ``size`` bytes: junk, a sound HELLO, or a HELLO with a forged cookie."""
    kind = rng.below(3)
    if kind == 0 or size < HEADER.size + 16:
        return rng.bytes(size)
    token = b"" if kind == 1 else rng.bytes(20)
    body = encode_hello(rng.below(1 << 32) or 1, rng.below(1 << 32), 100, 1000, 1 << 20, token)
    if size <= len(body):
        head = body[: size - 4]
        return encode_packet(PacketType.HELLO, 0, 0, head[HEADER.size :])
    return encode_packet(PacketType.HELLO, 0, 0, body[HEADER.size : -4] + bytes(size - 1200))


def test_r12_ten_thousand_forged_datagrams_never_amplify() -> None:
    """10,000 datagrams of 1-1,500 bytes from forged addresses: per address, sent <= 3x
    received, and no datagram under 1,200 bytes gets any reply."""
    core = ReliableServerCore(KEY)
    ledger = Ledger(core)
    rng = SplitMix64(12)
    for i in range(10_000):
        size = 1 + rng.below(1500)
        ledger.feed(forged(rng, size), (f"203.0.113.{i % 50}", 4000), i * 0.001)
    ledger.check()
    stats = core.statistics()
    assert stats.cookies_sent > 1000  # the sound, large HELLOs were answered
    assert stats.small_hello_dropped > 1000
    assert sum(ledger.sent.values()) < sum(ledger.received.values()) / 10


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(min_size=1, max_size=1500), st.integers(0, 7), st.booleans()),
        min_size=1,
        max_size=100,
    )
)
def test_r12_hypothesis_contents_never_amplify(
    datagrams: list[tuple[bytes, int, bool]],
) -> None:
    """Hypothesis-made contents, raw or wrapped in a sound packet of any type."""
    core = ReliableServerCore(KEY)
    ledger = Ledger(core)
    for data, source, wrap in datagrams:
        packet = data
        if wrap and len(data) > HEADER.size + 4:
            ptype = data[0] % 6
            packet = encode_packet(ptype, 0, 0, data[HEADER.size : -4])
        ledger.feed(packet, ("198.51.100.1", 1000 + source), 0.0)
    ledger.check()


# -- R13: spoofing and flood ---------------------------------------------------------------


def test_r13_flood_from_forged_sources_keeps_no_state_then_a_transfer_completes() -> None:
    """100,000 datagrams from 50,000 forged sources: no session, no per-source state
    (tracemalloc growth under 10 MiB), then a legitimate 1 MiB transfer completes."""
    core = ReliableServerCore(KEY, max_sessions=100)
    rng = SplitMix64(13)
    junk = rng.bytes(1500)
    datagrams = []
    for i in range(200):  # a pool of shapes; the sources are what varies
        size = 1 + rng.below(1500)
        datagrams.append(forged(rng, size) if i % 2 else junk[:size])
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        replies = 0
        for i in range(100_000):
            source = (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1024 + i % 50_000)
            core.datagram_received(datagrams[i % 200], source, i * 1e-5)
            if i % 1000 == 999:
                replies += len(core.datagrams_to_send())  # the adapter sends them
        replies += len(core.datagrams_to_send())
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert growth < 10 * 1024 * 1024
    assert growth < 256 * 1024  # in fact nothing per source is kept at all
    assert core.sessions == 0
    assert replies > 5_000  # cookies went to the large HELLOs
    server = Recorder()
    sim = Simulation(core, up=LinkProfile(delay=0.005), seed=3, on_server_event=server)
    server.sim = sim
    sim.now = 2.0
    client = sim.connect(4242, CLIENT)
    data = hashlib.sha256(b"r13").digest() * (1024 * 1024 // 32)
    assert sim.run(lambda: client.state is ConnectionState.ESTABLISHED, limit=10.0)
    client.send(data)
    assert sim.run(lambda: len(server.messages) == 1, limit=60.0)
    assert server.messages == [data]
    assert core.sessions == 1


def test_the_server_core_pumps_events_of_its_connections() -> None:
    received: list[bytes] = []

    def collect(conn: ReliableConnection, event: object) -> None:
        if isinstance(event, MessageReceived):
            received.append(event.data)

    sim, client, _ = connected_pair()
    sim.on_server_event = collect
    client.send(b"ping")
    assert sim.run(lambda: received == [b"ping"], limit=sim.now + 1)


def test_forged_traffic_injected_into_a_simulation_goes_nowhere() -> None:
    sim, client, replies = connected_pair()
    sim.inject(hello(99), ("203.0.113.50", 9))  # a cookie goes to an address nobody has
    sim.inject(b"junk", CLIENT)
    client.send(b"still here")
    assert sim.run(lambda: replies.messages == [b"still here"], limit=sim.now + 1)
    assert sim.stray_replies == 1
    assert sim.server.statistics().cookies_sent == 2  # the client's own, and the forged one
    assert sim.server.statistics().corrupt_dropped == 1
