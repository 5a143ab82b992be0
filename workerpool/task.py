"""The task value, its states and the one table of legal state changes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class State(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# A task waiting out its backoff is QUEUED with next_attempt_at set, so a
# retry is RUNNING -> QUEUED. DONE and FAILED are final.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.FAILED}),
    State.RUNNING: frozenset({State.DONE, State.FAILED, State.QUEUED}),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
}
FINAL_STATES = frozenset({State.DONE, State.FAILED})


class InvalidTransition(RuntimeError):
    """A state change that TRANSITIONS does not allow: always a bug."""


def check_transition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"illegal task state change {current} -> {new}")


@dataclass(frozen=True, slots=True)
class Task:
    """A snapshot of one task. Times are seconds since the epoch.

    ``payload`` is kept only until the task is final: finished tasks are
    retained for their state, and dropping the payload bounds their memory.
    ``request_id`` names the request that submitted the task, so its log
    lines can be found with the request's.
    """

    id: str
    payload: str
    max_retries: int
    state: State = State.QUEUED
    attempts: int = 0
    last_error: str | None = None
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    next_attempt_at: float | None = None
    request_id: str | None = None
