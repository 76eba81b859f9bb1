"""ThrottledLog: at most ``burst`` lines an interval, counting what it suppressed."""

from __future__ import annotations

import logging

import pytest

from netlib.aio.logs import ThrottledLog


class FakeLoop:
    """A loop whose clock the test sets (ThrottledLog only asks ``time()``)."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now


def test_a_burst_per_interval_then_a_count_of_what_was_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.throttle")
    loop = FakeLoop()
    log = ThrottledLog(logging.getLogger("test.throttle"), loop, burst=3)  # type: ignore[arg-type]
    for i in range(10):
        log.info("event %d", i)
    loop.now = 0.99
    log.info("still the same interval")
    loop.now = 1.0
    log.info("next interval")
    log.info("and one more")
    assert [r.getMessage() for r in caplog.records] == [
        "event 0",
        "event 1",
        "event 2",
        "next interval (8 similar suppressed)",
        "and one more",
    ]


def test_burst_must_be_positive() -> None:
    with pytest.raises(ValueError, match="burst"):
        ThrottledLog(logging.getLogger("test"), FakeLoop(), burst=0)  # type: ignore[arg-type]
