"""The worker pool: a thin runner over a task store.

Worker threads ``claim`` the next due task from the store, run the handler
outside every lock, and ``finish`` the attempt; idle workers block in the
store's ``wait_for_work``. Every change of a task is one atomic step of the
store (``workerpool/stores/base.py`` holds the whole locking story); the pool
only keeps what is local to this process: its threads, the attempts they run
(each with its own cancel event), whether it still admits, and the order in
which observers hear of a task's changes.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from . import forks  # noqa: F401  (warns of a handler that forks the process during its attempt)
from .backoff import compute_backoff
from .current import running as _running_task
from .errors import (
    PermanentFailure,
    PoolClosed,
    StoreFileReplaced,
    StoreNotSynced,
    StorePartlyAdmitted,
    StoreUnavailable,
    SubmitError,
)
from .handlers import SimulatedWork, Wait, event_wait
from .ids import new_task_id
from .nesting import MAX_RESULT_DEPTH, UnreadableResult
from .observer import PoolObserver
from .reachability import Reachability
from .results import check_result, describe_error
from .stores.base import Page, Position, TaskStore
from .stores.memory import MemoryStore
from .task import FINAL_STATES, State, Task

log = logging.getLogger(__name__)
_tuple_new = tuple.__new__  # _tuple_new(Task, fields): Task._make without its Python frame
_QUEUED, _DONE = State.QUEUED, State.DONE  # globals, read faster than the members of an Enum class

Handler = Callable[[Task, threading.Event], Any]
"""``handler(task, cancel)`` runs one attempt: its return value is the task's
result (JSON-serialisable, at most ``max_result_bytes`` as JSON, else the task
fails for good), raising fails the attempt (retried unless the exception is a
``PermanentFailure``). ``cancel`` is set when the task is cancelled, when its
attempt is abandoned at shutdown (or timed out): a long handler should return early."""

ABANDONED = "abandoned at shutdown: not finished when the drain deadline passed"
TIMED_OUT = "AttemptTimeout: the attempt ran longer than {:g} s"
# How often a pool with a shared store looks for cancels requested by other processes while its attempts run.
CANCEL_POLL_S = 0.1
# How long the drain waits at most, within its end, for cancels whose store step has begun, to count them.
_CANCEL_GRACE_S = 1.0
_STORE_RETRY_S = 1.0  # how long a worker waits after the store failed before it tries again
# How long past its deadline a drain waits for a shared store's last steps (abandoning, counting): a store
# that does not answer by then (Redis paused, a SQLite file locked) is given up on, and leases settle the rest.
DRAIN_STORE_GRACE_S = 1.0
_UNREADABLE_TOLD_MAX = 10_000  # task ids remembered as logged for an unreadable result


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of ``submit_many``; ``id=None`` asks for a server-made id."""

    id: str | None
    payload: Any = ""
    max_retries: int = 0
    delay: float = 0.0
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class PoolStats:
    workers: int
    queue_capacity: int
    queue_depth: int
    """Tasks due now and waiting for a worker (new ones and due retries)."""
    retries_pending: int
    accepting: bool
    counts: dict[State, int]
    waiting: int = 0
    """Tasks admitted and not yet started, delayed ones included: what ``queue_capacity`` bounds."""
    attempts_timed_out: int = 0
    """Attempts failed by the attempt timeout since the pool was made."""
    stuck_threads: int = 0
    """Worker threads still running a handler whose attempt timed out."""
    stuck_threads_limit: int = 0
    """How many stuck threads get a replacement; past it the pool runs short of workers."""
    store_error: str | None = None
    """Why the store cannot be written now, though it answered these figures (``StoreStats.unavailable``)."""


@dataclass(frozen=True, slots=True)
class ProcessStats:
    """What one pool knows without reading its store: its part of a service that several processes share."""

    workers: int
    accepting: bool
    attempts_timed_out: int
    stuck_threads: int
    stuck_threads_limit: int


@dataclass(frozen=True, slots=True)
class ShutdownSummary:
    counts: dict[State, int]
    """What this pool did: the tasks it brought to each final state since it was
    made (abandoned ones are failed), however many retention still keeps, so
    that they add up with the tasks it accepted; and the queued and running
    tasks left behind (a shared store keeps its queued tasks for other processes)."""
    abandoned: tuple[str, ...]
    drain_seconds: float
    left_to_leases: int = 0
    """Attempts of this pool the store could not abandon (it was unavailable): counted as running,
    they end when their leases expire (another process, or the next start, recovers them)."""
    queued_counted: bool = True
    """False when the store could not count the queued tasks at the end of the drain (it was
    unavailable): the queued count then says 0 but is not known."""


@dataclass(slots=True)
class Attempt:
    """An attempt a worker of this pool runs; ``cancel`` is handed to its handler."""

    task: Task
    cancel: threading.Event
    started: float  # by the pool's monotonic clock
    thread: threading.Thread
    timed_out: bool = False  # set under the pool's _lock; then only the timeout ends it in the store
    ending: bool = False  # its worker is recording its end (under _lock): too late to time it out
    # Set (without _lock) before its worker writes its end to the store: a renewal that then finds the task
    # no longer running here may have been answered after that write, so it tells nothing about a lost lease.
    writing_end: bool = False
    recording: bool = False  # the watchdog is writing its timeout to the store (under _lock)
    retry_at: float | None = None  # the retry the timeout scheduled, drawn once however often the write is tried
    claimed_next: Task | None = None  # the task its worker claimed in the same store step as this attempt's end
    successor: Attempt | None = None  # claimed_next's attempt, registered in the same _lock hold as this one's end
    claimed_none: bool = False  # the store step that recorded its end claimed next and found nothing due
    cancelled_early: bool = False  # cancelled before it was registered (set under _lock): its handler is told
    waits_turn: bool = False  # an earlier change of its task was not yet heard by the observers (see _wait_turn)


class WorkerPool:
    """Runs submitted tasks on ``workers`` threads over a ``store``, retrying failures with backoff.

    Without ``store`` the pool keeps its tasks in a ``MemoryStore`` built from
    ``queue_size``, ``state_ttl`` and ``state_max_tasks``; a given store brings
    its own bound and retention. ``clock`` stamps task times (seconds since
    the epoch), ``monotonic`` times attempts and the drain deadline, ``wait``
    blocks on an event with a timeout and ``rng`` draws the jitter: tests
    inject all four. ``observers`` hear of every change of a task, in the
    order the changes happened. With ``threads=False`` no thread is started
    and the caller drives the pool with ``step()``; its ``shutdown()`` runs
    what is left on the calling thread (see ``shutdown``).
    """

    # Slots, not an instance dict: the pool has more attributes than CPython 3.11 keeps in a class's
    # shared keys (30), so its dict was a plain one that the interpreter reads and calls methods
    # through more slowly; a worker reads the pool's attributes some sixty times per task. A new
    # attribute is listed here (setting one that is not raises AttributeError).
    __slots__ = (
        "workers", "queue_size", "owner", "_store", "_handler", "_backoff_base", "_backoff_cap",
        "_max_result_bytes", "_lease", "_attempt_timeout", "_max_stuck", "_rng", "_clock", "_monotonic", "_wait",
        "_observers", "_on_queued", "_on_started", "_on_finished", "_on_cancelled", "_on_abandoned",
        "_use_threads", "_lock", "_threads", "_closing", "_claiming", "_deadline", "_running", "_finals",
        "_admitting", "_admission_entries", "_cancelling", "_cancel_entries", "_order_lock", "_in_flight",
        "_turn_waiters", "_step_cancel", "_cancel_early", "_unreadable_told",
        "_all_started", "_timeouts", "_stuck", "_retired", "_thread_numbers", "_threads_stop", "_drain_wakeup",
        "_drained", "_summary", "_keeper_wakeup", "_keeper_idle", "_drain_call", "_left_to_leases", "_cutoff", "_reach",
        "_claim_failure_told_at", "_abandoned_all", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        store: TaskStore | None = None,
        workers: int = 4,
        queue_size: int = 64,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        state_ttl: float = 3600.0,
        state_max_tasks: int = 100_000,
        max_result_bytes: int = 65536,
        lease: float = 30.0,
        attempt_timeout: float = 0.0,
        max_stuck_threads: int | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        wait: Wait = event_wait,
        observers: Iterable[PoolObserver] = (),
        threads: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if not 0 <= backoff_base <= backoff_cap:
            raise ValueError(f"need 0 <= backoff_base <= backoff_cap, got {backoff_base}, {backoff_cap}")
        if lease <= 0 or max_result_bytes < 0:
            raise ValueError(f"need lease > 0 and max_result_bytes >= 0, got {lease}, {max_result_bytes}")
        if not 0 <= attempt_timeout < math.inf:
            raise ValueError(f"attempt_timeout must be a finite number of seconds >= 0, got {attempt_timeout}")
        self.workers = workers
        self._store = store or MemoryStore(
            queue_size, ttl=state_ttl, max_finished=state_max_tasks, clock=clock, wait=wait
        )
        self.queue_size = self._store.capacity
        self._handler = handler or SimulatedWork(rng=rng)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._max_result_bytes = max_result_bytes
        self._lease = lease
        self._attempt_timeout = attempt_timeout  # 0: attempts may run for ever
        self._max_stuck = workers if max_stuck_threads is None else max_stuck_threads
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self._wait = wait
        self._observers = tuple(observers)
        # Each hook bound once, and only for the observers that override it: a hook nobody
        # overrides costs its call sites one test per task, with no arguments built, no loop and
        # no call of PoolObserver's empty method (nor, for submissions, any order to keep).
        self._on_queued = _hooks(self._observers, "tasks_queued", "task_queued")
        self._on_started = _hooks(self._observers, "attempt_started")
        self._on_finished = _hooks(self._observers, "attempt_finished")
        self._on_cancelled = _hooks(self._observers, "task_cancelled")
        self._on_abandoned = _hooks(self._observers, "task_abandoned")
        self._use_threads = threads
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"

        # _lock must be held while changing the attributes below, and while
        # reading them but for _threads and _closing, which a submission reads
        # without it (see _admit). It is held only for bookkeeping: never
        # across a store call, a handler, an observer or logging.
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []  # those started (a thread joins once it runs)
        self._all_started = False  # every thread the pool needs was started once (see _start_locked)
        # Shutdown began. A store of this process alone then refuses submissions;
        # a shared one keeps taking them: its queued tasks are left to the other
        # processes (or the next start) anyway, and so a request already read
        # when a stop signal or a reload came still gets its 202.
        self._closing = False
        self._claiming = True  # workers take new attempts (a shared store stops at once on shutdown)
        # The drain abandons the unfinished work (set under _lock, before the store fails it): an attempt
        # registered from then on (claimed before, or with its worker's last end) is not started.
        self._abandoned_all = False
        self._deadline = math.inf
        self._running: dict[str, Attempt] = {}  # the attempts this pool's workers run, by task id
        # Final states reached through this pool: a plain dict, as a Counter's items are slower to count.
        self._finals: dict[State, int] = dict.fromkeys(FINAL_STATES, 0)
        # Submissions past the closing check whose store step has not ended, one number each: the
        # drain waits for them before it looks for unfinished work (past its deadline, only for those
        # under way then). A set rather than a count under _lock: its add and discard are atomic (see
        # _admit), and a submission takes no lock of the pool.
        self._admitting: set[int] = set()
        self._admission_entries = itertools.count()
        # Cancels between the start of their store step and their count, one number each: the drain sums up
        # only once those begun before are counted (_wait_for_cancels). A cancel the store made just before
        # the abandon, counted after the summary, was counted nowhere. A set's add and discard are atomic.
        self._cancelling: set[int] = set()
        self._cancel_entries = itertools.count()
        # _order_lock must be held while changing _in_flight and _turn_waiters
        # (see "the order observers hear of a task" below); it is never held
        # with _lock. A lock of its own: a submitter marks a whole batch under
        # it, and the workers, which take _lock once per task, never wait for that.
        self._order_lock = threading.Lock()
        # Tasks whose last change is not yet heard by the observers, and how
        # many such changes are in flight: whoever changes such a task next
        # waits before telling (see _wait_turn), on an Event in _turn_waiters.
        # Submissions are marked only when there are observers to hear them.
        self._in_flight: dict[str, int] = {}
        self._turn_waiters: dict[str, threading.Event] = {}
        self._step_cancel = threading.Event()  # step()'s cancel event, reused until it is set
        # Attempts cancelled before their worker registered them, by (task id, created_at, attempt number).
        self._cancel_early: set[tuple[str, float, int]] = set()
        self._unreadable_told: set[str] = set()  # tasks whose unreadable result was logged (see get)
        self._timeouts = 0  # attempts failed by the attempt timeout
        self._claim_failure_told_at = -math.inf  # when a worker last logged that the store refused its claim
        self._stuck: set[threading.Thread] = set()  # workers still in a handler whose attempt timed out
        self._retired: set[threading.Thread] = set()  # stuck workers that were replaced: they exit on return
        self._thread_numbers = itertools.count(workers + 1)
        self._threads_stop = threading.Event()  # set when the threads stop: ends the watchdog's waits
        # The lease keeper waits on this; it is set when the threads stop, and when an attempt starts
        # while the keeper is idle (_keeper_idle: nothing ran here when it began its wait, under _lock).
        self._keeper_wakeup = threading.Event()
        self._keeper_idle = False

        self._drain_wakeup = threading.Event()  # a drain waits for attempts to end or a nearer deadline
        self._drained = threading.Event()
        self._summary: ShutdownSummary | None = None
        self._drain_call: threading.Event | None = None  # set when the drain's last store call answered
        self._left_to_leases = 0  # attempts running here that the store could not abandon
        self._cutoff: float | None = None  # when the drain stops waiting for a shared store (see _store_cutoff)
        # The lease keeper's record of store outages: leases they let expire are not swept at once.
        # Steps come a third of a lease apart: one answered later than that plus a slow step followed a pause.
        self._reach = Reachability(grace=lease, slow=lease / 3, quiet=2 * lease / 3)

    # -- admission -------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (idempotent; ``submit`` also starts them)."""
        with self._lock:
            started = self._start_locked()
        if started:
            self._log_started()

    def _start_locked(self) -> bool:
        """Start the threads the pool needs that do not run, unless it may not; whether this call started them.

        A thread may fail to start (no room for another: RuntimeError, raised to
        the caller); those started run, shutdown joins them alone, and the next
        call (the next submission) starts the others. The lease keeper and the
        watchdog start before the workers: no worker claims an attempt whose
        lease nobody renews (other processes would take it as lost while it
        runs) or whose timeout nobody watches.
        """
        if self._all_started or self._closing or not self._use_threads:
            return False
        wanted = []
        if self._store.shared:
            wanted.append(("workerpool-leases", self._keep_leases))
        if self._attempt_timeout:
            wanted.append(("workerpool-watchdog", self._watch))
        running = {thread.name for thread in self._threads}
        # As many workers as are missing: a replacement of a stuck worker (a new name) stands for it.
        working = sum(name.startswith("workerpool-worker-") for name in running) - len(self._retired)
        names = [f"workerpool-worker-{n}" for n in range(1, self.workers + 1)]
        wanted += [(name, self._work) for name in names if name not in running][: self.workers - working]
        for name, target in wanted:
            if name not in running:
                # Daemon threads: interpreter exit must never wait on a handler that
                # ignores cancellation. Shutdown drains explicitly instead.
                thread = threading.Thread(target=target, name=name, daemon=True)
                thread.start()
                self._threads.append(thread)
        self._all_started = True
        return True

    def _log_started(self) -> None:  # outside _lock: no logging under a lock
        log.info("pool started: %d worker thread(s), queue of %d", self.workers, self.queue_size)

    def submit(
        self,
        task_id: str | None,
        payload: Any = "",
        max_retries: int = 0,
        *,
        delay: float = 0.0,
        request_id: str | None = None,
    ) -> Task:
        """Accept a task without blocking; it is in the store on return.

        ``task_id=None`` makes a server id. ``delay`` seconds pass before its
        first attempt may start. Raises PoolClosed, DuplicateTask or
        QueueFull; a refused task leaves no trace. ``request_id`` is carried
        on the task for its log lines.
        """
        result = self._admit([self._new_task(task_id, payload, max_retries, delay, request_id)])[0]
        if isinstance(result, SubmitError):
            raise result
        return result

    def submit_many(self, specs: Sequence[TaskSpec]) -> list[Task | SubmitError]:
        """Accept several tasks in one store step; for each, its snapshot or why it was refused.

        A bad ``max_retries`` or ``delay`` raises ValueError before anything
        is admitted; a closed pool refuses all of them with PoolClosed. A store
        that bounds its steps (Redis) may take a large batch in several, and
        raise StorePartlyAdmitted when one after the first fails.
        """
        if not specs:  # no store step: a shared store would wait on a busy file or a paused server for nothing
            return []
        tasks = [self._new_task(s.id, s.payload, s.max_retries, s.delay, s.request_id) for s in specs]
        return self._admit(tasks)

    def _new_task(
        self, task_id: str | None, payload: Any, max_retries: int, delay: float, request_id: str | None
    ) -> Task:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not 0 <= delay < math.inf:
            raise ValueError(f"delay must be a finite number of seconds >= 0, got {delay}")
        now = self._clock()
        # The fields by position (see Task): a third of the cost of the keyword constructor, once per task.
        return _tuple_new(
            Task, (new_task_id(now) if task_id is None else task_id, payload, max_retries, _QUEUED, 0, None, now,
             None, None, now + delay if delay else None, request_id, None, False)
        )  # fmt: skip

    def _admit(self, tasks: list[Task]) -> list[Task | SubmitError]:
        # Entered before the closing check, left after the store step: a drain that sets _closing and
        # then finds no submission entered waits for none, as every later one sees _closing (the GIL
        # orders these steps). A shared store keeps admitting while its pool drains.
        started = False
        if not self._all_started and self._use_threads:  # (not once closing: _start_locked looks)
            with self._lock:
                started = self._start_locked()
        admitting, entry = self._admitting, next(self._admission_entries)
        admitting.add(entry)
        if self._closing and not self._store.shared:
            admitting.discard(entry)
            self._drain_wakeup.set()  # the drain may have seen this submission entered
            if started:
                self._log_started()
            return [PoolClosed() for _ in tasks]
        observed = bool(self._on_queued)  # someone hears of submissions
        if observed:  # the order of what observers hear; without them there is none to keep
            ids = [task.id for task in tasks]
            with self._order_lock:
                self._enter_in_flight(ids)  # before the store step: a worker may claim the task at once
        failed_though_admitted: StoreNotSynced | StorePartlyAdmitted | None = None
        try:
            try:
                results = self._store.admit(tasks)
            # Admitted all the same (the first tasks only, if partly): observers hear of them, then it is raised.
            except (StoreNotSynced, StorePartlyAdmitted) as exc:
                if exc.result is None:
                    raise
                results, failed_though_admitted = exc.result, exc
            if observed or log.isEnabledFor(logging.DEBUG):
                queued = [result for result in results if isinstance(result, Task)]
                for task in queued:
                    _log(logging.DEBUG, task, "task %s queued", task.id)
                if observed and queued:
                    _notify(self._on_queued, queued)
        finally:
            if observed:
                with self._order_lock:
                    self._leave_in_flight_all(ids)
            admitting.discard(entry)
            if self._closing:
                self._drain_wakeup.set()
        if started:
            self._log_started()
        if failed_though_admitted is not None:
            raise failed_though_admitted
        return results

    def cancel(self, task_id: str) -> Task | None:
        """Cancel a task: a queued one never runs; a running one has its cancel event set.

        None if the id is unknown; otherwise the snapshot after the cancel
        (``cancelled``, or still ``running`` with ``cancel_requested``, or
        unchanged when already final). A running attempt that then raises
        ends ``cancelled``; one that returns normally still ends ``done``.
        A cancel the store made but could not sync to disk (StoreNotSynced)
        stands: it is logged, counted and observed as any other, then raised.
        """
        # The store says whether this call made the change: of cancels racing here or in other
        # processes on a shared store, exactly one tells of it (and counts it).
        entry = next(self._cancel_entries)
        self._cancelling.add(entry)
        try:
            try:
                task, changed = self._store.cancel(task_id)
            except StoreNotSynced as exc:
                if exc.result is not None:
                    self._cancelled(task_id, *exc.result, entry)
                raise
            return self._cancelled(task_id, task, changed, entry)
        finally:
            self._cancel_counted(entry)

    def _cancelled(self, task_id: str, task: Task | None, changed: bool, entry: int = -1) -> Task | None:
        """Act on what the store's cancel did: count, log and tell of a change this call made."""
        if not changed:
            return task
        if task.state is State.CANCELLED:
            self._count_final(task)
            self._cancel_counted(entry)  # before the observers: they may take their time
            self._wait_turn(task_id)
            _log(logging.INFO, task, "task %s cancelled", task_id)
            if self._on_cancelled:
                _notify(self._on_cancelled, task)
            with self._lock:
                closing = self._closing
            if closing:  # the drain may be waiting for this task alone (delayed, or waiting out a backoff)
                self._drain_wakeup.set()
            return task
        # Before the handler hears of it: one that stops at once ends the attempt, and logs so, right after.
        _log(logging.INFO, task, "task %s: cancel requested while attempt %d runs", task_id, task.attempts)
        early = (task_id, task.created_at, task.attempts)
        with self._lock:
            attempt = self._running.get(task_id)
            if attempt is None and not self._store.shared:  # claimed, not yet registered by its worker...
                self._cancel_early.add(early)
            if attempt is not None:
                self._set_cancel(attempt)
        if attempt is None and not self._store.shared:
            # ...or ended already: its end was stored before it left _running, so the store tells.
            now = self._store.get(task_id)
            if now is None or (now.state, now.created_at, now.attempts) != (State.RUNNING, *early[1:]):
                with self._lock:
                    self._cancel_early.discard(early)
        return task

    # -- reading ---------------------------------------------------------

    @property
    def store(self) -> TaskStore:
        return self._store

    def get(self, task_id: str) -> Task | None:
        task = self._store.get(task_id)
        if task is not None and type(task.result) is UnreadableResult:
            self._tell_unreadable(task)
        return task

    def list(self, state: State | None = None, limit: int = 100, *, results: bool = True) -> list[Task]:
        tasks = self._store.list(state, limit, results=results)
        for task in tasks:
            if type(task.result) is UnreadableResult:
                self._tell_unreadable(task)
        return tasks

    def page(
        self, state: State | None = None, limit: int = 100, *, results: bool = True, after: Position | None = None
    ) -> Page:
        """A page of ``list``, and the position of the next (see ``TaskStore.page``)."""
        page = self._store.page(state, limit, results=results, after=after)
        for task in page.tasks:
            if type(task.result) is UnreadableResult:
                self._tell_unreadable(task)
        return page

    def _tell_unreadable(self, task: Task) -> None:
        """Log, once per task, that its stored result is read as an ``UnreadableResult`` (see workerpool/nesting.py)."""
        with self._lock:
            if task.id in self._unreadable_told:
                return
            if len(self._unreadable_told) >= _UNREADABLE_TOLD_MAX:  # bounded: a task may be told of again
                self._unreadable_told.clear()
            self._unreadable_told.add(task.id)
        _log(
            logging.WARNING, task, "task %s: its stored result is nested more than %d levels deep (kept by an older"
            " release): it is served as {\"unreadable_result\": ...}", task.id, MAX_RESULT_DEPTH,
        )  # fmt: skip

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def stats(self) -> PoolStats:
        stats = self._store.stats()
        with self._lock:
            timeouts, stuck = self._timeouts, len(self._stuck)
        return PoolStats(
            workers=self.workers,
            queue_capacity=self.queue_size,
            queue_depth=stats.due,
            retries_pending=stats.retries_pending,
            accepting=self.accepting,
            counts=stats.counts,
            waiting=stats.waiting,
            attempts_timed_out=timeouts,
            stuck_threads=stuck,
            stuck_threads_limit=self._max_stuck,
            store_error=stats.unavailable,
        )

    def process_stats(self) -> ProcessStats:
        """This pool's own counts, without a read of the store (cheap enough to take every second)."""
        with self._lock:
            timeouts, stuck = self._timeouts, len(self._stuck)
        return ProcessStats(self.workers, self.accepting, timeouts, stuck, self._max_stuck)

    def running(self) -> list[Attempt]:
        """The attempts this pool's workers run now (for a watchdog)."""
        with self._lock:
            return list(self._running.values())

    # -- workers ---------------------------------------------------------

    def step(self) -> bool:
        """Run the next due attempt on the calling thread; False if none was due.

        For a pool built with ``threads=False``: what a worker thread does in
        a loop, one attempt at a time. Once the pool stops claiming (shutdown),
        it puts back the task a claim of this thread whose reply was lost may
        have taken (see ``TaskStore.put_back_lost_claim``), as ``shutdown``
        does on the thread that calls it.
        """
        if self._use_threads:
            raise RuntimeError("step() drives a pool built with threads=False")
        if not self._claiming:
            self._put_back_lost_claim()
            return False
        task = self._store.claim(self.owner, self._clock() + self._lease)
        if task is None:
            return False
        if self._step_cancel.is_set():  # the last attempt's handler may still hold it
            self._step_cancel = threading.Event()
        self._run_attempt(self._new_attempt(task, self._step_cancel))
        return True

    def _work(self) -> None:
        store, owner, lease = self._store, self.owner, self._lease
        cancel = threading.Event()
        pause = threading.Event()  # never set: a pause that is not time.sleep
        # The next attempt, claimed and registered with the end of the last one when a task was due.
        attempt: Attempt | None = None
        # The last attempt's end claimed next and found nothing: wait at once. A claim now would be
        # a second store step (a transaction, a script) to learn the same; work admitted or falling
        # due since that step ends the wait (the wait_for_work contract), so no wake-up is lost.
        idle = False
        while self._claiming or attempt is not None:
            if attempt is None:
                try:
                    task = None if idle else store.claim(owner, self._clock() + lease)
                    if task is None:
                        idle = False
                        store.wait_for_work(None)
                        continue
                except StoreUnavailable as exc:  # Redis restarting, a full disk: no traceback
                    self._tell_claim_failure(exc)
                    self._wait(pause, _STORE_RETRY_S)
                    continue
                except Exception:  # a bug: keep the worker, try again shortly
                    log.exception("worker could not take a task; trying again in %.1f s", _STORE_RETRY_S)
                    self._wait(pause, _STORE_RETRY_S)
                    continue
                if cancel.is_set():  # the last attempt's handler may still hold it
                    cancel = threading.Event()
                attempt = self._new_attempt(task, cancel)
            cancel = attempt.cancel
            ended, attempt = attempt, self._run_attempt(attempt, True)
            idle = ended.claimed_none
            if attempt is None and self._stuck and self._leave_if_replaced():
                return
        self._put_back_lost_claim()

    def _put_back_lost_claim(self) -> None:
        """This thread claims no more: a claim of its whose reply was lost (asked again by its next claim, which
        will not come now) is put back in the queue, if the store took it."""
        try:
            self._store.put_back_lost_claim(self.owner)
        except StoreUnavailable as exc:
            log.warning(
                "worker could not put back the task its lost claim may have taken (%s): the drain abandons it at "
                "its deadline", exc,
            )  # fmt: skip

    def _tell_claim_failure(self, failure: StoreUnavailable) -> None:
        """Log that a worker could not take a task, at most once a second for the whole pool.

        Every worker meets the same outage and tries again each second: a line from each (64 a second
        with WORKERS=64) would bury the line that says why the store fails.
        """
        now = self._monotonic()
        with self._lock:
            told = now < self._claim_failure_told_at + _STORE_RETRY_S
            if not told:
                self._claim_failure_told_at = now
        if not told:
            log.warning("worker could not take a task (%s); trying again in %.1f s", failure, _STORE_RETRY_S)

    def _new_attempt(self, task: Task, cancel: threading.Event) -> Attempt:
        """The attempt of a task just claimed, registered as running here."""
        attempt = Attempt(task, cancel, self._monotonic(), threading.current_thread())
        with self._lock:
            self._register(attempt)
            # An attempt claimed with the end of the last one (_forget_attempt) never finds the keeper
            # idle: the two are registered in turn under one hold of _lock, so _running is never empty.
            wake_keeper, self._keeper_idle = self._keeper_idle, False
        if wake_keeper:
            self._keeper_wakeup.set()
        return attempt

    def _register(self, attempt: Attempt) -> None:  # _lock is held
        # _forget_attempt() spells this out for the attempt a worker claims with the end of its last one.
        task_id = attempt.task.id
        self._running[task_id] = attempt
        if self._cancel_early:
            self._take_early_cancel(attempt, task_id)
        # Read without _order_lock (one dict lookup, atomic under the GIL): a task is marked before
        # the store step that lets a worker claim it, so a worker that claimed it sees the mark
        # unless its observers have heard already. Taking _order_lock here would make every worker
        # wait, once per task, for a submitter marking a batch.
        attempt.waits_turn = task_id in self._in_flight

    def _take_early_cancel(self, attempt: Attempt, task_id: str) -> None:  # _lock is held
        early = (task_id, attempt.task.created_at, attempt.task.attempts)
        if early in self._cancel_early:
            self._cancel_early.discard(early)
            attempt.cancelled_early = True

    def _run_attempt(self, attempt: Attempt, claim_next: bool = False) -> Attempt | None:
        """Run one registered attempt; with ``claim_next``, the attempt claimed in the same store step as its
        end, if any (registered as well)."""
        task = attempt.task
        if self._abandoned_all:  # read without _lock: an attempt started before it is set is cancelled instead
            self._drop_unstarted(attempt)
            return None
        try:
            if attempt.waits_turn:
                self._wait_turn(task.id)
            if attempt.cancelled_early or task.cancel_requested:
                attempt.cancel.set()
            debug = log.isEnabledFor(logging.DEBUG)  # asked once for the attempt's start and its end
            if debug:
                _log(logging.DEBUG, task, "task %s attempt %d started", task.id, task.attempts)
            if self._on_started:
                _notify(self._on_started, task)
            running = _running_task.set(task)  # the handler's own log lines carry the task and request ids
            try:
                try:
                    returned = self._handler(task, attempt.cancel)
                finally:
                    _running_task.reset(running)
            except BaseException as exc:  # even SystemExit: it would end this thread silently
                # A timed-out attempt's retry was scheduled by the watchdog (read without the lock: a
                # stale False only draws a backoff that _end_attempt then drops).
                retry_at = None if isinstance(exc, PermanentFailure) or attempt.timed_out else self._retry_at(task)
                self._end_attempt(attempt, describe_error(exc), None, retry_at, exc, claim_next=claim_next)
            else:
                error = None
                if returned is not None:
                    error, returned = check_result(returned, self._max_result_bytes)
                if self._attempt_timeout:
                    self._end_attempt(attempt, error, None if error else returned, None, claim_next=claim_next)
                else:  # nothing races this end and it schedules no retry: _end_attempt has nothing to do
                    self._finish_attempt(attempt, error, None if error else returned, None, None, claim_next, debug)
        except StoreUnavailable as exc:  # tried again until the drain ended (unless timed out or cut off: see above)
            log.error(
                "task %s attempt %d: its end could not be recorded (%s); the attempt counts as lost once its "
                "lease expires", task.id, task.attempts, exc, extra={"task_id": task.id},
            )  # fmt: skip
        except Exception as exc:  # a bug of ours must neither kill the worker nor leave the task running
            log.exception("worker failed on task %s", task.id, extra={"task_id": task.id})
            self._end_failed_attempt(attempt, exc)
        return attempt.successor

    def _end_failed_attempt(self, attempt: Attempt, failure: Exception) -> None:
        """Record as failed an attempt whose end the store (or this pool) failed to record with ``failure``.

        Should the store fail this write as well, the worker goes on all the same: one worker fewer
        runs nothing, and a thread that ends is not started again. The task then stays running in
        the store until its lease expires (a shared store) or the drain abandons it.
        """
        task = attempt.task
        try:
            why = f"the attempt's end could not be recorded: {describe_error(failure)}"
            self._end_attempt(attempt, why, None, None)
        except Exception:
            _log(
                logging.ERROR, task, "task %s attempt %d: its failure could not be recorded either; it stays running "
                "until its lease expires or the drain abandons it", task.id, task.attempts, exc_info=True,
            )  # fmt: skip

    def _drop_unstarted(self, attempt: Attempt) -> None:
        """Forget an attempt registered after the drain abandoned this pool's work, without running it.

        Its task was usually claimed before the abandon (by an idle worker, or with the end of its worker's
        last attempt), so the store failed it as abandoned and the summary lists it; its handler must not
        run. A shared store may have taken the claim only after the abandon (a timeout-0 drain does not wait
        for a claim under way): the task is put back in the queue for another process, unrun and its
        attempt not counted, rather than left running here until its lease expires, then counted as lost.
        """
        task = attempt.task
        back = None
        if self._store.shared:
            try:
                back = self._store.put_back(task.id, task.attempts, self.owner)
            except StoreNotSynced as exc:  # put back all the same: only the sync to disk failed
                back = exc.result
            except StoreUnavailable as exc:
                _log(
                    logging.WARNING, task, "task %s attempt %d could not be put back (%s): it is lost once its lease "
                    "expires", task.id, task.attempts, exc,
                )  # fmt: skip
            except Exception:  # a bug of ours must not end the worker before it puts back its lost claim
                _log(
                    logging.ERROR, task, "task %s attempt %d could not be put back: it is lost once its lease expires",
                    task.id, task.attempts, exc_info=True,
                )  # fmt: skip
        if back is None:
            _log(logging.INFO, task, "task %s attempt %d not started: the drain abandoned it", task.id, task.attempts)
        elif back.state is State.CANCELLED:
            # Its cancel was requested (from any process) while the claim was under way: the put-back ended it,
            # a change to a final state this pool made, counted and told as a cancel is.
            self._forget_attempt(attempt, back, None)
            self._wait_turn(task.id)
            _log(
                logging.INFO, back, "task %s cancelled: claimed after the drain abandoned this process's work, its "
                "cancel was requested meanwhile", task.id,
            )  # fmt: skip
            if self._on_cancelled:
                _notify(self._on_cancelled, back)
            return
        else:
            _log(
                logging.INFO, task, "task %s attempt %d not started: claimed after the drain abandoned this "
                "process's work, it is %s again", task.id, task.attempts, back.state.value,
            )  # fmt: skip
        self._forget_attempt(attempt, None, None)

    def _retry_at(self, task: Task) -> float | None:
        """When the task's next attempt falls due after its latest failed, or None when out of retries."""
        if task.attempts > task.max_retries:
            return None
        delay = compute_backoff(task.attempts, base=self._backoff_base, cap=self._backoff_cap, rng=self._rng)
        return self._clock() + delay

    def _end_attempt(
        self,
        attempt: Attempt,
        error: str | None,
        result: Any,
        retry_at: float | None,
        exc: BaseException | None = None,
        *,
        claim_next: bool = False,
    ) -> None:
        task = attempt.task
        # Without an attempt timeout nothing races this end, and nothing needs marking unless it is a retry.
        if self._attempt_timeout or retry_at is not None:
            with self._lock:
                timed_out = attempt.timed_out
                attempt.ending = not timed_out
            if retry_at is not None and not timed_out:  # another worker may claim the retry before it is heard
                with self._order_lock:
                    self._in_flight[task.id] = self._in_flight.get(task.id, 0) + 1
            if timed_out:  # the watchdog ended the attempt already
                _log(
                    logging.WARNING, task, "task %s attempt %d returned after it timed out; %s dropped",
                    task.id, task.attempts, "its error" if error else "its result",
                )  # fmt: skip
                return
        self._finish_attempt(attempt, error, result, retry_at, exc, claim_next=claim_next)

    def _finish_attempt(
        self,
        attempt: Attempt,
        error: str | None,
        result: Any,
        retry_at: float | None,
        exc: BaseException | None = None,
        claim_next: bool = False,
        debug: bool | None = None,
    ) -> None:
        """Record the end of an attempt in the store and tell the observers (once per attempt).

        With ``claim_next`` (and while the pool claims), the same store step
        claims this worker's next task, and the same hold of ``_lock`` that
        forgets this attempt registers the next one as ``attempt.successor``.
        ``debug`` is whether DEBUG lines are written, when the caller asked the
        logger already (a call of ``isEnabledFor`` costs about 2 % of a task).
        """
        task = attempt.task
        ended = None
        attempt.writing_end = True
        try:
            lease_until = self._clock() + self._lease if claim_next and self._claiming else None
            try:
                if lease_until is None:
                    ended, attempt.claimed_next = self._write_end(task, error, result, retry_at, None)
                else:  # the common case, spelled out: _write_end's call costs as much as its work
                    ended, attempt.claimed_next = self._store.finish_and_claim(
                        task.id, task.attempts, self.owner, error=error, result=result, retry_at=retry_at,
                        lease_until=lease_until, created_at=task.created_at,
                    )  # fmt: skip
            except StoreUnavailable as unavailable:  # not `exc`: that is the handler's, logged below
                if isinstance(unavailable, StoreNotSynced) and unavailable.result is not None:
                    ended, attempt.claimed_next = self._end_not_synced(task, unavailable, lease_until is not None)
                # A timeout is written once: the watchdog's next check writes it again. A store cut off from
                # its file (see SqliteStore._check_identity) takes no write until a restart: the lease settles it.
                elif attempt.timed_out or isinstance(unavailable, StoreFileReplaced):
                    raise
                else:
                    ended, attempt.claimed_next = self._record_end_again(
                        attempt, error, result, retry_at, lease_until is not None, unavailable
                    )  # fmt: skip
            attempt.claimed_none = lease_until is not None and attempt.claimed_next is None
        except Exception:
            if attempt.timed_out:  # the watchdog writes it again: until then the attempt stays registered
                with self._lock:
                    attempt.recording = False
                if retry_at is not None:
                    with self._order_lock:
                        self._leave_in_flight(task.id)
                raise
            self._forget_attempt(attempt, None, retry_at)
            raise
        try:
            if ended is None:
                why = (
                    f"ended, but {_STORE_LOST}"
                    if self._store_lost(task.id)
                    else "ended after it was abandoned or its lease recovered"
                )
                _log(logging.WARNING, task, "task %s attempt %d %s; result dropped", task.id, task.attempts, why)
            else:
                if ended.state is not _DONE or (log.isEnabledFor(logging.DEBUG) if debug is None else debug):
                    self._log_end(ended, error, exc)
                if self._on_finished:
                    _notify(self._on_finished, ended, self._monotonic() - attempt.started)
        finally:
            self._forget_attempt(attempt, ended, retry_at)

    def _set_cancel(self, attempt: Attempt) -> None:  # _lock is held
        """Tell ``attempt``'s handler to stop, if it still runs here.

        A worker hands its next attempt the same event while it is unset
        (see ``_work``); an attempt leaves ``_running`` under ``_lock``
        before that, so a cancel set under ``_lock`` never reaches a later
        attempt.
        """
        if self._running.get(attempt.task.id) is attempt:
            attempt.cancel.set()

    def _forget_attempt(self, attempt: Attempt, ended: Task | None, retry_at: float | None) -> None:
        """The attempt's end is recorded (or given up on): it no longer runs here; its successor does."""
        task_id = attempt.task.id  # read once: a Task's fields are read by name on a slow path
        claimed = attempt.claimed_next
        if claimed is not None:
            successor = Attempt(claimed, attempt.cancel, self._monotonic(), attempt.thread)
        if retry_at is not None:
            with self._order_lock:
                self._leave_in_flight(task_id)
        state = None if ended is None else ended.state
        lock = self._lock
        lock.acquire()  # not `with`, once per task: in CPython 3.11 it costs a thousand instructions more
        try:
            running = self._running
            if running.get(task_id) is attempt:
                del running[task_id]
            finals = self._finals  # keyed by the final states
            if state in finals:
                finals[state] += 1
            if claimed is not None:  # one hold for this end and the next start: the worker goes straight on
                if attempt.cancel.is_set():  # no longer registered: nothing sets it after this check
                    successor.cancel = threading.Event()
                next_id = claimed.id  # _register(successor), spelled out: a call less per task
                running[next_id] = successor
                if self._cancel_early:
                    self._take_early_cancel(successor, next_id)
                successor.waits_turn = next_id in self._in_flight
                attempt.successor = successor
            closing = self._closing
        finally:
            lock.release()
        if closing:
            self._drain_wakeup.set()

    def _write_end(
        self, task: Task, error: str | None, result: Any, retry_at: float | None, lease_until: float | None
    ) -> tuple[Task | None, Task | None]:
        """The store's ``finish``, or with ``lease_until`` its ``finish_and_claim``: (ended, claimed next).

        Arguments spelled out rather than a closure or ``**kwargs``: this runs once per task.
        """
        if lease_until is None:
            ended = self._store.finish(
                task.id, task.attempts, self.owner, error=error, result=result, retry_at=retry_at,
                created_at=task.created_at,
            )  # fmt: skip
            return ended, None
        return self._store.finish_and_claim(
            task.id, task.attempts, self.owner, error=error, result=result, retry_at=retry_at, lease_until=lease_until,
            created_at=task.created_at,
        )  # fmt: skip

    def _end_not_synced(self, task: Task, exc: StoreNotSynced, claimed: bool) -> tuple[Task | None, Task | None]:
        """What a write of the attempt's end did though its fsync failed: it stands, so it is not written again."""
        _log(
            logging.WARNING, task, "task %s attempt %d ended, but the store could not sync it to disk (%s)",
            task.id, task.attempts, exc,
        )  # fmt: skip
        return exc.result if claimed else (exc.result, None)

    def _record_end_again(
        self,
        attempt: Attempt,
        error: str | None,
        result: Any,
        retry_at: float | None,
        claim_next: bool,
        failure: StoreUnavailable,
    ) -> tuple[Task | None, Task | None]:
        """Write the attempt's end (``_write_end``) again while the store is unavailable (Redis restarting,
        a full disk), after its first try failed with ``failure``, until the store takes it.

        The attempt stays registered meanwhile, so its lease is renewed as soon as the store answers
        again, and the outcome is kept however long the outage lasted (a lease's length of tries
        would drop it: the end of an attempt that succeeded became a "lost" one). Should another
        process have recovered the attempt, the write is refused (None) and the caller says so. Once
        the drain has ended the pool's threads stop: the error is then raised, and the lease settles
        what happened. With ``claim_next`` each try claims the next task while the pool still claims,
        with a lease that runs from that try: one drawn at the first would have run out after a
        lease's length of tries. One WARNING line at the first try, then one a lease's length apart.
        """
        task = attempt.task
        began = told = self._monotonic()
        _log(
            logging.WARNING, task, "task %s attempt %d ended, but the store is unavailable (%s); "
            "recording it again in %.1f s", task.id, task.attempts, failure, _STORE_RETRY_S,
        )  # fmt: skip
        while True:
            if self._wait(self._threads_stop, _STORE_RETRY_S):  # the drain is over: nobody waits for this end
                raise failure
            lease_until = self._clock() + self._lease if claim_next and self._claiming else None
            try:
                return self._write_end(task, error, result, retry_at, lease_until)
            except StoreUnavailable as exc:
                if isinstance(exc, StoreNotSynced) and exc.result is not None:
                    return self._end_not_synced(task, exc, lease_until is not None)
                if attempt.timed_out or isinstance(exc, StoreFileReplaced):
                    raise
                failure = exc
            now = self._monotonic()
            if now >= told + self._lease:
                told = now
                _log(
                    logging.WARNING, task, "task %s attempt %d ended %.0f s ago, and the store is still unavailable "
                    "(%s); recording it again every %.1f s until it takes it", task.id, task.attempts, now - began,
                    failure, _STORE_RETRY_S,
                )  # fmt: skip

    def _log_end(self, task: Task, error: str | None, exc: BaseException | None) -> None:
        """The attempt's end; at DEBUG a failure carries the handler's traceback (HTTP answers never do).

        A success logs at DEBUG, like the task's other steps that went as planned: at thousands of
        tasks a second a line each would flood INFO (the metrics count them), and writing one hands
        the GIL away, which a busy worker then waits for behind the request threads. Retries,
        cancellations and failures keep their INFO and WARNING lines.
        """
        if task.state is State.DONE:  # the common case: one test when DEBUG is off
            if log.isEnabledFor(logging.DEBUG):
                _log(logging.DEBUG, task, "task %s done after %d attempt(s)", task.id, task.attempts)
            return
        trace = exc if exc is not None and log.isEnabledFor(logging.DEBUG) else None
        if task.state is State.QUEUED:
            _log(
                logging.INFO, task, "task %s attempt %d failed (%s); retry %d of %d in %.3f s",
                task.id, task.attempts, error, task.attempts, task.max_retries,
                max(0.0, task.next_attempt_at - self._clock()), exc_info=trace,
            )  # fmt: skip
        elif task.state is State.CANCELLED:
            _log(
                logging.INFO, task, "task %s cancelled during attempt %d: %s", task.id, task.attempts, error,
                exc_info=trace,
            )  # fmt: skip
        else:
            _log(
                logging.WARNING, task, "task %s failed after %d attempt(s): %s", task.id, task.attempts, error,
                exc_info=trace,
            )  # fmt: skip

    def _count_final(self, task: Task) -> None:
        if task.state in FINAL_STATES:
            with self._lock:
                self._finals[task.state] += 1

    # -- attempt timeouts ------------------------------------------------

    # An attempt running longer than attempt_timeout is failed by the watchdog
    # (retried by the policy), its cancel event is set and, while fewer than
    # max_stuck_threads are stuck, its worker is replaced at once so that
    # `workers` threads keep claiming. The stuck thread's late return is
    # dropped; a replaced one then exits, one that was not goes on working.
    # When the store cannot take the timeout (StoreUnavailable), the attempt
    # stays registered as running here (its lease renewed, the drain waiting
    # for it) and every later check writes it again until the store takes it.

    def _watch(self) -> None:
        while not self._threads_stop.is_set():
            try:
                delay = self.check_timeouts()
            except Exception:
                delay = min(1.0, self._attempt_timeout)
                log.exception("the attempt timeout check failed; trying again in %.2f s", delay)
            self._wait(self._threads_stop, delay)

    def check_timeouts(self) -> float | None:
        """Fail every attempt that has run ``attempt_timeout`` seconds or more.

        Returns the seconds until a running attempt may time out next (an
        attempt starting now: ``attempt_timeout``), or None when attempts may
        run for ever. The watchdog thread calls this; a pool built with
        ``threads=False`` needs its caller to.
        """
        if not self._attempt_timeout:
            return None
        now = self._monotonic()
        next_check = self._attempt_timeout
        for attempt in self.running():
            left = attempt.started + self._attempt_timeout - now
            if left > 0:
                next_check = min(next_check, left)
                continue
            try:
                self._time_out(attempt, now - attempt.started)
            except StoreUnavailable as exc:  # Redis unreachable, a full disk: one line, as for an attempt's end
                next_check = min(next_check, _STORE_RETRY_S)
                _log(
                    logging.WARNING, attempt.task, "task %s: the timeout of attempt %d could not be recorded (%s); "
                    "trying again in %.1f s", attempt.task.id, attempt.task.attempts, exc, next_check,
                )  # fmt: skip
            except Exception:  # a bug: the next check writes it again
                next_check = min(next_check, _STORE_RETRY_S)
                log.exception(
                    "task %s: the timeout of attempt %d could not be recorded; trying again in %.1f s",
                    attempt.task.id, attempt.task.attempts, next_check, extra={"task_id": attempt.task.id},
                )  # fmt: skip
        return next_check

    def _time_out(self, attempt: Attempt, seconds: float) -> None:
        task = attempt.task
        with self._lock:
            if attempt.recording or self._running.get(task.id) is not attempt:
                return  # it ended meanwhile, or another check is writing its timeout
            if attempt.ending and not attempt.timed_out:
                return  # its worker is recording its end
            first = not attempt.timed_out
            attempt.timed_out = attempt.recording = True
            worker = attempt.thread in self._threads  # not a caller of step()
            fate = "the caller of step() holds it"
            if first:
                self._timeouts += 1
                if worker:
                    self._stuck.add(attempt.thread)
                    fate = self._replace_locked(attempt.thread)
                self._set_cancel(attempt)
        if first:
            attempt.retry_at = self._retry_at(task)
            _log(
                logging.WARNING, task, "task %s attempt %d timed out after %.1f s; %s", task.id, task.attempts,
                seconds, fate,
            )  # fmt: skip
        if attempt.retry_at is not None:
            with self._order_lock:  # another worker may claim the retry before attempt_finished is heard
                self._in_flight[task.id] = self._in_flight.get(task.id, 0) + 1
        self._finish_attempt(attempt, TIMED_OUT.format(self._attempt_timeout), None, attempt.retry_at)

    def _replace_locked(self, stuck: threading.Thread) -> str:  # _lock is held
        """Start a thread to replace the stuck worker ``stuck`` if the bound allows; what became of it, for the log.

        The replacement starts under _lock, as _start_locked starts the workers,
        and joins the pool's threads once it runs: a shutdown, which lists them
        under _lock to join them, finds it running or not at all, and then
        claiming has stopped, so none starts after. If it cannot start, the
        stuck thread stays a worker (the timeout is recorded all the same).
        """
        stuck_now = f"{len(self._stuck)} stuck, at most {self._max_stuck} replaced"
        if not self._claiming:
            return f"its worker thread is stuck and NOT replaced: the pool has stopped claiming work ({stuck_now})"
        if len(self._stuck) > self._max_stuck:
            return (
                f"its worker thread is stuck and NOT replaced: {len(self._stuck)} stuck thread(s), "
                f"more than the {self._max_stuck} replaced"
            )
        name = f"workerpool-worker-{next(self._thread_numbers)}"
        replacement = threading.Thread(target=self._work, name=name, daemon=True)
        try:
            replacement.start()
        except RuntimeError as exc:  # no room for another thread
            return (
                "its worker thread is stuck and NOT replaced: a new thread could not be started"
                f" ({describe_error(exc)}); the stuck thread takes work again once it returns ({stuck_now})"
            )
        self._threads.append(replacement)
        self._retired.add(stuck)
        return f"{name} replaces its stuck worker thread ({stuck_now})"

    def _leave_if_replaced(self) -> bool:
        """After an attempt: whether this worker was stuck and is one too many now, and so must exit.

        Decided as it returns, not when it was replaced: its replacement may be
        stuck in turn (not replaced, past the bound), and with it gone no
        thread would take work while /healthz saw no more stuck threads than
        the bound. It exits only if ``workers`` threads take work without it.
        """
        me = threading.current_thread()
        with self._lock:
            if me not in self._stuck:
                return False
            self._stuck.discard(me)
            self._retired.discard(me)
            workers = sum(thread.name.startswith("workerpool-worker-") for thread in self._threads)
            if workers - len(self._stuck) <= self.workers:  # those not stuck, this one included
                return False
            self._threads.remove(me)
        log.info("%s returned from its timed-out attempt and exits: its replacement runs", me.name)
        return True

    # -- the order observers hear of a task ------------------------------

    # A thread that changes a task and then tells the observers marks the
    # task "in flight" from before its store step until it has told them;
    # the next thread to change the task (a worker claiming it, a cancel, the
    # drain abandoning it) waits for that before telling of its own change.
    # Only submissions and retries are marked: they are the changes after
    # which another thread can change the task at once.

    def _leave_in_flight(self, task_id: str) -> None:  # _order_lock is held
        left = self._in_flight[task_id] - 1
        if left:
            self._in_flight[task_id] = left
            return
        del self._in_flight[task_id]
        if self._turn_waiters:
            waiter = self._turn_waiters.pop(task_id, None)
            if waiter is not None:
                waiter.set()

    def _enter_in_flight(self, ids: list[str]) -> None:  # _order_lock is held
        """Mark a submission's tasks; a batch of new ids in one step in C."""
        in_flight = self._in_flight
        if len(ids) > 1 and in_flight.keys().isdisjoint(ids) and len(set(ids)) == len(ids):
            in_flight.update(dict.fromkeys(ids, 1))
            return
        for task_id in ids:
            in_flight[task_id] = in_flight.get(task_id, 0) + 1

    def _leave_in_flight_all(self, ids: list[str]) -> None:  # _order_lock is held
        """``_leave_in_flight`` for each id, the common case (each marked once) in C."""
        in_flight = self._in_flight
        if len(ids) <= 1 or len(set(ids)) != len(ids):
            for task_id in ids:
                self._leave_in_flight(task_id)
            return
        counts = list(map(in_flight.__getitem__, ids))
        if counts.count(1) != len(counts):  # some marked again meanwhile (a duplicate submission in flight)
            # One by one: a mark taken out and put back would be missing meanwhile for a worker's
            # read without _order_lock (see _register).
            for task_id in ids:
                self._leave_in_flight(task_id)
            return
        list(map(in_flight.pop, ids))  # each marked once: all leave in C
        if self._turn_waiters:
            for task_id in ids:
                if task_id not in in_flight and (waiter := self._turn_waiters.pop(task_id, None)) is not None:
                    waiter.set()

    def _wait_turn(self, task_id: str, timeout: float = 10.0) -> None:
        """Wait (a bounded time) until the observers have heard the task's earlier changes."""
        with self._order_lock:
            if task_id not in self._in_flight:
                return
            heard = self._turn_waiters.setdefault(task_id, threading.Event())
        heard.wait(timeout)

    # -- leases (shared stores) ------------------------------------------

    def _recover_once(self) -> None:
        """End the attempts whose lease expired, and report each; also those of a step not synced to disk.

        Leases that expired while the store was unreachable from here wait a
        lease more (see workerpool/reachability.py): their owners may be alive.
        """
        unsynced = None
        reach = self._reach
        try:
            recovered = self._store.recover(
                self._retry_at, before=reach.cutoff(self._clock()), unreachable=reach.span
            )  # fmt: skip
        except StoreNotSynced as exc:  # recovered all the same: reported, then raised
            if exc.result is None:
                raise
            recovered, unsynced = exc.result, exc
        for task in recovered:
            self._count_final(task)
            # last_error says how: "lost: its lease expired ..." (see workerpool/stores/base.py)
            _log(logging.WARNING, task, "task %s attempt %d %s", task.id, task.attempts, task.last_error)
            _notify(self._on_finished, task, 0.0)
        if unsynced is not None:
            raise unsynced

    def _keep_leases(self) -> None:
        """Renew the leases of running attempts and recover expired ones, whatever the handlers do.

        Between renewals, while attempts run here, it looks every CANCEL_POLL_S
        for cancels that other processes requested of them (one read), so their
        cancel events are set within that time, not at the next renewal. With
        nothing running it sleeps until the next renewal (which also recovers
        other processes' expired leases), and the first attempt to start wakes it.
        """
        period = self._lease / 3
        stop, wakeup = self._threads_stop, self._keeper_wakeup
        renew_at = self._monotonic()
        woken = False  # by an attempt's start: it was claimed just now, nothing to look for yet
        while (self._claiming or self._running) and not stop.is_set():
            if self._monotonic() >= renew_at:
                renew_at = self._monotonic() + period
                try:
                    self._keep_leases_once(period)
                except StoreUnavailable as exc:
                    self._reach.failed()
                    log.warning("lease renewal failed (%s); trying again in %.1f s", exc, period)
                except Exception:
                    log.exception("lease renewal failed; trying again in %.1f s", period)
            elif not woken:
                try:
                    self._poll_cancels()
                except Exception as exc:  # the renewal reports a store that fails, and sets these events too
                    log.debug("looking for cancels failed: %s", exc)
            wakeup.clear()  # before looking: an attempt that starts after the look sets it again
            with self._lock:
                idle = self._keeper_idle = not self._running
            if stop.is_set():  # set before the clear, whose wake-up it may have erased
                break
            until_renewal = max(0.0, renew_at - self._monotonic())
            woken = self._wait(wakeup, until_renewal if idle else min(CANCEL_POLL_S, until_renewal))

    def _keep_leases_once(self, period: float) -> None:
        """Renew this process's leases, then sweep expired ones, noting how long the store took to answer.

        The renewal comes first: after an outage this process's own attempts
        are renewed before its sweep could count them lost. A step that comes
        late (this process was paused) holds back what expired meanwhile.
        """
        reach, began = self._reach, self._monotonic()
        reach.stepping(self._clock())
        if self._renew_once():
            reach.answered(self._clock(), self._monotonic() - began)  # before the sweep reads the cutoff
            began = self._monotonic()
        self._recover_once()
        reach.answered(self._clock(), self._monotonic() - began)
        self._forget_expired(period)

    def _forget_expired(self, period: float) -> None:
        """Forget the finished tasks past their time that the store's steps left behind (see
        TaskStore.forget_expired), one short step after another, for a tenth of the keeper's period at most
        (CANCEL_POLL_S at most): the keeper keeps its schedule, and an idle service forgets them all the same.
        After the step's time is noted: it is retention's work, not a measure of the store's reach."""
        deadline = self._monotonic() + min(CANCEL_POLL_S, period / 10)
        try:
            while self._store.forget_expired() and self._monotonic() < deadline:
                pass
        except StoreUnavailable as exc:  # the next step tries again, and tells whether the store is out of reach
            log.debug("forgetting the finished tasks past their time failed: %s", exc)

    def _renew_once(self) -> bool:
        """Renew the leases of the attempts running here; whether there were any (and the store was asked)."""
        attempts = self.running()
        if not attempts:
            return False
        cut_off = self._reach.failing  # read before the renewal's answer is noted
        renewal = self._store.renew(self.owner, [a.task.id for a in attempts], self._clock() + self._lease)
        lost = []
        with self._lock:  # some may have ended during the renewal
            for attempt in attempts:
                if attempt.task.id in renewal.cancel_requested or attempt.task.id in renewal.lost:
                    if (
                        attempt.task.id in renewal.lost
                        and self._running.get(attempt.task.id) is attempt
                        # Its end was being written: the renewal may have found it ended by this process. If
                        # another one ended it first, that write is refused and its worker says so.
                        and not (attempt.writing_end or attempt.recording)
                    ):
                        lost.append(attempt.task)
                    self._set_cancel(attempt)
        for task in lost:
            if self._store_lost(task.id):  # nobody ended it: its data is gone
                _log(logging.WARNING, task, "task %s attempt %d: %s; it is cancelled here and its end will be dropped",
                     task.id, task.attempts, _STORE_LOST)  # fmt: skip
                continue
            # The process that ended it could only guess why its lease expired; this one knows it was alive.
            _log(
                logging.WARNING,
                task,
                "task %s attempt %d: its lease expired while it ran here%s, and another process ended it as lost; "
                "it is cancelled here and its end will be dropped",
                task.id,
                task.attempts,
                ", this process being unable to reach the store" if cut_off else " without being renewed in time",
            )
        return True

    def _store_lost(self, task_id: str) -> bool:
        """Whether the store no longer holds ``task_id``, whose attempt ran here: its data was lost (see
        _STORE_LOST), as retention forgets only final tasks, the oldest first (a task another process ended
        just now is still held). False if the store cannot tell now. A look on the rare path where an
        attempt's end or renewal was refused, never on the common one."""
        try:
            return self._store.get(task_id) is None
        except Exception:  # noqa: BLE001  (the store failing now: the usual line is logged instead)
            return False

    def _poll_cancels(self) -> None:
        attempts = self.running()
        if not attempts:
            return
        requested = self._store.cancel_requested([a.task.id for a in attempts])
        if requested:
            with self._lock:  # _set_cancel skips those that ended meanwhile
                for attempt in attempts:
                    if attempt.task.id in requested:
                        self._set_cancel(attempt)

    # -- shutdown --------------------------------------------------------

    def shutdown(self, timeout: float | None = None, *, wait: bool = True) -> ShutdownSummary | None:
        """Stop taking work, drain for at most ``timeout`` seconds, then abandon the rest.

        Idempotent and thread-safe. Running attempts finish. With a store of
        this process alone, submissions are refused (PoolClosed) and queued
        tasks and pending retries keep being processed until nothing is left
        or the deadline passes; unfinished tasks then become failed
        (ABANDONED). With a shared store the pool stops claiming at once and
        leaves queued work, and tasks submitted from now on, to other
        processes; only its own running attempts are waited for (and
        abandoned at the deadline). A later call with a shorter timeout (``timeout=0`` on a
        second signal) pulls the deadline in. With ``wait=False`` the drain
        runs on a helper thread and the call returns None at once. A pool built
        with ``threads=False`` has no worker to run what is left: the thread
        that waits for the drain steps it (a handler running past the deadline
        holds the drain until it returns); with ``wait=False`` the caller goes
        on stepping it.
        """
        began = self._monotonic()
        deadline = math.inf if timeout is None else began + max(0.0, timeout)
        with self._lock:
            first = not self._closing
            self._closing = True
            self._deadline = min(self._deadline, deadline)
            if first and self._store.shared:
                self._claiming = False
        self._drain_wakeup.set()
        if first and not self._use_threads:  # most likely the thread that drives step(), which claims no more
            self._put_back_lost_claim()
        if first:
            if wait:
                # Without worker threads nothing else runs what is left while the caller (the thread that
                # steps the pool) waits here: the drain steps it itself. With wait=False the caller goes on stepping.
                self._drain(began, steps=not self._use_threads)
            else:
                threading.Thread(target=self._drain, args=(began,), name="workerpool-drain", daemon=True).start()
        if not wait:
            return None
        self._drained.wait()
        return self._summary

    def _drain(self, began: float, *, steps: bool = False) -> None:
        # Whatever fails below, the drain ends: the threads are told to stop, the summary is written
        # and _drained is set, or every shutdown() after this one (a second signal, atexit) would wait forever.
        abandoned: list[Task] = []
        try:
            try:
                self._announce_drain()
                self._wait_for_drain(steps)
            except Exception:
                log.exception("shutdown: waiting for the drain failed; abandoning the unfinished attempts now")
            self._abandon_unfinished(abandoned)
        except Exception:
            log.exception("shutdown: abandoning the unfinished attempts failed")
        finally:
            self._finish_drain(began, abandoned)

    def _announce_drain(self) -> None:
        if self._store.shared:
            with self._lock:  # this pool's own count: the store may not answer (see _ask_store)
                running = len(self._running)
            self._wake_workers()
            log.info(
                "shutdown: claiming stopped (new tasks stay queued for other processes), draining %d running "
                "attempt(s)", running,
            )  # fmt: skip
        else:
            log.info("shutdown: admission closed, draining %d unfinished task(s)", self._store.unfinished())

    def _wait_for_drain(self, steps: bool) -> None:
        # The submissions under way when the drain first looked past its deadline: the only ones waited for
        # from then on. A shared store keeps admitting while its pool drains, and while submissions overlap
        # (steady traffic on a slow store) one is always under way: waiting for none to be left never ended.
        late: set[int] | None = None
        while True:
            # Clear before looking: whoever changes what is looked at below
            # (a finished attempt, a nearer deadline) sets it afterwards.
            self._drain_wakeup.clear()
            with self._order_lock:
                unheard = bool(self._in_flight)
            with self._lock:
                # A submission in flight may still land: wait for it even past the deadline (with a shared
                # store, within the grace of its last steps, see below). An attempt
                # (and a retry not yet heard of) counts until its bookkeeping is done, so the summary
                # includes its outcome, but only until the deadline: an end written again while the store
                # is unavailable waits for the store to come back.
                deadline = self._deadline
                remaining = deadline - self._monotonic()
                if remaining <= 0 and late is None:
                    late = set(self._admitting)
                under_way = len(self._admitting) if late is None else len(late & self._admitting)
                admitting = under_way > 0
                running = bool(self._running) or unheard
            if not admitting and (remaining <= 0 or not (running or self._unfinished_here(deadline))):
                return
            if admitting and remaining <= 0:
                # Past the deadline, only for the submissions under way then: until one ends (it wakes the drain).
                # A shared store's may block for as long as the store lets it (a paused Redis: its socket timeout),
                # past the time gunicorn leaves before its SIGKILL: it shares the store's grace. Given up on, it
                # ends on its own (its task stored for the other processes, or not), its answer lost if the
                # process exits first.
                wait = None
                if self._store.shared:
                    cutoff = self._store_cutoff()
                    if self._monotonic() >= cutoff:
                        log.warning(
                            "shutdown: %d submission(s) still in the store at the drain's end: their clients may get "
                            "no answer if the process exits first; a task stored waits there for the other processes "
                            "(GET /tasks/<id> tells)",
                            under_way,
                        )
                        return
                    wait = max(0.0, cutoff - self._monotonic())
            elif not (admitting or running) and self._nothing_falls_due_within(remaining):
                log.info("shutdown: no unfinished task falls due before the drain deadline: abandoning them now")
                return
            else:  # until the deadline at most, to look past it
                wait = None if remaining == math.inf else max(0.0, remaining)
            if steps and self._claiming and remaining > 0:
                # One attempt at a time, as it falls due: it waited to the deadline (for ever without one) for
                # workers that do not exist.
                if self.step():
                    continue
                until_due = self._store.seconds_until_due()
                if until_due is not None:
                    wait = until_due if wait is None else min(wait, until_due)
            self._wait(self._drain_wakeup, wait)

    def _nothing_falls_due_within(self, remaining: float) -> bool:
        """Whether this pool's store holds only tasks (delayed, or waiting out a backoff) due after ``remaining`` s.

        Waiting for the deadline would then buy nothing. A shared store's
        queued tasks are left to the other processes: only running attempts
        are waited for there.
        """
        if self._store.shared or remaining == math.inf:
            return False
        try:
            until = self._store.seconds_until_due()  # first: a task claimed after this read was due now
            if self._store.stats().counts[State.RUNNING]:
                return False
            # An attempt that ended between the two reads may have queued a retry after the first.
            again = self._store.seconds_until_due()
        except StoreUnavailable:
            return False
        return until is not None and again is not None and min(until, again) > remaining

    def _abandon_unfinished(self, abandoned: list[Task]) -> None:
        """Fail this pool's unfinished tasks (ABANDONED), appending them to ``abandoned`` as soon as they are."""
        with self._lock:
            self._claiming = False
            # Before the store fails them: an attempt registered after its task was failed must not start.
            self._abandoned_all = True
        try:
            abandoned.extend(self._ask_store(self._store.abandon, ABANDONED, owner=self.owner, by=self._store_cutoff()))
        except StoreUnavailable as exc:
            if isinstance(exc, StoreNotSynced) and exc.result is not None:  # abandoned all the same
                log.error("shutdown: the unfinished attempts were abandoned, but not synced to disk: %s", exc)
                abandoned.extend(exc.result)
            elif self._store.shared:  # its attempts are lost once their leases expire
                with self._lock:
                    left = self._left_to_leases = len(self._running)
                log.error(
                    "shutdown: the unfinished attempts could not be abandoned: %s; %d attempt(s) running here are "
                    "left to their leases", exc, left,
                )  # fmt: skip
            else:
                log.error("shutdown: the unfinished attempts could not be abandoned: %s", exc)
        for task in abandoned:
            self._count_final(task)
        self._cancel_running()
        for task in abandoned:
            self._wait_turn(task.id)
            _log(logging.WARNING, task, "task %s abandoned at shutdown", task.id)
            _notify(self._on_abandoned, task)

    def _cancel_counted(self, entry: int) -> None:
        """The cancel ``entry`` is counted (or counts nothing): a drain waiting for it goes on."""
        if entry in self._cancelling:
            self._cancelling.discard(entry)
            if self._closing:
                self._drain_wakeup.set()

    def _wait_for_cancels(self, until: float) -> None:
        """Wait (until ``until``, by the pool's monotonic clock) for the cancels begun by now to be counted: one
        the store made before the abandon belongs in the summary, but is counted only once its store step has
        returned. Never past the drain's end: a cancel's step that hangs must not hold the process."""
        begun = set(self._cancelling)
        while True:
            self._drain_wakeup.clear()  # before looking: a cancel counted afterwards sets it
            pending = len(begun & self._cancelling)
            if not pending:
                return
            remaining = until - self._monotonic()
            if remaining <= 0:
                log.warning("shutdown: %d cancel(s) still in the store: the summary may not count them", pending)
                return
            self._wait(self._drain_wakeup, remaining)

    def _cancel_running(self) -> None:
        """Stop claiming and tell the attempts still running that their results will be dropped."""
        with self._lock:
            self._claiming = False
            self._abandoned_all = True
            for attempt in self._running.values():
                self._set_cancel(attempt)

    def _finish_drain(self, began: float, abandoned: list[Task]) -> None:
        try:
            self._cancel_running()  # again: the abandon may not have got that far
            cutoff = self._store_cutoff()
            queued_counted = True
            try:
                left = self._ask_store(self._store.stats, by=cutoff).counts if self._store.shared else {}
            except StoreUnavailable:
                left, queued_counted = {}, False
            except Exception:
                log.exception("shutdown: the store could not count the tasks left")
                left, queued_counted = {}, False
            try:
                # What the store could not abandon, it cannot count either: this pool's own count stands.
                running = self._left_to_leases or (self._unfinished_here(cutoff) if self._store.shared else 0)
            except Exception:
                log.exception("shutdown: the store could not count the attempts left running")
                running = 0
            # Counted first, then the threads are joined for at most a second, and never past the drain's
            # end: with a shared store the same grace (threads blocked in a store that does not answer
            # would otherwise add their own second past it), with a store of this process alone the
            # deadline itself (a handler that ignores its cancel would otherwise hold the drain a second
            # past SHUTDOWN_TIMEOUT_S; its thread is a daemon, left behind).
            until = cutoff if self._store.shared else self._deadline
            self._stop_threads(min(1.0, max(0.0, until - self._monotonic())))
            # As long as the join may take: a second at most, and never past the drain's end (a shared store's
            # last steps share one grace past the deadline, see _store_cutoff).
            self._wait_for_cancels(min(self._monotonic() + _CANCEL_GRACE_S, until))
            with self._lock:
                done = self._finals.copy()
            self._summary = ShutdownSummary(
                counts={
                    State.QUEUED: left.get(State.QUEUED, 0),
                    State.RUNNING: running,
                    **{state: done[state] for state in (State.DONE, State.FAILED, State.CANCELLED)},
                },
                abandoned=tuple(task.id for task in abandoned),
                drain_seconds=self._monotonic() - began,
                left_to_leases=self._left_to_leases,
                queued_counted=queued_counted,
            )
        finally:
            self._drained.set()

    def _unfinished_here(self, by: float) -> int:
        """What the store counts as this pool's unfinished work (answered by ``by``); 0 while it cannot say
        (leases settle it)."""
        try:
            return self._ask_store(self._store.unfinished, self.owner, by=by)
        except StoreUnavailable:
            return 0

    def _store_cutoff(self) -> float:
        """When the drain stops waiting for a shared store's last steps: a grace past the deadline.

        Set once, at the first of those steps: each step counted from its own start would add a grace.
        """
        with self._lock:
            if self._cutoff is None:
                self._cutoff = max(self._deadline, self._monotonic()) + DRAIN_STORE_GRACE_S
            return self._cutoff

    def _ask_store(self, call: Callable[..., Any], *args: Any, by: float, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` on a shared store, as the drain makes it: answered by ``by`` (the pool's
        monotonic clock), or StoreUnavailable.

        A shared store's step may block for as long as the store lets it (Redis paused: its socket
        timeout; a SQLite file locked by another process: the busy timeout, and again for each try),
        which would hold the drain past its deadline and get the process killed before it reports. So
        the call runs on a helper thread, and one that has not answered by ``by`` is left to end on its
        own (its outcome unread); until it has, the drain's next call fails at once rather than queue
        behind it. A store of this process alone answers at once: it is called directly.
        """
        if not self._store.shared or by == math.inf:
            return call(*args, **kwargs)
        if self._drain_call is not None and not self._drain_call.is_set():
            raise StoreUnavailable("the store has not answered the drain's previous step")
        answered, outcome = threading.Event(), []

        def ask() -> None:
            try:
                outcome.append((True, call(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001  (handed to the drain, which raises it)
                outcome.append((False, exc))
            finally:
                answered.set()

        self._drain_call = answered
        threading.Thread(target=ask, name="workerpool-drain-store", daemon=True).start()
        if not self._wait(answered, max(0.0, by - self._monotonic())):
            raise StoreUnavailable("the store did not answer before the drain's deadline")
        [(ok, value)] = outcome
        if not ok:
            raise value
        return value

    def _wake_workers(self) -> None:
        """Release the workers waiting for work. A shared store may do it through the store (Redis), which
        may not answer: a helper thread does it then, and nobody waits for it (an idle worker looks again
        within a few seconds anyway)."""
        if not self._store.shared:
            self._store.wake()
            return

        def wake() -> None:
            try:
                self._store.wake()
            except Exception as exc:
                log.debug("waking the idle workers through the store failed: %s", exc)

        threading.Thread(target=wake, name="workerpool-wake", daemon=True).start()

    def _stop_threads(self, join_timeout: float) -> None:
        self._wake_workers()
        self._threads_stop.set()
        self._keeper_wakeup.set()
        with self._lock:
            threads = list(self._threads)
        # Abandoned handlers were told to cancel; one that ignores it is left
        # behind (daemon) rather than holding up shutdown.
        deadline = time.monotonic() + join_timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


_Hooks = tuple[tuple[Callable[..., object], str, PoolObserver], ...]


def _hooks(observers: Sequence[PoolObserver], name: str, *also: str) -> _Hooks:
    """``name`` bound on each observer whose class overrides it (or one of ``also``, which it calls).

    An observer that is no ``PoolObserver`` is taken at its word: it hears every hook it has.
    """
    hooks = []
    for observer in observers:
        if any(getattr(type(observer), n, None) is not getattr(PoolObserver, n) for n in (name, *also)):
            method = getattr(observer, name, None)
            if method is not None:
                hooks.append((method, name, observer))
    return tuple(hooks)


def _notify(hooks: _Hooks, *args: object) -> None:
    """Call each hook; an exception is logged and ignored (a broken observer cannot break task processing)."""
    for hook, name, observer in hooks:
        try:
            hook(*args)
        except KeyboardInterrupt:  # Ctrl-C in a hook called on the main thread still stops it
            raise
        except BaseException:  # even SystemExit: it would end a worker thread silently, its task left running
            log.exception("observer %r failed in %s", observer, name)


# Why a store no longer holds a task that was running here.
_STORE_LOST = (
    "the store no longer holds the task: its data was most likely lost (with Redis: a restart without persistence, "
    "a FLUSHALL or FLUSHDB, an eviction; with SQLite: the file replaced or the row deleted), and with it the store's "
    "other tasks may be gone"
)


def _log(level: int, task: Task, message: str, *args: object, **kwargs: Any) -> None:
    """Log a line about ``task``, with its id and request id attached for structured logs."""
    if log.isEnabledFor(level):
        log.log(level, message, *args, extra={"task_id": task.id, "request_id": task.request_id}, **kwargs)
