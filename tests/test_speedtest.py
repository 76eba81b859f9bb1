"""The speed test end to end on loopback: the API on both loops, the command line, a lossy
proxy between client and server, refusals and strangers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from typing import Any

import pytest

import netlib
import netlib.speedtest as speedtest_module
from netlib.cli import main
from netlib.sansio import speedtest as st
from netlib.services.speedtest import _all
from netlib.testing import LinkProfile, open_udp_proxy
from tests.helpers import wait_until

NETLIB = [sys.executable, "-m", "netlib"]
SHORT = 0.15  # seconds of sending in each test: enough for hundreds of datagrams


def _server(**options: Any) -> AbstractAsyncContextManager[netlib.SpeedtestServer]:
    """A speed-test server on a free port whose shutdown does not wait for reliable-UDP
    connections to finish their draining period (about a second)."""
    return netlib.open_speedtest_server(shutdown_grace=0.2, **options)


def _port(server: netlib.SpeedtestServer) -> int:
    port: int = server.addresses[0][1]
    return port


# -- the API, every protocol, both ways, both loops ------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["client-sends", "server-sends"])
@pytest.mark.parametrize("protocol", ["tcp", "udp", "rudp"])
async def test_each_protocol_measures_both_ways(protocol: str, reverse: bool) -> None:
    async with _server() as server:
        result = await netlib.run_speedtest(
            "127.0.0.1",
            _port(server),
            protocol=protocol,
            duration=SHORT,
            parallel=2,
            reverse=reverse,
            bitrate=4e6 if protocol == "udp" else None,
        )
        stats = server.statistics()
    assert (result.protocol, result.request.reverse, result.request.parallel) == (
        protocol,
        reverse,
        2,
    )
    assert result.sent.bytes > 0
    assert result.sent.seconds >= SHORT
    assert result.bits_per_second > 0
    assert result.latency.samples > 0
    assert result.latency.p50 is not None
    assert result.latency.p99 is not None
    assert 0 < result.latency.p50 <= result.latency.p99
    if protocol == "udp":  # loopback at 8 Mbit/s: nothing lost, nothing reordered
        assert result.datagrams is not None
        assert result.datagrams.packets == result.sent.messages
        assert (result.datagrams.lost_packets, result.datagrams.out_of_order) == (0, 0)
        assert result.received.messages == result.sent.messages
    else:  # every byte sent arrived, and TCP counts messages of the test's size
        assert result.datagrams is None
        assert result.received.bytes == result.sent.bytes
        assert result.received.messages == result.sent.messages
    moved = stats.bytes_sent if reverse else stats.bytes_received
    assert moved == result.received.bytes if reverse else result.sent.bytes
    assert (stats.tests, stats.completed, stats.active, stats.failed) == (1, 1, 0, 0)


async def test_ipv6_loopback() -> None:
    async with _server(host="::1") as server:
        for protocol in ("udp", "rudp"):  # UDP: addresses of four fields, confirmed as two
            result = await netlib.run_speedtest(
                "::1", _port(server), protocol=protocol, duration=0.1, reverse=True
            )
            assert result.received.messages == result.sent.messages > 0


async def test_the_test_s_traffic_goes_where_the_control_connection_got_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name with several addresses (``localhost``: ::1 and 127.0.0.1) reaches the server
    at one of them over TCP; the UDP datagrams and reliable-UDP streams go to that one,
    not to the name's first address. Here the control connection of ``dual.test`` (a name
    no resolver knows) gets through to 127.0.0.1: the data can only follow it."""
    connect = netlib.speedtest._connect

    def control_through_ipv4(host: str, port: int, timeout: float) -> Any:
        return connect("127.0.0.1" if host == "dual.test" else host, port, timeout)

    monkeypatch.setattr(netlib.speedtest, "_connect", control_through_ipv4)
    async with _server() as server:
        for protocol in ("udp", "rudp"):
            result = await netlib.run_speedtest(
                "dual.test", _port(server), protocol=protocol, duration=0.1, bitrate=4e6
            )
            assert result.received.messages == result.sent.messages > 0


async def test_udp_is_paced_to_the_bitrate() -> None:
    async with _server() as server:
        result = await netlib.run_speedtest(
            "127.0.0.1", _port(server), protocol="udp", duration=0.3, bitrate=2e6, size=500
        )
    assert result.sent.bits_per_second == pytest.approx(2e6, rel=0.1)
    assert result.sent.messages == pytest.approx(2e6 * 0.3 / 8 / 500, rel=0.1)
    assert result.bits_per_second == pytest.approx(2e6, rel=0.1)


async def test_a_free_tcp_port_whose_number_is_taken_for_udp_serves_udp_on_a_free_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``port=0``: the UDP endpoint takes the TCP port's number, unless a UDP socket holds
    it already (any process's); then a free one, which the client is told."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        number = taken.getsockname()[1]
        original = speedtest_module._datagram_endpoint

        def onto_the_taken_number(options: Any, *args: Any) -> Any:
            if options.local is not None and options.local[1]:  # the TCP port's number
                options = dataclasses.replace(options, local=(options.local[0], number))
            return original(options, *args)

        monkeypatch.setattr(speedtest_module, "_datagram_endpoint", onto_the_taken_number)
        async with _server() as server:
            assert server.udp_address[1] not in (0, number)
            result = await netlib.run_speedtest(
                "127.0.0.1", _port(server), protocol="udp", duration=SHORT, bitrate=4e6
            )
    assert result.datagrams is not None
    assert result.datagrams.packets == result.sent.messages > 0


async def test_tcp_can_be_paced_too() -> None:
    async with _server() as server:
        result = await netlib.run_speedtest(
            "127.0.0.1", _port(server), protocol="tcp", duration=0.3, bitrate=8e6, size=10_000
        )
    assert result.sent.bits_per_second == pytest.approx(8e6, rel=0.15)
    assert result.bits_per_second == pytest.approx(8e6, rel=0.15)


# -- loss through an impairment proxy ---------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True], ids=["client-sends", "server-sends"])
async def test_udp_loss_matches_the_proxys_drop_count(reverse: bool) -> None:
    lossy = LinkProfile(delay=0.0, loss=0.05)
    async with (
        _server() as server,
        open_udp_proxy("127.0.0.1", server.udp_address[1], up=lossy, seed=3) as proxy,
    ):
        result = await netlib.run_speedtest(
            "127.0.0.1",
            _port(server),
            protocol="udp",
            duration=0.3,
            bitrate=24e6,
            size=600,  # 1,500 datagrams: the probes and the handshake are 2 % of the traffic
            reverse=reverse,
            udp_port=proxy.addresses[0][1],
        )
        counts = proxy.statistics().down if reverse else proxy.statistics().up
    assert result.datagrams is not None
    proxy_percent = 100 * counts.dropped / counts.received
    assert result.datagrams.lost_packets > 0
    assert result.datagrams.lost_percent == pytest.approx(proxy_percent, abs=1.0)
    assert result.received.messages + result.datagrams.lost_packets == result.sent.messages


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("asked", "reason"),
    [
        ({"duration": 2.0}, "duration 2 s is above the server's limit of 1 s"),
        ({"duration": 0.5, "parallel": 3}, "3 streams are above the server's limit of 2"),
        ({"duration": 0.5, "size": 4096}, "size 4096 bytes is above the server's limit of 2048"),
        ({"duration": 0.5, "size": 1000, "bitrate": 6e6, "parallel": 2}, "bitrate 12 Mbit/s for"),
    ],
)
async def test_the_server_refuses_beyond_its_limits(asked: dict[str, Any], reason: str) -> None:
    limits = netlib.SpeedtestLimits(
        max_duration=1.0, max_parallel=2, max_size=2048, max_bitrate=10e6
    )
    async with _server(limits=limits) as server:
        with pytest.raises(netlib.RequestRefused) as refused:
            await netlib.run_speedtest("127.0.0.1", _port(server), protocol="tcp", **asked)
        assert server.statistics().refused == 1
    assert refused.value.status == 400
    assert refused.value.reason.startswith(reason)


async def test_a_busy_server_refuses_a_second_test() -> None:
    async with _server() as server:
        first = asyncio.create_task(
            netlib.run_speedtest("127.0.0.1", _port(server), protocol="udp", duration=0.3)
        )
        await wait_until(lambda: server.statistics().active == 1, timeout=5)
        with pytest.raises(netlib.RequestRefused, match="busy: it runs 1 test"):
            await netlib.run_speedtest("127.0.0.1", _port(server), protocol="tcp", duration=0.1)
        assert (await first).received.messages > 0


async def test_bad_requests_fail_before_any_connection() -> None:
    with pytest.raises(ValueError, match="unknown protocol 'sctp'"):
        await netlib.run_speedtest("127.0.0.1", 9, protocol="sctp")
    with pytest.raises(ValueError, match="duration must be > 0"):
        await netlib.run_speedtest("127.0.0.1", 9, duration=-1.0)


async def test_streams_that_never_attach_are_refused_in_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("netlib.services.speedtest.ATTACH_TIMEOUT", 0.2)
    async with _server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        request = netlib.SpeedtestRequest.default("tcp", duration=0.1, parallel=2, reverse=True)
        writer.write(st.encode_control("start", **request.to_message()))
        accepted = json.loads(await asyncio.wait_for(reader.readline(), 5))
        assert accepted["op"] == "accepted"
        cookie = bytes.fromhex(accepted["cookie"])
        beyond = st.pack_stream_hello(st.ROLE_DATA, 2, cookie)  # streams 0 and 1 only
        assert await _exchange(_port(server), beyond) == b""
        assert server.statistics().streams_refused == 1
        one_reader, one = await asyncio.open_connection("127.0.0.1", _port(server))
        one.write(st.pack_stream_hello(st.ROLE_DATA, 0, cookie))  # one of two streams
        refused = json.loads(await asyncio.wait_for(reader.readline(), 5))
        with contextlib.suppress(ConnectionResetError):  # the server cut it off
            assert await asyncio.wait_for(one_reader.read(), 5) == b""
        for stream in (writer, one):
            stream.close()
            with contextlib.suppress(ConnectionResetError):
                await stream.wait_closed()
        await wait_until(lambda: server.server.statistics().active == 0, timeout=5)
        assert (server.statistics().refused, server.statistics().active) == (1, 0)
    assert (refused["op"], refused["status"]) == ("refused", 408)
    assert "did not all reach the server within 0.2 s" in refused["error"]


async def test_a_client_that_leaves_before_attaching_frees_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("netlib.services.speedtest.ATTACH_TIMEOUT", 60.0)  # not the way out
    async with _server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        request = netlib.SpeedtestRequest.default("udp", duration=0.1)
        writer.write(st.encode_control("start", **request.to_message()))
        assert json.loads(await asyncio.wait_for(reader.readline(), 5))["op"] == "accepted"
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.statistics().active == 0, timeout=5)
        assert server.statistics().failed == 1
        result = await netlib.run_speedtest(
            "127.0.0.1", _port(server), protocol="tcp", duration=0.1
        )
        assert result.received.bytes > 0  # not "busy"


# -- strangers --------------------------------------------------------------------------------


async def _exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new TCP connection; return what the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_strangers_get_nothing_and_are_counted() -> None:
    async with _server() as server:
        port = _port(server)
        unknown = st.pack_stream_hello(st.ROLE_DATA, 0, b"12345678")
        assert await _exchange(port, unknown + b"data") == b""  # a stream of no test
        assert await _exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") == b""
        assert server.statistics().streams_refused == 2
        not_json = json.loads(await _exchange(port, b"{not json\n"))
        assert (not_json["op"], not_json["status"]) == ("refused", 400)
        assert "not JSON" in not_json["error"]
        too_long = json.loads(await _exchange(port, b"{" + b"x" * (st.CONTROL_LINE_LIMIT + 1)))
        assert "exceeds the limit" in too_long["error"]
        async with netlib.open_udp_endpoint("127.0.0.1", server.udp_address[1]) as udp:
            hello = st.pack_datagram(st.KIND_HELLO, 0, b"12345678", 0, 0.0)
            for data in (hello, b"short", b"\x00" * 100):
                await udp.send(data)
            await wait_until(lambda: server.statistics().datagrams_dropped == 3)
            assert udp.statistics().received == 0  # no reply to any of them
        assert server.statistics().tests == 0


async def test_reverse_udp_sends_only_to_a_confirmed_address() -> None:
    """A HELLO from one address and a CONFIRM from another (a forged source replaying the
    nonce) attach nothing: the test traffic goes only where the nonce was received."""
    async with _server() as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(server))
        request = netlib.SpeedtestRequest.default("udp", duration=0.2, reverse=True)
        writer.write(st.encode_control("start", **request.to_message()))
        accepted = json.loads(await asyncio.wait_for(reader.readline(), 5))
        cookie = bytes.fromhex(accepted["cookie"])
        udp_port = accepted["udp_port"]
        async with (
            netlib.open_udp_endpoint("127.0.0.1", udp_port) as victim,
            netlib.open_udp_endpoint("127.0.0.1", udp_port) as client,
        ):
            nonces = {}
            for index in (0, st.PROBE_STREAM):
                hello = st.pack_datagram(st.KIND_HELLO, index, cookie, 0, 0.0)
                challenge = await victim.request(hello, timeout=2)
                nonces[index] = st.DATAGRAM.unpack_from(challenge)[4]
                assert len(challenge) <= len(hello)  # never more than was sent
            for index, nonce in nonces.items():  # replayed from another address
                await client.send(st.pack_datagram(st.KIND_CONFIRM, index, cookie, nonce, 0.0))
            for index in nonces:  # the client's own handshake
                hello = st.pack_datagram(st.KIND_HELLO, index, cookie, 0, 0.0)
                challenge = await client.request(hello, timeout=2)
                nonce = st.DATAGRAM.unpack_from(challenge)[4]
                await client.send(st.pack_datagram(st.KIND_CONFIRM, index, cookie, nonce, 0.0))
            ready = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert ready["op"] == "ready"
            data, _ = await asyncio.wait_for(client.receive(), 5)
            assert st.DATAGRAM.unpack_from(data)[1] == st.KIND_DATA
            done = json.loads(await asyncio.wait_for(reader.readline(), 5))
            assert done["op"] == "done"
            assert done["sent"]["messages"] > 1
            assert victim.statistics().received == 2  # its two challenges, nothing else
        writer.close()
        await writer.wait_closed()
        await wait_until(lambda: server.statistics().active == 0)
        assert server.statistics().failed == 1  # the client left without its result


# -- the command line -------------------------------------------------------------------------


@contextmanager
def _running(*argv: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A netlib command in a subprocess that prints a ``listening`` JSON line first."""
    proc = subprocess.Popen(
        [*NETLIB, *argv, "--json", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
        assert proc.returncode == 0


@pytest.fixture(scope="module")
def speedtest_port() -> Iterator[int]:
    """One ``netlib speedtest serve`` for the command-line tests of this module."""
    with _running("speedtest", "serve", "--port", "0") as (_proc, listening):
        assert listening["event"] == "listening"
        yield int(listening["addresses"][0].rsplit(":", 1)[1])


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_the_command_prints_one_row_per_protocol(
    loop_name: str, speedtest_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--loop", loop_name, "speedtest", "--port", str(speedtest_port), "--duration", "0.1"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "speed test, client to server, 1 stream, 0.1 s per protocol:"
    assert lines[1].split() == [
        "proto", "sent", "received", "msgs/s", "rtt", "p50", "rtt", "p99", "lost", "jitter",
        "reordered",
    ]  # fmt: skip
    rows = [line.split() for line in lines[2:]]
    assert [row[0] for row in rows] == ["tcp", "udp", "rudp"]
    assert re.fullmatch(r"0/\d+", rows[1][-5])  # udp: lost/packets (0%), jitter ms, order
    assert [row[-1] for row in rows] == ["-", "0", "-"]  # reordered: udp only


def test_json_has_iperf3_names(speedtest_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["speedtest", "--port", str(speedtest_port), "--duration", "0.1", "--json"]
    assert main([*argv, "--proto", "udp", "--reverse", "--parallel", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert (result["event"], result["protocol"], result["reverse"]) == ("result", "udp", True)
    assert result["num_streams"] == 2
    received = result["sum_received"]
    assert received["packets"] == result["sum_sent"]["packets"] > 0
    for name in ("bits_per_second", "jitter_ms", "lost_packets", "lost_percent", "out_of_order"):
        assert name in received
    assert result["latency_ms"]["samples"] > 0


def test_loss_through_netlib_proxy_matches_its_drop_count(
    speedtest_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{speedtest_port}"
    with _running("proxy", "--target", target, "--loss", "5%", "--seed", "5") as (proc, info):
        proxy_port = info["addresses"][0].rsplit(":", 1)[1]
        argv = ["speedtest", "--port", str(speedtest_port), "--proto", "udp", "--json"]
        options = ["--udp-port", proxy_port, "--bitrate", "24M", "--size", "600"]
        options += ["--duration", "0.3"]  # 1,500 datagrams, and about 60 probes and hellos
        assert main([*argv, *options]) == 0
        result = json.loads(capsys.readouterr().out)["sum_received"]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    stats = json.loads(out.splitlines()[-1])
    assert stats["event"] == "statistics"
    proxy_percent = 100 * stats["up.dropped"] / stats["up.received"]
    assert result["lost_packets"] > 0
    assert result["lost_percent"] == pytest.approx(proxy_percent, abs=1.0)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--proto", "sctp"], "invalid choice: 'sctp'"),
        (["--duration", "-1"], "must be > 0"),
        (["--duration", "0"], "must be > 0"),
        (["--parallel", "0"], "invalid count 0"),
        (["--size", "12x"], "invalid size '12x'"),
        (["--proto", "udp", "--size", "100K"], "udp size must be 28..65507 bytes"),
        (["--proto", "udp", "--bitrate", "0"], "udp needs a bitrate above 0"),
        (["--bitrate", "fast"], "invalid bitrate 'fast'"),
        (["serve", "--max-tests", "0"], "invalid count 0"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["speedtest", "--port", "9", *argv])
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert fragment in errors[0]


def test_a_refusal_is_one_line_and_exit_1(
    speedtest_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["speedtest", "--port", str(speedtest_port), "--duration", "61"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "netlib: error: the server refused the tcp test: duration 61 s is above the server's "
        "limit of 60 s\n"
    )


def test_nothing_listening_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    assert main(["speedtest", "--port", str(port), "--proto", "tcp"]) == 1
    assert capsys.readouterr().err == f"netlib: error: connection refused by 127.0.0.1:{port}\n"


async def test_a_failed_sender_stops_its_siblings_and_its_error_is_raised() -> None:
    sibling_cancelled = asyncio.Event()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise netlib.BrokenResourceError("connection lost")

    async def sends_on() -> None:
        try:
            await asyncio.Event().wait()  # a sender of a long test
        except asyncio.CancelledError:
            sibling_cancelled.set()
            raise

    with pytest.raises(netlib.BrokenResourceError, match="connection lost"):
        await _all([sends_on(), fails(), sends_on()])
    assert sibling_cancelled.is_set()
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
