"""Event loop selection: uvloop when it is installed, stock asyncio on request.

The choice is made by the ``loop`` argument, or else by the ``NETLIB_LOOP`` environment
variable (``auto``, ``uvloop`` or ``asyncio``); ``auto`` picks uvloop when it can be
imported.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, Final, Literal, TypeVar

__all__ = ["LOOP_CHOICES", "LoopName", "loop_factory", "run"]

T = TypeVar("T")
LoopName = Literal["auto", "uvloop", "asyncio"]
LOOP_CHOICES: Final = ("auto", "uvloop", "asyncio")


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_factory(loop: LoopName | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a function that makes event loops of the chosen kind.

    Raises:
        ValueError: an unknown name, or ``uvloop`` requested but not installed.
    """
    name = loop or os.environ.get("NETLIB_LOOP", "auto") or "auto"
    if name not in LOOP_CHOICES:
        raise ValueError(f"unknown loop {name!r}; expected one of {', '.join(LOOP_CHOICES)}")
    if name == "asyncio":
        return asyncio.new_event_loop
    factory = _uvloop_factory()
    if factory is not None:
        return factory
    if name == "uvloop":
        raise ValueError("uvloop was requested but is not installed")
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], *, loop: LoopName | None = None, debug: bool = False) -> T:
    """Run ``main`` to completion on a new event loop of the chosen kind."""
    with asyncio.Runner(loop_factory=loop_factory(loop), debug=debug) as runner:
        return runner.run(main)
