"""The task whose attempt the calling code runs in, for code that has only the call stack: a handler's logging.

A context variable rather than a thread-local: a handler that runs coroutines
(``asyncio.run``) or hands work on with ``contextvars.copy_context()`` keeps it.
"""

from __future__ import annotations

from contextvars import ContextVar

from .task import Task

running = ContextVar[Task | None]("workerpool_running_task", default=None)


def current_task() -> Task | None:
    """The task whose handler is running in this context (on a worker thread, during its attempt), else None."""
    return running.get()
