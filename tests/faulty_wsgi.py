"""A WSGI app whose responses fail in the ways an application's can, for tests on the real gunicorn worker.

The path names the failure: ``/<how>`` with ``?length`` adding a Content-Length
(otherwise the response is chunked for HTTP/1.1).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any


class Failed(Exception):
    """The application's own error."""


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes] | list[bytes]:
    how = environ["PATH_INFO"].strip("/")
    headers = [("Content-Type", "text/plain")]
    if environ.get("QUERY_STRING") == "length":
        headers.append(("Content-Length", "10"))
    start_response("200 OK", headers)
    if how == "fine":
        return [b"0123456789"]
    if how == "replaced-after-empty-chunk":
        return _replaced(start_response)
    return _body(how)


def _replaced(start_response: Callable[..., Any]) -> Iterator[bytes]:
    """Fail after an empty chunk and answer an error page instead, as WSGI allows until the head has left."""
    yield b""
    try:
        raise Failed("replaced")
    except Failed:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    yield b"try again"


def _body(how: str) -> Iterator[bytes]:
    if how == "empty-chunk-then-raise":
        yield b""  # a streaming app's first flush, before it has anything to send
    elif how == "text-chunk":
        yield "0123456789"  # type: ignore[misc]  # not bytes: gunicorn refuses it after writing the head
    elif how in ("raise-after-body", "head-then-raise"):
        yield b"01234"
    raise Failed(how)
