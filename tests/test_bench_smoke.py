"""The benchmark harness runs and writes its tables (tiny sizes; timings are not checked here)."""

from __future__ import annotations

import pytest
from http_fixtures import TEST_CONFIG

from app import create_app
from bench import dashboard_pages, efficiency
from bench.harness import Run
from bench.run import main
from bench.wsgi import build_planned_pool
from workerpool import State, WorkerPool

TINY = efficiency.Batch(tasks=12, min_ms=1, max_ms=2, failure_rate=0.5, backoff_base_ms=2, backoff_cap_ms=10)


def test_in_process_figures_write_their_tables(tmp_path, capsys):
    out = tmp_path / "RESULTS.md"

    assert main(["--quick", "--rounds", "1", "--only", "3,4a", "--out", str(out)]) == 0

    text = out.read_text()
    for heading in (
        "# Benchmark results",
        "## Summary",
        "## 3. Engine throughput",
        "## 4a. Bytes per retained task",
        "## Commands",
    ):
        assert heading in text
    assert "| 3. engine throughput, no-op, 4 workers |" in text
    assert "| 4. bytes per retained finished task |" in text
    assert "tasks/s" in capsys.readouterr().out


def test_wrk_together_shares_out_the_connections_and_adds_up_the_runs(monkeypatch):
    run = Run(wrk_threads=2, wrk_connections=16)
    seen = []

    def fake_wrk(url, path, **_):
        seen.append((url, path, run.wrk_threads, run.wrk_connections))
        n = len(seen)
        return {"requests": 1000 * n, "rps": 100.0 * n, "non_2xx_3xx": n - 1, "p99_us": 5000 * n}

    monkeypatch.setattr(run, "wrk", fake_wrk)

    both = run.wrk_together(["http://a", "http://b"], "/enqueue")

    assert sorted(seen) == [("http://a", "/enqueue", 1, 8), ("http://b", "/enqueue", 1, 8)]
    assert both == {"requests": 3000, "rps": 300.0, "non_2xx_3xx": 1, "p99_us": 10000}
    assert (run.wrk_threads, run.wrk_connections) == (2, 16)  # given back for the next run
    seen.clear()
    assert run.wrk_together(["http://a"], "/enqueue")["rps"] == 100.0
    assert seen == [("http://a", "/enqueue", 2, 16)]  # one server: wrk as it is


@pytest.mark.slow
def test_the_redis_memory_figure_writes_its_table(tmp_path):
    out = tmp_path / "RESULTS.md"

    assert main(["--quick", "--rounds", "1", "--only", "9d", "--out", str(out)]) == 0

    text = out.read_text()
    assert "## 9d. Redis memory per retained task" in text
    assert "| 1,000 tasks run, STATE_MAX_TASKS=200 | 200 |" in text  # retention bounds what Redis keeps
    assert "| 9. Redis memory per retained finished task |" in text


def test_planned_tasks_do_what_the_plan_says_in_both_designs():
    expected = efficiency.plan(TINY, seed=7)
    assert expected.failed  # the tiny batch exercises the give-up path too
    for design in (efficiency.RETRY_TIMER, efficiency.SLEEP_IN_WORKER):
        pool = build_planned_pool(
            design=design,
            seed=7,
            workers=2,
            queue_size=TINY.tasks,
            min_s=TINY.min_ms / 1000,
            max_s=TINY.max_ms / 1000,
            failure_rate=TINY.failure_rate,
            backoff_base=TINY.backoff_base_ms / 1000,
            backoff_cap=TINY.backoff_cap_ms / 1000,
        )
        for task_id in efficiency.task_ids(TINY, seed=7):
            pool.submit(task_id, max_retries=TINY.max_retries)
        summary = pool.shutdown(10)

        assert summary is not None and not summary.abandoned
        for task_id, attempts in expected.attempts.items():
            task = pool.get(task_id)
            assert task is not None
            assert task.state is (State.FAILED if task_id in expected.failed else State.DONE)
            if design == efficiency.RETRY_TIMER:
                assert task.attempts == attempts


def test_lower_bound_is_the_larger_of_spread_work_and_longest_chain():
    plan = efficiency.Plan(work_s=8.0, longest_chain_s=3.0, attempts={}, failed=frozenset())
    assert plan.lower_bound(4) == 3.0
    assert efficiency.Plan(work_s=40.0, longest_chain_s=3.0, attempts={}, failed=frozenset()).lower_bound(4) == 10.0


def test_no_simulated_scheduler_beats_the_lower_bound():
    expected = efficiency.plan(efficiency.Batch(tasks=50), seed=3)
    bound = expected.lower_bound(4)
    for policy in efficiency.POLICIES:
        assert expected.simulate(4, policy) >= bound - 1e-9


def test_every_table_row_has_as_many_cells_as_its_header(tmp_path):
    out = tmp_path / "RESULTS.md"
    main(["--quick", "--rounds", "1", "--only", "3,4a", "--out", str(out)])
    width = None
    for line in out.read_text().splitlines():
        if not line.startswith("|"):
            width = None
        elif width is None:
            width = line.count("|")
        else:
            assert line.count("|") == width, line


def test_the_bare_flask_reference_answers_like_a_minimal_enqueue_route():
    from bench.bare_flask import app

    client = app.test_client()
    accepted = client.post("/enqueue", data=b'{"id": "a", "payload": "x", "max_retries": 3}')
    assert (accepted.status_code, accepted.get_json()) == (202, {"id": "a", "state": "queued"})
    assert client.post("/enqueue", data=b'{"id": 5, "payload": "x"}').status_code == 400
    assert client.post("/enqueue", data=b"not json").status_code == 400
    assert client.get("/enqueue").status_code == 405  # what the benchmark waits for before it starts


def test_the_deep_page_of_the_poll_figure_is_as_deep_as_it_says():
    pool = WorkerPool(threads=False, queue_size=100)
    for n in range(50):
        pool.submit(f"task-{n:02d}")
    client = create_app(TEST_CONFIG, pool=pool).test_client()
    try:
        cursor = dashboard_pages.deep_cursor(lambda path: client.get(path).get_json(), 30, step=7)
        page = client.get(f"{dashboard_pages.POLL}&cursor={cursor}").get_json()
        assert [task["id"] for task in page["tasks"]] == [f"task-{n:02d}" for n in range(19, -1, -1)]
        with pytest.raises(ValueError, match="holds 50 tasks"):
            dashboard_pages.deep_cursor(lambda path: client.get(path).get_json(), 50, step=7)
    finally:
        pool.shutdown(0)  # the tasks were only listed: none is run


def test_the_poll_figure_times_both_pages_each_round_in_alternating_order():
    asked = []
    times = dashboard_pages.poll_times(asked.append, {"first": "/a", "deep": "/b"}, rounds=3, repeats=2)
    assert asked == ["/a", "/a", "/b", "/b", "/b", "/b", "/a", "/a", "/a", "/a", "/b", "/b"]
    assert {clock: [len(times[clock]["first"]), len(times[clock]["deep"])] for clock in times} == {
        "wall": [3, 3],
        "cpu": [3, 3],
    }
    times = dashboard_pages.measure("memory", 40, depth=30, rounds=1, repeats=1)
    assert [len(times["wall"]["first"]), len(times["cpu"]["deep"])] == [1, 1]
