"""The default task handler: simulated work that sometimes fails."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable

from .errors import AttemptCancelled
from .task import Task

Wait = Callable[[threading.Event, float | None], bool]
"""``wait(event, timeout)``: block until ``event`` is set (True) or ``timeout`` seconds pass (False)."""


def event_wait(event: threading.Event, timeout: float | None) -> bool:
    # Event.wait raises OverflowError past threading.TIMEOUT_MAX (some 292 years): a finite delay or drain
    # deadline that far off is waited for as long as the platform can, which is as good as for ever.
    return event.wait(timeout if timeout is None or timeout <= threading.TIMEOUT_MAX else threading.TIMEOUT_MAX)


class SimulatedFailure(Exception):
    """The simulated work failed, as it does with probability ``failure_rate``."""


class SimulatedWork:
    """Take a uniformly random ``min_s``..``max_s`` seconds, then fail with probability ``failure_rate``.

    ``random() < failure_rate`` fails exactly that often: never at 0.0, always
    at 1.0 (``random()`` is in [0, 1)).
    """

    def __init__(
        self,
        *,
        min_s: float = 0.1,
        max_s: float = 0.5,
        failure_rate: float = 0.2,
        rng: random.Random | None = None,
        wait: Wait = event_wait,
    ) -> None:
        if not 0 <= min_s <= max_s:
            raise ValueError(f"need 0 <= min_s <= max_s, got {min_s}, {max_s}")
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be within [0, 1], got {failure_rate}")
        self.min_s = min_s
        self.max_s = max_s
        self.failure_rate = failure_rate
        self._rng = rng or random.Random()
        self._wait = wait

    def __call__(self, task: Task, cancel: threading.Event) -> None:
        duration = self._rng.uniform(self.min_s, self.max_s)
        fails = self._rng.random() < self.failure_rate
        if self._wait(cancel, duration):
            raise AttemptCancelled("attempt cancelled")
        if fails:
            raise SimulatedFailure(f"simulated failure after {duration * 1000:.0f} ms")
