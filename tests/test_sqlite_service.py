"""The service on the SQLite store: work crosses processes, kill -9 loses nothing accepted, bad files are refused.

The process tests start real interpreters and gunicorn, send real signals
and read the outcome through the HTTP API only. ``make test`` runs one short
round of each; the rounds marked ``stress`` kill more often (``make stress``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from http_fixtures import (
    LISTENING,
    TEST_CONFIG,
    Client,
    Gate,
    ServerProcess,
    clean_environment,
    instant,
    make_harness,
    wait_until,
    worker_pids,
)
from prometheus_client.parser import text_string_to_metric_families

from config import StoreSetting
from workerpool import FINAL_STATES, State, Task
from workerpool.stores import sqlite as sqlite_store
from workerpool.stores.sqlite import SqliteStore

FINAL = {str(state) for state in FINAL_STATES}

# A pool in a process of its own: its handler returns the pid that ran the attempt.
_WORKER_PROCESS = """
import os, sys
from workerpool import WorkerPool
from workerpool.stores.sqlite import SqliteStore
pool = WorkerPool(lambda task, cancel: os.getpid(), store=SqliteStore(sys.argv[1]), workers=2)
pool.start()
print("ready", flush=True)
sys.stdin.read()  # until the test closes our stdin
pool.shutdown(10)
"""


@pytest.mark.e2e
def test_a_task_admitted_by_one_process_runs_on_an_idle_worker_of_another(tmp_path):
    db = tmp_path / "tasks.db"
    submitter = SqliteStore(db)  # admits only: this process runs no worker
    worker = subprocess.Popen(
        [sys.executable, "-c", _WORKER_PROCESS, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=clean_environment(PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )
    try:
        assert worker.stdout.readline() == "ready\n"
        ids = [f"t{n}" for n in range(10)]
        for task_id in ids:
            (admitted,) = submitter.admit([Task(task_id, {"n": task_id}, 0, created_at=_now())])
            assert admitted.state is State.QUEUED
            done = wait_until(lambda tid=task_id: _final(submitter.get(tid)), timeout=20, what=f"{task_id} to run")
            assert (done.state, done.result) == (State.DONE, worker.pid)
        worker.stdin.close()
        assert worker.wait(timeout=30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)
        worker.stdout.close()
        submitter.close()


def _now() -> float:
    return time.time()


def _final(task: Task | None) -> Task | None:
    return task if task is not None and task.state in FINAL_STATES else None


# -- gunicorn, kill -9 --------------------------------------------------------------


def start_gunicorn(tmp_path: Path, db: Path, workers: int, round_no: int) -> ServerProcess:
    return ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", str(workers)],
        log_path=tmp_path / f"gunicorn-{round_no}.log",
        env=clean_environment(
            STORE=f"sqlite://{db}",
            WORKERS="2",
            QUEUE_SIZE="1000",
            WORK_MIN_MS="20",
            WORK_MAX_MS="120",
            FAILURE_RATE="0.3",
            BACKOFF_BASE_MS="10",
            BACKOFF_CAP_MS="50",
            SHUTDOWN_TIMEOUT_S="5",
        ),
    )


def kill_rounds(tmp_path: Path, rounds: int, seed: int) -> dict[str, dict]:
    """Submit batches, kill -9 a worker then the whole group at random points; restart and read every id.

    Returns every accepted task as the API shows it once all are final.
    """
    rng = random.Random(seed)
    db = tmp_path / "tasks.db"
    accepted: dict[str, int] = {}  # id -> max_retries
    for round_no in range(rounds + 1):
        server = start_gunicorn(tmp_path, db, workers=2, round_no=round_no)
        try:
            client = Client(server.wait_for_port(LISTENING))
            wait_until(lambda c=client: c.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
            if round_no == rounds:  # the last start only finishes what the kills left
                wait_until(lambda c=client: _all_final(c, accepted), timeout=90, what="every accepted task to end")
                return {task_id: client.json("GET", f"/tasks/{task_id}")[1] for task_id in accepted}
            kill_worker_at, kill_all_at = sorted(rng.sample(range(1, 30), 2))
            for n in range(30):
                task_id = f"r{round_no}-t{n}"
                max_retries = rng.randrange(0, 3)
                body = json.dumps({"id": task_id, "payload": f"n{n}", "max_retries": max_retries}).encode()
                status, _, text = client.request("POST", "/enqueue", body)
                if status == 202:
                    accepted[task_id] = max_retries
                else:  # the replacement of a killed worker may not listen yet: refused, never lost
                    assert status in (502, 503), (status, text)
                if n == kill_worker_at:
                    # gunicorn starts another
                    os.kill(rng.choice(sorted(worker_pids(server.proc.pid))), signal.SIGKILL)
                if n == kill_all_at:
                    break
            os.killpg(server.proc.pid, signal.SIGKILL)  # the arbiter and every worker, mid-batch
            server.proc.wait(timeout=10)
        finally:
            server.stop()
    raise AssertionError("unreachable")


def _all_final(client: Client, accepted: dict[str, int]) -> bool:
    for task_id in accepted:
        status, task = client.json("GET", f"/tasks/{task_id}")
        assert status == 200, (task_id, status, task)  # accepted means known, whatever was killed
        if task["state"] not in FINAL:
            return False
    return True


def check_nothing_lost(tasks: dict[str, dict]) -> None:
    for task in tasks.values():
        assert task["state"] in FINAL, task
        assert 1 <= task["attempts"] <= task["max_retries"] + 1, task


@pytest.mark.e2e
def test_kill_9_of_workers_and_of_the_whole_group_loses_no_accepted_task(tmp_path):
    tasks = kill_rounds(tmp_path, rounds=1, seed=1)
    assert len(tasks) >= 2
    check_nothing_lost(tasks)


@pytest.mark.stress
@pytest.mark.e2e
@pytest.mark.parametrize("seed", range(3))
def test_kill_9_rounds_lose_no_accepted_task(tmp_path, seed):
    tasks = kill_rounds(tmp_path, rounds=6, seed=seed)
    check_nothing_lost(tasks)
    lost = [t for t in tasks.values() if t["last_error"] and t["last_error"].startswith("lost:")]
    print(f"seed {seed}: {len(tasks)} accepted tasks, {len(lost)} ended an attempt as lost, all final")


# -- a store that cannot be used ----------------------------------------------------------


def _newer_schema(db: Path) -> None:
    SqliteStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()


def _foreign(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE invoices (n INTEGER)")
    conn.close()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("prepare", "reason"),
    [
        (lambda db: db.mkdir(), "is a directory"),
        (_foreign, "not a workerpool task store"),
        (_newer_schema, "written by a newer version"),
        (lambda db: db.write_bytes(b"garbage" * 1000), "not a SQLite database"),
    ],
)
def test_gunicorn_refuses_a_store_it_cannot_use_with_exit_code_2_and_one_line(tmp_path, prepare, reason):
    db = tmp_path / "tasks.db"
    prepare(db)
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        cwd=Path(__file__).resolve().parent.parent,
        env=clean_environment(STORE=f"sqlite://{db}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"store error: STORE cannot be used: {db}: ")
    assert reason in lines[0]


def test_a_locked_database_answers_503_and_health_says_why_until_it_is_released(tmp_path):
    db = tmp_path / "tasks.db"
    harness = make_harness(instant, store=SqliteStore(db, busy_timeout=0.05))
    client = harness.client
    try:
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            refused = client.post("/enqueue", json={"id": "during", "payload": ""})
            assert refused.status_code == 503
            assert refused.get_json()["type"] == "urn:workerpool:problem:store-unavailable"
            health = client.get("/healthz")
            assert health.status_code == 503
            assert "locked" in health.get_json()["store_error"]
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert client.get("/tasks/during").status_code == 404  # refused means not stored
        assert client.post("/enqueue", json={"id": "after", "payload": ""}).status_code == 202
        assert client.get("/healthz").status_code == 200
    finally:
        harness.drain()


def test_health_and_metrics_answer_at_once_while_another_program_holds_the_write_lock(tmp_path):
    # Both waited the busy timeout (5 s by default) for the lock: a probe or a scrape timed out meanwhile.
    db = tmp_path / "tasks.db"
    gate = Gate()
    harness = make_harness(gate, store=SqliteStore(db, busy_timeout=30))
    client = harness.client
    try:
        assert client.post("/enqueue", json={"id": "running", "payload": ""}).status_code == 202
        gate.wait_started()
        assert client.post("/enqueue", json={"id": "queued", "payload": ""}).status_code == 202
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # `sqlite3 tasks.db 'BEGIN IMMEDIATE;'` left open
        try:
            began = time.monotonic()
            first = client.get("/healthz")  # the lock out of reach a moment: contended perhaps, not reported yet
            harness.pool.store._held_up_since -= sqlite_store.LOCKED_AFTER_S  # as if a second had passed
            health = client.get("/healthz")
            metrics = client.get("/metrics")
            live = client.get("/dashboard/live")
            took = time.monotonic() - began
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert took < 10, took  # 0.2 s each at most, where each waited the 30 s busy timeout
        assert first.status_code == 200 and first.get_json()["queue_waiting"] == 1
        assert live.get_json()["type"] == "urn:workerpool:problem:store-unavailable"  # as /healthz: 503
        assert (health.status_code, health.headers["Retry-After"]) == (503, "1")
        assert health.get_json()["status"] == "store_unavailable"
        assert "locked" in health.get_json()["store_error"]
        assert metrics.status_code == 200
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(metrics.get_data(as_text=True))
            for sample in family.samples
        }
        assert samples[("workerpool_store_available", ())] == 0
        # The figures as last committed: nothing else could change them while the lock was held.
        assert samples[("workerpool_queue_waiting", ())] == 1
        assert samples[("workerpool_tasks_retained", (("state", "running"),))] == 1
        assert client.get("/healthz").status_code == 200  # nothing failed: the lock is free again
    finally:
        gate.open()
        harness.drain()


def test_a_task_file_removed_while_open_answers_503_naming_it_and_the_accepted_tasks_still_run(tmp_path, caplog):
    db = tmp_path / "tasks.db"
    gate = Gate()
    config = dataclasses.replace(TEST_CONFIG, store=StoreSetting("sqlite", path=str(db)))
    harness = make_harness(gate, config=config, store=SqliteStore(db))
    client = harness.client
    try:
        for task_id in ("first", "second"):
            assert client.post("/enqueue", json={"id": task_id, "payload": ""}).status_code == 202
        gate.wait_started()  # one attempt runs, one task waits
        for path in (db, tmp_path / "tasks.db-wal", tmp_path / "tasks.db-shm"):
            path.unlink()  # a tmp cleaner, an operator's rm

        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.get_json()["store_error"].startswith("the task file was removed while this process had it open")
        assert str(tmp_path) not in health.get_json()["store_error"]  # /healthz is open: not where the file is
        refused = client.post("/enqueue", json={"id": "after", "payload": ""})
        assert refused.status_code == 503
        problem = refused.get_json()
        assert problem["type"] == "urn:workerpool:problem:store-unavailable"
        assert "file was removed or replaced" in problem["detail"]
        assert any(r.levelname == "ERROR" and "the task file was removed" in r.message for r in caplog.records)
        metrics = client.get("/metrics")  # an alert on the gauge fires, as /healthz's probe does
        assert metrics.status_code == 200
        assert "\nworkerpool_store_available 0.0\n" in metrics.get_data(as_text=True)

        gate.open()
        harness.final.wait("first", "second")  # drained from the open file, not dropped
        assert client.get("/tasks/second").get_json()["state"] == "done"
        assert client.get("/tasks/after").status_code == 404
        assert not db.exists()
    finally:
        gate.open()
        harness.drain()


@pytest.mark.e2e
@pytest.mark.slow
def test_a_worker_replaced_while_the_file_is_locked_retries_and_the_server_stays_up(tmp_path):
    db = tmp_path / "tasks.db"
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(STORE=f"sqlite://{db}", WORK_MIN_MS="0", WORK_MAX_MS="0"),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        first = wait_until(lambda: len(pids := worker_pids(arbiter)) == 2 and pids, timeout=20, what="two workers")
        wait_until(lambda: server.log().count("pool started") == 2, timeout=20, what="both pools")
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # a VACUUM, the sqlite3 shell, a long write of another program
        try:
            os.kill(min(first), signal.SIGKILL)  # an OOM kill, a crash in a handler
            # Its replacement waits out the busy timeout (5 s), ends alone, and gunicorn starts another.
            wait_until(lambda: "worker not started: STORE cannot be used now" in server.log(), timeout=30, what="it")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        wait_until(lambda: server.log().count("pool started") == 3, timeout=30, what="a replacement's pool")
        assert server.proc.poll() is None
        assert len(worker_pids(arbiter)) == 2
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        assert client.json("POST", "/enqueue", b'{"id": "after", "payload": ""}')[0] == 202
        wait_until(lambda: client.json("GET", "/tasks/after")[1]["state"] == "done", timeout=10, what="it to run")
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    log = server.log()
    assert "ended: not started (STORE could not be used); it held no task" in log
    assert "Worker failed to boot" not in log


@pytest.mark.e2e
def test_a_handler_that_ends_its_worker_with_status_3_or_4_gets_it_replaced_not_the_server_stopped(tmp_path):
    """gunicorn reads exit status 3 or 4 as a worker that could not start: os._exit(3) in a handler stopped the
    whole server, the other worker with it, where os._exit(1) got the worker replaced."""
    (tmp_path / "exits.py").write_text("import os\ndef run(task, cancel):\n    os._exit(task.payload)\n")
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            STORE=f"sqlite://{tmp_path / 'tasks.db'}", TASK_HANDLER="exits:run", PYTHONPATH=str(tmp_path)
        ),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: server.log().count("pool started") == 2, timeout=20, what="both pools")
        for exited, status in enumerate((3, 4), start=1):
            # Due a second later: run at once, the attempt could end the worker before it answered the 202.
            task = {"id": f"exit-{status}", "payload": status, "max_retries": 0, "delay_ms": 1000}
            assert client.json("POST", "/enqueue", json.dumps(task).encode())[0] == 202
            wait_until(lambda n=exited: server.log().count("exited with code 1") == n, timeout=20, what="an exit")
            said = f"ending with exit status {status}, which gunicorn reads as a worker that failed to start"
            assert said in server.log()
            wait_until(lambda n=exited: server.log().count("pool started") == 2 + n, timeout=20, what="a new one")
            assert server.proc.poll() is None
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    assert "Worker failed to boot" not in server.log() and "App failed to load" not in server.log()


# -- stopping and reloading -----------------------------------------------------------------


def _gunicorn(tmp_path: Path, db: Path, name: str, **env: str) -> tuple[ServerProcess, Client]:
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / f"{name}.log",
        env=clean_environment(
            **{
                "STORE": f"sqlite://{db}",
                "WORK_MIN_MS": "20",
                "WORK_MAX_MS": "60",
                "BACKOFF_BASE_MS": "10",
                "BACKOFF_CAP_MS": "50",
                "SHUTDOWN_TIMEOUT_S": "10",
                **env,
            }
        ),
    )
    client = Client(server.wait_for_port(LISTENING))
    wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
    return server, client


def _enqueue(client: Client, ids: list[str]) -> None:
    for task_id in ids:
        body = json.dumps({"id": task_id, "payload": "p", "max_retries": 2}).encode()
        assert client.request("POST", "/enqueue", body)[0] == 202


@pytest.mark.e2e
def test_a_stopped_service_hands_queued_work_to_the_next_start(tmp_path):
    db = tmp_path / "tasks.db"
    server, client = _gunicorn(tmp_path, db, "first", WORKERS="1")
    try:
        ids = [f"t{n}" for n in range(40)]
        _enqueue(client, ids)
        assert server.terminate(timeout=30) == 0  # stops soon: what it has not started stays queued
    finally:
        server.stop()
    left = [t for t in (SqliteStore(db).get(task_id) for task_id in ids) if t.state not in FINAL_STATES]
    assert left, "the first service finished everything: nothing was handed over"
    assert all(t.state is State.QUEUED for t in left)
    server, client = _gunicorn(tmp_path, db, "second")
    try:
        wait_until(lambda: _all_final(client, dict.fromkeys(ids, 2)), timeout=60, what="every task to end")
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_full_disk_answers_503_for_new_tasks_health_says_why_and_the_service_recovers(tmp_path):
    # RLIMIT_FSIZE on the running worker: every write past the first byte of a file fails (EFBIG; Python
    # ignores SIGXFSZ) as on a full disk. Raised again, writes succeed: the space has come back.
    db = tmp_path / "tasks.db"
    # FAILURE_RATE=0: the simulated work would fail all three attempts of "before" one time in 125 (0.2³).
    server, client = _gunicorn(tmp_path, db, "full", WORKERS="1", ACCESS_LOG="off", FAILURE_RATE="0")
    try:
        (worker,) = worker_pids(server.proc.pid)
        _enqueue(client, ["before"])
        wait_until(lambda: _final(_task(client, "before")), timeout=20, what="the first task to end")
        limits = resource.prlimit(worker, resource.RLIMIT_FSIZE)
        resource.prlimit(worker, resource.RLIMIT_FSIZE, (1, limits[1]))
        try:
            for task_id in ("full-1", "full-2"):
                status, headers, text = client.request(
                    "POST", "/enqueue", json.dumps({"id": task_id, "payload": "p"}).encode()
                )
                assert status == 503, text  # never a 202 for a task that was not stored
                assert headers["Content-Type"] == "application/problem+json"
                problem = json.loads(text)
                assert problem["type"] == "urn:workerpool:problem:store-unavailable"
                assert "nothing was stored; a smaller request (a batch split in parts) may pass" in problem["detail"]
            status, health = client.json("GET", "/healthz")
            assert status == 503
            assert health["status"] == "store_unavailable"
            assert "file size limit" in health["store_error"], health
            assert client.json("GET", "/tasks/before")[1]["state"] == "done"  # reading still works
            assert client.request("GET", "/tasks/full-1")[0] == 404
        finally:
            resource.prlimit(worker, resource.RLIMIT_FSIZE, limits)
        # Before any task writes: after a second /healthz tries a write of its own.
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz to recover")
        _enqueue(client, ["after"])
        wait_until(lambda: _final(_task(client, "after")), timeout=20, what="a task after the disk came back")
        assert client.request("GET", "/tasks/full-2")[0] == 404
        assert worker_pids(server.proc.pid) == {worker}, "the worker was replaced"
    finally:
        server.stop()


def _task(client: Client, task_id: str) -> Task | None:
    status, body = client.json("GET", f"/tasks/{task_id}")
    assert status == 200, body
    return SimpleNamespace(state=State(body["state"]))  # type: ignore[return-value]


@pytest.mark.e2e
def test_two_workers_stopping_log_a_line_each_then_one_summary_counting_the_stores_queued_tasks_once(tmp_path):
    # Each worker's summary counts every task the store still holds: the two lines read as 20 queued for 10.
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(STORE=f"sqlite://{tmp_path / 'tasks.db'}", WORK_MIN_MS="0", WORK_MAX_MS="0"),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        wait_until(lambda: server.log().count("pool started") == 2, timeout=20, what="both pools")
        pids = worker_pids(arbiter)
        for n in range(10):
            later = {"id": f"later-{n}", "payload": "", "delay_ms": 600_000}
            assert client.json("POST", "/enqueue", json.dumps(later).encode())[0] == 202
        for n in range(4):
            now = {"id": f"now-{n}", "payload": "", "max_retries": 0}
            assert client.json("POST", "/enqueue", json.dumps(now).encode())[0] == 202
        ended = lambda: all(client.json("GET", f"/tasks/now-{n}")[1]["state"] in ("done", "failed") for n in range(4))  # noqa: E731
        wait_until(ended, timeout=20, what="the tasks due now to end")
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    lines = [line.split(" gunicorn.error: ", 1)[1] for line in server.log().splitlines() if " gunicorn.error: " in line]
    assert sorted(re.findall(r"^worker \(pid:(\d+)\) drained in ", "\n".join(lines), re.M)) == sorted(map(str, pids))
    assert [line for line in lines if "shutdown complete" in line] == lines[-1:]
    summary = re.fullmatch(
        r"shutdown complete: drained in [\d.]+ s; 10 queued, 0 running, (\d+) done, (\d+) failed, 0 cancelled; "
        r"0 abandoned \(2 workers added up\)",
        lines[-1],
    )
    assert summary and int(summary[1]) + int(summary[2]) == 4, lines[-1]
