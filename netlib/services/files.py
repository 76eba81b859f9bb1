"""The file service: HTTP/1.1 (through the sans-I/O ``h11``) over a raw ``MessageStream``.

``FileService(root).handle`` is a ``serve_tcp`` handler. Per connection it reads requests
with ``h11`` (heads of at most ``max_header_bytes``), answers ``GET`` and ``HEAD``, and
keeps the connection open for the next request (at most ``max_requests`` per connection,
``keepalive_timeout`` seconds between them).

What a request may reach: ``netlib.sansio.files.split_target`` refuses ``..``, hidden
names, NULs and malformed encodings; the remaining components are opened one by one from
a descriptor of the root with ``O_NOFOLLOW``, so no symbolic link is followed (one inside
the root is refused too) and a path cannot leave the root whatever changes on disk
meanwhile. The last component is examined with ``lstat`` before it is opened: a FIFO, a
device or a socket is refused without being opened (a FIFO would block), and the file is
opened ``O_NONBLOCK`` and checked again with ``fstat`` (it must be the same regular file).

A file is sent with ``MessageStream.sendfile`` (the kernel's ``sendfile``; bounded chunks
over TLS); ``Range`` (one range), ``If-Range`` and
``If-None-Match`` follow RFC 9110 with a strong ``ETag`` per file version, and every reply
carries the SHA-256 of the whole file in ``Repr-Digest`` (RFC 9530), computed in a thread
once per version and cached.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import mimetypes
import os
import stat
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Final, cast

import h11

from netlib.errors import BrokenResourceError, EndOfStream, NetlibError
from netlib.sansio.files import (
    DEFAULT_DIGEST_CACHE_ENTRIES,
    ByteRange,
    DigestCache,
    Entry,
    FileVersion,
    PathRefused,
    RangeNotSatisfiable,
    content_range,
    etag_for,
    listing_html,
    listing_json,
    parse_range,
    repr_digest,
    split_target,
)
from netlib.streams import MessageStream

__all__ = [
    "DEFAULT_KEEPALIVE_TIMEOUT",
    "DEFAULT_MAX_DOWNLOADS",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_REQUESTS",
    "DEFAULT_REQUEST_TIMEOUT",
    "FileService",
    "FileServiceLimits",
    "FileServiceStatistics",
]

logger = logging.getLogger("netlib.files")

DEFAULT_MAX_HEADER_BYTES: Final = 16 * 1024
"""Bytes a request's head (request line and headers) may take."""
DEFAULT_MAX_REQUESTS: Final = 1000
"""Requests one connection may make before the server closes it after the reply."""
DEFAULT_KEEPALIVE_TIMEOUT: Final = 15.0
"""Seconds an idle kept-alive connection may wait before its next request."""
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
"""Seconds a new connection has to send a complete request head (slowloris guard)."""
DEFAULT_MAX_DOWNLOADS: Final = 1024
"""Files sent at once; a request above it is answered 503 with ``Retry-After``."""

_SERVER: Final = b"netlib"
_OPEN_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_FILE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_HASH_CHUNK: Final = 1024 * 1024
_REASONS: Final = {
    200: b"OK",
    206: b"Partial Content",
    301: b"Moved Permanently",
    304: b"Not Modified",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    414: b"URI Too Long",
    416: b"Range Not Satisfiable",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class FileServiceLimits:
    """The file service's limits (see the ``DEFAULT_*`` constants of this module)."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_requests: int = DEFAULT_MAX_REQUESTS
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_downloads: int = DEFAULT_MAX_DOWNLOADS
    digest_cache_entries: int = DEFAULT_DIGEST_CACHE_ENTRIES


@dataclass
class FileServiceStatistics:
    """What a file service has done.

    Attributes:
        requests: requests answered.
        files_sent: file bodies sent whole (206 parts included).
        bytes_sent: file bytes sent.
        partial: 206 replies.
        not_modified: 304 replies.
        listings: directory listings.
        refused: 4xx replies (refused paths, missing files, bad requests).
        busy: 503 replies (``max_downloads`` reached).
        interrupted: downloads whose connection was lost before the end.
        downloads: files being sent now.
        digests_computed: SHA-256 computations (one per file version).
    """

    requests: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    partial: int = 0
    not_modified: int = 0
    listings: int = 0
    refused: int = 0
    busy: int = 0
    interrupted: int = 0
    downloads: int = 0
    digests_computed: int = 0


class _Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FileService:
    """Serves the files below ``root`` over HTTP/1.1; ``handle`` is a ``serve_tcp`` handler.

    Call ``close()`` when done (it closes the root's descriptor).
    """

    def __init__(self, root: str | os.PathLike[str], limits: FileServiceLimits | None = None):
        self.limits = limits or FileServiceLimits()
        self.root = os.path.realpath(root)
        self._root_fd = os.open(self.root, _OPEN_DIR)
        self._digests = DigestCache(self.limits.digest_cache_entries)
        self._hashing: dict[FileVersion, asyncio.Future[bytes]] = {}
        self._stats = FileServiceStatistics()

    def statistics(self) -> FileServiceStatistics:
        return FileServiceStatistics(**vars(self._stats))

    def close(self) -> None:
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    # -- the connection ---------------------------------------------------------------------

    async def handle(self, stream: MessageStream) -> None:
        """Answer the requests of one connection."""
        limits = self.limits
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        served = 0
        while True:
            timeout = limits.request_timeout if served == 0 else limits.keepalive_timeout
            try:
                async with asyncio.timeout(timeout):
                    event = await _next_event(conn, stream)
            except TimeoutError:
                if served == 0 or conn.their_state is not h11.IDLE:
                    await self._answer_error(conn, stream, 408, "request timed out")
                return
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                await self._answer_error(conn, stream, status, "malformed request")
                return
            except (EndOfStream, BrokenResourceError):
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            served += 1
            if _head_size(event) > limits.max_header_bytes:  # arrived whole in one read
                await self._answer_error(conn, stream, 431, "request head too large")
                return
            keep = served < limits.max_requests and not _has_body(conn)
            try:
                await self._respond(conn, stream, event, keep)
            except h11.LocalProtocolError:
                stream.abort()
                return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return  # "connection: close" either way, or a body left unread
            conn.start_next_cycle()

    async def _respond(
        self, conn: h11.Connection, stream: MessageStream, request: h11.Request, keep: bool
    ) -> None:
        self._stats.requests += 1
        method = request.method
        if method not in (b"GET", b"HEAD"):
            await self._answer_error(conn, stream, 405, "only GET and HEAD", keep)
            return
        headers = _headers(request)
        head = method == b"HEAD"
        try:
            parts = split_target(request.target)
        except PathRefused as exc:
            await self._answer_error(conn, stream, exc.status, exc.reason, keep)
            return
        try:
            fd, st = self._open(parts)
        except _Refused as exc:
            await self._answer_error(conn, stream, exc.status, exc.reason, keep)
            return
        as_directory = request.target.split(b"?", 1)[0].endswith(b"/")
        if as_directory and not stat.S_ISDIR(st.st_mode):
            os.close(fd)
            await self._answer_error(conn, stream, 404, "not a directory", keep)
            return
        try:
            if stat.S_ISDIR(st.st_mode):
                await self._send_listing(conn, stream, request, parts, fd, head, keep)
            else:
                await self._send_file(conn, stream, parts, headers, fd, st, head, keep)
        except NetlibError:
            raise
        except OSError as exc:  # a directory that cannot be listed, a disk that fails
            logger.info("cannot serve /%s: %s", "/".join(parts), exc)
            refusal = _refusal(exc)
            status = refusal.status if refusal.status in (403, 404) else 500
            await self._answer_error(conn, stream, status, refusal.reason, keep=False)
        finally:
            os.close(fd)

    # -- resolving a path -------------------------------------------------------------------

    def _open(self, parts: list[str]) -> tuple[int, os.stat_result]:
        """Open what ``parts`` names below the root, following no link: a regular file or
        a directory, never anything else (checked before the open)."""
        if self._root_fd < 0:
            raise _Refused(503, "the server is closing")
        current = os.dup(self._root_fd)
        try:
            for part in parts[:-1]:
                parent, current = current, -1
                try:
                    current = os.open(part, _OPEN_DIR, dir_fd=parent)
                finally:
                    os.close(parent)
            if not parts:
                fd = os.dup(current)
                return fd, os.fstat(fd)
            name = parts[-1]
            before = os.stat(name, dir_fd=current, follow_symlinks=False)
            if stat.S_ISDIR(before.st_mode):
                flags = _OPEN_DIR
            elif stat.S_ISREG(before.st_mode):
                flags = _OPEN_FILE
            elif stat.S_ISLNK(before.st_mode):
                raise _Refused(403, "symbolic links are not followed")
            else:
                raise _Refused(403, "not a regular file")
            fd = os.open(name, flags, dir_fd=current)
        except OSError as exc:
            raise _refusal(exc) from None
        finally:
            if current >= 0:
                os.close(current)
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) or stat.S_IFMT(
            after.st_mode
        ) != stat.S_IFMT(before.st_mode):
            os.close(fd)
            raise _Refused(404, "the file changed while it was opened")
        return fd, after

    # -- replies ----------------------------------------------------------------------------

    async def _send_file(
        self,
        conn: h11.Connection,
        stream: MessageStream,
        parts: list[str],
        headers: dict[bytes, bytes],
        fd: int,
        st: os.stat_result,
        head: bool,
        keep: bool,
    ) -> None:
        version = FileVersion(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        etag = etag_for(version)
        size = st.st_size
        last_modified = formatdate(st.st_mtime, usegmt=True).encode()
        if headers.get(b"if-none-match") in (etag, b"*"):
            self._stats.not_modified += 1
            await self._send_head(conn, stream, 304, [(b"etag", etag)], keep, body=False)
            return
        if self._stats.downloads >= self.limits.max_downloads and not head:
            self._stats.busy += 1
            extra = [(b"retry-after", b"1")]
            await self._answer_error(conn, stream, 503, "too many downloads", keep, extra)
            return
        byte_range: ByteRange | None = None
        validator = headers.get(b"if-range")
        if validator is None or validator in (etag, last_modified):
            try:
                byte_range = parse_range(headers.get(b"range"), size)
            except RangeNotSatisfiable as exc:
                extra = [(b"content-range", b"bytes */%d" % size)]
                await self._answer_error(conn, stream, 416, str(exc), keep, extra)
                return
        digest = await self._digest(fd, version)
        mime = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
        reply = [
            (b"content-type", mime.encode()),
            (b"accept-ranges", b"bytes"),
            (b"etag", etag),
            (b"last-modified", last_modified),
        ]
        if digest is not None:
            reply.append((b"repr-digest", repr_digest(digest)))
        status, start, length = 200, 0, size
        if byte_range is not None:
            status, start, length = 206, byte_range.start, byte_range.length
            reply.append((b"content-range", content_range(byte_range, size)))
            self._stats.partial += 1
        reply.append((b"content-length", b"%d" % length))
        await self._send_head(conn, stream, status, reply, keep, body=not head)
        if head:
            return
        stats = self._stats
        stats.downloads += 1
        try:
            sent = await stream.sendfile(fd, start, length)
        except BrokenResourceError:
            stats.interrupted += 1
            raise
        finally:
            stats.downloads -= 1
        stats.bytes_sent += sent
        if sent < length:  # the file shrank under us: the reply cannot be completed
            logger.info("%s shrank while it was sent; connection closed", "/".join(parts))
            stats.interrupted += 1
            stream.abort()
            return
        stats.files_sent += 1
        conn.send_with_data_passthrough(h11.Data(data=cast(bytes, _Length(length))))
        await _send(stream, conn, h11.EndOfMessage())

    async def _send_listing(
        self,
        conn: h11.Connection,
        stream: MessageStream,
        request: h11.Request,
        parts: list[str],
        fd: int,
        head: bool,
        keep: bool,
    ) -> None:
        path = "/" + "".join(p + "/" for p in parts)
        target = request.target.split(b"?", 1)
        if parts and not target[0].endswith(b"/"):  # relative links need the slash
            location = target[0] + b"/" + (b"?" + target[1] if len(target) > 1 else b"")
            await self._answer_error(
                conn, stream, 301, "see the directory", keep, [(b"location", location)]
            )
            return
        entries = _list_directory(fd)
        accept = _headers(request).get(b"accept", b"")
        query = target[1] if len(target) > 1 else b""
        if b"application/json" in accept or b"format=json" in query:
            body, mime = listing_json(path, entries), b"application/json"
        else:
            body, mime = listing_html(path, entries), b"text/html; charset=utf-8"
        self._stats.listings += 1
        reply = [(b"content-type", mime), (b"content-length", b"%d" % len(body))]
        await self._send_head(conn, stream, 200, reply, keep, body=not head)
        if not head:
            await _send(stream, conn, h11.Data(data=body))
            await _send(stream, conn, h11.EndOfMessage())

    async def _answer_error(
        self,
        conn: h11.Connection,
        stream: MessageStream,
        status: int,
        reason: str,
        keep: bool = False,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        if 400 <= status < 500 or status == 301:
            self._stats.refused += status != 301
        body = b"%d %s: %s\n" % (status, _REASONS.get(status, b"Error"), reason.encode())
        reply = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            *(extra or []),
        ]
        try:
            await self._send_head(conn, stream, status, reply, keep and status < 500)
            if _sending_body(conn):
                await _send(stream, conn, h11.Data(data=body))
                await _send(stream, conn, h11.EndOfMessage())
        except (NetlibError, h11.LocalProtocolError):
            stream.abort()

    async def _send_head(
        self,
        conn: h11.Connection,
        stream: MessageStream,
        status: int,
        headers: list[tuple[bytes, bytes]],
        keep: bool,
        *,
        body: bool = True,
    ) -> None:
        headers = [(b"server", _SERVER), (b"date", formatdate(usegmt=True).encode()), *headers]
        if not keep:
            headers.append((b"connection", b"close"))
        response = h11.Response(status_code=status, headers=headers, reason=_REASONS[status])
        data = conn.send(response)
        if not body and conn.our_state is h11.SEND_BODY:  # HEAD, 304: no body follows
            data = (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
        if data:
            await stream.send(data)

    # -- the digest -------------------------------------------------------------------------

    async def _digest(self, fd: int, version: FileVersion) -> bytes | None:
        """The SHA-256 of this file version: cached, or computed once in a thread (requests
        for the same version meanwhile wait for that computation)."""
        digest = self._digests.get(version)
        if digest is not None:
            return digest
        pending = self._hashing.get(version)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(None, _sha256, os.dup(fd), version)
            self._hashing[version] = pending
            self._stats.digests_computed += 1
            pending.add_done_callback(lambda done: self._hashed(version, done))
        digest = await asyncio.shield(pending)
        return digest or None  # empty: the file changed while it was read

    def _hashed(self, version: FileVersion, done: asyncio.Future[bytes]) -> None:
        self._hashing.pop(version, None)
        if not done.cancelled() and done.exception() is None and done.result():
            self._digests.put(version, done.result())


def _sha256(fd: int, version: FileVersion) -> bytes:
    """SHA-256 of the file on ``fd`` (closed here); empty if it is no longer ``version``."""
    try:
        sha = hashlib.sha256()
        offset = 0
        while chunk := os.pread(fd, _HASH_CHUNK, offset):
            sha.update(chunk)
            offset += len(chunk)
        st = os.fstat(fd)
        now = FileVersion(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        return sha.digest() if now == version and offset == version.size else b""
    finally:
        os.close(fd)


class _Length:
    """Stands for a body sent with ``sendfile``: h11 only counts its length."""

    __slots__ = ("_length",)

    def __init__(self, length: int) -> None:
        self._length = length

    def __len__(self) -> int:
        return self._length


async def _next_event(conn: h11.Connection, stream: MessageStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive()
        except EndOfStream:
            data = b""
        conn.receive_data(data)


async def _send(stream: MessageStream, conn: h11.Connection, event: Any) -> None:
    data = conn.send(event)
    if data:
        await stream.send(data)


def _has_body(conn: h11.Connection) -> bool:
    """Whether the request just received has a body. Nobody asks for one: it is not read,
    and the connection closes after the reply."""
    if conn.their_state is not h11.SEND_BODY:
        return False
    try:
        return not isinstance(conn.next_event(), h11.EndOfMessage)  # at once if empty
    except h11.RemoteProtocolError:
        return True


def _head_size(request: h11.Request) -> int:
    size = len(request.method) + len(request.target) + 12
    return size + sum(len(name) + len(value) + 4 for name, value in request.headers)


def _sending_body(conn: h11.Connection) -> bool:
    return conn.our_state is h11.SEND_BODY


def _headers(request: h11.Request) -> dict[bytes, bytes]:
    return dict(request.headers)  # h11 lower-cases the names


def _list_directory(fd: int) -> list[Entry]:
    entries = []
    with os.scandir(fd) as scan:
        for item in scan:
            if item.name.startswith("."):
                continue
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            is_dir = stat.S_ISDIR(st.st_mode)
            if is_dir or stat.S_ISREG(st.st_mode):
                entries.append(
                    Entry(item.name, is_dir, 0 if is_dir else st.st_size, st.st_mtime_ns)
                )
    entries.sort(key=lambda e: e.name)
    return entries


def _refusal(exc: OSError) -> _Refused:
    match exc.errno:
        case errno.ENOENT | errno.ENOTDIR:
            return _Refused(404, "no such file")
        case errno.ELOOP:
            return _Refused(403, "symbolic links are not followed")
        case errno.EACCES | errno.EPERM:
            return _Refused(403, "permission denied")
        case errno.ENAMETOOLONG:
            return _Refused(414, "name too long")
    return _Refused(500, "cannot read")
