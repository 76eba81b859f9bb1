"""A chat cluster in one process: several chat servers, each a node on one real nats-server.

Every node is ``open_chat_server(nats=...)`` with its own NATS connection, as it would be
in its own process; clients are raw sockets, as ``nc`` would be. The nats-server runs with
JetStream from the virtual environment (the ``nats_server`` fixture); the tests stop and
restart it to make the outages. The processes-and-signals side (nodes killed, R11 across
nodes) is in ``test_chat_cluster_nodes.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import nats
import pytest

import netlib
from netlib import LocalNatsServer, NatsHub, NatsHubConfig, ServiceUnavailable
from netlib.services.chat.service import encode_line
from netlib.services.nats_hub import DEFAULT_NATS_URL, NATS_URL_ENV, nats_servers, nick_key
from tests.helpers import poll_until, wait_until
from tests.test_chat import LineClient

FAST = NatsHubConfig(nick_ttl=1.0, heartbeat=0.2, pull_heartbeat=0.5, reconnect_wait=0.05)
"""Short lifetimes for tests: a dead node's nicks are free within 1 s."""


@asynccontextmanager
async def cluster(
    url: str, count: int, config: NatsHubConfig = FAST
) -> AsyncIterator[list[netlib.ChatServer]]:
    """``count`` chat servers on the NATS at ``url``, once each has heard all the others."""
    async with AsyncExitStack() as stack:
        servers = [
            await stack.enter_async_context(netlib.open_chat_server(nats=url, nats_config=config))
            for _ in range(count)
        ]
        await wait_until(lambda: all(hub(s).statistics().nodes == count for s in servers), 3.0)
        yield servers


def hub(server: netlib.ChatServer) -> NatsHub:
    assert isinstance(server.service.hub, NatsHub)
    return server.service.hub


def port(server: netlib.ChatServer) -> int:
    found: int = server.tcp_addresses[0][1]
    return found


async def member(server: netlib.ChatServer, nick: str) -> LineClient:
    client = await LineClient.connect(port(server))
    client.send(f"/nick {nick}")
    await client.expect(f"*** you are now known as {nick}")
    return client


async def take_nick(client: LineClient, nick: str, timeout: float) -> float:
    """Ask for ``nick`` until it is granted; the seconds that took."""
    started = time.monotonic()

    async def granted() -> bool:
        client.send(f"/nick {nick}")
        answer = await client.expect(nick)
        return answer == f"*** you are now known as {nick}"

    await poll_until(granted, timeout, interval=0.05)
    return time.monotonic() - started


def said_in(line: str) -> str | None:
    """What a room line says (``[#room] <nick> text``: ``text``), None for a notice."""
    return line.split("> ", 1)[1] if "> " in line and line.startswith("[#") else None


async def read_said(
    client: LineClient, count: int, timeout: float = 5.0, since: int | None = None
) -> list[str]:
    """The next ``count`` lines said by others, skipping notices (kept in ``seen``); with
    ``since``, counting those in ``client.seen[since:]`` (read by an ``expect``) first."""
    said = [] if since is None else [t for t in map(said_in, client.seen[since:]) if t]
    try:
        async with asyncio.timeout(timeout):
            while len(said) < count:
                line = await client.lines.get()
                assert line is not None, f"closed after {said}"
                client.seen.append(line)
                if (text := said_in(line)) is not None:
                    said.append(text)
    except TimeoutError:
        raise AssertionError(
            f"{len(said)} of {count} lines in {timeout} s: {client.seen}"
        ) from None
    return said


async def test_lines_said_on_every_node_reach_every_member_in_one_order(
    nats_server: LocalNatsServer,
) -> None:
    async with cluster(nats_server.url, 3) as servers:
        clients = [await LineClient.connect(port(s)) for s in servers for _ in range(2)]
        for i, client in enumerate(clients):
            client.send(*(f"c{i} {n}" for n in range(10)))
        received = [await read_said(client, 50) for client in clients]
        for i, lines in enumerate(received):
            by_sender: dict[str, list[int]] = {}
            for line in lines:
                sender, n = line.split()
                by_sender.setdefault(sender, []).append(int(n))
            assert sorted(by_sender) == sorted(f"c{j}" for j in range(6) if j != i)
            assert all(ns == list(range(10)) for ns in by_sender.values())  # no loss, no dup
        for a in received:  # one order: the lines two members both got come in one order
            for b in received:
                assert [x for x in a if x in b] == [x for x in b if x in a]
        for client in clients:
            await client.aclose()


async def test_a_nick_is_unique_across_nodes_and_free_again_after_quit(
    nats_server: LocalNatsServer,
) -> None:
    config = NatsHubConfig(heartbeat=0.2)  # nicks live 30 s: a quit must free them at once
    async with cluster(nats_server.url, 2, config) as (one, two):
        alice = await member(one, "alice")
        other = await LineClient.connect(port(two))
        other.send("/nick ALICE")
        assert await other.expect("!!!") == '!!! nick "ALICE" is already taken'
        guests = [await LineClient.connect(port(s)) for s in (one, two) for _ in range(2)]
        welcomes = [client.seen[0] for client in (alice, other, *guests)]
        assert len({line.split()[2] for line in welcomes}) == 6  # guest numbers never clash
        alice.send("/quit")
        await alice.expect("*** goodbye")
        assert await take_nick(other, "ALICE", 2.0) < 1.0  # the quit freed it, not its age
        for client in (alice, other, *guests):
            await client.aclose()


async def test_who_list_and_private_messages_span_the_cluster(
    nats_server: LocalNatsServer,
) -> None:
    async with cluster(nats_server.url, 3) as servers:
        alice, bob, carol = [
            await member(s, nick)
            for s, nick in zip(servers, ("alice", "bob", "carol"), strict=True)
        ]
        bob.send("/join #ops")
        await bob.expect("*** you joined #ops (1 member on this server)")
        carol.send("/join ops")
        await bob.expect("[#ops] *** carol joined")
        alice.send("/who #ops")
        assert await alice.expect("*** #ops") == "*** #ops (2 members): bob carol"
        alice.send("/who")
        assert await alice.expect("*** #lobby") == "*** #lobby (3 members): alice bob carol"
        alice.send("/list")
        assert await alice.expect("*** 2 rooms") == "*** 2 rooms: #lobby (3), #ops (2)"
        alice.send("/msg CAROL over here")
        assert await carol.expect("-alice-") == "-alice- over here"
        assert await alice.expect("->") == "-> carol: over here"
        alice.send("/msg nobody hello")
        assert await alice.expect("!!!") == '!!! no such nick "nobody"'
        for client in (alice, bob, carol):
            await client.aclose()


async def test_a_member_s_lines_keep_their_order_around_its_cluster_questions(
    nats_server: LocalNatsServer,
) -> None:
    """Lines sent at once, as a script or a paste sends them: a line after ``/nick`` is said
    under the new nick, and the answers to ``/who``, ``/list`` and ``/msg`` (questions to
    the cluster) come in order, before the goodbye of the ``/quit`` after them."""
    async with cluster(nats_server.url, 2) as (one, two):
        watcher = await member(two, "watcher")
        ann = await LineClient.connect(port(one))
        ann.send("/nick ann", "hi, I am ann")
        assert await watcher.expect("> hi") == "[#lobby] <ann> hi, I am ann"
        await ann.expect("*** you are now known as ann")
        ann.send("/who", "/list", "/msg watcher psst", "/quit")
        replies = [await ann.expect(mark) for mark in ("***", "***", "->", "***")]
        assert replies == [
            "*** #lobby (2 members): ann watcher",
            "*** 1 room: #lobby (2)",
            "-> watcher: psst",
            "*** goodbye",
        ]
        assert await watcher.expect("-ann-") == "-ann- psst"
        await ann.closed()
        for client in (ann, watcher):
            await client.aclose()


async def test_a_member_joining_a_room_gets_its_last_lines_first(
    nats_server: LocalNatsServer,
) -> None:
    config = NatsHubConfig(history_lines=3, heartbeat=0.2)
    async with cluster(nats_server.url, 2, config) as (one, two):
        alice, early = await member(one, "alice"), await member(two, "early")
        early.send("/join #rust")
        await early.expect("*** you joined #rust")
        alice.send("/join #rust", *(f"line {n}" for n in range(5)), "/me waves")
        await early.expect("* alice waves")  # node two has read them all
        watcher = await member(two, "watcher")
        watcher.send("/join #rust")
        await watcher.expect("*** you joined #rust")
        # the history: the room's last 3 lines said, not the notices around them
        assert [await watcher.expect("[#rust]") for _ in range(4)] == [
            "[#rust] *** last 3 lines:",
            "[#rust] <alice> line 3",
            "[#rust] <alice> line 4",
            "[#rust] * alice waves",
        ]
        alice.send("live")
        assert await watcher.expect("[#rust]") == "[#rust] <alice> live"
        for client in (alice, early, watcher):
            await client.aclose()


async def test_members_stay_through_a_nats_outage_and_nothing_said_is_lost_or_doubled(
    nats_server: LocalNatsServer,
) -> None:
    async with cluster(nats_server.url, 2) as (one, two):
        alice, bob = await member(one, "alice"), await member(two, "bob")
        alice.send("before")
        assert await read_said(bob, 1) == ["before"]
        nats_server.stop()
        for client in (alice, bob):
            await client.expect("*** chat degraded: the chat cluster is unreachable")
        alice.send("during 1", "during 2", "/nick al", "/who")
        assert (await alice.expect("!!!")).startswith("!!! cannot change your nick now")
        assert (await alice.expect("*** #lobby")).endswith(
            "(this server only: the chat cluster is unreachable (connection to NATS lost))"
        )
        nats_server.start()
        await alice.expect("*** chat back to normal", timeout=5.0)
        alice.send("after")
        mark = len(bob.seen)
        # what bob sees next (the notice and alice's lines come in either order)
        said = await read_said(bob, 3)
        assert [said_in(line) for line in bob.seen[mark:] if said_in(line)] == said
        assert said == ["during 1", "during 2", "after"]  # each once, in order
        if not any(line.startswith("*** chat back to normal") for line in bob.seen[mark:]):
            await bob.expect("*** chat back to normal")
        bob.send("/nick al")  # nicks work again
        await bob.expect("*** you are now known as al")
        stats = hub(one).statistics()
        assert stats.outages == 1
        assert stats.undelivered == 0
        for client in (alice, bob):
            await client.aclose()


async def test_a_node_s_lines_keep_their_order_when_nats_crashes_mid_stream(
    nats_server: LocalNatsServer,
) -> None:
    """A node streams lines while NATS is killed and started again, three times: lines
    written to the dying connection are lost, lines still in nats-py's buffer would be
    written to the next connection first; the hub drops that buffer and resends everything
    unacknowledged in order, so a reader gets every line once, in the order published."""
    async with cluster(nats_server.url, 2) as (one, two):
        bob = await member(two, "bob")
        per_crash = 300
        for crash in range(3):
            first = crash * per_crash

            async def stream(first: int = first) -> None:
                for i in range(first, first + per_crash):
                    await hub(one).publish("#lobby", encode_line(f"[#lobby] <alice> {i}"), None)
                    await asyncio.sleep(0)  # one line per loop iteration: always mid-write

            streaming = asyncio.create_task(stream())

            def under_way(enough: int = hub(one).statistics().acknowledged + 50) -> bool:
                return hub(one).statistics().acknowledged > enough

            await wait_until(under_way)
            nats_server.kill()
            nats_server.start()
            await streaming
            said = [int(text) for text in await read_said(bob, per_crash, 30.0)]
            assert said == list(range(first, first + per_crash))  # each once, in order
        assert hub(one).statistics().outages == 3
        await bob.aclose()


async def test_a_line_that_cannot_wait_longer_is_reported_to_its_sender(
    nats_server: LocalNatsServer,
) -> None:
    config = NatsHubConfig(heartbeat=0.2, outbox_timeout=0.5, outbox_lines=2)
    async with cluster(nats_server.url, 2, config) as (one, two):
        alice, bob = await member(one, "alice"), await member(two, "bob")
        nats_server.stop()
        await alice.expect("*** chat degraded")
        alice.send("first", "second", "third")
        assert await alice.expect("!!!") == (
            "!!! not delivered (not sent: 2 lines already wait for the chat cluster): "
            "[#lobby] <alice> third"
        )
        for said in ("first", "second"):
            assert await alice.expect("!!!") == (
                "!!! not delivered (not sent: the chat cluster was unreachable for 0.5 s): "
                f"[#lobby] <alice> {said}"
            )
        nats_server.start()
        await alice.expect("*** chat back to normal", timeout=5.0)
        alice.send("after")
        assert await read_said(bob, 1) == ["after"]  # what was reported was not sent
        assert one.service.statistics().undelivered == 3
        for client in (alice, bob):
            await client.aclose()


async def test_a_node_whose_nick_was_taken_meanwhile_makes_its_holder_a_guest(
    nats_server: LocalNatsServer,
) -> None:
    async with cluster(nats_server.url, 1) as (one,):
        alice = await member(one, "alice")
        tamper = await nats.connect(nats_server.url)  # another node, as the bucket sees it
        kv = await tamper.jetstream().key_value("netlib_chat_nicks")
        await kv.purge(nick_key("alice"))
        await kv.create(nick_key("alice"), json.dumps({"node": "x", "nick": "alice"}).encode())
        await tamper.close()
        notice = await alice.expect("!!! your nick alice was given to someone else")
        assert notice.endswith("while the chat was degraded; you are now guest2")
        alice.send("/nick alice")
        assert await alice.expect("!!!") == '!!! nick "alice" is already taken'
        await alice.aclose()


async def test_a_node_cannot_start_without_nats() -> None:
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match=r"cannot use NATS at nats://127\.0\.0\.1:1"):
        async with netlib.open_chat_server(nats="127.0.0.1:1"):
            pass
    assert time.monotonic() - started < 5.0


def test_nats_servers_are_found_as_the_nats_command_line_finds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(NATS_URL_ENV, raising=False)
    assert nats_servers() == [DEFAULT_NATS_URL]
    monkeypatch.setenv(NATS_URL_ENV, "nats://a:4223, b ,tls://c")
    assert nats_servers() == ["nats://a:4223", "nats://b:4222", "tls://c:4222"]
    assert nats_servers("10.0.0.5:7422") == ["nats://10.0.0.5:7422"]
    assert nats_servers(["nats://u:p@h:1"]) == ["nats://u:p@h:1"]
    for bad in ("http://h:1", "nats://h:port", "nats://h:1/path", " , "):
        with pytest.raises(ValueError, match="NATS URL"):
            nats_servers(bad)
    assert os.environ[NATS_URL_ENV] == "nats://a:4223, b ,tls://c"


async def test_a_stream_deleted_under_the_cluster_is_made_again_and_lines_go_through(
    nats_server: LocalNatsServer,
) -> None:
    async with cluster(nats_server.url, 2) as (one, two):
        alice, bob = await member(one, "alice"), await member(two, "bob")
        tamper = await nats.connect(nats_server.url)
        await tamper.jetstream().delete_stream("netlib_chat")
        await tamper.close()
        alice.send("after the stream was deleted")  # refused at first, then sent again
        assert await read_said(bob, 1) == ["after the stream was deleted"]
        assert hub(one).statistics().resent >= 1
        for client in (alice, bob):
            await client.aclose()
