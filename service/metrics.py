"""Prometheus metrics for one app: its own registry, served at GET /metrics."""

from __future__ import annotations

from collections.abc import Iterator

from flask import Blueprint, Response, request
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from werkzeug.exceptions import RequestEntityTooLarge

from workerpool import DuplicateTask, PoolClosed, QueueFull, State, Task, WorkerPool

from .context import services
from .problems import Problem

REJECTION_REASONS = ("invalid", "too_large", "duplicate", "queue_full", "shutting_down", "error")
ATTEMPT_OUTCOMES = ("done", "retry", "failed")
_OUTCOME_BY_STATE = {State.DONE: "done", State.QUEUED: "retry", State.FAILED: "failed"}

bp = Blueprint("metrics", __name__)


class Metrics:
    """Counters fed by the views and the pool's ``on_attempt`` callback; gauges read at scrape time.

    Each instance has its own registry, so any number of apps can live in one process.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter(
            "workerpool_submissions_accepted", "Tasks accepted by POST /enqueue.", registry=self.registry
        )
        self.rejected = Counter(
            "workerpool_submissions_rejected",
            "Submissions refused by POST /enqueue, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "workerpool_attempts",
            "Finished task attempts by outcome: done, retry (failed, will retry) or failed (final).",
            ["outcome"],
            registry=self.registry,
        )
        self.attempt_seconds = Histogram(
            "workerpool_attempt_duration_seconds", "Wall time of one task attempt.", registry=self.registry
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for outcome in ATTEMPT_OUTCOMES:
            self.attempts.labels(outcome)

    def observe_attempt(self, task: Task, seconds: float) -> None:
        """The pool's ``on_attempt`` callback: count one attempt by the state it left the task in."""
        self.attempts.labels(_OUTCOME_BY_STATE.get(task.state, "failed")).inc()
        self.attempt_seconds.observe(seconds)

    def count_rejection(self, exc: BaseException) -> None:
        self.rejected.labels(rejection_reason(exc)).inc()

    def watch(self, pool: WorkerPool) -> None:
        """Report the pool's queue and task counts as gauges, read on every scrape."""
        self.registry.register(_PoolCollector(pool))


def rejection_reason(exc: BaseException) -> str:
    if isinstance(exc, Problem) and exc.status == 400:
        return "invalid"
    if isinstance(exc, RequestEntityTooLarge):
        return "too_large"
    if isinstance(exc, DuplicateTask):
        return "duplicate"
    if isinstance(exc, QueueFull):
        return "queue_full"
    if isinstance(exc, PoolClosed):
        return "shutting_down"
    return "error"


class _PoolCollector(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        stats = self._pool.stats()
        yield GaugeMetricFamily("workerpool_workers", "Worker threads.", value=stats.workers)
        yield GaugeMetricFamily("workerpool_queue_capacity", "Tasks the queue can hold.", value=stats.queue_capacity)
        yield GaugeMetricFamily("workerpool_queue_depth", "Tasks waiting in the queue.", value=stats.queue_depth)
        yield GaugeMetricFamily(
            "workerpool_retries_pending", "Tasks waiting out a retry backoff.", value=stats.retries_pending
        )
        yield GaugeMetricFamily(
            "workerpool_accepting", "1 while new tasks are accepted, 0 once shutdown began.", value=int(stats.accepting)
        )
        tasks = GaugeMetricFamily("workerpool_tasks", "Retained tasks by state.", labels=["state"])
        for state in State:
            tasks.add_metric([str(state)], stats.counts.get(state, 0))
        yield tasks


@bp.get("/metrics")
def metrics() -> Response:
    """Serve the metrics in the text format the scraper asks for (Prometheus or OpenMetrics)."""
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return Response(encode(services().metrics.registry), content_type=content_type)
