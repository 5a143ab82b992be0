"""Turn stop requests into pool shutdown steps, away from the signal handler.

A signal handler may interrupt a thread holding the logging lock or a pool
lock, so it must not log, lock or start threads. ``request_stop`` only puts
the signal number and its arrival time on a ``SimpleQueue`` (whose ``put``
is reentrant, safe in a signal handler); a watcher thread does the rest:

- first request: close admission and drain for ``timeout`` seconds;
- another request: stop waiting, abandon what is left (it is logged); when the
  process began the stop itself (``NO_SIGNAL``), its first signal is taken as
  the first request, not another;
- when the drain ends: call ``on_drained`` with the summary (None if the drain
  failed: the process must stop all the same);
- a request after that: stop waiting for the threads the process still has
  (see ``wait_for_threads``).

One request from outside may arrive as several signals (see ``is_copy``);
copies count once.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable

from workerpool import ShutdownSummary, State, TaskStore, WorkerPool

log = logging.getLogger(__name__)

# Copies of one stop request arrive within this many seconds of each other.
ECHO_WINDOW_S = 1.0
# How long a stopping process waits for non-daemon threads left behind by handlers.
THREAD_GRACE_S = 3.0
# Longest uninterrupted wait on the main thread, so that its signal handlers run promptly.
WAIT_SLICE_S = 0.1

NO_SIGNAL = 0  # a stop that no signal asked for (the server is exiting for another reason)
_DRAINED = -1  # posted by the drain thread; not a signal number
_COUPLED = frozenset({signal.SIGINT, signal.SIGQUIT})


QUEUED_UNKNOWN = "queued unknown (the store could not count them)"


def describe(summary: ShutdownSummary) -> str:
    """The drain's last line (under gunicorn also its report to the arbiter, which reads it back: see
    service/drain_reports.py ``Drain.read``)."""
    counts = ", ".join(
        QUEUED_UNKNOWN if state is State.QUEUED and not summary.queued_counted else f"{count} {state}"
        for state, count in summary.counts.items()
    )
    described = (
        f"shutdown complete: drained in {summary.drain_seconds:.2f} s; {counts}; {len(summary.abandoned)} abandoned"
    )
    if summary.left_to_leases:
        described += f"; {summary.left_to_leases} attempt(s) left to their leases: the store was unavailable"
    return described


def is_copy(first: int, signum: int, seconds_apart: float) -> bool:
    """Whether ``signum``, ``seconds_apart`` after ``first``, is another copy of the request ``first`` began.

    A signal sent to a whole process group (a terminal's Ctrl-C, systemd's
    default ``KillMode=control-group``, ``timeout``, honcho, supervisord's
    ``stopasgroup``, ``kill -TERM -<pgid>``) reaches a gunicorn worker twice:
    straight from the sender, then from the arbiter passing it on (SIGTERM as
    SIGTERM, SIGINT as SIGQUIT), a few milliseconds apart. A person or a
    supervisor asking again does so later, or with another signal.
    """
    same = signum == first or {first, signum} == _COUPLED
    return same and seconds_apart <= ECHO_WINDOW_S


def _name(signum: int) -> str:
    return "a stop request" if signum == NO_SIGNAL else signal.Signals(signum).name


class ShutdownController:
    def __init__(
        self,
        pool: WorkerPool,
        timeout: float,
        *,
        on_drained: Callable[[ShutdownSummary | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._timeout = timeout
        self._on_drained = on_drained
        self._clock = clock
        self._requests: queue.SimpleQueue[tuple[int, float]] = queue.SimpleQueue()
        self._summary: ShutdownSummary | None = None  # set before _DRAINED is posted
        self._reported = threading.Event()  # on_drained has returned
        self._stop_waiting = threading.Event()  # a stop request came after the drain
        self._watcher = threading.Thread(target=self._watch, name="workerpool-stop", daemon=True)

    def start(self) -> None:
        self._watcher.start()

    def request_stop(self, signum: int = NO_SIGNAL) -> None:
        """Ask for a stop (``signum`` is the signal that asked, if any). Safe to call from a signal handler."""
        self._requests.put((signum, self._clock()))

    def wait_for_threads(self, grace: float = THREAD_GRACE_S) -> list[str]:
        """After the drain, wait up to ``grace`` s for the process's other non-daemon threads.

        The interpreter would wait for them forever on exit; a stop request
        meanwhile stops the wait at once. Returns the names of the threads
        still running (the caller then exits without them).
        """
        deadline = time.monotonic() + grace
        for thread in _other_non_daemon_threads():
            while thread.is_alive() and not self._stop_waiting.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                thread.join(min(remaining, WAIT_SLICE_S))
        return [thread.name for thread in _other_non_daemon_threads()]

    def join(self, timeout: float | None = None) -> bool:
        """Whether the drain has ended and ``on_drained`` has returned, waiting up to ``timeout`` s.

        Waits in short slices: a signal arriving meanwhile gets its handler run
        at once even where an interrupted wait would be restarted (gunicorn sets
        ``SA_RESTART`` on SIGTERM).
        """
        _wait_in_slices(self._reported.wait, timeout)
        return self._reported.is_set()

    def _watch(self) -> None:
        first, began = self._requests.get()
        log.info(
            "received %s: %s; draining for up to %g s (signal again to stop waiting)",
            _name(first),
            "new tasks stay queued for other processes" if self._pool.store.shared else "not accepting new tasks",
            self._timeout,
        )
        threading.Thread(target=self._drain, name="workerpool-drain", daemon=True).start()
        while (request := self._requests.get())[0] != _DRAINED:
            signum, at = request
            if signum == NO_SIGNAL or is_copy(first, signum, at - began):
                continue
            if first == NO_SIGNAL:  # the process began this stop itself (max_requests, its arbiter gone):
                first, began = signum, at  # the first signal is the first request from outside, not a second
                log.info("received %s: already draining (signal again to stop waiting)", _name(signum))
                continue
            log.warning("received %s again: abandoning unfinished tasks now", _name(signum))
            self._pool.shutdown(0, wait=False)  # pulls the drain's deadline in
        try:
            if self._on_drained is not None:  # None after a failed drain: the process must still stop
                self._on_drained(self._summary)
        except Exception:  # the process must still exit: join() waits for this
            log.exception("reporting the drain failed")
        finally:
            self._reported.set()
        while True:  # later requests: stop waiting for leftover threads
            signum, at = self._requests.get()
            if signum != NO_SIGNAL and not is_copy(first, signum, at - began):
                log.warning("received %s again: not waiting for leftover threads", _name(signum))
                self._stop_waiting.set()

    def _drain(self) -> None:
        try:
            self._summary = self._pool.shutdown(self._timeout)
        except Exception:  # the process must still exit: the watcher, and join(), wait for _DRAINED
            log.exception("the drain failed")
        finally:
            self._requests.put((_DRAINED, self._clock()))


def close_store(store: TaskStore) -> None:
    """Release the store as the last step of a stop, once the drain is over and reported.

    SQLite copies its write-ahead log into the task file and removes it when
    the last connection to the file closes: a process that exits with its
    connections still open leaves the recent tasks in ``-wal`` only, and a
    copy of the file alone would hold none of them.
    """
    try:
        store.close()
    except Exception:  # the process must still exit
        log.exception("closing the store failed")


def exit_without(threads: list[str]) -> None:
    """Exit the process at once if ``threads`` (names of threads still running) is not empty.

    The interpreter would wait for them forever; the drain is over and
    reported, so nothing accepted is lost by not waiting.
    """
    if not threads:
        return
    log.warning("exiting without waiting for %d thread(s) still running: %s", len(threads), ", ".join(threads))
    logging.shutdown()  # flush every handler: os._exit skips it
    os._exit(0)


def _wait_in_slices(wait: Callable[[float], bool], timeout: float | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
        if remaining <= 0 or wait(remaining):
            return


def _other_non_daemon_threads() -> list[threading.Thread]:
    """The threads the interpreter would wait for on exit, but the caller's and the main thread."""
    ignored = (threading.current_thread(), threading.main_thread())
    return [thread for thread in threading.enumerate() if not thread.daemon and thread not in ignored]
