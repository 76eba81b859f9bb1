"""A custom line-protocol handler: a tiny key-value store, served and used in one script.

Run it from a clone: ``.venv/bin/python docs/examples/custom_handler.py`` (or ``python`` wherever
netlib is installed).
"""

from __future__ import annotations

import netlib


async def kv_handler(stream: netlib.MessageStream) -> None:
    """``SET key value`` stores, ``GET key`` answers; one store per connection."""
    store: dict[bytes, bytes] = {}
    async for line in stream:
        command, _, rest = line.partition(b" ")
        if command == b"SET":
            key, _, value = rest.partition(b" ")
            store[key] = value
            await stream.send(b"OK")
        elif command == b"GET":
            await stream.send(store.get(rest, b"(nil)"))
        else:
            await stream.send(b"ERR unknown command " + command)


async def main() -> None:
    async with netlib.open_tcp_server(kv_handler, "127.0.0.1", 0, framing="line") as server:
        host, port = server.addresses[0][:2]
        async with netlib.connect_tcp(host, port, framing="line") as client:
            for request in [b"SET colour blue", b"GET colour", b"GET size", b"DEL colour"]:
                await client.send(request)
                print(request.decode(), "->", (await client.receive()).decode())


if __name__ == "__main__":
    netlib.run(main())
