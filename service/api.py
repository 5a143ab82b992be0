"""The task API: submit a task, read, list and cancel them, report health, and describe itself."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify, request, url_for

from workerpool import State

from . import request_id
from .auth import require_token, token_required
from .context import services
from .openapi import openapi_spec
from .problems import Problem, invalid_request
from .schema import TaskLimits, parse_enqueue, parse_list_query, task_to_json

bp = Blueprint("api", __name__)


@bp.post("/enqueue")
def enqueue() -> tuple[Response, int, dict[str, str]]:
    """Validate a task and queue it without waiting for room."""
    svc = services()
    try:
        require_token()  # before the body is read: no parsing for unknown clients
        # Parsed as JSON whatever the Content-Type, so `curl -d` works.
        body = read_body(svc.config.max_body_bytes)
        spec = parse_enqueue(body, TaskLimits.of(svc.config), request_id=request_id.current())
        task = svc.pool.submit(
            spec.id, spec.payload, spec.max_retries, delay=spec.delay, request_id=spec.request_id
        )
    except Exception as exc:
        svc.metrics.count_rejection(exc)
        raise
    return jsonify(task_to_json(task)), 202, {"Location": url_for("api.get_task", task_id=task.id)}


def read_body(limit: int) -> bytes:
    """The request body; 413 if it is longer than ``limit`` bytes, chunked or not, 400 if cut short."""
    # For a chunked body werkzeug stops reading at the limit without an error,
    # so a longer body would arrive truncated: read one byte more to tell.
    request.max_content_length = limit + 1
    body = request.get_data(cache=False)
    if len(body) > limit:
        raise Problem(413, f"the request body is larger than {limit} bytes")
    # gunicorn hands over a body cut short by the client's disconnect as if it
    # were whole; its first part may be a valid task the client never finished.
    if request.content_length is not None and len(body) < request.content_length:
        raise invalid_request(f"the request body ended after {len(body)} of its {request.content_length} bytes")
    return body


@bp.get("/tasks/<path:task_id>")
@token_required
def get_task(task_id: str) -> Response:
    """Return one task by id."""
    task = services().pool.get(task_id)
    if task is None:
        raise _not_found(task_id)
    return jsonify(task_to_json(task))


@bp.delete("/tasks/<path:task_id>")
@token_required
def cancel_task(task_id: str) -> tuple[Response, int]:
    """Cancel a task: 200 once cancelled, 202 while its running attempt is asked to stop."""
    task = services().pool.cancel(task_id)
    if task is None:
        raise _not_found(task_id)
    if task.state is State.CANCELLED:
        return jsonify(task_to_json(task)), 200
    if task.state is State.RUNNING:  # cancel_requested: the attempt's end decides
        return jsonify(task_to_json(task)), 202
    raise Problem(
        409,
        f"task {task_id!r} is already {task.state}: only queued and running tasks can be cancelled",
        kind="urn:workerpool:problem:task-finished",
    )


def _not_found(task_id: str) -> Problem:
    return Problem(
        404,
        f"no task with id {task_id!r}: it was never accepted, or it finished and has been forgotten",
        kind="urn:workerpool:problem:task-not-found",
    )


@bp.get("/tasks")
@token_required
def list_tasks() -> Response:
    """List retained tasks, newest first, optionally of one state."""
    query = parse_list_query(request.args)
    tasks = services().pool.list(query.state, query.limit)
    return jsonify({"tasks": [task_to_json(task) for task in tasks], "count": len(tasks), "limit": query.limit})


@bp.get("/healthz")
@bp.get("/health")
def health() -> tuple[Response, int]:
    """Report liveness and queue figures; 503 once shutdown has begun or too many threads are stuck."""
    stats = services().pool.stats()
    # Past the bound, a timed-out attempt's stuck thread was not replaced: fewer workers claim tasks.
    short_of_workers = stats.stuck_threads > stats.stuck_threads_limit
    status = "draining" if not stats.accepting else "unhealthy" if short_of_workers else "ok"
    body = {
        "status": status,
        "workers": stats.workers,
        "queue_capacity": stats.queue_capacity,
        "queue_depth": stats.queue_depth,
        "retries_pending": stats.retries_pending,
        "stuck_threads": stats.stuck_threads,
        "stuck_threads_limit": stats.stuck_threads_limit,
        "tasks": {str(state): count for state, count in stats.counts.items()},
    }
    return jsonify(body), 200 if status == "ok" else 503


@bp.get("/openapi.json")
def openapi() -> Response:
    """Serve the OpenAPI description with this instance's limits."""
    return jsonify(openapi_spec(services().config))
