"""Close a kept-alive connection after a response that left the request body unread.

A request refused before its body is read (401, 413, an unknown route) leaves
the body on the socket. gunicorn drains at most 64 KiB of it before reusing
the connection and closes the connection when more is left, after having
announced ``Connection: keep-alive``: a client that pooled the connection loses
its next request on it (and clients do not retry a POST). Such a response says
``Connection: close`` instead, so the client opens a new connection.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, Response, request

_BODY_READ = "workerpool.body_read"  # environ key set once the whole body has been read

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def mark_body_read() -> None:
    """Record that the current request's body was read to its end."""
    request.environ[_BODY_READ] = True


def init_app(app: Flask) -> None:
    app.after_request(_close_if_body_unread)


def _close_if_body_unread(response: Response) -> Response:
    has_body = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if has_body and not request.environ.get(_BODY_READ):
        response.headers["Connection"] = "close"
    return response


def honour_connection_close(app: WSGIApp) -> WSGIApp:
    """Wrap ``app`` so that its ``Connection: close`` closes the gunicorn connection.

    gunicorn drops the hop-by-hop headers an application sets; it says
    ``close`` only when its own response object is told to close.
    """

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            if any(name.lower() == "connection" and value.lower() == "close" for name, value in headers):
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped
