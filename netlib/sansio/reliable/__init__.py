"""Reliable messaging over UDP, sans-I/O.

``wire`` (packet and frame codec, limits), ``recovery`` (RTT estimator, probe timeout,
congestion window), ``connection`` (``ReliableConnection``: one connection's state machine),
``endpoint`` (``ReliableServerCore``: one server socket's handshakes, connections and timers)
and ``simulation`` (a seeded lossy link and virtual clock that drive the cores without
sockets). See docs/design.md, "Reliable UDP".

The first five can run compiled: ``python tools/compile_core.py`` (``make`` runs it) builds
them with mypyc into ``_compiled/`` beside them, with a digest of the sources it compiled.
This package prefers that build while the digest matches the sources, so an edited source
runs as Python until it is compiled again; ``NETLIB_PURE_PYTHON=1`` keeps the Python
sources. ``COMPILED`` says which one runs.
"""

from __future__ import annotations

import hashlib
import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

COMPILED_MODULES = ("wire", "recovery", "pmtu", "connection", "endpoint")
COMPILED_DIR = Path(__file__).parent / "_compiled"
DIGEST_FILE = "SOURCES"


def sources_digest() -> str:
    """The SHA-256 of the sources that compile (what a build records as it was built)."""
    digest = hashlib.sha256()
    for name in COMPILED_MODULES:
        digest.update((Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def build_matches(directory: Path) -> bool:
    """Whether ``directory`` holds a build of these sources for this interpreter."""
    try:
        recorded = (directory / DIGEST_FILE).read_text().strip()
    except OSError:
        return False
    if recorded != sources_digest():
        return False  # built from other sources: run these as Python
    built = {path.name for path in directory.iterdir()}
    return all(  # built for this interpreter (the suffix names its version and ABI)
        any(f"{name}{suffix}" in built for suffix in EXTENSION_SUFFIXES)
        for name in COMPILED_MODULES
    )


def _compiled_build_usable() -> bool:
    return not os.environ.get("NETLIB_PURE_PYTHON") and build_matches(COMPILED_DIR)


COMPILED = _compiled_build_usable()
if COMPILED:
    __path__.insert(0, str(COMPILED_DIR))


def core_kind() -> str:
    """How the core runs in this process: ``"compiled (mypyc)"`` or ``"Python"``."""
    return "compiled (mypyc)" if COMPILED else "Python"
