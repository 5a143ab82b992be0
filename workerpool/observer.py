"""How the pool tells others what happens to tasks (metrics, tests), without knowing who listens."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .task import Task

log = logging.getLogger(__name__)


class PoolObserver:
    """Hooks the pool calls after each change of a task; subclass and override the ones you need.

    Each hook gets the task's snapshot after the change; the hooks of one
    task are called in the order its changes happened. Hooks run on the
    thread that made the change (the submitting thread, a worker, or the one
    running shutdown) and outside every lock of the pool, so they may take
    their own locks. They must be quick; an exception from one (even
    SystemExit, though not KeyboardInterrupt) is logged and ignored, so a
    broken observer cannot break task processing.

    The pool looks the hooks up once, when it is made, and only those the
    observer's class overrides: a hook left to this class is never called,
    and so costs nothing per task (``tasks_queued`` counts as overridden when
    ``task_queued`` is, as it calls that one).
    """

    def task_queued(self, task: Task) -> None:
        """A new task was accepted and queued."""

    def tasks_queued(self, tasks: Sequence[Task]) -> None:
        """Tasks accepted and queued in one step (one or a batch), in order; calls ``task_queued`` for each.

        Override it to count a batch at once: an observer taking a lock per
        task made a batch's submitter and the workers queue behind each other.
        """
        for task in tasks:
            try:
                self.task_queued(task)
            except KeyboardInterrupt:  # Ctrl-C still stops the submitting thread
                raise
            except BaseException:  # as for every hook: logged, and the batch's other tasks are still heard
                log.exception("observer %r failed in task_queued", self)

    def attempt_started(self, task: Task) -> None:
        """An attempt began: the task is running, ``task.attempts`` counts this attempt."""

    def attempt_finished(self, task: Task, seconds: float) -> None:
        """An attempt ended after ``seconds``: the task is done, failed, or queued for a retry."""

    def task_cancelled(self, task: Task) -> None:
        """The task was cancelled before an attempt of it ran (an attempt cut short by a cancel ends
        with ``attempt_finished``, its state ``cancelled``)."""

    def task_abandoned(self, task: Task) -> None:
        """Shutdown failed the task because it was unfinished when the drain deadline passed."""
