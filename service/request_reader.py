"""Read each request on the event loop before a thread serves it, within a deadline.

gunicorn's gthread worker hands a connection to one of its few request
threads as soon as it is readable; the thread then blocks until the whole
request head has arrived, for as long as the client takes. A handful of
clients sending a few bytes at a time hold every thread and nothing else is
answered. ``RequestReader`` collects the head and the body from the
worker's poller without blocking, and hands the connection over only once
the request is there, so slow clients cost a buffer, not a thread. A request
not complete ``timeout`` seconds after it began is given up: dropped if its
head is not whole, else served with the body it has.

The body is read here whatever its framing: of known length, chunked
(decoded here as it arrives, and handed over as a body of known length, so
its framing is not kept), or sent after ``100 Continue``, which is answered from here. Each
route's limit (``BodyLimits``) bounds what is read: a body announced longer
than its route takes, or one that a missing or wrong token, or a page of
another origin (``Sec-Fetch-Site``, else ``Origin``), would have refused, is not asked for
(no ``100 Continue``) nor read; the application refuses it from its head,
without reading it. A head, or a chunked body's
trailer section, larger than ``MAX_PREREAD_HEAD`` is refused from here (431,
or 414 for a request line alone that long), as is an HTTP/1.1 (to 1.9) head without a
Host field (400, which gunicorn's parser does not check), one with a line ended
by a bare LF (400: waited for, its end of head would never come) and one with a transfer
coding other than chunked (501: gunicorn's parser would hand its body over
undecoded), and never reaches a thread. The empty line that may come before a request line (RFC 9112 section 2.2),
which gunicorn's parser skips, is skipped here too, so a head after it gets every one of these checks; a second one,
which the parser refuses, is refused here (400).
What is left for a thread to read from the socket (a request whose framing
gunicorn's parser refuses) goes through ``ReadDeadline``, which ends the
stream at the same deadline.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import time
from collections.abc import Callable
from typing import NamedTuple, Protocol
from urllib.parse import unquote_to_bytes

from gunicorn.http import get_parser
from gunicorn.http.body import CHUNK_EXT_RE
from gunicorn.http.errors import (
    InvalidChunkSize,
    InvalidHeader,
    LimitRequestHeaders,
    LimitRequestLine,
    UnsupportedTransferCoding,
)
from gunicorn.http.message import MAX_REQUEST_LINE

from .bearer import bearer_problem
from .cross_site import SAFE_METHODS, from_foreign_page

REQUEST_TIMEOUT_S = 10.0  # to send a whole request (head and body), from its first byte or the connection's start
# Larger heads and trailer sections are refused from the loop (nginx takes 32 KiB by default, gunicorn
# about 800 KB): read on a thread instead, one that stops arriving would hold the thread until the deadline.
MAX_PREREAD_HEAD = 65536
MAX_PREREAD_BODY = 1 << 20  # the body limit of every route when none are given
# A chunk-size line longer than gunicorn's limit for it (limit_request_field_size) is refused here (400); one
# within the limit is waited for, else the parser would wait on a thread.
DEFAULT_CHUNK_LINE_LIMIT = 8190
READ_SLICE_S = 1.0  # a thread notices a deadline brought forward within this time
_END_OF_HEAD = b"\r\n\r\n"
_EMPTY_LINE = b"\r\n"  # one may come before the request line (RFC 9112 section 2.2), as gunicorn's parser allows
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_HEX = frozenset(b"0123456789abcdefABCDEF")


class Connection(Protocol):
    """The parts of gunicorn's ``gthread.TConn`` used here."""

    sock: socket.socket
    client: object
    parser: object | None
    data_ready: bool
    read_deadline: float
    read_expired: bool


class BodyLimits:
    """The most body bytes each route reads, and the token it asks for: what a request may make the loop read.

    ``POST /enqueue/batch`` takes ``batch`` bytes, ``POST /enqueue``
    ``default``, and every other route none: a body sent to one is not read
    (it answers as without it), rather than waited for until the request's
    deadline if it is shorter than announced.
    """

    def __init__(self, default: int = MAX_PREREAD_BODY, batch: int | None = None, token: str = "") -> None:
        self.default = default
        self.batch = default if batch is None else batch
        self.token = token

    def of(self, head: bytes) -> int:
        """The body limit of the route ``head`` (a request head) is for; 0 for a route that takes no body."""
        if not head.startswith(b"POST "):
            return 0
        # The path as gunicorn routes it: without the query, and without a fragment (`/enqueue#x` is POST /enqueue).
        path = head[5 : head.find(b" ", 5)].partition(b"?")[0].partition(b"#")[0]
        if b"%" in path:  # routed as decoded: /%65nqueue/batch and /enqueue%2Fbatch are the batch's
            path = unquote_to_bytes(path)
        if path.endswith(b"/enqueue"):  # under a root path too (SCRIPT_NAME)
            return self.default
        return self.batch if path.endswith(b"/enqueue/batch") else 0

    def authorized(self, authorization: bytes | None) -> bool:
        """Whether a request with this ``Authorization`` value passes the token check (``service.auth``)."""
        if not self.token:
            return True
        # WSGI hands the application a header's bytes as latin-1 text: the same value, checked alike.
        return bearer_problem(None if authorization is None else authorization.decode("latin-1"), self.token) is None


class Framing(NamedTuple):
    """What to read of a request once its head is in."""

    length: int  # the head, and a body of known length if it is to be read here
    chunked: bool = False  # a chunked body follows, to be read here up to its limit
    expects: bool = False  # the client waits for an answer to Expect: 100-continue before it sends the body
    refused: bool = False  # the body will not be read (longer than its route takes, or no valid token)
    refusal: Exception | None = None  # the request is answered with this error from the loop, its body unread


# "Host : x": a Host field whose name is malformed, not a missing one; the parser refuses that name.
_SPACED_HOST = re.compile(rb"\r\nhost[ \t]+:")


class MissingHost(InvalidHeader):
    """An HTTP/1.1 (to 1.9) request without a Host field: 400 (RFC 9112 section 3.2); gunicorn's parser lets it
    through."""

    def __init__(self) -> None:
        super().__init__("HOST")

    def __str__(self) -> str:
        return "the request has no Host header: an HTTP/1.1 (or later) request must have one (RFC 9112 section 3.2)"


class UnsupportedCoding(UnsupportedTransferCoding):
    """A transfer coding before ``chunked`` (``gzip, chunked``): 501 (RFC 9112 section 6.1), its body unread."""

    def __str__(self) -> str:
        return f"Transfer-Encoding {self.hdr!r} is not supported: send the body with Transfer-Encoding: chunked only"


class BareLineFeed(InvalidHeader):
    """A head, or a chunked body's framing, with a line ended by a bare LF: 400 at once (RFC 9112 sections 2.2 and
    7.1), as gunicorn's parser refuses it.

    Such a head never ends with CRLF CRLF (nor such a chunk-size line with
    CRLF): waited for, it would be dropped unanswered, or answered 408, at the deadline.
    An ``InvalidHeader`` for gunicorn's error handler, which answers its sentence as it is (an
    ``InvalidRequestLine`` is quoted inside "Invalid Request Line '...'", whatever the line at fault).
    """

    def __init__(self, part: str = "request head") -> None:
        super().__init__("bare LF as line terminator")
        self.part = part
        self.code = 400

    def __str__(self) -> str:
        return f"a line of the {self.part} ends with a bare LF: every line must end with CRLF (RFC 9112 section 2.2)"


class ChunkSizeLineTooLong(InvalidChunkSize):
    """A chunk-size line, with its extensions, longer than gunicorn's limit on one (``limit_request_field_size``):
    400 at once. Handed to the parser, it was refused or taken depending on how much of it one read brought
    (a 60,000-byte extension that arrived with its CRLF was served, a 200,000-byte one refused)."""

    def __init__(self, limit: int) -> None:
        super().__init__(b"")
        self.limit = limit

    def __str__(self) -> str:
        return f"a chunk-size line of the chunked body, with its extensions, is longer than {self.limit} bytes"


class EmptyRequestLine(InvalidHeader):
    """A second empty line before the request line: 400 at once, as gunicorn's parser, which skips only one, refuses
    it (it reads the empty line as the request line). An ``InvalidHeader`` for its sentence, as ``BareLineFeed``."""

    def __init__(self) -> None:
        super().__init__("")
        self.code = 400

    def __str__(self) -> str:
        return "the request line is empty: at most one empty line (CRLF) may come before it (RFC 9112 section 2.2)"


def missing_host(version: tuple[int, int], headers: list[tuple[str, str]]) -> bool:
    """Whether a request gunicorn parsed (not read on the loop: TLS, HTTP/2) is HTTP/1.1 to 1.9 without a Host
    field."""
    return (1, 1) <= version < (2, 0) and not any(name == "HOST" for name, _ in headers)


def http_1_1_or_later(head: bytes) -> bool:
    """Whether the request line of ``head`` ends with HTTP/1.1 to HTTP/1.9: HTTP/1.1's rules apply to it.

    gunicorn's parser takes 1.2 to 1.9 (and they are answered in HTTP/1.1): a
    request of one of them must have a Host field, as HTTP/1.1 (RFC 9112 section
    3.2), and may send a chunked body or ``Expect: 100-continue``.
    """
    line = head[: head.find(b"\r\n")]
    return line[-9:-1] == b" HTTP/1." and 0x31 <= line[-1] <= 0x39


class _Pending:
    __slots__ = (
        "deadline", "buffer", "length", "searched", "closed", "broken", "expects", "chunk", "decoded", "framing",
        "limit", "refusal", "exceeds", "overframed", "body", "last", "began",
    )  # fmt: skip

    def __init__(self, began: float, deadline: float, buffered: bytes) -> None:
        self.began = began  # when it began to arrive (the connection's start, for its first request)
        self.deadline = deadline
        self.buffer = bytearray(buffered)
        self.length: int | None = None  # bytes the request takes here, once its head is parsed
        self.searched = 0  # the end of the head is not before this offset
        self.closed = False  # the client closed its end, or the connection broke
        self.broken = False  # the connection cannot be answered (100 Continue could not be sent): drop it
        self.expects = False  # Expect: 100-continue was dealt with here: the thread's parser must not answer it
        self.chunk = -1  # of a chunked body being read: the offset of its next chunk-size line
        self.body = -1  # of a chunked body: the offset of its data, decoded (its head comes before)
        self.decoded = 0  # of a chunked body: its bytes so far, decoded at ``body``; the framing read follows them
        self.last = -1  # of a chunked body: the offset of its last chunk's line, once it has come
        self.framing = 0  # of a chunked body: the bytes of its chunk-size lines (extensions included) and CRLFs so far
        self.limit = 0  # of a chunked body: the most bytes its route takes
        self.refusal: Exception | None = None  # why the request is refused from here (too large a head)
        self.exceeds = 0  # of a chunked body read here past its limit: that limit (0: none passed)
        self.overframed = False  # that chunked body passed it with its framing, not its data


class RequestReader:
    """Connections waiting on the poller for a whole request; used by the event loop's thread only."""

    def __init__(
        self,
        cfg: object,
        poller: selectors.BaseSelector,
        *,
        ready: Callable[[Connection], None],
        drop: Callable[[Connection], None],
        refuse: Callable[[Connection, Exception], None],
        timeout: float = REQUEST_TIMEOUT_S,
        limits: BodyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._limits = limits or BodyLimits()
        self._chunk_line = (getattr(cfg, "limit_request_field_size", 0) or DEFAULT_CHUNK_LINE_LIMIT) + 2
        self._line_limit = request_line_limit(getattr(cfg, "limit_request_line", MAX_REQUEST_LINE))
        self._poller = poller
        self._ready = ready  # the request is buffered: serve it on a thread
        self._drop = drop  # closed by the client, broken, or too slow: forget it
        self._refuse = refuse  # answer gunicorn's error for it (LimitRequestHeaders or LimitRequestLine), then close
        self._timeout = timeout
        self._clock = clock
        self._pending: dict[Connection, _Pending] = {}  # insertion order is deadline order

    def __len__(self) -> int:
        return len(self._pending)

    def buffered(self) -> int:
        """The bytes held for the requests waiting: heads, bodies (chunked ones decoded) and what follows them."""
        return sum(len(pending.buffer) for pending in self._pending.values())

    def add(self, conn: Connection, buffered: bytes = b"") -> None:
        """Wait for ``conn``'s next request; ``buffered`` holds bytes of it already read."""
        now = self._clock()
        pending = _Pending(now, now + self._timeout, buffered)
        if conn.sock.getblocking():  # it is not, once gthread has put it on the poller: no system call
            conn.sock.setblocking(False)
        # A kept-alive connection comes here because it is readable: its request is usually
        # there already, and reading it now saves a turn of the poller and two (un)registrations.
        self._pending[conn] = pending
        if self._complete(conn, pending) or self._receive(conn, pending):
            del self._pending[conn]
            self._finish(conn, pending)
        elif pending.closed:  # the client stopped sending before its request was complete
            self._give_up(conn, pending)
        else:
            self._poller.register(conn.sock, selectors.EVENT_READ, lambda sock: self._readable(conn))

    def expire(self) -> None:
        """Give up on the requests whose deadline has passed, after reading what has arrived of them.

        The bytes that came since the poller's last look (a request sent just
        as its deadline passed, on a connection idle until then) are read
        first: a request whole by now is served, not closed unread under
        its client, which a close with bytes unread resets.
        """
        now = self._clock()
        while self._pending:
            conn, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                break
            if not pending.closed and self._receive(conn, pending):
                self._forget(conn)
                self._finish(conn, pending)
                continue
            self._give_up(conn, pending)

    def bring_deadlines_forward(self, deadline: float) -> None:
        """Give every waiting request until ``deadline`` at most (a stopping worker)."""
        for pending in self._pending.values():
            pending.deadline = min(pending.deadline, deadline)

    def drop_oldest(self) -> None:
        """Drop the connection that has waited longest for its request (to make room for another)."""
        conn = next(iter(self._pending))
        self._forget(conn)
        self._drop(conn)

    def drop_all(self) -> None:
        while self._pending:
            self.drop_oldest()

    def _readable(self, conn: Connection) -> None:
        pending = self._pending[conn]
        if self._receive(conn, pending):
            self._forget(conn)
            self._finish(conn, pending)
        elif pending.closed:  # the client stopped sending before its request was complete
            self._give_up(conn, pending)

    def _receive(self, conn: Connection, pending: _Pending) -> bool:
        """Read what the socket holds; whether the request is now complete."""
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            pending.closed = True
            return False
        pending.buffer += data
        return self._complete(conn, pending)

    def _complete(self, conn: Connection, pending: _Pending) -> bool:
        if pending.length is None:
            # The empty line gunicorn's parser skips before the request line (RFC 9112 section 2.2): the head
            # starts after it, else its request line would be taken for a field and every check below missed.
            start = len(_EMPTY_LINE) if pending.buffer.startswith(_EMPTY_LINE) else 0
            if start and pending.buffer.startswith(_EMPTY_LINE, start):
                pending.refusal = EmptyRequestLine()  # a second one: the parser takes it for the request line
                return True
            end = pending.buffer.find(_END_OF_HEAD, max(pending.searched, start))
            if _bare_lf(pending.buffer, pending.searched, len(pending.buffer) if end < 0 else end):
                pending.refusal = BareLineFeed()
                return True
            if end < 0 or end + len(_END_OF_HEAD) > MAX_PREREAD_HEAD:  # the empty line counts against the limit
                pending.searched = max(0, len(pending.buffer) - len(_END_OF_HEAD) + 1)
                if len(pending.buffer) <= MAX_PREREAD_HEAD:
                    return False
                pending.refusal = _head_too_large(pending.buffer, start, line_limit=self._line_limit)
                return True
            head = bytes(pending.buffer[start : end + len(_END_OF_HEAD)])
            framing = read_framing(head, self._limits)
            pending.length = start + framing.length
            if framing.refusal is not None:
                pending.refusal = framing.refusal
                return True
            if framing.expects:
                pending.expects = True
                if not framing.refused and not _send_continue(conn.sock):
                    pending.closed = pending.broken = True  # it does not read what it is sent
                    return False
            if framing.chunked:
                pending.chunk = pending.body = start + len(head)
                pending.limit = self._limits.of(head)
        if pending.chunk >= 0:
            return _chunks_complete(pending, self._chunk_line)
        return len(pending.buffer) >= pending.length

    def _give_up(self, conn: Connection, pending: _Pending) -> None:
        """A request that will not be complete: answered if its head is whole, else dropped.

        With its head whole, a thread serves it: its body ends where the
        client stopped, and the application answers that it is short.
        """
        self._forget(conn)
        if pending.length is None or pending.broken:
            self._drop(conn)
        else:
            self._hand_over(conn, pending)

    def _forget(self, conn: Connection) -> None:
        del self._pending[conn]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poller.unregister(conn.sock)

    def _finish(self, conn: Connection, pending: _Pending) -> None:
        """The request is here (or as much of it as will be read): a thread serves it, or it is refused."""
        if pending.refusal is None:
            self._hand_over(conn, pending)
        else:
            self._refuse(conn, pending.refusal)

    def _hand_over(self, conn: Connection, pending: _Pending) -> None:
        if conn.parser is None:
            conn.parser = get_parser(self._cfg, conn.sock, conn.client)
        if pending.body >= 0:
            _reframe(pending)
        # The unreader copies it: a bytes() copy first would double the peak of a large body.
        conn.parser.unreader.unread(pending.buffer)  # type: ignore[attr-defined]
        if not isinstance(conn.parser.unreader.sock, ReadDeadline):  # type: ignore[attr-defined]
            conn.parser.unreader.sock = ReadDeadline(conn)  # type: ignore[attr-defined]
        conn.read_deadline = pending.deadline
        conn.request_began = pending.began  # type: ignore[attr-defined]  # the access line's duration counts from it
        conn.read_expired = False
        conn.continue_answered = pending.expects  # type: ignore[attr-defined]  # read by the worker's handle_request
        conn.body_exceeds = pending.exceeds  # type: ignore[attr-defined]  # read by the application (body_exceeds)
        conn.body_overframed = pending.overframed  # type: ignore[attr-defined]  # and this (body_overframed)
        conn.data_ready = True  # gthread would otherwise wait for data first
        self._ready(conn)


def read_framing(head: bytes, limits: BodyLimits) -> Framing:
    """What to read of the request whose head is ``head`` (ending with its blank line), within ``limits``.

    A body of known length or a chunked one is read up to its route's limit.
    Parsing the head with gunicorn's parser here as well would cost a second
    full parse per request: only the framing is looked at, and the parser,
    which alone decides what the request is, refuses what it refuses.
    A body the application would refuse from the head alone (longer than
    the limit, without the token, or sent by a page of another origin) is
    not read, and with ``Expect: 100-continue`` (HTTP/1.1) not asked for,
    nor one with a content coding
    (``Content-Encoding: gzip``: 415) that the client waits to be asked for.
    A framing gunicorn's parser refuses, or one not followed here, is left
    to the parser with the head alone.
    """
    lowered = head.lower()
    # A repeated Host is refused by the parser; a missing one is not. HTTP/1.0 requests may omit it.
    if b"\r\nhost:" not in lowered and http_1_1_or_later(head) and not _SPACED_HOST.search(lowered):
        return Framing(len(head), refusal=MissingHost())
    folded = b"\n " in head or b"\n\t" in head
    if not folded and b"\r\ntransfer-encoding" not in lowered and b"\r\nexpect" not in lowered:
        # The plain framing: most requests.
        length = _content_length(head, lowered)
        if not length:
            return Framing(len(head))
        if (
            length <= limits.of(head)
            and (not limits.token or limits.authorized(next(iter(_values(head, lowered, b"authorization")), None)))
            and not _from_foreign_page(head, lambda name: _values(head, lowered, name))
        ):
            return Framing(len(head) + length)
        return Framing(len(head), refused=True)
    if folded:
        return Framing(len(head))  # refused by the parser
    fields = _fields(head)
    if fields is None:
        return Framing(len(head))
    version_ok = http_1_1_or_later(head)  # 1.2 to 1.9 too: the parser takes their chunked bodies and 100-continue
    expect = fields.get(b"expect", [])
    # The parser answers 417 to any field other than 100-continue, but takes a repeated 100-continue
    # as one: such a body is read here too, or a slow client would hold a request thread.
    if any(value.lower() != b"100-continue" for value in expect):
        return Framing(len(head))  # refused by the parser (417)
    expects = bool(expect) and version_ok
    codings = [
        value.strip(b" \t").lower() for line in fields.get(b"transfer-encoding", []) for value in line.split(b",")
    ]
    lengths = fields.get(b"content-length", [])
    limit = limits.of(head)
    # A body without the token is not read: the application refuses it from its head, so an unknown
    # client cannot make the loop buffer up to a route's limit on each of its connections.
    refused = not limits.authorized(next(iter(fields.get(b"authorization", [])), None))
    refused = refused or _from_foreign_page(head, lambda name: fields.get(name, []))
    # Nor, when the client waits for 100 Continue, one with a content coding: the application answers 415
    # from the head (service/api.read_body: the coding is checked, as there, on the fields joined).
    coding = b",".join(fields.get(b"content-encoding", [])).strip(b" \t").lower()
    refused = refused or (expects and coding not in (b"", b"identity"))
    if codings:
        if lengths or codings[-1] != b"chunked" or codings.count(b"chunked") != 1 or not version_ok:
            return Framing(len(head))  # refused by the parser, or not read by it
        if len(codings) > 1:
            # gunicorn's parser takes "gzip, chunked" and would hand the application a body still
            # gzipped, read from the socket on a request thread: refused here instead, unread.
            return Framing(len(head), refusal=UnsupportedCoding(b", ".join(codings[:-1]).decode("latin-1")))
        return Framing(len(head), chunked=not refused, expects=expects, refused=refused)
    length = _length(lengths[0]) if len(lengths) == 1 else 0
    if len(lengths) > 1 or length is None:
        return Framing(len(head))  # refused by the parser, or past any limit: refused from the head
    if not length and not expects:
        return Framing(len(head))
    if refused or length > limit:
        return Framing(len(head), expects=expects, refused=True)
    return Framing(len(head) + length, expects=expects)


def _from_foreign_page(head: bytes, values: Callable[[bytes], list[bytes]]) -> bool:
    """Whether the application refuses the request ``head`` (403) as sent by a page of another origin
    (``service.cross_site``), from the values of its fields (``values(name)``): then its body is not read."""
    if head[: head.find(b" ")].decode("latin-1") in SAFE_METHODS:
        return False
    sites = values(b"sec-fetch-site")
    origins = [] if sites else values(b"origin")
    if not sites and not origins:
        return False
    # A repeated field reaches the application as its values joined with commas, under either server.
    return from_foreign_page(
        _joined(sites), _joined(origins), _joined(values(b"host") + values(b"x-forwarded-host")) or ""
    )


def _joined(values: list[bytes]) -> str | None:
    return b",".join(values).decode("latin-1") if values else None


def _values(head: bytes, lowered: bytes, name: bytes) -> list[bytes]:
    """The values of the field ``name`` (lowercase) in a plain (unfolded) ``head``, in order."""
    values, line = [], b"\r\n" + name + b":"
    start = lowered.find(line)
    while start >= 0:
        start += len(line)
        values.append(head[start : head.find(b"\r\n", start)].strip(b" \t"))
        start = lowered.find(line, start)
    return values


def _content_length(head: bytes, lowered: bytes) -> int | None:
    """The body length of a plain head; None with no length, or with one the parser refuses (then not read)."""
    # Not _values: every request asks this, and most heads, without the field, take one find here.
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0 or lowered.find(b"\r\ncontent-length:", start + 1) >= 0:
        return None  # no body, or two lengths: the parser refuses them
    start += len(b"\r\ncontent-length:")
    return _length(head[start : head.index(b"\r\n", start)].strip(b" \t"))


def _length(value: bytes) -> int | None:
    """A Content-Length value's number; None if the parser refuses it, or if it has more than 12 digits.

    Leading zeros are valid (RFC 9110 section 8.6) and taken by the parser: they do not count, or a
    client could make a request thread wait for its slow body by writing ``0000000000013``. A
    length of 13 digits or more is past any limit: the application refuses it from the head.
    """
    if not value.isdigit():  # bytes.isdigit() is ASCII digits only
        return None
    digits = value.lstrip(b"0")
    return int(digits or b"0") if len(digits) <= 12 else None  # int() refuses more than 4300 digits


def _fields(head: bytes) -> dict[bytes, list[bytes]] | None:
    """The header fields of ``head``, by lowercase name; None for a line that is not a field."""
    fields: dict[bytes, list[bytes]] = {}
    for line in head.split(b"\r\n")[1:-2]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip(b" \t"):
            return None
        fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return fields


def _send_continue(sock: socket.socket) -> bool:
    """Send ``100 Continue`` without waiting; whether it went whole (else the client does not read)."""
    try:
        return sock.send(_CONTINUE) == len(_CONTINUE)
    except OSError:
        return False


# Framing (chunk-size lines and CRLFs) a chunked body may send per byte of its data, beyond its
# limit: a chunk of one byte takes 5 ("1\r\n", "\r\n"), so 8 leaves room for short extensions.
_FRAMING_PER_BYTE = 8


def _chunks_complete(pending: _Pending, max_line: int) -> bool:
    """Follow a chunked body through what has arrived, decoding it; whether it is complete, or as much as will be read.

    Each whole chunk's data is moved up to the data before it, over its
    framing, and what has been walked through is dropped: the buffer holds
    the head, the data decoded so far and what follows it not yet decoded
    (one chunk begun, at most, and what the last read brought). Kept raw, a
    body of one-byte chunks took up to 9 times its limit on the loop (36 MiB
    for a batch's 4 MiB, 213 MB of the worker's memory once the thread's parser
    had decoded it again), and as much more for each such connection.

    It is complete after its last chunk and trailer section, and refused
    (``pending.refusal``) with a trailer section over ``MAX_PREREAD_HEAD`` or
    a chunk-size line over ``max_line`` (with its CRLF).
    Reading stops early, and the thread takes over, when the body has passed
    its limit (``pending.exceeds``: the application refuses it without reading
    it, see ``body_exceeds``) or its framing is malformed (the parser refuses
    it from the buffer). The framing counts too: its chunk-size lines, with
    their extensions, and CRLFs may take as many bytes as the limit plus
    ``_FRAMING_PER_BYTE`` per byte of data, and past that the body is refused
    as too large. Only the decoded bytes were counted, so chunks of one byte
    behind 8 KB of extension each made the loop read 8 KB per byte of the
    limit: 400 MB on a single connection for POST /enqueue's 64 KiB. A budget
    of the limit alone refused valid bodies of small chunks (a JSON encoder
    writing token by token: 5 bytes of framing per chunk of 1 to 10 bytes);
    a chunk of one byte takes 5 bytes of framing at least, so the allowance
    per byte serves any such client and still bounds what is read.
    """
    buffer = pending.buffer
    at = pending.chunk
    while True:
        if pending.last >= 0:  # after the last chunk: the trailer section, ending with a blank line
            if buffer[at : at + 2] == b"\r\n":
                _with_length(pending, at + 2)
                return True
            found = buffer.find(_END_OF_HEAD, at)
            if _bare_lf(buffer, at, len(buffer) if found < 0 else found):
                return _refuse_bare_lf(pending)
            if found < 0 or found + len(_END_OF_HEAD) - at > MAX_PREREAD_HEAD:
                pending.chunk = at
                if len(buffer) - at <= MAX_PREREAD_HEAD:
                    return False
                too_large = f"the trailer section is longer than {MAX_PREREAD_HEAD} bytes"
                pending.refusal = LimitRequestHeaders(too_large)
                return True
            # Handed over chunked (its data as one chunk), trailer fields and all: the parser checks them.
            pending.length, pending.chunk = found + len(_END_OF_HEAD), -1
            return True
        line_end = buffer.find(b"\r\n", at, at + max_line)
        # An LF first is bare: the byte before it may be decoded data, a CR that did not end a line.
        if buffer.startswith(b"\n", at) or _bare_lf(
            buffer, at, min(len(buffer), at + max_line) if line_end < 0 else line_end
        ):
            return _refuse_bare_lf(pending)
        if line_end < 0:
            _compact(pending, at)
            if len(buffer) - pending.chunk < max_line:
                return False
            pending.refusal = ChunkSizeLineTooLong(max_line - 2)
            pending.chunk = -1
            return True
        # The body is handed over decoded: a line the parser refuses (its size, or extension) is handed to it as sent.
        size_text, extended, extension = buffer[at:line_end].partition(b";")
        if extended:  # whitespace may come before an extension only (RFC 9112 section 7.1.1), as the parser says
            size_text = size_text.rstrip(b" \t")
        if not size_text or not _HEX.issuperset(size_text):
            return _stop_reading(pending, at)
        # Any number of leading zeros is valid (RFC 9112 section 7.1): the size is read here whatever its
        # length, as handing it over made a thread wait for the body until the deadline.
        if extended and not CHUNK_EXT_RE.fullmatch(b";" + extension):
            return _stop_reading(pending, at)
        size = int(size_text, 16)
        if size == 0:
            _compact(pending, at)  # the last chunk's line now follows the data
            pending.last = pending.chunk
            at = pending.chunk + line_end + 2 - at
            continue
        data_end = line_end + 2 + size
        overframed = (
            pending.framing + line_end + 4 - at  # its size line and both CRLFs
            > pending.limit + _FRAMING_PER_BYTE * min(pending.decoded + size, pending.limit)
        )
        # A chunk declared past the limit makes the body too long as soon as its size line is in: waiting
        # for its data held the connection until the deadline and answered 408 for a body never to fit.
        if overframed or pending.decoded + size > pending.limit:
            pending.exceeds = pending.limit  # too long: the application refuses it at once
            pending.overframed = overframed
            return _stop_reading(pending, at)
        if len(buffer) < data_end + 2:
            _compact(pending, at)  # this chunk is read again once more has arrived
            return False
        if buffer[data_end : data_end + 2] != b"\r\n":
            return _stop_reading(pending, at)
        end = pending.body + pending.decoded
        buffer[end : end + size] = buffer[line_end + 2 : data_end]
        pending.decoded += size
        pending.framing += line_end + 4 - at
        at = data_end + 2


def _compact(pending: _Pending, at: int) -> None:
    """Drop the framing walked through, up to ``at``: what is not yet decoded follows the decoded data."""
    end = pending.body + pending.decoded
    if at > end:
        del pending.buffer[end:at]  # moves the bytes after it, what the last read brought at most
    pending.chunk = end


def _with_length(pending: _Pending, end: int) -> None:
    """Make the decoded body, whose last chunk and empty trailer section end at ``end``, one of known length.

    Its head says ``Content-Length`` instead of ``Transfer-Encoding: chunked``
    (RFC 9112 section 7.1.3): the thread's parser reads the body as it is,
    and does not decode it a second time. What follows (a pipelined request)
    stays after it.
    """
    buffer = pending.buffer
    del buffer[pending.body + pending.decoded : end]  # the last chunk's line and the blank line
    head = bytes(buffer[: pending.body])
    # The only Transfer-Encoding field (read_framing reads only one coding, chunked, and no Content-Length).
    field = head.lower().find(b"\r\ntransfer-encoding:")
    rest = head.find(b"\r\n", field + 2)
    head = head[:field] + head[rest:-4] + b"\r\nContent-Length: %d\r\n\r\n" % pending.decoded
    buffer[: pending.body] = head  # shorter, usually: the data is not moved
    pending.length, pending.chunk, pending.body = len(head) + pending.decoded, -1, -1


def _reframe(pending: _Pending) -> None:
    """Make a chunked body handed over as it is (unfinished, too long, its framing malformed or with trailer fields)
    chunked again: its decoded data one chunk, followed by what was not decoded, for the thread's parser."""
    if pending.decoded:
        buffer = pending.buffer
        end = pending.body + pending.decoded
        buffer[end:end] = b"\r\n"
        buffer[pending.body : pending.body] = b"%x\r\n" % pending.decoded
    pending.body = -1


def _bare_lf(buffer: bytearray, start: int, stop: int) -> bool:
    """Whether an LF in ``buffer[start:stop]`` is not preceded by a CR."""
    at = buffer.find(b"\n", start, stop)
    while at >= 0:
        if at == 0 or buffer[at - 1] != 0x0D:
            return True
        at = buffer.find(b"\n", at + 1, stop)
    return False


def request_line_limit(limit_request_line: int) -> int:
    """The longest request line gunicorn's parser takes with ``limit_request_line`` (as gunicorn.http.message reads
    it: past MAX_REQUEST_LINE or negative, that; 0, none of its own, so the loop's ``MAX_PREREAD_HEAD``)."""
    if limit_request_line < 0 or limit_request_line >= MAX_REQUEST_LINE:
        return MAX_REQUEST_LINE
    return limit_request_line or MAX_PREREAD_HEAD


def request_line_too_long(limit: int) -> LimitRequestLine:
    """The 414 of a request line over ``limit`` bytes, worded alike by both servers, whatever found it."""
    return LimitRequestLine(f"the request line is longer than {limit} bytes")


def _head_too_large(buffer: bytearray, start: int = 0, *, line_limit: int = MAX_REQUEST_LINE) -> Exception:
    """gunicorn's error for a head past ``MAX_PREREAD_HEAD`` (from ``start``, after the empty line before it, which
    counts against it): its request line alone (414, naming the limit the parser would have applied: ``line_limit``,
    not the loop's cut-off), else its fields (431)."""
    if buffer.find(b"\r\n", start, MAX_PREREAD_HEAD + 1) < 0:
        return request_line_too_long(line_limit)
    return LimitRequestHeaders(f"the request head is longer than {MAX_PREREAD_HEAD} bytes")


def _refuse_bare_lf(pending: _Pending) -> bool:
    # Lines of the framing end with CRLF too: one ended by a bare LF would be waited for until the deadline.
    pending.refusal = BareLineFeed("chunked body's framing (a chunk-size line or the trailer section)")
    pending.chunk = -1
    return True


def _stop_reading(pending: _Pending, at: int) -> bool:
    _compact(pending, at)
    pending.length, pending.chunk = len(pending.buffer), -1
    return True


class ReadDeadline:
    """The socket a request thread's parser reads from: at ``conn.read_deadline`` the stream ends.

    The connection is then marked ``read_expired``: where its request ended
    is unknown, so it must not serve another one. Reads wait at most ``READ_SLICE_S`` at a time, so a deadline brought
    forward (by a stopping worker) takes effect promptly.
    """

    def __init__(self, conn: Connection, clock: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self._clock = clock

    @property
    def expired(self) -> bool:
        """Whether the stream ended at the deadline (not at the client's end of it)."""
        return self._conn.read_expired

    @property
    def body_exceeds(self) -> int:
        """The limit the request's chunked body passed while it was read on the event loop (0: none)."""
        return getattr(self._conn, "body_exceeds", 0)

    @property
    def body_overframed(self) -> bool:
        """Whether the body passed its limit with its chunked framing (``body_overframed``)."""
        return getattr(self._conn, "body_overframed", False)

    def recv(self, size: int) -> bytes:
        sock = self._conn.sock
        while (remaining := self._conn.read_deadline - self._clock()) > 0:
            sock.settimeout(min(remaining, READ_SLICE_S))
            try:
                return sock.recv(size)
            except TimeoutError:
                continue
            finally:
                sock.settimeout(None)
        self._conn.read_expired = True
        return b""


def body_timed_out(stream: object) -> bool:
    """Whether ``stream`` (``wsgi.input``) ended because the request's deadline passed.

    False when it ended at the client's end, and for a stream of neither
    gunicorn (read through ``ReadDeadline``) nor ``python app.py``.
    """
    raw = getattr(getattr(stream, "_rfile", stream), "raw", None)  # service/dev_server.py's (chunked: werkzeug's
    if getattr(raw, "expired", False):  # DechunkedInput reads it as _rfile)
        return True
    sock = _read_deadline(stream)
    return sock is not None and sock.expired


def body_exceeds(stream: object) -> int:
    """The limit ``stream``'s (``wsgi.input``'s) body was found longer than on the event loop; 0 if none.

    A chunked body is read on the loop only until it passes its route's
    limit: the rest is not there for a thread to read, and the application
    refuses the body from this alone (413), as one announced longer.
    """
    sock = _read_deadline(stream)
    return 0 if sock is None else sock.body_exceeds


def body_overframed(stream: object) -> bool:
    """Whether the chunked body ``body_exceeds`` refuses passed its limit with its framing, not its data.

    Its chunk-size lines (with their extensions) and CRLFs took more than
    the limit plus ``_FRAMING_PER_BYTE`` per byte of data: the body itself
    may be short, and a 413 saying that it is longer than the limit would be false.
    """
    sock = _read_deadline(stream)
    return sock is not None and sock.body_overframed


def _read_deadline(stream: object) -> ReadDeadline | None:
    """The ``ReadDeadline`` a gunicorn request's ``wsgi.input`` reads from, if any."""
    reader = getattr(stream, "reader", None)
    unreader = getattr(reader, "unreader", None) or getattr(getattr(reader, "req", None), "unreader", None)
    sock = getattr(unreader, "sock", None)
    return sock if isinstance(sock, ReadDeadline) else None
