"""Test configuration: every async test runs on asyncio (debug mode) and on uvloop.

The global gate of docs/robustness.md applies to every test: no call reaches the event loop's
exception handler, and the process has as many open file descriptors after the test as
before it (after ``gc.collect()``). Warnings, ResourceWarning included, are errors
(pyproject.toml).
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop

from netlib.nats_server import LocalNatsServer
from netlib.sansio.reliable import core_kind

_handler_calls: list[dict[str, Any]] = []


def _record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _handler_calls.append(context)
    loop.default_exception_handler(context)


def _asyncio_debug_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = 1.0  # CI machines are slow; the default 0.1 s only logs
    loop.set_exception_handler(_record)
    return loop


def _uvloop_loop() -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    loop.set_exception_handler(_record)
    return loop


LOOP_FACTORIES: Mapping[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": _asyncio_debug_loop,
    "uvloop": _uvloop_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return LOOP_FACTORIES


def pytest_sessionstart(session: pytest.Session) -> None:
    # uvloop opens two process-wide descriptors with its first loop; open them before any
    # test counts descriptors.
    uvloop.new_event_loop().close()


def pytest_report_header() -> str:
    return f"netlib reliable-UDP core: {core_kind()}"


def open_fds() -> dict[str, str]:
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            pass
    return found


@pytest.fixture(autouse=True)
def global_gate() -> Iterator[None]:
    _handler_calls.clear()
    gc.collect()
    before = open_fds()
    yield
    gc.collect()
    assert not _handler_calls, f"event loop exception handler called: {_handler_calls}"
    after = open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    assert len(after) == len(before), f"file descriptors leaked: {leaked}"


@pytest.fixture(autouse=True)
def no_pending_tasks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an async test that leaves tasks running (the global gate of docs/robustness.md).

    Runs after the test and before pytest-asyncio closes the test's loop (which would
    cancel such tasks silently). Relies on pytest-asyncio's function-scoped runner
    fixture, whose name is internal to it.
    """
    if not inspect.iscoroutinefunction(request.function):
        yield
        return
    runner = request.getfixturevalue("_function_scoped_runner")
    yield
    loop = runner.get_loop()
    for _ in range(20):  # let tasks that are finishing take their last steps
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not pending:
            return
        loop.run_until_complete(asyncio.sleep(0))
    pytest.fail(f"tasks still pending after the test: {pending}")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A test that runs ``main()`` in this process sets up logging as the command line
    does (a stderr handler, netlib at INFO for a server): undo it, so that no later test
    in this worker sees log lines on its stderr."""
    root, package = logging.getLogger(), logging.getLogger("netlib")
    saved = (list(root.handlers), root.level, package.level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    package.setLevel(saved[2])


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[LocalNatsServer]:
    """A real nats-server with JetStream on a free loopback port, its store in ``tmp_path``.

    ``stop()`` and ``start()`` restart it on the same port with the same store (streams and
    buckets survive), as a crash or a maintenance would; it is stopped after the test.
    """
    with LocalNatsServer(tmp_path / "nats") as server:
        yield server
