"""What the memory store promises beyond the store contract (tests/test_stores.py checks that)."""

import gc
import weakref

import pytest

from workerpool import MemoryStore, State, Task
from workerpool.stores.memory import _entered_since

OWNER = "host:1:a"


def run_through(store, clock, ids, *, result=None):
    store.admit([Task(task_id, "payload", 0, created_at=clock.time()) for task_id in ids])
    for _ in ids:
        task = store.claim(OWNER, clock.time() + 30)
        assert store.finish(task.id, task.attempts, OWNER, result=result).state is State.DONE


def tracked_after(store, clock, ids, **kwargs):
    """How many more objects the garbage collector tracks once ``ids`` went through the store."""
    gc.collect()
    before = len(gc.get_objects())
    run_through(store, clock, ids, **kwargs)
    gc.collect()
    return len(gc.get_objects()) - before


def test_retained_tasks_are_left_out_of_garbage_collection(clock):
    # Its records hold only strings, numbers and None: full collections do not traverse them.
    store = MemoryStore(10_000, max_finished=10_000, clock=clock.time, wait=clock.wait)
    run_through(store, clock, [f"warm-{n}" for n in range(100)])
    assert tracked_after(store, clock, [f"task-{n}" for n in range(2_000)]) < 200
    assert store.stats().counts[State.DONE] == 2_100
    assert store.get("task-1999").state is State.DONE  # the snapshot handed out is a Task as ever


def test_a_task_holding_a_container_is_tracked_and_kept_whole(clock):
    store = MemoryStore(10_000, max_finished=10_000, clock=clock.time, wait=clock.wait)
    assert tracked_after(store, clock, [f"task-{n}" for n in range(500)], result={"rows": [1, 2]}) >= 500
    assert store.get("task-0").result == {"rows": [1, 2]}


class _Result(dict):
    """A result a weak reference can follow: whether the store still holds it."""


def test_admissions_and_ends_forget_the_finished_tasks_past_the_ttl_without_a_read(clock):
    # The two steps every task takes compare the clock with when the oldest finished task expires.
    store = MemoryStore(10, ttl=60, clock=clock.time, wait=clock.wait)
    first, second = _Result(), _Result()
    first_held, second_held = weakref.ref(first), weakref.ref(second)
    run_through(store, clock, ["first"], result=first)
    clock.advance(30)
    run_through(store, clock, ["second"], result=second)
    del first, second
    clock.advance(29.5)
    store.admit([Task("young", "", 0, created_at=clock.time())])
    assert first_held() is not None  # 59.5 s after it finished: still retained
    clock.advance(0.5)
    store.admit([Task("next", "", 0, created_at=clock.time())])
    assert first_held() is None and second_held() is not None
    clock.advance(30)
    task = store.claim(OWNER, clock.time() + 30)
    assert store.finish(task.id, task.attempts, OWNER).state is State.DONE  # its end evicts "second"
    assert second_held() is None
    assert store.stats().counts[State.DONE] == 1


def test_an_attempt_copy_of_a_payload_keeps_its_shape_however_deep_or_shared(clock):
    # A payload as deep as the JSON decoder allows is copied without recursion; from the Python API an
    # object reached twice stays one object in the copy, and a cycle is copied as a cycle.
    deep = leaf = []
    for _ in range(5_000):
        leaf.append([])
        leaf = leaf[0]
    shared = {"n": 1}
    looped = {"shared": [shared, shared]}
    looped["self"] = looped
    store = MemoryStore(10, clock=clock.time, wait=clock.wait)
    store.admit([Task("deep", deep, 0, created_at=clock.time()), Task("looped", looped, 0, created_at=clock.time())])
    copied = store.claim(OWNER, clock.time() + 30).payload
    depth = 0
    while copied:
        assert copied is not deep
        copied, deep, depth = copied[0], deep[0], depth + 1
    assert depth == 5_000
    copy = store.claim(OWNER, clock.time() + 30).payload
    assert copy is not looped and copy["self"] is copy
    assert copy["shared"][0] is copy["shared"][1] and copy["shared"][0] is not shared


class Payload:  # a payload the test can see freed (the Python API takes any object)
    pass


@pytest.mark.parametrize("delay", [None, 3600.0], ids=["due", "delayed"])
def test_a_cancelled_queued_task_does_not_keep_its_payload_however_many_are_cancelled(clock, delay):
    """A cancelled task's place in its line (or the delay heap) is skipped when reached, but nothing may
    reach it for an hour (a delay, workers all busy): its payload is not kept that long."""
    store = MemoryStore(10, clock=clock.time, wait=clock.wait)
    due = None if delay is None else clock.time() + delay
    payloads = weakref.WeakSet()

    def admit(task_id):
        payload = Payload()
        payloads.add(payload)
        assert store.admit([Task(task_id, payload, 0, created_at=clock.time(), next_attempt_at=due)])[0].id == task_id

    admit("first")
    for n in range(1_000):
        admit(f"churn-{n}")
        assert store.cancel(f"churn-{n}")[1]
        if n == 500:
            admit("middle")
    gc.collect()
    assert len(payloads) < 100  # the two queued ones, and a bounded few cancelled since the last sweep
    assert store.stats().counts[State.CANCELLED] == 1_000
    clock.advance(delay or 0)
    assert [store.claim(OWNER, clock.time() + 30).id for _ in range(2)] == ["first", "middle"]
    assert store.claim(OWNER, clock.time() + 30) is None


def test_a_cancelled_retry_does_not_keep_its_payload_in_the_delay_heap(clock):
    store = MemoryStore(10, clock=clock.time, wait=clock.wait)
    payloads = weakref.WeakSet()
    for n in range(300):
        payload = Payload()
        payloads.add(payload)
        store.admit([Task(f"retry-{n}", payload, 1, created_at=clock.time())])
        task = store.claim(OWNER, clock.time() + 30)
        store.finish(task.id, 1, OWNER, error="boom", retry_at=clock.time() + 3600)
        assert store.cancel(task.id)[1]
    del payload, task
    gc.collect()
    assert len(payloads) < 100
    assert store.stats().retries_pending == 0


def test_the_tasks_entered_since_a_position_are_counted_across_the_doubling_blocks():
    entries = {f"t{n}": 3 * n + 1 for n in range(1000)}  # numbers with gaps, as left by tasks moving on
    numbers = list(entries.values())
    for entry in [0, 1, 2, 4, 3 * 63 + 1, 3 * 64 + 1, 3 * 936 + 1, 3 * 937 + 1, 2998, 2999, 3000, 5000]:
        assert _entered_since(entries, entry) == sum(1 for number in numbers if number >= entry), entry
    assert _entered_since({}, 5) == 0


def test_a_walk_in_pages_deeper_than_the_first_blocks_lists_every_task_once():
    store = MemoryStore(capacity=1000)
    store.admit([Task(f"t{n}", "", 0, created_at=1.0) for n in range(700)])
    for _ in range(300):  # the oldest 300 run: gaps in the queued entries, and 300 running
        assert store.claim("owner", 2e9) is not None
    for state, expected in ((None, 700), (State.QUEUED, 400), (State.RUNNING, 300)):
        listed, after = [], None
        while True:
            page = store.page(state, 7, after=after)
            listed += [task.id for task in page.tasks]
            if page.next is None:
                break
            after = page.next
        assert listed == [task.id for task in store.list(state, 1000)] and len(listed) == expected, state
