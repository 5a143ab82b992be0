"""POST /enqueue/batch: many tasks in one request, admitted by the engine in one step.

Each task is validated as POST /enqueue validates it and gets the answer
that endpoint would give, in a list in the order of the request; only a
batch that cannot be read as a list of tasks is refused as a whole.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import orjson
from flask import Blueprint, Response, request

from workerpool import (
    DuplicateTask,
    StoreNotSynced,
    StoreOutOfMemory,
    StorePartlyAdmitted,
    StoreUnavailable,
    SubmitError,
    Task,
)

from . import request_id
from .api import read_body, task_url
from .auth import require_token
from .context import services
from .cross_site import refuse_foreign_page
from .problems import (
    FieldError,
    Problem,
    invalid_request,
    not_synced,
    problem_document,
    store_out_of_memory,
    submission_not_stored,
    submit_problem,
)
from .schema import (
    TaskLimits,
    TaskSpec,
    counts_as_floats,
    decode_json,
    json_type,
    parse_task,
    task_to_json,
    unknown_fields,
)

log = logging.getLogger(__name__)

BATCH_FIELDS = ("tasks",)

bp = Blueprint("batch", __name__)


def parse_batch(
    body: bytes, *, max_tasks: int, limits: TaskLimits, request_id: str | None = None
) -> list[TaskSpec | Problem]:
    """Each task of a batch body, or the 400 Problem refusing it, in order.

    Raise a Problem refusing the whole batch (400, or 413 for more than
    ``max_tasks`` tasks) when the body is not ``{"tasks": [<task>, ...]}``.
    """
    document = decode_json(body)
    if isinstance(document, dict) and type(document.get("tasks")) is list and counts_as_floats(document["tasks"]):
        document = decode_json(body, exact=True)
    if not isinstance(document, dict):
        raise invalid_request(f"the body must be a JSON object, not {json_type(document)}")
    errors = unknown_fields(document, BATCH_FIELDS)
    tasks = document.get("tasks")
    if "tasks" not in document:
        errors.append(FieldError("tasks", "is required"))
    elif not isinstance(tasks, list):
        errors.append(FieldError("tasks", f"must be an array, not {json_type(tasks)}"))
    elif not tasks:
        errors.append(FieldError("tasks", "must hold at least one task"))
    if errors:
        raise invalid_request("the batch is invalid", tuple(errors))
    if len(tasks) > max_tasks:
        raise Problem(413, f"the batch holds {len(tasks)} tasks; at most {max_tasks} are accepted in one request")
    return [_spec_or_problem(parse_task(task, limits, request_id=request_id)) for task in tasks]


def _spec_or_problem(parsed: TaskSpec | list[FieldError]) -> TaskSpec | Problem:
    if isinstance(parsed, TaskSpec):
        return parsed
    if len(parsed) == 1 and parsed[0].field == "":  # the task itself is not an object
        return invalid_request(f"the task {parsed[0].message}")
    return invalid_request("the task is invalid", tuple(parsed))


@bp.post("/enqueue/batch")
def enqueue_batch() -> Response:
    """Validate a batch of tasks and queue those that fit, without waiting for room."""
    svc = services()
    config = svc.config
    rid = request_id.current()
    try:
        refuse_foreign_page(request.environ)
        require_token()  # before the body is read, as for POST /enqueue
        body = read_body(config.max_batch_body_bytes)
        items = parse_batch(body, max_tasks=config.max_batch_tasks, limits=svc.limits, request_id=rid)
        # One engine call: the accepted tasks are admitted in one store step, in order (Redis: 1,000 at
        # a time), or, when the store cannot be used, the batch is refused as a whole: none of them, unless
        # a Redis connection dropped after the script ran, or a Redis step after the first failed.
        specs = [item for item in items if isinstance(item, TaskSpec)]
        unsynced = partly = None
        try:
            outcomes = svc.pool.submit_many(specs)
        except StoreNotSynced as exc:  # the step stands: each task has its outcome, the stored ones unsynced
            if exc.result is None:
                raise
            outcomes, unsynced = exc.result, exc
        except StorePartlyAdmitted as exc:  # Redis took the batch in parts: those before the failed one stand
            outcomes, partly = [*exc.result, *[exc] * (len(specs) - len(exc.result))], exc
        admitted = iter(outcomes)
    except Exception as exc:
        svc.metrics.count_rejection(exc)
        raise
    results: list[dict[str, Any]] = []
    refusals: list[Exception] = []
    unavailable: dict[tuple[int, str], list[int]] = {}  # 5xx refusals by (status, detail): their task indexes
    invalid: dict[int, list[int]] = {}  # 4xx refusals by status: their task indexes
    root_path = request.root_path
    stored_unsynced = 0
    for index, item in enumerate(items):
        outcome = next(admitted) if isinstance(item, TaskSpec) else item
        if isinstance(outcome, Task) and unsynced is not None:
            # As POST /enqueue answers it: stored (do not send it again), but not yet safe from a power cut.
            results.append({**_refusal(not_synced()), "location": task_url(outcome.id, root_path)})
            stored_unsynced += 1
            continue
        if isinstance(outcome, Task):
            results.append({"status": 202, "task": task_to_json(outcome), "location": task_url(outcome.id, root_path)})
            continue
        refusals.append(outcome)
        if isinstance(outcome, SubmitError):
            problem = submit_problem(outcome)
        elif isinstance(outcome, StoreUnavailable):  # a part of the batch after the first that Redis did not take
            # Refused for Redis's maxmemory, that part stored nothing, and a smaller batch may pass.
            oom = isinstance(outcome.__cause__, StoreOutOfMemory)
            problem = store_out_of_memory() if oom else submission_not_stored()
        else:
            problem = outcome
        results.append(_refusal(problem))
        if isinstance(outcome, DuplicateTask):  # the task that holds the id, as POST /enqueue's Location
            results[-1]["location"] = task_url(outcome.task_id, root_path)
        if problem.status >= 500:  # the service's state, not the task's fault: one line for the batch (below)
            unavailable.setdefault((problem.status, problem.detail), []).append(index)
            continue
        task_id = item.id if isinstance(item, TaskSpec) else None
        same = invalid.setdefault(problem.status, [])
        same.append(index)
        # The first of each status at INFO, the others at DEBUG: a batch of a thousand bad tasks
        # (a few kilobytes) would otherwise write a line for each, some fifty times its own size.
        log.log(
            logging.INFO if len(same) == 1 else logging.DEBUG,
            "batch task %d%s refused: %d %s",
            index,
            "" if task_id is None else f" ({task_id!r})",
            problem.status,
            problem.detail,
            extra={"task_id": task_id, "request_id": rid},
        )
    if partly is not None:
        log.error(
            "task store unavailable on POST /enqueue/batch: %s (answered 503 for the other %d task(s))",
            partly,
            len(specs) - len(partly.result),
            extra={"task_id": None, "request_id": rid},
        )
    if unsynced is not None:  # as POST /enqueue logs it (see problems.py)
        log.error(
            "task store unavailable on POST /enqueue/batch: %s (%d task(s) stored, answered 503 all the same)",
            unsynced,
            stored_unsynced,
            extra={"task_id": None, "request_id": rid},
        )
    for status, indexes in invalid.items():
        if len(indexes) > 1:
            log.info(
                "batch: %d of %d task(s) refused with %d, the first task %d (the others are logged at DEBUG)",
                len(indexes),
                len(items),
                status,
                indexes[0],
                extra={"task_id": None, "request_id": rid},
            )
    # A full queue refuses every task that does not fit, often most of a batch and batch after batch:
    # a line for each of them would flood the log exactly when the service is overloaded.
    for (status, detail), indexes in unavailable.items():
        log.info(
            "batch: %d of %d task(s) refused, the first task %d: %d %s",
            len(indexes),
            len(items),
            indexes[0],
            status,
            detail,
            extra={"task_id": None, "request_id": rid},
        )
    svc.metrics.count_rejections(refusals)
    return Response(_encode({"results": results}), mimetype="application/json")


def _encode(document: dict[str, Any]) -> bytes:
    """``document`` as JSON: by orjson (the json module costs more than validating a thousand results), but for
    text orjson cannot write, a lone surrogate (the name of a field a task was refused for: JSON may escape half
    a pair alone), which the json module escapes as POST /enqueue's answer does (``"\\ud800"``)."""
    try:
        return orjson.dumps(document)
    except TypeError:  # the tasks are queued already: their answer must go out
        return json.dumps(document, separators=(",", ":")).encode()


def _refusal(problem: Problem) -> dict[str, Any]:
    """A refused task's entry: its status, problem document and, for a full queue, seconds to wait."""
    result: dict[str, Any] = {
        "status": problem.status,
        "problem": problem_document(problem.status, problem.detail, kind=problem.kind, errors=problem.errors),
    }
    if "Retry-After" in problem.headers:
        result["retry_after"] = int(problem.headers["Retry-After"])
    return result
