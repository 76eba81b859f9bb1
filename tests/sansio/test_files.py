"""The file server's pure rules: request paths, byte ranges, digests."""

from __future__ import annotations

import hashlib

import pytest

from netlib.sansio.files import (
    ByteRange,
    DigestCache,
    FileVersion,
    PathRefused,
    RangeNotSatisfiable,
    content_range,
    etag_for,
    parse_range,
    parse_repr_digest,
    repr_digest,
    split_target,
)


@pytest.mark.parametrize(
    ("target", "parts"),
    [
        (b"/", []),
        (b"/a/b.txt", ["a", "b.txt"]),
        (b"//a//./b.txt", ["a", "b.txt"]),
        (b"/a%20b.txt?x=1#frag", ["a b.txt"]),
        (b"/%C3%A9t%C3%A9.txt", ["\u00e9t\u00e9.txt"]),
        (b"/%252e%252e/x", ["%2e%2e", "x"]),  # decoded once: a name, not a traversal
        (b"/sub/", ["sub"]),
    ],
)
def test_targets_that_name_something_below_the_root(target: bytes, parts: list[str]) -> None:
    assert split_target(target) == parts


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"/../etc/passwd", 403),
        (b"/a/../../b", 403),
        (b"/%2e%2e/etc/passwd", 403),
        (b"/%2E%2E%2Fetc", 403),
        (b"/..%2f..%2fetc", 403),
        (b"/..\\etc", 400),
        (b"/%5c..%5cetc", 400),
        (b"/..%c0%afetc", 400),
        (b"/a%00.txt", 400),
        (b"/a%0a.txt", 400),
        (b"/a%zz", 400),
        (b"/a%2", 400),
        (b"/.hidden", 404),
        (b"/sub/.git/config", 404),
        (b"etc/passwd", 400),
        (b"http://example.com/etc/passwd", 400),
        (b"*", 400),
        (b"/" + b"a" * 256, 414),
        (b"/a" * 5000, 414),
    ],
)
def test_targets_refused_with_their_status(target: bytes, status: int) -> None:
    with pytest.raises(PathRefused) as info:
        split_target(target)
    assert info.value.status == status


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        (b"bytes=0-", ByteRange(0, 100)),
        (b"bytes=10-19", ByteRange(10, 20)),
        (b"bytes=90-500", ByteRange(90, 100)),
        (b"bytes=-10", ByteRange(90, 100)),
        (b"bytes=-500", ByteRange(0, 100)),
        (b"Bytes = 5-", ByteRange(5, 100)),
        (b"bytes=0-1,5-6", None),  # several ranges: the whole file
        (b"items=0-1", None),
        (b"bytes=a-b", None),
        (b"bytes=5-4", None),
        (b"bytes=-", None),
        (b"bytes=" + b"9" * 30 + b"-", None),
    ],
)
def test_single_ranges(header: bytes | None, expected: ByteRange | None) -> None:
    assert parse_range(header, 100) == expected


@pytest.mark.parametrize("header", [b"bytes=100-", b"bytes=500-600", b"bytes=-0"])
def test_unsatisfiable_ranges(header: bytes) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, 100)


def test_content_range_and_etag() -> None:
    assert content_range(ByteRange(10, 20), 100) == b"bytes 10-19/100"
    one = FileVersion(1, 2, 3, 4)
    assert etag_for(one) == b'"1-2-3-4"'
    assert etag_for(one) != etag_for(one._replace(mtime_ns=5))


def test_repr_digest_round_trip() -> None:
    digest = hashlib.sha256(b"netlib").digest()
    value = repr_digest(digest)
    assert value.startswith(b"sha-256=:")
    assert value.endswith(b":")
    assert parse_repr_digest(value) == digest
    assert parse_repr_digest("sha-512=:AAAA:, sha-256=" + value.decode()[8:]) == digest
    assert parse_repr_digest(b"sha-256=:bm90IDMyIGJ5dGVz:") is None  # not 32 bytes
    assert parse_repr_digest(b"sha-256=abc") is None
    assert parse_repr_digest(None) is None


def test_digest_cache_keeps_the_most_recent_versions() -> None:
    cache = DigestCache(entries=2)
    a, b, c = (FileVersion(0, i, 10, 0) for i in range(3))
    cache.put(a, b"A")
    cache.put(b, b"B")
    assert cache.get(a) == b"A"  # a is now the most recent
    cache.put(c, b"C")
    assert cache.get(b) is None
    assert (cache.get(a), cache.get(c)) == (b"A", b"C")
    assert len(cache) == 2
    assert (cache.hits, cache.misses) == (3, 1)
    with pytest.raises(ValueError, match="entries"):
        DigestCache(entries=0)
