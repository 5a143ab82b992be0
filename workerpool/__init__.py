"""An in-process task engine: bounded admission, worker threads, retries with backoff."""

from .backoff import backoff_bound, compute_backoff
from .current import current_task
from .errors import (
    AttemptCancelled,
    DuplicateTask,
    PermanentFailure,
    PoolClosed,
    QueueFull,
    StoreFileReplaced,
    StoreNotSynced,
    StoreOutOfMemory,
    StoreOutOfSpace,
    StorePartlyAdmitted,
    StoreUnavailable,
    SubmitError,
)
from .handlers import SimulatedFailure, SimulatedWork, event_wait
from .ids import new_task_id
from .observer import PoolObserver
from .pool import ABANDONED, Attempt, Handler, PoolStats, ShutdownSummary, TaskSpec, WorkerPool
from .stores.base import Renewal, StoreStats, TaskStore
from .stores.memory import MemoryStore
from .task import FINAL_STATES, TRANSITIONS, InvalidTransition, State, Task

__all__ = [
    "ABANDONED",
    "FINAL_STATES",
    "TRANSITIONS",
    "Attempt",
    "AttemptCancelled",
    "DuplicateTask",
    "Handler",
    "InvalidTransition",
    "MemoryStore",
    "PermanentFailure",
    "PoolClosed",
    "PoolObserver",
    "PoolStats",
    "QueueFull",
    "Renewal",
    "ShutdownSummary",
    "SimulatedFailure",
    "SimulatedWork",
    "State",
    "StoreStats",
    "StoreFileReplaced",
    "StoreNotSynced",
    "StoreOutOfMemory",
    "StoreOutOfSpace",
    "StorePartlyAdmitted",
    "StoreUnavailable",
    "SubmitError",
    "Task",
    "TaskSpec",
    "TaskStore",
    "WorkerPool",
    "backoff_bound",
    "compute_backoff",
    "current_task",
    "event_wait",
    "new_task_id",
]
