import itertools

import pytest

from workerpool import DuplicateTask, InvalidTransition, State, Task
from workerpool.store import TaskStore
from workerpool.task import TRANSITIONS, check_transition


def make_store(clock, *, ttl=3600.0, max_finished=100):
    return TaskStore(ttl=ttl, max_finished=max_finished, monotonic=clock.monotonic)


def finish(store, clock, task_id, state=State.DONE):
    store.add(Task(task_id, "payload", 0, created_at=clock.time()))
    store.start_attempt(task_id, clock.time())
    return store.end_attempt(task_id, 1, state, finished_at=clock.time())


@pytest.mark.parametrize("current, new", list(itertools.product(State, State)))
def test_transition_table_is_checked_in_one_place(current, new):
    if new in TRANSITIONS[current]:
        check_transition(current, new)
    else:
        with pytest.raises(InvalidTransition):
            check_transition(current, new)


def test_final_states_have_no_way_out():
    assert TRANSITIONS[State.DONE] == TRANSITIONS[State.FAILED] == frozenset()


def test_a_duplicate_id_is_refused_and_changes_nothing(clock):
    store = make_store(clock)
    store.add(Task("a", "first", 1, created_at=clock.time()))
    before = (store.get("a"), store.counts())
    with pytest.raises(DuplicateTask):
        store.add(Task("a", "second", 5, created_at=clock.time()))
    assert (store.get("a"), store.counts()) == before
    assert store.get("a").payload == "first"


def test_readers_get_snapshots_not_live_records(clock):
    store = make_store(clock)
    store.add(Task("a", "p", 0))
    queued = store.get("a")
    store.start_attempt("a", clock.time())
    assert queued.state is State.QUEUED
    assert store.get("a").state is State.RUNNING
    with pytest.raises(AttributeError):
        queued.state = State.DONE  # frozen


def test_an_attempt_counts_and_a_late_end_is_ignored(clock):
    store = make_store(clock)
    store.add(Task("a", "p", 1))
    assert store.start_attempt("a", clock.time()).attempts == 1
    assert store.start_attempt("a", clock.time()) is None  # already running
    assert store.end_attempt("a", 2, State.DONE) is None  # not that attempt
    assert [t.id for t in store.fail_unfinished("gone", clock.time())] == ["a"]
    assert store.end_attempt("a", 1, State.DONE, finished_at=1.0) is None  # abandoned meanwhile
    task = store.get("a")
    assert (task.state, task.last_error) == (State.FAILED, "gone")


def test_the_payload_is_dropped_once_final(clock):
    store = make_store(clock)
    store.add(Task("a", "big payload", 0))
    assert store.start_attempt("a", clock.time()).payload == "big payload"
    assert store.end_attempt("a", 1, State.DONE, finished_at=clock.time()).payload == ""


def test_counts_follow_every_transition(clock):
    store = make_store(clock)
    for task_id in "abcd":
        store.add(Task(task_id, "", 1))
    store.start_attempt("a", 0)
    store.start_attempt("b", 0)
    store.end_attempt("b", 1, State.QUEUED, next_attempt_at=5.0)
    store.start_attempt("c", 0)
    store.end_attempt("c", 1, State.FAILED, finished_at=clock.time())
    assert store.counts() == {State.QUEUED: 2, State.RUNNING: 1, State.DONE: 0, State.FAILED: 1}
    assert store.unfinished() == 3


def test_list_is_newest_first_and_filters_by_state(clock):
    store = make_store(clock)
    for task_id in "abcde":
        store.add(Task(task_id, "", 0))
    store.start_attempt("b", 0)
    store.start_attempt("d", 0)
    assert [t.id for t in store.list()] == list("edcba")
    assert [t.id for t in store.list(limit=2)] == ["e", "d"]
    assert [t.id for t in store.list(State.RUNNING)] == ["d", "b"]
    assert [t.id for t in store.list(State.QUEUED, limit=1)] == ["e"]


def test_finished_tasks_expire_after_the_ttl(clock):
    store = make_store(clock, ttl=60)
    finish(store, clock, "old")
    clock.advance(30)
    finish(store, clock, "new")
    store.add(Task("waiting", "", 0))
    clock.advance(30.5)
    assert store.get("old") is None
    assert store.get("new").state is State.DONE
    clock.advance(3600)
    assert store.get("new") is None
    assert store.get("waiting").state is State.QUEUED  # never evicted while unfinished
    assert store.counts()[State.DONE] == 0


def test_the_oldest_finished_are_evicted_beyond_the_count_limit(clock):
    store = make_store(clock, max_finished=3)
    store.add(Task("running", "", 0))
    store.start_attempt("running", 0)
    for n in range(5):
        clock.advance(1)
        finish(store, clock, f"t{n}", State.DONE if n % 2 else State.FAILED)
    assert [t.id for t in store.list()] == ["t4", "t3", "t2", "running"]
    assert store.get("running").state is State.RUNNING
    assert store.counts() == {State.QUEUED: 0, State.RUNNING: 1, State.DONE: 1, State.FAILED: 2}


def test_an_evicted_id_can_be_submitted_again(clock):
    store = make_store(clock, max_finished=1)
    finish(store, clock, "a")
    finish(store, clock, "b")  # evicts a
    store.add(Task("a", "again", 0))
    assert store.get("a").state is State.QUEUED


def test_membership_follows_retention(clock):
    store = make_store(clock, ttl=10)
    finish(store, clock, "a")
    assert "a" in store and "b" not in store
    clock.advance(11)
    assert "a" not in store


@pytest.mark.parametrize("kwargs", [{"ttl": 0, "max_finished": 1}, {"ttl": 1, "max_finished": 0}])
def test_retention_limits_must_be_positive(clock, kwargs):
    with pytest.raises(ValueError):
        TaskStore(monotonic=clock.monotonic, **kwargs)
