"""``--workers N``: one TCP port served by N processes under a supervisor.

End to end, with real processes: the workers hold the port's listening sockets (seen in
/proc) and connections land on each of them (their statistics); a worker killed with
SIGKILL is restarted while the port stays served; SIGTERM, or Ctrl-C to the whole process
group, stops everything gracefully with status 0 and no process left; a second signal
closes the connections at once; a worker whose supervisor is killed stops by itself; a
crash loop ends the group with status 1. The policies themselves (restart budget, the
signals a worker counts, the port reservation) are tested in process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from netlib.cli import main
from netlib.cli._common import Signals
from netlib.cli._workers import RestartBudget, reserve_port

NETLIB = [sys.executable, "-m", "netlib"]
WAIT = 20.0
"""Seconds any one expected event may take (process starts included) before a test fails."""


class Group:
    """A ``netlib ... --workers N --json`` supervisor: its JSON lines and stderr, read by
    threads as they come."""

    def __init__(self, argv: list[str], *, session: bool = False, json_output: bool = True):
        command = [*NETLIB, *argv, *(["--json"] if json_output else [])]
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=session,
        )
        self._out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        self._changed = threading.Condition()
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out.put)),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._error)),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(stream: Any, put: Any) -> None:
        for line in stream:
            put(line)
        put("")  # the end

    def _error(self, line: str) -> None:
        with self._changed:
            self.err.append(line)
            self._changed.notify_all()

    def json(self) -> dict[str, Any]:
        """The next JSON line the supervisor prints."""
        line = self._out.get(timeout=WAIT)
        assert line, f"the supervisor ended: {''.join(self.err)}"
        found: dict[str, Any] = json.loads(line)
        return found

    def text(self) -> str:
        return self._out.get(timeout=WAIT)

    def wait_err(self, fragment: str) -> str:
        """The first stderr line containing ``fragment`` (waiting for it)."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: (
                    next((line for line in self.err if fragment in line), None)
                    or self.err[-1:] == [""]
                ),
                timeout=WAIT,
            )
            line = next((line for line in self.err if fragment in line), None)
        assert found, f"no {fragment!r} on stderr: {''.join(self.err)}"
        assert line, f"the supervisor ended with no {fragment!r} on stderr: {self.err}"
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            if self._session():
                os.killpg(self.proc.pid, signal.SIGKILL)
            else:
                self.proc.kill()
        self.proc.wait(WAIT)
        for thread in self._threads:
            thread.join(WAIT)
        assert self.proc.stdout is not None
        assert self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()

    def _session(self) -> bool:
        try:
            return os.getpgid(self.proc.pid) == self.proc.pid
        except ProcessLookupError:
            return False


@contextmanager
def group(argv: list[str], **options: Any) -> Iterator[Group]:
    running = Group(argv, **options)
    try:
        yield running
    finally:
        running.close()


def echo(port: int, text: str) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
        client.sendall(text.encode() + b"\n")
        assert client.recv(100) == text.encode() + b"\n"


def port_of(listening: dict[str, Any]) -> int:
    return int(listening["addresses"][0].rsplit(":", 1)[1])


def listening_pids(port: int, candidates: set[int]) -> set[int]:
    """Which of ``candidates`` hold a listening TCP socket on ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    holders = set()
    for pid in candidates:
        try:
            links = [os.readlink(fd.path) for fd in os.scandir(f"/proc/{pid}/fd")]
        except OSError:  # gone
            continue
        if inodes & set(links):
            holders.add(pid)
    return holders


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_exit(pid: int) -> None:
    """Wait until ``pid`` (not our child) has exited: its pidfd becomes readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        assert select.select([pidfd], [], [], WAIT)[0], f"process {pid} still runs"
    finally:
        os.close(pidfd)


CONNECTIONS = 24
"""Connections made to show that both workers serve: with the kernel's hash spreading
them, all 24 on one worker happens with probability 2 x 2^-24."""


@pytest.mark.parametrize(
    ("loop_name", "stop"),
    [("asyncio", "SIGTERM to the supervisor"), ("uvloop", "Ctrl-C to the process group")],
)
def test_two_workers_serve_one_port_survive_a_kill_and_stop_cleanly(
    loop_name: str, stop: str
) -> None:
    argv = ["--loop", loop_name, "echo", "serve", "--port", "0", "--workers", "2"]
    with group(argv, session=True) as g:
        listening = g.json()
        assert listening["event"] == "listening"
        pids = [w["pid"] for w in listening["workers"]]
        port = port_of(listening)
        assert len(set(pids)) == 2
        # The workers hold the port's listening sockets; the supervisor only reserves it.
        assert listening_pids(port, {g.proc.pid, *pids}) == set(pids)
        for number in range(CONNECTIONS):
            echo(port, f"message {number}")
        g.proc.send_signal(signal.SIGUSR1)
        stats = g.json()
        assert stats["event"] == "statistics"
        assert stats["accepted"] == CONNECTIONS
        accepted = {w["pid"]: w["accepted"] for w in stats["workers"]}
        assert set(accepted) == set(pids)
        assert all(count > 0 for count in accepted.values()), accepted

        os.kill(pids[0], signal.SIGKILL)
        g.wait_err(f"worker 1 (pid {pids[0]}) was killed by SIGKILL; restarting it")
        for number in range(10):  # served by the other worker meanwhile
            echo(port, f"while restarting {number}")
        restarted = int(g.wait_err("worker 1 restarted: pid").rsplit(" ", 1)[1])
        assert listening_pids(port, {g.proc.pid, restarted, *pids}) == {restarted, pids[1]}
        g.proc.send_signal(signal.SIGUSR1)
        stats = g.json()
        assert stats["restarts"] == 1
        assert {w["pid"] for w in stats["workers"]} == {restarted, pids[1]}

        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as held:
            held.sendall(b"before the stop\n")
            assert held.recv(100) == b"before the stop\n"
            if stop == "SIGTERM to the supervisor":
                g.proc.send_signal(signal.SIGTERM)
            else:  # a terminal's Ctrl-C: every process of the group gets SIGINT
                os.killpg(g.proc.pid, signal.SIGINT)
            g.wait_err("netlib: stopping 2 worker(s)")
            assert held.recv(100) == b""  # its worker ended it gracefully
        final = g.json()
        assert g.proc.wait(WAIT) == 0
    assert (final["event"], final["active"], final["restarts"]) == ("statistics", 0, 1)
    assert not any("closing the remaining connections" in line for line in g.err), g.err
    assert not any("Traceback" in line for line in g.err)
    assert all(gone(pid) for pid in (restarted, *pids))


def test_a_second_signal_closes_every_worker_s_connections_at_once() -> None:
    argv = ["echo", "serve", "--port", "0", "--workers", "2", "--shutdown-grace", "60"]
    with group(argv) as g:
        listening = g.json()
        port = port_of(listening)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            client.sendall(b"x\n")
            assert client.recv(100) == b"x\n"
            # This client never closes its side: its worker's close waits, in the grace.
            g.proc.send_signal(signal.SIGTERM)
            g.wait_err("netlib: stopping 2 worker(s): each lets its connections finish")
            started = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            assert g.proc.wait(WAIT) == 0
            assert time.monotonic() - started < 10  # not the 60 s grace
            assert client.recv(100) == b""
        final = g.json()
    assert final["active"] == 0
    # The worker holding the connection was told to force (the other had stopped already).
    assert any("] netlib.cli INFO closing the remaining connections now" in x for x in g.err)
    assert all(gone(w["pid"]) for w in listening["workers"])


def test_workers_stop_by_themselves_when_the_supervisor_is_killed() -> None:
    argv = ["files", "serve", str(Path(__file__).parent), "--port", "0", "--workers", "2"]
    with group([*argv, "--stats-interval", "0.1"]) as g:
        listening = g.json()
        pids = [w["pid"] for w in listening["workers"]]
        ticked = g.json()  # statistics on the interval, asked of every worker
        assert ticked["event"] == "statistics"
        assert [w["pid"] for w in ticked["workers"]] == pids
        assert "files.requests" in ticked
        g.proc.kill()
        for pid in pids:
            wait_exit(pid)
        assert g.proc.wait(WAIT) == -signal.SIGKILL
    assert any("the supervisor is gone: stopping" in line for line in g.err)


def test_a_worker_that_cannot_start_is_reported_once() -> None:
    argv = ["echo", "serve", "--port", "0", "--workers", "2", "--tls-cert", "/no/cert.pem"]
    with group(argv) as g:
        assert g.proc.wait(WAIT) == 2
    err = "".join(g.err)
    assert err.count("netlib: error: cannot load the TLS certificate '/no/cert.pem'") == 1
    assert "Traceback" not in err


def test_a_crash_loop_stops_the_group_with_status_1() -> None:
    """With the restart limit at 1 (set in the supervisor's process), a worker killed twice
    within the window ends the group: the other worker is stopped, the status is 1."""
    code = (
        "import sys; import netlib.cli._workers as w; w.RESTART_LIMIT = 1; "
        "from netlib.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["echo", "serve", "--port", "0", "--workers", "2", "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stderr is not None
        pids = [w["pid"] for w in json.loads(proc.stdout.readline())["workers"]]
        os.kill(pids[0], signal.SIGKILL)
        restarted = 0
        for line in proc.stderr:
            if "worker 1 restarted: pid" in line:
                restarted = int(line.rsplit(" ", 1)[1])
                break
        assert restarted
        os.kill(restarted, signal.SIGKILL)
        out, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert f"netlib: error: worker 1 (pid {restarted}) was killed by SIGKILL: that is more" in err
    assert json.loads(out.splitlines()[-1])["event"] == "statistics"
    assert gone(pids[1])


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["echo", "serve", "--workers", "2", "--proto", "udp"], "--workers serves TCP"),
        (["echo", "serve", "--workers", "2", "--unix", "/tmp/x"], "--unix socket runs in one"),
        (["chat", "serve", "--workers", "2"], "chat --workers needs --nats URL"),
        (["echo", "serve", "--workers", "many"], "invalid worker count 'many'"),
        (["echo", "serve", "--workers", "1000"], "must be 1..256, or auto"),
        (["files", "serve", "/no/such/dir", "--workers", "2"], "not a directory"),
    ],
)
def test_workers_usage_errors(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    assert fragment in errors[0]


def test_workers_auto_is_one_per_cpu() -> None:
    from netlib.cli import build_parser

    args = build_parser().parse_args(["echo", "serve", "--workers", "auto"])
    assert args.workers == len(os.sched_getaffinity(0))
    assert build_parser().parse_args(["echo", "serve"]).workers == 1


# -- the policies, in process -----------------------------------------------------------------


def test_restart_budget_doubles_the_delay_and_gives_up_over_the_limit() -> None:
    budget = RestartBudget(limit=3, window=60.0, first=0.1, longest=0.3)
    assert budget.restart(now=0.0) == 0.1
    assert budget.restart(now=1.0) == 0.2
    assert budget.restart(now=2.0) == 0.3  # 0.4, capped
    assert budget.restart(now=3.0) is None  # a 4th within 60 s
    assert budget.total == 3
    assert budget.restart(now=60.5) == 0.3  # the first has left the window: allowed
    assert budget.recent(now=62.5) == 1  # only the one at 60.5 is left
    assert budget.restart(now=200.0) == 0.1


def test_a_worker_counts_only_its_own_signals_toward_forcing() -> None:
    """Ctrl-C reaches the worker and its supervisor, which passes the stop on: whichever
    comes first, that is one stop, not a forced one."""
    for first_signal in (True, False):
        signals = Signals()
        forced: list[bool] = []
        signals.on_force(functools.partial(forced.append, True))
        if first_signal:
            signals._on_signal(signal.SIGINT)
            signals.stop()
        else:
            signals.stop()
            signals._on_signal(signal.SIGINT)
        assert signals.stopping
        assert not forced
        signals._on_signal(signal.SIGINT)  # a second Ctrl-C
        assert forced == [True]
    signals = Signals()
    signals.force()
    assert signals.stopping


async def test_the_reservation_holds_the_port_for_reuse_port_listeners_only() -> None:
    socks = await reserve_port("127.0.0.1", 0)
    try:
        port = socks[0].getsockname()[1]
        with socket.socket() as plain:  # a program without SO_REUSEPORT cannot take it
            plain.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with pytest.raises(OSError, match="in use"):
                plain.bind(("127.0.0.1", port))
        # Nothing listens yet: connecting is refused (the reservation never accepts).
        loop = asyncio.get_running_loop()
        with socket.socket() as client:
            client.setblocking(False)
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(client, ("127.0.0.1", port))
        with socket.socket() as worker:  # a worker joins with SO_REUSEPORT
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            worker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            worker.bind(("127.0.0.1", port))
            worker.listen()
            with socket.create_connection(("127.0.0.1", port), timeout=WAIT):
                accepted, _ = worker.accept()
                accepted.close()
            # While a worker listens, the port cannot be reserved again (no second group).
            with pytest.raises(OSError, match="cannot bind"):
                await reserve_port("127.0.0.1", port)
    finally:
        for sock in socks:
            sock.close()


async def test_a_port_with_connections_closing_can_be_reserved() -> None:
    """A server that closed a connection first leaves it in FIN_WAIT or TIME_WAIT on its
    port for a while; a new group must still start there (the reservation then takes
    SO_REUSEADDR too)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the server's side closes first
            assert client.recv(1) == b""
    socks = await reserve_port("127.0.0.1", port)
    try:
        assert socks[0].getsockname()[1] == port
    finally:
        for sock in socks:
            sock.close()
