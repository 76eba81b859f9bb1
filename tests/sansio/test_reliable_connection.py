"""ReliableConnection: handshake, limits, flow control, close, timeouts, state machine."""

from __future__ import annotations

import functools
import itertools

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netlib.errors import ClosedResourceError, LimitExceeded, WouldBlock
from netlib.sansio.reliable.connection import (
    DEFAULT_ACK_DELAY,
    DEFAULT_SERVER_ACK_DELAY,
    Channel,
    CloseCode,
    Connected,
    ConnectionClosed,
    ConnectionState,
    ConnectionTimedOut,
    MessageReceived,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import ReliableServerCore
from netlib.sansio.reliable.simulation import LinkProfile, LossyLink
from netlib.sansio.reliable.wire import (
    BASE_DATAGRAM,
    FLAG_FIRST,
    FLAG_LAST,
    MAX_DATAGRAM,
    MAX_MESSAGE,
    MIN_HELLO_SIZE,
    UNIT,
    PacketType,
    check_datagram,
    encode_packet,
)

from .rudp import CLIENT, ETHERNET, KEY, Recorder, connected_pair, data_packet, numbered


def test_handshake_events_and_sizes() -> None:
    server = Recorder()
    sim, client, client_events = connected_pair(server_events=server)
    assert [e for _, e in client_events.events] == [Connected()]
    assert [e for _, e in server.events] == [Connected()]
    assert sim.up.sent == 5  # HELLO, HELLO with the cookie, ACK of ACCEPT, MTU probe, PING
    assert sim.down.sent == 2  # COOKIE, ACCEPT
    assert client.statistics().bytes_sent >= 2 * MIN_HELLO_SIZE
    assert client.statistics().smoothed_rtt == pytest.approx(0.002)


def test_handshake_retries_back_off_then_time_out() -> None:
    config = ReliableConfig(handshake_timeout=5.0)
    client = ReliableConnection.connect(9, 0.0, config)
    now = 0.0
    sent_at = []
    while client.state is ConnectionState.CONNECTING:
        for packet in client.datagrams_to_send(now):
            assert len(packet) >= MIN_HELLO_SIZE
            assert check_datagram(packet) is not None
            sent_at.append(now)
        deadline = client.next_deadline()
        assert deadline is not None
        now = deadline
        client.handle_timer(now)
    assert client.next_event() == ConnectionTimedOut("handshake")
    assert now == pytest.approx(5.0)
    gaps = [b - a for a, b in itertools.pairwise(sent_at)]
    assert gaps[:2] == pytest.approx([0.3, 0.6])
    assert max(gaps) == pytest.approx(1.0)


def test_send_limits() -> None:
    config = ReliableConfig(send_buffer=64 * 1024, receive_buffer=64 * 1024, max_message=8000)
    client = ReliableConnection.connect(9, 0.0, config)
    with pytest.raises(LimitExceeded, match="8001 bytes exceeds the limit of 8000"):
        client.send(bytes(8001))
    for _ in range(7):
        client.send(bytes(8000))
    with pytest.raises(WouldBlock, match="send buffer full"):
        client.send(bytes(8000))
    assert client.send_buffered <= 64 * 1024
    client.close()
    with pytest.raises(ClosedResourceError):
        client.send(b"x")
    assert client.next_event() == ConnectionClosed(0, "", by_peer=False)


def test_the_smaller_message_limit_of_the_two_sides_holds() -> None:
    small = ReliableConfig(max_message=64 * 1024)
    core = ReliableServerCore(KEY, config=small)
    _, client, _ = connected_pair(server=core)
    with pytest.raises(LimitExceeded, match="the limit of 65536 bytes"):
        client.send(bytes(64 * 1024 + 1))
    client.send(bytes(64 * 1024))
    (conn,) = core.connections()
    with pytest.raises(LimitExceeded, match="the limit of 65536 bytes"):
        conn.send(bytes(64 * 1024 + 1))


def test_datagrams_go_in_bursts_of_a_given_size() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    client.send(bytes(8 * 1156))  # eight datagrams, within the first congestion window
    assert len(client.datagrams_to_send(sim.now, limit=5)) == 5
    assert len(client.datagrams_to_send(sim.now, limit=5)) == 3
    assert client.datagrams_to_send(sim.now) == []


def test_an_empty_buffer_takes_one_message() -> None:
    client = ReliableConnection.connect(9, 0.0)
    client.send(bytes(MAX_MESSAGE))
    with pytest.raises(WouldBlock):
        client.send(bytes(MAX_MESSAGE))


def test_largest_and_empty_messages_arrive_whole() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    big = bytes(range(256)) * (MAX_MESSAGE // 256)
    client.send(b"")
    client.send(big)
    client.send(b"", Channel.UNORDERED)
    assert sim.run(lambda: len(server.messages) == 3, limit=sim.now + 10)
    assert sorted(server.messages, key=len) == [b"", b"", big]
    assert server.messages[1] == big or server.messages[2] == big


def test_clean_close_flushes_first() -> None:
    server = Recorder()
    sim, client, client_events = connected_pair(
        up=LinkProfile(delay=0.01, loss=0.2), seed=8, server_events=server
    )
    messages = [numbered(i, 3000) for i in range(50)]
    for message in messages:
        client.send(message)
    client.close(CloseCode.NORMAL, "bye")
    assert client.state is ConnectionState.CLOSING
    assert sim.run(lambda: client.state is ConnectionState.CLOSED, limit=sim.now + 30)
    assert server.messages == messages
    assert server.events[-1][1] == ConnectionClosed(0, "bye", by_peer=True)
    assert client_events.events[-1][1] == ConnectionClosed(0, "bye", by_peer=False)
    assert sim.run(lambda: sim.server.sessions == 0, limit=sim.now + 30)


def test_a_silent_peer_times_out() -> None:
    config = ReliableConfig(idle_timeout=5.0, keepalive=1.0)
    sim, client, client_events = connected_pair(config=config)
    silent = LinkProfile(blackhole=(1e9, 1.0), blackhole_start=sim.now)
    sim.up, sim.down = LossyLink(silent, 1), LossyLink(silent, 2)
    last = sim.now
    assert sim.run(lambda: client.state is ConnectionState.CLOSED, limit=sim.now + 30)
    assert client_events.events[-1][1] == ConnectionTimedOut("idle")
    assert sim.now == pytest.approx(last + 5.0, abs=0.01)
    assert sim.run(lambda: sim.server.sessions == 0, limit=sim.now + 0.1)  # the server too


def test_keepalive_holds_an_idle_connection() -> None:
    config = ReliableConfig(idle_timeout=5.0, keepalive=1.0)
    sim, client, _ = connected_pair(config=config)
    sent = sim.up.sent
    sim.run(limit=sim.now + 60)
    assert client.state is ConnectionState.ESTABLISHED
    assert sim.server.sessions == 1
    assert 30 <= sim.up.sent - sent <= 130  # a PING or its ACK about every second


def test_a_malformed_packet_closes_with_a_protocol_error() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    bad = encode_packet(PacketType.DATA, client.cid, 1000, b"\x7f")  # an unknown frame
    client.datagram_received(bad, sim.now)
    assert client.state is ConnectionState.CLOSED
    event = client.next_event()
    assert isinstance(event, ConnectionClosed)
    assert event.code == CloseCode.PROTOCOL_ERROR
    (conn,) = sim.server.connections()
    for packet in client.datagrams_to_send(sim.now):  # one CLOSE tells the server
        sim.server.datagram_received(packet, CLIENT, sim.now)
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    assert isinstance(events[-1], ConnectionClosed)
    assert events[-1].code == CloseCode.PROTOCOL_ERROR
    assert events[-1].by_peer


def test_flow_control_bounds_what_the_receiver_holds() -> None:
    config = ReliableConfig(receive_buffer=32 * 1024, max_message=4096)
    core = ReliableServerCore(KEY, config=config)
    sim, client, _ = connected_pair(server=core, server_events=Recorder(), config=config)
    sim.on_server_event = None  # the application does not read
    for i in range(200):
        try:
            client.send(numbered(i, 4000))
        except WouldBlock:
            break
    sim.run(limit=sim.now + 5)
    (conn,) = core.connections()
    assert conn.receive_buffered <= 32 * 1024
    assert client.send_buffered > 0  # the rest waits for credit
    taken = []
    while (event := conn.next_event()) is not None:
        if isinstance(event, MessageReceived):
            taken.append(event.data)
    sim.run(limit=sim.now + 5)
    while (event := conn.next_event()) is not None:
        if isinstance(event, MessageReceived):
            taken.append(event.data)
    assert taken == [numbered(i, 4000) for i in range(len(taken))]
    assert len(taken) > 8


def test_statistics_count_what_happened() -> None:
    link = LinkProfile(delay=0.005, loss=0.1, mtu=ETHERNET)
    sim, client, _ = connected_pair(up=link, down=link, seed=4)
    for i in range(200):
        client.send(numbered(i, 500))
    sim.run(limit=sim.now + 10)
    stats = client.statistics()
    assert stats.messages_sent == 200
    assert stats.messages_received == 200  # echoed
    assert stats.datagrams_sent >= 50
    assert stats.losses_detected > 0
    assert stats.retransmissions > 0
    assert stats.min_rtt == pytest.approx(0.010, abs=0.002)
    assert stats.send_buffered == 0
    assert stats.bytes_in_flight == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_ack_delay": 0.0},
        {"idle_timeout": 0.0},
        {"keepalive": 100.0},
        {"max_message": MAX_MESSAGE + 1},
        {"receive_buffer": 1000},
    ],
)
def test_bad_config_raises(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"."):
        ReliableConfig(**kwargs)  # type: ignore[arg-type]


def test_connection_ids_are_32_bit_and_not_zero() -> None:
    with pytest.raises(ValueError, match="connection id"):
        ReliableConnection.connect(0, 0.0)
    with pytest.raises(ValueError, match="connection id"):
        ReliableConnection.connect(1 << 32, 0.0)


# -- the state machine -----------------------------------------------------------------------

MACHINE_CONFIG = ReliableConfig(
    max_message=3000, receive_buffer=8 * 1024, send_buffer=16 * 1024, idle_timeout=1000.0
)


class ReliableMachine(RuleBasedStateMachine):
    """A client and a server connection joined by two hand-driven links: any datagram in
    flight may be delivered, dropped or duplicated, in any order, and time jumps; the path
    carries datagrams up to an MTU that may narrow (a black hole), so the runs of units of
    large datagrams are resent cut small. Ordered messages arrive as a prefix of what was
    sent, each at most once; unordered ones at most once; no buffer goes above its cap; no
    datagram exceeds what the receiver accepts; and once the links behave, everything sent
    arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.mtu = MAX_DATAGRAM
        self.core = ReliableServerCore(KEY, config=MACHINE_CONFIG)
        self.client = ReliableConnection.connect(77, 0.0, MACHINE_CONFIG)
        self.up: list[bytes] = []
        self.down: list[bytes] = []
        self.sent: dict[Channel, list[bytes]] = {Channel.ORDERED: [], Channel.UNORDERED: []}
        self.got: dict[Channel, list[bytes]] = {Channel.ORDERED: [], Channel.UNORDERED: []}
        self.count = 0
        self.conn: ReliableConnection | None = None
        for _ in range(4):  # the handshake, on a clean link
            self.pump()
            self.flush()
        assert self.client.state is ConnectionState.ESTABLISHED
        assert self.conn is not None

    def pump(self) -> None:
        self.up.extend(self.client.datagrams_to_send(self.now))
        for conn in self.core.accepted():
            self.conn = conn
        if self.conn is not None:
            self.down.extend(self.conn.datagrams_to_send(self.now))
        self.down.extend(packet for packet, _ in self.core.datagrams_to_send())

    def flush(self) -> None:
        up, self.up = self.up, []
        down, self.down = self.down, []
        for packet in up:
            if len(packet) <= self.mtu:
                self.core.datagram_received(packet, CLIENT, self.now)
        for packet in down:
            if len(packet) <= self.mtu:
                self.client.datagram_received(packet, self.now)
        self.pump()

    @rule(mtu=st.sampled_from([MAX_DATAGRAM, 8972, 3000, ETHERNET, BASE_DATAGRAM]))
    def route_change(self, mtu: int) -> None:
        self.mtu = mtu

    @rule(size=st.integers(0, 3000), unordered=st.booleans())
    def send(self, size: int, unordered: bool) -> None:
        channel = Channel.UNORDERED if unordered else Channel.ORDERED
        message = numbered(self.count, max(size, 4))
        try:
            self.client.send(message, channel)
        except WouldBlock:
            return
        self.count += 1
        self.sent[channel].append(message)
        self.pump()

    @precondition(lambda self: self.up)
    @rule(data=st.data(), copies=st.integers(0, 2))
    def deliver_up(self, data: st.DataObject, copies: int) -> None:
        packet = self.up.pop(data.draw(st.integers(0, len(self.up) - 1)))
        assert len(packet) <= MACHINE_CONFIG.max_datagram
        if len(packet) > self.mtu:
            copies = 0
        for _ in range(copies):  # 0: dropped, 2: duplicated
            self.core.datagram_received(packet, CLIENT, self.now)
        self.pump()

    @precondition(lambda self: self.down)
    @rule(data=st.data(), copies=st.integers(0, 2))
    def deliver_down(self, data: st.DataObject, copies: int) -> None:
        packet = self.down.pop(data.draw(st.integers(0, len(self.down) - 1)))
        assert len(packet) <= MACHINE_CONFIG.max_datagram
        if len(packet) > self.mtu:
            copies = 0
        for _ in range(copies):
            self.client.datagram_received(packet, self.now)
        self.pump()

    @rule(dt=st.floats(0.0005, 0.3))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.client.handle_timer(self.now)
        self.core.handle_timer(self.now)
        self.pump()

    @rule(n=st.integers(0, 5))
    def consume(self, n: int) -> None:
        assert self.conn is not None
        for _ in range(n):
            event = self.conn.next_event()
            if event is None:
                break
            if isinstance(event, MessageReceived):
                self.got[event.channel].append(event.data)
        self.pump()

    @invariant()
    def ordered_is_a_prefix(self) -> None:
        got = self.got[Channel.ORDERED]
        assert got == self.sent[Channel.ORDERED][: len(got)]

    @invariant()
    def unordered_at_most_once(self) -> None:
        got = self.got[Channel.UNORDERED]
        assert len(set(got)) == len(got)
        assert set(got) <= set(self.sent[Channel.UNORDERED])

    @invariant()
    def buffers_within_caps(self) -> None:
        assert self.conn is not None
        assert self.conn.receive_buffered <= MACHINE_CONFIG.receive_buffer
        assert self.client.send_buffered <= MACHINE_CONFIG.send_buffer
        assert self.client.state is ConnectionState.ESTABLISHED

    def teardown(self) -> None:
        """Liveness: on a clean link with a reading application, everything arrives (within
        20 s of virtual time: the jumps of up to 0.3 s make the RTT estimate, and the probe
        timeout after a black hole, up to seconds long)."""
        for _ in range(1000):
            self.consume(1000)
            if all(
                self.got[c] == self.sent[c] or set(self.got[c]) == set(self.sent[c])
                for c in Channel
            ):
                break
            self.flush()
            self.tick(0.02)
        assert self.got[Channel.ORDERED] == self.sent[Channel.ORDERED]
        assert sorted(self.got[Channel.UNORDERED]) == sorted(self.sent[Channel.UNORDERED])


ReliableMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_reliable_state_machine = ReliableMachine.TestCase


def test_sequence_numbers_run_out_cleanly() -> None:
    _, client, _ = connected_pair()
    client._next_dseq = 0xFFFF_FFF0  # as after 4 billion fragments
    with pytest.raises(ClosedResourceError, match="sequence numbers"):
        client.send(bytes(20 * 1156))
    assert client.state is ConnectionState.CLOSED
    event = client.next_event()
    assert isinstance(event, ConnectionClosed)
    assert event.code == CloseCode.EXHAUSTED
    sim2, other, _ = connected_pair()
    other._next_pn = 0xFFFF_FFFF
    other.send(b"x")
    assert other.datagrams_to_send(sim2.now) != []  # the last CLOSE
    assert other.state is ConnectionState.CLOSED


def test_a_clock_going_backwards_breaks_nothing() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    (conn,) = sim.server.connections()
    client.send(b"late")
    for packet in client.datagrams_to_send(sim.now):
        sim.server.datagram_received(packet, CLIENT, sim.now - 5.0)
    assert conn.datagrams_to_send(sim.now - 10.0) is not None
    conn.handle_timer(sim.now - 10.0)
    assert conn.state is ConnectionState.ESTABLISHED


@pytest.mark.parametrize("configured", [None, 0.005])
def test_a_server_acknowledges_within_2_ms_and_a_client_within_10(
    configured: float | None,
) -> None:
    """With no reply to ride on, a server's acknowledgement waits at most
    ``DEFAULT_SERVER_ACK_DELAY`` and a client's ``DEFAULT_ACK_DELAY``; each side learns the
    other's in the handshake and its probe timeout includes it. ``max_ack_delay`` sets
    both."""
    config = ReliableConfig(max_ack_delay=configured)
    server = ReliableServerCore(KEY, config=config)
    sim, client, _ = connected_pair(server_events=Recorder(), server=server, config=config)
    (conn,) = sim.server.connections()
    sim.run(limit=sim.now + 0.1)  # the handshake's and the size probes' exchanges are over

    def acknowledged_after(sender: ReliableConnection) -> float:
        begin = sim.now
        sender.send(b"no reply")
        sim.at(sim.now, lambda: None)  # a step: the sender is pumped
        assert sim.run(lambda: sender.send_buffered == 0, limit=sim.now + 1)
        return sim.now - begin

    rtt = 0.002  # 1 ms each way
    server_delay = configured or DEFAULT_SERVER_ACK_DELAY
    client_delay = configured or DEFAULT_ACK_DELAY
    assert acknowledged_after(client) == pytest.approx(rtt + server_delay, abs=0.0005)
    assert acknowledged_after(conn) == pytest.approx(rtt + client_delay, abs=0.0005)
    assert client._peer_ack_delay == pytest.approx(server_delay)
    assert conn._peer_ack_delay == pytest.approx(client_delay)
    difference = client.probe_timeout - conn.probe_timeout  # the same path both ways
    assert difference == pytest.approx(server_delay - client_delay, abs=0.001)


def test_acknowledged_ack_ranges_are_forgotten() -> None:
    """After many losses in an exchange, ACK frames do not carry every old gap."""
    link = LinkProfile(delay=0.001, loss=0.1)
    sim, client, replies = connected_pair(up=link, down=link, seed=6)
    for i in range(300):
        sim.at(sim.now + 0.01 * i, functools.partial(client.send, numbered(i, 100)))
    assert sim.run(lambda: len(replies.messages) == 300, limit=sim.now + 60)
    (conn,) = sim.server.connections()
    assert client.losses_detected + conn.losses_detected > 32
    assert len(client._rx_ranges) <= 4
    assert len(conn._rx_ranges) <= 4


def test_a_message_in_large_runs_is_delivered_whole_and_keeps_no_datagram_alive() -> None:
    """A run of at least half its datagram is a view of it until the message is whole;
    one cut down to its new units (a resend that starts before what arrived) is copied,
    so that a piece held for reassembly never keeps more than twice its size alive."""
    config = ReliableConfig()
    server = ReliableConnection.accept(
        7,
        0.0,
        config,
        peer_cid=9,
        peer_ack_delay=0.01,
        peer_window=config.window_slots,
        peer_max_message=config.max_message,
        hello_pn=0,
        peer_address=CLIENT,
    )
    message = bytes(range(256)) * 200  # 51,200 bytes: 45 units
    server.datagram_received(data_packet(server, 1, (FLAG_FIRST, 0, message[: 10 * UNIT])), 0.0)
    # the same start again, as one run of 11 units: only its last unit is new
    server.datagram_received(data_packet(server, 2, (FLAG_FIRST, 0, message[: 11 * UNIT])), 0.0)
    pieces = server._assembling
    assert len(pieces) == 2
    assert isinstance(pieces[0], memoryview)  # 10 units: the whole datagram but its headers
    assert type(pieces[1]) is bytes  # 1 unit of an 11-unit datagram: copied out
    server.datagram_received(data_packet(server, 3, (FLAG_LAST, 11, message[11 * UNIT :])), 0.0)
    assert server.next_event() == Connected()
    event = server.next_event()
    assert isinstance(event, MessageReceived)
    assert type(event.data) is bytes
    assert event.data == message
    assert server.statistics().duplicate_fragments == 0
