"""Event loop selection: uvloop when it is installed, stock asyncio on request.

The choice is made by the ``loop`` argument, or else by the ``NETLIB_LOOP`` environment
variable (``auto``, ``uvloop`` or ``asyncio``); ``auto`` picks uvloop when it can be
imported.
"""

from __future__ import annotations

import asyncio
import os
import signal
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
    """Run ``main`` to completion on a new event loop of the chosen kind; return its result.

    Ctrl-C (SIGINT) and SIGTERM cancel ``main``: its ``async with`` blocks run, so servers
    shut down gracefully. The program then exits quietly (``SystemExit``, no traceback) with
    status 130 after SIGINT or 143 after SIGTERM. A second signal stops waiting for the
    shutdown. Signals are handled this way only when ``run`` is called from the main thread.

    Raises:
        ValueError: an unknown loop name (``loop`` or ``NETLIB_LOOP``), or uvloop requested
            but not installed; ``main`` is closed, never run.
        SystemExit: after SIGINT (130) or SIGTERM (143).
    """
    try:
        factory = loop_factory(loop)
    except ValueError:
        main.close()  # never awaited: close it, or Python warns that it was not
        raise
    terminated = False

    def on_sigterm(task: asyncio.Task[Any]) -> None:
        nonlocal terminated
        if terminated:  # the second one: stop waiting for the shutdown
            raise SystemExit(128 + signal.SIGTERM)
        terminated = True
        task.cancel()

    async def guarded() -> T:
        running = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        try:
            running.add_signal_handler(signal.SIGTERM, on_sigterm, task)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread
            return await main
        try:
            return await main
        finally:
            running.remove_signal_handler(signal.SIGTERM)

    with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
        try:
            return runner.run(guarded())
        except KeyboardInterrupt:
            raise SystemExit(128 + signal.SIGINT) from None
        except asyncio.CancelledError:
            if terminated:
                raise SystemExit(128 + signal.SIGTERM) from None
            raise
