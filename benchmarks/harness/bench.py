"""The benchmark runner: scenarios, servers as subprocesses, rounds, medians, ratios, goals.

A benchmark script describes itself with a ``Spec``: its ``Config`` list (a server on an
event loop under a workload, and the config its ratio column compares with), the columns of
its report, its ``Goal`` list and the function that measures one unit (one config, or
configs measured together). ``main(spec, ...)`` then does the rest, for every script the
same way:

* the ``--serve NAME`` subprocess mode: pinned to the server CPU, the script's server
  started through ``netlib.run`` on the requested loop, the port published in a file, the
  server's statistics written to ``--stats-out`` on SIGTERM;
* rounds: every config measured once per round, in alternating order (forward, then
  reversed) to cancel drift; samples disturbed by other processes left out where an
  undisturbed one exists;
* the report: medians across rounds, the median of the per-round ratios to each config's
  baseline measured in the same round, client-bound (C) and disturbed (D) marks, then
  each goal's ratio against its own baseline in the same round, with the per-round
  values;
* ``--json FILE``: every raw sample, the settings, the machine and the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    Child,
    Rounds,
    install_exit_handlers,
    machine_info,
    median_or_none,
    pin_client,
    pin_server,
    print_retry_summary,
    server_log_problems,
    server_loop,
    servers_always_killed,
    settings,
    start_server,
    stop_server,
    usable,
    wait_quiet,
    write_json,
    write_port_file,
)

__all__ = [
    "CLIENT_CPU",
    "HOST",
    "SERVER_CPU",
    "Column",
    "Config",
    "Goal",
    "Served",
    "Spec",
    "add_common_args",
    "least_disturbed",
    "main",
    "run_unit",
]

HOST = "127.0.0.1"
SERVER_CPU = 0
CLIENT_CPU = 1

Served = tuple[int, Callable[[], Any] | None]
"""What a server start function returns: its port, and a statistics function (or None)."""

ServerStart = Callable[[contextlib.AsyncExitStack], Awaitable[Served]]


@dataclass(frozen=True)
class Config:
    """One thing measured: ``server`` on ``loop`` under ``workload``.

    ``baseline`` is the key of the config that the report's ratio column compares it with
    (round by round); ``key`` is ``workload:server/loop``.
    """

    workload: str
    server: str
    loop: str
    label: str
    baseline: str | None = None

    @property
    def key(self) -> str:
        return f"{self.workload}:{self.server}/{self.loop}"


@dataclass(frozen=True)
class Column:
    """A report column: a sample's ``metric``, median over rounds (or summed: ``total``)."""

    metric: str
    title: str
    fmt: str
    ratio: bool = False  # print the ratio to the config's baseline next to it
    total: bool = False


@dataclass(frozen=True)
class Goal:
    """``a``'s ``metric`` against ``b``'s measured in the same round (or absolute: no ``b``).

    ``limit`` None makes the line informational. ``cpu_metric``: its ratio is printed too.
    """

    text: str
    a: str
    b: str | None
    metric: str
    limit: float | None
    at_least: bool = True
    cpu_metric: str | None = None
    unit: str = "x"


MeasureUnit = Callable[[list[Config], Path, argparse.Namespace], dict[str, dict[str, Any]]]


@dataclass
class Spec:
    """Everything a benchmark script tells the runner."""

    name: str
    servers: Mapping[str, ServerStart]
    configs: list[Config]
    columns: dict[str, list[Column]]  # per workload
    goals: list[Goal]
    measure: MeasureUnit
    progress: Callable[[dict[str, Any]], str]
    client_bound: Callable[[dict[str, Any]], bool]
    shares: list[str] = field(default_factory=list)  # more medians kept in the summary
    units: Callable[[list[Config]], list[list[Config]]] | None = None
    notes: Callable[[Goal, dict[str, Any]], list[str]] | None = None
    extra_checks: Callable[[Rounds, dict[str, Any]], list[dict[str, Any]]] | None = None
    min_rounds: int = 1  # clean rounds a goal's ratio needs to be conclusive
    legend: str = ""
    server_lifetime: int = 900
    raise_nofile: bool = False
    setup: Callable[[argparse.Namespace], str] | None = None  # returns the settings line
    server_env: Callable[[argparse.Namespace], dict[str, str] | None] | None = None
    # before the rounds: the selected configs that can run here (it says why others cannot)
    prepare: Callable[[list[Config], argparse.Namespace], list[Config]] | None = None


# =============================================================================================
# Server side
# =============================================================================================


def _raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _serve(spec: Spec, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    stats: Callable[[], Any] | None = None

    def write_stats() -> None:  # on SIGTERM
        if args.stats_out and stats is not None:
            Path(args.stats_out).write_text(json.dumps(dataclasses.asdict(stats())))

    profiler = install_exit_handlers(loop, args.profile_out, write_stats)
    async with contextlib.AsyncExitStack() as stack:
        port, stats = await spec.servers[args.serve](stack)
        write_port_file(Path(args.port_file), port)  # the parent probes until it answers
        if profiler is not None:
            profiler.enable()
        await loop.create_future()  # until SIGTERM or stdin closes


def serve_main(spec: Spec, args: argparse.Namespace) -> None:
    """The ``--serve`` subprocess: pinned, on ``--loop``, bound to 127.0.0.1 only."""
    import netlib  # only the server subprocess imports netlib

    pin_server(args, spec.server_lifetime)
    if spec.raise_nofile:
        _raise_nofile()
    netlib.run(_serve(spec, args), loop=server_loop(args))


# =============================================================================================
# Client side: servers, retries
# =============================================================================================


def start(config: Config, workdir: Path, args: argparse.Namespace, spec: Spec) -> Child:
    """Start ``config``'s server subprocess (a fresh one) with its stats file cleared."""
    key = f"{config.server}-{config.loop}-{len(list(workdir.iterdir()))}"
    (workdir / f"{key}.stats.json").unlink(missing_ok=True)
    profile = None
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
        profile = Path(args.profile_dir).absolute() / f"{key}.pstats"
    return start_server(
        sys.argv[0], key, config.server, config.loop, workdir,
        cpu=SERVER_CPU if args.pin else None, profile_out=profile,
        extra=["--stats-out", str(workdir / f"{key}.stats.json")],
        env=spec.server_env(args) if spec.server_env else None,
    )  # fmt: skip


def finish(child: Child, result: dict[str, Any]) -> dict[str, Any]:
    """Stop the server; add its final statistics and any problem its log shows."""
    stop_server(child, timeout=5.0)
    stats_file = child.log.with_name(f"{child.name}.stats.json")
    if stats_file.exists():
        result["server_stats"] = json.loads(stats_file.read_text())
    problems = server_log_problems(child)
    if problems:
        print(f"\n  !! server {child.name} logged problems:\n{problems}", file=sys.stderr)
        result["server_log"] = problems
    return result


def least_disturbed(
    proc: Any, args: argparse.Namespace, attempt: Callable[[], tuple[dict[str, Any], float]]
) -> dict[str, Any]:
    """Run ``attempt`` (returns a sample and its foreign load, in cores) until undisturbed.

    A disturbed sample (foreign load above ``--max-foreign``) is measured again, up to
    ``--retries`` times, after waiting for quiet CPUs, all within the run's
    ``--retry-budget``; the least disturbed attempt is kept, with ``attempts`` and
    ``disturbed`` set.
    """
    best: tuple[float, dict[str, Any]] | None = None
    for index in range(1 + args.retries):
        started = time.monotonic()
        if index and not wait_quiet(proc, args):
            break
        sample, load = attempt()
        sample["attempts"] = index + 1
        if index:
            args.retry_budget -= time.monotonic() - started
        if best is None or load < best[0]:
            best = (load, sample)
        if load <= args.max_foreign or args.retry_budget <= 0:
            break
    assert best is not None
    best[1]["disturbed"] = best[0] > args.max_foreign
    return best[1]


def run_unit(
    spec: Spec,
    config: Config,
    workdir: Path,
    args: argparse.Namespace,
    ready: Callable[[Child], Any],
    measure: Callable[[Any, Any], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
    """The usual unit: one fresh server; ``ready(child)`` -> port info; ``measure(info, proc)``."""
    import psutil

    child = start(config, workdir, args, spec)
    result: dict[str, Any] = {}
    try:
        info = ready(child)
        result = measure(info, psutil.Process(child.proc.pid))
    finally:
        result = finish(child, result)
    return {config.key: result}


# =============================================================================================
# Summary, report, goals
# =============================================================================================


def _ratios(rounds: Rounds, a: str, b: str, metric: str) -> tuple[list[float], bool]:
    pair, clean = usable(rounds, a, b)
    values = [
        r[a][metric] / r[b][metric]
        for r in pair
        if r[a].get(metric) is not None and r[b].get(metric)
    ]
    return values, clean


def summarize(spec: Spec, rounds: Rounds, configs: list[Config]) -> dict[str, Any]:
    """Per config: medians (or sums) across usable rounds, ratios to its baseline."""
    summary: dict[str, Any] = {}
    for config in configs:
        key = config.key
        own, clean = usable(rounds, key)
        entry: dict[str, Any] = {"label": config.label, "rounds": len(own), "clean": clean}
        entry["ratio_clean"] = True
        columns = spec.columns[config.workload]
        for metric in [c.metric for c in columns if not c.total] + spec.shares:
            values = [r[key][metric] for r in own if r[key].get(metric) is not None]
            entry[metric] = median_or_none(values)
        for column in columns:
            if column.total:
                entry[column.metric] = sum(r[key].get(column.metric) or 0 for r in own)
            if column.ratio and config.baseline is not None:
                values, pair_clean = _ratios(rounds, key, config.baseline, column.metric)
                entry[f"{column.metric}_ratio"] = median_or_none(values)
                entry["ratio_clean"] = entry["ratio_clean"] and pair_clean
        summary[key] = entry
    return summary


SHARE_COLUMNS = [("server_cpu_share", 7), ("client_cpu_share", 7), ("client_core_busy", 8)]


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def print_table(spec: Spec, summary: dict[str, Any], configs: list[Config]) -> None:
    for workload, columns in spec.columns.items():
        rows = [c for c in configs if c.workload == workload]
        if not rows:
            continue
        width = max(len(c.label) for c in rows) + 2
        head = f"{workload:{width}}"
        for column in columns:
            head += f" {column.title:>10}" + (f" {'x base':>6}" if column.ratio else "")
        head += f" {'srv CPU':>7} {'cli CPU':>7} {'cli core':>8}"
        print(f"\n{head}\n{'-' * len(head)}")
        for config in rows:
            entry = summary[config.key]
            line = f"{config.label:{width}}"
            for column in columns:
                line += f" {_cell(entry.get(column.metric), column.fmt):>10}"
                if column.ratio:
                    line += f" {_cell(entry.get(f'{column.metric}_ratio'), '{:.2f}'):>6}"
            for share, share_width in SHARE_COLUMNS:
                line += f" {_cell(entry.get(share), '{:.0%}'):>{share_width}}"
            if spec.client_bound(entry):
                line += " C"
            if not entry["clean"] or not entry["ratio_clean"]:
                line += " D"
            print(line)
    baselines = sorted({c.baseline for c in configs if c.baseline})
    print(
        "\nx base: median of the per-round ratios to the row's baseline measured in the same"
        f" round ({', '.join(baselines)}); for rates higher is better, for CPU, latency and"
        " memory lower is better.\nsrv CPU / cli CPU: share of a core used by the server /"
        " the load-client process in the window; cli core: how busy the client's CPU was in"
        " all (with the kernel's softirq time for loopback traffic, charged to no process).\n"
        "C: client-bound, the client's CPU was the limit, so the server's real limit is"
        " higher (compare the server CPU column instead).\n"
        "D: only disturbed samples were available (other processes used the benchmark CPUs)."
        + (f"\n{spec.legend}" if spec.legend else "")
    )


def _label(spec: Spec, key: str) -> str:
    return next((c.label for c in spec.configs if c.key == key), key)


def check_goal(
    spec: Spec, goal: Goal, rounds: Rounds, summary: dict[str, Any]
) -> dict[str, Any] | None:
    """One goal line: PASS, FAIL or INFO, the ratio, the per-round ratios and notes."""
    if goal.a not in summary or (goal.b is not None and goal.b not in summary):
        return None
    per_round: list[float] = []
    if goal.b is None:
        value, clean = summary[goal.a][goal.metric], summary[goal.a]["clean"]
        used = summary[goal.a]["rounds"]
        shown = f"{value:,.0f}"
    else:
        per_round, clean = _ratios(rounds, goal.a, goal.b, goal.metric)
        if not per_round:
            return None
        value = statistics.median(per_round)
        used = len(per_round)
        shown = f"{value:.2f}x"
    op = ">=" if goal.at_least else "<="
    ok = None if goal.limit is None else (value >= goal.limit) == goal.at_least
    notes = []
    if per_round:
        notes.append("per round " + ", ".join(f"{r:.2f}" for r in per_round))
    if goal.cpu_metric and goal.b is not None:
        cpu, _ = _ratios(rounds, goal.a, goal.b, goal.cpu_metric)
        if cpu:
            notes.append(f"server CPU ratio {statistics.median(cpu):.2f}x")
    keys = [k for k in (goal.a, goal.b) if k is not None]
    bound = [_label(spec, k) for k in keys if spec.client_bound(summary[k])]
    if bound:
        notes.append("client-bound: " + ", ".join(bound))
    if spec.notes is not None:
        notes += spec.notes(goal, summary)
    notes.append(f"{used} {'clean' if clean else 'DISTURBED'} round(s)")
    if not clean or used < spec.min_rounds:
        notes.append("not conclusive: re-run on a quiet machine")
    verdict = "INFO" if ok is None else "PASS" if ok else "FAIL"
    limit = "" if goal.limit is None else f" ({op} {goal.limit:,g}{goal.unit})"
    line = f"{verdict}: {goal.text}: {shown}{limit}; {'; '.join(notes)}"
    return {
        "check": goal.text,
        "a": goal.a,
        "b": goal.b,
        "metric": goal.metric,
        "value": value,
        "per_round": per_round,
        "limit": goal.limit,
        "pass": ok,
        "clean": clean,
        "rounds": used,
        "line": line,
    }


# =============================================================================================
# Command line and main
# =============================================================================================


def selected(spec: Spec, args: argparse.Namespace) -> list[Config]:
    """The configs ``--only`` leaves (plus every baseline they compare with)."""
    if not args.only:
        return list(spec.configs)
    names = set(args.only.split(","))
    keep = {c.key for c in spec.configs if c.server in names or c.workload in names}
    keep |= {c.baseline for c in spec.configs if c.key in keep and c.baseline}
    keep |= {g.b for g in spec.goals if g.a in keep and g.b}
    return [c for c in spec.configs if c.key in keep]


def add_common_args(p: argparse.ArgumentParser) -> None:
    """``--only`` and ``--profile-dir``."""
    p.add_argument(
        "--only",
        metavar="NAMES",
        help="comma-separated servers or workloads (their baselines always run)",
    )
    p.add_argument("--profile-dir", metavar="DIR", help="cProfile each server into DIR")


def bench_main(spec: Spec, args: argparse.Namespace) -> int:
    budget = args.retry_budget
    runs = args.runs if args.runs is not None else (1 if args.quick else 3)
    if spec.raise_nofile:
        _raise_nofile()
    pin_client(args, SERVER_CPU, CLIENT_CPU)
    info = machine_info()
    configs = selected(spec, args)
    if spec.prepare is not None:
        configs = spec.prepare(configs, args)
    print(
        f"{spec.name}: {len(configs)} configurations x {runs} rounds; {info['cpus']} CPUs"
        f" ({info['cpu_model']}), Python {info['python']}, uvloop {info['uvloop']}"
    )
    print(
        f"server on CPU {SERVER_CPU}, client on CPU {CLIENT_CPU}"
        f"{'' if args.pin else ' (NOT pinned)'}"
        + (f"; {spec.setup(args)}" if spec.setup else "")
        + "\n"
    )
    started = time.monotonic()
    rounds: Rounds = []
    with (
        tempfile.TemporaryDirectory(prefix=f"{spec.name}.") as tmp,
        servers_always_killed(Path(tmp)),
    ):
        for index in range(runs):
            order = configs if index % 2 == 0 else configs[::-1]  # alternate to cancel drift
            units = spec.units(order) if spec.units else [[c] for c in order]
            results: dict[str, dict[str, Any]] = {}
            for unit in units:
                measured = spec.measure(unit, Path(tmp), args)
                for config in unit:
                    r = measured[config.key]
                    print(
                        f"round {index + 1}/{runs} {config.label:40} {spec.progress(r)}"
                        f"{'  DISTURBED' if r['disturbed'] else ''}"
                        f"{' (retried)' if r.get('attempts', 1) > 1 else ''}",
                        flush=True,
                    )
                results.update(measured)
            rounds.append(results)
    elapsed = time.monotonic() - started
    summary = summarize(spec, rounds, configs)
    print(f"\nmedians over {runs} rounds ({elapsed:.0f}s):")
    print_table(spec, summary, configs)
    print_retry_summary(rounds, budget, args)
    checks = [c for g in spec.goals if (c := check_goal(spec, g, rounds, summary))]
    if spec.extra_checks is not None:
        checks += spec.extra_checks(rounds, summary)
    print("\nacceptance checks (each goal's ratio: median of the per-round ratios):")
    for c in checks:
        print("  " + c["line"])
    if args.json:
        data = {
            "machine": info,
            "settings": settings(args, runs=runs, retry_budget=budget),
            "configs": [dataclasses.asdict(c) | {"key": c.key} for c in configs],
            "elapsed_s": elapsed,
            "rounds": rounds,
            "summary": summary,
            "checks": checks,
        }
        write_json(args.json, data)
    return 0


def main(spec: Spec, args: argparse.Namespace) -> int:
    """Run the server subprocess mode (``--serve``) or the benchmark; Ctrl-C exits 130."""
    if args.serve:
        if not args.port_file:
            raise SystemExit("--serve needs --port-file")
        serve_main(spec, args)
        return 0
    try:
        return bench_main(spec, args)
    except KeyboardInterrupt:
        print("\ninterrupted; servers stopped", file=sys.stderr)
        return 130
