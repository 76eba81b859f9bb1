"""The benchmark scripts still run against the current API (a smoke run; no timing asserted).

Speed and memory goals are judged by full runs recorded in benchmarks/README.md, never here:
a quick run on a shared CI machine measures nothing worth asserting.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
SMOKE_RUNS = {
    "tcp_echo.py": ["--quick", "--only", "echo_protocol,serve_raw,line16k"],
    "udp_echo.py": ["--quick", "--only", "echo_protocol,in32"],
    "chat_fanout.py": ["--quick", "--clients", "100"],
    "handler_costs.py": ["--quick"],
}


def test_every_benchmark_has_a_smoke_run() -> None:
    """Every script in benchmarks/ (the shared harness/ package aside) is smoke-run."""
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(SMOKE_RUNS)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", sorted(SMOKE_RUNS))
def test_benchmark_runs_to_its_report(script: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *SMOKE_RUNS[script]],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if script == "handler_costs.py":  # explains, checks nothing
        assert re.search(r"serve_tcp / raw idle memory: \d+\.\d\dx", done.stdout)
        return
    assert "acceptance check" in done.stdout
    assert "PASS" in done.stdout or "FAIL" in done.stdout
