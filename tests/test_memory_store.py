"""What the memory store promises beyond the store contract (tests/test_stores.py checks that)."""

import gc

from workerpool import MemoryStore, State, Task

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
