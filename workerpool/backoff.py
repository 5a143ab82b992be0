"""Delay before a retry: capped exponential backoff with full jitter."""

from __future__ import annotations

import math
import random


def backoff_bound(retry: int, *, base: float, cap: float) -> float:
    """The largest delay allowed before retry ``retry`` (1, 2, ...): min(cap, base * 2**(retry-1))."""
    if retry < 1:
        raise ValueError(f"retry number must be >= 1, got {retry}")
    # ldexp is exact, and raises OverflowError only past the largest float: a
    # subnormal base may still be below the cap after more than 1024 doublings.
    try:
        return min(cap, math.ldexp(base, retry - 1))
    except OverflowError:
        return cap


def compute_backoff(retry: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Full jitter: ``uniform(0, min(cap, base * 2 ** (retry - 1)))``.

    From AWS's "Exponential Backoff and Jitter": spreading retries over the
    whole interval gives the fewest collisions and the least total work.
    """
    return rng.uniform(0.0, backoff_bound(retry, base=base, cap=cap))
