"""Store factories for the store contract tests and the pool model: one entry per store.

A factory takes the fake clock, a fresh directory and the store's limits,
and returns an empty store that stamps times with the fake clock.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from doubles import FakeClock

from workerpool import MemoryStore, TaskStore
from workerpool.stores.sqlite import SqliteStore


def memory_store(
    clock: FakeClock, directory: Path, *, capacity: int = 64, ttl: float = 3600.0, max_finished: int = 100
) -> TaskStore:
    return MemoryStore(capacity, ttl=ttl, max_finished=max_finished, clock=clock.time, wait=clock.wait)


def sqlite_store(
    clock: FakeClock, directory: Path, *, capacity: int = 64, ttl: float = 3600.0, max_finished: int = 100
) -> TaskStore:
    directory.mkdir(parents=True, exist_ok=True)
    return SqliteStore(directory / "tasks.db", capacity=capacity, ttl=ttl, max_finished=max_finished, clock=clock.time)


STORES: dict[str, Callable[..., TaskStore]] = {"memory": memory_store, "sqlite": sqlite_store}
# How much dearer than the memory store a store's steps are: the pool model runs it that many
# times fewer examples, so that `make test` stays short (`make stress` runs 25 times more).
EXAMPLE_COST: dict[str, int] = {"memory": 1, "sqlite": 4}
