"""``netlib speedtest`` (the client) and ``netlib speedtest serve``."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Final

import netlib
from netlib.cli._common import (
    STOP_HINT,
    Signals,
    UsageError,
    add_command,
    add_reporting,
    count_type,
    emit,
    fail,
    format_address,
    host_type,
    port_type,
    positive_float,
    rudp_core,
    serve_until_stopped,
    show_statistics,
)
from netlib.sansio.speedtest import (
    DEFAULT_DURATION,
    DEFAULT_MAX_BITRATE,
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_PARALLEL,
    DEFAULT_MAX_SIZE,
    DEFAULT_MAX_TESTS,
    DEFAULT_SPEEDTEST_PORT,
    MAX_PARALLEL,
    PROTOCOLS,
    SpeedtestLimits,
    SpeedtestRequest,
    SpeedtestResult,
)

__all__ = ["add_speedtest"]

CLIENT_EXAMPLES = """\
examples:
  netlib speedtest serve &                   # on 127.0.0.1:7201 (tcp, udp), 7202 (rudp)
  netlib speedtest                           # tcp, udp and reliable udp, 3 s each
  netlib speedtest --proto udp --bitrate 100M --parallel 4 --reverse
  netlib speedtest --proto tcp --duration 10 --json   # one JSON line per protocol

Through an impairment proxy (UDP loss seen by the UDP test):
  netlib proxy --listen 127.0.0.1:7301 --target 127.0.0.1:7201 --loss 5% &
  netlib speedtest --proto udp --udp-port 7301
"""
SERVE_EXAMPLES = """\
examples:
  netlib speedtest serve                     # 127.0.0.1:7201 (tcp, udp), 7202 (rudp)
  netlib speedtest serve --host '*' --max-duration 30 --max-bitrate 500M
"""
_SUFFIX: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgKMG]?)\s*$")


def size_type(value: str) -> int:
    """Bytes: ``1400``, ``128K`` or ``1M`` (K and M are 1024 and 1024 x 1024)."""
    found = _SUFFIX.match(value)
    if not found:
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: expected 1400, 128K or 1M")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[found.group(2).lower()]
    size = float(found.group(1)) * scale
    if size < 1 or size != int(size):
        raise argparse.ArgumentTypeError(f"invalid size {value!r}: a whole number of bytes >= 1")
    return int(size)


def bitrate_type(value: str) -> float:
    """Bits per second: ``500K``, ``10M`` or ``1G`` (powers of 1000, as iperf3); 0: unpaced."""
    found = _SUFFIX.match(value)
    if not found:
        raise argparse.ArgumentTypeError(f"invalid bitrate {value!r}: expected 10M, 1G or 0")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[found.group(2).lower()]
    return float(found.group(1)) * scale


def add_speedtest(commands: Any, common: argparse.ArgumentParser) -> None:
    client = add_command(
        commands,
        "speedtest",
        common,
        help="measure TCP, UDP and reliable UDP against a netlib speed-test server",
        description="Measure throughput, messages per second and latency (p50, p99) of TCP, "
        "UDP and netlib's reliable UDP against `netlib speedtest serve`, and for UDP the "
        "loss, jitter (RFC 3550) and reordering seen by the receiver. UDP is paced to "
        "--bitrate so its loss is the path's. One row per protocol; --json for scripts.",
        epilog=CLIENT_EXAMPLES,
    )
    client.add_argument(
        "--proto", choices=[*PROTOCOLS, "all"], default="all", help="protocol(s) to measure"
    )
    _add_address(client)
    client.add_argument(
        "--duration",
        type=positive_float,
        default=DEFAULT_DURATION,
        metavar="S",
        help="seconds of sending, for each protocol",
    )
    client.add_argument(
        "--size",
        type=size_type,
        default=None,
        metavar="BYTES",
        help="bytes of each message (default: tcp 128K, udp 1400, rudp 16K)",
    )
    client.add_argument(
        "--bitrate",
        type=bitrate_type,
        default=None,
        metavar="B",
        help="bits per second of each stream, as 10M or 1G (default: udp 10M; tcp and "
        "rudp unpaced, also with 0)",
    )
    client.add_argument(
        "--parallel",
        type=count_type(1, MAX_PARALLEL),
        default=1,
        metavar="N",
        help="streams at once",
    )
    client.add_argument(
        "--reverse", action="store_true", help="the server sends and this client receives"
    )
    client.add_argument(
        "--udp-port",
        type=port_type,
        default=None,
        metavar="P",
        help="send UDP tests to this port of --host instead of the server's (a proxy)",
    )
    client.add_argument(
        "--rudp-port",
        type=port_type,
        default=None,
        metavar="P",
        help="send reliable-UDP tests to this port of --host instead of the server's",
    )
    client.add_argument("--json", action="store_true", help="one JSON line per protocol")
    client.set_defaults(run=speedtest_client, server=False)

    actions = client.add_subparsers(dest="action", required=False, metavar="[serve]")
    serve = add_command(
        actions,
        "serve",
        common,
        help="serve speed tests until interrupted",
        description="Serve speed tests until Ctrl-C or SIGTERM: control connections and TCP "
        "tests on --port, UDP tests on --udp-port, reliable-UDP tests on --rudp-port. "
        "Tests beyond the limits below are refused, saying which limit.",
        epilog=SERVE_EXAMPLES,
    )
    _add_address(serve, server=True)
    serve.add_argument(
        "--udp-port", type=port_type, default=None, metavar="P", help="default: --port"
    )
    serve.add_argument(
        "--rudp-port", type=port_type, default=None, metavar="P", help="default: --port + 1"
    )
    limits = serve.add_argument_group("limits")
    limits.add_argument(
        "--max-tests",
        type=count_type(1),
        default=DEFAULT_MAX_TESTS,
        metavar="N",
        help="tests at once; more are refused as busy",
    )
    limits.add_argument(
        "--max-duration",
        type=positive_float,
        default=DEFAULT_MAX_DURATION,
        metavar="S",
        help="longest test",
    )
    limits.add_argument(
        "--max-parallel",
        type=count_type(1, MAX_PARALLEL),
        default=DEFAULT_MAX_PARALLEL,
        metavar="N",
        help="streams in one test",
    )
    limits.add_argument(
        "--max-size",
        type=size_type,
        default=DEFAULT_MAX_SIZE,
        metavar="BYTES",
        help="largest tcp or rudp message",
    )
    limits.add_argument(
        "--max-bitrate",
        type=bitrate_type,
        default=DEFAULT_MAX_BITRATE,
        metavar="B",
        help="highest paced rate of a whole test (bitrate x streams)",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=netlib.server.DEFAULT_SHUTDOWN_GRACE,
        metavar="S",
        help="seconds running tests get to finish at shutdown",
    )
    add_reporting(serve)
    serve.set_defaults(run=speedtest_serve, server=True)


def _add_address(parser: argparse.ArgumentParser, *, server: bool = False) -> None:
    parser.add_argument(
        "--host",
        type=host_type,
        default="127.0.0.1",
        help="address or name to listen on ('*': every interface)" if server else "the server",
    )
    parser.add_argument(
        "--port",
        type=port_type,
        default=DEFAULT_SPEEDTEST_PORT,
        help="TCP port (control and tcp tests)",
    )


# -- serve ------------------------------------------------------------------------------------


async def speedtest_serve(args: argparse.Namespace, signals: Signals) -> int:
    try:
        limits = SpeedtestLimits(
            max_tests=args.max_tests,
            max_duration=args.max_duration,
            max_parallel=args.max_parallel,
            max_size=args.max_size,
            max_bitrate=args.max_bitrate,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    async with netlib.open_speedtest_server(
        args.host,
        args.port,
        udp_port=args.udp_port,
        rudp_port=args.rudp_port,
        limits=limits,
        shutdown_grace=args.shutdown_grace,
    ) as running:
        server = running.server

        def close_all() -> None:
            server.close()
            running.rudp.close()

        signals.on_force(close_all)
        tcp = [format_address(a) for a in running.addresses]
        udp, rudp = format_address(running.udp_address), format_address(running.rudp_address)
        label, core = rudp_core()
        emit(
            args,
            f"netlib speed test server listening on {', '.join(tcp)} (tcp), {udp} (udp), "
            f"{rudp} ({label}){STOP_HINT}",
            event="listening",
            addresses=tcp,
            udp=udp,
            rudp=rudp,
            core=core,
        )
        await serve_until_stopped(
            args,
            signals,
            "speedtest",
            running.statistics,
            open_connections=lambda: running.statistics().active,
            grace=args.shutdown_grace,
        )
    show_statistics(args, "speedtest", running.statistics())
    return 0


# -- the client -------------------------------------------------------------------------------


def _requests(args: argparse.Namespace) -> list[SpeedtestRequest]:
    protocols = PROTOCOLS if args.proto == "all" else (args.proto,)
    try:
        return [
            SpeedtestRequest.default(
                protocol,
                duration=args.duration,
                size=args.size,
                bitrate=args.bitrate,
                parallel=args.parallel,
                reverse=args.reverse,
            )
            for protocol in protocols
        ]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


class _Status:
    """A transient line on stderr saying which test runs, on a terminal with ``rich``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self._status: Any = None
        if args.json or not sys.stderr.isatty() or "NO_COLOR" in os.environ:
            return
        try:
            from rich.console import Console
        except ImportError:
            return
        self._status = Console(file=sys.stderr).status("")

    def __enter__(self) -> _Status:
        if self._status is not None:
            self._status.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._status is not None:
            self._status.stop()

    def update(self, text: str) -> None:
        if self._status is not None:
            self._status.update(text)


def _title(args: argparse.Namespace) -> str:
    direction = "server to client" if args.reverse else "client to server"
    streams = f"{args.parallel} stream{'s' if args.parallel > 1 else ''}"
    return f"speed test, {direction}, {streams}, {args.duration:g} s per protocol:"


def _print_table(title: str, results: list[SpeedtestResult]) -> None:
    """On a terminal (with ``rich``): the protocols side by side, one column each. Else
    (a pipe, a file, ``NO_COLOR``): one row per protocol, for ``grep`` and friends."""
    if not results:
        return
    if sys.stdout.isatty() and "NO_COLOR" not in os.environ:
        try:
            from rich import box
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            pass
        else:
            from netlib.speedtest import COLUMNS, table_rows  # loaded when used: see cli/__init__

            rows = table_rows(results)
            table = Table(box=box.SIMPLE_HEAD)
            table.add_column("")
            for row in rows:
                table.add_column(row[0], justify="right")
            for i, metric in enumerate(COLUMNS[1:], start=1):
                table.add_row(metric, *(row[i] for row in rows))
            console = Console()
            console.print(title, highlight=False)
            console.print(table)
            return
    print(title)
    print(netlib.format_speedtest_results(results), flush=True)


async def speedtest_client(args: argparse.Namespace, _signals: Signals) -> int:
    requests = _requests(args)
    host = args.host if args.host is not None else "127.0.0.1"
    where = format_address((host, args.port))
    results: list[SpeedtestResult] = []
    with _Status(args) as status:
        for request in requests:
            status.update(f"measuring {request.protocol} for {request.duration:g} s ...")
            try:
                result = await netlib.run_speedtest(
                    host,
                    args.port,
                    protocol=request.protocol,
                    duration=request.duration,
                    size=request.size,
                    bitrate=request.bitrate,
                    parallel=request.parallel,
                    reverse=request.reverse,
                    udp_port=args.udp_port,
                    rudp_port=args.rudp_port,
                )
            except (netlib.NetlibError, OSError) as exc:
                status.__exit__()
                _print_table(_title(args), [] if args.json else results)
                return fail(_why(exc, request, where))
            results.append(result)
            if args.json:
                emit(args, "", event="result", server=where, **result.to_json())
    if not args.json:
        _print_table(_title(args), results)
    return 0


def _why(exc: BaseException, request: SpeedtestRequest, where: str) -> str:
    """One line for a failed test."""
    test = f"the {request.protocol} test"
    match exc:
        case netlib.RequestRefused():
            return f"the server refused {test}: {exc.reason}"
        case ConnectionRefusedError() if exc.errno is None:  # a test's port, said by netlib
            return f"{test}: {exc}"
        case ConnectionRefusedError():
            return f"connection refused by {where}"
        case netlib.PeerTimedOut() | TimeoutError():
            return f"{test} with {where} timed out{': ' + str(exc) if str(exc) else ''}"
        case netlib.ProtocolError():
            return f"{where} is not a netlib speed-test server, or broke the protocol: {exc}"
        case netlib.EndOfStream() | netlib.BrokenResourceError():
            return f"{where} closed the connection during {test}"
        case OSError() if exc.strerror:
            return f"{test} with {where}: {exc.strerror}"
    return f"{test} with {where}: {exc}"
