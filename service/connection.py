"""What a response does to its connection: close it after an unread body; give up on a client that stops reading.

A request refused before its body is read (401, 413, an unknown route) leaves
the body on the socket. gunicorn drains at most 64 KiB of it before reusing
the connection and closes the connection when more is left, after having
announced ``Connection: keep-alive``: a client that pooled the connection loses
its next request on it (and clients do not retry a POST). Such a response says
``Connection: close`` instead, so the client opens a new connection.

This is WSGI middleware rather than a Flask ``after_request`` hook: it runs on
every response, errors included, and costs one call instead of Flask's hook
machinery on each request.

A client that asks for a large response and then stops reading would hold
the request thread writing it for ever (a blocking ``sendall`` has no
deadline): ``SendDeadline`` gives up once the client has taken nothing for
a given time, as nginx's ``send_timeout`` does, so a slow reader that keeps
reading is served however long the whole response takes. Once the worker
stops (``StopGrace``), a client that takes nothing for the stop's grace is
given up on instead, so that it cannot hold the exit back for that timeout.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask, request

_BODY_READ = "workerpool.body_read"  # environ key set once the whole body has been read

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def mark_body_read(environ: dict[str, Any] | None = None) -> None:
    """Record that the current request's body (or the one of ``environ``) was read to its end."""
    (request.environ if environ is None else environ)[_BODY_READ] = True


def init_app(app: Flask) -> None:
    app.wsgi_app = close_if_body_unread(app.wsgi_app)  # type: ignore[method-assign]  # Flask's middleware slot


def close_if_body_unread(app: WSGIApp) -> WSGIApp:
    """Wrap ``app``: ``Connection: close`` on a response to a request whose body was not read.

    gunicorn drops the hop-by-hop headers an application sets, and says
    ``close`` only when its own response object is told to close: that is
    done here too, for this header and for one the application sets itself.
    """

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            close = not environ.get(_BODY_READ) and _has_body(environ)
            if close:
                headers.append(("Connection", "close"))
            else:
                close = any(name.lower() == "connection" and value.lower() == "close" for name, value in headers)
            if close:
                force_close = getattr(getattr(start_response, "__self__", None), "force_close", None)
                if force_close is not None:  # gunicorn's response object
                    force_close()
            return start_response(status, headers, exc_info)

        return app(environ, start)

    return wrapped


def _has_body(environ: dict[str, Any]) -> bool:
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) > 0
    except ValueError:  # not a length: the server refused the request before it got here
        return False


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


# A held response head is sent with the body's first bytes only up to this size (larger: not copied).
MAX_JOINED_BYTES = 65536
# While a write waits for the client to take something, how often it looks whether the worker began to stop.
STOP_CHECK_S = 0.25


class StopGrace:
    """How long a client that takes nothing of its response is still waited for once the worker stops.

    ``began`` is set once, on the worker's main loop, when it begins to stop;
    request threads read it while they wait to write. A wait that began before
    the stop gets ``grace`` from the stop, one that begins later ``grace``
    from its start; the write deadline stays the bound when it comes first.
    """

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.began: float | None = None  # monotonic time of the stop; None while the worker serves

    def begin(self, now: float) -> None:
        if self.began is None:
            self.began = now

    def give_up_at(self, idle_since: float, timeout: float) -> float:
        """When to give up on a client that took nothing since ``idle_since``, with a write deadline ``timeout``."""
        at = idle_since + timeout
        if self.began is None:
            return at
        return min(at, max(idle_since, self.began) + self.grace)

    def cuts(self, idle_since: float, timeout: float) -> bool:
        """Whether the stop ends a wait that began at ``idle_since`` before its ``timeout`` would."""
        return self.give_up_at(idle_since, timeout) < idle_since + timeout


class SendDeadline:
    """A client socket whose writes fail with TimeoutError once the client took nothing for ``timeout`` seconds.

    Stands in for the socket a response is written to: ``sendall`` sends in
    as many ``send`` calls as the client's reading allows, each waiting at
    most ``timeout`` for room (``socket.sendall`` with a timeout would bound
    the whole response instead); ``sendfile`` waits the same way. Reads keep
    the socket's own timeout; everything else is the socket's.

    With ``hold_head``, a first write that is a final response head (not a
    1xx) is held and sent with the next write of body bytes: gunicorn writes
    the head and the body in two system calls (and two TCP segments), always
    back to back. ``flush`` sends a head still held (a response without a
    body); the caller must call it once the response is written. Until then
    ``holds_head`` says that nothing of the response has left, so a response
    that fails can still be replaced by an error answer (``drop_head``).

    With ``stop``, a wait also ends once the worker has stopped and the client
    took nothing for the stop's grace (``cut_by_stop`` then says so): the wait
    looks at the stop every ``STOP_CHECK_S``, since a blocking send cannot be
    told that its timeout became shorter.

    A write that gives up leaves in ``unsent`` how many bytes of the data it
    was given had not left (a held head sent with them not counted), so that
    what a response cut short sent can be told.
    """

    def __init__(
        self,
        sock: socket.socket,
        timeout: float,
        *,
        hold_head: bool = False,
        stop: StopGrace | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sock = sock
        self._timeout = timeout
        self._stop = stop
        self._clock = clock
        self.cut_by_stop = False  # the write was given up because the worker stops, before ``timeout``
        self.unsent = 0  # of the data of the write given up, the bytes that had not left
        self._try_at_once = _DONTWAIT and not isinstance(sock, ssl.SSLSocket)  # TLS sockets take no flags
        self._hold_head = hold_head
        self._head: bytes | None = None  # the response head, held until the body's first bytes

    @property
    def holds_head(self) -> bool:
        """Whether a response head was written and is still held: nothing of the response has left."""
        return self._head is not None

    def drop_head(self) -> None:
        """Forget a held head: its response will not be sent."""
        self._head = None

    def flush(self) -> None:
        """Send the response head if it is still held."""
        if self._head is not None:
            head, self._head = self._head, None
            self._send(head)

    def sendall(self, data: bytes) -> None:
        if self._hold_head:
            self._hold_head = False
            if data[:5] == b"HTTP/" and data[9:10] != b"1":  # the final head, not 100 Continue or 103
                self._head = bytes(data)
                return
        size = len(data)
        if self._head is not None:
            if not data:  # no body bytes yet (a streaming app's empty first chunk): nothing to send
                return
            if size <= MAX_JOINED_BYTES:
                data, self._head = self._head + data, None
            else:
                try:
                    self.flush()
                except TimeoutError:
                    self.unsent = size
                    raise
        try:
            self._send(data)
        except TimeoutError:
            self.unsent = min(self.unsent, size)  # a head joined to the data went first
            raise

    def _send(self, data: bytes) -> None:
        remaining = memoryview(data).cast("B")
        if self._try_at_once:
            # Most responses fit in the socket's send buffer: one send that cannot wait, and no
            # switching of the socket's timeout (two fcntl calls each way) for them.
            try:
                sent = self._sock.send(remaining, _DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent == len(remaining):
                return
            remaining = remaining[sent:]
        with self._deadline():
            idle_since = self._clock()
            while remaining:
                try:
                    remaining = remaining[self._sock.send(remaining) :]
                except TimeoutError:  # no room for a whole wait
                    if not self._waits_on(idle_since):
                        self.unsent = len(remaining)
                        raise
                    continue
                idle_since = self._clock()

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        self.flush()
        sent = 0
        with self._deadline():
            idle_since = self._clock()
            while True:
                start = offset + sent
                file.seek(start)  # the file's position tells what a wait that timed out had sent
                try:
                    return sent + self._sock.sendfile(file, start, None if count is None else count - sent)
                except TimeoutError:  # its last wait, a whole socket timeout, found no room
                    if file.tell() > start:  # sent before that wait
                        sent, idle_since = file.tell() - offset, self._clock() - self._sock.gettimeout()
                    if not self._waits_on(idle_since):
                        raise

    def _waits_on(self, idle_since: float) -> bool:
        """After a wait without room: whether to wait on for a client that has taken nothing since ``idle_since``."""
        if self._stop is None:
            return False  # the wait was the whole timeout
        if self._clock() < self._stop.give_up_at(idle_since, self._timeout):
            return True
        self.cut_by_stop = self._stop.cuts(idle_since, self._timeout)
        return False

    @contextmanager
    def _deadline(self) -> Iterator[None]:
        before = self._sock.gettimeout()
        self._sock.settimeout(self._timeout if self._stop is None else min(self._timeout, STOP_CHECK_S))
        try:
            yield
        finally:
            self._sock.settimeout(before)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)
