"""GET /metrics: submission and attempt counters, the duration histogram, pool gauges."""

from __future__ import annotations

import pytest
from http_fixtures import PROJECT_ROOT, TEST_CONFIG, Gate, make_harness
from prometheus_client.parser import text_string_to_metric_families

from app import create_app, pool_of
from config import Config
from workerpool import State

COUNTERS = {"workerpool_submissions_accepted", "workerpool_submissions_rejected", "workerpool_attempts"}


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
        assert value(samples, "workerpool_tasks", state="running") == 1
        assert value(samples, "workerpool_tasks", state="queued") == 1
    finally:
        gate.open()
        harness.drain()
    assert enqueue(client, "late").status_code == 503
    samples = scrape(client)
    assert value(samples, "workerpool_submissions_accepted_total") == 2
    for reason, count in [("invalid", 2), ("too_large", 1), ("duplicate", 1), ("queue_full", 1), ("shutting_down", 1)]:
        assert value(samples, "workerpool_submissions_rejected_total", reason=reason) == count
    assert value(samples, "workerpool_submissions_rejected_total", reason="error") == 0
    assert value(samples, "workerpool_accepting") == 0


def test_attempts_are_counted_by_outcome_and_timed():
    def fail_once(task, cancel):
        if task.attempts == 1:
            raise RuntimeError("first attempt fails")

    def fail_always(task, cancel):
        raise RuntimeError("never works")

    handlers = {"ok": fail_once, "bad": fail_always}
    harness = make_harness(lambda task, cancel: handlers[task.id](task, cancel))
    enqueue(harness.client, "ok", max_retries=3)
    enqueue(harness.client, "bad", max_retries=1)
    harness.final.wait("ok", "bad")
    samples = scrape(harness.client)
    assert value(samples, "workerpool_attempts_total", outcome="done") == 1
    assert value(samples, "workerpool_attempts_total", outcome="retry") == 2
    assert value(samples, "workerpool_attempts_total", outcome="failed") == 1
    assert value(samples, "workerpool_attempt_duration_seconds_count") == 4
    assert value(samples, "workerpool_tasks", state="done") == 1
    assert value(samples, "workerpool_tasks", state="failed") == 1
    assert value(samples, "workerpool_retries_pending") == 0
    harness.drain()


def test_gauges_describe_the_pool():
    harness = make_harness(workers=3, queue_size=7)
    samples = scrape(harness.client)
    assert value(samples, "workerpool_workers") == 3
    assert value(samples, "workerpool_queue_capacity") == 7
    assert value(samples, "workerpool_accepting") == 1
    assert {value(samples, "workerpool_tasks", state=s) for s in ("queued", "running", "done", "failed")} == {0}


def test_many_apps_in_one_process_keep_separate_metrics():
    first, second = make_harness(), make_harness()
    enqueue(first.client, "a")
    first.final.wait("a")
    assert value(scrape(first.client), "workerpool_submissions_accepted_total") == 1
    assert value(scrape(second.client), "workerpool_submissions_accepted_total") == 0
    # Apps that build their own pool register cleanly too.
    for _ in range(2):
        create_app(TEST_CONFIG).test_client().get("/metrics")


def test_a_default_app_counts_attempts_of_its_own_pool():
    app = create_app(Config(work_min_ms=0, work_max_ms=0, failure_rate=0.0))
    client = app.test_client()
    assert enqueue(client, "a").status_code == 202
    summary = pool_of(app).shutdown(10)  # drains: the attempt has run when it returns
    assert summary.counts[State.DONE] == 1
    assert value(scrape(client), "workerpool_attempts_total", outcome="done") == 1


def test_openmetrics_is_served_on_request():
    harness = make_harness()
    response = harness.client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).endswith("# EOF\n")


def test_the_readme_documents_every_metric():
    readme = (PROJECT_ROOT / "README.md").read_text()
    families = {family.name for family in text_string_to_metric_families(scrape_text(make_harness().client))}
    for name in {name for name in families if not name.endswith("_created")}:  # the client's own series
        documented = name + "_total" if name in COUNTERS else name
        assert f"`{documented}`" in readme, name
