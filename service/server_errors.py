"""The errors gunicorn answers itself, before the app sees a request, as problem documents.

A request line over the limit (414), headers too large or too many (431), a
malformed request line, header or chunked framing (400) and the like never
reach Flask: gunicorn writes an HTML page for them through
``gunicorn.util.write_error``, its one writer of such answers. ``install``
replaces that writer so these errors look like every other error of the
service: ``application/problem+json`` with an ``X-Request-ID``, ``Server`` and ``Date``.

The worker wraps gunicorn's error handling in ``answering()``, so that the
id the answer carries is known before it is written: gunicorn logs its
warning and its access line first (and no access line at all for a request
it could not parse), and both must name the id the client received.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from gunicorn import SERVER, util

from .problems import PROBLEM_JSON, problem_document
from .request_id import HEADER as REQUEST_ID_HEADER

# gunicorn's messages quote what the client sent; a long line is cut.
MAX_DETAIL_CHARS = 200


@dataclass(slots=True)
class ErrorAnswer:
    """One error answer gunicorn is writing on this thread."""

    request_id: str = field(default_factory=lambda: os.urandom(16).hex())
    began: float = field(default_factory=time.monotonic)
    status: int | None = None  # set once written
    sent: int | None = None  # body bytes written (what an access line counts)
    logged: bool = False  # its access line was written, or is waiting in `line` for the answer's size
    line: Any = None  # the access line gunicorn asked for before writing the answer (service/access_log.py)


class _ThreadState(threading.local):
    # A class default: reading it on a thread that never set it raises no AttributeError
    # (current_answer runs for every request's access line).
    answer: ErrorAnswer | None = None


_thread = _ThreadState()  # .answer: the ErrorAnswer of the error being handled on this thread


@contextmanager
def answering() -> Iterator[ErrorAnswer]:
    """Name the error answer gunicorn is about to log and write on this thread."""
    answer = _thread.answer = ErrorAnswer()
    try:
        yield answer
    finally:
        _thread.answer = None


def current_answer() -> ErrorAnswer | None:
    """The error answer being handled on this thread, if any."""
    return _thread.answer


def install() -> None:
    """Make gunicorn write its own error answers as problem documents (idempotent)."""
    util.write_error = write_problem


def write_problem(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Write a complete ``status_int`` problem response to ``sock`` and let gunicorn close it."""
    if status_int == 500 or not mesg:  # an error of the server itself: the log has it
        detail = "the server could not handle the request; the error has been logged"
    else:
        detail = mesg if len(mesg) <= MAX_DETAIL_CHARS else mesg[: MAX_DETAIL_CHARS - 3] + "..."
    answer = current_answer() or ErrorAnswer()
    body = json.dumps(problem_document(status_int, detail)).encode()
    head = (
        f"HTTP/1.1 {status_int} {_reason(status_int, reason)}\r\n"
        f"Server: {SERVER}\r\n"  # as gunicorn's other answers; Date is a MUST (RFC 9110 section 6.6.1)
        f"Date: {util.http_date()}\r\n"
        "Connection: close\r\n"
        f"Content-Type: {PROBLEM_JSON}\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER}: {answer.request_id}\r\n"
        "\r\n"
    )
    data = head.encode("latin-1") + body
    answer.status = status_int
    util.write_nonblock(sock, data)
    answer.sent = len(body)


def _reason(status_int: int, reason: str) -> str:
    """The reason phrase of ``status_int``: gunicorn's, but for the "Bad Request" it passes with its 501 and 500."""
    if status_int == 400 or reason != "Bad Request":
        return reason
    try:
        return HTTPStatus(status_int).phrase
    except ValueError:
        return reason
