"""The memory store: every task in one dict under one lock, the default and the fastest.

Nothing survives the process and nothing is shared with another one
(``shared = False``): leases never expire here, ``renew`` and ``recover``
have nothing to do, and shutdown abandons whatever is unfinished.

The lock guards every structure below; each public method takes it once,
changes what it must, and returns snapshots (immutable ``Task`` values).
The dict holds each task's current *record*, an immutable plain tuple, and
each change stores a new one: an entry in a line or the heap that no longer
``is`` the task's current record is stale (the task was cancelled or
abandoned meanwhile) and skipped when reached.

A record holds a ``Task``'s fields in the same order and it is an exact
tuple, not a ``Task``; a final record holds its state as the state's plain
string (``"done"``). Why: CPython's garbage collector stops tracking an exact
tuple whose items are all untracked (strings, numbers, None), and never a
tuple subclass or one holding an enum member. Retained tasks (100,000 by
default) would otherwise sit in the oldest generation and be traversed by
every full collection; as records they leave the collector's lists at their
first collection (unless a payload or result is itself a container). A
queued or running record holds its ``State`` member instead: it lives only
until the task's next change, and its snapshot is then one copy in C
(``tuple.__new__(Task, record)``) rather than a tuple built field by field;
an admitted ``Task`` becomes its record the same way.

The ready lines are plain deques rather than a ``queue.Queue``: the store's
lock already guards them, and a ``queue.Queue`` would add a second lock and
condition on every task. The admission bound is the ``_waiting`` count.

The two steps every task takes (``admit`` and ``finish_and_claim``) hold the
lock with ``acquire()`` and ``release()`` in ``try``/``finally`` rather than a
``with`` statement: in CPython 3.11 a ``with`` costs about 1,000 instructions
more per hold (two special-method lookups and a bound method per exit), as
much as a fifth of what the rest of an admission costs.
"""

from __future__ import annotations

import heapq
import itertools
import math
import secrets
import threading
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from operator import neg
from typing import Any

from ..errors import DuplicateTask, QueueFull, SubmitError
from ..handlers import Wait, event_wait
from ..task import FINAL_STATES, TRANSITIONS, State, Task, check_transition
from .base import Page, Position, Renewal, StoreStats, TaskStore, check_position, full_queue_delays

# The states as records hold them: plain strings (see the module docstring). State is a StrEnum,
# so a member finds them in a dict too; the tables below are keyed by the strings themselves,
# because a plain string looked up among members (or a member among strings) is equal only
# after a full comparison, not by identity.
_QUEUED, _RUNNING, _DONE, _FAILED, _CANCELLED = (
    State.QUEUED.value,
    State.RUNNING.value,
    State.DONE.value,
    State.FAILED.value,
    State.CANCELLED.value,
)
_STATES: dict[str, State] = {state.value: state for state in State}
# What queued and running records hold (see the module docstring): read once, not looked up on State.
_QUEUED_STATE, _RUNNING_STATE, _DONE_STATE = State.QUEUED, State.RUNNING, State.DONE
_TRANSITIONS = {state.value: frozenset(new.value for new in allowed) for state, allowed in TRANSITIONS.items()}
_FINAL_STATES = frozenset(state.value for state in FINAL_STATES)
_NO_RENEWAL = Renewal(lost=frozenset(), cancel_requested=frozenset())
# Task._make without its Python frame (nor a partial's call around it): the fields are spelled out.
_tuple_new = tuple.__new__
assert Task._fields == (
    "id", "payload", "max_retries", "state", "attempts", "last_error", "created_at", "started_at",
    "finished_at", "next_attempt_at", "request_id", "result", "cancel_requested",
)  # fmt: skip  # the positions of a record, which the code below spells out
# The positions of a record's fields (those read by name below).
_ID, _STATE, _ATTEMPTS, _STARTED_AT, _NEXT_ATTEMPT_AT, _FINISHED_AT, _CANCEL_REQUESTED = 0, 3, 4, 7, 9, 8, 12
_POSITIONS = {name: index for index, name in enumerate(Task._fields)}

Record = tuple  # a Task's fields as a plain tuple, the state as its string (see the module docstring)
# Stale entries the lines (or a heap) may hold beyond as many as their live ones before a cancel rebuilds
# them without the stale ones (see _drop_stale).
_STALE_SLACK = 64
# Seconds an idle worker waits at most for a task scheduled later. Due times are instants of the
# store's (wall) clock, a wait runs on real time: a step of the wall clock (an NTP correction, a
# virtual machine resumed) would otherwise go unnoticed until the whole wait ended, up to the delay.
_MAX_DUE_WAIT = 1.0


def _snapshot(record: Record) -> Task:
    """The ``Task`` a record stands for."""
    r = record
    if type(r[3]) is State:  # queued or running: the record holds the member (see the module docstring)
        return _tuple_new(Task, r)
    return _tuple_new(
        Task, (r[0], r[1], r[2], _STATES[r[3]], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[11], r[12])
    )  # fmt: skip


_CONTAINERS = frozenset((dict, list))  # what JSON decodes to that a handler can change


def _own_payload(task: Task) -> Task:
    """``task`` with a copy of its payload (a dict or a list): its dicts and lists copied, the rest shared.

    The record keeps the payload as admitted: each attempt gets a fresh copy of its dicts and lists
    (everything else is shared, as immutable), so a handler that changes its payload changes neither
    a retry's nor another attempt's, as on the stores that decode it for every attempt. Iterative, so a
    payload nested as deep as the JSON decoder allows is copied on any thread; ``copies`` keeps an
    object reached twice (or a cycle, from the Python API) one object in the copy, as in the original.
    """
    payload = task[1]
    kind = type(payload)
    top = dict(payload) if kind is dict else list(payload)
    copies = {id(payload): top}
    pending = [top]
    while pending:
        container = pending.pop()
        for key, value in container.items() if type(container) is dict else enumerate(container):  # values only change
            kind = type(value)
            if kind is dict or kind is list:
                copy = copies.get(id(value))
                if copy is None:
                    copy = copies[id(value)] = dict(value) if kind is dict else list(value)
                    pending.append(copy)
                container[key] = copy
    return _tuple_new(Task, (task[0], top, *task[2:]))


def _entered_since(entries: dict[str, int], entry: int) -> int:
    """How many of ``entries`` (numbers growing along the dict) are ``entry`` or later, counted from the newest.

    No dict can be read from a key or an index: the numbers are copied newest first in blocks that
    double (C's speed, a few ns each) until one reaches below ``entry``, which a bisection then
    finds in it. O(the count): 2-4 ms for 100,000, 0.1 ms for 1,000 (a loaded 2-core machine).
    """
    newest_first = reversed(entries.values())
    counted, size = 0, 64
    while True:
        block = list(islice(newest_first, size))
        if not block or block[-1] < entry:  # the first entry before `entry` is in it (descending: by -number)
            return counted + bisect_right(block, -entry, key=neg)
        counted += len(block)
        size *= 2


def _changed(record: Record, **changes: Any) -> Record:
    """A copy of ``record`` with some fields changed (states as strings): for the rarer transitions."""
    fields = list(record)
    for name, value in changes.items():
        fields[_POSITIONS[name]] = value
    return tuple(fields)


class MemoryStore(TaskStore):
    """Tasks in a dict, due work in two deques, delayed work and retries in a heap, all under one lock.

    ``capacity`` bounds the tasks admitted and not yet started. Finished tasks
    are kept ``ttl`` seconds after they finished (by ``clock``) and at most
    ``max_finished`` of them. ``wait(event, timeout)`` is how idle workers
    block (tests pass a fake clock's). Every method is amortised O(1) but
    ``list`` (O(limit)), ``page`` (O(limit) plus its depth) and ``abandon`` (O(unfinished)).
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
        self._position_key = secrets.token_bytes(16)  # entry numbers start at 1 again with each store
        # _lock must be held while reading or changing any attribute below;
        # it is never held while calling out of this module (Event.set aside).
        self._lock = threading.Lock()
        self._tasks: dict[str, Record] = {}  # id -> current record, in admission order
        # The latest created_at admitted: the submitter stamps a task before this lock, so two
        # racing submits may arrive out of stamp order; admit clamps to keep creation times
        # non-decreasing in admission (listing) order.
        self._last_created = -math.inf
        # Ids per state in the order they entered it, each to its entry number (from _entry, so the
        # numbers grow along each dict): O(1) counts, newest-first listing by state, and the position a
        # page of a listing stops at. _admitted is the same for admission: the keys of _tasks, in order.
        self._entry = 0  # the last entry number given (an int, not itertools.count: no call per entry)
        self._by_state: dict[str, dict[str, int]] = {state.value: {} for state in State}
        self._admitted: dict[str, int] = {}
        self._owners: dict[str, str] = {}  # running id -> the owner that claimed it
        self._queued, self._running = self._by_state[_QUEUED], self._by_state[_RUNNING]
        self._done = self._by_state[_DONE]
        self._retry_line: deque[Record] = deque()  # due retries: they run first (accepted long ago)
        self._new_line: deque[Record] = deque()  # due new tasks, in the order they fell due
        self._scheduled: list[tuple[float, int, Record]] = []  # heap of (due time, order, task) not yet due
        self._new_scheduled: list[tuple[float, int, Record]] = []  # its entries of new tasks: a full queue's due time
        self._order = itertools.count()
        self._pending: dict[str, Record] = {}  # id -> the record its live heap entry holds
        self._retries_pending = 0  # entries of _pending with attempts > 0
        self._waiting = 0  # queued tasks with attempts == 0: what the bound counts
        self._finished: deque[Record] = deque()  # final records, oldest finished first
        # When the oldest of them outlives the ttl (its finished_at + ttl), which the steps every task takes
        # compare with the clock instead of reading the record; -inf while none is retained (set by _evict).
        self._expires = -math.inf
        self._idle: list[threading.Event] = []  # workers blocked in wait_for_work
        self._local = threading.local()  # each thread's wait event, reused
        self._woken = False

    # -- transitions -----------------------------------------------------

    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        results: list[Task | SubmitError] = []
        lock = self._lock
        lock.acquire()  # not `with`: see the module docstring
        try:
            now = self._clock()
            finished = self._finished
            # By age only: every step that finishes a task evicts down to max_finished at once.
            if finished and now >= self._expires:
                self._evict(now)  # a forgotten id may be submitted again
            if self._scheduled:  # what fell due earlier goes ahead of what arrives now
                self._release_due(now)
            tasks_by_id, queued, new_line = self._tasks, self._queued, self._new_line
            admitted = self._admitted
            full: tuple[int, float | None] | None = None
            for task in tasks:
                task_id = task.id
                if task_id in tasks_by_id:
                    results.append(DuplicateTask(task_id))
                elif self._waiting >= self.capacity:
                    if full is None:
                        full = self._delayed(now)
                    results.append(QueueFull(self.capacity, delayed=full[0], due_in=full[1]))
                else:
                    # A new task is queued, attempts == 0 (see TaskStore.admit): its fields as one plain
                    # tuple are its record, read by position (a Task's own items are a subclass's, slower).
                    record = t = task[:]  # an exact tuple: copied in C, where tuple() iterates a subclass
                    created = t[6]
                    if created < self._last_created:  # stamped before a task admitted first
                        # Common with batches submitted side by side: spelled out, a third of _replace().
                        created = self._last_created
                        record = (t[0], t[1], t[2], t[3], t[4], t[5], created, t[7], t[8], t[9], t[10], t[11], t[12])
                        task = _tuple_new(Task, record)
                    self._last_created = created
                    tasks_by_id[task_id] = record
                    self._entry += 1
                    admitted[task_id] = queued[task_id] = self._entry
                    self._waiting += 1
                    if t[9] is None:
                        new_line.append(record)
                    else:
                        self._schedule(record)
                    results.append(task)
            if self._idle:
                self._wake_idle(len(tasks))
        finally:
            lock.release()
        return results

    def claim(self, owner: str, lease_until: float) -> Task | None:
        with self._lock:
            running = self._claim(owner, self._clock())
        if running is None:
            return None
        running = _tuple_new(Task, running)  # a running record holds its State
        return _own_payload(running) if type(running[1]) in _CONTAINERS else running

    def finish(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
        created_at: float | None = None,  # a running task never changes hands here (see TaskStore.finish)
    ) -> Task | None:
        with self._lock:
            ended = self._finish_attempt(task_id, attempt, owner, error, result, retry_at, self._clock())
        return None if ended is None else _snapshot(ended)

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
        created_at: float | None = None,  # as in finish
    ) -> tuple[Task | None, Task | None]:
        lock = self._lock
        lock.acquire()  # one hold for both: a busy worker goes from one task to the next without a handoff
        try:  # not `with`: see the module docstring
            now = self._clock()
            tasks = self._tasks
            task = tasks.get(task_id)
            if (
                error is None
                and task is not None
                and task[3] is _RUNNING_STATE
                and task[4] == attempt
                and self._owners.get(task_id) == owner
            ):  # a success, _finish_attempt()'s hot path spelled out: a call less, once per task
                _, _, max_retries, _, attempts, last_error, created, started, _, _, request_id, _, cancel = task
                ended = (task_id, "", max_retries, _DONE, attempts, last_error, created, started, now, None,
                         request_id, result, cancel)  # fmt: skip
                del self._running[task_id], self._owners[task_id]
                self._entry += 1
                self._done[task_id] = self._entry
                tasks[task_id] = ended
                finished = self._finished
                finished.append(ended)
                if len(finished) > self._max_finished or now >= self._expires:
                    self._evict(now)
                done = True
            else:
                ended = self._finish_attempt(task_id, attempt, owner, error, result, retry_at, now)
                done = False
            running = self._claim(owner, now)
        finally:
            lock.release()
        # The snapshots are made after the lock is released: the other threads wait less.
        if running is not None:
            running = _tuple_new(Task, running)  # a running record holds its State
            if type(running[1]) in _CONTAINERS:
                running = _own_payload(running)
        if done:  # its snapshot, spelled out as well
            return _tuple_new(
                Task, (task_id, "", max_retries, _DONE_STATE, attempts, last_error, created, started, now, None,
                       request_id, result, cancel)
            ), running  # fmt: skip
        return None if ended is None else _snapshot(ended), running

    def cancel(self, task_id: str) -> tuple[Task | None, bool]:
        with self._lock:
            now = self._clock()
            self._evict(now)
            task = self._tasks.get(task_id)
            if task is None:
                return None, False
            if task[_STATE] in _FINAL_STATES or task[_CANCEL_REQUESTED]:
                return _snapshot(task), False
            if task[_STATE] == _RUNNING:
                changed = _changed(task, cancel_requested=True)
                self._tasks[task_id] = changed
                return _snapshot(changed), True
            self._unqueue(task)
            cancelled = _changed(task, state=_CANCELLED, payload="", finished_at=now, next_attempt_at=None)
            self._set(task, cancelled)
            self._drop_stale()
            self._finish(cancelled, now)
            return _snapshot(cancelled), True

    def put_back(self, task_id: str, attempt: int, owner: str) -> Task | None:
        with self._lock:
            now = self._clock()
            task = self._tasks.get(task_id)
            if task is None or task[_STATE] is not _RUNNING_STATE or task[_ATTEMPTS] != attempt:
                return None
            if self._owners[task_id] != owner:
                return None
            started = None if attempt == 1 else task[_STARTED_AT]  # as admitted: no attempts, no start
            if task[_CANCEL_REQUESTED]:
                cancelled = _changed(
                    task, state=_CANCELLED, payload="", attempts=attempt - 1, started_at=started, finished_at=now
                )
                self._set(task, cancelled)
                self._finish(cancelled, now)
                return _snapshot(cancelled)
            if attempt == 1:  # back at the head of the new tasks, where it was claimed from
                queued = _changed(task, state=_QUEUED_STATE, attempts=0, started_at=None)
                self._waiting += 1
                self._set(task, queued)
                self._new_line.appendleft(queued)
            else:  # a retry, due now, at the head of the retries
                queued = _changed(task, state=_QUEUED_STATE, attempts=attempt - 1, next_attempt_at=now)
                self._set(task, queued)
                self._retry_line.appendleft(queued)
            self._wake_idle(1)
            return _snapshot(queued)

    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        abandoned = []
        with self._lock:
            now = self._clock()
            for task_id in [*self._by_state[_QUEUED], *self._by_state[_RUNNING]]:
                task = self._tasks[task_id]
                if task[_STATE] == _QUEUED:
                    self._unqueue(task)
                failed = _changed(
                    task, state=_FAILED, payload="", last_error=reason, finished_at=now, next_attempt_at=None
                )
                self._set(task, failed)
                self._finish(failed, now)
                abandoned.append(failed)
            self._retry_line.clear()
            self._new_line.clear()
            self._scheduled.clear()
            self._new_scheduled.clear()
        return [_snapshot(record) for record in abandoned]

    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        return _NO_RENEWAL  # leases never expire here; cancel requests reach the pool directly

    def recover(
        self,
        retry_at: Callable[[Task], float | None],
        *,
        before: float | None = None,
        unreachable: tuple[float, float] | None = None,
    ) -> list[Task]:
        return []  # no lease ever expires

    # -- waiting ---------------------------------------------------------

    def seconds_until_due(self) -> float | None:
        with self._lock:
            now = self._clock()
            if self._scheduled:
                self._release_due(now)
            return self._until_due(now)

    def wait_for_work(self, timeout: float | None) -> None:
        """Block until work is admitted, a retry or delayed task falls due, ``wake``, or ``timeout``.

        While a task is scheduled later, the wait lasts ``_MAX_DUE_WAIT`` at most: the caller claims
        again, so a task is claimed within that much of its due time after the wall clock steps.
        """
        with self._lock:
            if self._woken:
                return
            now = self._clock()
            if self._scheduled:
                self._release_due(now)
            until_due = self._until_due(now)
            if until_due == 0:
                return
            if until_due is not None:
                until_due = min(until_due, _MAX_DUE_WAIT)
                if timeout is None or until_due < timeout:
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
            record = self._tasks.get(task_id)
        return None if record is None else _snapshot(record)

    def list(self, state: State | None = None, limit: int = 100, *, results: bool = True) -> list[Task]:
        with self._lock:
            self._evict(self._clock())
            if state is None:
                records = list(islice(reversed(self._tasks.values()), limit))
            else:
                ids = self._by_state[State(state).value]  # a State, or its value as a plain string
                records = [self._tasks[task_id] for task_id in islice(reversed(ids), limit)]
        if results:
            return [_snapshot(record)._replace(payload="") for record in records]
        return [_snapshot(record)._replace(payload="", result=None) for record in records]

    def page(
        self, state: State | None = None, limit: int = 100, *, results: bool = True, after: Position | None = None
    ) -> Page:
        """A page of ``list``: positions are entry numbers, which grow along each dict (see ``__init__``).

        The tasks entered since ``after`` are counted off the newest end (see _entered_since), then the
        page is read from there: a page ``n`` tasks deep takes O(n + limit) under the lock, in C but for
        the page itself (3.6 ms for 1,000 tasks 99,000 deep, measured), O(limit) for the first.
        """
        if after is not None:
            (entry,) = check_position(after, 1)
        with self._lock:
            self._evict(self._clock())
            entries = self._admitted if state is None else self._by_state[State(state).value]
            skip = 0 if after is None else _entered_since(entries, entry)
            listed = list(islice(reversed(entries.items()), skip, skip + limit + 1))
            tasks = self._tasks
            records = [tasks[task_id] for task_id, _ in listed[:limit]]
        more = len(listed) > limit
        if results:
            snapshots = [_snapshot(record)._replace(payload="") for record in records]
        else:
            snapshots = [_snapshot(record)._replace(payload="", result=None) for record in records]
        return Page(snapshots, (listed[limit - 1][1],) if more else None)

    def position_key(self) -> bytes:
        return self._position_key

    def stats(self) -> StoreStats:
        with self._lock:
            now = self._clock()
            self._evict(now)
            if self._scheduled:
                self._release_due(now)
            counts = {_STATES[state]: len(ids) for state, ids in self._by_state.items()}
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

    def _claim(self, owner: str, now: float) -> Record | None:
        if self._scheduled:
            self._release_due(now)
        tasks = self._tasks
        while True:
            line = self._retry_line or self._new_line  # retries first
            if not line:
                return None
            task = line.popleft()
            task_id = task[0]
            if tasks.get(task_id) is task:
                break
            # cancelled or abandoned while it waited
        # The hot path, spelled out rather than _changed() and _set(): a line holds queued
        # records only, and queued -> running is a legal change (TRANSITIONS). The fields are
        # unpacked once: a third cheaper than reading them one by one.
        _, payload, max_retries, _, attempts, last_error, created, _, _, _, request_id, result, cancel = task
        if attempts == 0:
            self._waiting -= 1
        running = (task_id, payload, max_retries, _RUNNING_STATE, attempts + 1, last_error, created, now, None,
                   None, request_id, result, cancel)  # fmt: skip
        del self._queued[task_id]
        self._entry += 1
        self._running[task_id] = self._entry
        self._owners[task_id] = owner
        tasks[task_id] = running
        return running

    def _finish_attempt(
        self, task_id: str, attempt: int, owner: str, error: str | None, result: Any, retry_at: float | None, now: float
    ) -> Record | None:
        task = self._tasks.get(task_id)
        if task is None or task[_STATE] is not _RUNNING_STATE or task[_ATTEMPTS] != attempt:
            return None
        if self._owners[task_id] != owner:
            return None
        if error is None:  # the hot path, spelled out as in _claim(): running -> done is a legal change
            _, _, max_retries, _, attempts, last_error, created, started, _, _, request_id, _, cancel = task
            ended = (task_id, "", max_retries, _DONE, attempts, last_error, created, started, now, None, request_id,
                     result, cancel)  # fmt: skip
            del self._running[task_id], self._owners[task_id]
            self._entry += 1
            self._done[task_id] = self._entry
            self._tasks[task_id] = ended
            finished = self._finished
            finished.append(ended)
            if len(finished) > self._max_finished or now >= self._expires:
                self._evict(now)
            return ended
        if task[_CANCEL_REQUESTED]:
            ended = _changed(task, state=_CANCELLED, payload="", finished_at=now, last_error=error)
        elif retry_at is not None:
            ended = _changed(task, state=_QUEUED_STATE, last_error=error, next_attempt_at=retry_at)
        else:
            ended = _changed(task, state=_FAILED, payload="", finished_at=now, last_error=error)
        self._set(task, ended)
        if ended[_STATE] is _QUEUED_STATE:
            self._schedule(ended)
            self._wake_idle(1)
        else:
            self._finish(ended, now)
        return ended

    def _set(self, old: Record, new: Record) -> None:
        """Store ``new`` as the current record of ``old``'s task, moving it between states."""
        old_state, new_state, task_id = old[3], new[3], old[0]
        if new_state not in _TRANSITIONS[old_state]:  # the common case without a call: twice per task
            check_transition(_STATES[old_state], _STATES[new_state])
        del self._by_state[old_state][task_id]
        self._entry += 1
        self._by_state[new_state][task_id] = self._entry
        if old_state is _RUNNING_STATE:  # only the claim enters it, spelled out in _claim()
            del self._owners[task_id]
        self._tasks[task_id] = new

    def _schedule(self, task: Record) -> None:
        entry = (task[_NEXT_ATTEMPT_AT], next(self._order), task)
        heapq.heappush(self._scheduled, entry)
        self._pending[task[_ID]] = task
        if task[_ATTEMPTS]:
            self._retries_pending += 1
        else:
            heapq.heappush(self._new_scheduled, entry)

    def _release_due(self, now: float) -> None:
        """Move the heap's entries that fell due to the back of their line, in due order."""
        scheduled = self._scheduled
        while scheduled and scheduled[0][0] <= now:
            task = heapq.heappop(scheduled)[2]
            if self._pending.get(task[_ID]) is not task:
                continue  # cancelled or abandoned while it waited
            del self._pending[task[_ID]]
            if task[_ATTEMPTS]:
                self._retries_pending -= 1
                self._retry_line.append(task)
            else:
                self._new_line.append(task)
        new_scheduled = self._new_scheduled
        while new_scheduled and new_scheduled[0][0] <= now:  # each one's entry in _scheduled was handled above
            heapq.heappop(new_scheduled)

    def _unqueue(self, task: Record) -> None:
        """Forget a queued task's place (its line or heap entry goes stale) before it leaves the queue."""
        if task[_ATTEMPTS] == 0:
            self._waiting -= 1
        if self._pending.get(task[_ID]) is task:
            del self._pending[task[_ID]]
            if task[_ATTEMPTS]:
                self._retries_pending -= 1

    def _drop_stale(self) -> None:
        """Rebuild the lines, and each heap, without their stale entries once these outnumber the live ones.

        A cancelled task's entry holds its queued record, payload and all,
        until it is reached: a delay may keep it there an hour, busy workers
        as long as their attempts run, and a client cancelling what it submits
        would pin a payload per request. Each rebuild follows at least as many
        cancels as it keeps entries: amortised O(1) per cancel.
        """
        tasks, pending = self._tasks, self._pending
        lined = len(self._queued) - len(pending)  # the live entries of the lines (see _until_due)
        if len(self._retry_line) + len(self._new_line) > 2 * lined + _STALE_SLACK:
            for line in (self._retry_line, self._new_line):
                live = [task for task in line if tasks.get(task[_ID]) is task]
                line.clear()
                line.extend(live)
        new_pending = len(pending) - self._retries_pending
        for heap, live in ((self._scheduled, len(pending)), (self._new_scheduled, new_pending)):
            if len(heap) > 2 * live + _STALE_SLACK:
                heap[:] = [entry for entry in heap if pending.get(entry[2][_ID]) is entry[2]]
                heapq.heapify(heap)  # (due time, order) pairs are unique: the records are never compared

    def _delayed(self, now: float) -> tuple[int, float | None]:  # _lock is held
        """How many waiting tasks are delayed; when all are, how long until the first of them falls due.

        A retry waiting out its backoff is not among them: it holds no place, and frees none when it runs.
        """
        delayed = len(self._pending) - self._retries_pending
        if delayed < self._waiting:
            return delayed, None
        new_scheduled, pending = self._new_scheduled, self._pending
        while new_scheduled and pending.get(new_scheduled[0][2][_ID]) is not new_scheduled[0][2]:
            heapq.heappop(new_scheduled)  # cancelled while it waited
        first_due = new_scheduled[0][0] if new_scheduled else None
        return full_queue_delays(delayed=delayed, waiting=self._waiting, first_due=first_due, now=now)

    def _until_due(self, now: float) -> float | None:
        if len(self._by_state[_QUEUED]) > len(self._pending):
            return 0.0  # a live entry waits in a line
        while self._scheduled and self._pending.get(self._scheduled[0][2][_ID]) is not self._scheduled[0][2]:
            heapq.heappop(self._scheduled)  # stale
        return max(0.0, self._scheduled[0][0] - now) if self._scheduled else None

    def _wake_idle(self, count: int) -> None:
        for _ in range(min(count, len(self._idle))):
            self._idle.pop().set()

    def _finish(self, task: Record, now: float) -> None:
        self._finished.append(task)
        self._evict(now)

    def _evict(self, now: float) -> None:
        finished = self._finished
        horizon = now - self._ttl
        while finished and (len(finished) > self._max_finished or finished[0][_FINISHED_AT] <= horizon):
            task = finished.popleft()
            del self._tasks[task[_ID]], self._admitted[task[_ID]]
            del self._by_state[task[_STATE]][task[_ID]]
        self._expires = finished[0][_FINISHED_AT] + self._ttl if finished else -math.inf
