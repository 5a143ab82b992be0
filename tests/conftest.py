"""Shared test doubles: a fake clock whose waits end when the test advances it."""

from __future__ import annotations

import threading

import pytest

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


def eventually(predicate, timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds, for state no event announces; fail after ``timeout`` s."""
    pause = threading.Event()
    for _ in range(int(timeout / POLL_S)):
        if predicate():
            return
        pause.wait(POLL_S)
    raise AssertionError(f"condition not reached within {timeout} s")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
