"""Metrics summed over a server's worker processes, through snapshot files in one directory.

Each process writes what it counted to ``counts-<pid>.json`` and its own gauges to
``live-<pid>.json``, replacing each file whole (a reader sees one snapshot or the next,
never half of one). Any process answering ``/metrics`` writes its own files first, then
adds up every ``counts-*`` file and reads every ``live-*`` one.

A process's counts file stays when the process ends, so its counts stay in the sum;
a new process that gets the pid of an ended one starts from that file's counts
(as prometheus_client's multiprocess mode does). The arbiter removes an ended
process's ``live`` file (``mark_process_dead``), so its gauges leave the output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

COUNTS = "counts-"
LIVE = "live-"
SUFFIX = ".json"
PARTIAL = ".partial"  # a file being written; readers skip it
# How often a process that answers no scrape publishes its counts: what another process's
# /metrics may miss of it at most (plus the time to write a file).
PUBLISH_INTERVAL_S = 1.0

Snapshot = dict[str, Any]


def add(total: Snapshot, other: Snapshot) -> Snapshot:
    """``total`` and ``other`` added up: numbers add, lists add item by item, ``created`` keeps the earliest.

    Dictionaries are added key by key (a key in one only is kept as it is), so a
    snapshot may carry nested series, such as a reason counted in one process only.
    """
    result = dict(total)
    for key, value in other.items():
        mine = result.get(key)
        if mine is None:
            result[key] = value
        elif key == "created":
            result[key] = min(mine, value)
        elif isinstance(value, dict):
            result[key] = add(mine, value)
        elif isinstance(value, list):
            result[key] = [a + b for a, b in zip(mine, value, strict=True)]
        else:
            result[key] = mine + value
    return result


def prepare(directory: Path) -> None:
    """Make ``directory`` if needed and remove the snapshots an earlier run left in it."""
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        if path.name.startswith((COUNTS, LIVE)) and path.name.endswith((SUFFIX, PARTIAL)):
            path.unlink(missing_ok=True)


def make_directory() -> Path:
    """A new private directory for one server's snapshots (the caller removes it at exit)."""
    return Path(tempfile.mkdtemp(prefix="workerpool-metrics-"))


def remove_directory(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(directory: Path, pid: int) -> None:
    """Drop an ended process's gauges from the output; its counts stay in the sum."""
    (directory / f"{LIVE}{pid}{SUFFIX}").unlink(missing_ok=True)


class ProcessSnapshots:
    """This process's snapshot files in ``directory``, and the reading of every process's."""

    def __init__(self, directory: Path, *, pid: int | None = None) -> None:
        self.directory = directory
        self.pid = os.getpid() if pid is None else pid
        self._counts_path = directory / f"{COUNTS}{self.pid}{SUFFIX}"
        self._live_path = directory / f"{LIVE}{self.pid}{SUFFIX}"
        # Held while one snapshot is taken and written, so that a snapshot taken earlier never
        # replaces a later one (the sum would go backwards). Only scrapes and the publishing
        # thread take it, never a task, so holding it across the write delays no task.
        self._write_lock = threading.Lock()
        self._counts_written = self._live_written = ""  # the texts last written
        # An ended process that had this pid (in this run) left counts that must stay in the sum.
        self._base = _read(self._counts_path) or {}

    def publish(self, take: Callable[[], tuple[Snapshot, Snapshot]]) -> None:
        """Write the counts and gauges ``take()`` returns (counts on top of what an earlier holder of the pid left)."""
        with self._write_lock:
            counts, live = take()
            counts_text, live_text = json.dumps(add(self._base, counts)), json.dumps(live)
            if counts_text != self._counts_written:  # each file written only when it changed
                _replace(self._counts_path, counts_text)
                self._counts_written = counts_text
            if live_text != self._live_written:
                _replace(self._live_path, live_text)
                self._live_written = live_text

    def read(self) -> tuple[Snapshot, dict[int, Snapshot]]:
        """Every process's counts added up, and the gauges of each process still running, by pid."""
        total: Snapshot = {}
        live: dict[int, Snapshot] = {}
        for path in self.directory.iterdir():
            name = path.name
            if not name.endswith(SUFFIX):
                continue
            if name.startswith(COUNTS):
                snapshot = _read(path)
                if snapshot is not None:
                    total = add(total, snapshot)
            elif name.startswith(LIVE):
                snapshot = _read(path)
                pid = name[len(LIVE) : -len(SUFFIX)]
                if snapshot is not None and pid.isdigit():
                    live[int(pid)] = snapshot
        return total, live


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + PARTIAL)
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _read(path: Path) -> Snapshot | None:
    """A snapshot, or None if its file is gone (an ended process's live file, removed meanwhile)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


class Publisher:
    """A daemon thread that calls ``publish`` every ``interval`` seconds until ``stop``, which calls it once more."""

    def __init__(self, publish: Callable[[], None], interval: float = PUBLISH_INTERVAL_S) -> None:
        self._publish = publish
        self._interval = interval
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._publish()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._publish()  # the last counts, after the drain counted its tasks
