"""The /metrics exposition of a scripted run of observer events, byte for byte against a recorded copy.

The copy was recorded from the service's metrics when every series was a prometheus_client
Counter or Histogram, so any change of a name, type, HELP text, label, sample order or value
shows here. The values of the ``_created`` series (process-time stamps) are masked.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from service.metrics import Metrics
from workerpool import DuplicateTask, PoolClosed, QueueFull, State, StoreUnavailable, Task

DATA = Path(__file__).parent / "data"


def _scripted(metrics: Metrics) -> None:
    """Every hook and every rejection path, with times that land in many buckets."""
    times = [0.0, 0.0005, 0.003, 0.01, 0.02, 0.07, 0.3, 0.75, 1.7, 4.0, 8.0, 20.0, 45.0, 100.0, 400.0, 900.0]
    metrics.task_queued(Task("single", None, 0, created_at=1000.0))
    metrics.tasks_queued([Task(f"b{n}", None, 2, created_at=1000.0) for n in range(len(times))])
    for n, t in enumerate(times):
        started = Task(f"b{n}", None, 2, State.RUNNING, 1, created_at=1000.0, started_at=1000.0 + t)
        metrics.attempt_started(started)
        again = started._replace(attempts=2)
        metrics.attempt_started(again)  # not the first attempt: not a queued time
        state = (State.DONE, State.FAILED, State.QUEUED, State.CANCELLED)[n % 4]
        finished_at = None if state is State.QUEUED else 1000.0 + t * 2 + 0.1
        metrics.attempt_finished(started._replace(state=state, finished_at=finished_at), t)
    metrics.attempt_started(Task("unstarted", None, 0, State.RUNNING, 1, created_at=1000.0))
    metrics.task_cancelled(Task("c", None, 0, State.CANCELLED, 0, created_at=1000.0, finished_at=1002.5))
    metrics.task_cancelled(Task("c2", None, 0, State.CANCELLED, 0, created_at=1000.0))  # no finish time
    metrics.task_abandoned(Task("x", None, 0, State.FAILED, 1, created_at=1000.0, finished_at=1700.0))
    metrics.task_abandoned(Task("y", None, 0, State.FAILED, 0, created_at=1000.0, finished_at=999.0))
    metrics.count_rejection(QueueFull(1))
    metrics.count_rejection(PoolClosed())
    metrics.count_rejections([DuplicateTask("d"), DuplicateTask("d"), QueueFull(1), ValueError("x")])
    metrics.count_rejection(StoreUnavailable("down"))


def _masked(text: str) -> str:
    return re.sub(r"^(\w+_created(?:\{[^}]*\})?) \S+$", r"\1 <created>", text, flags=re.M)


def test_the_exposition_of_a_scripted_run_is_unchanged():
    metrics = Metrics()
    _scripted(metrics)
    assert _masked(generate_latest(metrics.registry).decode()) == (DATA / "metrics_exposition.txt").read_text()
    openmetrics = _masked(generate_openmetrics(metrics.registry).decode())
    assert openmetrics == (DATA / "metrics_exposition.openmetrics.txt").read_text()


def test_each_series_is_stamped_with_the_time_it_was_created():
    before = time.time()
    metrics = Metrics()
    _scripted(metrics)
    after = time.time()
    text = generate_latest(metrics.registry).decode()
    created = [float(stamp) for stamp in re.findall(r"^\w+_created(?:\{[^}]*\})? (\S+)$", text, re.M)]
    assert created  # how many, and for which series, the recorded exposition says
    assert all(before <= stamp <= after for stamp in created)
