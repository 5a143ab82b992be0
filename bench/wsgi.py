"""The service plus what the benchmarks compare it with, served by the same gunicorn config.

``gunicorn -c gunicorn.conf.py bench.wsgi:app``: the real app from ``create_app()`` with two
reference routes that parse a task exactly like ``POST /enqueue`` but never touch the pool.

``gunicorn -c gunicorn.conf.py 'bench.wsgi:planned_app()'``: the real app on a pool whose work
and backoff jitter are drawn per (seed, task, attempt), so two runs see the same tasks.
``BENCH_DESIGN=sleep-in-worker`` runs them the old way instead: the worker thread itself sleeps
through each backoff.
"""

from __future__ import annotations

import os
import random
import threading
import time

from flask import Flask, Response, jsonify, request, url_for

from app import create_app
from config import load as load_config
from service.context import services
from service.metrics import Metrics
from service.schema import TaskLimits, parse_enqueue, task_to_json
from workerpool import AttemptCancelled, PermanentFailure, QueueFull, SimulatedFailure, SimulatedWork, Task, WorkerPool
from workerpool.backoff import compute_backoff

REFERENCE_ACCEPT = "/bench/parse"
REFERENCE_REJECT = "/bench/parse-full"


def _parse() -> Task:
    svc = services()
    spec = parse_enqueue(request.get_data(cache=False), TaskLimits.of(svc.config))
    return Task(spec.id, spec.payload, spec.max_retries, created_at=time.time())


def add_reference_routes(flask_app: Flask) -> Flask:
    """Routes shaped like POST /enqueue minus the pool: same parsing, same response bodies."""

    @flask_app.post(REFERENCE_ACCEPT)
    def parse_only() -> tuple[Response, int, dict[str, str]]:
        """Parse a task and answer 202 as if it had been queued."""
        task = _parse()
        return jsonify(task_to_json(task)), 202, {"Location": url_for("api.get_task", task_id=task.id)}

    @flask_app.post(REFERENCE_REJECT)
    def parse_then_full() -> None:
        """Parse a task and answer 503 as if the queue were full."""
        _parse()
        raise QueueFull(services().config.queue_size)

    return flask_app


app = add_reference_routes(create_app())


# -- reproducible work for the pool-efficiency figure ----------------------------------------


def attempt_rng(seed: int, task_id: str, attempt: int) -> random.Random:
    return random.Random(f"{seed}/{task_id}/work/{attempt}")


def jitter_rng(seed: int, task_id: str, retry: int) -> random.Random:
    return random.Random(f"{seed}/{task_id}/backoff/{retry}")


class PlannedWork:
    """The product's SimulatedWork, its random draws keyed by (seed, task id, attempt).

    It also tells ``PlannedJitter`` (same thread, right after) which task's backoff to draw.
    """

    def __init__(self, *, seed: int, min_s: float, max_s: float, failure_rate: float) -> None:
        self.seed, self.min_s, self.max_s, self.failure_rate = seed, min_s, max_s, failure_rate
        self.current = threading.local()

    def attempt(self, task: Task, attempt: int, cancel: threading.Event) -> None:
        self.current.key = (task.id, attempt)
        rng = attempt_rng(self.seed, task.id, attempt)
        SimulatedWork(min_s=self.min_s, max_s=self.max_s, failure_rate=self.failure_rate, rng=rng)(task, cancel)

    def __call__(self, task: Task, cancel: threading.Event) -> None:
        self.attempt(task, task.attempts, cancel)


class PlannedJitter(random.Random):
    """The pool's backoff rng: ``uniform`` draws from the key the handler just set on this thread."""

    def __init__(self, work: PlannedWork) -> None:
        super().__init__(work.seed)
        self._work = work

    def uniform(self, a: float, b: float) -> float:
        task_id, attempt = self._work.current.key
        return jitter_rng(self._work.seed, task_id, attempt).uniform(a, b)


class SleepInWorker:
    """The old design: every retry runs inside the same handler call, sleeping its backoff in-thread."""

    def __init__(self, work: PlannedWork, *, base: float, cap: float) -> None:
        self._work, self._base, self._cap = work, base, cap

    def __call__(self, task: Task, cancel: threading.Event) -> None:
        for attempt in range(1, task.max_retries + 2):
            try:
                self._work.attempt(task, attempt, cancel)
                return
            except SimulatedFailure as exc:
                if attempt > task.max_retries:
                    raise PermanentFailure(str(exc)) from None
                rng = jitter_rng(self._work.seed, task.id, attempt)
                if cancel.wait(compute_backoff(attempt, base=self._base, cap=self._cap, rng=rng)):
                    raise AttemptCancelled("backoff cancelled at shutdown") from None


def build_planned_pool(
    *,
    design: str,
    seed: int,
    workers: int,
    queue_size: int,
    min_s: float,
    max_s: float,
    failure_rate: float,
    backoff_base: float,
    backoff_cap: float,
    observers=(),
) -> WorkerPool:
    work = PlannedWork(seed=seed, min_s=min_s, max_s=max_s, failure_rate=failure_rate)
    if design == "retry-timer":
        handler, rng = work, PlannedJitter(work)
    elif design == "sleep-in-worker":
        handler, rng = SleepInWorker(work, base=backoff_base, cap=backoff_cap), random.Random(seed)
    else:
        raise ValueError(f"unknown design {design!r}")
    return WorkerPool(
        handler,
        workers=workers,
        queue_size=queue_size,
        backoff_base=backoff_base,
        backoff_cap=backoff_cap,
        rng=rng,
        observers=observers,
    )


def planned_app() -> Flask:
    """The service on a planned pool; BENCH_SEED and BENCH_DESIGN choose the tasks and the design."""
    config = load_config()
    metrics = Metrics()
    pool = build_planned_pool(
        design=os.environ.get("BENCH_DESIGN", "retry-timer"),
        seed=int(os.environ.get("BENCH_SEED", "1")),
        workers=config.workers,
        queue_size=config.queue_size,
        min_s=config.work_min_ms / 1000,
        max_s=config.work_max_ms / 1000,
        failure_rate=config.failure_rate,
        backoff_base=config.backoff_base_ms / 1000,
        backoff_cap=config.backoff_cap_ms / 1000,
        observers=[metrics],
    )
    return create_app(config, pool=pool, metrics=metrics)
