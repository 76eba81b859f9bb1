"""What every ``netlib`` command shares: argument types, logging, signals, output, exits.

The conventions (``docs/cli.md``):

* stdout carries results (replies, messages, the listening line, statistics); stderr carries
  diagnostics (logs, errors). ``--json`` turns a command's results into JSON lines.
* Exit status: 0 done; 1 a runtime failure (refused, timed out, not delivered); 2 a usage
  error (bad arguments, a name that does not resolve); 130 / 143 a client interrupted by
  SIGINT / SIGTERM. A server stopped by SIGINT or SIGTERM shuts down gracefully and exits 0;
  a second signal cuts the remaining connections off at once.
* No traceback reaches the user: every error is one line, ``netlib: error: ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from typing import Any, Final, NoReturn

import netlib
from netlib.aio.sockets import format_address

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "STOP_HINT",
    "Command",
    "Formatter",
    "Signals",
    "UsageError",
    "add_command",
    "add_reporting",
    "add_server_limits",
    "add_tls_client",
    "add_tls_server",
    "client_tls",
    "emit",
    "error_reason",
    "fail",
    "format_address",
    "host_type",
    "in_group",
    "port_type",
    "positive_float",
    "rudp_core",
    "run_command",
    "seconds_or_none",
    "serve_until_stopped",
    "server_tls",
    "setup_logging",
    "show_statistics",
    "statistics_text",
]

logger = logging.getLogger("netlib.cli")

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
STOP_HINT: Final = "; Ctrl-C to stop"
"""How a server's listening line ends."""
ALL_INTERFACES: Final = ("*", "", "::")
"""``--host`` values that mean every interface, IPv4 and IPv6 (``::`` too, as Python's
``http.server`` does: people who type it expect IPv4 clients to reach the server)."""


class UsageError(Exception):
    """Bad input found after parsing (a file that cannot be read, say): exit status 2."""


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that shows each option's default (when it has one), with descriptions and
    epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if not action.option_strings or unset or "%(default)" in text:
            return text
        return text + " (default: %(default)s)"


# -- argument types ---------------------------------------------------------------------------


def host_type(value: str) -> str | None:
    """An IP address (brackets allowed), a name, or ``*`` for every interface (None).

    Names are checked only for what can never resolve (spaces, control characters, a
    dotted-number form that is not an IPv4 address); the resolver decides the rest, so
    names such as ``chat_server`` or internationalised ones work.
    """
    if value in ALL_INTERFACES:
        return None
    stripped = value.strip("[]")
    try:
        return str(ipaddress.ip_address(stripped))
    except ValueError:
        pass
    dotted_numbers = stripped.replace(".", "").isdigit()
    if not stripped or len(stripped) > 253 or dotted_numbers or not stripped.isprintable():
        raise argparse.ArgumentTypeError(f"invalid host {value!r}: expected an address or name")
    if any(c.isspace() for c in stripped):
        raise argparse.ArgumentTypeError(f"invalid host {value!r}: expected an address or name")
    return stripped


def port_type(value: str) -> int:
    """A port number 0..65535 (0: pick a free port, for servers)."""
    try:
        port = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}: not a number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {port}: must be 0..65535")
    return port


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def seconds_or_none(value: str) -> float | None:
    """Seconds > 0, or 0 for no limit (None)."""
    if value.strip() in ("0", "0.0"):
        return None
    return positive_float(value)


def count_type(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            count = int(value, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid count {value!r}: not a number") from None
        if count < low or (high is not None and count > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"invalid count {count}: must be {bound}")
        return count

    return parse


def count_or_none(value: str) -> int | None:
    """A count >= 1, or 0 for no limit (None)."""
    return count_type(0)(value) or None


# -- option groups shared by several commands ------------------------------------------------


def add_tls_server(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (tcp)")
    group.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate chain")
    group.add_argument("--tls-key", metavar="FILE", help="private key of --tls-cert")


def add_tls_client(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("TLS (tcp)")
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument(
        "--cacert", metavar="FILE", help="trust the certificates in FILE (implies --tls)"
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate (implies --tls; tests only)",
    )


def add_command(
    actions: Any, name: str, common: argparse.ArgumentParser, **options: Any
) -> argparse.ArgumentParser:
    """A (sub)command's parser, with the common options and the help formatter."""
    parser: argparse.ArgumentParser = actions.add_parser(
        name, parents=[common], formatter_class=Formatter, **options
    )
    return parser


def add_reporting(parser: argparse.ArgumentParser, what: str = "statistics") -> None:
    """``--stats-interval`` and ``--json``, for a server that prints its statistics."""
    parser.add_argument(
        "--stats-interval",
        type=positive_float,
        default=None,
        metavar="S",
        help=f"print the {what} every S seconds (also on SIGUSR1, and when stopped)",
    )
    parser.add_argument(
        "--json", action="store_true", help=f"the listening line and the {what} as JSON"
    )


def add_server_limits(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits (tcp)")
    limits.add_argument(
        "--max-connections",
        type=count_or_none,
        default=None,
        metavar="N",
        help="connections open at once; 0 or unset: netlib's default (from the fd limit)",
    )
    limits.add_argument(
        "--max-connections-per-host",
        type=count_or_none,
        default=netlib.server.DEFAULT_MAX_CONNECTIONS_PER_HOST,
        metavar="N",
        help="connections one peer address may hold open; 0 for no limit",
    )
    limits.add_argument(
        "--shutdown-grace",
        type=positive_float,
        default=netlib.server.DEFAULT_SHUTDOWN_GRACE,
        metavar="S",
        help="seconds connections get to finish at shutdown before they are cut off",
    )


def server_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    if cert is None and key is None:
        return None
    if cert is None:
        raise UsageError("--tls-key needs --tls-cert")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(
            f"cannot load the TLS certificate {cert!r}: {error_reason(exc)}"
        ) from None
    return context


def client_tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.tls or args.cacert or args.insecure):
        return None
    try:
        context = ssl.create_default_context(cafile=args.cacert)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load --cacert {args.cacert!r}: {error_reason(exc)}") from None
    if args.insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def error_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# -- logging and output -----------------------------------------------------------------------


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at the time (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(verbose: int, quiet: bool, *, server: bool, worker: int = 0) -> None:
    """Logs go to stderr. Servers narrate at INFO (connections cut off by a limit, chat
    joins and quits); clients log only warnings, since their errors end the command with
    one line of their own. ``-q`` keeps warnings and errors; ``-v`` shows netlib's DEBUG
    lines, ``-vv`` asyncio's too. A worker of ``--workers`` (``worker`` > 0) says which
    one it is on each line. Calling it again replaces the previous setup."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    tag = f"[worker {worker}] " if worker else ""
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {tag}%(name)s %(levelname)s %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)
    default = logging.INFO if server else logging.WARNING
    level = logging.WARNING if quiet else logging.DEBUG if verbose else default
    logging.getLogger("netlib").setLevel(level)


def in_group(args: argparse.Namespace) -> bool:
    """Whether this process is one worker of a ``--workers N`` group (``cli/_workers.py``):
    it binds with SO_REUSEPORT, reports to its supervisor in JSON lines and leaves the
    statistics interval and the "stopping" line to it."""
    return bool(getattr(args, "worker_index", 0))


def rudp_core() -> tuple[str, str]:
    """How this process runs the reliable-UDP core, for a server's listening line: its
    label there (``rudp, compiled core`` or ``rudp, Python core``) and ``core_kind()`` for
    ``--json``. Bulk transfers run slower on the Python core (docs/reliable-udp.md, "The
    compiled core")."""
    from netlib.sansio.reliable import COMPILED, core_kind

    return ("rudp, compiled core" if COMPILED else "rudp, Python core"), core_kind()


def emit(args: argparse.Namespace, text: str, **fields: Any) -> None:
    """Print one result: ``text``, or with ``--json`` the fields as one JSON object (a
    worker of a group sends its supervisor both: the fields and ``text``)."""
    if in_group(args):
        print(json.dumps({**fields, "text": text}, default=str), flush=True)
    elif getattr(args, "json", False):
        print(json.dumps(fields, default=str), flush=True)
    else:
        print(text, flush=True)


def flatten(stats: Any, prefix: str = "") -> dict[str, Any]:
    """A statistics dataclass as flat ``name: value`` pairs (nested ones dotted)."""
    flat: dict[str, Any] = {}
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        if dataclasses.is_dataclass(value):
            flat.update(flatten(value, f"{prefix}{field.name}."))
        else:
            flat[f"{prefix}{field.name}"] = value
    return flat


def statistics_text(flat: dict[str, Any]) -> str:
    """The counters that are not zero, as ``name=value`` pairs (a float to 6 significant
    digits: a round trip in seconds, ``min_rtt=0.000217669``)."""
    return " ".join(
        f"{key}={value:.6g}" if type(value) is float else f"{key}={value}"
        for key, value in flat.items()
        if value
    )


def show_statistics(args: argparse.Namespace, name: str, stats: Any) -> None:
    """One statistics line: the counters that are not zero (all of them with ``--json``)."""
    flat = flatten(stats)
    shown = statistics_text(flat) or "nothing happened"
    emit(args, f"{name} statistics: {shown}", event="statistics", **flat)


async def serve_until_stopped(
    args: argparse.Namespace,
    signals: Signals,
    name: str,
    statistics: Callable[[], Any],
    *,
    open_connections: Callable[[], int] = lambda: 0,
    grace: float = 0.0,
) -> None:
    """Wait for the first SIGINT or SIGTERM, printing ``statistics()`` on SIGUSR1 and every
    ``--stats-interval`` seconds meanwhile; then tell the person at the terminal that the
    server stops, what its shutdown waits for (``open_connections()`` within ``grace``)
    and how to cut it short. The caller shows the last statistics line itself, once its
    server has shut down."""

    def report() -> None:
        show_statistics(args, name, statistics())

    async def every(interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            report()

    signals.on_report(report)
    worker = in_group(args)  # its supervisor keeps the interval and says it stops
    interval = None if worker else args.stats_interval
    ticker = None if interval is None else asyncio.create_task(every(interval))
    try:
        await signals.stopped()
    finally:
        if ticker is not None:
            ticker.cancel()
    if worker:
        return
    active = open_connections()
    waits = (
        f": waiting up to {grace:g}s for {active} connection(s) to finish; press Ctrl-C "
        "again to close them now"
        if active
        else ""
    )
    start = "\n" if sys.stderr.isatty() else ""  # past the ^C the terminal echoed
    print(f"{start}netlib: stopping{waits}", file=sys.stderr, flush=True)


# -- signals and running ---------------------------------------------------------------------


class Signals:
    """SIGINT and SIGTERM for a command: the first stops it, a second forces it.

    A server awaits ``stopped()`` and then shuts down gracefully; ``on_force`` callbacks
    (closing every connection at once) run on the second signal. A client is cancelled on
    the first signal. SIGUSR1 runs the ``on_report`` callbacks (statistics on request).

    A supervisor (``--workers``) asks the same of its workers with ``stop()``, ``force()``
    and ``report()``. Those are not signals: a worker that got a stop from both (Ctrl-C
    reaches the whole process group, and the supervisor passes the stop on) stops
    gracefully; only a second *signal*, or ``force()``, closes its connections at once.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._signals = 0  # SIGINT and SIGTERM received
        self._stop = asyncio.Event()
        self._force: list[Callable[[], object]] = []
        self._report: list[Callable[[], object]] = []
        self._task: asyncio.Task[Any] | None = None
        self._cancel_task = False

    def install(self, *, cancel_task: bool) -> None:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._cancel_task = cancel_task
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal, signum)
        loop.add_signal_handler(signal.SIGUSR1, self.report)
        logger.debug("signal handlers ready")

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            loop.remove_signal_handler(signum)

    def on_force(self, callback: Callable[[], object]) -> None:
        self._force.append(callback)

    def on_report(self, callback: Callable[[], object]) -> None:
        self._report.append(callback)

    async def stopped(self) -> None:
        await self._stop.wait()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Stop as a first signal does (nothing if stopping already)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._cancel_task and self._task is not None:
            self._task.cancel()

    def force(self) -> None:
        """Stop now, as a second signal does: close what is left (or stop waiting, if
        nothing can)."""
        self.stop()
        logger.info("closing the remaining connections now")
        for callback in self._force:
            callback()
        if not self._force and self._task is not None:
            self._task.cancel()

    def report(self) -> None:
        for callback in self._report:
            callback()

    def _on_signal(self, signum: int) -> None:
        self.received = signum
        self._signals += 1
        if self._signals > 1:
            self.force()
        else:
            self.stop()


Command = Callable[[argparse.Namespace, Signals], Coroutine[Any, Any, int]]


def run_command(command: Command, args: argparse.Namespace, *, server: bool) -> int:
    """Run one command on the chosen loop and turn what happens into an exit status."""
    try:
        netlib.loop_factory(args.loop)
    except ValueError as exc:  # --loop uvloop where uvloop is not installed; NETLIB_LOOP
        raise UsageError(str(exc)) from None
    signals = Signals()

    async def main() -> int:
        signals.install(cancel_task=not server)
        try:
            return await command(args, signals)
        finally:
            signals.remove()

    try:
        return netlib.run(main(), loop=args.loop)
    except (KeyboardInterrupt, asyncio.CancelledError, SystemExit) as exc:
        if isinstance(exc, SystemExit) and signals.received is None:
            raise
        if server:
            return 0
        return 128 + (signals.received or signal.SIGINT)
    except socket.gaierror as exc:
        names = " or ".join(repr(name) for name in host_names(args)) or "a name"
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise UsageError(f"cannot resolve host {names}: {exc.strerror}") from None
        return fail(f"cannot resolve host {names} now: {exc.strerror}")
    except ssl.SSLError as exc:
        return fail(f"TLS with {where(args) or 'the peer'} failed: {error_reason(exc)}")
    except (OSError, netlib.NetlibError) as exc:
        return fail(describe(exc, args))


def host_names(args: argparse.Namespace) -> list[str]:
    """The host names a command was given (``--host``; a proxy's ``--listen`` and
    ``--target``), leaving out IP addresses, which need no resolver."""
    given = [getattr(args, "host", None)]
    given += [
        address[0]
        for address in (getattr(args, "listen", None), getattr(args, "target", None))
        if address
    ]
    names: list[str] = []
    for name in given:
        if not name or name in names:
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            names.append(name)
    return names


def where(args: argparse.Namespace) -> str:
    """The address a command talks to, for its error lines ("" if it has none)."""
    if getattr(args, "unix", None):
        return str(args.unix)
    if not hasattr(args, "host") or not hasattr(args, "port"):
        return ""
    host = args.host if args.host is not None else "*"
    return format_address((host, args.port))


def describe(exc: BaseException, args: argparse.Namespace) -> str:
    """One line for a network failure."""
    peer = where(args)
    if not peer:  # the error names its address itself (a bind failure, say)
        return (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
    udp = getattr(args, "proto", "tcp") == "udp"
    match exc:
        case ConnectionRefusedError() if udp:
            return f"nothing listens on {peer} (udp port unreachable)"
        case ConnectionRefusedError():
            return f"connection refused by {peer}"
        case FileNotFoundError() if getattr(args, "unix", None):
            return f"no socket at {peer}"
        case netlib.PeerTimedOut() if udp:
            return f"no reply from {peer} after {args.retries + 1} attempts of {args.timeout}s"
        case netlib.PeerTimedOut() | TimeoutError():
            return f"{peer}: {exc or 'timed out'}"
        case netlib.EndOfStream():
            return f"{peer} closed the connection"
        case OSError() if exc.strerror and peer in exc.strerror:
            return exc.strerror  # it names the address itself ("cannot bind ...")
        case OSError() if exc.strerror:
            return f"{peer}: {exc.strerror}"
    return f"{peer}: {exc}"


def fail(message: str) -> int:
    print(f"netlib: error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    """A usage error found after parsing: one line, and where help is."""
    command = " ".join(
        filter(None, (getattr(args, "command", None), getattr(args, "action", None)))
    )
    print(f"netlib: error: {message}", file=sys.stderr)
    print(f"(netlib {command} --help shows the options)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)
