"""Request ids: take the caller's X-Request-ID when it is sane, else make one; echo it on every response.

An id holding the API token is not sane: it would be echoed and logged with every line of the request.

WSGI middleware rather than Flask before/after-request hooks: every response
gets the header (errors included), for one call per request instead of two
trips through Flask's hook machinery.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, has_request_context, request

HEADER = "X-Request-ID"
MAX_CHARS = 128
ENVIRON_KEY = "workerpool.request_id"  # where the current request's id is kept
# Characters that survive log lines, headers and URLs unescaped; anything else
# (spaces, quotes, control characters, non-ASCII) could forge or break a log line.
_SAFE = re.compile(rf"[A-Za-z0-9._:/+=@-]{{1,{MAX_CHARS}}}")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def init_app(app: Flask, token: str = "") -> None:
    """Give ``app`` the middleware; ``token``: the API token, never taken as an id."""
    app.wsgi_app = with_request_id(app.wsgi_app, token)  # type: ignore[method-assign]  # Flask's middleware slot


# The ids' own generator: the random module's shared one is reseeded by any code that calls
# random.seed() (a task handler making its work reproducible), and the ids would then repeat.
_random = random.Random()
os.register_at_fork(after_in_child=_random.seed)  # from the system: a forked worker must not repeat its parent


def new_id() -> str:
    """A fresh id: 32 random hex digits.

    From a ``random.Random``, not ``os.urandom``: an id only needs to be unique,
    not secret, and this saves a system call on every request without an id.
    The generator is the module's own, reseeded from the system in a forked worker.
    """
    return f"{_random.getrandbits(128):032x}"


def current() -> str | None:
    """The id of the request being handled on this thread, if any."""
    return request.environ.get(ENVIRON_KEY) if has_request_context() else None


def chosen(given: str, token: str = "") -> str:
    """The id of a request whose X-Request-ID is ``given`` (``""`` without one): it when sane and free of the API
    token ``token``, else a new one.

    A bad id is replaced, not repaired: a half-kept id would match nothing upstream either.
    """
    return given if _SAFE.fullmatch(given) and not (token and token in given) else new_id()


def pin(headers: list[tuple[str, str]], token: str = "") -> str:
    """The id of a request gunicorn has parsed but not yet handed to the app (``headers``: its fields, names
    upper-case), chosen now and left in ``headers`` as its one X-Request-ID, so that the app takes the same."""
    given = [value for name, value in headers if name == "X-REQUEST-ID"]
    request_id = chosen(",".join(given), token)  # a repeated field is joined so (gunicorn's wsgi.create)
    if given != [request_id]:
        headers[:] = [(name, value) for name, value in headers if name != "X-REQUEST-ID"]
        headers.append(("X-REQUEST-ID", request_id))
    return request_id


def with_request_id(app: WSGIApp, token: str = "") -> WSGIApp:
    """Wrap ``app``: each request gets an id before the app sees it, each response the header."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        environ[ENVIRON_KEY] = request_id = chosen(environ.get("HTTP_X_REQUEST_ID", ""), token)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            headers.append((HEADER, request_id))  # the views never set it themselves
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped
