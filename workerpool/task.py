"""The task value, its states and the one table of legal state changes."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NamedTuple


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A task waiting out its backoff (or its delay) is QUEUED with next_attempt_at
# set, so a retry is RUNNING -> QUEUED. DONE, FAILED and CANCELLED are final.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.FAILED, State.CANCELLED}),
    State.RUNNING: frozenset({State.DONE, State.FAILED, State.QUEUED, State.CANCELLED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
}
FINAL_STATES = frozenset({State.DONE, State.FAILED, State.CANCELLED})


class InvalidTransition(RuntimeError):
    """A state change that TRANSITIONS does not allow: always a bug."""


def check_transition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"illegal task state change {current} -> {new}")


class Task(NamedTuple):
    """A snapshot of one task; ``task._replace(...)`` makes a changed copy. Times are seconds since the epoch.

    ``payload`` is any JSON value, kept only until the task is final:
    finished tasks are retained for their state and ``result``, and dropping
    the payload bounds their memory. ``next_attempt_at`` is the time a queued
    task falls due (a delay or a retry backoff). ``cancel_requested`` is set
    when a running task was asked to cancel. ``request_id`` names the request
    that submitted the task, so its log lines can be found with the request's.

    A named tuple rather than a frozen dataclass: the engine makes one per
    change of a task, and a frozen dataclass costs several times as much to
    build (every field goes through ``object.__setattr__``).
    """

    id: str
    payload: Any
    max_retries: int
    state: State = State.QUEUED
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    request_id: str | None = None
    result: Any = None
    cancel_requested: bool = False
