"""serve_files / open_file_server, and the client: download_file, list_files.

The server is the HTTP/1.1 file service of ``netlib.services.files`` on netlib's
``Server`` (accept loop, caps, memory budget, graceful shutdown), so ``curl``, ``wget``
and browsers are clients too. The client speaks HTTP/1.1 to netlib's server or any other:
it downloads to ``PATH.part`` and renames it into place once complete (and verified
against the server's ``Repr-Digest``, when it sends one), and resumes an interrupted
download with ``Range`` and ``If-Range``, so it continues only an unchanged file.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import ssl as _ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Final
from urllib.parse import quote, unquote, urlsplit

import h11
from typing_extensions import Unpack

from netlib.aio.sockets import format_address
from netlib.aio.stream import StreamProtocol
from netlib.errors import (
    BrokenResourceError,
    DigestMismatch,
    EndOfStream,
    PeerTimedOut,
    ProtocolError,
    RequestRefused,
)
from netlib.sansio.files import parse_repr_digest
from netlib.sansio.framing import RawFraming
from netlib.sansio.stream import StreamLimits
from netlib.server import Server, TCPServerOptions, open_tcp_server
from netlib.services.files import FileService, FileServiceLimits, FileServiceStatistics
from netlib.streams import MessageStream

__all__ = [
    "DEFAULT_FILE_SEND_TIMEOUT",
    "DownloadResult",
    "FileServer",
    "download_file",
    "file_url",
    "list_files",
    "open_file_server",
    "serve_files",
]

DEFAULT_FILE_SEND_TIMEOUT: Final = 60.0
"""Seconds a download may make no progress (the client stopped reading) before the file
server cuts the connection off."""
DEFAULT_CLIENT_TIMEOUT: Final = 30.0
"""Seconds the client waits for the server's next bytes before giving up."""
_CHUNK: Final = 1024 * 1024


@dataclass
class FileServer:
    """A running file server (from ``open_file_server``).

    Attributes:
        server: the TCP ``Server`` (connection statistics, ``addresses``).
        service: the file service (``statistics()``: requests, bytes sent, ...).
        tls: whether it serves TLS (HTTPS).
    """

    server: Server
    service: FileService
    tls: bool = False

    @property
    def addresses(self) -> list[Any]:
        return self.server.addresses

    @property
    def url(self) -> str:
        """The URL of the root on the first bound address (``https://`` with TLS)."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{format_address(self.server.addresses[0])}/"

    def statistics(self) -> FileServiceStatistics:
        return self.service.statistics()


@asynccontextmanager
async def open_file_server(
    root: str | os.PathLike[str],
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    limits: FileServiceLimits | None = None,
    **options: Unpack[TCPServerOptions],
) -> AsyncIterator[FileServer]:
    """Serve the files below ``root`` over HTTP/1.1 for the duration of the ``async with``.

    Args:
        root: the directory served. Nothing outside it is ever sent: no symbolic link is
            followed, and FIFOs, devices and hidden names are refused.
        host, port: where to listen (default loopback; port 0 picks a free one).
        limits: the service's limits (header size, requests per connection, keep-alive
            and request timeouts, concurrent downloads): ``FileServiceLimits``.
        options: ``open_tcp_server`` options (``ssl=`` a server ``SSLContext`` serves
            HTTPS). By default the first-message deadline is the request timeout, there is
            no idle deadline (the service times idle kept-alive connections itself) and a
            client that stops reading for ``DEFAULT_FILE_SEND_TIMEOUT`` seconds is cut off.

    Raises:
        NotADirectoryError, FileNotFoundError, PermissionError: ``root`` cannot be served.
    """
    service = FileService(root, limits)
    options.setdefault("first_frame_timeout", service.limits.request_timeout)
    options.setdefault("idle_timeout", None)
    options.setdefault("send_timeout", DEFAULT_FILE_SEND_TIMEOUT)
    options["framing"] = "raw"
    try:
        async with open_tcp_server(service.handle, host, port, **options) as server:
            yield FileServer(server, service, tls=options.get("ssl") is not None)
    finally:
        service.close()


async def serve_files(
    root: str | os.PathLike[str],
    host: str | None = "127.0.0.1",
    port: int = 0,
    *,
    limits: FileServiceLimits | None = None,
    **options: Unpack[TCPServerOptions],
) -> None:
    """Serve the files below ``root`` until cancelled; then shut down gracefully.

    Takes the same arguments as ``open_file_server``.
    """
    async with open_file_server(root, host, port, limits=limits, **options) as server:
        await server.server.serve_forever()


# -- the client -----------------------------------------------------------------------------


@dataclass
class DownloadResult:
    """What ``download_file`` did.

    Attributes:
        url: the file's URL.
        path: where the file is now.
        size: the file's size in bytes.
        received: bytes received by this call (less than ``size`` after a resume).
        resumed_from: the byte the download continued from (0: from the start).
        restarted: a partial download was found but the file had changed (or the
            server cannot resume), so it was fetched whole.
        sha256: the file's SHA-256 (hex), when the server sent one.
        verified: the file matched the server's SHA-256.
        seconds: how long the transfer took.
        headers: the reply's headers (names in lower case).
    """

    url: str
    path: str
    size: int
    received: int
    resumed_from: int = 0
    restarted: bool = False
    sha256: str | None = None
    verified: bool = False
    seconds: float = 0.0
    headers: dict[str, str] = field(default_factory=dict, repr=False)


Progress = Callable[[int, int | None], object]
"""``progress(done, total)``: bytes of the file on disk so far, and its size if known."""


def file_url(
    name_or_url: str, host: str = "127.0.0.1", port: int = 8000, *, tls: bool = False
) -> str:
    """``name_or_url`` if it is an http(s) URL, else the URL of that name on ``host:port``
    (``https://`` with ``tls``)."""
    if name_or_url.startswith(("http://", "https://")):
        return name_or_url
    scheme = "https" if tls else "http"
    return f"{scheme}://{format_address((host, port))}/{quote(name_or_url.lstrip('/'))}"


async def download_file(
    url: str,
    path: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    ssl: _ssl.SSLContext | None = None,
) -> DownloadResult:
    """Download ``url`` (``http://`` or ``https://``) to ``path`` (default: the URL's last
    name).

    The bytes go to ``PATH.part`` (its validator, the ``ETag`` or ``Last-Modified``, to
    ``PATH.part.json``), which becomes ``PATH`` when complete and verified. With
    ``resume``, an existing ``PATH.part`` is continued with ``Range`` and ``If-Range``:
    the server sends the rest only if the file is unchanged, else the whole file, and the
    download starts over (``restarted``). The body is received straight into 4 MiB
    buffers and hashed in a worker thread as it comes (``MessageStream.receive_file``).

    ``ssl`` is the client context for an ``https://`` URL (default: the system's
    certificate authorities, ``ssl.create_default_context()``); the certificate must
    name the URL's host.

    Raises:
        RequestRefused: the server answered with an error (404, 403, ...).
        BrokenResourceError: the connection was lost (``PATH.part`` stays, to resume).
        PeerTimedOut: no bytes came for ``read_timeout`` seconds.
        DigestMismatch: the file does not match the server's SHA-256 (it is removed).
        OSError: the connection failed, or the file cannot be written (``ssl.SSLError``:
            the TLS handshake failed, the certificate was not trusted).
        ValueError: ``url`` is not an http(s) URL with a file name, or ``ssl`` is given
            for an ``http://`` URL.
    """
    where = _split_url(url, ssl)
    target = where.target
    if path is None:
        path = unquote(target.split("?", 1)[0].rstrip("/").rpartition("/")[2])
        if not path or path in (".", ".."):
            raise ValueError(f"{url} names no file: give a path to save it to")
    path = os.fspath(path)
    part, meta = path + ".part", path + ".part.json"
    offset, validator = _partial(part, meta, url) if resume else (0, None)
    started = time.monotonic()
    headers = [(b"accept-encoding", b"identity")]
    last = b""
    if offset and validator:
        # from the part's last byte: a complete part still gets a 206 (one byte, compared
        # with the part's), where asking from its end would get a 416
        last = _last_byte(part)
        headers += [(b"range", b"bytes=%d-" % (offset - 1)), (b"if-range", validator.encode())]
    else:
        offset = 0
    mismatch = False
    received: int | None = None
    expected: bytes | None = None
    sha: Any = None  # a hashlib object, when the server sends a digest
    async with _request(where, headers, read_timeout) as response:
        status = response.status
        restarted = False
        if status == 416 and offset:  # the part is longer than the file: fetch it whole
            mismatch = True
        elif status not in (200, 206):
            raise RequestRefused(status, await response.reason_line())
        else:
            size = response.length
            if status == 206:
                start, total = _content_range(response.header("content-range"))
                if not offset or start != offset - 1:
                    raise ProtocolError(f"asked for bytes from {offset - 1}, got from {start}")
                size = total
            else:
                restarted = offset > 0
                offset, last = 0, b""
            expected = parse_repr_digest(response.header("repr-digest"))
            _write_meta(meta, url, _validator(response))
            sha = None
            if expected is not None:  # hashed as it comes, from what the part has so far
                sha = await asyncio.to_thread(_prefix_sha256, part, offset)
            with _open_part(part, append=status == 206) as out:
                received = await _save_body(
                    response, out.fileno(), offset, size, last, sha, progress
                )
            mismatch = received is None
    if mismatch:  # the part is no prefix of this file: fetch it whole
        _remove(part, meta)
        result = await download_file(
            url, path, resume=False, progress=progress, read_timeout=read_timeout, ssl=ssl
        )
        result.restarted = True
        return result
    assert received is not None
    sha256: str | None = None
    if sha is not None and expected is not None:
        actual = sha.digest()
        sha256 = actual.hex()
        if actual != expected:
            _remove(part, meta)
            raise DigestMismatch(
                f"SHA-256 of the download is {actual.hex()}, the server said {expected.hex()}"
            )
    os.replace(part, path)
    _remove(meta)
    return DownloadResult(
        url=url,
        path=path,
        size=offset + received,
        received=received,
        resumed_from=offset,
        restarted=restarted,
        sha256=sha256,
        verified=sha is not None,
        seconds=time.monotonic() - started,
        headers=response.headers,
    )


async def _save_body(
    response: _Response,
    fd: int,
    offset: int,
    size: int | None,
    last: bytes,
    sha: Any,
    progress: Progress | None,
) -> int | None:
    """Write the body of ``response`` to ``fd`` (the part, at byte ``offset``); returns the
    bytes written, or None if the body's first byte is not ``last`` (a resume's overlap).

    h11 reads the head and whatever it holds of the body; a body with a Content-Length
    is then received with ``MessageStream.receive_file`` (large buffers straight from the
    transport, hashed in a thread as they come), any other (chunked, or up to the close)
    through h11.
    """
    received = 0

    def report(done: int) -> None:
        if progress is not None:
            progress(offset + received + done, size)

    report(0)
    seen = 0  # body bytes h11 handed over, the overlap included
    while True:
        chunk = await response.next_data(read=bool(last))
        if chunk is None:
            break
        seen += len(chunk)
        if last:
            if chunk[:1] != last:
                return None  # unchanged, says the validator: but not so
            chunk, last = chunk[1:], b""
        if chunk:
            _write_all(fd, chunk)
            if sha is not None:
                sha.update(chunk)
            received += len(chunk)
            report(0)
    if response.complete:
        return received
    if response.length is None or response.chunked:
        async for chunk in response.body():
            _write_all(fd, chunk)
            if sha is not None:
                sha.update(chunk)
            received += len(chunk)
            report(0)
        return received
    left = response.length - seen
    try:
        received += await response.stream.receive_file(
            fd, left, digest=sha, progress=report, idle_timeout=response.timeout
        )
    except PeerTimedOut:
        raise PeerTimedOut(f"no data from the server for {response.timeout:g}s") from None
    except BrokenResourceError:
        raise BrokenResourceError("the connection closed before the end of the file") from None
    return received


async def list_files(
    url: str, *, read_timeout: float = DEFAULT_CLIENT_TIMEOUT, ssl: _ssl.SSLContext | None = None
) -> list[dict[str, Any]]:
    """The entries of the directory at ``url`` on a netlib file server: dicts with
    ``name``, ``type`` (``file`` or ``directory``), ``size`` and ``mtime``. ``ssl``: as
    for ``download_file``.

    Raises:
        RequestRefused: the server answered with an error, or not with a JSON listing.
    """
    where = _split_url(url, ssl)
    target = where.target
    if not target.split("?", 1)[0].endswith("/"):
        target = target.replace("?", "/?", 1) if "?" in target else target + "/"
    headers = [(b"accept", b"application/json")]
    async with _request(replace(where, target=target), headers, read_timeout) as response:
        if response.status != 200:
            raise RequestRefused(response.status, await response.reason_line())
        body = b"".join([chunk async for chunk in response.body()])
    try:
        entries: list[dict[str, Any]] = json.loads(body)["entries"]
    except (ValueError, KeyError, TypeError):
        refusal = "the server sent no JSON listing (not a netlib file server?)"
        raise RequestRefused(200, refusal) from None
    return entries


# -- HTTP/1.1 over a MessageStream ------------------------------------------------------------


class _Response:
    def __init__(
        self, conn: h11.Connection, stream: MessageStream, event: h11.Response, timeout: float
    ) -> None:
        self._conn = conn
        self._stream = stream
        self.status = event.status_code
        self.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
        self._timeout = timeout
        length = self.headers.get("content-length")
        self.length = int(length) if length is not None and length.isdigit() else None

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def stream(self) -> MessageStream:
        return self._stream

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def chunked(self) -> bool:
        return "transfer-encoding" in self.headers

    @property
    def complete(self) -> bool:
        """Whether h11 has seen the end of the body."""
        return self._conn.their_state is not h11.SEND_BODY

    async def next_data(self, *, read: bool) -> bytes | None:
        """The next piece of the body h11 holds (with ``read``, reading for one if it holds
        none); None when it holds none (or the body is complete)."""
        if self.complete:
            return None
        if read:
            event = await _client_event(self._conn, self._stream, self._timeout)
        else:
            try:
                event = self._conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ProtocolError(f"the server broke HTTP/1.1: {exc}") from None
            if event is h11.NEED_DATA:
                return None
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise BrokenResourceError("the connection closed before the end of the file")

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            event = await _client_event(self._conn, self._stream, self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise BrokenResourceError("the connection closed before the end of the file")

    async def reason_line(self) -> str:
        try:
            chunks = []
            size = 0
            async for chunk in self.body():
                chunks.append(chunk)
                size += len(chunk)
                if size > 4096:
                    break
            text = b"".join(chunks).decode("utf-8", "replace").strip().splitlines()
        except (BrokenResourceError, ProtocolError):
            text = []
        line = text[0] if text and len(text[0]) < 200 and "<" not in text[0] else ""
        prefix = f"{self.status} "
        return line.removeprefix(prefix) if line else _STATUS_TEXT.get(self.status, "error")


_STATUS_TEXT: Final = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    416: "Range Not Satisfiable",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class _Target:
    host: str
    port: int
    target: str  # the request target: path and query
    ssl: _ssl.SSLContext | None  # https


@asynccontextmanager
async def _request(
    where: _Target, headers: list[tuple[bytes, bytes]], read_timeout: float
) -> AsyncIterator[_Response]:
    host, port = where.host, where.port
    async with _connect(where, read_timeout) as stream:
        conn = h11.Connection(h11.CLIENT)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = h11.Request(
            method="GET",
            target=where.target.encode(),
            headers=[
                (b"host", authority.encode()),
                (b"user-agent", b"netlib"),
                (b"connection", b"close"),
                *headers,
            ],
        )
        await stream.send(conn.send(request) or b"")
        await stream.send(conn.send(h11.EndOfMessage()) or b"")
        while True:
            event = await _client_event(conn, stream, read_timeout)
            if isinstance(event, h11.Response):
                break
            if not isinstance(event, h11.InformationalResponse):
                raise BrokenResourceError("the server closed the connection without a reply")
        yield _Response(conn, stream, event, read_timeout)


@asynccontextmanager
async def _connect(where: _Target, connect_timeout: float) -> AsyncIterator[MessageStream]:
    """A raw stream to the target's host and port, over TLS for https (what
    ``connect_tcp`` does; the public verbs do not import each other)."""
    protocol = StreamProtocol(RawFraming(), StreamLimits())
    loop = asyncio.get_running_loop()
    tls: dict[str, Any] = {}
    if where.ssl is not None:
        tls = {"ssl": where.ssl, "server_hostname": where.host}
        tls["ssl_handshake_timeout"] = connect_timeout
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: protocol, where.host, where.port, **tls)
    except BaseException:
        protocol.abort()
        raise
    stream = MessageStream(protocol)
    try:
        yield stream
    finally:
        await stream.aclose()


async def _client_event(conn: h11.Connection, stream: MessageStream, read_timeout: float) -> Any:
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            if conn.their_state is h11.ERROR and _ended(conn):
                raise BrokenResourceError("the server closed the connection too early") from None
            raise ProtocolError(f"the server broke HTTP/1.1: {exc}") from None
        if event is not h11.NEED_DATA:
            return event
        try:
            async with asyncio.timeout(read_timeout):
                data = await stream.receive()
        except EndOfStream:
            data = b""
        except TimeoutError:
            raise PeerTimedOut(f"no data from the server for {read_timeout:g}s") from None
        conn.receive_data(data)


def _ended(conn: h11.Connection) -> bool:
    """Whether the server's EOF has been received."""
    return conn.trailing_data[1]


def _split_url(url: str, context: _ssl.SSLContext | None) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL: {url!r}")
    https = parts.scheme == "https"
    if context is not None and not https:
        raise ValueError(f"a TLS context was given for {url!r}: use an https:// URL")
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    if https and context is None:
        context = _ssl.create_default_context()
    return _Target(parts.hostname, port, target, context)


def _partial(part: str, meta: str, url: str) -> tuple[int, str | None]:
    """The size of a partial download of ``url`` and its validator, if one can resume."""
    try:
        with open(meta) as file:
            saved = json.load(file)
        size = os.path.getsize(part)
    except (OSError, ValueError):
        return 0, None
    if not isinstance(saved, dict) or saved.get("url") != url:
        return 0, None
    validator = saved.get("validator")
    return (size, validator) if isinstance(validator, str) and size else (0, None)


def _validator(response: _Response) -> str | None:
    etag = response.header("etag")
    if etag and not etag.startswith("W/"):  # If-Range takes only a strong validator
        return etag
    return response.header("last-modified")


def _content_range(value: str | None) -> tuple[int, int | None]:
    try:
        _unit, _, spec = (value or "").partition(" ")
        span, _, total = spec.partition("/")
        start = int(span.partition("-")[0])
        return start, None if total == "*" else int(total)
    except ValueError:
        raise ProtocolError(f"bad Content-Range {value!r}") from None


def _last_byte(part: str) -> bytes:
    with open(part, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1)


def _write_meta(meta: str, url: str, validator: str | None) -> None:
    with open(meta, "w") as file:
        json.dump({"url": url, "validator": validator}, file)


def _open_part(part: str, *, append: bool) -> BinaryIO:
    """Unbuffered: what was received is written within ``RECEIVE_FILE_FLUSH_DELAY`` (0.1 s;
    at once on an error or a cancellation), and in order, so even a killed client leaves a
    part that is a prefix of the file, ready to resume."""
    return open(part, "ab" if append else "wb", buffering=0)


def _prefix_sha256(path: str, size: int) -> Any:
    """A SHA-256 object fed the first ``size`` bytes of ``path``."""
    sha = hashlib.sha256()
    if size:
        with open(path, "rb") as file:
            while size and (chunk := file.read(min(_CHUNK, size))):
                sha.update(chunk)
                size -= len(chunk)
    return sha


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
