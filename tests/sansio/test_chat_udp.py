"""UdpChatCore: the UDP chat handshake and peer table, with no loop and no sockets (R12, R13)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netlib.sansio.chat_udp import (
    HELLO_GUIDE_SIZE,
    HELLO_REPLY_SIZE,
    HELLO_REQUEST,
    MAX_UDP_PEERS_PER_HOST,
    PeerJoined,
    PeerLine,
    SendDatagram,
    UdpChatCore,
    UdpChatEvent,
    host_of,
)

KEY = bytes(range(16))
ALICE = ("192.0.2.10", 40000)
HELLO = HELLO_REQUEST.ljust(HELLO_REPLY_SIZE)


def join(core: UdpChatCore, addr: Hashable, now: float = 0.0) -> UdpChatEvent | None:
    reply = core.datagram_received(HELLO, addr, now)
    assert reply == SendDatagram(b"*** hello " + core.cookie(addr) + b"\n", addr)
    return core.datagram_received(b"/hello " + core.cookie(addr) + b"\n", addr, now)


def test_handshake_then_lines_and_heartbeats() -> None:
    core = UdpChatCore(KEY)
    assert len(b"*** hello " + core.cookie(ALICE) + b"\n") == HELLO_REPLY_SIZE == 27
    assert join(core, ALICE) == PeerJoined(ALICE)
    assert core.datagram_received(b"hi there\r\n", ALICE, 1.0) == PeerLine(ALICE, "hi there")
    assert core.datagram_received(b"", ALICE, 2.0) is None  # heartbeat
    assert core.datagram_received(HELLO, ALICE, 3.0) is None  # padded heartbeat
    assert core.datagram_received(b"\xff", ALICE, 3.0) == PeerLine(ALICE, "\ufffd")
    stats = core.statistics()
    assert (stats.peers, stats.joined, stats.cookies_sent) == (1, 1, 1)


def test_a_hello_long_enough_gets_the_reply_that_says_what_to_send() -> None:
    core = UdpChatCore(KEY)
    cookie = core.cookie(ALICE)
    typed = b"/hello " + b"." * (HELLO_GUIDE_SIZE - 8) + b"\n"  # as nc -u sends it
    assert len(typed) == HELLO_GUIDE_SIZE == 67
    guide = b"*** hello " + cookie + b"; to join, send: /hello " + cookie + b"\n"
    assert core.datagram_received(typed, ALICE, 0.0) == SendDatagram(guide, ALICE)
    assert len(guide) == HELLO_GUIDE_SIZE
    shorter = typed[:-2] + b"\n"  # one byte short of the guide: the plain cookie reply
    assert core.datagram_received(shorter, ALICE, 0.0) == SendDatagram(
        b"*** hello " + cookie + b"\n", ALICE
    )
    assert core.datagram_received(b"/hello " + cookie + b"\n", ALICE, 0.0) == PeerJoined(ALICE)
    assert core.datagram_received(b"/hello " + cookie + b"\n", ALICE, 1.0) is None  # again


def test_the_cookie_depends_on_key_and_address() -> None:
    core, other = UdpChatCore(KEY), UdpChatCore(bytes(16))
    assert core.cookie(ALICE) == core.cookie(ALICE)
    assert core.cookie(ALICE) != other.cookie(ALICE)
    assert core.cookie(ALICE) != core.cookie((ALICE[0], ALICE[1] + 1))


@pytest.mark.parametrize(
    "data",
    [b"", b"x", HELLO_REQUEST, HELLO[:-1], b"hello" * 10, b"/hello 0123456789abcdef", b"/nick a"],
)
def test_unknown_sources_get_no_reply_and_leave_no_state(data: bytes) -> None:
    core = UdpChatCore(KEY)
    assert core.datagram_received(data, ALICE, 0.0) is None
    stats = core.statistics()
    assert (stats.dropped_unverified, stats.budget.sources, stats.peers) == (1, 0, 0)


def test_wrong_cookie_is_dropped() -> None:
    core = UdpChatCore(KEY)
    other = ("192.0.2.11", 1)
    assert core.datagram_received(b"/hello " + core.cookie(other), ALICE, 0.0) is None
    assert core.peers == 0


@given(
    st.lists(
        st.tuples(
            st.one_of(st.binary(max_size=80), st.binary(max_size=80).map(b"/hello ".__add__)),
            st.integers(0, 5),
        ),
        max_size=200,
    )
)
def test_replies_to_unverified_sources_never_exceed_what_they_sent(
    datagrams: list[tuple[bytes, int]],
) -> None:
    core = UdpChatCore(KEY)
    received: defaultdict[Hashable, int] = defaultdict(int)
    sent: defaultdict[Hashable, int] = defaultdict(int)
    for data, n in datagrams:
        addr = ("198.51.100.7", 1000 + n)
        received[addr] += len(data)
        event = core.datagram_received(data, addr, 0.0)
        if isinstance(event, SendDatagram):
            sent[addr] += len(event.data)
    for source, total in sent.items():
        assert total <= received[source]


def test_peers_expire_when_silent() -> None:
    core = UdpChatCore(KEY, peer_timeout=30.0)
    assert core.sweep_interval == 10.0
    join(core, ALICE, 0.0)
    bob = ("192.0.2.20", 1)
    join(core, bob, 0.0)
    core.datagram_received(b"", bob, 25.0)
    assert core.handle_timer(29.0) == []
    assert core.handle_timer(31.0) == [ALICE]
    assert core.handle_timer(56.0) == [bob]
    stats = core.statistics()
    assert (stats.peers, stats.expired) == (0, 2)
    assert core.peers_of(host_of(ALICE)) == 0


def test_per_host_cap_and_table_bound() -> None:
    core = UdpChatCore(KEY, max_peers=MAX_UDP_PEERS_PER_HOST + 2)
    for port in range(MAX_UDP_PEERS_PER_HOST):
        assert join(core, ("192.0.2.1", port)) == PeerJoined(("192.0.2.1", port))
    refused = join(core, ("192.0.2.1", 9999))
    assert refused == SendDatagram(b"!!! host full\n", ("192.0.2.1", 9999))
    core.forget(("192.0.2.1", 0))  # a place frees up for that host
    assert join(core, ("192.0.2.1", 9999)) == PeerJoined(("192.0.2.1", 9999))
    assert join(core, ("192.0.2.2", 1)) == PeerJoined(("192.0.2.2", 1))
    assert join(core, ("192.0.2.3", 1)) == PeerJoined(("192.0.2.3", 1))
    assert join(core, ("192.0.2.4", 1)) == SendDatagram(b"!!! server full\n", ("192.0.2.4", 1))
    stats = core.statistics()
    assert (stats.peers, stats.refused_full, stats.refused_host_full) == (
        MAX_UDP_PEERS_PER_HOST + 2,
        1,
        1,
    )


def test_peers_are_exempt_from_the_amplification_cap_not_the_rate() -> None:
    core = UdpChatCore(KEY)
    join(core, ALICE)
    # burst 2,000, less the cookie reply
    assert all(core.send(b"x" * 100, ALICE, 0.0) for _ in range(1999))
    assert not core.send(b"x", ALICE, 0.0)
    assert not core.send(b"x" * 10, ("192.0.2.99", 1), 0.0)  # not a peer: 1x of nothing
    assert core.statistics().replies_dropped == 2


@pytest.mark.parametrize("kwargs", [{"key": b"short"}, {"peer_timeout": 0.0}, {"max_peers": 0}])
def test_arguments_are_validated(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {"key": KEY, **kwargs}
    with pytest.raises(ValueError, match=r"key|positive"):
        UdpChatCore(**arguments)  # type: ignore[arg-type]
