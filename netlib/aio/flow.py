"""WriteFlowControl: the transport's pause/resume callbacks, and waiting on them.

Shared by netlib's stream and datagram protocols. A subclass sets ``write_paused`` (False)
and ``_drain_waiters`` (None: the first waiter makes the list), provides ``lost`` and
``_loop``, and lists this class before ``asyncio.Protocol`` / ``asyncio.DatagramProtocol``.
"""

from __future__ import annotations

import asyncio

__all__ = ["WriteFlowControl"]


class WriteFlowControl:
    """Tracks ``write_paused`` and lets senders wait until the transport drains."""

    __slots__ = ("_drain_waiters", "write_paused")

    write_paused: bool
    _drain_waiters: list[asyncio.Future[None]] | None
    lost: bool
    _loop: asyncio.AbstractEventLoop

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drainers()

    async def drain(self) -> None:
        """Wait while the transport's send buffer is above its high-water mark."""
        while self.write_paused and not self.lost:
            waiter = self._loop.create_future()
            if self._drain_waiters is None:
                self._drain_waiters = []
            self._drain_waiters.append(waiter)
            await waiter

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)
