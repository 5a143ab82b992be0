"""Prometheus metrics for one app: its own registry, served at GET /metrics.

Counters and histograms are fed by the pool through the PoolObserver hooks
and by the enqueue view (rejections); gauges are read from the pool at
scrape time, so they are never stale.
"""

from __future__ import annotations

import bisect
import collections
import itertools
import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence

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
    QueueFull,
    State,
    StoreUnavailable,
    Task,
    WorkerPool,
)

from .context import services
from .problems import Problem

REJECTION_REASONS = (
    "invalid", "too_large", "unauthorized", "duplicate", "queue_full", "shutting_down", "store_unavailable", "error"
)
ATTEMPT_OUTCOMES = ("succeeded", "failed")
# Attempts of the simulated work take 0.1-0.5 s; tasks wait out backoffs of up to 10 s per retry.
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUED_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

bp = Blueprint("metrics", __name__)


class Metrics(PoolObserver):
    """The service's metrics; give an instance to the pool as an observer.

    Each instance has its own registry, so any number of apps can live in one process.

    The counts are plain numbers behind one lock, read by a collector at scrape time: a
    prometheus_client ``Counter``/``Histogram`` takes a lock (and a few calls) per child per
    change, about eight per finished task, which cost a worker about as much as the engine's
    own work for the task. The exposition is the one those classes give (names, HELP, types,
    labels, ``_created`` stamps, sample order).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()  # every count below; held only to change or copy them
        created = time.time()
        self._accepted = _Count(created)
        # Every label value from the start: a series that appears late breaks rate() over its first scrape.
        self._rejected = {reason: _Count(created) for reason in REJECTION_REASONS}
        self._succeeded = _Count(created)
        self._failed = _Count(created)
        self._retries = _Count(created)
        self._finished = {state: _Count(created) for state in sorted(FINAL_STATES)}
        self._abandoned = _Count(created)
        self._attempt_seconds = _Histogram(ATTEMPT_BUCKETS, created)
        self._queued_seconds = _Histogram(QUEUED_BUCKETS, created)
        self._task_seconds = _Histogram(TASK_BUCKETS, created)
        self.registry.register(_CountsCollector(self))

    # -- PoolObserver ----------------------------------------------------

    def task_queued(self, task: Task) -> None:
        with self._lock:
            self._accepted.value += 1.0

    def tasks_queued(self, tasks: Sequence[Task]) -> None:
        with self._lock:  # one increment per batch
            self._accepted.value += len(tasks)

    def attempt_started(self, task: Task) -> None:
        if task.attempts == 1 and task.started_at is not None:
            with self._lock:
                self._queued_seconds.observe(max(0.0, task.started_at - task.created_at))

    def attempt_finished(self, task: Task, seconds: float) -> None:
        state = task.state
        with self._lock:
            self._attempt_seconds.observe(seconds)
            (self._succeeded if state is State.DONE else self._failed).value += 1.0
            if state is State.QUEUED:
                self._retries.value += 1.0
            else:
                self._finish(task)

    def task_cancelled(self, task: Task) -> None:
        with self._lock:
            self._finish(task)

    def task_abandoned(self, task: Task) -> None:
        with self._lock:
            self._abandoned.value += 1.0
            self._finish(task)

    def _finish(self, task: Task) -> None:
        """Count a task that reached its final state; the caller holds the lock."""
        self._finished[task.state].value += 1.0
        if task.finished_at is not None:
            self._task_seconds.observe(max(0.0, task.finished_at - task.created_at))

    # -- the HTTP side ---------------------------------------------------

    def count_rejection(self, exc: BaseException) -> None:
        self._count_rejected(rejection_reason(exc), 1)

    def count_rejections(self, refusals: Iterable[BaseException]) -> None:
        """Count each refusal, with one increment per reason rather than one per task."""
        for reason, count in collections.Counter(map(rejection_reason, refusals)).items():
            self._count_rejected(reason, count)

    def _count_rejected(self, reason: str, count: int) -> None:
        with self._lock:
            series = self._rejected.get(reason)
            if series is None:  # a reason outside REJECTION_REASONS: its series starts now
                series = self._rejected[reason] = _Count(time.time())
            series.value += count

    def watch(self, pool: WorkerPool) -> None:
        """Report the pool's queue and task counts as gauges, read on every scrape."""
        self.registry.register(_PoolCollector(pool))


class _Count:
    """One counter series: its value and when it was created."""

    __slots__ = ("created", "value")

    def __init__(self, created: float) -> None:
        self.value = 0.0
        self.created = created


class _Histogram:
    """One histogram series: observations per bucket (not cumulative), their sum, when it was created."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: Sequence[float], created: float) -> None:
        self.bounds = (*bounds, math.inf)
        self.counts = [0.0] * len(self.bounds)
        self.sum = 0.0
        self.created = created

    def observe(self, amount: float) -> None:
        # The first bucket whose bound is >= amount, as prometheus_client's Histogram.observe picks it.
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1.0
        self.sum += amount

    def copy(self) -> _Histogram:
        copy = _Histogram(self.bounds[:-1], self.created)
        copy.counts = self.counts.copy()
        copy.sum = self.sum
        return copy


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
        with m._lock:
            accepted = _copy(m._accepted)
            rejected = {reason: _copy(series) for reason, series in m._rejected.items()}
            attempts = {"succeeded": _copy(m._succeeded), "failed": _copy(m._failed)}
            retries = _copy(m._retries)
            finished = {str(state): _copy(series) for state, series in m._finished.items()}
            abandoned = _copy(m._abandoned)
            attempt_seconds = m._attempt_seconds.copy()
            queued_seconds = m._queued_seconds.copy()
            task_seconds = m._task_seconds.copy()
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


def _copy(series: _Count) -> _Count:
    copy = _Count(series.created)
    copy.value = series.value
    return copy


def _by(label: str, series: dict[str, _Count]) -> dict[tuple[tuple[str, str], ...], _Count]:
    return {((label, value),): count for value, count in series.items()}


def _counter(
    name: str, documentation: str, series: dict[tuple[tuple[str, str], ...], _Count], created: bool
) -> CounterMetricFamily:
    labels = [label for label, _ in next(iter(series))]
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_pairs, count in series.items():
        family.add_metric([value for _, value in label_pairs], count.value, created=count.created if created else None)
    return family


def _histogram(name: str, documentation: str, series: _Histogram, created: bool) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation)
    cumulative = list(zip(map(floatToGoString, series.bounds), itertools.accumulate(series.counts)))
    family.add_metric([], cumulative, series.sum)
    if created:
        family.add_sample(name + "_created", {}, series.created)
    return family


_PROBLEM_REASONS = {400: "invalid", 401: "unauthorized", 413: "too_large"}


def rejection_reason(exc: BaseException) -> str:
    if isinstance(exc, Problem):
        return _PROBLEM_REASONS.get(exc.status, "error")
    if isinstance(exc, RequestEntityTooLarge):
        return "too_large"
    if isinstance(exc, DuplicateTask):
        return "duplicate"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, PoolClosed):
        return "shutting_down"
    if isinstance(exc, StoreUnavailable):
        return "store_unavailable"
    return "error"


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._pool.stats()
        yield GaugeMetricFamily("workerpool_workers", "Worker threads.", value=stats.workers)
        yield GaugeMetricFamily("workerpool_queue_capacity", "Tasks the queue can hold.", value=stats.queue_capacity)
        yield GaugeMetricFamily(
            "workerpool_queue_depth", "Tasks waiting in the queue for a worker.", value=stats.queue_depth
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
        yield GaugeMetricFamily(
            "workerpool_draining", "1 once shutdown began: new tasks are refused.", value=int(not stats.accepting)
        )
        yield CounterMetricFamily(
            "workerpool_attempts_timed_out",
            "Attempts failed because they ran longer than ATTEMPT_TIMEOUT_S (counted among failed attempts too).",
            value=stats.attempts_timed_out,
        )
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


@bp.get("/metrics")
def metrics() -> Response:
    """Serve the metrics in the text format the scraper asks for (Prometheus or OpenMetrics)."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(services().metrics.registry), content_type=content_type)
