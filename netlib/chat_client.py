"""The terminal chat client behind ``netlib chat join``: TCP or UDP, interactive or piped.

Theory of operation
-------------------
A *link* moves text lines to and from the server. ``_TcpLink`` is a line-framed
``MessageStream``. ``_UdpLink`` is a connected ``DatagramEndpoint`` carrying one UTF-8 line
per datagram. It joins with the handshake of the UDP chat (``/hello`` padded with spaces to
``HELLO_REQUEST_SIZE`` bytes, answered by ``*** hello <cookie>``, to which it replies
``/hello <cookie>``; the server answers no request smaller than its reply, so the padding is
what gets a cookie; the request goes out every ``HELLO_INTERVAL`` seconds,
``HELLO_ATTEMPTS`` times at most) and keeps the session
alive with the same padded ``/hello`` whenever ``HEARTBEAT_INTERVAL`` seconds pass without a
datagram arriving: a server that no longer knows the client answers it with a new cookie,
which ends the session with an error. The heartbeat is sent from ``receive()`` itself, so
one task does both, and an ICMP "port unreachable" (the server is gone) ends the session at
the next heartbeat.

A session is two tasks. The *pump* prints every incoming line; it returns when the server
ends the session (``*** goodbye`` then EOF over TCP, ``*** goodbye`` over UDP) and raises
``_Failure`` when the server drops us. The *input* sends what the user types and returns
on Ctrl-D or Ctrl-C (interactive), at EOF once no line has arrived for ``QUIET_PERIOD``
seconds (piped), or right after the user sent ``/quit`` or ``over``. When the input ends
first the client sends ``/quit`` (unless the user just did) and gives the pump
``CLOSE_TIMEOUT`` seconds to see the goodbye: every wait is bounded.

The server's welcome states its limits (``limits: lines up to N characters (M bytes), R
lines/s, bursts of B``): the client paces what it sends with a token bucket a little under
them (``PACE_MARGIN``), so a pipe of any length is delivered, not dropped by the server's
flood control. With ``nick``, the client sends ``/nick`` first and waits for the answer: a
refused nick stops it with an error before any line is sent. Piped mode counts what the
server says it did not deliver (``!!!`` refusals, lines dropped by flood control) and
returns 1 if anything was, saying how many. With ``stay``, piped mode keeps listening after
stdin ends, until the server closes the session or the client is interrupted (a logger).

Interactive mode prints each incoming line with prompt_toolkit's ``run_in_terminal``, which
erases the prompt, lets the line be written and redraws the prompt with the text being typed,
so a message never overwrites the user's line. (Not ``patch_stdout()``: its flush thread
does not see the app session made for the given stdin and stdout, and writes over the
prompt.) Piped mode reads stdin in a daemon thread one line per request, so a slow or
endless stdin neither blocks the event loop nor keeps the process alive. Incoming lines are
shown without control characters: a server cannot drive the user's terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, TextIO

from netlib import (
    BrokenResourceError,
    ClosedResourceError,
    DatagramEndpoint,
    EndOfStream,
    MessageStream,
    PeerTimedOut,
    ProtocolError,
    connect_reliable_udp,
    connect_tcp,
    open_udp_endpoint,
)
from netlib.sansio.ratelimit import TokenBucket

if TYPE_CHECKING:  # prompt_toolkit (the cli extra) is imported only for a terminal
    from prompt_toolkit import PromptSession

__all__ = [
    "CLOSE_TIMEOUT",
    "HEARTBEAT_INTERVAL",
    "HELLO_ATTEMPTS",
    "HELLO_INTERVAL",
    "HELLO_REQUEST_SIZE",
    "LINGER_LIMIT",
    "NICK_TIMEOUT",
    "PACE_MARGIN",
    "PROMPT",
    "QUIET_PERIOD",
    "run_chat_client",
]

HELLO_INTERVAL: Final = 1.0
"""Seconds the UDP client waits for ``*** hello <cookie>`` before resending its request."""
HELLO_ATTEMPTS: Final = 5
"""Hello requests the UDP client sends to join before giving up."""
HELLO_REQUEST_SIZE: Final = 32
"""Bytes of the UDP hello request (``/hello`` and spaces): the server sends its 27-byte
cookie reply only to a request at least that large, so that it never amplifies."""
HEARTBEAT_INTERVAL: Final = 5.0
"""Seconds between UDP heartbeats (the server expires peers silent for 30 s)."""
QUIET_PERIOD: Final = 0.5
"""Piped mode: after stdin EOF, seconds without an incoming line before the client leaves."""
LINGER_LIMIT: Final = 5.0
"""Piped mode: most seconds the client waits after stdin EOF for the room to fall quiet."""
CLOSE_TIMEOUT: Final = 2.0
"""Seconds the client waits for the server's goodbye after sending ``/quit``."""
NICK_TIMEOUT: Final = 5.0
"""Seconds the client waits for the server's answer to ``/nick`` before giving up."""
PACE_MARGIN: Final = 0.9
"""The client sends at this fraction of the server's stated rate, and keeps one line of the
stated burst in reserve, so that lines bunched up on the way still pass."""
PROMPT: Final = "> "
"""The interactive prompt."""

_GOODBYE: Final = "*** goodbye"
_SHUTDOWN: Final = "*** server shutting down"
_LAST_LINES: Final = (_GOODBYE, _SHUTDOWN)  # a UDP session ends after either
_HELLO_REQUEST: Final = b"/hello".ljust(HELLO_REQUEST_SIZE)
_LIMITS: Final = re.compile(r"limits: lines up to .*?, ([0-9.]+) lines/s, bursts of ([0-9.]+)")
_NICK_TAKEN: Final = ("*** you are now known as ", "*** you are already known as ")
_FLOOD_NOTICE: Final = "!!! flood control:"
_FLOOD_LIFTED: Final = re.compile(r"\*\*\* flood control lifted: (\d+) lines? dropped")
_DISCONNECTED: Final = "*** disconnected: "
_HELLO: Final = re.compile(r"\*\*\* hello ([0-9A-Fa-f]{1,128})(?:; .*)?")
_QUIT: Final = re.compile(r"/quit(?:\s.*)?", re.IGNORECASE | re.DOTALL)
_UNPRINTABLE: Final = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")


class _Failure(Exception):
    """The session failed; the message is the line shown after ``netlib: error:``."""


class _Link(Protocol):
    async def send(self, line: str) -> None: ...

    async def receive(self) -> str | None:
        """Return the next line, None once the server ended the session."""
        ...


async def run_chat_client(
    host: str,
    port: int,
    *,
    proto: Literal["tcp", "udp", "rudp"] = "tcp",
    nick: str | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    interactive: bool | None = None,
    stay: bool = False,
) -> int:
    """Join the chat server at ``host``:``port`` and talk until one side leaves.

    Args:
        host, port: the chat server.
        proto: ``"tcp"`` (line-framed stream), ``"udp"`` (one line per datagram) or
            ``"rudp"`` (reliable UDP: one line per message).
        nick: sent as ``/nick <nick>`` once the session starts; if the server refuses
            it (taken, invalid), the client stops before sending anything else.
        stdin, stdout: the user's side (default ``sys.stdin`` and ``sys.stdout``).
        interactive: prompt with line editing (default: when ``stdin`` is a terminal);
            otherwise send stdin lines as they come, paced to the server's stated
            limits, and leave after EOF.
        stay: piped mode: after EOF keep listening (print what arrives) until the server
            ends the session or the client is interrupted, instead of leaving.

    Returns:
        0 when the session ended normally (``/quit``, end of input, or the server shutting
        down); 1, after one line ``netlib: error: ...`` on ``sys.stderr``, when the
        connection failed, the server dropped us, the nick was refused, or (piped) a line
        was not delivered (refused or dropped by the server).
    """
    stdin = sys.stdin if stdin is None else stdin
    stdout = sys.stdout if stdout is None else stdout
    if interactive is None:
        interactive = _isatty(stdin)
    if interactive and importlib.util.find_spec("prompt_toolkit") is None:
        print(
            "netlib: error: the interactive chat needs prompt_toolkit: pip install "
            "'netlib-asyncio[cli]' (piped input works without it)",
            file=sys.stderr,
            flush=True,
        )
        return 1
    try:
        async with contextlib.AsyncExitStack() as stack:
            chat = _Chat(await _connect(stack, host, port, proto), stdout)
            if nick is not None:
                await chat.choose_nick(nick)
            if interactive:
                return await chat.run_interactive(stdin)
            return await chat.run_piped(stdin, stay=stay)
    except _Failure as exc:
        print(f"netlib: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no such method, or a closed file
        return False


# -- links ----------------------------------------------------------------------------------


async def _connect(stack: contextlib.AsyncExitStack, host: str, port: int, proto: str) -> _Link:
    """Connect (and for UDP, join) or raise ``_Failure`` saying why not."""
    where = f"{host}:{port}"
    try:
        if proto == "tcp":
            opening = connect_tcp(host, port, framing="line", close_timeout=CLOSE_TIMEOUT)
            return _TcpLink(await stack.enter_async_context(opening))
        if proto == "rudp":
            opening = connect_reliable_udp(host, port, framing="line", close_timeout=CLOSE_TIMEOUT)
            return _TcpLink(await stack.enter_async_context(opening))
        if proto == "udp":
            link = _UdpLink(await stack.enter_async_context(open_udp_endpoint(host, port)), where)
            await link.join()
            return link
    except (OSError, TimeoutError) as exc:
        raise _Failure(_connect_error(where, exc)) from exc
    raise ValueError(f"proto must be 'tcp', 'udp' or 'rudp', got {proto!r}")


def _connect_error(where: str, exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is the chat server running?)"
    if isinstance(exc, TimeoutError):
        return f"cannot connect to {where}: timed out"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"cannot connect to {where}: {reason}"


class _TcpLink:
    """Lines over a line-framed stream (TCP or reliable UDP); the session ends at EOF."""

    def __init__(self, stream: MessageStream) -> None:
        self._stream = stream

    async def send(self, line: str) -> None:
        await self._stream.send(line.encode())

    async def receive(self) -> str | None:
        try:
            data = await self._stream.receive()
        except EndOfStream:
            return None
        except (BrokenResourceError, ProtocolError) as exc:
            raise _Failure(f"connection to the server lost: {exc}") from exc
        return data.decode("utf-8", errors="replace")


class _UdpLink:
    """Lines as datagrams: the join handshake, heartbeats, and the end at the goodbye."""

    def __init__(self, endpoint: DatagramEndpoint, where: str) -> None:
        self._endpoint = endpoint
        self._where = where
        self._loop = asyncio.get_running_loop()
        self._next_beat = 0.0
        self._errors = 0
        self._confirmed = False  # a line other than a hello arrived since joining
        self._ended = False

    async def join(self) -> None:
        """Run the handshake: padded hello -> ``*** hello <cookie>`` -> ``/hello <cookie>``."""
        try:
            reply = await self._endpoint.request(
                _HELLO_REQUEST, timeout=HELLO_INTERVAL, retries=HELLO_ATTEMPTS - 1
            )
        except PeerTimedOut as exc:
            raise _Failure(
                f"no answer from {self._where} over UDP after {HELLO_ATTEMPTS} attempts "
                "(is the chat server running?)"
            ) from exc
        match = _HELLO.fullmatch(reply.decode("utf-8", errors="replace").rstrip("\r\n"))
        if match is None:
            text = _printable(reply.decode("utf-8", errors="replace"))
            raise _Failure(f"{self._where} refused to join: {text!r}")
        await self.send(f"/hello {match[1]}")
        self._errors = self._endpoint.statistics().errors_received

    async def send(self, line: str) -> None:
        await self._endpoint.send(line.encode())
        self._next_beat = self._loop.time() + HEARTBEAT_INTERVAL

    async def receive(self) -> str | None:
        while not self._ended:
            try:
                async with asyncio.timeout_at(self._next_beat):
                    data, _addr = await self._endpoint.receive()
            except TimeoutError:
                await self._heartbeat()
                continue
            line = self._accept(data.decode("utf-8", errors="replace").rstrip("\r\n"))
            if line is not None:
                return line
        return None

    def _accept(self, line: str) -> str | None:
        """Return the line to show, None to skip it; fail if the server forgot us."""
        if _HELLO.fullmatch(line):
            if self._confirmed:  # a heartbeat met a server that no longer knows us
                raise _Failure(f"{self._where} dropped this client (session expired)")
            return None  # a late answer to a resent handshake datagram
        if not line:
            return None
        self._confirmed = True
        self._ended = line in _LAST_LINES
        return line

    async def _heartbeat(self) -> None:
        errors = self._endpoint.statistics().errors_received
        if errors > self._errors:
            raise _Failure(f"{self._where} is gone (connection refused)")
        await self._endpoint.send(_HELLO_REQUEST)  # padded: an expired session gets a cookie
        self._next_beat = self._loop.time() + HEARTBEAT_INTERVAL


# -- the session ----------------------------------------------------------------------------


class _Chat:
    """One session: the pump prints incoming lines, the input sends the user's lines."""

    def __init__(self, link: _Link, stdout: TextIO) -> None:
        self._link = link
        self._loop = asyncio.get_running_loop()
        self._arrived = asyncio.Event()
        self._welcomed = asyncio.Event()  # a first line (the welcome) arrived
        self._left = False  # we sent /quit or over
        self._goodbye = False  # the server said goodbye, or that it is shutting down
        self._stdout = stdout
        self._above_prompt = False  # interactive: print above the prompt, then redraw it
        self._pace: TokenBucket | None = None  # from the limits the welcome states
        self._sent = 0  # lines sent that cost the server's flood control a token
        self._refused = 0  # "!!!" lines: a line of ours was refused
        self._flood_dropped = 0  # lines flood control reported dropped
        self._flood_open = 0  # 1 while a flood notice has no "lifted" count yet
        self._disconnected = ""  # the server's reason for cutting us off, if it gave one

    async def choose_nick(self, nick: str) -> None:
        """Send ``/nick <nick>`` and wait for the answer; raise ``_Failure`` if refused."""
        await self.say(f"/nick {nick}")
        try:
            async with asyncio.timeout(NICK_TIMEOUT):
                while (line := await self._link.receive()) is not None:
                    await self._take(line)
                    if line.startswith(_NICK_TAKEN):
                        return
                    if line.startswith("!!! "):  # the nick refused, or the server full
                        detail = line.removeprefix("!!! ")
                        raise _Failure(f"nick refused: {detail}" if "nick" in detail else detail)
        except TimeoutError:
            raise _Failure(f"no answer to /nick {nick} within {NICK_TIMEOUT:g} s") from None
        raise _Failure(self._closed_message())

    async def run_piped(self, stdin: TextIO, *, stay: bool = False) -> int:
        """Send stdin lines, print incoming lines; leave after EOF and a quiet period (or
        with ``stay``, when the server ends the session). Returns 1 if a line was not
        delivered."""
        lines = _StdinLines(stdin)
        try:
            status = await self._converse(self._read_piped(lines, stay=stay))
        finally:
            lines.close()
        undelivered = self._refused + self._flood_dropped + self._flood_open
        if status == 0 and undelivered:
            raise _Failure(
                f"{undelivered} {'line was' if undelivered == 1 else 'lines were'} not "
                "delivered (refused or dropped by the server; see the !!! lines)"
            )
        return status

    async def run_interactive(self, stdin: TextIO) -> int:
        """Prompt for lines; incoming lines are drawn above the prompt, never over it."""
        from prompt_toolkit import PromptSession
        from prompt_toolkit.application import create_app_session
        from prompt_toolkit.input import create_input
        from prompt_toolkit.output import create_output

        self._above_prompt = True
        with create_app_session(input=create_input(stdin), output=create_output(self._stdout)):
            session: PromptSession[str] = PromptSession(PROMPT)
            return await self._converse(self._read_prompt(session))

    async def _converse(self, user_input: Coroutine[Any, Any, bool]) -> int:
        pump = asyncio.create_task(self._pump())
        typing = asyncio.create_task(user_input)
        try:
            await asyncio.wait({pump, typing}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                await self._leave(pump, quit_sent=typing.result())
        finally:
            await _cancel(typing)
            if not pump.done():
                await _cancel(pump)
        return 0 if pump.cancelled() else pump.result()

    async def _pump(self) -> int:
        while (line := await self._link.receive()) is not None:
            await self._take(line)
        if self._goodbye or self._left:
            return 0
        raise _Failure(self._closed_message())

    async def _take(self, line: str) -> None:
        """Show an incoming line, and note what it says about the session."""
        self._arrived.set()
        self._welcomed.set()
        if line in _LAST_LINES:
            self._goodbye = True
        elif line.startswith(_DISCONNECTED):
            self._disconnected = line.removeprefix(_DISCONNECTED)
        elif line.startswith(_FLOOD_NOTICE):
            self._flood_open = 1
        elif line.startswith("!!! "):
            self._refused += 1
        elif (lifted := _FLOOD_LIFTED.match(line)) is not None:
            self._flood_dropped += int(lifted[1])
            self._flood_open = 0
        elif self._pace is None and (limits := _LIMITS.search(line)) is not None:
            self._pace_to(float(limits[1]), float(limits[2]))
        await self._show(self._stdout, _printable(line))

    def _pace_to(self, rate: float, burst: float) -> None:
        """Pace sending a little under the server's stated limits, counting what was sent."""
        if rate <= 0 or burst < 1:
            return
        now = self._loop.time()
        self._pace = TokenBucket(rate * PACE_MARGIN, max(1.0, burst - 1), now)
        self._pace.try_take(min(self._sent, self._pace.burst), now)

    async def _wait_for_token(self) -> None:
        pace = self._pace
        if pace is None:
            return
        now = self._loop.time()
        if (wait := pace.wait_time(1, now)) > 0:
            await asyncio.sleep(wait)
            now = max(self._loop.time(), now + wait)  # a loop may wake a timer early
        pace.try_take(min(1.0, pace.tokens(now)), now)  # one token, but for float rounding

    def _closed_message(self) -> str:
        if self._disconnected:
            return f"the server closed the connection: {self._disconnected}"
        return "the server closed the connection"

    async def _show(self, stream: TextIO, text: str) -> None:
        if self._above_prompt:
            from prompt_toolkit.application import run_in_terminal

            await run_in_terminal(lambda: _write(stream, text), in_executor=False)
        else:
            _write(stream, text)

    async def _leave(self, pump: asyncio.Future[int], *, quit_sent: bool) -> None:
        """Say ``/quit`` (unless done) and give the server CLOSE_TIMEOUT to say goodbye."""
        if not quit_sent:
            await self.say("/quit")
        await asyncio.wait({pump}, timeout=CLOSE_TIMEOUT)

    async def say(self, line: str) -> bool:
        """Send one user line; return True if it ends the session (or the link is gone)."""
        if not line.strip():
            return False
        leaving = _is_quit(line)
        self._left = self._left or leaving
        if not leaving:  # the server lets /quit and over through without a token
            await self._wait_for_token()
            self._sent += 1
        try:
            await self._link.send(line)
        except (ValueError, OverflowError) as exc:  # too long for a line or a datagram
            await self._show(sys.stderr, f"netlib: warning: line not sent: {exc}")
        except (BrokenResourceError, ClosedResourceError):
            return True  # the pump reports why
        return leaving

    async def _read_piped(self, lines: _StdinLines, *, stay: bool) -> bool:
        with contextlib.suppress(TimeoutError):  # the welcome states the pace
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._welcomed.wait()
        while (line := await lines.next()) is not None:
            if await self.say(line):
                return True
        if stay:
            await self._loop.create_future()  # until the server ends it, or interrupted
        await self._quiet()
        return False

    async def _quiet(self) -> None:
        """Wait until no line has arrived for QUIET_PERIOD (at most LINGER_LIMIT)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_LIMIT):
                while True:
                    self._arrived.clear()
                    try:
                        async with asyncio.timeout(QUIET_PERIOD):
                            await self._arrived.wait()
                    except TimeoutError:
                        return

    async def _read_prompt(self, session: PromptSession[str]) -> bool:
        while True:
            try:
                line = await session.prompt_async()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C
                return False
            if await self.say(line):
                return True


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# -- terminal side --------------------------------------------------------------------------


def _is_quit(line: str) -> bool:
    """Whether the server ends the session on ``line`` (``/quit [reason]`` or ``over``)."""
    return line.strip().casefold() == "over" or _QUIT.fullmatch(line) is not None


def _printable(line: str) -> str:
    """``line`` without control characters (tab kept), so it cannot drive a terminal."""
    return _UNPRINTABLE.sub("", line)


def _write(stream: TextIO, text: str) -> None:
    """Write one line and flush, replacing what the stream's encoding cannot show."""
    try:
        stream.write(text + "\n")
    except UnicodeEncodeError:
        encoding = stream.encoding or "ascii"
        stream.write(text.encode(encoding, errors="replace").decode(encoding) + "\n")
    stream.flush()


class _StdinLines:
    """Lines from a blocking text stream, read in a daemon thread one request at a time.

    A daemon thread, not the loop's executor: a read that never returns (an open, silent
    pipe) must not keep the loop or the process from finishing.
    """

    def __init__(self, stdin: TextIO) -> None:
        self._readline = _line_reader(stdin)
        self._loop = asyncio.get_running_loop()
        self._wanted = threading.Semaphore(0)
        self._waiter: asyncio.Future[str] | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    async def next(self) -> str | None:
        """Return the next line without its line end, or None at EOF."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="netlib-chat-stdin")
            self._thread.daemon = True
            self._thread.start()
        self._waiter = self._loop.create_future()
        self._wanted.release()
        line = await self._waiter
        return line.rstrip("\r\n") if line else None

    def close(self) -> None:
        """Let the thread finish once its current read returns."""
        self._closed = True
        self._wanted.release()

    def _run(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            line = self._readline()
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._deliver, line)
            if not line:
                return

    def _deliver(self, line: str) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(line)


def _line_reader(stdin: TextIO) -> Callable[[], str]:
    """Return a function reading one line ('' at EOF or on a read error), UTF-8 decoded."""
    binary = getattr(stdin, "buffer", None)

    def readline() -> str:
        try:
            if binary is not None:
                return str(binary.readline().decode("utf-8", errors="replace"))
            return stdin.readline()
        except (OSError, ValueError):
            return ""

    return readline
