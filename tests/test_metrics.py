"""GET /metrics: task and attempt counters that agree with the engine, the histograms, pool gauges."""

from __future__ import annotations

import re
import sys
import threading
from collections import Counter

import pytest
from http_fixtures import PROJECT_ROOT, TEST_CONFIG, Gate, make_harness
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import create_app, pool_of
from config import Config
from service.metrics import Metrics
from service.problems import Problem
from workerpool import DuplicateTask, PermanentFailure, QueueFull, State, StoreUnavailable, Task


def scrape_text(client) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    return response.get_data(as_text=True)


def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(scrape_text(client))
        for sample in family.samples
    }


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def enqueue(client, task_id, **fields):
    return client.post("/enqueue", json={"id": task_id, "payload": "", **fields})


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.open()


def test_submissions_are_counted_by_outcome(gate):
    harness = make_harness(gate, workers=1, queue_size=1)
    client = harness.client
    try:
        enqueue(client, "a")
        gate.wait_started()
        enqueue(client, "b")
        assert enqueue(client, "full").status_code == 503
        assert enqueue(client, "a").status_code == 409
        assert client.post("/enqueue", data="{").status_code == 400
        assert client.post("/enqueue", json={"id": 5}).status_code == 400
        assert client.post("/enqueue", data="x" * 2000).status_code == 413
        samples = scrape(client)
        assert value(samples, "workerpool_queue_depth") == 1
        assert value(samples, "workerpool_queue_waiting") == 1  # "b"; "full" was refused
        assert value(samples, "workerpool_tasks_running") == 1
        assert value(samples, "workerpool_tasks_retained", state="running") == 1
        assert value(samples, "workerpool_tasks_retained", state="queued") == 1
    finally:
        gate.open()
        harness.drain()
    assert enqueue(client, "late").status_code == 503
    samples = scrape(client)
    assert value(samples, "workerpool_tasks_accepted_total") == 2
    for reason, count in [("invalid", 2), ("too_large", 1), ("duplicate", 1), ("queue_full", 1), ("shutting_down", 1)]:
        assert value(samples, "workerpool_tasks_rejected_total", reason=reason) == count
    assert value(samples, "workerpool_tasks_rejected_total", reason="error") == 0
    assert value(samples, "workerpool_draining") == 1


def scripted(task, cancel):
    """Each task's id says how its attempts go: ok, fail-once, always-fails or permanent."""
    kind = task.id.split("-")[0]
    if kind == "permanent":
        raise PermanentFailure("bad input")
    if kind == "always" or (kind == "once" and task.attempts == 1):
        raise RuntimeError("transient")


def test_after_a_scripted_run_the_counters_agree_with_the_engine():
    ids = [f"{kind}-{n}" for kind in ("ok", "once", "always", "permanent") for n in range(5)]
    harness = make_harness(scripted, queue_size=len(ids))
    for task_id in ids:
        assert enqueue(harness.client, task_id, max_retries=2).status_code == 202
    harness.final.wait(*ids)
    samples = scrape(harness.client)
    harness.drain()

    tasks = harness.pool.list(limit=len(ids))
    counts = Counter(task.state for task in tasks)
    assert counts == {State.DONE: 10, State.FAILED: 10}
    for state in (State.DONE, State.FAILED):
        assert value(samples, "workerpool_tasks_finished_total", state=state) == counts[state]
        assert value(samples, "workerpool_tasks_retained", state=state) == counts[state]
    assert value(samples, "workerpool_tasks_accepted_total") == len(ids)
    attempts = sum(task.attempts for task in tasks)  # 5*1 + 5*2 + 5*3 + 5*1
    assert attempts == 35
    succeeded = value(samples, "workerpool_attempts_total", outcome="succeeded")
    failed = value(samples, "workerpool_attempts_total", outcome="failed")
    assert (succeeded, failed) == (counts[State.DONE], attempts - counts[State.DONE])
    assert value(samples, "workerpool_retries_total") == attempts - len(ids)  # every attempt but the last
    assert value(samples, "workerpool_attempt_duration_seconds_count") == attempts
    assert value(samples, "workerpool_task_queued_seconds_count") == len(ids)
    assert value(samples, "workerpool_task_duration_seconds_count") == len(ids)
    assert value(samples, "workerpool_tasks_abandoned_total") == 0
    assert value(samples, "workerpool_tasks_waiting_retry") == 0


def test_time_queued_and_task_duration_come_from_the_task_clock(clock, gate):
    harness = make_harness(gate, clock=clock.time, workers=1, queue_size=2)
    enqueue(harness.client, "first")
    gate.wait_started()
    enqueue(harness.client, "second")  # waits behind "first"
    clock.advance(3.0)
    gate.open()
    harness.final.wait("first", "second")
    samples = scrape(harness.client)
    assert value(samples, "workerpool_task_queued_seconds_count") == 2
    assert value(samples, "workerpool_task_queued_seconds_sum") == 3.0  # "first": 0 s, "second": 3 s
    assert value(samples, "workerpool_task_queued_seconds_bucket", le="0.001") == 1
    assert value(samples, "workerpool_task_duration_seconds_sum") == 6.0  # both finished 3 s after acceptance
    harness.drain()


def test_abandoned_tasks_are_counted_as_failed_and_abandoned(gate):
    harness = make_harness(gate, workers=1, queue_size=2)
    enqueue(harness.client, "running")
    gate.wait_started()
    enqueue(harness.client, "queued")
    summary = harness.pool.shutdown(0)
    assert set(summary.abandoned) == {"running", "queued"}
    samples = scrape(harness.client)
    assert value(samples, "workerpool_tasks_abandoned_total") == 2
    assert value(samples, "workerpool_tasks_finished_total", state="failed") == 2
    assert value(samples, "workerpool_tasks_retained", state="failed") == 2
    assert value(samples, "workerpool_draining") == 1


def test_gauges_describe_the_pool():
    harness = make_harness(workers=3, queue_size=7)
    samples = scrape(harness.client)
    assert value(samples, "workerpool_workers") == 3
    assert value(samples, "workerpool_queue_capacity") == 7
    assert value(samples, "workerpool_draining") == 0
    assert {value(samples, "workerpool_tasks_retained", state=s) for s in ("queued", "running", "done", "failed")} == {
        0
    }


def test_a_task_store_that_cannot_be_used_leaves_out_its_gauges_alone(monkeypatch):
    # /metrics answered 503 all through an outage: a scrape lost every metric, the rejections it caused among them.
    harness = make_harness(workers=2)
    client = harness.client
    store = type(harness.pool.store)
    assert value(scrape(client), "workerpool_store_available") == 1

    def down(*args, **kwargs):
        raise StoreUnavailable("redis: Error 111 connecting to 127.0.0.1:6390. Connection refused.")

    monkeypatch.setattr(store, "stats", down)
    monkeypatch.setattr(store, "admit", down)
    assert enqueue(client, "during").status_code == 503
    samples = scrape(client)
    assert value(samples, "workerpool_store_available") == 0
    assert value(samples, "workerpool_tasks_rejected_total", reason="store_unavailable") == 1
    assert value(samples, "workerpool_workers") == 2
    assert value(samples, "workerpool_draining") == 0
    assert not any(name.startswith(("workerpool_queue_", "workerpool_tasks_retained")) for name, _ in samples)
    monkeypatch.undo()
    samples = scrape(client)
    assert value(samples, "workerpool_store_available") == 1
    assert value(samples, "workerpool_queue_capacity") == 4


def test_a_task_store_whose_figures_read_well_but_that_cannot_be_written_is_not_available(monkeypatch):
    # /healthz answered 503 (a task file removed while open, Redis read-only) while the gauge kept saying 1.
    harness = make_harness(workers=2)
    client = harness.client
    monkeypatch.setattr(type(harness.pool.store), "health", lambda self: "the disk is full")
    assert client.get("/healthz").status_code == 503
    samples = scrape(client)
    assert value(samples, "workerpool_store_available") == 0
    assert value(samples, "workerpool_queue_capacity") == 4  # read all the same: kept
    monkeypatch.undo()
    assert value(scrape(client), "workerpool_store_available") == 1


def test_many_apps_in_one_process_keep_separate_metrics():
    first, second = make_harness(), make_harness()
    enqueue(first.client, "a")
    first.final.wait("a")
    assert value(scrape(first.client), "workerpool_tasks_accepted_total") == 1
    assert value(scrape(second.client), "workerpool_tasks_accepted_total") == 0
    # Apps that build their own pool register cleanly too.
    for _ in range(2):
        create_app(TEST_CONFIG).test_client().get("/metrics")


def test_a_default_app_counts_attempts_of_its_own_pool():
    app = create_app(Config(work_min_ms=0, work_max_ms=0, failure_rate=0.0))
    client = app.test_client()
    assert enqueue(client, "a").status_code == 202
    summary = pool_of(app).shutdown(10)  # drains: the attempt has run when it returns
    assert summary.counts[State.DONE] == 1
    assert value(scrape(client), "workerpool_attempts_total", outcome="succeeded") == 1


def test_openmetrics_is_served_on_request():
    harness = make_harness()
    response = harness.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).endswith("# EOF\n")


@pytest.mark.parametrize(
    ("accept", "mimetype"),
    [
        ("application/openmetrics-text; version=abc", "text/plain"),
        ("text/plain; version=1.0.0-rc1", "text/plain"),
        ("application/openmetrics-text; version=1.x, application/openmetrics-text", "application/openmetrics-text"),
    ],
)
def test_a_version_in_accept_that_cannot_be_compared_is_passed_over_not_a_500(accept, mimetype, caplog):
    response = make_harness().client.get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,application/openmetrics-text;"
    "version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


@pytest.mark.parametrize(
    ("accept", "mimetype"),
    [
        ("text/plain;version=0.0.4;q=1.0, application/openmetrics-text;version=1.0.0;q=0.5", "text/plain"),
        ("application/openmetrics-text;version=1.0.0;q=0, text/plain;version=0.0.4", "text/plain"),
        ("application/openmetrics-text;version=1.0.0;q=0", "text/plain"),  # refused: the default
        ("*/*;q=0.9, application/openmetrics-text;version=1.0.0;q=0.1", "text/plain"),
        ("text/plain;q=0.2, application/openmetrics-text;version=0.0.1;q=0.9", "text/plain"),  # 0.0.1 not served
        ("application/openmetrics-text;version=1.0.0;q=0.3, text/plain;q=0.2", "application/openmetrics-text"),
        (PROMETHEUS_3_ACCEPT, "application/openmetrics-text"),
    ],
)
def test_the_format_served_is_the_one_the_scraper_ranks_highest(accept, mimetype):
    response = make_harness().client.get("/metrics", headers={"Accept": accept})
    assert (response.status_code, response.mimetype) == (200, mimetype)


OPENMETRICS_1 = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        # A version it does not write was named in the Content-Type of a 1.0.0 body.
        ("application/openmetrics-text;version=7", TEXT_0_0_4),
        ("application/openmetrics-text;version=99999999999999999999999999999, text/plain", TEXT_0_0_4),
        ("application/openmetrics-text;version=1.1.0;q=0.9, application/openmetrics-text;q=0.5",
         "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        ("text/plain;version=7;q=0.9, application/openmetrics-text;version=1.0.0;q=0.5", OPENMETRICS_1),
        # A quoted value is the same value: it was passed over.
        ('application/openmetrics-text;version="1.0.0"', OPENMETRICS_1),
        ('application/openmetrics-text; version="1.0.0"; escaping="allow-utf-8"',
         "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=allow-utf-8"),
        ("Application/OpenMetrics-Text; Version=1.0.0", OPENMETRICS_1),
        ("application/openmetrics-text;version=2.0.0",
         "application/openmetrics-text; version=2.0.0; charset=utf-8; escaping=underscores"),
        ("text/plain;version=1.0.0", "text/plain; version=1.0.0; charset=utf-8; escaping=underscores"),
    ],
)  # fmt: skip
def test_the_content_type_names_a_version_the_body_is_written_in(accept, content_type):
    response = make_harness().client.get("/metrics", headers={"Accept": accept})
    assert (response.status_code, response.headers["Content-Type"]) == (200, content_type)
    assert response.get_data(as_text=True).endswith("# EOF\n") == content_type.startswith("application/openmetrics")


def test_the_readme_documents_every_metric():
    readme = (PROJECT_ROOT / "README.md").read_text()
    families = text_string_to_metric_families(scrape_text(make_harness().client))
    for family in families:
        if family.name.endswith("_created"):  # the client's own series
            continue
        documented = family.name + "_total" if family.type == "counter" else family.name
        assert f"`{documented}`" in readme, documented


@pytest.mark.parametrize("accept", ["text/plain", "application/openmetrics-text; version=1.0.0"])
def test_every_counter_and_histogram_has_a_created_series_stamped_as_the_others(accept):
    harness = make_harness()
    text = harness.client.get("/metrics", headers={"Accept": accept}).get_data(as_text=True)
    if accept == "text/plain":
        types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, re.M))
        counters = {name for name, kind in types.items() if kind in ("counter", "histogram")}
    else:  # OpenMetrics names a counter without its _total
        counters = set(re.findall(r"^# TYPE (\w+) (?:counter|histogram)$", text, re.M))
    stamps = dict(re.findall(r"^(\w+)_created(?:\{[^}]*\})? (\S+)$", text, re.M))
    assert "workerpool_attempts_timed_out" in {name.removesuffix("_total") for name in counters}
    assert {name.removesuffix("_total") for name in counters} <= set(stamps), sorted(counters)
    assert len({float(stamp) for stamp in stamps.values()}) == 1  # the process's metrics all began together


def test_every_rejection_reason_the_readme_lists_is_a_series_from_the_start():
    readme = (PROJECT_ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `workerpool_tasks_rejected_total`"))
    documented = set(re.findall(r"`(\w+)`", row.split("|")[3])) - {"reason"}
    samples = scrape(make_harness().client)
    served = {dict(labels)["reason"] for name, labels in samples if name == "workerpool_tasks_rejected_total"}
    assert served == documented
    assert all(value(samples, "workerpool_tasks_rejected_total", reason=reason) == 0 for reason in served)


def test_a_body_that_did_not_arrive_in_time_is_a_timeout_not_an_error():
    # Counted as "error", the reason that may mean a failure of the service, slow clients set off its alert.
    metrics = Metrics()
    metrics.count_rejection(Problem(408, "the request body did not arrive within REQUEST_TIMEOUT_S (10 s)"))
    counts = _counts(metrics)
    assert counts[("workerpool_tasks_rejected_total", (("reason", "timeout"),))] == 1
    assert counts[("workerpool_tasks_rejected_total", (("reason", "error"),))] == 0


def _counts(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }


@pytest.fixture
def rapid_switches():
    """The GIL handed between threads as often as CPython allows, so that counting and scraping interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_threads_counting_at_once_lose_no_increment_while_scrapes_read_them(rapid_switches):
    metrics = Metrics()
    threads, rounds = 8, 3_000
    queued = Task("t", None, 0, created_at=1000.0)
    started = queued._replace(state=State.RUNNING, attempts=1, started_at=1000.25)
    done = started._replace(state=State.DONE, finished_at=1000.5)
    retry = started._replace(state=State.QUEUED)
    go = threading.Barrier(threads + 1)

    def count() -> None:
        go.wait()
        for _ in range(rounds):
            metrics.tasks_queued([queued, queued])
            metrics.attempt_started(started)
            metrics.attempt_finished(retry, 0.02)
            metrics.attempt_finished(done, 0.2)
            metrics.count_rejections([QueueFull(1), QueueFull(1), DuplicateTask("t")])

    workers = [threading.Thread(target=count) for _ in range(threads)]
    for worker in workers:
        worker.start()
    go.wait()
    scrapes = []
    while any(worker.is_alive() for worker in workers):
        scrapes.append(_counts(metrics)["workerpool_tasks_accepted_total", ()])
    for worker in workers:
        worker.join()

    n = threads * rounds
    samples = _counts(metrics)
    assert scrapes == sorted(scrapes)  # a counter never goes back
    assert value(samples, "workerpool_tasks_accepted_total") == 2 * n
    assert value(samples, "workerpool_attempts_total", outcome="succeeded") == n
    assert value(samples, "workerpool_attempts_total", outcome="failed") == n
    assert value(samples, "workerpool_retries_total") == n
    assert value(samples, "workerpool_tasks_finished_total", state="done") == n
    assert value(samples, "workerpool_tasks_rejected_total", reason="queue_full") == 2 * n
    assert value(samples, "workerpool_tasks_rejected_total", reason="duplicate") == n
    assert value(samples, "workerpool_attempt_duration_seconds_bucket", le="0.025") == n
    assert value(samples, "workerpool_attempt_duration_seconds_count") == 2 * n
    assert value(samples, "workerpool_attempt_duration_seconds_sum") == pytest.approx(0.22 * n)
    assert value(samples, "workerpool_task_queued_seconds_count") == n
    assert value(samples, "workerpool_task_queued_seconds_sum") == pytest.approx(0.25 * n)
    assert value(samples, "workerpool_task_duration_seconds_bucket", le="0.5") == n
    assert value(samples, "workerpool_task_duration_seconds_sum") == pytest.approx(0.5 * n)


def test_the_counts_of_threads_that_ended_are_kept_and_their_rows_folded():
    metrics = Metrics()
    for _ in range(50):  # a thread per connection, as `python app.py` serves
        thread = threading.Thread(target=metrics.task_queued, args=(Task("t", None, 0),))
        thread.start()
        thread.join()
    metrics.task_queued(Task("t", None, 0))
    assert value(_counts(metrics), "workerpool_tasks_accepted_total") == 51
    assert len(metrics._rows) == 1  # this thread's: the others were added up when they had ended
