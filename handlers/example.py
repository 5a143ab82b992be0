"""An example handler: ``TASK_HANDLER=handlers.example:log_payload`` logs each task's payload and succeeds."""

from __future__ import annotations

import logging
import threading

from workerpool import Task

log = logging.getLogger(__name__)


def log_payload(task: Task, cancel: threading.Event) -> None:
    """Succeed after logging the payload; returning None is success, raising is a failed attempt."""
    log.info("task %s payload %r", task.id, task.payload)
