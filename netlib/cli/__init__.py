"""The ``netlib`` command line (also ``python -m netlib``).

::

    netlib [--version] COMMAND ACTION [options]
    netlib echo serve|send     echo server and client (TCP lines, UDP datagrams)
    netlib chat serve|join     chat server and client (TCP, UDP)
    netlib proxy               an impairment proxy (loss, delay, ...) for any server
    netlib files serve|get|ls  file server and client (HTTP/1.1: curl and wget work too)
    netlib files serve|get|ls  HTTP/1.1 file server and a resuming, verifying client
    netlib speedtest [serve]   TCP, UDP and reliable UDP measured side by side (as iperf3)
    netlib demo                servers on loopback driven by clients, then stopped

Options common to every command (``--loop``, ``-v``, ``-q``) are accepted before or after
the command. The conventions every command follows (exit codes, stdout and stderr,
``--json``, signals) are in ``docs/cli.md`` and ``netlib.cli._common``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import netlib
from netlib.cli._common import (
    Formatter,
    UsageError,
    fail,
    logger,
    run_command,
    setup_logging,
    usage_error,
)
from netlib.cli.chat import DEFAULT_CHAT_PORT, add_chat
from netlib.cli.echo import DEFAULT_ECHO_PORT, add_echo
from netlib.cli.files import add_files
from netlib.cli.proxy import add_proxy
from netlib.cli.speedtest import add_speedtest
from netlib.runner import LOOP_CHOICES

__all__ = ["DEFAULT_CHAT_PORT", "DEFAULT_ECHO_PORT", "build_parser", "main"]

EXAMPLES = """\
examples:
  netlib echo serve &                        # TCP echo on 127.0.0.1:7007
  netlib echo send hello                     # prints: hello
  netlib chat serve                          # chat on 127.0.0.1:7077 (TCP and UDP)
  netlib chat join --nick alice
  netlib files serve . &                     # this directory on http://127.0.0.1:8000/
  netlib files get big.iso                   # resumes if interrupted, checks the SHA-256
  netlib speedtest serve &                   # speed tests on 127.0.0.1:7201
  netlib speedtest                           # tcp, udp and reliable udp, side by side
  netlib demo

exit status: 0 done, 1 failed, 2 usage error, 130/143 a client interrupted by SIGINT/SIGTERM
(servers stop gracefully on either and exit 0). Details: docs/cli.md.
"""


def _common_options() -> argparse.ArgumentParser:
    """Options every command takes, before or after its name.

    Their default is SUPPRESS in the subcommands, so a value given before the command is
    not overwritten by a subcommand's default; ``build_parser`` sets the real defaults.
    """
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("common options")
    group.add_argument(
        "--loop",
        choices=LOOP_CHOICES,
        default=argparse.SUPPRESS,
        help="event loop (default: $NETLIB_LOOP, else auto: uvloop if installed)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="more log lines on stderr: -v netlib's debug lines, -vv asyncio's too",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log only warnings and errors",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common_options()  # the subcommands': parents share action objects, so the
    # top level gets its own copy, whose defaults set_defaults() below may change
    parser = argparse.ArgumentParser(
        prog="netlib",
        description="Fast, bounded, safe TCP and UDP networking for asyncio: ready-made "
        "echo, chat and file services, their clients, a speed test, and an impairment proxy.",
        epilog=EXAMPLES,
        parents=[_common_options()],
        formatter_class=Formatter,
    )
    parser.set_defaults(loop=None, verbose=0, quiet=False)
    parser.add_argument("--version", action="version", version=f"netlib {netlib.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_echo(commands, common)
    add_chat(commands, common)
    add_proxy(commands, common)
    add_files(commands, common)
    add_speedtest(commands, common)
    demo = commands.add_parser(
        "demo",
        help="run the demo: servers on loopback driven by clients",
        description="Start echo, UDP and chat servers on loopback, drive them with netlib's "
        "clients, print what happens, and stop.",
        parents=[common],
        formatter_class=Formatter,
    )
    demo.set_defaults(run=_demo, server=False)
    return parser


async def _demo(_args: argparse.Namespace, _signals: object) -> int:
    from netlib.demo import run_demo

    await run_demo()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for --workers to pass on
    setup_logging(
        args.verbose, args.quiet, server=args.server, worker=getattr(args, "worker_index", 0)
    )
    try:
        status: int = run_command(args.run, args, server=args.server)
    except UsageError as exc:
        usage_error(args, str(exc))
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        logger.debug("internal error", exc_info=exc)
        hint = "" if args.verbose else " (-v shows the traceback)"
        return fail(f"internal error: {type(exc).__name__}: {exc}{hint}")
    return status
