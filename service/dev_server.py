"""Werkzeug's threaded development server, bounded: ``python app.py`` serves with it.

Werkzeug starts one thread per connection, without limit, and a thread waits
as long as its client takes to send a request: a few thousand idle or slow
connections mean a few thousand threads. Here at most ``MAX_CONNECTIONS``
connections are served at once (others are closed at once), and each request
must arrive whole, head and body, within the server's ``request_timeout``
(counted from the end of the previous one on a kept-alive connection); after
that its stream ends as if the client had closed it.
"""

from __future__ import annotations

import io
import socket
import threading
import time

from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from .request_reader import REQUEST_TIMEOUT_S

MAX_CONNECTIONS = 64
WRITE_TIMEOUT_S = 30.0  # a client that stops reading its response gives its thread back after this


class _DeadlineReader(io.RawIOBase):
    """A socket's read side whose stream ends at the handler's ``read_deadline``."""

    def __init__(self, handler: BoundedRequestHandler) -> None:
        super().__init__()
        self._handler = handler

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        remaining = self._handler.read_deadline - time.monotonic()
        if remaining <= 0:
            return 0
        sock: socket.socket = self._handler.connection
        sock.settimeout(remaining)
        try:
            return sock.recv_into(buffer)
        except TimeoutError:
            return 0
        finally:
            sock.settimeout(WRITE_TIMEOUT_S)


class BoundedRequestHandler(WSGIRequestHandler):
    """Werkzeug's request handler, reading each request within the server's ``request_timeout``."""

    timeout = WRITE_TIMEOUT_S
    read_deadline = 0.0

    def setup(self) -> None:
        super().setup()
        self.rfile = io.BufferedReader(_DeadlineReader(self))

    def handle_one_request(self) -> None:
        self.read_deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()


class BoundedThreadedServer(ThreadedWSGIServer):
    """Werkzeug's threaded server serving at most ``max_connections`` connections at once."""

    def __init__(
        self, *args, request_timeout: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS, **kwargs
    ) -> None:
        self.request_timeout = request_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(*args, **kwargs)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed at once, rather than queued behind slow clients
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()
