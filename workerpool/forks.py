"""A warning when a handler forks its process during an attempt: ``os.fork()``, or multiprocessing's "fork" start
method (Linux's default: ``multiprocessing.Pool``, ``ProcessPoolExecutor``).

The process runs other threads meanwhile (the other workers, the HTTP threads, the watchdog), and a child forked
from it has the forking thread alone: every lock another thread held at that moment stays held in the child for
ever. A process pool forked so hangs in its children, its attempt with it until ATTEMPT_TIMEOUT_S, and the
children outlive the attempt. No hook can make that fork safe; the warning names the task and the way out.
``subprocess`` is not concerned: it starts its program without running Python in the child (unless given a
``preexec_fn``, which is unsafe in threads for the same reason and warned of too).
"""

from __future__ import annotations

import logging
import os

from .current import current_task

log = logging.getLogger(__name__)
_warned = False  # once per process: a handler that forks does so on every attempt, a pool of children at a time


def _before_fork() -> None:
    global _warned
    if _warned or (task := current_task()) is None:
        return
    _warned = True
    log.warning(
        "task %s: its handler forks this process while other threads run, and the child may hang for ever on a "
        'lock one of them held; start processes with multiprocessing.get_context("forkserver") '
        'or get_context("spawn"), or subprocess (this is said once per process)',
        task.id,
        extra={"task_id": task.id, "request_id": task.request_id},
    )


os.register_at_fork(before=_before_fork)
