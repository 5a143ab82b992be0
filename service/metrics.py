"""Prometheus metrics for one app: its own registry, served at GET /metrics.

Counters and histograms are fed by the pool through the PoolObserver hooks
and by the enqueue view (rejections); gauges are read from the pool at
scrape time, so they are never stale.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator, Sequence

from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
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

REJECTION_REASONS = ("invalid", "too_large", "unauthorized", "duplicate", "queue_full", "shutting_down", "error")
ATTEMPT_OUTCOMES = ("succeeded", "failed")
# Attempts of the simulated work take 0.1-0.5 s; tasks wait out backoffs of up to 10 s per retry.
ATTEMPT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
QUEUED_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TASK_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

bp = Blueprint("metrics", __name__)


class Metrics(PoolObserver):
    """The service's metrics; give an instance to the pool as an observer.

    Each instance has its own registry, so any number of apps can live in one process.
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.accepted = Counter("workerpool_tasks_accepted", "Tasks accepted and queued.", registry=registry)
        self.rejected = Counter(
            "workerpool_tasks_rejected", "Submissions refused, by reason.", ["reason"], registry=registry
        )
        self.attempts = Counter(
            "workerpool_attempts", "Finished attempts, by outcome.", ["outcome"], registry=registry
        )
        self.retries = Counter(
            "workerpool_retries", "Failed attempts that were scheduled to run again.", registry=registry
        )
        self.finished = Counter(
            "workerpool_tasks_finished", "Tasks that reached a final state, by state.", ["state"], registry=registry
        )
        self.abandoned = Counter(
            "workerpool_tasks_abandoned",
            "Tasks failed by shutdown because they were unfinished at the drain deadline (counted in finished too).",
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "workerpool_attempt_duration_seconds", "Time one attempt ran.", buckets=ATTEMPT_BUCKETS, registry=registry
        )
        self.queued_seconds = Histogram(
            "workerpool_task_queued_seconds",
            "Time from acceptance to the start of the first attempt.",
            buckets=QUEUED_BUCKETS,
            registry=registry,
        )
        self.task_seconds = Histogram(
            "workerpool_task_duration_seconds",
            "Time from acceptance to the final state, retries included.",
            buckets=TASK_BUCKETS,
            registry=registry,
        )
        # Every label value from the start: a series that appears late breaks rate() over its first scrape.
        # The children are kept, as labels() costs a lock and a lookup on every task.
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self._attempts = {outcome: self.attempts.labels(outcome) for outcome in ATTEMPT_OUTCOMES}
        self._finished = {state: self.finished.labels(state) for state in sorted(FINAL_STATES)}

    # -- PoolObserver ----------------------------------------------------

    def task_queued(self, task: Task) -> None:
        self.accepted.inc()

    def tasks_queued(self, tasks: Sequence[Task]) -> None:
        self.accepted.inc(len(tasks))  # one increment per batch

    def attempt_started(self, task: Task) -> None:
        if task.attempts == 1 and task.started_at is not None:
            self.queued_seconds.observe(max(0.0, task.started_at - task.created_at))

    def attempt_finished(self, task: Task, seconds: float) -> None:
        self.attempt_seconds.observe(seconds)
        self._attempts["succeeded" if task.state is State.DONE else "failed"].inc()
        if task.state is State.QUEUED:
            self.retries.inc()
        else:
            self._finish(task)

    def task_cancelled(self, task: Task) -> None:
        self._finish(task)

    def task_abandoned(self, task: Task) -> None:
        self.abandoned.inc()
        self._finish(task)

    def _finish(self, task: Task) -> None:
        self._finished[task.state].inc()
        if task.finished_at is not None:
            self.task_seconds.observe(max(0.0, task.finished_at - task.created_at))

    # -- the HTTP side ---------------------------------------------------

    def count_rejection(self, exc: BaseException) -> None:
        self.rejected.labels(rejection_reason(exc)).inc()

    def count_rejections(self, refusals: Iterable[BaseException]) -> None:
        """Count each refusal, with one increment per reason rather than one per task."""
        for reason, count in collections.Counter(map(rejection_reason, refusals)).items():
            self.rejected.labels(reason).inc(count)

    def watch(self, pool: WorkerPool) -> None:
        """Report the pool's queue and task counts as gauges, read on every scrape."""
        self.registry.register(_PoolCollector(pool))


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
