"""What the API says when it is misused or interrupted: clear errors, no tracebacks."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import warnings

import pytest

import netlib


async def test_sending_text_instead_of_bytes_says_what_to_do() -> None:
    async with (
        netlib.open_tcp_server(netlib.echo_handler, framing="line") as server,
        netlib.connect_tcp(port=server.addresses[0][1], framing="line") as client,
    ):
        with pytest.raises(TypeError, match=r"takes bytes, not str: encode text first"):
            await client.send("hello")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"takes bytes, not int"):
            client.send_nowait(42)  # type: ignore[arg-type]
        await client.send(bytearray(b"bytes-like is fine"))  # type: ignore[arg-type]
        assert await client.receive() == b"bytes-like is fine"


async def test_sending_text_on_a_datagram_endpoint_says_what_to_do() -> None:
    async with netlib.open_udp_endpoint("127.0.0.1", 9) as endpoint:
        with pytest.raises(TypeError, match=r"takes bytes, not str"):
            await endpoint.send("hello")  # type: ignore[arg-type]


def test_end_of_stream_has_a_message() -> None:
    assert str(netlib.EndOfStream()) == "the peer closed its side of the connection"


async def test_a_bind_failure_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot bind 127\.0\.0\.1:{port}: Address already"):
            async with netlib.open_tcp_server(netlib.echo_handler, "127.0.0.1", port):
                pass
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
        taken.bind(("::1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"cannot bind \[::1\]:{port}: Address already"):
            async with netlib.open_udp_server(netlib.make_udp_echo_handler("echo"), "::1", port):
                pass


def test_an_unknown_loop_name_is_an_error_and_leaves_no_unawaited_coroutine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def main() -> None:
        raise AssertionError("never runs")

    monkeypatch.setenv("NETLIB_LOOP", "bogus")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="unknown loop 'bogus'"):
            netlib.run(main())
        gc.collect()
    assert [str(w.message) for w in caught] == []


SERVER_SCRIPT = """
import netlib

async def main():
    async with netlib.open_tcp_server(netlib.echo_handler, framing="line") as server:
        print(server.addresses[0][1], flush=True)
        try:
            await server.serve_forever()
        finally:
            print("shut down", flush=True)

netlib.run(main())
"""


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_run_stops_a_server_quietly_on_a_signal(signum: int, status: int, loop_name: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NETLIB_LOOP": loop_name},
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
        client.sendall(b"up\n")
        assert client.recv(10) == b"up\n"  # serving, signal handlers in place
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out, err) == (status, "shut down\n", "")


def test_run_in_a_thread_leaves_signals_alone() -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return "done"

    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(netlib.run(main())))
    worker.start()
    worker.join(10)
    assert results == ["done"]
