"""The C load generator (``loadgen.c``): built on first use, run as a pinned subprocess.

A Python load client is often the limit of a loopback echo benchmark (client-bound). The C
client needs a fraction of that CPU per message, so the server's own limit shows, as with
an independent load generator. ``build()`` compiles ``loadgen.c`` with ``cc -O2`` into
``benchmarks/.build/`` (git-ignored) when the binary is missing or older than the source,
and returns None when there is no C compiler: the workloads that need it are then skipped.
``pingpong`` and ``connect`` run one measurement and return a sample shaped like those of
``harness.tcp``, with the server's CPU time taken at the window's edges, which the C
client marks on its stdout. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness import CpuWatch, proc_cpu_seconds
from harness.bench import CLIENT_CPU, HOST, SERVER_CPU

__all__ = ["BUILD_DIR", "SOURCE", "build", "compiler", "connect", "pingpong"]

SOURCE = Path(__file__).with_name("loadgen.c")
BUILD_DIR = Path(__file__).parent.parent / ".build"
CFLAGS = ["-O2", "-std=c99", "-Wall", "-Wextra"]
TIMEOUT = 5.0  # the C client's timeout for a connect, a round trip and the final drain


def compiler() -> str | None:
    """The C compiler: ``$CC`` if set, else ``cc``; None if it is not installed."""
    return shutil.which(os.environ.get("CC") or "cc")


def build(build_dir: Path = BUILD_DIR, cc: str | None = None) -> Path | None:
    """The load generator's binary, compiled first if missing or older than the source.

    ``cc`` defaults to ``compiler()``. Returns None when the binary must be (re)built and
    there is no compiler; raises RuntimeError, with the compiler's output, if it fails.
    """
    binary = build_dir / "loadgen"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cc = cc if cc is not None else compiler()
    if cc is None or shutil.which(cc) is None:
        return None
    build_dir.mkdir(parents=True, exist_ok=True)
    tmp = build_dir / f"loadgen.{os.getpid()}.tmp"  # renamed when complete: no half binary
    done = subprocess.run(
        [cc, *CFLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} could not compile {SOURCE}:\n{done.stderr[-3000:]}")
    os.replace(tmp, binary)
    return binary


def _lines(proc: subprocess.Popen[bytes], deadline: float) -> Iterator[str]:
    """The lines of the child's stdout as they come; RuntimeError past ``deadline``."""
    assert proc.stdout is not None
    fd, buffer = proc.stdout.fileno(), b""
    while True:
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError("the C load generator did not finish in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        buffer += chunk


def _run(
    binary: Path,
    mode: str,
    port: int,
    proc: Any,
    cpus: set[int],
    options: list[str],
    warmup: float,
    duration: float,
    pin: bool,
) -> dict[str, Any]:
    """Run the C client once; its JSON, plus the server's CPU time and CPU shares."""
    cmd = [str(binary), mode, f"{HOST}:{port}", *options, "-S"]
    cmd += ["-w", str(warmup), "-d", str(duration), "-t", str(TIMEOUT)]
    if pin:
        cmd += ["-C", str(CLIENT_CPU)]
    deadline = time.monotonic() + warmup + duration + 2 * TIMEOUT + 10
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    window: dict[str, Any] = {}
    result: dict[str, Any] | None = None
    try:
        for line in _lines(child, deadline):
            if line == "start":  # the measured window begins
                window["watch"] = CpuWatch(proc, cpus)
                window["server0"] = proc_cpu_seconds(proc)
            elif line.startswith("stop "):  # it ends; the C client's CPU time in it
                if "watch" in window:
                    window["server"] = proc_cpu_seconds(proc) - window["server0"]
                    window["cpu"] = window["watch"].stop(extra_own=float(line.split()[1]))
            elif line.startswith("{"):
                result = json.loads(line)
        child.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stderr is not None
        errors = child.stderr.read().decode(errors="replace")
        child.stderr.close()
        if child.stdout is not None:
            child.stdout.close()
    if child.returncode != 0 or result is None:
        raise RuntimeError(f"{' '.join(cmd)} exited with {child.returncode}: {errors[-1000:]}")
    if "cpu" not in window or not result["elapsed_s"]:
        raise RuntimeError(f"the C load generator measured no window: {result}")
    elapsed = result["elapsed_s"]
    result.update(
        server_cpu_s=window["server"],
        server_cpu_share=window["server"] / elapsed,
        client_cpu_share=result["client_cpu_s"] / elapsed,
        server_core_busy=window["cpu"]["core_busy"].get(SERVER_CPU),
        client_core_busy=window["cpu"]["core_busy"].get(CLIENT_CPU),
        foreign_cores=window["cpu"]["foreign_cores"],
    )
    return result


def pingpong(
    binary: Path,
    port: int,
    proc: Any,
    cpus: set[int],
    *,
    connections: int,
    size: int,
    warmup: float,
    duration: float,
    pin: bool,
) -> dict[str, Any]:
    """``connections`` connections, one ``size``-byte message in flight on each.

    Returns msgs/s, the server's CPU per message, round-trip latency p50/p99 and errors.
    """
    options = ["-c", str(connections), "-s", str(size)]
    r = _run(binary, "pingpong", port, proc, cpus, options, warmup, duration, pin)
    if not r["messages"]:
        raise RuntimeError(f"no message echoed in the measured window: {r['first_error']}")
    r["server_us_per_msg"] = r["server_cpu_s"] * 1e6 / r["messages"]
    return r


def connect(
    binary: Path,
    port: int,
    proc: Any,
    cpus: set[int],
    *,
    parallel: int,
    size: int,
    warmup: float,
    duration: float,
    pin: bool,
) -> dict[str, Any]:
    """``parallel`` workers: connect, one ``size``-byte echo, close, again.

    Returns connections/s, the server's CPU per connection, p50/p99 of a connection's
    lifetime (connect to whole echo) and failed attempts (``failed``).
    """
    options = ["-c", str(parallel), "-s", str(size)]
    r = _run(binary, "connect", port, proc, cpus, options, warmup, duration, pin)
    r["failed"] = r.pop("failures")
    if not r["connections"]:
        raise RuntimeError(f"no connection completed in the measured window: {r['first_error']}")
    r["server_us_per_conn"] = r["server_cpu_s"] * 1e6 / r["connections"]
    return r
