"""DeadlineTimer on a real loop: deadlines fire no later than one slot plus the loop's
timer granularity (plus a margin for a loaded test machine), for the server defaults."""

from __future__ import annotations

import asyncio

from netlib.aio.deadlines import DeadlineTimer, resolution_for
from netlib.server import DEFAULT_FIRST_FRAME_TIMEOUT, DEFAULT_IDLE_TIMEOUT

LOOP_MARGIN = 0.05
"""Loop latency allowed on a shared 2-core machine, on top of the slot bound."""


class _Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        self.deadline = deadline
        self.fired = loop.create_future()
        self._loop = loop

    def check_deadlines(self, now: float) -> None:
        if not self.fired.done():
            self.fired.set_result(self._loop.time())


async def test_timer_fires_within_a_tenth_of_a_second_for_the_default_timeouts() -> None:
    loop = asyncio.get_running_loop()
    timer = DeadlineTimer(loop, resolution_for(DEFAULT_FIRST_FRAME_TIMEOUT, DEFAULT_IDLE_TIMEOUT))
    start = loop.time()
    # 25 deadlines 20 ms apart span 0.5 s, so some fall just after any slot boundary.
    items = [_Recorder(loop, start + 0.02 * k) for k in range(1, 26)]
    for item in items:
        timer.schedule(item, item.deadline)
    try:
        async with asyncio.timeout(2):
            fired = await asyncio.gather(*(item.fired for item in items))
    finally:
        timer.close()
    lateness = [when - item.deadline for when, item in zip(fired, items, strict=True)]
    assert min(lateness) >= -0.001  # never early (uvloop may round 1 ms down)
    assert max(lateness) <= 0.1 + 0.001 + LOOP_MARGIN, max(lateness)
