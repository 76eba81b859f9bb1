"""``netlib files serve``, ``netlib files get`` and ``netlib files ls``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import ssl
import sys
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import netlib
from netlib.cli._common import (
    STOP_HINT,
    Signals,
    UsageError,
    add_command,
    add_reporting,
    add_server_limits,
    add_tls_client,
    add_tls_server,
    client_tls,
    emit,
    error_reason,
    fail,
    format_address,
    host_type,
    in_group,
    port_type,
    positive_float,
    serve_until_stopped,
    server_tls,
    show_statistics,
)
from netlib.cli._workers import add_workers

__all__ = ["DEFAULT_FILES_PORT", "ProgressBar", "add_files"]

DEFAULT_FILES_PORT: Final = 8000
"""The file server's port from the command line (the one Python's http.server uses)."""

SERVE_EXAMPLES = """\
examples:
  netlib files serve .                       # this directory on http://127.0.0.1:8000/
  netlib files serve /srv/files --host '*' --port 8080
  netlib files serve . --tls-cert cert.pem --tls-key key.pem   # https://
  curl -C - -O http://127.0.0.1:8000/big.iso # any HTTP client works, resuming too
  netlib files serve . --workers auto        # one process per CPU on one port (Linux)
"""
GET_EXAMPLES = """\
examples:
  netlib files get big.iso                   # from 127.0.0.1:8000, saved as ./big.iso
  netlib files get http://example.org:8080/a/b.tar -o /tmp/b.tar
  netlib files get big.iso --json            # one JSON summary line
  netlib files get https://127.0.0.1:8000/big.iso --cacert ca.pem

An interrupted download stays in PATH.part: the same command continues it if the file is
unchanged on the server, and fetches it whole (and says so) if it changed.
"""
LS_EXAMPLES = """\
examples:
  netlib files ls                            # the root of 127.0.0.1:8000
  netlib files ls sub/ --json                # one JSON object per entry
"""


def add_files(commands: Any, common: argparse.ArgumentParser) -> None:
    files = add_command(
        commands,
        "files",
        common,
        help="file server and client (HTTP/1.1)",
        description="An HTTP/1.1 file server (curl, wget and browsers are clients too) and "
        "a client that resumes and verifies downloads.",
    )
    actions = files.add_subparsers(dest="action", required=True, metavar="ACTION")
    serve = add_command(
        actions,
        "serve",
        common,
        help="serve a directory until interrupted",
        description="Serve the files below ROOT over HTTP/1.1 until Ctrl-C or SIGTERM, then "
        "shut down gracefully and print the statistics. Nothing outside ROOT is served: "
        "symbolic links are not followed; hidden names, FIFOs and devices are refused.",
        epilog=SERVE_EXAMPLES,
    )
    serve.add_argument("root", metavar="ROOT", help="the directory to serve")
    _add_address(serve)
    add_server_limits(serve)
    add_reporting(serve)
    add_tls_server(serve)
    add_workers(serve, files_serve, name="files", check=lambda args: _check_root(args.root))
    serve.set_defaults(server=True)

    get = add_command(
        actions,
        "get",
        common,
        help="download a file (resumes an interrupted download)",
        description="Download URL, or NAME from the server at --host/--port, to PATH (default "
        "the file's name here) through PATH.part, verified against the server's SHA-256 "
        "when it sends one. Works with any HTTP/1.1 server, over TLS too (https://).",
        epilog=GET_EXAMPLES,
    )
    get.add_argument("target", metavar="URL-or-NAME", help="an http:// URL or a file's name")
    _add_address(get)
    get.add_argument("-o", "--output", metavar="PATH", help="where to save the file")
    get.add_argument(
        "--no-resume", action="store_true", help="fetch the whole file even if PATH.part exists"
    )
    get.add_argument(
        "--timeout",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="seconds to wait for the server's next bytes",
    )
    get.add_argument("--json", action="store_true", help="one JSON summary line")
    add_tls_client(get)
    get.set_defaults(run=files_get, server=False)

    ls = add_command(
        actions,
        "ls",
        common,
        help="list a directory of a netlib file server",
        description="List the directory at URL, or at PATH on the server at --host/--port.",
        epilog=LS_EXAMPLES,
    )
    ls.add_argument(
        "target", nargs="?", default="", metavar="URL-or-PATH", help="default: the root"
    )
    _add_address(ls)
    ls.add_argument("--json", action="store_true", help="one JSON object per entry")
    add_tls_client(ls)
    ls.set_defaults(run=files_ls, server=False)


def _add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        type=host_type,
        default="127.0.0.1",
        help="address or name ('*': every interface, for serve)",
    )
    parser.add_argument("--port", type=port_type, default=DEFAULT_FILES_PORT, help="port")


# -- serve ------------------------------------------------------------------------------------


@dataclass
class _Statistics:
    files: netlib.FileServiceStatistics
    tcp: netlib.ServerStatistics


def _check_root(root: str) -> None:
    if not os.path.isdir(root):
        raise UsageError(f"cannot serve {root!r}: not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise UsageError(f"cannot serve {root!r}: permission denied")


async def files_serve(args: argparse.Namespace, signals: Signals) -> int:
    _check_root(args.root)
    async with netlib.open_file_server(
        args.root,
        args.host,
        args.port,
        max_connections=args.max_connections,
        max_connections_per_host=args.max_connections_per_host,
        shutdown_grace=args.shutdown_grace,
        reuse_port=in_group(args),
        ssl=server_tls(args),
    ) as running:
        server = running.server
        signals.on_force(server.close)
        where = [format_address(a) for a in running.addresses]
        emit(
            args,
            f"netlib file server listening on {', '.join(where)}, serving {args.root} at "
            f"{running.url}{STOP_HINT}",
            event="listening",
            addresses=where,
            root=running.service.root,
            url=running.url,
        )

        def statistics() -> _Statistics:
            return _Statistics(running.statistics(), server.statistics())

        await serve_until_stopped(
            args,
            signals,
            "files",
            statistics,
            open_connections=lambda: server.statistics().active,
            grace=args.shutdown_grace,
        )
    show_statistics(args, "files", statistics())
    return 0


# -- get --------------------------------------------------------------------------------------


def _url(args: argparse.Namespace, target: str) -> str:
    """The URL of ``target`` (a URL, or a name on --host/--port: https with a TLS option)."""
    if "://" in target and not target.startswith(("http://", "https://")):
        scheme = target.split("://", 1)[0]
        raise UsageError(f"only http:// and https:// URLs are supported, not {scheme}://")
    tls = bool(args.tls or args.cacert or args.insecure)
    if tls and target.startswith("http://"):
        raise UsageError("--tls, --cacert and --insecure are for https:// URLs")
    host = args.host if args.host is not None else "127.0.0.1"
    from netlib.files import file_url  # loaded when used: see cli/__init__

    return file_url(target, host, args.port, tls=tls)


class ProgressBar:
    """A download's progress bar on stderr (bytes, rate, ETA), when stderr is a terminal,
    colour is allowed and ``rich`` is installed (and not ``quiet``); otherwise nothing.
    ``update`` is a ``download_file`` progress callback. A ``transient`` bar disappears
    when it stops; otherwise its last state stays on the terminal."""

    def __init__(self, name: str, *, quiet: bool = False, transient: bool = True) -> None:
        self._progress: Any = None
        self._task: Any = None
        if quiet or not sys.stderr.isatty() or "NO_COLOR" in os.environ:
            return
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )
        except ImportError:
            return
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=sys.stderr),
            transient=transient,
        )
        self._task = self._progress.add_task(name, total=None)

    @property
    def shown(self) -> bool:
        """Whether a bar is drawn (a terminal, rich installed, not quiet)."""
        return self._progress is not None

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, done: int, total: int | None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total)


async def files_get(args: argparse.Namespace, _signals: Signals) -> int:
    if "://" not in args.target and args.target.endswith("/"):
        raise UsageError(f"{args.target} names a directory: {_ls_hint(args.target)}")
    url = _url(args, args.target)
    output = args.output
    if output is None:
        name = os.path.basename(urlsplit(url).path.rstrip("/"))
        if not name:
            raise UsageError(f"{url} names no file: give -o PATH")
        output = unquote(name)
    try:
        with ProgressBar(os.path.basename(output), quiet=args.json) as bar:
            result = await netlib.download_file(
                url,
                output,
                resume=not args.no_resume,
                progress=bar.update,
                read_timeout=args.timeout,
                ssl=client_tls(args),
            )
    except (netlib.NetlibError, OSError) as exc:
        return fail(_why(exc, args.target, urlsplit(url).netloc, output))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM: say what is kept for a resume
        if kept := _size(output + ".part"):
            print(
                f"netlib: interrupted: {kept} bytes kept in {output}.part;"
                " run the command again to resume",
                file=sys.stderr,
                flush=True,
            )
        raise
    rate = result.received / result.seconds if result.seconds > 0 else 0.0
    notes = []
    if result.restarted:
        notes.append("the file had changed on the server: fetched whole")
    elif result.resumed_from:
        notes.append(f"resumed at byte {result.resumed_from}")
    notes.append("SHA-256 verified" if result.verified else "no digest from the server")
    emit(
        args,
        f"saved {result.path}: {result.size} bytes, {result.received} received in "
        f"{result.seconds:.2f}s ({_human(rate)}/s); {'; '.join(notes)}",
        event="downloaded",
        url=result.url,
        path=result.path,
        size=result.size,
        received=result.received,
        resumed_from=result.resumed_from,
        restarted=result.restarted,
        sha256=result.sha256,
        verified=result.verified,
        seconds=round(result.seconds, 3),
    )
    return 0


def _why(exc: BaseException, url: str, server: str, output: str) -> str:
    """One line for a failed request of ``url`` (the URL or name as the user gave it) to
    ``server`` (host:port)."""
    match exc:
        case ssl.SSLError():
            return f"TLS with {server} failed: {error_reason(exc)}"
        case netlib.RequestRefused(status=404):
            return f"no such file: {url} (404)"
        case netlib.RequestRefused(status=301 | 308) if "://" not in url:  # netlib's server
            return f"{url} is a directory: {_ls_hint(url)}"
        case netlib.RequestRefused(status=403 | 400 | 414):
            return f"the server refused {url}: {exc.reason.split(': ', 1)[-1]} ({exc.status})"
        case netlib.RequestRefused():
            return f"{url}: the server answered {exc.status} {exc.reason}"
        case netlib.DigestMismatch():
            return f"{url}: {exc}; the download was removed"
        case netlib.PeerTimedOut():
            return f"{url}: {exc}; run the command again to resume"
        case netlib.BrokenResourceError() | ConnectionResetError():
            kept = _size(output + ".part")
            return f"connection lost after {kept} bytes of {url}; run the command again to resume"
        case ConnectionRefusedError():
            return f"connection refused by {server}"
        case netlib.ProtocolError():
            return f"{url}: {exc}"
        case OSError() if exc.filename:
            return f"cannot write {exc.filename}: {exc.strerror}"
        case OSError() if exc.strerror:
            return f"{url}: {exc.strerror}"
    return f"{url}: {exc}"


def _ls_hint(name: str) -> str:
    return f"netlib files ls {shlex.quote(name)} lists it"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _human(rate: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if rate < 1000:
            return f"{rate:.0f} {unit}" if unit == "B" else f"{rate:.1f} {unit}"
        rate /= 1000
    return f"{rate:.1f} TB"


# -- ls ---------------------------------------------------------------------------------------


async def files_ls(args: argparse.Namespace, _signals: Signals) -> int:
    url = _url(args, args.target)
    try:
        entries = await netlib.list_files(url, ssl=client_tls(args))
    except (netlib.NetlibError, OSError) as exc:
        return fail(_why(exc, args.target or "/", urlsplit(url).netloc, ""))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for entry in entries:
        directory = entry.get("type") == "directory"
        name = str(entry.get("name", "")) + ("/" if directory else "")
        size = "-" if directory else str(entry.get("size", 0))
        emit(args, f"{size:>12}  {name}", **entry)
    return 0
