"""The SQLite store on its own: durability across reopening, sharing one file, leases, bad files.

Two ``SqliteStore`` objects on one file stand for two processes: they share
nothing but the file. Behaviour every store shares is pinned by the store
contract tests; these cover what only a durable, shared store has.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from doubles import WAIT_S, Gate, instant, wait_until
from http_fixtures import PROJECT_ROOT
from stores import sqlite_vm_steps

from workerpool import State, Task, WorkerPool
from workerpool.errors import DuplicateTask, QueueFull, StoreFileReplaced, StoreNotSynced, StoreUnavailable
from workerpool.stores import sqlite as sqlite_store
from workerpool.stores.sqlite import LOST, LOST_GONE, SCHEMA_VERSION, SqliteStore

LEASE_S = 30.0


@pytest.fixture
def db(tmp_path):
    return tmp_path / "tasks.db"


@pytest.fixture
def open_store(db, clock):
    stores = []

    def make(**kwargs):
        kwargs.setdefault("clock", clock.time)
        store = SqliteStore(kwargs.pop("path", db), **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


def task(clock, task_id, payload="p", max_retries=0, **kwargs):
    return Task(task_id, payload, max_retries, created_at=clock.time(), **kwargs)


def claim(store, clock, owner="a"):
    return store.claim(owner, clock.time() + LEASE_S)


def test_admitted_tasks_and_outcomes_survive_closing_the_store(open_store, clock):
    first = open_store()
    payload = {"numbers": [1, 2.5], "text": "ünïcode", "none": None}
    first.admit([task(clock, "done", payload), task(clock, "waiting", ["x"], max_retries=2)])
    running = claim(first, clock)
    assert running.id == "done" and running.payload == payload
    first.finish("done", 1, "a", result={"answer": 42})
    first.close()

    second = open_store()
    assert second.get("done").state is State.DONE
    assert second.get("done").attempts == 1
    assert second.get("done").result == {"answer": 42}
    assert second.get("waiting").payload == ["x"]
    assert claim(second, clock, owner="b").id == "waiting"


def test_two_stores_on_one_file_share_the_bound_the_ids_and_the_view(open_store, clock):
    one, two = open_store(capacity=2), open_store(capacity=2)
    assert [t.state for t in one.admit([task(clock, "a")])] == [State.QUEUED]
    outcomes = two.admit([task(clock, "a"), task(clock, "b"), task(clock, "c")])
    assert isinstance(outcomes[0], DuplicateTask)
    assert outcomes[1].id == "b"
    assert isinstance(outcomes[2], QueueFull)  # the bound counts the other store's task too
    assert two.get("c") is None
    assert [t.id for t in one.list()] == ["b", "a"] == [t.id for t in two.list()]
    assert one.stats().waiting == two.stats().waiting == 2


def test_a_store_with_a_smaller_bound_tells_how_many_tasks_the_file_holds_waiting(open_store, clock):
    # During a rolling change of QUEUE_SIZE, processes on one file apply different bounds.
    large, small = open_store(capacity=10), open_store(capacity=3)
    delayed = [task(clock, f"d{n}")._replace(next_attempt_at=clock.time() + 600) for n in range(5)]
    assert [t.state for t in large.admit(delayed)] == [State.QUEUED] * 5
    (refused,) = small.admit([task(clock, "x")])
    assert isinstance(refused, QueueFull)
    assert (refused.waiting, refused.delayed, refused.capacity) == (5, 5, 3)
    assert str(refused) == "queue is full (5 tasks waiting)"


def test_each_task_is_claimed_once_by_competing_stores_and_threads(open_store, clock):
    stores = [open_store(capacity=1000) for _ in range(2)]
    stores[0].admit([task(clock, f"t{n}") for n in range(200)])
    claimed: list[str] = []
    lock = threading.Lock()

    def drain(store, owner):
        while (got := store.claim(owner, clock.time() + LEASE_S)) is not None:
            with lock:
                claimed.append(got.id)
            assert store.finish(got.id, 1, owner) is not None

    threads = [
        threading.Thread(target=drain, args=(store, f"{n}-{m}")) for n, store in enumerate(stores) for m in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert sorted(claimed) == sorted(f"t{n}" for n in range(200))
    assert stores[1].stats().counts[State.DONE] == 200


def _open_files(path):
    """How many file descriptors of this process are open on the store's file or its WAL."""
    names = {str(path), f"{path}-wal"}
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            count += os.readlink(f"/proc/self/fd/{fd}") in names
    return count


def test_a_thread_that_read_and_ended_leaves_no_connection_open(open_store, clock, db):
    store = open_store()
    store.admit([task(clock, "a")])

    def read_in_a_thread_of_its_own():
        reader = threading.Thread(target=lambda: store.get("a"))
        reader.start()
        reader.join(WAIT_S)

    # After the first, SQLite keeps one descriptor of a closed connection for
    # the next one to open (closing it would drop the process's locks on the file).
    read_in_a_thread_of_its_own()
    after_one = _open_files(db)
    for _ in range(20):  # like ``python app.py``: a thread per HTTP connection, each ending
        read_in_a_thread_of_its_own()
    assert _open_files(db) == after_one


def test_a_claim_after_one_that_found_nothing_reads_before_it_takes_the_write_lock(open_store, clock, db):
    store = open_store(busy_timeout=0.05)
    elsewhere = open_store()
    assert claim(store, clock) is None  # as a worker's claim that ends an attempt finds nothing due
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process writes for longer than the busy timeout
    try:
        assert claim(store, clock) is None  # answered by a read: nothing due, no wait for the lock
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    elsewhere.admit([task(clock, "a"), task(clock, "later", next_attempt_at=clock.time() + 5)])
    assert claim(store, clock).id == "a"  # the read sees work queued elsewhere: a real claim takes it
    assert claim(store, clock) is None
    assert claim(store, clock) is None
    clock.advance(5)
    assert claim(store, clock).id == "later"  # falls due by the clock alone


def test_a_refused_admission_writes_nothing(open_store, clock, db):
    store = open_store(capacity=1)
    store.admit([task(clock, "a")])
    watcher = sqlite3.connect(db, isolation_level=None)
    try:
        version = watcher.execute("PRAGMA data_version").fetchone()[0]
        assert isinstance(store.admit([task(clock, "a")])[0], DuplicateTask)
        assert isinstance(store.admit([task(clock, "b")])[0], QueueFull)
        assert watcher.execute("PRAGMA data_version").fetchone()[0] == version  # no commit changed the file
        store.finish(claim(store, clock).id, 1, "a")
        assert watcher.execute("PRAGMA data_version").fetchone()[0] != version
    finally:
        watcher.close()


def test_a_late_writer_changes_nothing(open_store, clock):
    store = open_store()
    store.admit([task(clock, "a", max_retries=1)])
    claim(store, clock, owner="a")
    assert store.finish("a", 1, "b") is None  # another owner
    assert store.finish("a", 2, "a") is None  # another attempt
    assert store.get("a").state is State.RUNNING


def test_an_expired_lease_is_recovered_as_a_lost_attempt_and_retried(open_store, clock):
    dead, alive = open_store(), open_store()
    dead.admit([task(clock, "retried", max_retries=1), task(clock, "failed")])
    claim(dead, clock, owner="dead")
    claim(dead, clock, owner="dead")
    clock.advance(LEASE_S - 1)
    assert alive.recover(lambda t: None) == []  # still leased
    clock.advance(2)
    recovered = alive.recover(lambda t: clock.time() + 5 if t.attempts <= t.max_retries else None)
    by_id = {t.id: t for t in recovered}
    assert by_id["retried"].state is State.QUEUED and by_id["retried"].last_error == LOST
    assert by_id["failed"].state is State.FAILED and by_id["failed"].last_error == LOST
    assert dead.finish("retried", 1, "dead") is None  # the dead owner's late write is refused
    assert claim(alive, clock, owner="alive") is None  # not due yet
    clock.advance(5)
    again = claim(alive, clock, owner="alive")
    assert (again.id, again.attempts) == ("retried", 2)


def test_renewing_keeps_a_lease_and_reports_lost_attempts(open_store, clock):
    store = open_store()
    store.admit([task(clock, "kept"), task(clock, "lost")])
    claim(store, clock)
    claim(store, clock)
    clock.advance(LEASE_S + 1)
    renewal = store.renew("a", ["kept"], clock.time() + LEASE_S)
    assert renewal.lost == frozenset()
    assert [t.id for t in store.recover(lambda t: None)] == ["lost"]
    renewal = store.renew("a", ["kept", "lost"], clock.time() + LEASE_S)
    assert renewal.lost == {"lost"}
    assert store.get("kept").state is State.RUNNING


def test_a_cancel_from_another_process_reaches_the_owner_through_renew(open_store, clock):
    owner, other = open_store(), open_store()
    owner.admit([task(clock, "a")])
    claim(owner, clock)
    assert other.cancel("a")[0].state is State.RUNNING
    assert owner.renew("a", ["a"], clock.time() + LEASE_S).cancel_requested == {"a"}
    ended = owner.finish("a", 1, "a", error="AttemptCancelled")
    assert ended.state is State.CANCELLED


def test_shutdown_of_one_process_abandons_only_its_own_attempts(open_store, clock):
    one, two = open_store(), open_store()
    one.admit([task(clock, "mine"), task(clock, "theirs"), task(clock, "queued")])
    claim(one, clock, owner="one")
    claim(two, clock, owner="two")
    assert one.unfinished("one") == 1
    assert [t.id for t in one.abandon("abandoned at shutdown", owner="one")] == ["mine"]
    assert one.get("mine").state is State.FAILED
    assert one.get("theirs").state is State.RUNNING
    assert one.get("queued").state is State.QUEUED  # left for the other process


def test_finished_tasks_are_forgotten_after_their_time_in_every_process(open_store, clock):
    one, two = open_store(ttl=10.0, max_finished=2), open_store(ttl=10.0, max_finished=2)
    one.admit([task(clock, f"t{n}") for n in range(3)])
    for _ in range(3):
        got = claim(one, clock)
        one.finish(got.id, 1, "a")
        clock.advance(1)
    assert [t.id for t in two.list()] == ["t2", "t1"]  # at most two finished kept, oldest forgotten
    clock.advance(10)
    assert two.get("t2") is None  # past its time even before a write deletes it
    assert two.stats().counts[State.DONE] == 0
    assert one.admit([task(clock, "t2")])[0].state is State.QUEUED  # a forgotten id may be reused


def test_retention_forgets_a_bounded_number_of_tasks_per_step_and_goes_on_soon(open_store, clock, monkeypatch):
    # One DELETE of every expired task held the write lock for seconds when a large batch expired together.
    monkeypatch.setattr(sqlite_store, "_FORGOTTEN_PER_STEP", 2)
    store = open_store(ttl=10.0)
    store.admit([task(clock, f"t{n}") for n in range(6)])
    for _ in range(5):
        store.finish(claim(store, clock).id, 1, "a")
    clock.advance(11)
    assert store.get("t0") is None  # past its time: no answer shows it, forgotten or not
    assert store.stats().counts[State.DONE] == 3  # two forgotten
    running = claim(store, clock)
    clock.advance(sqlite_store._SWEEP_BEHIND_S)  # well before the next second's sweep
    store.finish(running.id, 1, "a")  # the end of an attempt sweeps on
    assert store._query("SELECT done FROM task_totals") == [(1 + 1,)]  # two more went; t5 is fresh
    assert store.stats().counts[State.DONE] == 1  # and the last expired one
    assert [t.id for t in store.list()] == ["t5"]


def test_tasks_over_a_lowered_max_finished_go_a_bounded_number_per_step(open_store, clock, monkeypatch):
    monkeypatch.setattr(sqlite_store, "_FORGOTTEN_PER_STEP", 2)
    store = open_store()
    store.admit([task(clock, f"t{n}") for n in range(6)])
    for _ in range(5):
        store.finish(claim(store, clock).id, 1, "a")
        clock.advance(1)
    store.close()
    lowered = open_store(max_finished=1)
    running = claim(lowered, clock)
    lowered.finish(running.id, 1, "a")  # six finished: two of the five over the bound go
    assert lowered.stats().counts[State.DONE] == 2  # and two more in this step
    assert lowered.stats().counts[State.DONE] == 1
    assert [t.id for t in lowered.list()] == ["t5"]


@pytest.mark.parametrize("where", ["here", "elsewhere"])
def test_work_admitted_between_a_claim_and_the_wait_is_not_missed(open_store, clock, where):
    store = open_store()
    submitter = store if where == "here" else open_store()
    claimed, admitted, woke = threading.Event(), threading.Event(), threading.Event()

    def worker():
        assert store.claim("a", clock.time() + LEASE_S) is None
        claimed.set()
        admitted.wait(WAIT_S)
        store.wait_for_work(WAIT_S)
        woke.set()

    waiter = threading.Thread(target=worker)
    waiter.start()
    claimed.wait(WAIT_S)
    submitter.admit([task(clock, "a")])
    admitted.set()
    began = time.monotonic()
    assert woke.wait(WAIT_S)
    assert time.monotonic() - began < WAIT_S / 2  # at once, not after the wait's timeout
    waiter.join(WAIT_S)


def test_a_claim_that_found_nothing_never_takes_the_wake_up_of_work_admitted_after_its_step(open_store, clock):
    # W1's claim reads one unanswered admission (A, which another claim took directly), a waiter
    # answers it meanwhile, W1's step finds nothing, and B is admitted before W1 counts A as
    # answered: B must still wake W1's wait (the generation B wrote is this process's own, so
    # polling the file would never tell).
    store = open_store()
    read, stepped = threading.Event(), threading.Event()
    go_step, go_answer = threading.Event(), threading.Event()
    real_step, real_claimed_nothing = store._step, store._claimed_nothing

    def step(**kwargs):
        if threading.current_thread().name == "W1":
            read.set()
            assert go_step.wait(WAIT_S)
        return real_step(**kwargs)

    def claimed_nothing(*args):
        if threading.current_thread().name == "W1":
            stepped.set()
            assert go_answer.wait(WAIT_S)
        return real_claimed_nothing(*args)

    store._step, store._claimed_nothing = step, claimed_nothing
    store.admit([task(clock, "A")])
    a = claim(store, clock, "w2")  # taken without a wait: its admission stays unanswered
    woke = threading.Event()

    def w1():
        assert claim(store, clock, "w1") is None
        store.wait_for_work(None)  # what an idle worker does next
        woke.set()

    thread = threading.Thread(target=w1, name="W1", daemon=True)
    thread.start()
    assert read.wait(WAIT_S)
    assert waiter(store)(None).wait(WAIT_S)  # answers A's admission at once
    go_step.set()
    assert stepped.wait(WAIT_S)  # W1's step found nothing due
    store.finish(a.id, 1, "w2")
    store.admit([task(clock, "B")])
    go_answer.set()
    try:
        assert woke.wait(WAIT_S), "B is queued and the idle worker was never woken"
        assert claim(store, clock, "w1").id == "B"
    finally:
        store.wake()
        thread.join(WAIT_S)


def waiter(store):
    """A thread blocked in ``wait_for_work(timeout)``; the returned Event is set when it returns."""

    def start(timeout):
        returned = threading.Event()
        thread = threading.Thread(target=lambda: (store.wait_for_work(timeout), returned.set()), daemon=True)
        thread.start()
        return returned

    return start


def test_waiting_ends_when_its_timeout_passes_on_the_stores_clock(open_store, clock):
    returned = waiter(open_store())(5.0)
    assert not returned.wait(0.1)
    clock.advance(5)
    assert returned.wait(WAIT_S)


def test_waiting_ends_when_a_delayed_task_falls_due(open_store, clock):
    store = open_store()
    store.admit([task(clock, "later", next_attempt_at=clock.time() + 10)])
    assert claim(store, clock) is None  # as a worker does before it waits
    returned = waiter(store)(None)
    assert not returned.wait(0.1)
    clock.advance(10)
    assert returned.wait(WAIT_S)
    assert claim(store, clock).id == "later"


def test_a_retry_scheduled_here_wakes_idle_workers_to_look_at_its_due_time(open_store, clock):
    store = open_store()
    store.admit([task(clock, "a", max_retries=1)])
    running = claim(store, clock)
    idle = threading.Event()

    def worker():
        assert claim(store, clock) is None
        idle.set()
        store.wait_for_work(None)  # nothing queued: no due time to wait for

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    idle.wait(WAIT_S)
    store.finish(running.id, 1, "a", error="boom", retry_at=clock.time() + 5)
    thread.join(WAIT_S)
    assert not thread.is_alive()  # it returned to claim, and will wait until the retry is due


def test_work_another_process_queued_is_seen_even_when_this_process_queued_work_after_it(open_store, clock):
    # Two idle workers here. Another process admits "x", then this one admits "y": the ticket of
    # "y" wakes one worker, which claims "x" (the older). The other must still see the generation
    # "x" wrote, though the newest generation in the file is this process's own.
    here, there = open_store(), open_store()
    admitted = threading.Event()
    polling = threading.Semaphore(0)
    read_generation = here._read_generation
    before = read_generation()

    def read_before_the_admissions():  # each worker's first poll read the file before both came
        if not admitted.is_set():
            polling.release()
            assert admitted.wait(WAIT_S)
            return before
        return read_generation()

    here._read_generation = read_before_the_admissions
    claimed: list[str] = []
    both = threading.Event()

    def worker(owner):
        while (started := here.claim(owner, clock.time() + LEASE_S)) is None:
            here.wait_for_work(None)
        claimed.append(started.id)  # it stays busy with it
        if len(claimed) == 2:
            both.set()

    workers = [threading.Thread(target=worker, args=(f"w{n}",), daemon=True) for n in (1, 2)]
    for thread in workers:
        thread.start()
    try:
        assert polling.acquire(timeout=WAIT_S) and polling.acquire(timeout=WAIT_S)  # both wait: nothing queued
        there.admit([task(clock, "x")])
        here.admit([task(clock, "y")])
        admitted.set()
        assert both.wait(WAIT_S), f"only {claimed} started: a worker stayed idle with a task due"
        assert sorted(claimed) == ["x", "y"]
    finally:
        here.wake()
        for thread in workers:
            thread.join(WAIT_S)


def test_polling_backs_off_across_waits_ended_by_this_processs_work_and_speeds_up_for_another_processs(
    open_store, clock
):
    here, there = open_store(), open_store()
    here._local.poll = here._poll_max  # this thread has waited long without news from elsewhere
    here.admit([task(clock, "mine")])  # announced by a ticket: the wait ends without a read
    here.wait_for_work(None)
    assert here._local.poll == here._poll_max
    assert claim(here, clock).id == "mine"
    assert claim(here, clock) is None
    there.admit([task(clock, "theirs")])  # seen by polling the file only
    here.wait_for_work(None)
    assert here._local.poll == here._poll_min  # the next wait polls often again
    assert claim(here, clock).id == "theirs"


class _WaitsOnTheFakeClock(threading.Condition):
    """A condition whose waits pass on the fake clock: each moves it on by its timeout, and is recorded."""

    def __init__(self, clock):
        super().__init__(threading.Lock())
        self.clock, self.timeouts = clock, []

    def wait_for(self, predicate, timeout=None):
        if predicate():
            return True
        self.timeouts.append(timeout)
        self.clock.advance(timeout)
        return predicate()


def test_a_wait_ends_when_a_task_falls_due_however_far_polling_has_backed_off(open_store, clock):
    store = open_store(poll_max=10.0)
    store._local.poll = store._poll_max  # this thread has waited long without news from elsewhere
    due = clock.time() + 0.05
    store.admit([task(clock, "later", next_attempt_at=due)])
    assert claim(store, clock) is None  # not due yet: it saw when it will be
    store._wakeup = waits = _WaitsOnTheFakeClock(clock)
    store.wait_for_work(None)
    assert sum(waits.timeouts) == pytest.approx(0.05, abs=1e-6)  # not a whole poll interval past it
    assert claim(store, clock).id == "later"


def test_wake_releases_waiting_workers_and_every_later_wait(open_store):
    store = open_store()
    returned = waiter(store)(None)
    store.wake()
    assert returned.wait(WAIT_S)
    assert waiter(store)(None).wait(WAIT_S)


def test_a_new_task_file_and_its_wal_and_shm_are_readable_by_their_user_only(open_store, clock, db, tmp_path):
    # Payloads and results are in them: SQLite would create them 0644 under the usual umask.
    previous = os.umask(0o022)
    try:
        store = open_store()
        store.admit([task(clock, "secret")])
        existing = tmp_path / "existing" / "tasks.db"
        existing.parent.mkdir()
        existing.touch(mode=0o640)  # a file the operator made keeps its mode
        open_store(path=existing).admit([task(clock, "shared")])
    finally:
        os.umask(previous)
    for name in ("tasks.db", "tasks.db-wal", "tasks.db-shm"):
        assert oct((tmp_path / name).stat().st_mode & 0o777) == oct(0o600), name
        assert oct((existing.parent / name).stat().st_mode & 0o777) == oct(0o640), name


# -- files the store must refuse, with a reason ------------------------------


def test_a_directory_is_refused(open_store, tmp_path):
    with pytest.raises(StoreUnavailable, match="is a directory"):
        open_store(path=tmp_path)


def _bound_unix_socket(path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))  # the socket file stays after the socket is closed


@pytest.mark.parametrize(
    ("make", "kind"),
    [(os.mkfifo, "a FIFO"), (_bound_unix_socket, "a socket")],
)
def test_a_fifo_or_socket_is_refused_before_sqlite_writes_beside_it(open_store, tmp_path, make, kind):
    """SQLite would open it, leave a -journal beside it (in /dev for /dev/null) and say only "disk I/O error"."""
    path = tmp_path / "tasks.db"
    make(path)
    with pytest.raises(StoreUnavailable, match=f"tasks.db: is {kind}.*, not a database file"):
        open_store(path=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tasks.db"]


def test_a_character_device_is_named_as_one():
    with pytest.raises(StoreUnavailable, match="/dev/null: is a character device, not a database file"):
        sqlite_store._check_path(sqlite_store.Path("/dev/null"))


def test_a_missing_directory_is_refused(open_store, tmp_path):
    with pytest.raises(StoreUnavailable, match="does not exist"):
        open_store(path=tmp_path / "missing" / "tasks.db")


def test_a_task_file_with_another_hard_link_is_refused_by_either_name(open_store, clock, db, tmp_path):
    """A process opening it by the other link would keep another -wal beside it, and the two corrupt the file."""
    open_store().admit([task(clock, "a")])
    (tmp_path / "other").mkdir()
    os.link(db, tmp_path / "other" / "tasks.db")
    for path in (db, tmp_path / "other" / "tasks.db"):
        with pytest.raises(StoreUnavailable, match=r"has 2 hard links: .*another -wal.*corrupt"):
            open_store(path=path)
    (tmp_path / "other" / "tasks.db").unlink()
    assert open_store().get("a") is not None


def _made_by_another_user(path, monkeypatch) -> None:
    """Give ``path`` (not what a symlink names) another owner: really as root, else by this process's uid."""
    if os.geteuid() == 0:
        os.lchown(path, 65534, 65534)  # nobody
    else:
        other = os.geteuid() + 1
        monkeypatch.setattr(os, "geteuid", lambda: other)


def test_a_task_file_another_user_made_is_refused_untouched(open_store, db, monkeypatch):
    """Its owner would read every payload and result, and add tasks that never passed API_TOKEN."""
    db.touch()
    db.chmod(0o666)
    _made_by_another_user(db, monkeypatch)
    with pytest.raises(StoreUnavailable, match=r"tasks.db: not a private file of this process's user \(uid "):
        open_store()
    assert sorted(p.name for p in db.parent.iterdir()) == ["tasks.db"]
    assert db.stat().st_size == 0


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_wal_or_shm_another_user_planted_as_a_symlink_is_refused(open_store, db, tmp_path, suffix):
    open_store().close()
    target = tmp_path / "elsewhere"
    os.symlink(target, f"{db}{suffix}")
    with pytest.raises(StoreUnavailable, match=f"tasks.db{suffix}: not a private file .*mode l"):
        open_store()
    assert not target.exists()


def test_a_task_file_others_may_write_is_refused_but_group_write_is_the_operators_choice(open_store, clock, db):
    open_store().admit([task(clock, "a")])
    db.chmod(0o606)
    with pytest.raises(StoreUnavailable, match=r"tasks.db: not a private file .*mode -rw----rw-"):
        open_store()
    db.chmod(0o660)  # as a Kubernetes fsGroup volume leaves it
    assert open_store().get("a") is not None


def test_a_symlink_another_user_made_at_the_path_is_refused_before_its_target_is_created(
    open_store, tmp_path, monkeypatch
):
    (tmp_path / "victim").mkdir()
    target = tmp_path / "victim" / "tasks.db"
    link = tmp_path / "shared.db"
    link.symlink_to(target)
    _made_by_another_user(link, monkeypatch)
    with pytest.raises(StoreUnavailable, match=r"shared.db: is a symlink made by another user"):
        open_store(path=link)
    assert list((tmp_path / "victim").iterdir()) == []


@pytest.mark.parametrize("suffix", ["-wal", "-shm"])
def test_a_wal_or_shm_this_user_cannot_write_is_refused_naming_it(open_store, db, monkeypatch, suffix):
    """Not "the database is read-only": the task file is fine, the one beside it is left by another user."""
    open_store().close()
    log = f"{db}{suffix}"
    with open(log, "ab"):  # as a process still open on the file keeps it
        pass
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != log and access(path, mode))
    with pytest.raises(StoreUnavailable) as refused:
        open_store()
    assert str(refused.value).startswith(f"{log}: not readable and writable by this process (uid {os.getuid()}; ")
    assert f"the file's owner is uid {os.stat(log).st_uid})" in str(refused.value)


def test_a_path_that_cannot_be_written_is_refused(open_store):
    with pytest.raises(StoreUnavailable):
        open_store(path="/proc/workerpool-tasks.db")


def test_a_corrupt_file_is_refused(open_store, db):
    db.write_bytes(b"this is not a database at all" * 200)
    with pytest.raises(StoreUnavailable, match="not a SQLite database"):
        open_store()


def test_pages_corrupt_past_the_header_are_found_by_the_steps_that_read_them_not_at_start_up(open_store, clock, db):
    """Looking for them at start-up reads the whole file (seconds per hundred MB, in every process): the docs say so."""
    store = open_store()
    store.admit([task(clock, f"t{i}", payload="p" * 100) for i in range(6600)])
    store.close()
    page = int.from_bytes(db.read_bytes()[16:18], "big")
    with open(db, "r+b") as file:
        file.seek(page * 5)
        file.write(b"\xff" * page * 3)
    store = open_store()
    with pytest.raises(StoreUnavailable, match="the database file is corrupt"):
        store.admit([task(clock, "new")])


def test_a_foreign_sqlite_file_is_refused_and_left_alone(open_store, db):
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE invoices (n INTEGER)")
    conn.close()
    with pytest.raises(StoreUnavailable, match="not a workerpool task store"):
        open_store()
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("invoices",)]
    conn.close()


def test_a_file_of_a_newer_schema_is_refused(open_store, db):
    open_store().close()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer version"):
        open_store()


def test_a_file_of_an_older_schema_without_a_migration_is_refused(open_store, db):
    open_store().close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    with pytest.raises(StoreUnavailable, match="cannot be migrated"):
        open_store()


def test_stats_and_health_answer_promptly_while_another_program_holds_the_write_lock(open_store, clock, db):
    # Each waited the busy timeout: /healthz and /metrics, which call them, hung for as long.
    store = open_store(busy_timeout=30)
    store.admit([task(clock, "a"), task(clock, "b")])
    claim(store, clock)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        began = time.monotonic()
        first = store.stats()
        store._held_up_since -= sqlite_store.LOCKED_AFTER_S  # as if a second had passed, no step begun
        later = store.stats()
        store._failure, store._failed_at = "the database is locked", time.monotonic() - 60  # a step failed
        health = store.health()  # tries a write of its own: a failure reported for long enough
        took = time.monotonic() - began
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert took < 10, took  # 0.2 s each at most
    assert first.unavailable is None  # out of reach a moment: contended perhaps, not reported yet
    assert "write lock has been out of reach for 1." in later.unavailable
    for stats in (first, later):
        assert (stats.waiting, stats.due, stats.counts[State.RUNNING]) == (1, 1, 1)  # as last committed
    assert health == "the database is locked"  # the probe could not write: the failure stands
    assert store.stats().unavailable is None
    assert store._held_up_since is None  # a step began: the lock is within reach again
    assert store.health() is None  # the next probe wrote


def test_stats_do_not_wait_for_a_step_of_this_process_held_up_by_another_programs_lock(open_store, clock, db):
    store = open_store(busy_timeout=30)
    store.admit([task(clock, "a")])
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    admitting = threading.Thread(target=lambda: store.admit([task(clock, "b")]), daemon=True)
    try:
        admitting.start()  # takes this process's write lock, then waits for SQLite's
        wait_until(lambda: store._write_lock.locked(), timeout=WAIT_S, what="the admission to wait for the lock")
        began = time.monotonic()
        stats = store.stats()
        took = time.monotonic() - began
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    admitting.join(WAIT_S)
    assert took < 10, took
    assert stats.unavailable is None and stats.waiting == 1  # as last committed; out of reach only a moment
    assert store.stats().waiting == 2


def test_stats_count_the_queue_outside_the_write_lock_after_forgetting_the_expired(open_store, clock, monkeypatch):
    # Counted inside the write step, a probe or a scrape held up every admission and claim meanwhile.
    store = open_store(ttl=10.0)
    store.admit([task(clock, "old"), task(clock, "retry", max_retries=2), task(clock, "later-retry", max_retries=2)])
    store.finish(claim(store, clock).id, 1, "a", result="ok")
    for retry_at in (clock.time() + 5, clock.time() + 60):
        store.finish(claim(store, clock).id, 1, "a", error="boom", retry_at=retry_at)
    store.admit([task(clock, "now"), task(clock, "delayed", next_attempt_at=clock.time() + 60)])
    clock.advance(11)  # "old" is past its time; one retry fell due
    counted_under_lock = []
    figures = sqlite_store._figures

    def counting(conn, now):
        counted_under_lock.append(store._write_lock.locked())
        return figures(conn, now)

    monkeypatch.setattr(sqlite_store, "_figures", counting)
    stats = store.stats()
    assert counted_under_lock == [False]
    assert stats.counts[State.DONE] == 0 and stats.counts[State.QUEUED] == 4
    assert (stats.waiting, stats.due, stats.retries_pending) == (2, 2, 1)


def test_a_locked_database_fails_the_step_and_health_says_why(open_store, clock, db):
    store = open_store(busy_timeout=0.05)
    store.admit([task(clock, "before")])
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"):
            store.admit([task(clock, "during")])
        assert "locked" in store.health()
        assert store.get("before").state is State.QUEUED  # readers are not blocked (WAL)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.admit([task(clock, "after")])
    assert store.health() is None
    assert store.get("during") is None


def _admit_in_thread(store, tasks):
    """Start ``store.admit(tasks)`` in a thread; what it returned or raised lands in the list returned."""
    outcome: list = []

    def admit():
        try:
            outcome.append(store.admit(tasks))
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=admit, daemon=True)
    thread.start()
    return thread, outcome


def test_an_admission_waits_the_busy_timeout_once_behind_a_step_waiting_for_another_programs_lock(
    open_store, clock, db
):
    # A step of this process (a worker's claim) holding the process's lock while it waits for another
    # program's: the admission waited for it, then the busy timeout again for SQLite's lock, about twice.
    store = open_store(busy_timeout=0.05)
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with store._write_lock:  # the step, waiting far longer than the admission's busy timeout
            admitting, outcome = _admit_in_thread(store, [task(clock, "a")])
            admitting.join(WAIT_S)
            assert not admitting.is_alive(), "the admission waited for the step holding the lock"
        # The same for a cancel (DELETE /tasks/<id>).
        with store._write_lock, pytest.raises(StoreUnavailable, match="not free within 0.05 s"):
            store.cancel("a")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert isinstance(outcome[0], StoreUnavailable) and "not free within 0.05 s" in str(outcome[0])
    assert store._admissions == [] and store.get("a") is None
    assert [t.id for t in store.admit([task(clock, "a")])] == ["a"]


def test_an_admission_whose_time_ran_out_while_waiting_leaves_the_batch_and_the_others_wait_on(open_store, clock, db):
    store = open_store(busy_timeout=WAIT_S)
    # One that waited for this process's lock past its deadline, taken with the next one's batch.
    late = sqlite_store._Admission([(task(clock, "late"), '"p"')], time.monotonic())
    store._admissions.append(late)
    blocker = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")

    def release_once_the_late_one_is_answered():
        try:
            wait_until(lambda: late.outcomes is not None, timeout=WAIT_S, what="the late admission answered")
        finally:
            blocker.execute("ROLLBACK")

    releasing = threading.Thread(target=release_once_the_late_one_is_answered, daemon=True)
    releasing.start()
    try:
        admitted = store.admit([task(clock, "b"), task(clock, "c")])
    finally:
        releasing.join(WAIT_S)
        blocker.close()
    assert late.outcomes == [] and "locked" in late.failure
    assert [t.id for t in admitted] == ["b", "c"]
    assert store.get("late") is None


def test_an_admission_whose_wait_timed_out_once_a_step_took_it_gets_that_steps_outcome(open_store, clock):
    store = open_store(busy_timeout=0.05)
    gave_up = threading.Event()
    outcome_of = store._outcome_of

    def giving_up(admission):
        gave_up.set()
        outcome_of(admission)

    store._outcome_of = giving_up
    take_admissions = store._take_admissions
    waiting: list = []

    def take_then_stall(batch):
        if not waiting:  # the step's first take: another admission queues behind it, then gives up waiting
            waiting.extend(_admit_in_thread(store, [task(clock, "waiting")]))
            wait_until(lambda: store._admissions, timeout=WAIT_S, what="the admission queued", interval=0.001)
        else:
            take_admissions(batch)  # the step has begun: it takes the one queued
            assert gave_up.wait(WAIT_S)
        take_admissions(batch)

    store._take_admissions = take_then_stall
    assert [t.id for t in store.admit([task(clock, "a"), task(clock, "b")])] == ["a", "b"]
    thread, outcome = waiting
    thread.join(WAIT_S)
    assert [t.id for t in outcome[0]] == ["waiting"]
    assert store.get("waiting").state is State.QUEUED


# Run in a child: RLIMIT_FSIZE limits the whole process, and a file that
# cannot grow is what a full disk looks like to SQLite.
_FULL_DISK = """
import resource, sys
from workerpool import Task
from workerpool.errors import StoreUnavailable
from workerpool.stores.sqlite import SqliteStore
store = SqliteStore(sys.argv[1], capacity=100_000)
store.admit([Task("kept", "small", 0)])
resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
admitted = 0
try:
    for n in range(10_000):
        store.admit([Task(f"big{n}", "x" * 100_000, 0)])
        admitted += 1
except StoreUnavailable as exc:
    print("refused:", type(exc).__name__, exc)
print("health:", store.health())
print("kept:", store.get("kept").state)
print("stored:", sum(store.get(f"big{n}") is not None for n in range(admitted + 1)), "of", admitted)
"""


def test_a_full_disk_refuses_new_tasks_and_keeps_the_stored_ones(db):
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(db)], capture_output=True, text=True, timeout=120, check=True
    )
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    assert "writing to the disk failed (disk full, file size limit" in lines["refused"]
    assert lines["refused"].startswith("StoreOutOfSpace ")  # nothing stored: a smaller write may pass
    assert "disk full" in lines["health"]
    assert lines["kept"] == "queued"
    stored, admitted = lines["stored"].split(" of ")
    assert stored == admitted  # every admission that returned is stored, the refused one is not


def test_attempts_of_a_process_that_no_longer_exists_are_recovered_before_their_lease_ends(open_store, clock):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_owner = f"{socket.gethostname()}:{int(gone.stdout)}:00000000"
    live_owner = f"{socket.gethostname()}:{os.getpid()}:00000000"
    store = open_store()
    store.admit([task(clock, "dead"), task(clock, "live"), task(clock, "elsewhere")])
    claim(store, clock, owner=dead_owner)
    claim(store, clock, owner=live_owner)
    claim(store, clock, owner=f"another-host:{int(gone.stdout)}:00000000")  # its pids mean nothing here
    assert [(t.id, t.last_error) for t in store.recover(lambda t: None)] == [("dead", LOST_GONE)]
    assert store.get("live").state is store.get("elsewhere").state is State.RUNNING


def test_attempts_of_a_process_that_ended_but_is_not_reaped_yet_are_recovered_before_their_lease_ends(
    open_store, clock
):
    # A zombie (ended, its parent has not waited for it yet) still answers signal 0, but runs nothing.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # it ended; WNOWAIT leaves it unreaped
        store = open_store()
        store.admit([task(clock, "zombie")])
        claim(store, clock, owner=f"{socket.gethostname()}:{child.pid}:00000000")
        assert [(t.id, t.last_error) for t in store.recover(lambda t: None)] == [("zombie", LOST_GONE)]
    finally:
        child.wait(timeout=30)


_STOPPED_OWNER = """
import os, sys
from workerpool.stores import sqlite
store = sqlite.SqliteStore(sys.argv[1], clock=lambda: float(sys.argv[3]))  # the test's fake time
owner = f"{sqlite._HOSTNAME}:{os.getpid()}:00000000"
task = store.claim(owner, float(sys.argv[2]))
print(task.id, flush=True)
sys.stdin.readline()  # stopped (SIGSTOP) meanwhile, then continued
print("ended" if store.finish(task.id, task.attempts, owner, result="late") else "dropped", flush=True)
"""


def test_an_attempt_of_a_stopped_process_on_this_host_is_kept_for_its_lease_and_not_beyond(db, open_store, clock):
    # A process stopped by SIGSTOP (or paused, or too busy to renew) still exists: its attempts are not taken
    # as those of a process gone, nor kept for as long as it exists: the lease settles it, with a reason
    # that does not say the process ended. Continued, the process's end of the attempt is dropped.
    store = open_store()
    store.admit([task(clock, "held", max_retries=1)])
    child = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_OWNER, str(db), repr(clock.time() + LEASE_S), repr(clock.time())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "held"
        child.send_signal(signal.SIGSTOP)
        clock.advance(LEASE_S - 1)
        assert store.recover(lambda t: clock.time()) == []  # its pid exists: only its lease can end it
        assert store.get("held").state is State.RUNNING
        clock.advance(2)
        (recovered,) = store.recover(lambda t: clock.time())
        assert (recovered.id, recovered.state, recovered.attempts) == ("held", State.QUEUED, 1)
        assert recovered.last_error == (
            "lost: its lease expired, not renewed by the process running it (stopped, paused or cut off from the store)"
        )
        child.send_signal(signal.SIGCONT)
        out, _ = child.communicate("\n", timeout=WAIT_S)
        assert out.split() == ["dropped"]
        assert store.get("held").state is State.QUEUED
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGCONT)
            child.kill()
            child.wait(WAIT_S)


class _WalSyncs:
    """Records the fsyncs of ``db``'s WAL; the first one (or the ``hold``-th) can be held until ``release``."""

    def __init__(self, db, real_fsync, *, hold_first: bool = False, hold: int = 1) -> None:
        self.db, self.real_fsync = db, real_fsync
        self.count, self.hold = 0, hold
        self.first_began = threading.Event()  # the held one began
        self.release = threading.Event()
        if not hold_first and hold == 1:
            self.release.set()

    def __call__(self, fd: int) -> None:
        if os.fstat(fd).st_ino == os.stat(f"{self.db}-wal").st_ino:
            self.count += 1
            if self.count == self.hold:
                self.first_began.set()
                assert self.release.wait(WAIT_S)
        self.real_fsync(fd)


def test_with_synchronous_full_a_step_returns_after_an_fsync_of_its_commit_and_a_claim_needs_none(
    open_store, clock, db, monkeypatch
):
    store = open_store(synchronous="FULL")
    syncs = _WalSyncs(db, os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", syncs)
    store.admit([task(clock, "a"), task(clock, "b")])
    assert syncs.count == 1
    first = claim(store, clock)  # lost in a power cut, it runs again: nothing promised is lost
    assert syncs.count == 1
    ended, second = store.finish_and_claim(first.id, 1, "a", lease_until=clock.time() + LEASE_S)
    assert (ended.state, second.id, syncs.count) == (State.DONE, "b", 2)  # one commit, one fsync
    store.stats()  # a step that changes nothing writes nothing
    assert syncs.count == 2


def _failing_fsync(fd):
    raise OSError(5, "Input/output error")


def test_with_synchronous_full_a_failed_fsync_says_the_step_stands(open_store, clock, monkeypatch):
    store = open_store(synchronous="FULL")
    monkeypatch.setattr(os, "fdatasync", _failing_fsync)
    with pytest.raises(StoreNotSynced, match="syncing the WAL failed"):
        store.admit([task(clock, "a")])
    assert store.get("a").state is State.QUEUED  # committed: a client must not send it again
    with pytest.raises(StoreNotSynced) as not_synced:
        store.cancel("a")
    assert store.get("a").state is State.CANCELLED
    cancelled, changed = not_synced.value.result  # what the cancel did, for the caller to report
    assert (cancelled.id, cancelled.state, changed) == ("a", State.CANCELLED, True)


def test_with_synchronous_full_recovered_and_abandoned_attempts_stand_though_their_fsync_failed(
    open_store, clock, monkeypatch
):
    store = open_store(synchronous="FULL")
    store.admit([task(clock, "expired"), task(clock, "mine")])
    store.claim("elsewhere", clock.time() + 1)
    store.claim("me", clock.time() + LEASE_S)
    clock.advance(2)
    monkeypatch.setattr(os, "fdatasync", _failing_fsync)
    with pytest.raises(StoreNotSynced) as recovered:
        store.recover(lambda task: None)
    with pytest.raises(StoreNotSynced) as abandoned:
        store.abandon("abandoned", owner="me")
    # What each step did, for the caller to report: a later step finds nothing left to do.
    assert [(t.id, t.state) for t in recovered.value.result] == [("expired", State.FAILED)]
    assert [(t.id, t.state) for t in abandoned.value.result] == [("mine", State.FAILED)]
    monkeypatch.undo()
    assert store.recover(lambda task: None) == [] and store.abandon("abandoned", owner="me") == []


def test_with_synchronous_full_an_attempts_end_stands_though_its_fsync_failed(open_store, clock, monkeypatch):
    store = open_store(synchronous="FULL")
    store.admit([task(clock, "a"), task(clock, "b"), task(clock, "c")])
    claim(store, clock)
    monkeypatch.setattr(os, "fdatasync", _failing_fsync)
    with pytest.raises(StoreNotSynced) as not_synced:
        store.finish_and_claim("a", 1, "a", lease_until=clock.time() + LEASE_S)
    ended, claimed = not_synced.value.result  # what the step did, for the caller to go on with
    assert (ended.id, ended.state, claimed.id, claimed.state) == ("a", State.DONE, "b", State.RUNNING)
    with pytest.raises(StoreNotSynced) as not_synced:
        store.finish("b", 1, "a", error="boom")
    assert (not_synced.value.result.id, not_synced.value.result.state) == ("b", State.FAILED)
    # A retry that stands is announced to this process's waiting workers, as after a synced end.
    store.claim("a", clock.time() + LEASE_S)
    rescheduled = store._rescheduled
    with pytest.raises(StoreNotSynced) as not_synced:
        store.finish("c", 1, "a", error="boom", retry_at=clock.time() + 1)
    assert not_synced.value.result.state is State.QUEUED and store._rescheduled == rescheduled + 1


def test_a_pool_goes_on_with_an_end_that_stands_though_its_fsync_failed(open_store, clock, monkeypatch, caplog):
    from workerpool import PoolObserver, WorkerPool

    class Heard(PoolObserver):
        def __init__(self):
            self.finished = []

        def attempt_finished(self, task, seconds):
            self.finished.append((task.id, task.state))

    heard = Heard()
    store = open_store(synchronous="FULL")
    pool = WorkerPool(lambda task, cancel: "ok", store=store, threads=False, observers=[heard], clock=clock.time)
    pool.submit("a")
    monkeypatch.setattr(os, "fdatasync", _failing_fsync)
    assert pool.step()  # its end is written once, and heard of: not written again, nor dropped as a late one
    assert heard.finished == [("a", State.DONE)]
    assert store.get("a").state is State.DONE
    assert "could not sync it to disk" in caplog.text and "result dropped" not in caplog.text
    monkeypatch.undo()
    pool.shutdown(timeout=0)


def test_a_pool_reports_the_steps_that_stand_though_their_fsync_failed(open_store, clock, monkeypatch):
    from workerpool import PoolObserver, WorkerPool

    class Heard(PoolObserver):
        def __init__(self):
            self.queued, self.cancelled, self.finished, self.abandoned = [], [], [], []

        def tasks_queued(self, tasks):
            self.queued += [t.id for t in tasks]

        def task_cancelled(self, task):
            self.cancelled.append(task.id)

        def attempt_finished(self, task, seconds):
            self.finished.append((task.id, task.last_error))

        def task_abandoned(self, task):
            self.abandoned.append(task.id)

    heard = Heard()
    store = open_store(synchronous="FULL")
    pool = WorkerPool(store=store, threads=False, observers=[heard], clock=clock.time)
    store.admit([task(clock, "expired"), task(clock, "running")])
    store.claim("host:1:elsewhere", clock.time() + 1)
    store.claim(pool.owner, clock.time() + LEASE_S)
    clock.advance(2)
    monkeypatch.setattr(os, "fdatasync", _failing_fsync)
    with pytest.raises(StoreNotSynced):
        pool.submit("a", delay=1000)  # queued, and stays queued: it stands, so observers hear of it
    with pytest.raises(StoreNotSynced):
        pool.cancel("a")  # cancelled: counted and observed as any cancel, and the caller told
    with pytest.raises(StoreNotSynced):
        pool._recover_once()  # the lease keeper's step: the expired attempt ended as lost
    summary = pool.shutdown(timeout=0)  # abandons the attempt this pool runs
    assert (heard.queued, heard.cancelled, heard.abandoned) == (["a"], ["a"], ["running"])
    assert heard.finished == [("expired", sqlite_store.LOST)]
    assert store.get("a").state is State.CANCELLED
    assert (summary.counts[State.CANCELLED], summary.abandoned) == (1, ("running",))


def test_with_synchronous_full_steps_committed_during_an_fsync_share_the_next_one(open_store, clock, db, monkeypatch):
    store = open_store(synchronous="FULL", capacity=10)
    syncs = _WalSyncs(db, os.fdatasync, hold_first=True)
    monkeypatch.setattr(os, "fdatasync", syncs)
    threads = [threading.Thread(target=store.admit, args=([task(clock, task_id)],)) for task_id in ("a", "b", "c")]
    threads[0].start()
    assert syncs.first_began.wait(WAIT_S)  # "a" is committed and its fsync runs, outside the write lock
    for thread in threads[1:]:
        thread.start()
    reader = open_store()
    deadline = time.monotonic() + WAIT_S
    while not (reader.get("b") and reader.get("c")):  # committed while the first fsync runs
        assert time.monotonic() < deadline, "b and c were not committed during a's fsync"
        threading.Event().wait(0.01)
    syncs.release.set()
    for thread in threads:
        thread.join(WAIT_S)
    assert syncs.count == 2  # a's, then one for both b and c


class _JoinWatch:
    """A lock standing in for the write lock that tells when someone waits for it with a timeout (``joining``)."""

    def __init__(self, lock) -> None:
        self.lock, self.joining = lock, threading.Event()

    def acquire(self, blocking=True, timeout=-1):
        if timeout != -1:
            self.joining.set()
        return self.lock.acquire(blocking, timeout)

    def release(self):
        self.lock.release()

    def locked(self):
        return self.lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc):
        self.release()


class _Joins:
    """Wraps ``store._join_begun``: ``waiting`` is set once an fsync waits for the steps begun to commit."""

    def __init__(self, store) -> None:
        self.join, self.waiting = store._join_begun, threading.Event()
        store._join_begun = self

    def __call__(self) -> None:
        self.waiting.set()
        self.join()


class _HeldOnce:
    """A lock whose first acquirer stops before taking it (``stopped``) until ``go`` is set."""

    def __init__(self, lock) -> None:
        self.lock, self.stopped, self.go = lock, threading.Event(), threading.Event()

    def __enter__(self):
        if not self.stopped.is_set():
            self.stopped.set()
            assert self.go.wait(WAIT_S)
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_with_synchronous_full_an_fsync_waits_for_a_synced_step_begun_and_covers_its_commit_too(
    open_store, clock, db, monkeypatch
):
    store = open_store(synchronous="FULL")
    syncs = _WalSyncs(db, os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", syncs)
    monkeypatch.setattr(sqlite_store, "_JOIN_SYNC_S", WAIT_S)  # the admission below is held for as long as it takes
    flight = _Joins(store)
    store.admit([task(clock, "a")])
    assert (syncs.count, flight.waiting.is_set()) == (1, False)  # alone: synced at once
    first = claim(store, clock)
    # "b" is being admitted: its step has begun, and has not reached the write lock yet.
    store._admissions_lock = held = _HeldOnce(store._admissions_lock)
    admitting = threading.Thread(target=store.admit, args=([task(clock, "b")],))
    admitting.start()
    assert held.stopped.wait(WAIT_S)
    ended = []
    finishing = threading.Thread(
        target=lambda: ended.append(store.finish_and_claim(first.id, 1, "a", lease_until=clock.time() + LEASE_S))
    )
    finishing.start()  # the end of "a" commits, and its fsync waits for "b"'s commit
    try:
        assert flight.waiting.wait(WAIT_S)
        assert syncs.count == 1
    finally:
        held.go.set()
        for thread in (admitting, finishing):
            thread.join(WAIT_S)
    assert ended[0][0].state is State.DONE
    assert syncs.count == 2  # one fsync for the end of "a" and the admission of "b"
    assert store._synced == store._commits


def test_with_synchronous_full_a_commit_an_fsync_covered_waits_for_no_later_fsync(open_store, clock, db, monkeypatch):
    store = open_store(synchronous="FULL")
    syncs = _WalSyncs(db, os.fdatasync, hold=2)
    monkeypatch.setattr(os, "fdatasync", syncs)
    store.admit([task(clock, "a"), task(clock, "b")])  # committed and synced: the first fsync
    admitted = store._commits
    claim(store, clock)
    syncing = threading.Thread(target=store._sync_wal, args=(store._commits,))  # a step syncing the claim too
    syncing.start()
    try:
        assert syncs.first_began.wait(WAIT_S)  # the second fsync runs, and is held
        # A step whose commit the first fsync covered (a submitter coming back for its answer late)
        # returns at once: it does not wait for the fsync running now.
        covered = threading.Thread(target=store._sync_wal, args=(admitted,))
        covered.start()
        covered.join(WAIT_S / 2)
        assert not covered.is_alive()
        assert syncs.count == 2
    finally:
        syncs.release.set()
        syncing.join(WAIT_S)
    assert store._synced == store._commits


def test_with_synchronous_full_an_fsync_waits_for_no_step_that_needs_none(open_store, clock, db, monkeypatch):
    held, release, stalling_clock = stalling(clock)
    store = open_store(synchronous="FULL", clock=clock.time)
    syncs = _WalSyncs(db, os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", syncs)
    flight = _Joins(store)
    store.admit([task(clock, "a"), task(clock, "b")])
    first = claim(store, clock)
    store._clock = stalling_clock  # the next step reading the clock holds the write lock until release
    store._write_lock = watch = _JoinWatch(store._write_lock)
    claiming = threading.Thread(target=claim, args=(store, clock))  # a claim needs no fsync of its own
    claiming.start()
    try:
        assert held.wait(WAIT_S)
        # What a step that must be durable does once committed (here for the claim of "a"): with no
        # other synced step begun, it syncs at once, while the claim of "b" still writes.
        store._sync_wal(store._commits)
        assert syncs.count == 2
        assert not flight.waiting.is_set() and not watch.joining.is_set()
    finally:
        release.set()
        claiming.join(WAIT_S)
    assert first.id == "a"


def stalling(clock):
    """A clock whose first reader (a step holding the write lock) waits until ``release`` is set."""
    held, release = threading.Event(), threading.Event()

    def stalling_clock():
        if not held.is_set():
            held.set()
            assert release.wait(WAIT_S)
        return clock.time()

    return held, release, stalling_clock


def start_queued_in_order(store, threads):
    """Start each admitting thread once the one before it has queued behind the held write lock."""
    for queued, thread in enumerate(threads, 1):
        thread.start()
        wait_until(lambda n=queued: len(store._admissions) >= n, timeout=WAIT_S, what="queued", interval=0.001)


def test_admissions_waiting_for_the_write_lock_are_written_together(open_store, clock, db, monkeypatch):
    held, release, stalling_clock = stalling(clock)
    store = open_store(synchronous="FULL", capacity=4, clock=stalling_clock)
    syncs = _WalSyncs(db, os.fdatasync)
    monkeypatch.setattr(os, "fdatasync", syncs)
    monkeypatch.setattr(sqlite_store, "_JOIN_SYNC_S", WAIT_S)  # however long the three take to commit
    commits = store._commits
    outcomes: dict[str, list] = {}

    def submit(name, *ids):
        outcomes[name] = store.admit([task(clock, task_id) for task_id in ids])

    # Two tasks: a transaction, which reads the clock (a single task's admission reads none).
    first = threading.Thread(target=submit, args=("first", "a", "a2"))
    first.start()
    assert held.wait(WAIT_S)  # "a" and "a2" hold the write lock
    waiting = [
        threading.Thread(target=submit, args=(name, *ids))
        for name, ids in (("b", ("b",)), ("again", ("b", "a")), ("full", ("c", "d")))
    ]
    start_queued_in_order(store, waiting)
    release.set()
    for thread in (first, *waiting):
        thread.join(WAIT_S)
    # a and a2's commit, then one commit for the three waiting; its fsync waited for it (begun): one fsync
    assert (store._commits - commits, syncs.count) == (2, 1)
    # The outcomes of admitting them one after the other, in the order they queued.
    assert [t.id for t in outcomes["first"]] == ["a", "a2"]
    assert [t.id for t in outcomes["b"]] == ["b"]
    assert [type(o) for o in outcomes["again"]] == [DuplicateTask, DuplicateTask]
    assert [type(o) for o in outcomes["full"]] == [Task, QueueFull]  # capacity 4: a, a2, b, c
    assert sorted(t.id for t in store.list()) == ["a", "a2", "b", "c"]


def test_an_admission_that_arrives_while_the_transaction_begins_joins_it(open_store, clock):
    # The sqlite3 module lets other threads run during each statement: a request reaching admit
    # then is written by the transaction under way rather than waiting for the next one.
    store = open_store()
    begin = store._begin
    late = threading.Thread(target=lambda: outcomes.append(store.admit([task(clock, "late")])))
    outcomes: list[list] = []

    def begin_while_another_arrives(*args):
        began = begin(*args)
        if not late.is_alive() and not outcomes:
            late.start()
            # it has queued behind the write lock this thread holds
            wait_until(lambda: store._admissions, timeout=WAIT_S, what="the late admission queued", interval=0.001)
        return began

    store._begin = begin_while_another_arrives
    commits = store._commits
    # Two tasks: a transaction (a single task's admission is one statement, which nothing can join).
    assert [t.id for t in store.admit([task(clock, "first"), task(clock, "second")])] == ["first", "second"]
    late.join(WAIT_S)
    assert [t.id for t in outcomes[0]] == ["late"]
    assert store._commits == commits + 1  # one transaction wrote both
    assert [t.id for t in store.list()] == ["late", "second", "first"]


@pytest.mark.parametrize(
    "value", ["x" * 64, "", {"b": [1, 2.5, None, True], "a": "é😀"}, [{"k": "\u2028"}], 1e300, -0.0, "a\ud800"]
)
def test_payloads_are_written_as_compact_json_keeping_non_ascii_text(value):
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if "\ud800" in str(value):  # no UTF-8 form: kept escaped
        expected = json.dumps(value, separators=(",", ":"))
    assert sqlite_store._json(value) == expected
    assert json.loads(sqlite_store._json(value)) == value


def test_a_payload_that_is_not_json_fails_only_its_own_admission(open_store, clock):
    store = open_store()
    with pytest.raises(TypeError):
        store.admit([task(clock, "bad", payload=object())])
    assert store.admit([task(clock, "good")])[0].id == "good"
    assert store.get("bad") is None


def test_an_admission_knows_the_generation_it_wrote(open_store, clock):
    # Its own workers' polls tell its admissions from other processes' work by this number.
    one, two = open_store(), open_store()
    one.admit([task(clock, "a")])
    two.admit([task(clock, "b"), task(clock, "c")])
    one.admit([task(clock, "d")])
    assert one._generation == one._read_generation() == two._generation + 1
    one.admit([task(clock, "d")])  # refused: no new work, the generation stays
    assert one._read_generation() == one._generation


def test_each_task_admitted_is_a_generation_of_this_process(open_store, clock):
    # Idle workers of this process must not take its own admissions for another process's work.
    store = open_store()
    before = store._read_generation()
    store.admit([task(clock, "a"), task(clock, "b"), task(clock, "a")])
    assert store._read_generation() == store._generation == before + 2
    with store._wakeup:
        assert store._only_ours(before, before + 2)


def admit_behind_a_transaction(open_store, clock, waiting, before_release=lambda store: None):
    """Admit "a" and "a2" in a transaction holding the write lock until the admissions of ``waiting``
    ((name, tasks) pairs) have queued behind it in order; the store and each admission's outcome by name
    ("first" for "a" and "a2"): its tasks, or what it raised."""
    held, release, stalling_clock = stalling(clock)
    store = open_store(clock=stalling_clock)
    outcomes: dict[str, object] = {}

    def submit(name, tasks):
        try:
            outcomes[name] = store.admit(list(tasks))
        except Exception as exc:  # noqa: BLE001  (the outcome under test)
            outcomes[name] = exc

    # Two tasks: a transaction, which reads the clock (a single task's admission reads none).
    first = threading.Thread(target=submit, args=("first", (task(clock, "a"), task(clock, "a2"))))
    first.start()
    assert held.wait(WAIT_S)  # "a" and "a2" hold the write lock
    threads = [threading.Thread(target=submit, args=(name, tasks)) for name, tasks in waiting]
    start_queued_in_order(store, threads)
    before_release(store)
    release.set()
    for thread in (first, *threads):
        thread.join(WAIT_S)
    return store, outcomes


def test_an_error_raised_by_one_admission_of_a_batch_fails_only_that_admission(open_store, clock):
    # A huge integer cannot be bound to a statement (OverflowError from the sqlite3 module): the
    # admission carrying it fails, the others waiting with it in the same batch are admitted.
    store, outcomes = admit_behind_a_transaction(open_store, clock, [
        ("before", (task(clock, "b"),)),
        ("huge", (task(clock, "c"), task(clock, "huge", max_retries=2**70))),
        ("after", (task(clock, "d"),)),
    ])  # fmt: skip
    assert isinstance(outcomes["huge"], OverflowError)
    assert [t.id for t in outcomes["first"]] == ["a", "a2"]
    assert [t.id for t in outcomes["before"]] == ["b"]
    assert [t.id for t in outcomes["after"]] == ["d"]
    assert sorted(t.id for t in store.list()) == ["a", "a2", "b", "d"]  # nothing of the failed admission is stored
    assert store.stats().waiting == 4
    assert store.health() is None


def test_an_error_fails_the_admission_that_raised_it_not_an_equal_one_before_it(open_store, clock, monkeypatch):
    # Two admissions of the same task (same id, same creation time: equal values) wait in one batch,
    # and only the second one's insert raises. The second one fails; the first is admitted, and its
    # caller answered (an admission taken out of the batch by value would leave it without outcomes).
    inserts = []
    insert = SqliteStore._insert

    def failing_second_insert(conn, task, payload):
        if task.id == "x":
            inserts.append(task)
            if len(inserts) == 2:
                raise RuntimeError("the second insert of x")
        return insert(conn, task, payload)

    monkeypatch.setattr(SqliteStore, "_insert", staticmethod(failing_second_insert))

    def equal_not_same(store):
        assert store._admissions[0].tasks == store._admissions[1].tasks

    store, outcomes = admit_behind_a_transaction(
        open_store, clock, [(name, (task(clock, "x"),)) for name in ("one", "two")], equal_not_same
    )
    assert [t.id for t in outcomes["first"]] == ["a", "a2"]
    assert [t.id for t in outcomes["one"]] == ["x"]
    assert isinstance(outcomes["two"], RuntimeError)
    assert sorted(t.id for t in store.list()) == ["a", "a2", "x"]
    assert store.stats().waiting == 3


def test_a_single_task_that_cannot_be_bound_fails_its_admission_alone(open_store, clock):
    store = open_store()
    with pytest.raises(OverflowError):
        store.admit([task(clock, "huge", max_retries=2**70)])
    assert store.get("huge") is None and store.stats().waiting == 0
    assert not store._writer.in_transaction
    assert [t.id for t in store.admit([task(clock, "next")])] == ["next"]
    assert store.health() is None


def test_an_end_that_claims_next_keeps_retention_whether_it_claims_or_reads_first(open_store, clock):
    store = open_store(max_finished=2)

    def end(current):
        return store.finish_and_claim(current.id, current.attempts, "a", lease_until=clock.time() + LEASE_S)

    def answered(*ids):  # admitted, and each ticket answered by a waiting worker (as in a pool)
        store.admit([task(clock, task_id) for task_id in ids])
        for _ in ids:
            store.wait_for_work(None)

    store.admit([task(clock, f"t{n}") for n in range(3)])
    current = claim(store, clock)
    while current is not None:  # tickets unanswered: each end claims first
        clock.advance(1)
        _, current = end(current)
    assert store.stats().counts[State.DONE] == 2
    answered("t3", "t4")
    clock.advance(1)
    ended, current = end(claim(store, clock))  # nothing unanswered: the end reads first, and t4 is due
    assert (ended.id, current.id) == ("t3", "t4")
    clock.advance(1)
    ended, current = end(current)
    assert (ended.id, current) == ("t4", None)
    assert [t.id for t in store.list(State.DONE)] == ["t4", "t3"]
    assert store.stats().counts[State.DONE] == 2


def test_an_end_reads_retentions_count_with_the_end_itself_not_in_a_statement_of_its_own(open_store, clock):
    # Under the write lock, a read of totals of its own costs about as much as the end: the end returns the count.
    store = open_store(max_finished=1)
    store.admit([task(clock, f"t{n}") for n in range(3)])
    traced: list[str] = []
    first = claim(store, clock)
    store._writer.set_trace_callback(traced.append)
    clock.advance(1)
    ended, second = store.finish_and_claim(first.id, first.attempts, "a", lease_until=clock.time() + LEASE_S)
    clock.advance(1)
    last = store.finish(second.id, second.attempts, "a")
    store._writer.set_trace_callback(None)
    assert (ended.id, second.id, last.id) == ("t0", "t1", "t1")
    assert [sql for sql in traced if sql.startswith(sqlite_store._FINISHED)] == []
    assert sum(sql.startswith("UPDATE tasks SET state = CASE") for sql in traced) == 2  # the two ends
    assert [t.id for t in store.list(State.DONE)] == ["t1"]  # retention still counts: t0 forgotten
    assert store.get("t0") is None
    assert store.stats().counts[State.DONE] == 1


def test_the_wal_is_copied_into_the_database_after_a_step_not_under_the_write_lock(open_store, clock, db, monkeypatch):
    # SQLite's own checkpoint runs inside a commit, while the step holds the write lock every other
    # thread of the process waits for.
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 3)
    store = open_store()
    checkpoints = []  # whether the write lock was held at each
    store._connection().set_trace_callback(
        lambda sql: "wal_checkpoint" in sql and checkpoints.append(store._write_lock.locked())
    )
    size = os.path.getsize(db)
    for n in range(7):
        store.admit([task(clock, f"t{n}")])
    assert len(checkpoints) == 2 and not any(checkpoints)
    assert os.path.getsize(db) > size  # the pages written since are in the database file


def test_a_commit_leaves_the_wal_to_the_checkpoints_after_the_steps(open_store, clock, db, monkeypatch):
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 10**9)
    store = open_store(capacity=1000)
    size = os.path.getsize(db)
    for n in range(300):  # about 1,500 pages: past SQLite's own threshold of 1,000
        store.admit([task(clock, f"t{n}")])
    assert os.path.getsize(f"{db}-wal") > 1000 * 4096
    assert os.path.getsize(db) == size


def test_a_wal_grown_past_its_limit_while_a_reader_held_it_shrinks_back_once_checkpoints_catch_up(
    open_store, clock, db, monkeypatch
):
    # An open read transaction on the file (an operator's sqlite3 shell) stops every checkpoint at its
    # snapshot: the WAL grows with each step, and SQLite keeps the file at that size unless told a limit.
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 5)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 5)
    monkeypatch.setattr(sqlite_store, "_WAL_SIZE_LIMIT", 64 * 1024)
    store = open_store(capacity=1000)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()
        for n in range(100):
            store.admit([task(clock, f"t{n}")])
        grown = os.path.getsize(f"{db}-wal")
        assert grown > 4 * 64 * 1024
        reader.execute("COMMIT")
    finally:
        reader.close()
    for n in range(100, 120):  # a checkpoint copies the whole WAL, the WAL restarts, the commit after truncates
        store.admit([task(clock, f"t{n}")])
    assert os.path.getsize(f"{db}-wal") <= 64 * 1024 + 10 * 4096
    assert len(store.list(State.QUEUED, limit=1000)) == 120


def test_a_checkpoint_that_fails_fails_no_step(open_store, clock, monkeypatch):
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 1)
    store = open_store()

    class Unwritable:
        def execute(self, sql, *args):
            raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store, "_connection", Unwritable)
    assert [t.id for t in store.admit([task(clock, "a")])] == ["a"]
    assert store.health() is None


def _checkpoint_every_second_commit(monkeypatch):
    """Checkpoints due at every second commit, admissions' too, and the WAL restarted at any length."""
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 2)
    monkeypatch.setattr(sqlite_store, "_WAL_RESTART_PAGES", 1)


def _checkpointed_ids(db, tmp_path):
    """The ids of the tasks in the database file without its WAL (what the checkpoints copied), in order."""
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    conn = sqlite3.connect(copy)
    try:
        return conn.execute("SELECT id FROM tasks ORDER BY seq").fetchall()
    finally:
        conn.close()


def test_close_copies_every_task_into_the_database_file_while_another_process_has_it_open(
    open_store, clock, db, tmp_path, monkeypatch
):
    # SQLite copies the WAL in when the last connection closes: with another process still on the file
    # (the next worker of a server that stops), a plain copy of the file alone held none of the tasks.
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 10**9)
    store = open_store()
    other = open_store()
    for n in range(5):
        store.admit([task(clock, f"t{n}")])
    store.close()
    assert _checkpointed_ids(db, tmp_path) == [(f"t{n}",) for n in range(5)]
    assert os.path.getsize(f"{db}-wal") == 0
    assert [t.id for t in other.admit([task(clock, "after")])] == ["after"]


def test_the_documented_backup_of_a_file_in_use_holds_every_task_on_its_own(
    open_store, clock, db, tmp_path, monkeypatch
):
    notes = (PROJECT_ROOT / "docs" / "stores.md").read_text()
    command = "sqlite3.connect('/data/tasks.db').backup(sqlite3.connect('/backup/tasks.db'))"
    assert command in notes and 'sqlite3 /data/tasks.db ".backup /backup/tasks.db"' in notes
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 10**9)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 10**9)
    store = open_store()
    for n in range(5):
        store.admit([task(clock, f"t{n}")])
    assert claim(store, clock).id == "t0"
    backup = tmp_path / "backup" / "tasks.db"
    backup.parent.mkdir()
    exec(command.replace("/data/tasks.db", str(db)).replace("/backup/tasks.db", str(backup)), {"sqlite3": sqlite3})
    alone = tmp_path / "alone" / "tasks.db"  # the backup file without anything beside it
    alone.parent.mkdir()
    shutil.copyfile(backup, alone)
    restored = open_store(path=alone)
    assert [restored.get(f"t{n}").state for n in range(5)] == [State.RUNNING] + [State.QUEUED] * 4


def test_once_the_wal_is_long_what_was_committed_during_a_checkpoint_is_copied_under_the_write_lock(
    open_store, clock, db, tmp_path, monkeypatch
):
    # A checkpoint beside other threads' commits never reaches the WAL's end, and SQLite writes the WAL
    # from its beginning again only after one did: without this, the WAL grows to the backstop's size.
    _checkpoint_every_second_commit(monkeypatch)
    store = open_store(capacity=10)  # its schema is commit 1
    held = []  # whether the write lock was held at each checkpoint

    def commit_during_the_first_checkpoint(sql):
        if "wal_checkpoint" in sql:
            held.append(store._write_lock.locked())
            if len(held) == 1:
                other = threading.Thread(target=store.admit, args=([task(clock, "during")],))
                other.start()
                other.join(WAIT_S)

    store._connection().set_trace_callback(commit_during_the_first_checkpoint)
    store.admit([task(clock, "a")])  # commit 2: a checkpoint is due
    assert held == [False, True]
    assert _checkpointed_ids(db, tmp_path) == [("a",), ("during",)]


def test_once_the_wal_is_long_what_another_process_committed_during_a_checkpoint_is_copied_under_sqlites_lock(
    open_store, clock, db, tmp_path, monkeypatch
):
    # With several processes on the file, the copy after a checkpoint must keep all of them from
    # committing (the process's own lock kept only its own threads): otherwise the copy never reaches
    # the WAL's end, and the WAL never restarts.
    _checkpoint_every_second_commit(monkeypatch)
    store = open_store(capacity=10)  # its schema is commit 1
    elsewhere = open_store(capacity=10)  # another process's store on the same file
    outsider = sqlite3.connect(db, isolation_level=None, timeout=0)
    reader = store._connection()
    writable = []  # at the end of each checkpoint: whether SQLite's write lock was free

    class Checkpointing:
        """The reading connection; a commit of the other process follows the first checkpoint's copy."""

        def execute(self, sql, *args):
            cursor = reader.execute(sql, *args)  # a PRAGMA's row is computed here: the copy is done
            if "wal_checkpoint" in sql:
                try:
                    outsider.execute("BEGIN IMMEDIATE")
                    outsider.rollback()
                    writable.append(True)
                except sqlite3.OperationalError:
                    writable.append(False)
                if len(writable) == 1:
                    elsewhere.admit([task(clock, "elsewhere")])
            return cursor

    monkeypatch.setattr(store, "_connection", Checkpointing)
    try:
        store.admit([task(clock, "a")])  # commit 2: a checkpoint is due
    finally:
        outsider.close()
    assert writable == [True, False]
    assert _checkpointed_ids(db, tmp_path) == [("a",), ("elsewhere",)]


def test_a_write_step_begins_and_commits_with_one_call_into_sqlite_each(open_store, clock):
    # execute hands the interpreter to other threads five times per statement (its parameters, the
    # step, its columns, the last row id, the reset), each a chance for them to take it while the
    # step holds the write lock; executescript, commit and rollback once.
    store = open_store()
    store.admit([task(clock, "warm"), task(clock, "warm too")])  # connections opened, statements prepared
    calls = []

    def profile(frame, event, arg):
        if event == "c_call" and isinstance(getattr(arg, "__self__", None), sqlite3.Connection):
            calls.append(arg.__name__)

    sys.setprofile(profile)
    try:
        store.admit([task(clock, "a"), task(clock, "b")])
        batch, calls[:] = calls[:], []
        store.admit([task(clock, "alone")])
    finally:
        sys.setprofile(None)
    # begin, the read, the two inserts, commit
    assert batch == ["executescript", "execute", "execute", "execute", "commit"]
    assert calls == ["execute"]  # one task: one statement, which commits itself


def test_an_admission_leaves_the_checkpoint_to_the_other_steps_unless_they_left_it_long(open_store, clock, monkeypatch):
    # A submitter waiting for a checkpoint's fsyncs holds up the tasks it would submit next.
    monkeypatch.setattr(sqlite_store, "_CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(sqlite_store, "_ADMISSION_CHECKPOINTS_AFTER", 5)
    store = open_store(capacity=20)  # its schema is commit 1
    checkpoints = []  # the commits of this process counted at each
    store._connection().set_trace_callback(lambda sql: "wal_checkpoint" in sql and checkpoints.append(store._commits))
    for n in range(3):  # commits 2 to 4
        store.admit([task(clock, f"t{n}")])
    assert checkpoints == []
    claim(store, clock)  # commit 5: a worker's step checkpoints
    assert checkpoints == [5]
    for n in range(3, 8):  # commits 6 to 10: no other step comes
        store.admit([task(clock, f"t{n}")])
    assert checkpoints == [5, 10]


def _a_busy_error(db) -> sqlite3.OperationalError:
    """A real "database is locked" error of SQLite's (SQLITE_BUSY)."""
    blocker = sqlite3.connect(db, isolation_level=None)
    other = sqlite3.connect(db, isolation_level=None, timeout=0)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        other.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        return exc
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
        other.close()
    raise AssertionError("no lock was met")


def _new_connections_meet_a_lock(monkeypatch, db, times: float) -> None:
    """The first ``times`` statements run by connections opened from now on fail as if the file were locked."""
    busy, real_connect = _a_busy_error(db), sqlite3.connect
    left = [times]

    class MeetsALock(sqlite3.Connection):
        def execute(self, sql, *args):
            if left[0] > 0:
                left[0] -= 1
                raise busy
            return super().execute(sql, *args)

    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: real_connect(*a, factory=MeetsALock, **k))


def in_a_new_thread(call):
    """``call()`` on a thread of its own (so the store opens a reading connection for it): its result or exception."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert outcome, "the call did not return"
    return outcome[0]


def test_a_new_connection_whose_first_statement_meets_a_lock_waits_for_it(open_store, clock, db, monkeypatch):
    # A process opening a connection while another recovers the file after a crash meets a lock at once.
    store = open_store()
    store.admit([task(clock, "t")])
    _new_connections_meet_a_lock(monkeypatch, db, times=2)
    found = in_a_new_thread(lambda: store.get("t"))
    assert isinstance(found, Task) and found.state is State.QUEUED, found


def test_a_new_connection_that_stays_locked_is_a_store_failure_not_an_error_of_sqlite(
    open_store, clock, db, monkeypatch
):
    store = open_store(busy_timeout=0.05)
    store.admit([task(clock, "t")])
    _new_connections_meet_a_lock(monkeypatch, db, times=math.inf)
    for read in (lambda: store.get("t"), lambda: store.unfinished("someone"), lambda: store.list()):
        failed = in_a_new_thread(read)
        assert isinstance(failed, StoreUnavailable) and "locked" in str(failed), repr(failed)


def test_a_step_whose_rollback_was_cut_short_has_its_writes_rolled_back_by_the_next_one(open_store, clock):
    store = open_store()
    with store._write_lock:  # a step that wrote, then lost its rollback to an interrupt
        conn, _ = store._begin()
        sqlite_store.SqliteStore._insert(conn, task(clock, "half-done"), '"payload"')
    store.admit([task(clock, "next")])
    assert store.get("half-done") is None
    assert store.get("next").state is State.QUEUED


@pytest.mark.slow
def test_an_attempt_still_running_while_the_file_is_locked_longer_than_its_lease_is_renewed_not_lost(tmp_path, caplog):
    # As tests/test_redis_store.py does with Redis out: another connection holds the write lock for 2.5
    # leases, so no process can renew or sweep. Once the lock is released the sweeper sweeps first (the
    # owner's renewals wait for that); it holds back the leases that expired meanwhile, and the owner renews.
    lease = 1.0
    db = tmp_path / "tasks.db"
    back = threading.Event()  # the lock is released
    swept = threading.Event()  # and the sweeper has swept since
    sweeps: list[int] = []  # one entry per sweep after the lock

    class Sweeper(SqliteStore):
        def recover(self, *args, **kwargs):
            recovered = super().recover(*args, **kwargs)
            if back.is_set():
                sweeps.append(len(recovered))
                swept.set()
            return recovered

    class Owner(SqliteStore):
        def renew(self, *args, **kwargs):
            if back.is_set():
                swept.wait(WAIT_S)
            return super().renew(*args, **kwargs)

    gate = Gate()
    pools = []
    try:

        def pool(store_class, handler) -> WorkerPool:
            pools.append(WorkerPool(handler, store=store_class(db, busy_timeout=0.3), workers=1, lease=lease))
            return pools[-1]

        owner = pool(Owner, gate)
        owner.submit("held")
        gate.wait_started()
        sweeper = pool(Sweeper, instant)
        sweeper.start()
        locker = sqlite3.connect(db, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            threading.Event().wait(2.5 * lease)  # the length of the lock, not a wait for another thread
            locker.execute("COMMIT")
        finally:
            locker.close()
        back.set()
        # Sweeps a third of a lease apart: the sweeper's hold (a lease) has ended by the sixth.
        wait_until(lambda: len(sweeps) >= 6, timeout=WAIT_S, what="the sweeper to sweep after the lock")
        task = sweeper.get("held")
        assert (task.state, task.attempts) == (State.RUNNING, 1), task
        gate.open()
        wait_until(lambda: owner.get("held").state is State.DONE, timeout=WAIT_S, what="the attempt to end")
        assert owner.get("held").attempts == 1
        assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text
    finally:
        gate.open()
        for each in pools:
            each.shutdown(timeout=0)


@pytest.mark.slow
def test_a_process_that_starts_while_the_file_is_locked_does_not_count_a_live_attempt_lost(tmp_path, caplog):
    # A new instance (or gunicorn's replacement of a worker) starts 1.5 leases into a lock that lets the
    # owner's lease expire: it cannot know when the lock began, so it holds back every lease that expired
    # before its first answer, and the owner renews. The owner's renewals from the lock on wait for the new
    # process's first sweep after it (one already under way when the lock ends would make the test pass).
    lease = 1.0
    db = tmp_path / "tasks.db"
    locked = threading.Event()  # the lock is about to be taken
    back = threading.Event()  # the lock is released
    swept = threading.Event()  # and the new process has swept since
    sweeps: list[int] = []  # one entry per sweep after the lock

    class Sweeper(SqliteStore):
        def recover(self, *args, **kwargs):
            recovered = super().recover(*args, **kwargs)
            if back.is_set():
                sweeps.append(len(recovered))
                swept.set()
            return recovered

    class Owner(SqliteStore):
        def renew(self, *args, **kwargs):
            if locked.is_set():
                swept.wait(WAIT_S)
            return super().renew(*args, **kwargs)

    gate = Gate()
    pools = []
    try:
        owner = WorkerPool(gate, store=Owner(db, busy_timeout=0.3), workers=1, lease=lease)
        pools.append(owner)
        owner.submit("held")
        gate.wait_started()
        sweeper_store = Sweeper(db, busy_timeout=0.3)  # opened before the lock: the process's start follows
        locker = sqlite3.connect(db, isolation_level=None)
        locked.set()
        try:
            locker.execute("BEGIN EXCLUSIVE")
            threading.Event().wait(1.5 * lease)  # the owner's lease expires under the lock
            sweeper = WorkerPool(instant, store=sweeper_store, workers=1, lease=lease)
            pools.append(sweeper)
            sweeper.start()
            threading.Event().wait(1.0 * lease)  # the length of the lock, not a wait for another thread
            locker.execute("COMMIT")
        finally:
            locker.close()
        back.set()
        wait_until(lambda: len(sweeps) >= 6, timeout=WAIT_S, what="the new process to sweep after the lock")
        task = sweeper.get("held")
        assert (task.state, task.attempts) == (State.RUNNING, 1), task
        gate.open()
        wait_until(lambda: owner.get("held").state is State.DONE, timeout=WAIT_S, what="the attempt to end")
        assert owner.get("held").attempts == 1
        assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text
    finally:
        gate.open()
        for each in pools:
            each.shutdown(timeout=0)


@pytest.mark.slow
def test_a_second_lock_soon_after_a_long_one_extends_the_hold_instead_of_ending_it(tmp_path, caplog):
    # The file is locked for 2.5 leases, free for a moment in which the sweeper sweeps once, then locked
    # again for one of its steps (a second long transaction, a backup tool's next pass). The owner could
    # not renew in the moment between (its renewals wait for the sweeper's first sweep after the second
    # lock): the leases of the first lock stay held back until a lease after the second.
    lease = 1.0
    db = tmp_path / "tasks.db"
    locked = threading.Event()  # the first lock is about to be taken
    between = threading.Event()  # the sweeper swept between the locks
    failed = threading.Event()  # a sweeper's step failed under the second lock
    back = threading.Event()  # the second lock is released
    swept = threading.Event()  # and the sweeper has swept since
    sweeps: list[int] = []  # one entry per sweep after the second lock

    class Sweeper(SqliteStore):
        def recover(self, *args, **kwargs):
            try:
                recovered = super().recover(*args, **kwargs)
            except StoreUnavailable:
                if between.is_set():
                    failed.set()
                raise
            if back.is_set():
                sweeps.append(len(recovered))
                swept.set()
            elif locked.is_set():
                between.set()
            return recovered

    class Owner(SqliteStore):
        def renew(self, *args, **kwargs):
            if locked.is_set():
                swept.wait(WAIT_S)
            return super().renew(*args, **kwargs)

    gate = Gate()
    pools = []
    try:
        owner = WorkerPool(gate, store=Owner(db, busy_timeout=0.3), workers=1, lease=lease)
        pools.append(owner)
        owner.submit("held")
        gate.wait_started()
        sweeper = WorkerPool(instant, store=Sweeper(db, busy_timeout=0.3), workers=1, lease=lease)
        pools.append(sweeper)
        sweeper.start()
        locker = sqlite3.connect(db, isolation_level=None)
        try:
            locked.set()
            locker.execute("BEGIN EXCLUSIVE")
            threading.Event().wait(2.5 * lease)  # the length of the lock, not a wait for another thread
            locker.execute("COMMIT")
            assert between.wait(WAIT_S)
            locker.execute("BEGIN EXCLUSIVE")
            assert failed.wait(WAIT_S)
            locker.execute("COMMIT")
        finally:
            locker.close()
        back.set()
        wait_until(lambda: len(sweeps) >= 6, timeout=WAIT_S, what="the sweeper to sweep after the second lock")
        task = sweeper.get("held")
        assert (task.state, task.attempts) == (State.RUNNING, 1), task
        gate.open()
        wait_until(lambda: owner.get("held").state is State.DONE, timeout=WAIT_S, what="the attempt to end")
        assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text
    finally:
        gate.open()
        for each in pools:
            each.shutdown(timeout=0)


def _remove(db):
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink()


def _replace(db):  # with its WAL and shared memory: another task file altogether
    fresh = db.with_name("fresh.db")
    SqliteStore(fresh).close()
    _remove(db)
    os.replace(fresh, db)


@pytest.mark.parametrize("change", [_remove, _replace], ids=["removed", "replaced"])
def test_a_task_file_removed_or_replaced_while_open_refuses_new_tasks_and_runs_the_ones_it_holds(
    open_store, clock, db, monkeypatch, caplog, change
):
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 0.0, raising=False)  # every admission looks
    store = open_store()
    store.admit([task(clock, "running"), task(clock, "queued")])
    assert claim(store, clock).id == "running"
    change(db)

    with pytest.raises(StoreFileReplaced) as refused:
        store.admit([task(clock, "after")])
    assert "removed" in str(refused.value) or "replaced" in str(refused.value)
    assert [r.levelname for r in caplog.records if "while this process had it open" in r.message] == ["ERROR"]
    assert store.health() == str(refused.value)
    _finish_the_tasks_accepted_before(store, clock)
    with pytest.raises(StoreFileReplaced):  # for good: the old file is still the one open
        store.admit([task(clock, "later")])
    assert (store.health() or "").startswith(str(db))
    # Nothing was written to the file now at the path (none was created where it was removed).
    if change is _remove:
        assert not db.exists()
    else:
        fresh = open_store()
        assert fresh.get("running") is None and fresh.get("after") is None and fresh.health() is None


def _finish_the_tasks_accepted_before(store, clock) -> None:
    """The tasks accepted before the change still run here, and read back done from another thread too."""
    store.finish("running", 1, "a")
    assert claim(store, clock).id == "queued"
    store.finish("queued", 1, "a")
    states = {}
    reader = threading.Thread(target=lambda: states.update({t: store.get(t).state for t in ("running", "queued")}))
    reader.start()
    reader.join(WAIT_S)
    assert states == {"running": State.DONE, "queued": State.DONE}
    assert store.get("after") is None


def _remove_log(log):
    log.unlink()


def _replace_log(log):  # e.g. a copy put back
    copy = log.with_name("copy")
    shutil.copyfile(log, copy)
    os.replace(copy, log)


@pytest.mark.parametrize("change", [_remove_log, _replace_log], ids=["removed", "replaced"])
@pytest.mark.parametrize("suffix", ["-wal", "-shm", ""], ids=["-wal", "-shm", "task-file-alone"])
def test_a_wal_or_shm_file_removed_or_replaced_while_open_cuts_the_process_off_the_files(
    open_store, clock, db, monkeypatch, caplog, suffix, change
):
    """The task file stays, but the log beside it that holds the latest tasks (or the index every process
    shares) is no longer the one open here (or the task file went, and they stay): what this process accepts
    from then on would be lost, and any step it takes through the files it has open, which a process opening
    the path shares with files this one does not see, would corrupt them. It takes none from then on."""
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 0.0, raising=False)  # every admission looks
    store = open_store()
    store.admit([task(clock, "running"), task(clock, "queued")])
    assert claim(store, clock).id == "running"
    change(db.with_name(db.name + suffix))  # "": the task file alone, its -wal and -shm staying

    with pytest.raises(StoreFileReplaced) as refused:
        store.admit([task(clock, "after")])
    which = f"the task file's {suffix} file" if suffix else "the task file"
    assert str(refused.value).startswith(f"{db}: {which} was ")
    assert "this process no longer reads or writes it" in str(refused.value)
    assert [r.levelname for r in caplog.records if "while this process had it open" in r.message] == ["ERROR"]
    assert store.health() == str(refused.value)
    for step in (
        lambda: store.finish("running", 1, "a"),
        lambda: claim(store, clock),
        lambda: store.renew("a", ["running"], clock.time() + LEASE_S),
        lambda: store.get("queued"),
        store.stats,
    ):
        with pytest.raises(StoreFileReplaced, match="this process no longer reads or writes it"):
            step()


def test_a_process_that_only_reads_sees_its_shm_removed_and_reads_no_more(open_store, clock, db, monkeypatch):
    """An idle process only reads (its workers polling, GET /tasks): it read on through the -shm cut off from it."""
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 0.0, raising=False)  # every step looks
    store = open_store()
    store.admit([task(clock, "queued")])
    assert store.get("queued").state is State.QUEUED  # this thread's connection is open
    db.with_name(db.name + "-shm").unlink()
    with pytest.raises(StoreFileReplaced, match="this process no longer reads or writes it"):
        store.get("queued")


_OTHER_PROCESS = """
import sqlite3, sys
from workerpool.stores.sqlite import SqliteStore
from workerpool.task import Task
now = float(sys.argv[2])  # the test's fake time
store = SqliteStore(sys.argv[1], clock=lambda: now)
for line in sys.stdin:  # a round of tasks for each line: admitted, then every task due claimed and ended
    store.admit([Task(f"{line.strip()}-{n}", "p", 0, created_at=now) for n in range(30)])
    while claimed := store.claim("other", now + 30):
        store.finish(claimed.id, claimed.attempts, "other", result=claimed.id)
    print("ok", flush=True)
store.close()
"""

_CHECK = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1])
print(conn.execute("PRAGMA integrity_check").fetchone()[0])
print(*conn.execute("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state").fetchall())
"""


def test_a_process_whose_shm_was_removed_takes_no_step_beside_a_process_opening_the_path_afresh(
    open_store, clock, db, monkeypatch, caplog
):
    """A process opening the path after the -shm was removed makes a fresh index of the same -wal: a step of
    the process that opened the old one, and the checkpoint of its closing, would contradict that index and
    corrupt the task file."""
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 0.0, raising=False)  # every step looks
    store = open_store()
    store.admit([task(clock, "running"), task(clock, "queued")])
    assert claim(store, clock).id == "running"
    db.with_name(db.name + "-shm").unlink()
    other = subprocess.Popen(
        [sys.executable, "-c", _OTHER_PROCESS, str(db), repr(clock.time())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    with other:
        refused = []
        for round_ in ("first", "second"):
            other.stdin.write(f"{round_}\n")
            other.stdin.flush()
            assert other.stdout.readline().strip() == "ok"
            for step in (
                lambda: store.finish("running", 1, "a", result="late"),
                lambda: claim(store, clock),
                lambda: store.renew("a", ["running"], clock.time() + LEASE_S),
                lambda: store.recover(lambda t: None),
                lambda: store.get("queued"),
            ):
                with pytest.raises(StoreFileReplaced) as raised:
                    step()
                refused.append(raised.value)
        other.stdin.close()
        assert other.wait(WAIT_S) == 0
    # Seen at its first step: the -shm was removed, and the other process has put a new one in its place.
    assert str(refused[0]).startswith(f"{db}: the task file's -shm file was replaced by another file while ")
    assert "this process no longer reads or writes it" in str(refused[0])
    assert [r.levelname for r in caplog.records if "while this process had it open" in r.message] == ["ERROR"]
    store.close()  # last: its closing checkpoints nothing through the old files
    check = subprocess.run([sys.executable, "-c", _CHECK, str(db)], capture_output=True, text=True, timeout=WAIT_S)
    # The file is sound and holds every task: the other process's 60 and the one this process had queued, done
    # there, and the attempt this process could no longer end, left to its lease.
    assert check.stdout.splitlines() == ["ok", "('done', 61) ('running', 1)"], check.stderr


_DIES_UNCLOSED = """
import os, sys
from workerpool.stores.sqlite import SqliteStore
from workerpool.task import Task
now = float(sys.argv[2])
SqliteStore(sys.argv[1], clock=lambda: now).admit([Task(f"other-{n}", "p", 0, created_at=now) for n in range(30)])
os._exit(0)  # as a worker SIGKILLed: its commits stay in the -wal, which no checkpoint copied
"""

_CUT_OFF = """
import os, subprocess, sys
from workerpool.errors import StoreFileReplaced
from workerpool.stores import sqlite as sqlite_store
from workerpool.task import Task
path, now, ending = sys.argv[1], float(sys.argv[2]), sys.argv[3]
sqlite_store._IDENTITY_CHECK_S = 0.0  # every step looks
store = sqlite_store.SqliteStore(path, clock=lambda: now)
store.admit([Task("running", "p", 0, created_at=now), Task("queued", "p", 0, created_at=now)])
store.claim("a", now + 30)
os.remove(path + "-shm")
subprocess.run([sys.executable, "-c", sys.argv[4], path, sys.argv[2]], check=True)
try:
    store.finish("running", 1, "a")
except StoreFileReplaced:
    print("cut off")
if ending == "close":
    store.close()
"""


@pytest.mark.parametrize("ending", ["close", "exit"])
def test_a_process_cut_off_from_its_files_lets_go_of_them_unwritten_when_it_closes_or_exits(clock, db, ending):
    """A process that opened the path afresh after the -shm was removed, then died unclosed, left its commits
    in the -wal: closing the connections of the process cut off (by close() or at its exit) checkpointed
    through their out-of-date index, then removed the -wal with those commits (30 tasks lost)."""
    cut_off = subprocess.run(
        [sys.executable, "-c", _CUT_OFF, str(db), repr(clock.time()), ending, _DIES_UNCLOSED],
        capture_output=True, text=True, timeout=WAIT_S, cwd=PROJECT_ROOT,
    )  # fmt: skip
    assert cut_off.stdout.splitlines() == ["cut off"], cut_off.stderr
    check = subprocess.run([sys.executable, "-c", _CHECK, str(db)], capture_output=True, text=True, timeout=WAIT_S)
    # The other process's 30 and the one queued here, and the attempt it could no longer end, left to its lease.
    assert check.stdout.splitlines() == ["ok", "('queued', 31) ('running', 1)"], check.stderr


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_a_path_that_is_a_symlink_opens_the_file_it_names_whose_wal_is_beside_that_file(
    open_store, clock, tmp_path, monkeypatch, synchronous
):
    """SQLite keeps the -wal and -shm beside the symlink's target: that -wal is the one synced and watched."""
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 0.0, raising=False)  # every admission looks
    (tmp_path / "disk").mkdir()
    (tmp_path / "data").mkdir()
    link = tmp_path / "data" / "tasks.db"
    link.symlink_to(tmp_path / "disk" / "tasks.db")
    store = open_store(path=link, synchronous=synchronous)
    store.admit([task(clock, "a")])
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["tasks.db", "tasks.db-shm", "tasks.db-wal"]
    assert store.get("a").state is State.QUEUED and store.health() is None
    (tmp_path / "disk" / "tasks.db-wal").unlink()
    with pytest.raises(StoreFileReplaced, match="the task file's -wal file was removed"):
        store.admit([task(clock, "after")])


def test_with_full_a_wal_removed_while_open_is_still_the_one_synced(open_store, clock, db, monkeypatch):
    """Its steps commit to the WAL open here, and that file is the one to sync: not a step "not synced"
    because no file, or another one, has the name now (until the removal is seen)."""
    monkeypatch.setattr(sqlite_store, "_IDENTITY_CHECK_S", 3600.0, raising=False)  # seen by no step here
    store = open_store(synchronous="FULL")
    store.admit([task(clock, "running")])  # synced: the WAL is open for syncing
    assert claim(store, clock).id == "running"
    db.with_name(db.name + "-wal").unlink()
    store.finish("running", 1, "a")  # noticed by no admission yet
    assert store.get("running").state is State.DONE


@pytest.mark.parametrize("state", [None, "running", "done", "failed", "cancelled", "queued"])
def test_a_page_after_a_position_is_a_range_of_an_index_never_a_scan_of_the_table(open_store, db, state):
    open_store()  # the schema
    query = (
        sqlite_store._PAGE_QUEUED
        if state == "queued"
        else sqlite_store._page_query(state, sqlite_store._LISTED_COLUMNS)
    )
    queued = {"state_seq": 1, "seq": 1, "below": 1, "floor": 1, "limit": 1}
    params = queued if state == "queued" else [1] * query.count("?")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query, params)]
    searches = [step for step in plan if step.startswith(("SEARCH tasks ", "SCAN tasks "))]  # reads of the table
    if state is None:
        assert searches == ["SEARCH tasks USING INTEGER PRIMARY KEY (rowid<?)"]
    elif state == "queued":  # new tasks from below the position down the table to the oldest; the others from
        assert searches == [  # their own indexes (put back new tasks: counted, then listed), retries by position
            "SEARCH tasks USING INDEX tasks_new (due_at<?)",
            "SEARCH tasks USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)",
            "SEARCH tasks USING INDEX tasks_new (due_at<?)",
            "SEARCH tasks USING INDEX tasks_retry_by_entry (state_seq<?)",
        ], plan
    else:
        assert searches == ["SEARCH tasks USING INDEX tasks_by_state (state=? AND state_seq<?)"], plan
        assert not any("TEMP B-TREE" in step for step in plan)  # the index's order is the page's


def test_a_task_entering_running_after_the_newest_left_it_lists_ahead_of_a_walk(open_store, clock):
    # A position was the highest in the state plus one: once a and b were done, c took a position below b's.
    store = open_store(capacity=10)
    store.admit([task(clock, "a"), task(clock, "b")])
    assert [claim(store, clock).id, claim(store, clock).id] == ["a", "b"]
    first = store.page(State.RUNNING, 1)
    assert [t.id for t in first.tasks] == ["b"] and first.next is not None
    store.finish("a", 1, "a", result=None)
    store.finish("b", 1, "a", result=None)
    store.admit([task(clock, "c")])
    assert claim(store, clock).id == "c"
    assert store.page(State.RUNNING, 1, after=first.next).tasks == []  # c entered after b: ahead of the walk
    assert [t.id for t in store.list(State.RUNNING)] == ["c"]


def test_a_task_finishing_after_retention_forgot_the_finished_ones_lists_ahead_of_a_walk(open_store, clock):
    store = open_store(capacity=10, ttl=10.0)
    store.admit([task(clock, n) for n in ("a", "b", "c", "x")])
    for _ in "ab":
        ran = claim(store, clock)
        store.finish(ran.id, 1, "a", result=None)
    first = store.page(State.DONE, 1)
    assert [t.id for t in first.tasks] == ["b"] and first.next is not None
    clock.advance(11)  # a and b are past their retention: the next step that ends a task forgets them
    store.cancel("x")
    assert store.list(State.DONE) == []
    ran = claim(store, clock)
    store.finish(ran.id, 1, "a", result=None)
    assert [t.id for t in store.list(State.DONE)] == ["c"]
    assert store.page(State.DONE, 1, after=first.next).tasks == []  # c finished after b: ahead of the walk


@pytest.mark.parametrize("delayed", [False, True])
def test_the_last_page_of_queued_tasks_reads_none_of_the_rows_older_than_the_queue(open_store, clock, delayed):
    store = open_store(capacity=1000)
    store.admit([task(clock, f"old{n}") for n in range(400)])
    for n in range(400):
        store.cancel(f"old{n}")  # finished, below every queued task
    delay = {"next_attempt_at": clock.time() + 60} if delayed else {}
    store.admit([task(clock, f"q{n}", **delay) for n in range(5)])
    first_cost, first = sqlite_vm_steps(store, store.page, State.QUEUED, 2)
    second = store.page(State.QUEUED, 2, after=first.next)
    last_cost, last = sqlite_vm_steps(store, store.page, State.QUEUED, 2, after=second.next)
    assert [t.id for t in first.tasks + second.tasks + last.tasks] == ["q4", "q3", "q2", "q1", "q0"]
    assert last.next is None
    assert last_cost <= 2 * first_cost, (first_cost, last_cost)  # not 400 rows more


def test_the_first_page_of_queued_tasks_reads_no_more_as_more_wait(open_store, clock):
    store = open_store(capacity=5000)
    store.admit([task(clock, f"a{n}") for n in range(5)])
    few, _ = sqlite_vm_steps(store, store.page, State.QUEUED, 2)
    store.admit([task(clock, f"b{n}") for n in range(3000)])
    many, first = sqlite_vm_steps(store, store.page, State.QUEUED, 2)
    assert [t.id for t in first.tasks] == ["b2999", "b2998"]
    assert many <= 2 * few, (few, many)  # not a pass over the 3,000 waiting: a walk's second page makes that
    second = store.page(State.QUEUED, 2, after=first.next)
    assert [t.id for t in second.tasks] == ["b2997", "b2996"]


def test_queued_pages_list_a_new_task_put_back_during_the_walk_once(open_store, clock):
    store = open_store(capacity=10)
    store.admit([task(clock, f"t{n}") for n in range(6)])
    first = store.page(State.QUEUED, 2)
    assert [t.id for t in first.tasks] == ["t5", "t4"]
    running = claim(store, clock)  # t0, the oldest
    store.put_back(running.id, running.attempts, "a")  # queued again: a new entry, ahead of the walk
    second = store.page(State.QUEUED, 2, after=first.next)
    third = store.page(State.QUEUED, 2, after=second.next)
    assert [t.id for t in second.tasks + third.tasks] == ["t3", "t2", "t1"]
    assert third.next is None
    assert [t.id for t in store.list(State.QUEUED)][:1] == ["t0"]
