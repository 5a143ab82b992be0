"""Store factories for the store contract tests and the pool model: one entry per store.

A factory takes the fake clock, a fresh directory and the store's limits,
and returns an empty store that stamps times with the fake clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from doubles import FakeClock

from workerpool import MemoryStore, TaskStore


def memory_store(
    clock: FakeClock, directory: Path, *, capacity: int = 64, ttl: float = 3600.0, max_finished: int = 100
) -> TaskStore:
    return MemoryStore(capacity, ttl=ttl, max_finished=max_finished, clock=clock.time, wait=clock.wait)


STORES: dict[str, Callable[..., TaskStore]] = {"memory": memory_store}
