"""The benchmark scripts still run against the current API (a smoke run; no timing asserted).

Speed and memory goals are judged by full runs recorded in benchmarks/README.md, never here:
a quick run on a shared CI machine measures nothing worth asserting. What is asserted is
that the measurements are real: the C load generator (benchmarks/harness/loadgen.c) echoes,
verifies and counts messages and connections, counts errors instead of hanging, and drives
the C-client workloads of tcp_echo.py in quick mode. Those tests need a C compiler and are
skipped without one (as the benchmark skips its C workloads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their harness as ``harness``

import paced_echo  # noqa: E402
import tcp_echo  # noqa: E402
from harness import loadgen  # noqa: E402

needs_cc = pytest.mark.skipif(
    loadgen.compiler() is None and loadgen.build() is None,
    reason="no C compiler: the C load generator cannot be built",
)
SMOKE_RUNS = {
    # no retries in a smoke run: it need not wait for quiet CPUs
    "tcp_echo.py": ["--quick", "--only", "line16k,connect", "--retries", "0"],
    "udp_echo.py": ["--quick", "--only", "echo_protocol,in32", "--retries", "0"],
    "chat_fanout.py": ["--quick", "--clients", "100", "--loops", "uvloop", "--retries", "0"],
    # nats-server and 3 chat nodes
    "chat_cluster.py": ["--quick", "--clients", "30", "--retries", "0"],
    "handler_costs.py": ["--quick"],
    # namespaces and iptables (root); kcp rows only with the bench extra
    "loss_latency.py": ["--count", "60", "--loss", "0,5", "--protos", "tcp,rudp,kcp"],
    "rudp_bulk.py": ["--mib", "2", "--runs", "1"],
    "workers.py": ["--quick", "--connections", "20", "--retries", "0"],
    "speedtest.py": ["--duration", "1", "--runs", "1", "--loops", "uvloop"],
    "files.py": ["--quick", "--mib", "4"],
    "paced_echo.py": ["--count", "30", "--interval", "0.001", "--rounds", "1"],
}


RUN_ELSEWHERE = {"soak.py": "tests/test_soak.py"}  # its 2-minute version is a test of its own


def test_every_benchmark_has_a_smoke_run() -> None:
    """Every script in benchmarks/ (the shared harness/ package aside) is smoke-run."""
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py"))
    assert scripts == sorted([*SMOKE_RUNS, *RUN_ELSEWHERE])
    root = BENCHMARKS.parent
    assert all((root / test).is_file() for test in RUN_ELSEWHERE.values())


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_to_its_report(script: str) -> None:
    if script == "loss_latency.py" and os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *SMOKE_RUNS[script]],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if script == "loss_latency.py":
        for proto in ("tcp", "rudp"):
            assert re.search(rf"loss +5% {proto} +delivered 60/60", done.stdout), done.stdout
        assert "goal: rudp p99 at 5% loss <= 20 ms:" in done.stdout
        assert re.search(r"loss +5% rudp .* spurious \d+ \(\d+\.\d\d%\)", done.stdout)
        assert "goal: rudp spurious retransmissions" in done.stdout
        return
    if script == "paced_echo.py":  # every form echoed, with the baseline's ratios
        kcp = importlib.util.find_spec("kcp") is not None
        for form in [f for f in paced_echo.FORMS if f != "kcp" or kcp]:
            assert re.search(rf"^{form} +p50 +\d+ us .*x\)$", done.stdout, re.MULTILINE), form
        assert kcp or "the kcp form left out" in done.stdout
        return
    if script == "rudp_bulk.py":
        for loop in ("uvloop", "asyncio"):
            assert re.search(rf"goal: {loop} rudp goodput >= 0.5x tcp: (PASS|FAIL)", done.stdout)
        return
    if script == "workers.py":  # every server echoed, with no error
        assert re.search(r"--workers N against one process: \d+\.\d\dx", done.stdout)
        rows = [line for line in done.stdout.splitlines() if line.startswith("netlib echo")]
        assert len(rows) == 2
        assert all(re.search(r" 0 +1( D)?$", row) for row in rows), rows  # errors, rounds
        return
    if script == "speedtest.py":  # iperf3 is the baseline where it is installed
        assert re.search(r"netlib uvloop +\d+\.\d\d Gbit/s", done.stdout), done.stdout
        if shutil.which("iperf3"):
            assert re.search(r"goal: netlib uvloop tcp >= 0.5x iperf3: (PASS|FAIL)", done.stdout)
        else:
            assert "iperf3 is not installed" in done.stdout
        return
    if script == "files.py":  # each row ran its client: only netlib's verify a digest
        checks = {
            "curl -o /dev/null <- netlib uvloop": "-",
            "curl -o FILE <- os.sendfile": "-",
            "download_file (uvloop) <- netlib uvloop": "verified",
            "download_file (asyncio) <- os.sendfile": "verified",
            "netlib files get (uvloop) <- netlib uvloop": "verified",
            "download_file (uvloop) <- http.server": "-",
        }
        for row, checked in checks.items():
            if row.startswith("curl") and shutil.which("curl") is None:
                continue
            line = rf"^{re.escape(row)} +\d+ +(\d\.\d\d|-) +\d+\.\d\d +\d+\.\d\d +{checked}(?!\S)"
            assert re.search(line, done.stdout, re.MULTILINE), (row, done.stdout)
        for loop in ("uvloop", "asyncio"):
            verdict = rf"(PASS|FAIL): netlib's client receives and verifies \({loop},"
            assert re.search(verdict, done.stdout), done.stdout
        return
    if script == "handler_costs.py":  # explains, checks nothing
        assert re.search(r"serve_tcp / raw idle memory: \d+\.\d\dx", done.stdout)
        return
    assert "acceptance check" in done.stdout
    assert "PASS" in done.stdout or "FAIL" in done.stdout
    if script == "chat_cluster.py":  # R11 across nodes: every line, once, in order
        assert "PASS: cluster gaps/dups/lost/disconnects = 0" in done.stdout, done.stdout
        assert re.search(r"(PASS|FAIL): cross-node p99 delivery .*: [\d,]+ \(<= ", done.stdout)
        assert re.search(r"NATS hub, summed .*: [\d,]+ resent, 0 undelivered, 0 lost", done.stdout)


# =============================================================================================
# The C load generator
# =============================================================================================


class _Echo(socketserver.BaseRequestHandler):
    """Echoes what it reads (``mode`` "echo"), answers with other bytes ("wrong"), or reads
    and never answers ("silent")."""

    mode = "echo"

    def handle(self) -> None:
        while data := self.request.recv(65536):
            if self.mode == "echo":
                self.request.sendall(data)
            elif self.mode == "wrong":
                self.request.sendall(b"y" * len(data))


class _Server(socketserver.ThreadingTCPServer):
    request_queue_size = 128  # the listen backlog: every connection is accepted at once


@pytest.fixture
def echo_server() -> Iterator[tuple[str, type[_Echo]]]:
    """A threaded loopback server (a thread per connection): its HOST:PORT, its handler."""
    handler = type("Echo", (_Echo,), {})
    with _Server(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{server.server_address[1]}", handler
        finally:
            server.shutdown()
            thread.join(5)
    # leaving the ``with`` joined the thread of every connection (block_on_close)


def _loadgen(*args: str) -> tuple[list[str], dict[str, Any], int]:
    """Run the load generator: its marker lines, its JSON line and its exit status."""
    binary = loadgen.build()
    assert binary is not None
    done = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=20)
    lines = done.stdout.splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return lines[:-1], result, done.returncode


@needs_cc
def test_loadgen_is_built_once_and_again_when_the_source_is_newer(tmp_path: Path) -> None:
    binary = loadgen.build(tmp_path)
    assert binary is not None
    assert os.access(binary, os.X_OK)
    built = binary.stat().st_mtime_ns
    assert loadgen.build(tmp_path) == binary
    assert binary.stat().st_mtime_ns == built  # up to date: not compiled again
    old = loadgen.SOURCE.stat().st_mtime - 60
    os.utime(binary, (old, old))  # now older than the source: compiled again
    assert loadgen.build(tmp_path) == binary
    assert binary.stat().st_mtime > old + 30
    assert list(tmp_path.iterdir()) == [binary]  # no temporary file left


def test_without_a_compiler_the_c_workloads_are_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadgen.build(tmp_path, cc=str(tmp_path / "no-such-cc")) is None
    monkeypatch.setattr(loadgen, "build", lambda: None)
    c_workloads = set(tcp_echo.C_WORKLOADS)
    assert {c.workload for c in tcp_echo.CONFIGS} >= c_workloads
    kept = tcp_echo.prepare(list(tcp_echo.CONFIGS), argparse.Namespace(loadgen=None))
    assert {c.workload for c in kept} == {c.workload for c in tcp_echo.CONFIGS} - c_workloads
    out = capsys.readouterr().out
    assert "no C compiler found" in out
    assert "SKIPPED" in out


@needs_cc
@pytest.mark.parametrize(("connections", "size"), [(20, 64), (4, 16 * 1024)])
def test_loadgen_pingpong_counts_verified_echoes(
    echo_server: tuple[str, type[_Echo]], connections: int, size: int
) -> None:
    address, _ = echo_server
    cpu = str(min(os.sched_getaffinity(0)))
    markers, r, status = _loadgen(
        "pingpong", address, "-c", str(connections), "-s", str(size),
        "-w", "0.1", "-d", "0.3", "-C", cpu, "-S",
    )  # fmt: skip
    assert status == 0, r
    assert (r["errors"], r["first_error"]) == (0, "")
    assert (r["mode"], r["connections"], r["size"]) == ("pingpong", connections, size)
    assert r["messages"] > connections
    assert 0.29 < r["elapsed_s"] < 0.5
    assert r["msgs_per_s"] == pytest.approx(r["messages"] / r["elapsed_s"], rel=1e-3)
    assert 0 < r["p50_us"] <= r["p99_us"]
    assert markers[0] == "start"
    assert markers[1].startswith("stop ")
    assert len(markers) == 2


@needs_cc
def test_loadgen_connect_counts_whole_connections(echo_server: tuple[str, type[_Echo]]) -> None:
    address, _ = echo_server
    _, r, status = _loadgen("connect", address, "-c", "4", "-w", "0.1", "-d", "0.3")
    assert status == 0, r
    assert (r["mode"], r["parallel"], r["failures"]) == ("connect", 4, 0)
    assert r["connections"] > 4
    assert r["conns_per_s"] == pytest.approx(r["connections"] / r["elapsed_s"], rel=1e-3)
    assert 0 < r["p50_us"] <= r["p99_us"]


@needs_cc
def test_loadgen_counts_errors_and_never_hangs(echo_server: tuple[str, type[_Echo]]) -> None:
    address, handler = echo_server
    started = time.monotonic()
    with socket.socket() as unused:  # a port nobody listens on
        unused.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{unused.getsockname()[1]}"
        _, r, status = _loadgen("pingpong", closed, "-c", "5", "-w", "0.1", "-d", "0.3")
        assert (status, r["errors"], r["messages"]) == (0, 5, 0)
        assert "Connection refused" in r["first_error"]
        _, r, status = _loadgen("connect", closed, "-c", "2", "-w", "0.1", "-d", "0.3")
        assert (status, r["connections"]) == (0, 0)
        assert r["failures"] > 0
    handler.mode = "wrong"
    _, r, status = _loadgen("pingpong", address, "-c", "3", "-w", "0.1", "-d", "0.3")
    assert (status, r["errors"], r["messages"]) == (0, 3, 0)
    assert "echo differs" in r["first_error"]
    handler.mode = "silent"
    _, r, status = _loadgen("pingpong", address, "-c", "3", "-w", "0.1", "-d", "5", "-t", "0.3")
    assert (status, r["errors"], r["messages"]) == (0, 3, 0)
    assert "echo: Connection timed out" in r["first_error"]
    assert time.monotonic() - started < 5  # the failed runs ended early
    for bad in (["pingpong", "10.0.0.1:9"], ["pingpong", closed, "-s", "0"], ["flood", closed]):
        assert _loadgen(*bad)[2] == 2  # usage: loopback only, a real size, a known mode


@needs_cc
@pytest.mark.slow
@pytest.mark.timeout(120)
def test_tcp_echo_c_workloads_quick(tmp_path: Path) -> None:
    """The C-client workloads of tcp_echo.py, quick: every sample echoed, with no error.

    pp64 is the same ping-pong with 64-byte messages; the smoke run above leaves the C
    workloads to this test.
    """
    out = tmp_path / "c.json"
    script = str(BENCHMARKS / "tcp_echo.py")
    # no retries: a smoke run need not wait for quiet CPUs
    options = ["--quick", "--only", "pp16k,cconnect", "--retries", "0", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, script, *options],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(out.read_text())
    samples = {key: s for r in data["rounds"] for key, s in r.items()}
    assert {k.split(":")[0] for k in samples} == {"pp16k", "cconnect"}
    for key, s in samples.items():
        if key.startswith("pp16k:"):
            assert (s["size"], s["errors"]) == (16 * 1024, 0), s
            assert s["messages"] > 0
            assert s["server_us_per_msg"] > 0
        else:
            assert s["failed"] == 0, s
            assert s["connections"] > 0
            assert s["server_us_per_conn"] > 0
        assert 0 < s["server_cpu_share"] <= 1.2
        assert s["client_cpu_share"] > 0
    assert "PASS: C load generator: 0 errors" in done.stdout
    assert "C client, cconnect: serve_tcp raw connections/s vs streams" in done.stdout
