"""The file server's pure rules: request paths, byte ranges, validators, the digest cache.

Nothing here touches a file or a socket: the service (``netlib.services.files``) asks
these functions what a request means and then does the I/O.

* ``split_target`` turns a request target into path components, or refuses it. The
  percent-encoding is decoded exactly once; a component that is empty or ``.`` is
  dropped; ``..``, a hidden name (leading ``.``), a NUL or control character, a
  backslash, a name over ``MAX_NAME_BYTES`` and a path over ``MAX_PATH_BYTES`` are
  refused. The service then opens the components one by one below the root without
  following symbolic links, so what this function lets through can still not leave it.
* ``parse_range`` reads a single ``bytes=`` range; anything else is ignored (the whole
  file is sent, as RFC 9110 allows), and a range past the end is unsatisfiable (416).
* ``etag_for`` is a strong validator from the file's identity and version
  ``(dev, inode, size, mtime_ns)``; ``DigestCache`` keeps one SHA-256 per version.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, NamedTuple
from urllib.parse import quote, unquote_to_bytes

__all__ = [
    "DEFAULT_DIGEST_CACHE_ENTRIES",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "ByteRange",
    "DigestCache",
    "Entry",
    "FileVersion",
    "PathRefused",
    "RangeNotSatisfiable",
    "content_range",
    "etag_for",
    "listing_html",
    "listing_json",
    "parse_range",
    "parse_repr_digest",
    "repr_digest",
    "split_target",
]

MAX_NAME_BYTES: Final = 255
"""Longest path component accepted, in bytes (Linux's NAME_MAX)."""
MAX_PATH_BYTES: Final = 4096
"""Longest decoded request path accepted, in bytes (Linux's PATH_MAX)."""
DEFAULT_DIGEST_CACHE_ENTRIES: Final = 4096
"""File versions whose SHA-256 the server keeps (32 bytes each, plus the key)."""


class PathRefused(ValueError):
    """A request path that names nothing the server may serve.

    Attributes:
        status: the HTTP status to answer with (400 malformed, 403 forbidden, 404, 414).
        reason: a short explanation, safe to show to the client.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class RangeNotSatisfiable(ValueError):
    """A ``Range`` that starts past the end of the file (answered with 416)."""


def split_target(target: bytes) -> list[str]:
    """The path components a request target names below the root (``[]``: the root).

    Raises:
        PathRefused: the target may not be served, with the status to answer.
    """
    path = target.split(b"?", 1)[0].split(b"#", 1)[0]
    if not path.startswith(b"/"):  # absolute-form (http://...) or authority-form
        raise PathRefused(400, "the request target must be a path starting with /")
    if len(path) > 3 * MAX_PATH_BYTES:
        raise PathRefused(414, "path too long")
    if b"\\" in path:
        raise PathRefused(400, "backslash in path")
    for index in _percent_signs(path):
        if len(path) < index + 3 or not _is_hex(path[index + 1 : index + 3]):
            raise PathRefused(400, "bad percent-encoding")
    raw = unquote_to_bytes(path)  # decoded once: %252e stays the three characters %2e
    if len(raw) > MAX_PATH_BYTES:
        raise PathRefused(414, "path too long")
    try:
        text = raw.decode("utf-8", "strict")  # refuses overlong forms such as %c0%af
    except UnicodeDecodeError:
        raise PathRefused(400, "path is not UTF-8") from None
    parts: list[str] = []
    for part in text.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise PathRefused(403, "'..' in path")
        if any(ord(c) < 32 or ord(c) == 127 for c in part):
            raise PathRefused(400, "control character in path")
        if "\\" in part:
            raise PathRefused(400, "backslash in path")
        if part.startswith("."):
            raise PathRefused(404, "hidden files are not served")
        if len(part.encode()) > MAX_NAME_BYTES:
            raise PathRefused(414, "name too long")
        parts.append(part)
    return parts


def _percent_signs(path: bytes) -> Iterable[int]:
    start = path.find(b"%")
    while start != -1:
        yield start
        start = path.find(b"%", start + 1)


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


class ByteRange(NamedTuple):
    """Bytes ``start`` to ``stop`` (exclusive) of a file."""

    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


def parse_range(value: bytes | None, size: int) -> ByteRange | None:
    """The single byte range ``value`` asks for in a file of ``size`` bytes.

    Returns None (send the whole file) when there is no header, when it is not a single
    ``bytes=`` range, or when it is malformed.

    Raises:
        RangeNotSatisfiable: the range starts at or past the end of the file.
    """
    if value is None:
        return None
    unit, _, spec = value.strip().partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash or not (first or last):
        return None
    try:
        if not first:  # bytes=-N: the last N bytes
            suffix = _digits(last)
            if suffix == 0:
                raise RangeNotSatisfiable("empty suffix range")
            return ByteRange(max(0, size - suffix), size)
        start = _digits(first)
        stop = size if not last else min(size, _digits(last) + 1)
    except ValueError as exc:
        if isinstance(exc, RangeNotSatisfiable):
            raise
        return None
    if start >= size:
        raise RangeNotSatisfiable(f"range starts at {start}, the file has {size} bytes")
    if stop <= start:
        return None
    return ByteRange(start, stop)


def _digits(text: bytes) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > 19:
        raise ValueError("not a byte position")
    return int(text)


def content_range(byte_range: ByteRange, size: int) -> bytes:
    """The ``Content-Range`` value of a 206 reply."""
    return b"bytes %d-%d/%d" % (byte_range.start, byte_range.stop - 1, size)


class FileVersion(NamedTuple):
    """What identifies one version of one file: a change to any of these is a new version."""

    dev: int
    inode: int
    size: int
    mtime_ns: int


def etag_for(version: FileVersion) -> bytes:
    """A strong entity tag for a file version (quoted, as sent)."""
    return b'"%x-%x-%x-%x"' % (version.dev, version.inode, version.size, version.mtime_ns)


def repr_digest(sha256: bytes) -> bytes:
    """The ``Repr-Digest`` value (RFC 9530) for a SHA-256 digest."""
    return b"sha-256=:" + base64.b64encode(sha256) + b":"


def parse_repr_digest(value: bytes | str | None) -> bytes | None:
    """The SHA-256 digest in a ``Repr-Digest`` (or ``Content-Digest``) value, if any."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    for member in value.split(","):
        key, _, item = member.strip().partition("=")
        if key.strip().lower() != "sha-256":
            continue
        item = item.strip()
        if len(item) < 2 or item[0] != ":" or item[-1] != ":":
            return None
        try:
            digest = base64.b64decode(item[1:-1], validate=True)
        except (binascii.Error, ValueError):
            return None
        return digest if len(digest) == 32 else None
    return None


class DigestCache:
    """SHA-256 digests of file versions, the least recently used dropped past ``entries``."""

    def __init__(self, entries: int = DEFAULT_DIGEST_CACHE_ENTRIES) -> None:
        if entries < 1:
            raise ValueError(f"entries must be >= 1, got {entries}")
        self._entries = entries
        self._digests: OrderedDict[FileVersion, bytes] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, version: FileVersion) -> bytes | None:
        digest = self._digests.get(version)
        if digest is None:
            self.misses += 1
            return None
        self.hits += 1
        self._digests.move_to_end(version)
        return digest

    def put(self, version: FileVersion, digest: bytes) -> None:
        self._digests[version] = digest
        self._digests.move_to_end(version)
        while len(self._digests) > self._entries:
            self._digests.popitem(last=False)

    def __len__(self) -> int:
        return len(self._digests)


@dataclass(frozen=True)
class Entry:
    """One name in a directory listing."""

    name: str
    is_dir: bool
    size: int
    mtime_ns: int


def listing_json(path: str, entries: list[Entry]) -> bytes:
    """A directory listing for programs: ``{"path": ..., "entries": [...]}``."""
    items = [
        {
            "name": e.name,
            "type": "directory" if e.is_dir else "file",
            "size": e.size,
            "mtime": e.mtime_ns / 1e9,
        }
        for e in entries
    ]
    return json.dumps({"path": path, "entries": items}, ensure_ascii=False).encode() + b"\n"


def listing_html(path: str, entries: list[Entry]) -> bytes:
    """A plain directory listing page for browsers."""
    title = html.escape(path)
    rows = []
    for e in entries:
        name = e.name + ("/" if e.is_dir else "")
        size = "-" if e.is_dir else str(e.size)
        href = quote(name)
        rows.append(f'<li><a href="{href}">{html.escape(name)}</a> {size}</li>')
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>'
        f"</head>\n<body><h1>{title}</h1>\n<ul>\n" + "\n".join(rows) + "\n</ul></body></html>\n"
    )
    return page.encode()
