"""Path MTU discovery in the reliable-UDP core: probes, the search, black holes, limits.

On the seeded lossy link of ``simulation.py`` with a path MTU: a datagram above it is
dropped, as a router does when fragmentation is forbidden.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netlib.sansio.reliable.connection import (
    DEFAULT_SERVER_ACK_DELAY,
    ConnectionState,
    MessageReceived,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import ReliableServerCore
from netlib.sansio.reliable.pmtu import MAX_PROBES, PROBE_SIZES, RAISE_INTERVAL, PathMtu
from netlib.sansio.reliable.recovery import INITIAL_WINDOW, MIN_DATAGRAMS
from netlib.sansio.reliable.simulation import LinkProfile, LossyLink, Simulation
from netlib.sansio.reliable.wire import (
    BASE_DATAGRAM,
    FLAG_FIRST,
    FLAG_LAST,
    FLAG_UNORDERED,
    MAX_DATAGRAM,
    UNIT,
)

from .rudp import (
    CLIENT,
    ETHERNET,
    KEY,
    Recorder,
    connected_pair,
    data_packet,
    numbered,
    stream_messages,
)

MiB = 1024 * 1024


def expected_size(mtu: int | None, ceiling: int = MAX_DATAGRAM) -> int:
    """Where the search ends on a clean path: the ceiling if it fits, else the largest
    common size that fits (or the base)."""
    if mtu is None or mtu >= ceiling:
        return ceiling
    return max([BASE_DATAGRAM] + [s for s in PROBE_SIZES if s <= mtu])


def server_conn(sim: Simulation) -> ReliableConnection:
    (conn,) = sim.server.connections()
    return conn


def transfer(sim: Simulation, client: ReliableConnection, server: Recorder, size: int) -> bytes:
    """Send ``size`` bytes in 16 KiB messages and check that they arrive intact."""
    data = hashlib.sha256(b"%d" % len(server.messages)).digest() * (size // 32)
    messages = [data[i : i + 16384] for i in range(0, len(data), 16384)]
    before = len(server.messages)
    stream_messages(sim, client, messages)
    assert sim.run(lambda: len(server.messages) - before == len(messages), limit=sim.now + 120)
    assert b"".join(server.messages[before:]) == data
    return data


@pytest.mark.parametrize("mtu", [None, 65507, 8972, 1500 - 28, 1420 - 28, 1300, BASE_DATAGRAM])
def test_the_sender_converges_to_the_largest_size_that_fits(mtu: int | None) -> None:
    link = LinkProfile(delay=0.002, mtu=mtu)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, server_events=server)
    sim.run(limit=sim.now + 1.0)
    conn = server_conn(sim)
    for side in (client, conn):
        stats = side.statistics()
        assert stats.datagram_size == expected_size(mtu)
        assert stats.losses_detected == 0  # lost probes are no losses ...
        assert stats.congestion_window >= INITIAL_WINDOW  # ... and no congestion
        assert stats.datagram_fallbacks == 0
    assert sim.up.too_big == client.statistics().mtu_probes_lost
    transfer(sim, client, server, MiB)
    assert client.statistics().datagram_size == expected_size(mtu)
    assert sim.up.too_big == client.statistics().mtu_probes_lost  # data never exceeded it


def test_large_datagrams_carry_several_units_per_frame() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    sim.run(limit=sim.now + 0.1)
    assert client.datagram_size == MAX_DATAGRAM
    before = client.statistics().datagrams_sent
    transfer(sim, client, server, 4 * MiB)
    sent = client.statistics().datagrams_sent - before
    assert sent < 4 * MiB // 60000  # about 64 datagrams of 65,527 bytes, not 3,600 of 1,200
    assert client.statistics().congestion_window >= MIN_DATAGRAMS * MAX_DATAGRAM


def test_lost_probes_are_not_congestion_and_are_not_resent() -> None:
    """A path of 1,472 bytes: the ceiling (65,527) and 8,952 fail three times each."""
    link = LinkProfile(delay=0.005, mtu=ETHERNET)
    sim, client, _ = connected_pair(up=link, down=link)
    sim.run(limit=sim.now + 2.0)
    stats = client.statistics()
    assert stats.datagram_size == ETHERNET
    assert stats.mtu_probes_lost == 2 * MAX_PROBES == sim.up.too_big
    assert stats.mtu_probes_sent == 2 * MAX_PROBES + 3  # and 1,372, 1,452, 1,472 acknowledged
    assert stats.losses_detected == stats.retransmissions == 0
    assert stats.congestion_window >= INITIAL_WINDOW  # never reduced
    assert stats.bytes_in_flight == 0  # probes are outside the window


def test_probe_losses_on_a_lossy_path_are_retried() -> None:
    """At 10% random loss the search still ends at the path's size. Three probe timeouts in
    a row happen at that loss rate now and then (persistent congestion), and fall back to the
    base size at once; the next probe restores the size, so a fallback stays rare (7 to 8 in
    20 seeds of this transfer, none more than twice)."""
    link = LinkProfile(delay=0.005, loss=0.1, mtu=ETHERNET)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, seed=3, server_events=server)
    sim.run(limit=sim.now + 3.0)
    transfer(sim, client, server, MiB // 2)
    stats = client.statistics()
    assert stats.datagram_size == ETHERNET
    assert stats.mtu_probes_lost >= 2 * MAX_PROBES
    assert stats.datagram_fallbacks <= 2


@pytest.mark.parametrize("narrower", [ETHERNET, BASE_DATAGRAM])
def test_a_black_hole_falls_back_and_the_search_finds_the_new_size(narrower: int) -> None:
    """The path carries 65,527 bytes, then (a route change mid-transfer) only ``narrower``:
    the large datagrams vanish; the sender falls back to the base size, resends, searches
    again and settles on the new size; every byte arrives once, in order."""
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server, seed=5)
    sim.run(limit=sim.now + 0.1)
    assert client.datagram_size == MAX_DATAGRAM
    narrowed = LinkProfile(
        delay=0.001,
        bandwidth=50e6,
        queue=4 * MiB,
        mtu_after=narrower,
        mtu_change=sim.now + 0.05,  # a third of the way
    )
    sim.up = LossyLink(narrowed, 1)
    begin = sim.now
    transfer(sim, client, server, 8 * MiB)
    assert sim.now - begin > 0.15
    sim.run(limit=sim.now + 1.0)  # the search after the fallback may still be under way
    stats = client.statistics()
    assert stats.datagram_fallbacks >= 1
    assert stats.datagram_size == expected_size(narrower)
    assert sim.up.too_big > 0
    assert stats.messages_sent == 512


def test_a_pinned_size_sends_no_probe_and_binds_the_peer_too() -> None:
    pinned = ReliableConfig(max_datagram=BASE_DATAGRAM)
    core = ReliableServerCore(KEY, config=pinned)  # only the server pins its size
    server = Recorder()
    sim, client, _ = connected_pair(server=core, server_events=server)
    transfer(sim, client, server, MiB)
    for side in (client, server_conn(sim)):
        stats = side.statistics()
        assert stats.mtu_probes_sent == 0
        assert stats.datagram_size == BASE_DATAGRAM
    sizes: list[int] = []

    class Sizes(LossyLink):
        def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
            sizes.append(len(data))
            return super().transmit(data, now)

    sim.up = Sizes(LinkProfile(delay=0.001), 1)
    transfer(sim, client, server, MiB)
    assert BASE_DATAGRAM - 50 < max(sizes) <= BASE_DATAGRAM


def test_a_limit_below_the_peers_caps_the_search() -> None:
    config = ReliableConfig(max_datagram=9000)
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server, config=config)
    sim.run(limit=sim.now + 0.5)
    assert client.datagram_size == 9000
    assert server_conn(sim).datagram_size == 9000  # the client accepts no more
    client.limit_datagram(ETHERNET)  # what the adapter learns of the interface
    assert client.datagram_size == BASE_DATAGRAM  # above the new ceiling: back to the base
    sim.at(sim.now, lambda: None)  # the adapter pumps the connection after the call
    sim.run(limit=sim.now + 0.5)
    assert client.datagram_size == ETHERNET


def test_a_datagram_the_stack_refuses_lowers_the_ceiling_at_once() -> None:
    """EMSGSIZE: the adapter hands the refused datagram back. A refused probe fails its size
    without waiting for a loss; refused data goes again in smaller datagrams."""
    client = ReliableConnection.connect(5, 0.0)
    core = ReliableServerCore(KEY)
    now = 0.0
    delivered: list[bytes] = []

    def exchange(mtu: int) -> None:
        conn = core.connections()[0] if core.sessions else None
        for packet in client.datagrams_to_send(now):
            if len(packet) > mtu:
                client.datagram_too_large(packet, now)  # never left the host
            else:
                core.datagram_received(packet, ("192.0.2.1", 9), now)
        for packet, _ in core.datagrams_to_send():  # the cookie
            client.datagram_received(packet, now)
        conn = core.connections()[0] if core.sessions else conn
        if conn is not None:
            for packet in conn.datagrams_to_send(now):
                client.datagram_received(packet, now)
            while (event := conn.next_event()) is not None:
                if hasattr(event, "data"):
                    delivered.append(event.data)

    for _ in range(8):
        exchange(8972)
        now += 0.01
        client.handle_timer(now)
        core.handle_timer(now)
    assert client.state is ConnectionState.ESTABLISHED
    stats = client.statistics()
    assert stats.datagram_size == 8972  # 65,527 refused once, 8,972 acknowledged
    assert stats.mtu_probes_lost == 1
    message = bytes(range(256)) * 100
    client.send(message)
    for _ in range(20):
        exchange(ETHERNET)  # the interface narrowed: the data packets are refused
        now += 0.01
        client.handle_timer(now)
        core.handle_timer(now)
    assert delivered == [message]
    stats = client.statistics()
    assert stats.datagram_fallbacks == 1
    assert stats.datagram_size <= ETHERNET
    assert stats.losses_detected == 0  # refused, not lost: no congestion response


@settings(max_examples=25, deadline=None)
@given(
    mtu=st.integers(BASE_DATAGRAM, MAX_DATAGRAM),
    delay=st.floats(0.0005, 0.05),
    seed=st.integers(1, 1000),
)
def test_search_property_any_path_mtu(mtu: int, delay: float, seed: int) -> None:
    """Whatever the path MTU, the sender ends at the largest size that fits among those it
    tries, sends no data above the path MTU, and never takes a probe for congestion."""
    link = LinkProfile(delay=delay, mtu=mtu)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, seed=seed, server_events=server)
    sim.run(limit=sim.now + 100 * delay + 0.5)
    stats = client.statistics()
    assert stats.datagram_size == expected_size(mtu)
    assert stats.datagram_size <= mtu
    assert stats.losses_detected == 0
    messages = [numbered(i, 3000) for i in range(60)]
    stream_messages(sim, client, messages)
    assert sim.run(lambda: len(server.messages) == 60, limit=sim.now + 30)
    assert server.messages == messages
    assert sim.up.too_big == client.statistics().mtu_probes_lost


# -- PathMtu alone ---------------------------------------------------------------------------


def test_path_mtu_search_order() -> None:
    pmtu = PathMtu(MAX_DATAGRAM)
    assert pmtu.next_probe(0.0) == 0  # not before the connection is established
    pmtu.start(9000)  # the peer accepts 9,000
    tried = []
    while size := pmtu.next_probe(0.0):
        pmtu.probe_sent(size)
        tried.append(size)
        if size <= 1500:
            pmtu.probe_acked(size)
        else:
            pmtu.probe_lost(size)
    assert tried == [9000] * MAX_PROBES + [1372, 1452, 1472] + [8952] * MAX_PROBES
    assert pmtu.size == 1472
    assert not pmtu.searching
    assert pmtu.next_probe(RAISE_INTERVAL - 1) == 0
    assert pmtu.next_probe(RAISE_INTERVAL + 1) == 9000  # the raise timer: the ceiling again


def test_path_mtu_black_hole_needs_a_failed_confirmation() -> None:
    pmtu = PathMtu(MAX_DATAGRAM)
    pmtu.start(MAX_DATAGRAM)
    pmtu.probe_sent(pmtu.next_probe(0.0))
    assert pmtu.probe_acked(MAX_DATAGRAM)
    pmtu.acked(10, MAX_DATAGRAM)
    pmtu.loss_burst([(5, MAX_DATAGRAM)])  # explained: packet 10, as large, arrived
    pmtu.loss_burst([(20, 3000), (21, BASE_DATAGRAM)])  # a base-size packet lost too
    assert pmtu.next_probe(1.0) == 0
    for pn in (30, 40, 50):  # three suspicious bursts: confirm the size with a probe
        pmtu.loss_burst([(pn, MAX_DATAGRAM), (pn + 1, MAX_DATAGRAM)])
    assert pmtu.next_probe(1.0) == MAX_DATAGRAM
    pmtu.probe_sent(MAX_DATAGRAM)
    assert not pmtu.probe_acked(MAX_DATAGRAM)  # confirmed: no black hole
    assert pmtu.next_probe(1.0) == 0
    for pn in (60, 70, 80):
        pmtu.loss_burst([(pn, MAX_DATAGRAM)])
    fell = False
    for _ in range(MAX_PROBES):
        size = pmtu.next_probe(2.0)
        assert size == MAX_DATAGRAM
        pmtu.probe_sent(size)
        fell = pmtu.probe_lost(size)
    assert fell
    assert pmtu.size == BASE_DATAGRAM
    assert pmtu.fallbacks == 1
    assert pmtu.next_probe(2.0) == MAX_DATAGRAM  # the search starts again at once


# -- runs of units on the receiving side ------------------------------------------------------


def test_runs_and_their_smaller_resends_are_reassembled_once() -> None:
    """A run of three units and pieces of it, in every overlap a fallback can cause: each
    message is delivered once and whole, and nothing stays buffered."""
    sim, client, _ = connected_pair(server_events=Recorder())
    sim.on_server_event = None  # the test takes the server's events itself
    conn = server_conn(sim)
    base = client._next_dseq
    pn = client._next_pn + 100
    m, n, u = (bytes([i]) * 3000 for i in (1, 2, 3))
    first, last = FLAG_FIRST, FLAG_LAST
    frames: list[tuple[int, int, bytes]] = [
        (0, base + 1, m[UNIT : 2 * UNIT]),  # a piece ahead of the cumulative point: held
        (first | last, base, m),  # the whole run: the held piece is dropped as a copy
        (first, base, m[:UNIT]),  # an old piece: a duplicate
        (first, base + 3, n[:UNIT]),  # the first piece of N, in order
        (first | last, base + 3, n),  # the whole of N: its first unit is cut off
        (last | FLAG_UNORDERED, base + 7, u[UNIT:]),  # the end of an unordered U, held
        (first | FLAG_UNORDERED, base + 6, u[:UNIT]),  # its start: U is whole
        (first | last | FLAG_UNORDERED, base + 6, u),  # U again, whole: a duplicate
    ]
    for i, frame in enumerate(frames):
        sim.server.datagram_received(data_packet(conn, pn + i, frame), CLIENT, sim.now)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    assert [e.data for e in events if isinstance(e, MessageReceived)] == [m, n, u]
    assert conn.receive_buffered == 0
    assert conn.duplicate_fragments == 2
    assert conn.state is ConnectionState.ESTABLISHED


def test_a_run_that_is_not_whole_units_is_a_protocol_error() -> None:
    sim, client, _ = connected_pair(server_events=Recorder())
    conn = server_conn(sim)
    bad = data_packet(conn, client._next_pn + 5, (FLAG_FIRST, client._next_dseq, bytes(2000)))
    sim.server.datagram_received(bad, CLIENT, sim.now)
    assert conn.state is ConnectionState.CLOSED
    assert conn.statistics().corrupt_dropped == 0


def test_the_packet_that_ends_a_bulk_send_is_acknowledged_at_once() -> None:
    """A sender that has sent all it has, with much in flight, asks for the acknowledgement
    at once (a PING in its last packet): a sender waiting for its buffer to drain would
    otherwise idle for the peer's ack delay. A small request still lets it ride later."""
    sim, client, _ = connected_pair(server_events=Recorder())  # no replies to ride on
    sim.run(limit=sim.now + 0.1)

    def acknowledged_after(message: bytes) -> float:
        begin = sim.now
        client.send(message)
        sim.at(sim.now, lambda: None)  # a step: the client is pumped
        assert sim.run(lambda: client.send_buffered == 0, limit=sim.now + 1)
        return sim.now - begin

    rtt = 0.002  # 1 ms each way
    assert acknowledged_after(bytes(30_000)) == pytest.approx(rtt, abs=0.0005)  # one datagram
    delayed = acknowledged_after(b"request")
    assert delayed == pytest.approx(rtt + DEFAULT_SERVER_ACK_DELAY, abs=0.0005)
