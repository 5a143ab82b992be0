"""Attempt timeouts: the watchdog fails an attempt that runs too long and replaces its stuck worker.

On the fake clock the tests call ``check_timeouts()`` themselves after moving
time on (the watchdog thread may do the same at the same moment: whoever
comes first times the attempt out); one test runs the watchdog on real time.
"""

from __future__ import annotations

import logging
import threading

import pytest
from doubles import WAIT_S, FakeClock, instant, refuse_to_start_thread, wait_until
from http_fixtures import FinalStates, make_harness

from workerpool import MemoryStore, State, StoreUnavailable, Task, WorkerPool
from workerpool.pool import TIMED_OUT
from workerpool.stores.sqlite import SqliteStore

TIMEOUT = 5.0


class Stuck:
    """A handler whose first attempt of a task ignores its cancel event and blocks until ``release()``;
    later attempts, and every attempt of the tasks named in ``quick``, return their attempt number."""

    def __init__(self, *quick: str) -> None:
        self.quick = set(quick)
        self.cancels: list[threading.Event] = []
        self.threads: list[threading.Thread] = []
        self._started = threading.Semaphore(0)
        self._release = threading.Event()

    def __call__(self, task: Task, cancel: threading.Event) -> object:
        if task.id in self.quick or task.attempts > 1:
            return task.attempts
        self.cancels.append(cancel)
        self.threads.append(threading.current_thread())
        self._started.release()
        self._release.wait(WAIT_S)
        return "late"

    def wait_started(self) -> None:
        assert self._started.acquire(timeout=WAIT_S), "no attempt started"

    def release(self) -> None:
        self._release.set()


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("workerpool-worker")]


def make_pool(handler, clock: FakeClock, **options) -> tuple[WorkerPool, FinalStates]:
    final = FinalStates()
    settings = {"workers": 1, "attempt_timeout": TIMEOUT, "backoff_base": 0.0, "backoff_cap": 0.0}
    settings.update(options)
    pool = WorkerPool(
        handler, clock=clock.time, monotonic=clock.monotonic, wait=clock.wait, observers=[final], **settings
    )
    return pool, final


def test_a_timed_out_attempt_is_retried_on_a_replacement_thread(clock, caplog):
    handler = Stuck()
    pool, final = make_pool(handler, clock)
    before = set(worker_threads())
    pool.submit("a", "", max_retries=1)
    handler.wait_started()
    clock.advance(TIMEOUT - 0.25)
    assert pool.check_timeouts() == 0.25  # not yet
    clock.advance(0.25)
    pool.check_timeouts()
    final.wait("a")  # the watchdog failed attempt 1; attempt 2 ran on a new worker thread
    task = pool.get("a")
    assert (task.state, task.attempts, task.result) == (State.DONE, 2, 2)
    assert task.last_error == TIMED_OUT.format(TIMEOUT) == "AttemptTimeout: the attempt ran longer than 5 s"
    assert handler.cancels[0].is_set(), "the timed-out attempt's cancel event was not set"
    stats = pool.stats()
    assert (stats.attempts_timed_out, stats.stuck_threads, stats.stuck_threads_limit) == (1, 1, 1)
    assert len(set(worker_threads()) - before) == 2  # the stuck one and its replacement
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        handler.release()
        handler.threads[0].join(WAIT_S)
    assert not handler.threads[0].is_alive(), "the replaced thread did not exit after its late return"
    assert pool.get("a") == task  # the late "late" was dropped
    assert "task a attempt 1 returned after it timed out; its result dropped" in caplog.text
    assert pool.stats().stuck_threads == 0
    assert pool.shutdown(WAIT_S).abandoned == ()


def test_a_timed_out_attempt_without_retries_left_fails_the_task(clock):
    handler = Stuck()
    pool, final = make_pool(handler, clock)
    pool.submit("a", "", max_retries=0)
    handler.wait_started()
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("a")
    task = pool.get("a")
    assert (task.state, task.attempts, task.last_error) == (State.FAILED, 1, TIMED_OUT.format(TIMEOUT))
    handler.release()
    pool.shutdown(WAIT_S)


def test_a_cancelled_attempt_that_times_out_ends_cancelled(clock):
    handler = Stuck()
    pool, final = make_pool(handler, clock)
    pool.submit("a", "", max_retries=3)
    handler.wait_started()
    assert pool.cancel("a").cancel_requested
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("a")
    assert pool.get("a").state is State.CANCELLED
    handler.release()
    pool.shutdown(WAIT_S)


def test_past_the_bound_a_stuck_thread_is_not_replaced_and_works_on_once_it_returns(clock):
    handler = Stuck("c")
    pool, final = make_pool(handler, clock, max_stuck_threads=1)
    pool.submit("a", "")
    handler.wait_started()
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("a")  # replaced: the bound allows one stuck thread
    assert pool.get("a").last_error == TIMED_OUT.format(TIMEOUT), pool.get("a")
    pool.submit("b", "")
    handler.wait_started()  # on the replacement
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("b")  # timed out too, but a second stuck thread is past the bound: no replacement
    stats = pool.stats()
    assert (stats.attempts_timed_out, stats.stuck_threads, stats.stuck_threads_limit) == (2, 2, 1)
    pool.submit("c", "", max_retries=0)
    assert pool.get("c").state is State.QUEUED  # no thread is free to claim it
    assert pool.check_timeouts() == TIMEOUT  # nothing left to time out: an attempt starting now could be next
    handler.release()
    final.wait("c")  # the first thread to return took it: one thread is the pool's only worker again
    wait_until(lambda: sum(t.is_alive() for t in handler.threads) == 1, timeout=WAIT_S, what="one thread to exit")
    assert pool.stats().stuck_threads == 0
    pool.shutdown(WAIT_S)
    for thread in handler.threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()


class StuckUntilReleased:
    """A handler whose first attempt of each task ignores its cancel event and blocks until that task is released;
    later attempts, and every attempt of the tasks named in ``quick``, return at once."""

    def __init__(self, *quick: str) -> None:
        self.quick = set(quick)
        self.threads: dict[str, threading.Thread] = {}
        self._releases: dict[str, threading.Event] = {}
        self._started = threading.Semaphore(0)

    def __call__(self, task: Task, cancel: threading.Event) -> object:
        if task.id in self.quick or task.attempts > 1:
            return task.attempts
        self.threads[task.id] = threading.current_thread()
        release = self._releases.setdefault(task.id, threading.Event())
        self._started.release()
        release.wait(WAIT_S)
        return "late"

    def wait_started(self) -> None:
        assert self._started.acquire(timeout=WAIT_S), "no attempt started"

    def release(self, task_id: str) -> None:
        self._releases.setdefault(task_id, threading.Event()).set()


def test_a_replaced_thread_that_returns_while_its_replacement_is_stuck_takes_work_again(clock):
    # It exited as replaced: no thread took work, and the stuck ones were no more than the limit (healthy).
    handler = StuckUntilReleased("c")
    pool, final = make_pool(handler, clock, max_stuck_threads=1)
    pool.submit("a", "", max_retries=0)
    handler.wait_started()
    clock.advance(TIMEOUT)
    pool.check_timeouts()  # its thread is replaced
    final.wait("a")
    pool.submit("b", "", max_retries=0)
    handler.wait_started()  # on the replacement
    clock.advance(TIMEOUT)
    pool.check_timeouts()  # past the bound: not replaced
    final.wait("b")
    assert pool.stats().stuck_threads == 2
    handler.release("a")  # the first returns; its replacement is still stuck
    pool.submit("c", "", max_retries=0)
    final.wait("c")
    assert pool.get("c").state is State.DONE
    assert handler.threads["a"].is_alive() and pool.stats().stuck_threads == 1
    handler.release("b")  # the replacement returns: a thread too many, it leaves
    handler.threads["b"].join(WAIT_S)
    assert not handler.threads["b"].is_alive()
    assert handler.threads["a"].is_alive() and pool.stats().stuck_threads == 0
    pool.shutdown(WAIT_S)
    handler.threads["a"].join(WAIT_S)
    assert not handler.threads["a"].is_alive()


def test_a_replacement_thread_that_fails_to_start_leaves_the_stuck_one_and_the_timeout_is_recorded(
    clock, monkeypatch, caplog
):
    handler = Stuck("b")
    pool, final = make_pool(handler, clock)
    pool.submit("a", "", max_retries=0)
    handler.wait_started()
    refuse_to_start_thread(monkeypatch, "workerpool-worker-2")
    clock.advance(TIMEOUT)
    pool.check_timeouts()  # (or the watchdog, at the same moment)
    final.wait("a")
    assert pool.get("a").last_error == TIMED_OUT.format(TIMEOUT)
    (warning,) = [r.getMessage() for r in caplog.records if "timed out after" in r.getMessage()]
    assert "NOT replaced: a new thread could not be started (RuntimeError: can't start new thread)" in warning
    assert "more than the" not in warning  # the bound (1) was not what stopped it
    monkeypatch.undo()
    handler.release()  # the stuck thread was not replaced: it works on
    pool.submit("b", "")
    final.wait("b")
    assert pool.shutdown(WAIT_S).abandoned == ()


def test_a_replacement_thread_is_among_the_pools_threads_only_once_started(clock, monkeypatch):
    # A shutdown lists the pool's threads and joins them: at no moment may the list hold one that
    # was not started (join would raise), nor may a replacement started after the listing be missed.
    handler = Stuck("b")
    pool, final = make_pool(handler, clock)
    pool.submit("a", "", max_retries=0)
    handler.wait_started()
    start = threading.Thread.start
    joined_before_start: list[str] = []

    def start_after_a_shutdown_looked(thread):
        if thread.name == "workerpool-worker-2":  # the replacement, created and not yet started
            for listed in list(pool._threads):  # what a shutdown's join would meet at this moment
                try:
                    listed.join(0)
                except RuntimeError as exc:
                    joined_before_start.append(f"{listed.name}: {exc}")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_after_a_shutdown_looked)
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("a")
    monkeypatch.undo()
    assert joined_before_start == []
    replacement = next(t for t in pool._threads if t.name == "workerpool-worker-2")
    pool.submit("b", "")
    final.wait("b")  # the replacement works
    handler.release()
    assert pool.shutdown(WAIT_S).abandoned == ()
    replacement.join(WAIT_S)
    assert not replacement.is_alive()


def test_a_stuck_thread_met_once_claiming_stopped_is_not_replaced_and_the_warning_says_so(clock, caplog, tmp_path):
    handler = Stuck()
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)  # shared: shutdown stops claiming at once
    pool, final = make_pool(handler, clock, store=store)
    pool.submit("a", "", max_retries=0)
    handler.wait_started()
    pool.shutdown(WAIT_S, wait=False)
    clock.advance(TIMEOUT)
    pool.check_timeouts()
    final.wait("a")
    (warning,) = [r.getMessage() for r in caplog.records if "timed out after" in r.getMessage()]
    assert "NOT replaced: the pool has stopped claiming work (1 stuck, at most 1 replaced)" in warning
    assert [t.name for t in pool._threads if t.name.startswith("workerpool-worker")] == ["workerpool-worker-1"]
    handler.release()
    assert pool.shutdown(WAIT_S).abandoned == ()
    store.close()


def test_the_watchdog_thread_times_attempts_out_on_its_own():
    handler = Stuck()
    final = FinalStates()
    pool = WorkerPool(handler, workers=1, attempt_timeout=0.05, observers=[final])
    try:
        pool.submit("a", "")
        final.wait("a")
        task = pool.get("a")
        assert task.last_error == TIMED_OUT.format(0.05)
        assert task.finished_at - task.started_at >= 0.05
    finally:
        handler.release()
        pool.shutdown(WAIT_S)


def test_an_attempt_that_ends_in_time_is_left_alone(clock):
    pool, final = make_pool(instant, clock, threads=False)
    pool.submit("a", "")
    assert pool.step()
    clock.advance(TIMEOUT * 2)
    assert pool.check_timeouts() == TIMEOUT
    assert pool.stats().attempts_timed_out == 0
    assert pool.get("a").state is State.DONE


def test_a_step_caller_is_timed_out_without_being_replaced(clock):
    """Driven by step(): the handler itself advances time and runs the check, as the watchdog would."""

    def handler(task: Task, cancel: threading.Event) -> str:
        clock.advance(TIMEOUT)
        pool.check_timeouts()
        assert cancel.is_set()
        return "late"

    pool, final = make_pool(handler, clock, threads=False)
    pool.submit("a", "", max_retries=0)
    assert pool.step()
    task = pool.get("a")
    assert (task.state, task.result, task.last_error) == (State.FAILED, None, TIMED_OUT.format(TIMEOUT))
    assert (pool.stats().attempts_timed_out, pool.stats().stuck_threads) == (1, 0)


@pytest.mark.parametrize("timeout", [0.0])
def test_a_zero_timeout_starts_no_watchdog(clock, timeout):
    before = set(threading.enumerate())
    pool, _ = make_pool(instant, clock, attempt_timeout=timeout)
    pool.start()
    names = {t.name for t in set(threading.enumerate()) - before}
    pool.shutdown(WAIT_S)
    assert names == {"workerpool-worker-1"}
    assert pool.check_timeouts() is None


def test_health_and_metrics_report_the_stuck_threads(clock):
    handler = Stuck()
    harness = make_harness(
        handler,
        clock=clock.time,
        monotonic=clock.monotonic,
        wait=clock.wait,
        attempt_timeout=TIMEOUT,
        max_stuck_threads=1,
    )
    try:
        health = harness.client.get("/healthz")
        assert (health.status_code, health.get_json()["stuck_threads"]) == (200, 0)
        for task_id in ("a", "b"):
            response = harness.client.post("/enqueue", json={"id": task_id, "payload": "", "max_retries": 0})
            assert response.status_code == 202
            handler.wait_started()
            clock.advance(TIMEOUT)
            harness.pool.check_timeouts()
            harness.final.wait(task_id)
            health = harness.client.get("/healthz")
            body = health.get_json()
            assert (body["stuck_threads"], body["stuck_threads_limit"]) == (1 if task_id == "a" else 2, 1)
            # The first stuck thread was replaced: a full set of workers still claims tasks.
            expected = (200, "ok") if task_id == "a" else (503, "unhealthy")
            assert (health.status_code, body["status"]) == expected
            live = harness.client.get("/livez")  # the liveness probe fails on that alone
            assert (live.status_code, live.get_json()) == (
                expected[0],
                {"status": expected[1], "stuck_threads": body["stuck_threads"], "stuck_threads_limit": 1},
            )
        text = harness.client.get("/metrics").get_data(as_text=True)
        assert "workerpool_attempts_timed_out_total 2.0" in text
        assert "workerpool_stuck_threads 2.0" in text
        assert "workerpool_stuck_threads_limit 1.0" in text
    finally:
        handler.release()
        harness.pool.shutdown(WAIT_S)
    assert harness.client.get("/healthz").get_json()["stuck_threads"] == 0


class FinishFailsOnce(MemoryStore):
    """A memory store whose first ``finish`` raises StoreUnavailable, as a full disk or a lost connection would."""

    def __init__(self, clock: FakeClock | None = None) -> None:
        super().__init__(**({"clock": clock.time, "wait": clock.wait} if clock else {}))
        self.failures = 1

    def finish(self, *args, **kwargs) -> Task | None:
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the disk is full")
        return super().finish(*args, **kwargs)


def test_a_timeout_the_store_refused_is_written_again_by_the_next_check(clock, caplog):
    store = FinishFailsOnce(clock)
    seen = {}

    def handler(task: Task, cancel: threading.Event) -> str:
        if task.attempts > 1:
            return "second"
        clock.advance(TIMEOUT)
        seen["delay"] = pool.check_timeouts()  # the store refuses the write
        seen["after the failure"] = pool.get("a").state, [a.task.id for a in pool.running()], cancel.is_set()
        pool.check_timeouts()  # the store takes it
        return "late"

    pool, final = make_pool(handler, clock, threads=False, store=store)
    pool.submit("a", "", max_retries=1)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        assert pool.step()
    assert store.failures == 0
    assert seen["delay"] <= 1.0
    assert seen["after the failure"] == (State.RUNNING, ["a"], True)  # still running here: not forgotten
    task = pool.get("a")
    assert (task.state, task.attempts, task.last_error) == (State.QUEUED, 1, TIMED_OUT.format(TIMEOUT))
    # One line: a traceback per attempt per second flooded the log while the store was unreachable.
    [record] = [record for record in caplog.records if "could not be recorded" in record.getMessage()]
    assert record.getMessage() == (
        "task a: the timeout of attempt 1 could not be recorded (the disk is full); trying again in 1.0 s"
    )
    assert (record.levelname, record.exc_info, record.task_id) == ("WARNING", None, "a")
    assert pool.running() == []
    assert pool.stats().attempts_timed_out == 1  # one timeout, however many writes it took
    assert pool.step()
    assert (pool.get("a").state, pool.get("a").result) == (State.DONE, "second")
    assert pool.shutdown(0).abandoned == ()


def test_the_watchdog_thread_ends_a_timed_out_attempt_the_store_refused_once():
    handler = Stuck()
    final = FinalStates()
    store = FinishFailsOnce()
    pool = WorkerPool(handler, store=store, workers=1, attempt_timeout=0.05, observers=[final])
    try:
        pool.submit("a", "")
        final.wait("a")  # the watchdog wrote the timeout again at its next check
        task = pool.get("a")
        assert (task.state, task.last_error) == (State.FAILED, TIMED_OUT.format(0.05))
        assert store.failures == 0
    finally:
        handler.release()
        summary = pool.shutdown(WAIT_S)
    assert summary.abandoned == ()


def test_a_worker_that_failed_to_start_and_a_replaced_stuck_one_leave_the_pool_its_number_of_workers(
    clock, tmp_path, monkeypatch
):
    handler = Stuck("b")
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    pool, final = make_pool(handler, clock, store=store, workers=2)
    refuse_to_start_thread(monkeypatch, "workerpool-worker-2")
    with pytest.raises(RuntimeError):
        pool.submit("refused", "")
    monkeypatch.undo()
    # Another process on the shared file admits a task; worker-1 claims it and gets stuck.
    other = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    other.admit([Task("a", "", 0, created_at=clock.time())])
    store.wake()
    handler.wait_started()
    clock.advance(TIMEOUT)
    pool.check_timeouts()  # worker-1 is replaced
    handler.release()  # worker-1 returns and works on: with its replacement, the pool has its two workers
    wait_until(lambda: pool.stats().stuck_threads == 0, timeout=WAIT_S, what="worker-1 to return")
    pool.submit("b", "")  # starts what is missing: nothing, not the worker whose name is not running
    final.wait("b")
    workers = [t.name for t in pool._threads if t.name.startswith("workerpool-worker") and t.is_alive()]
    pool.shutdown(WAIT_S)
    other.close()
    assert len(workers) == 2, workers
