"""Robustness row R18, the soak, in its 2-minute version (``make soak`` runs 30 minutes).

``benchmarks/soak.py`` runs netlib's servers (TCP echo, reliable-UDP echo, files, chat on
one node and across two nodes of a NATS cluster) in one process and drives them from two
others with mixed traffic at half of the echo capacity it measures first, 1 % of its
clients misbehaving (over-long lines, slowloris, resets with replies pending). This test
runs it for 2 minutes with a 30-second warm-up and asserts the row's criteria on what it
measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.serial  # p99 drift and RSS slope over 2 minutes

SOAK = Path(__file__).parent.parent / "benchmarks" / "soak.py"
SHORT_RSS_SLOPE = 10.0  # MiB per 10 minutes, over the 1.5 judged minutes
SHORT_P99_DRIFT = 2.0  # the last third's p99 at most 3x the first's
"""What 2 minutes can resolve. R18's limits (1 MiB per 10 minutes, 20 % p99 drift) are
judged by the 30-minute ``make soak``: over 1.5 minutes one step of the allocator (a
256 KiB arena) reads as a slope of about 1.7, and on the 2-core machine quiet 2-minute runs
measured slopes of +0.4 to +2.5 and p99 drifts of -50 % to +101 % in both versions of the
soak, with and without the NATS chat (the machine's own speed varies: the echo capacity
measured first ranged from 25,000 to 46,000 a second). A leak or a slowdown that grows
with the traffic still shows within these bounds: a kilobyte kept per echo would be
gigabytes."""


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_minutes_of_mixed_traffic_leave_no_drift_and_lose_nothing() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--minutes",
            "2",
            "--warmup",
            "0.5",
            "--sample",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert run.stdout, run.stderr
    verdict = json.loads(run.stdout.splitlines()[-1])
    traffic = verdict["tally"]
    # the load was real, every kind of it
    assert verdict["offered"] > 1000
    assert traffic["echo_replies"] > 60 * verdict["offered"]
    assert traffic["churned"] > 1000
    assert traffic["rudp_replies"] > 10_000
    assert traffic["downloads"] >= 50
    assert traffic["chat"]["delivered"] > 10_000
    assert traffic["cluster_chat"]["delivered"] > 10_000  # across two nodes through NATS
    assert traffic["misbehaved"] >= 20
    # the row's criteria, the RSS slope and p99 drift to what 2 minutes can resolve
    assert verdict["rss_slope_mib_per_10min"] < SHORT_RSS_SLOPE
    assert abs(verdict["fd_change"]) <= 5
    assert abs(verdict["task_change"]) <= 5
    assert verdict["p99_judged"], verdict  # the machine was quiet enough to judge the drift
    assert verdict["p99_drift"] < SHORT_P99_DRIFT, verdict
    assert verdict["unexpected_exceptions"] == 0, traffic["failures"]
    assert verdict["lost"] == 0, traffic
    assert traffic["misbehaving_kept"] == 0
    # the script judges by the row's limits: only those two may fail it here
    others = [f for f in verdict["failed"] if not f.startswith(("RSS slope", "p99 drifted"))]
    assert others == []
    assert run.returncode == (1 if verdict["failed"] else 0)
