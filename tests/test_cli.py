"""The ``netlib`` command line: usage errors, and echo serve/send end to end."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trustme

import netlib
from netlib.cli import build_parser, main
from netlib.cli._common import statistics_text
from netlib.sansio.reliable import core_kind
from tests.helpers import wait_until

NETLIB = [sys.executable, "-m", "netlib"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["echo", "send", "--port", "99999", "hi"], "invalid port 99999"),
        (["echo", "send", "--port", "http", "hi"], "invalid port 'http'"),
        (["echo", "send", "--host", "bad host!", "hi"], "invalid host 'bad host!'"),
        (["echo", "serve", "--host", "999.1.1.1"], "invalid host '999.1.1.1'"),
        (["echo", "send", "--timeout", "-1", "hi"], "must be > 0"),
        (["echo", "send", "--proto", "sctp", "hi"], "invalid choice: 'sctp'"),
        (["--loop", "trio", "demo"], "invalid choice: 'trio'"),
        (["echo", "send", "--proto", "udp", "--retries", "x", "hi"], "invalid count 'x'"),
        (["echo", "serve", "--max-connections-per-host", "-1"], "invalid count -1"),
        (["echo", "serve", "--mode", "timestamp"], "timestamp is a UDP service"),
        (["echo", "serve", "--upper", "--mode", "timestamp"], "not allowed with argument"),
        (["echo", "send", "a\nb"], "message 1 contains a line break"),
        (["echo", "send", "ok", "ends in\r"], "message 2 contains a line break"),
        (["echo", "send", "x" * 100_000], "over the TCP echo's line limit of 65536 bytes"),
        (["echo", "send", "--proto", "udp", "x" * 70_000], "message 1 cannot be sent"),
        (["echo", "send", "-", "hi"], "cannot be mixed"),
        (["echo", "serve", "--tls-cert", "/no/such/cert.pem"], "cannot load the TLS certif"),
        (["echo", "send", "--cacert", "/no/such/ca.pem", "hi"], "cannot load --cacert"),
        (["echo", "serve", "--idle-timeout", "soon"], "invalid number 'soon'"),
        (["chat", "serve", "--port", "-1"], "invalid port -1"),
        (["chat", "join", "--proto", "both"], "invalid choice: 'both'"),
        (["demo", "--loop", "trio"], "invalid choice: 'trio'"),
        (["echo"], "required: ACTION"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_error(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert fragment in errors[0]
    assert "Traceback" not in err


def test_unresolvable_host_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["echo", "send", "--host", "no-such-host.invalid", "hi"])
    assert info.value.code == 2
    assert "cannot resolve host 'no-such-host.invalid'" in capsys.readouterr().err


def test_connection_refused_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["echo", "send", "--port", str(port), "hi"]) == 1
    err = capsys.readouterr().err
    assert err == f"netlib: error: connection refused by 127.0.0.1:{port}\n"


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@contextmanager
def serve(loop_name: str, *extra: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [*NETLIB, "--loop", loop_name, "echo", "serve", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    match = re.search(r"127\.0\.0\.1:(\d+)", proc.stdout.readline())
    assert match, "server did not announce its address"
    try:
        yield proc, int(match.group(1))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    ("flag", "replies"), [((), "hello\nworld\n"), (("--upper",), "HELLO\nWORLD\n")]
)
def test_echo_serve_and_send(loop_name: str, flag: tuple[str, ...], replies: str) -> None:
    with serve(loop_name, *flag) as (_proc, port):
        done = subprocess.run(
            [*NETLIB, "--loop", loop_name, "echo", "send", "--port", str(port), "hello", "world"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, replies, "")


def test_demo_runs_and_stops_by_itself(loop_name: str) -> None:
    done = subprocess.run(
        [*NETLIB, "--loop", loop_name, "demo"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"demo on {loop_name}" in done.stdout
    assert "< HELLO" in done.stdout
    assert "2000 of 2000 echoes correct" in done.stdout
    assert re.search(r"< \[\w{3} \w{3} [ \d]\d [\d:]{8} \d{4}\] hello", done.stdout)
    assert re.search(r"dropped by the per-address reply budget=[1-9]", done.stdout)
    assert "carol sees:  [#lobby] <alice> hi everyone" in done.stdout
    assert "alice sees:  -bob- psst, over here" in done.stdout
    assert "carol sees:  [#lobby] *** alice quit (see you)" in done.stdout
    assert "bob sees:  [#lobby] <alice> hello from the first server" in done.stdout
    assert "alice sees:  -bob- and this is the second" in done.stdout  # across NATS
    assert re.search(
        r"saved 8388608 bytes in [\d.]+s; SHA-256 [0-9a-f]{16}\.\.\. verified against the "
        r"server's Repr-Digest\n  identical to the file served: True; file server: "
        r"requests=1 bytes_sent=8388608\n",
        done.stdout,
    )
    # the last section: the speed test's table, one row per protocol, before the sign-off
    tail = done.stdout.rstrip().splitlines()[-6:]
    assert tail[0].split()[:3] == ["proto", "sent", "received"]
    assert [row.split()[0] for row in tail[1:4]] == ["tcp", "udp", "rudp"]
    assert re.search(r"  0/\d+ \(0%\)  ", tail[2])  # udp on loopback: nothing lost
    assert tail[-1] == "servers shut down; demo done"


def test_udp_echo_serve_and_send_timestamp(loop_name: str) -> None:
    with serve(loop_name, "--proto", "udp", "--mode", "timestamp") as (_proc, port):
        done = subprocess.run(
            [
                *NETLIB,
                "--loop",
                loop_name,
                "echo",
                "send",
                "--proto",
                "udp",
                "--port",
                str(port),
                "hello",
                "",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert re.fullmatch(r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] hello", first)
    assert re.fullmatch(r"\[\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}\] ", second)


def test_udp_send_without_server_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["echo", "send", "--proto", "udp", "--port", str(port), "--timeout", "0.1", "hi"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"netlib: error: nothing listens on 127.0.0.1:{port} (udp port unreachable)\n"


def test_udp_send_to_a_silent_peer_times_out(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound, never answers
        port = silent.getsockname()[1]
        argv = [
            "echo",
            "send",
            "--proto",
            "udp",
            "--port",
            str(port),
            "--timeout",
            "0.05",
            "--retries",
            "2",
            "hi",
        ]
        assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"netlib: error: no reply from 127.0.0.1:{port} after 3 attempts of 0.05s\n"


@contextmanager
def chat_server(loop_name: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [*NETLIB, "--loop", loop_name, "chat", "serve", "--proto", "both", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    match = re.search(r"127\.0\.0\.1:(\d+) \(tcp\)", proc.stdout.readline())
    assert match, "chat server did not announce its address"
    try:
        yield int(match.group(1))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_chat_serve_and_join_from_a_pipe(loop_name: str, proto: str) -> None:
    with chat_server(loop_name) as port:
        done = subprocess.run(
            [
                *NETLIB,
                "--loop",
                loop_name,
                "chat",
                "join",
                "--proto",
                proto,
                "--port",
                str(port),
                "--nick",
                "alice",
            ],
            input="/join #netlib\n/who\nover\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert "*** you are now known as alice" in done.stdout
    assert "*** #netlib (1 member): alice" in done.stdout
    assert done.stdout.rstrip().endswith("*** goodbye")


def test_chat_join_without_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["chat", "join", "--port", str(port)]) == 1
    assert "netlib: error:" in capsys.readouterr().err


def test_bad_loop_from_the_environment_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NETLIB_LOOP", "trio")
    with pytest.raises(SystemExit) as info:
        main(["echo", "send", "hi"])
    assert info.value.code == 2
    assert "netlib: error: unknown loop 'trio'" in capsys.readouterr().err


@pytest.mark.parametrize(("given", "expected"), [([], 256), (["0"], None), (["3"], 3)])
def test_echo_serve_max_connections_per_host(given: list[str], expected: int | None) -> None:
    option = ["--max-connections-per-host", *given] if given else []
    args = build_parser().parse_args(["echo", "serve", *option])
    assert args.max_connections_per_host == expected


# -- conventions ------------------------------------------------------------------------------


def test_version_is_printed() -> None:
    done = subprocess.run([*NETLIB, "--version"], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"netlib {netlib.__version__}\n")


@pytest.mark.parametrize(
    "argv",
    [
        ["echo", "send", "hi", "--loop", "asyncio", "-v"],
        ["echo", "--loop", "asyncio", "send", "-v", "hi"],
        ["--loop", "asyncio", "-v", "echo", "send", "hi"],
    ],
)
def test_common_options_are_accepted_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert (args.loop, args.verbose, args.messages) == ("asyncio", 1, ["hi"])


def test_help_shows_defaults_descriptions_and_examples() -> None:
    done = subprocess.run(
        [*NETLIB, "echo", "serve", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0
    assert "(default: 7007)" in done.stdout
    assert "(default: 300.0)" in done.stdout
    assert "examples:\n  netlib echo serve" in done.stdout
    assert "Serve echo until Ctrl-C or SIGTERM" in done.stdout
    top = subprocess.run([*NETLIB, "--help"], capture_output=True, text=True, timeout=30)
    assert "exit status: 0 done, 1 failed, 2 usage error" in top.stdout


def test_help_does_not_import_the_interactive_ui() -> None:
    code = (
        "import sys\nfrom netlib.cli import main\ntry:\n    main(['--help'])\n"
        "except SystemExit:\n    pass\nprint('prompt_toolkit' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "False"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("chat_server", "chat_server"),
        ("bücher.example", "bücher.example"),
        ("*", None),
        ("::", None),
        ("[::1]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("0.0.0.0", "0.0.0.0"),
    ],
)
def test_hosts_that_a_resolver_may_know_are_accepted(value: str, expected: str | None) -> None:
    args = build_parser().parse_args(["echo", "serve", "--host", value])
    assert args.host == expected


def test_a_temporary_resolver_failure_is_a_runtime_error_not_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unavailable(*_args: object, **_kwargs: object) -> NoReturn:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", unavailable)
    assert main(["--loop", "asyncio", "echo", "send", "--host", "example.test", "hi"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "netlib: error: cannot resolve host 'example.test' now: "
        "Temporary failure in name resolution\n"
    )


def test_ipv6_addresses_are_printed_in_brackets(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    assert main(["echo", "send", "--host", "::1", "--port", str(port), "hi"]) == 1
    assert capsys.readouterr().err == f"netlib: error: connection refused by [::1]:{port}\n"


# -- servers: start, serve, stop --------------------------------------------------------------


@contextmanager
def running(*argv: str) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A server subprocess started with ``--json``; yields it and its listening line."""
    proc = subprocess.Popen(
        [*NETLIB, *argv, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        line = proc.stdout.readline()
        assert line, proc.communicate(timeout=10)
        listening = json.loads(line)
        assert listening["event"] == "listening"
        yield proc, listening
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _port(listening: dict[str, Any]) -> int:
    address = listening["addresses"][0]
    return int((address["address"] if isinstance(address, dict) else address).rsplit(":", 1)[1])


def _read_json(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "the server ended without printing"
    found: dict[str, Any] = json.loads(line)
    return found


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_echo_server_gracefully(loop_name: str, signum: int) -> None:
    with running("--loop", loop_name, "echo", "serve", "--port", "0") as (proc, listening):
        with socket.create_connection(("127.0.0.1", _port(listening)), timeout=10) as client:
            client.sendall(b"before\n")
            assert client.recv(100) == b"before\n"
            proc.send_signal(signum)
            assert proc.stderr is not None
            assert (
                "netlib: stopping: waiting up to 10s for 1 connection(s)" in proc.stderr.readline()
            )
            client.sendall(b"during the shutdown\n")  # input has ended: not echoed
            assert client.recv(100) == b""  # the server closed after the handler ended
        stats = _read_json(proc)
        assert proc.wait(timeout=10) == 0
    assert (stats["event"], stats["accepted"], stats["active"]) == ("statistics", 1, 0)


def test_a_second_signal_closes_the_remaining_connections_at_once(loop_name: str) -> None:
    argv = ("--loop", loop_name, "echo", "serve", "--port", "0", "--shutdown-grace", "60")
    with (
        running(*argv) as (proc, listening),
        socket.create_connection(("127.0.0.1", _port(listening)), timeout=10) as client,
    ):
        client.sendall(b"x\n")
        assert client.recv(100) == b"x\n"
        # This client never closes its side: the server's close waits for it, in the grace.
        proc.send_signal(signal.SIGINT)
        assert proc.stderr is not None
        assert "press Ctrl-C again" in proc.stderr.readline()
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5  # not the 60 s grace
        assert client.recv(100) == b""
        stats = _read_json(proc)
        assert (stats["aborted_at_shutdown"], stats["active"]) == (0, 0)


def test_statistics_on_request_and_on_an_interval(loop_name: str) -> None:
    argv = ("--loop", loop_name, "echo", "serve", "--port", "0", "--stats-interval", "0.2")
    with running(*argv) as (proc, listening):
        with socket.create_connection(("127.0.0.1", _port(listening)), timeout=10) as client:
            client.sendall(b"x\n")
            assert client.recv(100) == b"x\n"
            ticks = [_read_json(proc) for _ in range(3)]
            assert all(t["event"] == "statistics" for t in ticks)
            assert ticks[-1]["accepted"] == 1
            assert ticks[-1]["active"] == 1
        proc.send_signal(signal.SIGUSR1)
        assert _read_json(proc)["event"] == "statistics"  # an interval tick or the report
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_the_udp_echo_server_prints_statistics_when_it_stops(loop_name: str) -> None:
    argv = ("--loop", loop_name, "echo", "serve", "--proto", "udp", "--port", "0")
    with running(*argv) as (proc, listening):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(10)
            client.sendto(b"ping", ("127.0.0.1", _port(listening)))
            assert client.recv(100) == b"ping"
        proc.send_signal(signal.SIGTERM)
        stats = _read_json(proc)
        assert proc.wait(timeout=10) == 0
    assert (stats["handled"], stats["endpoint.received"]) == (1, 1)


def test_a_connection_cut_off_by_a_deadline_is_logged_by_default(loop_name: str) -> None:
    argv = ("--loop", loop_name, "echo", "serve", "--port", "0", "--first-message-timeout", "0.3")
    with running(*argv) as (proc, listening):
        with socket.create_connection(("127.0.0.1", _port(listening)), timeout=10) as client:
            assert client.recv(100) == b""  # closed at the deadline
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "INFO closed 127.0.0.1:" in line
        assert "no complete message within 0.3s" in line
        proc.send_signal(signal.SIGTERM)
        assert _read_json(proc)["timeouts"] == 1
        assert proc.wait(timeout=10) == 0


def test_every_interface_means_ipv4_and_ipv6(loop_name: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ("--loop", loop_name, "echo", "serve", "--host", "*", "--port", str(port))
    with running(*argv) as (proc, listening):
        assert sorted(listening["addresses"]) == sorted([f"0.0.0.0:{port}", f"[::]:{port}"])
        for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            with socket.socket(family) as client:
                client.settimeout(10)
                client.connect((host, port))
                client.sendall(b"v\n")
                assert client.recv(100) == b"v\n"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_echo_over_a_unix_socket(loop_name: str, tmp_path: Path) -> None:
    path = str(tmp_path / "echo.sock")
    with running("--loop", loop_name, "echo", "serve", "--unix", path) as (proc, listening):
        assert listening["addresses"] == [path]
        done = subprocess.run(
            [*NETLIB, "--loop", loop_name, "echo", "send", "--unix", path, "over unix"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "over unix\n", "")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_echo_over_tls_without_warnings(loop_name: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    argv = ("--loop", loop_name, "echo", "serve", "--port", "0", "--tls-cert")
    with running(*argv, str(tmp_path / "server.pem")) as (proc, listening):
        send = [*NETLIB, "--loop", loop_name, "echo", "send", "--port", str(_port(listening))]
        trusted = subprocess.run(
            [*send, "--cacert", str(tmp_path / "ca.pem"), "secret"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (trusted.returncode, trusted.stdout, trusted.stderr) == (0, "secret\n", "")
        untrusted = subprocess.run(
            [*send, "--tls", "secret"], capture_output=True, text=True, timeout=30
        )
        assert untrusted.returncode == 1
        assert "netlib: error: TLS with 127.0.0.1:" in untrusted.stderr
        assert "certificate verify failed" in untrusted.stderr
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0
    assert "eof_received" not in err
    assert "Traceback" not in err


def test_echo_send_reads_lines_from_stdin_and_prints_json(loop_name: str) -> None:
    with running("--loop", loop_name, "echo", "serve", "--port", "0") as (proc, listening):
        done = subprocess.run(
            [*NETLIB, "echo", "send", "--port", str(_port(listening)), "--json", "-"],
            input="first\r\nsecond\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        proc.send_signal(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(r["message"], r["reply"]) for r in replies] == [
        ("first", "first"),
        ("second", "second"),
    ]
    assert all(r["rtt_ms"] > 0 for r in replies)


# -- clients: interrupted ----------------------------------------------------------------------


@contextmanager
def silent_tcp_server() -> Iterator[int]:
    """A listening socket that accepts (in the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("command", ["echo", "chat"])
def test_an_interrupted_client_exits_128_plus_the_signal_quietly(
    loop_name: str, signum: int, status: int, command: str
) -> None:
    with silent_tcp_server() as port:
        argv = {
            "echo": ["echo", "send", "--port", str(port), "--timeout", "60", "waiting"],
            "chat": ["chat", "join", "--port", str(port), "--nick", "nobody"],
        }[command]
        proc = subprocess.Popen(
            [*NETLIB, "--loop", loop_name, "-v", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        # -v logs the loop's choice of selector/loop: a line means the client is running.
        _wait_for_running(proc)
        proc.send_signal(signum)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == status
    assert "Traceback" not in err


def _wait_for_running(proc: subprocess.Popen[str]) -> None:
    """Wait until the process has its signal handlers (it logs 'signal handlers ready')."""
    assert proc.stderr is not None
    for _ in range(50):
        line = proc.stderr.readline()
        assert line, "the client ended before it was interrupted"
        if "signal handlers ready" in line:
            return
    raise AssertionError("the client never said it was ready")


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_demo_interrupted_exits_128_plus_the_signal_quietly(
    loop_name: str, signum: int, status: int
) -> None:
    proc = subprocess.Popen(
        [*NETLIB, "--loop", loop_name, "-v", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_running(proc)  # the demo then runs for a few hundred milliseconds
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == status
    assert "demo done" not in out
    assert "Traceback" not in err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_chat_server_and_its_members_hear_it(
    loop_name: str, signum: int
) -> None:
    with running("--loop", loop_name, "chat", "serve", "--port", "0") as (proc, listening):
        assert [a["proto"] for a in listening["addresses"]] == ["tcp", "udp"]
        with socket.create_connection(("127.0.0.1", _port(listening)), timeout=10) as member:
            reader = member.makefile("rb")
            assert reader.readline().startswith(b"*** welcome")
            proc.send_signal(signum)
            rest = reader.read()  # everything up to the server's close
            assert b"shutting down" in rest
        stats = _read_json(proc)
        assert proc.wait(timeout=10) == 0
    assert (stats["event"], stats["opened"], stats["sessions"]) == ("statistics", 1, 0)


def test_a_listen_only_client_stays_until_the_server_stops(loop_name: str) -> None:
    with running("--loop", loop_name, "chat", "serve", "--port", "0") as (proc, listening):
        port = str(_port(listening))
        logger = subprocess.Popen(
            [*NETLIB, "--loop", loop_name, "chat", "join", "--port", port, "--stay"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert logger.stdout is not None
        assert logger.stdout.readline().startswith("*** welcome")
        said = subprocess.run(
            [*NETLIB, "chat", "join", "--port", port, "--nick", "alice"],
            input="hello, logger\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert said.returncode == 0, said.stderr
        lines = iter(logger.stdout.readline, "")
        assert any(line.rstrip() == "[#lobby] <alice> hello, logger" for line in lines)
        proc.send_signal(signal.SIGTERM)
        out, err = logger.communicate(timeout=20)
        assert (logger.returncode, err) == (0, "")
        assert "*** server shutting down" in out


WITHOUT_PROMPT_TOOLKIT = """
import sys
sys.modules["prompt_toolkit"] = None  # as if the cli extra were not installed
from netlib.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_the_cli_extra_a_terminal_chat_says_what_to_install(loop_name: str) -> None:
    with running("--loop", loop_name, "chat", "serve", "--port", "0") as (proc, listening):
        port = str(_port(listening))
        argv = [sys.executable, "-c", WITHOUT_PROMPT_TOOLKIT, "chat", "join", "--port", port]
        piped = subprocess.run(argv, input="hi\n", capture_output=True, text=True, timeout=30)
        assert piped.returncode == 0, piped.stderr
        assert "*** goodbye" in piped.stdout
        # A terminal on stdin: the client would prompt, which needs prompt_toolkit.
        primary, secondary = os.openpty()
        with os.fdopen(primary, "rb", buffering=0), os.fdopen(secondary, "rb", buffering=0) as tty:
            prompted = subprocess.run(argv, stdin=tty, capture_output=True, text=True, timeout=30)
        assert prompted.returncode == 1
        assert "needs prompt_toolkit: pip install 'netlib-asyncio[cli]'" in prompted.stderr
        proc.send_signal(signal.SIGTERM)


# -- reliable UDP -----------------------------------------------------------------------------


def test_rudp_echo_serve_and_send_and_statistics_at_the_end(loop_name: str) -> None:
    with running("--loop", loop_name, "echo", "serve", "--proto", "rudp", "--port", "0") as (
        proc,
        listening,
    ):
        assert listening["proto"] == "rudp"
        assert listening["core"] == core_kind()  # the same build as this process's
        done = subprocess.run(
            [
                *NETLIB,
                *("--loop", loop_name, "echo", "send", "--proto", "rudp"),
                *("--port", str(_port(listening)), "hello", "two words", ""),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, "hello\ntwo words\n\n", "")
        proc.send_signal(signal.SIGINT)
        stats = _read_json(proc)
    assert stats["accepted"] == 1
    assert stats["cookies_sent"] == 1


def test_rudp_on_every_interface_means_ipv4_and_ipv6(loop_name: str) -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
        probe.bind(("::", 0))  # a port free for both families (a dual-stack socket)
        port = probe.getsockname()[1]
    argv = ("--loop", loop_name, "echo", "serve", "--proto", "rudp", "--host", "*")
    with running(*argv, "--port", str(port)) as (proc, listening):
        assert sorted(listening["addresses"]) == sorted([f"0.0.0.0:{port}", f"[::]:{port}"])
        for host in ("127.0.0.1", "::1"):
            done = subprocess.run(
                [
                    *NETLIB,
                    *("--loop", loop_name, "echo", "send", "--proto", "rudp"),
                    *("--host", host, "--port", str(port), f"over {host}"),
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert (done.returncode, done.stdout, done.stderr) == (0, f"over {host}\n", "")
        proc.send_signal(signal.SIGTERM)
        stats = _read_json(proc)
        assert proc.wait(timeout=10) == 0
    assert stats["accepted"] == 2


def test_rudp_echo_send_to_a_closed_port_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["echo", "send", "--proto", "rudp", "--port", str(port), "hi"]) == 1
    assert capsys.readouterr().err == f"netlib: error: connection refused by 127.0.0.1:{port}\n"


def test_chat_serve_and_join_over_rudp(loop_name: str) -> None:
    with running("--loop", loop_name, "chat", "serve", "--proto", "rudp", "--port", "0") as (
        _proc,
        listening,
    ):
        assert listening["addresses"][0]["proto"] == "rudp"
        assert listening["core"] == core_kind()
        done = subprocess.run(
            [
                *NETLIB,
                *("--loop", loop_name, "chat", "join", "--proto", "rudp"),
                *("--port", str(_port(listening)), "--nick", "alice"),
            ],
            input="/join #netlib\n/who\nover\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert done.returncode == 0, done.stderr
    assert "*** you are now known as alice" in done.stdout
    assert "*** #netlib (1 member): alice" in done.stdout
    assert done.stdout.rstrip().endswith("*** goodbye")


# -- netlib files ------------------------------------------------------------------------------


@contextmanager
def files_server(
    loop_name: str, root: Path, *options: str
) -> Iterator[tuple[subprocess.Popen[str], int]]:
    proc = subprocess.Popen(
        [*NETLIB, "--loop", loop_name, "files", "serve", str(root), "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    match = re.search(r"listening on 127\.0\.0\.1:(\d+)", proc.stdout.readline())
    assert match, "the file server did not announce its address"
    try:
        yield proc, int(match.group(1))
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "files statistics:" in out
        assert "Traceback" not in err


def _files(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NETLIB, "files", *argv], capture_output=True, text=True, timeout=30, cwd=cwd
    )


@pytest.fixture
def files_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "data.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    (root / "sub" / "a.txt").write_text("a\n")
    return root


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["files", "get", "ftp://example.org/x"], "only http:// and https:// URLs are"),
        (["files", "get", "http://127.0.0.1:9/x", "--cacert", "ca.pem"], "for https:// URLs"),
        (["files", "serve", ".", "--tls-key", "key.pem"], "--tls-key needs --tls-cert"),
        (["files", "get", "x", "--tls", "--cacert", "/no/such/ca.pem"], "cannot load --cacert"),
        (["files", "serve", "/no/such/directory"], "not a directory"),
        (["files", "get", "x", "--port", "70000"], "invalid port 70000"),
        (["files", "get", "http://127.0.0.1:9/"], "names no file"),
    ],
)
def test_files_usage_errors_exit_2(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert fragment in errors[0]


def test_files_serve_get_and_ls(loop_name: str, files_root: Path, tmp_path: Path) -> None:
    data = (files_root / "data.bin").read_bytes()
    with files_server(loop_name, files_root) as (_proc, port):
        got = _files("get", "data.bin", "--port", str(port), "--json", cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        assert got.stderr == ""  # not a terminal: no progress bar
        summary = json.loads(got.stdout)
        assert summary["verified"] is True
        assert summary["sha256"] == hashlib.sha256(data).hexdigest()
        assert (tmp_path / "data.bin").read_bytes() == data

        plain = _files("get", "sub/a.txt", "--port", str(port), "-o", "a.txt", cwd=tmp_path)
        assert plain.returncode == 0, plain.stderr
        assert plain.stdout.startswith("saved a.txt: 2 bytes")
        assert "SHA-256 verified" in plain.stdout

        listing = _files("ls", "--port", str(port), cwd=tmp_path)
        assert listing.returncode == 0, listing.stderr
        assert listing.stdout.split() == ["3145728", "data.bin", "-", "sub/"]


def test_files_over_tls(loop_name: str, files_root: Path, tmp_path: Path) -> None:
    """``files serve --tls-cert`` serves https; ``files get`` and ``ls`` trust it with
    --cacert, refuse it without (one line, exit 1), and --insecure skips the check."""
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    data = (files_root / "data.bin").read_bytes()
    server_pem = str(tmp_path / "server.pem")
    with files_server(loop_name, files_root, "--tls-cert", server_pem) as (_proc, port):
        url = f"https://127.0.0.1:{port}/data.bin"
        cacert = ("--cacert", str(tmp_path / "ca.pem"))
        got = _files("get", url, *cacert, "--json", "--loop", loop_name, cwd=tmp_path)
        assert got.returncode == 0, got.stderr
        summary = json.loads(got.stdout)
        assert (summary["url"], summary["verified"]) == (url, True)
        assert (tmp_path / "data.bin").read_bytes() == data
        by_name = _files("get", "sub/a.txt", "--port", str(port), *cacert, cwd=tmp_path)
        assert by_name.returncode == 0, by_name.stderr
        assert (tmp_path / "a.txt").read_text() == "a\n"
        listing = _files("ls", "--port", str(port), *cacert, cwd=tmp_path)
        assert listing.stdout.split() == ["3145728", "data.bin", "-", "sub/"]
        untrusted = _files("get", url, "-o", "x.bin", cwd=tmp_path)
        assert untrusted.returncode == 1
        assert untrusted.stderr == (
            f"netlib: error: TLS with 127.0.0.1:{port} failed: certificate verify failed\n"
        )
        assert not (tmp_path / "x.bin.part").exists()
        insecure = _files("get", "data.bin", "--port", str(port), "--insecure", "-o", "y.bin",
                          cwd=tmp_path)  # fmt: skip
        assert insecure.returncode == 0, insecure.stderr
        assert (tmp_path / "y.bin").read_bytes() == data


def test_files_get_errors_are_one_line_exit_1(files_root: Path, tmp_path: Path) -> None:
    with files_server("asyncio", files_root) as (_proc, port):
        missing = _files("get", "nothing.bin", "--port", str(port), cwd=tmp_path)
        refused = _files("get", f"http://127.0.0.1:{port}/%2e%2e/etc/passwd", cwd=tmp_path)
        directory = _files("get", "sub", "--port", str(port), cwd=tmp_path)
        named = _files("get", "sub/", "--port", str(port), cwd=tmp_path)
    assert (named.returncode, named.stderr.splitlines()[0]) == (
        2,
        "netlib: error: sub/ names a directory: netlib files ls sub/ lists it",
    )
    assert not (tmp_path / "sub").exists()  # nothing saved for either
    for done, fragment in [
        (missing, "no such file"),
        (refused, "the server refused"),
        (directory, "sub is a directory: netlib files ls sub lists it"),
    ]:
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1
        assert done.stderr.startswith("netlib: error: ")
        assert fragment in done.stderr
    assert "('..' in path)" not in refused.stderr
    assert "'..' in path (403)" in refused.stderr


LYING_SERVER = """
import socket, sys
body = b"hello"
lie = sys.argv[1] == "digest"
stall = sys.argv[1] == "stall"
with socket.create_server(("127.0.0.1", 0)) as server:
    print(server.getsockname()[1], flush=True)
    conn, _ = server.accept()
    conn.recv(65536)
    head = b"HTTP/1.1 200 OK\\r\\ncontent-length: 10\\r\\netag: \\"v1\\"\\r\\n"
    if lie:
        head = head.replace(b"10", b"5") + b"repr-digest: sha-256=:" + b"A" * 43 + b"=:\\r\\n"
    conn.sendall(head + b"\\r\\n" + body)
    if stall:  # hold the connection open until the client goes
        conn.recv(1)
    conn.close()
"""


@pytest.mark.parametrize(
    ("lie", "fragment"),
    [
        ("digest", "SHA-256 of the download is"),
        ("cut", "connection lost after 5 bytes"),
    ],
)
def test_files_get_digest_mismatch_and_lost_connection(
    lie: str, fragment: str, tmp_path: Path
) -> None:
    server = subprocess.Popen(
        [sys.executable, "-c", LYING_SERVER, lie], stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    try:
        done = _files("get", f"http://127.0.0.1:{port}/f.bin", cwd=tmp_path)
    finally:
        server.communicate(timeout=10)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert fragment in done.stderr
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").exists() == (lie == "cut")  # kept to resume


def test_files_get_resumes_an_interrupted_download(files_root: Path, tmp_path: Path) -> None:
    data = (files_root / "data.bin").read_bytes()

    class Stop(Exception):
        pass

    def stop_at_half(done: int, total: int | None) -> None:
        if done >= len(data) // 2:
            raise Stop

    with files_server("uvloop", files_root) as (_proc, port):
        url = f"http://127.0.0.1:{port}/data.bin"
        with pytest.raises(Stop):
            netlib.run(netlib.download_file(url, tmp_path / "data.bin", progress=stop_at_half))
        kept = (tmp_path / "data.bin.part").stat().st_size
        done = _files("get", "data.bin", "--port", str(port), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resumed at byte {kept}" in done.stdout
    assert (tmp_path / "data.bin").read_bytes() == data


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
async def test_files_get_interrupted_exits_130_or_143_and_keeps_the_part(
    signum: int, status: int, tmp_path: Path
) -> None:
    server = await asyncio.to_thread(
        subprocess.Popen,
        [sys.executable, "-c", LYING_SERVER, "stall"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    port = int(await asyncio.to_thread(server.stdout.readline))
    part = tmp_path / "f.bin.part"
    client = await asyncio.to_thread(
        subprocess.Popen,
        [*NETLIB, "files", "get", f"http://127.0.0.1:{port}/f.bin"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # the first 5 bytes are on disk (the part is written unbuffered)
        await wait_until(lambda: part.exists() and part.stat().st_size == 5, 10.0)
        client.send_signal(signum)
        out, err = await asyncio.to_thread(client.communicate, timeout=10)
    finally:
        if client.poll() is None:
            client.kill()
            await asyncio.to_thread(client.communicate)
        await asyncio.to_thread(server.communicate, timeout=10)
    assert client.returncode == status
    assert out == ""
    assert err == (
        "netlib: interrupted: 5 bytes kept in f.bin.part; run the command again to resume\n"
    )
    assert part.read_bytes() == b"hello"


def test_files_get_shows_a_progress_bar_only_on_a_terminal(
    files_root: Path, tmp_path: Path
) -> None:
    pytest.importorskip("rich")
    with files_server("asyncio", files_root) as (_proc, port):
        shown = {}
        for name, extra in [("plain", {}), ("no-color", {"NO_COLOR": "1"})]:
            leader, follower = pty.openpty()
            try:
                done = subprocess.run(
                    [*NETLIB, "files", "get", "data.bin", "--port", str(port), "-o", name],
                    cwd=tmp_path,
                    stdout=subprocess.PIPE,
                    stderr=follower,
                    text=True,
                    timeout=30,
                    env={**os.environ, "COLUMNS": "100", **extra},
                )
                os.close(follower)
                follower = -1
                assert done.returncode == 0
                shown[name] = _read_all(leader)
            finally:
                os.close(leader)
                if follower >= 0:
                    os.close(follower)
    assert "3.1 MB" in shown["plain"]  # the bar's bytes column (rich counts in SI units)
    assert shown["no-color"] == ""


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize(
    "command", [["echo", "serve"], ["chat", "serve"], ["files", "serve", "."]]
)
def test_a_server_whose_port_is_taken_says_so_in_one_line(command: list[str]) -> None:
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*NETLIB, *command, "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    # the address once, and nothing else: no statistics of a chat that never started
    assert (done.returncode, done.stderr) == (
        1,
        f"netlib: error: cannot bind 127.0.0.1:{port}: Address already in use\n",
    )


def test_a_statistics_line_shows_the_counters_that_are_not_zero_and_floats_in_short() -> None:
    flat = {"accepted": 1, "resets": 0, "min_rtt": 0.0002176690031774342, "flag": True}
    assert statistics_text(flat) == "accepted=1 min_rtt=0.000217669 flag=True"
