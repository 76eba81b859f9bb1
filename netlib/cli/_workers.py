"""``--workers N``: one TCP port served by N processes, and the supervisor that runs them.

How it works (the reasons are in ``docs/design.md``, "Workers"):

* The supervisor, the process the user started, serves nothing itself. It resolves
  ``--host``, checks that no program listens on the port, and reserves the port: one
  socket per address, bound with SO_REUSEPORT and never listening, so the kernel hands it
  no connection, while other programs cannot take the port, even while every worker is
  being restarted (``_reservation`` says when they can). With ``--port 0`` this is where
  the one port all workers share is picked.
* Each worker is ``python -m netlib`` with the same command line plus ``--worker-index I
  --port P``: the same server a single process runs, bound with SO_REUSEPORT, so the
  kernel spreads new connections over the workers' listening sockets (by a hash of the
  connection's addresses and ports).
* The two talk over pipes. A worker prints its results (the listening line, statistics)
  to its stdout as JSON lines, which the supervisor reads; the supervisor writes commands
  (``stop``, ``force``, ``stats``) to the worker's stdin. A worker whose stdin ends (its
  supervisor is gone, even killed by SIGKILL) stops gracefully by itself. A worker's
  stderr is the supervisor's: its log lines say which worker wrote them.
* Workers start one, then the others: a configuration error (a certificate that cannot
  be read) is reported once, by the first, and the command exits with its status. The
  listening line is printed once every worker listens.
* A worker that exits while the group serves is restarted after ``RESTART_DELAY`` seconds,
  doubled for each restart in the last ``RESTART_WINDOW`` seconds (at most
  ``RESTART_DELAY_MAX``); a restart beyond ``RESTART_LIMIT`` within the window is not
  done: the group stops and the command exits 1. Every restart is logged and counted.
* SIGINT or SIGTERM: the supervisor sends each worker ``stop`` (each shuts down gracefully,
  as a single server does) and waits; a second signal sends ``force``. Ctrl-C on a
  terminal reaches the workers too (they share the process group): a worker counts the
  signals it got itself, and the supervisor's ``stop`` does not count as a second one, so
  one Ctrl-C stops everything gracefully and a second closes the connections at once.
* SIGUSR1 and ``--stats-interval``: the supervisor asks every worker for its statistics
  and prints their sum and each worker's own counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from netlib.aio.sockets import bind
from netlib.cli._common import (
    STOP_HINT,
    Command,
    Signals,
    UsageError,
    emit,
    fail,
    in_group,
    statistics_text,
)

__all__ = [
    "CONTROL_LINE_MAX",
    "FORCE_TIMEOUT",
    "MAX_WORKERS",
    "READY_TIMEOUT",
    "REPORT_LINE_MAX",
    "RESTART_DELAY",
    "RESTART_DELAY_MAX",
    "RESTART_LIMIT",
    "RESTART_WINDOW",
    "STATS_TIMEOUT",
    "STOP_MARGIN",
    "RestartBudget",
    "add_workers",
    "reserve_port",
    "workers_type",
]

logger = logging.getLogger("netlib.workers")

MAX_WORKERS: Final = 256
"""Most worker processes ``--workers`` starts."""
RESTART_LIMIT: Final = 10
"""Restarts allowed within ``RESTART_WINDOW`` seconds, all workers together: a worker that
must be restarted once more than this stops the group (exit status 1), since a crash loop
is a fault to fix, not to hide."""
RESTART_WINDOW: Final = 60.0
"""Seconds over which restarts are counted against ``RESTART_LIMIT``."""
RESTART_DELAY: Final = 0.1
"""Seconds before a worker is restarted when no other restart happened in the window;
doubled for each one that did."""
RESTART_DELAY_MAX: Final = 10.0
"""Longest wait before a restart."""
READY_TIMEOUT: Final = 30.0
"""Seconds a starting worker has to listen; one that does not is killed (a failure)."""
STATS_TIMEOUT: Final = 2.0
"""Seconds the supervisor waits for each worker's statistics; a worker that does not
answer in time is shown as such."""
STOP_MARGIN: Final = 5.0
"""Seconds beyond its shutdown grace a stopping worker gets before it is told to close
its connections at once (``force``)."""
FORCE_TIMEOUT: Final = 3.0
"""Seconds a worker told to ``force`` gets to exit before it is killed (SIGKILL)."""
REPORT_LINE_MAX: Final = 1024 * 1024
"""Longest line a worker may print to its supervisor; a longer one is dropped."""
CONTROL_LINE_MAX: Final = 1024
"""Longest command line a worker keeps from its supervisor; a longer one is dropped."""
PORT_ATTEMPTS: Final = 10
"""Free ports tried for ``--port 0`` with several addresses (``--host '*'``) before giving up:
the port picked for the first address can be taken on another one."""
DEFAULT_STOP_GRACE: Final = 10.0
"""The shutdown grace assumed for a command without ``--shutdown-grace`` (chat)."""


def workers_type(value: str) -> int:
    """``--workers``: a count 1..MAX_WORKERS, or ``auto`` / ``0``: one per CPU this process
    may run on."""
    if value.strip().lower() in ("auto", "0"):
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    try:
        count = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid worker count {value!r}: a number or auto"
        ) from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f"invalid worker count {count}: must be 1..{MAX_WORKERS}, or auto (0)"
        )
    return count


def add_workers(
    parser: argparse.ArgumentParser,
    command: Command,
    *,
    name: str,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> None:
    """Give a TCP server command ``--workers N``, and make ``command`` its ``run``.

    ``name`` is the name its statistics lines carry (``tcp echo``); ``check(args)`` raises
    ``UsageError`` when the options given cannot be served by several processes.
    """
    group = parser.add_argument_group("workers (tcp, Linux)")
    group.add_argument(
        "--workers",
        type=workers_type,
        default=1,
        metavar="N",
        help="processes serving the port (SO_REUSEPORT): 1 serves in this process; N > 1 "
        "starts N workers and restarts any that dies; auto or 0: one per CPU",
    )
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)

    async def run(args: argparse.Namespace, signals: Signals) -> int:
        if in_group(args):
            with _following_supervisor(signals):
                return await command(args, signals)
        if args.workers > 1:
            if not sys.platform.startswith("linux"):
                raise UsageError("--workers needs Linux, where SO_REUSEPORT spreads connections")
            if check is not None:
                check(args)
            return await _Supervisor(args, signals, name).run()
        return await command(args, signals)

    parser.set_defaults(run=run)


# -- the worker's side ------------------------------------------------------------------------


@contextlib.contextmanager
def _following_supervisor(signals: Signals) -> Iterator[None]:
    """Obey the supervisor's commands on stdin (``stop``, ``force``, ``stats``); stop when
    stdin ends (the supervisor is gone), with stdout sent nowhere from then on."""
    loop = asyncio.get_running_loop()
    fd = sys.stdin.fileno()
    pending = bytearray()
    commands: dict[bytes, Callable[[], None]] = {
        b"stop": signals.stop,
        b"force": signals.force,
        b"stats": signals.report,
    }

    def on_readable() -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            logger.info("the supervisor is gone: stopping")
            _stdout_to_devnull()
            signals.stop()
            return
        pending.extend(data)
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end]).strip()
            del pending[: end + 1]
            action = commands.get(line)
            if action is None:
                logger.debug("unknown command from the supervisor: %r", line[:40])
            else:
                action()
        if len(pending) > CONTROL_LINE_MAX:
            pending.clear()

    os.set_blocking(fd, False)
    loop.add_reader(fd, on_readable)
    try:
        yield
    finally:
        loop.remove_reader(fd)


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


# -- the port ---------------------------------------------------------------------------------


async def reserve_port(host: str | None, port: int) -> list[socket.socket]:
    """Reserve ``port`` on every address ``host`` resolves to, for a group of workers.

    Each address is first bound without SO_REUSEPORT (which fails if a program listens
    there: no group joins another program's), then by a socket with SO_REUSEPORT that
    never listens, which holds the port for the workers and receives no connection (see
    ``_reservation``). With port 0 the first address picks a free port and the others
    take the same.

    Raises:
        OSError: the port is in use (``cannot bind ...``), or resolution failed.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    addresses: list[tuple[int, Any]] = list(
        dict.fromkeys((int(info[0]), info[4]) for info in infos)
    )
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return _reserve(addresses, port)
        except OSError as exc:
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == PORT_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _reserve(addresses: list[tuple[int, Any]], port: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for family, address in addresses:
            with _tcp_socket(family, reuse_address=True, reuse_port=False) as probe:
                bind(probe, (address[0], port, *address[2:]))
                port = probe.getsockname()[1]
            socks.append(_reservation(family, (address[0], port, *address[2:])))
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks


def _reservation(family: int, address: Any) -> socket.socket:
    """A socket bound to ``address`` with SO_REUSEPORT, not listening. Without
    SO_REUSEADDR if it can: then no other program can bind the port at all, even one
    with SO_REUSEADDR while no worker listens. Connections of an earlier server in
    TIME_WAIT on the port prevent that; the reservation then has SO_REUSEADDR too."""
    sock = _tcp_socket(family, reuse_address=False, reuse_port=True)
    try:
        sock.bind(address)
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
    sock = _tcp_socket(family, reuse_address=True, reuse_port=True)
    try:
        bind(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _tcp_socket(family: int, *, reuse_address: bool, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


# -- restarts ---------------------------------------------------------------------------------


class RestartBudget:
    """When to restart a worker, and when to give up (sans I/O: ``now`` is passed in).

    A restart waits ``first`` seconds, doubled for each restart in the last ``window``
    seconds (at most ``longest``); once ``limit`` restarts happened within the window,
    ``restart()`` returns None: give up.
    """

    def __init__(
        self,
        limit: int | None = None,
        window: float | None = None,
        first: float = RESTART_DELAY,
        longest: float = RESTART_DELAY_MAX,
    ) -> None:
        self.limit = RESTART_LIMIT if limit is None else limit
        self.window = RESTART_WINDOW if window is None else window
        self.first, self.longest = first, longest
        self.total = 0
        self._recent: deque[float] = deque()

    def recent(self, now: float) -> int:
        """Restarts within the window before ``now``."""
        while self._recent and self._recent[0] <= now - self.window:
            self._recent.popleft()
        return len(self._recent)

    def restart(self, now: float) -> float | None:
        """Count a restart at ``now`` and return its delay; None when over the limit."""
        recent = self.recent(now)
        if recent >= self.limit:
            return None
        self._recent.append(now)
        self.total += 1
        return float(min(self.longest, self.first * 2**recent))


# -- the supervisor ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    exited: asyncio.Task[int]
    listening: asyncio.Future[dict[str, Any]]
    statistics: dict[str, Any] | None = None  # the last it printed
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def send(self, command: str) -> None:
        """Write a command to the worker's stdin (nothing if it is gone)."""
        stdin = self.process.stdin
        if stdin is None or self.exited.done():
            return
        with contextlib.suppress(OSError, RuntimeError):
            stdin.write(command.encode() + b"\n")

    def describe(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    def ending(self) -> str:
        status = self.exited.result()
        if status < 0:
            try:
                return f"was killed by {signal.Signals(-status).name}"
            except ValueError:
                return f"was killed by signal {-status}"
        return f"exited with status {status}"


class _Supervisor:
    def __init__(self, args: argparse.Namespace, signals: Signals, name: str) -> None:
        self._args = args
        self._signals = signals
        self._name = name
        self._loop = asyncio.get_running_loop()
        self._workers: dict[int, _Worker] = {}  # index -> the worker serving (or starting)
        self._restarting: set[asyncio.Task[None]] = set()
        self._budget = RestartBudget()
        self._gave_up: str | None = None
        self._forced = asyncio.Event()
        self._port = 0
        self._tasks: set[asyncio.Task[Any]] = set()  # reports in progress, the ticker
        self._stop: asyncio.Task[None] | None = None

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> int:
        args = self._args
        argv = getattr(args, "argv", None)
        if argv is None:
            raise UsageError("--workers needs the command line (run through netlib.cli.main)")
        socks = await reserve_port(args.host, args.port)
        self._port = socks[0].getsockname()[1]
        self._stop = asyncio.ensure_future(self._signals.stopped())
        self._signals.on_force(self._force)
        try:
            status = await self._start()
            if status is not None:
                return status
            return await self._serve()
        finally:
            for task in (self._stop, *self._tasks, *self._restarting):
                task.cancel()
            await self._kill(list(self._workers.values()))
            for sock in socks:
                sock.close()

    async def _start(self) -> int | None:
        """Start every worker, the first alone; None once all listen, else the exit
        status (a worker failed to start, or a signal came first)."""
        first = await self._spawn(1)
        started = [first]
        if await self._ready(first):
            started += [await self._spawn(index) for index in range(2, self._args.workers + 1)]
            ready = await asyncio.gather(*(self._ready(w) for w in started[1:]))
            if all(ready):
                self._announce()
                return None
        failed = [w for w in started if w.exited.done()]
        await self._stop_all(quiet=True)
        if self._signals.stopping and not failed:
            return 0
        status = failed[0].exited.result() if failed else 1
        if status in (1, 2):  # the worker said why, in its one error line
            return status
        return fail(f"{failed[0].describe()} {failed[0].ending()} before it listened")

    async def _serve(self) -> int:
        """Supervise until a signal (or too many restarts); then stop every worker."""
        assert self._stop is not None
        ticker = None
        if (interval := self._args.stats_interval) is not None:
            ticker = self._keep(self._every(interval))
        self._signals.on_report(lambda: self._keep(self._report()))
        while not self._signals.stopping and self._gave_up is None:
            watched: set[asyncio.Future[Any]] = {self._stop, *self._restarting}
            watched |= {w.exited for w in self._workers.values() if w.listening.done()}
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for w in list(self._workers.values()):
                if w.listening.done() and w.exited.done():
                    self._lost(w)
        if ticker is not None:
            ticker.cancel()
        if self._gave_up is None:
            print(self._stopping_line(), file=sys.stderr, flush=True)
        stopped_cleanly = await self._stop_all()
        if self._gave_up is not None:
            return fail(self._gave_up)
        return 0 if stopped_cleanly else fail("not every worker stopped cleanly (see above)")

    def _lost(self, w: _Worker) -> None:
        """A serving worker ended: restart it later, or give up."""
        del self._workers[w.index]
        delay = self._budget.restart(time.monotonic())
        if delay is None:
            self._give_up(f"{w.describe()} {w.ending()}")
            return
        logger.warning(
            "%s %s; restarting it in %gs (restart %d in the last %gs; the limit is %d)",
            w.describe(),
            w.ending(),
            delay,
            self._budget.recent(time.monotonic()),
            self._budget.window,
            self._budget.limit,
        )
        task = asyncio.ensure_future(self._restart(w.index, delay))
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    def _give_up(self, why: str) -> None:
        self._gave_up = (
            f"{why}: that is more than {self._budget.limit} restart(s) within "
            f"{self._budget.window:g}s; stopping every worker"
        )
        logger.warning("too many restarts: stopping every worker")  # the reason comes last
        self._signals.stop()  # as a signal would: restarts in wait end, the rest stop

    async def _restart(self, index: int, delay: float) -> None:
        assert self._stop is not None
        while True:
            await asyncio.wait({self._stop}, timeout=delay)
            if self._signals.stopping:
                return
            try:
                w = await self._spawn(index)
            except OSError as exc:  # no process could be made (EAGAIN, ENOMEM, EMFILE)
                why = f"worker {index} could not be started: {exc}"
            else:
                if await self._ready(w):
                    logger.info("worker %d restarted: pid %d", index, w.pid)
                    return
                if self._signals.stopping:
                    return
                del self._workers[index]
                why = f"{w.describe()} {w.ending()} before it listened"
            next_delay = self._budget.restart(time.monotonic())
            if next_delay is None:
                self._give_up(why)
                return
            logger.warning("%s; restarting it in %gs", why, next_delay)
            delay = next_delay

    # -- workers ------------------------------------------------------------------------------

    def _command_line(self, index: int) -> list[str]:
        """The worker's command line: the user's, with its index and the port."""
        argv = list(self._args.argv)
        extra = ["--worker-index", str(index), "--port", str(self._port)]
        at = argv.index("--") if "--" in argv else len(argv)
        return [sys.executable, "-m", "netlib", *argv[:at], *extra, *argv[at:]]

    async def _spawn(self, index: int) -> _Worker:
        process = await asyncio.create_subprocess_exec(
            *self._command_line(index),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=REPORT_LINE_MAX,
        )
        w = _Worker(
            index,
            process,
            exited=asyncio.ensure_future(process.wait()),
            listening=self._loop.create_future(),
        )
        w.reader = self._keep(self._read(w))
        self._workers[index] = w
        logger.debug("worker %d started: pid %d", index, w.pid)
        return w

    async def _read(self, w: _Worker) -> None:
        """Take in what a worker prints: its listening line and its statistics."""
        stdout = w.process.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except ValueError:  # longer than REPORT_LINE_MAX: dropped
                logger.warning("%s printed a line too long to read: dropped", w.describe())
                continue
            if not line:
                return
            try:
                message = json.loads(line)
            except ValueError:
                logger.debug("%s printed %r", w.describe(), line[:200])
                continue
            if not isinstance(message, dict):
                continue
            event = message.get("event")
            if event == "listening" and not w.listening.done():
                w.listening.set_result(message)
            elif event == "statistics":
                w.statistics = message
                for waiter in w.waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                w.waiters.clear()

    async def _ready(self, w: _Worker) -> bool:
        """Wait until ``w`` listens (True), or ends, or a signal comes, or
        ``READY_TIMEOUT`` passes (then it is killed)."""
        assert self._stop is not None
        watched: set[asyncio.Future[Any]] = {w.listening, w.exited, self._stop}
        await asyncio.wait(
            watched,
            timeout=READY_TIMEOUT,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if w.listening.done():
            return True
        if not w.exited.done() and not self._signals.stopping:
            logger.error("%s did not listen within %gs: killed", w.describe(), READY_TIMEOUT)
            await self._kill([w])
        return False

    async def _stop_all(self, *, quiet: bool = False) -> bool:
        """Stop every worker gracefully (``force`` after a second signal, or when one
        outlives its grace); True if each exited 0 by itself."""
        if self._restarting:
            await asyncio.wait(self._restarting)  # each returns at once when stopping
        workers = list(self._workers.values())
        for w in workers:
            w.send("stop")
        grace = getattr(self._args, "shutdown_grace", None) or DEFAULT_STOP_GRACE
        left = await self._exits(workers, grace + STOP_MARGIN, until_forced=True)
        if left:
            if not self._forced.is_set():
                logger.error(
                    "%d worker(s) still running %gs after the stop: closing their connections now",
                    len(left),
                    grace + STOP_MARGIN,
                )
                for w in left:
                    w.send("force")
            left = await self._exits(left, FORCE_TIMEOUT)
        clean = not left
        if left:
            for w in left:
                logger.error("%s did not stop: killed", w.describe())
            await self._kill(left)
        readers = [w.reader for w in workers if w.reader is not None]
        if readers:
            await asyncio.wait(readers, timeout=STATS_TIMEOUT)
        for w in workers:
            if w.exited.result() != 0:
                clean = False
                if not quiet and w.exited.result() > 0:
                    logger.error("%s %s", w.describe(), w.ending())
        if not quiet:
            self._show([(w, w.statistics) for w in sorted(workers, key=lambda w: w.index)])
        self._workers.clear()
        return clean

    async def _exits(
        self, workers: list[_Worker], within: float, *, until_forced: bool = False
    ) -> list[_Worker]:
        """Wait up to ``within`` seconds for ``workers`` to exit (or until a second
        signal, with ``until_forced``); return those still running."""
        deadline = self._loop.time() + within
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            while left := [w for w in workers if not w.exited.done()]:
                remaining = deadline - self._loop.time()
                if remaining <= 0 or (until_forced and forced.done()):
                    return left
                watched: set[asyncio.Future[Any]] = {w.exited for w in left}
                if until_forced:
                    watched.add(forced)
                await asyncio.wait(watched, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            return []
        finally:
            forced.cancel()

    async def _kill(self, workers: list[_Worker]) -> None:
        running = [w for w in workers if not w.exited.done()]
        for w in running:
            with contextlib.suppress(ProcessLookupError):
                w.process.kill()
        if running:
            await asyncio.wait([w.exited for w in running])

    def _force(self) -> None:
        """A second signal: every worker closes its connections now."""
        self._forced.set()
        for w in self._workers.values():
            w.send("force")

    # -- what the user sees --------------------------------------------------------------------

    def _stopping_line(self) -> str:
        count = len(self._workers)
        grace = getattr(self._args, "shutdown_grace", None)
        within = f" within {grace:g}s" if grace else ""
        start = "\n" if sys.stderr.isatty() else ""  # past the ^C the terminal echoed
        return (
            f"{start}netlib: stopping {count} worker(s): each lets its connections finish"
            f"{within}; press Ctrl-C again to close them now"
        )

    def _announce(self) -> None:
        """The group's one listening line: the first worker's, saying how many serve."""
        fields = dict(self._workers[1].listening.result())
        text = str(fields.pop("text", ""))
        fields.pop("event", None)
        workers = sorted(self._workers.values(), key=lambda w: w.index)
        served = f" by {len(workers)} worker processes"
        if text.endswith(STOP_HINT):
            text = text.removesuffix(STOP_HINT) + served + STOP_HINT
        else:
            text += served
        emit(
            self._args,
            text,
            event="listening",
            **fields,
            workers=[{"worker": w.index, "pid": w.pid} for w in workers],
        )

    def _keep(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in a task that is cancelled if still running at the end."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self._report()

    async def _report(self) -> None:
        """Ask every serving worker for its statistics; print them when all answered, or
        after ``STATS_TIMEOUT``."""
        serving = [w for w in self._workers.values() if w.listening.done()]
        workers = sorted(serving, key=lambda w: w.index)  # not those (re)starting
        waiting = []
        for w in workers:
            waiter: asyncio.Future[None] = self._loop.create_future()
            w.waiters.append(waiter)
            waiting.append(waiter)
            w.send("stats")
        if waiting:
            await asyncio.wait(waiting, timeout=STATS_TIMEOUT)
        answered = [waiter.done() for waiter in waiting]
        self._show(
            [(w, w.statistics if ok else None) for w, ok in zip(workers, answered, strict=True)]
        )

    def _show(self, answers: list[tuple[_Worker, dict[str, Any] | None]]) -> None:
        """One statistics line for the group (each counter summed over the workers), then
        one per worker; with ``--json`` one object, with ``workers`` and ``restarts``."""
        total: dict[str, Any] = {}
        each: list[dict[str, Any]] = []
        for w, message in answers:
            if message is None:
                each.append({"worker": w.index, "pid": w.pid, "answered": False})
                continue
            counters = {k: v for k, v in message.items() if k not in ("event", "text")}
            each.append({"worker": w.index, "pid": w.pid, **counters})
            for key, value in counters.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
                else:
                    total.setdefault(key, value)
        restarts = self._budget.total
        shown = statistics_text(total) or "nothing happened"
        summary = (
            f"{self._name} statistics: {shown} ({len(answers)} workers, "
            f"{restarts} restart{'' if restarts == 1 else 's'})"
        )
        if getattr(self._args, "json", False):
            emit(self._args, summary, event="statistics", **total, workers=each, restarts=restarts)
            return
        lines = [summary]
        for entry in each:
            counters = {k: v for k, v in entry.items() if k not in ("worker", "pid")}
            text = (
                "did not answer"
                if counters.get("answered") is False
                else statistics_text(counters) or "nothing happened"
            )
            lines.append(f"  worker {entry['worker']} (pid {entry['pid']}): {text}")
        print("\n".join(lines), flush=True)
