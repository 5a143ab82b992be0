"""How the pool tells others what happens to tasks (metrics, tests), without knowing who listens."""

from __future__ import annotations

from .task import Task


class PoolObserver:
    """Hooks the pool calls after each change of a task; subclass and override the ones you need.

    Each hook gets the task's snapshot after the change; the hooks of one
    task are called in the order its changes happened. Hooks run on the
    thread that made the change (the submitting thread, a worker, or the one
    running shutdown) and outside every lock of the pool, so they may take
    their own locks. They must be quick; an exception from one is logged and
    ignored, so a broken observer cannot break task processing.
    """

    def task_queued(self, task: Task) -> None:
        """A new task was accepted and queued."""

    def attempt_started(self, task: Task) -> None:
        """An attempt began: the task is running, ``task.attempts`` counts this attempt."""

    def attempt_finished(self, task: Task, seconds: float) -> None:
        """An attempt ended after ``seconds``: the task is done, failed, or queued for a retry."""

    def task_cancelled(self, task: Task) -> None:
        """The task was cancelled before an attempt of it ran (an attempt cut short by a cancel ends
        with ``attempt_finished``, its state ``cancelled``)."""

    def task_abandoned(self, task: Task) -> None:
        """Shutdown failed the task because it was unfinished when the drain deadline passed."""
