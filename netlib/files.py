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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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
    """

    server: Server
    service: FileService

    @property
    def addresses(self) -> list[Any]:
        return self.server.addresses

    @property
    def url(self) -> str:
        """The URL of the root on the first bound address."""
        return f"http://{format_address(self.server.addresses[0])}/"

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
        options: ``open_tcp_server`` options. By default the first-message deadline is
            the request timeout, there is no idle deadline (the service times idle
            kept-alive connections itself) and a client that stops reading for
            ``DEFAULT_FILE_SEND_TIMEOUT`` seconds is cut off.

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
            yield FileServer(server, service)
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


def file_url(name_or_url: str, host: str = "127.0.0.1", port: int = 8000) -> str:
    """``name_or_url`` if it is an http URL, else the URL of that name on ``host:port``."""
    if name_or_url.startswith(("http://", "https://")):
        return name_or_url
    return f"http://{format_address((host, port))}/{quote(name_or_url.lstrip('/'))}"


async def download_file(
    url: str,
    path: str | os.PathLike[str] | None = None,
    *,
    resume: bool = True,
    progress: Progress | None = None,
    read_timeout: float = DEFAULT_CLIENT_TIMEOUT,
) -> DownloadResult:
    """Download ``url`` (``http://``) to ``path`` (default: the URL's last name).

    The bytes go to ``PATH.part`` (its validator, the ``ETag`` or ``Last-Modified``, to
    ``PATH.part.json``), which becomes ``PATH`` when complete and verified. With
    ``resume``, an existing ``PATH.part`` is continued with ``Range`` and ``If-Range``:
    the server sends the rest only if the file is unchanged, else the whole file, and the
    download starts over (``restarted``).

    Raises:
        RequestRefused: the server answered with an error (404, 403, ...).
        BrokenResourceError: the connection was lost (``PATH.part`` stays, to resume).
        PeerTimedOut: no bytes came for ``read_timeout`` seconds.
        DigestMismatch: the file does not match the server's SHA-256 (it is removed).
        OSError: the connection failed, or the file cannot be written.
        ValueError: ``url`` is not an http URL with a file name.
    """
    host, port, target = _split_url(url)
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
    async with _request(host, port, target, headers, read_timeout) as response:
        status = response.status
        restarted = False
        if status == 416 and offset:  # the part is longer than the file: fetch it whole
            mismatch = True
        elif status not in (200, 206):
            raise RequestRefused(status, await response.reason_line())
        else:
            size = response.length
            overlap = 0
            if status == 206:
                start, total = _content_range(response.header("content-range"))
                if not offset or start != offset - 1:
                    raise ProtocolError(f"asked for bytes from {offset - 1}, got from {start}")
                size, overlap = total, 1
            else:
                restarted = offset > 0
                offset = 0
            _write_meta(meta, url, _validator(response))
            received = 0
            with _open_part(part, append=status == 206) as out:
                if progress is not None:
                    progress(offset, size)
                async for chunk in response.body():
                    if overlap:
                        if chunk[:1] != last:
                            mismatch = True  # unchanged, says the validator: but not so
                            break
                        chunk, overlap = chunk[1:], 0
                    out.write(chunk)
                    received += len(chunk)
                    if progress is not None:
                        progress(offset + received, size)
    if mismatch:  # the part is no prefix of this file: fetch it whole
        _remove(part, meta)
        result = await download_file(
            url, path, resume=False, progress=progress, read_timeout=read_timeout
        )
        result.restarted = True
        return result
    expected = parse_repr_digest(response.header("repr-digest"))
    sha256: str | None = None
    if expected is not None:
        actual = await asyncio.to_thread(_file_sha256, part)
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
        verified=expected is not None,
        seconds=time.monotonic() - started,
        headers=response.headers,
    )


async def list_files(
    url: str, *, read_timeout: float = DEFAULT_CLIENT_TIMEOUT
) -> list[dict[str, Any]]:
    """The entries of the directory at ``url`` on a netlib file server: dicts with
    ``name``, ``type`` (``file`` or ``directory``), ``size`` and ``mtime``.

    Raises:
        RequestRefused: the server answered with an error, or not with a JSON listing.
    """
    host, port, target = _split_url(url)
    if not target.split("?", 1)[0].endswith("/"):
        target = target.replace("?", "/?", 1) if "?" in target else target + "/"
    headers = [(b"accept", b"application/json")]
    async with _request(host, port, target, headers, read_timeout) as response:
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


@asynccontextmanager
async def _request(
    host: str, port: int, target: str, headers: list[tuple[bytes, bytes]], read_timeout: float
) -> AsyncIterator[_Response]:
    async with _connect(host, port, read_timeout) as stream:
        conn = h11.Connection(h11.CLIENT)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = h11.Request(
            method="GET",
            target=target.encode(),
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
async def _connect(host: str, port: int, connect_timeout: float) -> AsyncIterator[MessageStream]:
    """A raw stream to ``host:port`` (what ``connect_tcp`` does; the public verbs do not
    import each other)."""
    protocol = StreamProtocol(RawFraming(), StreamLimits())
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: protocol, host, port)
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


def _split_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, port, target


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
    """Unbuffered: what was received is on disk at once, so even a killed client leaves a
    part that is a prefix of the file, ready to resume."""
    return open(part, "ab" if append else "wb", buffering=0)


def _file_sha256(path: str) -> bytes:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            sha.update(chunk)
    return sha.digest()


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
