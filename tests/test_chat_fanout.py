"""Chat fan-out stays correct and fast while 10 % of the subscribers stop reading.

Robustness row R11 in docs/robustness.md.

200 subscribers (20 of which never read), 4 publishers x 250 messages/s x 100 bytes for
PUBLISH_SECONDS. The chat server runs in its own process on the same kind of event loop
as the test, with the default outbound limits. Subscribers that keep up must see every
message of every publisher exactly once and in order, with p99 delivery latency under
50 ms; the slow ones must be disconnected with reason ``slow_consumer``, at the hard limit
or after the soft limit held for 10 s (+-1 s), as the server's log reports.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
import time
from typing import cast

import pytest

import netlib
from tests.helpers import paced_lines

pytestmark = pytest.mark.serial  # p99 delivery latency

SUBSCRIBERS = 200
SLOW = SUBSCRIBERS // 10
PUBLISHERS = 4
RATE = 250  # messages per second per publisher
PUBLISH_SECONDS = 12.0  # long enough for every slow subscriber to reach a limit
MESSAGE_SIZE = 100
P99_LIMIT_MS = 50.0
BUCKET_MS = 0.1

SERVER = """
import logging, sys
import netlib
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

async def main() -> None:
    limits = netlib.ChatLimits(  # publishers send 250/s; the test counts the join and
        flood_rate=1000.0, flood_burst=1000, announce_max_members=1000  # quit notices of
    )  # its 204 clients, which a lobby of more than 64 members does not announce
    async with netlib.open_chat_server(service=netlib.ChatService(limits=limits)) as server:
        print(server.tcp_addresses[0][1], flush=True)
        await server.serve_forever()

netlib.run(main(), loop=sys.argv[1])
"""


class Subscriber(asyncio.Protocol):
    """Checks order, loss and duplicates per publisher; records latency in a histogram."""

    def __init__(self, histogram: list[int]) -> None:
        self.histogram = histogram
        self.last: dict[bytes, int] = {}
        self.received = 0
        self.out_of_order = 0
        self.joins = 0
        self.slow_quits: list[bytes] = []
        self._tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        lines = (self._tail + data).split(b"\n") if self._tail else data.split(b"\n")
        self._tail = lines.pop()
        now = time.monotonic_ns()
        last, histogram, top = self.last, self.histogram, len(self.histogram) - 1
        for line in lines:
            if line[9:10] != b"<":  # "[#lobby] <nick> ...": anything else is a notice
                self._notice(line)
                continue
            _room, _nick, publisher, seq_text, sent, _pad = line.split(b" ", 5)
            seq = int(seq_text)
            if seq != last.get(publisher, -1) + 1:
                self.out_of_order += 1
            last[publisher] = seq
            self.received += 1
            histogram[min(top, int((now - int(sent)) / 1e6 / BUCKET_MS))] += 1

    def _notice(self, line: bytes) -> None:
        if line.endswith(b" joined"):
            self.joins += 1
        elif line.endswith(b"quit (slow_consumer)"):
            self.slow_quits.append(line.split()[2])


class Discard(asyncio.Protocol):
    """A publisher's own connection reads and drops what the room sends it."""

    def data_received(self, data: bytes) -> None:
        return None


def p99_ms(histogram: list[int]) -> float:
    total = sum(histogram)
    seen = 0
    for bucket, count in enumerate(histogram):
        seen += count
        if seen >= 0.99 * total:
            return (bucket + 1) * BUCKET_MS
    return float("inf")


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_fanout_stays_exact_while_slow_consumers_are_cut(loop_name: str) -> None:
    # A load generator, not code under test: it runs outside asyncio's debug mode, whose
    # per-callback checks would be measured as delivery latency.
    netlib.run(_fanout(loop_name), loop=loop_name)  # type: ignore[arg-type]


async def _fanout(loop_name: str) -> None:
    loop = asyncio.get_running_loop()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER,
        loop_name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    slow_socks: list[socket.socket] = []
    transports: list[asyncio.BaseTransport] = []
    try:
        port = int(await proc.stdout.readline())
        histogram = [0] * int(1000 / BUCKET_MS)
        keepers: list[Subscriber] = []
        for _ in range(SUBSCRIBERS - SLOW):
            transport, keeper = await loop.create_connection(
                lambda: Subscriber(histogram), "127.0.0.1", port
            )
            transports.append(transport)
            keepers.append(keeper)
        for _ in range(SLOW):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", port))
            slow_socks.append(sock)
        publishers = []
        for _ in range(PUBLISHERS):
            publisher, _ = await loop.create_connection(Discard, "127.0.0.1", port)
            publishers.append(publisher)
            transports.append(publisher)
        everyone_else = SUBSCRIBERS - 1 + PUBLISHERS
        async with asyncio.timeout(10):
            while keepers[0].joins < everyone_else:
                await asyncio.sleep(0.01)  # polling a counter until every client joined
        count = int(RATE * PUBLISH_SECONDS)
        await asyncio.gather(
            *(paced_lines(t, p, count, RATE, MESSAGE_SIZE) for p, t in enumerate(publishers))
        )
        expected = PUBLISHERS * count
        async with asyncio.timeout(10):
            while any(k.received < expected for k in keepers):
                await asyncio.sleep(0.01)  # polling counters until the room has drained
        async with asyncio.timeout(10):
            while len(keepers[0].slow_quits) < SLOW:
                await asyncio.sleep(0.01)  # polling until every slow consumer is gone
    finally:
        for opened in transports:
            opened.close()
        for sock in slow_socks:
            sock.close()
        proc.terminate()
        _out, err = await proc.communicate()
    for keeper in keepers:
        assert keeper.received == expected  # 0 lost, 0 duplicated
        assert keeper.out_of_order == 0  # 0 reordered per publisher
    assert p99_ms(histogram) < P99_LIMIT_MS
    assert len(set(keepers[0].slow_quits)) == SLOW
    reasons = [line for line in err.decode().splitlines() if ": slow_consumer (" in line]
    assert len(reasons) == SLOW
    for reason in reasons:
        held = re.search(r"for ([\d.]+) s\)$", reason)
        assert "hard limit" in reason or (held and 9.0 <= float(held.group(1)) <= 11.0), reason
