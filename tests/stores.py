"""Store factories for the store contract tests and the pool model: one entry per store.

A factory takes the fake clock, a fresh directory and the store's limits,
and returns an empty store that stamps times with the fake clock. ``sqlite_vm_steps``
counts what a read costs a SQLite store.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doubles import FakeClock
from redis_server import shared_server

from workerpool import MemoryStore, TaskStore
from workerpool.stores.redis_store import RedisStore
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


def redis_store(
    clock: FakeClock, directory: Path, *, capacity: int = 64, ttl: float = 3600.0, max_finished: int = 100
) -> TaskStore:
    prefix = f"test-{uuid.uuid4().hex}"  # one redis-server for the run; each store its own keys
    return RedisStore(
        shared_server().client(), capacity=capacity, ttl=ttl, max_finished=max_finished, prefix=prefix, clock=clock.time
    )


STORES: dict[str, Callable[..., TaskStore]] = {"memory": memory_store, "sqlite": sqlite_store, "redis": redis_store}
# How much dearer than the memory store a store's steps are: the pool model runs it that many
# times fewer examples, so that `make test` stays short (`make stress` runs 25 times more).
EXAMPLE_COST: dict[str, int] = {"memory": 1, "sqlite": 4, "redis": 10}


def sqlite_vm_steps(store: SqliteStore, read: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """The SQLite virtual machine steps (in hundreds) ``read(*args, **kwargs)`` took on this thread's
    connection, and what it returned."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # go on

    conn = store._connection()
    conn.set_progress_handler(count, 100)
    try:
        result = read(*args, **kwargs)
    finally:
        conn.set_progress_handler(None, 100)
    return steps, result
