"""Two network namespaces joined by a veth pair, with real random packet loss between them.

Needs root, ``ip`` and ``iptables``. The namespaces, their veth ends and their addresses
(10.232.0.1/30 for the server, 10.232.0.2/30 for the client) exist only while the context
manager runs, and are removed even when the benchmark fails. Loss is set with ``iptables
-m statistic --mode random`` on each namespace's INPUT chain, so each direction loses its
share independently, in the kernel, below TCP and UDP alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["CLIENT_ADDRESS", "SERVER_ADDRESS", "Namespaces", "namespaces"]

SERVER_ADDRESS = "10.232.0.1"
CLIENT_ADDRESS = "10.232.0.2"


def _run(*args: str) -> str:
    done = subprocess.run(args, check=True, capture_output=True, text=True, timeout=10)
    return done.stdout


@dataclass(frozen=True)
class Namespaces:
    """The pair: names, interfaces, and what can be done to the path between them."""

    server: str
    client: str
    server_if: str
    client_if: str

    def exec(self, ns: str) -> list[str]:
        """The command prefix that runs a program in namespace ``ns``."""
        return ["ip", "netns", "exec", ns]

    def set_loss(self, share: float) -> None:
        """Drop ``share`` of the packets arriving in each namespace (0: no loss)."""
        for ns in (self.server, self.client):
            _run("ip", "netns", "exec", ns, "iptables", "-F", "INPUT")
            if share > 0:
                _run(
                    *("ip", "netns", "exec", ns, "iptables", "-A", "INPUT"),
                    *("-m", "statistic", "--mode", "random", "--probability", f"{share:.4f}"),
                    *("-j", "DROP"),
                )

    def packets_sent(self) -> int:
        """Packets both veth ends have sent so far (each direction counted once)."""
        total = 0
        for ns, iface in ((self.server, self.server_if), (self.client, self.client_if)):
            path = f"/sys/class/net/{iface}/statistics/tx_packets"
            total += int(_run("ip", "netns", "exec", ns, "cat", path))
        return total


def check_tools() -> str | None:
    """Why the namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and iptables)"
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    return f"needs {' and '.join(missing)}" if missing else None


@contextmanager
def namespaces(tag: str = "") -> Iterator[Namespaces]:
    """Create the pair; remove it on exit."""
    tag = tag or str(os.getpid() % 100_000)
    pair = Namespaces(f"netlib-loss-{tag}-s", f"netlib-loss-{tag}-c", f"nll{tag}s", f"nll{tag}c")
    try:
        _run("ip", "netns", "add", pair.server)
        _run("ip", "netns", "add", pair.client)
        _run("ip", "link", "add", pair.server_if, "type", "veth", "peer", "name", pair.client_if)
        for ns, iface, address in (
            (pair.server, pair.server_if, SERVER_ADDRESS),
            (pair.client, pair.client_if, CLIENT_ADDRESS),
        ):
            _run("ip", "link", "set", iface, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", iface)
            _run("ip", "-n", ns, "link", "set", iface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield pair
    finally:
        for ns in (pair.server, pair.client):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", pair.server_if], capture_output=True, timeout=10)
