"""The errors gunicorn answers itself, before the app sees a request, as problem documents.

A request line over the limit (414), headers too large or too many (431), a
malformed request line, header or chunked framing (400) and the like never
reach Flask: gunicorn writes an HTML page for them through
``gunicorn.util.write_error``, its one writer of such answers. ``install``
replaces that writer so these errors look like every other error of the
service: ``application/problem+json`` with an ``X-Request-ID``.
"""

from __future__ import annotations

import json
import socket
import uuid

from gunicorn import util

from .problems import PROBLEM_JSON, problem_document
from .request_id import HEADER as REQUEST_ID_HEADER

# gunicorn's messages quote what the client sent; a long line is cut.
MAX_DETAIL_CHARS = 200


def install() -> None:
    """Make gunicorn write its own error answers as problem documents (idempotent)."""
    util.write_error = write_problem


def write_problem(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Write a complete ``status_int`` problem response to ``sock`` and let gunicorn close it."""
    if status_int == 500 or not mesg:  # an error of the server itself: the log has it
        detail = "the server could not handle the request; the error has been logged"
    else:
        detail = mesg if len(mesg) <= MAX_DETAIL_CHARS else mesg[: MAX_DETAIL_CHARS - 3] + "..."
    body = json.dumps(problem_document(status_int, detail)).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER}: {uuid.uuid4().hex}\r\n"
        "\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)
