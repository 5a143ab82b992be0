"""The durable task store: one SQLite file (WAL) that several processes on one host share.

Every transition is one ``BEGIN IMMEDIATE`` transaction (the admission of a
single task: one ``INSERT`` that is its own transaction): SQLite then holds
its write lock for the whole step, so the admission bound, the duplicate check
and the choice of the next task are decided by one writer at a time, across
threads and processes alike. Claims are ``UPDATE ... RETURNING``; the end of
an attempt is a compare-and-set on (state, attempt number, lease owner), so
a late writer whose attempt was recovered by another process changes nothing.

The threads of one process take turns on a lock for their writes, and every
write step of the process goes through one connection under that lock (its
page cache stays warm: SQLite drops a connection's cache whenever another
connection wrote since its last transaction); SQLite's locking between the
processes' connections is what makes the steps atomic across processes.
Admissions that wait for the lock together are written in one transaction.
Reads outside a step use a connection per thread, and never wait for
writers (WAL).

SQLite has no notifications. A task admitted by this process wakes one
waiting worker at once (a condition variable); work queued by another
process is seen by polling a generation counter in the file (a one-row
read), every 1 ms at first, backing off to ``poll_max`` (25 ms) while
no other process queues work (across a worker's waits: see ``wait_for_work``).

Durability is ``synchronous``. ``NORMAL`` (the default): a committed step
survives a crash or ``kill -9`` of any process; a power loss or kernel crash
may roll back the last steps committed before it (never corrupting the
file). ``FULL``: a step that must survive power loss returns only once an
fsync of the WAL covers its commit (one fsync shared by the steps committed
meanwhile, and by those begun when it starts; see ``_sync_wal``).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import socket
import sqlite3
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from ..errors import (
    DuplicateTask,
    QueueFull,
    StoreFileReplaced,
    StoreNotSynced,
    StoreOutOfSpace,
    StoreUnavailable,
    SubmitError,
)
from ..nesting import stored_result
from ..task import State, Task, check_transition
from .base import (
    LOST_EXPIRED,
    LOST_UNREACHABLE,
    Page,
    Position,
    Renewal,
    StoreStats,
    TaskStore,
    check_position,
    full_queue_delays,
    lost_while_unreachable,
)

APPLICATION_ID = 0x57504F4C  # "WPOL", in the file header: tells our files from foreign SQLite files
SCHEMA_VERSION = 8
SYNCHRONOUS_MODES = ("NORMAL", "FULL")
T = TypeVar("T")
log = logging.getLogger(__name__)
_SWEEP_INTERVAL_S = 1.0
# A step forgets this many tasks at most (0.04-0.13 s of the write lock on a busy 2-core machine, where
# one DELETE of 100,000 expired tasks held it 1.7-2.2 s): a mass expiry, or a lowered max_finished, is
# spread over later steps.
_FORGOTTEN_PER_STEP = 1_000
_SWEEP_BEHIND_S = 0.1  # while expired tasks remain past a full chunk, the next sweep comes this soon
# How often an admission looks whether the path still names the file open here (a stat: a system call,
# a few microseconds; a check of the clock costs far less). The health check and the sweep look every time.
_IDENTITY_CHECK_S = 0.1
_WRITTEN_KEPT = 1024  # generations a process remembers writing (see _written); older ones count as news
_JOIN_SYNC_S = 0.002  # the longest an fsync waits for the synced steps begun, to cover their commits too
_PROBE_AFTER_S = 1.0  # how long health() reports a failure before it tries a write of its own
# How long the steps that health and metrics wait for (stats, health's probe) wait for the write lock, where
# the others wait the busy timeout: while another program holds it, /healthz and /metrics still answer at once.
PROMPT_WAIT_S = 0.2
# How long the write lock must have stayed out of this process's reach (no step of its own began meanwhile)
# before stats() says the store cannot be written: a lock merely contended (the other processes' steps, a
# loaded machine) is not a store that cannot be used, and /healthz must not turn 503 for it.
LOCKED_AFTER_S = 1.0
# Commits of this process between two checkpoints of the WAL (see _checkpoint_if_due): an admission
# writes about 5 pages, a worker's end and next claim about 9, so the WAL stays near SQLite's own
# threshold (1,000 pages), which the connections keep only as a backstop, raised tenfold.
_CHECKPOINT_EVERY = 100
_AUTOCHECKPOINT_PAGES = 10_000
# An admission checkpoints only when the other steps have left it this long (a process that only
# admits): a submitter waiting for a checkpoint's fsyncs holds up the tasks it would submit next.
_ADMISSION_CHECKPOINTS_AFTER = 4 * _CHECKPOINT_EVERY
_WAL_RESTART_PAGES = 1_000  # a WAL this long is checkpointed to its end under the write lock, so that it restarts
# The size (bytes) SQLite cuts the -wal file back to when the WAL restarts (PRAGMA journal_size_limit).
# The WAL restarts at a few MB, 41 MB at most in the runs of docs/stores.md; it grows far past that while
# something holds the checkpoints back (a read transaction left open on the file), and SQLite would then
# keep the file at its largest for good.
_WAL_SIZE_LIMIT = 32 * 1024 * 1024
LOST = LOST_EXPIRED  # an owner whose pid still exists here may be stopped or paused, or another process reusing it
LOST_GONE = "lost: the process running it stopped (it no longer exists on this host)"

_HOSTNAME = socket.gethostname()
# What ``totals`` counts, besides the states: the queued tasks not yet started, and the generation.
_TOTALS = (*(state.value for state in State), "waiting", "generation")
_TOTALS_SCHEMA = (
    """
CREATE TABLE {name} (
    id INTEGER PRIMARY KEY CHECK (id = 1),
"""
    + "".join(f"    {name} INTEGER NOT NULL DEFAULT 0,\n" for name in (*_TOTALS, "health_probes")).rstrip(",\n")
    + """
);
"""
)
_COLUMNS = (
    "id, payload, max_retries, state, attempts, last_error, created_at, started_at, "
    "finished_at, next_attempt_at, request_id, result, cancel_requested"
)
# What a listing reads: never the payload, which it does not show (a queued task's may take
# MAX_PAYLOAD_CHARS), nor the result when it leaves that out. SQLite then skips their overflow pages.
_LISTED_COLUMNS = _COLUMNS.replace("id, payload,", "id, NULL,")
_LISTED_BUT_RESULT = _LISTED_COLUMNS.replace(" result,", " NULL,")

# ``seq`` orders by creation; ``state_seq`` orders by entry into the current
# state; ``due_at`` is when a queued task may be claimed. ``totals`` (one row,
# since version 2) holds the tasks in each state and the queued tasks not yet
# started (``waiting``), so the admission bound and the health figures are O(1)
# reads. Each write step adds up what it changed and updates that row once, just
# before its commit (see ``_commit``): version 1's per-row triggers, updating rows
# picked by an IN list, cost an admission about a seventh of its instructions.
# ``generation`` grows whenever work is queued (admitted, retried, recovered):
# what idle workers of other processes poll. Version 3 spells the check on
# ``state`` as comparisons: SQLite builds a temporary b-tree for an IN list of
# more than two values every time it checks one (each insert and each change of
# state), about a seventh of an admission. Version 4 counts each inserted task
# (always a new queued one: only admission inserts) with a trigger updating the
# one row of totals by its key, one generation per task: cheaper than an UPDATE
# statement of its own, and one statement fewer during which the sqlite3 module
# hands the interpreter to another thread. Version 5 renames totals to
# task_totals, and leaves under the old name a view that refuses updates (see
# _OLDER_RELEASE_REFUSED). Version 6 leaves queued tasks out of the by-state index: an
# admission then writes four pages instead of five (see _PAGE_QUEUED for their listing). Version 7
# indexes the queued retries by that listing's position (a page of them reads a range, not them all).
# Version 8 counts the entries into the other states (``entries``, see _NEXT_STATE_SEQ): a position was the
# highest in the state plus one, and came again once the newest tasks had left the state.
_STATE_CHECK = " OR ".join(f"state = '{state.value}'" for state in State)
_TASKS_TABLE = """
CREATE TABLE {name} (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    payload TEXT,  -- JSON; NULL once the task is final (read back as "")
    max_retries INTEGER NOT NULL,
    state TEXT NOT NULL CHECK ({state_check}),
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
"""
_TASKS_INDEXES = """
CREATE INDEX tasks_new ON tasks (due_at, seq) WHERE state = 'queued' AND attempts = 0;
CREATE INDEX tasks_retry ON tasks (due_at, seq) WHERE state = 'queued' AND attempts > 0;
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_by_state ON tasks (state, state_seq);
"""
# Since version 6 (see _PAGE_QUEUED): queued tasks are listed from the table and the indexes of retries. The
# condition names the other states one by one: SQLite uses a partial index for a query whose
# ``state = 'running'`` matches one side of its ORs, where ``state <> 'queued'`` would not be seen to hold.
_BY_STATE_INDEX = (
    "CREATE INDEX tasks_by_state ON tasks (state, state_seq) WHERE "
    + " OR ".join(f"state = '{state.value}'" for state in State if state is not State.QUEUED)
    + ";\n"
)
# Since version 7: the queued retries by their position in the queued listing (see _PAGE_QUEUED), so that a
# page of them is a range of an index, not a sort of every retry waiting. Only a retry enters it: an
# admission writes no page more. Not in _TASKS_INDEXES, whose migration (2 -> 3) predates it.
_RETRY_BY_ENTRY_INDEX = (
    "CREATE INDEX tasks_retry_by_entry ON tasks (state_seq) WHERE state = 'queued' AND attempts > 0;\n"
)
# Since version 8: the entries into a state other than queued, counted (see _NEXT_STATE_SEQ). Not in
# _TOTALS_SCHEMA, whose migration (1 -> 2) predates it.
_ENTRIES_COLUMN = "ALTER TABLE task_totals ADD COLUMN entries INTEGER NOT NULL DEFAULT 0;\n"
_TASKS_COLUMNS = (
    "seq, id, payload, max_retries, state, attempts, last_error, created_at, started_at, finished_at, "
    "next_attempt_at, request_id, result, cancel_requested, due_at, lease_owner, lease_until, state_seq"
)
_ADMITTED_TRIGGER = """
CREATE TRIGGER tasks_admitted AFTER INSERT ON tasks BEGIN
    UPDATE {totals} SET queued = queued + 1, waiting = waiting + 1, generation = generation + 1 WHERE id = 1;
END;
"""
# A process of an older release checks the schema version only when it opens the file, and one
# of version 2 to 4 left running once a newer one migrated it would go on writing totals by its
# old name: since version 4 a trigger counts each admission, so version 2 and 3 would count theirs
# twice. Under that name version 5 leaves a view for their reads, and updates through it fail
# with this message: such a process reads on, but every step of it that changes the counts fails
# (it reports the store unavailable, saying why) and changes nothing.
_OLDER_RELEASE_REFUSED = (
    "this file was migrated to schema version 5 by a newer release of workerpool: this process, of an "
    "older release, may no longer write to it; stop it, and start the newer release instead"
)
_OLDER_RELEASE_GUARD = f"""
CREATE VIEW totals AS SELECT * FROM task_totals;
CREATE TRIGGER totals_of_an_older_release INSTEAD OF UPDATE ON totals BEGIN
    SELECT RAISE(ABORT, '{_OLDER_RELEASE_REFUSED}');
END;
"""
# One random key per file (see TaskStore.position_key), made by the first process to open the file: a table
# nothing else reads or writes, so no schema version of its own.
_POSITION_KEY = """
CREATE TABLE IF NOT EXISTS position_key (id INTEGER PRIMARY KEY CHECK (id = 1), key BLOB NOT NULL);
INSERT OR IGNORE INTO position_key (id, key) VALUES (1, randomblob(16));
"""
_SCHEMA = (
    _TASKS_TABLE.format(name="tasks", state_check=_STATE_CHECK)
    + _TASKS_INDEXES.replace("CREATE INDEX tasks_by_state ON tasks (state, state_seq);\n", _BY_STATE_INDEX)
    + _TOTALS_SCHEMA.format(name="task_totals")
    + """
INSERT INTO task_totals (id) VALUES (1);
"""
    + _ADMITTED_TRIGGER.format(totals="task_totals")
    + _OLDER_RELEASE_GUARD
    + _RETRY_BY_ENTRY_INDEX  # last, as a migration adds it
    + _ENTRIES_COLUMN
)

# From version N to N + 1: a file of an older version is upgraded in one
# transaction at start-up; a version without a step here is refused.
_MIGRATIONS: dict[int, str] = {
    # 1 -> 2: the counts kept by triggers become the one row of totals, counted afresh. The first release's
    # version 1 kept no generation (the row came later, the version unchanged): one per task admitted then.
    1: """
DROP INDEX tasks_lease;
DROP TRIGGER tasks_count_insert;
DROP TRIGGER tasks_count_update;
DROP TRIGGER tasks_count_delete;
"""
    + _TOTALS_SCHEMA.format(name="totals")
    + """
INSERT INTO totals (id, queued, running, done, failed, cancelled, waiting, generation, health_probes)
SELECT 1,
    count(*) FILTER (WHERE state = 'queued'), count(*) FILTER (WHERE state = 'running'),
    count(*) FILTER (WHERE state = 'done'), count(*) FILTER (WHERE state = 'failed'),
    count(*) FILTER (WHERE state = 'cancelled'), count(*) FILTER (WHERE state = 'queued' AND attempts = 0),
    coalesce((SELECT n FROM counts WHERE name = 'generation'), (SELECT max(seq) FROM tasks), 0),
    coalesce((SELECT n FROM counts WHERE name = 'health_probes'), 0)
FROM tasks;
DROP TABLE counts;
""",
    # 2 -> 3: SQLite cannot alter a check, so the table is copied into one with the new check.
    2: _TASKS_TABLE.format(name="tasks_v3", state_check=_STATE_CHECK)
    + f"""
INSERT INTO tasks_v3 ({_TASKS_COLUMNS}) SELECT {_TASKS_COLUMNS} FROM tasks;
DROP TABLE tasks;
ALTER TABLE tasks_v3 RENAME TO tasks;
"""
    + _TASKS_INDEXES,
    # 3 -> 4: admissions are counted by a trigger.
    3: _ADMITTED_TRIGGER.format(totals="totals"),
    # 4 -> 5: totals changes name, so that a process of an older release still running fails its steps.
    4: """
DROP TRIGGER tasks_admitted;
ALTER TABLE totals RENAME TO task_totals;
"""
    + _ADMITTED_TRIGGER.format(totals="task_totals")
    + _OLDER_RELEASE_GUARD,
    # 5 -> 6: queued tasks leave the by-state index; their positions become generations, in their old order.
    5: """
DROP INDEX tasks_by_state;
"""
    + _BY_STATE_INDEX
    + """
UPDATE tasks SET state_seq = (SELECT generation FROM task_totals) - queued.behind
FROM (SELECT seq, count(*) OVER (ORDER BY state_seq DESC, seq DESC) - 1 AS behind FROM tasks WHERE state = 'queued')
    AS queued
WHERE tasks.seq = queued.seq;
""",
    # 6 -> 7: the queued retries are indexed by their position in the queued listing too.
    6: _RETRY_BY_ENTRY_INDEX,
    # 7 -> 8: the entries into the other states are counted from the highest position any of them holds.
    7: _ENTRIES_COLUMN
    + "UPDATE task_totals SET entries = max("
    + ", ".join(
        f"coalesce((SELECT max(state_seq) FROM tasks WHERE state = '{state.value}'), 0)"
        for state in State
        if state is not State.QUEUED
    )
    + ");\n",
}


@dataclass(slots=True, eq=False)
class _Admission:
    """One call of ``admit`` waiting for the write lock; what it gets is set under that lock (see ``settle``).

    Compared by identity: two calls admitting equal tasks are two admissions (see _admit_batch).
    """

    tasks: list[tuple[Task, str]]  # each with its payload as JSON
    deadline: float  # when (time.monotonic) it stops waiting for the write locks, this process's and SQLite's
    outcomes: list[Task | SubmitError] | None = None  # set once the step that took it ended
    failure: str | None = None  # why that step failed: nothing of it was stored
    no_room: bool = False  # that step failed for want of room on the disk (see StoreOutOfSpace)
    error: Exception | None = None  # what its own tasks raised (not SQLite): nothing of it was stored
    commit: int = 0  # the commit that stored it (for FULL's fsync), 0 if none

    def settle(
        self,
        outcomes: list[Task | SubmitError],
        *,
        failure: str | None = None,
        no_room: bool = False,
        error: Exception | None = None,
        commit: int = 0,
    ) -> None:
        """Set what the admission got. ``outcomes`` last: a caller that gave up waiting for the write lock
        reads them without it (see ``SqliteStore._outcome_of``), and must then find the rest set."""
        self.failure, self.no_room, self.error, self.commit = failure, no_room, error, commit
        self.outcomes = outcomes


class _AdmissionFailed(Exception):
    """An error other than SQLite's raised while admitting ``admission``: it fails that one alone."""

    def __init__(self, admission: _Admission, error: Exception) -> None:
        super().__init__(admission, error)
        self.admission, self.error = admission, error


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
        # _connections_lock must be held while touching _connections (the writer
        # and the readers of live threads, so close() can release them all) and _closed.
        self._connections_lock = threading.Lock()
        self._connections: set[sqlite3.Connection] = set()
        self._closed = False
        # _wakeup guards the counters below. _admitted: tasks admitted by this
        # process; _answered: how many of those a waiting worker or a claim
        # has answered. Each admission not answered yet (a ticket) wakes one
        # waiting worker. Both only grow: a claim that found nothing answers
        # every admission it read before its step by raising _answered to it,
        # which (unlike taking those tickets off a count) never takes the ticket
        # of an admission after its step when a waiter answered one meanwhile.
        # _rescheduled: bumped when due times change here (a retry, a recovery),
        # so every waiting worker looks again. _generation: the last generation
        # this process wrote, and _written the latest ones it wrote (at most
        # _WRITTEN_KEPT): their work the two others already announce, but a
        # generation of another process's in between is news all the same.
        self._wakeup = threading.Condition(threading.Lock())
        self._admitted = 0
        self._answered = 0
        self._rescheduled = 0
        self._generation = 0
        self._written: set[int] = set()
        self._woken = False
        self._failure: str | None = None  # why the last step failed; cleared by the next good write
        # When (time.monotonic) stats() first found the write lock out of reach, no step having begun since;
        # None once one has (see stats). Set by any thread, cleared under _write_lock: a race costs one report.
        self._held_up_since: float | None = None
        self._failed_at = 0.0  # when (time.monotonic) it failed
        # Held across each write transaction. SQLite lets one writer in at a time
        # anyway; without this lock the threads of one process would wait for
        # each other in SQLite's busy handler, which sleeps 1, 2, 5, 10... ms
        # between tries instead of handing the lock over at once.
        self._write_lock = threading.Lock()
        # Every write step of this process goes through this one connection, under
        # _write_lock. A connection that starts a transaction after another one
        # wrote to the file drops its whole page cache and reads every page it
        # touches again: with a connection per thread, nearly every step did.
        self._writer: sqlite3.Connection | None = None
        # What the open write step changed in totals, by column (under _write_lock); see _commit.
        self._deltas: dict[str, int] = {}
        # _admissions_lock must be held while touching _admissions: the admissions
        # waiting for the write lock, all admitted by whoever takes it first (see admit).
        self._admissions_lock = threading.Lock()
        self._admissions: list[_Admission] = []
        # Notified (under _admissions_lock) once a step that took admissions settled them: what an admission
        # taken by it waits for when its own wait for the write lock timed out (see _outcome_of).
        self._settled = threading.Condition(self._admissions_lock)
        self._commits = 0  # write steps committed by this process (under _write_lock)
        # Held by the thread copying the WAL into the database (see _checkpoint_if_due); _checkpointed:
        # this process's commits counted when the last checkpoint began.
        self._checkpoint_lock = threading.Lock()
        self._checkpointed = 0
        # With FULL (see _sync_wal). _synced: the commits the fsyncs so far covered. _syncs guards _covering
        # (the commits the fsync running covers, 0 if none runs) and _sync_ended (set when that fsync ends,
        # made by the first thread to wait for it). _sync_lock must be held while syncing the WAL or
        # touching the two below.
        self._synced = 0
        self._syncs = threading.Lock()
        self._covering = 0
        self._sync_ended: threading.Event | None = None
        self._sync_lock = threading.Lock()
        self._wal_fd: int | None = None  # the WAL file, opened to fsync it
        # The file SQLite opened (the path with its symlinks resolved), beside which it keeps the -wal and
        # -shm: set once open (see _open).
        self._file = str(self.path)
        self._wal_path = f"{self.path}-wal"
        # With FULL: the tickets of the steps that must be synced, begun and not yet committed (or failed),
        # which an fsync about to start waits for; _joining is set when one lands while it waits (see
        # _sync_wal). Single calls on a set and on a count, each atomic: no lock for every step.
        self._in_flight: set[int] = set()
        self._tickets = itertools.count(1)
        self._joining: threading.Event | None = None
        self._swept_at = -math.inf  # when _evict last deleted the tasks past their time (store clock)
        self._sweep_behind = False  # the last sweep left expired tasks behind (a full chunk)
        # The files open here (st_dev, st_ino): the task file, its -wal and its -shm (see _LOG_SUFFIXES), and
        # why a path no longer names its file (see _check_identity); _replaced, once set, stays: the open
        # connections keep writing to the old files. _cut_off: one of them is still at its path, shared with
        # every process that opens it, so this process no longer touches any (see _check_identity).
        self._identity: tuple[tuple[int, int] | None, ...] | None = None
        self._replaced: str | None = None
        self._cut_off = False
        self._identity_due = 0.0  # when (time.monotonic) an admission looks again
        self._position_key = b""  # the file's (see _POSITION_KEY), read as it opens
        _check_library()
        _check_path(self.path)
        _check_link(self.path)
        _create_private(self.path)
        _check_owner(self.path)
        self._open()

    # -- opening -----------------------------------------------------------

    def _open(self) -> None:
        try:
            conn = self._connection()
            # By the name SQLite itself uses: a symlink's target, not the link.
            self._file = next(file for _, name, file in conn.execute("PRAGMA database_list") if name == "main")
            self._wal_path = f"{self._file}-wal"
            mode = self._retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            if mode.lower() != "wal":
                raise StoreUnavailable(f"{self.path}: cannot switch to WAL mode (journal mode stays {mode})")
            with self._transaction() as writer:
                self._prepare_schema(writer)
                _run_script(writer, _POSITION_KEY)
                self._position_key = bytes(writer.execute("SELECT key FROM position_key").fetchone()[0])
            # A connection opens the WAL at its first read in WAL mode: this thread's reader, which only
            # switched the mode, does so now, while the path names the WAL (see _check_identity).
            conn.execute("SELECT count(*) FROM sqlite_master").fetchall()
            # The connections are open: the paths name their files now (a removal in between is seen at the
            # first check, as the file then has no name left, or another inode).
            self._identity = _identities(self.path, self._file)
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
        """This thread's connection, for reading; closed when the thread ends (see ``_Reader``)."""
        # Looked at by reads too: a process that only reads (its workers polling, GET /tasks) would read on
        # through its out-of-date view of files cut off from it (see _check_identity).
        if self._replaced is not None or (time.monotonic() >= self._identity_due and self._check_identity()):
            # A connection that has not read since its file was removed opens the WAL by path when it
            # first reads, and would find another file's or none: every read takes the writer's, which has.
            raise StoreFileReplaced(self._replaced)
        reader: _Reader | None = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = _Reader(self._new_connection(), self._connections, self._connections_lock)
        return reader.conn

    def _write_connection(self) -> sqlite3.Connection:  # _write_lock is held
        """The connection of every write step of this process (see ``_writer``), and of its reads once the
        path names another file; none once this process is cut off from the files (see _check_identity)."""
        if self._cut_off or (time.monotonic() >= self._identity_due and self._check_identity() and self._cut_off):
            raise StoreFileReplaced(cast(str, self._replaced))
        conn = self._writer
        if conn is None:
            conn = self._writer = self._new_connection()
        return conn

    def _new_connection(self) -> sqlite3.Connection:
        # A connection opened by path once the path names another file (or none: connecting would create
        # an empty one) would read that file, not the one the writer holds.
        if self._identity is not None and self._check_identity() is not None:
            raise StoreFileReplaced(self._replaced)
        with self._connections_lock:
            if self._closed:
                raise StoreUnavailable(f"{self.path}: the store is closed")
            # Autocommit mode: transactions are opened explicitly (BEGIN IMMEDIATE).
            # check_same_thread is off so that close() may close every connection and
            # the writer may serve each thread in turn; a reader is used by the thread
            # that opened it.
            # timeout=0: no busy handler of SQLite's own; _retry_busy waits instead.
            conn = sqlite3.connect(self.path, timeout=0, isolation_level=None, check_same_thread=False)
            self._connections.add(conn)

        def configure() -> None:
            # FULL is done by _sync_wal after the commit, outside the write lock (see _transaction).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint = {_AUTOCHECKPOINT_PAGES}")  # see _checkpoint_if_due
            conn.execute(f"PRAGMA journal_size_limit = {_WAL_SIZE_LIMIT}")

        try:
            # A connection's first statement may meet a lock (another process recovering the file after
            # a crash): wait for it as any step does.
            self._retry_busy(configure)
        except BaseException:
            _close_connection(conn, self._connections, self._connections_lock)
            raise
        return conn

    def close(self) -> None:
        self._checkpoint_all()
        with self._connections_lock:
            self._closed = True
            connections = list(self._connections)
            self._connections.clear()
            writer, self._writer = self._writer, None
        if self._cut_off and writer in connections:
            connections.remove(writer)  # never closed (see _check_identity)
        for conn in connections:
            conn.close()
        with self._sync_lock:
            self._close_wal()
        self.wake()

    def _checkpoint_all(self) -> None:
        """Copy the whole WAL into the task file and empty it, so that the file alone holds every task.

        SQLite does so when the last connection to the file closes, but not
        when another connection of the process, or of another process, is
        still open at that moment. Best effort: a WAL that another process
        is using stays as it is, and loses nothing.
        """
        if not self._write_lock.acquire(timeout=self._busy_timeout):
            return
        try:
            if self._writer is not None and self._replaced is None:
                self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
        finally:
            self._write_lock.release()

    # -- transactions --------------------------------------------------------

    @contextlib.contextmanager
    def _transaction(self, *, synced: bool = True, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        """One write step: BEGIN IMMEDIATE takes the database's write lock (waiting up to the busy timeout).

        With ``wait``, the step waits that long at most for this process's
        lock and SQLite's together, and raises ``_HeldUp`` when they were not
        free by then: nothing was written.

        Every commit is ``synchronous=NORMAL``: written to the WAL, no fsync.
        With ``FULL`` a step then waits for an fsync of the WAL that covers
        its commit (``_sync_wal``), after releasing the lock: while one
        thread syncs, others commit, and one fsync makes all of them durable
        (a group commit); such a step counts as begun (``_take_off``) from
        before it waits for the write lock until its commit, so that an
        fsync about to start covers it too. ``synced=False`` skips that
        wait, for steps whose loss in a power cut loses nothing promised (a
        claim, a lease renewal): the WAL is written in order, so the next synced commit
        makes them durable too, and a power cut only ever takes the last
        steps, never a task's end without its claim. A step that ends its
        transaction itself (``ROLLBACK``: it decided to change nothing)
        writes nothing and waits for no fsync.
        """
        full = synced and self.synchronous == "FULL"
        deadline = None if wait is None else time.monotonic() + wait
        ticket = self._take_off() if full else 0
        try:
            # A thread of this process holding it that long waits for another process's lock, as a rule.
            if not self._write_lock.acquire(timeout=-1 if wait is None else wait):
                raise _HeldUp(_held_up(wait))
            try:
                try:
                    conn, changes = self._begin(deadline)
                except sqlite3.OperationalError as exc:
                    if wait is None or _primary_code(exc) != sqlite3.SQLITE_BUSY:
                        raise
                    raise _HeldUp(_held_up(wait)) from None
                try:
                    yield conn
                    commit = self._commit(conn, changes)
                except BaseException:
                    conn.rollback()  # nothing if the step ended its transaction itself
                    raise
            finally:
                self._write_lock.release()
        finally:
            if ticket:
                self._land(ticket)
        if commit and full:
            self._sync_wal(commit)
        self._checkpoint_if_due(_CHECKPOINT_EVERY)

    def _begin(self, deadline: float | None = None) -> tuple[sqlite3.Connection, int]:  # _write_lock is held
        """Open a write transaction on the writer: the connection and its count of changes so far.

        Waits for another process's lock until ``deadline`` (``time.monotonic``) if given, else for the busy
        timeout.
        """
        conn = self._write_connection()
        self._deltas = {}
        try:
            _begin_immediate(conn)
        except sqlite3.OperationalError as exc:  # another process holds the lock: wait for it
            if _primary_code(exc) != sqlite3.SQLITE_BUSY:
                raise
            self._retry_busy(lambda: _begin_immediate(conn), deadline=deadline)
        self._held_up_since = None  # the lock is within reach
        return conn, conn.total_changes

    def _commit(self, conn: sqlite3.Connection, changes: int) -> int:  # _write_lock is held
        """Commit (unless the step rolled back); this process's number for the commit, 0 if it wrote nothing."""
        if not conn.in_transaction:  # rolled back by the step
            self._local.wrote = False
            return 0
        self._flush_totals(conn)
        conn.commit()  # see _begin_immediate
        self._local.wrote = wrote = conn.total_changes != changes  # a commit that changed nothing writes nothing
        if not wrote:
            return 0
        self._commits += 1
        return self._commits

    def _count(self, name: str, delta: int) -> None:  # _write_lock is held
        """Add ``delta`` to the ``name`` column of totals when the open step commits.

        A task entering a state other than queued is counted in ``entries`` too (see _NEXT_STATE_SEQ).
        """
        self._deltas[name] = self._deltas.get(name, 0) + delta
        if delta > 0 and name in _ENTERED:
            self._deltas["entries"] = self._deltas.get("entries", 0) + delta

    def _flush_totals(self, conn: sqlite3.Connection) -> None:  # _write_lock is held
        """Write what the open step changed into totals: one single-row UPDATE."""
        changed = tuple(name for name, delta in self._deltas.items() if delta)
        if changed:
            conn.execute(_add_to_totals(changed), [self._deltas[name] for name in changed])
        self._deltas = {}

    def _take_off(self) -> int:
        """A step that must be synced begins (``FULL``): its ticket, for ``_land`` once it committed."""
        ticket = next(self._tickets)
        self._in_flight.add(ticket)
        return ticket

    def _land(self, ticket: int) -> None:
        """The step of ``ticket`` committed (or failed, or wrote nothing): an fsync waiting for it may start."""
        self._in_flight.discard(ticket)
        joining = self._joining
        if joining is not None:
            joining.set()

    def _sync_wal(self, commit: int) -> None:
        """Return once the WAL is synced past this process's commit number ``commit``.

        One thread at a time syncs, and the others take their turns; a
        thread whose commit the fsync running covers waits for that fsync
        alone, not also for one that another thread may start next. A thread
        whose commit is not covered runs the next fsync, which covers every
        commit made until it starts. Before starting, it waits (at most
        ``_JOIN_SYNC_S``) for the steps that must be synced and have begun
        (see ``_take_off``) to commit, so that this fsync covers them too,
        and they wait for no fsync of their own: a submitter's next
        admission and a worker's end of an attempt, each committing while
        the other's fsync runs, would otherwise need two fsyncs per task,
        one after the other. A step waits for nothing when none other has
        begun: a lone step syncs at once, as does one beside claims and
        lease renewals, which need no fsync.
        """
        while self._synced < commit:
            with self._syncs:
                ended = None
                if self._covering >= commit:  # the fsync running covers it: wait for that one alone
                    ended = self._sync_ended
                    if ended is None:
                        ended = self._sync_ended = threading.Event()
            if ended is not None:
                ended.wait()
                continue
            with self._sync_lock:  # one fsync at a time; the waiting threads take their turns
                if self._synced >= commit:
                    return  # another thread's fsync covered it
                if self._in_flight:
                    self._join_begun()
                target = self._commits  # every commit counted so far has written its frames
                with self._syncs:
                    self._covering = target
                wal = self._wal_path
                try:
                    # The WAL the connections write, even once its path names another file or none (see
                    # _check_identity): opened by path while the path still names it.
                    if self._wal_fd is None:
                        fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
                        if self._identity is not None and _fd_identity(fd) != self._identity[1]:
                            os.close(fd)
                            raise OSError(f"{wal} is no longer the WAL open here")
                        self._wal_fd = fd
                    os.fdatasync(self._wal_fd)  # as SQLite does on Linux: data and size, not timestamps
                except OSError as exc:  # the step is committed, but may not survive a power cut
                    target = 0  # covers nothing: a thread waiting for it tries an fsync of its own
                    raise _NotSynced(f"syncing the WAL failed: {exc}") from None
                finally:
                    with self._syncs:
                        self._synced = max(self._synced, target)
                        self._covering, ended, self._sync_ended = 0, self._sync_ended, None
                    if ended is not None:
                        ended.set()

    def _join_begun(self) -> None:
        """Wait (at most ``_JOIN_SYNC_S``) until the steps begun by now that must be synced have committed."""
        joining = self._joining = threading.Event()
        later = next(self._tickets)  # the steps of lower tickets have begun already
        deadline = time.monotonic() + _JOIN_SYNC_S
        try:
            while True:
                joining.clear()
                # min() reads the set in one call: no thread changes it meanwhile.
                if min(self._in_flight, default=later) >= later:
                    return
                left = deadline - time.monotonic()
                if left <= 0 or not joining.wait(left):
                    return
        finally:
            self._joining = None

    def _checkpoint_if_due(self, every: int) -> None:
        """Copy the WAL into the database every ``_CHECKPOINT_EVERY`` commits, without the write lock.

        SQLite's own checkpoint runs inside the commit that crosses its
        threshold, while that step holds the write lock: every other thread
        of the process waits for the copy and its fsyncs. A checkpoint
        needs no write lock (``PASSIVE``: it copies what no reader still
        needs, and writers go on meanwhile), so the thread whose commit
        makes it due runs it after its step, on its own connection; one at
        a time. A failed checkpoint loses nothing (the WAL holds every
        commit): the next one tries again.

        SQLite writes the WAL from its beginning again only at a write that
        begins once a checkpoint copied all of it, which one running beside
        the other threads' commits never does: the WAL would grow to the
        backstop's 10,000 pages, and past a few thousand every commit pays
        for it (its hash table's probes lengthen, as every commit writes the
        totals row's page again). So once the WAL is ``_WAL_RESTART_PAGES``
        long, the pages committed during the copy are copied again while
        this process holds SQLite's write lock (an open ``BEGIN IMMEDIATE``
        on its writer, which writes nothing): a few pages and the two fsyncs,
        once per restart. The process's own lock would not do: the other
        processes sharing the file go on committing, and with two of them
        the WAL never restarted (58 MB in 32 s of POST /enqueue load).
        """
        if self._commits - self._checkpointed < every or not self._checkpoint_lock.acquire(blocking=False):
            return
        try:
            self._checkpointed = self._commits
            conn = self._connection()
            _, pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # Whoever committed during the copy (this process's threads or another process): its pages
            # are past the copy's end, which the checkpoint's own figures do not tell.
            if pages >= _WAL_RESTART_PAGES:
                with self._write_lock:
                    writer, _ = self._begin()
                    try:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    finally:
                        writer.rollback()
        except (sqlite3.Error, StoreUnavailable):
            pass
        finally:
            self._checkpoint_lock.release()

    def _close_wal(self) -> None:  # _sync_lock is held
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _retry_busy(self, attempt: Callable[[], T], *, deadline: float | None = None) -> T:
        """``attempt()`` again while another process holds the lock, for up to the busy timeout (or until
        ``deadline``, a ``time.monotonic`` time).

        SQLite's own busy handler sleeps 1, 2, 5, 10... ms between tries, far
        longer than a step holds the lock here (well under a millisecond), so a
        process would sit idle while the lock is free: these pauses start at
        0.1 ms and double up to 2 ms.
        """
        if deadline is None:
            deadline = time.monotonic() + self._busy_timeout
        pause = 0.0001
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if _primary_code(exc) != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.002)

    @contextlib.contextmanager
    def _step(self, *, synced: bool = True, wait: float | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction (see ``_transaction``) whose SQLite errors become ``StoreUnavailable``.

        Only a step that changed rows clears a recorded failure: one that
        changed nothing commits without writing, even on a full disk. A step
        held up past ``wait`` (``_HeldUp``) is not a failure: its caller
        chose not to wait longer.
        """
        try:
            with self._transaction(synced=synced, wait=wait) as conn:
                yield conn
        except sqlite3.Error as exc:
            self._failure, self._failed_at = _describe(exc), time.monotonic()
            raise (StoreNotSynced if isinstance(exc, _NotSynced) else StoreUnavailable)(self._failure) from None
        if self._failure is not None and self._local.wrote:
            self._failure = None

    def _read(self, query: Callable[[sqlite3.Connection], T], *, wait: float | None = None) -> T:
        """``query(conn)`` on one consistent snapshot; SQLite errors become ``StoreUnavailable``.

        Readers do not wait for writers (WAL); they may meet a lock only while
        a process recovers the file after a crash, and then try again (for
        ``wait`` seconds if given, else the busy timeout).
        """
        deadline = None if wait is None else time.monotonic() + wait

        def snapshot() -> T:
            conn.executescript("BEGIN")  # see _begin_immediate
            try:
                return query(conn)
            finally:
                conn.commit()

        try:
            try:
                conn = self._connection()
            except StoreFileReplaced:  # read through the writer's connection, which has the old file's WAL open
                if not self._write_lock.acquire(timeout=-1 if wait is None else wait):
                    raise _HeldUp(_held_up(wait)) from None
                try:
                    conn = self._write_connection()
                    return self._retry_busy(snapshot, deadline=deadline)
                finally:
                    self._write_lock.release()
            return self._retry_busy(snapshot, deadline=deadline)
        except sqlite3.Error as exc:
            self._failure, self._failed_at = _describe(exc), time.monotonic()
            raise StoreUnavailable(self._failure) from None

    def _query(self, sql: str, params: Any = ()) -> list[Any]:
        """The rows of one statement (its own snapshot: no BEGIN and COMMIT around it), like ``_read``.

        ``fetchall`` runs the statement to its end, which ends its read
        transaction: an unfinished one would hold an old snapshot open.
        """
        try:
            return self._connection().execute(sql, params).fetchall()
        except StoreFileReplaced:
            pass  # read through the writer's connection (see _read)
        except sqlite3.Error as exc:
            if _primary_code(exc) != sqlite3.SQLITE_BUSY:
                self._failure, self._failed_at = _describe(exc), time.monotonic()
                raise StoreUnavailable(self._failure) from None
        return self._read(lambda conn: conn.execute(sql, params).fetchall())

    def _check_identity(self) -> str | None:
        """Why a path no longer names the file open here (removed, renamed or replaced), or None.

        The open connections would go on writing to the old file, which no
        process opening the path sees and which is gone with the last
        process holding it: every task accepted into it from then on would
        be lost. The same holds for the task file's ``-wal`` (the latest
        commits, not yet copied into the file) and ``-shm`` (the index of the
        WAL every process sharing the file goes by): SQLite keeps both open,
        and both stay in place while any connection is. Once seen, it is
        logged once and admissions are refused (``StoreFileReplaced``).

        When the three went together (``rm tasks.db*``, another task file put
        in their place), nothing open here is shared with another process:
        the tasks already in the old files are still claimed and run here,
        through the connections open on them. When one of them is still at
        its path, another process opening the path shares it with a file
        this process no longer sees (a fresh ``-shm`` over the same ``-wal``
        and task file, a fresh ``-wal`` beside the same ``-shm``): a write
        through this process's connections, even a read that rebuilds the
        index, or the checkpoint of their closing, would contradict what
        that process writes and corrupt the task file. This process is then
        cut off: every step of the store is refused (its running attempts are
        left to their leases), and its writer is never closed (see ``close``).
        """
        if self._replaced is None and self._identity is not None:
            self._identity_due = time.monotonic() + _IDENTITY_CHECK_S
            now = _identities(self.path, self._file)
            # A -wal or -shm not there at the opening (none is expected) is not looked for.
            changed = [i for i, (was, is_) in enumerate(zip(self._identity, now)) if is_ != was and (was or i == 0)]
            if changed:
                which = "the task file" if changed[0] == 0 else f"the task file's {_LOG_SUFFIXES[changed[0] - 1]} file"
                why = "was removed" if now[changed[0]] is None else "was replaced by another file"
                kept = [_FILE_NAMES[i] for i, (was, is_) in enumerate(zip(self._identity, now)) if was and is_ == was]
                if kept:
                    self._replaced = (
                        f"{self.path}: {which} {why} while this process had it open, and {' and '.join(kept)} "
                        "still at the path: this process no longer reads or writes it (a step through its "
                        "out-of-date view of the files would corrupt them for the processes that open the path); "
                        "new tasks are refused, the attempts running here are left to their leases (restart it)"
                    )
                    if self._writer is not None:
                        # SQLite checkpoints the WAL into the task file, and removes the WAL, when the last
                        # connection of a process closes (unless the task file moved): here it would do so
                        # through an out-of-date view of the -wal and -shm the other processes use. The writer
                        # is never closed, not even by Python at exit (this reference is never dropped), so no
                        # connection of this process is ever the last: its exit lets go of the files unwritten.
                        ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._writer))
                    self._cut_off = True  # once _replaced is set: the steps refused from now on raise it
                else:
                    self._replaced = (
                        f"{self.path}: {which} {why} while this process had it open: new tasks are refused; "
                        "the tasks accepted before are run to their end here (restart once they have finished)"
                    )
                log.error("%s", self._replaced)
        return self._replaced

    def health(self) -> str | None:
        """Why the last write failed (e.g. "the disk is full"), or None when the last write succeeded.

        A failure is reported for at least ``_PROBE_AFTER_S``; after that each
        call tries a write of its own (a counter of these probes; SQLite skips
        writing a row set to what it holds), so that health recovers when the
        disk does, even while no task comes to write. A task file removed or
        replaced while open is reported from then on (see ``_check_identity``).
        """
        if self._check_identity() is not None:
            return self._replaced
        if self._failure is not None and time.monotonic() - self._failed_at >= _PROBE_AFTER_S:
            # Promptly: a lock held by another program keeps the failure it caused, it does not hold /healthz.
            with contextlib.suppress(StoreUnavailable), self._step(wait=PROMPT_WAIT_S) as conn:
                conn.execute("UPDATE task_totals SET health_probes = health_probes + 1 WHERE id = 1")
        return self._failure

    # -- admission -------------------------------------------------------------

    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        """See ``TaskStore.admit``. Admissions that wait for the write lock together are written together.

        Each admission joins ``_admissions`` and then takes the write lock;
        whoever gets it first admits every admission waiting by then, in
        order, in one transaction (the outcome is that of admitting them one
        after the other), and those whose admission was done meanwhile just
        pass the lock on. Under concurrent requests this spares a
        transaction per request, and with ``FULL`` an fsync. The admissions
        are taken once the transaction has begun (see ``_admit_in``): the
        sqlite3 module lets other threads run while SQLite works, and those
        that reach ``admit`` meanwhile join this transaction, not the next.
        One task waiting alone is admitted by one statement (``_admit_alone``).
        """
        if self._replaced is not None or (time.monotonic() >= self._identity_due and self._check_identity()):
            raise StoreFileReplaced(self._replaced)
        # Encoded here, so that a payload that is not JSON fails this call alone.
        mine = _Admission([(task, _json(task.payload)) for task in tasks], time.monotonic() + self._busy_timeout)
        ticket = self._take_off() if self.synchronous == "FULL" else 0  # an fsync about to start waits for it
        try:
            with self._admissions_lock:
                self._admissions.append(mine)
            admitted = generation = 0
            # The busy timeout counts from here: a step of this process holding the lock may itself be
            # waiting for another program's, and the admission must not wait for it and then its own turn.
            if self._write_lock.acquire(timeout=max(0.0, mine.deadline - time.monotonic())):
                try:
                    if mine.outcomes is None:
                        admitted, generation = self._admit_batch()
                finally:
                    self._write_lock.release()
                    with self._admissions_lock:
                        self._settled.notify_all()
            else:
                self._outcome_of(mine)
        finally:
            if ticket:
                self._land(ticket)
        if admitted:
            with self._wakeup:
                for written in range(generation - admitted + 1, generation + 1):
                    self._wrote(written)
                self._admitted += admitted
                self._wakeup.notify(admitted)
            # Before this admission's own fsync, which its answer waits for either way: the admissions it
            # carried sync meanwhile (one fsync for all), and commits made during the copy join this one's
            # fsync. Syncing first made about 40 % more fsyncs with a checkpoint at every admission.
            self._checkpoint_if_due(_ADMISSION_CHECKPOINTS_AFTER)
        if mine.error is not None:
            raise mine.error
        if mine.failure is not None:
            raise (StoreOutOfSpace if mine.no_room else StoreUnavailable)(mine.failure)
        if mine.commit and self.synchronous == "FULL":
            try:
                self._sync_wal(mine.commit)
            except sqlite3.Error as exc:  # the tasks are admitted: only the fsync failed
                self._failure, self._failed_at = _describe(exc), time.monotonic()
                raise StoreNotSynced(self._failure, mine.outcomes) from None
        assert mine.outcomes is not None
        return mine.outcomes

    def _outcome_of(self, admission: _Admission) -> None:
        """Settle ``admission``, whose wait for the write lock timed out: refused if no step took it yet.

        A step that took it waits for SQLite's lock no longer than its deadline
        (see ``_begin_admitting``), or has begun already: its outcome comes soon.
        """
        with self._admissions_lock:
            if admission in self._admissions:
                self._admissions.remove(admission)
                admission.settle([], failure=_held_up(self._busy_timeout))
                return
            self._settled.wait_for(lambda: admission.outcomes is not None)

    def _admit_batch(self) -> tuple[int, int]:  # _write_lock is held
        """Admit the waiting admissions in one transaction, with their outcomes; how many were admitted, the generation.

        An error other than SQLite's (a bug, or a value the sqlite3 module
        cannot bind, such as a huge integer) belongs to the admission whose
        task raised it: the transaction is rolled back, that admission gets
        the error, and the others are admitted again without it.
        """
        batch: list[_Admission] = []  # what the attempts took so far, in order
        while True:
            try:
                return self._admit_once(batch)
            except _AdmissionFailed as failed:
                failed.admission.settle([], error=failed.error)
                batch.remove(failed.admission)

    def _admit_once(self, batch: list[_Admission]) -> tuple[int, int]:  # _write_lock is held
        """One transaction admitting ``batch`` and the admissions waiting now or once it began (added to ``batch``)."""
        outcomes: list[Task | SubmitError] = []
        generation = commit = 0
        self._take_admissions(batch)  # the caller's own among them, before anything can fail
        if not batch:
            return 0, 0
        if len(batch) == 1 and len(batch[0].tasks) == 1 and (alone := self._admit_alone(batch[0])) is not None:
            return alone
        try:
            conn, changes = self._begin_admitting(batch)
            try:
                generation = self._admit_in(conn, batch, outcomes)
                commit = self._commit(conn, changes)
            except BaseException:
                conn.rollback()  # nothing if the step ended its transaction itself
                raise
        except _AdmissionFailed:
            raise
        except BaseException as exc:
            failure = _describe(exc) if isinstance(exc, sqlite3.Error) else f"admission failed: {exc!r}"
            if isinstance(exc, sqlite3.Error):
                self._failure, self._failed_at = failure, time.monotonic()
            no_room = isinstance(exc, sqlite3.Error) and _no_room(exc)
            for admission in batch:
                admission.settle([], failure=failure, no_room=no_room)
            if not isinstance(exc, sqlite3.Error):
                raise  # a bug: the others in the batch report it as a store failure
            return 0, 0
        if self._failure is not None and self._local.wrote:
            self._failure = None
        start = 0
        for admission in batch:
            end = start + len(admission.tasks)
            admission.settle(outcomes[start:end], commit=commit)
            start = end
        return sum(isinstance(outcome, Task) for outcome in outcomes), generation

    def _begin_admitting(self, batch: list[_Admission]) -> tuple[sqlite3.Connection, int]:  # _write_lock is held
        """``_begin`` for ``batch``, each admission waiting for another process's lock until its own deadline.

        One whose deadline passes first leaves the batch, refused, and the others wait on: an admission
        answers within about the busy timeout, however long it waited for this process's lock.
        """
        while True:
            try:
                return self._begin(min(admission.deadline for admission in batch))
            except sqlite3.OperationalError as exc:
                now = time.monotonic()
                late = [admission for admission in batch if admission.deadline <= now]
                if _primary_code(exc) != sqlite3.SQLITE_BUSY or len(late) == len(batch):
                    raise
                failure = _describe(exc)
                self._failure, self._failed_at = failure, now
                for admission in late:
                    batch.remove(admission)
                    admission.settle([], failure=failure)

    def _admit_alone(self, admission: _Admission) -> tuple[int, int] | None:  # _write_lock is held
        """Admit the one task of ``admission`` by one statement that commits itself; None if it stored nothing.

        The common case (room under the bound, a new id) in one call into SQLite instead of a
        transaction's four (``BEGIN IMMEDIATE``, the admission read, the insert, ``COMMIT``), each of
        which lets the other threads of a busy server take the interpreter while the write lock is
        held. A full queue, a taken id (perhaps a task past its time), another process holding the
        lock or any error inserts nothing, and the transaction of ``_admit_once`` then decides
        and reports exactly as it does for any admission.
        """
        ((task, payload),) = admission.tasks
        try:
            conn = self._write_connection()
            if conn.in_transaction:  # a transaction left open (see _begin_immediate): the full path ends it
                return None
            values = (task.id, payload, task.max_retries, task.created_at, task.next_attempt_at, task.request_id)
            row = conn.execute(_ADMIT_ALONE, (*values, self.capacity)).fetchone()
        except Exception:  # nothing was stored: the full path meets the same error, and reports it
            return None
        if row is None:
            return None
        generation, created_at = row
        if created_at != task.created_at:  # clamped to the newest task's (see _admit_in)
            task = task._replace(created_at=float(created_at))  # SQLite returns a whole REAL as an integer
        self._commits += 1
        admission.settle([task], commit=self._commits)
        self._local.wrote = True
        self._failure = None
        return 1, generation

    def _take_admissions(self, batch: list[_Admission]) -> None:  # _write_lock is held
        """Move the admissions waiting for the write lock to the end of ``batch``."""
        with self._admissions_lock:
            batch += self._admissions
            self._admissions = []

    def _admit_in(self, conn: sqlite3.Connection, batch: list[_Admission], outcomes: list[Task | SubmitError]) -> int:
        """Admit the tasks of ``batch`` in the open transaction, in order; the last generation it wrote, or 0.

        Raises ``_AdmissionFailed`` for an error other than SQLite's, naming the admission it came from.
        """
        # One statement: the generation, the room left under the bound and the newest task's
        # creation time. Each task admitted below bumps the generation (what other processes' idle
        # workers poll) by one; under the write lock, they are then the ones that follow this one.
        generation, waiting, newest = conn.execute(_ADMISSION).fetchone()
        self._take_admissions(batch)  # those that arrived while SQLite began the transaction and read
        now = self._clock()
        horizon = now - self._ttl
        room = self.capacity - waiting
        # Submitters stamp created_at before this transaction, so racing submits may arrive out
        # of stamp order: clamp to the newest retained task's, keeping creation times
        # non-decreasing in seq (listing) order.
        last_created = -math.inf if newest is None else newest
        admitted = 0
        full: tuple[int, float | None] | None = None  # read at the first refusal: (delayed, due_in)
        for admission in batch:
            try:
                for task, payload in admission.tasks:
                    if task.created_at < last_created:
                        task = task._replace(created_at=last_created)
                    if room <= 0:  # a duplicate is reported as such even when there is no room
                        known = conn.execute(f"SELECT 1 FROM tasks WHERE id = ? AND {_RETAINED}", (task.id, horizon))
                        if known.fetchone():
                            outcomes.append(DuplicateTask(task.id))
                        else:
                            full = full or self._queue_delays(conn, now, waiting + admitted)
                            # The file's count, not this process's bound: a process with a larger
                            # QUEUE_SIZE (during a rolling change) may have admitted more.
                            outcomes.append(
                                QueueFull(self.capacity, delayed=full[0], due_in=full[1], waiting=waiting + admitted)
                            )
                    elif self._insert(conn, task, payload) or (
                        # The id may belong to a task past its time that no sweep deleted yet: forget it now.
                        self._forget_expired(conn, task.id, horizon) and self._insert(conn, task, payload)
                    ):
                        room -= 1
                        admitted += 1
                        last_created = task.created_at
                        outcomes.append(task)  # stored as given (clamped): its snapshot
                    else:
                        outcomes.append(DuplicateTask(task.id))
            except sqlite3.Error:
                raise
            except Exception as exc:
                raise _AdmissionFailed(admission, exc) from exc
        if not admitted:
            conn.rollback()  # a refusal writes nothing
            return 0
        return generation + admitted  # tasks_admitted counted each one (queued, waiting, a generation)

    @staticmethod
    def _queue_delays(conn: sqlite3.Connection, now: float, waiting: int) -> tuple[int, float | None]:
        """``QueueFull``'s ``delayed`` and ``due_in``, read in the open transaction: on a refusal only."""
        delayed, first_due = conn.execute(_DELAYED, {"now": now}).fetchone()
        return full_queue_delays(delayed=delayed, waiting=waiting, first_due=first_due, now=now)

    def _forget_expired(self, conn: sqlite3.Connection, task_id: str, horizon: float) -> bool:
        """Delete task ``task_id`` if it finished before ``horizon``; whether it did."""
        deleted = conn.execute("DELETE FROM tasks WHERE id = ? AND finished_at < ? RETURNING state", (task_id, horizon))
        return self._forget(deleted) > 0

    @staticmethod
    def _insert(conn: sqlite3.Connection, task: Task, payload: str) -> bool:
        """Insert a new queued task; False if its id is taken."""
        due = task.next_attempt_at if task.next_attempt_at is not None else task.created_at
        return bool(
            conn.execute(
                _INSERT,
                (
                    task.id,
                    payload,
                    task.max_retries,
                    task.created_at,
                    task.next_attempt_at,
                    task.request_id,
                    due,
                ),
            ).rowcount
        )

    # -- running ---------------------------------------------------------------

    def claim(self, owner: str, lease_until: float) -> Task | None:
        with self._wakeup:
            admitted, tickets, rescheduled = self._admitted, self._admitted - self._answered, self._rescheduled
        seen = getattr(self._local, "seen", None)
        if seen is not None and not tickets and seen[1] == rescheduled and not self._due_now(rescheduled):
            # This thread's last claim found nothing (a worker whose finish claimed nothing comes
            # straight back) and a read says nothing is due yet: the same answer as a claim, at
            # the moment of the read, without taking the write lock from those who write.
            return None
        with self._step(synced=False) as conn:  # lost in a power cut, the attempt runs again: at least once
            claimed = self._claim(conn, owner, lease_until, self._clock(), rescheduled)
        if claimed is None:
            self._claimed_nothing(admitted)
        return claimed

    def finish_and_claim(
        self,
        task_id: str,
        attempt: int,
        owner: str,
        *,
        error: str | None = None,
        result: Any = None,
        retry_at: float | None = None,
        lease_until: float,
        created_at: float | None = None,
    ) -> tuple[Task | None, Task | None]:
        """Both in one transaction: one commit (one fsync with ``FULL``) instead of two per task.

        When tasks come one at a time, a worker's end mostly finds none due:
        then one read of totals tells so, and gives the count of finished
        tasks that retention needs, and no claim statement runs. While tasks
        wait (tickets of this process unanswered, or this thread's last end
        claimed one), the claim goes first, as a read first would only add
        a statement.
        """
        with self._wakeup:
            admitted, tickets, rescheduled = self._admitted, self._admitted - self._answered, self._rescheduled
        try:
            claim_first = tickets or getattr(self._local, "claimed_last", False)
            with self._step() as conn:
                now = self._clock()
                # Without a claim first, the read of totals below gives retention's count instead.
                ended, generation, finished = self._finish(
                    conn, task_id, attempt, owner, now, error, result, retry_at, created_at, evict=False,
                    count=claim_first,
                )  # fmt: skip
                if claim_first:
                    if ended is not None:
                        self._evict(conn, now, finished=finished)
                    claimed = self._claim(conn, owner, lease_until, now, rescheduled)
                else:
                    seen_generation, finished, *due = conn.execute(_IDLE).fetchone()
                    if ended is not None:
                        self._evict(conn, now, finished=finished)  # it deletes finished tasks only: due times hold
                    next_due = _earliest(due)
                    if next_due is not None and next_due <= now:
                        claimed = self._claim(conn, owner, lease_until, now, rescheduled)
                    else:
                        claimed, self._local.seen = None, (seen_generation, rescheduled, next_due)
                self._local.claimed_last = claimed is not None
        except StoreNotSynced as exc:  # the end and the claim stand: the caller goes on with them, then raises
            exc.result = ended, claimed
            self._after_end(generation, claimed, admitted)
            raise
        self._after_end(generation, claimed, admitted)
        return ended, claimed

    def _after_end(self, generation: int, claimed: Task | None, admitted: int) -> None:
        """Tell this process's waiting workers what a committed end (and claim) changed."""
        if generation:
            self._rescheduled_by_us(generation)
        if claimed is None:
            self._claimed_nothing(admitted)

    def _claim(
        self, conn: sqlite3.Connection, owner: str, lease_until: float, now: float, rescheduled: int
    ) -> Task | None:
        check_transition(State.QUEUED, State.RUNNING)
        row = conn.execute(_CLAIM, {"now": now, "owner": owner, "until": lease_until}).fetchone()
        if row is not None:
            self._local.seen = None
            task = _task(row)
            self._count("queued", -1)
            self._count("running", 1)
            if task.attempts == 1:
                self._count("waiting", -1)
            return task
        # What this claim saw; a later change ends the next wait_for_work of this thread.
        generation, _, *due = conn.execute(_IDLE).fetchone()
        self._local.seen = (generation, rescheduled, _earliest(due))
        return None

    def _due_now(self, rescheduled: int) -> bool:
        """Whether a task is due (read only); if not, what was seen then is this thread's new ``seen``."""
        now = self._clock()
        try:
            ((generation, _, *due),) = self._query(_IDLE)
        except StoreUnavailable:
            return True  # the claim itself will tell
        next_due = _earliest(due)
        if next_due is not None and next_due <= now:
            return True
        self._local.seen = (generation, rescheduled, next_due)
        return False

    def _claimed_nothing(self, admitted: int) -> None:
        with self._wakeup:  # nothing was due: the admissions older than this claim announce nothing
            self._answered = max(self._answered, admitted)

    def seconds_until_due(self) -> float | None:
        (found,) = self._query(_NEXT_DUE_TIMES)
        due = [d for d in found if d is not None]
        return max(0.0, min(due) - self._clock()) if due else None

    def wait_for_work(self, timeout: float | None) -> None:
        """Return when work may be claimable: admitted here or elsewhere, due by its time, ``wake``, or ``timeout``.

        A task admitted by this process wakes one waiting worker at once;
        work queued by another process is noticed by polling the file's
        generation (1 ms at first, backing off to ``poll_max`` while no other
        process queues work; the back-off goes on from one wait to the next,
        but no pause lasts past the earliest due time or ``timeout``). Due times and
        ``timeout`` are read on the store's clock; the polling runs on real
        time, so a test's fake clock is noticed within ``poll_max``.
        """
        seen = getattr(self._local, "seen", None)
        self._local.seen = None
        try:
            if seen is None:
                generation, until_due = self._read_generation(), self.seconds_until_due()
            else:  # what the claim that found nothing saw, in its own transaction: no read needed
                generation, next_due = seen[0], seen[2]
                until_due = None if next_due is None else max(0.0, next_due - self._clock())
        except StoreUnavailable:
            return  # the caller's next step reports the failure
        rescheduled = self._rescheduled if seen is None else seen[1]
        if until_due is not None and (timeout is None or until_due < timeout):
            timeout = until_due
        deadline = None if timeout is None else self._clock() + timeout
        # The back-off goes on from this thread's last wait unless that one ended with another process's
        # work: work of this process wakes a worker at once, and polling the file for it costs a read and
        # a wake-up each time (one per task and more while tasks come one by one).
        interval = getattr(self._local, "poll", self._poll_min)
        while deadline is None or (left := deadline - self._clock()) > 0:
            # A pause never outlasts the wait, however far the polling backed off: work falling due ends it on time.
            pause = interval if deadline is None else min(interval, left)
            with self._wakeup:
                if self._wakeup.wait_for(
                    lambda: self._woken or self._admitted > self._answered or self._rescheduled != rescheduled, pause
                ):
                    if self._admitted > self._answered and not self._woken and self._rescheduled == rescheduled:
                        self._answered += 1
                    break
            try:
                now_generation = self._read_generation()
            except StoreUnavailable:
                break
            # Work queued here since is announced by tickets and reschedules, but one of those may
            # have been answered by a worker that claimed another process's work: any generation
            # in between that this process did not write is news.
            with self._wakeup:
                if not self._only_ours(generation, now_generation):
                    interval = self._poll_min  # another process queues work: look often again
                    break
            generation = now_generation
            interval = min(interval * 2, self._poll_max)
        self._local.poll = interval

    def _read_generation(self) -> int:
        return self._query(_GENERATION)[0][0]

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
        created_at: float | None = None,
    ) -> Task | None:
        try:
            with self._step() as conn:
                task, generation, _ = self._finish(
                    conn, task_id, attempt, owner, self._clock(), error, result, retry_at, created_at
                )  # fmt: skip
        except StoreNotSynced as exc:  # the end stands: the caller goes on with it, then raises
            exc.result = task
            if generation:
                self._rescheduled_by_us(generation)
            raise
        if generation:
            self._rescheduled_by_us(generation)
        return task

    def _finish(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        attempt: int,
        owner: str,
        now: float,
        error: str | None,
        result: Any,
        retry_at: float | None,
        created_at: float | None,
        *,
        evict: bool = True,
        count: bool = True,
    ) -> tuple[Task | None, int, int | None]:
        """End the attempt: its snapshot (None for a late writer), the generation it queued work at (or 0), and
        the finished tasks in totals (read by the same statement, with ``count`` or ``evict``; else None).

        ``evict=False``: the caller applies retention itself before the commit.
        """
        finished: list[int] | None = [] if count or evict else None
        task = self._end_attempt(
            conn, task_id, attempt, owner, now, error=error, result=result, retry_at=retry_at, finished=finished,
            created_at=created_at,
        )  # fmt: skip
        if task is None:  # a late writer: recovered, abandoned or forgotten meanwhile
            return None, 0, None
        total = finished[0] if finished else None
        if evict:
            self._evict(conn, now, finished=total)
        return task, _next_generation(conn) if task.state is State.QUEUED else 0, total

    def _wrote(self, generation: int) -> None:  # _wakeup is held
        """This process wrote ``generation`` (its work is announced here by a ticket or a reschedule)."""
        self._generation = max(self._generation, generation)
        self._written.add(generation)
        if len(self._written) > _WRITTEN_KEPT:
            self._written = {g for g in self._written if g > self._generation - _WRITTEN_KEPT // 2}

    def _only_ours(self, since: int, now: int) -> bool:  # _wakeup is held
        """Whether every generation after ``since`` up to ``now`` was written by this process."""
        return since <= now <= since + len(self._written) and all(g in self._written for g in range(since + 1, now + 1))

    def _rescheduled_by_us(self, generation: int) -> None:
        """Work was queued again here (a retry, a recovery): every waiting worker recomputes its due time."""
        with self._wakeup:
            self._wrote(generation)
            self._rescheduled += 1
            self._wakeup.notify_all()

    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        ids = list(task_ids)
        if not ids:
            return Renewal(lost=frozenset(), cancel_requested=frozenset())
        with self._step(synced=False) as conn:
            rows = conn.execute(
                f"""UPDATE tasks SET lease_until = ?
                    WHERE state = 'running' AND lease_owner = ? AND id IN ({",".join("?" * len(ids))})
                    RETURNING id, cancel_requested""",
                (lease_until, owner, *ids),
            ).fetchall()
        held = {task_id for task_id, _ in rows}
        return Renewal(
            lost=frozenset(ids) - held,
            cancel_requested=frozenset(task_id for task_id, requested in rows if requested),
        )

    def cancel_requested(self, task_ids: Iterable[str]) -> frozenset[str]:
        ids = list(task_ids)
        if not ids:
            return frozenset()
        # One read of the rows by their unique id: no write, no write lock.
        rows = self._query(f"SELECT id FROM tasks WHERE id IN ({','.join('?' * len(ids))}) AND cancel_requested", ids)
        return frozenset(task_id for (task_id,) in rows)

    def cancel(self, task_id: str) -> tuple[Task | None, bool]:
        try:
            # A request: it waits the busy timeout at most, for this process's lock and SQLite's together.
            with self._step(wait=self._busy_timeout) as conn:
                now = self._clock()
                row = conn.execute(
                    f"""UPDATE tasks SET cancel_requested = (state = 'running'),
                            state = CASE state WHEN 'queued' THEN 'cancelled' ELSE state END,
                            finished_at = CASE state WHEN 'queued' THEN :now ELSE finished_at END,
                            payload = CASE state WHEN 'queued' THEN NULL ELSE payload END,
                            next_attempt_at = CASE state WHEN 'queued' THEN NULL ELSE next_attempt_at END,
                            state_seq = CASE state WHEN 'queued' THEN {_NEXT_STATE_SEQ}
                                        ELSE state_seq END
                        WHERE id = :id AND (state = 'queued' OR (state = 'running' AND NOT cancel_requested))
                        RETURNING {_COLUMNS}""",
                    {"now": now, "id": task_id},
                ).fetchone()
                if row is None:  # unknown, final, or its cancel requested already
                    return self._get(conn, task_id, now), False
                task = _task(row)
                if task.state is not State.RUNNING:
                    check_transition(State.QUEUED, task.state)
                    self._count("queued", -1)
                    self._count(task.state.value, 1)
                    if task.attempts == 0:
                        self._count("waiting", -1)
                    self._evict(conn, now)
        except StoreNotSynced as exc:  # the cancel stands: the caller reports it, then raises
            exc.result = task, True
            raise
        return task, True

    def recover(
        self,
        retry_at: Callable[[Task], float | None],
        *,
        before: float | None = None,
        unreachable: tuple[float, float] | None = None,
    ) -> list[Task]:
        recovered = []
        self._check_identity()  # the sweep's cadence: a removal is noticed even while no task comes
        try:
            with self._step() as conn:
                now = self._clock()
                cutoff = now if before is None else min(now, before)
                owners = conn.execute("SELECT DISTINCT lease_owner FROM tasks WHERE state = 'running'").fetchall()
                dead = [owner for (owner,) in owners if _process_is_gone(owner)]
                rows = conn.execute(
                    f"""SELECT {_COLUMNS}, lease_owner, lease_until FROM tasks WHERE state = 'running'
                        AND (lease_until < ? OR lease_owner IN ({",".join("?" * len(dead))}))""",
                    (cutoff, *dead),
                ).fetchall()
                for row in rows:
                    task, cancel_requested, owner, lease_until = _task(row[:-2]), row[-3], row[-2], row[-1]
                    due = None if cancel_requested else retry_at(task)
                    if owner in dead:  # whenever its lease expired: the process is known to be gone
                        why = LOST_GONE
                    else:
                        why = LOST_UNREACHABLE if lost_while_unreachable(lease_until, unreachable) else LOST
                    ended = self._end_attempt(conn, task.id, task.attempts, owner, now, error=why, retry_at=due)
                    recovered.append(cast(Task, ended))  # the row was read in this transaction
                if recovered:
                    self._evict(conn, now)
                requeued = any(task.state is State.QUEUED for task in recovered)
                generation = _next_generation(conn) if requeued else 0
        except StoreNotSynced as exc:  # the attempts are ended: the caller reports them, then raises
            exc.result = recovered
            if generation:
                self._rescheduled_by_us(generation)
            raise
        if generation:
            self._rescheduled_by_us(generation)
        return recovered

    def put_back(self, task_id: str, attempt: int, owner: str) -> Task | None:
        try:
            with self._step() as conn:
                now = self._clock()
                row = conn.execute(
                    _PUT_BACK, {"id": task_id, "attempt": attempt, "owner": owner, "now": now}
                ).fetchone()
                if row is None:  # abandoned, recovered or forgotten meanwhile
                    return None
                task = _task(row)
                check_transition(State.RUNNING, task.state)
                self._count("running", -1)
                self._count(task.state.value, 1)
                if task.state is State.QUEUED:
                    if task.attempts == 0:
                        self._count("waiting", 1)
                    generation = _next_generation(conn)
                else:
                    generation = 0
                    self._evict(conn, now)
        except StoreNotSynced as exc:  # the task is back: the caller goes on with it, then raises
            exc.result = task
            if generation:
                self._rescheduled_by_us(generation)
            raise
        if generation:
            self._rescheduled_by_us(generation)
        return task

    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        abandoned = []
        try:
            with self._step() as conn:
                now = self._clock()
                rows = conn.execute(
                    "SELECT id, attempts FROM tasks WHERE state = 'running' AND lease_owner = ?", (owner,)
                ).fetchall()
                for task_id, attempt in rows:
                    abandoned.append(cast(Task, self._end_attempt(conn, task_id, attempt, owner, now, error=reason)))
                if abandoned:
                    self._evict(conn, now)
        except StoreNotSynced as exc:  # the attempts are ended: the caller reports them, then raises
            exc.result = abandoned
            raise
        return abandoned

    # -- reading ---------------------------------------------------------------

    def get(self, task_id: str) -> Task | None:
        return self._read(lambda conn: self._get(conn, task_id, self._clock()))

    def _get(self, conn: sqlite3.Connection, task_id: str, now: float) -> Task | None:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM tasks WHERE id = ? AND {_RETAINED}", (task_id, now - self._ttl)
        ).fetchone()
        return None if row is None else _task(row)

    def list(self, state: State | None = None, limit: int = 100, *, results: bool = True) -> list[Task]:
        horizon = self._clock() - self._ttl
        columns = _LISTED_COLUMNS if results else _LISTED_BUT_RESULT
        if state is None:
            query = f"SELECT {columns} FROM tasks WHERE {_RETAINED} ORDER BY seq DESC LIMIT ?"
            args: tuple[Any, ...] | dict[str, Any] = (horizon, limit)
        elif State(state) is State.QUEUED:  # never finished: always retained, and without a result
            return self.page(State.QUEUED, limit).tasks
        else:
            # The state written out (a State's value): the partial index serves a constant only.
            query = f"SELECT {columns} FROM tasks WHERE state = '{State(state).value}' AND {_RETAINED} "
            query += "ORDER BY state_seq DESC LIMIT ?"
            args = (horizon, limit)
        return self._read(lambda conn: [_task(row) for row in conn.execute(query, args)])

    def page(
        self, state: State | None = None, limit: int = 100, *, results: bool = True, after: Position | None = None
    ) -> Page:
        """A page of ``list``, each a range of an index read newest first from ``after``, never an offset.

        Positions: ``(seq,)`` for every task; ``(state_seq, seq)`` by state (``state_seq`` may tie: the tasks
        one step moves share it); for queued tasks also the lowest ``seq`` of the new tasks in order listed so
        far, so that they are read on from there, and the lowest any had when the walk's second page was read,
        where the reading stops (see _PAGE_QUEUED).
        """
        horizon = self._clock() - self._ttl
        columns = _LISTED_COLUMNS if results else _LISTED_BUT_RESULT
        value = None if state is None else State(state).value
        if value == "queued":
            return self._page_queued(limit, after)
        size = 1 if value is None else 2
        position = (_PAST_ANY,) * size if after is None else check_position(after, size)
        query = _page_query(value, columns)
        rows = self._read(lambda conn: conn.execute(query, (horizon, *position, limit + 1)).fetchall())
        tasks = [_task(row[size:]) for row in rows[:limit]]
        return Page(tasks, rows[limit - 1][:size] if len(rows) > limit else None)

    def _page_queued(self, limit: int, after: Position | None) -> Page:
        """A page of queued tasks (see _PAGE_QUEUED); a walk's second page also reads where its table reads stop.

        The first page needs no floor: its table read stops at as many as wait in order. The floor is read
        with the second page, in its transaction, not with the first, which every listing and poll of the
        newest queued tasks reads; then it is carried on (no new task in order is ever below it again).
        """
        if after is None:
            state_seq, seq, below, floor = _PAST_ANY, _PAST_ANY, _PAST_ANY, _FLOOR_UNREAD
        else:
            state_seq, seq, below, floor = check_position(after, 4)

        def read(conn: sqlite3.Connection) -> tuple[list[Any], int]:
            oldest = floor
            if after is not None and oldest == _FLOOR_UNREAD:
                oldest = conn.execute(_OLDEST_NEW).fetchone()[0] or _PAST_ANY
            args = {"state_seq": state_seq, "seq": seq, "below": below, "floor": oldest, "limit": limit + 1}
            return conn.execute(_PAGE_QUEUED, args).fetchall(), oldest

        rows, floor = self._read(read)
        tasks = [_task(row[3:]) for row in rows[:limit]]
        if len(rows) <= limit:
            return Page(tasks, None)
        last_state_seq, last_seq = rows[limit - 1][:2]
        below = min((row[1] for row in rows[:limit] if row[2]), default=below)  # the next page's are below
        return Page(tasks, (last_state_seq, last_seq, below, floor))

    def position_key(self) -> bytes:
        return self._position_key

    def stats(self) -> StoreStats:
        """The figures, read promptly: within ``PROMPT_WAIT_S`` when another program holds the write lock.

        A write step forgets the finished tasks whose time is up first (up to
        ``_FORGOTTEN_PER_STEP``: after a mass expiry, the ones left are counted
        until later steps forget them); the counts are read after its commit, in a snapshot of
        their own, so that no step waits while they are counted. When the write lock is not free within
        ``PROMPT_WAIT_S``, the figures are read as last committed (a reader
        does not wait for the lock; finished tasks whose time is up are then
        still counted, until the next write step forgets them). Once the lock
        has stayed out of reach for ``LOCKED_AFTER_S``, no step of this
        process having begun meanwhile (another program holds it: an
        admission would wait the busy timeout, then fail), ``unavailable``
        says so; a lock that is only contended is not reported.
        """
        began = time.monotonic()
        unavailable = None
        try:
            with self._step(wait=PROMPT_WAIT_S) as conn:
                self._evict(conn, self._clock(), sweep=True)
        except _HeldUp:
            since = self._held_up_since
            if since is None:
                self._held_up_since = since = began
            out_of_reach = time.monotonic() - since
            unavailable = _locked(out_of_reach) if out_of_reach >= LOCKED_AFTER_S else None
        figures = self._read(lambda conn: _figures(conn, self._clock()), wait=PROMPT_WAIT_S)
        return figures if unavailable is None else dataclasses.replace(figures, unavailable=unavailable)

    def unfinished(self, owner: str | None = None) -> int:
        if owner is None:
            return self._query("SELECT queued + running FROM task_totals")[0][0]
        return self._read(
            lambda conn: conn.execute(
                "SELECT count(*) FROM tasks WHERE state = 'running' AND lease_owner = ?", (owner,)
            ).fetchone()[0]
        )

    # -- retention -------------------------------------------------------------

    def _evict(self, conn: sqlite3.Connection, now: float, *, sweep: bool = False, finished: int | None = None) -> None:
        """Forget the oldest finished tasks over ``max_finished``, and (``sweep`` or once a second) the expired.

        Readers never see a task past its time, deleted or not: sweeping once
        a second saves a statement in nearly every step. Each forgets
        ``_FORGOTTEN_PER_STEP`` tasks at most, so that no step holds the write
        lock for long: a sweep that leaves expired tasks behind is followed by
        another ``_SWEEP_BEHIND_S`` later, and tasks over ``max_finished`` go
        at the next steps. ``finished``: the finished tasks in totals, if the
        step has read them already (totals changes only at the commit, so any
        read in the step gives the same).
        """
        interval = _SWEEP_BEHIND_S if self._sweep_behind else _SWEEP_INTERVAL_S
        if sweep or now >= self._swept_at + interval or now < self._swept_at:
            expired = self._forget(conn.execute(_FORGET_EXPIRED, (now - self._ttl, _FORGOTTEN_PER_STEP)))
            self._swept_at, self._sweep_behind = now, expired == _FORGOTTEN_PER_STEP
        if finished is None:
            (finished,) = conn.execute(_FINISHED).fetchone()
        finished += sum(self._deltas.get(state, 0) for state in _FINAL)  # this step's, not yet in totals
        if finished > self._max_finished:
            self._forget(conn.execute(_FORGET_OLDEST, (min(finished - self._max_finished, _FORGOTTEN_PER_STEP),)))

    def _forget(self, deleted: Iterable[tuple[str]]) -> int:
        """Take the tasks a ``DELETE ... RETURNING state`` deleted out of totals; how many there were."""
        forgotten = 0
        for (state,) in deleted:
            self._count(state, -1)
            forgotten += 1
        return forgotten

    def _end_attempt(
        self,
        conn: sqlite3.Connection,
        task_id: str,
        attempt: int,
        owner: str,
        now: float,
        *,
        error: str | None,
        result: Any = None,
        retry_at: float | None = None,
        finished: list[int] | None = None,
        created_at: float | None = None,
    ) -> Task | None:
        """End attempt ``attempt`` of a task ``owner`` runs (with ``created_at``, the task created then); None if it
        does not (a late writer).

        ``finished``: gets the finished tasks in totals, read by the same statement (retention's count,
        for the step's ``_evict``: a statement of its own cost as much as the end, under the write lock).
        """
        row = conn.execute(
            _END_ATTEMPT if finished is None else _END_ATTEMPT_COUNTING,
            {
                "id": task_id,
                "attempt": attempt,
                "owner": owner,
                "now": now,
                "error": error,
                "retry_at": retry_at,
                "result": None if error is not None or result is None else _json(result),
                "created_at": created_at,
            },
        ).fetchone()
        if row is None:
            return None
        if finished is not None:
            finished.append(row[-1])
            row = row[:-1]
        task = _task(row)
        check_transition(State.RUNNING, task.state)
        self._count("running", -1)
        self._count(task.state.value, 1)
        return task


# The two kinds of queued tasks, each with the partial index that yields them in claim order.
_QUEUED = (("tasks_retry", "attempts > 0"), ("tasks_new", "attempts = 0"))
# The next task to claim at :now: the first due retry (they were accepted earlier), else the
# task due longest. Two index probes, one expression: coalesce evaluates the second only when the
# first finds nothing, and no temporary b-tree sorts them (as ORDER BY over a UNION ALL did).
_NEXT_DUE = (
    "SELECT coalesce("
    + ", ".join(
        f"""(SELECT seq FROM tasks INDEXED BY {index}
            WHERE state = 'queued' AND {kind} AND due_at <= :now ORDER BY due_at, seq LIMIT 1)"""
        for index, kind in _QUEUED
    )
    + ")"
)
# The next position in the newest-first listing of a state other than queued: one past every position
# handed out before (``entries`` grows by each task entering such a state, as the step commits), so a task
# entering the state lists ahead of a walk begun before, even once the newest tasks have left the state
# (the highest position in the state, plus one, came again then). The tasks one step moves into a state
# share a position, and list by creation.
_NEXT_STATE_SEQ = "(SELECT entries + 1 FROM task_totals)"
_ENTERED = frozenset(state.value for state in State if state is not State.QUEUED)
# A queued task's position in the listing of queued tasks (not in the by-state index, see _PAGE_QUEUED):
# the generation that queues it. Each admitted task bumps the generation by one (tasks_admitted, after
# the insert), so new tasks' positions grow with seq; a retry's step bumps it once after its end
# (the tasks one recovery queues again share a position, and list by creation).
_QUEUED_STATE_SEQ = "(SELECT generation + 1 FROM task_totals)"
# A new task put back unrun (see _PUT_BACK) enters the queue again out of seq order: its due time is then the
# negative of its position, so that it is due at once, ahead of every other new task in tasks_new (claimed first,
# where it was claimed from), and the listing of queued tasks finds the few such tasks as a range of that index.
_PUT_BACK_DUE = f"-{_QUEUED_STATE_SEQ}"
_NEW_IN_ORDER = "state = 'queued' AND attempts = 0 AND due_at >= 0"  # new tasks that entered the queue in seq order
_PUT_BACK_NEW = "state = 'queued' AND attempts = 0 AND due_at < 0"
# The seq of the oldest new task in order: where the table read of a walk's later pages stops (see _PAGE_QUEUED),
# a pass over the new tasks' entries; below any seq until read (the first page needs none).
_OLDEST_NEW = f"SELECT min(seq) FROM tasks INDEXED BY tasks_new WHERE {_NEW_IN_ORDER}"
_FLOOR_UNREAD = 0


def _page_query(state: str | None, columns: str) -> str:
    """The query of a page after a position (see SqliteStore.page): a range of an index read newest first.
    Queued tasks have their own (_PAGE_QUEUED)."""
    if state is None:
        return f"SELECT seq, {columns} FROM tasks WHERE {_RETAINED} AND seq < ? ORDER BY seq DESC LIMIT ?"
    # The state written out (a State's value), as in list(): the partial index serves a constant only.
    return (
        f"SELECT state_seq, seq, {columns} FROM tasks WHERE state = '{state}' AND {_RETAINED} "
        "AND (state_seq, seq) < (?, ?) ORDER BY state_seq DESC, seq DESC LIMIT ?"
    )


# A position past every task's (see SqliteStore.page): where the first page starts.
_PAST_ANY = 2**63 - 1
# Queued tasks newest first by their entry into the queue (positions: _QUEUED_STATE_SEQ), after the position
# (:state_seq, :seq) (past any for the first page), each marked whether it is a new task in order. New tasks enter
# the queue in seq order (put back ones aside): the table is read backwards from below the lowest seq of the new
# tasks in order listed so far (:below), stopping at as many as wait in order, and at the oldest of them when the
# walk's second page was read (:floor), which no later one is below; this passes only the rows in between of tasks
# that have left the queue (in claim order, those of tasks that were due earlier, such as a delayed task's
# successors). New tasks put back, from their range of tasks_new; retries, from their index by position, below
# the position.
_PAGE_QUEUED = f"""SELECT state_seq, seq, in_order, {_LISTED_COLUMNS} FROM (
    SELECT * FROM (SELECT {_LISTED_COLUMNS}, state_seq, seq, 1 AS in_order FROM tasks NOT INDEXED
        WHERE {_NEW_IN_ORDER} AND seq >= :floor AND seq < :below AND (state_seq, seq) < (:state_seq, :seq)
        ORDER BY seq DESC LIMIT min(:limit, (SELECT waiting FROM task_totals)
            - (SELECT count(*) FROM tasks INDEXED BY tasks_new WHERE {_PUT_BACK_NEW})))
    UNION ALL
    SELECT {_LISTED_COLUMNS}, state_seq, seq, 0 FROM tasks INDEXED BY tasks_new
        WHERE {_PUT_BACK_NEW} AND (state_seq, seq) < (:state_seq, :seq)
    UNION ALL
    SELECT * FROM (SELECT {_LISTED_COLUMNS}, state_seq, seq, 0 FROM tasks INDEXED BY tasks_retry_by_entry
        WHERE state = 'queued' AND attempts > 0 AND (state_seq, seq) < (:state_seq, :seq)
        ORDER BY state_seq DESC, seq DESC LIMIT :limit)
) ORDER BY state_seq DESC, seq DESC LIMIT :limit"""
# The due time of the next retry and of the next new task, each read from its own index.
_NEXT_DUE_TIMES = "SELECT " + ", ".join(
    f"(SELECT min(due_at) FROM tasks INDEXED BY {index} WHERE state = 'queued' AND {kind})" for index, kind in _QUEUED
)
# What a full queue's refusal tells: how many new tasks are not due yet (a range of the index of new
# tasks), and the due time of the next new task (a retry's holds no place and frees none).
_DELAYED = (
    "SELECT (SELECT count(*) FROM tasks INDEXED BY tasks_new"
    " WHERE state = 'queued' AND attempts = 0 AND due_at > :now),"
    " (SELECT min(due_at) FROM tasks INDEXED BY tasks_new WHERE state = 'queued' AND attempts = 0)"
)
_GENERATION = "SELECT generation FROM task_totals"
_FINAL = ("done", "failed", "cancelled")
_FINISHED = f"SELECT {' + '.join(_FINAL)} FROM task_totals"
# What a claim that found nothing saw: the generation, and the due times of the next retry and of the
# next new task (the worker then waits for the earlier one, or news; see SqliteStore.wait_for_work);
# with the finished tasks that retention counts (see finish_and_claim).
_IDLE = _NEXT_DUE_TIMES.replace("SELECT ", f"SELECT generation, {' + '.join(_FINAL)}, ", 1) + " FROM task_totals"
# Claim the next due task: it runs under the owner's lease.
_CLAIM = f"""UPDATE tasks SET state = 'running', attempts = attempts + 1, started_at = :now,
        next_attempt_at = NULL, lease_owner = :owner, lease_until = :until,
        state_seq = {_NEXT_STATE_SEQ}
    WHERE seq = ({_NEXT_DUE}) RETURNING {_COLUMNS}"""
# What admission reads first (see SqliteStore.admit). Reads and single-row updates by key: a
# RETURNING clause or an IN list would make SQLite build a temporary b-tree for every execution.
_ADMISSION = "SELECT generation, waiting, (SELECT created_at FROM tasks ORDER BY seq DESC LIMIT 1) FROM task_totals"


@functools.cache
def _add_to_totals(names: tuple[str, ...]) -> str:
    """The UPDATE adding one parameter to each column of totals in ``names`` (names of its columns only)."""
    return f"UPDATE task_totals SET {', '.join(f'{name} = {name} + ?' for name in names)} WHERE id = 1"


_INSERT = f"""INSERT INTO tasks (id, payload, max_retries, state, attempts, created_at, next_attempt_at,
        request_id, due_at, state_seq)
    VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?, {_QUEUED_STATE_SEQ})
    ON CONFLICT (id) DO NOTHING"""
# The admission of one task as one statement, outside any transaction (see SqliteStore._admit_alone):
# the bound (a full queue makes the id NULL, which OR IGNORE skips like a taken id), the creation
# time clamped to the newest task's, and the task's position, which is the generation its insert counts.
_NEWEST_CREATED = "coalesce((SELECT created_at FROM tasks ORDER BY seq DESC LIMIT 1), ?4)"
_ADMIT_ALONE = f"""INSERT OR IGNORE INTO tasks (id, payload, max_retries, state, attempts, created_at,
        next_attempt_at, request_id, due_at, state_seq)
    VALUES (CASE WHEN (SELECT waiting FROM task_totals) < ?7 THEN ?1 END, ?2, ?3, 'queued', 0,
        max(?4, {_NEWEST_CREATED}), ?5, ?6, coalesce(?5, max(?4, {_NEWEST_CREATED})), {_QUEUED_STATE_SEQ})
    RETURNING state_seq, created_at"""
# Finished tasks past their retention are invisible even before a write step deletes them.
_RETAINED = "(finished_at IS NULL OR finished_at >= ?)"
# Retention's deletes, oldest first along tasks_finished, a bounded number at a time (see SqliteStore._evict).
_FORGET_EXPIRED = """DELETE FROM tasks WHERE seq IN
    (SELECT seq FROM tasks WHERE finished_at < ? ORDER BY finished_at LIMIT ?) RETURNING state"""
_FORGET_OLDEST = """DELETE FROM tasks WHERE seq IN
    (SELECT seq FROM tasks WHERE finished_at IS NOT NULL ORDER BY finished_at, seq LIMIT ?) RETURNING state"""


# The queued tasks not yet due, new and retried: each counted on its partial index (a range of due_at),
# never by reading the table, whose retained finished tasks may outnumber them many times. The due
# ones are the rest of totals' queued: a backlog of due tasks costs nothing to count.
_NOT_YET_DUE = """SELECT
    (SELECT count(*) FROM tasks WHERE state = 'queued' AND attempts = 0 AND due_at > :now),
    (SELECT count(*) FROM tasks WHERE state = 'queued' AND attempts > 0 AND due_at > :now)"""


def _figures(conn: sqlite3.Connection, now: float) -> StoreStats:
    """The figures of ``stats``, read on ``conn`` in its open transaction."""
    counts = dict(zip(_TOTALS, conn.execute(f"SELECT {', '.join(_TOTALS)} FROM task_totals").fetchone()))
    new_later, retries_pending = conn.execute(_NOT_YET_DUE, {"now": now}).fetchone()
    return StoreStats(
        counts={state: counts.get(state.value, 0) for state in State},
        waiting=counts["waiting"],
        due=counts[State.QUEUED.value] - new_later - retries_pending,
        retries_pending=retries_pending,
    )


def _held_up(waited: float | None) -> str:
    return f"the database is locked: its write lock was not free within {waited:g} s (another process holds it)"


def _locked(seconds: float) -> str:
    return (
        f"the database is locked: its write lock has been out of reach for {seconds:.1f} s (another process holds it)"
    )


def _begin_immediate(conn: sqlite3.Connection) -> None:
    """Open a write transaction, taking the database's write lock (``SQLITE_BUSY`` if another process holds it).

    ``executescript``, ``commit`` and ``rollback`` each hand the interpreter
    to other threads once, around the whole call into SQLite; ``execute``
    does so five times for a statement (counting its parameters and
    columns, stepping it, asking the last row id, resetting it), and each
    time a busy server's other threads may take the interpreter while this
    step holds the write lock. ``executescript`` commits a transaction left
    open first: every step ends its own, but one whose rollback was cut
    short (an interrupt landing in its error path) must not have its writes
    committed by the next step, so such a transaction is rolled back here.
    """
    if conn.in_transaction:  # an attribute: no call into SQLite
        conn.rollback()
    conn.executescript("BEGIN IMMEDIATE")


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``script`` statement by statement inside the open transaction (``executescript`` would commit it)."""
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""


# The end of an attempt, as one compare-and-set: nothing happens unless the task still runs that
# attempt under that owner (and, given its creation time, is the same task, not a new one with its
# id). The outcome: done without an error; cancelled if its cancellation was requested; queued again
# for a retry at :retry_at; failed otherwise.
_NEW_STATE = """CASE WHEN :error IS NULL THEN 'done' WHEN cancel_requested THEN 'cancelled'
    WHEN :retry_at IS NOT NULL THEN 'queued' ELSE 'failed' END"""
_IS_FINAL = "(:error IS NULL OR cancel_requested OR :retry_at IS NULL)"
_NEXT_STATE_SEQ_BY_NEW_STATE = f" WHEN 'queued' THEN {_QUEUED_STATE_SEQ} ELSE {_NEXT_STATE_SEQ}"
_END_ATTEMPT = f"""UPDATE tasks SET state = {_NEW_STATE},
        last_error = coalesce(:error, last_error),
        result = CASE WHEN :error IS NULL THEN :result END,
        finished_at = CASE WHEN {_IS_FINAL} THEN :now END,
        next_attempt_at = CASE WHEN {_IS_FINAL} THEN NULL ELSE :retry_at END,
        due_at = CASE WHEN {_IS_FINAL} THEN due_at ELSE :retry_at END,
        payload = CASE WHEN {_IS_FINAL} THEN NULL ELSE payload END,
        lease_owner = NULL, lease_until = NULL,
        state_seq = CASE {_NEW_STATE}{_NEXT_STATE_SEQ_BY_NEW_STATE} END
    WHERE id = :id AND state = 'running' AND attempts = :attempt AND lease_owner = :owner
        AND (:created_at IS NULL OR created_at = :created_at)
    RETURNING {_COLUMNS}"""
# The same, returning also the finished tasks in totals (which a step changes only at its commit).
_END_ATTEMPT_COUNTING = _END_ATTEMPT + f", ({_FINISHED})"
# A claim undone before its attempt started (see TaskStore.put_back), as one compare-and-set: queued again with
# the attempt not counted (a new task first in line, see _PUT_BACK_DUE; a retry due now), or cancelled if its
# cancellation was requested meanwhile.
_PUT_BACK = f"""UPDATE tasks SET state = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'queued' END,
        attempts = attempts - 1,
        started_at = CASE WHEN attempts = 1 THEN NULL ELSE started_at END,
        finished_at = CASE WHEN cancel_requested THEN :now END,
        next_attempt_at = CASE WHEN cancel_requested OR attempts = 1 THEN NULL ELSE :now END,
        due_at = CASE WHEN cancel_requested THEN due_at WHEN attempts = 1 THEN {_PUT_BACK_DUE} ELSE :now END,
        payload = CASE WHEN cancel_requested THEN NULL ELSE payload END,
        lease_owner = NULL, lease_until = NULL,
        state_seq = CASE WHEN cancel_requested THEN {_NEXT_STATE_SEQ}
                    ELSE {_QUEUED_STATE_SEQ} END
    WHERE id = :id AND state = 'running' AND attempts = :attempt AND lease_owner = :owner
    RETURNING {_COLUMNS}"""


_NEXT_GENERATION = "UPDATE task_totals SET generation = generation + 1 WHERE id = 1 RETURNING generation"


def _next_generation(conn: sqlite3.Connection) -> int:
    return conn.execute(_NEXT_GENERATION).fetchone()[0]


def _earliest(times: Iterable[float | None]) -> float | None:
    return min((t for t in times if t is not None), default=None)


# What json.dumps(value, ensure_ascii=False, separators=(",", ":")) writes, without building an
# encoder per call (that is most of the call's cost for a short payload; encode keeps no state).
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json(value: Any) -> str:
    text = _ENCODER.encode(value)
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form for SQLite: escape it ("\ud800")
            return json.dumps(value, separators=(",", ":"))
    return text


def _task(row: tuple[Any, ...]) -> Task:
    (
        task_id,
        payload,
        max_retries,
        state,
        attempts,
        last_error,
        created_at,
        started_at,
        finished_at,
        next_attempt_at,
        request_id,
        result,
        cancel_requested,
    ) = row
    return Task(
        task_id,
        "" if payload is None else json.loads(payload),
        max_retries,
        State(state),
        attempts,
        last_error,
        float(created_at),
        _real(started_at),
        _real(finished_at),
        _real(next_attempt_at),
        request_id,
        None if result is None else stored_result(result),
        bool(cancel_requested),
    )


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
        pass
    return _is_a_zombie(int(pid))


def _is_a_zombie(pid: int) -> bool:
    """Whether ``pid`` has ended but its parent has not reaped it yet.

    Signal 0 reaches such a process, yet it runs nothing: an init that reaps late
    would otherwise keep its attempts until their leases expire. Without a /proc
    (not Linux) a process that exists is taken as alive.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read()
    except FileNotFoundError:  # reaped since the signal
        return True
    except OSError:
        return False
    # "pid (comm) state ...": comm may hold spaces and parentheses, the last ")" ends it.
    state = fields[fields.rfind(b")") + 1 :].split(maxsplit=1)[:1]
    return state in ([b"Z"], [b"X"])


def _real(value: float | None) -> float | None:
    # RETURNING reports a REAL column's value before its affinity applies: 1, not 1.0.
    return None if value is None else float(value)


class _HeldUp(StoreUnavailable):
    """A step given a wait (see ``_transaction``) did not get the write lock in time: it wrote nothing."""


class _NotSynced(sqlite3.OperationalError):
    """The fsync after a commit failed (see ``_sync_wal``): the step is committed, and stands."""


class _Reader:
    """Holds one thread's reading connection: only that thread's locals refer to it.

    When the thread ends its locals go, and this holder with them: its
    finalizer then closes the connection (two file handles and a page cache).
    Without it, a process that starts a thread per HTTP connection
    (``python app.py``) or replaces a stuck worker kept one more connection
    open for every thread that ever read, until the store was closed.
    """

    __slots__ = ("conn", "__weakref__")

    def __init__(self, conn: sqlite3.Connection, connections: set[sqlite3.Connection], lock: threading.Lock) -> None:
        self.conn = conn
        # The finalizer refers to the set and its lock, not to the store, so a
        # long-lived thread's holder never keeps a dropped store alive.
        weakref.finalize(self, _close_connection, conn, connections, lock).atexit = False


def _close_connection(conn: sqlite3.Connection, connections: set[sqlite3.Connection], lock: threading.Lock) -> None:
    """Close ``conn`` and take it off the store's ``connections``: close() no longer needs to."""
    with lock:
        connections.discard(conn)
    conn.close()


# The oldest SQLite library the statements run on: RETURNING (claims, ends) came in 3.35.0; the
# migrations' UPDATE ... FROM in 3.33.0, their window functions and FILTER in 3.25 and 3.30.
MIN_SQLITE_VERSION = (3, 35, 0)


def _check_library() -> None:
    """Refuse, in one line at start-up, an SQLite library whose syntax errors would come only later."""
    if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
        needed = ".".join(map(str, MIN_SQLITE_VERSION))
        raise StoreUnavailable(
            f"the SQLite store needs SQLite {needed} or newer; Python's sqlite3 module here uses "
            f"{sqlite3.sqlite_version}"
        )


# The files SQLite keeps beside the task file in WAL mode, open as long as any connection is.
_LOG_SUFFIXES = ("-wal", "-shm")
_FILE_NAMES = ("the task file", *(f"its {suffix} file" for suffix in _LOG_SUFFIXES))  # as _identities lists them


def _identity(path: str | Path) -> tuple[int, int] | None:
    """The file ``path`` names now (st_dev, st_ino), or None when it names none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _fd_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _identities(path: Path, file: str) -> tuple[tuple[int, int] | None, ...]:
    """The files ``path`` and the ``_LOG_SUFFIXES`` paths beside ``file`` (what SQLite opened) name now.

    See ``_identity``; the path may be a symlink, whose target SQLite keeps its ``-wal`` and ``-shm`` beside.
    """
    return (_identity(path), *(_identity(f"{file}{suffix}") for suffix in _LOG_SUFFIXES))


def _check_path(path: Path) -> None:
    """Refuse paths SQLite would reject with a vague "unable to open database file"."""
    if path.is_dir():
        raise StoreUnavailable(f"{path}: is a directory, not a database file")
    # SQLite would open a device or a FIFO as a database, write a -journal beside it (in /dev for
    # /dev/null) and then say only "disk I/O error".
    kind = _special_file_kind(path)
    if kind is not None:
        raise StoreUnavailable(f"{path}: is {kind}, not a database file")
    real = os.path.realpath(path)
    parent = Path(real).parent  # a symlink's target's: where SQLite keeps the -wal and -shm
    if not parent.is_dir():
        raise StoreUnavailable(f"{path}: the directory {parent} does not exist")
    # WAL mode creates -wal and -shm files beside the database.
    if not os.access(parent, os.W_OK | os.X_OK):
        raise StoreUnavailable(f"{path}: the directory {parent} is not writable (WAL needs files beside the database)")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreUnavailable(f"{path}: the file is not readable and writable")
    # Left by a process of another user still open on the file, or one that crashed: SQLite would only say
    # "the database is read-only", which sends the operator to the task file.
    for suffix in _LOG_SUFFIXES:
        log_file = f"{real}{suffix}"
        if os.path.exists(log_file) and not os.access(log_file, os.R_OK | os.W_OK):
            raise StoreUnavailable(
                f"{log_file}: not readable and writable by this process (uid {os.getuid()}; the file's owner is "
                f"uid {os.stat(log_file).st_uid}): SQLite keeps the task file's {suffix} there"
            )
    # SQLite keeps the -wal and -shm beside the name it opened: two processes that open the file by two
    # names in two directories each write a -wal of their own, unseen by the other, and corrupt the file.
    links = os.stat(path).st_nlink if path.exists() else 1
    if links > 1:
        raise StoreUnavailable(
            f"{path}: the task file has {links} hard links: a process opening it by another name keeps another "
            "-wal beside that name, and the two corrupt the file; remove the other links (to share the file, "
            "give every process the same path, in containers by mounting its directory, not the file)"
        )


def _special_file_kind(path: Path) -> str | None:
    """What ``path`` (or a symlink's target) is when it exists and is neither a file nor a directory."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    kinds = (
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for is_kind, name in kinds if is_kind(mode)), None)


def _create_private(path: Path) -> None:
    """Create a missing task file readable and writable by this user only.

    It holds every payload and result; SQLite would create it readable by
    every local user (0644 under the usual umask), and gives its -wal and
    -shm the file's mode. A file that exists keeps the mode it has.
    """
    try:
        os.close(os.open(os.path.realpath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:  # there already, or another process created it meanwhile
        pass
    except OSError as exc:
        raise StoreUnavailable(f"{path}: the file cannot be created ({exc.strerror})") from None


def _check_link(path: Path) -> None:
    """Refuse a symlink at ``path`` that another local user made: SQLite would write the tasks where it points.

    Checked before the file is created, which would happen at the link's target.
    """
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        raise StoreUnavailable(
            f"{path}: is a symlink made by another user (uid {link.st_uid}; this process runs as uid "
            f"{os.geteuid()}): it decides where the tasks are written; refusing it"
        )


def _check_owner(path: Path) -> None:
    """Refuse a task file, -wal or -shm that another local user made, or that others may write.

    Whoever owns or can write the file reads every payload and result and
    adds tasks that never passed API_TOKEN; SQLite gives the -wal and -shm
    the task file's owner and mode, and follows a symlink planted at a -wal.
    Group write is left to the operator (a Kubernetes fsGroup volume grants it).
    """
    real = os.path.realpath(path)
    for name in (real, *(f"{real}{suffix}" for suffix in _LOG_SUFFIXES)):
        try:
            info = os.lstat(name)
        except FileNotFoundError:  # a -wal or -shm SQLite has not made yet
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o002:
            raise StoreUnavailable(
                f"{name}: not a private file of this process's user (uid {info.st_uid}, mode "
                f"{stat.filemode(info.st_mode)}; this process runs as uid {os.geteuid()}): another local user "
                "may have made it to read the tasks or add some of their own; remove it, or chown it to this user "
                "and chmod o-w it"
            )


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _no_room(exc: sqlite3.Error) -> bool:
    """Whether a write failed for want of room: a full disk (SQLITE_FULL) or the file size limit (EFBIG, which
    SQLite reports as a failed write, as it does EIO)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and (code & 0xFF == sqlite3.SQLITE_FULL or code == sqlite3.SQLITE_IOERR_WRITE)


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
