import json
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections import Counter

import pytest
from doubles import POLL_S, WAIT_S, FakeClock, Gate, instant, refuse_to_start_thread, wait_until
from doubles import failing as always_fail
from redis_server import shared_server

from service.lifecycle import describe
from workerpool import (
    ABANDONED,
    AttemptCancelled,
    DuplicateTask,
    PermanentFailure,
    PoolClosed,
    PoolObserver,
    QueueFull,
    State,
    StoreFileReplaced,
    StoreNotSynced,
    StoreUnavailable,
    Task,
    TaskSpec,
    WorkerPool,
    forks,
)
from workerpool import pool as pool_module
from workerpool.nesting import nested_deeper_than
from workerpool.pool import CANCEL_POLL_S, DRAIN_STORE_GRACE_S, MAX_RESULT_DEPTH
from workerpool.results import check_result
from workerpool.stores.base import LOST_EXPIRED
from workerpool.stores.memory import MemoryStore
from workerpool.stores.redis_store import RedisStore
from workerpool.stores.sqlite import SqliteStore

TIMEOUT = WAIT_S  # real seconds any single wait in these tests may take at most


class AttemptLog(PoolObserver):
    """Records the outcome of every attempt and lets a test wait for one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int, State]] = []
        self.changed = threading.Condition(self.lock)

    def attempt_finished(self, task, seconds):
        with self.lock:
            self.events.append((task.id, task.attempts, task.state))
            self.changed.notify_all()

    def wait_for(self, task_id, state):
        with self.lock:
            assert self.changed.wait_for(
                lambda: any(e[0] == task_id and e[2] is state for e in self.events), TIMEOUT
            ), f"{task_id} never reached {state}: {self.events}"


def drain_waits_in_fake_time(clock):
    """A pool's ``wait`` whose waits on a thread named "drain" pass in fake time once nothing comes within 50 ms."""

    def wait(event, timeout):
        if threading.current_thread().name != "drain" or timeout is None:
            return clock.wait(event, timeout)
        if event.wait(0.05):
            return True
        clock.advance(timeout)
        return event.is_set()

    return wait


def thread_joins(monkeypatch):
    """The timeouts the drains join their threads with (real seconds: a fake clock cannot show them)."""
    joins = []
    stop_threads = WorkerPool._stop_threads

    def spied(self, join_timeout):
        joins.append(join_timeout)
        stop_threads(self, join_timeout)

    monkeypatch.setattr(WorkerPool, "_stop_threads", spied)
    return joins


@pytest.fixture
def make_pool(clock):
    pools = []

    def make(handler=instant, **kwargs):
        kwargs.setdefault("rng", random.Random(0))
        kwargs.setdefault("clock", clock.time)
        kwargs.setdefault("monotonic", clock.monotonic)
        kwargs.setdefault("wait", clock.wait)
        kwargs.setdefault("backoff_base", 0.0)
        pool = WorkerPool(handler, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown(timeout=0)


def test_an_always_failing_task_gets_exactly_max_retries_plus_one_attempts(make_pool):
    pool = make_pool(always_fail, workers=2)
    pool.submit("f", "", max_retries=4)
    pool.submit("z", "", max_retries=0)
    pool.shutdown(timeout=TIMEOUT)
    failed = pool.get("f")
    assert (failed.state, failed.attempts, failed.last_error) == (State.FAILED, 5, "RuntimeError: boom")
    assert pool.get("z").attempts == 1


def test_a_succeeding_task_runs_once(make_pool):
    pool = make_pool(instant)
    pool.submit("ok", "", max_retries=5)
    pool.shutdown(timeout=TIMEOUT)
    task = pool.get("ok")
    assert (task.state, task.attempts, task.last_error) == (State.DONE, 1, None)
    assert task.created_at <= task.started_at <= task.finished_at


def test_a_permanent_failure_is_not_retried(make_pool):
    def refuse(task, cancel):
        raise PermanentFailure("bad payload")

    pool = make_pool(refuse)
    pool.submit("p", "", max_retries=5)
    pool.shutdown(timeout=TIMEOUT)
    assert pool.get("p").attempts == 1
    assert pool.get("p").last_error == "PermanentFailure: bad payload"


def test_a_failing_handler_never_kills_its_worker(make_pool):
    def flaky(task, cancel):
        if task.id == "bad":
            raise KeyError("missing")

    pool = make_pool(flaky, workers=1)
    pool.submit("bad", "", 0)
    pool.submit("good", "", 0)
    pool.shutdown(timeout=TIMEOUT)
    assert pool.get("bad").state is State.FAILED
    assert pool.get("good").state is State.DONE


def test_a_task_waiting_for_its_retry_holds_no_worker(make_pool, clock):
    def fail_first_attempt(task, cancel):
        if task.id == "slow" and task.attempts == 1:
            raise RuntimeError("try again")

    log = AttemptLog()
    # random() = 0.5 -> the first retry waits half of base: 500 s of fake time.
    pool = make_pool(fail_first_attempt, workers=1, backoff_base=1000, backoff_cap=1000, observers=[log])
    pool._rng.random = lambda: 0.5
    pool.submit("slow", "", max_retries=1)
    pool.submit("quick", "", max_retries=0)
    log.wait_for("quick", State.DONE)
    waiting = pool.get("slow")
    assert (waiting.state, waiting.attempts) == (State.QUEUED, 1)
    assert waiting.next_attempt_at == pytest.approx(clock.time() + 500)
    assert pool.stats().retries_pending == 1

    clock.advance(500)
    log.wait_for("slow", State.DONE)
    assert log.events == [("slow", 1, State.QUEUED), ("quick", 1, State.DONE), ("slow", 2, State.DONE)]
    assert pool.get("slow").next_attempt_at is None


def test_a_due_retry_enters_a_full_queue_ahead_of_waiting_work(make_pool, clock):
    gate = Gate()

    def handler(task, cancel):
        if task.id == "retry" and task.attempts == 1:
            raise RuntimeError("again")
        if task.id == "blocker":
            gate(task, cancel)

    log = AttemptLog()
    pool = make_pool(handler, workers=1, queue_size=1, backoff_base=10, backoff_cap=10, observers=[log])
    pool.submit("retry", "", max_retries=1)
    log.wait_for("retry", State.QUEUED)
    pool.submit("blocker", "", 0)
    assert gate.started.wait(TIMEOUT)
    pool.submit("queued", "", 0)  # the queue is now full
    with pytest.raises(QueueFull):
        pool.submit("refused", "", 0)

    clock.advance(10)  # the retry falls due while the queue is full
    wait_until(lambda: pool.stats().queue_depth == 2, timeout=TIMEOUT, what="the retry in the queue")
    gate.open()
    log.wait_for("queued", State.DONE)
    order = [task_id for task_id, _, state in log.events if state is State.DONE]
    assert order == ["blocker", "retry", "queued"]


def test_new_work_waits_only_for_work_accepted_before_it(make_pool):
    # Every task fails until its retries run out and due retries go first,
    # yet no retry of a task accepted after "new" runs before "new" does.
    log = AttemptLog()
    gate = Gate()

    def handler(task, cancel):
        if task.id == "first":
            gate(task, cancel)
        raise RuntimeError("no luck")

    pool = make_pool(handler, workers=1, queue_size=50, observers=[log])
    pool.submit("first", "", max_retries=0)
    assert gate.started.wait(TIMEOUT)  # hold the worker while the queue fills
    for n in range(5):
        pool.submit(f"early{n}", "", max_retries=3)
    pool.submit("new", "", max_retries=0)
    for n in range(5):
        pool.submit(f"late{n}", "", max_retries=3)
    gate.open()
    pool.shutdown(timeout=TIMEOUT)
    order = [task_id for task_id, _, _ in log.events]
    before_new = set(order[: order.index("new")])
    assert before_new <= {"first"} | {f"early{n}" for n in range(5)}
    assert len(order) == 1 + 5 * 4 + 1 + 5 * 4  # every retry still ran


def test_even_systemexit_from_a_handler_fails_the_attempt_not_the_worker(make_pool):
    def exits(task, cancel):
        if task.id == "exits":
            raise SystemExit(3)

    pool = make_pool(exits, workers=1)
    pool.submit("exits", "", 0)
    pool.submit("after", "", 0)
    pool.shutdown(timeout=TIMEOUT)
    assert (pool.get("exits").state, pool.get("exits").last_error) == (State.FAILED, "SystemExit: 3")
    assert pool.get("after").state is State.DONE


class BrokenObserver(PoolObserver):
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def _fail(self, *args):
        raise self.error

    task_queued = attempt_started = attempt_finished = task_abandoned = _fail


# SystemExit (sys.exit() in an exporter) used to end the worker thread silently, its tasks left running.
@pytest.mark.parametrize("error", [RuntimeError("observer bug"), SystemExit("observer gave up")], ids=repr)
def test_a_failing_observer_neither_kills_the_worker_nor_delays_the_drain(make_pool, error):
    gate = Gate()
    pool = make_pool(gate, workers=1, observers=[BrokenObserver(error)])
    pool.submit("a", "", 0)
    pool.submit("b", "", 0)
    assert gate.started.wait(TIMEOUT)
    pool.shutdown(timeout=1000, wait=False)  # fake time never advances: only wake-ups end the drain
    gate.open()
    summary = pool.shutdown()
    assert summary.abandoned == ()
    assert summary.counts[State.DONE] == 2


def test_a_full_queue_refuses_without_a_trace(make_pool):
    gate = Gate()
    pool = make_pool(gate, workers=1, queue_size=2)
    pool.submit("running", "", 0)
    assert gate.started.wait(TIMEOUT)
    pool.submit("q1", "", 0)
    pool.submit("q2", "", 0)
    before = pool.stats()
    with pytest.raises(QueueFull, match="queue is full"):
        pool.submit("q3", "", 0)
    assert pool.get("q3") is None
    assert pool.stats() == before
    gate.open()


def test_a_duplicate_id_is_refused_while_known(make_pool):
    pool = make_pool(instant)
    pool.submit("a", "one", 0)
    with pytest.raises(DuplicateTask):
        pool.submit("a", "two", 3)
    pool.shutdown(timeout=TIMEOUT)
    assert pool.get("a").max_retries == 0
    with pytest.raises(PoolClosed):
        pool.submit("a", "three", 0)


def test_a_closed_pool_refuses_without_a_trace(make_pool):
    pool = make_pool(instant)
    summary = pool.shutdown(timeout=TIMEOUT)
    with pytest.raises(PoolClosed, match="after shutdown"):
        pool.submit("late", "", 0)
    assert pool.get("late") is None
    assert not pool.accepting
    assert pool.shutdown(timeout=TIMEOUT) is summary  # idempotent


def test_shutdown_drains_queued_work_and_pending_retries(make_pool, clock):
    def fail_once(task, cancel):
        if task.attempts == 1 and task.id.startswith("r"):
            raise RuntimeError("again")

    began = threading.Event()

    def fail_once_after_shutdown_began(task, cancel):
        assert began.wait(TIMEOUT)
        fail_once(task, cancel)

    pool = make_pool(fail_once_after_shutdown_began, workers=2, backoff_base=5, backoff_cap=5)
    ids = [f"{kind}{n}" for n in range(10) for kind in "rt"]
    for task_id in ids:
        pool.submit(task_id, "", 1)
    drained = threading.Thread(target=pool.shutdown, kwargs={"timeout": 60})
    drained.start()
    wait_until(lambda: not pool.accepting, timeout=TIMEOUT, what="the drain to begin")
    began.set()
    while drained.is_alive():  # let fake time pass so the retries fall due
        clock.advance(1)
        drained.join(0.01)
    summary = pool.shutdown()
    assert summary.abandoned == ()
    assert summary.counts == {State.QUEUED: 0, State.RUNNING: 0, State.DONE: 20, State.FAILED: 0, State.CANCELLED: 0}
    assert all(pool.get(f"r{n}").attempts == 2 for n in range(10))


def test_shutdown_abandons_what_is_unfinished_at_the_deadline(make_pool, clock):
    started = threading.Event()

    def slow(task, cancel):
        started.set()
        assert cancel.wait(TIMEOUT)  # runs until shutdown cancels it
        raise RuntimeError("cancelled")

    pool = make_pool(slow, workers=1)
    pool.submit("running", "", 3)
    pool.submit("queued", "", 3)
    assert started.wait(TIMEOUT)
    assert pool.shutdown(timeout=30, wait=False) is None
    clock.advance(30)
    summary = pool.shutdown()
    assert summary.abandoned == ("queued", "running")
    assert summary.counts[State.FAILED] == 2
    for task_id in summary.abandoned:
        task = pool.get(task_id)
        assert (task.state, task.last_error) == (State.FAILED, ABANDONED)
        assert task.finished_at is not None


@pytest.mark.parametrize("wait", ["delay", "backoff"])
def test_cancelling_the_last_unfinished_task_ends_the_drain_at_once(make_pool, clock, wait):
    # The drain used to sleep on until its deadline: a cancel did not wake it. The fake clock stands
    # still, so here it would never have ended; the drain thread is joined without waking it.
    log = AttemptLog()
    pool = make_pool(
        always_fail if wait == "backoff" else instant, workers=1, backoff_base=100, backoff_cap=100, observers=[log]
    )
    pool.submit("a", "", 1, delay=100.0 if wait == "delay" else 0.0)
    if wait == "backoff":
        log.wait_for("a", State.QUEUED)  # its first attempt failed: it waits 100 s for its retry
    before = set(threading.enumerate())
    assert pool.shutdown(timeout=1000, wait=False) is None
    (drain,) = (t for t in set(threading.enumerate()) - before if t.name == "workerpool-drain")
    assert pool.cancel("a").state is State.CANCELLED
    drain.join(TIMEOUT)
    assert not drain.is_alive(), "the drain did not end when nothing was left to drain"
    summary = pool.shutdown()
    assert (summary.abandoned, summary.counts[State.CANCELLED], summary.drain_seconds) == ((), 1, 0.0)


def test_an_attempt_finishing_after_abandonment_does_not_touch_the_store(make_pool):
    started = threading.Event()
    log = AttemptLog()

    def ignores_cancel(task, cancel):
        started.set()
        assert cancel.wait(TIMEOUT)  # ... then reports success anyway

    pool = make_pool(ignores_cancel, workers=1, observers=[log])
    pool.submit("late", "", 0)
    assert started.wait(TIMEOUT)
    summary = pool.shutdown(timeout=0)
    assert summary.abandoned == ("late",)
    assert pool.get("late").state is State.FAILED
    assert pool.stats().counts == {
        State.QUEUED: 0,
        State.RUNNING: 0,
        State.DONE: 0,
        State.FAILED: 1,
        State.CANCELLED: 0,
    }
    assert log.events == []  # the late result was dropped, not reported


class HeldAsItRegisters:
    """A pool's monotonic clock whose first read on a worker thread, as it registers the attempt of the
    task it claimed, notes that ``worker``, sets ``claimed`` and holds it until ``registering`` is set."""

    def __init__(self, clock) -> None:
        self.clock, self.claimed, self.registering = clock, threading.Event(), threading.Event()
        self.worker: threading.Thread | None = None

    def __call__(self) -> float:
        if threading.current_thread().name.startswith("workerpool-worker-") and not self.claimed.is_set():
            self.worker = threading.current_thread()  # by name, a worker other tests left behind could be taken
            self.claimed.set()
            assert self.registering.wait(TIMEOUT)
        return self.clock.monotonic()


def test_a_task_claimed_with_the_last_end_as_the_drain_abandons_it_never_starts(make_pool):
    # The worker claims its next task in the same store step as its last attempt's end, and registers
    # it only after the observers heard of that end: here the drain abandons both meanwhile.
    hearing, heard = threading.Event(), threading.Event()
    ran, workers = [], []

    class SlowToHear(PoolObserver):
        def attempt_finished(self, task, seconds):
            if task.id == "first":
                workers.append(threading.current_thread())
                hearing.set()
                assert heard.wait(TIMEOUT)

    def handler(task, cancel):
        ran.append((task.id, cancel.is_set()))

    pool = make_pool(handler, workers=1, observers=[SlowToHear()])
    pool.submit("first", "", 0)
    pool.submit("second", "", 0)
    assert hearing.wait(TIMEOUT)
    [worker] = workers
    summary = pool.shutdown(timeout=0)
    heard.set()
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert summary.abandoned == ("second",)
    assert (pool.get("second").state, pool.get("second").last_error) == (State.FAILED, ABANDONED)
    assert ran == [("first", False)]  # "second" was reported abandoned: its handler never ran


def test_a_task_an_idle_worker_claimed_as_the_drain_abandons_it_never_starts(make_pool, clock):
    # The worker claims, and registers the attempt a moment later (it reads the clock first): the drain
    # abandons the task in between.
    monotonic = HeldAsItRegisters(clock)
    ran = []
    pool = make_pool(lambda task, cancel: ran.append(task.id), workers=1, monotonic=monotonic)
    pool.submit("claimed", "", 0)
    assert monotonic.claimed.wait(TIMEOUT)
    worker = monotonic.worker
    summary = pool.shutdown(timeout=0)
    monotonic.registering.set()
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert summary.abandoned == ("claimed",)
    assert ran == []


def test_a_task_registered_after_the_store_abandoned_it_never_starts(make_pool, clock):
    # The store fails the claimed task as abandoned; its worker registers the attempt right after,
    # before the pool has told the attempts running here: it must not start the handler either.
    monotonic = HeldAsItRegisters(clock)
    ran = []

    class LetsTheWorkerOnAfterAbandoning(MemoryStore):
        def abandon(self, reason, *, owner):
            abandoned = super().abandon(reason, owner=owner)
            monotonic.registering.set()
            wait_until(lambda: ran or not worker.is_alive(), timeout=TIMEOUT, what="the worker to start or end")
            return abandoned

    store = LetsTheWorkerOnAfterAbandoning(64, clock=clock.time, wait=clock.wait)
    pool = make_pool(lambda task, cancel: ran.append(task.id), workers=1, monotonic=monotonic, store=store)
    pool.submit("claimed", "", 0)
    assert monotonic.claimed.wait(TIMEOUT)
    worker = monotonic.worker
    summary = pool.shutdown(timeout=0)
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert summary.abandoned == ("claimed",)
    assert ran == []


class ClaimsAfterTheAbandon:
    """A store whose first claim waits until the drain has abandoned this process's work, then claims."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.claiming, self.abandoned, self.workers = threading.Event(), threading.Event(), []

    def claim(self, owner, lease_until):
        if not self.claiming.is_set():  # the worker's first claim: "late" is queued (admitted before it started)
            self.workers.append(threading.current_thread())
            self.claiming.set()
            assert self.abandoned.wait(TIMEOUT)
        return super().claim(owner, lease_until)

    def abandon(self, reason, *, owner):
        try:
            return super().abandon(reason, owner=owner)
        finally:
            self.abandoned.set()


@pytest.mark.parametrize("store_name", ["sqlite", "redis", "sqlite-not-synced"])
def test_a_task_a_shared_store_let_a_worker_claim_after_the_abandon_is_put_back_unrun(
    make_pool, clock, tmp_path, caplog, store_name
):
    # A timeout-0 drain does not wait for a claim under way: taken after the abandon, the task was dropped
    # unrun and stayed running here until its lease expired, then counted as a failed attempt.
    kinds = {"sqlite": SqliteStore, "redis": RedisStore, "sqlite-not-synced": SqliteStore}

    class PutBackAfterTheAbandon(ClaimsAfterTheAbandon, kinds[store_name]):
        def put_back(self, task_id, attempt, owner):
            back = super().put_back(task_id, attempt, owner)
            if store_name == "sqlite-not-synced":  # put back, its fsync failed (synchronous=FULL)
                raise StoreNotSynced("syncing the WAL failed: [Errno 5] Input/output error", back)
            return back

    if store_name != "redis":
        store = PutBackAfterTheAbandon(tmp_path / "tasks.db", clock=clock.time)
    else:
        prefix = f"test-{uuid.uuid4().hex}"
        limits = {"capacity": 64, "ttl": 3600.0, "max_finished": 100}
        store = PutBackAfterTheAbandon(shared_server().client(), **limits, prefix=prefix, clock=clock.time)
    ran = []
    store.admit([Task("late", "", 0, created_at=clock.time())])
    pool = make_pool(lambda task, cancel: ran.append(task.id), workers=1, store=store)
    pool.start()
    assert store.claiming.wait(TIMEOUT)
    [worker] = store.workers
    with caplog.at_level(logging.INFO, logger="workerpool.pool"):
        summary = pool.shutdown(timeout=0)
        worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert ran == [] and summary.abandoned == ()
    late = store.get("late")
    assert (late.state, late.attempts, late.started_at) == (State.QUEUED, 0, None)  # for another process
    assert store.unfinished(pool.owner) == 0
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task late attempt 1")]
    assert told == [
        "task late attempt 1 not started: claimed after the drain abandoned this process's work, it is queued again"
    ]
    store.close()


def test_a_task_cancelled_while_its_claim_after_the_abandon_was_under_way_is_counted_and_told_as_cancelled(
    make_pool, clock, tmp_path, caplog
):
    # The put-back cancels a claimed task whose cancel was requested: no observer heard of it, no count had it
    # (workerpool_tasks_* drifted from the store for good), and the log said "it is cancelled again".
    pool = None

    class CancelledWhileClaimed(ClaimsAfterTheAbandon, SqliteStore):
        def claim(self, owner, lease_until):
            first = not self.claiming.is_set()
            task = super().claim(owner, lease_until)
            if first:
                assert pool.cancel("late").cancel_requested  # a client's cancel while the claim's reply is on its way
            return task

    class Cancels(Recorder):
        def task_cancelled(self, task):
            self.calls.append(("cancelled", task.id, task.state))

    store = CancelledWhileClaimed(tmp_path / "tasks.db", clock=clock.time)
    store.admit([Task("late", "", 0, created_at=clock.time())])
    heard = Cancels()
    pool = make_pool(instant, workers=1, store=store, observers=[heard])
    pool.start()
    assert store.claiming.wait(TIMEOUT)
    [worker] = store.workers
    with caplog.at_level(logging.INFO, logger="workerpool.pool"):
        summary = pool.shutdown(timeout=0)
        worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert store.get("late").state is State.CANCELLED
    assert heard.calls == [("cancelled", "late", State.CANCELLED)]
    assert summary.abandoned == () and pool._finals[State.CANCELLED] == 1  # what the summary counts, once joined
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task late")]
    assert told[-1] == (
        "task late cancelled: claimed after the drain abandoned this process's work, its cancel was requested meanwhile"
    )
    store.close()


def test_a_worker_whose_put_back_fails_with_a_bug_still_ends_normally(make_pool, clock, tmp_path, monkeypatch):
    # A claim taken after the drain abandoned this process's work is put back; a bug there ended the
    # thread with a traceback, before it put back a lost claim of its own.
    died = threads_that_died(monkeypatch)
    put_back_lost = []

    class PutBackFails(ClaimsAfterTheAbandon, SqliteStore):
        def put_back(self, task_id, attempt, owner):
            raise KeyError("bug")

        def put_back_lost_claim(self, owner):
            put_back_lost.append(threading.current_thread())
            return super().put_back_lost_claim(owner)

    store = PutBackFails(tmp_path / "tasks.db", clock=clock.time)
    ran = []
    store.admit([Task("late", "", 0, created_at=clock.time())])
    pool = make_pool(lambda task, cancel: ran.append(task.id), workers=1, store=store)
    pool.start()
    assert store.claiming.wait(TIMEOUT)
    [worker] = store.workers
    pool.shutdown(timeout=0)
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert ran == [] and died == []
    assert worker in put_back_lost
    store.close()


def test_a_handler_ignoring_its_cancel_does_not_hold_the_drain_past_its_deadline(make_pool, clock, monkeypatch):
    release = threading.Event()
    started = threading.Event()

    def ignores_cancel(task, cancel):
        started.set()
        release.wait(TIMEOUT)

    joins = thread_joins(monkeypatch)
    pool = make_pool(ignores_cancel, workers=2, wait=drain_waits_in_fake_time(clock))
    pool.submit("stuck", "", 0)
    assert started.wait(TIMEOUT)
    summaries = []
    drain = threading.Thread(target=lambda: summaries.append(pool.shutdown(5.0)), name="drain")
    try:
        drain.start()
        drain.join(TIMEOUT)
        assert not drain.is_alive()
    finally:
        release.set()
    [summary] = summaries
    assert summary.abandoned == ("stuck",)
    # Abandoned at its deadline, and the threads (one never returns) were not waited for past it.
    [join] = joins
    assert summary.drain_seconds + join <= 5.0


def test_a_second_shutdown_pulls_the_deadline_in(make_pool):
    gate = Gate()
    pool = make_pool(gate, workers=1)
    pool.submit("stuck", "", 0)
    assert gate.started.wait(TIMEOUT)
    pool.shutdown(timeout=3600, wait=False)  # never advanced: would wait forever
    summary = pool.shutdown(timeout=0)
    assert summary.abandoned == ("stuck",)
    gate.open()


def test_a_submission_whose_threads_fail_to_start_leaves_a_pool_that_works_and_drains(make_pool, monkeypatch):
    pool = make_pool(instant, workers=2)
    refuse_to_start_thread(monkeypatch, "workerpool-worker-2")
    with pytest.raises(RuntimeError, match="can't start"):
        pool.submit("refused", "")
    monkeypatch.undo()
    assert pool.get("refused") is None  # nothing of the failed submission is stored
    pool.submit("later", "")
    summary = pool.shutdown(timeout=TIMEOUT)
    assert summary.counts[State.DONE] == 1 and pool.get("later").state is State.DONE


def test_concurrent_submissions_each_reach_exactly_one_final_state(make_pool):
    def coin(task, cancel):
        if random.Random(f"{task.id}/{task.attempts}").random() < 0.3:
            raise RuntimeError("coin")

    log = AttemptLog()
    pool = make_pool(coin, workers=4, queue_size=32, observers=[log])
    accepted: list[str] = []
    refused = Counter()
    lock = threading.Lock()
    go = threading.Event()

    def client(n):
        assert go.wait(TIMEOUT)
        for i in range(300):
            task_id = f"task-{(n * 300 + i) % 1000}"  # ids overlap across clients
            try:
                pool.submit(task_id, "x", max_retries=2)
            except (DuplicateTask, QueueFull) as exc:
                with lock:
                    refused[type(exc).__name__] += 1
            else:
                with lock:
                    accepted.append(task_id)

    clients = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in clients:
        thread.start()
    go.set()
    for thread in clients:
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    summary = pool.shutdown(timeout=TIMEOUT)

    assert len(accepted) == len(set(accepted)) > 0
    assert refused["DuplicateTask"] > 0
    assert len(accepted) + sum(refused.values()) == 2400
    assert summary.abandoned == ()
    finals = Counter(task_id for task_id, _, state in log.events if state in (State.DONE, State.FAILED))
    assert finals == Counter(accepted)  # exactly one final state each
    counts = pool.stats().counts
    assert counts[State.DONE] + counts[State.FAILED] == len(accepted)
    assert counts[State.QUEUED] == counts[State.RUNNING] == 0


def test_stats_report_the_pool_shape(make_pool):
    pool = make_pool(instant, workers=3, queue_size=7)
    stats = pool.stats()
    assert (stats.workers, stats.queue_capacity, stats.queue_depth, stats.accepting) == (3, 7, 0, True)


@pytest.mark.parametrize(
    "kwargs",
    [{"workers": 0}, {"workers": -1}, {"queue_size": 0}, {"backoff_base": 2, "backoff_cap": 1}],
)
def test_bad_pool_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        WorkerPool(instant, **kwargs)


def test_negative_max_retries_is_refused(make_pool):
    with pytest.raises(ValueError):
        make_pool().submit("a", "", -1)


def test_after_shutdown_the_queue_is_empty(make_pool):
    never_started = make_pool(instant, workers=3)
    never_started.shutdown(timeout=0)
    assert never_started.stats().queue_depth == 0

    pool = make_pool(lambda task, cancel: cancel.wait(TIMEOUT), workers=1)
    pool.submit("running", "", 0)
    for n in range(3):
        pool.submit(f"queued{n}", "", 0)
    summary = pool.shutdown(timeout=0)
    assert len(summary.abandoned) == 4
    assert pool.stats().queue_depth == 0


def test_after_shutdown_no_retry_is_pending(make_pool):
    log = AttemptLog()
    pool = make_pool(always_fail, workers=1, backoff_base=100, backoff_cap=100, observers=[log])
    pool.submit("waiting", "", max_retries=3)
    log.wait_for("waiting", State.QUEUED)
    assert pool.stats().retries_pending == 1
    assert pool.shutdown(timeout=0).abandoned == ("waiting",)
    assert pool.stats().retries_pending == 0


# -- returned values, observers, stepping by hand ------------------------------------


@pytest.mark.parametrize(
    "returned",
    [False, 0, "ok", {"result": [1, None]}, ["\U0001f600", "\\ud800", "9" * 101, 10**99, -(10**99), 1e300]],
)
def test_a_handler_return_value_is_the_task_result(make_pool, returned):
    pool = make_pool(lambda task, cancel: returned, workers=1)
    pool.submit("a", "", max_retries=3)
    pool.shutdown(TIMEOUT)
    task = pool.get("a")
    assert (task.state, task.attempts, task.result, task.last_error) == (State.DONE, 1, returned, None)


@pytest.mark.parametrize(
    "returned, why",
    [
        ({1, 2}, "the handler returned set, which is not JSON: TypeError: Object of type set is not JSON serializable"),
        (float("nan"), "the handler returned float, which is not JSON: ValueError"),
        ("x" * 300, "the handler's result is at least 302 bytes as JSON; the limit is 256 (MAX_RESULT_BYTES)"),
        (
            ["caf\udce9.txt"],  # a file name decoded with surrogateescape
            "the handler returned list, which is not JSON clients can read: it holds a lone surrogate",
        ),
        ("caf\udce9", "the handler returned str, which is not JSON clients can read: it holds a lone surrogate"),
        (10**100, "the handler returned int, which is not JSON clients can read: it holds an integer of 101"),
        (
            {"n": -(10**100)},
            "the handler returned dict, which is not JSON clients can read: it holds an integer of 101",
        ),
    ],
)
def test_a_result_that_is_not_json_or_too_large_fails_the_task_for_good(make_pool, returned, why):
    pool = make_pool(lambda task, cancel: returned, workers=1, max_result_bytes=256)
    pool.submit("a", "", max_retries=3)
    summary = pool.shutdown(TIMEOUT)
    task = pool.get("a")
    assert (task.state, task.attempts, task.result) == (State.FAILED, 1, None)
    assert task.last_error.startswith(why)
    assert summary.abandoned == ()


@pytest.mark.parametrize(
    "fits, too_large",
    [
        ([1] * 128, [1] * 129),  # 257 and 259 bytes of compact JSON; with ", " the first was 384
        ({f"k{i:02}": 1 for i in range(32)}, {f"k{i:02}": 1 for i in range(32)} | {"a": 1}),  # 257 and 263
    ],
)
def test_the_result_limit_counts_the_compact_json_that_is_kept_and_served(make_pool, fits, too_large):
    returned = {"fits": fits, "too_large": too_large}
    assert len(json.dumps(fits, separators=(",", ":"))) == 257
    pool = make_pool(lambda task, cancel: returned[task.id], workers=1, max_result_bytes=257)
    pool.submit("fits", "", max_retries=0)
    pool.submit("too_large", "", max_retries=0)
    pool.shutdown(TIMEOUT)
    assert (pool.get("fits").state, pool.get("fits").result) == (State.DONE, fits)
    size = len(json.dumps(too_large, separators=(",", ":")))
    assert pool.get("too_large").last_error == (
        f"the handler's result is {size} bytes as JSON; the limit is 257 (MAX_RESULT_BYTES)"
    )


class _LazyMapping(dict):
    """A mapping that loads when read, as ORM rows do: its loading raises ``exc``."""

    def __init__(self, exc: type[BaseException]) -> None:
        super().__init__(a=1)
        self.exc = exc

    def items(self):
        raise self.exc("the mapping could not load")


@pytest.mark.parametrize("exc", [RuntimeError, SystemExit, KeyboardInterrupt])
def test_a_result_whose_reading_raises_fails_the_task_for_good_and_the_worker_lives_on(make_pool, exc):
    # A BaseException ended the worker thread with the task running for ever; an Exception was logged as ours.
    pool = make_pool(lambda task, cancel: {"rec": _LazyMapping(exc)} if task.id == "lazy" else "fine", workers=1)
    pool.submit("lazy", "", max_retries=3)
    pool.submit("after", "", max_retries=0)
    summary = pool.shutdown(TIMEOUT)
    lazy = pool.get("lazy")
    assert (lazy.state, lazy.attempts, lazy.result) == (State.FAILED, 1, None)
    assert lazy.last_error.startswith(
        f"the handler returned dict, which is not JSON: {exc.__name__}: the mapping could not load"
    ), lazy.last_error
    assert pool.get("after").state is State.DONE
    assert summary.abandoned == ()


def test_the_result_is_what_the_handler_returned_when_it_returned(make_pool):
    shared = {"calls": ["a"], "nested": [1]}  # a cache the handler keeps using after it returns
    pool = make_pool(lambda task, cancel: shared, workers=1, max_result_bytes=64)
    pool.submit("a", "", max_retries=0)
    pool.shutdown(TIMEOUT)
    shared["calls"].append("b")
    shared["nested"].append({1, 2})  # not JSON: kept by reference it would break every read of the task
    shared["big"] = "x" * 1000  # past the limit the result was checked against
    task = pool.get("a")
    assert (task.state, task.result) == (State.DONE, {"calls": ["a"], "nested": [1]})


def nested(depth):
    value = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_string_result_longer_than_the_limit_is_refused_from_its_length():
    why, kept = check_result("é" * 1000, 256)
    assert kept is None
    assert why == "the handler's result is at least 1002 bytes as JSON; the limit is 256 (MAX_RESULT_BYTES)"


@pytest.mark.parametrize(
    "container",
    [
        lambda huge: huge,
        lambda huge: [huge],
        lambda huge: {"page": huge},
        lambda huge: {huge: 1},  # a key is a string too
        lambda huge: [huge[:200]] * 5_000,  # each string under the limit, too long together
    ],
)
def test_a_container_holding_a_huge_string_is_refused_before_its_encoding_is_built(container):
    # json.dumps built the whole text first: 6 bytes of JSON for each "é", 60 MB for 10 MB of text.
    returned = container("é" * 1_000_000)
    tracemalloc.start()
    try:
        why, kept = check_result(returned, 256)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, peak  # the encoding of 1,000,000 "é" alone is 6,000,002 bytes
    assert kept is None
    assert why.startswith("the handler's result is at least "), why
    assert why.endswith(" bytes as JSON; the limit is 256 (MAX_RESULT_BYTES)"), why


@pytest.mark.parametrize("container", [lambda inner: [inner], lambda inner: {"k": inner}])
def test_a_result_nested_deeper_than_the_limit_fails_the_task_for_good(make_pool, container):
    deep = {"at_limit": container(nested(MAX_RESULT_DEPTH - 1)), "over": container(nested(MAX_RESULT_DEPTH))}
    pool = make_pool(lambda task, cancel: deep[task.id], workers=1, max_result_bytes=10_000)
    pool.submit("at_limit", "", max_retries=3)
    pool.submit("over", "", max_retries=3)
    pool.shutdown(TIMEOUT)
    assert (pool.get("at_limit").state, pool.get("at_limit").result) == (State.DONE, deep["at_limit"])
    over = pool.get("over")
    assert (over.state, over.attempts, over.result) == (State.FAILED, 1, None)
    assert over.last_error == f"the handler's result is nested more than {MAX_RESULT_DEPTH} levels deep"


def test_brackets_inside_strings_do_not_count_as_nesting(make_pool):
    returned = {"text": "[{" * MAX_RESULT_DEPTH + '\\"[', "rows": [[1]]}
    pool = make_pool(lambda task, cancel: returned, workers=1)
    pool.submit("a", "", max_retries=0)
    pool.shutdown(TIMEOUT)
    assert (pool.get("a").state, pool.get("a").result) == (State.DONE, returned)


@pytest.mark.parametrize(
    "returned, key",
    [({1: "a", "1": "b"}, "1"), ([(0, {True: 1, "true": 2})], "true"), ({"k": [{None: 1, "null": 2}]}, "null")],
)
def test_a_result_with_two_keys_that_are_one_in_json_fails_the_task_for_good(make_pool, returned, key):
    pool = make_pool(lambda task, cancel: returned, workers=1)
    pool.submit("a", "", max_retries=3)
    pool.shutdown(TIMEOUT)
    task = pool.get("a")
    assert (task.state, task.attempts, task.result) == (State.FAILED, 1, None)
    assert task.last_error == f'the handler\'s result has two keys that are both "{key}" in JSON'


def test_keys_that_are_not_strings_are_kept_as_json_writes_them(make_pool):
    returned = {1: "a", 2.5: ("b", {False: None}), "x": [{None: 0}]}
    pool = make_pool(lambda task, cancel: returned, workers=1)
    pool.submit("a", "", max_retries=0)
    pool.shutdown(TIMEOUT)
    task = pool.get("a")
    assert (task.state, task.result) == (State.DONE, {"1": "a", "2.5": ["b", {"false": None}], "x": [{"null": 0}]})


@pytest.mark.parametrize(
    ("text", "limit", "deeper"),
    [
        ("[]", 1, False),
        ("[[]]", 1, True),
        ('{"a":[1,{"b":[]}],"c":{}}', 4, False),
        ('{"a":[1,{"b":[]}],"c":{}}', 3, True),
        ("[[],[[]],[]]", 3, False),
        ("[[],[[[]]],[]]", 4, False),
        ("[[],[[[]]],[]]", 3, True),
        ('["[[[[", "\\"[[[", {"k]": "{{{"}]', 2, False),
        ('["[[[[", "\\"[[[", {"k]": "{{{"}]', 1, True),
        ("[" * 501 + "]" * 501, 500, True),
        ("[" * 500 + "]" * 500, 500, False),
        ("[" + "[[1],{}]," * 600 + "0]", 3, False),
        ("[" + "[[1],{}]," * 600 + "0]", 2, True),
    ],
)
def test_nesting_counts_the_lists_and_objects_around_the_deepest_value(text, limit, deeper):
    json.loads(text)  # each case is JSON
    assert nested_deeper_than(text, limit) is deeper


def test_the_nesting_check_makes_as_many_calls_for_deep_text_as_for_shallow_text():
    chain = "[" * (MAX_RESULT_DEPTH - 1) + "]" * (MAX_RESULT_DEPTH - 1)  # in a list: exactly at the limit
    deep = "[" + ",".join([chain] * 64) + "]"
    shallow = "[" + ",".join(["[]"] * (MAX_RESULT_DEPTH - 1) * 64) + "]"
    assert deep.count("[") == shallow.count("[")

    def calls(text):  # the calls into C it makes: a pass over the text per level would show as one each
        made = []
        sys.setprofile(lambda frame, event, arg: made.append(arg) if event == "c_call" else None)
        try:
            assert nested_deeper_than(text, MAX_RESULT_DEPTH) is False
        finally:
            sys.setprofile(None)
        return len(made)

    assert calls(deep) == calls(shallow) < 20


def test_a_coroutine_handler_fails_its_task_and_the_coroutine_is_closed(make_pool):
    async def forgot_this_is_async(task, cancel):
        raise AssertionError("never runs")

    pool = make_pool(forgot_this_is_async, workers=1)
    pool.submit("a", "", max_retries=3)
    pool.shutdown(TIMEOUT)  # filterwarnings=error: an unclosed coroutine would warn and fail the test
    assert "returned a coroutine" in pool.get("a").last_error


class Recorder(PoolObserver):
    def __init__(self):
        self.calls = []

    def task_queued(self, task):
        self.calls.append(("queued", task.id, task.state))

    def attempt_started(self, task):
        self.calls.append(("started", task.id, task.state, task.attempts))

    def attempt_finished(self, task, seconds):
        self.calls.append(("finished", task.id, task.state, task.attempts))

    def task_abandoned(self, task):
        self.calls.append(("abandoned", task.id, task.state))


def fail_first(task, cancel):
    if task.attempts == 1:
        raise RuntimeError("first attempt fails")


def test_observers_hear_every_change_in_order_and_a_pool_can_be_stepped_by_hand(make_pool, clock):
    recorder = Recorder()
    pool = make_pool(fail_first, threads=False, backoff_base=2.0, backoff_cap=2.0, observers=[recorder])
    pool.submit("a", "", max_retries=1)
    pool.submit("b", "", max_retries=0)
    assert pool.step() and pool.step()  # both fail: "a" will be retried, "b" has no retry left
    assert not pool.step()  # nothing ready: "a" waits out its backoff
    assert 0 < pool.store.seconds_until_due() <= 2.0
    clock.advance(2.0)
    assert pool.store.seconds_until_due() == 0
    assert pool.step()
    assert pool.store.seconds_until_due() is None
    pool.submit("c", "", max_retries=0)
    summary = pool.shutdown(0)
    assert summary.abandoned == ("c",)
    assert not pool.started
    assert recorder.calls == [
        ("queued", "a", State.QUEUED),
        ("queued", "b", State.QUEUED),
        ("started", "a", State.RUNNING, 1),
        ("finished", "a", State.QUEUED, 1),
        ("started", "b", State.RUNNING, 1),
        ("finished", "b", State.FAILED, 1),
        ("started", "a", State.RUNNING, 2),
        ("finished", "a", State.DONE, 2),
        ("queued", "c", State.QUEUED),
        ("abandoned", "c", State.FAILED),
    ]


@pytest.mark.parametrize("error", [RuntimeError("observer bug"), SystemExit("observer gave up")], ids=repr)
def test_a_batch_is_heard_once_by_tasks_queued_and_task_by_task_by_default(make_pool, error):
    class Batches(PoolObserver):
        def __init__(self):
            self.batches = []

        def tasks_queued(self, tasks):
            self.batches.append([task.id for task in tasks])

    class FailsOnB(Recorder):
        def task_queued(self, task):
            if task.id == "b":
                raise error
            super().task_queued(task)

    batches, recorder = Batches(), FailsOnB()
    pool = make_pool(threads=False, observers=[batches, recorder])
    pool.submit_many([TaskSpec("a"), TaskSpec("a"), TaskSpec("b"), TaskSpec("c")])  # the second "a": a duplicate
    pool.submit("d")
    assert batches.batches == [["a", "b", "c"], ["d"]]  # the accepted ones, in order, one call per step
    # The default hears each task; one failing call is logged and the batch's other tasks are still heard.
    assert recorder.calls == [("queued", task_id, State.QUEUED) for task_id in ("a", "c", "d")]


def test_ctrl_c_in_an_observer_on_the_submitting_thread_still_stops_it(make_pool):
    class Interrupted(PoolObserver):
        def task_queued(self, task):
            raise KeyboardInterrupt

    pool = make_pool(threads=False, observers=[Interrupted()])
    with pytest.raises(KeyboardInterrupt):
        pool.submit("a")
    with pytest.raises(KeyboardInterrupt):
        pool.submit_many([TaskSpec("b")])


def test_step_refuses_a_pool_with_threads(make_pool):
    with pytest.raises(RuntimeError, match="threads=False"):
        make_pool().step()


def test_task_log_lines_carry_the_task_and_request_ids(make_pool, caplog):
    caplog.set_level(logging.DEBUG, logger="workerpool")
    pool = make_pool(always_fail, threads=False)
    pool.submit("a", "", max_retries=0, request_id="req-1")
    pool.step()
    records = [r for r in caplog.records if r.name == "workerpool.pool"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("DEBUG", "task a queued"),
        ("DEBUG", "task a attempt 1 started"),
        ("WARNING", "task a failed after 1 attempt(s): RuntimeError: boom"),
    ]
    assert {(r.task_id, r.request_id) for r in records} == {("a", "req-1")}


def fork_and_reap(task, cancel):
    """A handler that forks its process, as multiprocessing's "fork" start method does; the child ends at once."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)


def test_a_handler_that_forks_its_process_is_warned_of_once_naming_its_task(make_pool, caplog, monkeypatch):
    # The children of a process pool forked from a threaded process hang on locks other threads held.
    monkeypatch.setattr(forks, "_warned", False)
    caplog.set_level(logging.WARNING, logger="workerpool")
    fork_and_reap(None, None)  # outside an attempt: not the handler's doing
    pool = make_pool(fork_and_reap, threads=False)
    pool.submit("forks-1", "", 0, request_id="req-f")
    pool.submit("forks-2", "", 0)
    while pool.step():
        pass
    assert pool.get("forks-2").state is State.DONE
    records = [r for r in caplog.records if r.name == "workerpool.forks"]
    assert [(r.levelname, r.task_id, r.request_id) for r in records] == [("WARNING", "forks-1", "req-f")]
    assert 'multiprocessing.get_context("forkserver")' in records[0].getMessage()


def test_a_handler_that_runs_a_program_is_not_warned_of(make_pool, caplog, monkeypatch):
    def run_program(task, cancel):
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=TIMEOUT)

    monkeypatch.setattr(forks, "_warned", False)
    caplog.set_level(logging.WARNING, logger="workerpool")
    pool = make_pool(run_program, threads=False)
    pool.submit("runs", "", 0)
    pool.step()
    assert pool.get("runs").state is State.DONE
    assert [r for r in caplog.records if r.name == "workerpool.forks"] == []


def test_a_success_logs_at_debug_and_a_retry_or_failure_at_info_or_above(make_pool, caplog):
    failures = iter([RuntimeError("flaky")])

    def flaky(task, cancel):
        if task.id == "retried" and (error := next(failures, None)):
            raise error

    caplog.set_level(logging.INFO, logger="workerpool")
    pool = make_pool(flaky, threads=False, backoff_base=0.0, backoff_cap=0.0)
    pool.submit("quiet", "", 0, request_id="req-q")
    pool.submit("retried", "", 1, request_id="req-r")
    while pool.step():
        pass
    assert [(r.levelname, r.getMessage().split(";")[0], r.request_id) for r in caplog.records] == [
        ("INFO", "task retried attempt 1 failed (RuntimeError: flaky)", "req-r")
    ]
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="workerpool")
    pool.submit("loud", "", 0, request_id="req-l")
    pool.step()
    assert ("DEBUG", "task loud done after 1 attempt(s)", "req-l") in [
        (r.levelname, r.getMessage(), r.request_id) for r in caplog.records
    ]


def test_debug_lines_follow_the_logger_as_its_level_changes_under_a_running_pool(make_pool, caplog, monkeypatch):
    pool = make_pool(threads=False)

    def lines(task_id):
        caplog.clear()
        pool.submit(task_id)
        pool.step()
        return [r.getMessage() for r in caplog.records if r.name == "workerpool.pool"]

    def debug(task_id):
        steps = ["queued", "attempt 1 started", "done after 1 attempt(s)"]
        return [f"task {task_id} {step}" for step in steps]

    caplog.set_level(logging.DEBUG, logger="workerpool")
    assert lines("a") == debug("a")
    caplog.set_level(logging.INFO, logger="workerpool")
    assert lines("b") == []
    caplog.set_level(logging.DEBUG, logger="workerpool")
    assert lines("c") == debug("c")
    logging.disable(logging.DEBUG)
    try:
        assert lines("d") == []
    finally:
        logging.disable(logging.NOTSET)
    assert lines("e") == debug("e")
    monkeypatch.setattr(logging.getLogger("workerpool.pool"), "disabled", True)  # as dictConfig leaves it
    assert lines("f") == []


# -- bookkeeping that must hold whatever the handler and the observers do --------------


class Unprintable(Exception):
    def __str__(self):
        raise ValueError("no message for you")


class NotAString(Exception):
    def __str__(self):
        return 42  # str() raises TypeError


@pytest.mark.parametrize("error", [Unprintable, NotAString])
def test_an_exception_that_cannot_describe_itself_still_ends_the_attempt_and_is_retried(make_pool, error):
    def raises(task, cancel):
        raise error()

    pool = make_pool(raises, workers=1)
    pool.submit("a", "", max_retries=1)
    summary = pool.shutdown(TIMEOUT)
    task = pool.get("a")
    assert (task.state, task.attempts) == (State.FAILED, 2)
    assert task.last_error.startswith(f"{error.__name__} (its message could not be read: ")
    assert summary.abandoned == ()


@pytest.mark.parametrize("store_name", ["memory", "sqlite", "redis"])
def test_an_error_with_a_lone_surrogate_is_recorded_escaped_and_retried(make_pool, clock, tmp_path, store_name):
    # A message naming a file whose name was decoded with surrogateescape holds one: it has no UTF-8 form,
    # which the SQLite and Redis stores need, and its task failed for good where the memory store retried it.
    name = b"caf\xe9.txt".decode(errors="surrogateescape")

    def raises(task, cancel):
        raise RuntimeError(f"cannot read {name}")

    stores = {
        "memory": lambda: MemoryStore(64, clock=clock.time),
        "sqlite": lambda: SqliteStore(tmp_path / "tasks.db", clock=clock.time),
        "redis": lambda: RedisStore(
            shared_server().client(), capacity=64, ttl=3600.0, max_finished=100, prefix=f"test-{uuid.uuid4().hex}",
            clock=clock.time,
        ),
    }  # fmt: skip
    store = stores[store_name]()
    pool = make_pool(raises, store=store, threads=False)
    pool.submit("a", "", max_retries=1)
    assert pool.step()
    assert pool.step()
    task = pool.get("a")
    assert (task.state, task.attempts) == (State.FAILED, 2)
    assert task.last_error == "RuntimeError: cannot read caf\\udce9.txt"
    task.last_error.encode()
    store.close()


def test_the_drain_summary_counts_every_task_the_pool_finished_not_what_is_retained(make_pool):
    gate = Gate()
    pool = make_pool(gate, workers=1, state_max_tasks=1)
    for n in range(5):
        pool.submit(f"t{n}", "", 0)
    gate.wait_started()
    pool.shutdown(TIMEOUT, wait=False)
    gate.open()
    summary = pool.shutdown()
    assert summary.counts[State.DONE] == 5
    assert pool.stats().counts[State.DONE] == 1  # retention kept one


def test_a_cancel_the_store_made_before_the_drain_summed_up_is_in_the_summary():
    # Counted only once the store's step returned, after the drain had summed up: counted nowhere.
    made, answer = threading.Event(), threading.Event()

    class SlowToAnswerCancel(MemoryStore):
        def cancel(self, task_id):
            outcome = super().cancel(task_id)
            made.set()
            answer.wait(WAIT_S)  # as a thread the scheduler left waiting would
            return outcome

    drain = []

    def wait(event, timeout):
        if threading.current_thread() in drain:  # the drain waits for the cancel: it answers now
            answer.set()
        return event.wait(timeout)

    pool = WorkerPool(instant, workers=1, store=SlowToAnswerCancel(8), wait=wait)
    pool.submit("later", "", delay=60)
    canceller = threading.Thread(target=pool.cancel, args=("later",))
    canceller.start()
    assert made.wait(WAIT_S)
    drain.append(threading.current_thread())
    summary = pool.shutdown(timeout=WAIT_S)  # nothing is left to run: the drain does not wait for the deadline
    answer.set()
    canceller.join(WAIT_S)
    assert pool.get("later").state is State.CANCELLED
    assert (summary.counts[State.CANCELLED], summary.abandoned) == (1, ())


def test_the_drain_waits_for_cancels_in_the_store_no_longer_than_its_deadline_and_counts_those_left(caplog):
    # A cancel's store step that hangs (a paused Redis) held the drain a second past SHUTDOWN_TIMEOUT_S,
    # and the warning counted every cancel pending when the wait began, those counted since included.
    made = {"first": threading.Event(), "second": threading.Event()}
    answer = {"first": threading.Event(), "second": threading.Event()}

    class HangingCancel(MemoryStore):
        def cancel(self, task_id):
            outcome = super().cancel(task_id)
            made[task_id].set()
            answer[task_id].wait(WAIT_S)
            return outcome

    now, drain, waits = [0.0], [], []

    def wait(event, timeout):  # the drain's waits pass in fake time; the first lets one cancel answer
        if threading.current_thread() not in drain or timeout is None:
            return event.wait(WAIT_S if timeout is None else timeout)
        waits.append(timeout)
        if len(waits) == 1:
            answer["first"].set()
            return event.wait(WAIT_S)  # set once that cancel is counted
        now[0] += timeout
        return event.is_set()

    pool = WorkerPool(instant, workers=1, store=HangingCancel(8), wait=wait, monotonic=lambda: now[0])
    cancellers = []
    for task_id in ("first", "second"):
        pool.submit(task_id, "", delay=60)
        cancellers.append(threading.Thread(target=pool.cancel, args=(task_id,)))
        cancellers[-1].start()
        assert made[task_id].wait(WAIT_S)
    drain.append(threading.current_thread())
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        summary = pool.shutdown(timeout=0.5)
    answer["second"].set()
    for canceller in cancellers:
        canceller.join(WAIT_S)
    assert summary.drain_seconds == 0.5  # the deadline, not a second past its start
    assert summary.counts[State.CANCELLED] == 1
    assert "shutdown: 1 cancel(s) still in the store" in caplog.text


def test_a_task_is_heard_queued_before_its_first_attempt_starts(make_pool):
    # The observer is slow to hear "queued"; a worker that took the task at once must not
    # be heard starting it meanwhile. (The observer gives up waiting after a while, so a
    # pool that gets the order wrong fails here instead of hanging.)
    heard = []
    started = threading.Event()

    class SlowToHearQueued(PoolObserver):
        def task_queued(self, task):
            started.wait(0.5)
            heard.append("queued")

        def attempt_started(self, task):
            heard.append("started")
            started.set()

    pool = make_pool(instant, workers=1, observers=[SlowToHearQueued()])
    pool.start()
    pool.submit("a", "", 0)
    pool.shutdown(TIMEOUT)
    assert heard == ["queued", "started"]


def test_a_task_claimed_with_the_last_end_is_heard_queued_before_its_attempt_starts(make_pool):
    # As above, for a task a worker claims in the store step that ends its last attempt.
    heard = []
    first_started, release, next_started = threading.Event(), threading.Event(), threading.Event()

    class SlowToHearNext(PoolObserver):
        def tasks_queued(self, tasks):
            if tasks[0].id == "next":
                release.set()  # "first" ends now, and its worker claims "next" in the same step
                next_started.wait(0.5)
            heard.extend(("queued", task.id) for task in tasks)

        def attempt_started(self, task):
            heard.append(("started", task.id))
            (first_started if task.id == "first" else next_started).set()

    def handler(task, cancel):
        if task.id == "first":
            release.wait(WAIT_S)

    pool = make_pool(handler, workers=1, observers=[SlowToHearNext()])
    pool.submit("first")
    assert first_started.wait(WAIT_S)
    pool.submit("next")
    pool.shutdown(TIMEOUT)
    assert heard == [("queued", "first"), ("started", "first"), ("queued", "next"), ("started", "next")]


class _Marks(dict):
    """The pool's in-flight marks, recording an id taken out and put back (missing meanwhile)."""

    def __init__(self):
        super().__init__()
        self.taken: set[str] = set()
        self.put_back: list[str] = []

    def pop(self, key, *default):
        self.taken.add(key)
        return super().pop(key, *default)

    def __delitem__(self, key):
        self.taken.add(key)
        super().__delitem__(key)

    def __setitem__(self, key, value):
        if key in self.taken and key not in self:
            self.put_back.append(key)
        super().__setitem__(key, value)


def test_an_id_two_submissions_mark_is_never_missing_while_one_of_them_still_has_to_tell(make_pool):
    # A worker reads the marks without _order_lock (see WorkerPool._register): an id whose
    # submission has not told the observers yet must stay marked at every instant, also while
    # a second submission of it (a duplicate) leaves.
    heard, told = threading.Event(), threading.Event()

    class SlowToHearA(PoolObserver):
        def tasks_queued(self, tasks):
            if [task.id for task in tasks] == ["a"]:
                heard.set()
                told.wait(WAIT_S)

    pool = make_pool(threads=False, observers=[SlowToHearA()])
    pool._in_flight = marks = _Marks()
    first = threading.Thread(target=pool.submit, args=("a", ""))
    first.start()
    assert heard.wait(WAIT_S)  # "a" is queued, its submission not done telling
    duplicate, b = pool.submit_many([TaskSpec("a", ""), TaskSpec("b", "")])
    assert isinstance(duplicate, DuplicateTask) and b.id == "b"
    assert "a" in marks  # still marked for the first submission
    told.set()
    first.join(WAIT_S)
    assert marks.put_back == [] and marks == {}


def test_a_failed_attempt_logs_its_traceback_at_debug_only(make_pool, caplog):
    def deep(task, cancel):
        raise KeyError("inner detail")

    caplog.set_level(logging.INFO, logger="workerpool")
    pool = make_pool(deep, threads=False)
    pool.submit("info", "", 0)
    pool.step()
    caplog.set_level(logging.DEBUG, logger="workerpool")
    pool.submit("debug", "", 0)
    pool.step()
    failures = {r.task_id: r for r in caplog.records if "failed after" in r.getMessage()}
    assert failures["info"].exc_info is None
    assert failures["debug"].exc_info[1].args == ("inner detail",)
    assert "Traceback" not in pool.get("debug").last_error


class FinishFails(MemoryStore):
    """A store whose ``finish`` is unavailable the first ``failures[id]`` times for a task."""

    def __init__(self, failures, **options):
        super().__init__(**options)
        self.failures = failures
        self.tries = Counter()

    def finish(self, task_id, *args, **kwargs):
        self.tries[task_id] += 1
        if self.tries[task_id] <= self.failures.get(task_id, 0):
            raise StoreUnavailable("the store is down")
        return super().finish(task_id, *args, **kwargs)


def test_an_end_the_store_cannot_record_is_recorded_again_and_the_worker_lives_on(make_pool, clock, caplog):
    def wait(event, timeout):  # the pause between tries passes at once on the fake clock
        clock.advance(timeout)
        return event.is_set()

    # "long" meets an outage of 100 s, more than three leases: its end is kept all the same.
    store = FinishFails({"brief": 2, "long": 100}, clock=clock.time)
    pool = make_pool(lambda task, cancel: {"ran": task.id}, store=store, threads=False, lease=30.0, wait=wait)
    for task_id in ("brief", "long", "after"):
        pool.submit(task_id, "", 0)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        assert pool.step() and pool.step() and pool.step()
    # Recorded on the third try, as it ended: done after one attempt.
    assert (pool.get("brief").state, pool.get("brief").attempts, store.tries["brief"]) == (State.DONE, 1, 3)
    # Tried once a second until the store took it, with its result: not left to the lease as lost.
    long = pool.get("long")
    assert (long.state, long.attempts, long.result, store.tries["long"]) == (State.DONE, 1, {"ran": "long"}, 101)
    assert pool.get("after").state is State.DONE
    # One line when it first failed, then one a lease's length apart, not one a second.
    told = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task long attempt 1 ended")]
    assert [m.split(" (")[0] for m in told] == [
        "task long attempt 1 ended, but the store is unavailable",
        "task long attempt 1 ended 30 s ago, and the store is still unavailable",
        "task long attempt 1 ended 60 s ago, and the store is still unavailable",
        "task long attempt 1 ended 90 s ago, and the store is still unavailable",
    ]


class FileReplaced(MemoryStore):
    """A store cut off from its file (a SQLite -shm removed while open): it takes no write until a restart."""

    def __init__(self, **options):
        super().__init__(**options)
        self.tries = 0

    def finish_and_claim(self, *args, **kwargs):
        return self.finish(), None

    def finish(self, *args, **kwargs):
        self.tries += 1
        raise StoreFileReplaced("the task file's -shm file was removed while this process had it open")


def test_an_end_a_store_cut_off_from_its_file_refuses_is_not_written_again(make_pool, clock, caplog):
    def wait(event, timeout):  # the pause between tries passes at once on the fake clock
        clock.advance(timeout)
        return event.is_set()

    store = FileReplaced(clock=clock.time)
    pool = make_pool(store=store, threads=False, lease=30.0, wait=wait)
    pool.submit("a", "", 0)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        assert pool.step()
    # Tried once: nothing changes until a restart, and the lease settles the attempt.
    assert store.tries == 1 and pool.running() == []
    assert "task a attempt 1: its end could not be recorded" in caplog.text
    assert "recording it again" not in caplog.text


class FinishFailsUntilRecovered(SqliteStore):
    """A shared store whose ``finish`` is unavailable until another process has recovered the attempt,
    ``after`` tries in (a Redis reachable from that process, not from this one)."""

    def __init__(self, path, *, after, **options):
        super().__init__(path, **options)
        self.after = after
        self.tries = 0

    def finish_and_claim(self, task_id, attempt, owner, **kwargs):
        return self.finish(task_id, attempt, owner, **kwargs), None

    def finish(self, task_id, attempt, owner, **kwargs):
        self.tries += 1
        if self.tries <= self.after:
            if self.tries == self.after:  # the other process sweeps the lease this one could not renew
                self.recover(lambda task: None)
            raise StoreUnavailable("the store is down")
        kwargs.pop("lease_until", None)
        return super().finish(task_id, attempt, owner, **kwargs)


def test_an_end_recorded_again_after_another_process_recovered_the_attempt_is_dropped(
    make_pool, clock, tmp_path, caplog
):
    def wait(event, timeout):  # the pause between tries passes at once on the fake clock
        clock.advance(timeout)
        return event.is_set()

    store = FinishFailsUntilRecovered(tmp_path / "tasks.db", after=40, clock=clock.time)
    try:
        pool = make_pool(store=store, threads=False, lease=30.0, wait=wait)
        pool.submit("a", "", 0)
        with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
            assert pool.step()
        # The recovery stands: the late end neither overwrites it nor is passed off as recorded.
        task = pool.get("a")
        assert (task.state, task.last_error, task.result) == (State.FAILED, LOST_EXPIRED, None)
        assert "task a attempt 1 ended after it was abandoned or its lease recovered; result dropped" in caplog.text
        assert store.tries == 41
    finally:
        store.close()


class FinishNotSynced(MemoryStore):
    """A store whose ``finish`` writes the end but fails to sync it, once per task."""

    def __init__(self, **options):
        super().__init__(**options)
        self.tries = Counter()

    def finish(self, task_id, *args, **kwargs):
        self.tries[task_id] += 1
        ended = super().finish(task_id, *args, **kwargs)
        if self.tries[task_id] == 1:
            raise StoreNotSynced("syncing the WAL failed: [Errno 5] Input/output error", ended)
        return ended


@pytest.mark.parametrize("outage", ["recorded again", "not synced"])
def test_a_failed_attempt_whose_end_met_an_unavailable_store_is_logged_and_counted_once(
    make_pool, clock, caplog, outage
):
    def wait(event, timeout):  # the pause between tries passes at once on the fake clock
        clock.advance(timeout)
        return event.is_set()

    caplog.set_level(logging.INFO, logger="workerpool")
    if outage == "recorded again":
        store = FinishFails({"a": 1, "b": 2}, clock=clock.time)
    else:
        store = FinishNotSynced(clock=clock.time)
    log = AttemptLog()
    pool = make_pool(always_fail, store=store, threads=False, lease=30.0, wait=wait, observers=[log])
    pool.submit("a", "", 1)  # its first end is a retry, written again (or not synced)
    pool.submit("b", "", 0)  # its only end is its failure
    while pool.step():
        pass
    assert (pool.get("a").state, pool.get("a").attempts) == (State.FAILED, 2)
    assert (pool.get("b").state, pool.get("b").attempts) == (State.FAILED, 1)
    # Each attempt heard once by the observers (metrics, dashboard), with what the store recorded.
    assert sorted(log.events) == [("a", 1, State.QUEUED), ("a", 2, State.FAILED), ("b", 1, State.FAILED)]
    messages = [r.getMessage() for r in caplog.records]
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert not [m for m in messages if "result dropped" in m]
    assert sum("attempt 1 failed" in m and "retry 1 of 1" in m for m in messages) == 1
    assert sum("task b failed after 1 attempt(s)" in m for m in messages) == 1


class EndAndClaimFails(MemoryStore):
    """A store whose ``finish_and_claim`` is unavailable the first ``failures`` times; it records, for each
    task it then claims, how long the lease it was given had left."""

    def __init__(self, failures, **options):
        super().__init__(**options)
        self.failures = failures
        self.leases_left = {}

    def finish_and_claim(self, task_id, attempt, owner, **kwargs):
        if self.failures:
            self.failures -= 1
            raise StoreUnavailable("the store is down")
        ended, claimed = super().finish_and_claim(task_id, attempt, owner, **kwargs)
        if claimed is not None:
            self.leases_left[claimed.id] = kwargs["lease_until"] - self._clock()
        return ended, claimed


def test_an_end_recorded_again_claims_the_next_task_with_a_whole_lease(make_pool, clock):
    def wait(event, timeout):  # the pause between tries passes at once on the fake clock
        if timeout is None:
            return event.wait()
        clock.advance(timeout)
        return event.is_set()

    store = EndAndClaimFails(3, clock=clock.time)
    log = AttemptLog()
    pool = make_pool(store=store, workers=1, lease=30.0, wait=wait, observers=[log])
    pool.submit_many([TaskSpec("first"), TaskSpec("second")])  # one step: "first" ends with "second" queued
    log.wait_for("second", State.DONE)
    # The end of "first" was written on the fourth try, three seconds after it ended: the lease of
    # "second" runs from that try, not from the first (27 s left: another process could recover it early).
    assert store.leases_left == {"second": 30.0}
    assert pool.get("first").attempts == pool.get("second").attempts == 1


class EndFailsWithABug(MemoryStore):
    """A store whose writes of an attempt's end (``finish_and_claim``, ``finish``) raise an unexpected error
    the first ``failures`` times: a bug, not an outage."""

    def __init__(self, failures, **options):
        super().__init__(**options)
        self.failures = failures

    def _fail(self):
        if self.failures:
            self.failures -= 1
            raise KeyError("bug")

    def finish_and_claim(self, *args, **kwargs):
        self._fail()
        return super().finish_and_claim(*args, **kwargs)

    def finish(self, *args, **kwargs):
        self._fail()
        return super().finish(*args, **kwargs)


def threads_that_died(monkeypatch):
    """The threads that end with an exception from now on (names and exceptions), read by ``threading.excepthook``."""
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append((args.thread.name, repr(args.exc_value))))
    return died


def test_an_end_the_store_fails_to_record_with_a_bug_is_recorded_as_a_failure(make_pool, clock, monkeypatch):
    died = threads_that_died(monkeypatch)
    log = AttemptLog()
    pool = make_pool(store=EndFailsWithABug(1, clock=clock.time), workers=1, observers=[log])
    pool.submit_many([TaskSpec("a", max_retries=0), TaskSpec("b")])
    log.wait_for("b", State.DONE)
    a = pool.get("a")
    assert (a.state, a.last_error) == (State.FAILED, "the attempt's end could not be recorded: KeyError: 'bug'")
    assert died == []


def test_a_worker_lives_on_when_the_store_fails_an_attempts_end_twice_with_a_bug(make_pool, clock, monkeypatch, caplog):
    # Its end, then its failure: neither is written. The worker thread ended with the second error,
    # for good: the pool ran one worker short (none at all with one worker), its task running for ever.
    died = threads_that_died(monkeypatch)
    log = AttemptLog()
    pool = make_pool(store=EndFailsWithABug(2, clock=clock.time), workers=1, observers=[log])
    with caplog.at_level(logging.ERROR, logger="workerpool.pool"):
        pool.submit_many([TaskSpec("a"), TaskSpec("b")])
        log.wait_for("b", State.DONE)
    assert died == []
    assert pool.get("a").state is State.RUNNING  # until the drain abandons it: the store took no end of it
    told = [r for r in caplog.records if r.getMessage().startswith("task a attempt 1: its failure")]
    assert [r.exc_info[1].args for r in told] == [("bug",)]
    assert pool.shutdown(timeout=0).abandoned == ("a",)


class StoreDown(MemoryStore):
    """A store that takes tasks but can record no attempt's end and abandon nothing (Redis gone)."""

    def __init__(self, **options):
        super().__init__(**options)
        self.tries = 0

    def finish(self, *args, **kwargs):
        self.tries += 1
        raise StoreUnavailable("the store is down")

    def finish_and_claim(self, *args, **kwargs):
        return None, self.finish()

    def abandon(self, reason, *, owner):
        raise StoreUnavailable("the store is down")


def test_a_retry_whose_end_the_store_cannot_record_holds_the_drain_no_longer_than_its_deadline(make_pool, clock):
    worker_waits, workers = threading.Event(), set()

    def wait(event, timeout):
        if threading.current_thread().name.startswith("workerpool-worker"):  # the pause between two tries
            workers.add(threading.current_thread())
            worker_waits.set()
            if event.wait(0.005):
                return True
            clock.advance(timeout)  # each try a fake second later
            return False
        return clock.wait(event, timeout)

    store = StoreDown(clock=clock.time)
    pool = make_pool(always_fail, store=store, workers=1, lease=30.0, wait=wait)
    pool.submit("a", "", 3)  # its first attempt fails and its end cannot be recorded: tried once a second
    assert worker_waits.wait(TIMEOUT)
    summary = pool.shutdown(5.0)
    # The drain ended at its deadline, not when the worker gave up after a lease's length (30 s). The
    # worker's fake second passes every 5 ms of real time: the bound leaves a loaded machine 25 of them.
    assert 5.0 <= summary.drain_seconds < 30.0
    assert summary.abandoned == ()  # (the store could not abandon it either: the lease settles it)
    # ...and then the worker stopped trying at once, and exited.
    [worker] = workers
    worker.join(TIMEOUT)
    assert not worker.is_alive()
    assert store.tries < 30  # it did not go on trying for the lease's 30 s


class StorePausedAtShutdown(SqliteStore):
    """A shared store that stops answering once ``down`` is set: the drain's steps (abandon, counts, wake)
    hang until ``resume`` is set, as on a paused Redis or a locked SQLite file (``paused``), or are refused
    at once, as by a Redis that is gone; the workers' steps are refused at once either way."""

    def __init__(self, path, *, paused, **options):
        super().__init__(path, **options)
        self.paused = paused
        self.down, self.resume = threading.Event(), threading.Event()

    def _unavailable(self):
        if self.down.is_set():
            if self.paused:
                self.resume.wait(TIMEOUT)
            raise StoreUnavailable("redis: Timeout (no answer within the socket timeout)")

    def _refused(self):
        if self.down.is_set():
            raise StoreUnavailable("redis: Error 111 connecting. Connection refused.")

    def abandon(self, reason, *, owner):
        self._unavailable()
        return super().abandon(reason, owner=owner)

    def stats(self):
        self._unavailable()
        return super().stats()

    def unfinished(self, owner=None):
        self._unavailable()
        return super().unfinished(owner)

    def wake(self):
        self._unavailable()
        super().wake()

    def finish(self, *args, **kwargs):
        self._refused()
        return super().finish(*args, **kwargs)

    def finish_and_claim(self, *args, **kwargs):
        self._refused()
        return super().finish_and_claim(*args, **kwargs)

    def renew(self, *args, **kwargs):
        self._refused()
        return super().renew(*args, **kwargs)

    def cancel_requested(self, task_ids):
        self._refused()
        return super().cancel_requested(task_ids)

    def recover(self, *args, **kwargs):
        self._refused()
        return super().recover(*args, **kwargs)


@pytest.mark.parametrize("paused", [True, False], ids=["store-paused", "store-refusing"])
def test_a_drain_holds_its_deadline_and_says_what_it_left_to_leases_when_the_store_is_unavailable(
    make_pool, clock, tmp_path, caplog, monkeypatch, paused
):
    store = StorePausedAtShutdown(tmp_path / "tasks.db", paused=paused, clock=clock.time)
    started = threading.Semaphore(0)

    def handler(task, cancel):  # runs until told to stop
        started.release()
        cancel.wait(TIMEOUT)

    pool = make_pool(handler, store=store, workers=2, lease=30.0, wait=drain_waits_in_fake_time(clock))
    joins = thread_joins(monkeypatch)
    pool.submit_many([TaskSpec("a"), TaskSpec("b")])
    assert started.acquire(timeout=TIMEOUT) and started.acquire(timeout=TIMEOUT)
    store.down.set()
    summaries = []
    drain = threading.Thread(target=lambda: summaries.append(pool.shutdown(5.0)), name="drain")
    try:
        with caplog.at_level(logging.INFO, logger="workerpool.pool"):
            drain.start()
            drain.join(TIMEOUT)
            assert not drain.is_alive(), "the drain waited on the store past its deadline"
    finally:
        store.down.clear()
        store.resume.set()
        drain.join(TIMEOUT)
        store.close()
    [summary] = summaries
    # It ended by its deadline and the store's grace (1 s), though the store never answered.
    assert 5.0 <= summary.drain_seconds <= 5.0 + DRAIN_STORE_GRACE_S
    # Nor were its threads (blocked in the paused store) waited for past that grace.
    [join] = joins
    assert summary.drain_seconds + join <= 5.0 + DRAIN_STORE_GRACE_S
    # The two attempts it ran are neither hidden nor passed off as abandoned: the leases settle them.
    assert summary.abandoned == () and summary.left_to_leases == 2 and summary.counts[State.RUNNING] == 2
    assert "draining 2 running attempt(s)" in caplog.text
    assert describe(summary).endswith("0 abandoned; 2 attempt(s) left to their leases: the store was unavailable")
    # Nor is the queued count, which the store could not give, passed off as nothing queued.
    assert not summary.queued_counted
    assert "; queued unknown (the store could not count them), 2 running, " in describe(summary)


def test_shutdown_with_a_shared_store_stops_the_lease_thread_at_once(make_pool, clock, tmp_path):
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    lease_thread_waits = threading.Event()

    def wait(event, timeout):
        if threading.current_thread().name == "workerpool-leases":
            lease_thread_waits.set()
        return clock.wait(event, timeout)  # fake time never advances: only the event ends this wait

    pool = make_pool(store=store, workers=1, wait=wait)
    before = set(threading.enumerate())
    pool.start()
    assert lease_thread_waits.wait(TIMEOUT)
    [leases] = [t for t in set(threading.enumerate()) - before if t.name == "workerpool-leases"]
    pool.shutdown(timeout=TIMEOUT)
    assert not leases.is_alive()  # shutdown woke its wait and joined it
    store.close()


def test_a_pool_stopping_with_a_shared_store_claims_no_more_tasks(make_pool, clock, tmp_path):
    # Its queued tasks are left to the other processes: claiming on, a stopping instance took them for its
    # whole drain, and those still running at the deadline were abandoned where a live instance would run them.
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    gate, ran = Gate(), []

    def handler(task, cancel):
        ran.append(task.id)
        gate(task, cancel)

    pool = make_pool(handler, store=store, workers=1)
    for task_id in ("t0", "t1", "t2"):
        pool.submit(task_id, "")
    gate.wait_started()
    pool.shutdown(timeout=TIMEOUT, wait=False)
    gate.open()
    summary = pool.shutdown(timeout=TIMEOUT)
    assert ran == ["t0"]
    assert [store.get(task_id).state for task_id in ("t0", "t1", "t2")] == [State.DONE, State.QUEUED, State.QUEUED]
    assert summary.abandoned == ()
    store.close()


class _HeldAdmissions(SqliteStore):
    """Holds the admission of task "a" and of task "b" until its gate opens; tells when each began."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.began = {task_id: threading.Event() for task_id in ("a", "b")}
        self.gates = {task_id: threading.Event() for task_id in ("a", "b")}

    def admit(self, tasks):
        task_id = tasks[0].id
        self.began[task_id].set()
        assert self.gates[task_id].wait(TIMEOUT)
        return super().admit(tasks)


def test_a_drain_past_its_deadline_waits_only_for_the_submissions_under_way_then(make_pool, clock, tmp_path):
    # A shared store admits while its pool drains. While submissions overlapped (steady traffic on a slow store),
    # one was always under way, and the drain, which waited for none to be left, outlasted its deadline and a
    # second signal (24 s past SHUTDOWN_TIMEOUT_S=1 with a SQLite file locked by another program).
    store = _HeldAdmissions(tmp_path / "tasks.db", clock=clock.time)
    drain_waits = threading.Event()

    def wait(event, timeout):
        if threading.current_thread().name == "drain":  # past its deadline (0) from the start
            drain_waits.set()
        return clock.wait(event, timeout)  # fake time stands still: the store's grace does not run out

    pool = make_pool(store=store, workers=1, wait=wait)
    answers = {}
    submitters = {
        task_id: threading.Thread(target=lambda task_id=task_id: answers.setdefault(task_id, pool.submit(task_id, "")))
        for task_id in ("a", "b")
    }
    submitters["a"].start()
    assert store.began["a"].wait(TIMEOUT)
    summaries = []
    drain = threading.Thread(target=lambda: summaries.append(pool.shutdown(timeout=0)), name="drain")
    drain.start()
    assert drain_waits.wait(TIMEOUT)  # past its deadline, for "a"
    submitters["b"].start()
    assert store.began["b"].wait(TIMEOUT)
    store.gates["a"].set()
    drain.join(TIMEOUT)
    drain_ended = not drain.is_alive()
    store.gates["b"].set()
    for submitter in submitters.values():
        submitter.join(TIMEOUT)
    drain.join(TIMEOUT)
    assert drain_ended  # "b", begun past the deadline, was not waited for
    assert answers["a"].state is answers["b"].state is State.QUEUED  # both admitted, left to other processes
    store.close()


def test_a_drain_gives_a_submission_held_in_a_shared_store_no_more_than_the_stores_grace(
    make_pool, clock, tmp_path, caplog
):
    # A paused Redis holds a submission for its 5 s socket timeout: waited for past the deadline, it held
    # the drain until gunicorn's SIGKILL (SHUTDOWN_TIMEOUT_S + 5 s), and the summary was never written.
    store = _HeldAdmissions(tmp_path / "tasks.db", clock=clock.time)
    pool = make_pool(store=store, workers=1, wait=drain_waits_in_fake_time(clock))
    answers = {}
    submitter = threading.Thread(target=lambda: answers.setdefault("a", pool.submit("a", "")))
    submitter.start()
    try:
        assert store.began["a"].wait(TIMEOUT)
        summaries = []
        drain = threading.Thread(target=lambda: summaries.append(pool.shutdown(timeout=2.0)), name="drain")
        with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
            drain.start()
            drain.join(TIMEOUT)
            assert not drain.is_alive(), "the drain waited for the held submission past the store's grace"
    finally:
        store.gates["a"].set()
        submitter.join(TIMEOUT)
    [summary] = summaries
    assert 2.0 <= summary.drain_seconds <= 2.0 + DRAIN_STORE_GRACE_S
    assert "1 submission(s) still in the store at the drain's end" in caplog.text
    assert answers["a"].state is State.QUEUED  # it ended on its own: stored, for the other processes
    store.close()


def test_a_lease_thread_that_fails_to_start_lets_no_worker_claim_and_starts_with_the_next_submission(
    make_pool, clock, tmp_path, monkeypatch
):
    # Without it, attempts would run without their leases renewed: other processes take them as lost.
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    pool = make_pool(store=store, workers=2)
    refuse_to_start_thread(monkeypatch, "workerpool-leases")
    with pytest.raises(RuntimeError, match="can't start"):
        pool.submit("refused", "")
    monkeypatch.undo()
    assert not pool.started  # no worker runs without the lease keeper
    assert pool.get("refused") is None
    pool.submit("later", "")
    names = {thread.name for thread in pool._threads}
    assert names == {"workerpool-leases", "workerpool-worker-1", "workerpool-worker-2"}
    wait_until(lambda: pool.get("later").state is State.DONE, timeout=TIMEOUT, what="the task to be done")
    assert pool.shutdown(timeout=TIMEOUT).counts[State.DONE] == 1
    store.close()


def test_a_worker_that_fails_to_start_is_started_by_the_next_submission(make_pool, monkeypatch):
    pool = make_pool(instant, workers=2)
    refuse_to_start_thread(monkeypatch, "workerpool-worker-2")
    with pytest.raises(RuntimeError, match="can't start"):
        pool.submit("refused", "")
    monkeypatch.undo()
    assert [thread.name for thread in pool._threads] == ["workerpool-worker-1"]
    pool.submit("later", "")
    assert sorted(thread.name for thread in pool._threads) == ["workerpool-worker-1", "workerpool-worker-2"]
    assert pool.shutdown(timeout=TIMEOUT).counts[State.DONE] == 1


class _RenewalGate(SqliteStore):
    """Holds the first lease renewal (for task "a") until task "b" runs; tells when each renewal begins."""

    def __init__(self, path, b_started: threading.Event) -> None:
        super().__init__(path)
        self.b_started = b_started
        self.renewals: list[threading.Event] = [threading.Event(), threading.Event()]
        self.calls = 0

    def renew(self, owner, task_ids, lease_until):
        ids = list(task_ids)
        if self.calls < len(self.renewals):
            self.renewals[self.calls].set()
            self.calls += 1
            if ids == ["a"]:
                assert self.b_started.wait(TIMEOUT)
        return super().renew(owner, ids, lease_until)


def test_a_cancel_aimed_at_an_ended_attempt_never_reaches_the_next_one(tmp_path):
    # The lease keeper reads the running attempts, renews them in the store and sets the cancel event
    # of those the store reports lost or cancelled. An attempt that ended meanwhile must not pass that
    # on to the next attempt of its worker, which may hold the same (unset) event.
    b_started = threading.Event()
    store = _RenewalGate(tmp_path / "tasks.db", b_started)
    seen: dict[str, bool] = {}

    def handler(task, cancel):
        if task.id == "a":  # end while the renewal of "a" is held in the store
            assert store.renewals[0].wait(TIMEOUT)
            return
        b_started.set()
        assert store.renewals[1].wait(TIMEOUT)  # the keeper has done with the first renewal
        seen[task.id] = cancel.is_set()

    pool = WorkerPool(handler, store=store, workers=1, lease=0.3)
    try:
        pool.submit("a")
        pool.submit("b")
        wait_until(lambda: "b" in seen, timeout=TIMEOUT, what="b to run")
        assert seen == {"b": False}, "the cancel of a's ended attempt reached b"
        wait_until(lambda: pool.get("b").state is State.DONE, timeout=TIMEOUT, what="b to end")
        assert pool.get("a").state is State.DONE
    finally:
        pool.shutdown(TIMEOUT)
        store.close()


def test_listing_order_and_creation_times_agree_when_two_submits_race(make_pool, clock):
    # The first submit reads the clock, then stalls until a later submit has been admitted.
    first_read, second_admitted = threading.Event(), threading.Event()

    def racing_clock():
        now = clock.time()
        if threading.current_thread().name == "first-submit" and not first_read.is_set():
            first_read.set()
            assert second_admitted.wait(TIMEOUT)
        return now

    pool = make_pool(workers=1, clock=racing_clock)
    first = threading.Thread(target=pool.submit, args=("first",), name="first-submit")
    first.start()
    assert first_read.wait(TIMEOUT)
    clock.advance(1.0)
    pool.submit("second")
    second_admitted.set()
    first.join(TIMEOUT)
    assert not first.is_alive()
    listed = pool.list()
    assert [t.id for t in listed] == ["first", "second"]  # newest admitted first
    assert listed[0].created_at >= listed[1].created_at


class ClaimFails(MemoryStore):
    """A store whose ``claim`` is unavailable the next ``failures`` times; each refusal moves the clock ``moves`` on by
    ``refusal_s`` (the worker's 1 s pause, which the tests shorten to a real millisecond)."""

    def __init__(self, failures, *, moves=None, refusal_s=0.0, **options):
        super().__init__(**options)
        self.failures = failures
        self.refusals = 0
        self._moves = moves
        self._refusal_s = refusal_s
        self._failing = threading.Lock()

    def fail_next(self, failures):
        with self._failing:
            self.failures = failures

    def claim(self, owner, lease_until):
        with self._failing:
            refuse = self.failures > 0
            if refuse:
                self.failures -= 1
                self.refusals += 1
        if refuse:
            if self._moves is not None:
                self._moves.advance(self._refusal_s)
            raise StoreUnavailable("the store is down")
        return super().claim(owner, lease_until)


def short_pause(event, timeout):
    return event.wait(0.001 if timeout else None)  # the worker's 1 s pause, shortened


def claim_failure_lines(caplog):
    tries = [r for r in caplog.records if r.getMessage().startswith("worker could not take a task")]
    assert all(r.exc_info is None for r in tries)  # an outage is not a bug: no traceback
    return [r.getMessage() for r in tries]


def test_a_worker_waits_out_an_unavailable_store_with_one_line_per_try(make_pool, clock, caplog):
    log = AttemptLog()
    store = ClaimFails(2, moves=clock, refusal_s=1.0)
    pool = make_pool(store=store, workers=1, observers=[log], wait=short_pause)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        pool.submit("a", "", 0)
        log.wait_for("a", State.DONE)
    expected = "worker could not take a task (the store is down); trying again in 1.0 s"
    assert claim_failure_lines(caplog) == [expected] * 2


def test_an_unavailable_store_is_logged_once_a_second_for_all_the_workers(make_pool, clock, caplog):
    # Every worker meets the outage and tries again each second: a line from each buried the store's own.
    log = AttemptLog()
    store = ClaimFails(0)
    pool = make_pool(store=store, workers=8, observers=[log], wait=short_pause)
    pool.start()
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        store.fail_next(40)  # all within one second of the pool's clock
        pool.submit("a", "", 0)
        log.wait_for("a", State.DONE)
        assert store.refusals == 40
        assert len(claim_failure_lines(caplog)) == 1
        clock.advance(1.0)
        store.fail_next(5)
        pool.submit("b", "", 0)
        log.wait_for("b", State.DONE)
    assert store.refusals == 45
    assert len(claim_failure_lines(caplog)) == 2


class StepLog(MemoryStore):
    """A memory store that records its workers' steps: claims, ends that claim next, waits for work."""

    def __init__(self, **options):
        super().__init__(**options)
        self.steps = []
        self.changed = threading.Condition()

    def _record(self, step):
        with self.changed:
            self.steps.append(step)
            self.changed.notify_all()

    def claim(self, owner, lease_until):
        claimed = super().claim(owner, lease_until)
        self._record(("claim", claimed and claimed.id))
        return claimed

    def finish_and_claim(self, task_id, attempt, owner, **kwargs):
        ended, claimed = super().finish_and_claim(task_id, attempt, owner, **kwargs)
        self._record(("finish_and_claim", task_id, claimed and claimed.id))
        return ended, claimed

    def wait_for_work(self, timeout):
        self._record(("wait",))
        super().wait_for_work(timeout)

    def step_after(self, step):
        """The step that followed ``step``, once there is one."""
        with self.changed:
            assert self.changed.wait_for(lambda: step in self.steps[:-1], TIMEOUT), f"no step after {step}"
            return self.steps[self.steps.index(step) + 1]


def test_a_worker_whose_end_claimed_nothing_waits_at_once_and_work_admitted_then_wakes_it(make_pool):
    store = StepLog()
    pool = make_pool(store=store, workers=1)
    pool.submit("a")
    # The store step that ended "a" found nothing to claim: a claim right after it would find the
    # same, one store step (a transaction, a script) more per idle moment.
    assert store.step_after(("finish_and_claim", "a", None)) == ("wait",)
    pool.submit("b")  # admitted while (or before) the worker waits: it must run without another wake-up
    assert store.step_after(("finish_and_claim", "b", None)) == ("wait",)
    assert pool.get("b").state is State.DONE
    assert ("claim", "b") in store.steps  # woken, the worker claimed it


def test_hooks_are_looked_up_once_and_only_those_an_observer_overrides_are_called(make_pool):
    class Finished(PoolObserver):
        def __init__(self):
            self.looked_up = []
            self.finished = []

        def __getattribute__(self, name):
            if name in PoolObserver.__dict__ and not name.startswith("_"):
                object.__getattribute__(self, "looked_up").append(name)
            return object.__getattribute__(self, name)

        def attempt_finished(self, task, seconds):
            self.finished.append((task.id, task.state))

    class Queued(PoolObserver):
        def __init__(self):
            self.queued = []

        def task_queued(self, task):  # heard through PoolObserver.tasks_queued
            self.queued.append(task.id)

    finished, queued = Finished(), Queued()
    pool = make_pool(always_fail, threads=False, observers=[finished, queued])
    assert finished.looked_up == ["attempt_finished"]  # bound when the pool was made
    pool.submit("a", max_retries=1)
    pool.submit_many([TaskSpec("b"), TaskSpec("c")])
    pool.cancel("c")
    while pool.step():
        pass
    assert finished.looked_up == ["attempt_finished"]
    assert finished.finished == [("a", State.QUEUED), ("a", State.FAILED), ("b", State.FAILED)]  # due retries first
    assert queued.queued == ["a", "b", "c"]


class Cancels(PoolObserver):
    def __init__(self) -> None:
        self.heard: list[str] = []

    def task_cancelled(self, task):
        self.heard.append(task.id)


def test_a_task_cancelled_through_two_processes_at_once_is_counted_by_one(make_pool, clock, tmp_path):
    # Two pools on one SQLite file stand for two processes: a cancel through the second reaches the
    # store just after the first process cancelled the task. Exactly one of them tells of it.
    here, there = (SqliteStore(tmp_path / "tasks.db", clock=clock.time) for _ in range(2))
    heard_here, heard_there = Cancels(), Cancels()
    first = make_pool(store=here, threads=False, observers=[heard_here])
    second = make_pool(store=there, threads=False, observers=[heard_there])
    real_cancel = there.cancel

    def cancel_after_the_other_process(task_id):
        first.cancel(task_id)
        return real_cancel(task_id)

    there.cancel = cancel_after_the_other_process
    first.submit("later", delay=60)
    assert second.cancel("later").state is State.CANCELLED
    assert (heard_here.heard, heard_there.heard) == (["later"], [])
    assert first.shutdown(0).counts[State.CANCELLED] + second.shutdown(0).counts[State.CANCELLED] == 1
    here.close()
    there.close()


def test_a_cancel_that_lands_as_its_attempt_ends_never_reaches_a_later_task_reusing_the_id(make_pool, clock):
    gate, seen = Gate(), []

    def handler(task, cancel):
        if task.payload == "block":
            gate(task, cancel)
        seen.append((task.id, task.payload, cancel.is_set()))

    store = MemoryStore(8, max_finished=1, clock=clock.time)
    pool = make_pool(handler, store=store, threads=False)
    real_cancel = store.cancel

    def cancel_as_the_attempt_ends(task_id):
        cancelled = real_cancel(task_id)  # the store marks the running attempt...
        gate.open()  # ...which ends before the pool looks for it among those it runs
        stepping.join(TIMEOUT)
        return cancelled

    store.cancel = cancel_as_the_attempt_ends
    pool.submit("job", "block")
    stepping = threading.Thread(target=pool.step)
    stepping.start()
    gate.wait_started()
    assert pool.cancel("job").cancel_requested
    assert pool.get("job").state is State.DONE  # it returned normally
    clock.advance(1)
    pool.submit("other")
    assert pool.step()  # retention keeps one finished task: "job" is forgotten
    assert pool.get("job") is None
    pool.submit("job", "again")
    assert pool.step()
    assert seen[-1] == ("job", "again", False)  # not told to cancel at its start
    assert pool.get("job").state is State.DONE
    assert not pool._cancel_early  # nothing kept for an attempt that will never register


def test_the_cancel_of_a_running_attempt_is_logged_before_its_handler_hears_of_it(make_pool, caplog):
    # A handler that stops at once on its cancel had "cancelled during attempt" logged before "cancel requested".
    cancels: list[threading.Event] = []
    started = threading.Event()

    def handler(task, cancel):
        cancels.append(cancel)
        started.set()
        if cancel.wait(WAIT_S):
            raise AttemptCancelled("stopped")

    heard_already: list[bool] = []

    class Spy(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cancel requested" in record.getMessage():
                heard_already.append(cancels[0].is_set())

    caplog.set_level(logging.INFO, logger="workerpool.pool")
    spy = Spy()
    logging.getLogger("workerpool.pool").addHandler(spy)
    try:
        pool = make_pool(handler, workers=1)
        pool.submit("job")
        assert started.wait(WAIT_S)
        pool.cancel("job")
        wait_until(lambda: pool.get("job").state is State.CANCELLED, timeout=WAIT_S, what="the cancel")
    finally:
        logging.getLogger("workerpool.pool").removeHandler(spy)
    assert heard_already == [False]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task job")]
    assert lines == [
        "task job: cancel requested while attempt 1 runs",
        "task job cancelled during attempt 1: AttemptCancelled: stopped",
    ]


def test_a_cancel_between_the_claim_and_the_attempts_start_reaches_its_handler(make_pool, clock):
    seen = []
    store = MemoryStore(8, clock=clock.time)
    pool = make_pool(lambda task, cancel: seen.append(cancel.is_set()), store=store, threads=False)
    real_claim = store.claim

    def claim_then_cancel(owner, lease_until):
        claimed = real_claim(owner, lease_until)
        if claimed is not None:
            assert pool.cancel(claimed.id).cancel_requested  # the pool has not registered the attempt yet
        return claimed

    store.claim = claim_then_cancel
    pool.submit("job")
    assert pool.step()
    assert seen == [True]
    assert not pool._cancel_early


def test_a_cancel_between_the_claim_with_the_last_end_and_the_next_attempts_start_reaches_its_handler(make_pool, clock):
    seen = []
    release = threading.Event()

    def handler(task, cancel):
        if task.id == "first":
            release.wait(WAIT_S)
        seen.append((task.id, cancel.is_set()))

    store = MemoryStore(8, clock=clock.time)
    pool = make_pool(handler, store=store, workers=1)
    real_finish_and_claim = store.finish_and_claim

    def end_then_cancel(*args, **kwargs):
        ended, claimed = real_finish_and_claim(*args, **kwargs)
        if claimed is not None:
            assert pool.cancel(claimed.id).cancel_requested  # the worker has not registered the attempt yet
        return ended, claimed

    store.finish_and_claim = end_then_cancel
    pool.submit("first")
    pool.submit("next")  # queued while "first" runs: claimed with its end
    release.set()
    pool.shutdown(TIMEOUT)
    assert seen == [("first", False), ("next", True)]
    assert not pool._cancel_early


def test_an_attempt_of_a_process_found_gone_is_logged_lost_once_saying_why(make_pool, clock, tmp_path, caplog):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store = SqliteStore(tmp_path / "tasks.db", clock=clock.time)
    store.admit([Task("orphan", "", 0, created_at=clock.time())])
    store.claim(f"{socket.gethostname()}:{int(gone.stdout)}:00000000", clock.time() + 30)
    pool = make_pool(store=store, workers=1)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        pool.start()  # the lease keeper recovers the attempt at once: its process no longer exists
        wait_until(lambda: pool.get("orphan").state is State.FAILED, timeout=TIMEOUT, what="the recovery")
        pool.shutdown(TIMEOUT)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("task orphan")]
    assert line == "task orphan attempt 1 lost: the process running it stopped (it no longer exists on this host)"
    store.close()


class DrainFails(MemoryStore):
    """A store whose ``method`` raises an unexpected error (not StoreUnavailable) from its ``after``-th call on."""

    def __init__(self, method, after, **options):
        super().__init__(**options)
        calls = 0
        real = getattr(self, method)

        def fails(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls >= after:
                raise RuntimeError(f"{method} broke")
            return real(*args, **kwargs)

        setattr(self, method, fails)


@pytest.mark.parametrize("method, after, timeout, abandoned", [
    ("unfinished", 1, 1000, ("later",)),  # counting for the first log line
    ("unfinished", 2, 1000, ("later",)),  # counting while waiting: the fake clock never reaches the deadline
    ("abandon", 1, 0, ()),
])  # fmt: skip
def test_an_unexpected_store_error_still_ends_the_drain_and_later_shutdowns_return(
    make_pool, clock, caplog, method, after, timeout, abandoned
):
    pool = make_pool(store=DrainFails(method, after, clock=clock.time), workers=1)
    pool.submit("later", "", 0, delay=100.0)
    later = []
    with caplog.at_level(logging.ERROR, logger="workerpool.pool"):
        assert pool.shutdown(timeout=timeout, wait=False) is None
        waiter = threading.Thread(target=lambda: later.append(pool.shutdown(timeout=0)), daemon=True)
        waiter.start()
        waiter.join(TIMEOUT)
    assert later, "a later shutdown waited forever for a drain that had died"
    assert later[0].abandoned == abandoned
    assert f"RuntimeError: {method} broke" in caplog.text


def _two_processes(kind, clock, tmp_path):
    """Two stores sharing one queue, as two processes' stores do."""
    if kind == "sqlite":
        return tuple(SqliteStore(tmp_path / "tasks.db", clock=clock.time) for _ in range(2))
    prefix = f"test-{uuid.uuid4().hex}"
    return tuple(
        RedisStore(shared_server().client(), capacity=64, ttl=3600.0, max_finished=100, prefix=prefix, clock=clock.time)
        for _ in range(2)
    )


def _waits_for_its_cancel():
    """A handler that waits for its cancel event and fails once it is set; events: it started, it heard."""
    started, heard = threading.Event(), threading.Event()

    def handler(task, cancel):
        started.set()
        if cancel.wait(TIMEOUT):
            heard.set()
            raise RuntimeError("cancelled")

    return handler, started, heard


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_cancel_requested_in_another_process_reaches_the_attempt_before_its_next_renewal(
    make_pool, clock, tmp_path, kind
):
    # The lease is renewed every 10 s of the fake clock, which moves CANCEL_POLL_S at a time and
    # 5 s at most: the cancel event is set by the keeper's look for cancels, not by a renewal.
    here, elsewhere = _two_processes(kind, clock, tmp_path)
    handler, started, heard = _waits_for_its_cancel()
    pool = make_pool(handler, store=here, workers=1, lease=30.0)
    pool.submit("a", "")
    assert started.wait(TIMEOUT)
    assert elsewhere.cancel("a")[1]
    # One step at a time: on a loaded machine the keeper may still be in its first renewal at the
    # first step, and begin its wait for CANCEL_POLL_S of fake time only after it.
    for _ in range(round(5.0 / CANCEL_POLL_S)):
        clock.advance(CANCEL_POLL_S)
        if heard.wait(0.05):
            break
    assert heard.wait(TIMEOUT), "the cancel waited for the next lease renewal"
    wait_until(lambda: pool.get("a").state is State.CANCELLED, timeout=TIMEOUT, what="the attempt to end cancelled")
    pool.shutdown(timeout=TIMEOUT)
    for store in (here, elsewhere):
        store.close()


class KeeperWaits:
    """The pool's wait on fake time, recording the lease keeper's waits: their timeouts, and whether one is on."""

    def __init__(self, clock) -> None:
        self.clock = clock
        self.changed = threading.Condition()
        self.timeouts: list[float] = []  # of the keeper's waits, in order
        self.waiting = False  # the keeper is in a wait whose fake deadline is set

    def __call__(self, event: threading.Event, timeout: float | None) -> bool:
        if threading.current_thread().name != "workerpool-leases":
            return self.clock.wait(event, timeout)
        deadline = self.clock.monotonic() + timeout
        with self.changed:
            self.timeouts.append(timeout)
            self.waiting = True
            self.changed.notify_all()
        try:
            while not event.wait(POLL_S):
                if self.clock.monotonic() >= deadline:
                    return False
            return True
        finally:
            with self.changed:
                self.waiting = False

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> bool:
        """Whether the keeper is in a wait, with ``predicate(timeouts)`` true, within ``timeout`` real seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: self.waiting and predicate(self.timeouts), timeout)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_the_lease_keeper_sleeps_until_its_next_renewal_while_nothing_runs_here(make_pool, clock, tmp_path, kind):
    # It woke every CANCEL_POLL_S to look for cancels, 10 times a second, with no attempt to look for.
    here, elsewhere = _two_processes(kind, clock, tmp_path)
    handler, started, heard = _waits_for_its_cancel()
    waits = KeeperWaits(clock)
    pool = make_pool(handler, store=here, workers=1, lease=30.0, wait=waits)
    pool.start()
    assert waits.wait_for(lambda timeouts: timeouts), "the lease keeper never waited"
    assert waits.timeouts == [pytest.approx(10.0)]  # a third of the lease: until the next renewal

    pool.submit("a", "")
    assert started.wait(TIMEOUT)
    # The attempt's start wakes it; it then looks for cancels every CANCEL_POLL_S again.
    assert waits.wait_for(lambda timeouts: timeouts[-1] == pytest.approx(CANCEL_POLL_S))
    assert waits.timeouts[:-1] == [pytest.approx(10.0)]  # it slept through until then
    assert elsewhere.cancel("a")[1]
    clock.advance(CANCEL_POLL_S)  # one poll period
    assert heard.wait(TIMEOUT), "the cancel was not delivered within one poll period"
    wait_until(lambda: not pool.running(), timeout=TIMEOUT, what="the attempt to end")
    # With nothing running again, it sleeps until the renewal after its next look.
    assert waits.wait_for(lambda timeouts: True)
    clock.advance(CANCEL_POLL_S)
    assert waits.wait_for(lambda timeouts: timeouts[-1] > 1.0)
    assert waits.timeouts[-1] == pytest.approx(10.0 - clock.monotonic())
    assert waits.timeouts[1:-1] == [pytest.approx(CANCEL_POLL_S)] * (len(waits.timeouts) - 2)
    pool.shutdown(timeout=TIMEOUT)
    for store in (here, elsewhere):
        store.close()


def test_an_idle_pools_lease_keeper_forgets_the_finished_tasks_past_their_time_that_steps_left(make_pool, clock):
    # Redis forgets 100 of them per step: with nothing read or ended, the rest stayed in Redis, for ever.
    prefix = f"test-{uuid.uuid4().hex}"
    here, elsewhere = (
        RedisStore(shared_server().client(), capacity=300, ttl=60.0, max_finished=5000, prefix=prefix, clock=clock.time)
        for _ in range(2)
    )
    elsewhere.admit([Task(f"t{n}", "", 0, created_at=clock.time()) for n in range(250)])
    task = elsewhere.claim("elsewhere", clock.time() + 30)
    while task is not None:
        _, task = elsewhere.finish_and_claim(task.id, 1, "elsewhere", lease_until=clock.time() + 30)
    waits = KeeperWaits(clock)
    pool = make_pool(store=here, workers=1, lease=30.0, wait=waits)
    pool.start()
    assert waits.wait_for(lambda timeouts: timeouts), "the lease keeper never waited"
    admin = shared_server().client()
    assert len(admin.keys(f"{here._prefix}:t:*")) == 250  # not yet past their time
    clock.advance(61)  # past STATE_TTL_S, and the keeper's next renewal
    assert waits.wait_for(lambda timeouts: len(timeouts) >= 2)
    assert admin.keys(f"{here._prefix}:t:*") == []
    pool.shutdown(timeout=TIMEOUT)
    for store in (here, elsewhere):
        store.close()
    admin.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_sweep_after_a_pause_of_this_process_does_not_count_a_live_owners_attempt_lost(
    make_pool, clock, tmp_path, kind
):
    # This process takes no step for 60 s (stopped by SIGSTOP, a paused VM) while the store is out for every
    # process: the owner's renewals fail, its lease expires, and the store is back before this process's
    # next step, which answers in time. It saw no outage, yet the owner's lease expired in one.
    here, elsewhere = _two_processes(kind, clock, tmp_path)
    owner = "elsewhere.example:1:a"  # a process on another host, alive (its pid cannot be looked up here)
    elsewhere.admit([Task("held", "", 0, created_at=clock.time())])
    assert elsewhere.claim(owner, clock.time() + 30.0).id == "held"
    waits = KeeperWaits(clock)
    pool = make_pool(instant, store=here, workers=1, lease=30.0, wait=waits)
    pool.start()
    assert waits.wait_for(lambda timeouts: len(timeouts) == 1), "the lease keeper never swept"
    clock.advance(60.0)  # the owner's lease expired 30 s ago; the keeper's next step comes 50 s late
    assert waits.wait_for(lambda timeouts: len(timeouts) == 2), "the lease keeper did not step after the pause"
    assert pool.get("held").state is State.RUNNING, "a live owner's attempt was ended by a sweep after a pause"
    assert elsewhere.renew(owner, ["held"], clock.time() + 30.0).lost == frozenset()  # the owner's next renewal
    assert elsewhere.finish("held", 1, owner, result="ok").state is State.DONE
    pool.shutdown(timeout=TIMEOUT)
    for store in (here, elsewhere):
        store.close()


def _wait_for_warning(caplog, line: str) -> list[str]:
    """The WARNING lines logged, once ``line`` is among them. The lease keeper cancels an attempt it finds
    lost before it says why (it asks the store first), so the attempt may end before the line is written."""

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    wait_until(lambda: line in warnings(), timeout=TIMEOUT, what=f"the warning {line!r}")
    return warnings()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_an_attempt_ended_as_lost_while_its_process_was_cut_off_from_the_store_is_told_as_such_there(
    make_pool, clock, tmp_path, kind, caplog
):
    # This process alone cannot reach the store (a network partition) for longer than a lease; another one,
    # which reaches it, ends the attempt with a reason true whether its process ended or was cut off. Once
    # back, this process learns it from its renewal and says what happened, which it alone knows.
    here, elsewhere = _two_processes(kind, clock, tmp_path)
    cut, refused = threading.Event(), threading.Event()

    class CutOff:
        """``here`` as this process sees it: every renewal and look for cancels fails while ``cut`` is set."""

        def __getattr__(self, name):
            return getattr(here, name)

        def renew(self, *args, **kwargs):
            if cut.is_set():
                refused.set()
                raise StoreUnavailable("connection refused")
            return here.renew(*args, **kwargs)

        def cancel_requested(self, *args, **kwargs):
            if cut.is_set():
                raise StoreUnavailable("connection refused")
            return here.cancel_requested(*args, **kwargs)

    handler, started, heard = _waits_for_its_cancel()
    pool = make_pool(handler, store=CutOff(), workers=1, lease=30.0, wait=KeeperWaits(clock))
    pool.submit("a", "")
    assert started.wait(TIMEOUT)
    cut.set()
    clock.advance(31.0)  # the lease has expired: this process's renewals fail meanwhile
    assert refused.wait(TIMEOUT), "the lease keeper did not try to renew"
    (recovered,) = elsewhere.recover(lambda task: None)  # it reaches the store, and saw no outage
    assert recovered.last_error == LOST_EXPIRED  # not that the process stopped: it did not
    cut.clear()
    clock.advance(10.0)  # the next renewal reaches the store
    assert heard.wait(TIMEOUT), "the attempt was not cancelled after its renewal found it lost"
    wait_until(lambda: not pool.running(), timeout=TIMEOUT, what="the attempt to end")
    told = (
        "task a attempt 1: its lease expired while it ran here, this process being unable to reach the store, "
        "and another process ended it as lost; it is cancelled here and its end will be dropped"
    )
    _wait_for_warning(caplog, told)
    assert pool.get("a").last_error == LOST_EXPIRED  # the late end changed nothing
    pool.shutdown(timeout=TIMEOUT)
    for store in (here, elsewhere):
        store.close()


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_renewal_that_finds_an_attempt_ended_by_its_own_worker_logs_no_lost_lease(
    make_pool, clock, tmp_path, kind, caplog
):
    # The keeper took the attempts running here, then the worker wrote the end of one before the
    # renewal reached the store: the store no longer holds it running, as if another process had
    # ended it, but the attempt ended here. It logged "its lease expired while it ran here".
    here, elsewhere = _two_processes(kind, clock, tmp_path)
    elsewhere.close()  # one process is enough here

    class RenewsRightAfterAnEnd:
        """``here``, whose end of an attempt is followed at once by the lease keeper's renewal (the race)."""

        pool = None

        def __getattr__(self, name):
            return getattr(here, name)

        def finish(self, *args, **kwargs):
            ended = here.finish(*args, **kwargs)
            self.pool._renew_once()
            return ended

        def finish_and_claim(self, *args, **kwargs):
            ended = here.finish_and_claim(*args, **kwargs)
            self.pool._renew_once()
            return ended

    store = RenewsRightAfterAnEnd()
    pool = store.pool = make_pool(instant, store=store, workers=1, lease=30.0)
    pool.submit("a", "")
    wait_until(lambda: pool.get("a").state is State.DONE, timeout=TIMEOUT, what="the task to be done")
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [line for line in lines if "lease expired while it ran here" in line], lines
    pool.shutdown(timeout=TIMEOUT)
    here.close()


@pytest.mark.parametrize("kind", ["delay", "backoff"])
def test_a_drain_abandons_at_once_what_cannot_fall_due_before_its_deadline(make_pool, clock, kind):
    # The fake clock stands still: without looking at the due times the drain would wait forever.
    log = AttemptLog()
    pool = make_pool(always_fail if kind == "backoff" else instant, workers=1, backoff_base=3600, backoff_cap=3600,
                     observers=[log])  # fmt: skip
    pool.submit("later", "", 1, delay=3600.0 if kind == "delay" else 0.0)
    if kind == "backoff":
        log.wait_for("later", State.QUEUED)  # its first attempt failed: its retry is due in an hour
    waiter = threading.Thread(target=pool.shutdown, kwargs={"timeout": 20}, daemon=True)
    waiter.start()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive(), "the drain waited for a deadline that could bring nothing"
    summary = pool.shutdown()
    assert (summary.abandoned, summary.drain_seconds) == (("later",), 0.0)


def test_a_drain_does_not_abandon_a_retry_queued_while_it_looked_at_the_due_times(make_pool, clock):
    pool = make_pool(instant, workers=1)
    store = pool._store

    class RetryQueuedBetweenTheReads:
        """The store as an attempt ending between the drain's reads leaves it: a retry due at once."""

        def __init__(self) -> None:
            self.shared, self.reads = False, 0

        def seconds_until_due(self):
            self.reads += 1
            return 3600.0 if self.reads == 1 else 0.0

        def stats(self):
            return store.stats()  # nothing running any more

    pool._store = RetryQueuedBetweenTheReads()
    try:
        assert not pool._nothing_falls_due_within(20.0)
    finally:
        pool._store = store
    pool.shutdown(timeout=0)


def test_a_drain_waits_for_a_delayed_task_due_before_its_deadline(make_pool, clock):
    log = AttemptLog()
    pool = make_pool(instant, workers=1, observers=[log])
    pool.submit("soon", "", 0, delay=10.0)
    assert pool.shutdown(timeout=20, wait=False) is None
    clock.advance(10)
    log.wait_for("soon", State.DONE)
    summary = pool.shutdown()
    assert (summary.abandoned, summary.counts[State.DONE]) == ((), 1)


class SteppingClock(FakeClock):
    """A fake clock whose wall time can step (an NTP correction, a virtual machine resumed) while its
    monotonic time does not; ``wait`` tells ``waiting`` once a worker's timed wait has read its deadline."""

    def __init__(self):
        super().__init__()
        self.step = 0.0
        self.waiting = threading.Event()

    def time(self):
        return super().time() + self.step

    def wait(self, event, timeout):
        if timeout is None:
            return event.wait()
        deadline = self.monotonic() + timeout
        if threading.current_thread().name.startswith("workerpool-worker"):
            self.waiting.set()
        while not event.wait(POLL_S):
            if self.monotonic() >= deadline:
                return False
        return True


def test_a_delayed_task_runs_soon_after_the_wall_clock_steps_past_its_due_time(make_pool):
    # The idle worker waited out the whole delay measured before the step: an hour late here.
    clock, log = SteppingClock(), AttemptLog()
    pool = make_pool(instant, workers=1, observers=[log], clock=clock.time, monotonic=clock.monotonic, wait=clock.wait)
    pool.submit("later", "", 0, delay=3600.0)
    assert clock.waiting.wait(TIMEOUT)
    clock.step += 3600.0
    assert pool.get("later").next_attempt_at <= clock.time()
    clock.advance(1.0)  # one second of real time
    log.wait_for("later", State.DONE)


def test_the_late_end_of_a_recovered_attempt_leaves_a_new_task_with_its_id_alone(make_pool, tmp_path, caplog):
    # The new task ended done with the old submission's result, and its own result was dropped.
    clock = SteppingClock()
    gates = {"old": threading.Event(), "new": threading.Event()}
    started = {"old": threading.Event(), "new": threading.Event()}

    def handler(task, cancel):
        if task.payload in gates:
            started[task.payload].set()
            assert gates[task.payload].wait(TIMEOUT)
        return f"result of the {task.payload} submission"

    keeper_waits = threading.Event()

    def wait(event, timeout):
        if threading.current_thread().name == "workerpool-leases":
            keeper_waits.set()
        return clock.wait(event, timeout)

    store = SqliteStore(tmp_path / "tasks.db", max_finished=1, clock=clock.time)
    times = {"clock": clock.time, "monotonic": clock.monotonic, "wait": wait}
    pool = make_pool(handler, store=store, workers=2, lease=30.0, **times)
    pool.submit("X", "old")
    assert started["old"].wait(TIMEOUT)
    # The keeper's first renewal, at its start, is behind it: a late one would renew X's lease past the step.
    # Its next is due in monotonic time, which stands still here.
    assert keeper_waits.wait(TIMEOUT)
    clock.step += 60.0  # this process paused past its lease: another process's sweep recovers the attempt
    other = SqliteStore(tmp_path / "tasks.db", max_finished=1, clock=clock.time)
    assert [task.id for task in other.recover(lambda task: None)] == ["X"]
    clock.step += 1.0
    pool.submit("filler", "quick")
    wait_until(lambda: store.get("X") is None, timeout=TIMEOUT, what="retention to forget X")
    pool.submit("X", "new")  # the id used again: the new task's attempt 1 runs here too
    assert started["new"].wait(TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="workerpool.pool"):
        gates["old"].set()
        _wait_for_warning(
            caplog, "task X attempt 1 ended after it was abandoned or its lease recovered; result dropped"
        )
    assert store.get("X").state is State.RUNNING
    gates["new"].set()
    wait_until(lambda: store.get("X").state is State.DONE, timeout=TIMEOUT, what="the new X to end")
    assert store.get("X").result == "result of the new submission"
    pool.shutdown(timeout=TIMEOUT)
    other.close()
    store.close()


def test_an_attempt_whose_task_redis_lost_says_so_not_that_another_process_ended_it(make_pool, clock, tmp_path, caplog):
    # Redis restarted without persistence, or flushed: the task running here is gone, and nobody ended it.
    here, _ = _two_processes("redis", clock, tmp_path)
    handler, started, heard = _waits_for_its_cancel()
    pool = make_pool(handler, store=here, workers=1, lease=30.0, wait=KeeperWaits(clock))
    pool.submit("a", "")
    assert started.wait(TIMEOUT)
    admin = shared_server().client()
    admin.delete(*admin.scan_iter(match=f"{here._prefix}*"))  # FLUSHDB, of this store's keys alone
    clock.advance(10.0)  # the next renewal
    assert heard.wait(TIMEOUT), "the attempt was not cancelled after its renewal found its task gone"
    lost = pool_module._STORE_LOST
    _wait_for_warning(caplog, f"task a attempt 1: {lost}; it is cancelled here and its end will be dropped")
    wait_until(lambda: not pool.running(), timeout=TIMEOUT, what="the attempt to end")
    lines = _wait_for_warning(caplog, f"task a attempt 1 ended, but {lost}; result dropped")
    assert not [line for line in lines if "another process" in line or "abandoned" in line], lines
    pool.shutdown(timeout=TIMEOUT)
    here.close()
    admin.close()


def _shut_down_on_a_thread(pool, timeout):
    summaries = []
    drain = threading.Thread(target=lambda: summaries.append(pool.shutdown(timeout)), daemon=True)
    drain.start()
    return drain, summaries


@pytest.mark.parametrize("timeout", [2.0, None])
def test_a_pool_without_threads_runs_what_is_left_on_the_draining_thread(make_pool, clock, timeout):
    # Nothing else steps it: the drain waited to the deadline for workers that do not exist (for ever without one).
    pool = make_pool(threads=False)
    for task_id in ("a", "b", "c"):
        pool.submit(task_id, "")
    assert pool.step()
    drain, summaries = _shut_down_on_a_thread(pool, timeout)
    drain.join(WAIT_S)
    assert not drain.is_alive(), "the drain waits for workers a pool without threads does not have"
    [summary] = summaries
    assert (summary.counts[State.DONE], summary.abandoned) == (3, ())
    assert [pool.get(task_id).state for task_id in ("a", "b", "c")] == [State.DONE] * 3
    assert clock.monotonic() == 0  # no time passed: it ran them as soon as it could


def test_a_pool_without_threads_drains_a_retry_once_it_falls_due_and_abandons_what_falls_due_too_late(make_pool, clock):
    waiting = threading.Event()

    def wait(event, timeout):
        if timeout:  # the drain waits for something to fall due (or for its deadline)
            waiting.set()
        return clock.wait(event, timeout)

    pool = make_pool(fail_first, threads=False, backoff_base=2.0, backoff_cap=2.0, wait=wait)
    pool.submit("retried", "", max_retries=1)
    pool.submit("later", "", delay=60)
    drain, summaries = _shut_down_on_a_thread(pool, 10.0)
    assert waiting.wait(WAIT_S)
    assert (pool.get("retried").attempts, pool.get("retried").state) == (1, State.QUEUED)
    clock.advance(2.0)  # the retry falls due: the drain, waiting for it (not for its deadline), runs it
    drain.join(WAIT_S)
    assert not drain.is_alive()
    [summary] = summaries
    assert pool.get("retried").state is State.DONE
    assert summary.abandoned == ("later",)  # due after the deadline: abandoned without waiting for it
    assert clock.monotonic() == 2.0
