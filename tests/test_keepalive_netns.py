"""R8(a) with real packet loss: TCP keepalive notices a peer whose network vanished.

Two network namespaces created by this test, joined by a veth pair (10.231.0.1/30 and
10.231.0.2/30, addresses that exist only inside them): the server runs in a subprocess in
one, a plain client in the other. After one echo the client's namespace drops every packet
(``iptables -A INPUT/OUTPUT -j DROP``), as if its network had died. With keepalive idle 1 s,
interval 1 s and 2 probes, the server must notice within idle + 2 x interval = 3 s +-1 s of
the last exchange. Needs root, ``ip`` and ``iptables`` (.ci/run installs iptables): run as
root without them, the test fails rather than skips.
"""

from __future__ import annotations

import os
import selectors
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

pytestmark = pytest.mark.serial  # keepalive deadlines against the clock

SERVER_ADDRESS = "10.231.0.1"
CLIENT_ADDRESS = "10.231.0.2"
IDLE, INTERVAL, COUNT = 1, 1, 2
DETECTION = IDLE + COUNT * INTERVAL
TOLERANCE = 1.0

SERVER = f"""
import sys, time
import netlib

async def handler(stream: netlib.MessageStream) -> None:
    try:
        async for message in stream:
            await stream.send(message)
        print("ended", time.monotonic(), "eof", flush=True)
    except netlib.NetlibError as exc:
        print("ended", time.monotonic(), repr(exc).replace(" ", "_"), flush=True)

async def main() -> None:
    async with netlib.open_tcp_server(
        handler, sys.argv[2], 0, framing="line", first_frame_timeout=None, idle_timeout=None,
        keepalive_idle={IDLE}, keepalive_interval={INTERVAL}, keepalive_count={COUNT},
    ) as server:
        print(server.addresses[0][1], flush=True)
        await server.serve_forever()

netlib.run(main(), loop=sys.argv[1])
"""

CLIENT = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
sock.sendall(b"hello\\n")
assert sock.recv(100) == b"hello\\n"
print("echoed", time.monotonic(), flush=True)
sys.stdin.read()  # hold the connection, silently, until the test closes stdin
sock.close()
"""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=10)


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """A server and a client namespace joined by a veth pair; removed even on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    missing = [tool for tool in ("ip", "iptables") if shutil.which(tool) is None]
    assert not missing, f"running as root but {missing} missing: .ci/run installs them"
    tag = f"{os.getpid() % 100_000}"
    server_ns, client_ns = f"netlib-ka-{tag}-s", f"netlib-ka-{tag}-c"
    server_if, client_if = f"nlka{tag}s", f"nlka{tag}c"
    try:
        _run("ip", "netns", "add", server_ns)
        _run("ip", "netns", "add", client_ns)
        _run("ip", "link", "add", server_if, "type", "veth", "peer", "name", client_if)
        for ns, iface, address in (
            (server_ns, server_if, SERVER_ADDRESS),
            (client_ns, client_if, CLIENT_ADDRESS),
        ):
            _run("ip", "link", "set", iface, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{address}/30", "dev", iface)
            _run("ip", "-n", ns, "link", "set", iface, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield server_ns, client_ns
    finally:
        for ns in (server_ns, client_ns):  # deleting a namespace deletes its veth end
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", server_if], capture_output=True, timeout=10)


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of ``proc``'s output within ``timeout`` seconds."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output within {timeout}s from {proc.args!r}")
    return proc.stdout.readline().strip()


@pytest.mark.slow
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_keepalive_notices_a_vanished_peer(namespaces: tuple[str, str], loop_name: str) -> None:
    server_ns, client_ns = namespaces
    in_ns = ("ip", "netns", "exec")
    with subprocess.Popen(
        [*in_ns, server_ns, sys.executable, "-c", SERVER, loop_name, SERVER_ADDRESS],
        stdout=subprocess.PIPE,
        text=True,
    ) as server:
        try:
            port = _read_line(server, 10)
            with subprocess.Popen(
                [*in_ns, client_ns, sys.executable, "-c", CLIENT, SERVER_ADDRESS, port],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            ) as client:
                try:
                    echoed_at = float(_read_line(client, 10).split()[1])
                    for chain in ("INPUT", "OUTPUT"):  # the client's network dies
                        _run(*in_ns, client_ns, "iptables", "-A", chain, "-j", "DROP")
                    ended = _read_line(server, DETECTION + TOLERANCE + 5).split()
                finally:
                    client.kill()
        finally:
            server.terminate()
            server.wait(10)
    assert ended[0] == "ended"
    detected_after = float(ended[1]) - echoed_at
    print(f"{loop_name}: vanished peer noticed after {detected_after:.2f} s: {ended[2]}")
    assert ended[2] != "eof"  # a lost connection, not a close
    assert DETECTION - TOLERANCE <= detected_after <= DETECTION + TOLERANCE
