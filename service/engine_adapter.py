"""Stand-in for the engine's batch admission until ``workerpool`` provides it; delete it then.

``TaskSpec`` and ``submit_many`` follow the agreed engine contract; here a
batch is submitted one task at a time, so it is not admitted in one step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from workerpool import SubmitError, Task, WorkerPool


@dataclass(frozen=True, slots=True)
class TaskSpec:
    id: str | None
    payload: Any = ""
    max_retries: int = 0
    delay: float = 0.0
    request_id: str | None = None


def submit_many(pool: WorkerPool, specs: Sequence[TaskSpec]) -> list[Task | SubmitError]:
    """``pool.submit_many(specs)`` of the engine contract, one ``submit`` per task."""
    results: list[Task | SubmitError] = []
    for spec in specs:
        try:
            results.append(pool.submit(spec.id, spec.payload, spec.max_retries, request_id=spec.request_id))  # type: ignore[arg-type]
        except SubmitError as exc:
            results.append(exc)
    return results
