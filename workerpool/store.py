"""The lock-guarded table of every task the pool knows, with bounded retention."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import fields
from itertools import islice
from operator import attrgetter

from .errors import DuplicateTask
from .task import FINAL_STATES, State, Task, check_transition

_FIELDS = tuple(f.name for f in fields(Task))
_field_values = attrgetter(*_FIELDS)


class _Record:
    """The store's mutable copy of a task; it never leaves the store."""

    __slots__ = _FIELDS

    def __init__(self, task: Task) -> None:
        for name, value in zip(_FIELDS, _field_values(task)):
            setattr(self, name, value)

    def snapshot(self) -> Task:
        return Task(*_field_values(self))


class TaskStore:
    """Every task by id, readable as snapshots.

    Finished tasks (done/failed) are evicted, oldest finished first, once they
    finished more than ``ttl`` seconds ago by ``monotonic`` (a wall clock step
    must not evict everything at once) or more than ``max_finished`` of them
    are retained. Queued and running tasks are never evicted. Every operation
    is amortised O(1) (``list`` is O(limit)).
    """

    def __init__(self, *, ttl: float, max_finished: int, monotonic: Callable[[], float]) -> None:
        if ttl <= 0 or max_finished < 1:
            raise ValueError("ttl must be > 0 and max_finished >= 1")
        self._ttl = ttl
        self._max_finished = max_finished
        self._monotonic = monotonic
        # _lock must be held while reading or mutating _tasks, _by_state and
        # _finished; it is never held while calling out of this module.
        self._lock = threading.Lock()
        self._tasks: dict[str, _Record] = {}
        # Ids per state, in the order they entered it: gives O(1) counts and
        # newest-first listing by state without scanning.
        self._by_state: dict[State, dict[str, None]] = {state: {} for state in State}
        # Finished ids in finishing order -> monotonic finish time; OrderedDict
        # because popping from the front of a plain dict degrades to a scan.
        self._finished: OrderedDict[str, float] = OrderedDict()

    def add(self, task: Task) -> None:
        """Insert a new queued task; raise DuplicateTask if its id is retained."""
        record = _Record(task)
        with self._lock:
            self._evict()
            if task.id in self._tasks:
                raise DuplicateTask(task.id)
            self._tasks[task.id] = record
            self._by_state[record.state][task.id] = None

    def __contains__(self, task_id: str) -> bool:
        with self._lock:
            self._evict()
            return task_id in self._tasks

    def start_attempt(self, task_id: str, now: float) -> Task | None:
        """Move a queued task to running and count the attempt; None if it is not queued."""
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.state is not State.QUEUED:
                return None
            self._move(task_id, record, State.RUNNING)
            record.attempts += 1
            record.started_at = now
            record.next_attempt_at = None
            return record.snapshot()

    def end_attempt(self, task_id: str, attempt: int, new: State, **changes: object) -> Task | None:
        """Move a running task to ``new`` and apply ``changes``.

        Returns the new snapshot, or None when the task is no longer running
        that attempt, so a late worker cannot overwrite a task that shutdown
        already abandoned.
        """
        with self._lock:
            record = self._tasks.get(task_id)
            if record is None or record.state is not State.RUNNING or record.attempts != attempt:
                return None
            self._move(task_id, record, new)
            for name, value in changes.items():
                setattr(record, name, value)
            if new in FINAL_STATES:
                self._finish(task_id, record)
            return record.snapshot()

    def fail_unfinished(self, reason: str, now: float) -> list[Task]:
        """Mark every queued or running task failed at ``now`` with ``reason``; return their snapshots."""
        failed = []
        with self._lock:
            for task_id in [*self._by_state[State.QUEUED], *self._by_state[State.RUNNING]]:
                record = self._tasks[task_id]
                self._move(task_id, record, State.FAILED)
                record.last_error = reason
                record.next_attempt_at = None
                record.finished_at = now
                self._finish(task_id, record)
                failed.append(record.snapshot())
        return failed

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            self._evict()
            record = self._tasks.get(task_id)
            return None if record is None else record.snapshot()

    def list(self, state: State | None = None, limit: int = 100) -> list[Task]:
        """Retained tasks, newest first: by creation, or by entry into ``state``."""
        with self._lock:
            self._evict()
            ids = reversed(self._tasks if state is None else self._by_state[state])
            return [self._tasks[task_id].snapshot() for task_id in islice(ids, limit)]

    def counts(self) -> dict[State, int]:
        with self._lock:
            self._evict()
            return {state: len(ids) for state, ids in self._by_state.items()}

    def unfinished(self) -> int:
        """How many tasks are queued or running (O(1))."""
        with self._lock:
            return len(self._by_state[State.QUEUED]) + len(self._by_state[State.RUNNING])

    def _move(self, task_id: str, record: _Record, new: State) -> None:
        check_transition(record.state, new)
        del self._by_state[record.state][task_id]
        self._by_state[new][task_id] = None
        record.state = new

    def _finish(self, task_id: str, record: _Record) -> None:
        record.payload = ""
        self._finished[task_id] = self._monotonic()
        self._evict()

    def _evict(self) -> None:
        finished = self._finished
        horizon = self._monotonic() - self._ttl
        while finished:
            task_id, finished_at = next(iter(finished.items()))
            if len(finished) <= self._max_finished and finished_at > horizon:
                break
            finished.popitem(last=False)
            record = self._tasks.pop(task_id)
            del self._by_state[record.state][task_id]
