"""An in-process task engine: bounded admission, worker threads, retries with backoff."""

from .backoff import backoff_bound, compute_backoff
from .errors import (
    AttemptCancelled,
    DuplicateTask,
    PermanentFailure,
    PoolClosed,
    QueueFull,
    StoreUnavailable,
    SubmitError,
)
from .handlers import SimulatedFailure, SimulatedWork, event_wait
from .observer import PoolObserver
from .pool import ABANDONED, Handler, PoolStats, ShutdownSummary, WorkerPool
from .task import FINAL_STATES, TRANSITIONS, InvalidTransition, State, Task

__all__ = [
    "ABANDONED",
    "FINAL_STATES",
    "TRANSITIONS",
    "AttemptCancelled",
    "DuplicateTask",
    "Handler",
    "InvalidTransition",
    "PermanentFailure",
    "PoolClosed",
    "PoolObserver",
    "PoolStats",
    "QueueFull",
    "ShutdownSummary",
    "SimulatedFailure",
    "SimulatedWork",
    "State",
    "StoreUnavailable",
    "SubmitError",
    "Task",
    "WorkerPool",
    "backoff_bound",
    "compute_backoff",
    "event_wait",
]
