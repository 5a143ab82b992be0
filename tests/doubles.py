"""Test doubles shared by the engine and HTTP tests: a fake clock, controllable handlers, polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from workerpool import Task

WAIT_S = 10.0  # upper bound for any in-process synchronisation; never reached when things work
POLL_S = 0.002  # how often a fake wait re-reads the fake time


class FakeClock:
    """Wall and monotonic time that move only when ``advance`` is called.

    ``wait(event, timeout)`` has the pool's ``wait`` contract: True as soon
    as ``event`` is set, False once ``timeout`` seconds of *fake* time passed.
    """

    def __init__(self, epoch: float = 1_800_000_000.0) -> None:
        self._epoch = epoch
        self._now = 0.0
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._epoch + self._now

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds

    def wait(self, event: threading.Event, timeout: float | None) -> bool:
        if timeout is None:
            return event.wait()
        deadline = self.monotonic() + timeout
        while not event.wait(POLL_S):
            if self.monotonic() >= deadline:
                return False
        return True


def wait_until(predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.02) -> object:
    """Poll until ``predicate()`` is truthy, for state no event announces (a server process, a
    queue's depth); return its value, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: wait() is an interval that is not time.sleep
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        pause.wait(interval)
    return result


class Gate:
    """A handler whose attempts block until ``open()``; ``started`` is set when one begins."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self._open = threading.Event()

    def __call__(self, task: Task, cancel: threading.Event) -> None:
        self.started.set()
        self._open.wait(WAIT_S)

    def wait_started(self) -> None:
        assert self.started.wait(WAIT_S), "no attempt started"

    def open(self) -> None:
        self._open.set()


def instant(task: Task, cancel: threading.Event) -> None:
    """Succeed at once."""


def failing(task: Task, cancel: threading.Event) -> None:
    raise RuntimeError("boom")


def refuse_to_start_thread(monkeypatch, name: str) -> None:
    """Starting a thread named ``name`` raises as when the system has no room for another, until monkeypatch.undo()."""
    start = threading.Thread.start

    def refusing(thread: threading.Thread) -> None:
        if thread.name == name:
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", refusing)
