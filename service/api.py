"""The task API: submit a task, read, list and cancel them, report health, and describe itself."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode

import orjson
from flask import Blueprint, Request, Response, jsonify, request
from gunicorn.http.errors import LimitRequestHeaders
from werkzeug.datastructures import Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.urls import iri_to_uri
from werkzeug.wsgi import get_content_length

from workerpool import DuplicateTask, PoolStats, State, StoreUnavailable, WorkerPool
from workerpool.stores.base import InvalidPosition

from . import connection, request_id
from .auth import require_token, token_required
from .context import services
from .cross_site import refuse_foreign_page
from .cursors import make_cursor
from .openapi import openapi_spec
from .problems import (
    FieldError,
    Problem,
    invalid_request,
    server_refusal,
    submit_problem,
    unsupported_content_encoding,
)
from .request_reader import ChunkSizeLineTooLong, body_exceeds, body_overframed, body_timed_out
from .schema import parse_enqueue, parse_list_query, task_to_json
from .store_errors import public_reason

bp = Blueprint("api", __name__)
# Seconds to wait before asking /healthz again after a 503 (draining, unhealthy, store unavailable).
HEALTH_RETRY_AFTER_S = 1


@bp.post("/enqueue")
def enqueue() -> Response:
    """Validate a task and queue it without waiting for room."""
    svc = services()
    # The request itself, not the context-local proxy: each use of `request` is a lookup through it.
    req: Request = request._get_current_object()  # type: ignore[attr-defined]
    try:
        refuse_foreign_page(req.environ)
        require_token(svc.config.api_token)  # before the body is read: no parsing for unknown clients
        # Parsed as JSON whatever the Content-Type, so `curl -d` works.
        body = read_body(svc.config.max_body_bytes, req)
        spec = parse_enqueue(body, svc.limits, request_id=req.environ.get(request_id.ENVIRON_KEY))
        task = svc.pool.submit(spec.id, spec.payload, spec.max_retries, delay=spec.delay, request_id=spec.request_id)
    except DuplicateTask as exc:  # the way to the task that holds the id: a retry can check it is its own
        svc.metrics.count_rejection(exc)
        problem = submit_problem(exc)
        problem.headers["Location"] = _uri(task_url(exc.task_id, req.root_path))
        raise problem from None
    except Exception as exc:
        svc.metrics.count_rejection(exc)
        raise
    return accepted(task_to_json(task), task_url(task.id, req.root_path))


class _FinalHeaders(Response):
    """A response whose headers and body are final as built: werkzeug's last passes over them are skipped.

    The headers pass (``get_wsgi_headers``) copies the headers, scans them, and runs
    the ``Location`` through ``iri_to_uri`` (a ``urlsplit`` and a quoting of each
    part): about a tenth of the enqueue view's time, to return a URI ``accepted`` has
    made sure of already. The body pass (``get_app_iter``) wraps the body in a
    ``ClosingIterator``, whose constructor evaluates ``typing.Callable[[], bytes]``
    on every call, uncached (a list argument cannot be hashed): several microseconds
    for a one-chunk body with nothing to close. Only 202 responses to a POST come
    here, so no status or method empties the body or removes a header.
    """

    def get_wsgi_headers(self, environ: dict[str, Any]) -> Headers:
        if self.status_code != 202:  # an after_request hook changed it: let werkzeug apply its rules
            return super().get_wsgi_headers(environ)
        return self.headers  # a fresh response, used once: no copy needed

    def get_app_iter(self, environ: dict[str, Any]) -> Any:
        if self.status_code != 202 or environ["REQUEST_METHOD"] == "HEAD" or self._on_close:
            return super().get_app_iter(environ)
        return self.response  # [body]: set_data made it a list of one bytes object


# What iri_to_uri leaves unchanged in a path: an absolute path of unreserved characters, sub-delims,
# ':', '@' and percent escapes (not '//' at its start, which it would read as an authority).
_URI_PATH = re.compile(r"/(?!/)[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*")


def accepted(body: dict[str, Any], location: str) -> Response:
    """A 202 with ``body`` as JSON and ``location`` as its ``Location``, as ``jsonify`` would make it.

    orjson writes the body (``jsonify`` costs several times as much); non-ASCII text is
    written as UTF-8 rather than escaped, as the batch endpoint does.
    """
    data = orjson.dumps(body) + b"\n"
    location = _uri(location)
    # Content-Length is added by the response itself.
    return _FinalHeaders(data, 202, Headers([("Content-Type", "application/json"), ("Location", location)]))


# werkzeug's quoting of a <path:...> value (PathConverter.to_url). url_for's routing machinery
# around it cost about a tenth of the enqueue request's time.
_PATH_SAFE = "!$&'()*+,/:;=@"


def _uri(location: str) -> str:
    """``location`` fit for a header: a root path (SCRIPT_NAME) may hold characters to encode."""
    return location if _URI_PATH.fullmatch(location) else iri_to_uri(location)


def task_url(task_id: str, root_path: str | None = None) -> str:
    """The path of a task's URL, as ``url_for("api.get_task", task_id=task_id)`` builds it.

    ``root_path`` is the request's (read once by a caller building many URLs:
    each read of ``request`` goes through werkzeug's context-local proxy).
    """
    root = request.root_path if root_path is None else root_path
    return f"{root}/tasks/{quote(task_id, safe=_PATH_SAFE)}"


# gunicorn's parser names the limit a trailer section passed, not its value (limit_request_fields and
# limit_request_field_size are the operator's to set); python app.py's reader and the event loop name both.
_GUNICORN_TRAILER_LIMITS = {
    "limit request headers fields": "it has more fields than the server takes in a request head",
    "limit request headers fields size": "a field of it is longer than the server takes in a request head",
    "limit request trailer section size": "it is longer than the server takes",
}


def _trailer_refusal(exc: LimitRequestHeaders) -> str:
    """Why a trailer section was refused, naming only limits the server in use applies."""
    message = str(exc)
    if message.startswith("limit request"):
        return _GUNICORN_TRAILER_LIMITS.get(message, "it is past the server's limits on a request head's fields")
    return message


def read_body(limit: int, req: Request | None = None) -> bytes:
    """The request body (of ``req``, default the current request); 413 if it is longer than ``limit``
    bytes, chunked or not, 400 if cut short, 408 if it did not arrive within REQUEST_TIMEOUT_S, 415
    if it has a content coding (gzip...), which is not decoded."""
    if req is None:
        req = request._get_current_object()  # type: ignore[attr-defined]
    coding = req.environ.get("HTTP_CONTENT_ENCODING")
    if coding is not None and coding.strip(" \t").lower() not in ("", "identity"):
        raise unsupported_content_encoding(coding)
    # What req.content_length computes, from the environ rather than through two header lookups.
    length = get_content_length(req.environ)  # None when chunked
    if length is not None and length > limit:
        raise _too_large(limit)  # not werkzeug's 413, which would name the app-wide MAX_CONTENT_LENGTH
    if length is None and body_exceeds(req.environ["wsgi.input"]) >= limit:
        # Under gunicorn the event loop read this chunked body only until it passed its limit: the
        # rest is not there to read, and the client may still be sending it.
        if body_overframed(req.environ["wsgi.input"]):
            raise Problem(
                413,
                f"the chunked framing of the request body (chunk-size lines with their extensions, CRLFs) is longer "
                f"than {limit} bytes plus 8 per byte of data: send it in larger chunks",
            )
        raise _too_large(limit)
    try:
        if length is not None:
            # The server's input stream ends with the body (WSGI says not to read past it): read it
            # directly, as werkzeug's stream would after building two wrappers around it.
            body = req.environ["wsgi.input"].read(length)
        else:
            # For a chunked body werkzeug stops reading at the limit without an error,
            # so a longer body would arrive truncated: read one byte more to tell.
            req.max_content_length = limit + 1
            body = req.get_data(cache=False)
    except RequestEntityTooLarge:  # werkzeug's, which would name the app-wide MAX_CONTENT_LENGTH
        raise _too_large(limit) from None
    except LimitRequestHeaders as exc:  # a trailer section past the limits on a head's fields
        raise server_refusal(431, f"the chunked body's trailer section is too large: {_trailer_refusal(exc)}") from None
    except ChunkSizeLineTooLong as exc:  # python app.py's reader: under gunicorn the event loop refuses it first
        raise server_refusal(400, str(exc)) from None
    except Exception:  # the server's reader refused the framing (chunk sizes) or the stream ended early
        if body_timed_out(req.environ["wsgi.input"]):
            raise _timed_out(None, length) from None
        raise invalid_request(
            "the request body could not be read: its chunked framing or trailer section is malformed, or it ended early"
        ) from None
    if len(body) > limit:
        raise _too_large(limit)
    # gunicorn hands over a body cut short by the client's disconnect as if it
    # were whole; its first part may be a valid task the client never finished.
    if length is not None and len(body) < length:
        if body_timed_out(req.environ["wsgi.input"]):  # the client is still sending, or silent
            raise _timed_out(len(body), length)
        raise invalid_request(f"the request body ended after {len(body)} of its {length} bytes")
    connection.mark_body_read(req.environ)
    return body


def _timed_out(received: int | None, length: int | None) -> Problem:
    timeout = services().config.request_timeout_s
    detail = f"the request body did not arrive within REQUEST_TIMEOUT_S ({timeout:g} s)"
    if received is not None and length is not None:
        detail += f": {received} of {length} bytes"
    return Problem(408, detail)


def _too_large(limit: int) -> Problem:
    return Problem(413, f"the request body is larger than {limit} bytes")


@bp.get("/tasks/<path:task_id>")
@token_required
def get_task(task_id: str) -> Response:
    """Return one task by id."""
    _check_path_is_utf8(task_id)
    task = services().pool.get(task_id)
    if task is None:
        raise _not_found(task_id)
    return jsonify(task_to_json(task))


@bp.delete("/tasks/<path:task_id>")
@token_required
def cancel_task(task_id: str) -> tuple[Response, int]:
    """Cancel a task: 200 once cancelled, 202 while its running attempt is asked to stop."""
    _check_path_is_utf8(task_id)
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


def _check_path_is_utf8(task_id: str) -> None:
    """Refuse a path whose bytes are not UTF-8: decoded with replacement, ``/tasks/%ff`` and
    ``/tasks/%fe`` would both name the task whose id is U+FFFD. No id can be such bytes: 404."""
    environ = request.environ
    raw = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "").partition("?")[0].partition("#")[0]
    try:
        unquote_to_bytes(raw).decode()  # the request line, as sent
        environ.get("PATH_INFO", "").encode("latin-1").decode()  # WSGI passes the path's bytes as latin-1
    except UnicodeError:
        raise Problem(
            404,
            f"no task has the id in {raw or request.path!r}: the path is not UTF-8 once percent-decoded,"
            " and task ids are UTF-8 text",
            kind="urn:workerpool:problem:task-not-found",
        ) from None


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
    store = services().pool.store
    query = parse_list_query(request.args, store.position_key)
    try:
        page = services().pool.page(query.state, query.limit, results=query.results, after=query.after)
    except InvalidPosition:  # a cursor made for this store, holding none of its positions (an older layout)
        raise invalid_request(
            "the query parameters are invalid",
            (FieldError("cursor", "is not a position in this service's task store: list from the first page again"),),
        ) from None
    listed = [task_to_json(task) for task in page.tasks]
    if not query.results:
        for entry in listed:
            del entry["result"]
    cursor = None if page.next is None else make_cursor(query.state, page.next, store.position_key())
    response = jsonify({"tasks": listed, "count": len(listed), "limit": query.limit, "next": cursor})
    if cursor is not None:
        response.headers["Link"] = f'<{_next_page_url(cursor)}>; rel="next"'
    return response


def _next_page_url(cursor: str) -> str:
    """The URL of the next page: this request's, its parameters kept in their order, with ``cursor`` set."""
    pairs = [(name, value) for name, value in request.args.items(multi=True) if name != "cursor"]
    query = urlencode([*pairs, ("cursor", cursor)], quote_via=quote)
    return _uri(f"{request.root_path}{request.path}?{query}")


@bp.get("/healthz")
@bp.get("/health")
def health() -> tuple[Response, int]:
    """Report liveness and queue figures; 503 once shutdown has begun, while the task store fails,
    or when too many threads are stuck."""
    pool = services().pool
    try:
        stats = pool.stats()
        store_error = why_store_fails(pool, stats)
    except StoreUnavailable as exc:
        store_error = str(exc)
    else:
        if store_error is None:
            body = health_figures(stats)
            return (jsonify(body), 200) if body["status"] == "ok" else _unavailable(body)
    reason = public_reason(store_error, services().config.store)
    return _unavailable({"status": "store_unavailable", "store_error": reason})


@bp.get("/livez")
def liveness() -> tuple[Response, int]:
    """Report whether this process should be restarted: 503 only when it runs short of worker threads.

    Unlike /healthz it never reads the task store and stays 200 while draining: an orchestrator that
    restarts on it restarts a process a restart mends, never every process while the store is out.
    """
    stats = services().pool.process_stats()
    short = short_of_workers(stats.stuck_threads, stats.stuck_threads_limit)
    body = {
        "status": "unhealthy" if short else "ok",
        "stuck_threads": stats.stuck_threads,
        "stuck_threads_limit": stats.stuck_threads_limit,
    }
    return _unavailable(body) if short else (jsonify(body), 200)


def short_of_workers(stuck_threads: int, stuck_threads_limit: int) -> bool:
    """Whether fewer than WORKERS threads take tasks: past the bound, a timed-out attempt's stuck thread
    was not replaced."""
    return stuck_threads > stuck_threads_limit


def _unavailable(body: dict[str, Any]) -> tuple[Response, int]:
    """A 503 health answer, with the ``Retry-After`` every 503 of the service carries (a probe may ignore it)."""
    response = jsonify(body)
    response.headers["Retry-After"] = str(HEALTH_RETRY_AFTER_S)
    return response, 503


def why_store_fails(pool: WorkerPool, stats: PoolStats) -> str | None:
    """Why the task store cannot be used now, or None: what its figures said, else its own health check.

    The figures may read well while nothing can be written (a full disk, a task file replaced while open).
    """
    return stats.store_error or pool.store.health()


def health_figures(stats: PoolStats) -> dict[str, Any]:
    """The body of /healthz: admission, queue, stuck threads and task counts (the dashboard's live figures)."""
    short = short_of_workers(stats.stuck_threads, stats.stuck_threads_limit)
    status = "draining" if not stats.accepting else "unhealthy" if short else "ok"
    return {
        "status": status,
        "workers": stats.workers,
        "queue_capacity": stats.queue_capacity,
        # The places taken under the bound, delayed tasks included: at queue_capacity, submissions get 503.
        "queue_waiting": stats.waiting,
        "queue_depth": stats.queue_depth,
        "retries_pending": stats.retries_pending,
        "stuck_threads": stats.stuck_threads,
        "stuck_threads_limit": stats.stuck_threads_limit,
        "tasks": {str(state): count for state, count in stats.counts.items()},
    }


@bp.get("/openapi.json")
def openapi() -> Response:
    """Serve the OpenAPI description with this instance's limits."""
    return jsonify(openapi_spec(services().config, request.script_root))
