"""netlib's echo Protocol classes work with plain ``loop.create_server``.

Run it from a clone: ``.venv/bin/python docs/examples/echo_protocol.py`` (or ``python`` wherever
netlib is installed).
"""

from __future__ import annotations

import asyncio

import netlib


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(netlib.UpperEchoProtocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with netlib.connect_tcp("127.0.0.1", port, framing="line") as stream:
        await stream.send(b"make me loud")
        print((await stream.receive()).decode())
    server.close()
    await server.wait_closed()


if __name__ == "__main__":
    netlib.run(main())
