"""The SQLite store's file format: a file of an older schema version is migrated at start-up, in place.

The version-1 and version-2 files are built here from those versions' own DDL
(version 1 with its triggers keeping the counts), so these tests do not depend
on code that no longer writes those versions.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from stores import sqlite_vm_steps

import workerpool.stores.sqlite as sqlite_store
from workerpool import State, Task
from workerpool.errors import DuplicateTask, StoreUnavailable
from workerpool.stores.sqlite import APPLICATION_ID, SCHEMA_VERSION, SqliteStore

NOW = 1_700_000_000.0
LEASE_S = 30.0

SCHEMA_V1 = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    payload TEXT,
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
    ('queued', 0), ('running', 0), ('done', 0), ('failed', 0), ('cancelled', 0), ('waiting', 0), ('generation', 0);
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

# (id, state, attempts, max_retries, payload, last_error, result, due_at, lease_owner, lease_until, finished_at)
TASKS_V1 = [
    ("new", "queued", 0, 2, '{"n":1}', None, None, NOW - 5, None, None, None),
    ("delayed", "queued", 0, 0, '"later"', None, None, NOW + 60, None, None, None),
    ("retrying", "queued", 1, 3, '"again"', "boom", None, NOW + 10, None, None, None),
    ("running", "running", 2, 3, '"busy"', "boom", None, NOW - 20, "elsewhere:1:x", NOW + 600, None),
    ("done", "done", 1, 0, None, None, '{"ok":true}', NOW - 30, None, None, NOW - 3),
    ("failed", "failed", 3, 2, None, "boom", None, NOW - 30, None, None, NOW - 2),
    ("cancelled", "cancelled", 0, 0, None, None, None, NOW - 30, None, None, NOW - 1),
]


def write_v1_file(path):
    """A version-1 file as version 1 wrote it: its DDL, its header, and a task in every state."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for statement in _statements(SCHEMA_V1):
        conn.execute(statement)
    _insert_tasks(conn)
    conn.execute("UPDATE counts SET n = 7 WHERE name = 'generation'")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    counts = dict(conn.execute("SELECT name, n FROM counts"))
    conn.close()
    return counts


def _statements(script):
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement
            statement = ""


@pytest.fixture
def v1_file(tmp_path):
    path = tmp_path / "tasks.db"
    counts = write_v1_file(path)
    # Version 1's triggers counted the rows as they went in: the counts the migration must keep.
    assert counts == {"queued": 3, "running": 1, "done": 1, "failed": 1, "cancelled": 1, "waiting": 2, "generation": 7}
    return path


def test_a_version_1_file_is_migrated_keeping_every_task_and_the_counts(v1_file):
    store = SqliteStore(v1_file, clock=lambda: NOW, ttl=3600.0)
    try:
        for task_id, state, attempts, _, payload, error, result, *_ in TASKS_V1:
            task = store.get(task_id)
            assert task is not None, task_id
            assert (task.state, task.attempts, task.last_error) == (State(state), attempts, error), task_id
            assert task.result == (None if result is None else {"ok": True})
            assert task.payload == ("" if payload is None else json.loads(payload))
        stats = store.stats()
        assert stats.counts == {
            State.QUEUED: 3, State.RUNNING: 1, State.DONE: 1, State.FAILED: 1, State.CANCELLED: 1,
        }  # fmt: skip
        assert (stats.waiting, stats.due, stats.retries_pending) == (2, 1, 1)
        assert store._read_generation() == 7
    finally:
        store.close()
    conn = sqlite3.connect(v1_file)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    triggers = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
    # Version 1's count triggers are gone; version 4 counts admissions, version 5 refuses an older release's writes.
    assert triggers == {"tasks_admitted", "totals_of_an_older_release"}
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'counts'").fetchone()[0] == 0
    conn.close()


def test_a_version_1_file_of_the_first_release_which_kept_no_generation_is_migrated(v1_file):
    # The first release's version 1 had no generation count: that row came later, in the same version.
    conn = sqlite3.connect(v1_file, isolation_level=None)
    conn.execute("DELETE FROM counts WHERE name = 'generation'")
    conn.close()
    store = SqliteStore(v1_file, clock=lambda: NOW, ttl=3600.0)
    try:
        assert store.stats().counts[State.QUEUED] == 3
        assert store._read_generation() == len(TASKS_V1)  # one per task admitted, as a counted one would be
        assert store.claim("here:1:x", NOW + LEASE_S).id == "new"
        assert store.admit([_task("more")])[0].id == "more"
        assert [task.id for task in store.list(State.QUEUED)][0] == "more"  # newest first
    finally:
        store.close()


def test_a_migrated_file_keeps_counting_every_transition_exactly(v1_file):
    store = SqliteStore(v1_file, clock=lambda: NOW, capacity=3)
    try:
        claimed = store.claim("here:1:x", NOW + LEASE_S)
        assert claimed is not None and claimed.id == "new"
        store.finish(claimed.id, claimed.attempts, "here:1:x", result=1)
        assert store.cancel("delayed")[0].state is State.CANCELLED
        outcomes = store.admit([_task(f"more-{i}") for i in range(4)])  # room for 3 not yet started
        assert [type(outcome).__name__ for outcome in outcomes] == ["Task", "Task", "Task", "QueueFull"]
        stats = store.stats()
        assert stats.counts == {
            State.QUEUED: 4, State.RUNNING: 1, State.DONE: 2, State.FAILED: 1, State.CANCELLED: 2,
        }  # fmt: skip
        assert stats.waiting == 3
    finally:
        store.close()


def test_a_migration_that_fails_leaves_the_version_1_file_as_it_was(v1_file, monkeypatch):
    monkeypatch.setitem(sqlite_store._MIGRATIONS, 1, sqlite_store._MIGRATIONS[1] + "SELECT no_such_function();\n")
    with pytest.raises(StoreUnavailable, match="no_such_function"):
        SqliteStore(v1_file, clock=lambda: NOW)
    conn = sqlite3.connect(v1_file)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert dict(conn.execute("SELECT name, n FROM counts"))["queued"] == 3
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'trigger'").fetchone()[0] == 3
    conn.close()


def test_a_file_of_a_newer_version_than_this_one_is_refused(tmp_path):
    path = tmp_path / "tasks.db"
    write_v1_file(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer version"):
        SqliteStore(path, clock=lambda: NOW)


def test_an_sqlite_library_too_old_for_the_statements_is_refused_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
    monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
    with pytest.raises(StoreUnavailable, match=r"needs SQLite 3\.35\.0 or newer; .* uses 3\.31\.1"):
        SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    assert not (tmp_path / "tasks.db").exists()


SCHEMA_V2 = """
CREATE TABLE tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    payload TEXT,
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
CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX tasks_by_state ON tasks (state, state_seq);
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    queued INTEGER NOT NULL DEFAULT 0,
    running INTEGER NOT NULL DEFAULT 0,
    done INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    waiting INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    health_probes INTEGER NOT NULL DEFAULT 0
);
INSERT INTO totals (id, queued, running, done, failed, cancelled, waiting, generation) VALUES (1, 3, 1, 1, 1, 1, 2, 7);
"""


@pytest.fixture
def v2_file(tmp_path):
    """A version-2 file as version 2 wrote it: its DDL, its header, its totals, and the tasks of ``TASKS_V1``."""
    path = tmp_path / "tasks.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("BEGIN")
    for statement in _statements(SCHEMA_V2):
        conn.execute(statement)
    _insert_tasks(conn)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.execute("COMMIT")
    conn.close()
    return path


def test_a_version_2_file_is_migrated_keeping_every_task_its_order_and_the_totals(v2_file):
    store = SqliteStore(v2_file, clock=lambda: NOW, ttl=3600.0)
    try:
        for task_id, state, attempts, _, payload, error, result, *_ in TASKS_V1:
            task = store.get(task_id)
            assert task is not None, task_id
            assert (task.state, task.attempts, task.last_error) == (State(state), attempts, error), task_id
            assert task.result == (None if result is None else {"ok": True})
            assert task.payload == ("" if payload is None else json.loads(payload))
        assert [task.id for task in store.list()] == [row[0] for row in reversed(TASKS_V1)]
        stats = store.stats()
        assert stats.counts == {
            State.QUEUED: 3, State.RUNNING: 1, State.DONE: 1, State.FAILED: 1, State.CANCELLED: 1,
        }  # fmt: skip
        assert (stats.waiting, stats.due, stats.retries_pending) == (2, 1, 1)
        assert store._read_generation() == 7
        claimed = store.claim("here:1:x", NOW + LEASE_S)  # the claim index came through
        assert claimed is not None and claimed.id == "new"
        assert [type(outcome) for outcome in store.admit([_task("more"), _task("new")])] == [Task, DuplicateTask]
        stats = store.stats()  # the trigger of version 4 counted the admission
        assert (stats.counts[State.QUEUED], stats.counts[State.RUNNING], stats.waiting) == (3, 2, 2)
        assert store._read_generation() == store._generation == 8
    finally:
        store.close()
    conn = sqlite3.connect(v2_file)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"tasks_new", "tasks_retry", "tasks_finished", "tasks_by_state"} <= indexes
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tasks_v3'").fetchone()[0] == 0
    conn.close()


# What a process of version 3 (and, but for its check on state, of version 2) runs to admit a task
# and to claim one, as its code wrote them: each step writes what it changed into totals once.
V3_ADMISSION = [
    "SELECT generation, waiting, (SELECT created_at FROM tasks ORDER BY seq DESC LIMIT 1) FROM totals",
    """INSERT INTO tasks (id, payload, max_retries, state, attempts, created_at, next_attempt_at,
        request_id, due_at, state_seq)
    VALUES (?, ?, ?, 'queued', 0, ?, ?, ?, ?,
        (coalesce((SELECT state_seq FROM tasks WHERE state = 'queued' ORDER BY state_seq DESC LIMIT 1), 0) + 1))
    ON CONFLICT (id) DO NOTHING""",
    "UPDATE totals SET queued = queued + ?, waiting = waiting + ?, generation = generation + ? WHERE id = 1",
]
V3_CLAIM_COUNTS = "UPDATE totals SET queued = queued + ?, running = running + ?, waiting = waiting + ? WHERE id = 1"
V3_NEXT_GENERATION = "UPDATE totals SET generation = generation + 1 WHERE id = 1 RETURNING generation"


def _admit_as_version_3(conn, task_id):
    conn.execute("BEGIN IMMEDIATE")
    try:
        read, insert, count = V3_ADMISSION
        conn.execute(read).fetchone()
        conn.execute(insert, (task_id, '"p"', 0, NOW, None, None, NOW))
        conn.execute(count, (1, 1, 1))
        conn.execute("COMMIT")
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def test_a_process_of_version_3_left_running_on_a_migrated_file_fails_its_writes_saying_why(v2_file):
    old = sqlite3.connect(v2_file, isolation_level=None)  # a process of the older release, its file open
    _admit_as_version_3(old, "before")  # on its own version, its steps work
    SqliteStore(v2_file, clock=lambda: NOW).close()  # a newer release migrates the file
    with pytest.raises(sqlite3.IntegrityError, match="migrated to schema version 5 by a newer release"):
        _admit_as_version_3(old, "after")  # it would count the task twice: the trigger counts it too
    for statement, args in ((V3_CLAIM_COUNTS, (-1, 1, -1)), (V3_NEXT_GENERATION, ())):
        with pytest.raises(sqlite3.IntegrityError, match="stop it, and start the newer release"):
            old.execute(statement, args).fetchall()
    assert old.execute("SELECT queued, waiting, generation FROM totals").fetchone() == (4, 3, 8)  # its reads work
    old.close()
    store = SqliteStore(v2_file, clock=lambda: NOW)
    try:
        assert store.get("after") is None  # the refused admission stored nothing
        stats = store.stats()
        assert (stats.counts[State.QUEUED], stats.waiting, store._read_generation()) == (4, 3, 8)
        store.admit([_task("new-release")])
        stats = store.stats()
        assert (stats.counts[State.QUEUED], stats.waiting, store._read_generation()) == (5, 4, 9)
    finally:
        store.close()


def test_a_new_file_has_the_schema_a_migrated_one_has(tmp_path, v1_file):
    SqliteStore(tmp_path / "new.db", clock=lambda: NOW).close()
    SqliteStore(v1_file, clock=lambda: NOW).close()
    schemas = []
    for path in (tmp_path / "new.db", v1_file):
        conn = sqlite3.connect(path)
        schemas.append(conn.execute("SELECT type, name, tbl_name FROM sqlite_master ORDER BY name").fetchall())
        conn.close()
    assert schemas[0] == schemas[1]
    assert ("view", "totals", "totals") in schemas[0]


def test_the_check_on_state_still_refuses_an_unknown_state_after_the_migration(v2_file):
    SqliteStore(v2_file, clock=lambda: NOW).close()
    conn = sqlite3.connect(v2_file)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        conn.execute("UPDATE tasks SET state = 'lost' WHERE id = 'new'")
    conn.close()


def test_inserting_a_task_builds_no_temporary_b_tree(tmp_path):
    # An IN list of more than two values in the check on state did, on every insert and change of state.
    SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW).close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    program = conn.execute("EXPLAIN " + sqlite_store._INSERT, (None,) * sqlite_store._INSERT.count("?")).fetchall()
    assert [op for op in program if op[1] == "OpenEphemeral"] == []
    conn.close()


def _insert_tasks(conn):
    for seq, (task_id, state, attempts, retries, payload, error, result, due, owner, until, finished) in enumerate(
        TASKS_V1, 1
    ):
        conn.execute(
            """INSERT INTO tasks (seq, id, payload, max_retries, state, attempts, last_error, created_at, started_at,
                   finished_at, next_attempt_at, result, due_at, lease_owner, lease_until, state_seq)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (seq, task_id, payload, retries, state, attempts, error, NOW - 60, None if attempts == 0 else NOW - 20,
             finished, due if due > NOW else None, result, due, owner, until, seq),
        )  # fmt: skip


def _task(task_id):
    return Task(task_id, "p", 0, created_at=NOW)


def test_an_admission_writes_four_pages_to_the_wal_not_the_by_state_index(tmp_path):
    # The row, the id index, the new-task index and totals: queued tasks stay out of tasks_by_state.
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW, capacity=100)
    try:
        for n in range(5):
            store.admit([_task(f"t{n}")])
        wal = tmp_path / "tasks.db-wal"
        before = wal.stat().st_size
        store.admit([_task("one more")])
        frame = 24 + store._writer.execute("PRAGMA page_size").fetchone()[0]
        assert (wal.stat().st_size - before) / frame == 4
    finally:
        store.close()


def test_a_version_5_file_keeps_its_queued_tasks_in_their_order_and_lists_new_ones_first(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", 5)
    v5_schema = sqlite_store._SCHEMA.replace(sqlite_store._BY_STATE_INDEX, OLD_BY_STATE)
    v5_schema = v5_schema.replace(sqlite_store._RETRY_BY_ENTRY_INDEX, "")
    monkeypatch.setattr(sqlite_store, "_SCHEMA", v5_schema)
    for name in ("_INSERT", "_ADMIT_ALONE", "_END_ATTEMPT"):
        statement = getattr(sqlite_store, name)
        assert sqlite_store._QUEUED_STATE_SEQ in statement
        monkeypatch.setattr(sqlite_store, name, statement.replace(sqlite_store._QUEUED_STATE_SEQ, V5_QUEUED_STATE_SEQ))
    clock = iter(NOW + n for n in range(100))
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: next(clock))
    store.admit([Task(task_id, "p", 1, created_at=NOW) for task_id in ("a", "b", "c")])
    store.admit([Task("d", "p", 1, created_at=NOW)])
    claimed = store.claim("here:1:x", NOW + LEASE_S)
    store.finish(claimed.id, 1, "here:1:x", error="boom", retry_at=NOW + 60)  # a: queued again, after d
    store.close()
    monkeypatch.undo()
    _drop_the_entries_column(tmp_path / "tasks.db")
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW + 1)
    try:
        assert [t.id for t in store.list(State.QUEUED)] == ["a", "d", "c", "b"]
        store.admit([_task("e")])
        assert [t.id for t in store.list(State.QUEUED)] == ["e", "a", "d", "c", "b"]
        assert [t.id for t in store.list(State.QUEUED, limit=2)] == ["e", "a"]
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    (index,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'tasks_by_state'").fetchone()
    assert "queued" not in index.partition("WHERE")[2]
    conn.close()


# How version 5 indexed tasks by state and placed a task entering the queue (its positions counted per state).
OLD_BY_STATE = "CREATE INDEX tasks_by_state ON tasks (state, state_seq);\n"
V5_QUEUED_STATE_SEQ = (
    "(coalesce((SELECT state_seq FROM tasks WHERE state = 'queued' ORDER BY state_seq DESC LIMIT 1), 0) + 1)"
)


def test_every_lookup_by_state_still_searches_the_by_state_index(tmp_path):
    # A partial index on state <> 'queued' would not serve state = 'running': each claim would scan the table.
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    try:
        conn = store._connection()
        statements = [
            (sqlite_store._CLAIM, {"now": NOW, "owner": "o", "until": NOW}),
            (
                sqlite_store._END_ATTEMPT,
                dict.fromkeys(("id", "attempt", "owner", "now", "error", "retry_at", "result", "created_at")),
            ),
        ]
        for plan in [conn.execute("EXPLAIN QUERY PLAN " + sql, args).fetchall() for sql, args in statements]:
            assert [step for *_, step in plan if step.startswith("SCAN tasks")] == []
        traced: list[str] = []
        conn.set_trace_callback(traced.append)
        for state in State:
            store.list(state)
        conn.set_trace_callback(None)
        listings = [sql for sql in traced if "FROM tasks WHERE state =" in sql]  # as run: parameters expanded
        assert len(listings) == len(State) - 1  # the queued tasks have a listing of their own
        for sql in listings:
            assert "tasks_by_state" in str(conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall()), sql
    finally:
        store.close()


def test_the_figures_count_the_queue_on_its_indexes_never_reading_the_table(tmp_path):
    # The retained finished tasks may outnumber the queued many times: /healthz and /metrics read these.
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    try:
        plan = store._connection().execute("EXPLAIN QUERY PLAN " + sqlite_store._NOT_YET_DUE, {"now": NOW}).fetchall()
        assert [step for *_, step in plan if step.startswith("SCAN tasks")] == []
        assert {"tasks_new", "tasks_retry"} <= {word for *_, step in plan for word in step.split()}
    finally:
        store.close()


def test_the_readme_and_the_store_notes_name_the_current_schema_version():
    root = Path(__file__).resolve().parent.parent
    readme = " ".join((root / "README.md").read_text().split())
    notes = " ".join((root / "docs" / "stores.md").read_text().split())
    assert f"each version to the next, now up to {SCHEMA_VERSION}," in readme
    assert f"(`PRAGMA user_version`, now {SCHEMA_VERSION})" in notes
    # Only processes of version 4 or older are refused their claims: the README must not promise it of 5.
    assert "a process of schema version 4 or older still running on a migrated file" in readme
    assert "A process of schema version 5 on a file migrated to 6 is not stopped" in readme


def _retrying_store(path, retries: int, *, new: bool = True) -> SqliteStore:
    """A store whose queue holds ``retries`` retries not yet due (and, if ``new``, one new task, the newest)."""
    store = SqliteStore(path, clock=lambda: NOW, capacity=retries + 10)
    store.admit([Task(f"r{n}", "p", 1, created_at=NOW) for n in range(retries)])
    for _ in range(retries):
        claimed = store.claim("here:1:x", NOW + LEASE_S)
        store.finish(claimed.id, 1, "here:1:x", error="boom", retry_at=NOW + 600)
    if new:
        store.admit([_task("new")])
    return store


def test_a_page_of_queued_tasks_reads_a_range_of_the_retries_not_every_retry_waiting(tmp_path):
    # The retries were read in full and sorted on every page: 0.3-0.5 s a page with 40,000 waiting.
    costs = {}
    for retries in (20, 400):
        store = _retrying_store(tmp_path / f"{retries}.db", retries, new=False)
        try:
            first_steps, first = sqlite_vm_steps(store, store.page, State.QUEUED, 5)
            assert [t.id for t in first.tasks] == [f"r{n}" for n in range(retries - 1, retries - 6, -1)]
            later_steps, later = sqlite_vm_steps(store, store.page, State.QUEUED, 5, after=first.next)
            assert [t.id for t in later.tasks] == [f"r{n}" for n in range(retries - 6, retries - 11, -1)]
            list_steps, listed = sqlite_vm_steps(store, store.list, State.QUEUED, 5)
            assert [t.id for t in listed] == [t.id for t in first.tasks]
            costs[retries] = (first_steps, later_steps, list_steps)
        finally:
            store.close()
    # Twenty times the retries: the same reads, not twenty times the work.
    assert all(big <= small + 2 for small, big in zip(costs[20], costs[400])), costs


def test_a_version_6_file_is_migrated_indexing_its_retries_by_position(tmp_path, monkeypatch):
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", 6)
    monkeypatch.setattr(sqlite_store, "_SCHEMA", sqlite_store._SCHEMA.replace(sqlite_store._RETRY_BY_ENTRY_INDEX, ""))
    monkeypatch.setattr(sqlite_store, "_PAGE_QUEUED", V6_PAGE_QUEUED)
    _retrying_store(tmp_path / "tasks.db", 12).close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tasks_retry_by_entry'").fetchone() == (0,)
    conn.close()
    monkeypatch.undo()
    _drop_the_entries_column(tmp_path / "tasks.db")
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    try:
        expected = ["new", *(f"r{n}" for n in range(11, -1, -1))]
        assert [t.id for t in store.list(State.QUEUED)] == expected
        walked, after = [], None
        while True:
            page = store.page(State.QUEUED, 5, after=after)
            walked += [t.id for t in page.tasks]
            if page.next is None:
                break
            after = page.next
        assert walked == expected
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tasks_retry_by_entry'").fetchone() == (1,)
    conn.close()


# How version 6 listed the queued tasks: every retry waiting, sorted (its file has no index of them by position).
_COLUMNS = sqlite_store._LISTED_COLUMNS
V6_PAGE_QUEUED = sqlite_store._PAGE_QUEUED.replace(
    f"""SELECT * FROM (SELECT {_COLUMNS}, state_seq, seq, 0 FROM tasks INDEXED BY tasks_retry_by_entry
        WHERE state = 'queued' AND attempts > 0 AND (state_seq, seq) < (:state_seq, :seq)
        ORDER BY state_seq DESC, seq DESC LIMIT :limit)""",
    f"""SELECT {_COLUMNS}, state_seq, seq, 0 FROM tasks
        WHERE state = 'queued' AND attempts > 0 AND (state_seq, seq) < (:state_seq, :seq)""",
)


def _drop_the_entries_column(path) -> None:
    """Make a file written by this version's code a version-7 one (or older): version 8 added ``entries``."""
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE task_totals DROP COLUMN entries")
    conn.close()


def test_a_version_7_file_counts_entries_past_every_position_held(tmp_path):
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    store.admit([Task(task_id, "p", 0, created_at=NOW) for task_id in ("done", "older", "running", "next")])
    claimed = store.claim("here:1:x", NOW + LEASE_S)
    store.finish(claimed.id, 1, "here:1:x", result=None)
    assert [store.claim("here:1:x", NOW + LEASE_S).id for _ in range(2)] == ["older", "running"]
    store.close()
    _drop_the_entries_column(tmp_path / "tasks.db")
    conn = sqlite3.connect(tmp_path / "tasks.db")
    conn.execute("PRAGMA user_version = 7")
    # Version 7 numbered each state on its own: the running tasks may hold positions far above the others'.
    conn.execute("UPDATE tasks SET state_seq = CASE id WHEN 'older' THEN 8 WHEN 'running' THEN 9 ELSE 1 END")
    conn.commit()
    conn.close()
    store = SqliteStore(tmp_path / "tasks.db", clock=lambda: NOW)
    try:
        first = store.page(State.RUNNING, 1)
        assert [t.id for t in first.tasks] == ["running"] and first.next is not None
        for task_id in ("running", "older"):  # the running tasks leave the state
            store.finish(task_id, 1, "here:1:x", result=None)
        assert store.claim("here:1:x", NOW + LEASE_S).id == "next"
        assert store.page(State.RUNNING, 1, after=first.next).tasks == []  # next lists ahead of the walk
        assert [t.id for t in store.list(State.DONE)] == ["older", "running", "done"]
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "tasks.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 8
    conn.close()
