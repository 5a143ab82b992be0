"""The Redis store against a private redis-server: several instances sharing one store, and Redis faults."""

from __future__ import annotations

import linecache
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from doubles import FakeClock, Gate, instant, wait_until
from redis_server import RedisServer, running_redis

import app
import config
from workerpool import (
    DuplicateTask,
    PoolObserver,
    QueueFull,
    State,
    StoreOutOfMemory,
    StorePartlyAdmitted,
    StoreUnavailable,
    Task,
    WorkerPool,
)
from workerpool.stores import redis_store
from workerpool.stores.redis_store import RedisStore, _head, _pack, connect

WAIT_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def make(server, clock):
    """Stores sharing the module's Redis, emptied before each test, on the test's fake clock."""
    server.client().flushall()
    clients = []

    def make_store(*, socket_timeout: float = 5.0, **options) -> RedisStore:
        client = server.client(socket_timeout)
        clients.append(client)
        settings = {"capacity": 4, "ttl": 60.0, "max_finished": 100, "clock": clock.time} | options
        return RedisStore(client, **settings)

    yield make_store
    for client in clients:
        client.close()


def new(task_id: str, clock, **fields) -> Task:
    return Task(task_id, "payload", fields.pop("max_retries", 1), created_at=clock.time(), **fields)


def test_instances_share_one_bound_one_id_space_and_one_view(make, clock):
    a, b = make(capacity=2), make(capacity=2)
    assert a.admit([new("x", clock)])[0].id == "x"
    refused = b.admit([new("x", clock), new("y", clock), new("z", clock)])
    assert isinstance(refused[0], DuplicateTask)
    assert refused[1].id == "y"
    assert isinstance(refused[2], QueueFull)
    assert b.get("x") == a.get("x")
    assert [t.id for t in a.list()] == [t.id for t in b.list()] == ["y", "x"]
    assert a.stats() == b.stats()


def test_an_instance_with_a_smaller_bound_tells_how_many_tasks_the_store_holds_waiting(make, clock):
    # During a rolling change of QUEUE_SIZE, instances on one store apply different bounds.
    large, small = make(capacity=10), make(capacity=3)
    delayed = [new(f"d{n}", clock, next_attempt_at=clock.time() + 600) for n in range(5)]
    assert [t.id for t in large.admit(delayed)] == [f"d{n}" for n in range(5)]
    (refused,) = small.admit([new("x", clock)])
    assert isinstance(refused, QueueFull)
    assert (refused.waiting, refused.delayed, refused.capacity) == (5, 5, 3)
    assert str(refused) == "queue is full (5 tasks waiting)"


def test_a_refusal_whose_place_freed_before_its_figures_were_read_does_not_say_to_wait_for_a_delayed_task(
    make, clock, monkeypatch
):
    # The figures of a refusal are read after the admission: a worker may start the due task meanwhile.
    store, worker = make(capacity=2), make(capacity=2)
    assert [t.id for t in store.admit([new("due", clock), new("later", clock, next_attempt_at=clock.time() + 600)])]
    run = RedisStore._run

    def claim_first(self, name, *args, **kwargs):
        if self is store and name == "queue_delays":
            assert worker.claim("owner-w", clock.time() + 30).id == "due"
        return run(self, name, *args, **kwargs)

    monkeypatch.setattr(RedisStore, "_run", claim_first)
    (refused,) = store.admit([new("x", clock)])
    assert isinstance(refused, QueueFull)
    # It read one task waiting, delayed, and told to wait 600 s for it while a place was free.
    assert (refused.waiting, refused.delayed, refused.due_in) == (2, None, None)
    assert str(refused) == "queue is full (2 tasks waiting)"


def test_a_task_whose_hash_redis_evicted_is_skipped_by_a_claim_and_leaves_nothing_behind(make, server, clock):
    # With a maxmemory-policy other than noeviction, Redis drops whole keys: a queued task's hash goes,
    # its queue entry stays. The claim wrote a half task ("running", no id) that every read then failed on.
    store = make()
    store.admit([new("evicted", clock), new("kept", clock)])
    server.client().delete(f"{store._prefix}:t:evicted")
    claimed = store.claim("owner-a", clock.time() + 30)
    assert claimed is not None and claimed.id == "kept"
    assert server.client().exists(f"{store._prefix}:t:evicted") == 0
    assert [task.id for task in store.list()] == ["kept"]
    assert store.stats().counts[State.RUNNING] == 1 and store.stats().counts[State.QUEUED] == 0
    assert store.claim("owner-a", clock.time() + 30) is None


def test_a_claim_is_put_back_though_redis_evicted_the_index_that_holds_its_place(make, server, clock):
    # The place a new task goes back to is read from the index of every task (P:all), which an eviction policy
    # may drop whole: the script then failed, and the task stayed running until its lease expired.
    store = make()
    store.admit([new("a", clock)])
    assert store.claim("owner-a", clock.time() + 30).id == "a"
    server.client().delete(f"{store._prefix}:all")
    back = store.put_back("a", 1, "owner-a")
    assert (back.state, back.attempts) == (State.QUEUED, 0)
    assert store.claim("owner-b", clock.time() + 30).id == "a"


def test_what_is_left_of_an_evicted_task_is_not_read_and_goes_when_its_lease_expires(make, server, clock, caplog):
    # What an older release's claim left of an evicted task: the fields the claim writes, and the indexes.
    store = make()
    store.admit([new("whole", clock)])
    redis_client, prefix, until = server.client(), store._prefix, clock.time() + 30
    redis_client.hset(f"{prefix}:t:half", mapping={"state": "running", "attempts": 1, "started_at": clock.time(),
                                                  "owner": "owner-a", "lease_until": until})  # fmt: skip
    redis_client.zadd(f"{prefix}:run", {"half": until})
    redis_client.zadd(f"{prefix}:st:running", {"half": 0})
    redis_client.zadd(f"{prefix}:all", {"half": 0})
    redis_client.sadd(f"{prefix}:own:owner-a", "half")
    assert [task.id for task in store.list()] == ["whole"]
    assert store.list(State.RUNNING) == []
    assert store.get("half") is None
    assert store.cancel("half") == (None, False)
    clock.advance(31)
    assert store.recover(lambda task: None) == []
    assert "task half: Redis evicted its data" in caplog.text
    assert store.stats().counts[State.RUNNING] == 0
    assert [key for key in redis_client.keys(f"{prefix}*") if b"half" in key] == []
    assert redis_client.zscore(f"{prefix}:all", "half") is None
    assert redis_client.smembers(f"{prefix}:own:owner-a") == set()
    # A task that finished, and was forgotten, after a recovery read its lease: nothing to remove, nothing said.
    caplog.clear()
    assert store._run("drop_leftover", "forgotten") == 0
    assert caplog.text == ""


def test_more_threads_than_redis_pys_default_cap_each_keep_a_connection(make):
    # Each thread keeps a connection of its own (WORKERS threads, their replacements, the HTTP threads:
    # well past 100 with WORKERS=128), and redis-py's pool refuses a connection past its cap, 100 by
    # default, with "Too many connections" instead of waiting for one.
    store = make()
    threads_n = 110
    answered = threading.Semaphore(0)
    hold = threading.Event()
    failures: list[Exception] = []

    def read_and_hold():
        try:
            store.get("absent")
        except StoreUnavailable as exc:
            failures.append(exc)
        answered.release()
        hold.wait(WAIT_S)  # this thread's connection stays taken

    threads = [threading.Thread(target=read_and_hold) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    try:
        for _ in threads:
            assert answered.acquire(timeout=WAIT_S)
    finally:
        hold.set()
        for thread in threads:
            thread.join(WAIT_S)
    assert failures == []


def finish_all(store, clock) -> None:
    task = store.claim("owner", clock.time() + 30)
    while task is not None:
        _, task = store.finish_and_claim(task.id, 1, "owner", result=None, lease_until=clock.time() + 30)


def test_no_task_past_its_time_is_read_however_many_aged_out_at_once(make, clock):
    # One read forgets at most FORGET_AT_MOST of the tasks past STATE_TTL_S: the one after was still served.
    store = make(capacity=1100, ttl=60.0, max_finished=5000)
    ids = [f"t{n:04d}" for n in range(redis_store.FORGET_AT_MOST + 2)]
    store.admit([new(task_id, clock, max_retries=0) for task_id in ids])
    for _ in ids:
        task = store.claim("owner", clock.time() + 30)
        store.finish(task.id, 1, "owner", result=None)
        clock.advance(0.001)
    clock.advance(61)
    assert store.cancel(ids[-1]) == (None, False)  # unknown, not "already done"
    assert store.get(ids[-1]) is None
    assert store.list(limit=1000) == []
    assert store.get(ids[-1]) is None  # the second read forgot the rest


def test_a_listing_passes_over_tasks_past_their_time_however_many_and_fills_its_page(make, clock):
    # Listed newest first by admission: the tasks admitted before a mass expiry sit below every aged one.
    store = make(capacity=1100, ttl=60.0, max_finished=5000)
    store.admit([new(f"q{n}", clock, next_attempt_at=clock.time() + 3600) for n in range(3)])
    store.admit([new("slow", clock)])
    assert store.claim("owner", clock.time() + 3600).id == "slow"  # still running at the listing
    aged = redis_store.FORGET_AT_MOST + redis_store.PASS_AT_MOST + 2  # more than one script forgets and passes over
    store.admit([new(f"t{n:04d}", clock, max_retries=0) for n in range(aged)])
    finish_all(store, clock)
    clock.advance(61)
    assert [t.id for t in store.list(limit=3)] == ["slow", "q2", "q1"]
    assert [t.id for t in store.list(limit=10)] == ["slow", "q2", "q1", "q0"]


@pytest.mark.parametrize("listing", ["list", "page"])
def test_no_script_forgets_or_passes_over_more_than_its_share_of_a_mass_expiry(make, server, clock, listing):
    # Redis runs nothing else while a script runs: a listing after 99,000 tasks aged out at once kept it
    # busy 170-230 ms in one script, and each script forgot 1,000. Now the listing goes on in more scripts.
    store = make(capacity=1100, ttl=60.0, max_finished=5000)
    store.admit([new(f"q{n}", clock, next_attempt_at=clock.time() + 3600) for n in range(3)])
    for part in range(2):  # "mid" sits between two runs of aged tasks
        store.admit([new(f"t{part}-{n:04d}", clock, max_retries=0) for n in range(600)])
        finish_all(store, clock)
        if part == 0:
            store.admit([new("mid", clock, next_attempt_at=clock.time() + 3600)])
    clock.advance(61)
    admin = server.client()
    work = []  # per script the listing ran: (ids looked up in the retention index, tasks forgotten)
    run = store._run

    def counted(script, *args, **options):
        before = admin.info("commandstats")
        reply = run(script, *args, **options)
        after = admin.info("commandstats")
        calls = {
            name: after.get(f"cmdstat_{name}", {}).get("calls", 0) - before.get(f"cmdstat_{name}", {}).get("calls", 0)
            for name in ("zscore", "del")
        }
        work.append((calls["zscore"], calls["del"]))
        return reply

    store._run = counted
    if listing == "list":
        assert [t.id for t in store.list(limit=3)] == ["mid", "q2", "q1"]
    else:  # GET /tasks: one more task read tells that more follow
        first = store.page(limit=3)
        assert [t.id for t in first.tasks] == ["mid", "q2", "q1"] and first.next is not None
    assert len(work) > 1
    assert max(looked_up for looked_up, _ in work) <= redis_store.PASS_AT_MOST + 4, work
    assert max(forgotten for _, forgotten in work) <= redis_store.FORGET_AT_MOST, work
    if listing == "list":
        assert [t.id for t in store.list(limit=10)] == ["mid", "q2", "q1", "q0"]
    else:
        last = store.page(limit=10, after=first.next)
        assert [t.id for t in last.tasks] == ["q0"] and last.next is None


def scripts_counted(store, admin) -> list[tuple[str, int]]:
    """Per script the store runs from now on: its name and the task hashes it deleted (forgot)."""
    work, run = [], store._run

    def counted(script, *args, **options):
        before = admin.info("commandstats").get("cmdstat_del", {}).get("calls", 0)
        reply = run(script, *args, **options)
        work.append((script, admin.info("commandstats").get("cmdstat_del", {}).get("calls", 0) - before))
        return reply

    store._run = counted
    return work


def test_the_counts_take_in_no_task_past_its_time_however_many_aged_out_at_once(make, server, clock):
    # /healthz and /metrics counted the tasks one script had no room to forget: 700 cancelled, then 600...
    store = make(capacity=1100, ttl=60.0, max_finished=5000)
    aged = 2 * redis_store.FORGET_AT_MOST + 5
    store.admit([new(f"t{n:04d}", clock, max_retries=0) for n in range(aged)])
    finish_all(store, clock)
    clock.advance(30)
    store.admit([new("young", clock, max_retries=0)])
    finish_all(store, clock)
    clock.advance(31)  # all but "young" finished more than 60 s ago
    admin = server.client()
    work = scripts_counted(store, admin)
    stats = store.stats()
    assert stats.counts[State.DONE] == 1 and store.list(limit=10) == [store.get("young")]
    assert len(work) > 1 and max(forgotten for _, forgotten in work) <= redis_store.FORGET_AT_MOST, work
    assert admin.keys(f"{store._prefix}:t:*") == [f"{store._prefix}:t:young".encode()]
    del work[:]
    assert store.stats() == stats and len(work) == 1  # none left: one script


def test_forgetting_what_retention_left_behind_goes_one_short_script_at_a_time(make, server, clock):
    store = make(capacity=1100, ttl=60.0, max_finished=5000)
    assert store.forget_expired() is False  # nothing past its time
    aged = 2 * redis_store.FORGET_AT_MOST + 5
    store.admit([new(f"t{n:04d}", clock, max_retries=0) for n in range(aged)])
    finish_all(store, clock)
    store.admit([new("queued", clock)])
    clock.advance(61)
    admin = server.client()
    work = scripts_counted(store, admin)
    assert [store.forget_expired() for _ in range(3)] == [True, True, False]
    assert [forgotten for _, forgotten in work] == [100, 100, 5]
    assert admin.keys(f"{store._prefix}:t:*") == [f"{store._prefix}:t:queued".encode()]
    assert admin.zcard(f"{store._prefix}:fin") == 0


def test_a_task_admitted_on_one_instance_is_claimed_on_another(make, clock):
    a, b = make(), make()
    a.admit([new("x", clock)])
    claimed = b.claim("owner-b", clock.time() + 30)
    assert (claimed.id, claimed.state, claimed.attempts) == ("x", State.RUNNING, 1)
    assert a.claim("owner-a", clock.time() + 30) is None
    assert a.unfinished("owner-b") == 1 and a.unfinished("owner-a") == 0


def test_an_idle_worker_wakes_when_another_instance_admits(make, clock):
    a, b = make(), make()
    claimed = []

    def idle_worker():
        # Tokens left by earlier admissions may wake it for nothing: it claims, and waits again.
        while (task := b.claim("w", clock.time() + 30)) is None:
            b.wait_for_work(WAIT_S)
        claimed.append(task.id)

    worker = threading.Thread(target=idle_worker, daemon=True)
    worker.start()
    a.admit([new("x", clock)])
    worker.join(WAIT_S)
    assert claimed == ["x"]
    assert a.get("x").state is State.RUNNING


def wake_ends_a_wait(store: RedisStore) -> bool:
    """Whether ``wake()``, called until then (for up to WAIT_S), ends another thread's ``wait_for_work(None)``."""
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (store.wait_for_work(None), returned.set()), daemon=True)
    waiter.start()
    deadline = time.monotonic() + WAIT_S
    while not returned.is_set() and time.monotonic() < deadline:
        store.wake()
        returned.wait(0.05)
    waiter.join(WAIT_S)
    return returned.is_set()


def test_wake_releases_this_instances_waiters(make):
    store = make()
    assert wake_ends_a_wait(store)


def test_a_late_writer_and_a_stranger_are_refused(make, clock):
    store = make()
    store.admit([new("x", clock)])
    store.claim("me", clock.time() + 30)
    assert store.finish("x", 1, "someone-else") is None
    assert store.finish("x", 2, "me") is None
    assert store.finish("x", 1, "me").state is State.DONE
    assert store.finish("x", 1, "me") is None


def test_a_retry_waits_out_its_backoff_and_then_goes_first(make, clock):
    store = make()
    store.admit([new("r", clock, max_retries=2)])
    store.claim("me", clock.time() + 30)
    clock.advance(1)
    store.admit([new("n", clock)])
    queued = store.finish("r", 1, "me", error="boom", retry_at=clock.time() + 5)
    assert (queued.state, queued.last_error, queued.next_attempt_at) == (State.QUEUED, "boom", clock.time() + 5)
    assert store.claim("me", clock.time() + 30).id == "n"
    assert store.seconds_until_due() == pytest.approx(5)
    clock.advance(5)
    assert store.claim("me", clock.time() + 30).id == "r"


def test_an_expired_lease_is_recovered_by_another_instance(make, clock):
    dead, alive = make(), make()
    dead.admit([new("x", clock, max_retries=1), new("y", clock, max_retries=0)])
    dead.claim("dead", clock.time() + 30)
    dead.claim("dead", clock.time() + 30)
    clock.advance(10)
    assert alive.recover(lambda task: clock.time()) == []  # leases still valid
    assert alive.renew("dead", ["x"], clock.time() + 30).lost == frozenset()
    clock.advance(25)  # y's lease (not renewed) expired; x's still holds
    [recovered] = alive.recover(lambda task: clock.time() if task.attempts <= task.max_retries else None)
    assert (recovered.id, recovered.state) == ("y", State.FAILED)
    assert recovered.last_error.startswith("lost:")
    clock.advance(10)
    [retried] = alive.recover(lambda task: clock.time() if task.attempts <= task.max_retries else None)
    assert (retried.id, retried.state, retried.attempts) == ("x", State.QUEUED, 1)
    assert dead.renew("dead", ["x"], clock.time() + 30).lost == frozenset({"x"})
    assert dead.finish("x", 1, "dead") is None  # the dead owner's late result is dropped
    assert alive.claim("alive", clock.time() + 30).attempts == 2


def _script_calls(server) -> int:
    return server.client().info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)


def test_ending_an_attempt_and_claiming_the_next_is_one_script(make, server, clock):
    store = make()
    store.admit([new("a", clock), new("b", clock, max_retries=2)])
    store.claim("me", clock.time() + 30)
    ended, following = store.finish_and_claim("a", 1, "me", result=7, lease_until=clock.time() + 30)
    assert (ended.state, ended.result, following.id, following.state) == (State.DONE, 7, "b", State.RUNNING)
    # A retry due at once is the next task, in the same one script (its first run loaded it).
    before = _script_calls(server)
    ended, following = store.finish_and_claim(
        "b", 1, "me", error="boom", retry_at=clock.time(), lease_until=clock.time() + 30
    )
    assert _script_calls(server) - before == 1
    assert (ended.state, following.id, following.attempts) == (State.QUEUED, "b", 2)
    # A late writer ends nothing and still claims (nothing is left).
    assert store.finish_and_claim("b", 1, "me", lease_until=clock.time() + 30) == (None, None)
    assert store.get("b").state is State.RUNNING


def _hold_first_admission(store: RedisStore) -> tuple[threading.Event, threading.Event]:
    """Make the store's next admission script wait for ``release`` (a slow round trip); ``entered`` is set
    when it waits, its batch taken."""
    entered, release, run = threading.Event(), threading.Event(), store._run

    def held(script, *args, **kwargs):
        if script == "admit" and not entered.is_set():
            entered.set()
            release.wait(WAIT_S)
        return run(script, *args, **kwargs)

    store._run = held
    return entered, release


def _queue_behind_one_in_flight(store, entered, submit, first_args, waiting_args, release) -> None:
    """Start ``submit(*first_args)`` and wait until its script is held in flight, queue ``submit(*args)`` for
    each of ``waiting_args`` behind it one after another, then release the first and wait for them all."""
    first = threading.Thread(target=submit, args=first_args)
    first.start()
    assert entered.wait(WAIT_S)  # the first admission is in flight
    waiting = []
    for n, args in enumerate(waiting_args, 1):
        thread = threading.Thread(target=submit, args=args)
        thread.start()
        waiting.append(thread)
        wait_until(lambda n=n: len(store._admissions) == n, timeout=WAIT_S, what="the admission to queue")
    release.set()
    for thread in [first, *waiting]:
        thread.join(WAIT_S)


def test_admissions_that_queue_behind_one_in_flight_go_together_in_arrival_order(make, server, clock):
    store = make(capacity=3)
    store.admit([])  # the script is loaded
    store._run("queue_delays", clock.time())  # so is the one a refusal runs after its admission
    entered, release = _hold_first_admission(store)
    results: dict[str, object] = {}

    def submit(name, *ids):
        results[name] = store.admit([new(i, clock) for i in ids])

    before = _script_calls(server)
    _queue_behind_one_in_flight(
        store, entered, submit, ("first", "a"), [("b", "b", "c"), ("dup", "b"), ("d", "d")], release
    )
    # One more script carried the three that queued, each answered as if it had gone alone; the
    # refusal of "d" then read how many waiting tasks are delayed (a third).
    assert _script_calls(server) - before == 3
    assert [t.id for t in results["first"]] == ["a"]
    assert [t.id for t in results["b"]] == ["b", "c"]
    assert isinstance(results["dup"][0], DuplicateTask)
    assert isinstance(results["d"][0], QueueFull)  # the bound of 3 counts a, b and c before it
    assert not store._admitting and not store._admissions


def test_an_admission_script_carries_at_most_group_max_tasks_and_a_larger_batch_goes_in_parts(make, monkeypatch, clock):
    # Every admission queued went in one script, however many tasks: four concurrent batches of 100,000 kept Redis
    # busy for 14.7 s, past every client's socket timeout, for every instance; one batch of 100,000 alone was
    # stored, yet answered as timed out.
    monkeypatch.setattr(redis_store, "GROUP_MAX_TASKS", 3)
    store = make(capacity=100)
    store.admit([])  # the script is loaded
    entered, release = _hold_first_admission(store)
    sent: list[int] = []  # tasks per admission script, in order
    held = store._run

    def counted(script, *args, **kwargs):
        if script == "admit":
            sent.append(args[2])
        return held(script, *args, **kwargs)

    store._run = counted
    results: dict[str, object] = {}

    def submit(name, *ids):
        results[name] = store.admit([new(i, clock) for i in ids])

    _queue_behind_one_in_flight(
        store, entered, submit, ("first", "a"),
        [("bc", "b", "c"), ("de", "d", "e"), ("f", "f"), ("l", "l"), ("big", *"ghijk")], release,
    )  # fmt: skip
    # In arrival order, each script as full as the bound allows; a larger batch in parts, one after another.
    assert sent == [1, 2, 3, 1, 3, 2]
    assert {name: [t.id for t in tasks] for name, tasks in results.items()} == {
        "first": ["a"], "bc": ["b", "c"], "de": ["d", "e"], "f": ["f"], "big": list("ghijk"), "l": ["l"],
    }  # fmt: skip
    assert not store._admitting and not store._admissions


def test_a_batch_whose_later_part_fails_says_which_tasks_it_admitted(make, monkeypatch, clock):
    monkeypatch.setattr(redis_store, "GROUP_MAX_TASKS", 2)
    store = make(capacity=100)
    store.admit([new("a", clock)])
    run = store._run

    def failing_part(failing: int) -> list[int]:
        """Make the admission script of part ``failing`` (from 1) fail as a timeout does; tasks of each part sent."""
        parts: list[int] = []

        def run_part(script, *args, **kwargs):
            if script == "admit":
                parts.append(args[2])
                if len(parts) == failing:
                    raise StoreUnavailable("redis: Timeout (no answer within the socket timeout)")
            return run(script, *args, **kwargs)

        store._run = run_part
        return parts

    parts = failing_part(2)
    with pytest.raises(StorePartlyAdmitted) as raised:
        store.admit([new(i, clock) for i in ("a", "b", "c", "d", "e")])
    assert parts == [2, 2]  # the third part was never sent
    duplicate, admitted = raised.value.result
    assert isinstance(duplicate, DuplicateTask) and admitted.id == "b"
    assert "the first 2 of 5 tasks were admitted" in str(raised.value)
    assert sorted(t.id for t in store.list()) == ["a", "b"]
    # A first part that fails fails the batch as a whole, as ever: nothing of it was admitted.
    parts = failing_part(1)
    with pytest.raises(StoreUnavailable) as raised:
        store.admit([new(i, clock) for i in ("f", "g", "h")])
    assert parts == [2] and not isinstance(raised.value, StorePartlyAdmitted)
    assert sorted(t.id for t in store.list()) == ["a", "b"]


def test_a_full_store_still_tells_a_duplicate_from_a_new_task(make, clock):
    store = make(capacity=1)
    store.admit([new("a", clock)])
    duplicate, full, also_full = store.admit([new("a", clock), new("b", clock), new("b", clock)])
    assert isinstance(duplicate, DuplicateTask) and isinstance(full, QueueFull) and isinstance(also_full, QueueFull)
    store.claim("me", clock.time() + 30)
    assert [t.id for t in store.admit([new("b", clock), new("c", clock)]) if isinstance(t, Task)] == ["b"]
    assert [t.id for t in store.list()] == ["b", "a"]


def test_an_admission_interrupted_while_it_waits_passes_its_turn_on(make, monkeypatch, clock):
    store = make()
    store.admit([])  # the script is loaded
    entered, release = _hold_first_admission(store)

    class Interrupted(redis_store._Admission):
        """Interrupted (as by a signal on the main thread) just as its turn to send comes."""

        def __init__(self, tasks):
            super().__init__(tasks)
            if tasks and tasks[0].id == "interrupted":
                ready = self.ready

                class Interrupting:
                    def acquire(self):
                        ready.acquire()
                        raise KeyboardInterrupt

                    def release(self):
                        ready.release()

                self.ready = Interrupting()

    monkeypatch.setattr(redis_store, "_Admission", Interrupted)
    outcomes: dict[str, object] = {}

    def submit(task_id):
        try:
            outcomes[task_id] = [t.id for t in store.admit([new(task_id, clock)])]
        except KeyboardInterrupt as exc:
            outcomes[task_id] = exc

    _queue_behind_one_in_flight(store, entered, submit, ("first",), [("interrupted",), ("after",)], release)
    assert isinstance(outcomes.pop("interrupted"), KeyboardInterrupt)
    assert outcomes == {"first": ["first"], "after": ["after"]}  # it sent the queue, the interrupted one left
    assert [t.id for t in store.list()] == ["after", "first"]
    assert not store._admitting and store.admit([new("next", clock)])[0].id == "next"


class _InterruptAfterTurn:
    """Raise KeyboardInterrupt in the admission of ``task_id`` (as a signal does on the main thread) at
    the ``line``-th line that ``admit`` or its ``_send`` runs after that admission acquired its turn to
    send, unless it marked its batch sent first. ``install`` before the admission starts; the admitting
    thread calls ``trace``."""

    def __init__(self, task_id: str, line: int) -> None:
        self.task_id, self.line = task_id, line
        self.admission: redis_store._Admission | None = None
        self.turn = self.interrupted = False
        self._lines = 0

    @property
    def sent(self) -> bool:
        return self.admission is not None and self.admission.sent

    def install(self, monkeypatch) -> None:
        outer = self

        class Admission(redis_store._Admission):
            def __init__(self, tasks):
                super().__init__(tasks)
                if tasks and tasks[0].id == outer.task_id:
                    outer.admission, ready = self, self.ready

                    class Turn:
                        def acquire(self):
                            ready.acquire()
                            outer.turn = True

                        def release(self):
                            ready.release()

                    self.ready = Turn()

        monkeypatch.setattr(redis_store, "_Admission", Admission)

    def trace(self) -> None:
        codes = {RedisStore.admit.__code__, RedisStore._send.__code__}

        def local(frame, event, arg):
            # Not at a with statement's line: there a trace runs before __exit__ is called, where
            # CPython never checks for a signal, and an exception would leave the lock held.
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()
            if event == "line" and self.turn and not self.sent and not source.startswith("with "):
                self._lines += 1
                if self._lines == self.line:
                    self.interrupted = True
                    raise KeyboardInterrupt  # a trace function's exception is raised at this line
            return local

        sys.settrace(lambda frame, event, arg: local if frame.f_code in codes else None)


def test_an_admission_interrupted_just_after_its_turn_comes_leaves_and_the_others_go_on(make, clock):
    # Wherever between taking its turn and sending the interruption lands, the admissions queued
    # behind it neither hang nor get lost: they are admitted, and the interrupted one stored nothing.
    store = make(capacity=1000)
    store.admit([])  # the script is loaded
    line = 0
    while True:
        line += 1
        first, interrupted, after = f"first{line}", f"interrupted{line}", f"after{line}"
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(store, "_run", store._run)  # undoes the holding below
            entered, release = _hold_first_admission(store)
            interrupt = _InterruptAfterTurn(interrupted, line)
            interrupt.install(monkeypatch)
            outcomes: dict[str, object] = {}

            def submit(task_id, interrupt=interrupt, outcomes=outcomes):
                if task_id == interrupt.task_id:
                    interrupt.trace()
                try:
                    outcomes[task_id] = [t.id for t in store.admit([new(task_id, clock)])]
                except KeyboardInterrupt as exc:
                    outcomes[task_id] = exc
                finally:
                    sys.settrace(None)

            _queue_behind_one_in_flight(store, entered, submit, (first,), [(interrupted,), (after,)], release)
        if not interrupt.interrupted:  # it sent before that line came: every line up to the send was tried
            assert interrupt.sent and line > 1
            break
        assert isinstance(outcomes.pop(interrupted), KeyboardInterrupt), line
        assert outcomes == {first: [first], after: [after]}, line
        assert store.get(interrupted) is None, line
        assert not store._admitting and not store._admissions, line
    assert store.admit([new("next", clock)])[0].id == "next"


class _InterruptHandOver:
    """Raise KeyboardInterrupt (as a signal does on the main thread) at the ``line``-th line that
    ``_hand_over`` runs in the thread that calls ``trace``, once."""

    def __init__(self, line: int) -> None:
        self.line = line
        self.interrupted = False
        self._lines = 0

    def trace(self) -> None:
        code = RedisStore._hand_over.__code__

        def local(frame, event, arg):
            # Not at a with statement's line (see _InterruptAfterTurn.trace).
            source = linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip()
            if event == "line" and not self.interrupted and not source.startswith("with "):
                self._lines += 1
                if self._lines == self.line:
                    self.interrupted = True
                    raise KeyboardInterrupt
            return local

        sys.settrace(lambda frame, event, arg: local if frame.f_code is code else None)


@pytest.mark.parametrize(
    "interrupted", ["first", "b"], ids=["one-passing-the-turn-on", "one-answering-the-admissions-it-carried"]
)
def test_an_admission_interrupted_while_it_hands_over_still_answers_the_others_and_passes_the_turn_on(
    make, clock, interrupted
):
    # "first" is in flight while "b" and "c" queue: its hand-over passes the turn to "b", whose round
    # trip carries "c" too and whose hand-over answers "c". Wherever the interruption lands, nobody hangs.
    store = make(capacity=1000)
    store.admit([])  # the script is loaded
    line = 0
    while True:
        line += 1
        ids = {name: f"{name}{line}" for name in ("first", "b", "c")}
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(store, "_run", store._run)  # undoes the holding below
            entered, release = _hold_first_admission(store)
            interrupt = _InterruptHandOver(line)
            outcomes: dict[str, object] = {}

            def submit(name, interrupt=interrupt, outcomes=outcomes, ids=ids):
                if name == interrupted:
                    interrupt.trace()
                try:
                    outcomes[name] = [t.id for t in store.admit([new(ids[name], clock)])]
                except KeyboardInterrupt as exc:
                    outcomes[name] = exc
                finally:
                    sys.settrace(None)

            _queue_behind_one_in_flight(store, entered, submit, ("first",), [("b",), ("c",)], release)
        if not interrupt.interrupted:  # the hand-over ended before that line: every line was tried
            assert line > 1
            break
        assert isinstance(outcomes.pop(interrupted), KeyboardInterrupt), line
        assert outcomes == {name: [ids[name]] for name in ids if name != interrupted}, line
        assert all(store.get(task_id) is not None for task_id in ids.values()), line  # each was sent
        assert not store._admitting and not store._admissions, line
    assert store.admit([new("next", clock)])[0].id == "next"


def test_a_hand_over_that_fails_every_time_is_tried_a_few_times_and_its_error_raised(make, clock, monkeypatch, caplog):
    store = make()
    runs = []

    def broken(mine, error):
        runs.append(mine)
        raise RuntimeError("a bug")

    monkeypatch.setattr(store, "_hand_over", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        store.admit([new("a", clock)])
    assert len(runs) == 1 + redis_store._HAND_OVER_TRIES  # not for ever
    # Given up once, and said so: later admissions in this process may hang.
    (record,) = [r for r in caplog.records if r.name == redis_store.__name__]
    assert record.levelname == "ERROR" and "may wait for ever" in record.getMessage()
    assert isinstance(record.exc_info[1], RuntimeError)


def test_a_payload_that_is_not_json_fails_only_its_own_admission_even_when_others_wait(make, clock):
    store = make()
    store.admit([])  # the script is loaded
    entered, release = _hold_first_admission(store)
    outcomes: dict[str, object] = {}

    def submit(task_id, payload="payload"):
        try:
            outcomes[task_id] = [t.id for t in store.admit([Task(task_id, payload, 0, created_at=clock.time())])]
        except Exception as exc:
            outcomes[task_id] = exc

    def queued(task_id):
        return any(task.id == task_id for admission in store._admissions for task in admission.tasks)

    first = threading.Thread(target=submit, args=("first",))
    first.start()
    assert entered.wait(WAIT_S)  # the first admission is in flight
    bad = threading.Thread(target=submit, args=("bad", object()))
    bad.start()
    wait_until(lambda: queued("bad") or "bad" in outcomes, timeout=WAIT_S, what="the bad admission to queue or fail")
    good = threading.Thread(target=submit, args=("good",))
    good.start()
    wait_until(lambda: queued("good"), timeout=WAIT_S, what="the good admission to queue")
    release.set()
    for thread in (first, bad, good):
        thread.join(WAIT_S)
    assert isinstance(outcomes.pop("bad"), TypeError)
    assert outcomes == {"first": ["first"], "good": ["good"]}  # a neighbour's bad payload fails nothing of its own
    assert [t.id for t in store.list()] == ["good", "first"]


def test_a_failed_round_trip_fails_every_admission_it_carried_and_the_next_one_goes(make, server, clock):
    store = make()
    entered, release = _hold_first_admission(store)
    errors: list[BaseException] = []

    def submit(task_id):
        try:
            store.admit([new(task_id, clock)])
        except StoreUnavailable as exc:
            errors.append(exc)

    first = threading.Thread(target=submit, args=("a",))
    first.start()
    assert entered.wait(WAIT_S)  # the first admission is in flight
    server.client().config_set("maxmemory", 1)  # refuses writes: the script changes nothing
    waiting = [threading.Thread(target=submit, args=(i,)) for i in ("b", "c")]
    for thread in waiting:
        thread.start()
    wait_until(lambda: len(store._admissions) == 2, timeout=WAIT_S, what="two admissions to queue")
    release.set()
    for thread in [first, *waiting]:
        thread.join(WAIT_S)
    server.client().config_set("maxmemory", 0)
    # The first alone, then b and c together: each thread raises its own error, and nothing was stored.
    assert len({id(error) for error in errors}) == 3 and store.list() == []
    assert [t.id for t in store.admit([new("d", clock)])] == ["d"]


def test_a_claim_that_finds_nothing_leaves_no_token_to_wake_a_worker_for_nothing(make, server, clock):
    store = make()
    signal = server.client().llen
    store.admit([new("a", clock), new("b", clock)])
    assert signal("{workerpool}:signal") == 2
    store.claim("me", clock.time() + 30)
    store.claim("me", clock.time() + 30)  # busy workers claimed both without waiting: 2 tokens left
    assert store.claim("me", clock.time() + 30) is None
    assert signal("{workerpool}:signal") == 0
    store.admit([new("c", clock)])  # work admitted afterwards wakes a waiter again
    assert signal("{workerpool}:signal") == 1


def test_a_forked_child_talks_to_redis_on_a_connection_of_its_own(make, clock):
    store = make()
    store.admit([new("parent", clock)])
    parent_client = store._client()
    pid = os.fork()
    if pid == 0:  # the child: a reply on the parent's socket could be read by either process
        try:
            ok = store._client() is not parent_client and store.admit([new("child", clock)])[0].id == "child"
        except BaseException:
            ok = False
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store._client() is parent_client
    assert [t.id for t in store.list()] == ["child", "parent"]


def test_an_admitted_task_is_queued_at_its_due_time_and_stores_only_its_fields(make, server, clock):
    store = make()
    store.admit([Task("later", "p", 1, created_at=clock.time() + 0.5)])
    clamped, delayed = store.admit(
        [Task("clamped", "p", 1, created_at=clock.time()), Task("delayed", "p", 1, created_at=clock.time(),
                                                                      next_attempt_at=clock.time() + 60)]
    )  # fmt: skip
    admin = server.client()
    assert clamped.created_at == delayed.created_at == clock.time() + 0.5  # clamped to the newest admitted
    queued = admin.zrange("{workerpool}:new", 0, -1, withscores=True)
    scores = {member.split(b":", 1)[1]: score for member, score in queued}
    assert scores == {b"later": clock.time() + 0.5, b"clamped": clock.time() + 0.5, b"delayed": clock.time() + 60}
    for task_id in ("later", "clamped", "delayed"):
        fields = admin.hgetall(f"{{workerpool}}:t:{task_id}")
        assert set(fields) <= {name.encode() for name in Task._fields} | {b"queue_member"}, fields
    assert admin.hget("{workerpool}:t:clamped", "created_at") == repr(clock.time() + 0.5).encode()


def test_start_and_finish_times_never_run_backwards_in_the_listings_by_state(make, server, clock):
    # A step's time is stamped before its script runs: a step stamped earlier (here by an instance
    # half a second behind) may run after one stamped later, and is then listed before it.
    store, behind = make(), make(clock=lambda: clock.time() - 0.5)
    store.admit([Task(task_id, "p", 0, created_at=clock.time() - 1) for task_id in ("a", "b", "c")])  # all due
    now = clock.time()
    assert store.claim("owner-a", now + 30).started_at == now
    assert behind.claim("owner-b", now + 30).started_at == now  # not now - 0.5
    assert [(t.id, t.started_at) for t in store.list(State.RUNNING)] == [("b", now), ("a", now)]
    store.finish("a", 1, "owner-a", result=1)
    assert behind.finish("b", 1, "owner-b", result=2).finished_at == now
    assert [(t.id, t.finished_at) for t in store.list(State.DONE)] == [("b", now), ("a", now)]
    cancelled, _ = behind.cancel("c")
    assert cancelled.finished_at == now
    assert server.client().hget("{workerpool}:t:c", "finished_at") == repr(now).encode()  # the newer stamp's text
    assert server.client().zscore("{workerpool}:fin", "c") == now
    clock.advance(1)
    store.admit([Task("d", "p", 0, created_at=clock.time() - 1)])
    assert behind.claim("owner-b", clock.time() + 30).started_at == clock.time() - 0.5  # later than any before: kept


def test_the_admission_gives_redis_its_scores_and_bounds_in_decimal(make, server, clock):
    # Redis 8.0 to 8.6 parse a ZRANGEBYSCORE bound with a reader of decimal numbers only
    # ("min or max is not a float" for 0x...): a hexadecimal bound would fail every admission there.
    store = make()
    with server.client().monitor() as monitor:
        now = Task("now", "p", 1, created_at=clock.time())
        store.admit([now, Task("later", "p", 1, created_at=clock.time(), next_attempt_at=clock.time() + 60)])
        server.client().echo("admitted")
        commands = []
        while (command := monitor.next_command()["command"]) != "ECHO admitted":
            commands.append(command)
    numeric = [command for command in commands if command.split()[0] in ("ZRANGEBYSCORE", "ZADD")]
    assert [command for command in numeric if command.startswith("ZADD")], commands
    assert not [command for command in numeric if "0x" in command.lower()], numeric
    assert store.get("later").next_attempt_at == clock.time() + 60


def test_scripts_are_packed_as_redis_py_packs_them(server):
    args = ("id-é", 3, 0.1, 1e-7, 1764500000.123456, float("inf"), float("-inf"), "", b'{"id":"x"}', "x" * 7000)
    sha = "0" * 40
    expected = b"".join(server.client().connection_pool.make_connection().pack_command("EVALSHA", sha, 1, "{p}", *args))
    assert _pack(_head(sha, "{p}"), args) == expected


@pytest.mark.parametrize("hiredis", [True, False])
def test_a_task_s_fields_go_to_the_admission_as_arguments_that_read_back_whole(make, clock, monkeypatch, hiredis):
    # Each field is its own argument of the script, its length counted in bytes: line breaks, non-ASCII
    # text and JSON-looking text come back as they went, packed by hiredis or without it.
    if not hiredis:
        monkeypatch.setattr(redis_store, "_hiredis_pack", None)
    store = make(capacity=10)
    texts = ["a\r\nb", "é😀 ünï", '{"id": "x", "state": "done"}', "$3\r\nabc"]
    now = clock.time()
    tasks = [
        Task(f"id-{n}-é", text, 2, created_at=now, request_id=text, next_attempt_at=now + n if n else None)
        for n, text in enumerate(texts)
    ]
    # Fields a new task leaves empty are stored all the same when given, and a null payload stays null.
    tasks.append(Task("given", None, 1, created_at=now, last_error="e", started_at=now - 1, result={"a": [1]}))
    # So are fields away from a new task's defaults, and an empty request id is not taken for none.
    tasks.append(Task("odd", "p", 0, attempts=2, cancel_requested=True, created_at=now, request_id=""))
    assert store.admit(tasks) == tasks
    for task in tasks:
        assert store.get(task.id) == task
    assert redis_store._pack_texts(texts) == redis_store._pack_args(texts)


def test_scripts_that_redis_forgot_are_loaded_again_and_run_once(make, server, clock):
    store = make()
    store.admit([new("a", clock)])
    server.client().script_flush()  # as a restart without persistence of the script cache does
    assert store.admit([new("b", clock)]) == [new("b", clock)]
    server.client().script_flush()
    assert [t.id for t in store.list()] == ["b", "a"]


def test_a_timed_out_command_never_leaves_its_reply_for_the_next_one(make, server, clock):
    store = make()
    store.admit([new("x", clock), new("y", clock)])
    impatient = RedisStore(server.client(timeout=0.05), capacity=4, ttl=60, max_finished=10, clock=clock.time)
    server.client().execute_command("CLIENT", "PAUSE", "300", "ALL")
    with pytest.raises(StoreUnavailable):
        impatient.get("x")  # its reply comes once the pause ends, to a connection given up on
    assert store.get("x").id == "x"  # a patient client waits out the pause
    assert impatient.get("y").id == "y"


def test_finished_tasks_are_forgotten_by_age_and_count(make, clock):
    store = make(ttl=10.0, max_finished=2, capacity=10)
    store.admit([new(str(n), clock, max_retries=0) for n in range(3)])
    for _ in range(3):
        task = store.claim("me", clock.time() + 30)
        store.finish(task.id, 1, "me", error="boom")
    assert store.get("0") is None and store.get("2").state is State.FAILED
    clock.advance(11)
    store.admit([new("later", clock)])
    assert [t.id for t in store.list()] == ["later"]


def test_an_id_forgotten_by_age_can_be_submitted_again(make, clock):
    store = make(ttl=10.0)
    store.admit([new("x", clock)])
    store.claim("me", clock.time() + 30)
    assert store.finish("x", 1, "me").state is State.DONE
    assert isinstance(store.admit([new("x", clock)])[0], DuplicateTask)
    clock.advance(11)
    again = store.admit([new("x", clock)])[0]  # the admission itself forgets what aged out
    assert (again.id, store.get("x").state) == ("x", State.QUEUED)


def test_a_full_store_takes_an_id_forgotten_by_age_for_a_new_task(make, clock):
    store = make(ttl=10.0, capacity=1)
    store.admit([new("x", clock)])
    store.claim("me", clock.time() + 30)
    store.finish("x", 1, "me")
    store.admit([new("y", clock)])  # the store is full from here on
    assert isinstance(store.admit([new("x", clock)])[0], DuplicateTask)
    clock.advance(11)
    assert isinstance(store.admit([new("x", clock)])[0], QueueFull)
    assert store.get("x") is None


def test_an_admission_runs_only_its_own_commands_and_stores_no_defaults(make, server, clock):
    # Eviction by age is left to readers and to the steps that end tasks: an admission only checks the
    # ids it is given. A new task's attempts (0) and cancel_requested (false) are not stored.
    store = make(ttl=10.0)
    store.admit([new("old", clock)])
    store.claim("me", clock.time() + 30)
    store.finish("old", 1, "me")
    clock.advance(11)
    with server.client().monitor() as monitor:
        store.admit([new("x", clock)])
        server.client().echo("admitted")
        commands = []
        while (command := monitor.next_command()["command"]) != "ECHO admitted":
            commands.append(command.split()[0])
    commands = [name for name in commands if name not in ("PING", "HELLO", "CLIENT")]  # connections' own
    assert commands == ["EVALSHA", "TIME", "ZCARD", "GET", "INCRBY", "ZADD", "ZADD", "ZADD", "HSET", "SET", "LPUSH"]
    fields = server.client().hgetall("{workerpool}:t:x")
    assert b"attempts" not in fields and b"cancel_requested" not in fields
    assert store.get("x") == new("x", clock)
    assert store.get("old") is None  # a reader evicts first


def test_keys_carry_one_hash_tag(make, server, clock):
    make(prefix="jobs").admit([new("x", clock)])
    assert all(key.startswith(b"{jobs}:") for key in server.client().keys("*"))


def test_a_stopped_redis_is_reported_and_a_restarted_one_kept_everything(tmp_path, clock):
    server = RedisServer(tmp_path)
    server.start()
    try:
        store = RedisStore(server.client(), capacity=4, ttl=60, max_finished=10, clock=clock.time)
        store.admit([new("kept", clock)])
        server.client().execute_command("BGREWRITEAOF")  # appendfsync everysec: make the write durable now
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.admit([new("lost", clock)])
        with pytest.raises(StoreUnavailable):
            store.claim("me", clock.time() + 30)
        server.start()
        assert store.get("kept").state is State.QUEUED
        assert store.get("lost") is None
        assert store.claim("me", clock.time() + 30).id == "kept"
    finally:
        server.stop()


def test_a_redis_refusing_writes_refuses_new_tasks_and_stores_nothing(make, server, clock):
    store = make()
    admin = server.client()
    assert store.health() is None
    admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(StoreUnavailable, match="maxmemory|OOM"):
            store.admit([new("x", clock)])
        assert "maxmemory" in store.health()  # /healthz says so, though reads still work
        assert store.stats().waiting == 0
    finally:
        admin.config_set("maxmemory", 0)
    assert store.get("x") is None
    assert store.health() is None


def test_a_batch_too_large_for_the_memory_redis_has_left_is_told_apart_and_stores_nothing(make, server, clock):
    """Redis counts a script's arguments against maxmemory: a large batch was refused as unavailable, again on
    every retry, while the health check's small write and smaller batches passed."""
    store = make(capacity=100)
    admin = server.client()
    admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 2_000_000)
    try:
        with pytest.raises(StoreOutOfMemory, match="maxmemory"):
            store.admit([new(f"big-{n}", clock)._replace(payload="x" * 400_000) for n in range(10)])
        assert store.health() is None  # a small write passes: /healthz says ok
        assert [t.id for t in store.admit([new("small", clock)])] == ["small"]
    finally:
        admin.config_set("maxmemory", 0)
    assert [t.id for t in store.list()] == ["small"]


def test_a_redis_slower_than_the_socket_timeout_is_unavailable_and_loses_nothing(make, server, clock):
    store = make()
    impatient = RedisStore(server.client(timeout=0.05), capacity=4, ttl=60, max_finished=10, clock=clock.time)
    store.admit([new("x", clock)])
    # CLIENT PAUSE holds every other client's commands for 500 ms, as a Redis busy with a slow
    # command (DEBUG SLEEP, a huge KEYS) would, and it takes effect before it returns.
    server.client().execute_command("CLIENT", "PAUSE", "500", "ALL")
    with pytest.raises(StoreUnavailable):
        impatient.admit([new("y", clock)])
    assert store.claim("me", clock.time() + 30).id == "x"  # a patient client just waits
    # The timed-out admission reached Redis after the pause, past its deadline: it stored nothing,
    # as the error told the caller.
    assert store.get("y") is None
    assert store.admit([new("y", clock)])[0].id == "y"


def lose_the_next_reply(store: RedisStore, monkeypatch) -> None:
    """The next reply to this thread's command is read, then lost with the connection, as a dropped link loses it."""
    conn = store._client().connection
    read = conn.read_response

    def read_then_drop(*args, **kwargs):
        monkeypatch.setattr(conn, "read_response", read)
        read(*args, **kwargs)  # the script ran
        conn.disconnect()
        raise redis_store.redis.ConnectionError("Connection closed by server.")

    monkeypatch.setattr(conn, "read_response", read_then_drop)


def test_an_admission_whose_reply_is_lost_is_unavailable_though_stored_and_a_repeat_is_a_duplicate(
    make, clock, monkeypatch
):
    store = make()
    store.admit([])  # the script is loaded
    lose_the_next_reply(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.admit([new("x", clock)])
    assert store.get("x").state is State.QUEUED  # so the 503 must not say that nothing was stored
    assert isinstance(store.admit([new("x", clock)])[0], DuplicateTask)


def test_a_step_that_reaches_redis_after_its_deadline_changes_nothing(make, server, clock):
    store = make()
    store.admit([new("x", clock)])
    late = RedisStore(server.client(timeout=0.05), capacity=4, ttl=60, max_finished=10, clock=clock.time)
    assert late._deadline_s == 0.025
    late._deadline_s = -1.0  # every step it sends arrives a second late
    with pytest.raises(StoreUnavailable, match="after its deadline"):
        late.admit([new("y", clock)])
    with pytest.raises(StoreUnavailable, match="after its deadline"):
        late.claim("late", clock.time() + 30)
    with pytest.raises(StoreUnavailable, match="after its deadline"):
        late.cancel("x")
    claimed = store.claim("me", clock.time() + 30)
    with pytest.raises(StoreUnavailable, match="after its deadline"):
        late.finish("x", 1, "me")
    assert store.get("x") == claimed and store.get("y") is None


def test_the_kernel_keeps_the_socket_timeout_and_a_late_reply_is_never_read(server, clock):
    client = server.client(timeout=0.05)
    conn = client.connection_pool.get_connection()
    try:
        # A blocking socket: CPython polls before each send and receive only on one with a timeout.
        assert conn._sock.gettimeout() is None
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            seconds, microseconds = struct.unpack("@ll", conn._sock.getsockopt(socket.SOL_SOCKET, option, 16))
            assert 0.05 <= seconds + microseconds / 1e6 <= 0.06  # the kernel rounds up to its clock tick
    finally:
        client.connection_pool.release(conn)
    store = RedisStore(client, capacity=4, ttl=60, max_finished=10, clock=clock.time)
    # This process may be descheduled for longer than the pause (a loaded machine) between the PAUSE and
    # the ECHO's read: the reply is then there when it reads, which says nothing of the timeout. Only an
    # ECHO answered within the pause is a failure; one answered after it is tried again, a few times.
    for _ in range(5):
        paused = time.monotonic()
        server.client().execute_command("CLIENT", "PAUSE", "300", "ALL")
        try:
            reply = store._call("echo", "late")
        except StoreUnavailable as exc:
            assert "Timeout" in str(exc), exc
            break
        assert time.monotonic() - paused >= 0.3, f"answered {reply!r} while Redis was paused"
    else:
        pytest.fail("the pause ended before each of 5 ECHOs was read")
    wait_until(lambda: _answers(store), timeout=WAIT_S, what="the pause to end")
    assert store._call("echo", "next") == b"next"  # not the late reply to the first ECHO
    client.close()


def _answers(store) -> bool:
    try:
        return store._call("ping")
    except StoreUnavailable:
        return False


def test_redis_errors_never_escape_as_redis_exceptions(clock):
    client = connect("redis://127.0.0.1:1/0", timeout=0.5)  # nothing listens on port 1
    store = RedisStore(client, capacity=1, ttl=1, max_finished=1, clock=clock.time)
    with pytest.raises(StoreUnavailable):
        store.get("x")
    with pytest.raises(StoreUnavailable):
        store.stats()


def _returns(wait, timeout=WAIT_S) -> bool:
    """Whether ``wait()`` returned within ``timeout`` (real) seconds, run on a thread of its own."""
    returned = threading.Event()
    threading.Thread(target=lambda: (wait(), returned.set()), daemon=True).start()
    return returned.wait(timeout)


def test_a_claim_that_found_nothing_due_bounds_the_next_wait_by_the_next_due_time(make, monkeypatch, clock):
    # Neither a periodic look nor the socket's timeout may hide a due time the wait missed.
    monkeypatch.setattr(redis_store, "_MAX_WAIT", 10 * WAIT_S)
    a, b = make(), make(socket_timeout=20 * WAIT_S)
    a.admit([new("later", clock, next_attempt_at=clock.time() + 5)])
    claimed = []

    def idle_worker():  # a worker's thread: its claim, then its wait
        claimed.append(b.claim("w", clock.time() + 30))  # not due yet: it took the token the admission left
        clock.advance(5)
        b.wait_for_work(None)

    assert _returns(idle_worker), "a task due now is not waited for"
    assert claimed == [None]
    assert b.claim("w", clock.time() + 30).id == "later"


def test_a_wait_for_a_due_time_blocks_in_redis_only_until_shortly_before_it(make, monkeypatch, clock):
    # Redis ends a BLPOP whose timeout passed only at a tick of its timer (up to 100 ms late at its
    # default hz 10): the wait's last stretch looks for tokens itself, and one queued then ends it.
    a, b = make(), make()
    a.admit([new("later", clock, next_attempt_at=clock.time() + 0.3)])
    assert b.claim("w", clock.time() + 30) is None  # took the admission's token, read the due time
    client, calls = b._client(), []
    blpop, lpop = client.blpop, client.lpop

    def recorded_blpop(keys, timeout):
        calls.append(("blpop", round(timeout, 6)))
        return blpop(keys, timeout=timeout)

    def recorded_lpop(key):
        calls.append(("lpop",))
        a.admit([new("now", clock)])  # queued in the last stretch: its token ends the wait
        return lpop(key)

    monkeypatch.setattr(client, "blpop", recorded_blpop)
    monkeypatch.setattr(client, "lpop", recorded_lpop)
    b.wait_for_work(None)  # the store's clock stands still: the due time is 0.3 s away throughout
    assert calls == [("blpop", round(0.3 - redis_store._BLPOP_LATE_S, 6)), ("lpop",)]


def claim_then_wait(store: RedisStore, clock) -> threading.Thread:
    """A thread that claims, finding nothing, and waits, as a worker does: for the due time its claim read."""

    def worker():
        assert store.claim("w", clock.time() + 30) is None
        store.wait_for_work(None)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    return thread


def test_wake_ends_the_last_stretch_of_a_wait_for_a_due_time(make, monkeypatch, clock):
    monkeypatch.setattr(redis_store, "_MAX_WAIT", 10 * WAIT_S)
    monkeypatch.setattr(redis_store, "_BLPOP_LATE_S", 10 * WAIT_S)  # the whole wait is its last stretch
    a, b = make(), make(socket_timeout=20 * WAIT_S)
    a.admit([new("later", clock, next_attempt_at=clock.time() + 5 * WAIT_S)])
    waiter = claim_then_wait(b, clock)  # the claim on the waiting thread: its wait is for the due time
    wait_until(lambda: b._waiters, timeout=WAIT_S, what="the worker to wait")
    b.wake()
    waiter.join(WAIT_S)
    assert not waiter.is_alive()


@pytest.mark.parametrize("wait", ["blocking", "for a due time"])
def test_a_wait_that_begins_after_wake_returns_at_once(make, monkeypatch, clock, wait):
    monkeypatch.setattr(redis_store, "_MAX_WAIT", 10 * WAIT_S)
    monkeypatch.setattr(redis_store, "_BLPOP_LATE_S", 10 * WAIT_S)  # a wait for a due time is all last stretch
    store = make(socket_timeout=20 * WAIT_S)
    if wait == "for a due time":
        store.admit([new("later", clock, next_attempt_at=clock.time() + 5 * WAIT_S)])
    store.wake()
    waiter = claim_then_wait(store, clock)
    waiter.join(WAIT_S)
    assert not waiter.is_alive()


def test_a_wake_between_counting_a_waiter_and_its_wait_for_a_due_time_ends_the_wait(make, monkeypatch, clock):
    monkeypatch.setattr(redis_store, "_MAX_WAIT", 10 * WAIT_S)
    monkeypatch.setattr(redis_store, "_BLPOP_LATE_S", 10 * WAIT_S)  # the whole wait is its last stretch
    store = make(socket_timeout=20 * WAIT_S)
    store.admit([new("later", clock, next_attempt_at=clock.time() + 5 * WAIT_S)])
    counted = store._waiters_lock

    class WakeOnceCounted:
        """The waiters' lock, calling wake() once the first waiter is counted, before its wait begins."""

        woken = False

        def __enter__(self):
            counted.acquire()

        def __exit__(self, *exc):
            counted.release()
            if store._waiters and not self.woken:
                self.woken = True
                store.wake()

    monkeypatch.setattr(store, "_waiters_lock", WakeOnceCounted())
    waiter = claim_then_wait(store, clock)
    waiter.join(WAIT_S)
    assert not waiter.is_alive()


def test_work_admitted_after_an_end_stamped_its_time_wakes_the_worker_that_claimed_nothing(make, monkeypatch, clock):
    # A worker stamps the time of its finish_and_claim, a submission is stamped and admitted after
    # it, and the script then runs: at the stamped time the task is not due, so the worker
    # claims nothing (taking the submission's token) and waits without claiming again.
    monkeypatch.setattr(redis_store, "_MAX_WAIT", 10 * WAIT_S)
    submitter, store = make(), make(socket_timeout=20 * WAIT_S)
    done = threading.Event()

    class Late(RedisStore):
        def _finish_args(self, *args):
            stamped = super()._finish_args(*args)
            if args[0] == "a":
                clock.advance(0.001)
                submitter.admit([new("b", clock)])
            return stamped

    store.__class__ = Late
    pool = WorkerPool(lambda task, cancel: done.set() if task.id == "b" else None, store=store, workers=1)
    try:
        pool.submit("a")
        assert done.wait(WAIT_S), "b was admitted while the only worker was idle and never started"
    finally:
        pool.shutdown(timeout=0)


@pytest.mark.parametrize("noticed_by", ["a step", "an idle worker's wait"])
def test_a_thread_whose_connection_sat_idle_through_a_redis_restart_is_not_refused_once_redis_is_back(
    tmp_path, clock, noticed_by
):
    server = RedisServer(tmp_path)
    server.start()
    other = ThreadPoolExecutor(max_workers=1)  # one thread, whose connection sits idle through the restart
    try:
        store = RedisStore(server.client(), capacity=4, ttl=60, max_finished=10, clock=clock.time)
        store.admit([new("kept", clock)])
        assert other.submit(store.get, "kept").result(WAIT_S).state is State.QUEUED
        server.client().execute_command("BGREWRITEAOF")  # appendfsync everysec: make the write durable now
        server.stop(signal.SIGKILL)
        if noticed_by == "a step":  # this thread learns that Redis failed
            with pytest.raises(StoreUnavailable):
                store.get("kept")
        else:
            store.wait_for_work(0.2)  # its wait fails, and it pauses rather than spin
        server.start()
        # The other thread's socket died with the old server: it connects anew instead of answering 503.
        assert other.submit(store.get, "kept").result(WAIT_S).state is State.QUEUED
        store.close()
    finally:
        other.shutdown()
        server.stop()


def test_a_cancel_whose_task_retention_forgets_at_once_still_answers_its_snapshot(make, clock):
    # Another instance's clock runs ahead: its finished task makes room by count for the cancelled one.
    ahead = FakeClock(clock.time() + 5)
    store, other = make(max_finished=1), make(max_finished=1, clock=ahead.time)
    other.admit([new("a", ahead)])
    claimed = other.claim("them", ahead.time() + 30)
    other.finish(claimed.id, 1, "them", error=None)
    store.admit([new("b", clock)])
    cancelled, changed = store.cancel("b")
    assert changed and cancelled.id == "b" and cancelled.state is State.CANCELLED


def test_scripts_read_numbers_with_one_strtod_each(make):
    # Lua's tonumber runs the C library's strtod twice on a string (it checks, then converts);
    # arithmetic converts it once (the scripts' num).
    store = make()
    assert all("tonumber(" not in script.script for script in store._scripts.values())
    assert all("local function num(text) return text + 0 end" in script.script for script in store._scripts.values())


def _pause(seconds: float) -> None:
    """Let ``seconds`` pass (the length of an outage, not a wait for another thread)."""
    threading.Event().wait(seconds)


@pytest.mark.slow
@pytest.mark.parametrize("outage", ["restarted", "paused"])
def test_an_attempt_still_running_through_a_redis_outage_longer_than_its_lease_is_renewed_not_lost(
    tmp_path, caplog, outage
):
    # Two instances: the attempt runs on the owner, the other sweeps. Redis out for 2.5 leases lets every
    # lease expire. Once it answers again the sweeper sweeps first (the owner's renewals wait for that): it
    # holds back the leases that expired during the outage, and the owner renews its attempt meanwhile.
    lease = 1.0
    back = threading.Event()  # Redis answers again
    swept = threading.Event()  # and the sweeper has swept since
    sweeps: list[int] = []  # one entry per sweep after the outage

    class Sweeper(RedisStore):
        def recover(self, *args, **kwargs):
            recovered = super().recover(*args, **kwargs)
            if back.is_set():
                sweeps.append(len(recovered))
                swept.set()
            return recovered

    class Owner(RedisStore):
        def renew(self, *args, **kwargs):
            if back.is_set():
                swept.wait(WAIT_S)
            return super().renew(*args, **kwargs)

    server = RedisServer(tmp_path)
    server.start()
    gate = Gate()
    pools = []
    try:

        def pool(store_class, handler) -> WorkerPool:
            store = store_class(server.client(0.3), capacity=4, ttl=60, max_finished=10, clock=time.time)
            pools.append(WorkerPool(handler, store=store, workers=1, lease=lease))
            return pools[-1]

        owner = pool(Owner, gate)
        owner.submit("held")
        gate.wait_started()
        sweeper = pool(Sweeper, instant)
        sweeper.start()
        if outage == "restarted":
            server.stop()  # SIGTERM: the AOF keeps every task
            _pause(2.5 * lease)
            server.start()
        else:
            server.process.send_signal(signal.SIGSTOP)
            try:
                _pause(2.5 * lease)
            finally:
                server.process.send_signal(signal.SIGCONT)
        back.set()
        # Sweeps a third of a lease apart: the sweeper's hold (a lease) has ended by the sixth.
        wait_until(lambda: len(sweeps) >= 6, timeout=WAIT_S, what="the sweeper to sweep after the outage")
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
        server.stop(signal.SIGKILL)


# -- a password the server does not ask for ---------------------------------------


@pytest.mark.parametrize(
    ("policy", "warned"),
    [("noeviction", False), ("volatile-lru", False), ("allkeys-lru", True), ("allkeys-random", True)],
)
def test_a_redis_that_evicts_keys_without_expiry_is_warned_about_at_start(server, policy, warned, capsys):
    # Task hashes have no expiry: only an allkeys-* policy evicts them (and the tasks are lost).
    settings = config.from_env({"STORE": server.url})
    client = server.client()
    client.config_set("maxmemory-policy", policy)
    try:
        app.check_store(settings)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    expected = (
        f"warning: STORE: the Redis server at 127.0.0.1:{server.port} has maxmemory-policy {policy}: at maxmemory it"
        " evicts task data, and those tasks are lost; set maxmemory-policy noeviction (a full Redis then refuses"
        " submissions with 503)\n"
    )
    assert capsys.readouterr().err == (expected if warned else "")


@pytest.mark.parametrize(
    ("commands", "expected"),
    [
        # an ACL user denied @dangerous, INFO with it: the policy cannot be read, and that is said
        (
            ["+@all", "-@dangerous"],
            "did not tell its maxmemory-policy (redis: this user has no permissions to run the"
            " 'info' command; INFO is in the @dangerous category: grant the user +info): make sure it is noeviction; an"
            " allkeys-* policy evicts task data at maxmemory, and those tasks are lost",
        ),
        (
            ["+@all", "-@dangerous", "+info"],
            "has maxmemory-policy allkeys-lru: at maxmemory it evicts task data, and"
            " those tasks are lost; set maxmemory-policy noeviction (a full Redis then refuses submissions with 503)",
        ),
    ],
)
def test_an_acl_user_that_may_not_read_the_eviction_policy_is_warned_it_is_unknown(server, commands, expected, capsys):
    admin = server.client()
    admin.config_set("maxmemory-policy", "allkeys-lru")
    admin.acl_setuser("wp-policy", enabled=True, passwords=["+policy-pass-1234"], keys=["{wp}*"], channels=["*"],
                      commands=commands)  # fmt: skip
    try:
        settings = config.from_env(
            {"STORE": f"redis://wp-policy:policy-pass-1234@127.0.0.1:{server.port}/0", "STORE_PREFIX": "wp"}
        )
        app.check_store(settings)
    finally:
        admin.acl_deluser("wp-policy")
        admin.config_set("maxmemory-policy", "noeviction")
        admin.close()
    lines = capsys.readouterr().err.splitlines()  # with one saying the password protects nothing (no requirepass)
    assert f"warning: STORE: the Redis server at 127.0.0.1:{server.port} {expected}" in lines


class _PasswordServer(RedisServer):
    """A redis-server with ``requirepass``: its own clients authenticate."""

    @property
    def url(self) -> str:
        return f"redis://:pw-0123456789@127.0.0.1:{self.port}/0"


def test_a_password_is_found_unneeded_only_where_the_server_answers_without_one(server, tmp_path):
    with_password = f"redis://:pw-0123456789@127.0.0.1:{server.port}/0"
    # Redis without requirepass takes any password: nothing else would say it protects nothing.
    assert connect(with_password).ping()
    assert redis_store.password_unneeded(connect(with_password), "{workerpool}")
    assert redis_store.password_unneeded(connect(server.url, password="pw-0123456789"), "{workerpool}")
    assert not redis_store.password_unneeded(connect(server.url), "{workerpool}")  # none given: nothing to warn about
    protected = _PasswordServer(tmp_path)
    protected.start("--requirepass", "pw-0123456789")
    try:
        assert not redis_store.password_unneeded(protected.client(), "{workerpool}")
        protected.stop(signal.SIGKILL)
        assert not redis_store.password_unneeded(protected.client(), "{workerpool}")  # unreachable: not known
    finally:
        protected.stop(signal.SIGKILL)


def test_a_password_is_not_said_to_protect_nothing_where_the_default_user_may_only_ping(tmp_path, capsys):
    # The ACL setup the warning itself recommends: the store's user has a password, the default user has none
    # but may run nothing beyond the connection's own commands (PING among them).
    locked = RedisServer(tmp_path)
    locked.start()
    try:
        admin = locked.client()
        admin.acl_setuser("wp", enabled=True, passwords=["+wp-pass-0123456"], keys=["{wp}*"], channels=["*"],
                          commands=["+@all", "-@dangerous", "+info"])  # fmt: skip
        admin.execute_command("ACL", "SETUSER", "default", "on", "nopass", "resetkeys", "resetchannels", "-@all",
                              "+@connection")  # fmt: skip
        assert admin.ping()  # anonymous: answered
        url = f"redis://wp:wp-pass-0123456@127.0.0.1:{locked.port}/0"
        code, said = _start_check(config.from_env({"STORE": url, "STORE_PREFIX": "wp"}), capsys)
    finally:
        locked.stop(signal.SIGKILL)
    assert (code, said) == (None, "")


def test_an_acl_user_without_the_bare_prefix_key_is_told_the_pattern_it_needs(server, clock):
    # "~{wp}:*" (what the key list suggested) was refused with Redis' "no permissions ... one of the keys", naming
    # none: the scripts also name the bare "{wp}".
    admin = server.client()
    try:
        admin.acl_setuser("wp-narrow", enabled=True, passwords=["+narrow-pass-1234"], keys=["{wp}:*"],
                          channels=["*"], commands=["+@all", "-@dangerous"])  # fmt: skip
        admin.acl_setuser("wp-wide", enabled=True, passwords=["+wide-pass-12345"], keys=["{wp}*"],
                          channels=["*"], commands=["+@all", "-@dangerous"])  # fmt: skip
        for user, password, refused in (("wp-narrow", "narrow-pass-1234", True), ("wp-wide", "wide-pass-12345", False)):
            client = connect(f"redis://{user}:{password}@127.0.0.1:{server.port}/0", timeout=5.0)
            try:
                store = RedisStore(client, prefix="wp", capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
                if refused:
                    with pytest.raises(StoreUnavailable, match=r"no permissions.*pattern ~\{wp\}\*, which covers"):
                        store.stats()
                else:
                    assert store.stats().waiting == 0
            finally:
                client.close()
    finally:
        admin.acl_deluser("wp-narrow", "wp-wide")
        admin.close()


def test_a_lease_renewed_between_the_sweeps_read_and_its_end_is_not_ended(make, clock):
    # The sweep reads the expired leases, then ends each attempt: the owner may renew one in between.
    owner, sweeper = make(), make()
    owner.admit([new("a", clock)])
    assert owner.claim("owner", clock.time() + 30).id == "a"
    clock.advance(31)  # expired
    renewed, read = [], sweeper.get

    def read_then_renew(task_id):
        task = read(task_id)
        if not renewed:
            renewed.append(owner.renew("owner", ["a"], clock.time() + 30))
        return task

    sweeper.get = read_then_renew
    assert sweeper.recover(lambda task: clock.time()) == []
    assert renewed[0].lost == frozenset()
    assert owner.get("a").state is State.RUNNING


def _close_from_the_server(server, store: RedisStore) -> None:
    """Have Redis close this thread's connection, as its ``timeout`` (or a proxy) closes an idle one."""
    own_id = store._call("client_id")
    admin = server.client()
    admin.execute_command("CLIENT", "KILL", "ID", own_id)
    wait_until(lambda: not admin.execute_command("CLIENT", "LIST", "ID", own_id), timeout=WAIT_S, what="the kill")
    admin.close()


def test_a_connection_the_server_closed_while_idle_is_replaced_before_the_next_command(make, server, clock):
    store = make(monotonic=clock.monotonic)
    store.admit([new("before", clock)])
    _close_from_the_server(server, store)
    clock.advance(redis_store._IDLE_CHECK_S + 1)
    store.admit([new("after", clock)])  # a script
    _close_from_the_server(server, store)
    clock.advance(redis_store._IDLE_CHECK_S + 1)
    assert store.get("after").state is State.QUEUED
    _close_from_the_server(server, store)
    clock.advance(redis_store._IDLE_CHECK_S + 1)
    assert store.recover(lambda task: None) == []  # a plain command (the lease keeper's sweep)
    assert store._outages == 0  # an idle connection closed is no outage: the other threads keep theirs


def test_a_connection_in_steady_use_is_not_looked_at_before_each_command(make, server, clock, monkeypatch):
    store = make(monotonic=clock.monotonic)
    store.get("x")
    looked = []
    monkeypatch.setattr(redis_store, "_drop_if_closed", looked.append)
    for _ in range(3):
        store.get("x")
        clock.advance(redis_store._IDLE_CHECK_S / 2)
    assert looked == []
    clock.advance(redis_store._IDLE_CHECK_S)
    store.get("x")
    assert len(looked) == 1


def _start_check(settings, capsys) -> tuple[int | None, str]:
    """app.check_store's exit code (None: it passed) and what it wrote."""
    try:
        app.check_store(settings)
    except SystemExit as stop:
        return stop.code, capsys.readouterr().err
    return None, capsys.readouterr().err


def test_a_read_only_replica_stops_the_start_with_one_line(server, tmp_path, capsys):
    replica = RedisServer(tmp_path)
    replica.start("--replicaof", "127.0.0.1", str(server.port))
    try:
        code, said = _start_check(config.from_env({"STORE": replica.url}), capsys)
    finally:
        replica.stop(signal.SIGKILL)
    assert code == 2
    assert said.startswith("store error: STORE cannot be used: redis: You can't write against a read only replica")
    assert said.count("\n") == 1


def test_a_replica_that_takes_writes_stops_the_start_with_one_line(server, tmp_path, capsys):
    # It took the start's write and every task after it, which its primary and the instances on it never saw.
    replica = RedisServer(tmp_path)
    replica.start("--replicaof", "127.0.0.1", str(server.port), "--replica-read-only", "no")
    try:
        code, said = _start_check(config.from_env({"STORE": replica.url}), capsys)
    finally:
        replica.stop(signal.SIGKILL)
    assert code == 2
    assert said.startswith(
        f"store error: STORE cannot be used: redis: the server at 127.0.0.1:{replica.port} is a replica of "
        f"127.0.0.1:{server.port} that takes writes (replica-read-only no)"
    )
    assert said.count("\n") == 1


def test_an_acl_user_that_may_only_read_stops_the_start_with_one_line(server, capsys):
    admin = server.client()
    try:
        admin.acl_setuser("wp-reader", enabled=True, passwords=["+reader-pass-1234"], keys=["{wp}*"], channels=["*"],
                          commands=["+@read", "+@connection", "+evalsha", "+script"])  # fmt: skip
        url = f"redis://wp-reader:reader-pass-1234@127.0.0.1:{server.port}/0"
        code, said = _start_check(config.from_env({"STORE": url, "STORE_PREFIX": "wp"}), capsys)
    finally:
        admin.acl_deluser("wp-reader")
        admin.close()
    assert code == 2
    assert said.startswith("store error: STORE cannot be used: redis: this user has no permissions to run BLPOP, LPOP")
    assert " HSET, " in said and said.count("\n") == 1  # every write the store runs is named


@pytest.mark.parametrize("refused", ["hset", "hdel", "blpop", "script"])
def test_an_acl_user_refused_a_command_the_steps_run_stops_the_start_and_fails_healthz(server, clock, capsys, refused):
    # Redis keeps what a script wrote before a command it refuses: such a user passed the start, and each step
    # it ran was left half done (-hset: an id admitted with no task, 409 and counted queued for ever; -hdel: a
    # task claimed but never given a lease, running for ever).
    admin = server.client()
    admin.flushall()
    try:
        admin.acl_setuser("wp-most", enabled=True, passwords=["+most-pass-12345"], keys=["{wp}*"], channels=["*"],
                          commands=["+@all", "-@dangerous", "+info", f"-{refused}"])  # fmt: skip
        url = f"redis://wp-most:most-pass-12345@127.0.0.1:{server.port}/0"
        code, said = _start_check(config.from_env({"STORE": url, "STORE_PREFIX": "wp"}), capsys)
        client = connect(url, timeout=5.0)
        store = RedisStore(client, prefix="wp", capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
        health = store.health()
        client.close()
    finally:
        admin.acl_deluser("wp-most")
    assert code == 2
    named = "SCRIPT LOAD" if refused == "script" else refused.upper()
    assert f"no permissions to run {named}, which the store needs" in said and said.count("\n") == 1
    assert health is not None and f"no permissions to run {named}," in health  # /healthz answers 503 with it
    assert admin.keys("{wp}*") == []  # nothing written
    admin.close()


def test_a_redis_at_maxmemory_still_lets_the_service_start(server, capsys):
    # Full now, not for good: tasks that end and retention free room, which needs the service running.
    admin = server.client()
    admin.config_set("maxmemory", 1)
    try:
        code, said = _start_check(config.from_env({"STORE": server.url}), capsys)
    finally:
        admin.config_set("maxmemory", 0)
        admin.close()
    assert (code, said) == (None, "")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Redis Cluster nodes: the default store's slot served by the second, every other slot by the first."""
    nodes = [RedisServer(tmp_path_factory.mktemp(name)) for name in ("a", "b")]
    try:
        for node in nodes:
            node.start("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        first, second = (node.client() for node in nodes)
        slot = first.cluster("keyslot", "{workerpool}")
        first.execute_command("CLUSTER ADDSLOTSRANGE", 0, slot - 1, slot + 1, 16383)
        second.execute_command("CLUSTER ADDSLOTS", slot)
        first.execute_command("CLUSTER MEET", "127.0.0.1", nodes[1].port)
        wait_until(
            lambda: all(client.cluster("info")["cluster_state"] == "ok" for client in (first, second)),
            timeout=WAIT_S,
            what="both nodes to learn that every slot is served",
        )
        yield nodes, slot
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)


def test_a_cluster_node_that_does_not_serve_the_stores_slot_is_refused_naming_the_node_that_does(cluster, clock):
    (first, second), slot = cluster
    store = RedisStore(first.client(), capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
    with pytest.raises(StoreUnavailable) as refused:
        store.stats()  # the start-up check
    reason = str(refused.value)
    assert f"hash slot {slot}" in reason and f"the cluster node 127.0.0.1:{second.port}," in reason
    assert "point STORE at that node" in reason
    assert store.health() == reason
    # The node it names serves the store.
    served = RedisStore(second.client(), capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
    assert served.admit([new("a", clock)])[0].id == "a"
    assert served.health() is None


def test_a_cluster_node_asked_for_another_database_says_a_cluster_has_only_0(cluster, clock):
    (first, _), _ = cluster
    client = connect(first.url.removesuffix("/0") + "/1")
    store = RedisStore(client, capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
    with pytest.raises(StoreUnavailable, match=r"database 0 only: end STORE with /0"):
        store.stats()


def test_a_connection_redis_refuses_at_maxclients_leaves_the_other_threads_connections_alone(make, server, clock):
    store = make()
    store.get("x")  # this thread's connection is up
    own_id = store._call("client_id")
    admin = server.client()
    admin.ping()
    connected = len(admin.client_list())
    admin.config_set("maxclients", connected)  # no room for one more
    try:
        # A thread of its own: a connection of its own.
        with ThreadPoolExecutor(1) as other, pytest.raises(StoreUnavailable, match="max number of clients reached"):
            other.submit(store.get, "x").result(timeout=WAIT_S)
        assert store.get("x") is None  # kept its connection: not refused in turn
        assert store._call("client_id") == own_id
    finally:
        admin.config_set("maxclients", 10000)
        admin.close()


@pytest.mark.parametrize(
    ("refused", "sent"),
    [("-evalsha", "this user has no permissions to run the 'evalsha' command"),  # by the store itself
     ("-zadd", "The user executing the script can't run this command")],  # by one of its scripts
)  # fmt: skip
def test_an_acl_user_missing_a_command_is_told_the_commands_the_store_needs_not_a_key_pattern(
    server, clock, refused, sent
):
    admin = server.client()
    try:
        admin.acl_setuser("wp-short", enabled=True, passwords=["+short-pass-1234"], keys=["{wp}*"], channels=["*"],
                          commands=["+@all", "-@dangerous", refused])  # fmt: skip
        client = connect(f"redis://wp-short:short-pass-1234@127.0.0.1:{server.port}/0", timeout=5.0)
        store = RedisStore(client, prefix="wp", capacity=4, ttl=60.0, max_finished=100, clock=clock.time)
        with pytest.raises(StoreUnavailable) as refusal:
            store.admit([new("a", clock)])
        client.close()
    finally:
        admin.acl_deluser("wp-short")
        admin.close()
    said = str(refusal.value)
    assert sent in said
    assert "an ACL user of the store needs the commands EVALSHA, SCRIPT LOAD, BLPOP" in said
    assert "+@all -@dangerous allows them all" in said
    assert "pattern" not in said


def _reply_lost(store: RedisStore, monkeypatch, script: str | None = None) -> None:
    """Make the store's next script (the next ``script`` if given) run in Redis and its reply never reach the
    client (a stall past the socket timeout after the script ran): the step fails on the client, once."""
    run = store._run

    def once(name, *args, **kwargs):
        if script is not None and name != script:
            return run(name, *args, **kwargs)
        monkeypatch.setattr(store, "_run", run)
        run(name, *args, **kwargs)
        raise StoreUnavailable("redis: Timeout reading from socket")

    monkeypatch.setattr(store, "_run", once)


def _claim_reply_lost(store: RedisStore, monkeypatch) -> Callable[..., Any]:
    """Make the store's next claim that takes a task run in Redis and its reply never reach the client, once;
    returns the store's own ``_run``, which is back in place once that claim was lost."""
    run = store._run

    def lose_a_claim_that_took_a_task(name, *args, **kwargs):
        reply = run(name, *args, **kwargs)
        if name == "claim" and isinstance(reply, list):
            monkeypatch.setattr(store, "_run", run)
            raise StoreUnavailable("redis: Timeout reading from socket")
        return reply

    monkeypatch.setattr(store, "_run", lose_a_claim_that_took_a_task)
    return run


def _fails_unrun(store: RedisStore, monkeypatch) -> None:
    """Make the store's next script fail on the client without reaching Redis (a refused connection), once."""
    run = store._run

    def once(*args, **kwargs):
        monkeypatch.setattr(store, "_run", run)
        raise StoreUnavailable("redis: Connection refused")

    monkeypatch.setattr(store, "_run", once)


@pytest.mark.parametrize("outcome", ["done", "retry", "failed"])
def test_an_end_whose_reply_was_lost_answers_as_recorded_when_asked_again(make, clock, monkeypatch, outcome):
    # Written again, the end found its task ended already and answered None: the pool logged the result
    # dropped and counted no end, for a task that was done with its result.
    store = make()
    store.admit([new("a", clock, max_retries=3)])
    store.claim("me", clock.time() + 30)
    end = {"done": {"result": 7}, "retry": {"error": "boom", "retry_at": clock.time() + 60}, "failed": {"error": "x"}}
    _reply_lost(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish("a", 1, "me", **end[outcome])
    ended = store.finish("a", 1, "me", **end[outcome])
    assert ended == store.get("a")
    assert ended.state is {"done": State.DONE, "retry": State.QUEUED, "failed": State.FAILED}[outcome]
    assert ended.attempts == 1
    assert store.finish("a", 1, "me", **end[outcome]) is None  # a third time is a late writer's, as ever
    assert store.finish("a", 1, "them", **end[outcome]) is None


def test_an_end_and_claim_whose_reply_was_lost_answers_the_task_it_claimed_when_asked_again(make, clock, monkeypatch):
    # The task the lost step claimed ran under this owner with nothing to run it, then was failed as lost.
    store = make()
    store.admit([new("y0", clock), new("y1", clock, max_retries=0), new("y2", clock)])
    store.claim("me", clock.time() + 30)
    _reply_lost(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish_and_claim("y0", 1, "me", result=1, lease_until=clock.time() + 30)
    clock.advance(1)
    ended, claimed = store.finish_and_claim("y0", 1, "me", result=1, lease_until=clock.time() + 30)
    assert (ended.id, ended.state, ended.result) == ("y0", State.DONE, 1)
    assert (claimed.id, claimed.state, claimed.attempts) == ("y1", State.RUNNING, 1)
    assert store.get("y2").state is State.QUEUED  # not claimed as well
    clock.advance(29.5)  # past the lease the lost step drew: the step asked again renewed it
    assert store.recover(lambda task: None) == []
    assert store.finish("y1", 1, "me").state is State.DONE


def test_an_end_and_claim_asked_again_answers_its_claim_though_its_end_was_dropped(make, clock, monkeypatch):
    # The lost step's end found the attempt recovered already, and its claim took b all the same: asked again,
    # it claimed c, and b ran out its lease under this owner unrun.
    store, elsewhere = make(), make()
    store.admit([new("a", clock, max_retries=0), new("b", clock), new("c", clock)])
    store.claim("me", clock.time() + 5)
    clock.advance(10)
    [lost] = elsewhere.recover(lambda task: None)
    assert lost.id == "a"
    _reply_lost(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish_and_claim("a", 1, "me", result=1, lease_until=clock.time() + 30)
    ended, claimed = store.finish_and_claim("a", 1, "me", result=1, lease_until=clock.time() + 30)
    assert ended is None  # the attempt counts as lost: its end is dropped
    assert (claimed.id, claimed.attempts) == ("b", 1)
    assert store.get("c").state is State.QUEUED


@pytest.mark.parametrize("took", ["new", "retry", "cancel-requested"])
def test_an_end_asked_again_without_a_claim_puts_back_the_task_its_lost_try_claimed(make, clock, monkeypatch, took):
    # A draining pool writes its end again without a claim: the task the lost try claimed stayed running under
    # this owner with no thread to run it, held the drain to its deadline, then failed as abandoned unrun.
    store, elsewhere = make(), make()
    store.admit([new("y0", clock), new("y1", clock, max_retries=3)])
    if took == "retry":
        store.claim("me", clock.time() + 30)  # y0: left running
        store.claim("me", clock.time() + 30)
        store.finish("y1", 1, "me", error="boom", retry_at=clock.time())
    else:
        store.claim("me", clock.time() + 30)
    clock.advance(1)
    _reply_lost(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish_and_claim("y0", 1, "me", result=1, lease_until=clock.time() + 30)
    if took == "cancel-requested":
        assert store.cancel("y1")[0].state is State.RUNNING
    ended = store.finish("y0", 1, "me", result=1)
    assert (ended.id, ended.state, ended.result) == ("y0", State.DONE, 1)
    assert store.unfinished("me") == 0
    back = store.get("y1")
    if took == "cancel-requested":
        assert (back.state, back.attempts) == (State.CANCELLED, 0)
        assert elsewhere.claim("them", clock.time() + 30) is None
        return
    assert (back.state, back.attempts) == (State.QUEUED, 1 if took == "retry" else 0)
    if took == "new":
        assert back.started_at is None
    claimed = elsewhere.claim("them", clock.time() + 30)
    assert (claimed.id, claimed.attempts) == ("y1", back.attempts + 1)
    assert store.stats().counts[State.RUNNING] == 1


def test_an_end_asked_again_whose_first_try_changed_nothing_is_recorded_and_claims(make, clock, monkeypatch):
    store = make()
    store.admit([new("a", clock), new("b", clock)])
    store.claim("me", clock.time() + 30)
    monkeypatch.setattr(store, "_deadline", lambda: (time.time() - 1).hex())  # too late: refused unrun
    with pytest.raises(StoreUnavailable, match="after its deadline"):
        store.finish_and_claim("a", 1, "me", result=1, lease_until=clock.time() + 30)
    monkeypatch.undo()
    ended, claimed = store.finish_and_claim("a", 1, "me", result=1, lease_until=clock.time() + 30)
    assert (ended.state, claimed.id) == (State.DONE, "b")


def test_an_end_recovered_from_an_expired_lease_is_not_taken_for_its_owner_s_when_asked_again(make, clock, monkeypatch):
    store, elsewhere = make(), make()
    store.admit([new("a", clock, max_retries=0)])
    store.claim("me", clock.time() + 5)
    _fails_unrun(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish("a", 1, "me", result=1)
    clock.advance(10)
    [lost] = elsewhere.recover(lambda task: None)  # another process: this one's end is still to be asked again
    assert lost.state is State.FAILED
    assert store.finish("a", 1, "me", result=1) is None  # the attempt counts as lost: its end is dropped


def test_an_attempt_abandoned_for_its_owner_is_not_taken_for_the_owner_s_end_when_asked_again(make, clock, monkeypatch):
    # The drain abandons at its deadline while a worker writes its end again: that end was answered as
    # recorded, and the pool counted the task final twice, once abandoned and once as the worker's end.
    store = make()
    store.admit([new("a", clock)])
    store.claim("me", clock.time() + 30)
    _fails_unrun(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        store.finish("a", 1, "me", result=1)
    abandoned = []
    drain = threading.Thread(target=lambda: abandoned.extend(store.abandon("abandoned at shutdown", owner="me")))
    drain.start()
    drain.join(WAIT_S)
    assert [(t.id, t.state) for t in abandoned] == [("a", State.FAILED)]
    assert store.finish("a", 1, "me", result=1) is None  # dropped, as an end after its abandon


def test_a_pool_whose_end_reply_was_lost_counts_the_end_and_runs_the_task_claimed_with_it(make, monkeypatch):
    # The end was logged "result dropped" and not counted, and the task claimed in the same step never ran:
    # failed as lost once its lease ran out (max_retries 0: for good).
    store = make(clock=time.time)
    ran, finished = [], []
    release = threading.Event()

    class Ends(PoolObserver):
        def attempt_finished(self, task: Task, seconds: float) -> None:
            finished.append((task.id, task.state))

    def handler(task: Task, cancel: threading.Event) -> None:
        ran.append(task.id)
        if task.id == "y0":
            release.wait(WAIT_S)

    pool = WorkerPool(handler, store=store, workers=1, wait=lambda event, seconds: event.is_set(), observers=[Ends()])
    try:
        pool.submit("y0")
        wait_until(lambda: ran == ["y0"], timeout=WAIT_S, what="y0 to start")
        pool.submit("y1")
        _reply_lost(store, monkeypatch, "finish_and_claim")  # y0's end and y1's claim: run, unanswered
        release.set()
        wait_until(lambda: len(finished) == 2, timeout=WAIT_S, what="both ends")
        assert ran == ["y0", "y1"]
        assert finished == [("y0", State.DONE), ("y1", State.DONE)]
        assert store.get("y1").attempts == 1
    finally:
        release.set()
        pool.shutdown(timeout=0)


def test_a_pool_that_begins_to_drain_while_an_end_reply_is_lost_leaves_the_task_claimed_with_it_queued(
    make, monkeypatch
):
    # The end written again once the drain began claimed nothing, but y1, which the lost try claimed, stayed
    # this pool's running attempt: the drain waited for it to its deadline, then failed it abandoned, unrun.
    store = make(clock=time.time)
    ran, summaries = [], []
    release = threading.Event()
    run = store._run

    def wait(event: threading.Event, seconds: float | None) -> bool:
        if release.is_set() and store._run == run and not summaries:  # the reply was lost: drain before the next try
            summaries.append(pool.shutdown(timeout=WAIT_S, wait=False))
            return False
        return event.wait(WAIT_S if seconds is None else min(seconds, WAIT_S))

    def handler(task: Task, cancel: threading.Event) -> None:
        ran.append(task.id)
        if task.id == "y0":
            release.wait(WAIT_S)

    pool = WorkerPool(handler, store=store, workers=1, wait=wait)
    try:
        pool.submit("y0")
        wait_until(lambda: ran == ["y0"], timeout=WAIT_S, what="y0 to start")
        pool.submit("y1")
        _reply_lost(store, monkeypatch, "finish_and_claim")  # y0's end and y1's claim: run, unanswered
        release.set()
        wait_until(lambda: summaries, timeout=WAIT_S, what="the drain to begin")
        summary = pool.shutdown(timeout=WAIT_S)
        assert ran == ["y0"]
        assert summary.abandoned == ()
        assert summary.counts[State.DONE] == 1
        y1 = store.get("y1")
        assert (y1.state, y1.attempts) == (State.QUEUED, 0)  # left for another process, or the next start
    finally:
        release.set()
        pool.shutdown(timeout=0)


def test_a_pool_that_begins_to_drain_while_a_claim_reply_is_lost_leaves_the_task_it_took_queued(make, monkeypatch):
    # The worker stopped without asking its claim again: y0, which the lost claim took, stayed this pool's running
    # attempt with no thread to run it; the drain waited for it to its deadline, then failed it abandoned, unrun.
    store = make(clock=time.time)
    ran, summaries = [], []
    run = _claim_reply_lost(store, monkeypatch)

    def wait(event: threading.Event, seconds: float | None) -> bool:
        if store._run == run and not summaries:  # the claim's reply was lost: the drain begins before its next try
            summaries.append(pool.shutdown(timeout=WAIT_S, wait=False))
            return False
        return event.wait(WAIT_S if seconds is None else min(seconds, WAIT_S))

    pool = WorkerPool(lambda task, cancel: ran.append(task.id), store=store, workers=1, wait=wait)
    try:
        pool.submit("y0")
        wait_until(lambda: summaries, timeout=WAIT_S, what="the drain to begin")
        summary = pool.shutdown(timeout=WAIT_S)
        assert ran == [] and summary.abandoned == ()
        y0 = store.get("y0")
        assert (y0.state, y0.attempts) == (State.QUEUED, 0)  # left for another process, or the next start
        assert store.unfinished(pool.owner) == 0
    finally:
        pool.shutdown(timeout=0)


def test_a_stepped_pool_puts_back_the_task_its_lost_claim_took_when_it_stops(make, monkeypatch):
    # The thread driving step() claimed no more: y0, which the lost claim took, stayed this pool's running
    # attempt with nothing to run it; the drain waited for it to its deadline, then failed it abandoned, unrun.
    store = make(clock=time.time)
    ran = []
    pool = WorkerPool(lambda task, cancel: ran.append(task.id), store=store, threads=False)
    pool.submit("y0")
    _claim_reply_lost(store, monkeypatch)
    with pytest.raises(StoreUnavailable):
        pool.step()
    assert store.get("y0").state is State.RUNNING
    summary = pool.shutdown(timeout=WAIT_S)
    assert ran == [] and summary.abandoned == ()
    y0 = store.get("y0")
    assert (y0.state, y0.attempts) == (State.QUEUED, 0)  # left for another process, or the next start
    assert store.unfinished(pool.owner) == 0


def test_a_stepped_pool_stopped_from_another_thread_puts_back_its_lost_claim_at_its_next_step(make, monkeypatch):
    # The thread that stops the pool (a signal's, a supervisor's) is not the one whose claim was lost: the
    # step() that finds the pool no longer claiming puts that task back, or it ran out its lease unrun.
    store = make(clock=time.time)
    ran = []
    pool = WorkerPool(lambda task, cancel: ran.append(task.id), store=store, threads=False)
    pool.submit("y0")
    _claim_reply_lost(store, monkeypatch)
    with ThreadPoolExecutor(max_workers=1) as stepper:  # one thread: the lost claim is its own
        with pytest.raises(StoreUnavailable):
            stepper.submit(pool.step).result(WAIT_S)
        assert pool.shutdown(wait=False) is None
        assert store.get("y0").state is State.RUNNING  # not the stopping thread's claim to put back
        assert stepper.submit(pool.step).result(WAIT_S) is False
    y0 = store.get("y0")
    assert (y0.state, y0.attempts) == (State.QUEUED, 0)  # left for another process, or the next start
    summary = pool.shutdown(timeout=0)
    assert ran == [] and summary.abandoned == ()


def test_a_claim_whose_reply_was_lost_answers_the_task_it_took_when_asked_again(make, clock, monkeypatch):
    # The task ran under this owner with nothing to run it, then was failed as lost once its lease ran out.
    store = make()
    store.admit([new("a", clock, max_retries=0), new("b", clock)])
    _reply_lost(store, monkeypatch, "claim")
    with pytest.raises(StoreUnavailable):
        store.claim("me", clock.time() + 30)
    clock.advance(1)
    claimed = store.claim("me", clock.time() + 30)
    assert (claimed.id, claimed.state, claimed.attempts) == ("a", State.RUNNING, 1)
    assert store.get("b").state is State.QUEUED
    clock.advance(29.5)  # past the lease the lost claim drew: the claim asked again renewed it
    assert store.recover(lambda task: None) == []
    assert store.claim("me", clock.time() + 30).id == "b"  # the next claim is a claim as ever


def test_a_pool_whose_claim_reply_was_lost_runs_the_task_it_took(make, monkeypatch):
    store = make(clock=time.time)
    ran = []
    run = _claim_reply_lost(store, monkeypatch)

    pool = WorkerPool(lambda task, cancel: ran.append(task.id), store=store, workers=1, wait=lambda e, s: e.is_set())
    try:
        pool.submit("y0")
        wait_until(lambda: store.get("y0").state is State.DONE, timeout=WAIT_S, what="y0 to be done")
        assert store._run is run  # the claim that took y0 was lost
        assert ran == ["y0"] and store.get("y0").attempts == 1
    finally:
        pool.shutdown(timeout=0)


def test_instances_sign_cursors_with_one_key_after_redis_lost_it(make, server):
    # Redis restarted without persistence (or emptied): each store object kept the key it read first, and
    # the instances signed cursors with different keys, refusing each other's (and their own workers').
    a, b = make(), make()
    assert a.position_key() == b.position_key()
    server.client().flushall()
    started_since = make()  # the first to ask makes the new key
    assert a.position_key() == started_since.position_key() == b.position_key()
