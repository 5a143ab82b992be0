"""Werkzeug's threaded development server, bounded: ``python app.py`` serves with it.

Werkzeug starts one thread per connection, without limit, and a thread waits
as long as its client takes to send a request: a few thousand idle or slow
connections mean a few thousand threads. Here:

- each request must arrive whole, head and body, within the server's
  ``request_timeout``; after that its stream ends as if the client had
  closed it. A connection serves one request: Werkzeug says
  ``Connection: close`` in every response and closes after it;
- at most ``max_connections`` connections are served at once. When all are
  taken, a new connection evicts the one that has waited longest for its
  client to send something (an idle or slow client), so health checks and
  other quick clients keep being answered however many slow ones there are;
- a request head is refused as gunicorn refuses it, with the same limits
  and a problem document (``http.server`` answered some with an HTML page,
  or with no status line, and served others).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http import HTTPStatus
from typing import Any

from gunicorn.http.body import CHUNK_EXT_RE
from gunicorn.http.errors import LimitRequestHeaders
from gunicorn.http.message import RFC9110_5_3_SINGLETON_FIELDS, RFC9110_6_5_1_FORBIDDEN_TRAILER
from werkzeug.serving import DechunkedInput, ThreadedWSGIServer, WSGIRequestHandler

from . import logs
from .head_problems import BodyFraming, head_problem
from .problems import PROBLEM_JSON, problem_document
from .request_id import HEADER as REQUEST_ID_HEADER
from .request_reader import (
    DEFAULT_CHUNK_LINE_LIMIT,
    MAX_PREREAD_HEAD,
    REQUEST_TIMEOUT_S,
    BareLineFeed,
    BodyLimits,
    ChunkSizeLineTooLong,
    EmptyRequestLine,
    read_framing,
    request_line_too_long,
)

MAX_CONNECTIONS = 64
WRITE_TIMEOUT_S = 30.0  # a client that stops reading its response gives its thread back after this
WRITE_SLICE = 65536  # bytes of a response written at a time, each within WRITE_TIMEOUT_S (see _CountedWriter)
LINGER_S = 2.0  # read what a client still sends after its response for this long at most (gunicorn's close_graceful)
EVICTION_WAIT_S = 1.0  # how long a new connection waits for the thread of the one it evicted
# gunicorn's limits on a request head (its defaults: limit_request_line, limit_request_field_size,
# limit_request_fields), and the event loop's on the whole head (service/request_reader.py).
LIMIT_REQUEST_LINE = 4094  # bytes of the request line, without its CRLF: 414 beyond
LIMIT_REQUEST_FIELD_SIZE = 8190  # bytes of a header field line, with its CRLF: 431 beyond
LIMIT_REQUEST_FIELDS = 100  # header fields: 431 beyond
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_HEX = re.compile(rb"[0-9a-fA-F]+")
_REQUEST_ID = REQUEST_ID_HEADER.lower()
# gunicorn's reason phrases where http.server's differ: RFC 9110's name for 414 ("Request-URI Too Long" before).
_REASONS = {HTTPStatus.REQUEST_URI_TOO_LONG: "URI Too Long"}
_METHOD = re.compile(r"[!$%&'*+\-.^_`|~0-9A-Z]{3,20}")  # gunicorn's: a token, without lowercase letters or #
_TARGET_INVALID = re.compile(r"[^\x21-\x7e]")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # a field name (RFC 9110 section 5.6.2)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # not allowed in a field value (RFC 9110 section 5.5)
# Fields a trailer section may not carry, as they change routing, framing or authentication (RFC 9110 section 6.5.1),
# and fields that may appear once (section 5.3): gunicorn's parser refuses a trailer with one, or with a repeat.
_FORBIDDEN_TRAILERS = frozenset(name.encode() for name in RFC9110_6_5_1_FORBIDDEN_TRAILER)
_SINGLETON_FIELDS = frozenset(name.encode() for name in RFC9110_5_3_SINGLETON_FIELDS)


class _DeadlineReader(io.RawIOBase):
    """A socket's read side whose stream ends at the handler's ``read_deadline``."""

    def __init__(self, handler: BoundedRequestHandler) -> None:
        super().__init__()
        self._handler = handler
        self.expired = False  # the stream ended at the deadline, not at the client's end

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        now = time.monotonic()
        if self._handler.responded:
            # After the response werkzeug reads what the client still sends, then closes: for LINGER_S at most, as
            # gunicorn lingers (it held the thread until the request's deadline).
            if self._handler.linger_until is None:
                self._handler.linger_until = now + LINGER_S
            if self._handler.linger_until <= now:
                return 0
        remaining = min(self._handler.read_deadline, self._handler.linger_until or math.inf) - now
        if remaining <= 0:
            self.expired = not self._handler.responded
            return 0
        sock: socket.socket = self._handler.connection
        sock.settimeout(remaining)
        try:
            with self._handler.server.waiting_for(sock):  # type: ignore[attr-defined]
                return sock.recv_into(buffer)
        except TimeoutError:
            self.expired = not self._handler.responded
            return 0
        except ConnectionError:
            return 0
        finally:
            sock.settimeout(WRITE_TIMEOUT_S)


class _Dechunked(io.RawIOBase):
    """A chunked request body (``wsgi.input``), decoded as gunicorn decodes one; werkzeug's ``DechunkedInput``
    refused a chunk extension, which is to be ignored (RFC 9112 section 7.1.1), and trailer fields, and took a body
    that ended inside its last CRLFs for a whole one.

    A malformed chunk-size line, a chunk not followed by CRLF, a stream that ends (the client's end, or the
    deadline) before the end of the trailer section, or a trailer field gunicorn refuses (``field_problem``,
    ``trailer_problem``): ``OSError``, which the application answers 400 (408 at the deadline). A trailer section
    past gunicorn's limits on header fields (a field line over ``LIMIT_REQUEST_FIELD_SIZE`` bytes, more than
    ``LIMIT_REQUEST_FIELDS`` fields) or longer than ``MAX_PREREAD_HEAD``: ``LimitRequestHeaders``, answered 431;
    a chunk-size line over gunicorn's limit on one: ``ChunkSizeLineTooLong``, answered 400 (both as gunicorn
    answers them, see ``problems.server_refusal``).
    """

    def __init__(self, rfile: io.BufferedReader) -> None:
        super().__init__()
        self._rfile = rfile  # named as werkzeug's: request_reader.body_timed_out finds the deadline through it
        self._left = 0  # bytes of the current chunk's data not read yet
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        if self._done or not len(buffer):
            return 0
        if not self._left:
            self._left = self._chunk_size()
            if not self._left:
                self._read_trailer_section()
                self._done = True
                return 0
        with memoryview(buffer) as view:
            read = self._rfile.readinto(view[: min(len(view), self._left)])
        if not read:
            raise OSError("the chunked body ended inside a chunk")
        self._left -= read
        if not self._left and self._rfile.read(2) != b"\r\n":
            raise OSError("a chunk's data is not followed by CRLF")
        return read

    def _line(self) -> bytes:
        line = self._rfile.readline(DEFAULT_CHUNK_LINE_LIMIT + 2)
        if len(line) == DEFAULT_CHUNK_LINE_LIMIT + 2 and not line.endswith(b"\r\n"):  # gunicorn's loop: 400 at once
            raise ChunkSizeLineTooLong(DEFAULT_CHUNK_LINE_LIMIT)
        if not line.endswith(b"\r\n"):  # cut short, or ended by a bare LF
            raise OSError("a line of the chunked body's framing does not end with CRLF")
        return line[:-2]

    def _chunk_size(self) -> int:
        size, extended, extension = self._line().partition(b";")
        if extended:  # whitespace may come before an extension only (RFC 9112 section 7.1.1)
            size = size.rstrip(b" \t")
        if not _HEX.fullmatch(size) or (extended and not CHUNK_EXT_RE.fullmatch(b";" + extension)):
            raise OSError("a chunk-size line is malformed")
        return int(size, 16)

    def _read_trailer_section(self) -> None:
        read = 0
        names: list[bytes] = []
        while line := self._trailer_line():  # checked as header fields, and ignored; an empty line ends them
            read += len(line) + 2
            if read > MAX_PREREAD_HEAD:
                raise LimitRequestHeaders(f"the trailer section is longer than {MAX_PREREAD_HEAD} bytes")
            if len(names) >= LIMIT_REQUEST_FIELDS:
                raise LimitRequestHeaders(f"the trailer section has more than {LIMIT_REQUEST_FIELDS} fields")
            if problem := field_problem(line) or trailer_problem(line, names):  # gunicorn refuses the request too
                raise OSError(f"in the trailer section, {problem}")
            names.append(line.partition(b":")[0].upper())

    def _trailer_line(self) -> bytes:
        line = self._rfile.readline(LIMIT_REQUEST_FIELD_SIZE + 1)
        if len(line) > LIMIT_REQUEST_FIELD_SIZE:  # as a header field line: gunicorn's parser counts its CRLF
            raise LimitRequestHeaders(f"a trailer field is longer than {LIMIT_REQUEST_FIELD_SIZE} bytes")
        if not line.endswith(b"\r\n"):  # cut short, or ended by a bare LF
            raise OSError("a line of the chunked body's trailer section does not end with CRLF")
        return line[:-2]


class _CountedWriter:
    """A handler's ``wfile`` that counts the bytes written through it (``sent``), for the access line.

    It writes in slices of ``WRITE_SLICE``: the socket's ``sendall`` takes its timeout (``WRITE_TIMEOUT_S``) as the
    limit for the whole write, so a large listing written at once was cut off after 30 s even for a client that kept
    reading, and one that failed counted nothing of what had gone out. A slice's own 30 s now bound a client that
    takes nothing, and ``sent`` counts the slices written whole.
    """

    def __init__(self, wfile: Any) -> None:
        self._wfile = wfile
        self.sent = 0

    def write(self, data: bytes) -> int:
        with memoryview(data) as view:
            for start in range(0, len(view), WRITE_SLICE):
                piece = view[start : start + WRITE_SLICE]
                self._wfile.write(piece)
                self.sent += len(piece)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wfile, name)


class HeadTooLarge(http.client.HTTPException):
    """A request head past gunicorn's limits: ``http.server`` answers it 431 (``send_error``), this its detail."""


class _LineEnds:
    """The handler's ``rfile`` while ``http.server`` reads the header lines: notes a head cut short (``cut``: its
    stream ended, at the client's end or the deadline, before the empty line that ends it), a line ended by a bare LF
    and the first field line gunicorn refuses (``malformed``: why), and raises ``HeadTooLarge`` for a field line, a
    number of fields or a whole head (``head`` bytes so far) past the limits gunicorn sets."""

    def __init__(self, raw: io.BufferedReader, head: int = 0, token: str = "") -> None:
        self.raw = raw
        self.token = token  # the API token, left out of what ``malformed`` quotes
        self.cut = False
        self.bare = False
        self.malformed = ""
        self.head = head
        self.fields = 0
        self.lines = b""  # the field lines read, as sent
        self._lines: list[bytes] | None = None

    def readline(self, size: int = -1) -> bytes:
        """The head's field lines together as one line, then the empty line that ends them.

        ``http.client`` joins the lines it reads, so it parses the same fields;
        read one by one, the empty line counted as one more, and 100 fields were
        refused as too many (gunicorn takes 100).
        """
        if self._lines is None:
            self._lines = self._read_head()
        return self._lines.pop(0) if self._lines else b""

    def _read_head(self) -> list[bytes]:
        fields = bytearray()
        while True:
            line = self.raw.readline(LIMIT_REQUEST_FIELD_SIZE + 1)
            if len(line) > LIMIT_REQUEST_FIELD_SIZE:
                raise HeadTooLarge(f"a header field is longer than {LIMIT_REQUEST_FIELD_SIZE} bytes")
            if not line.endswith(b"\n"):  # the stream ended: http.server would take the head as whole
                self.cut = True
                return []
            if not line.endswith(b"\r\n"):
                self.bare = True
            self.head += len(line)
            if self.head > MAX_PREREAD_HEAD:
                raise HeadTooLarge(f"the request head is longer than {MAX_PREREAD_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                self.lines = bytes(fields)
                return [self.lines, line] if fields else [line]
            self.fields += 1
            if self.fields > LIMIT_REQUEST_FIELDS:
                raise HeadTooLarge(f"the request has more than {LIMIT_REQUEST_FIELDS} header fields")
            if not self.malformed:
                self.malformed = field_problem(line, self.token)
            fields += line

    def __getattr__(self, name: str) -> object:
        return getattr(self.raw, name)


class BoundedRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, reading each request within the server's ``request_timeout``."""

    timeout = WRITE_TIMEOUT_S
    read_deadline = 0.0
    expected = False  # the request has Expect: 100-continue (answered from parse_request, or not at all)
    responded = False  # the response's head has been written
    linger_until: float | None = None  # once responded: when reading what the client still sends stops
    connection_sent: tuple[str, ...] = ()  # the Connection values of the response being sent

    access_log = True  # one access line per request (ACCESS_LOG), as gunicorn writes it (service/access_log.py)

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self))
        self.wfile = _CountedWriter(self.wfile)  # type: ignore[assignment]

    def handle_one_request(self) -> None:
        self.read_deadline = time.monotonic() + self.server.request_timeout  # type: ignore[attr-defined]
        self.rfile.raw.expired = False  # type: ignore[attr-defined]
        self.began = time.monotonic()
        self.status_sent: int | None = None  # the response's status, once its head is being sent
        self.head_read = False  # self.headers are this request's
        self.response_id: str | None = None
        self.request_hidden = False  # answered from its head, its request left out of the access line (``refuse``)
        self.body_from = 0  # wfile.sent when the response's head had been written
        self.responded = False
        self.linger_until = None
        try:
            super().handle_one_request()
        finally:
            if self.status_sent is not None and self.access_log:
                self._write_access_line(self.status_sent)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        """Note the status: the access line is written once the response is (``_write_access_line``)."""
        self.status_sent = code if isinstance(code, int) else None

    def flush_headers(self) -> None:
        super().flush_headers()
        self.body_from = self.wfile.sent  # type: ignore[attr-defined]
        self.responded = True  # the application has read what it reads of the body

    def _write_access_line(self, status: int) -> None:
        """gunicorn's access line (``service/access_log.py``), on its logger: werkzeug's had no request id, no byte
        count, no duration, and no fields in JSON."""
        line, target = self.requestline, (getattr(self, "path", "") if self.command else "")
        if self.request_hidden:  # as gunicorn logs the errors it answers itself; its warning quotes what was sent
            line, target = "-", ""
        elif "?" in target:  # a secret a client put in the query stays out of the log
            line = line.replace(target, logs.redact_target(target, refused=logs.is_refused(status)), 1)
        elif not self.command:  # a request line not parsed: where its target ends is unknown
            line = logs.redact_request_line(line)
        token = self.server.body_limits.token  # type: ignore[attr-defined]
        headers = self.headers if self.head_read and not self.request_hidden else {}
        entry = logs.AccessEntry(
            created=time.time(),
            remote_addr=str(self.client_address[0]) if self.client_address else "-",
            method="-" if self.request_hidden else self.command or "-",
            path=logs.without_token(target.partition("?")[0], token),
            request_line=logs.without_token(line, token) or "-",
            status=status,
            response_bytes=self.wfile.sent - self.body_from,  # type: ignore[attr-defined]
            duration_ms=int((time.monotonic() - self.began) * 1000),
            user_agent=logs.without_token(headers.get("User-Agent", "-"), token),
            request_id=self.response_id,
        )
        try:
            logs.write_access(logging.getLogger(logs.ACCESS_LOGGER), entry)
        except Exception:
            logging.getLogger(__name__).exception("cannot write the access line")

    def parse_request(self) -> bool:
        """Parse the request head; False once a head refused here has been answered (the connection then closes).

        As gunicorn's worker does (service/request_reader.py): one empty line
        before the request line is skipped (RFC 9112 section 2.2), a second one is
        refused (400), as is a head with a line ended by a bare LF (400).
        ``http.server`` closed the connection without an answer on the empty
        line, and read bare LF lines as whole ones. A head whose stream ends
        (the client's end, or the deadline) before its empty line closes the
        connection unanswered: ``http.server`` served what had come of it.
        """
        self.began = time.monotonic()  # the request has begun: a kept-alive connection's wait is not counted
        if self.raw_requestline == b"\r\n":
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline:  # the client closed after it
                self.close_connection = True
                return False
        if not self.raw_requestline.endswith(b"\n"):  # the stream ended in the request line: closed unanswered
            self.close_connection = True
            return False
        if self.raw_requestline == b"\r\n":
            return self._refuse_line(400, str(EmptyRequestLine()))
        if not self.raw_requestline.endswith(b"\r\n") and self.raw_requestline.endswith(b"\n"):
            return self._refuse_line(400, str(BareLineFeed()))
        token = self.server.body_limits.token  # type: ignore[attr-defined]
        refusal = request_line_problem(self.raw_requestline, token)
        if refusal is not None:
            return self._refuse_line(*refusal)
        lines = _LineEnds(self.rfile, len(self.raw_requestline), token)
        self.rfile = lines  # type: ignore[assignment]  # the header lines are read through it
        try:
            if not super().parse_request():
                return False
        finally:
            self.rfile = lines.raw
        self.head_read = True
        if lines.cut:  # as gunicorn does: a request whose head never ended is not served, nor answered
            self.close_connection = True
            return False
        if lines.bare or lines.malformed:
            self.refuse(400, str(BareLineFeed()) if lines.bare else lines.malformed)
            return False
        problem = head_problem(self.request_version, self.headers, token)
        if problem is not None:
            # gunicorn's parser refuses a body's framing with the request read: its access line shows the request.
            self.refuse(*problem, request_shown=isinstance(problem, BodyFraming))
            return False
        expect = self.headers.get("Expect", "").strip(" \t").lower()
        # Kept from werkzeug, which would answer it after the checks here (make_environ restores it).
        self.expected = expect == "100-continue"
        if self.expected:
            del self.headers["Expect"]
            # Answered now, before the application runs, as gunicorn's event loop answers it (the same
            # read_framing): unless the request is HTTP/1.0 (ignored there, RFC 9110 section 10.1.1) or its body
            # would be refused from its head (longer than its route takes, without the token, sent by a page of
            # another origin, or with a content coding), which the application then answers without reading it.
            head = self.raw_requestline + lines.lines + b"\r\n"
            framing = read_framing(head, self.server.body_limits)  # type: ignore[attr-defined]
            if framing.expects and not framing.refused:
                self._send_continue()
        return True

    def make_environ(self) -> dict:
        environ = super().make_environ()
        if isinstance(environ["wsgi.input"], DechunkedInput):
            environ["wsgi.input"] = _Dechunked(self.rfile)
        if self.expected:
            environ["HTTP_EXPECT"] = "100-continue"
        return environ

    def _send_continue(self) -> None:
        self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def handle_expect_100(self) -> bool:
        """Send nothing yet: ``100 Continue`` goes once the head has passed the checks in ``parse_request``.

        ``http.server`` sent one from ``parse_request``, before those checks
        (a refused head was told to go on first), and then werkzeug a second one.
        """
        return True

    def _refuse_line(self, status: int, detail: str) -> bool:
        """Refuse a request whose request line is not parsed (it answers as HTTP/1.1); False."""
        self.command, self.request_version = None, self.protocol_version
        self.requestline = self.raw_requestline.decode("latin-1").rstrip("\r\n")
        self.refuse(status, detail)
        return False

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer ``http.server``'s own refusals (a request line over 64 KiB, a head past the limits) with a problem
        document, as gunicorn does, where it sent an HTML page."""
        if self.request_version in ("", "HTTP/0.9"):  # its request line unread: the answer has a status line
            self.command, self.request_version = None, self.protocol_version
        if code == HTTPStatus.REQUEST_URI_TOO_LONG:
            detail = str(request_line_too_long(LIMIT_REQUEST_LINE))
        else:
            detail = explain or message or HTTPStatus(code).phrase
        self.refuse(code, detail)

    def refuse(self, status: int, detail: str, *, request_shown: bool = False) -> None:
        """Answer a problem document for a request refused from its head, and close the connection.

        Logged as gunicorn logs the errors it answers itself: a warning that says why, then an access line whose
        request line is ``"-"`` (unless ``request_shown``: then the request line and user agent, as gunicorn shows
        them for a body framing its parser refuses), both with the answer's request id (without the warning, the
        log of a 400 did not say what was wrong with the request)."""
        answer_id = os.urandom(16).hex()
        client = self.client_address[0] if self.client_address else "-"
        logging.getLogger("gunicorn.error").warning(
            "Invalid request from ip=%s: %s", client, detail, extra={"request_id": answer_id}
        )
        self.request_hidden = not request_shown
        body = json.dumps(problem_document(status, detail)).encode()
        self.send_response(status, _REASONS.get(status))
        self.send_header("Content-Type", PROBLEM_JSON)
        self.send_header("Content-Length", str(len(body)))
        self.send_header(REQUEST_ID_HEADER, answer_id)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def connection_dropped(self, error: BaseException, environ: Any = None) -> None:
        """Werkzeug's hook for a connection lost while serving: say so for a client that took nothing of its response
        for ``WRITE_TIMEOUT_S`` (a read that runs out of time ends its stream instead), as gunicorn's worker does."""
        if not isinstance(error, TimeoutError) or self.status_sent is None:
            return
        client = self.client_address
        address = f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) >= 2 else str(client)
        path = logs.without_token(getattr(self, "path", "").partition("?")[0], self.server.body_limits.token)  # type: ignore[attr-defined]
        logging.getLogger("gunicorn.error").warning(
            "closed the connection from %s: it took nothing of the response to %s %s for %s",
            address, self.command, path, f"{self.timeout:g} s", extra={"request_id": self.response_id},
        )  # fmt: skip

    def send_response(self, code: int, message: str | None = None) -> None:
        self.connection_sent = ()
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == _REQUEST_ID:
            self.response_id = value
        # Werkzeug adds "Connection: close" to every response, after the application's headers,
        # which may say it already (service/connection.py does when a body was left unread).
        if keyword.lower() == "connection":
            if value.lower() in self.connection_sent:
                return
            self.connection_sent += (value.lower(),)
        super().send_header(keyword, value)


def request_line_problem(line: bytes, token: str = "") -> tuple[int, str] | None:
    """Why a request line is refused (status, detail), as gunicorn refuses it: one too long (414), one that is not a
    method, a target and HTTP/1.x (400; ``http.server`` served an HTTP/0.9 line, its answer without a status line),
    a lowercase method or a target that is not printable ASCII in a form the method takes (400; served).

    The detail quotes what was sent as gunicorn's does (service/gunicorn_worker.py ``redact``): without the query
    and without the API token ``token``, which a client may have put there."""
    text = line.decode("latin-1").rstrip("\r\n")
    if len(text) > LIMIT_REQUEST_LINE:
        return 414, str(request_line_too_long(LIMIT_REQUEST_LINE))
    words = text.split(" ")  # single spaces only (RFC 9112 section 3), as gunicorn: http.server split on any whitespace
    if len(words) != 3 or not all(words):
        shown = _without(token, logs.redact_request_line(text))
        return 400, f"the request line {shown[:100]!r} is not a method, a target and an HTTP version"
    method, target, protocol = words
    if not _METHOD.fullmatch(method):  # gunicorn's rule: a token of 3 to 20 characters, no lowercase letter or #
        return 400, f"the method {_without(token, method)[:20]!r} is not an uppercase token of 3 to 20 characters"
    # Printable ASCII only (RFC 9112 section 3.2), in a request-target form the method takes (sections 3.2.1-3.2.4).
    form = target.startswith("/") or "://" in target or method == "CONNECT"
    if (method != "OPTIONS" if target == "*" else not form) or _TARGET_INVALID.search(target):
        shown = _without(token, logs.redact_target(target, refused=True))
        return 400, f"the request target {shown[:100]!r} is not valid for {method}"
    version = _VERSION.fullmatch(protocol)
    if version is None or version[1] != "1":
        shown = _without(token, protocol)
        return 400, f"HTTP version {shown[:20]!r} is not supported: send HTTP/1.1 (or HTTP/1.0)"
    return None


def field_problem(line: bytes, token: str = "") -> str:
    """Why gunicorn refuses a header field line (400), or "": obsolete line folding (``http.server`` joined the line
    to the field before it), a name that is not a token, or a control character (NUL...) in the value. The API token
    ``token`` is left out of the name it quotes (``Authorization Bearer <token>``, without its colon)."""
    if line[:1] in (b" ", b"\t"):
        return "a header field is folded onto a second line (obsolete line folding): send each field on one line"
    name, colon, value = line.rstrip(b"\r\n").partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        shown = _without(token, name.decode("latin-1"))
        return f"the header field name {shown[:40]!r} is not a token (RFC 9110 section 5.6.2)"
    if _CONTROL.search(value):
        shown = _without(token, name.decode())
        return f"the value of the {shown} header field has a control character (RFC 9110 section 5.5)"
    return ""


def _without(token: str, text: str) -> str:
    """``text`` with every occurrence of the API token ``token`` replaced (a field value may have been lowercased),
    before it is cut to be quoted."""
    return logs.without_token_in_any_case(text, token)


def trailer_problem(line: bytes, names: list[bytes]) -> str:
    """Why gunicorn refuses a trailer field line that ``field_problem`` passes, or "", given the upper-cased
    ``names`` of the trailer fields before it: a field that changes the message's framing, routing or
    authentication, or a second field that may appear once."""
    name = line.partition(b":")[0].upper()
    if name in _FORBIDDEN_TRAILERS:
        return f"the {name.decode()} field is not allowed (RFC 9110 section 6.5.1)"
    if name in _SINGLETON_FIELDS and name in names:
        return f"the {name.decode()} field appears twice (RFC 9110 section 5.3)"
    return ""


class BoundedThreadedServer(ThreadedWSGIServer):
    """Werkzeug's threaded server serving at most ``max_connections`` connections at once."""

    def __init__(
        self,
        *args,
        request_timeout: float = REQUEST_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        body_limits: BodyLimits | None = None,
        **kwargs,
    ) -> None:
        self.request_timeout = request_timeout
        self.body_limits = body_limits or BodyLimits()  # a request's body limit and token, as under gunicorn
        self._slots = threading.BoundedSemaphore(max_connections)
        self._waiting_lock = threading.Lock()  # must be held while changing _waiting
        self._waiting: dict[socket.socket, None] = {}  # blocked reading from their client, longest first
        self._serving_lock = threading.Lock()  # must be held while changing _serving
        self._serving: set[threading.Thread] = set()  # the threads serving a connection
        super().__init__(*args, **kwargs)

    @contextmanager
    def waiting_for(self, sock: socket.socket) -> Iterator[None]:
        """Mark ``sock``'s thread as waiting for its client, hence evictable, while in the block."""
        with self._waiting_lock:
            self._waiting[sock] = None
        try:
            yield
        finally:
            with self._waiting_lock:
                self._waiting.pop(sock, None)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self._evict_longest_waiting()
            if not self._slots.acquire(timeout=EVICTION_WAIT_S):
                self.shutdown_request(request)  # every connection busy serving: refused
                return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        with self._serving_lock:
            self._serving.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._serving_lock:
                self._serving.discard(threading.current_thread())
            self._slots.release()

    def server_close(self) -> None:
        """Stop listening, then give the connections still open ``LINGER_S`` to finish, as gunicorn's stopping
        worker does: a request its client is still sending is answered, where the process exiting under its (daemon)
        thread reset it, and the client could not tell whether its task was taken.

        A client that has not sent its request by then has its connection closed unanswered.
        """
        super().server_close()
        self._join_serving(LINGER_S)
        with self._waiting_lock:
            waiting, self._waiting = list(self._waiting), {}
        for sock in waiting:
            with suppress(OSError):  # its read returns at once: the thread closes the connection and ends
                sock.shutdown(socket.SHUT_RDWR)
        self._join_serving(EVICTION_WAIT_S)

    def _join_serving(self, within: float) -> None:
        """Wait up to ``within`` seconds in all for the threads serving a connection to end."""
        deadline = time.monotonic() + within
        with self._serving_lock:
            serving = list(self._serving)
        for thread in serving:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _evict_longest_waiting(self) -> None:
        with self._waiting_lock:
            sock = next(iter(self._waiting), None)
            if sock is not None:
                del self._waiting[sock]
        if sock is not None:
            with suppress(OSError):  # its read returns at once: the thread ends and frees its slot
                sock.shutdown(socket.SHUT_RDWR)
