"""run_chat_client against fake chat servers: piped and interactive, TCP and UDP, failures.

The fakes answer like the chat line protocol (netlib/sansio/chat.py) and nothing more:
``*** welcome guest1`` on join, ``[#lobby] <nick> text`` for text (echoed to the sender,
unlike the real server, so one client sees something), ``*** you are now known as X`` for
``/nick X`` and ``*** goodbye`` for ``/quit`` or ``over``. The UDP fake adds the join
handshake (empty datagram -> ``*** hello <cookie>`` -> ``/hello <cookie>``) and counts
heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import os
import pty
import re
import socket
import struct
import sys
import termios
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

import netlib
from netlib import chat_client
from netlib.chat_client import run_chat_client
from tests.helpers import wait_until

COOKIE = "c0ffee42"
Proto = Literal["tcp", "udp"]


@dataclass
class Peer:
    nick: str = "guest1"
    gone: bool = False


@dataclass
class FakeChat:
    """The fake servers' shared state: what they heard, and the UDP peers they know."""

    heard: list[str] = field(default_factory=list)
    streams: list[netlib.MessageStream] = field(default_factory=list)
    peers: dict[Any, Peer] = field(default_factory=dict)
    hellos_to_ignore: int = 0
    handshakes: int = 0
    heartbeats: int = 0

    def answer(self, peer: Peer, text: str) -> list[str]:
        self.heard.append(text)
        if text in ("/quit", "over"):
            peer.gone = True
            return ["*** goodbye"]
        if text.startswith("/nick "):
            peer.nick = text.removeprefix("/nick ")
            return [f"*** you are now known as {peer.nick}"]
        return [f"[#lobby] <{peer.nick}> {text}"]

    async def tcp(self, stream: netlib.MessageStream) -> None:
        self.streams.append(stream)
        peer = Peer()
        await stream.send(b"*** welcome guest1")
        async for data in stream:
            if data == b"/drop":  # leave without a goodbye, as a crashing server would
                return
            for line in self.answer(peer, data.decode()):
                await stream.send(line.encode())
            if peer.gone:
                return

    async def udp(self, datagram: netlib.Datagram) -> None:
        text = datagram.data.decode()
        peer = self.peers.get(datagram.addr)
        if peer is None:
            self.join(datagram, text)
        elif text.strip() in ("", "/hello"):
            self.heartbeats += 1
        else:
            for line in self.answer(peer, text):
                datagram.reply(line.encode())
            if peer.gone:
                del self.peers[datagram.addr]

    def join(self, datagram: netlib.Datagram, text: str) -> None:
        if text.strip() == "/hello" and len(datagram.data) >= 26:
            self.handshakes += 1
            if self.handshakes > self.hellos_to_ignore:
                datagram.reply(f"*** hello {COOKIE}".encode())
        elif text == f"/hello {COOKIE}":
            self.peers[datagram.addr] = Peer()
            datagram.reply(b"*** welcome guest1")


@asynccontextmanager
async def fake_server(fake: FakeChat, proto: Proto) -> AsyncIterator[int]:
    """Serve the fake on 127.0.0.1 and yield its port."""
    if proto == "tcp":
        async with netlib.open_tcp_server(
            fake.tcp, framing="line", first_frame_timeout=None, shutdown_grace=1.0
        ) as server:
            yield int(server.addresses[0][1])
    else:
        async with netlib.open_udp_server(fake.udp, workers=1) as udp_server:
            yield int(udp_server.addresses[0][1])


class HeldStdin(io.StringIO):
    """A stdin that stays open, typing nothing, until released (then EOF)."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()

    def readline(self, size: int = -1, /) -> str:  # type: ignore[override]  # as typeshed
        self.released.wait(timeout=10.0)
        return ""


def closed_port(kind: socket.SocketKind) -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def chat(port: int, proto: Proto, stdin: io.StringIO, **kw: Any) -> tuple[int, list[str]]:
    """Run the client in piped mode; return its exit status and the lines it printed."""
    out = io.StringIO()
    async with asyncio.timeout(10):
        status = await run_chat_client(
            "127.0.0.1", port, proto=proto, stdin=stdin, stdout=out, interactive=False, **kw
        )
    return status, out.getvalue().splitlines()


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_client, "QUIET_PERIOD", 0.1)


# -- piped mode ------------------------------------------------------------------------------


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_piped_session_ends_with_quit(proto: Proto) -> None:
    fake = FakeChat()
    async with fake_server(fake, proto) as port:
        status, lines = await chat(port, proto, io.StringIO("/nick bob\n\nhello\n/quit\n"))
    assert status == 0
    assert lines == [
        "*** welcome guest1",
        "*** you are now known as bob",
        "[#lobby] <bob> hello",
        "*** goodbye",
    ]
    assert fake.heard == ["/nick bob", "hello", "/quit"]  # the blank line is not sent


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_piped_eof_sends_nick_then_quit(proto: Proto) -> None:
    fake = FakeChat()
    async with fake_server(fake, proto) as port:
        status, lines = await chat(port, proto, io.StringIO("hi"), nick="al")
    assert status == 0
    assert lines[-2:] == ["[#lobby] <al> hi", "*** goodbye"]
    assert fake.heard == ["/nick al", "hi", "/quit"]


async def test_piped_over_ends_the_session() -> None:
    fake = FakeChat()
    async with fake_server(fake, "tcp") as port:
        status, lines = await chat(port, "tcp", io.StringIO("over\nnever sent\n"))
    assert (status, lines[-1], fake.heard) == (0, "*** goodbye", ["over"])


async def test_control_characters_are_not_printed() -> None:
    fake = FakeChat()
    async with fake_server(fake, "tcp") as port:
        _status, lines = await chat(port, "tcp", io.StringIO("a\x1b[2Jb\x07\tc\n"))
    assert "[#lobby] <guest1> a[2Jb\tc" in lines


async def test_server_dropping_us_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    async with fake_server(FakeChat(), "tcp") as port:
        status, lines = await chat(port, "tcp", io.StringIO("/drop\n"))
    assert (status, lines) == (1, ["*** welcome guest1"])
    assert capsys.readouterr().err == "netlib: error: the server closed the connection\n"


async def test_piped_stdin_of_a_real_process() -> None:
    fake = FakeChat()
    async with fake_server(fake, "tcp") as port:
        status, out, err = await run_child(port, b"/nick bob\nhello \xff\n/quit\n")
    assert (status, err) == (0, b"")
    assert out.decode().splitlines() == [
        "*** welcome guest1",
        "*** you are now known as bob",
        "[#lobby] <bob> hello \ufffd",
        "*** goodbye",
    ]


CHILD = """
import sys, netlib
from netlib.chat_client import run_chat_client
sys.exit(netlib.run(run_chat_client("127.0.0.1", int(sys.argv[1]))))
"""


def child_env() -> dict[str, str]:
    uvloop = type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    return {**os.environ, "NETLIB_LOOP": "uvloop" if uvloop else "asyncio"}


async def run_child(port: int, stdin: bytes) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(port),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(),
    )
    try:
        async with asyncio.timeout(20):
            out, err = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out, err


# -- UDP: handshake and heartbeats -----------------------------------------------------------


async def test_udp_handshake_resends_until_hello(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_client, "HELLO_INTERVAL", 0.05)
    fake = FakeChat(hellos_to_ignore=2)
    async with fake_server(fake, "udp") as port:
        status, lines = await chat(port, "udp", io.StringIO("/quit\n"))
    assert (status, lines) == (0, ["*** welcome guest1", "*** goodbye"])
    assert fake.handshakes == 3


async def test_udp_handshake_gives_up(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(chat_client, "HELLO_INTERVAL", 0.02)
    monkeypatch.setattr(chat_client, "HELLO_ATTEMPTS", 3)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        status, lines = await chat(port, "udp", io.StringIO("hello\n"))
        silent.setblocking(False)
        received = [silent.recv(100) for _ in range(3)]
        with pytest.raises(BlockingIOError):
            silent.recv(100)
    assert (status, lines, received) == (1, [], [b"/hello".ljust(32)] * 3)
    assert capsys.readouterr().err == (
        f"netlib: error: no answer from 127.0.0.1:{port} over UDP after 3 attempts "
        "(is the chat server running?)\n"
    )


async def test_udp_heartbeats_while_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_client, "HEARTBEAT_INTERVAL", 0.02)
    fake, stdin = FakeChat(), HeldStdin()
    async with fake_server(fake, "udp") as port:
        client = asyncio.create_task(chat(port, "udp", stdin))
        try:
            await wait_until(lambda: fake.heartbeats >= 3, timeout=5.0)
        finally:
            stdin.released.set()
        status, lines = await client
    assert (status, lines[-1], fake.heard) == (0, "*** goodbye", ["/quit"])


async def test_udp_expired_session_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(chat_client, "HEARTBEAT_INTERVAL", 0.02)
    fake, stdin = FakeChat(), HeldStdin()
    try:
        async with fake_server(fake, "udp") as port:
            client = asyncio.create_task(chat(port, "udp", stdin))
            await wait_until(lambda: bool(fake.peers), timeout=5.0)
            fake.peers.clear()  # expired: the next heartbeat is answered with a hello
            status, _lines = await client
    finally:
        stdin.released.set()
    assert status == 1
    assert capsys.readouterr().err == (
        f"netlib: error: 127.0.0.1:{port} dropped this client (session expired)\n"
    )


async def test_udp_server_gone_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(chat_client, "HEARTBEAT_INTERVAL", 0.02)
    fake, stdin = FakeChat(), HeldStdin()
    try:
        async with fake_server(fake, "udp") as port:
            client = asyncio.create_task(chat(port, "udp", stdin))
            await wait_until(lambda: bool(fake.peers), timeout=5.0)
        status, _lines = await client  # the next heartbeats meet a closed port
    finally:
        stdin.released.set()
    assert status == 1
    assert capsys.readouterr().err == (
        f"netlib: error: 127.0.0.1:{port} is gone (connection refused)\n"
    )


# -- connection failures ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("proto", "kind"), [("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)]
)
async def test_connection_refused(
    capsys: pytest.CaptureFixture[str], proto: Proto, kind: socket.SocketKind
) -> None:
    port = closed_port(kind)
    status, lines = await chat(port, proto, io.StringIO("hello\n"))
    assert (status, lines) == (1, [])
    assert capsys.readouterr().err == (
        f"netlib: error: cannot connect to 127.0.0.1:{port}: connection refused "
        "(is the chat server running?)\n"
    )


# -- interactive mode through a pseudo-terminal ----------------------------------------------


class Terminal:
    """The master side of a pty: collects what the client draws, types for the user."""

    def __init__(self, master: int) -> None:
        self.fd = master
        self.output = bytearray()
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every slave descriptor is closed
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self.fd)
        self.output += data
        self._changed.set()

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    async def shows(self, *rows: str) -> None:
        """Wait until the screen's last rows with text are ``rows``."""
        async with asyncio.timeout(10):
            while screen(bytes(self.output))[-len(rows) :] != list(rows):
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.fd)
        os.close(self.fd)


CONTROL = re.compile(r"\x1b\[\??([0-9;]*)([@-~])|\x1b[^\[]|[\r\n\x08]|[^\x1b\r\n\x08]+")


def screen(drawn: bytes) -> list[str]:
    """Replay terminal output on a blank screen and return the rows that show text.

    Handles what prompt_toolkit draws a prompt with: text, CR, LF, BS, cursor moves
    (CSI A/B/C/D) and erasing (CSI J/K); other sequences (colours, modes) draw nothing.
    """
    rows: list[str] = [""]
    x = y = 0
    for match in CONTROL.finditer(drawn.decode()):
        token, final = match[0], match[2]
        n = int(match[1] or 1) if final in ("A", "B", "C", "D") else 0
        if final == "A" or final == "B":
            y = max(0, y - n) if final == "A" else y + n
        elif final == "C" or final == "D":
            x = x + n if final == "C" else max(0, x - n)
        elif final == "J" or final == "K":
            rows[y] = rows[y][:x]
            if final == "J":
                del rows[y + 1 :]
        elif token == "\r" or token == "\x08":
            x = 0 if token == "\r" else max(0, x - 1)
        elif token == "\n":
            y += 1
        elif not token.startswith("\x1b"):
            row = rows[y].ljust(x)
            rows[y] = row[:x] + token + row[x + len(token) :]
            x += len(token)
        rows += [""] * (y + 1 - len(rows))
    return [row.rstrip() for row in rows if row.strip()]


async def test_interactive_message_never_overwrites_the_typed_line() -> None:
    fake = FakeChat()
    async with fake_server(fake, "tcp") as port:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {**child_env(), "TERM": "xterm", "PROMPT_TOOLKIT_NO_CPR": "1"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            str(port),
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        term = Terminal(master)
        try:
            await term.shows("*** welcome guest1", ">")
            term.type(b"partial")  # no Enter: the line being typed
            await term.shows("*** welcome guest1", "> partial")
            await fake.streams[0].send(b"[#lobby] <alice> ping")
            await term.shows("*** welcome guest1", "[#lobby] <alice> ping", "> partial")
            term.type(b" done\r")
            await term.shows("> partial done", "[#lobby] <guest1> partial done", ">")
            term.type(b"\x04")  # Ctrl-D on an empty line
            async with asyncio.timeout(10):
                status = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            term.close()
    assert (status, fake.heard) == (0, ["partial done", "/quit"])


# -- against the real chat server ------------------------------------------------------------


@asynccontextmanager
async def real_server(**limits: Any) -> AsyncIterator[tuple[netlib.ChatServer, int]]:
    """A real chat server on TCP and UDP (one port); yields it and its port."""
    service = netlib.ChatService(limits=netlib.ChatLimits(**limits))
    async with netlib.open_chat_server(proto="both", service=service) as server:
        yield server, int(server.tcp_addresses[0][1])
    await service.aclose()


class Listener:
    """A raw TCP member that records every line it reads."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen: list[str] = []

    @classmethod
    async def connect(cls, port: int) -> Listener:
        listener = cls(*await asyncio.open_connection("127.0.0.1", port))
        await listener.expect("*** welcome")
        return listener

    async def expect(self, fragment: str, timeout: float = 5.0) -> str:
        async with asyncio.timeout(timeout):
            while raw := await self.reader.readline():
                self.seen.append(line := raw.decode().rstrip("\n"))
                if fragment in line:
                    return line
        raise EOFError(f"closed while waiting for {fragment!r}")

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_a_pipe_is_paced_to_the_stated_limits_and_delivered_whole(proto: Proto) -> None:
    async with real_server(flood_rate=40.0, flood_burst=4) as (server, port):
        listener = await Listener.connect(port)
        lines = "".join(f"line {i}\n" for i in range(25))
        status, out = await chat(port, proto, io.StringIO(lines), nick="piper")
        for i in range(25):
            assert await listener.expect("<piper>") == f"[#lobby] <piper> line {i}"
        assert status == 0
        assert not [line for line in out if line.startswith("!!!")]
        assert server.service.statistics().flood_dropped == 0
        await listener.aclose()


@pytest.mark.parametrize(
    ("nick", "reason"),
    [("alice", 'nick "alice" is already taken'), ("9lives", 'invalid nick "9lives"')],
)
async def test_a_refused_nick_stops_the_client_before_any_line(
    capsys: pytest.CaptureFixture[str], nick: str, reason: str
) -> None:
    async with real_server() as (_server, port):
        alice = await Listener.connect(port)
        alice.writer.write(b"/nick alice\n")
        await alice.expect("now known as alice")
        status, _out = await chat(port, "tcp", io.StringIO("not to be sent\n"), nick=nick)
        err = capsys.readouterr().err
        assert status == 1
        assert err.startswith(f"netlib: error: nick refused: {reason}")
        assert err.count("\n") == 1
        assert "quit" in await alice.expect("quit")  # it left without saying anything
        assert not any("not to be sent" in line for line in alice.seen)
        await alice.aclose()


async def test_lines_the_server_refused_make_the_status_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with real_server(max_line_bytes=1024) as (_server, port):
        stdin = io.StringIO("fine\n/frobnicate\n" + "x" * 2000 + "\nalso fine\n")
        status, out = await chat(port, "tcp", stdin)
    assert status == 1
    assert "!!! line too long (limit 1024 bytes): not sent" in out
    assert capsys.readouterr().err == (
        "netlib: error: 2 lines were not delivered "
        "(refused or dropped by the server; see the !!! lines)\n"
    )


async def test_flood_drops_reported_by_a_udp_server_are_counted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeChat()
    flood = ["!!! flood control: lines dropped; at most 5 per second (burst 20)"]
    lifted = ["*** flood control lifted: 3 lines dropped", "[#lobby] <guest1> x"]
    replies = iter([flood, [], [], lifted])
    fake.answer = lambda peer, text: next(replies)  # type: ignore[method-assign]
    async with fake_server(fake, "udp") as port:
        status, _out = await chat(port, "udp", io.StringIO("a\nb\nc\nd\n"))
    assert status == 1
    assert "netlib: error: 3 lines were not delivered" in capsys.readouterr().err


@pytest.mark.parametrize("proto", ["tcp", "udp"])
async def test_stay_keeps_listening_after_eof_until_the_server_shuts_down(
    proto: Proto,
) -> None:
    out = io.StringIO()
    async with real_server() as (_server, port):
        talker = await Listener.connect(port)
        client = asyncio.create_task(
            run_chat_client(
                "127.0.0.1", port, proto=proto, nick="logger", stay=True,
                stdin=io.StringIO(""), stdout=out, interactive=False,
            )
        )  # fmt: skip
        await talker.expect("now known as logger")
        with pytest.raises(TimeoutError):  # stdin is at its end, yet the logger stays
            await talker.expect("logger quit", timeout=3 * chat_client.QUIET_PERIOD + 0.5)
        talker.writer.write(b"for the log\n")
        await wait_until(lambda: "<guest1> for the log" in out.getvalue(), timeout=5.0)
        await talker.aclose()
    async with asyncio.timeout(5.0):
        status = await client
    assert status == 0
    assert out.getvalue().splitlines()[-1] == "*** server shutting down"
