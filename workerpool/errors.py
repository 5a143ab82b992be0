"""Why a submission was refused, and how a handler says "do not retry"."""


class SubmitError(Exception):
    """A task was not accepted; the store holds no trace of it."""


class QueueFull(SubmitError):
    """The bound of waiting tasks is reached; a store that can tell cheaply says how many are delayed.

    ``delayed``: how many of the waiting tasks are not due yet (None: not told).
    ``due_in``: when every waiting task is delayed, seconds until the first falls due at the
    earliest: no place frees before a worker can start one (None: not told, or some are due).
    ``waiting``: how many tasks the store holds waiting (None: not told, read as ``capacity``). A
    store shared by processes whose bounds differ (during a rolling change of the bound) may hold
    more than this process's ``capacity``.
    """

    def __init__(
        self, capacity: int, *, delayed: int | None = None, due_in: float | None = None, waiting: int | None = None
    ) -> None:
        self.waiting = capacity if waiting is None else waiting
        super().__init__(f"queue is full ({self.waiting} tasks waiting)")
        self.capacity = capacity
        self.delayed = delayed
        self.due_in = due_in


class DuplicateTask(SubmitError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id!r} already exists")
        self.task_id = task_id


class PoolClosed(SubmitError):
    def __init__(self) -> None:
        super().__init__("cannot submit tasks after shutdown has begun")


class PermanentFailure(Exception):
    """Raised by a handler: fail the task now, without retrying it."""


class AttemptCancelled(Exception):
    """Raised by a handler that stopped early because its cancel event was set (a cancel, a timeout, shutdown)."""


class StoreUnavailable(Exception):
    """The task store cannot be reached or written (a database error, a lost connection, a full disk).

    Raised by any store method. The change was most likely not made, but may
    have been: a Redis connection lost after the script ran loses the answer,
    not the change. The service answers 503 (send it again: a repeated
    submission with the same id is a duplicate, a repeated cancel answers as
    the first); worker threads back off and retry their step, and the health
    check reports it.
    """


class StoreOutOfMemory(StoreUnavailable):
    """The store refused a write for its memory limit (a Redis at its ``maxmemory``): nothing was stored.

    Redis counts a command's own arguments against the limit, so one large write (a batch of large
    payloads) may be refused while smaller ones, the health check's among them, still pass.
    """


class StoreOutOfSpace(StoreUnavailable):
    """The store could not write for lack of room (a SQLite file on a full disk, or at the file size limit): nothing
    was stored.

    The failed write leaves the room it found (the file does not shrink): a smaller write (a batch split in parts,
    one task), the health check's among them, may pass while this one cannot. A disk that fails writes (EIO) is
    told the same way by SQLite.
    """


class StoreFileReplaced(StoreUnavailable):
    """The store's file was removed or replaced while this process had it open.

    The process still holds the old file open: nothing new is accepted (it
    would be lost with the old file when the process exits, and every process
    opening the path from now on sees another file). Raised by admissions from
    then on; when part of the old files is still at the path (shared with the
    processes that open it), by every step of the store (see
    ``SqliteStore._check_identity``), else the tasks accepted are run to their
    end here.
    """


class StorePartlyAdmitted(StoreUnavailable):
    """A batch admitted in several steps failed at a later step: the tasks of the steps before it stand.

    Raised by a store that bounds the work of one step (Redis: a script of at
    most ``GROUP_MAX_TASKS`` tasks, so that none outlasts the socket timeout).
    ``result`` holds the outcomes of the batch's first ``len(result)`` tasks,
    as ``admit`` would have returned them (the admitted ones stored, and run);
    the tasks after them fare as after any StoreUnavailable: most likely not
    stored, but may be (a submission sent again with its id is then refused
    as a duplicate).
    """

    def __init__(self, message: str, result: list) -> None:
        super().__init__(message)
        self.result = result


class StoreNotSynced(StoreUnavailable):
    """The change was written, and stands, but syncing it to disk failed: a power cut could still undo it.

    Raised by a store that waits for an fsync after its commit (SQLite with
    ``synchronous=FULL``). Unlike its base, the change is made: an admitted
    task is stored and will run, a cancelled task is cancelled. ``result`` is
    what the call would have returned (None where it returns nothing), so
    that the caller can report the change it made, and then raise.
    """

    def __init__(self, message: str, result: object = None) -> None:
        super().__init__(message)
        self.result = result
