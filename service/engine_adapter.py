"""Stand-in for the engine's batch admission until ``WorkerPool.submit_many`` exists; delete it then.

It follows the agreed engine contract, but submits the batch one task at a
time, so the batch is not admitted in one step.
"""

from __future__ import annotations

from collections.abc import Sequence

from workerpool import SubmitError, Task, WorkerPool

from .schema import TaskSpec


def submit_many(pool: WorkerPool, specs: Sequence[TaskSpec]) -> list[Task | SubmitError]:
    """``pool.submit_many(specs)`` of the engine contract, one ``submit`` per task."""
    results: list[Task | SubmitError] = []
    for spec in specs:
        try:
            results.append(
                pool.submit(spec.id, spec.payload, spec.max_retries, delay=spec.delay, request_id=spec.request_id)
            )
        except SubmitError as exc:
            results.append(exc)
    return results
