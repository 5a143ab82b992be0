"""Turn stop signals into pool shutdown steps, away from the signal handler.

A signal handler may interrupt a thread holding the logging lock or a pool
lock, so it must not log, lock or start threads. ``request_stop`` only puts
the signal number on a ``SimpleQueue`` (whose ``put`` is reentrant, safe in
a signal handler); a watcher thread does the rest:

- first signal: close admission and drain for ``timeout`` seconds;
- another signal: stop waiting, abandon what is left (it is logged);
- when the drain ends: call ``on_drained`` with the summary.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Callable

from workerpool import ShutdownSummary, WorkerPool

log = logging.getLogger(__name__)

_DRAINED = -1  # posted by the drain waiter; not a signal number


def describe(summary: ShutdownSummary) -> str:
    counts = ", ".join(f"{count} {state}" for state, count in summary.counts.items())
    return (
        f"shutdown complete: drained in {summary.drain_seconds:.2f} s; {counts}; "
        f"{len(summary.abandoned)} abandoned"
    )


def is_echo(previous: int, signum: int) -> bool:
    """A Ctrl-C reaches a gunicorn worker twice: SIGINT from the terminal, then
    SIGQUIT from the arbiter passing it on. That echo is not a second request."""
    return previous == signal.SIGINT and signum == signal.SIGQUIT


class ShutdownController:
    def __init__(
        self,
        pool: WorkerPool,
        timeout: float,
        *,
        on_drained: Callable[[ShutdownSummary], None] | None = None,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._on_drained = on_drained
        self._requests: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._summary: ShutdownSummary | None = None  # set before _DRAINED is posted
        self._watcher = threading.Thread(target=self._watch, name="workerpool-stop", daemon=True)

    def start(self) -> None:
        self._watcher.start()

    def request_stop(self, signum: int) -> None:
        """Safe to call from a signal handler."""
        self._requests.put(signum)

    def join(self, timeout: float | None = None) -> bool:
        self._watcher.join(timeout)
        return not self._watcher.is_alive()

    def _watch(self) -> None:
        first = self._requests.get()
        log.info(
            "received %s: not accepting new tasks; draining for up to %g s (signal again to stop waiting)",
            signal.Signals(first).name, self._timeout,
        )
        threading.Thread(target=self._drain, name="workerpool-drain", daemon=True).start()
        previous = first
        while (signum := self._requests.get()) != _DRAINED:
            if not is_echo(previous, signum):
                log.warning("received %s again: abandoning unfinished tasks now", signal.Signals(signum).name)
                self._pool.shutdown(0, wait=False)  # pulls the drain's deadline in
            previous = signum
        if self._on_drained is not None and self._summary is not None:
            self._on_drained(self._summary)

    def _drain(self) -> None:
        self._summary = self._pool.shutdown(self._timeout)
        self._requests.put(_DRAINED)
