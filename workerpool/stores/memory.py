"""The memory store: every task in one dict under one lock, the default and the fastest.

Nothing survives the process and nothing is shared with another one
(``shared = False``): leases never expire here, ``renew`` and ``recover``
have nothing to do, and shutdown abandons whatever is unfinished.

The lock guards every structure below; each public method takes it once,
changes what it must, and returns snapshots. A task's snapshot is an
immutable ``Task``, so the dict holds the current snapshot itself and each
change stores a new one: reading a task copies nothing, and an entry in a
line or the heap that no longer ``is`` the task's current snapshot is stale
(the task was cancelled or abandoned meanwhile) and skipped when reached.

The ready lines are plain deques rather than a ``queue.Queue``: the store's
lock already guards them, and a ``queue.Queue`` would add a second lock and
condition on every task. The admission bound is the ``_waiting`` count.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any

from ..errors import DuplicateTask, QueueFull, SubmitError
from ..handlers import Wait, event_wait
from ..task import FINAL_STATES, TRANSITIONS, State, Task, check_transition
from .base import Renewal, StoreStats, TaskStore

_QUEUED, _RUNNING, _DONE, _FAILED, _CANCELLED = (
    State.QUEUED,
    State.RUNNING,
    State.DONE,
    State.FAILED,
    State.CANCELLED,
)
_NO_RENEWAL = Renewal(lost=frozenset(), cancel_requested=frozenset())
_new_task = functools.partial(tuple.__new__, Task)  # Task._make without its Python frame: the fields are spelled out
assert Task._fields == (
    "id", "payload", "max_retries", "state", "attempts", "last_error", "created_at", "started_at",
    "finished_at", "next_attempt_at", "request_id", "result", "cancel_requested",
)  # fmt: skip  # the positions claim() and finish() spell out


class MemoryStore(TaskStore):
    """Tasks in a dict, due work in two deques, delayed work and retries in a heap, all under one lock.

    ``capacity`` bounds the tasks admitted and not yet started. Finished tasks
    are kept ``ttl`` seconds after they finished (by ``clock``) and at most
    ``max_finished`` of them. ``wait(event, timeout)`` is how idle workers
    block (tests pass a fake clock's). Every method is amortised O(1) but
    ``list`` (O(limit)) and ``abandon`` (O(unfinished)).
    """

    shared = False

    def __init__(
        self,
        capacity: int = 64,
        *,
        ttl: float = 3600.0,
        max_finished: int = 100_000,
        clock: Callable[[], float] = time.time,
        wait: Wait = event_wait,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if ttl <= 0 or max_finished < 1:
            raise ValueError("ttl must be > 0 and max_finished >= 1")
        self.capacity = capacity
        self._ttl = ttl
        self._max_finished = max_finished
        self._clock = clock
        self._wait = wait
        # _lock must be held while reading or changing any attribute below;
        # it is never held while calling out of this module (Event.set aside).
        self._lock = threading.Lock()
        self._tasks: dict[str, Task] = {}  # id -> current snapshot, in admission order
        # The latest created_at admitted: the submitter stamps a task before this lock, so two
        # racing submits may arrive out of stamp order; admit clamps to keep creation times
        # non-decreasing in admission (listing) order.
        self._last_created = -math.inf
        # Ids per state in the order they entered it: O(1) counts, newest-first listing by state.
        self._by_state: dict[State, dict[str, None]] = {state: {} for state in State}
        self._owners: dict[str, str] = {}  # running id -> the owner that claimed it
        self._retry_line: deque[Task] = deque()  # due retries: they run first (accepted long ago)
        self._new_line: deque[Task] = deque()  # due new tasks, in the order they fell due
        self._scheduled: list[tuple[float, int, Task]] = []  # heap of (due time, order, task) not yet due
        self._order = itertools.count()
        self._pending: dict[str, Task] = {}  # id -> the snapshot its live heap entry holds
        self._retries_pending = 0  # entries of _pending with attempts > 0
        self._waiting = 0  # queued tasks with attempts == 0: what the bound counts
        self._finished: deque[Task] = deque()  # final snapshots, oldest finished first
        self._idle: list[threading.Event] = []  # workers blocked in wait_for_work
        self._local = threading.local()  # each thread's wait event, reused
        self._woken = False

    # -- transitions -----------------------------------------------------

    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        results: list[Task | SubmitError] = []
        with self._lock:
            now = self._clock()
            self._evict(now)  # a forgotten id may be submitted again
            if self._scheduled:  # what fell due earlier goes ahead of what arrives now
                self._release_due(now)
            tasks_by_id, queued, new_line = self._tasks, self._by_state[_QUEUED], self._new_line
            for task in tasks:
                if task.id in tasks_by_id:
                    results.append(DuplicateTask(task.id))
                elif self._waiting >= self.capacity:
                    results.append(QueueFull(self.capacity))
                else:
                    if task.created_at < self._last_created:  # stamped before a task admitted first
                        task = task._replace(created_at=self._last_created)
                    self._last_created = task.created_at
                    tasks_by_id[task.id] = task
                    queued[task.id] = None
                    self._waiting += 1
                    if task.next_attempt_at is None:
                        new_line.append(task)
                    else:
                        self._schedule(task)
                    results.append(task)
            if self._idle:
                self._wake_idle(len(tasks))
        return results

    def claim(self, owner: str, lease_until: float) -> Task | None:
        with self._lock:
            return self._claim(owner, self._clock())

    def finish(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
    ) -> Task | None:
        with self._lock:
            return self._finish_attempt(task_id, attempt, owner, error, result, retry_at, self._clock())

    def finish_and_claim(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
        lease_until: float,
    ) -> tuple[Task | None, Task | None]:
        with self._lock:  # one hold for both: a busy worker goes from one task to the next without a handoff
            now = self._clock()
            ended = self._finish_attempt(task_id, attempt, owner, error, result, retry_at, now)
            return ended, self._claim(owner, now)

    def cancel(self, task_id: str) -> Task | None:
        with self._lock:
            now = self._clock()
            self._evict(now)
            task = self._tasks.get(task_id)
            if task is None or task.state in FINAL_STATES or task.cancel_requested:
                return task
            if task.state is _RUNNING:
                changed = task._replace(cancel_requested=True)
                self._tasks[task_id] = changed
                return changed
            self._unqueue(task)
            cancelled = task._replace(state=_CANCELLED, payload="", finished_at=now, next_attempt_at=None)
            self._set(task, cancelled)
            self._finish(cancelled, now)
            return cancelled

    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        abandoned = []
        with self._lock:
            now = self._clock()
            for task_id in [*self._by_state[_QUEUED], *self._by_state[_RUNNING]]:
                task = self._tasks[task_id]
                if task.state is _QUEUED:
                    self._unqueue(task)
                else:
                    del self._owners[task_id]
                failed = task._replace(
                    state=_FAILED, payload="", last_error=reason, finished_at=now, next_attempt_at=None
                )
                self._set(task, failed)
                self._finish(failed, now)
                abandoned.append(failed)
            self._retry_line.clear()
            self._new_line.clear()
            self._scheduled.clear()
        return abandoned

    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        return _NO_RENEWAL  # leases never expire here; cancel requests reach the pool directly

    def recover(self, retry_at: Callable[[Task], float | None]) -> list[Task]:
        return []  # no lease ever expires

    # -- waiting ---------------------------------------------------------

    def seconds_until_due(self) -> float | None:
        with self._lock:
            now = self._clock()
            if self._scheduled:
                self._release_due(now)
            return self._until_due(now)

    def wait_for_work(self, timeout: float | None) -> None:
        """Block until work is admitted, a retry or delayed task falls due, ``wake``, or ``timeout``."""
        with self._lock:
            if self._woken:
                return
            now = self._clock()
            if self._scheduled:
                self._release_due(now)
            until_due = self._until_due(now)
            if until_due == 0:
                return
            if until_due is not None and (timeout is None or until_due < timeout):
                timeout = until_due
            event = self._local.__dict__.get("event")
            if event is None:
                event = self._local.event = threading.Event()
            event.clear()  # under the lock, like every set: no wake-up is lost in between
            self._idle.append(event)
        try:
            self._wait(event, timeout)
        finally:
            with self._lock:
                if event in self._idle:
                    self._idle.remove(event)

    def wake(self) -> None:
        """Release every waiting worker; later waits return at once too (the pool is stopping)."""
        with self._lock:
            self._woken = True
            self._wake_idle(len(self._idle))

    # -- reading ---------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        with self._lock:
            self._evict(self._clock())
            return self._tasks.get(task_id)

    def list(self, state: State | None = None, limit: int = 100) -> list[Task]:
        with self._lock:
            self._evict(self._clock())
            if state is None:
                return list(islice(reversed(self._tasks.values()), limit))
            return [self._tasks[task_id] for task_id in islice(reversed(self._by_state[state]), limit)]

    def stats(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            self._evict(now)
            if self._scheduled:
                self._release_due(now)
            counts = {state: len(ids) for state, ids in self._by_state.items()}
            return StoreStats(
                counts=counts,
                waiting=self._waiting,
                due=counts[_QUEUED] - len(self._pending),
                retries_pending=self._retries_pending,
            )

    def unfinished(self, owner: str | None = None) -> int:
        with self._lock:
            return len(self._by_state[_QUEUED]) + len(self._by_state[_RUNNING])

    # -- helpers (the lock is held) --------------------------------------

    def _claim(self, owner: str, now: float) -> Task | None:
        if self._scheduled:
            self._release_due(now)
        for line in (self._retry_line, self._new_line):
            while line:
                task = line.popleft()
                if self._tasks.get(task.id) is not task:
                    continue  # cancelled or abandoned while it waited
                if task.attempts == 0:
                    self._waiting -= 1
                # Spelled out rather than _replace(): this is the hot path, and 3x cheaper.
                running = _new_task(
                    (task[0], task[1], task[2], _RUNNING, task[4] + 1, task[5], task[6], now, None, None,
                     task[10], task[11], task[12])
                )  # fmt: skip
                self._set(task, running)
                self._owners[task.id] = owner
                return running
        return None

    def _finish_attempt(
        self, task_id: str, attempt: int, owner: str, error: str | None, result: Any, retry_at: float | None, now: float
    ) -> Task | None:
        task = self._tasks.get(task_id)
        if task is None or task.state is not _RUNNING or task.attempts != attempt:
            return None
        if self._owners.get(task_id) != owner:
            return None
        del self._owners[task_id]
        if error is None:  # the hot path: spelled out, see _claim()
            ended = _new_task(
                (task[0], "", task[2], _DONE, task[4], task[5], task[6], task[7], now, None, task[10],
                 result, task[12])
            )  # fmt: skip
        elif task.cancel_requested:
            ended = task._replace(state=_CANCELLED, payload="", finished_at=now, last_error=error)
        elif retry_at is not None:
            ended = task._replace(state=_QUEUED, last_error=error, next_attempt_at=retry_at)
        else:
            ended = task._replace(state=_FAILED, payload="", finished_at=now, last_error=error)
        self._set(task, ended)
        if ended.state is _QUEUED:
            self._schedule(ended)
            self._wake_idle(1)
        else:
            self._finish(ended, now)
        return ended

    def _set(self, old: Task, new: Task) -> None:
        """Store ``new`` as the current snapshot of ``old``'s task, moving it between states."""
        if new.state not in TRANSITIONS[old.state]:  # the common case without a call: twice per task
            check_transition(old.state, new.state)
        del self._by_state[old.state][old.id]
        self._by_state[new.state][old.id] = None
        self._tasks[old.id] = new

    def _schedule(self, task: Task) -> None:
        heapq.heappush(self._scheduled, (task.next_attempt_at, next(self._order), task))
        self._pending[task.id] = task
        if task.attempts:
            self._retries_pending += 1

    def _release_due(self, now: float) -> None:
        """Move the heap's entries that fell due to the back of their line, in due order."""
        scheduled = self._scheduled
        while scheduled and scheduled[0][0] <= now:
            task = heapq.heappop(scheduled)[2]
            if self._pending.get(task.id) is not task:
                continue  # cancelled or abandoned while it waited
            del self._pending[task.id]
            if task.attempts:
                self._retries_pending -= 1
                self._retry_line.append(task)
            else:
                self._new_line.append(task)

    def _unqueue(self, task: Task) -> None:
        """Forget a queued task's place (its line or heap entry goes stale) before it leaves the queue."""
        if task.attempts == 0:
            self._waiting -= 1
        if self._pending.get(task.id) is task:
            del self._pending[task.id]
            if task.attempts:
                self._retries_pending -= 1

    def _until_due(self, now: float) -> float | None:
        if len(self._by_state[_QUEUED]) > len(self._pending):
            return 0.0  # a live entry waits in a line
        while self._scheduled and self._pending.get(self._scheduled[0][2].id) is not self._scheduled[0][2]:
            heapq.heappop(self._scheduled)  # stale
        return max(0.0, self._scheduled[0][0] - now) if self._scheduled else None

    def _wake_idle(self, count: int) -> None:
        for _ in range(min(count, len(self._idle))):
            self._idle.pop().set()

    def _finish(self, task: Task, now: float) -> None:
        self._finished.append(task)
        self._evict(now)

    def _evict(self, now: float) -> None:
        finished = self._finished
        horizon = now - self._ttl
        while finished and (len(finished) > self._max_finished or finished[0].finished_at <= horizon):
            task = finished.popleft()
            del self._tasks[task.id]
            del self._by_state[task.state][task.id]
