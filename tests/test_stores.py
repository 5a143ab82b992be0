"""The store contract (workerpool/stores/base.py), checked against every store in tests/stores.py."""

import itertools
import math
import threading

import pytest
from doubles import WAIT_S
from stores import STORES

from workerpool import FINAL_STATES, DuplicateTask, InvalidTransition, QueueFull, State, Task
from workerpool.stores.base import LOST_EXPIRED, LOST_UNREACHABLE, InvalidPosition
from workerpool.task import TRANSITIONS, check_transition

OWNER = "host:1:a"
OTHER = "host:2:b"
LEASE = 30.0


@pytest.fixture(params=sorted(STORES))
def make_store(request, clock, tmp_path):
    made = []

    def make(**limits):
        store = STORES[request.param](clock, tmp_path / f"store{len(made)}", **limits)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


@pytest.fixture
def store(make_store):
    return make_store()


def new(clock, task_id, max_retries=0, *, delay=None, payload="payload"):
    now = clock.time()
    return Task(task_id, payload, max_retries, created_at=now, next_attempt_at=None if delay is None else now + delay)


def admit(store, clock, *ids, **kwargs):
    results = store.admit([new(clock, task_id, **kwargs) for task_id in ids])
    assert all(isinstance(r, Task) for r in results), results
    return results


def claim(store, clock, owner=OWNER):
    return store.claim(owner, clock.time() + LEASE)


def run(store, clock, task_id, *, error=None, result=None, retry_at=None):
    """Claim ``task_id`` (it must be next) and finish the attempt."""
    task = claim(store, clock)
    assert task is not None and task.id == task_id, task
    return store.finish(task.id, task.attempts, OWNER, error=error, result=result, retry_at=retry_at)


# -- the transition table -------------------------------------------------------------


@pytest.mark.parametrize("current, new_state", list(itertools.product(State, State)))
def test_transition_table_is_checked_in_one_place(current, new_state):
    if new_state in TRANSITIONS[current]:
        check_transition(current, new_state)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, new_state)


def test_final_states_have_no_way_out():
    assert {State.DONE, State.FAILED, State.CANCELLED} == FINAL_STATES
    assert all(TRANSITIONS[state] == frozenset() for state in FINAL_STATES)


# -- admission ------------------------------------------------------------------------


def test_an_admitted_task_is_stored_as_given(store, clock):
    task = Task("a", {"any": ["json", 1]}, 2, created_at=clock.time(), request_id="req-1")
    assert store.admit([task]) == [task]
    assert store.get("a") == task
    assert store.get("unknown") is None


def test_a_duplicate_id_is_refused_and_changes_nothing(store, clock):
    admit(store, clock, "a", payload="first")
    before = (store.get("a"), store.stats())
    [refused] = store.admit([Task("a", "second", 5, created_at=clock.time())])
    assert isinstance(refused, DuplicateTask)
    assert (store.get("a"), store.stats()) == before


def test_a_task_admitted_alone_after_a_later_stamped_one_takes_its_creation_time(store, clock):
    later = Task("later", "", 0, created_at=float(math.floor(clock.time()) + 2))  # a whole number of seconds
    store.admit([later])
    [alone] = store.admit([Task("earlier", "", 0, created_at=clock.time())])
    assert repr(alone.created_at) == repr(later.created_at)  # the same float
    [delayed] = store.admit([Task("delayed", "", 0, created_at=clock.time(), next_attempt_at=clock.time() + 60)])
    assert (delayed.created_at, delayed.next_attempt_at) == (later.created_at, clock.time() + 60)
    assert [store.get(task_id) for task_id in ("earlier", "delayed")] == [alone, delayed]
    assert [t.id for t in store.list()] == ["delayed", "earlier", "later"]


def test_creation_times_never_run_backwards_in_admission_order(store, clock):
    # A submitter reads the clock before the store's step, so a task stamped
    # earlier can be admitted after one stamped later (two requests racing).
    # The listing is in admission order; the store keeps the times agreeing with it.
    later = Task("later", "", 0, created_at=clock.time() + 0.5)
    earlier = Task("earlier", "", 0, created_at=clock.time())
    [first] = store.admit([later])
    [second, third] = store.admit([earlier, Task("in-batch", "", 0, created_at=clock.time() - 1)])
    assert first == later
    assert second.created_at == third.created_at == later.created_at  # clamped, never moved back
    listed = store.list()
    assert [t.id for t in listed] == ["in-batch", "earlier", "later"]
    times = [t.created_at for t in listed]
    assert times == sorted(times, reverse=True), times
    assert [store.get(t.id) for t in listed] == listed == [third, second, first]


def test_a_batch_is_admitted_in_order_and_each_task_checked_against_the_room_left(make_store, clock):
    store = make_store(capacity=3)
    admit(store, clock, "old")
    results = store.admit([new(clock, i) for i in ("a", "old", "a", "b", "c", "d")])
    kinds = [type(r).__name__ if not isinstance(r, Task) else r.id for r in results]
    assert kinds == ["a", "DuplicateTask", "DuplicateTask", "b", "QueueFull", "QueueFull"]
    assert [t.id for t in store.list()] == ["b", "a", "old"]
    assert store.get("c") is None and store.get("d") is None


def test_the_bound_counts_tasks_not_yet_started_delayed_ones_included(make_store, clock):
    store = make_store(capacity=2)
    admit(store, clock, "now")
    admit(store, clock, "later", delay=60)
    assert store.stats().waiting == 2
    [refused] = store.admit([new(clock, "third")])
    assert isinstance(refused, QueueFull) and refused.capacity == 2
    claim(store, clock)  # "now" starts: room for one more
    admit(store, clock, "third")


def test_a_full_queue_tells_how_many_waiting_tasks_are_delayed_and_when_the_first_falls_due(make_store, clock):
    store = make_store(capacity=2, ttl=60, max_finished=10)
    # Admitted and refused in one call: the refusal counts the tasks the same call admitted.
    *_, full = store.admit([new(clock, "a", delay=100.0), new(clock, "b", delay=200.0), new(clock, "c")])
    assert isinstance(full, QueueFull)
    assert (full.capacity, full.delayed, full.due_in) == (2, 2, 100.0)  # no place frees before "a" can start
    clock.advance(100)
    (full,) = store.admit([new(clock, "c")])
    assert (full.delayed, full.due_in) == (1, None)  # "a" is due: a worker frees its place when it starts it


def test_a_full_queue_of_delayed_tasks_tells_when_the_first_of_them_falls_due_not_a_waiting_retry(make_store, clock):
    # A retry waiting out its backoff holds no place and frees none when it runs: its due time was told.
    store = make_store(capacity=2, ttl=60, max_finished=10)
    admit(store, clock, "r", max_retries=5)
    run(store, clock, "r", error="boom", retry_at=clock.time() + 10)
    admit(store, clock, "a", delay=1000.0)
    *_, full = store.admit([new(clock, "b", delay=2000.0), new(clock, "c")])
    assert (full.capacity, full.delayed, full.due_in) == (2, 2, 1000.0)
    clock.advance(10)  # the retry is due: still no place frees before "a" can start
    (full,) = store.admit([new(clock, "c")])
    assert (full.delayed, full.due_in) == (2, 990.0)


def test_a_full_queue_with_a_task_due_says_none_is_delayed(make_store, clock):
    store = make_store(capacity=1)
    admit(store, clock, "due")
    (full,) = store.admit([new(clock, "c")])
    assert (full.capacity, full.delayed, full.due_in) == (1, 0, None)


def test_retries_never_count_against_the_bound_and_are_never_refused(make_store, clock):
    store = make_store(capacity=1)
    admit(store, clock, "r", max_retries=5)
    run(store, clock, "r", error="boom", retry_at=clock.time() + 10)
    admit(store, clock, "fills")  # the waiting retry took no room
    clock.advance(10)
    assert claim(store, clock).id == "r"  # a due retry runs although the store is full
    run_again = store.finish("r", 2, OWNER, error="boom", retry_at=clock.time())
    assert run_again.state is State.QUEUED
    assert store.stats().waiting == 1


# -- claim ----------------------------------------------------------------------------


def test_claim_starts_the_oldest_due_task(store, clock):
    admit(store, clock, "a", "b")
    clock.advance(1)
    task = claim(store, clock)
    assert (task.id, task.state, task.attempts, task.started_at, task.next_attempt_at) == (
        "a",
        State.RUNNING,
        1,
        clock.time(),
        None,
    )
    assert store.get("a") == task
    assert claim(store, clock).id == "b"
    assert claim(store, clock) is None


def test_due_retries_run_before_new_work(store, clock):
    admit(store, clock, "r", max_retries=1)
    run(store, clock, "r", error="boom", retry_at=clock.time() + 5)
    admit(store, clock, "n1", "n2")
    assert claim(store, clock).id == "n1"
    clock.advance(5)
    assert [claim(store, clock).id, claim(store, clock).id] == ["r", "n2"]


def test_a_claim_passes_over_due_tasks_cancelled_while_they_waited(store, clock):
    admit(store, clock, "r1", "r2", max_retries=1)
    run(store, clock, "r1", error="boom", retry_at=clock.time() + 5)
    run(store, clock, "r2", error="boom", retry_at=clock.time() + 5)
    admit(store, clock, "n1", "n2")
    clock.advance(5)
    assert store.stats().due == 4  # both retries fell due, and are first in line
    store.cancel("r1")
    store.cancel("n1")
    assert claim(store, clock).id == "r2"
    assert claim(store, clock).id == "n2"
    assert claim(store, clock) is None


def test_a_delayed_task_waits_for_its_time(store, clock):
    admit(store, clock, "later", delay=30)
    admit(store, clock, "now")
    assert store.get("later").next_attempt_at == clock.time() + 30
    assert claim(store, clock).id == "now"
    assert claim(store, clock) is None
    assert store.seconds_until_due() == pytest.approx(30)
    clock.advance(30)
    assert store.seconds_until_due() == 0
    task = claim(store, clock)
    assert (task.id, task.attempts, task.next_attempt_at) == ("later", 1, None)
    assert store.seconds_until_due() is None


def test_a_task_due_but_not_yet_claimed_keeps_its_due_time_until_its_attempt_starts(store, clock):
    # What GET /tasks/<id> shows as next_attempt_at while the task waits for a free worker: a time in the past.
    admit(store, clock, "later", delay=30)
    admit(store, clock, "retry", max_retries=1)
    run(store, clock, "retry", error="boom", retry_at=clock.time() + 5)
    due = {"later": clock.time() + 30, "retry": clock.time() + 5}
    clock.advance(40)
    assert {task_id: store.get(task_id).next_attempt_at for task_id in due} == due
    stats = store.stats()
    assert (stats.due, stats.retries_pending) == (2, 0)
    claimed = [claim(store, clock), claim(store, clock)]
    assert sorted((task.id, task.next_attempt_at) for task in claimed) == [("later", None), ("retry", None)]


def test_stats_count_every_kind_of_waiting_task(store, clock):
    admit(store, clock, "run", "retry", "fail", max_retries=1)
    admit(store, clock, "due")
    admit(store, clock, "delayed", delay=100)
    claim(store, clock)
    run(store, clock, "retry", error="boom", retry_at=clock.time() + 50)
    run(store, clock, "fail", error="boom")
    stats = store.stats()
    assert stats.counts == {State.QUEUED: 3, State.RUNNING: 1, State.DONE: 0, State.FAILED: 1, State.CANCELLED: 0}
    assert (stats.waiting, stats.due, stats.retries_pending) == (2, 1, 1)
    assert store.unfinished() == 4
    clock.advance(60)
    stats = store.stats()
    assert (stats.waiting, stats.due, stats.retries_pending) == (2, 2, 0)


# -- finish ---------------------------------------------------------------------------


def end(store, clock, how, task_id, attempt, owner=OWNER, **kwargs):
    """An attempt's end written by ``finish``, or by ``finish_and_claim`` (whose claim must find nothing due)."""
    if how == "finish":
        return store.finish(task_id, attempt, owner, **kwargs)
    ended, claimed = store.finish_and_claim(task_id, attempt, owner, lease_until=clock.time() + LEASE, **kwargs)
    assert claimed is None
    return ended


@pytest.mark.parametrize("how", ["finish", "finish_and_claim"])
def test_a_success_stores_the_result_and_drops_the_payload(store, clock, how):
    admit(store, clock, "a", payload="big payload")
    assert claim(store, clock).payload == "big payload"
    clock.advance(2)
    done = end(store, clock, how, "a", 1, result={"answer": 42})
    assert (done.state, done.result, done.payload, done.finished_at, done.last_error) == (
        State.DONE,
        {"answer": 42},
        "",
        clock.time(),
        None,
    )
    assert store.get("a") == done


@pytest.mark.parametrize("result", ["lone \ud800 half", {"text": "caf\u00e9 \udfff"}])
def test_a_result_holding_a_lone_surrogate_is_kept_as_every_store_keeps_other_text(store, clock, result):
    # JSON can carry one ("\\ud800") and a handler can return one; it has no UTF-8 form to write as is.
    admit(store, clock, "a")
    claim(store, clock)
    done = store.finish("a", 1, OWNER, result=result)
    assert (done.state, done.result) == (State.DONE, result)
    assert store.get("a").result == result


def test_a_failure_with_a_retry_time_queues_the_task_again(store, clock):
    admit(store, clock, "a", max_retries=2)
    retry = run(store, clock, "a", error="RuntimeError: boom", retry_at=clock.time() + 7)
    assert (retry.state, retry.attempts, retry.last_error, retry.next_attempt_at, retry.payload) == (
        State.QUEUED,
        1,
        "RuntimeError: boom",
        clock.time() + 7,
        "payload",
    )
    assert store.stats().retries_pending == 1


def test_a_success_after_a_failed_attempt_keeps_the_error_of_that_attempt(store, clock):
    # As README and openapi.yaml say: last_error is the latest failed attempt's, kept on done.
    admit(store, clock, "a", max_retries=2)
    run(store, clock, "a", error="RuntimeError: boom", retry_at=clock.time())
    done = run(store, clock, "a", result={"ok": True})
    assert (done.state, done.attempts, done.result, done.last_error) == (
        State.DONE,
        2,
        {"ok": True},
        "RuntimeError: boom",
    )
    assert store.get("a") == done
    assert [task.last_error for task in store.list(State.DONE)] == ["RuntimeError: boom"]


@pytest.mark.parametrize("payload", [None, "", 0, False, [], {}], ids=repr)
@pytest.mark.parametrize("delay", [None, 5.0], ids=["due", "delayed"])
def test_an_attempt_gets_a_null_or_empty_payload_as_admitted(store, clock, payload, delay):
    """The Redis store wrote a null payload as no payload at all, which reads back as "": the handler got ""."""
    admit(store, clock, "a", payload=payload, delay=delay)
    assert store.get("a").payload == payload and type(store.get("a").payload) is type(payload)
    clock.advance(10)
    claimed = claim(store, clock)
    assert (claimed.id, claimed.payload, type(claimed.payload)) == ("a", payload, type(payload))


def test_every_attempt_gets_the_payload_as_admitted_whatever_an_earlier_attempt_did_to_its_own(store, clock):
    def payload():
        return {"seen": [], "cursor": {"n": 0, "path": [[1], {"k": "v"}]}, "items": [1, 2, 3]}

    admit(store, clock, "a", max_retries=3, payload=payload())
    first = claim(store, clock)
    assert first.payload == payload()
    first.payload["seen"].append(1)
    first.payload["cursor"]["path"][0].append(2)
    first.payload["cursor"]["path"][1].clear()
    del first.payload["items"]
    _, second = store.finish_and_claim(
        "a", 1, OWNER, error="boom", retry_at=clock.time(), lease_until=clock.time() + LEASE
    )
    assert (second.id, second.attempts, second.payload) == ("a", 2, payload())
    second.payload.clear()
    store.finish("a", 2, OWNER, error="boom", retry_at=clock.time())
    third = claim(store, clock)
    assert (third.attempts, third.payload) == (3, payload())
    assert first.payload["seen"] == [1]  # each attempt's changes stay its own


def test_a_failure_without_a_retry_time_fails_the_task(store, clock):
    admit(store, clock, "a")
    failed = run(store, clock, "a", error="boom")
    assert (failed.state, failed.last_error, failed.finished_at, failed.payload) == (
        State.FAILED,
        "boom",
        clock.time(),
        "",
    )


@pytest.mark.parametrize("how", ["finish", "finish_and_claim"])
def test_late_writers_are_refused_and_change_nothing(store, clock, how):
    admit(store, clock, "a", max_retries=3)
    task = claim(store, clock)
    assert end(store, clock, how, "a", 2) is None  # not that attempt
    assert end(store, clock, how, "a", 1, OTHER) is None  # not that owner
    assert end(store, clock, how, "gone", 1) is None  # unknown
    assert store.get("a") == task
    end(store, clock, how, "a", 1, error="boom", retry_at=clock.time() + 100)
    assert end(store, clock, how, "a", 1) is None  # no longer running
    assert store.get("a").state is State.QUEUED


# -- cancel ---------------------------------------------------------------------------


def test_cancel_of_an_unknown_id_is_none(store):
    assert store.cancel("nope") == (None, False)


@pytest.mark.parametrize("kind", ["new", "delayed", "waiting for a retry"])
def test_a_queued_task_is_cancelled_at_once_and_never_runs(store, clock, kind):
    if kind == "waiting for a retry":
        admit(store, clock, "a", max_retries=1)
        run(store, clock, "a", error="boom", retry_at=clock.time() + 5)
    else:
        admit(store, clock, "a", delay=5 if kind == "delayed" else None)
    clock.advance(1)
    cancelled, changed = store.cancel("a")
    assert changed
    assert (cancelled.state, cancelled.finished_at, cancelled.next_attempt_at, cancelled.payload) == (
        State.CANCELLED,
        clock.time(),
        None,
        "",
    )
    assert store.get("a") == cancelled
    clock.advance(10)
    assert claim(store, clock) is None
    stats = store.stats()
    assert (stats.waiting, stats.due, stats.retries_pending, store.unfinished()) == (0, 0, 0, 0)
    assert store.seconds_until_due() is None
    assert store.cancel("a") == (cancelled, False)  # a repeat is harmless, and says it changed nothing


def test_a_cancelled_task_frees_its_room(make_store, clock):
    store = make_store(capacity=1)
    admit(store, clock, "a")
    store.cancel("a")
    admit(store, clock, "b")
    assert claim(store, clock).id == "b"


def test_a_running_task_is_marked_and_its_attempt_decides(store, clock):
    admit(store, clock, "stops", "ignores", max_retries=3)
    claim(store, clock)
    claim(store, clock)
    for task_id in ("stops", "ignores"):
        marked, changed = store.cancel(task_id)
        assert (marked.state, marked.cancel_requested, changed) == (State.RUNNING, True, True)
        assert store.cancel(task_id) == (marked, False)
    # Raising ends it cancelled, never retried; returning ends it done.
    stopped = store.finish("stops", 1, OWNER, error="AttemptCancelled: attempt cancelled", retry_at=clock.time())
    assert (stopped.state, stopped.last_error, stopped.finished_at) == (
        State.CANCELLED,
        "AttemptCancelled: attempt cancelled",
        clock.time(),
    )
    assert store.finish("ignores", 1, OWNER, result=1).state is State.DONE


@pytest.mark.parametrize("final", [State.DONE, State.FAILED, State.CANCELLED])
def test_a_final_task_is_unchanged_by_cancel(store, clock, final):
    admit(store, clock, "a")
    if final is State.CANCELLED:
        store.cancel("a")
    else:
        run(store, clock, "a", error=None if final is State.DONE else "boom")
    before = store.get("a")
    assert before.state is final
    assert store.cancel("a") == (before, False)


# -- abandon (shutdown) ---------------------------------------------------------------


def test_abandon_fails_unfinished_work_and_refuses_its_late_end(store, clock):
    if store.shared:
        pytest.skip("a shared store abandons only the owner's running attempts")
    admit(store, clock, "running", "queued", "retry", max_retries=1)
    admit(store, clock, "delayed", delay=50)
    claim(store, clock)
    claim(store, clock)
    run(store, clock, "retry", error="boom", retry_at=clock.time() + 5)
    admit(store, clock, "done")
    run(store, clock, "done")
    abandoned = store.abandon("gone", owner=OWNER)
    assert sorted(t.id for t in abandoned) == ["delayed", "queued", "retry", "running"]
    for task in abandoned:
        assert (task.state, task.last_error, task.finished_at, task.next_attempt_at) == (
            State.FAILED,
            "gone",
            clock.time(),
            None,
        )
        assert store.get(task.id) == task
    assert store.finish("running", 1, OWNER) is None
    assert store.get("done").state is State.DONE
    clock.advance(100)
    assert claim(store, clock) is None
    assert store.unfinished() == 0


def test_a_shared_store_abandons_only_the_owners_attempts(store, clock):
    if not store.shared:
        pytest.skip("a store of one process abandons everything")
    admit(store, clock, "mine", "theirs", "queued")
    claim(store, clock, OWNER)
    claim(store, clock, OTHER)
    assert [t.id for t in store.abandon("gone", owner=OWNER)] == ["mine"]
    assert store.get("theirs").state is State.RUNNING
    assert store.get("queued").state is State.QUEUED


def test_a_claim_put_back_is_queued_again_unrun_in_its_place_its_attempt_not_counted(store, clock):
    admit(store, clock, "first", "second", payload={"k": [1]})
    clock.advance(1)
    claimed = claim(store, clock)
    assert claimed.id == "first"
    stats = store.stats()
    clock.advance(1)
    back = store.put_back("first", 1, OWNER)
    assert back == store.get("first")
    assert (back.state, back.attempts, back.started_at, back.next_attempt_at) == (State.QUEUED, 0, None, None)
    after = store.stats()
    assert (after.waiting, after.due) == (stats.waiting + 1, stats.due + 1)
    assert (after.counts[State.QUEUED], after.counts[State.RUNNING]) == (2, 0)
    again = claim(store, clock)  # back in its place by creation, ahead of the task admitted after it
    assert (again.id, again.attempts, again.payload) == ("first", 1, {"k": [1]})
    assert store.put_back("first", 2, OWNER) is None  # not that attempt
    assert store.put_back("first", 1, OTHER) is None  # not that owner
    assert store.finish("first", 1, OWNER).state is State.DONE
    assert store.put_back("first", 1, OWNER) is None  # ended
    assert store.unfinished(OWNER) == (0 if store.shared else 1)


def test_a_retry_put_back_falls_due_now_with_its_attempts_as_before(store, clock):
    admit(store, clock, "r", max_retries=2)
    run(store, clock, "r", error="boom", retry_at=clock.time() + 5)
    clock.advance(5)
    claimed = claim(store, clock)
    assert claimed.attempts == 2
    clock.advance(1)
    back = store.put_back("r", 2, OWNER)
    assert (back.state, back.attempts, back.last_error, back.next_attempt_at) == (State.QUEUED, 1, "boom", clock.time())
    assert store.stats().retries_pending == 0 and store.seconds_until_due() == 0
    assert claim(store, clock).attempts == 2


def test_a_claim_put_back_after_its_cancel_was_requested_is_cancelled(store, clock):
    admit(store, clock, "a")
    claim(store, clock)
    store.cancel("a")
    back = store.put_back("a", 1, OWNER)
    assert (back.state, back.finished_at, back.attempts) == (State.CANCELLED, clock.time(), 0)
    assert store.get("a") == back and claim(store, clock) is None


def test_a_claim_the_abandon_failed_is_not_put_back(store, clock):
    admit(store, clock, "a")
    claim(store, clock)
    store.abandon("gone", owner=OWNER)
    assert store.put_back("a", 1, OWNER) is None
    assert store.get("a").state is State.FAILED


# -- leases ---------------------------------------------------------------------------


def test_an_expired_lease_counts_as_a_failed_attempt(store, clock):
    if not store.shared:
        pytest.skip("leases never expire in a store of one process")
    admit(store, clock, "retried", max_retries=1)
    admit(store, clock, "failed")
    admit(store, clock, "renewed")
    for _ in range(3):
        claim(store, clock)
    clock.advance(LEASE / 2)
    renewal = store.renew(OWNER, ["renewed"], clock.time() + LEASE)
    assert renewal.lost == frozenset()
    clock.advance(LEASE / 2 + 1)
    recovered = store.recover(lambda task: clock.time() + 1 if task.attempts <= task.max_retries else None)
    assert sorted((t.id, t.state) for t in recovered) == [("failed", State.FAILED), ("retried", State.QUEUED)]
    assert all(t.last_error.startswith("lost") for t in recovered)
    assert store.renew(OWNER, ["retried", "renewed"], clock.time() + LEASE).lost == {"retried"}
    assert store.finish("retried", 1, OWNER) is None


def test_the_old_owner_of_a_recovered_attempt_cannot_renew_the_lease_of_the_attempt_another_owner_claimed(store, clock):
    if not store.shared:
        pytest.skip("leases never expire in a store of one process")
    admit(store, clock, "x", max_retries=1)
    claim(store, clock)
    clock.advance(LEASE + 1)  # its owner paused past its lease: another process recovers the attempt and runs x again
    [recovered] = store.recover(lambda task: clock.time())
    assert (recovered.state, recovered.attempts) == (State.QUEUED, 1)
    assert (claim(store, clock, OTHER).id, store.get("x").attempts) == ("x", 2)
    store.cancel("x")
    # Resumed, the old owner learns that its attempt is over: it is not told of the cancel, nor given the lease.
    renewal = store.renew(OWNER, ["x"], clock.time() + 10 * LEASE)
    assert (renewal.lost, renewal.cancel_requested) == ({"x"}, frozenset())
    clock.advance(LEASE + 1)  # the new owner stopped renewing: its attempt is recovered on its own lease's time
    [lost] = store.recover(lambda task: None)
    assert (lost.id, lost.state, lost.attempts) == ("x", State.CANCELLED, 2)


@pytest.mark.parametrize("step", ["finish", "finish_and_claim"])
def test_the_late_end_of_a_recovered_attempt_leaves_a_new_task_with_its_id_alone(make_store, clock, step):
    store = make_store(max_finished=1)
    if not store.shared:
        pytest.skip("leases never expire in a store of one process")
    admit(store, clock, "x")
    old = claim(store, clock)
    clock.advance(LEASE + 1)  # its owner paused past its lease: another process recovers the attempt
    [recovered] = store.recover(lambda task: None)
    assert recovered.state is State.FAILED
    clock.advance(1)
    admit(store, clock, "filler")
    run(store, clock, "filler")  # retention keeps one finished task: x is forgotten, its id free again
    assert store.get("x") is None
    admit(store, clock, "x")  # a new task with the same id, whose attempt 1 the same owner runs
    new = claim(store, clock)
    assert (new.id, new.attempts, new.created_at) == ("x", 1, old.created_at + LEASE + 2)
    # The old attempt's late end, then the new one's own: each as the pool writes it, with its task's creation time.
    if step == "finish":
        late = store.finish("x", 1, OWNER, result="old", created_at=old.created_at)
    else:
        late, _ = store.finish_and_claim(
            "x", 1, OWNER, result="old", lease_until=clock.time() + LEASE, created_at=old.created_at
        )
    assert late is None
    assert store.get("x").state is State.RUNNING
    ended = store.finish("x", 1, OWNER, result="new", created_at=new.created_at)
    assert (ended.state, ended.result) == (State.DONE, "new")


def test_a_sweep_ends_only_leases_expired_before_its_cutoff_and_says_which_expired_while_unreachable(store, clock):
    if not store.shared:
        pytest.skip("leases never expire in a store of one process")
    admit(store, clock, "before", "during", "after", "renewed")
    expiries = {}
    for task_id in ("before", "during", "after", "renewed"):  # leases 10 s apart
        task = claim(store, clock)
        assert task.id == task_id
        expiries[task_id] = clock.time() + LEASE
        clock.advance(10)
    outage = (expiries["before"] + 1, expiries["during"] + 1)  # the store was unreachable in between
    clock.advance(LEASE)  # every lease has expired
    assert store.recover(lambda task: None, before=outage[0], unreachable=outage) != []  # "before" alone
    assert store.get("before").last_error == LOST_EXPIRED
    assert store.get("during").state is State.RUNNING  # held back: its owner may renew it yet
    assert store.renew(OWNER, ["renewed"], clock.time() + LEASE).lost == frozenset()  # the owner was alive
    recovered = store.recover(lambda task: None, unreachable=outage)
    reasons = {t.id: t.last_error for t in recovered}
    assert sorted(reasons) == ["after", "during"]
    assert reasons["during"] == LOST_UNREACHABLE  # not that its process stopped: nobody here can tell
    assert reasons["after"] == LOST_EXPIRED  # it had the store back here: stopped, or cut off alone
    assert store.get("renewed").state is State.RUNNING
    assert store.finish("during", 1, OWNER) is None  # the late end of a recovered attempt is not applied
    assert store.get("during").state is State.FAILED


# -- reading and retention ------------------------------------------------------------


def test_list_is_newest_first_and_filters_by_state(store, clock):
    admit(store, clock, *"abcde")
    claim(store, clock)
    claim(store, clock)
    assert [t.id for t in store.list()] == list("edcba")
    assert [t.id for t in store.list(limit=2)] == ["e", "d"]
    assert [t.id for t in store.list(State.RUNNING)] == ["b", "a"]
    assert [t.id for t in store.list(State.QUEUED, limit=1)] == ["e"]
    assert store.list("running") == store.list(State.RUNNING)  # State is a StrEnum: its value names it too


def test_a_listing_carries_no_payload_which_it_never_shows(store, clock):
    admit(store, clock, "a", "b", payload={"big": "x" * 1000})
    claim(store, clock)  # a runs
    assert store.get("b").payload == store.get("a").payload == {"big": "x" * 1000}
    for state in (None, State.QUEUED, State.RUNNING):
        assert store.list(state) and all(t.payload == "" for t in store.list(state)), state
    assert store.list() == [store.get("b")._replace(payload=""), store.get("a")._replace(payload="")]


def test_a_listing_without_results_lists_the_same_tasks_with_no_result(store, clock):
    admit(store, clock, "a", "b", "c", max_retries=1)
    run(store, clock, "a", result={"big": "x" * 1000})
    run(store, clock, "b", error="boom", retry_at=clock.time() + 10)
    claim(store, clock)  # c runs
    for state in (None, *State):
        full, brief = store.list(state), store.list(state, results=False)
        assert [t._replace(result=None) for t in full] == brief, state
    assert [t.result for t in store.list(State.DONE)] == [{"big": "x" * 1000}]
    assert [t.id for t in store.list(results=False)] == ["c", "b", "a"]


def test_queued_tasks_list_by_their_entry_into_the_queue_a_retry_after_the_tasks_queued_before_it(store, clock):
    admit(store, clock, "a", "b", max_retries=1)
    run(store, clock, "a", error="boom", retry_at=clock.time() + 10)  # queued again after b
    admit(store, clock, "c")
    admit(store, clock, "later", delay=5)
    assert [t.id for t in store.list(State.QUEUED)] == ["later", "c", "a", "b"]
    assert [t.id for t in store.list(State.QUEUED, limit=3)] == ["later", "c", "a"]
    run(store, clock, "b")
    assert [t.id for t in store.list(State.QUEUED)] == ["later", "c", "a"]
    assert [t.id for t in store.list(State.QUEUED, limit=1)] == ["later"]


def test_finished_tasks_expire_after_the_ttl(make_store, clock):
    store = make_store(ttl=60)
    admit(store, clock, "old")
    run(store, clock, "old")
    clock.advance(30)
    admit(store, clock, "new")
    run(store, clock, "new")
    admit(store, clock, "waiting")
    clock.advance(30.5)
    assert store.get("old") is None
    assert store.get("new").state is State.DONE
    clock.advance(3600)
    assert store.get("new") is None
    assert store.get("waiting").state is State.QUEUED  # never evicted while unfinished
    assert store.stats().counts[State.DONE] == 0


@pytest.mark.parametrize("final", [State.DONE, State.CANCELLED])
def test_a_task_past_its_retention_is_unknown_to_cancel_as_to_get(make_store, clock, final):
    store = make_store(ttl=60)
    admit(store, clock, "old")
    if final is State.CANCELLED:
        store.cancel("old")
    else:
        run(store, clock, "old")
    clock.advance(61)
    assert store.cancel("old") == (None, False)  # nothing read it since it aged: the cancel finds it gone
    assert store.get("old") is None


def test_the_oldest_finished_are_evicted_beyond_the_count_limit(make_store, clock):
    store = make_store(max_finished=3)
    admit(store, clock, "running")
    claim(store, clock)
    for n in range(5):
        clock.advance(1)
        admit(store, clock, f"t{n}")
        if n == 4:
            store.cancel("t4")
        else:
            run(store, clock, f"t{n}", error=None if n % 2 else "boom")
        kept = [f"t{k}" for k in range(n, max(n - 3, -1), -1)]  # the newest 3 finished, after every end
        assert [t.id for t in store.list()] == [*kept, "running"]
    assert store.stats().counts == {
        State.QUEUED: 0,
        State.RUNNING: 1,
        State.DONE: 1,
        State.FAILED: 1,
        State.CANCELLED: 1,
    }


def test_an_evicted_id_can_be_admitted_again(make_store, clock):
    store = make_store(max_finished=1)
    admit(store, clock, "a", delay=5)
    store.cancel("a")
    admit(store, clock, "b")
    store.cancel("b")  # evicts a
    assert store.get("a") is None
    admit(store, clock, "a", payload="again")
    assert store.get("a").state is State.QUEUED
    assert claim(store, clock).payload == "again"  # the old delayed entry is gone with the old task
    clock.advance(10)
    assert claim(store, clock) is None


def test_an_id_past_its_retention_is_admitted_again_before_any_sweep_forgets_it(make_store, clock):
    # An admission never sweeps: on a quiet server the finished task is still stored, only no longer retained.
    store = make_store(ttl=60)
    admit(store, clock, "old")
    run(store, clock, "old")
    clock.advance(61)
    assert store.get("old") is None
    admit(store, clock, "old", payload="again")
    assert store.get("old").state is State.QUEUED
    assert claim(store, clock).payload == "again"


@pytest.mark.parametrize("limits", [{"ttl": 0}, {"max_finished": 0}, {"capacity": 0}])
def test_limits_must_be_positive(make_store, limits):
    with pytest.raises(ValueError):
        make_store(**limits)


# -- waiting for work -----------------------------------------------------------------


def test_admitted_work_wakes_a_waiting_worker(store, clock):
    waiting = threading.Event()
    returned = threading.Event()

    def worker():
        waiting.set()
        store.wait_for_work(None)
        returned.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert waiting.wait(WAIT_S)
    admit(store, clock, "a")
    assert returned.wait(WAIT_S), "admitted work did not wake the waiting worker"
    thread.join(WAIT_S)


def test_wait_for_work_returns_at_once_when_work_is_due(store, clock):
    admit(store, clock, "a")
    store.wait_for_work(None)  # would block forever otherwise


def test_a_wait_that_begins_after_wake_returns_at_once(store):
    store.wake()
    waiter = threading.Thread(target=store.wait_for_work, args=(None,), daemon=True)
    waiter.start()
    waiter.join(WAIT_S)
    assert not waiter.is_alive()


def test_wake_releases_every_waiting_worker(store):
    threads = [threading.Thread(target=store.wait_for_work, args=(None,), daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    store.wake()
    for thread in threads:
        thread.join(WAIT_S)
        assert not thread.is_alive()


# -- pages of a listing -----------------------------------------------------------------


def walk(store, state=None, limit=2, **kwargs):
    """Every page of a listing, as lists of ids, from the first to the one without a next position."""
    pages, after = [], None
    while True:
        page = store.page(state, limit, after=after, **kwargs)
        pages.append([t.id for t in page.tasks])
        if page.next is None:
            return pages
        assert len(page.tasks) == limit  # a page short of its limit is the last one
        after = page.next


def test_pages_list_what_list_lists_in_the_same_order(store, clock):
    admit(store, clock, *"abcdefg", max_retries=1)
    run(store, clock, "a")
    run(store, clock, "b", error="boom", retry_at=clock.time() + 10)  # queued again, after g
    run(store, clock, "c", error="boom")
    store.cancel("d")
    claim(store, clock)  # e runs
    for state in (None, *State):
        whole = [t.id for t in store.list(state, 1000)]
        for limit in (1, 2, 3, 1000):
            pages = walk(store, state, limit)
            assert [i for page in pages for i in page] == whole, (state, limit)
            assert all(pages[:-1]) and len(pages) == max(1, -(-len(whole) // limit)), (state, limit, pages)
        first = store.page(state, 2)
        assert first.tasks == store.list(state, 2), state
        assert store.page(state, 2, results=False).tasks == store.list(state, 2, results=False), state


def test_tasks_admitted_during_a_walk_shift_no_later_page(store, clock):
    admit(store, clock, *"abcdef")
    first = store.page(limit=2)
    assert [t.id for t in first.tasks] == ["f", "e"]
    admit(store, clock, "g", "h")
    second = store.page(limit=2, after=first.next)
    assert [t.id for t in second.tasks] == ["d", "c"]  # not ["f", "e"] again, shifted by g and h
    admit(store, clock, "i")
    third = store.page(limit=2, after=second.next)
    assert [t.id for t in third.tasks] == ["b", "a"]
    assert third.next is None or store.page(limit=2, after=third.next).tasks == []


def test_a_walk_by_state_skips_none_that_stayed_and_lists_none_twice_while_tasks_move(store, clock):
    admit(store, clock, *"abcdefghi", max_retries=1)
    for task_id in "abcdef":
        run(store, clock, task_id)  # done, a first
    pages = [store.page(State.DONE, 2)]
    assert [t.id for t in pages[0].tasks] == ["f", "e"]
    run(store, clock, "g")  # enters done during the walk: lists ahead of it, on no later page
    queued = store.page(State.QUEUED, 1)
    assert [t.id for t in queued.tasks] == ["i"]
    while pages[-1].next is not None:
        pages.append(store.page(State.DONE, 2, after=pages[-1].next))
    assert [t.id for page in pages for t in page.tasks] == list("fedcba")
    # h leaves the queue and comes back (a retry): by its new entry it lists ahead of the walk's position.
    run(store, clock, "h", error="boom", retry_at=clock.time() + 10)
    assert [t.id for t in store.page(State.QUEUED, 1).tasks] == ["h"]
    assert store.page(State.QUEUED, 1, after=queued.next).tasks == []


def test_queued_pages_interleave_retries_and_new_tasks_by_their_entry(store, clock):
    admit(store, clock, "a", "b", "c", max_retries=1)
    run(store, clock, "a", error="boom", retry_at=clock.time() + 10)  # after b and c
    admit(store, clock, "d", "e")
    run(store, clock, "b", error="boom", retry_at=clock.time() + 10)  # after e
    admit(store, clock, "f")
    assert [t.id for t in store.list(State.QUEUED)] == ["f", "b", "e", "d", "a", "c"]
    for limit in (1, 2, 4):
        assert [i for page in walk(store, State.QUEUED, limit) for i in page] == ["f", "b", "e", "d", "a", "c"]
    first = store.page(State.QUEUED, 3)
    admit(store, clock, "g")
    run(store, clock, "c")  # the oldest new task leaves: the rest stay
    assert [t.id for t in store.page(State.QUEUED, 3, after=first.next).tasks] == ["d", "a"]


def test_a_new_task_put_back_lists_first_by_its_new_entry_in_every_listing_and_walk_of_the_queue(store, clock):
    admit(store, clock, *(f"t{n}" for n in range(6)))
    running = claim(store, clock)  # t0, the oldest
    first = store.page(State.QUEUED, 2)  # a walk begun while it runs
    store.put_back(running.id, running.attempts, OWNER)  # queued again: a new entry, ahead of that walk
    queue = ["t0", "t5", "t4", "t3", "t2", "t1"]
    assert [t.id for t in store.list(State.QUEUED)] == queue
    assert [t.id for t in store.list(State.QUEUED, 1)] == ["t0"]
    for limit in (1, 2, 5):
        assert [i for page in walk(store, State.QUEUED, limit) for i in page] == queue, limit
    later = store.page(State.QUEUED, 2, after=first.next)
    assert [t.id for t in later.tasks] == ["t3", "t2"]
    assert [t.id for t in store.page(State.QUEUED, 2, after=later.next).tasks] == ["t1"]
    assert claim(store, clock).id == "t0"  # claimed again first, where it was claimed from


def test_a_page_goes_on_after_a_task_forgotten_since_it_was_listed(make_store, clock):
    store = make_store(ttl=60)
    admit(store, clock, "a", "b", "c", "d")
    run(store, clock, "a")
    run(store, clock, "b")
    run(store, clock, "c")
    first = store.page(limit=2)
    assert [t.id for t in first.tasks] == ["d", "c"]
    done = store.page(State.DONE, 1)
    assert [t.id for t in done.tasks] == ["c"]
    clock.advance(61)  # a, b and c are forgotten, the one each position names among them
    run(store, clock, "d")
    assert store.page(limit=2, after=first.next).tasks == []
    assert store.page(State.DONE, 1, after=done.next).tasks == []


@pytest.mark.parametrize("state", [None, State.QUEUED, State.DONE])
def test_a_position_no_listing_of_the_store_made_is_refused(store, clock, state):
    admit(store, clock, "a", "b", "c", "d")
    run(store, clock, "a")
    run(store, clock, "b")
    position = store.page(state, 1).next
    assert position is not None
    assert store.page(state, 1, after=position).tasks  # the position itself is read
    for bad in [
        (*position, 1),
        position[:-1],
        tuple(-1 for _ in position),
        tuple(2**63 for _ in position),
        tuple(True for _ in position),
        tuple(float(n) for n in position),
        tuple(str(n) for n in position),
        list(position),
    ]:
        with pytest.raises(InvalidPosition):
            store.page(state, 1, after=bad)
