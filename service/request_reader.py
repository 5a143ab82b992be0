"""Read each request on the event loop before a thread serves it, within a deadline.

gunicorn's gthread worker hands a connection to one of its few request
threads as soon as it is readable; the thread then blocks until the whole
request head has arrived, for as long as the client takes. A handful of
clients sending a few bytes at a time hold every thread and nothing else is
answered. ``RequestReader`` collects the head (and a body of known, small
length) from the worker's poller without blocking, and hands the connection
over only once the request is there, so slow clients cost a buffer, not a
thread. A request not complete ``timeout`` seconds after it began is given
up: dropped if its head is not whole, else served with the body it has.

What a thread still reads from the socket (a chunked or large body, a body
sent after ``100 Continue``) goes through ``ReadDeadline``, which ends the
stream at the same deadline: the application then sees a body shorter than
announced.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from typing import Protocol

from gunicorn.http import get_parser

REQUEST_TIMEOUT_S = 10.0  # to send a whole request (head and body), from its first byte or the connection's start
MAX_PREREAD_HEAD = 65536  # larger heads go to a thread, whose parser refuses them
MAX_PREREAD_BODY = 1 << 20  # larger bodies are read by the thread, within the same deadline
READ_SLICE_S = 1.0  # a thread notices a deadline brought forward within this time
_END_OF_HEAD = b"\r\n\r\n"


class Connection(Protocol):
    """The parts of gunicorn's ``gthread.TConn`` used here."""

    sock: socket.socket
    client: object
    parser: object | None
    data_ready: bool
    read_deadline: float
    read_expired: bool


class _Pending:
    __slots__ = ("deadline", "buffer", "length", "searched", "closed")

    def __init__(self, deadline: float, buffered: bytes) -> None:
        self.deadline = deadline
        self.buffer = bytearray(buffered)
        self.length: int | None = None  # bytes the request takes here, once its head is parsed
        self.searched = 0  # the end of the head is not before this offset
        self.closed = False  # the client closed its end, or the connection broke


class RequestReader:
    """Connections waiting on the poller for a whole request; used by the event loop's thread only."""

    def __init__(
        self,
        cfg: object,
        poller: selectors.BaseSelector,
        *,
        ready: Callable[[Connection], None],
        drop: Callable[[Connection], None],
        timeout: float = REQUEST_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cfg = cfg
        self._poller = poller
        self._ready = ready  # the request is buffered: serve it on a thread
        self._drop = drop  # closed by the client, broken, or too slow: forget it
        self._timeout = timeout
        self._clock = clock
        self._pending: dict[Connection, _Pending] = {}  # insertion order is deadline order

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, conn: Connection, buffered: bytes = b"") -> None:
        """Wait for ``conn``'s next request; ``buffered`` holds bytes of it already read."""
        pending = _Pending(self._clock() + self._timeout, buffered)
        if conn.sock.getblocking():  # it is not, once gthread has put it on the poller: no system call
            conn.sock.setblocking(False)
        # A kept-alive connection comes here because it is readable: its request is usually
        # there already, and reading it now saves a turn of the poller and two (un)registrations.
        self._pending[conn] = pending
        if self._complete(pending) or self._receive(conn, pending):
            del self._pending[conn]
            self._hand_over(conn, pending)
        elif pending.closed:  # the client stopped sending before its request was complete
            self._give_up(conn, pending)
        else:
            self._poller.register(conn.sock, selectors.EVENT_READ, lambda sock: self._readable(conn))

    def expire(self) -> None:
        """Give up on the requests whose deadline has passed."""
        now = self._clock()
        while self._pending:
            conn, pending = next(iter(self._pending.items()))
            if pending.deadline > now:
                break
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
            self._hand_over(conn, pending)
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
        return self._complete(pending)

    @staticmethod
    def _complete(pending: _Pending) -> bool:
        if pending.length is None:
            end = pending.buffer.find(_END_OF_HEAD, pending.searched)
            if end < 0:
                pending.searched = max(0, len(pending.buffer) - len(_END_OF_HEAD) + 1)
                return len(pending.buffer) > MAX_PREREAD_HEAD
            pending.length = request_length(bytes(pending.buffer[: end + len(_END_OF_HEAD)]))
        return len(pending.buffer) >= pending.length

    def _give_up(self, conn: Connection, pending: _Pending) -> None:
        """A request that will not be complete: answered if its head is whole, else dropped.

        With its head whole, a thread serves it: its body ends where the
        client stopped, and the application answers that it is short.
        """
        self._forget(conn)
        if pending.length is None:
            self._drop(conn)
        else:
            self._hand_over(conn, pending)

    def _forget(self, conn: Connection) -> None:
        del self._pending[conn]
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._poller.unregister(conn.sock)

    def _hand_over(self, conn: Connection, pending: _Pending) -> None:
        if conn.parser is None:
            conn.parser = get_parser(self._cfg, conn.sock, conn.client)
        conn.parser.unreader.unread(bytes(pending.buffer))  # type: ignore[attr-defined]
        if not isinstance(conn.parser.unreader.sock, ReadDeadline):  # type: ignore[attr-defined]
            conn.parser.unreader.sock = ReadDeadline(conn)  # type: ignore[attr-defined]
        conn.read_deadline = pending.deadline
        conn.read_expired = False
        conn.data_ready = True  # gthread would otherwise wait for data first
        self._ready(conn)


def request_length(head: bytes) -> int:
    """How many bytes to read before a thread takes over: the head, and the body if small and of known length.

    ``head`` ends with its blank line. Only the plain framing counts here: one
    ``Content-Length`` of digits, no ``Transfer-Encoding``, no ``Expect``, no
    folded header line. Anything else is handed over with the head alone,
    and the thread's parser (gunicorn's, which alone decides what the request
    is) reads or refuses the rest within the same deadline. Parsing the head
    here with gunicorn's parser as well cost a second full parse per request.
    """
    lowered = head.lower()
    if b"\r\ntransfer-encoding" in lowered or b"\r\nexpect" in lowered or b"\n " in head or b"\n\t" in head:
        return len(head)
    start = lowered.find(b"\r\ncontent-length:")
    if start < 0 or lowered.find(b"\r\ncontent-length:", start + 1) >= 0:
        return len(head)  # no body, or two lengths: the parser refuses them
    start += len(b"\r\ncontent-length:")
    value = head[start : head.index(b"\r\n", start)].strip(b" \t")
    if not (value.isdigit() and len(value) <= 8):  # bytes.isdigit() is ASCII digits only
        return len(head)
    length = int(value)
    return len(head) + length if length <= MAX_PREREAD_BODY else len(head)


class ReadDeadline:
    """The socket a request thread's parser reads from: at ``conn.read_deadline`` the stream ends.

    The connection is then marked ``read_expired``: where its request ended
    is unknown, so it must not serve another one. Reads wait at most ``READ_SLICE_S`` at a time, so a deadline brought
    forward (by a stopping worker) takes effect promptly.
    """

    def __init__(self, conn: Connection, clock: Callable[[], float] = time.monotonic) -> None:
        self._conn = conn
        self._clock = clock

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
