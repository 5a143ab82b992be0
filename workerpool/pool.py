"""The worker pool: bounded admission, worker threads, retries on a timer, drain on shutdown."""

from __future__ import annotations

import heapq
import inspect
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .backoff import compute_backoff
from .errors import DuplicateTask, PermanentFailure, PoolClosed, QueueFull
from .handlers import SimulatedWork, Wait, event_wait
from .observer import PoolObserver
from .store import TaskStore
from .task import State, Task

log = logging.getLogger(__name__)

Handler = Callable[[Task, threading.Event], None]
"""``handler(task, cancel)`` runs one attempt: returning None succeeds, raising
fails it, and returning anything else fails the task for good (a handler that
returns False, or a coroutine, was not written for this pool). ``cancel`` is
set when shutdown abandons unfinished work: a long handler should return early."""

ABANDONED = "abandoned at shutdown: not finished when the drain deadline passed"
_MAX_ERROR_CHARS = 500
_STOP = object()  # tells one worker thread to exit


class _ReadyQueue(queue.Queue):
    """Admission is bounded by maxsize; a due retry skips the bound and the line.

    A due retry was accepted once already, so a full queue must never refuse
    or block it. It also runs before new work still waiting: a retry sent to
    the back of the line adds its whole backoff after everything else, which
    stretches a batch by up to the longest backoff. New work cannot starve:
    retries only come from tasks that already ran, each task has a bounded
    number of them, and a full queue refuses new tasks rather than piling up.
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._first: deque[object] = deque()

    def _qsize(self) -> int:
        return len(self.queue) + len(self._first)

    def _get(self) -> object:
        return self._first.popleft() if self._first else self.queue.popleft()

    def push(self, item: object, *, first: bool = False) -> None:
        """Add ``item`` whatever the bound, at the back of the line or ``first``; never blocks."""
        with self.mutex:
            (self._first if first else self.queue).append(item)
            self.unfinished_tasks += 1
            self.not_empty.notify()

    def clear(self) -> None:
        with self.mutex:
            self.queue.clear()
            self._first.clear()
            self.unfinished_tasks = 0


@dataclass(frozen=True, slots=True)
class PoolStats:
    workers: int
    queue_capacity: int
    queue_depth: int
    retries_pending: int
    accepting: bool
    counts: dict[State, int]


@dataclass(frozen=True, slots=True)
class ShutdownSummary:
    counts: dict[State, int]
    abandoned: tuple[str, ...]
    drain_seconds: float


class WorkerPool:
    """Runs submitted tasks on ``workers`` threads, retrying failures with backoff.

    ``clock`` stamps task times (seconds since the epoch), ``monotonic`` times
    retries and the drain deadline, ``wait`` blocks on an event with a timeout
    and ``rng`` draws the jitter: tests inject all four. ``observers`` hear of
    every change of a task. With ``threads=False`` no thread is started and
    the caller drives the pool with ``step()`` and ``release_due_retries()``.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        workers: int = 4,
        queue_size: int = 64,
        backoff_base: float = 0.1,
        backoff_cap: float = 10.0,
        state_ttl: float = 3600.0,
        state_max_tasks: int = 100_000,
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
        self.workers = workers
        self.queue_size = queue_size
        self._handler = handler or SimulatedWork(rng=rng)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._rng = rng or random.Random()
        self._clock = clock
        self._monotonic = monotonic
        self._wait = wait
        self._observers = tuple(observers)
        self._use_threads = threads
        self._store = TaskStore(ttl=state_ttl, max_finished=state_max_tasks, monotonic=monotonic)
        self._ready = _ReadyQueue(maxsize=queue_size)
        self._threads: list[threading.Thread] = []

        # _retry_lock must be held while touching _retries: a heap of
        # (due monotonic time, sequence, task id) of tasks waiting out a backoff.
        self._retry_lock = threading.Lock()
        self._retries: list[tuple[float, int, str]] = []
        self._retry_seq = itertools.count()
        self._timer_wakeup = threading.Event()

        # _shutdown_lock must be held while reading or changing _closing,
        # _deadline and _threads. submit holds it across its checks, the store
        # insert and the (never blocking) queue push: no submission slips in
        # after shutdown began, and the room it checked is still there.
        self._shutdown_lock = threading.Lock()
        self._closing = False
        self._stopped = False
        self._deadline = math.inf
        self._drain_wakeup = threading.Event()
        self._cancel = threading.Event()  # handed to handlers; set on abandonment
        self._summary: ShutdownSummary | None = None
        self._summary_ready = threading.Event()

    # -- admission -------------------------------------------------------

    def start(self) -> None:
        """Start the worker and timer threads (idempotent; ``submit`` also starts them)."""
        with self._shutdown_lock:
            started = self._start_locked()
        if started:
            self._log_started()

    def _start_locked(self) -> bool:
        """Start the threads unless they run or may not; whether this call started them."""
        if self._threads or self._closing or not self._use_threads:
            return False
        # Daemon threads: interpreter exit must never wait on a handler that
        # ignores cancellation. Shutdown drains explicitly instead.
        self._threads = [
            threading.Thread(target=self._work, name=f"workerpool-worker-{n}", daemon=True)
            for n in range(1, self.workers + 1)
        ]
        # Last, as _stop_threads expects.
        self._threads.append(threading.Thread(target=self._run_timer, name="workerpool-timer", daemon=True))
        for thread in self._threads:
            thread.start()
        return True

    def _log_started(self) -> None:  # outside _shutdown_lock: no logging under a lock
        log.info("pool started: %d worker thread(s), queue of %d", self.workers, self.queue_size)

    def submit(self, task_id: str, payload: str = "", max_retries: int = 0, *, request_id: str | None = None) -> Task:
        """Accept a task without blocking; it is queued in the store on return.

        Raises PoolClosed, DuplicateTask or QueueFull; a refused task leaves
        no trace. ``request_id`` is carried on the task for its log lines.
        """
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        task = Task(task_id, payload, max_retries, created_at=self._clock(), request_id=request_id)
        with self._shutdown_lock:
            if self._closing:
                raise PoolClosed()
            if task_id in self._store:
                raise DuplicateTask(task_id)
            # Checked before the insert, so a refused task is never visible.
            # Only the timer adds meanwhile, and a due retry may exceed the bound.
            if self._ready.full():
                raise QueueFull(self.queue_size)
            started = self._start_locked()
            self._store.add(task)
            self._ready.push(task_id)
        if started:
            self._log_started()
        _log(logging.DEBUG, task, "task %s queued", task_id)
        self._notify("task_queued", task)
        return task

    # -- reading ---------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        return self._store.get(task_id)

    def list(self, state: State | None = None, limit: int = 100) -> list[Task]:
        return self._store.list(state, limit)

    @property
    def accepting(self) -> bool:
        return not self._closing

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def stats(self) -> PoolStats:
        with self._retry_lock:
            retries_pending = len(self._retries)
        return PoolStats(
            workers=self.workers,
            queue_capacity=self.queue_size,
            queue_depth=self._ready.qsize(),
            retries_pending=retries_pending,
            accepting=self.accepting,
            counts=self._store.counts(),
        )

    # -- workers ---------------------------------------------------------

    def step(self) -> bool:
        """Run the next ready attempt on the calling thread; False if none was ready.

        For a pool built with ``threads=False``: what a worker thread does in
        a loop, one attempt at a time.
        """
        if self._use_threads:
            raise RuntimeError("step() drives a pool built with threads=False")
        try:
            task_id = self._ready.get_nowait()
        except queue.Empty:
            return False
        self._run_attempt(task_id)
        return True

    def _work(self) -> None:
        while (task_id := self._ready.get()) is not _STOP:
            self._run_attempt(task_id)

    def _run_attempt(self, task_id: str) -> None:
        try:
            self._attempt(task_id)
        except Exception:  # a bug of ours must not kill the worker
            log.exception("worker failed on task %s", task_id, extra={"task_id": task_id})

    def _attempt(self, task_id: str) -> None:
        task = self._store.start_attempt(task_id, self._clock())
        if task is None:  # abandoned at shutdown while it waited
            return
        _log(logging.DEBUG, task, "task %s attempt %d started", task_id, task.attempts)
        self._notify("attempt_started", task)
        started = self._monotonic()
        error, retryable = None, False
        try:
            returned = self._handler(task, self._cancel)
            if returned is not None:
                error = _describe_return(returned)
        except PermanentFailure as exc:
            error = _describe(exc)
        except BaseException as exc:  # even SystemExit: it would end this thread silently
            error, retryable = _describe(exc), True
        seconds = self._monotonic() - started
        try:
            result = self._end_attempt(task, error, retryable)
            if result is None:
                _log(
                    logging.WARNING, task, "task %s attempt %d ended after it was abandoned; result dropped",
                    task_id, task.attempts,
                )
            else:
                self._notify("attempt_finished", result, seconds)
        finally:
            if self._closing:
                self._drain_wakeup.set()

    def _end_attempt(self, task: Task, error: str | None, retryable: bool) -> Task | None:
        now = self._clock()
        if error is None:
            result = self._store.end_attempt(task.id, task.attempts, State.DONE, finished_at=now)
            if result:
                _log(logging.INFO, task, "task %s done after %d attempt(s)", task.id, task.attempts)
            return result
        if retryable and task.attempts <= task.max_retries:
            delay = compute_backoff(task.attempts, base=self._backoff_base, cap=self._backoff_cap, rng=self._rng)
            result = self._store.end_attempt(
                task.id, task.attempts, State.QUEUED, last_error=error, next_attempt_at=now + delay
            )
            if result:
                _log(
                    logging.INFO, task, "task %s attempt %d failed (%s); retry %d of %d in %.3f s",
                    task.id, task.attempts, error, task.attempts, task.max_retries, delay,
                )
                self._schedule_retry(task.id, delay)
            return result
        result = self._store.end_attempt(task.id, task.attempts, State.FAILED, last_error=error, finished_at=now)
        if result:
            _log(logging.WARNING, task, "task %s failed after %d attempt(s): %s", task.id, task.attempts, error)
        return result

    def _notify(self, hook: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, hook)(*args)
            except Exception:
                log.exception("observer %r failed in %s", observer, hook)

    # -- retries ---------------------------------------------------------

    def _schedule_retry(self, task_id: str, delay: float) -> None:
        due = self._monotonic() + delay
        with self._retry_lock:
            heapq.heappush(self._retries, (due, next(self._retry_seq), task_id))
        self._timer_wakeup.set()

    def release_due_retries(self) -> float | None:
        """Move due retries to the ready queue; return seconds until the next one is due.

        The timer thread calls this; a pool built with ``threads=False`` needs
        its caller to.
        """
        now = self._monotonic()
        due = []
        with self._retry_lock:
            while self._retries and self._retries[0][0] <= now:
                due.append(heapq.heappop(self._retries)[2])
            delay = self._retries[0][0] - now if self._retries else None
        for task_id in due:
            self._ready.push(task_id, first=True)
        return delay

    def _run_timer(self) -> None:
        while not self._stopped:
            # Clear before looking, so a retry scheduled meanwhile re-sets it.
            self._timer_wakeup.clear()
            delay = self.release_due_retries()
            if not self._stopped:
                self._wait(self._timer_wakeup, delay)

    # -- shutdown --------------------------------------------------------

    def shutdown(self, timeout: float | None = None, *, wait: bool = True) -> ShutdownSummary | None:
        """Stop admitting, drain for at most ``timeout`` seconds, then abandon the rest.

        Idempotent and thread-safe. Running attempts finish; queued tasks and
        pending retries keep being processed until nothing is left or the
        deadline passes. Unfinished tasks then become failed (ABANDONED). A
        later call with a shorter timeout (``timeout=0`` on a second signal)
        pulls the deadline in. With ``wait=False`` the drain runs on a helper
        thread and the call returns None at once.
        """
        began = self._monotonic()
        deadline = math.inf if timeout is None else began + max(0.0, timeout)
        with self._shutdown_lock:
            first = not self._closing
            self._closing = True
            self._deadline = min(self._deadline, deadline)
        self._drain_wakeup.set()
        if first:
            log.info("shutdown: admission closed, draining %d unfinished task(s)", self._store.unfinished())
            if wait:
                self._drain(began)
            else:
                threading.Thread(target=self._drain, args=(began,), name="workerpool-drain", daemon=True).start()
        if not wait:
            return None
        self._summary_ready.wait()
        return self._summary

    def _drain(self, started: float) -> None:
        while True:
            # Clear before looking: whoever changes what is looked at below
            # (a finished attempt, a nearer deadline) sets it afterwards.
            self._drain_wakeup.clear()
            if not self._store.unfinished():
                break
            with self._shutdown_lock:
                remaining = self._deadline - self._monotonic()
            if remaining <= 0:
                break
            self._wait(self._drain_wakeup, None if remaining == math.inf else remaining)
        abandoned = self._store.fail_unfinished(ABANDONED, self._clock())
        for task in abandoned:
            _log(logging.WARNING, task, "task %s abandoned at shutdown", task.id)
            self._notify("task_abandoned", task)
        self._cancel.set()
        self._stop_threads()
        self._summary = ShutdownSummary(
            counts=self._store.counts(),
            abandoned=tuple(task.id for task in abandoned),
            drain_seconds=self._monotonic() - started,
        )
        self._summary_ready.set()

    def _stop_threads(self, join_timeout: float = 1.0) -> None:
        with self._shutdown_lock:
            self._stopped = True
            threads = list(self._threads)
        deadline = time.monotonic() + join_timeout
        self._timer_wakeup.set()
        # The timer goes first: once it has exited it cannot push a retry it
        # had just taken from the heap into the queue emptied below.
        timer, workers = threads[-1:], threads[:-1]
        for thread in timer:
            thread.join(max(0.0, deadline - time.monotonic()))
        # Whatever is still queued or waiting for a retry was abandoned
        # already; stop markers for the workers that exist are all that is left.
        with self._retry_lock:
            self._retries.clear()
        self._ready.clear()
        for _ in workers:
            self._ready.push(_STOP)
        # Abandoned handlers were told to cancel; one that ignores it is left
        # behind (daemon) rather than holding up shutdown.
        for thread in workers:
            thread.join(max(0.0, deadline - time.monotonic()))


def _log(level: int, task: Task, message: str, *args: object) -> None:
    """Log a line about ``task``, with its id and request id attached for structured logs."""
    if log.isEnabledFor(level):
        log.log(level, message, *args, extra={"task_id": task.id, "request_id": task.request_id})


def _describe_return(returned: object) -> str:
    if inspect.iscoroutine(returned):
        returned.close()  # never awaited: close it, or Python warns when it is collected
    return f"the handler returned {type(returned).__name__}, not None: a result this pool cannot use"


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
