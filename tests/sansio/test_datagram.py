"""ReplyBudget: per-address UDP reply policy against amplification and floods.

Robustness rows R12 and R13 in docs/robustness.md.

No loop, no sockets, no sleeps: every call gets an explicit ``now``.
"""

from __future__ import annotations

import ast
import dataclasses
import random
import tracemalloc
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netlib.sansio import datagram
from netlib.sansio.datagram import (
    AMPLIFICATION_ALLOWANCE,
    AMPLIFICATION_FACTOR,
    AMPLIFICATION_WINDOW,
    DEFAULT_MAX_SOURCES,
    DEFAULT_SOURCE_BURST,
    DEFAULT_SOURCE_BYTE_BURST,
    DEFAULT_SOURCE_BYTE_RATE,
    DEFAULT_SOURCE_RATE,
    ReplyBudget,
    ReplyBudgetStatistics,
    ReplyGrants,
    SourceGrants,
)

Addr = tuple[str, int]
Service = Callable[[bytes], bytes]

CLIENT: Addr = ("192.0.2.10", 40000)
STAMP = b"[Mon Nov 23 10:00:00 2026] "
TIMESTAMP_PREFIX = len(STAMP)


def echo(data: bytes) -> bytes:
    """The echo service: the reply is the request."""
    return data


def timestamp_echo(data: bytes) -> bytes:
    """The timestamp echo service: a 27-byte prefix, then the request."""
    return STAMP + data


def forged(i: int) -> Addr:
    """A distinct forged (ip, port) pair for each ``i`` < 2**32."""
    return (f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 1024 + (i >> 24))


def exchange(budget: ReplyBudget, addr: Addr, data: bytes, service: Service, now: float) -> bool:
    """Receive ``data`` from ``addr`` and ask to send the service's reply."""
    budget.on_received(addr, len(data), now)
    return budget.try_send(addr, len(service(data)), now)


# Module rules ---------------------------------------------------------------------------


def test_module_is_pure_and_documented() -> None:
    source = Path(datagram.__file__).read_text()
    tree = ast.parse(source)
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"asyncio", "socket", "selectors", "time", "random", "logging"}
    docstring = ast.get_docstring(tree)
    assert docstring is not None
    assert "Rules of this module" in docstring
    assert "Theory of operation" in docstring
    assert all(hasattr(datagram, name) for name in datagram.__all__)


def test_named_defaults() -> None:
    assert DEFAULT_SOURCE_RATE == 100
    assert DEFAULT_SOURCE_BURST == 200
    assert AMPLIFICATION_FACTOR == 1
    assert AMPLIFICATION_ALLOWANCE == 4096
    assert AMPLIFICATION_WINDOW == 1.0
    assert DEFAULT_MAX_SOURCES == 10_000
    # The byte bucket never binds on MTU-sized datagrams within the datagram rate,
    # and the burst holds several maximum-size datagrams.
    assert DEFAULT_SOURCE_BYTE_RATE >= DEFAULT_SOURCE_RATE * 1472
    assert DEFAULT_SOURCE_BYTE_BURST >= 8 * 65_507


def test_statistics_is_a_frozen_slotted_snapshot() -> None:
    budget = ReplyBudget()
    stats = budget.statistics()
    assert stats == ReplyBudgetStatistics(0, 0, 0, 0, 0, 0, 0)
    assert not hasattr(stats, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.sources = 1  # type: ignore[misc]
    assert exchange(budget, CLIENT, b"x", echo, 0.0)
    assert stats.replies_allowed == 0
    assert budget.statistics().replies_allowed == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("rate", 0),
        ("rate", float("nan")),
        ("burst", 0.5),
        ("byte_rate", -1),
        ("byte_burst", 0),
        ("factor", -0.1),
        ("factor", 1.5),  # more than 1x would amplify
        ("allowance", -1),
        ("allowance", float("inf")),
        ("window", 0),
        ("max_sources", 0),
    ],
)
def test_limits_are_validated(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        ReplyBudget(**{name: value})  # type: ignore[arg-type]


def test_negative_sizes_are_rejected() -> None:
    budget = ReplyBudget()
    with pytest.raises(ValueError, match="size"):
        budget.on_received(CLIENT, -1, 0.0)
    with pytest.raises(ValueError, match="size"):
        budget.try_send(CLIENT, -1, 0.0)


# Rate -------------------------------------------------------------------------------------


def test_rate_allows_the_burst_then_refills_at_the_rate() -> None:
    budget = ReplyBudget()
    results = [exchange(budget, CLIENT, b"ping", echo, 0.0) for _ in range(250)]
    assert results == [True] * DEFAULT_SOURCE_BURST + [False] * 50
    assert budget.statistics().dropped_by_rate == 50
    refilled = [exchange(budget, CLIENT, b"ping", echo, 0.25) for _ in range(30)]
    assert refilled.count(True) == 25  # 0.25 s at 100/s
    assert [exchange(budget, CLIENT, b"ping", echo, 0.75) for _ in range(60)].count(True) == 50


def test_flood_from_one_address_is_cut_to_the_rate_and_every_drop_counted() -> None:
    budget = ReplyBudget()
    total, seconds = 10_000, 10.0
    allowed = sum(
        exchange(budget, CLIENT, b"x" * 100, echo, i * seconds / total) for i in range(total)
    )
    expected = DEFAULT_SOURCE_BURST + DEFAULT_SOURCE_RATE * seconds * (total - 1) / total
    assert expected - 1 <= allowed <= expected + 1
    stats = budget.statistics()
    assert stats.replies_allowed == allowed
    assert stats.dropped_by_rate == total - allowed
    assert stats.replies_dropped == total - allowed
    assert stats.dropped_by_bytes == stats.dropped_by_amplification == 0
    assert stats.bytes_allowed == 100 * allowed


def test_addresses_have_separate_buckets() -> None:
    budget = ReplyBudget(burst=1, rate=1)
    assert exchange(budget, CLIENT, b"a", echo, 0.0)
    assert not exchange(budget, CLIENT, b"a", echo, 0.0)
    assert exchange(budget, ("192.0.2.11", 40000), b"a", echo, 0.0)
    assert exchange(budget, (CLIENT[0], CLIENT[1] + 1), b"a", echo, 0.0)


# Bytes ------------------------------------------------------------------------------------


def test_byte_bucket_cuts_large_replies() -> None:
    budget = ReplyBudget()
    big = 65_507
    results = [exchange(budget, CLIENT, bytes(big), echo, 0.0) for _ in range(10)]
    fits = DEFAULT_SOURCE_BYTE_BURST // big
    assert results == [True] * fits + [False] * (10 - fits)
    stats = budget.statistics()
    assert stats.dropped_by_bytes == 10 - fits
    assert stats.dropped_by_rate == stats.dropped_by_amplification == 0
    # Refills at the byte rate: one more maximum-size reply after big / byte_rate seconds.
    wait = (big - (DEFAULT_SOURCE_BYTE_BURST - fits * big)) / DEFAULT_SOURCE_BYTE_RATE
    assert not exchange(budget, CLIENT, bytes(big), echo, wait * 0.99)
    assert exchange(budget, CLIENT, bytes(big), echo, wait * 1.01)


def test_reply_larger_than_byte_burst_is_always_dropped() -> None:
    budget = ReplyBudget(byte_burst=1000)
    budget.exempt(CLIENT, 0.0)
    assert not budget.try_send(CLIENT, 1001, 100.0)
    assert budget.try_send(CLIENT, 1000, 100.0)
    assert budget.statistics().dropped_by_bytes == 1


# Amplification --------------------------------------------------------------------------


def test_unknown_addresses_share_one_allowance() -> None:
    budget = ReplyBudget()
    assert budget.try_send(CLIENT, 4000, 0.0)
    assert budget.try_send(forged(1), 96, 0.0)
    assert not budget.try_send(CLIENT, 1, 0.0)
    assert not budget.try_send(forged(2), 1, 0.0)  # a new address brings no allowance
    stats = budget.statistics()
    assert stats.dropped_by_amplification == 2
    assert stats.bytes_allowed == stats.bytes_unearned == AMPLIFICATION_ALLOWANCE


def test_received_bytes_earn_factor_times_credit() -> None:
    budget = ReplyBudget(allowance=0)
    budget.on_received(CLIENT, 100, 0.0)
    assert not budget.try_send(CLIENT, 101, 0.0)
    assert budget.try_send(CLIENT, 100, 0.0)
    assert not budget.try_send(CLIENT, 1, 0.0)
    assert budget.statistics().dropped_by_amplification == 2


def test_credit_is_spent_before_the_allowance() -> None:
    budget = ReplyBudget(allowance=100)
    budget.on_received(CLIENT, 10, 0.0)
    assert budget.try_send(CLIENT, 10, 0.0)  # all from credit
    assert budget.statistics().bytes_unearned == 0
    assert budget.try_send(CLIENT, 100, 0.0)  # all from the allowance
    assert not budget.try_send(CLIENT, 1, 0.0)
    assert budget.statistics().bytes_unearned == 100


def test_allowance_refills_per_window_and_is_not_banked() -> None:
    budget = ReplyBudget(allowance=100, window=2.0)
    assert budget.try_send(CLIENT, 100, 0.0)
    assert not budget.try_send(CLIENT, 51, 1.0)
    assert budget.try_send(CLIENT, 50, 1.0)
    # An hour of silence refills one allowance, not 1,800 of them.
    assert not budget.try_send(CLIENT, 101, 3601.0)
    assert budget.try_send(CLIENT, 100, 3601.0)
    assert not budget.try_send(forged(1), 1, 3601.0)  # one allowance for every address


def test_banked_credit_is_capped_at_the_byte_burst() -> None:
    budget = ReplyBudget(allowance=0, byte_burst=1000, byte_rate=1e9)
    for _ in range(100):
        budget.on_received(CLIENT, 1000, 0.0)
    assert budget.try_send(CLIENT, 1000, 0.0)
    assert not budget.try_send(CLIENT, 1, 1.0)
    assert budget.statistics().dropped_by_amplification == 1


def test_factor_zero_leaves_only_the_allowance() -> None:
    budget = ReplyBudget(factor=0, allowance=10)
    budget.on_received(CLIENT, 1000, 0.0)
    assert not budget.try_send(CLIENT, 11, 0.0)
    assert budget.try_send(CLIENT, 10, 0.0)


def test_empty_datagram_gets_its_empty_echo_and_costs_one_datagram() -> None:
    budget = ReplyBudget(allowance=0, burst=2, rate=1)
    assert exchange(budget, CLIENT, b"", echo, 0.0)
    assert exchange(budget, CLIENT, b"", echo, 0.0)
    assert not exchange(budget, CLIENT, b"", echo, 0.0)
    stats = budget.statistics()
    assert (stats.replies_allowed, stats.bytes_allowed, stats.dropped_by_rate) == (2, 0, 1)
    # An empty request earns nothing: a non-empty reply to it is capped.
    assert not exchange(budget, CLIENT, b"", timestamp_echo, 10.0)
    assert budget.statistics().dropped_by_amplification == 1


def test_refused_reply_is_charged_nothing() -> None:
    budget = ReplyBudget(allowance=0, burst=1, rate=1)
    budget.on_received(CLIENT, 10, 0.0)
    assert not budget.try_send(CLIENT, 11, 0.0)  # refused by the cap: keeps its datagram token
    assert budget.try_send(CLIENT, 10, 0.0)
    budget.on_received(CLIENT, 10, 0.0)
    assert not budget.try_send(CLIENT, 10, 0.5)  # refused by the rate: keeps its credit
    assert budget.try_send(CLIENT, 10, 1.0)
    stats = budget.statistics()
    assert (stats.dropped_by_amplification, stats.dropped_by_rate) == (1, 1)


def test_exempt_address_skips_the_cap_but_not_the_rate() -> None:
    budget = ReplyBudget(allowance=0, burst=3, rate=1)
    budget.exempt(CLIENT, 0.0)
    assert [budget.try_send(CLIENT, 1400, 0.0) for _ in range(4)] == [True, True, True, False]
    stats = budget.statistics()
    assert (stats.dropped_by_rate, stats.dropped_by_amplification) == (1, 0)
    assert not budget.try_send(("192.0.2.99", 1), 1, 0.0)


def test_exemption_is_lost_with_the_entry() -> None:
    budget = ReplyBudget(allowance=0, max_sources=1)
    budget.exempt(CLIENT, 0.0)
    budget.on_received(("192.0.2.99", 1), 1, 0.0)
    assert not budget.try_send(CLIENT, 1, 0.0)


def test_time_going_backwards_refunds_nothing() -> None:
    budget = ReplyBudget(burst=1, rate=1, allowance=10)
    assert budget.try_send(CLIENT, 10, 100.0)
    assert not budget.try_send(CLIENT, 1, 50.0)
    assert not budget.try_send(CLIENT, 1, 100.5)
    assert budget.try_send(CLIENT, 10, 101.0)


# Amplification by forged sources (robustness row R12 in docs/robustness.md) ---------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    pool=st.integers(1, 2_000),
    max_size=st.sampled_from([13, 40, 1500]),
    packets_per_second=st.sampled_from([10.0, 100.0, 1000.0, 100_000.0]),
)
def test_forged_sources_are_not_amplified(
    seed: int, pool: int, max_size: int, packets_per_second: float
) -> None:
    """10,000 forged datagrams, random sizes: per address, sent <= the documented cap."""
    rng = random.Random(seed)
    addresses = [forged(rng.getrandbits(32)) for _ in range(pool)]
    for service in (echo, timestamp_echo):
        budget = ReplyBudget()
        received: defaultdict[Addr, int] = defaultdict(int)
        sent: defaultdict[Addr, int] = defaultdict(int)
        now = 0.0
        for i in range(10_000):
            now = i / packets_per_second
            addr = rng.choice(addresses)
            data = rng.randbytes(rng.randint(1, max_size))
            reply = service(data)
            received[addr] += len(data)
            budget.on_received(addr, len(data), now)
            if budget.try_send(addr, len(reply), now):
                sent[addr] += len(reply)
        stats = budget.statistics()
        assert stats.evictions == 0
        assert stats.bytes_allowed == sum(sent.values())
        check_shared_bound(sent, received, now, unverified_extra=service is timestamp_echo)
        assert stats.bytes_unearned <= AMPLIFICATION_ALLOWANCE * (1 + now / AMPLIFICATION_WINDOW)


def check_shared_bound(
    sent: dict[Addr, int], received: dict[Addr, int], elapsed: float, *, unverified_extra: bool
) -> None:
    """Per address at most 1x plus what it drew from the shared allowance; in total, the
    draws at most the allowance over ``elapsed`` (none at all for an echo)."""
    beyond = sum(max(0, total - received[addr]) for addr, total in sent.items())
    limit = AMPLIFICATION_ALLOWANCE * (1 + elapsed / AMPLIFICATION_WINDOW)
    assert beyond <= (limit if unverified_extra else 0) + 1e-6


def test_unanswered_forged_sources_get_at_most_the_allowance() -> None:
    """A service pushing to addresses that never sent (forged chat joins) is capped: all of
    them together get at most the one shared allowance."""
    budget = ReplyBudget(allowance=1200)
    for second in range(60):
        for i in range(50):
            budget.try_send(forged(i), 1400, float(second))
    stats = budget.statistics()
    assert stats.bytes_allowed == 0  # 1400 > 1200: no unearned reply of that size ever goes
    for second in range(60):
        for i in range(50):
            budget.try_send(forged(i), 100, float(second))
    assert budget.statistics().bytes_allowed <= 1200 * 60


def test_human_pace_client_gets_every_timestamp_reply() -> None:
    budget = ReplyBudget()
    assert len(timestamp_echo(b"hello")) == 32
    assert all(exchange(budget, CLIENT, b"hello", timestamp_echo, float(t)) for t in range(120))
    assert budget.statistics().replies_dropped == 0


def test_shortest_requests_at_human_pace_get_every_timestamp_reply() -> None:
    budget = ReplyBudget()
    assert all(exchange(budget, CLIENT, b"", timestamp_echo, float(t)) for t in range(120))
    assert all(exchange(budget, CLIENT, b"a", timestamp_echo, 200.0 + t) for t in range(120))
    burst = [exchange(budget, CLIENT, b"hi", timestamp_echo, 400.0) for _ in range(20)]
    assert all(burst)  # a pasted batch of short lines


def test_human_pace_client_is_served_during_a_forged_flood() -> None:
    budget = ReplyBudget(max_sources=1_000)
    flood = 0
    for second in range(120):
        assert exchange(budget, CLIENT, b"hello", timestamp_echo, float(second))
        for _ in range(1_500):  # more new sources per second than the table holds
            exchange(budget, forged(flood), b"x", timestamp_echo, second + 0.5)
            flood += 1
    stats = budget.statistics()
    assert stats.sources == 1_000
    assert stats.evictions == flood + 120 - 1_000  # the client re-entered every second
    # The flood drains the shared allowance every second; it refills before the client's
    # next line, and the flood as a whole gets no more than the allowance beyond its bytes.
    assert stats.bytes_unearned <= AMPLIFICATION_ALLOWANCE * 121
    assert stats.replies_allowed < 120 + 121 * AMPLIFICATION_ALLOWANCE // TIMESTAMP_PREFIX


# Bounded table (robustness row R13 in docs/robustness.md) ------------------------------


def test_least_recently_seen_source_is_evicted_and_starts_afresh() -> None:
    budget = ReplyBudget(max_sources=2, allowance=0, burst=1, rate=1e-9)
    a, b, c = forged(1), forged(2), forged(3)
    assert exchange(budget, a, b"x", echo, 0.0)
    assert exchange(budget, b, b"x", echo, 0.0)
    budget.on_received(a, 1, 1.0)  # a is now more recent than b
    budget.on_received(c, 1, 2.0)  # evicts b
    stats = budget.statistics()
    assert (stats.sources, stats.evictions) == (2, 1)
    assert not budget.try_send(a, 1, 2.0)  # a kept its state: no datagram token left
    assert budget.try_send(b, 0, 2.0)  # b was evicted: fresh burst (and evicts c)
    assert budget.statistics().evictions == 2


def test_table_stays_bounded_under_50k_sources() -> None:
    budget = ReplyBudget()
    for i in range(50_000):
        exchange(budget, forged(i), b"x", timestamp_echo, i / 10_000)
    stats = budget.statistics()
    assert stats.sources == DEFAULT_MAX_SOURCES
    assert stats.evictions == 50_000 - DEFAULT_MAX_SOURCES
    assert stats.replies_allowed + stats.replies_dropped == 50_000


def test_memory_is_bounded_under_50k_sources() -> None:
    addresses = [forged(i) for i in range(50_000)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        budget = ReplyBudget(max_sources=10_000)
        for i, addr in enumerate(addresses):
            exchange(budget, addr, b"x" * 64, echo, i / 10_000)
        growth = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert budget.statistics().sources == 10_000
    assert growth < 10 * 1024 * 1024
    assert growth / 10_000 < 512  # bytes per tracked source, table slot included


def test_table_eviction_never_hands_out_new_credit() -> None:
    """Empty and 1-byte timestamp requests from more forged addresses than the table holds:
    all of them together get at most the shared allowance beyond their own bytes (the old
    per-address allowance gave each new address 1,200 bytes: 28x for 1-byte requests)."""
    budget = ReplyBudget()
    sources = 3 * DEFAULT_MAX_SOURCES
    received: defaultdict[Addr, int] = defaultdict(int)
    sent: defaultdict[Addr, int] = defaultdict(int)
    now = 0.0
    for i in range(2 * sources):
        now = i / 20_000  # 20,000 datagrams a second for 3 s
        addr, data = forged(i % sources), b"x" * (i & 1)
        received[addr] += len(data)
        if exchange(budget, addr, data, timestamp_echo, now):
            sent[addr] += len(timestamp_echo(data))
    stats = budget.statistics()
    assert stats.evictions >= sources
    check_shared_bound(sent, received, now, unverified_extra=True)
    assert sum(sent.values()) <= sum(received.values()) + AMPLIFICATION_ALLOWANCE * (1 + now)


def test_lease_pays_extra_from_credit_only_after_the_first_reply() -> None:
    budget = ReplyBudget()
    count, _ = budget.lease(CLIENT, 5, 32, 0.0, extra=27, datagrams=32, nbytes=65536)
    assert count == 1  # no credit left: one reply, its 27 bytes from the allowance
    assert budget.statistics().bytes_unearned == 27
    budget.on_received(CLIENT, 100, 0.0)  # unanswered requests bank credit
    count, _ = budget.lease(CLIENT, 5, 32, 0.0, extra=27, datagrams=32, nbytes=65536)
    assert count == 1 + (100 + 5 - 32) // 27
    assert budget.statistics().bytes_unearned == 27
    budget.exempt(CLIENT, 0.0)
    count, _ = budget.lease(CLIENT, 5, 32, 0.0, extra=27, datagrams=32, nbytes=65536)
    assert count == 32
    count, _ = budget.lease(forged(1), 64, 64, 0.0, extra=0, datagrams=32, nbytes=65536)
    assert count == 32  # an echo's replies are paid by their own requests


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1500), st.integers(0, 12), st.floats(0, 0.05)),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([0, TIMESTAMP_PREFIX]),
    st.sampled_from([2, 10_000]),
)
def test_grants_stay_within_every_bound(
    steps: list[tuple[int, int, float]], extra: int, max_grants: int
) -> None:
    """A service on the grants' fast path: 1x per address plus the shared allowance, the
    rate, and exact counts."""
    budget = ReplyBudget()
    grants = ReplyGrants(budget, extra=extra, max_grants=max_grants)
    received: defaultdict[Addr, int] = defaultdict(int)
    sent: defaultdict[Addr, int] = defaultdict(int)
    replies: defaultdict[Addr, int] = defaultdict(int)
    now = 0.0
    for size, n, dt in steps:
        now += dt
        addr, reply = forged(n), size + extra
        received[addr] += size
        grant = grants.table.get(addr)
        if grant is not None and grant[0] and grant[1] >= reply:
            grant[0] -= 1
            grant[1] -= reply
        elif grants.renew(addr, grant, size, reply, now) is None:
            continue
        sent[addr] += reply
        replies[addr] += 1
        assert len(grants.table) <= max_grants
    check_shared_bound(sent, received, now, unverified_extra=bool(extra))
    for count in replies.values():
        assert count <= DEFAULT_SOURCE_BURST + DEFAULT_SOURCE_RATE * now
    assert grants.used == sum(replies.values())
    assert grants.used + grants.refused == len(steps)
    assert budget.statistics().replies_dropped == grants.refused


def test_renewed_grant_gives_back_what_it_did_not_spend() -> None:
    budget = ReplyBudget()
    grants = ReplyGrants(budget, extra=0)
    for step in range(20):  # 75 requests a second of 100 bytes, renewed after each 3
        for _ in range(50):
            grant = grants.renew(CLIENT, grants.table.get(CLIENT), 100, 100, step * 2.0)
            assert grant is not None
            for _ in range(2):
                grant[0] -= 1
                grant[1] -= 100
    stats = budget.statistics()
    assert stats.replies_dropped == 0  # 64 KiB charged per grant would have hit the byte rate
    assert stats.replies_allowed == grants.used + grants.table[CLIENT][0]
    assert grants.used == 20 * 50 * 3


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 1500),  # request
            st.integers(0, 1600),  # reply
            st.integers(0, 12),  # address
            st.floats(0, 0.05),  # time step
            st.booleans(),  # exempt the address first
        ),
        min_size=1,
        max_size=300,
    ),
    st.sampled_from([2, 10_000]),
)
def test_source_grants_keep_every_bound_and_count_exactly(
    steps: list[tuple[int, int, int, float, bool]], max_grants: int
) -> None:
    """serve_udp's handlers reply anything: grants spent without the budget still give 1x
    per unverified address plus the shared allowance, the rate, and exact counts."""
    budget = ReplyBudget(max_sources=8)  # fewer than the addresses: evictions too
    grants = SourceGrants(budget, max_grants=max_grants)
    received: defaultdict[Addr, int] = defaultdict(int)
    sent: defaultdict[Addr, int] = defaultdict(int)
    verified: set[Addr] = set()
    replies = sent_bytes = 0
    now = 0.0
    for request, reply, n, dt, exempt in steps:
        now += dt
        addr = forged(n)
        if exempt and n % 3 == 0:
            budget.exempt(addr, now)
            verified.add(addr)
        received[addr] += request
        grants.on_received(addr, request, now)
        if grants.try_send(addr, reply, now):
            sent[addr] += reply
            replies += 1
            sent_bytes += reply
        assert len(grants.table) <= max_grants
    unverified = {a: total for a, total in sent.items() if a not in verified}
    check_shared_bound(unverified, received, now, unverified_extra=True)
    grants.settle_all()
    stats = budget.statistics()
    assert (stats.replies_allowed, stats.bytes_allowed) == (replies, sent_bytes)
    assert stats.replies_allowed + stats.replies_dropped == len(steps)


def test_a_grant_settled_by_a_full_table_is_not_refunded_again() -> None:
    budget = ReplyBudget()
    grants = ReplyGrants(budget, extra=0, max_grants=1)
    first = grants.renew(CLIENT, None, 10, 10, 0.0)
    assert first is not None
    grants.renew(forged(1), None, 10, 10, 0.0)  # the table is full: CLIENT's grant settles
    assert CLIENT not in grants.table
    grants.renew(CLIENT, first, 10, 10, 0.0)  # a caller still holding the old grant
    grants.settle_all()
    stats = budget.statistics()
    assert stats.replies_allowed == grants.used == 3
    source_grants = SourceGrants(budget, max_grants=1)
    assert source_grants.try_send(CLIENT, 0, 1.0)
    held = source_grants.table[CLIENT]
    assert source_grants.try_send(forged(1), 0, 1.0)  # settles CLIENT's grant
    assert source_grants._renew(CLIENT, held, 0, 1.0)
    source_grants.settle_all()
    assert budget.statistics().replies_allowed == 3 + 3  # exactly the replies allowed
