"""EchoReplies: the replies of the echo services, in one of three modes.

Rules
-----
* ``echo`` returns the message unchanged, ``upper`` upper-cases ASCII letters, ``timestamp``
  prefixes ``[<ctime>] `` (the classic UDP timestamp echo).
* Wall-clock time is not read here: the caller passes ``wall_clock`` (``time.time`` in the
  adapters, a fixed function in tests). The prefix is formatted once per second.
* A timestamp reply is exactly ``TIMESTAMP_PREFIX_SIZE`` bytes longer than its request
  (``ctime`` has a fixed width), which the UDP reply budget relies on.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Final, Literal

__all__ = ["ECHO_MODES", "TIMESTAMP_PREFIX_SIZE", "EchoMode", "EchoReplies"]

EchoMode = Literal["echo", "upper", "timestamp"]
ECHO_MODES: tuple[EchoMode, ...] = ("echo", "upper", "timestamp")

TIMESTAMP_PREFIX_SIZE: Final = len(b"[Mon Nov 23 10:00:00 2026] ")
"""Bytes a timestamp reply adds to its request: ``ctime`` has a fixed width."""


class EchoReplies:
    """Makes echo replies in one mode: ``echo``, ``upper`` or ``timestamp``.

    Args:
        mode: the reply mode.
        wall_clock: returns the current Unix time, for the timestamp prefix.

    Raises:
        ValueError: unknown ``mode``.
    """

    __slots__ = ("_clock", "_prefix", "_second", "make", "mode")

    def __init__(self, mode: EchoMode, wall_clock: Callable[[], float]) -> None:
        if mode not in ECHO_MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(ECHO_MODES)}")
        self.mode = mode
        self._clock = wall_clock
        self._second = -1
        self._prefix = b""
        makers: dict[str, Callable[[bytes], bytes]] = {
            "echo": _unchanged,
            "upper": bytes.upper,
            "timestamp": self._stamp,
        }
        self.make = makers[mode]
        """The reply function itself (``__call__`` without one level of call)."""

    def __call__(self, data: bytes) -> bytes:
        """Return the reply to ``data``."""
        return self.make(data)

    def _stamp(self, data: bytes) -> bytes:
        second = int(self._clock())
        if second != self._second:
            self._second = second
            self._prefix = f"[{datetime.fromtimestamp(second).ctime()}] ".encode()
        return self._prefix + data


def _unchanged(data: bytes) -> bytes:
    return data
