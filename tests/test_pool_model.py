"""The pool against a model: hypothesis submits, steps, moves time and shuts down in any order.

The pool runs without threads on a fake clock, so every run is reproducible
and hypothesis can shrink a failure to the shortest sequence of steps. The
model is a dict of the task snapshots the pool should return, the ready line
(due retries first, then new work) and the retries waiting out a backoff; it
draws each backoff from a ``random.Random`` seeded like the pool's.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import replace
from itertools import count, pairwise
from typing import NamedTuple

import pytest
from budget import MODEL_EXAMPLES
from doubles import WAIT_S, FakeClock
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from workerpool import (
    ABANDONED,
    TRANSITIONS,
    DuplicateTask,
    PermanentFailure,
    PoolClosed,
    PoolObserver,
    QueueFull,
    ShutdownSummary,
    State,
    Task,
    WorkerPool,
    backoff_bound,
    compute_backoff,
)

STEPS = 40
BACKOFF_BASE = 0.5
BACKOFF_CAP = 2.0
UNFINISHED = frozenset({State.QUEUED, State.RUNNING})
# next_attempt_at - started_at is a difference of wall times near 1.8e9 s,
# which are only exact to a few 1e-7 s.
WALL_SLACK = 1e-6

# Quarter seconds are exact in binary: a deadline and a due time can be hit exactly.
durations = st.integers(0, 12).map(lambda quarters: quarters / 4)
timeouts = st.none() | durations


class Outcome(NamedTuple):
    act: Callable[[], object]
    error: str | None  # the task's last_error after the attempt; None: it succeeded
    retryable: bool


def _succeed() -> None:
    return None


def _fail() -> None:
    raise RuntimeError("boom")


def _fail_permanently() -> None:
    raise PermanentFailure("bad payload")


def _exit() -> None:
    raise SystemExit(3)


def _return_a_value() -> bool:
    return False


OUTCOMES = {
    "succeed": Outcome(_succeed, None, False),
    "fail": Outcome(_fail, "RuntimeError: boom", True),
    "fail permanently": Outcome(_fail_permanently, "PermanentFailure: bad payload", False),
    "exit": Outcome(_exit, "SystemExit: 3", True),
    "return a value": Outcome(
        _return_a_value, "the handler returned bool, not None: a result this pool cannot use", False
    ),
}


def _reachable(state: State) -> frozenset[State]:
    """The states ``state`` can reach in one or more legal changes."""
    found: set[State] = set()
    todo = [state]
    while todo:
        for new in TRANSITIONS[todo.pop()] - found:
            found.add(new)
            todo.append(new)
    return frozenset(found)


REACHABLE = {state: _reachable(state) for state in State}


class Recorder(PoolObserver):
    """Every hook call in order, as (hook, task snapshot, seconds or None)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the drain thread reports abandoned tasks
        self._calls: list[tuple[str, Task, float | None]] = []

    def calls(self) -> list[tuple[str, Task, float | None]]:
        with self._lock:
            return list(self._calls)

    def _add(self, hook: str, task: Task, seconds: float | None = None) -> None:
        with self._lock:
            self._calls.append((hook, task, seconds))

    def task_queued(self, task: Task) -> None:
        self._add("task_queued", task)

    def attempt_started(self, task: Task) -> None:
        self._add("attempt_started", task)

    def attempt_finished(self, task: Task, seconds: float) -> None:
        self._add("attempt_finished", task, seconds)

    def task_abandoned(self, task: Task) -> None:
        self._add("task_abandoned", task)


class PoolModel(RuleBasedStateMachine):
    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.recorder = Recorder()
        self.pool: WorkerPool | None = None
        self.threads: list[threading.Thread] = []  # started for this pool; none may outlive it
        self.script: str | None = None  # the outcome the next attempt plays
        self.handled: list[tuple[Task, str | None]] = []  # what the handler was given
        self.new_ids = (f"t{n}" for n in count(1))
        self.submissions = count(1)

        # The model: what the pool should hold.
        self.tasks: dict[str, Task] = {}
        self.history: dict[str, list[tuple[str, Task, float | None]]] = {}  # hook calls per task
        self.refused: set[str] = set()
        self.released: deque[str] = deque()  # due retries: they run before new work
        self.fresh: deque[str] = deque()
        self.retries: list[tuple[float, int, str]] = []  # heap of (due monotonic time, order, id)
        self.retry_order = count()
        self.closing = False
        self.shutdown_began = 0.0
        self.deadline = math.inf
        self.summary: ShutdownSummary | None = None  # once the drain ended
        self.seen: dict[str, State] = {}  # each task's state when the invariants last looked

    @initialize(seed=st.integers(0, 2**32 - 1), queue_size=st.integers(3, 5))
    def build(self, seed: int, queue_size: int) -> None:
        self.rng = random.Random(seed)
        self.queue_size = queue_size
        self.pool = WorkerPool(
            self.handle,
            threads=False,
            queue_size=queue_size,
            backoff_base=BACKOFF_BASE,
            backoff_cap=BACKOFF_CAP,
            state_ttl=1e9,
            state_max_tasks=1_000_000,
            rng=random.Random(seed),
            clock=self.clock.time,
            monotonic=self.clock.monotonic,
            wait=self.clock.wait,
            observers=[self.recorder],
        )

    def handle(self, task: Task, cancel: threading.Event) -> object:
        outcome, self.script = self.script, None
        self.handled.append((task, outcome))
        return None if outcome is None else OUTCOMES[outcome].act()

    def teardown(self) -> None:
        if self.closing:  # a drain thread runs or ran: pull its deadline in, then wait for it below
            self.pool.shutdown(0, wait=False)
        elif self.pool is not None:
            self.pool.shutdown(0)
        for thread in self.threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), f"{thread.name} outlived the pool"

    # -- rules -----------------------------------------------------------

    @rule(target=ids, max_retries=st.integers(0, 3))
    def submit_new(self, max_retries: int) -> str:
        task_id = next(self.new_ids)
        self._submit(task_id, max_retries)
        return task_id

    @rule(task_id=ids, max_retries=st.integers(0, 3))
    def submit_again(self, task_id: str, max_retries: int) -> None:
        self._submit(task_id, max_retries)

    @rule(outcome=st.sampled_from(list(OUTCOMES)))
    def step(self, outcome: str) -> None:
        line = self.released or self.fresh
        task_id = line.popleft() if line else None
        self.script = outcome
        ran = self.pool.step()
        handled, self.handled = self.handled, []
        if task_id is None:
            assert not ran, "step() ran an attempt although nothing was ready"
            assert not handled
            self.script = None
        else:
            assert ran, f"step() found nothing ready although {task_id} was"
            self._attempt(task_id, outcome, handled)
        self._join_drain_if_due()

    @rule(seconds=durations)
    def advance_time(self, seconds: float) -> None:
        self.clock.advance(seconds)
        # A deadline passed: the drain ends now; let it finish before touching the pool.
        self._join_drain_if_due()
        now = self.clock.monotonic()
        while self.retries and self.retries[0][0] <= now:
            self.released.append(heapq.heappop(self.retries)[2])
        next_due = self.retries[0][0] - now if self.retries else None
        assert self.pool.release_due_retries() == next_due

    # Only once a few tasks were accepted: a run that shuts down at once has
    # nothing left to exercise, and an idle pool's drain is tested elsewhere.
    @precondition(lambda self: not self.closing and len(self.tasks) >= 3)
    @rule(timeout=timeouts)
    def begin_shutdown(self, timeout: float | None) -> None:
        before = set(threading.enumerate())
        assert self.pool.shutdown(timeout, wait=False) is None
        self.threads += [thread for thread in threading.enumerate() if thread not in before]
        self.closing = True
        self.shutdown_began = self.clock.monotonic()
        self.deadline = self._deadline_in(timeout)
        self._join_drain_if_due()

    @precondition(lambda self: self.closing and self.summary is None)
    @rule(timeout=timeouts)
    def shutdown_again_while_draining(self, timeout: float | None) -> None:
        assert self.pool.shutdown(timeout, wait=False) is None
        self.deadline = min(self.deadline, self._deadline_in(timeout))
        self._join_drain_if_due()

    # -- the model -------------------------------------------------------

    def _submit(self, task_id: str, max_retries: int) -> None:
        ordinal = next(self.submissions)
        payload, request_id = f"payload {ordinal}", f"req-{ordinal}"
        if self.closing:
            refusal = PoolClosed
        elif task_id in self.tasks:
            refusal = DuplicateTask
        elif len(self.released) + len(self.fresh) >= self.queue_size:
            refusal = QueueFull
        else:
            refusal = None
        heard = len(self.recorder.calls())
        if refusal is not None:
            with pytest.raises(refusal):
                self.pool.submit(task_id, payload, max_retries, request_id=request_id)
            assert len(self.recorder.calls()) == heard, "a refused task was announced"
            self.refused.add(task_id)
            return
        task = Task(task_id, payload, max_retries, created_at=self.clock.time(), request_id=request_id)
        assert self.pool.submit(task_id, payload, max_retries, request_id=request_id) == task
        self.tasks[task_id] = task
        self.history[task_id] = [("task_queued", task, None)]
        self.fresh.append(task_id)

    def _attempt(self, task_id: str, outcome: str, handled: list[tuple[Task, str | None]]) -> None:
        now = self.clock.time()
        before = self.tasks[task_id]
        running = replace(
            before, state=State.RUNNING, attempts=before.attempts + 1, started_at=now, next_attempt_at=None
        )
        assert handled == [(running, outcome)], "the handler did not run exactly the predicted attempt"
        error, retryable = OUTCOMES[outcome].error, OUTCOMES[outcome].retryable
        retries_used = running.attempts - 1
        if error is None:
            ended = replace(running, state=State.DONE, payload="", finished_at=now)
        elif retryable and retries_used < running.max_retries:
            delay = compute_backoff(running.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng)
            ended = replace(running, state=State.QUEUED, last_error=error, next_attempt_at=now + delay)
            heapq.heappush(self.retries, (self.clock.monotonic() + delay, next(self.retry_order), task_id))
        else:
            ended = replace(running, state=State.FAILED, payload="", last_error=error, finished_at=now)
        self.tasks[task_id] = ended
        # No fake time passes during an attempt, so it lasts 0 s.
        self.history[task_id] += [("attempt_started", running, None), ("attempt_finished", ended, 0.0)]

    def _deadline_in(self, timeout: float | None) -> float:
        return math.inf if timeout is None else self.clock.monotonic() + max(0.0, timeout)

    def _join_drain_if_due(self) -> None:
        """When the drain ends (nothing unfinished, or its deadline passed), wait for its summary and check it.

        Until then the drain thread only sleeps on its wake-up event, so it
        cannot race the rules.
        """
        if not self.closing or self.summary is not None:
            return
        unfinished = [task_id for task_id, task in self.tasks.items() if task.state in UNFINISHED]
        if unfinished and self.clock.monotonic() < self.deadline:
            return
        # Wake the drain to look again (no new deadline) and give it a bounded
        # time to end, so that a drain which never ends fails rather than hangs.
        self.pool.shutdown(wait=False)
        for thread in self.threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "the drain did not end with nothing unfinished or its deadline passed"
        summary = self.pool.shutdown()
        now = self.clock.time()
        for task_id in unfinished:
            abandoned = replace(
                self.tasks[task_id],
                state=State.FAILED,
                payload="",
                last_error=ABANDONED,
                finished_at=now,
                next_attempt_at=None,
            )
            self.tasks[task_id] = abandoned
            self.history[task_id].append(("task_abandoned", abandoned, None))
        self.released.clear()
        self.fresh.clear()
        self.retries.clear()
        assert sorted(summary.abandoned) == sorted(unfinished)
        assert summary.counts == self._counts()
        assert summary.drain_seconds == self.clock.monotonic() - self.shutdown_began  # from the call, fake time
        assert self.pool.shutdown(0) is summary, "a later shutdown() did not return the same summary"
        self.summary = summary

    def _counts(self) -> dict[State, int]:
        counts = Counter(task.state for task in self.tasks.values())
        return {state: counts[state] for state in State}

    def _listed(self) -> list[Task]:
        return self.pool.list(limit=len(self.tasks) + 1)

    # -- invariants ------------------------------------------------------

    @invariant()
    def every_task_is_as_the_model_predicts(self) -> None:
        for task_id, task in self.tasks.items():
            assert self.pool.get(task_id) == task
        assert {task.id for task in self._listed()} == self.tasks.keys()
        for task_id in self.refused - self.tasks.keys():
            assert self.pool.get(task_id) is None, f"refused task {task_id} is visible"

    @invariant()
    def observers_hear_every_change_along_the_transition_table(self) -> None:
        heard = defaultdict(list)
        for call in self.recorder.calls():
            heard[call[1].id].append(call)
        for task_id, calls in heard.items():
            states = [task.state for _, task, _ in calls]
            assert calls[0][0] == "task_queued" and states[0] is State.QUEUED, f"{task_id}: {calls[0]}"
            for old, new in pairwise(states):
                assert new in TRANSITIONS[old], f"{task_id} was heard moving {old} -> {new}"
        assert heard == self.history

    @invariant()
    def snapshots_move_only_along_the_transition_table(self) -> None:
        for task_id in self.tasks:
            state = self.pool.get(task_id).state
            before = self.seen.get(task_id, State.QUEUED)
            assert state == before or state in REACHABLE[before], f"{task_id} moved {before} -> {state}"
            self.seen[task_id] = state

    @invariant()
    def attempts_stay_within_the_retry_budget(self) -> None:
        for task in self._listed():
            assert task.attempts <= task.max_retries + 1, task
            if task.next_attempt_at is not None:  # waiting out the backoff after its last attempt
                delay = task.next_attempt_at - task.started_at
                bound = backoff_bound(task.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP)
                assert -WALL_SLACK <= delay <= bound + WALL_SLACK, task

    @invariant()
    def counts_add_up_to_the_accepted_tasks(self) -> None:
        stats = self.pool.stats()
        assert sum(stats.counts.values()) == len(self.tasks)
        assert stats.counts == self._counts()
        assert stats.queue_depth == len(self.released) + len(self.fresh)
        assert stats.retries_pending == len(self.retries)
        assert stats.accepting is not self.closing

    @invariant()
    def the_handler_runs_only_inside_step(self) -> None:
        assert not self.handled, f"the handler ran outside step(): {self.handled}"

    @invariant()
    def nothing_is_unfinished_once_the_drain_ended(self) -> None:
        if self.summary is None:
            return
        stats = self.pool.stats()
        assert stats.counts[State.QUEUED] == stats.counts[State.RUNNING] == 0
        assert stats.queue_depth == stats.retries_pending == 0


@pytest.mark.fuzz
def test_the_pool_matches_its_model_through_any_sequence_of_steps():
    run_state_machine_as_test(
        PoolModel,
        settings=settings(
            max_examples=MODEL_EXAMPLES,
            stateful_step_count=STEPS,
            derandomize=True,
            database=None,
            deadline=None,
        ),
    )
