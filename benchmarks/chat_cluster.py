"""Chat cluster benchmark: one room across 3 chat nodes on NATS JetStream, beside one node.

Usage::

    .venv/bin/python benchmarks/chat_cluster.py [--quick] [--runs N] [--clients 60]
        [--publishers 3] [--nodes 3] [--loops uvloop,asyncio] [--json FILE]

N clients sit in one room (``#lobby``); M of them are publishers (see ``harness/chat.py``
for the lines and their checks). Two chats are measured in the same round:

* ``single``   one chat server with the in-memory hub (``netlib.open_chat_server`` and a
  ``ChatService`` of its own): every client on it.
* ``cluster``  a nats-server with JetStream (from the venv: ``netlib.LocalNatsServer``, a
  free loopback port, its store in a temporary directory) and ``--nodes`` chat servers,
  each a ``ChatService(hub=netlib.NatsHub())`` on it (what ``netlib chat serve --nats URL``
  runs); client ``i`` is on node ``i % nodes``, so most deliveries cross nodes. A line's
  latency is counted as *cross-node* when its publisher's node is not the receiver's.

Both run as subprocesses of this script (``--serve single|node``) bound to 127.0.0.1, on
the event loop under test, with flood control opened wide (``ChatLimits(flood_rate=1e6,
flood_burst=1_000_000)``; its default is 5 lines/s, burst 20) and no cap on connections
per host (every client comes from 127.0.0.1); every other limit is the default, the NATS
hub's included. **Every server process, nats-server included, is pinned to CPU 0**, the
clients (this process) to CPU 1: the cluster gets the single node's one core.

Per round both chats are started afresh and the clients connect to both; each is measured
at saturation (deliveries/s, server CPU per delivery: the node processes and nats-server
summed), then at a fixed offered rate, ``--fixed-share`` of the lower of the two
saturation rates in that round (the same rate for both; latency p50/p99, cross-node and
same-node). The saturation window is at most ``NODE_INFLIGHT`` lines per node, under the
hub's outbox (``OUTBOX_LINES``), so no line is refused as "not sent". Rounds alternate the
order of the two. See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Final

import harness
from harness import bench, chat
from harness.bench import HOST, SERVER_CPU, Column, Config, Goal, Served, Spec

LOOPS = ("uvloop", "asyncio")
SATURATED = 0.90  # client core share above which the client, not the server, is the limit
CROSS_P99_LIMIT_US: Final = 100_000.0
"""Acceptance (R11 across nodes): cross-node p99 delivery under 100 ms on loopback."""
OUTBOX_LINES: Final = 1000
"""The NATS hub's default outbox (``netlib.services.nats_hub.OUTBOX_LINES``; checked when a
node starts): lines a node holds for the cluster before it refuses more."""
NODE_INFLIGHT: Final = OUTBOX_LINES // 2
"""Saturation: lines the publishers on one node keep unseen by the ackers, at most; with
half the outbox to spare a node never refuses a line at saturation."""


# =============================================================================================
# Servers (run in the ``--serve`` subprocess)
# =============================================================================================


def _limits() -> Any:
    import netlib

    return netlib.ChatLimits(flood_rate=1e6, flood_burst=1_000_000)


async def single(stack: contextlib.AsyncExitStack) -> Served:
    """One chat server, in-memory hub (as ``chat_fanout.py``'s ``netlib``)."""
    import netlib

    service = netlib.ChatService(limits=_limits())
    server = await stack.enter_async_context(  # every client comes from 127.0.0.1
        netlib.open_chat_server(HOST, 0, service=service, max_connections_per_host=None)
    )
    return server.tcp_addresses[0][1], service.statistics


@dataclasses.dataclass
class NodeStatistics:
    """What a node writes to ``--stats-out``: the chat's and the NATS hub's counters."""

    chat: Any
    nats: Any


async def node(stack: contextlib.AsyncExitStack) -> Served:
    """One node of the cluster: a ChatService on a NatsHub on ``$NATS_URL``."""
    import netlib
    from netlib.services import nats_hub

    if nats_hub.OUTBOX_LINES != OUTBOX_LINES:
        raise SystemExit(f"chat_cluster.OUTBOX_LINES is {OUTBOX_LINES}, the hub's is changed")
    hub = netlib.NatsHub()  # the NATS_URL the parent set, as ``chat serve --nats`` reads it
    await hub.start()
    stack.push_async_callback(hub.aclose)
    service = netlib.ChatService(hub=hub, limits=_limits())
    server = await stack.enter_async_context(
        netlib.open_chat_server(HOST, 0, service=service, max_connections_per_host=None)
    )
    return server.tcp_addresses[0][1], lambda: NodeStatistics(
        service.statistics(), hub.statistics()
    )


SERVERS = {"single": single, "node": node}
NATS_COUNTERS = ("resent", "undelivered", "lost", "dropped", "consumer_resets", "outages")
"""The hub's trouble counters, summed over the nodes in the report."""


# =============================================================================================
# Scenarios
# =============================================================================================


def configs(args: argparse.Namespace) -> list[Config]:
    found: list[Config] = []
    for loop in args.loops:
        base = f"room{args.clients}:single/{loop}"
        found += [
            Config(
                f"room{args.clients}", "single", loop,
                f"{args.clients} clients, 1 node, memory hub ({loop})",
            ),
            Config(
                f"room{args.clients}", "cluster", loop,
                f"{args.clients} clients, {args.nodes} nodes on NATS ({loop})", baseline=base,
            ),
        ]  # fmt: skip
    return found


_COLUMNS = [
    Column("sat_deliveries_per_s", "sat dlv/s", "{:,.0f}", ratio=True),
    Column("sat_published_per_s", "lines/s", "{:,.0f}"),
    Column("sat_server_us_per_delivery", "srv us/dlv", "{:.3f}", ratio=True),
    Column("fix_deliveries_per_s", "fixed dlv/s", "{:,.0f}"),
    Column("fix_p50_us", "p50 us", "{:,.0f}", ratio=True),
    Column("fix_p99_us", "p99 us", "{:,.0f}", ratio=True),
    Column("fix_cross_p50_us", "cross p50", "{:,.0f}"),
    Column("fix_cross_p99_us", "cross p99", "{:,.0f}"),
    Column("fix_same_p99_us", "same p99", "{:,.0f}"),
    *(Column(err, err[:10], "{:,}", total=True) for err in chat.ERRORS),
]


def goals(args: argparse.Namespace) -> list[Goal]:
    found: list[Goal] = []
    for loop in args.loops:
        a, b = f"room{args.clients}:cluster/{loop}", f"room{args.clients}:single/{loop}"
        found += [
            Goal(
                f"cross-node p99 delivery at the fixed rate, {args.nodes} nodes, {loop}"
                " (R11 across nodes)",
                a, None, "fix_cross_p99_us", CROSS_P99_LIMIT_US, at_least=False, unit=" us",
            ),
            Goal(
                f"cluster / single deliveries/s at saturation, {loop}",
                a, b, "sat_deliveries_per_s", None,
                cpu_metric="sat_server_us_per_delivery",
            ),
            Goal(f"cluster / single p99 at the same fixed rate, {loop}", a, b, "fix_p99_us", None),
        ]  # fmt: skip
    return found


def no_errors(rounds: harness.Rounds, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """R11: gaps, duplicates, lines lost and disconnects, summed over every phase, for both
    chats; then the NATS hub's counters summed over the nodes and rounds."""
    checks = []
    for kind in ("cluster", "single"):
        bad = {k: [e[err] for err in chat.ERRORS] for k, e in summary.items() if f":{kind}/" in k}
        total = sum(sum(v) for v in bad.values())
        detail = ", ".join(f"{k}: {v}" for k, v in bad.items() if sum(v))
        line = f"{'PASS' if total == 0 else 'FAIL'}: {kind} gaps/dups/lost/disconnects = 0"
        line += f" in every phase{f': {total} ({detail})' if total else ''}"
        checks.append(
            {"check": f"{kind} {'/'.join(chat.ERRORS)}", "pass": total == 0, "line": line}
        )
    sums = dict.fromkeys(NATS_COUNTERS, 0)
    for r in rounds:
        for key, sample in r.items():
            if ":cluster/" in key:
                for counter in NATS_COUNTERS:
                    sums[counter] += sample.get("nats", {}).get(counter, 0)
    shown = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in sums.items())
    checks.append({"check": "nats hub counters", "pass": None, "counters": sums,
                   "line": f"INFO: NATS hub, summed over nodes and rounds: {shown}"})  # fmt: skip
    return checks


# =============================================================================================
# Measuring one round: the single node and the cluster
# =============================================================================================


class ProcGroup:
    """Several processes seen as one for CPU time (``cpu_times().user``/``.system``)."""

    def __init__(self, procs: Sequence[Any]) -> None:
        self.procs = list(procs)

    def cpu_times(self) -> SimpleNamespace:
        times = [p.cpu_times() for p in self.procs]
        return SimpleNamespace(
            user=sum(t.user for t in times), system=sum(t.system for t in times)
        )


@contextlib.contextmanager
def _affinity(cpu: int | None) -> Iterator[None]:
    """Run the block on ``cpu`` (what it spawns inherits it), then back."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def units(order: list[Config]) -> list[list[Config]]:
    """Both chats of each loop, in this round's order."""
    groups: dict[str, list[Config]] = {}
    for config in order:
        groups.setdefault(config.loop, []).append(config)
    return list(groups.values())


def _publishers_per_node(args: argparse.Namespace) -> int:
    """The most publishers on one node (``Room`` spreads publishers evenly over clients)."""
    step = args.clients / args.publishers
    nodes = [int(i * step) % args.nodes for i in range(args.publishers)]
    return max(nodes.count(n) for n in set(nodes))


def measure(unit: list[Config], workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import uvloop

    from netlib import LocalNatsServer

    cluster_config = next(c for c in unit if c.server == "cluster")
    single_config = next(c for c in unit if c.server == "single")
    results: dict[str, dict[str, Any]] = {c.server: {} for c in unit}
    nats = LocalNatsServer(workdir / f"nats-{len(list(workdir.iterdir()))}")
    nodes: list[harness.Child] = []
    children: list[harness.Child] = []
    try:
        with _affinity(SERVER_CPU if args.pin else None):  # nats-server: CPU 0 too
            args.nats_url = nats.start()
        node = dataclasses.replace(cluster_config, server="node")
        # the first node makes the stream and buckets; the others start together
        nodes.append(bench.start(node, workdir, args, SPEC))
        first = harness.wait_ready(nodes[0], int, timeout=30)
        nodes += [bench.start(node, workdir, args, SPEC) for _ in range(args.nodes - 1)]
        children = [bench.start(single_config, workdir, args, SPEC), *nodes]
        node_ports = [first] + [harness.wait_ready(c, int, timeout=30) for c in nodes[1:]]
        ports: dict[str, int | list[int]] = {
            "single": harness.wait_ready(children[0], int),
            "cluster": node_ports,
        }
        nats_proc = psutil.Process(nats.pid)
        procs = {
            "single": psutil.Process(children[0].proc.pid),
            "cluster": ProcGroup([*(psutil.Process(c.proc.pid) for c in nodes), nats_proc]),
        }
        window = max(2, NODE_INFLIGHT // _publishers_per_node(args))

        def fixed_rate(sat: dict[str, dict[str, Any]]) -> float:
            return float(args.fixed_share * min(r["sat_deliveries_per_s"] for r in sat.values()))

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            order = [c.server for c in unit]
            results = runner.run(
                chat.measure_pair(
                    ports, procs, args.clients, order, args,
                    max_window=window, fixed_rate=fixed_rate,
                )
            )  # fmt: skip
    finally:
        if children:
            results["single"] = bench.finish(children[0], results["single"])
        stats = [bench.finish(c, {}) for c in nodes]
        nats.close()
    cluster = results["cluster"]
    cluster["node_stats"] = [s.get("server_stats") for s in stats]
    cluster["nats"] = {
        counter: sum((s or {}).get("nats", {}).get(counter, 0) for s in cluster["node_stats"])
        for counter in NATS_COUNTERS
    }
    logs = [s["server_log"] for s in stats if "server_log" in s]
    if logs:
        cluster["server_log"] = "\n".join(logs)
    return {c.key: results[c.server] for c in unit}


def client_bound(entry: dict[str, Any]) -> bool:
    """The client's core was full while the servers' was not: the client is the limit."""
    client = entry.get("client_core_busy") or 0.0
    server = entry.get("server_cpu_share") or 0.0
    return client >= SATURATED and server < SATURATED


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def progress(r: dict[str, Any]) -> str:
    cross = ""
    if "fix_cross_p99_us" in r:
        cross = (
            f" cross p50 {_fmt(r['fix_cross_p50_us'], ',.0f'):>6}"
            f" p99 {_fmt(r['fix_cross_p99_us'], ',.0f'):>7} us"
        )
    return (
        f"sat {r['sat_deliveries_per_s']:>10,.0f} dlv/s"
        f" ({r['sat_published_per_s']:>7,.0f} lines/s)"
        f" {r['sat_server_us_per_delivery']:6.3f} us/dlv"
        f" srv {r['sat_server_cpu_share']:4.0%} (core {r['sat_server_core_busy'] or 0:4.0%})"
        f" cli {r['sat_client_cpu_share']:4.0%} (core {r['sat_client_core_busy'] or 0:4.0%})"
        f" | fixed {r['fix_deliveries_per_s']:>9,.0f} dlv/s"
        f" p50 {_fmt(r['fix_p50_us'], ',.0f'):>6} us p99 {_fmt(r['fix_p99_us'], ',.0f'):>7} us"
        f"{cross} | err {'/'.join(str(r[e]) for e in chat.ERRORS)}"
        f" foreign {r['foreign_cores']:.2f}"
    )


def setup(args: argparse.Namespace) -> str:
    window = max(2, NODE_INFLIGHT // _publishers_per_node(args))
    return (
        f"one room of {args.clients} clients, {args.publishers} publishers; cluster:"
        f" nats-server + {args.nodes} nodes, all on CPU {SERVER_CPU}; loops"
        f" {','.join(args.loops)}; warm-up {args.warmup}s, window {args.duration}s;"
        f" saturation: {args.inflight:,} deliveries in flight, at most {window} lines per"
        f" publisher; fixed rate {args.fixed_share:.0%} of the lower saturation"
    )


SPEC = Spec(
    name="chat_cluster",
    servers=SERVERS,
    configs=[],
    columns={},
    goals=[],
    measure=measure,
    progress=progress,
    client_bound=client_bound,
    shares=["server_cpu_share", "client_cpu_share", "client_core_busy", "sat_server_core_busy"],
    units=units,
    extra_checks=no_errors,
    legend="sat: saturation (windowed publishers); fixed: the same offered rate for both"
    " chats, a share of the lower saturation in that round. srv us/dlv: CPU of the server"
    " processes (the cluster: its nodes and nats-server) per delivery at saturation."
    " cross/same p50/p99: latency of deliveries whose publisher is on another node / the"
    " same node (one node: every delivery is same-node). gaps/dups/lost/disconnected:"
    " summed over rounds and phases.",
    server_lifetime=600,
    raise_nofile=True,
    setup=setup,
    server_env=lambda args: (
        {**os.environ, "NATS_URL": args.nats_url} if getattr(args, "nats_url", None) else None
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = harness.new_parser(__doc__)
    p.add_argument("--clients", type=int, default=60, help="clients in the room (60)")
    p.add_argument("--publishers", type=int, default=3, help="publishers (3)")
    p.add_argument("--nodes", type=int, default=3, help="chat nodes of the cluster (3)")
    p.add_argument("--loops", default="uvloop", help="server loops (uvloop; or asyncio)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds before counting (0.5)")
    p.add_argument("--duration", type=float, default=3.0, help="measured window, s (3.0)")
    p.add_argument(
        "--inflight",
        type=int,
        default=200_000,
        help="saturation: deliveries in flight in all (200000), at most\n"
        f"{NODE_INFLIGHT} lines per node",
    )
    p.add_argument(
        "--fixed-share",
        type=float,
        default=0.5,
        help="fixed offered rate as a share of the lower saturation rate (0.5)",
    )
    p.add_argument("--drain-timeout", type=float, default=10.0, help="seconds to drain (10)")
    harness.add_retry_args(p, 60.0, "phase")
    bench.add_common_args(p)
    harness.add_server_args(p, SERVERS, LOOPS)
    args = p.parse_args(argv)
    args.loops = args.loops.split(",")
    if any(loop not in LOOPS for loop in args.loops):
        p.error("--loops: uvloop,asyncio")
    if args.clients <= args.publishers or args.publishers < 1:
        p.error("--clients must exceed --publishers (at least 1)")
    if not 2 <= args.nodes <= args.clients:
        p.error("--nodes: 2 or more (cross-node deliveries), at most --clients")
    if not 0 < args.fixed_share <= 1:
        p.error("--fixed-share: more than 0, at most 1")
    if args.quick:
        args.warmup, args.duration = 0.3, 1.0
        args.retry_budget = min(args.retry_budget, 20.0)
    SPEC.configs = configs(args)
    SPEC.columns = {c.workload: _COLUMNS for c in SPEC.configs}
    SPEC.goals = goals(args)
    return args


if __name__ == "__main__":
    sys.exit(bench.main(SPEC, parse_args()))
