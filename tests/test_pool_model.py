"""The pool against a model: hypothesis submits, cancels, steps, times out, moves time and shuts down in any order.

The pool runs without threads on a fake clock over each store of
tests/stores.py, so every run is reproducible and hypothesis can shrink a
failure to the shortest sequence of steps. The model is a dict of the task
snapshots the pool should return, the ready lines (due retries first, then
new work in the order it fell due) and the tasks waiting out a delay or a
backoff; it draws each backoff from a ``random.Random`` seeded like the pool's.
"""

from __future__ import annotations

import heapq
import math
import random
import shutil
import tempfile
import threading
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from itertools import count, pairwise
from pathlib import Path
from typing import NamedTuple

import pytest
from budget import MODEL_EXAMPLES, MODEL_TIMEOUT_S
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
from stores import EXAMPLE_COST, STORES

from workerpool import (
    ABANDONED,
    FINAL_STATES,
    TRANSITIONS,
    AttemptCancelled,
    DuplicateTask,
    PermanentFailure,
    PoolClosed,
    PoolObserver,
    QueueFull,
    ShutdownSummary,
    State,
    Task,
    TaskSpec,
    WorkerPool,
    backoff_bound,
    compute_backoff,
)
from workerpool.pool import TIMED_OUT

STEPS = 40
BACKOFF_BASE = 0.5
BACKOFF_CAP = 2.0
ATTEMPT_TIMEOUT = 1.5
TIMED_OUT_ERROR = TIMED_OUT.format(ATTEMPT_TIMEOUT)
# What a handler does after its attempt timed out (the watchdog ran while it was stuck).
LATE_ENDINGS = ("return", "raise", "get cancelled first")
UNFINISHED = frozenset({State.QUEUED, State.RUNNING})
# next_attempt_at - started_at is a difference of wall times near 1.8e9 s,
# which are only exact to a few 1e-7 s.
WALL_SLACK = 1e-6

# Quarter seconds are exact in binary: a deadline and a due time can be hit exactly.
durations = st.integers(0, 12).map(lambda quarters: quarters / 4)
timeouts = st.none() | durations
delays = st.sampled_from([0.0, 0.0, 0.25, 1.0, 2.5])


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


def _return_a_value() -> dict:
    return {"answer": [42, None]}


def _return_a_set() -> set:
    return {1}


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no message")


def _fail_unprintably() -> None:
    raise _Unprintable()


def _stop_when_cancelled() -> None:
    raise AttemptCancelled("attempt cancelled")


OUTCOMES = {
    "succeed": Outcome(_succeed, None, False),
    "fail": Outcome(_fail, "RuntimeError: boom", True),
    "fail permanently": Outcome(_fail_permanently, "PermanentFailure: bad payload", False),
    "exit": Outcome(_exit, "SystemExit: 3", True),
    "return a value": Outcome(_return_a_value, None, False),
    "return a set": Outcome(
        _return_a_set,
        "the handler returned set, which is not JSON: TypeError: Object of type set is not JSON serializable",
        False,
    ),
    "fail unprintably": Outcome(_fail_unprintably, "_Unprintable (its message could not be read: ValueError)", True),
    # The handler cancels its own task, then stops as a cancelled handler should.
    "get cancelled": Outcome(_stop_when_cancelled, "AttemptCancelled: attempt cancelled", True),
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

    def task_cancelled(self, task: Task) -> None:
        self._add("task_cancelled", task)

    def task_abandoned(self, task: Task) -> None:
        self._add("task_abandoned", task)


class PoolModel(RuleBasedStateMachine):
    ids = Bundle("ids")
    store_name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.recorder = Recorder()
        self.pool: WorkerPool | None = None
        self.directory = Path(tempfile.mkdtemp(prefix="pool-model-"))
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
        self.fresh: deque[str] = deque()  # due new tasks, in the order they fell due
        self.scheduled: list[tuple[float, int, str]] = []  # heap of (due time, order, id): delays and backoffs
        self.order = count()
        self.closing = False
        self.shutdown_began = 0.0
        self.deadline = math.inf
        self.finals: Counter[State] = Counter()  # final states reached, however many are retained
        self.summary: ShutdownSummary | None = None  # once the drain ended
        self.timeouts = 0  # attempts the watchdog failed
        self.seen: dict[str, State] = {}  # each task's state when the invariants last looked

    @initialize(seed=st.integers(0, 2**32 - 1), queue_size=st.integers(3, 5))
    def build(self, seed: int, queue_size: int) -> None:
        self.rng = random.Random(seed)
        self.queue_size = queue_size
        self.store = STORES[self.store_name](
            self.clock, self.directory, capacity=queue_size, ttl=1e9, max_finished=1_000_000
        )
        self.pool = WorkerPool(
            self.handle,
            store=self.store,
            threads=False,
            backoff_base=BACKOFF_BASE,
            backoff_cap=BACKOFF_CAP,
            attempt_timeout=ATTEMPT_TIMEOUT,
            rng=random.Random(seed),
            clock=self.clock.time,
            monotonic=self.clock.monotonic,
            wait=self.clock.wait,
            observers=[self.recorder],
        )

    def handle(self, task: Task, cancel: threading.Event) -> object:
        outcome, self.script = self.script, None
        self.handled.append((task, outcome))
        if outcome == "get cancelled":
            assert self.pool.cancel(task.id).cancel_requested
            assert cancel.is_set(), "cancelling a running task did not set its cancel event"
        if outcome in LATE_ENDINGS:  # stuck until the watchdog (run here, as the attempt is stuck) times it out
            if outcome == "get cancelled first":
                assert self.pool.cancel(task.id).cancel_requested
            assert self.pool.check_timeouts() == ATTEMPT_TIMEOUT  # not yet: no time has passed
            self.clock.advance(ATTEMPT_TIMEOUT)
            self.pool.check_timeouts()
            assert cancel.is_set(), "a timed-out attempt's cancel event was not set"
            if outcome == "raise":
                raise RuntimeError("late failure")
            return "late result"
        return None if outcome is None else OUTCOMES[outcome].act()

    def teardown(self) -> None:
        if self.closing:  # a drain thread runs or ran: pull its deadline in, then wait for it below
            self.pool.shutdown(0, wait=False)
        elif self.pool is not None:
            self.pool.shutdown(0)
        for thread in self.threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), f"{thread.name} outlived the pool"
        if self.pool is not None:
            self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- rules -----------------------------------------------------------

    @rule(target=ids, max_retries=st.integers(0, 3), delay=delays)
    def submit_new(self, max_retries: int, delay: float) -> str:
        task_id = next(self.new_ids)
        self._submit(task_id, max_retries, delay)
        return task_id

    @rule(task_id=ids, max_retries=st.integers(0, 3))
    def submit_again(self, task_id: str, max_retries: int) -> None:
        self._submit(task_id, max_retries, 0.0)

    @rule(
        specs=st.lists(st.tuples(st.booleans(), st.integers(0, 3), delays), min_size=0, max_size=4),
        again=ids,
    )
    def submit_many(self, specs: list[tuple[bool, int, float]], again: str) -> None:
        """A batch of new ids and one already used; each is checked against the room the ones before it left."""
        batch = [
            TaskSpec(next(self.new_ids) if fresh else again, "", retries, delay) for fresh, retries, delay in specs
        ]
        ordinal = next(self.submissions)
        batch = [
            TaskSpec(s.id, f"payload {ordinal}/{n}", s.max_retries, s.delay, f"req-{ordinal}")
            for n, s in enumerate(batch)
        ]
        heard = len(self.recorder.calls())
        expected = [self._admit_in_model(s.id, s.payload, s.max_retries, s.delay, s.request_id) for s in batch]
        results = self.pool.submit_many(batch)
        assert len(results) == len(batch)
        for spec, want, got in zip(batch, expected, results):
            if isinstance(want, type):
                assert isinstance(got, want), (spec, got)
            else:
                assert got == want
        assert len(self.recorder.calls()) - heard == sum(isinstance(w, Task) for w in expected)

    @rule(task_id=ids)
    def cancel(self, task_id: str) -> None:
        before = self.tasks.get(task_id)
        got = self.pool.cancel(task_id)
        if before is None:
            assert got is None
            return
        if before.state is not State.QUEUED:  # between steps nothing runs: a final task stays as it is
            assert got == before
            return
        cancelled = before._replace(
            state=State.CANCELLED, payload="", finished_at=self.clock.time(), next_attempt_at=None
        )
        assert got == cancelled
        self._forget_place(task_id)
        self.tasks[task_id] = cancelled
        self.history[task_id].append(("task_cancelled", cancelled, None))
        self._count_final(cancelled)
        self._join_drain_if_due()  # it was maybe the last unfinished task: the drain ends now

    @rule(outcome=st.sampled_from(list(OUTCOMES)))
    def step(self, outcome: str) -> None:
        self._step(outcome)

    # Not while draining: the time the stuck attempt takes would move the drain's deadline under it.
    @precondition(lambda self: not self.closing)
    @rule(late=st.sampled_from(LATE_ENDINGS))
    def step_that_times_out(self, late: str) -> None:
        self._step(late)

    def _step(self, outcome: str) -> None:
        self._release_due()
        claimable = not (self.closing and self.store.shared)  # a shared store stops claiming at shutdown
        line = self.released or self.fresh
        task_id = line.popleft() if line and claimable else None
        self.script = outcome
        ran = self.pool.step()
        handled, self.handled = self.handled, []
        if task_id is None:
            assert not ran, "step() ran an attempt although nothing was due"
            assert not handled
            self.script = None
        else:
            assert ran, f"step() found nothing due although {task_id} was"
            self._attempt(task_id, outcome, handled)
        self._join_drain_if_due()

    @rule(seconds=durations)
    def advance_time(self, seconds: float) -> None:
        self.clock.advance(seconds)
        # A deadline passed: the drain ends now; let it finish before touching the pool.
        self._join_drain_if_due()
        self._release_due()
        if self.released or self.fresh:
            next_due = 0.0
        elif self.scheduled:
            next_due = self.scheduled[0][0] - self.clock.time()
        else:
            next_due = None
        assert self.store.seconds_until_due() == next_due

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

    def _submit(self, task_id: str, max_retries: int, delay: float) -> None:
        ordinal = next(self.submissions)
        payload, request_id = f"payload {ordinal}", f"req-{ordinal}"
        heard = len(self.recorder.calls())
        want = self._admit_in_model(task_id, payload, max_retries, delay, request_id)
        if isinstance(want, type):
            with pytest.raises(want):
                self.pool.submit(task_id, payload, max_retries, delay=delay, request_id=request_id)
            assert len(self.recorder.calls()) == heard, "a refused task was announced"
            return
        assert self.pool.submit(task_id, payload, max_retries, delay=delay, request_id=request_id) == want

    def _admit_in_model(
        self, task_id: str, payload: str, max_retries: int, delay: float, request_id: str
    ) -> Task | type[Exception]:
        """What the pool should answer to one submission, applied to the model."""
        waiting = sum(1 for task in self.tasks.values() if task.state is State.QUEUED and task.attempts == 0)
        if self.closing and not self.store.shared:  # a shared store keeps them for other processes
            refusal = PoolClosed
        elif task_id in self.tasks:
            refusal = DuplicateTask
        elif waiting >= self.queue_size:
            refusal = QueueFull
        else:
            refusal = None
        if refusal is not None:
            self.refused.add(task_id)
            return refusal
        now = self.clock.time()
        task = Task(
            task_id,
            payload,
            max_retries,
            created_at=now,
            next_attempt_at=now + delay if delay else None,
            request_id=request_id,
        )
        self.tasks[task_id] = task
        self.history[task_id] = [("task_queued", task, None)]
        self._release_due()  # what fell due earlier goes ahead of what arrives now
        if delay:
            heapq.heappush(self.scheduled, (task.next_attempt_at, next(self.order), task_id))
        else:
            self.fresh.append(task_id)
        return task

    def _release_due(self) -> None:
        now = self.clock.time()
        while self.scheduled and self.scheduled[0][0] <= now:
            task_id = heapq.heappop(self.scheduled)[2]
            (self.released if self.tasks[task_id].attempts else self.fresh).append(task_id)

    def _forget_place(self, task_id: str) -> None:
        for line in (self.released, self.fresh):
            if task_id in line:
                line.remove(task_id)
        self.scheduled = [entry for entry in self.scheduled if entry[2] != task_id]
        heapq.heapify(self.scheduled)

    def _attempt(self, task_id: str, outcome: str, handled: list[tuple[Task, str | None]]) -> None:
        now = self.clock.time() - (ATTEMPT_TIMEOUT if outcome in LATE_ENDINGS else 0.0)  # when it started
        before = self.tasks[task_id]
        running = before._replace(
            state=State.RUNNING, attempts=before.attempts + 1, started_at=now, next_attempt_at=None
        )
        assert handled == [(running, outcome)], "the handler did not run exactly the predicted attempt"
        if outcome in LATE_ENDINGS:
            self._time_out(task_id, running, cancelled=outcome == "get cancelled first")
            return
        error, retryable = OUTCOMES[outcome].error, OUTCOMES[outcome].retryable
        retries_used = running.attempts - 1
        if outcome == "get cancelled":
            if retries_used < running.max_retries:  # the pool draws the backoff before the store says "cancelled"
                compute_backoff(running.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng)
            running = running._replace(cancel_requested=True)
            ended = running._replace(state=State.CANCELLED, payload="", last_error=error, finished_at=now)
        elif error is None:
            result = _return_a_value() if outcome == "return a value" else None
            ended = running._replace(state=State.DONE, payload="", finished_at=now, result=result)
        elif retryable and retries_used < running.max_retries:
            delay = compute_backoff(running.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng)
            ended = running._replace(state=State.QUEUED, last_error=error, next_attempt_at=now + delay)
            heapq.heappush(self.scheduled, (ended.next_attempt_at, next(self.order), task_id))
        else:
            ended = running._replace(state=State.FAILED, payload="", last_error=error, finished_at=now)
        if outcome != "get cancelled":
            assert not ended.cancel_requested
        self.tasks[task_id] = ended
        self._count_final(ended)
        # No fake time passes during an attempt, so it lasts 0 s.
        self.history[task_id] += [("attempt_started", handled[0][0], None), ("attempt_finished", ended, 0.0)]

    def _time_out(self, task_id: str, running: Task, *, cancelled: bool) -> None:
        """The watchdog failed the attempt ATTEMPT_TIMEOUT after it started; what the handler did later is dropped."""
        now = self.clock.time()  # the handler moved time on by ATTEMPT_TIMEOUT
        running = running._replace(cancel_requested=cancelled)
        retry_at = None
        if running.attempts <= running.max_retries:  # the pool draws the backoff before the store decides
            retry_at = now + compute_backoff(running.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng)
        if cancelled:
            ended = running._replace(state=State.CANCELLED, payload="", last_error=TIMED_OUT_ERROR, finished_at=now)
        elif retry_at is not None:
            ended = running._replace(state=State.QUEUED, last_error=TIMED_OUT_ERROR, next_attempt_at=retry_at)
            heapq.heappush(self.scheduled, (retry_at, next(self.order), task_id))
        else:
            ended = running._replace(state=State.FAILED, payload="", last_error=TIMED_OUT_ERROR, finished_at=now)
        self.tasks[task_id] = ended
        self._count_final(ended)
        self.timeouts += 1
        started = running._replace(cancel_requested=False)
        self.history[task_id] += [("attempt_started", started, None), ("attempt_finished", ended, ATTEMPT_TIMEOUT)]

    def _count_final(self, task: Task) -> None:
        if task.state in FINAL_STATES:
            self.finals[task.state] += 1

    def _deadline_in(self, timeout: float | None) -> float:
        return math.inf if timeout is None else self.clock.monotonic() + max(0.0, timeout)

    def _join_drain_if_due(self) -> None:
        """When the drain ends (nothing unfinished, or its deadline passed), wait for its summary and check it.

        Every rule that can end the drain (a step, a cancel, time passing, a
        shutdown call) calls this at once, before fake time moves on: the
        drain thread may end on its own as soon as its condition holds (the
        pool wakes it), so its summary must be taken at that fake time. A
        shared store's drain waits only for the attempts this pool runs, and
        between steps none runs.
        """
        if not self.closing or self.summary is not None:
            return
        shared = self.store.shared
        unfinished = [task_id for task_id, task in self.tasks.items() if task.state in UNFINISHED]
        if unfinished and not shared and self.clock.monotonic() < self.deadline and self._something_falls_due():
            return
        # Wake the drain to look again (no new deadline) and give it a bounded
        # time to end, so that a drain which never ends fails rather than hangs.
        self.pool.shutdown(wait=False)
        for thread in self.threads:
            thread.join(WAIT_S)
            assert not thread.is_alive(), "the drain did not end with nothing unfinished or its deadline passed"
        summary = self.pool.shutdown()
        now = self.clock.time()
        abandoned_ids = [] if shared else unfinished
        for task_id in abandoned_ids:
            abandoned = self.tasks[task_id]._replace(
                state=State.FAILED, payload="", last_error=ABANDONED, finished_at=now, next_attempt_at=None
            )
            self.tasks[task_id] = abandoned
            self.history[task_id].append(("task_abandoned", abandoned, None))
            self._count_final(abandoned)
        if not shared:
            self.released.clear()
            self.fresh.clear()
            self.scheduled.clear()
        assert sorted(summary.abandoned) == sorted(abandoned_ids)
        counts = self._counts()
        assert summary.counts == {
            State.QUEUED: counts[State.QUEUED] if shared else 0,
            State.RUNNING: 0,
            **{state: self.finals[state] for state in (State.DONE, State.FAILED, State.CANCELLED)},
        }
        assert summary.drain_seconds == self.clock.monotonic() - self.shutdown_began  # from the call, fake time
        assert self.pool.shutdown(0) is summary, "a later shutdown() did not return the same summary"
        self.summary = summary

    def _something_falls_due(self) -> bool:
        """Whether an unfinished task falls due by the drain's deadline: with none, the drain abandons them at once.

        The pool looks again whenever an attempt ends, a task is cancelled or the
        deadline moves: every rule that can change the answer calls
        ``_join_drain_if_due``. Time passing alone does not change it (the
        deadline and the due times move closer together).
        """
        self._release_due()
        if self.deadline == math.inf or self.released or self.fresh or not self.scheduled:
            return True
        # As the pool reckons them: the wait until the next due time (wall clock), the drain's time left (monotonic).
        return self.scheduled[0][0] - self.clock.time() <= self.deadline - self.clock.monotonic()

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
            if task.next_attempt_at is not None and task.attempts:  # waiting out the backoff after its last attempt
                delay = task.next_attempt_at - task.started_at
                if task.last_error == TIMED_OUT_ERROR:  # the backoff began when the attempt timed out
                    delay -= ATTEMPT_TIMEOUT
                bound = backoff_bound(task.attempts, base=BACKOFF_BASE, cap=BACKOFF_CAP)
                assert -WALL_SLACK <= delay <= bound + WALL_SLACK, task

    @invariant()
    def counts_add_up_to_the_accepted_tasks(self) -> None:
        self._release_due()
        stats = self.pool.stats()
        assert sum(stats.counts.values()) == len(self.tasks)
        assert stats.counts == self._counts()
        assert stats.queue_depth == len(self.released) + len(self.fresh)
        assert stats.retries_pending == sum(1 for _, _, task_id in self.scheduled if self.tasks[task_id].attempts)
        assert stats.waiting == sum(1 for t in self.tasks.values() if t.state is State.QUEUED and t.attempts == 0)
        assert stats.accepting is not self.closing
        assert (stats.attempts_timed_out, stats.stuck_threads) == (self.timeouts, 0)  # step() callers never stick

    @invariant()
    def the_handler_runs_only_inside_step(self) -> None:
        assert not self.handled, f"the handler ran outside step(): {self.handled}"

    @invariant()
    def nothing_is_unfinished_once_the_drain_ended(self) -> None:
        if self.summary is None or self.store.shared:
            return
        stats = self.pool.stats()
        assert stats.counts[State.QUEUED] == stats.counts[State.RUNNING] == 0
        assert stats.queue_depth == stats.retries_pending == stats.waiting == 0


@pytest.mark.fuzz
@pytest.mark.timeout(MODEL_TIMEOUT_S)  # a loaded machine stretches the run well past the default 60 s
@pytest.mark.parametrize("store_name", sorted(STORES))
def test_the_pool_matches_its_model_through_any_sequence_of_steps(store_name):
    model = type(f"PoolModelOn{store_name.title()}", (PoolModel,), {"store_name": store_name})
    run_state_machine_as_test(
        model,
        settings=settings(
            max_examples=MODEL_EXAMPLES // EXAMPLE_COST[store_name],
            stateful_step_count=STEPS,
            derandomize=True,
            database=None,
            deadline=None,
        ),
    )


def test_the_drain_ends_when_the_last_unfinished_task_is_cancelled():
    """A drain waiting for delayed tasks alone ends at the cancel of the last one, not at a later step.

    The pool did not wake its drain on a cancel: a drain already awake (from
    an earlier attempt's end) ended at the cancel while the model expected it
    at its next check, with a later ``drain_seconds``; one asleep slept on
    until its deadline.
    """
    machine = PoolModel()
    try:
        machine.build(seed=0, queue_size=3)
        ids = [machine.submit_new(max_retries=0, delay=2.5) for _ in range(3)]
        machine.begin_shutdown(timeout=None)
        for task_id in ids:
            assert machine.summary is None
            machine.cancel(task_id)
            _check_invariants(machine)
        assert machine.summary is not None and machine.summary.drain_seconds == 0.0
        assert machine.summary.counts[State.CANCELLED] == 3
        machine.advance_time(1.0)
        _check_invariants(machine)
    finally:
        machine.teardown()


def test_the_drain_ends_at_once_when_nothing_falls_due_before_its_deadline():
    """Tasks delayed past the drain's deadline are abandoned when the drain first looks, not at the deadline.

    The model waited for the deadline while the pool's drain thread had
    already failed them: whether an invariant saw the store's counts before
    or after that thread ran decided the outcome, so hypothesis reported
    failed tasks the model held queued, and its replays as flaky.
    """
    machine = PoolModel()
    try:
        machine.build(seed=0, queue_size=3)
        ids = [machine.submit_new(max_retries=0, delay=2.5) for _ in range(3)]
        machine.begin_shutdown(timeout=1.0)
        assert machine.summary is not None and machine.summary.drain_seconds == 0.0
        assert sorted(machine.summary.abandoned) == ids
        _check_invariants(machine)
    finally:
        machine.teardown()


def _check_invariants(machine: PoolModel) -> None:
    for check in machine.invariants:  # what hypothesis checks after every rule
        check.function(machine)
