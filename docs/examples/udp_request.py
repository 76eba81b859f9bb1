"""A UDP handler and a client using request() with timeout and retries, in one script.

Run it from a clone: ``.venv/bin/python docs/examples/udp_request.py`` (or ``python`` wherever
netlib is installed).
"""

from __future__ import annotations

import netlib


async def shout(datagram: netlib.Datagram) -> None:
    """Reply upper-cased; the reply budget decides whether the reply may go."""
    datagram.reply(datagram.data.upper())


async def main() -> None:
    async with netlib.open_udp_server(shout, "127.0.0.1", 0) as server:
        host, port = server.addresses[0][:2]
        async with netlib.open_udp_endpoint(host, port) as endpoint:
            for message in [b"hello", b"", b"datagrams keep their boundaries"]:
                reply = await endpoint.request(message, timeout=1.0, retries=3)
                print(repr(message), "->", repr(reply))
        stats = server.statistics()
        print("handled:", stats.handled, "replies refused:", stats.budget.replies_dropped)


if __name__ == "__main__":
    netlib.run(main())
