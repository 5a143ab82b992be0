"""Misbehaving task handlers for the fault tests, loaded by a real server as ``TASK_HANDLER=faults:<name>``.

The server runs with this directory on ``PYTHONPATH``. Each handler reads
what to do from the task's payload, so one server run can mix behaviours and
the test knows what every task should become.
"""

from __future__ import annotations

import threading

from workerpool import PermanentFailure, SimulatedWork, Task

HANG_S = 60.0  # far beyond any drain deadline the tests use, yet bounded
HOLD_S = 3.0  # long enough to kill the process running it, short enough to run again soon
_STORM_WORK = SimulatedWork(min_s=0.0, max_s=0.005, failure_rate=0.3)  # as the storm tests' settings


def raises(task: Task, cancel: threading.Event) -> None:
    """Fail attempts as the payload says.

    ``ok``: succeed. ``error:<n>``: raise RuntimeError on attempts 1..n.
    ``exit:<n>``: raise SystemExit on attempts 1..n. ``permanent``: raise
    PermanentFailure.
    """
    how, _, count = task.payload.partition(":")
    if how == "permanent":
        raise PermanentFailure(f"fault: permanent on attempt {task.attempts}")
    if how in ("error", "exit") and task.attempts <= int(count):
        if how == "exit":
            raise SystemExit(f"fault: exit on attempt {task.attempts}")
        raise RuntimeError(f"fault: error on attempt {task.attempts}")


def hangs(task: Task, cancel: threading.Event) -> None:
    """``hang``: block for HANG_S seconds, ignoring ``cancel``; anything else succeeds at once."""
    if task.payload == "hang":
        threading.Event().wait(HANG_S)


def flaky_or_holds(task: Task, cancel: threading.Event) -> None:
    """``hold``: take HOLD_S seconds (less if cancelled) and succeed; ``ok``: succeed at once; anything
    else: 0-5 ms, failing 30 % of the time."""
    if task.payload == "ok":
        return
    if task.payload == "hold":
        cancel.wait(HOLD_S)
        return
    _STORM_WORK(task, cancel)


async def _coroutine() -> None:
    """Never awaited: the pool cannot run it."""


def returns_garbage(task: Task, cancel: threading.Event) -> object:
    """Return what the payload names: ``false``, ``zero``, ``dict``, ``coroutine``, or ``none`` (which succeeds)."""
    values = {
        "none": lambda: None,
        "false": lambda: False,
        "zero": lambda: 0,
        "dict": lambda: {"ok": True},
        "coroutine": _coroutine,
    }
    return values[task.payload]()


def leaves_a_thread(task: Task, cancel: threading.Event) -> None:
    """Succeed, leaving behind a non-daemon thread that runs for HANG_S seconds (the interpreter waits for it)."""
    threading.Thread(target=threading.Event().wait, args=(HANG_S,), name="left-behind", daemon=False).start()


def returns_a_large_result(task: Task, cancel: threading.Event) -> str:
    """Return a string of as many characters as the payload says (a large result makes a large listing)."""
    return "x" * int(task.payload)


def waits_for_file(task: Task, cancel: threading.Event) -> None:
    """Succeed once the file the payload names exists (at most HANG_S seconds); return early if cancelled."""
    import os
    import time

    deadline = time.monotonic() + HANG_S
    while not os.path.exists(task.payload) and time.monotonic() < deadline:
        if cancel.wait(0.05):
            return
