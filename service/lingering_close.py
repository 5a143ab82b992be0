"""Close client connections gracefully without blocking the thread that closes them."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Callable

LINGER_S = 2.0  # as gunicorn.util.close_graceful
READ_BYTES = 65536  # read and dropped per readiness event
MAX_LINGERING = 128  # beyond this the oldest lingering socket is closed at once


class LingeringCloser:
    """Close sockets as ``gunicorn.util.close_graceful`` does, from an event loop.

    A graceful close sends FIN, then reads whatever the client still sends
    until it closes too (or ``linger_s`` passes), so that unread request bytes
    do not make the kernel answer with a reset that could cut the response
    short. gunicorn's gthread worker does that reading on its main loop, which
    then stalls for up to 2 s per client that never closes: the loop stops
    accepting, answering and sending its heartbeat, and the arbiter kills the
    worker. Here the socket waits on ``poller`` instead; ``expire`` (called on
    every turn of the loop) closes those whose time is up.

    Only time bounds the reading, not bytes (gunicorn stops after 64 KiB,
    which bounds its blocking): a client still sending a large body the
    answer refused (a 413) must be able to finish and read the answer, where
    closing with its bytes unread would reset the connection under it.

    Used by one thread, the event loop's; not thread-safe.
    """

    def __init__(
        self,
        poller: selectors.BaseSelector,
        *,
        linger_s: float = LINGER_S,
        max_lingering: int = MAX_LINGERING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._poller = poller
        self._linger_s = linger_s
        self._max_lingering = max_lingering
        self._clock = clock
        # socket -> when to close it at the latest; insertion order is deadline order
        self._lingering: dict[socket.socket, float] = {}

    def __len__(self) -> int:
        return len(self._lingering)

    def close(self, sock: socket.socket) -> None:
        """Send FIN now; close once the client has closed too, or after ``linger_s``."""
        try:
            sock.setblocking(False)
            sock.shutdown(socket.SHUT_WR)
            self._poller.register(sock, selectors.EVENT_READ, self._readable)
        except (OSError, ValueError):  # already reset, or closed
            _close(sock)
            return
        self._lingering[sock] = self._clock() + self._linger_s
        if len(self._lingering) > self._max_lingering:
            self._forget(next(iter(self._lingering)))

    def expire(self, *, force: bool = False) -> None:
        """Close the sockets whose linger time is over (all of them with ``force``)."""
        now = self._clock()
        while self._lingering:
            sock, deadline = next(iter(self._lingering.items()))
            if deadline > now and not force:
                break
            self._forget(sock)

    def _readable(self, sock: socket.socket) -> None:
        if sock not in self._lingering:
            return
        try:
            data = sock.recv(READ_BYTES)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client closed (or reset) its end
            self._forget(sock)

    def _forget(self, sock: socket.socket) -> None:
        del self._lingering[sock]
        with contextlib.suppress(KeyError, ValueError, OSError):  # the poller may be closed already
            self._poller.unregister(sock)
        _close(sock)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()
