"""``netlib proxy``: an impairment proxy in front of any UDP or TCP server."""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING, Any, Final

from netlib.cli._common import (
    STOP_HINT,
    Signals,
    UsageError,
    add_command,
    add_reporting,
    emit,
    format_address,
    port_type,
    serve_until_stopped,
    show_statistics,
)

if TYPE_CHECKING:
    from netlib.testing import LinkProfile, ProxyServer

__all__ = ["add_proxy"]

EXAMPLES = """\
examples:
  netlib proxy --listen 127.0.0.1:7008 --target 127.0.0.1:7007 --loss 5% --delay 20ms
  netlib proxy --proto tcp --listen 127.0.0.1:8000 --target 127.0.0.1:7007 --delay 50ms
  netlib proxy ... --blackhole 5s/2s --seed 7 --json   # 5 s of total loss every 7 s
"""
_DURATION: Final = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(ms|s)?$")


def share_type(value: str) -> float:
    """``5%`` or ``0.05``: a share between 0 and 1."""
    text = value.strip()
    try:
        share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid share {value!r}: expected 5% or 0.05") from None
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"invalid share {value!r}: must be 0..100%")
    return share


def duration_type(value: str) -> float:
    """``20ms``, ``1.5s`` or ``0.02`` (seconds)."""
    found = _DURATION.match(value.strip())
    if not found:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}: expected 20ms or 1.5s")
    number = float(found.group(1))
    return number / 1000 if found.group(2) == "ms" else number


def blackhole_type(value: str) -> tuple[float, float]:
    """``ON/OFF`` durations: everything lost for ON, then nothing for OFF, repeating."""
    on, _, off = value.partition("/")
    if not off:
        raise argparse.ArgumentTypeError(f"invalid blackhole {value!r}: expected ON/OFF, 5s/2s")
    return duration_type(on), duration_type(off)


def endpoint_type(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host:
        raise argparse.ArgumentTypeError(f"invalid address {value!r}: expected HOST:PORT")
    return host, port_type(port)


def add_proxy(commands: Any, common: argparse.ArgumentParser) -> None:
    proxy = add_command(
        commands,
        "proxy",
        common,
        help="an impairment proxy: loss, delay, duplication, reordering for any server",
        description="Forward traffic from --listen to --target and mistreat it on the way, "
        "reproducibly for a --seed. UDP: every impairment, each direction drawn "
        "separately. TCP: delay and jitter only (bytes keep their order; loss below TCP "
        "needs packet loss in the kernel). Prints what it did when stopped.",
        epilog=EXAMPLES,
    )
    proxy.add_argument("--proto", choices=["udp", "tcp"], default="udp", help="transport")
    proxy.add_argument(
        "--listen",
        type=endpoint_type,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="where clients connect (port 0: a free one)",
    )
    proxy.add_argument(
        "--target", type=endpoint_type, required=True, metavar="HOST:PORT", help="the server"
    )
    link = proxy.add_argument_group("impairments (each direction)")
    link.add_argument("--loss", type=share_type, default=0.0, help="share of datagrams lost")
    link.add_argument("--burst", type=int, default=1, help="datagrams lost in a row per loss")
    link.add_argument("--delay", type=duration_type, default=0.0, help="one-way delay")
    link.add_argument("--jitter", type=duration_type, default=0.0, help="extra random delay")
    link.add_argument("--duplicate", type=share_type, default=0.0, help="share delivered twice")
    link.add_argument(
        "--reorder", type=share_type, default=0.0, help="share held back by --reorder-delay"
    )
    link.add_argument(
        "--reorder-delay", type=duration_type, default=0.02, help="how long a reordered one waits"
    )
    link.add_argument("--corrupt", type=share_type, default=0.0, help="share with a bit flipped")
    link.add_argument(
        "--blackhole",
        type=blackhole_type,
        default=None,
        metavar="ON/OFF",
        help="periods of total loss",
    )
    link.add_argument("--seed", type=int, default=1, help="seed of the random draws")
    add_reporting(proxy, "counters")
    proxy.set_defaults(run=run_proxy, server=True)


def _profile(args: argparse.Namespace) -> LinkProfile:
    from netlib.testing import LinkProfile  # loaded when used: see cli/__init__

    if args.burst < 1:
        raise UsageError(f"--burst must be >= 1, got {args.burst}")
    if args.loss + args.duplicate + args.reorder > 1:
        raise UsageError("--loss, --duplicate and --reorder together cannot exceed 100%")
    return LinkProfile(
        delay=args.delay,
        jitter=args.jitter,
        loss=args.loss,
        burst=args.burst,
        duplicate=args.duplicate,
        late=args.reorder,
        late_delay=args.reorder_delay,
        corrupt=args.corrupt,
        blackhole=args.blackhole,
    )


async def run_proxy(args: argparse.Namespace, signals: Signals) -> int:
    from netlib.testing import open_tcp_proxy, open_udp_proxy  # loaded when used: see cli/__init__

    profile = _profile(args)
    host, port = args.listen
    target_host, target_port = args.target
    if args.proto == "tcp":
        try:
            opened = open_tcp_proxy(
                target_host, target_port, host=host, port=port, up=profile, seed=args.seed
            )
            async with opened as proxy:
                await _serve(args, signals, proxy)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    else:
        async with open_udp_proxy(
            target_host, target_port, host=host, port=port, up=profile, seed=args.seed
        ) as proxy:
            await _serve(args, signals, proxy)
    show_statistics(args, "proxy", proxy.statistics())
    return 0


async def _serve(args: argparse.Namespace, signals: Signals, proxy: ProxyServer) -> None:
    where = ", ".join(format_address(a) for a in proxy.addresses)
    emit(
        args,
        f"netlib {args.proto} proxy listening on {where}, forwarding to "
        f"{format_address(proxy.target)}{STOP_HINT}",
        event="listening",
        proto=args.proto,
        addresses=[format_address(a) for a in proxy.addresses],
        target=format_address(proxy.target),
    )
    await serve_until_stopped(args, signals, "proxy", proxy.statistics)
