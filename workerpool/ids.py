"""Server-made task ids: ULID form, 26 characters of Crockford base32, sortable by creation time."""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32: no I, L, O, U
_RANDOM_BITS = 80
_lock = threading.Lock()
_last = (-1, 0)  # (milliseconds, random part) of the last id made in this process


def new_task_id(now: float | None = None) -> str:
    """A new id: 48 bits of milliseconds since the epoch, then 80 random bits (https://github.com/ulid/spec).

    Ids made in the same millisecond by this process increment the random
    part, so they sort in the order they were made, as the spec's monotonic
    variant does. ``now`` (seconds since the epoch) defaults to ``time.time()``.
    """
    global _last
    millis = int((time.time() if now is None else now) * 1000)
    with _lock:
        last_millis, last_random = _last
        if millis <= last_millis:  # same millisecond, or the clock stepped back: keep the order
            millis, randomness = last_millis, last_random + 1
            if randomness >> _RANDOM_BITS:
                millis, randomness = millis + 1, int.from_bytes(os.urandom(10), "big")
        else:
            randomness = int.from_bytes(os.urandom(10), "big")
        _last = (millis, randomness)
    value = (millis << _RANDOM_BITS) | randomness
    return "".join(_ALPHABET[(value >> shift) & 31] for shift in range(125, -1, -5))
