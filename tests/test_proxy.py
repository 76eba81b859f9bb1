"""The impairment proxies (``netlib.testing``, ``netlib proxy``) on real sockets."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time

import pytest

import netlib
from netlib.testing import LinkProfile, open_tcp_proxy, open_udp_proxy

NETLIB = [sys.executable, "-m", "netlib"]
TIMER_SLACK = 0.002  # uvloop's timers have whole milliseconds and may fire that much early


async def _echo_through(profile: LinkProfile, seed: int, count: int) -> list[bytes]:
    """Send ``count`` requests through a UDP proxy to an echo server; return the replies
    that came back, once the proxy has delivered or dropped everything."""
    async with (
        netlib.open_udp_server(netlib.make_udp_echo_handler("echo")) as server,
        open_udp_proxy(
            *server.addresses[0][:2], up=profile, down=LinkProfile(), seed=seed
        ) as proxy,
        netlib.open_udp_endpoint(*proxy.addresses[0][:2]) as client,
    ):
        for i in range(count):
            await client.send(b"%d" % i)
        replies: list[bytes] = []
        while True:
            stats = proxy.statistics()
            expected = stats.up.received - stats.up.dropped + stats.up.duplicated
            if stats.up.received == count and len(replies) == expected:
                return replies
            data, _ = await asyncio.wait_for(client.receive(), 5)
            replies.append(data)


async def test_a_lossless_proxy_delivers_everything() -> None:
    replies = await _echo_through(LinkProfile(delay=0.0), seed=1, count=50)
    assert sorted(replies, key=int) == [b"%d" % i for i in range(50)]


async def test_loss_is_counted_and_reproducible_for_a_seed() -> None:
    profile = LinkProfile(delay=0.0, loss=0.3)
    first = await _echo_through(profile, seed=7, count=200)
    second = await _echo_through(profile, seed=7, count=200)
    other = await _echo_through(profile, seed=8, count=200)
    assert 100 < len(first) < 180  # about 140 of 200 get through
    assert sorted(first, key=int) == sorted(second, key=int)  # the same ones were lost
    assert sorted(first, key=int) != sorted(other, key=int)


async def test_duplication_delivers_twice() -> None:
    replies = await _echo_through(LinkProfile(delay=0.0, duplicate=1.0), seed=1, count=20)
    assert sorted(replies, key=int) == sorted([b"%d" % i for i in range(20)] * 2, key=int)


async def test_delay_applies_each_way() -> None:
    async with (
        netlib.open_udp_server(netlib.make_udp_echo_handler("echo")) as server,
        open_udp_proxy(*server.addresses[0][:2], up=LinkProfile(delay=0.05)) as proxy,
        netlib.open_udp_endpoint(*proxy.addresses[0][:2]) as client,
    ):
        started = time.perf_counter()
        assert await client.request(b"slow", timeout=5, retries=0) == b"slow"
        # 50 ms up and 50 ms down, less uvloop's timer rounding (whole milliseconds)
        assert time.perf_counter() - started >= 0.1 - 2 * TIMER_SLACK


async def test_tcp_proxy_delays_and_keeps_every_byte_in_order() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with (
        netlib.open_tcp_server(netlib.echo_handler) as server,
        open_tcp_proxy(*server.addresses[0][:2], up=LinkProfile(delay=0.03)) as proxy,
        netlib.connect_tcp(*proxy.addresses[0][:2]) as client,
    ):
        started = time.perf_counter()
        await client.send(b"ping")
        assert await client.receive() == b"ping"
        assert time.perf_counter() - started >= 0.06 - 2 * TIMER_SLACK
        await client.send(payload)
        echoed = bytearray()
        while len(echoed) < len(payload):
            echoed += await asyncio.wait_for(client.receive(), 10)
        assert echoed == payload
        assert proxy.statistics().clients == 1


async def test_tcp_proxy_refuses_what_only_packets_can_suffer() -> None:
    with pytest.raises(ValueError, match=r"only delay \(delay, jitter\), not loss, reordering:"):
        async with open_tcp_proxy("127.0.0.1", 9, up=LinkProfile(loss=0.1, late=0.1)):
            pass
    # the knobs that only refine an effect do not count without it
    quiet = LinkProfile(delay=0.0, burst=3, late_delay=0.05)
    async with open_tcp_proxy("127.0.0.1", 9, up=quiet) as proxy:
        assert proxy.addresses


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_proxy_command_forwards_and_reports(loop_name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as echo:
        echo.bind(("127.0.0.1", 0))
        echo.settimeout(10)
        target = f"127.0.0.1:{echo.getsockname()[1]}"
        argv = ["--loop", loop_name, "proxy", "--target", target, "--loss", "0%", "--json"]
        proc = subprocess.Popen(
            [*NETLIB, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        listening = json.loads(proc.stdout.readline())
        port = int(listening["addresses"][0].rsplit(":", 1)[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"through", ("127.0.0.1", port))
            data, via = echo.recvfrom(100)  # the target got it from the proxy
            echo.sendto(data.upper(), via)
            assert client.recv(100) == b"THROUGH"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (0, "netlib: stopping\n")
    stats = json.loads(out)
    assert (stats["up.received"], stats["down.received"], stats["clients_total"]) == (1, 1, 1)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_tcp_proxy_command_delays_each_way(loop_name: str) -> None:
    """``netlib proxy --proto tcp --delay 20ms`` (the CLI's defaults for the packet knobs
    included) in front of a TCP echo server: a round trip takes both delays."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        argv = ["--loop", loop_name, "proxy", "--proto", "tcp", "--target", target]
        proc = subprocess.Popen(
            [*NETLIB, *argv, "--delay", "20ms", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)[1]
        port = int(json.loads(line)["addresses"][0].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            started = time.perf_counter()
            client.sendall(b"through")
            server, _ = listener.accept()
            with server:
                server.settimeout(10)
                server.sendall(server.recv(100).upper())
                assert client.recv(100) == b"THROUGH"
            assert time.perf_counter() - started >= 0.04 - 2 * TIMER_SLACK
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
    assert (proc.returncode, err) == (0, "netlib: stopping\n")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--target", "127.0.0.1:7", "--loss", "150%"], "invalid share '150%'"),
        (["--target", "127.0.0.1:7", "--delay", "soon"], "invalid duration 'soon'"),
        (["--target", "nowhere"], "invalid address 'nowhere': expected HOST:PORT"),
        (["--target", "127.0.0.1:7", "--blackhole", "5s"], "expected ON/OFF"),
        (["--proto", "tcp", "--target", "127.0.0.1:7", "--loss", "5%"], "not loss"),
        (["--target", "nowhere.invalid:7"], "cannot resolve host 'nowhere.invalid'"),
        (["--target", "127.0.0.1:7", "--loss", "60%", "--duplicate", "50%"], "exceed 100%"),
    ],
)
def test_bad_proxy_arguments_are_usage_errors(argv: list[str], fragment: str) -> None:
    done = subprocess.run([*NETLIB, "proxy", *argv], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_a_proxy_that_cannot_bind_says_where_in_one_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        done = subprocess.run(
            [*NETLIB, "proxy", "--listen", listen, "--target", "127.0.0.1:7"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert (done.returncode, done.stderr) == (
        1,
        f"netlib: error: cannot bind {listen}: Address already in use\n",
    )
