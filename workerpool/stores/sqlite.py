"""The durable task store: one SQLite file (WAL) that several processes on one host share.

Every transition is one ``BEGIN IMMEDIATE`` transaction: SQLite then holds
its write lock for the whole step, so the admission bound, the duplicate check
and the choice of the next task are decided by one writer at a time, across
threads and processes alike. Claims are ``UPDATE ... RETURNING``; the end of
an attempt is a compare-and-set on (state, attempt number, lease owner), so
a late writer whose attempt was recovered by another process changes nothing.

Each thread uses its own connection (a ``sqlite3`` connection is not safe to
share, and SQLite's locking between connections is what makes the steps
atomic). Readers never wait for writers (WAL).

SQLite has no notifications. A worker waiting for work wakes at once for a
task admitted by its own process (a condition variable) and polls
``PRAGMA data_version`` for commits by other connections: every 1 ms at
first, backing off to ``poll_max`` (25 ms) while nothing changes. The check
reads shared memory only, so idle polling costs next to nothing.

Durability is ``synchronous``. ``NORMAL`` (the default): a committed step
survives a crash or ``kill -9`` of any process; a power loss or kernel crash
may roll back the last steps committed before it (never corrupting the
file). ``FULL``: the WAL is synced at every commit, so a committed step
survives power loss too, at the price of one fsync per step.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import DuplicateTask, QueueFull, StoreUnavailable, SubmitError
from ..task import State, Task, check_transition
from .base import Renewal, StoreStats, TaskStore

APPLICATION_ID = 0x57504F4C  # "WPOL", in the file header: tells our files from foreign SQLite files
SCHEMA_VERSION = 1
SYNCHRONOUS_MODES = ("NORMAL", "FULL")
LOST = "lost: the process running it stopped (its lease expired)"

_FINAL = ("done", "failed", "cancelled")
_HOSTNAME = socket.gethostname()
_TASK_FIELDS = frozenset(Task._fields)
_COLUMNS = (
    "id, payload, max_retries, state, attempts, last_error, created_at, started_at, "
    "finished_at, next_attempt_at, request_id, result, cancel_requested"
)

# Version 1. ``seq`` orders by creation; ``state_seq`` orders by entry into the
# current state; ``due_at`` is when a queued task may be claimed. ``counts``
# is kept by triggers in the same transaction as the change, so the admission
# bound and the health figures are O(1) reads.
_SCHEMA = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    payload TEXT,  -- JSON; NULL once the task is final (read back as "")
    max_retries INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts INTEGER NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    next_attempt_at REAL,
    request_id TEXT,
    result TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    due_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL,
    state_seq INTEGER NOT NULL
);
CREATE INDEX tasks_new ON tasks (due_at, seq) WHERE state = 'queued' AND attempts = 0;
CREATE INDEX tasks_retry ON tasks (due_at, seq) WHERE state = 'queued' AND attempts > 0;
CREATE INDEX tasks_lease ON tasks (lease_until) WHERE state = 'running';
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_by_state ON tasks (state, state_seq);
CREATE TABLE counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counts (name, n) VALUES
    ('queued', 0), ('running', 0), ('done', 0), ('failed', 0), ('cancelled', 0), ('waiting', 0);
CREATE TRIGGER tasks_count_insert AFTER INSERT ON tasks BEGIN
    UPDATE counts SET n = n + 1
    WHERE name = NEW.state OR (name = 'waiting' AND NEW.state = 'queued' AND NEW.attempts = 0);
END;
CREATE TRIGGER tasks_count_update AFTER UPDATE OF state, attempts ON tasks BEGIN
    UPDATE counts SET n = n + CASE name
        WHEN 'waiting' THEN (NEW.state = 'queued' AND NEW.attempts = 0) - (OLD.state = 'queued' AND OLD.attempts = 0)
        ELSE (name = NEW.state) - (name = OLD.state) END
    WHERE name IN (OLD.state, NEW.state, 'waiting');
END;
CREATE TRIGGER tasks_count_delete AFTER DELETE ON tasks BEGIN
    UPDATE counts SET n = n - CASE name WHEN 'waiting' THEN (OLD.state = 'queued' AND OLD.attempts = 0) ELSE 1 END
    WHERE name IN (OLD.state, 'waiting');
END;
"""

# From version N to N + 1: a file of an older version is upgraded in one
# transaction at start-up; a version without a step here is refused.
_MIGRATIONS: dict[int, str] = {}


class SqliteStore(TaskStore):
    """Tasks in the SQLite file at ``path``, shared by every process that opens it.

    ``capacity``, ``ttl`` and ``max_finished`` are the store's own (the
    admission bound is global to all processes). Opening creates the file,
    or checks that an existing one is ours and of a version this code reads,
    and raises ``StoreUnavailable`` with the reason otherwise.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        capacity: int = 64,
        ttl: float = 3600.0,
        max_finished: int = 100_000,
        clock: Callable[[], float] = time.time,
        synchronous: str = "NORMAL",
        busy_timeout: float = 5.0,
        poll_max: float = 0.025,
    ) -> None:
        if capacity < 1 or ttl <= 0 or max_finished < 1:
            raise ValueError("capacity and max_finished must be >= 1 and ttl > 0")
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}, got {synchronous!r}")
        self.path = Path(path)
        self.capacity = capacity
        self.synchronous = synchronous.upper()
        self._ttl = ttl
        self._max_finished = max_finished
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._poll_min = min(0.001, poll_max)
        self._poll_max = poll_max
        self._local = threading.local()
        # _connections_lock must be held while touching _connections (every
        # thread's connection, so close() can release them all) and _closed.
        self._connections_lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._closed = False
        # _wakeup guards _admissions (bumped by every local admission, so a
        # waiting worker sees a change it would otherwise miss) and _woken.
        self._wakeup = threading.Condition(threading.Lock())
        self._admissions = 0
        self._woken = False
        self._failure: str | None = None  # why the last step failed; cleared by the next good write
        _check_path(self.path)
        self._open()

    # -- opening -----------------------------------------------------------

    def _open(self) -> None:
        try:
            conn = self._connection()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreUnavailable(f"{self.path}: cannot switch to WAL mode (journal mode stays {mode})")
            with self._transaction() as conn:
                self._prepare_schema(conn)
        except sqlite3.Error as exc:
            self.close()
            raise StoreUnavailable(f"{self.path}: {_describe(exc)}") from None
        except StoreUnavailable:
            self.close()
            raise

    def _prepare_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and tables == 0:  # a new (or empty) file
            _run_script(conn, _SCHEMA)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return
        if app_id != APPLICATION_ID:
            raise StoreUnavailable(f"{self.path}: not a workerpool task store (a foreign SQLite file); refusing it")
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.path}: written by a newer version (schema {version}; this one reads up to {SCHEMA_VERSION});"
                " refusing to touch it"
            )
        while version < SCHEMA_VERSION:
            if version not in _MIGRATIONS:
                raise StoreUnavailable(f"{self.path}: schema {version} cannot be migrated to {SCHEMA_VERSION}")
            _run_script(conn, _MIGRATIONS[version])
            version += 1
            conn.execute(f"PRAGMA user_version = {version}")

    def _connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._connections_lock:
            if self._closed:
                raise StoreUnavailable(f"{self.path}: the store is closed")
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE).
            # check_same_thread is off only so close() may close every thread's
            # connection; each connection is used by the thread that opened it.
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            self._connections.append(conn)
        conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        self._local.conn = conn
        return conn

    def close(self) -> None:
        with self._connections_lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for conn in connections:
            conn.close()
        self.wake()

    # -- transactions --------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write step: BEGIN IMMEDIATE takes the database's write lock at once (waiting up to the busy timeout)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _step(self, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction (or a consistent read) whose SQLite errors become ``StoreUnavailable``."""
        try:
            if write:
                with self._transaction() as conn:
                    yield conn
                self._failure = None
            else:
                conn = self._connection()
                conn.execute("BEGIN")
                try:
                    yield conn
                finally:
                    conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failure = _describe(exc)
            raise StoreUnavailable(self._failure) from None

    def health(self) -> str | None:
        """Why the last step failed (e.g. "the disk is full"), or None when the last write succeeded."""
        return self._failure

    # -- admission -------------------------------------------------------------

    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        outcomes: list[Task | SubmitError] = []
        with self._step() as conn:
            now = self._clock()
            self._evict(conn, now)
            room = self.capacity - _count(conn, "waiting")
            for task in tasks:
                if room <= 0:  # a duplicate is reported as such even when there is no room
                    known = conn.execute("SELECT 1 FROM tasks WHERE id = ?", (task.id,)).fetchone()
                    outcomes.append(DuplicateTask(task.id) if known else QueueFull(self.capacity))
                    continue
                row = conn.execute(
                    f"""INSERT INTO tasks (id, payload, max_retries, state, attempts, created_at, next_attempt_at,
                            request_id, due_at, state_seq)
                        VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?, {_NEXT_STATE_SEQ.format(state="'queued'")})
                        ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}""",
                    (
                        task.id, _json(task.payload), task.max_retries, task.created_at, task.next_attempt_at,
                        task.request_id, task.next_attempt_at if task.next_attempt_at is not None else task.created_at,
                    ),
                ).fetchone()
                if row is None:
                    outcomes.append(DuplicateTask(task.id))
                else:
                    room -= 1
                    outcomes.append(_task(row))
        if any(isinstance(outcome, Task) for outcome in outcomes):
            with self._wakeup:
                self._admissions += 1
                self._wakeup.notify_all()
        return outcomes

    # -- running ---------------------------------------------------------------

    def claim(self, owner: str, lease_until: float) -> Task | None:
        check_transition(State.QUEUED, State.RUNNING)
        self._note_seen()
        with self._step() as conn:
            now = self._clock()
            for index, kind in _QUEUED:  # due retries first: they were accepted earlier
                row = conn.execute(
                    f"""UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = :now,
                            next_attempt_at = NULL, lease_owner = :owner, lease_until = :until,
                            state_seq = {_NEXT_STATE_SEQ.format(state="'running'")}
                        WHERE seq = (SELECT seq FROM tasks INDEXED BY {index}
                                     WHERE state = 'queued' AND {kind} AND due_at <= :now
                                     ORDER BY due_at, seq LIMIT 1)
                        RETURNING {_COLUMNS}""",
                    {"now": now, "owner": owner, "until": lease_until},
                ).fetchone()
                if row is not None:
                    return _task(row)
        return None

    def seconds_until_due(self) -> float | None:
        with self._step(write=False) as conn:
            due = [
                conn.execute(f"SELECT min(due_at) FROM tasks INDEXED BY {index} WHERE state = 'queued' AND {kind}")
                .fetchone()[0]
                for index, kind in _QUEUED
            ]
        due = [d for d in due if d is not None]
        return max(0.0, min(due) - self._clock()) if due else None

    def _note_seen(self) -> None:
        """Remember, before a claim looks, what this thread has seen: a change after it wakes the next wait."""
        with self._wakeup:
            self._local.admissions = self._admissions
        try:
            self._local.version = self._data_version()
        except (sqlite3.Error, StoreUnavailable):
            self._local.version = None  # the claim reports the failure

    def wait_for_work(self, timeout: float | None) -> None:
        """Return when work may be claimable: admitted here or elsewhere, due by its time, ``wake``, or ``timeout``.

        Due times and ``timeout`` are read on the store's clock; the polling
        itself runs on real time, so a test's fake clock is noticed within
        ``poll_max`` of moving.
        """
        if not hasattr(self._local, "admissions"):
            self._note_seen()
        # What the last claim saw: work admitted since (here or elsewhere) ends the wait at once.
        admissions, seen = self._local.admissions, self._local.version
        del self._local.admissions
        try:
            until_due = self.seconds_until_due()
        except StoreUnavailable:
            return  # the caller's next step reports the failure
        if until_due is not None and (timeout is None or until_due < timeout):
            timeout = until_due
        deadline = None if timeout is None else self._clock() + timeout
        interval = self._poll_min
        while deadline is None or self._clock() < deadline:
            with self._wakeup:
                if self._wakeup.wait_for(lambda: self._woken or self._admissions != admissions, interval):
                    return
            try:
                if self._data_version() != seen:  # another connection committed something
                    return
            except (sqlite3.Error, StoreUnavailable):
                return
            interval = min(interval * 2, self._poll_max)

    def _data_version(self) -> int:
        return self._connection().execute("PRAGMA data_version").fetchone()[0]

    def wake(self) -> None:
        """Release every waiting worker; later waits return at once too (the pool is stopping)."""
        with self._wakeup:
            self._woken = True
            self._wakeup.notify_all()

    def finish(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
    ) -> Task | None:
        with self._step() as conn:
            row = conn.execute(
                "SELECT cancel_requested FROM tasks WHERE id = ? AND state = 'running' AND attempts = ? "
                "AND lease_owner = ?",
                (task_id, attempt, owner),
            ).fetchone()
            if row is None:  # a late writer: recovered, abandoned or forgotten meanwhile
                return None
            now = self._clock()
            if error is None:
                new = State.DONE
            elif row[0]:
                new = _cancelled()
            elif retry_at is not None:
                new = State.QUEUED
            else:
                new = State.FAILED
            check_transition(State.RUNNING, new)
            task = self._end_attempt(conn, task_id, new, now, error=error, result=result, retry_at=retry_at)
            self._evict(conn, now)
        return task

    def _end_attempt(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        new: State,
        now: float,
        *,
        error: str | None,
        result: Any = None,
        retry_at: float | None = None,
    ) -> Task:
        """Write the end of a running attempt (the caller checked it is still the one it means)."""
        final = new is not State.QUEUED
        row = conn.execute(
            f"""UPDATE tasks SET state = :state, last_error = coalesce(:error, last_error), result = :result,
                    finished_at = :finished, next_attempt_at = :retry_at, due_at = coalesce(:retry_at, due_at),
                    payload = CASE WHEN :final THEN NULL ELSE payload END,
                    lease_owner = NULL, lease_until = NULL,
                    state_seq = {_NEXT_STATE_SEQ.format(state=":state")}
                WHERE id = :id RETURNING {_COLUMNS}""",
            {
                "state": new.value, "error": error,
                "result": _json(result) if new is State.DONE and result is not None else None,
                "finished": now if final else None, "retry_at": None if final else retry_at,
                "final": final, "id": task_id,
            },
        ).fetchone()
        return _task(row)

    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        ids = list(task_ids)
        if not ids:
            return Renewal(lost=frozenset(), cancel_requested=frozenset())
        with self._step() as conn:
            rows = conn.execute(
                f"""UPDATE tasks SET lease_until = ?
                    WHERE state = 'running' AND lease_owner = ? AND id IN ({','.join('?' * len(ids))})
                    RETURNING id, cancel_requested""",
                (lease_until, owner, *ids),
            ).fetchall()
        held = {task_id for task_id, _ in rows}
        return Renewal(
            lost=frozenset(ids) - held,
            cancel_requested=frozenset(task_id for task_id, requested in rows if requested),
        )

    def cancel(self, task_id: str) -> Task | None:
        with self._step() as conn:
            now = self._clock()
            row = conn.execute(
                f"""UPDATE tasks SET cancel_requested = (state = 'running'),
                        state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END,
                        finished_at = CASE state WHEN 'queued' THEN :now ELSE finished_at END,
                        payload = CASE state WHEN 'queued' THEN NULL ELSE payload END,
                        next_attempt_at = CASE state WHEN 'queued' THEN NULL ELSE next_attempt_at END,
                        state_seq = CASE state WHEN 'queued' THEN {_NEXT_STATE_SEQ.format(state="'cancelled'")}
                                    ELSE state_seq END
                    WHERE id = :id AND (state = 'queued' OR (state = 'running' AND NOT cancel_requested))
                    RETURNING {_COLUMNS}""",
                {"now": now, "id": task_id},
            ).fetchone()
            if row is None:
                return self._get(conn, task_id, now)
            task = _task(row)
            if task.state is not State.RUNNING:
                check_transition(State.QUEUED, task.state)
                self._evict(conn, now)
        return task

    def recover(self, retry_at: Callable[[Task], float | None]) -> list[Task]:
        recovered = []
        with self._step() as conn:
            now = self._clock()
            owners = conn.execute("SELECT DISTINCT lease_owner FROM tasks WHERE state = 'running'").fetchall()
            dead = [owner for (owner,) in owners if _process_is_gone(owner)]
            rows = conn.execute(
                f"""SELECT {_COLUMNS} FROM tasks WHERE state = 'running'
                    AND (lease_until < ? OR lease_owner IN ({','.join('?' * len(dead))}))""",
                (now, *dead),
            ).fetchall()
            for row in rows:
                task, cancel_requested = _task(row), row[-1]
                due = None if cancel_requested else retry_at(task)
                new = _cancelled() if cancel_requested else State.FAILED if due is None else State.QUEUED
                check_transition(State.RUNNING, new)
                recovered.append(self._end_attempt(conn, task.id, new, now, error=LOST, retry_at=due))
            if recovered:
                self._evict(conn, now)
        return recovered

    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        abandoned = []
        with self._step() as conn:
            now = self._clock()
            rows = conn.execute(
                "SELECT id, cancel_requested FROM tasks WHERE state = 'running' AND lease_owner = ?", (owner,)
            ).fetchall()
            for task_id, cancel_requested in rows:
                new = _cancelled() if cancel_requested else State.FAILED
                abandoned.append(self._end_attempt(conn, task_id, new, now, error=reason))
            if abandoned:
                self._evict(conn, now)
        return abandoned

    # -- reading ---------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        with self._step(write=False) as conn:
            return self._get(conn, task_id, self._clock())

    def _get(self, conn: sqlite3.Connection, task_id: str, now: float) -> Task | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE id = ? AND {_RETAINED}", (task_id, now - self._ttl)
        ).fetchone()
        return None if row is None else _task(row)

    def list(self, state: State | None = None, limit: int = 100) -> list[Task]:
        with self._step(write=False) as conn:
            horizon = self._clock() - self._ttl
            if state is None:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE {_RETAINED} ORDER BY seq DESC LIMIT ?", (horizon, limit)
                )
            else:
                rows = conn.execute(
                    f"SELECT {_COLUMNS} FROM tasks WHERE state = ? AND {_RETAINED} ORDER BY state_seq DESC LIMIT ?",
                    (State(state).value, horizon, limit),
                )
            return [_task(row) for row in rows]

    def stats(self) -> StoreStats:
        # A write step: it forgets the finished tasks whose time is up first, so the counts are exact.
        with self._step() as conn:
            now = self._clock()
            self._evict(conn, now)
            counts = dict(conn.execute("SELECT name, n FROM counts").fetchall())
            due, retries_pending = conn.execute(
                """SELECT count(*) FILTER (WHERE due_at <= :now), count(*) FILTER (WHERE attempts > 0 AND due_at > :now)
                   FROM tasks WHERE state = 'queued'""",
                {"now": now},
            ).fetchone()
        return StoreStats(
            counts={state: counts.get(state.value, 0) for state in State},
            waiting=counts["waiting"],
            due=due,
            retries_pending=retries_pending,
        )

    def unfinished(self, owner: str | None = None) -> int:
        with self._step(write=False) as conn:
            if owner is None:
                return _count(conn, "queued") + _count(conn, "running")
            return conn.execute(
                "SELECT count(*) FROM tasks WHERE state = 'running' AND lease_owner = ?", (owner,)
            ).fetchone()[0]

    # -- retention -------------------------------------------------------------

    def _evict(self, conn: sqlite3.Connection, now: float) -> None:
        """Forget finished tasks past their time, then the oldest beyond ``max_finished``."""
        conn.execute("DELETE FROM tasks WHERE finished_at < ?", (now - self._ttl,))
        excess = sum(_count(conn, state) for state in _FINAL) - self._max_finished
        if excess > 0:
            conn.execute(
                "DELETE FROM tasks WHERE seq IN (SELECT seq FROM tasks WHERE finished_at IS NOT NULL "
                "ORDER BY finished_at, seq LIMIT ?)",
                (excess,),
            )


# The two kinds of queued tasks, each with the partial index that yields them in claim order.
_QUEUED = (("tasks_retry", "attempts > 0"), ("tasks_new", "attempts = 0"))
# The next position in a state's newest-first listing; the index on (state, state_seq) makes it O(log n).
_NEXT_STATE_SEQ = (
    "(coalesce((SELECT state_seq FROM tasks WHERE state = {state} ORDER BY state_seq DESC LIMIT 1), 0) + 1)"
)
# Finished tasks past their retention are invisible even before a write step deletes them.
_RETAINED = "(finished_at IS NULL OR finished_at >= ?)"


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script`` statement by statement inside the open transaction (``executescript`` would commit it)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""


def _count(conn: sqlite3.Connection, name: str) -> int:
    return conn.execute("SELECT n FROM counts WHERE name = ?", (name,)).fetchone()[0]


def _cancelled() -> State:
    return State("cancelled")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _task(row: tuple[Any, ...]) -> Task:
    (task_id, payload, max_retries, state, attempts, last_error, created_at, started_at, finished_at,
     next_attempt_at, request_id, result, cancel_requested) = row
    values: dict[str, Any] = {
        "id": task_id, "payload": "" if payload is None else json.loads(payload), "max_retries": max_retries,
        "state": State(state), "attempts": attempts, "last_error": last_error, "created_at": float(created_at),
        "started_at": _real(started_at), "finished_at": _real(finished_at), "next_attempt_at": _real(next_attempt_at),
        "request_id": request_id, "result": None if result is None else json.loads(result),
        "cancel_requested": bool(cancel_requested),
    }
    return Task(**{name: value for name, value in values.items() if name in _TASK_FIELDS})


def _process_is_gone(owner: str) -> bool:
    """Whether ``owner`` ("host:pid:random") names a process of this host that no longer exists.

    Its leases need not run out: its attempts are lost already. A process
    that exists may be another one that reused the pid; its leases then
    expire as usual. Processes sharing a file on one host must share the pid
    namespace, or have different host names (containers do by default).
    """
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != _HOSTNAME or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (EPERM: another user's)
        return False
    return False


def _real(value: float | None) -> float | None:
    # RETURNING reports a REAL column's value before its affinity applies: 1, not 1.0.
    return None if value is None else float(value)


def _check_path(path: Path) -> None:
    """Refuse paths SQLite would reject with a vague "unable to open database file"."""
    if path.is_dir():
        raise StoreUnavailable(f"{path}: is a directory, not a database file")
    parent = path.parent
    if not parent.is_dir():
        raise StoreUnavailable(f"{path}: the directory {parent} does not exist")
    # WAL mode creates -wal and -shm files beside the database.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreUnavailable(f"{path}: the directory {parent} is not writable (WAL needs files beside the database)")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreUnavailable(f"{path}: the file is not readable and writable")


def _describe(exc: sqlite3.Error) -> str:
    """The reason behind a SQLite error, in words an operator acts on."""
    code = getattr(exc, "sqlite_errorcode", None)
    primary = None if code is None else code & 0xFF
    reasons = {
        sqlite3.SQLITE_FULL: "the disk is full (or the file size limit is reached): no task can be stored",
        sqlite3.SQLITE_BUSY: "the database is locked by another process for longer than the busy timeout",
        sqlite3.SQLITE_READONLY: "the database is read-only",
        sqlite3.SQLITE_CORRUPT: "the database file is corrupt",
        sqlite3.SQLITE_NOTADB: "the file is not a SQLite database",
        sqlite3.SQLITE_CANTOPEN: "the database file cannot be opened",
        sqlite3.SQLITE_IOERR: "a disk I/O error occurred",
    }
    if code == sqlite3.SQLITE_IOERR_WRITE:  # ENOSPC is SQLITE_FULL; EFBIG (file size limit) and EIO land here
        reasons[sqlite3.SQLITE_IOERR] = "writing to the disk failed (disk full, file size limit, or a failing disk)"
    reason = reasons.get(primary) if primary is not None else None
    return f"{reason} ({exc})" if reason else f"database error: {exc}"
