"""Delay before a retry: capped exponential backoff with full jitter."""

from __future__ import annotations

import random


def backoff_bound(retry: int, *, base: float, cap: float) -> float:
    """The largest delay allowed before retry ``retry`` (1, 2, ...): min(cap, base * 2**(retry-1))."""
    if retry < 1:
        raise ValueError(f"retry number must be >= 1, got {retry}")
    if base == 0:
        return 0.0
    # 2.0 ** n raises OverflowError from n = 1024; any positive base has
    # passed any finite cap long before that.
    if retry - 1 >= 1024 or base * 2.0 ** (retry - 1) >= cap:
        return cap
    return base * 2.0 ** (retry - 1)


def compute_backoff(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: ``uniform(0, min(cap, base * 2 ** (retry - 1)))``.

    From AWS's "Exponential Backoff and Jitter": spreading retries over the
    whole interval gives the fewest collisions and the least total work.
    """
    return rng.uniform(0.0, backoff_bound(retry, base=base, cap=cap))
