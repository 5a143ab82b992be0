"""Request ids: take the caller's X-Request-ID when it is sane, else make one; echo it on every response."""

from __future__ import annotations

import os
import re

from flask import Flask, Response, g, has_request_context, request

HEADER = "X-Request-ID"
MAX_CHARS = 128
# Characters that survive log lines, headers and URLs unescaped; anything else
# (spaces, quotes, control characters, non-ASCII) could forge or break a log line.
_SAFE = re.compile(rf"[A-Za-z0-9._:/+=@-]{{1,{MAX_CHARS}}}")


def init_app(app: Flask) -> None:
    # Registered before any other before_request, so even a refused request has an id.
    app.before_request_funcs.setdefault(None, []).insert(0, _assign)
    app.after_request(_echo)


def current() -> str | None:
    """The id of the request being handled on this thread, if any."""
    return g.get("request_id") if has_request_context() else None


def _assign() -> None:
    given = request.headers.get(HEADER, "")
    # A bad id is replaced, not repaired: a half-kept id would match nothing upstream either.
    g.request_id = given if _SAFE.fullmatch(given) else os.urandom(16).hex()  # uuid4().hex's digits, cheaper


def _echo(response: Response) -> Response:
    request_id = g.get("request_id")  # an after_request hook runs inside the request
    if request_id is not None:
        response.headers[HEADER] = request_id
    return response
