"""Token buckets: a steady rate with a burst allowance, driven by an explicit clock.

Rules of this module:

* No clock is read here: every call takes ``now`` (float seconds, any monotonic origin).
* A bucket starts full (``burst`` tokens) and refills at ``rate`` tokens per second up to
  ``burst``; ``try_take(n, now)`` either takes ``n`` tokens and returns True, or takes
  nothing and returns False. Callers count the refusals they act on.
* ``now`` going backwards is treated as no time passing, never as a refund.
"""

from __future__ import annotations

__all__ = ["TokenBucket"]


class TokenBucket:
    """A token bucket with ``rate`` tokens per second and capacity ``burst``.

    Args:
        rate: tokens added per second (> 0).
        burst: capacity, and the initial number of tokens (>= 1).
        now: the time the bucket is created at.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def tokens(self, now: float) -> float:
        """Return the tokens available at ``now`` (after refilling)."""
        if now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
        return self._tokens

    def wait_time(self, n: float, now: float) -> float:
        """Return the seconds from ``now`` until ``n`` tokens are available (0: now)."""
        missing = n - self.tokens(now)
        return missing / self.rate if missing > 0 else 0.0

    def try_take(self, n: float, now: float) -> bool:
        """Take ``n`` tokens if available at ``now``; return whether they were taken."""
        if self.tokens(now) >= n:
            self._tokens -= n
            return True
        return False
