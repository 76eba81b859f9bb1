"""ThrottledLog: log a recurring condition at most once per interval, counting the rest."""

from __future__ import annotations

import asyncio
import logging
from typing import Final

__all__ = ["LOG_INTERVAL", "ThrottledLog"]

LOG_INTERVAL: Final = 1.0
"""Seconds between two log lines about the same recurring condition."""


class ThrottledLog:
    """A logger that emits at most ``burst`` lines per ``interval`` seconds.

    An emitted line that follows suppressed ones says how many were suppressed.
    """

    def __init__(
        self,
        logger: logging.Logger,
        loop: asyncio.AbstractEventLoop,
        interval: float = LOG_INTERVAL,
        burst: int = 1,
    ) -> None:
        if burst < 1:
            raise ValueError(f"burst must be >= 1, got {burst}")
        self._logger = logger
        self._loop = loop
        self._interval = interval
        self._burst = burst
        self._window = -interval  # when the current interval started
        self._emitted = 0  # lines emitted in it
        self._suppressed = 0

    def info(self, message: str, *args: object) -> None:
        """Log ``message`` at info level unless the interval's lines were used up."""
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: object) -> None:
        """Log ``message`` at warning level unless one was logged within the interval."""
        self.log(logging.WARNING, message, *args)

    def log(
        self,
        level: int,
        message: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """Log ``message`` at ``level`` unless one was logged within the interval.

        Args:
            exc_info: an exception whose traceback goes with the line.
        """
        suppressed = self._due()
        if suppressed:
            self._logger.log(
                level, message + " (%d similar suppressed)", *args, suppressed, exc_info=exc_info
            )
        elif suppressed is not None:
            self._logger.log(level, message, *args, exc_info=exc_info)

    def flush(self, level: int, message: str, *args: object) -> None:
        """Log how many lines were suppressed since the last one, if any (at the end)."""
        suppressed, self._suppressed = self._suppressed, 0
        if suppressed:
            self._logger.log(level, message + " (%d similar suppressed)", *args, suppressed)

    def exception(self, message: str, *args: object) -> None:
        """Like ``warning``, at error level with the current exception's traceback."""
        suppressed = self._due()
        if suppressed:
            self._logger.exception(message + " (%d similar suppressed)", *args, suppressed)
        elif suppressed is not None:
            self._logger.exception(message, *args)

    def _due(self) -> int | None:
        """Return the count suppressed since the last line if a line is due, else None."""
        now = self._loop.time()
        if now - self._window >= self._interval:
            self._window = now
            self._emitted = 0
        if self._emitted >= self._burst:
            self._suppressed += 1
            return None
        self._emitted += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed
