"""Shared harness of the benchmark scripts in ``benchmarks/``.

The scripts run as ``python benchmarks/NAME.py`` (so ``benchmarks/`` is on ``sys.path``) and
import this package as ``harness``. It holds only what the scripts share to the letter:

* server subprocesses: spawning ``--serve NAME --loop L --port-file F``, waiting for the
  port, stopping them on every exit path (and the server side: exit when the parent's pipe
  on stdin closes, dump the profile on SIGTERM);
* CPU pinning of the client and of the servers;
* CPU time: a process's user+system time, and the foreign load on the benchmark CPUs from
  ``/proc/stat``, with waiting for quiet CPUs within a retry budget;
* rounds: medians, the rounds usable for a comparison, medians of per-round ratios;
* the machine description, the ``settings`` of the JSON output and the JSON file itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psutil

if TYPE_CHECKING:
    import cProfile

__all__ = [
    "LOG_MARKERS",
    "Child",
    "CpuWatch",
    "Rounds",
    "add_retry_args",
    "add_server_args",
    "cpu_ticks",
    "install_exit_handlers",
    "kill_all_servers",
    "log_problems",
    "machine_info",
    "median_or_none",
    "new_parser",
    "pair_ratio",
    "pin_client",
    "pin_server",
    "print_retry_summary",
    "proc_cpu_seconds",
    "proc_cpu_times",
    "server_log_problems",
    "server_loop",
    "servers_always_killed",
    "settings",
    "start_server",
    "stop_server",
    "usable",
    "wait_quiet",
    "wait_quiet_async",
    "wait_ready",
    "write_json",
    "write_port_file",
]

T = TypeVar("T")

Rounds = list[dict[str, dict[str, Any]]]
"""One dict per round: configuration key -> that configuration's sample."""

LOG_MARKERS = ("Traceback", "Error", "exception", "Task was destroyed")
"""Text in a server's log that means something went wrong."""

_TICK = os.sysconf("SC_CLK_TCK")


# =============================================================================================
# Server side (the ``--serve`` subprocess)
# =============================================================================================


def write_port_file(path: Path, port: int) -> None:
    """Publish the listening port atomically (write a temporary file, then rename it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, path)


def pin_server(args: argparse.Namespace, lifetime: int) -> None:
    """Pin the server to ``--cpu`` (if given); it never outlives ``lifetime`` s (SIGALRM)."""
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    signal.alarm(lifetime)


def server_loop(args: argparse.Namespace) -> Literal["uvloop", "asyncio"]:
    """The ``--loop`` of the server subprocess, typed for ``netlib.run``."""
    return "uvloop" if args.loop == "uvloop" else "asyncio"


def install_exit_handlers(
    loop: asyncio.AbstractEventLoop,
    profile_out: str | None,
    on_exit: Callable[[], None] | None = None,
) -> cProfile.Profile | None:
    """Exit at once when the parent closes our stdin (or dies), and on SIGTERM.

    On SIGTERM the profile (if ``profile_out``) is dumped and ``on_exit`` runs first.
    Returns the profiler, not yet enabled (None without ``profile_out``).
    """
    profiler: cProfile.Profile | None = None
    if profile_out:
        import cProfile

        profiler = cProfile.Profile()

    def on_stdin() -> None:
        if not os.read(sys.stdin.fileno(), 4096):
            os._exit(0)

    def on_term() -> None:
        if profiler is not None and profile_out:
            profiler.disable()
            profiler.dump_stats(profile_out)
        if on_exit is not None:
            on_exit()
        os._exit(0)

    loop.add_reader(sys.stdin.fileno(), on_stdin)
    loop.add_signal_handler(signal.SIGTERM, on_term)
    return profiler


# =============================================================================================
# Client side: pinning, CPU time, foreign load
# =============================================================================================


def pin_client(args: argparse.Namespace, server_cpu: int, client_cpu: int) -> None:
    """Pin this process to ``client_cpu``; sets ``args.pin`` and ``args.cpus``.

    ``args.cpus`` are the benchmark CPUs watched for foreign load: the two pinned CPUs, or
    every CPU available when they are not both available (then nothing is pinned).
    """
    cpus = os.sched_getaffinity(0)
    args.pin = {server_cpu, client_cpu} <= cpus
    args.cpus = {server_cpu, client_cpu} if args.pin else cpus
    if args.pin:
        os.sched_setaffinity(0, {client_cpu})
    else:
        print("warning: CPUs 0 and 1 not both available; running unpinned", file=sys.stderr)


def proc_cpu_times(proc: Any) -> tuple[float, float]:
    """User and system CPU seconds of a ``psutil.Process`` so far."""
    times = proc.cpu_times()
    return float(times.user), float(times.system)


def proc_cpu_seconds(proc: Any) -> float:
    """User+system CPU seconds of a ``psutil.Process`` so far."""
    times = proc.cpu_times()
    return float(times.user + times.system)


def cpu_ticks(cpus: set[int]) -> dict[int, list[int]]:
    """Per-CPU /proc/stat counters: user nice system idle iowait irq softirq steal."""
    ticks: dict[int, list[int]] = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and not line.startswith("cpu "):
                fields = line.split()
                cpu = int(fields[0][3:])
                if cpu in cpus:
                    ticks[cpu] = [int(f) for f in fields[1:9]]
    return ticks


class CpuWatch:
    """What the benchmark CPUs did over an interval, from /proc/stat.

    ``foreign_cores``: user+nice+system+steal time on the benchmark CPUs not used by the
    server or this client, in cores: other processes (or the hypervisor) were in the way.
    ``core_busy``: share of each CPU that was not idle, including the irq/softirq time of
    loopback traffic, which is charged to no process (so a core can be full while the
    process on it shows less than 100%).
    """

    def __init__(self, proc: Any, cpus: set[int]) -> None:
        self.proc, self.cpus = proc, cpus
        self.start = time.perf_counter()
        self.ticks = cpu_ticks(cpus)
        self.own = proc_cpu_seconds(proc) + time.process_time()

    def stop(self, extra_own: float = 0.0) -> dict[str, Any]:
        """``{"foreign_cores": float, "core_busy": {cpu: share}}`` since construction.

        ``extra_own``: CPU seconds that another process of the benchmark (a load-client
        subprocess) used in the interval; they are not foreign load.
        """
        elapsed = time.perf_counter() - self.start
        own = proc_cpu_seconds(self.proc) + time.process_time() - self.own + extra_own
        busy: dict[int, float] = {}
        others = 0.0
        for cpu, now in cpu_ticks(self.cpus).items():
            delta = [a - b for a, b in zip(now, self.ticks[cpu], strict=True)]
            busy[cpu] = (sum(delta) - delta[3] - delta[4]) / _TICK / elapsed
            others += (delta[0] + delta[1] + delta[2] + delta[7]) / _TICK
        return {"foreign_cores": max(0.0, others - own) / elapsed, "core_busy": busy}


def _quiet_sample(args: argparse.Namespace, watch: CpuWatch, started: float) -> bool:
    quiet = bool(watch.stop()["foreign_cores"] <= args.max_foreign / 2)
    args.retry_budget -= time.monotonic() - started
    return quiet


def wait_quiet(proc: Any, args: argparse.Namespace) -> bool:
    """Wait until other processes leave the benchmark CPUs alone (spends the retry budget).

    Samples 0.5 s at a time; quiet is at most half of ``args.max_foreign`` foreign cores.
    Returns False when ``args.retry_budget`` ran out first.
    """
    while args.retry_budget > 0:
        started = time.monotonic()
        watch = CpuWatch(proc, args.cpus)
        time.sleep(0.5)
        if _quiet_sample(args, watch, started):
            return True
    return False


async def wait_quiet_async(proc: Any, args: argparse.Namespace) -> bool:
    """``wait_quiet`` for a running event loop (sleeps with ``asyncio.sleep``)."""
    while args.retry_budget > 0:
        started = time.monotonic()
        watch = CpuWatch(proc, args.cpus)
        await asyncio.sleep(0.5)
        if _quiet_sample(args, watch, started):
            return True
    return False


# =============================================================================================
# Server subprocesses, seen from the client
# =============================================================================================


@dataclass
class Child:
    """A server subprocess: its process, its log (stdout+stderr), name and port file."""

    proc: subprocess.Popen[bytes]
    log: Path
    name: str
    port_file: Path


_children: list[Child] = []


def start_server(
    script: str,
    key: str,
    name: str,
    loop: str,
    workdir: Path,
    *,
    cpu: int | None,
    profile_out: Path | None,
    extra: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Child:
    """Spawn ``script --serve name --loop loop --port-file workdir/key.port [extra]``.

    Logs to ``workdir/key.log``; ``--cpu`` and ``--profile-out`` are passed when given. The
    child is registered, so ``kill_all_servers`` stops it; its stdin is a pipe whose closing
    (this process exiting, even by SIGKILL) makes it exit.
    """
    port_file = workdir / f"{key}.port"
    port_file.unlink(missing_ok=True)
    log = workdir / f"{key}.log"
    cmd = [sys.executable, os.path.abspath(script), "--serve", name, "--loop", loop]
    cmd += ["--port-file", str(port_file), *extra]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if profile_out is not None:
        cmd += ["--profile-out", str(profile_out)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
        )
    child = Child(proc, log, key, port_file)
    _children.append(child)
    return child


def wait_ready(
    child: Child, probe: Callable[[int], T | None], timeout: float = 15.0, pause: bool = True
) -> T:
    """Wait for the port file, then until ``probe(port)`` returns a result (not None).

    Polls every 20 ms (after a failed probe too, unless ``pause`` is False); raises
    RuntimeError with the log's tail if the server exits, or after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"server {child.name} exited:\n{child.log.read_text()[-2000:]}")
        if child.port_file.exists():
            result = probe(int(child.port_file.read_text()))
            if result is not None:
                return result
            if not pause:
                continue
        time.sleep(0.02)
    raise RuntimeError(f"server {child.name} not ready after {timeout}s")


def stop_server(child: Child, timeout: float = 3.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` s; close its stdin; unregister it."""
    proc = child.proc
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(3)
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if child in _children:
        _children.remove(child)


def kill_all_servers() -> None:
    """Stop every registered server subprocess (errors ignored)."""
    while _children:
        with contextlib.suppress(Exception):
            stop_server(_children.pop())


def log_problems(text: str) -> str:
    """The tail of a server log if it shows a problem (see LOG_MARKERS), else ``""``."""
    return text[-1500:] if any(m in text for m in LOG_MARKERS) else ""


def server_log_problems(child: Child) -> str:
    """``log_problems`` of the child's log file."""
    return log_problems(child.log.read_text(errors="replace"))


@contextlib.contextmanager
def servers_always_killed(workdir: Path) -> Iterator[None]:
    """Kill the server subprocesses on exit, error, Ctrl-C (KeyboardInterrupt) or SIGTERM.

    SIGTERM kills them at once and exits: raising from a signal handler could land inside a
    protocol callback, which the event loop would swallow. (On SIGKILL the servers see
    their stdin close and exit by themselves.)
    """

    def on_term(signum: int, _frame: object) -> None:
        kill_all_servers()
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(128 + signum)

    previous: Callable[[int, Any], Any] | int | None = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        kill_all_servers()
        signal.signal(signal.SIGTERM, previous)


# =============================================================================================
# Rounds: medians and ratios
# =============================================================================================


def median_or_none(values: Sequence[float]) -> float | None:
    """The median of ``values``, None if there are none."""
    return statistics.median(values) if values else None


def usable(rounds: Rounds, *keys: str) -> tuple[Rounds, bool]:
    """The rounds where every config in ``keys`` was measured undisturbed (else all rounds).

    Returns the rounds and whether they are clean.
    """
    present = [r for r in rounds if all(k in r for k in keys)]
    clean = [r for r in present if not any(r[k]["disturbed"] for k in keys)]
    return (clean, True) if clean else (present, False)


def pair_ratio(rounds: Rounds, a: str, b: str, metric: str) -> tuple[float, bool]:
    """Median over rounds of ``a[metric] / b[metric]`` measured in the same round."""
    pair, clean = usable(rounds, a, b)
    return float(statistics.median(r[a][metric] / r[b][metric] for r in pair)), clean


def print_retry_summary(rounds: Rounds, budget: float, args: argparse.Namespace) -> None:
    """How many samples were re-measured or stayed disturbed, and the retry budget spent."""
    samples = [r[k] for r in rounds for k in r]
    retried = sum(x["attempts"] > 1 for x in samples)
    disturbed = sum(x["disturbed"] for x in samples)
    print(
        f"\nother processes on the benchmark CPUs: {retried} of {len(samples)} samples"
        f" re-measured ({budget - args.retry_budget:.0f}s of the {budget:.0f}s retry budget"
        f" used); {disturbed} still disturbed (> {args.max_foreign} foreign cores) and left"
        " out of the medians where an undisturbed sample exists."
    )


# =============================================================================================
# Command line, machine description, JSON output
# =============================================================================================


def new_parser(description: str | None) -> argparse.ArgumentParser:
    """A parser (raw-text help) with the flags every script has: --quick, --runs, --json."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="short windows, one round by default")
    p.add_argument("--runs", type=int, default=None, help="rounds (default 3; 1 with --quick)")
    p.add_argument("--json", metavar="FILE", help="write every raw number to FILE")
    return p


def add_retry_args(p: argparse.ArgumentParser, budget: float, sample: str = "sample") -> None:
    """``--retries``, ``--retry-budget`` (default ``budget`` s) and ``--max-foreign``."""
    p.add_argument("--retries", type=int, default=2, help="re-measure when disturbed (2)")
    p.add_argument(
        "--retry-budget",
        type=float,
        default=budget,
        help=f"seconds a run may spend waiting for quiet CPUs and re-measuring ({budget:.0f})",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.10,
        help=f"foreign CPU load (cores) on the benchmark CPUs above which a {sample} is\n"
        "disturbed and measured again (0.10)",
    )


def add_server_args(
    p: argparse.ArgumentParser, servers: Iterable[str], loops: Sequence[str]
) -> None:
    """The hidden flags of the server subprocess mode."""
    p.add_argument("--serve", choices=sorted(servers), help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=loops, default="uvloop", help=argparse.SUPPRESS)
    p.add_argument("--port-file", help=argparse.SUPPRESS)
    p.add_argument("--stats-out", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)


def machine_info() -> dict[str, Any]:
    """CPU count and model, kernel, Python, uvloop and psutil versions."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": importlib.metadata.version("uvloop"),
        "psutil": psutil.__version__,
    }


def settings(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """Every option (sets as sorted lists, ``--serve`` left out), then ``extra``."""
    return {
        **{
            k: sorted(v) if isinstance(v, set) else v
            for k, v in vars(args).items()
            if k != "serve"
        },
        **extra,
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write ``data`` to ``path`` (indented, newline-terminated) and say so."""
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nraw numbers written to {path}")
