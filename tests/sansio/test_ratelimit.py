"""TokenBucket: burst, steady refill, no refund when time goes backwards."""

from __future__ import annotations

import pytest

from netlib.sansio.ratelimit import TokenBucket


def test_burst_then_steady_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.try_take(1, 0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.try_take(1, 0.05)
    assert bucket.try_take(1, 0.1)
    assert bucket.tokens(100.0) == 5  # refills only up to the burst


def test_refusal_takes_nothing_and_backwards_time_refunds_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=2, now=10.0)
    assert not bucket.try_take(3, 10.0)
    assert bucket.tokens(10.0) == 2
    assert bucket.try_take(2, 10.0)
    assert bucket.tokens(5.0) == 0


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0.5)])
def test_invalid_parameters(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(rate=rate, burst=burst, now=0.0)
