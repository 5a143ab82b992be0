"""Every error response is an RFC 9457 ``application/problem+json`` document.

One place maps exceptions to problems: request validation, the engine's
refusals, werkzeug's HTTP errors and anything unexpected. A 5xx body is
generic; its traceback goes to the log only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from http import HTTPStatus

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from workerpool import (
    DuplicateTask,
    PoolClosed,
    QueueFull,
    StoreFileReplaced,
    StoreNotSynced,
    StoreOutOfMemory,
    StoreOutOfSpace,
    StoreUnavailable,
    SubmitError,
)

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# Seconds a client should wait before retrying after "queue full".
QUEUE_FULL_RETRY_AFTER_S = 1
# Seconds a client should wait before retrying a submission a stopping process refused. Under gunicorn the
# retry, on a new connection, reaches a serving worker at once when a reload retires this one (its replacement
# serves already), or finds the port closed when the server stops; `python app.py` refuses until it exits.
# One second rather than none: a client that honours it does not spin on a process that drains for a while.
SHUTTING_DOWN_RETRY_AFTER_S = 1
_TYPE_PREFIX = "urn:workerpool:problem:"
SERVER_ERROR_DETAIL = "the server could not handle the request; the error has been logged"


@dataclass(frozen=True, slots=True)
class FieldError:
    field: str
    message: str


class Problem(Exception):
    """An error with its HTTP status, raised by views and turned into a problem response."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str = "about:blank",
        errors: tuple[FieldError, ...] = (),
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.errors = errors
        self.headers = headers or {}
        self.reason = reason  # the status line's reason phrase, when not werkzeug's (see server_refusal)


def invalid_request(detail: str, errors: tuple[FieldError, ...] = ()) -> Problem:
    return Problem(400, detail, kind=_TYPE_PREFIX + "invalid-request", errors=errors)


def server_refusal(status: int, detail: str) -> Problem:
    """An error gunicorn answers itself, before the app, when it meets it first (a chunked body's chunk-size line
    or trailer section past its limits), met by the app instead (``python app.py`` reads a chunked body only when
    the app does; gunicorn's parser checks trailer fields then): answered as gunicorn answers it, ``about:blank``
    with gunicorn's reason phrase ("Request Header Fields Too Large", where werkzeug's is in capitals)."""
    return Problem(status, detail, reason=HTTPStatus(status).phrase)


def unsupported_content_encoding(coding: str) -> Problem:
    """A 415 for a body with a content coding; ``Accept-Encoding`` says which one is accepted (RFC 9110 15.5.16)."""
    # Not decoded: a small gzip body can inflate a thousandfold, and a bounded decoder would buy
    # little for task documents of a few KiB.
    return Problem(
        415,
        f"the request body has Content-Encoding {coding[:50]!r}: only an unencoded body (identity) is accepted",
        headers={"Accept-Encoding": "identity"},
    )


def unauthorized(detail: str, *, challenge: str) -> Problem:
    """A 401 whose ``WWW-Authenticate`` header names the scheme the client must use (RFC 9110 11.6.1)."""
    return Problem(401, detail, kind=_TYPE_PREFIX + "unauthorized", headers={"WWW-Authenticate": challenge})


def problem_document(
    status: int, detail: str, *, kind: str = "about:blank", errors: tuple[FieldError, ...] = ()
) -> dict[str, object]:
    """The JSON body of a problem response."""
    body: dict[str, object] = {
        "type": kind,
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
    }
    if errors:
        body["errors"] = [{"field": e.field, "message": e.message} for e in errors]
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str = "about:blank",
    errors: tuple[FieldError, ...] = (),
    headers: dict[str, str] | None = None,
    reason: str | None = None,
) -> Response:
    response = jsonify(problem_document(status, detail, kind=kind, errors=errors))
    if reason is None:
        response.status_code = status
    else:
        response.status = f"{status} {reason}"
    response.mimetype = PROBLEM_JSON
    response.headers.update(headers or {})
    return response


def submit_problem(exc: SubmitError) -> Problem:
    """The problem an engine refusal stands for: 409 or 503 (500 for a refusal not known here)."""
    if isinstance(exc, DuplicateTask):
        return Problem(409, f"a task with id {exc.task_id!r} already exists", kind=_TYPE_PREFIX + "duplicate-task")
    if isinstance(exc, QueueFull):
        waiting, retry_after = f"{exc.waiting} tasks waiting", QUEUE_FULL_RETRY_AFTER_S
        if exc.delayed:  # delayed tasks hold their places until they fall due and start
            waiting += f", {exc.delayed} of them delayed"
        if exc.due_in is not None:  # every one is: no place frees before the first falls due
            retry_after = max(retry_after, math.ceil(exc.due_in))
            waiting += f"; the first falls due in {retry_after} s"
        return Problem(
            503,
            f"the queue is full ({waiting}); retry later",
            kind=_TYPE_PREFIX + "queue-full",
            headers={"Retry-After": str(retry_after)},
        )
    if isinstance(exc, PoolClosed):
        # Connection: close: the connection leads to this process, which will not take the retry.
        return Problem(
            503,
            "the service is shutting down and accepts no new tasks",
            kind=_TYPE_PREFIX + "shutting-down",
            headers={"Retry-After": str(SHUTTING_DOWN_RETRY_AFTER_S), "Connection": "close"},
        )
    log.error("no problem is known for the refusal %r", exc)
    return Problem(500, SERVER_ERROR_DETAIL)


def _from_problem(exc: Problem) -> Response:
    return problem_response(
        exc.status, exc.detail, kind=exc.kind, errors=exc.errors, headers=exc.headers, reason=exc.reason
    )


def _from_submit_error(exc: SubmitError) -> Response:
    return _from_problem(submit_problem(exc))


# What a request the store could not serve did, by method: a client decides by it whether to send it again.
_STORE_UNAVAILABLE = "the task store cannot be used right now; "
_STORE_UNAVAILABLE_DETAILS = {
    # Redis may have run a step whose answer was lost (the connection dropped after the script ran):
    # a submission sent again with its id is then refused as a duplicate, never run twice.
    "POST": _STORE_UNAVAILABLE + "the task may not have been stored, retry later with the same id (409 if it was)",
    # A cancel is safe to repeat: it answers for the task as it is then (200 once cancelled, 202 while it runs).
    "DELETE": _STORE_UNAVAILABLE + "the cancel may not have been recorded, retry later",
}


def _store_unavailable(detail: str) -> Problem:
    """A 503 the store caused, worth a retry after a moment: ``detail`` says what became of the request."""
    return Problem(
        503, detail, kind=_TYPE_PREFIX + "store-unavailable", headers={"Retry-After": str(QUEUE_FULL_RETRY_AFTER_S)}
    )


def submission_not_stored() -> Problem:
    """The 503 of a submission the store could not take (as POST /enqueue answers it): most likely not stored."""
    return _store_unavailable(_STORE_UNAVAILABLE_DETAILS["POST"])


def store_out_of_memory() -> Problem:
    """The 503 of a write the store refused for its memory limit: nothing stored, a smaller request may pass."""
    return _store_unavailable(_STORE_OUT_OF_MEMORY)


NOT_SYNCED_DETAIL = (
    "the change was stored, but syncing it to disk failed: it stands (do not send it again), "
    "though a power cut before the store's next sync could undo it"
)


def not_synced() -> Problem:
    """The 503 of a change the store made but could not sync to disk: no Retry-After, as sending it again
    would only repeat it."""
    return Problem(503, NOT_SYNCED_DETAIL, kind=_TYPE_PREFIX + "store-unavailable")


_STORE_OUT_OF_MEMORY = (
    "the task store is at its memory limit (Redis maxmemory), which this request's size counts toward: nothing "
    "was stored; a smaller request (a batch split in parts) may pass, or retry once the store has room"
)
_STORE_OUT_OF_SPACE = (
    "the task store could not write this request to its disk (full, or at its file size limit): nothing was "
    "stored; a smaller request (a batch split in parts) may pass, or retry once the store has room"
)
_STORE_FILE_REPLACED = (
    "the task store's file was removed or replaced while this process had it open: it accepts no new tasks "
    "until it is restarted"
)


def _from_store_unavailable(exc: StoreUnavailable) -> Response:
    # The reason (e.g. a full disk) goes to the log and to /healthz, not to every client.
    log.error("task store unavailable on %s %s: %s", request.method, _logged_path(), exc)
    if isinstance(exc, StoreNotSynced):  # committed: retrying would only repeat it
        return _from_problem(not_synced())
    if isinstance(exc, StoreOutOfMemory):  # a smaller request may pass where this one cannot: the client is told why
        return _from_problem(store_out_of_memory())
    if isinstance(exc, StoreOutOfSpace):  # the same for a full disk
        return _from_problem(_store_unavailable(_STORE_OUT_OF_SPACE))
    if isinstance(exc, StoreFileReplaced):  # until a restart: the client is told why
        return _from_problem(_store_unavailable(_STORE_FILE_REPLACED))
    return _from_problem(
        _store_unavailable(_STORE_UNAVAILABLE_DETAILS.get(request.method, _STORE_UNAVAILABLE + "retry later"))
    )


def _from_http(exc: HTTPException) -> Response:
    status = exc.code or 500
    if status >= 500:
        return _from_unexpected(exc)
    # Keep headers such as Allow (405); the body is ours, not werkzeug's HTML.
    headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
    detail = exc.description or HTTPStatus(status).description
    limit = current_app.config.get("MAX_CONTENT_LENGTH")
    if status == 413 and limit is not None:
        detail = f"the request body is larger than {limit} bytes"
    return problem_response(status, detail, headers=headers)


def _from_unexpected(exc: Exception) -> Response:
    original = getattr(exc, "original_exception", None) or exc
    log.error("unhandled error on %s %s", request.method, _logged_path(), exc_info=original)
    return problem_response(500, SERVER_ERROR_DETAIL)


def _logged_path() -> str:
    """The request's path as a log line shows it: without the API token, which a client may have put there."""
    from .context import services  # here: both modules import this one
    from .logs import without_token

    return without_token(request.path, services().config.api_token)


def register(app: Flask) -> None:
    """Install the handlers that turn every error into a problem response."""
    app.register_error_handler(Problem, _from_problem)
    for refusal in (DuplicateTask, QueueFull, PoolClosed):
        app.register_error_handler(refusal, _from_submit_error)
    app.register_error_handler(StoreUnavailable, _from_store_unavailable)
    app.register_error_handler(HTTPException, _from_http)
    app.register_error_handler(Exception, _from_unexpected)
