"""Prometheus metrics for one app: its own registry, served at GET /metrics.

Counters and histograms are fed by the pool through the PoolObserver hooks
and by the enqueue view (rejections); gauges are read from the pool at
scrape time, so they are never stale.

Under ``gunicorn -w N`` each process also publishes its counts to a directory the
processes share (service/metrics_share.py), and a scrape reports their sum.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import operator
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from werkzeug.exceptions import RequestEntityTooLarge

from workerpool import (
    FINAL_STATES,
    DuplicateTask,
    PoolClosed,
    PoolObserver,
    PoolStats,
    QueueFull,
    State,
    StoreNotSynced,
    StoreUnavailable,
    Task,
    WorkerPool,
)
from workerpool.pool import ProcessStats

from . import metrics_share
from .api import why_store_fails
from .context import services
from .problems import Problem

REJECTION_REASONS = (
    "invalid", "too_large", "unauthorized", "timeout", "duplicate", "queue_full", "shutting_down", "store_unavailable",
    "error",
)  # fmt: skip
# Attempts of the simulated work take 0.1-0.5 s; tasks wait out backoffs of up to 10 s per retry.
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUED_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

bp = Blueprint("metrics", __name__)
log = logging.getLogger(__name__)


class Metrics(PoolObserver):
    """The service's metrics; give an instance to the pool as an observer.

    Each instance has its own registry, so any number of apps can live in one process.

    Each thread counts in a row of its own (``_Row``), without a lock, and a collector adds
    the rows up when ``/metrics`` is scraped. A row is changed only by its thread, so an
    increment (a read, an add and a store, not atomic as a whole) cannot lose another
    thread's; a shared count behind a lock cost a worker a lock hold per hook, and queued it
    behind any thread that lost the GIL while holding it. The exposition is the one
    prometheus_client's ``Counter``/``Histogram`` give (names, HELP, types, labels,
    ``_created`` stamps, sample order).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._local = threading.local()  # .row: this thread's _Row
        # _rows_lock must be held to add a row, to read the rows for a scrape, and to fold the row of a
        # thread that ended into _retired; the hooks never take it once their thread has its row.
        self._rows_lock = threading.Lock()
        self._rows: list[_Row] = []
        self._retired = _Row(None)  # the rows of threads that ended, added up
        self._created = time.time()
        # A reason outside REJECTION_REASONS (none today): its series starts when it is first counted.
        self._other_rejected: dict[str, _Count] = {}
        self._pool: WorkerPool | None = None
        self._shared: metrics_share.ProcessSnapshots | None = None  # set by share()
        self._publisher: metrics_share.Publisher | None = None
        # Whether the last publication failed: its WARNING is logged once, not every round it goes on failing.
        self._publishing_fails = False
        self._publishing_lock = threading.Lock()  # held only to read and set _publishing_fails
        self.registry.register(_CountsCollector(self))

    def _row(self) -> _Row:
        """This thread's row, made on its first count."""
        try:
            return self._local.row
        except AttributeError:
            pass
        row = self._local.row = _Row(threading.current_thread())
        with self._rows_lock:
            self._fold_ended()  # keeps the list as long as the threads alive, however many come and go
            self._rows.append(row)
        return row

    def _fold_ended(self) -> None:
        """Add the rows of threads that ended to _retired (no one counts in them any more); needs _rows_lock."""
        alive = []
        for row in self._rows:  # each thread asked once: it may end while we look
            if row.thread.is_alive():  # type: ignore[union-attr]
                alive.append(row)
            else:
                self._retired.add(row)
        self._rows = alive

    def totals(self) -> _Row:
        """Every thread's counts added up (a copy): what a scrape reports."""
        total = _Row(None)
        with self._rows_lock:
            self._fold_ended()
            total.add(self._retired)
            for row in self._rows:
                total.add(row)
        return total

    # -- PoolObserver ----------------------------------------------------
    # Each hook inlines _row(): it runs once or twice per task on a worker.

    def task_queued(self, task: Task) -> None:
        try:
            row = self._local.row
        except AttributeError:
            row = self._row()
        row.accepted += 1

    def tasks_queued(self, tasks: Sequence[Task]) -> None:
        try:
            row = self._local.row
        except AttributeError:
            row = self._row()
        row.accepted += len(tasks)  # one increment per batch

    def attempt_started(self, task: Task) -> None:
        if task.attempts == 1 and task.started_at is not None:
            try:
                row = self._local.row
            except AttributeError:
                row = self._row()
            seconds = task.started_at - task.created_at
            if seconds < 0.0:
                seconds = 0.0
            # The first bucket whose bound is >= seconds, as prometheus_client's Histogram.observe picks it.
            row.queued_buckets[bisect_left(_QUEUED_BOUNDS, seconds)] += 1
            row.queued_sum += seconds

    def attempt_finished(self, task: Task, seconds: float) -> None:
        try:
            row = self._local.row
        except AttributeError:
            row = self._row()
        row.attempt_buckets[bisect_left(_ATTEMPT_BOUNDS, seconds)] += 1
        row.attempt_sum += seconds
        state = task.state
        if state is State.DONE:
            row.succeeded += 1
            row.finished[_DONE] += 1
        else:
            row.failed += 1
            if state is State.QUEUED:
                row.retries += 1
                return
            row.finished[_FINISHED_INDEX[state]] += 1
        finished_at = task.finished_at
        if finished_at is not None:
            seconds = finished_at - task.created_at
            if seconds < 0.0:
                seconds = 0.0
            row.task_buckets[bisect_left(_TASK_BOUNDS, seconds)] += 1
            row.task_sum += seconds

    def task_cancelled(self, task: Task) -> None:
        self._finish(self._row(), task)

    def task_abandoned(self, task: Task) -> None:
        row = self._row()
        row.abandoned += 1
        self._finish(row, task)

    @staticmethod
    def _finish(row: _Row, task: Task) -> None:
        """Count a task that reached its final state outside an attempt."""
        row.finished[_FINISHED_INDEX[task.state]] += 1
        if task.finished_at is not None:
            seconds = max(0.0, task.finished_at - task.created_at)
            row.task_buckets[bisect_left(_TASK_BOUNDS, seconds)] += 1
            row.task_sum += seconds

    # -- the HTTP side ---------------------------------------------------

    def count_rejection(self, exc: BaseException) -> None:
        if isinstance(exc, StoreNotSynced):  # not a refusal: the tasks stand (and were counted as accepted)
            return
        self._count_rejected(rejection_reason(exc), 1)

    def count_rejections(self, refusals: Iterable[BaseException]) -> None:
        """Count each refusal, with one increment per reason rather than one per task.

        A batch refused for a full queue is a thousand refusals of one type: they are counted by
        type in C, and only a problem's reason (which depends on its status) is read one by one.
        """
        refusals = refusals if isinstance(refusals, (list, tuple)) else list(refusals)
        if not refusals:  # most batches: not even a Counter (its update's isinstance on an ABC costs)
            return
        kinds = set(map(type, refusals))
        counts = {kinds.pop(): len(refusals)} if len(kinds) == 1 else collections.Counter(map(type, refusals))
        for kind, count in counts.items():
            if issubclass(kind, Problem):
                for exc in refusals:
                    if type(exc) is kind:
                        self._count_rejected(rejection_reason(exc), 1)
            else:
                self._count_rejected(_reason_of_type(kind), count)

    def _count_rejected(self, reason: str, count: int) -> None:
        index = _REJECTION_INDEX.get(reason)
        if index is not None:
            self._row().rejected[index] += count
            return
        with self._rows_lock:  # a reason outside REJECTION_REASONS: its series starts now
            series = self._other_rejected.get(reason)
            if series is None:
                series = self._other_rejected[reason] = _Count(time.time())
            series.value += count

    def watch(self, pool: WorkerPool) -> None:
        """Report the pool's queue and task counts as gauges, read on every scrape."""
        self._pool = pool
        self.registry.register(_PoolCollector(pool, self))

    # -- several processes ------------------------------------------------

    def share(
        self, directory: Path, *, interval: float | None = metrics_share.PUBLISH_INTERVAL_S, pid: int | None = None
    ) -> None:
        """Publish this process's counts to ``directory`` and report the sum of every process's there.

        The counts are published on each scrape this process answers, every ``interval`` seconds
        (None: only then and at ``stop_sharing``) and at ``stop_sharing``.
        A publication that fails (a full disk, a directory that cannot be made
        again) is logged and tried again: this runs as a gunicorn worker boots,
        where an exception made gunicorn stop the whole server.
        """
        self._shared = metrics_share.ProcessSnapshots(
            directory, pid=pid, check_counts=counts_problem, check_live=live_problem
        )
        self._publish_quietly()
        if interval is not None:
            self._publisher = metrics_share.Publisher(self._publish_quietly, interval)
            self._publisher.start()

    def stop_sharing(self) -> None:
        """Publish the last counts (call it once the pool has stopped) and stop publishing."""
        if self._publisher is not None:
            self._publisher.stop()
        elif self._shared is not None:
            self._publish_quietly()

    def publish(self) -> None:
        """Write this process's counts and gauges to the shared directory now."""
        if self._shared is not None:
            self._shared.publish(self._snapshot)

    def _publish_quietly(self) -> None:
        """Publish; if that fails (a full disk, say), log it once: the next round tries again, and
        scrapes meanwhile read this process's last snapshot (behind, never ahead of a later one)."""
        directory = self._shared and self._shared.directory
        try:
            self.publish()
        except OSError as error:
            with self._publishing_lock:
                first, self._publishing_fails = not self._publishing_fails, True
            if first:
                log.warning("could not publish the metrics to %s (tried again every second): %s", directory, error)
            return
        with self._publishing_lock:
            failed, self._publishing_fails = self._publishing_fails, False
        if failed:
            log.warning("the metrics are published to %s again", directory)

    def _snapshot(self) -> tuple[metrics_share.Snapshot, metrics_share.Snapshot]:
        """This process's counts and its own gauges, as a snapshot file holds them."""
        row = self.totals()
        with self._rows_lock:
            other = {reason: {"created": c.created, "value": c.value} for reason, c in self._other_rejected.items()}
        counts = {
            "created": self._created,
            "row": {name: getattr(row, name) for name in _Row.__slots__ if name != "thread"},
            "other_rejected": other,
        }
        live = {}
        if self._pool is not None:
            stats = self._pool.process_stats()
            counts["attempts_timed_out"] = stats.attempts_timed_out
            live = {
                "workers": stats.workers,
                "draining": int(not stats.accepting),
                "stuck_threads": stats.stuck_threads,
                "stuck_threads_limit": stats.stuck_threads_limit,
            }
        return counts, live

    def shared_counts(self) -> tuple[metrics_share.Snapshot, dict[int, metrics_share.Snapshot]] | None:
        """With ``share``: this process's counts published, then every process's added up and the live ones' gauges."""
        if self._shared is None:
            return None
        self._publish_quietly()
        return self._shared.read()


# The buckets' bounds with +Inf last, searched with bisect: the index is the bucket's.
_ATTEMPT_BOUNDS = (*ATTEMPT_BUCKETS, math.inf)
_QUEUED_BOUNDS = (*QUEUED_BUCKETS, math.inf)
_TASK_BOUNDS = (*TASK_BUCKETS, math.inf)
_FINAL_STATES = tuple(sorted(FINAL_STATES))  # the order of the finished series
_FINISHED_INDEX = {state: index for index, state in enumerate(_FINAL_STATES)}
_DONE = _FINISHED_INDEX[State.DONE]
_REJECTION_INDEX = {reason: index for index, reason in enumerate(REJECTION_REASONS)}


class _Row:
    """One thread's counts (or a sum of rows): changed only by that thread, read at scrape time.

    Histograms are counts per bucket (not cumulative), in the order of their bounds, and a sum.
    """

    __slots__ = (
        "thread", "accepted", "rejected", "succeeded", "failed", "retries", "finished", "abandoned",
        "attempt_buckets", "attempt_sum", "queued_buckets", "queued_sum", "task_buckets", "task_sum",
    )  # fmt: skip

    def __init__(self, thread: threading.Thread | None) -> None:
        self.thread = thread
        self.accepted = 0
        self.rejected = [0] * len(REJECTION_REASONS)
        self.succeeded = 0
        self.failed = 0
        self.retries = 0
        self.finished = [0] * len(_FINAL_STATES)
        self.abandoned = 0
        self.attempt_buckets = [0] * len(_ATTEMPT_BOUNDS)
        self.attempt_sum = 0.0
        self.queued_buckets = [0] * len(_QUEUED_BOUNDS)
        self.queued_sum = 0.0
        self.task_buckets = [0] * len(_TASK_BOUNDS)
        self.task_sum = 0.0

    def add(self, other: _Row) -> None:
        """Add ``other``'s counts to these (each read once: its thread may be counting meanwhile)."""
        self.accepted += other.accepted
        self.rejected = list(map(operator.add, self.rejected, other.rejected))
        self.succeeded += other.succeeded
        self.failed += other.failed
        self.retries += other.retries
        self.finished = list(map(operator.add, self.finished, other.finished))
        self.abandoned += other.abandoned
        self.attempt_buckets = list(map(operator.add, self.attempt_buckets, other.attempt_buckets))
        self.attempt_sum += other.attempt_sum
        self.queued_buckets = list(map(operator.add, self.queued_buckets, other.queued_buckets))
        self.queued_sum += other.queued_sum
        self.task_buckets = list(map(operator.add, self.task_buckets, other.task_buckets))
        self.task_sum += other.task_sum


class _Count:
    """One counter series: its value and when it was created."""

    __slots__ = ("created", "value")

    def __init__(self, created: float, value: float = 0.0) -> None:
        self.value = value
        self.created = created


class _Histogram:
    """One histogram series: its bounds (+Inf last), observations per bucket (not cumulative), sum, creation."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: Sequence[float], counts: list[int], total: float, created: float) -> None:
        self.bounds = bounds
        self.counts = counts
        self.sum = total
        self.created = created


def counts_problem(snapshot: metrics_share.Snapshot) -> str | None:
    """Why a counts snapshot read from a file is not shaped as ``Metrics._snapshot`` writes one (None: it is).

    What a scrape adds up and reads must be the numbers, lists of numbers and series this version keeps:
    anything else (a hand edit) would make every scrape fail.
    """
    for key, value in snapshot.items():
        if key in ("created", "attempts_timed_out"):
            if not _is_count(value):
                return f'"{key}" is not a number >= 0'
        elif key == "row":
            problem = _row_problem(value)
            if problem is not None:
                return problem
        elif key == "other_rejected":
            if not isinstance(value, dict):
                return '"other_rejected" is not an object'
            for reason, series in value.items():
                if reason in _REJECTION_INDEX:
                    return f'"other_rejected" counts the reason "{reason}", which "row" counts'
                if not (isinstance(series, dict) and series.keys() == {"created", "value"}):
                    return f'"other_rejected" "{reason}" is not an object of "created" and "value"'
                if not all(map(_is_count, series.values())):
                    return f'"other_rejected" "{reason}" is not of numbers >= 0'
        else:
            return f'"{key}" is not a count this server keeps'
    return None


def _row_problem(row: object) -> str | None:
    if not isinstance(row, dict):
        return '"row" is not an object'
    for name, value in row.items():
        if name not in _ROW_LENGTHS:
            return f'"row" "{name}" is not a count this server keeps'
        length = _ROW_LENGTHS[name]
        if length is None:
            if not _is_count(value):
                return f'"row" "{name}" is not a number >= 0'
        elif not (isinstance(value, list) and len(value) == length and all(map(_is_count, value))):
            return f'"row" "{name}" is not a list of {length} numbers >= 0'
    return None


# Each row field of a snapshot: the length of its list, or None for a number.
_ROW_LENGTHS = {
    name: len(value) if isinstance(value, list) else None
    for name in _Row.__slots__
    if name != "thread"
    for value in [getattr(_Row(None), name)]
}
_LIVE_GAUGES = ("workers", "draining", "stuck_threads", "stuck_threads_limit")


def live_problem(snapshot: metrics_share.Snapshot) -> str | None:
    """Why a gauges snapshot read from a file is not shaped as ``Metrics._snapshot`` writes one (None: it is)."""
    for key, value in snapshot.items():
        if key not in _LIVE_GAUGES:
            return f'"{key}" is not a gauge this server keeps'
        if not _is_count(value):
            return f'"{key}" is not a number >= 0'
    return None


def _is_count(value: object) -> bool:
    # bool is an int to Python, not a count; json.loads reads NaN and Infinity.
    return type(value) in (int, float) and 0 <= value < math.inf


def _created_series() -> bool:
    # prometheus_client's own switch (PROMETHEUS_DISABLE_CREATED_SERIES, disable_created_metrics()),
    # which its Counter and Histogram read on every scrape; it has no public getter.
    return bool(getattr(prometheus_metrics, "_use_created", True))


class _CountsCollector(Collector):
    """The Metrics' counters and histograms, in the order and shape prometheus_client's classes give them."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        shared = m.shared_counts()
        if shared is None:
            t = m.totals()
            at = m._created
            with m._rows_lock:
                other = [(reason, _Count(s.created, s.value)) for reason, s in m._other_rejected.items()]
        else:
            counts = shared[0]  # empty only if no process could publish yet
            t = _Row(None)
            for name, value in counts.get("row", {}).items():
                setattr(t, name, value)
            at = counts.get("created", m._created)
            other = [(r, _Count(s["created"], s["value"])) for r, s in counts.get("other_rejected", {}).items()]
        accepted = _Count(at, t.accepted)
        rejected = {reason: _Count(at, n) for reason, n in zip(REJECTION_REASONS, t.rejected, strict=True)}
        rejected.update(other)
        attempts = {"succeeded": _Count(at, t.succeeded), "failed": _Count(at, t.failed)}
        retries = _Count(at, t.retries)
        finished = {str(state): _Count(at, n) for state, n in zip(_FINAL_STATES, t.finished, strict=True)}
        abandoned = _Count(at, t.abandoned)
        attempt_seconds = _Histogram(_ATTEMPT_BOUNDS, t.attempt_buckets, t.attempt_sum, at)
        queued_seconds = _Histogram(_QUEUED_BOUNDS, t.queued_buckets, t.queued_sum, at)
        task_seconds = _Histogram(_TASK_BOUNDS, t.task_buckets, t.task_sum, at)
        created = _created_series()
        yield _counter("workerpool_tasks_accepted", "Tasks accepted and queued.", {(): accepted}, created)
        yield _counter("workerpool_tasks_rejected", "Submissions refused, by reason.", _by("reason", rejected), created)
        yield _counter("workerpool_attempts", "Finished attempts, by outcome.", _by("outcome", attempts), created)
        yield _counter(
            "workerpool_retries", "Failed attempts that were scheduled to run again.", {(): retries}, created
        )
        yield _counter(
            "workerpool_tasks_finished",
            "Tasks that reached a final state, by state.",
            _by("state", finished),
            created,
        )
        yield _counter(
            "workerpool_tasks_abandoned",
            "Tasks failed by shutdown because they were unfinished at the drain deadline (counted in finished too).",
            {(): abandoned},
            created,
        )
        yield _histogram("workerpool_attempt_duration_seconds", "Time one attempt ran.", attempt_seconds, created)
        yield _histogram(
            "workerpool_task_queued_seconds",
            "Time from acceptance to the start of the first attempt.",
            queued_seconds,
            created,
        )
        yield _histogram(
            "workerpool_task_duration_seconds",
            "Time from acceptance to the final state, retries included.",
            task_seconds,
            created,
        )


def _by(label: str, series: dict[str, _Count]) -> dict[tuple[tuple[str, str], ...], _Count]:
    return {((label, value),): count for value, count in series.items()}


def _counter(
    name: str, documentation: str, series: dict[tuple[tuple[str, str], ...], _Count], created: bool
) -> CounterMetricFamily:
    labels = [label for label, _ in next(iter(series))]
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_pairs, count in series.items():
        family.add_metric(
            [value for _, value in label_pairs], float(count.value), created=count.created if created else None
        )
    return family


def _histogram(name: str, documentation: str, series: _Histogram, created: bool) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    cumulative = list(zip(map(floatToGoString, series.bounds), itertools.accumulate(series.counts)))
    family.add_metric([], cumulative, float(series.sum))
    if created:
        family.add_sample(name + "_created", {}, series.created)
    return family


# A body that did not arrive in time (408) is the client's, as a malformed one is: "error" is kept for
# what may be the service's own failure, the reason an alert watches.
# 403: sent by a page of another origin (see cross_site.py).
_PROBLEM_REASONS = {
    400: "invalid",
    401: "unauthorized",
    403: "unauthorized",
    408: "timeout",
    413: "too_large",
    415: "invalid",
}


def rejection_reason(exc: BaseException) -> str:
    if isinstance(exc, Problem):
        return _PROBLEM_REASONS.get(exc.status, "error")
    return _reason_of_type(type(exc))


_REASONS_BY_TYPE = (
    (RequestEntityTooLarge, "too_large"),
    (DuplicateTask, "duplicate"),
    (QueueFull, "queue_full"),
    (PoolClosed, "shutting_down"),
    (StoreUnavailable, "store_unavailable"),
)


@functools.cache  # one entry per exception class refused
def _reason_of_type(kind: type[BaseException]) -> str:
    """The reason of a refusal that is not a Problem: its class alone decides."""
    return next((reason for base, reason in _REASONS_BY_TYPE if issubclass(kind, base)), "error")


class _PoolCollector(Collector):
    """The pool's gauges: the store's are the same in every process; with shared metrics, each
    process's own are added up (worker threads, timed-out attempts) or labelled by pid."""

    def __init__(self, pool: WorkerPool, metrics: Metrics) -> None:
        self._pool = pool
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # A store that cannot be used leaves out its gauges alone: the process's own metrics, the rejections
        # counted while the store is down among them, are what a scrape needs then.
        # A SQLite file whose write lock another program holds still has its figures read, as last committed.
        try:
            read = self._pool.stats()
            # As /healthz decides it: figures may read well from a store that cannot be written (a task file
            # removed or replaced while open, a full disk, Redis at maxmemory or read-only).
            available = why_store_fails(self._pool, read) is None
        except StoreUnavailable:
            read, available = None, False
        stats: PoolStats | ProcessStats | None = read
        yield GaugeMetricFamily(
            "workerpool_store_available",
            "1 when this scrape read the task store's figures and it can be written; 0 when the store cannot be "
            "used (its gauges are left out, unless they could be read all the same: as last committed).",
            value=int(available),
        )
        shared = self._metrics.shared_counts()
        if shared is not None:
            yield from _shared_pool_metrics(stats, *shared, self._metrics._created)
            return
        if stats is None:
            stats = self._pool.process_stats()
        else:
            yield from _store_gauges(stats)
        yield GaugeMetricFamily("workerpool_workers", "Worker threads.", value=stats.workers)
        yield GaugeMetricFamily(
            "workerpool_draining", "1 once shutdown began: new tasks are refused.", value=int(not stats.accepting)
        )
        yield _timed_out(stats.attempts_timed_out, self._metrics._created)
        yield GaugeMetricFamily(
            "workerpool_stuck_threads",
            "Worker threads still in a handler whose attempt timed out.",
            value=stats.stuck_threads,
        )
        yield GaugeMetricFamily(
            "workerpool_stuck_threads_limit",
            "Stuck threads that get a replacement; past it the service reports itself unhealthy.",
            value=stats.stuck_threads_limit,
        )


def _store_gauges(stats: PoolStats) -> Iterator[GaugeMetricFamily]:
    """The queue and task gauges, read from the store (the same in every process that shares it)."""
    yield GaugeMetricFamily("workerpool_queue_capacity", "Tasks the queue can hold.", value=stats.queue_capacity)
    yield GaugeMetricFamily(
        "workerpool_queue_waiting",
        "Tasks accepted and not yet started, delayed ones included: what workerpool_queue_capacity bounds.",
        value=stats.waiting,
    )
    yield GaugeMetricFamily(
        "workerpool_queue_depth", "Tasks due and waiting in the queue for a worker.", value=stats.queue_depth
    )
    yield GaugeMetricFamily(
        "workerpool_tasks_running", "Tasks with an attempt running.", value=stats.counts[State.RUNNING]
    )
    yield GaugeMetricFamily(
        "workerpool_tasks_waiting_retry", "Tasks waiting out a retry backoff.", value=stats.retries_pending
    )
    retained = GaugeMetricFamily(
        "workerpool_tasks_retained", "Tasks whose state can be read back, by state.", labels=["state"]
    )
    for state in State:
        retained.add_metric([str(state)], stats.counts[state])
    yield retained


def _timed_out(count: float, created: float) -> CounterMetricFamily:
    """The timed-out attempts, counted by the pool rather than the observer hooks, stamped like the others."""
    return CounterMetricFamily(
        "workerpool_attempts_timed_out",
        "Attempts failed because they ran longer than ATTEMPT_TIMEOUT_S (counted among failed attempts too).",
        value=count,
        created=created if _created_series() else None,
    )


def _shared_pool_metrics(
    stats: PoolStats | None, counts: metrics_share.Snapshot, live: dict[int, metrics_share.Snapshot], created: float
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The pool's metrics when several processes share them: each process's own summed or by pid; the store's
    gauges unless ``stats`` is None (the store could not be read)."""
    workers = sum(gauges.get("workers", 0) for gauges in live.values())
    yield GaugeMetricFamily("workerpool_workers", "Worker threads.", value=workers)
    if stats is not None:
        yield from _store_gauges(stats)
    yield _by_pid("workerpool_draining", "1 once shutdown began: new tasks are refused.", live, "draining")
    yield _timed_out(counts.get("attempts_timed_out", 0), counts.get("created", created))
    yield _by_pid(
        "workerpool_stuck_threads", "Worker threads still in a handler whose attempt timed out.", live, "stuck_threads"
    )
    yield _by_pid(
        "workerpool_stuck_threads_limit",
        "Stuck threads that get a replacement; past it the service reports itself unhealthy.",
        live,
        "stuck_threads_limit",
    )


def _by_pid(name: str, documentation: str, live: dict[int, metrics_share.Snapshot], key: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=["pid"])
    for pid in sorted(live):
        if key in live[pid]:
            family.add_metric([str(pid)], live[pid][key])
    return family


@bp.get("/metrics")
def metrics() -> Response:
    """Serve the metrics in the text format the scraper asks for (Prometheus or OpenMetrics)."""
    encode, content_type = _encoder(request.headers.get("Accept", ""))
    return Response(encode(services().metrics.registry), content_type=content_type)


def _encoder(accept: str) -> tuple[Callable[[CollectorRegistry], bytes], str]:
    """The format the scraper ranks highest among those served: OpenMetrics or the text format.

    prometheus_client's ``choose_encoder`` weighs no ``q`` (any OpenMetrics
    range wins, even one refused with ``q=0``), raises ``TypeError`` on a
    ``version`` that is not all numbers, names in the ``Content-Type`` any
    OpenMetrics version asked for from 1.0.0 on (``version=7``), whatever
    the body's, and reads a quoted value with its quotes. It is given one
    range at a time, best first, its parameters unquoted; a range of a
    version it does not write (OpenMetrics 0.0.1 or 7, text 1.0.0-rc1)
    passes to the next. A wildcard, or nothing served, gives the text format.
    """
    for media_range in _by_preference(accept):
        kind, parameters = _media_range(media_range)
        if kind in ("*/*", "text/*"):
            break
        versions = _VERSIONS_WRITTEN.get(kind)
        if versions is None:
            continue
        version = parameters.get("version")
        if version is not None and version not in versions:
            continue
        chosen = [kind, *(f"{name}={parameters[name]}" for name in ("version", "escaping") if name in parameters)]
        return choose_encoder(";".join(chosen))
    return choose_encoder("")


# The versions of each format prometheus_client writes (what a range without a version gets: the first).
_VERSIONS_WRITTEN = {"application/openmetrics-text": ("1.0.0", "2.0.0"), "text/plain": ("0.0.4", "1.0.0")}
_QUOTED_PAIR = re.compile(r"\\(.)")


def _media_range(media_range: str) -> tuple[str, dict[str, str]]:
    """The media type of an ``Accept`` range (lower case) and its parameters by lower-case name, quoted values
    unquoted: ``version="1.0.0"`` is ``version=1.0.0`` (RFC 9110 section 5.6.6)."""
    kind, *pairs = media_range.split(";")
    parameters = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = _QUOTED_PAIR.sub(r"\1", value[1:-1])
        parameters.setdefault(name.strip().lower(), value)
    return kind.strip().lower(), parameters


def _by_preference(accept: str) -> list[str]:
    """The media ranges of ``accept`` by their ``q``, highest first (in their order when equal); none at 0."""
    ranked = []
    for media_range in accept.split(","):
        weight = 1.0
        for parameter in media_range.split(";")[1:]:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0  # unreadable: passed over
        if weight > 0:
            ranked.append((-weight, media_range))
    ranked.sort(key=lambda pair: pair[0])  # stable
    return [media_range for _, media_range in ranked]
