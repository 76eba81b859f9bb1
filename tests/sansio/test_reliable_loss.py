"""R15: the reliable-UDP core under loss, on a seeded lossy link and a virtual clock.

Also the latency shape the asyncio adapter must reach over real loss: 100-byte echoes every
10 ms at 5% and 10% loss each way, with their p99 round trip, datagrams per echo and the
spurious retransmission rate (printed; run with ``-s`` to see them).
"""

from __future__ import annotations

import functools
import hashlib
import itertools

import pytest

from netlib.sansio.reliable.connection import (
    Channel,
    ConnectionState,
    MessageReceived,
    ReliableConfig,
    ReliableConnection,
)
from netlib.sansio.reliable.endpoint import ReliableServerCore
from netlib.sansio.reliable.recovery import MAX_PROBE_INTERVAL
from netlib.sansio.reliable.simulation import LinkProfile, LossyLink, Simulation
from netlib.sansio.reliable.wire import MAX_MESSAGE

from .rudp import (
    ETHERNET,
    KEY,
    Recorder,
    connected_pair,
    echo,
    number_of,
    numbered,
    stream_messages,
)

MiB = 1024 * 1024


def payload(size: int, seed: int) -> bytes:
    """Deterministic, non-repeating bytes."""
    blocks = (hashlib.sha256(b"%d-%d" % (seed, i)).digest() for i in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, start, i = [], 0, 0
    while start < len(data):
        size = sizes[i % len(sizes)]
        out.append(data[start : start + size])
        start += size
        i += 1
    return out


def upload(sim: Simulation, client: ReliableConnection, server: Recorder, data: bytes) -> None:
    """Send ``data`` in messages of mixed sizes; wait until the server has all of it."""
    stream_messages(sim, client, chunks(data, [64 * 1024, 1000, MAX_MESSAGE, 5000, 1]))
    assert sim.run(lambda: sum(map(len, server.messages)) >= len(data), limit=sim.now + 600)
    assert hashlib.sha256(b"".join(server.messages)).digest() == hashlib.sha256(data).digest()


def test_burst_loss_transfer_arrives_intact() -> None:
    """(a) 2% of datagrams start a burst of 3 drops (about 6% lost), 15 ms each way."""
    link = LinkProfile(delay=0.015, loss=0.02, burst=3, mtu=ETHERNET)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, seed=11, server_events=server)
    upload(sim, client, server, payload(2 * MiB, 1))
    stats = client.statistics()
    assert stats.losses_detected > 0
    assert stats.retransmissions > 0
    assert sim.up.dropped > 50


def test_handshakes_complete_through_heavy_loss() -> None:
    """(b) 30% loss each way: 50 of 50 handshakes within 300 s of virtual time."""
    link = LinkProfile(delay=0.01, loss=0.3)
    core = ReliableServerCore(KEY)
    sim = Simulation(core, up=link, down=link, seed=5, on_server_event=echo)
    clients = [sim.connect(1000 + i, (f"198.51.100.{i}", 5000)) for i in range(50)]
    assert sim.run(
        lambda: all(c.state is ConnectionState.ESTABLISHED for c in clients), limit=300.0
    )
    assert sim.run(lambda: core.sessions == 50, limit=300.0)
    assert sim.now < 300.0
    assert sim.up.dropped > 0
    assert sim.down.dropped > 0


def test_drop_duplicate_delay_exchanges_exactly_once_in_order() -> None:
    """(c) 70/10/10/10 deliver/drop/duplicate/delay up to 3 s: 100 exchanges."""
    link = LinkProfile(delay=0.01, loss=0.1, duplicate=0.1, late=0.1, late_delay=3.0)
    server = Recorder()

    def reply(conn: ReliableConnection, event: object) -> None:
        server(conn, event)  # type: ignore[arg-type]
        if isinstance(event, MessageReceived):
            conn.send(b"re:" + event.data)

    sim, client, client_events = connected_pair(up=link, down=link, seed=3, server_events=server)
    sim.on_server_event = reply
    for i in range(100):
        client.send(numbered(i, 200))
        assert sim.run(lambda: len(client_events.messages) > i, limit=sim.now + 120)  # noqa: B023
    assert [number_of(m) for m in server.messages] == list(range(100))
    assert client_events.messages == [b"re:" + numbered(i, 200) for i in range(100)]
    assert sim.up.duplicated > 0
    assert sim.down.duplicated > 0
    assert client.statistics().duplicate_fragments + _server_conn(sim).duplicate_fragments > 0


class RecordingLink(LossyLink):
    """A lossy link that remembers when each datagram was offered to it."""

    def __init__(self, profile: LinkProfile, seed: int) -> None:
        super().__init__(profile, seed)
        self.times: list[float] = []

    def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
        self.times.append(now)
        return super().transmit(data, now)


def test_blackholes_transfer_completes_and_probes_back_off() -> None:
    """(d) Blackhole 5 s on / 2 s off both ways: 10 MiB completes, in order, nothing
    delivered twice; while blackholed the sender sends one probe per probe timeout, each
    timeout twice the one before (up to MAX_PROBE_INTERVAL). A 256 KiB receive window and
    50 ms each way keep the transfer slow enough to cross several blackholes."""
    config = ReliableConfig(
        receive_buffer=256 * 1024, send_buffer=512 * 1024, max_message=64 * 1024
    )
    server = Recorder()
    sim, client, _ = connected_pair(
        up=LinkProfile(delay=0.05), seed=4, server_events=server, config=config
    )
    start = sim.now + 0.5
    link = LinkProfile(delay=0.05, blackhole=(5.0, 2.0), blackhole_start=start)
    sim.up = RecordingLink(link, 1)
    sim.down = LossyLink(link, 2)
    messages = [numbered(i, 16 * 1024) for i in range(10 * MiB // (16 * 1024))]
    stream_messages(sim, client, messages)
    assert sim.run(lambda: len(server.messages) == len(messages), limit=600.0)
    assert server.messages == messages  # in order, each exactly once
    holes = int((sim.now - start) // 7.0)
    assert holes >= 2, sim.now
    print(f"\n10 MiB through {holes} blackholes in {sim.now - start:.1f} s virtual")
    for first in (start + 7.0 * k for k in range(holes)):
        sent = [t for t in sim.up.times if first + 1.0 < t < first + 5.0]
        assert 3 <= len(sent) <= 6, sent  # probes only, about one a second at most
        gaps = [b - a for a, b in itertools.pairwise(sent)]
        for before, after in itertools.pairwise(gaps):
            doubled = after == pytest.approx(2 * before, rel=0.05)
            assert doubled or after == pytest.approx(MAX_PROBE_INTERVAL, rel=0.05), gaps
    assert client.statistics().probes_sent >= 3 * holes


def test_corrupt_datagrams_are_never_delivered() -> None:
    """(e) One bit flipped in 2% of datagrams, both ways: every message intact, every
    corrupt datagram dropped and counted."""
    link = LinkProfile(delay=0.005, corrupt=0.02, mtu=ETHERNET)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, seed=9, server_events=server)
    data = payload(MiB, 2)
    upload(sim, client, server, data)
    sim.run(limit=sim.now + 1.0)  # let the last datagrams land
    corrupted = sim.up.corrupted + sim.down.corrupted
    assert corrupted > 10
    dropped = client.corrupt_dropped + sim.server.corrupt_dropped
    assert dropped == corrupted


def _server_conn(sim: Simulation) -> ReliableConnection:
    (conn,) = sim.server.connections()
    return conn


def echo_figures(loss: float, count: int, seed: int = 1) -> tuple[float, float, float]:
    """Echo 100-byte messages every 10 ms over ``loss`` each way, 1 ms one-way delay.

    Returns the p99 round trip (seconds), datagrams per echo (both ways) and spurious
    retransmissions per message.
    """
    link = LinkProfile(delay=0.001, loss=loss)
    sim, client, replies = connected_pair(up=link, down=link, seed=seed)
    sent: dict[int, float] = {}
    rtts: list[float] = []
    replies.events.clear()

    def on_reply(conn: ReliableConnection, event: object) -> None:
        if isinstance(event, MessageReceived):
            rtts.append(sim.now - sent[number_of(event.data)])

    sim.on_client_event = on_reply

    def request(i: int) -> None:
        sent[i] = sim.now
        client.send(numbered(i, 100))

    begin = sim.now + 0.01
    for i in range(count):
        sim.at(begin + i * 0.01, functools.partial(request, i))
    before = sim.up.sent + sim.down.sent
    assert sim.run(lambda: len(rtts) == count, limit=begin + count * 0.01 + 60)
    datagrams = (sim.up.sent + sim.down.sent - before) / count
    rtts.sort()
    p99 = rtts[int(0.99 * count) - 1]
    spurious = client.spurious_retransmissions + _server_conn(sim).spurious_retransmissions
    return p99, datagrams, spurious / (2 * count)


def test_echo_without_loss_costs_two_datagrams() -> None:
    p99, datagrams, spurious = echo_figures(0.0, 500)
    print(f"\necho, no loss: p99 {p99 * 1000:.1f} ms, {datagrams:.2f} datagrams per echo")
    assert datagrams <= 2.05  # the reply carries one ACK, the next request the other
    assert p99 == pytest.approx(0.002, abs=1e-4)
    assert spurious == 0


@pytest.mark.parametrize(("loss", "target"), [(0.05, 0.020), (0.10, 0.030)])
def test_echo_latency_under_random_loss(loss: float, target: float) -> None:
    p99, datagrams, spurious = echo_figures(loss, 3000, seed=7)
    print(
        f"\necho, {loss:.0%} loss each way: p99 {p99 * 1000:.1f} ms, "
        f"{datagrams:.2f} datagrams per echo, {spurious:.2%} spurious retransmissions"
    )
    assert p99 <= target
    assert spurious < 0.02


def test_unordered_messages_skip_a_lost_one() -> None:
    """A message on the unordered channel is delivered while an earlier one is missing."""
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    dropped: list[bytes] = []

    class DropFirstData(LossyLink):
        def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
            if not dropped and len(data) > 100:
                dropped.append(data)
                return []
            return super().transmit(data, now)

    sim.up = DropFirstData(LinkProfile(delay=0.001), 1)
    client.send(b"first" * 30, Channel.UNORDERED)
    sim.at(sim.now, lambda: None)  # a step: the first message goes alone
    sim.at(sim.now + 0.0002, lambda: client.send(b"second", Channel.UNORDERED))
    assert sim.run(lambda: len(server.messages) == 2, limit=sim.now + 1)
    assert server.messages == [b"second", b"first" * 30]
    kinds = [e.channel for _, e in server.events if isinstance(e, MessageReceived)]
    assert kinds == [Channel.UNORDERED, Channel.UNORDERED]


def test_ordered_messages_wait_for_a_lost_one() -> None:
    server = Recorder()
    sim, client, _ = connected_pair(server_events=server)
    dropped: list[bytes] = []

    class DropFirstData(LossyLink):
        def transmit(self, data: bytes, now: float) -> list[tuple[float, bytes]]:
            if not dropped and len(data) > 100:
                dropped.append(data)
                return []
            return super().transmit(data, now)

    sim.up = DropFirstData(LinkProfile(delay=0.001), 1)
    client.send(b"first" * 30)
    sim.at(sim.now, lambda: None)  # a step: the first message goes alone
    sim.at(sim.now + 0.0002, lambda: client.send(b"second"))
    assert sim.run(lambda: len(server.messages) == 2, limit=sim.now + 1)
    assert server.messages == [b"first" * 30, b"second"]


def test_congestion_window_survives_random_loss() -> None:
    """10% random loss does not take the window below its floor or stall a transfer."""
    link = LinkProfile(delay=0.005, loss=0.1, mtu=ETHERNET)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=link, seed=2, server_events=server)
    data = payload(MiB // 2, 3)
    upload(sim, client, server, data)
    stats = client.statistics()
    assert stats.congestion_window >= 4 * 1200
    assert stats.losses_detected > 20


@pytest.mark.parametrize("queue", [64 * 1024, 1024 * 1024])
def test_a_bottleneck_is_filled_without_spurious_retransmissions(queue: int) -> None:
    """A 10 MB/s link with a drop-tail queue: every loss is a real overflow, none is
    declared while packets merely wait in the queue, and the transfer keeps the link busy."""
    link = LinkProfile(delay=0.005, bandwidth=10e6, queue=queue, mtu=ETHERNET)
    server = Recorder()
    sim, client, _ = connected_pair(up=link, down=LinkProfile(delay=0.005), server_events=server)
    messages = [numbered(i, 16 * 1024) for i in range(256)]
    begin = sim.now
    stream_messages(sim, client, messages)
    assert sim.run(lambda: len(server.messages) == len(messages), limit=sim.now + 60)
    assert server.messages == messages
    stats = client.statistics()
    goodput = 4 * MiB / (sim.now - begin)
    print(f"\nbottleneck 10 MB/s, queue {queue // 1024} KiB: {goodput / 1e6:.1f} MB/s goodput")
    assert goodput > 0.7 * 10e6
    assert sim.up.overflowed > 0  # the window probed the queue's size
    assert stats.datagram_size == ETHERNET
    # every loss is an overflow; MTU probes lost to the queue are not counted as losses
    probes_overflowed = stats.mtu_probes_lost - sim.up.too_big
    assert stats.losses_detected + probes_overflowed == sim.up.overflowed
    assert stats.spurious_retransmissions == 0
    assert stats.spurious_losses == 0
