"""The ``netlib`` command line: usage errors, and echo serve/send end to end."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from netlib.cli import build_parser, main

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
        (["echo", "send", "--proto", "udp", "--retries", "x", "hi"], "invalid retries 'x'"),
        (["echo", "serve", "--max-connections-per-host", "-1"], "invalid count -1"),
        (["echo", "serve", "--mode", "timestamp"], "timestamp is a UDP service"),
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
    assert "demo done" in done.stdout


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
