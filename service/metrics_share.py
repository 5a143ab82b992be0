"""Metrics summed over a server's worker processes, through snapshot files in one directory.

Each process writes what it counted to ``counts-<pid>.json`` and its own gauges to
``live-<pid>.json``, replacing each file whole (a reader sees one snapshot or the next,
never half of one). Any process answering ``/metrics`` writes its own files first, then
adds up every ``counts-*`` file and reads every ``live-*`` one.

When a process ends, the arbiter removes its ``live`` file (``mark_process_dead``), so
its gauges leave the output, and folds its counts into ``counts-retired.json``, so they
stay in the sum while the number of files stays bounded by the processes running plus
one, however many processes ``max_requests`` or ``TTIN``/``TTOU`` start and end. The
fold (add to the retired counts, note the file folded, remove it) holds an exclusive
``flock`` on ``fold.lock`` and every reading of the directory a shared one, so no scrape
sees the counts twice or not at all, and a reader tells a folded file from a removed
one. The arbiter waits for the lock at most ``FOLD_LOCK_WAIT_S``: a process stopped while
it reads holds it, and the fold is then left to a later exit, the file staying in the sum. A scrape
waits for it at most ``SCRAPE_LOCK_WAIT_S`` (a process stopped inside a fold or a write-back holds it
exclusively): it then answers the counts read before, its own current, and writes nothing back.
A process whose counts file was not folded (its arbiter was killed) leaves it in
place; a new process that gets its pid starts from that file's counts. The retired
record names the files of the last ``FOLDS_NAMED`` folds only, so that it stays small
however many processes end: a reader that read nothing for longer takes an ended
process's file that is gone for one folded meanwhile.

While the server runs nothing else removes a counts file, but a tmp cleaner may
(an idle server's files age untouched) or remove the whole directory. Then the
sum must not go backwards: a process writes its own files again, making the
directory again if need be, and a reader keeps the counts it read before, writing
an ended process's file back from them. It writes back under the exclusive lock, and
not a file the retired record lists; whoever writes the retired record again (a reader,
or the arbiter from its own copy) removes such a file a reader that had not read the
fold wrote back, so no ended process is counted twice. A running process's counts read
before may be older than what it has answered since, so a reader waits (up to
``REPUBLISH_WAIT_S``) for that process to write its file again, as it does within
``PUBLISH_INTERVAL_S``.

The directory is trusted only while it is private: a directory (not a symlink) of this
process's user that no other user can write. A directory another local user made at its
path once a cleaner removed it is neither read nor written (their counts would be summed,
and a FIFO of theirs would block every scrape): publishing fails as on a full disk, logged
once, and a scrape answers the counts read before with this process's own ones current.
Files are opened without following a symlink or waiting on a FIFO, regular files only; one that is
not a snapshot (truncated, edited by hand: JSON that is not an object, or one shaped otherwise than
the writer's, which the ``check_counts`` / ``check_live`` given tell) is left out of the sum, as if absent.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

COUNTS = "counts-"
LIVE = "live-"
SUFFIX = ".json"
PARTIAL = ".partial"  # a file being written; readers skip it
# The counts of every ended process, added up: {"counts": snapshot, "folds": folds made, "folded": {counts file
# name: the number of the fold that last folded it}}, naming the files of the latest FOLDS_NAMED folds only.
RETIRED = f"{COUNTS}retired{SUFFIX}"
# Enough for a reader that reads the directory once in that many folds to tell each file folded since (see
# _listed); without a bound the record grew by a name per ended process, and was read at every scrape.
FOLDS_NAMED = 1000
FOLD_LOCK = "fold.lock"  # flock: exclusive while a fold changes the counts files, shared while they are read
# How long the arbiter waits for the fold lock, which every reading of the directory holds shared: a process
# stopped while it reads (SIGSTOP, a debugger, a frozen cgroup) holds it for as long as it is stopped, and an
# arbiter waiting on it would neither replace workers nor act on signals. Past it the fold waits for the next reap.
FOLD_LOCK_WAIT_S = 0.5
FOLD_LOCK_POLL_S = 0.01
# How long a scrape waits for it (on a request thread): past it, held by a process stopped inside a fold or a
# write-back, the scrape answers the counts read before (this process's own current), and writes nothing back;
# later scrapes then do not wait for it until one has it.
SCRAPE_LOCK_WAIT_S = 1.0
# How often a process that answers no scrape publishes its counts: what another process's
# /metrics may miss of it at most (plus the time to write a file).
PUBLISH_INTERVAL_S = 1.0
# How long a scrape waits, polling, for a running process whose counts file was removed to write it again.
REPUBLISH_WAIT_S = 2 * PUBLISH_INTERVAL_S
REPUBLISH_POLL_S = 0.05

Snapshot = dict[str, Any]
# Why a snapshot read from a file is not one this server writes, or None if it is: a file shaped otherwise
# (a hand edit) would make the sum, or the scrape reading it, fail every time until the server restarts.
Check = Callable[[Snapshot], str | None]


def _any_object(snapshot: Snapshot) -> str | None:
    return None


log = logging.getLogger(__name__)


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


# The environment variable by which a server passes its private directory to the new server of a binary
# upgrade (kill -USR2), which runs beside it on the same port until the old one is stopped.
INHERITED_METRICS_DIR = "WORKERPOOL_INHERITED_METRICS_DIR"


def prepare(directory: Path) -> None:
    """Make ``directory`` if needed and remove the snapshots an earlier run left in it."""
    make(directory)
    for path in directory.iterdir():
        if path.name.startswith((COUNTS, LIVE)) and path.name.endswith((SUFFIX, PARTIAL)):
            path.unlink(missing_ok=True)


def make(directory: Path) -> None:
    """Make ``directory`` if it is missing, private (see check_private) whatever the umask; one that exists is kept."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # the umask only takes bits away from 0o700


class UntrustedDirectory(PermissionError):
    """The metrics directory is not this process's private one: another user's, open to others, not a directory."""


def check_private(directory: Path) -> None:
    """Raise unless ``directory`` is a directory (not a symlink) of this process's user that no other user can write.

    FileNotFoundError if it is gone; UntrustedDirectory if anything else stands at its path.
    """
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
        raise UntrustedDirectory(
            f"{directory} is not a private directory of this server's user (uid {info.st_uid}, mode "
            f"{stat.filemode(info.st_mode)}): another local user may have made it; its files are not used"
        )


def why_unusable(error: OSError) -> str:
    """What an error of ``make``, ``prepare`` or ``check_private`` says of the directory, without errno's numbers."""
    if isinstance(error, FileExistsError):  # mkdir(exist_ok=True) found something else at the path
        return "it is not a directory"
    if isinstance(error, NotADirectoryError):
        return "a part of its path is not a directory"
    if isinstance(error, UntrustedDirectory):
        return str(error)
    return error.strerror or str(error)


def is_private(directory: Path) -> bool:
    try:
        check_private(directory)
    except OSError:
        return False
    return True


def make_directory() -> Path:
    """A new private directory for one server's snapshots (the caller removes it at exit)."""
    return Path(tempfile.mkdtemp(prefix="workerpool-metrics-"))


def remove_directory(directory: Path) -> None:
    if is_private(directory):  # one another user made at its path after a cleaner is theirs, not ours to empty
        shutil.rmtree(directory, ignore_errors=True)


def mark_process_dead(directory: Path, pid: int, *, check_counts: Check = _any_object) -> None:
    """Drop an ended process's gauges from the output, and fold its counts into the retired ones.

    The arbiter calls it as it reaps a worker: an error here would stop the whole server. A counts
    file (or retired record) that ``check_counts`` refuses is not added: the file stays, out of the sum.
    """
    try:
        check_private(directory)
    except FileNotFoundError:  # removed: nothing of the process to fold (a reader writes its counts back)
        return
    except OSError as error:
        log.warning("could not fold the metrics of the ended process %s: %s", pid, error)
        return
    try:
        (directory / f"{LIVE}{pid}{SUFFIX}").unlink(missing_ok=True)
    except OSError as error:
        log.warning("could not remove the metrics gauges of the ended process %s: %s", pid, error)
    names = _unfolded.pop(directory, set()) | {f"{COUNTS}{pid}{SUFFIX}"}
    try:
        left = _fold(directory, names, check_counts)
    except OSError as error:  # the files not folded stay, and in the sum: a later worker's exit folds them
        _unfolded[directory] = names  # what _fold had not taken out yet
        log.warning("could not fold the metrics counts of the ended process %s: %s", pid, error)
        return
    if left:  # each file stays meanwhile, and in the sum
        _unfolded[directory] = left
        log.warning(
            "could not fold the metrics counts of %d ended process(es) within %.1f s: a process holds the lock "
            "of %s (stopped while it read it?); they stay in the sum, and are folded at a later worker's exit",
            len(left),
            FOLD_LOCK_WAIT_S,
            directory,
        )


_retired: dict[Path, Snapshot] = {}  # in the arbiter: the retired file last written, by directory
_unfolded: dict[Path, set[str]] = {}  # in the arbiter: counts files of ended processes to fold still, by directory


def _fold(directory: Path, names: set[str], check_counts: Check) -> set[str]:
    """Fold the counts files ``names`` of ended processes; those left unfolded, all of them if the lock was held.

    Each name is taken out of ``names`` once done with, so that after an OSError ``names`` holds those
    still to fold (a name folded twice would count its process twice).
    """
    with _locked(directory, fcntl.LOCK_EX, wait_s=FOLD_LOCK_WAIT_S) as locked:
        if not locked:
            return names
        for name in sorted(names):
            pid = name[len(COUNTS) : -len(SUFFIX)]
            if not _alive(int(pid)):  # else a process started since with its pid counts on from its file
                _fold_one(directory, name, check_counts)
            names.discard(name)
    return set()


def _fold_one(directory: Path, name: str, check_counts: Check) -> None:
    counts = _read(directory / name, check_counts)
    if counts is None:
        return
    retired = _read(directory / RETIRED, check_counts)
    if retired is None and directory in _retired:
        # Removed by a tmp cleaner: the arbiter's own copy stands in for it, and files of processes it
        # folded, written back by readers that had not read the fold, would count those processes twice.
        retired = _retired[directory]
        _drop_folded_copies(directory, retired["folded"])
    retired = retired or {"counts": {}, "folds": 0, "folded": {}}
    folds = folds_made(retired) + 1
    folded = {other: fold for other, fold in retired["folded"].items() if fold > folds - FOLDS_NAMED}
    folded[name] = folds
    retired = {"counts": add(retired["counts"], counts), "folds": folds, "folded": folded}
    _replace(directory / RETIRED, json.dumps(retired))
    _retired[directory] = retired  # once written: a copy of a record never written would count its folds twice
    (directory / name).unlink(missing_ok=True)  # gone already if it was a copy of an earlier fold of the pid


def folds_made(record: Snapshot) -> int:
    """How many folds the retired ``record`` holds (one written before records counted them: one per fold)."""
    return record["folds"] if "folds" in record else sum(record["folded"].values())


def _drop_folded_copies(directory: Path, folded: dict[str, int]) -> None:
    """Remove the counts files of ended processes that ``folded`` (a retired record) says are in the retired counts.

    Such a file is a copy a reader wrote back from what it read before the fold (a running process
    that got the pid since writes its own). Call it with the fold lock held exclusively.
    """
    for name in folded:
        pid = name[len(COUNTS) : -len(SUFFIX)]
        if pid.isdigit() and not _alive(int(pid)):
            (directory / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(directory: Path, operation: int, *, wait_s: float | None = None) -> Iterator[bool]:
    """Hold the fold lock (waiting for it, or up to ``wait_s``); whether to go on: False if it was not had in time."""
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
        fd = os.open(directory / FOLD_LOCK, flags, 0o600)
    except OSError:  # the directory removed, a full disk: unlocked, a scrape may count a fold made meanwhile twice
        yield True
        return
    try:  # the lock is released with the descriptor
        if wait_s is None:
            fcntl.flock(fd, operation)
        else:
            deadline = time.monotonic() + wait_s
            while not _try_lock(fd, operation):
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(FOLD_LOCK_POLL_S)
        yield True
    finally:
        os.close(fd)


def _try_lock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class ProcessSnapshots:
    """This process's snapshot files in ``directory``, and the reading of every process's."""

    def __init__(
        self,
        directory: Path,
        *,
        pid: int | None = None,
        wait: Callable[[float], object] = time.sleep,
        check_counts: Check = _any_object,
        check_live: Check = _any_object,
    ) -> None:
        self.directory = directory
        self._check_counts = check_counts  # a counts file (or the retired record's counts) it refuses is left out
        self._check_live = check_live
        self.pid = os.getpid() if pid is None else pid
        self._counts_path = directory / f"{COUNTS}{self.pid}{SUFFIX}"
        self._live_path = directory / f"{LIVE}{self.pid}{SUFFIX}"
        # Held while one snapshot is taken and written, so that a snapshot taken earlier never
        # replaces a later one (the sum would go backwards). Only scrapes and the publishing
        # thread take it, never a task, so holding it across the write delays no task.
        self._write_lock = threading.Lock()
        self._counts_written = self._live_written = ""  # the texts last written
        self._own_live: Snapshot | None = None  # the gauges last taken
        # An ended process that had this pid (in this run) left counts that must stay in the sum.
        private = is_private(directory)
        self._base = (_read(self._counts_path, check_counts) if private else None) or {}
        self._own: Snapshot | None = None  # the counts last taken, which a scrape sums if the directory is not ours
        # The counts last read from each counts file, by name, which stay in the sum if the file goes.
        # Held only to read or update the dictionary, never across a file's reading or writing.
        self._seen_lock = threading.Lock()
        self._seen: dict[str, Snapshot] = {}
        self._folded: dict[str, int] = {}  # the retired file's record of folds, as last read (under _seen_lock)
        self._folds = 0  # how many folds it held then (under _seen_lock)
        self._live_seen: dict[int, Snapshot] = {}  # the gauges last read, by pid (under _seen_lock)
        self._lock_held_said = False  # a scrape that found the fold lock held past SCRAPE_LOCK_WAIT_S logged it
        self._wait = wait  # sleeps between the polls for a removed file of a running process (injected by tests)
        # Removed files of running processes that were not written again within REPUBLISH_WAIT_S (a process
        # stopped, or one not of this server): not waited for again until they are back (under _seen_lock).
        self._not_republished: set[str] = set()
        if private:
            # Read once now, as a scrape does: a process that read nothing yet could not tell, if a tmp
            # cleaner removes the directory before its first scrape, what the other processes had counted.
            with contextlib.suppress(OSError, ValueError):
                self._listed()

    def publish(self, take: Callable[[], tuple[Snapshot, Snapshot]]) -> None:
        """Write the counts and gauges ``take()`` returns (counts on top of what an earlier holder of the pid left)."""
        with self._write_lock:
            counts, live = take()
            self._own, self._own_live = add(self._base, counts), live
            counts_text, live_text = json.dumps(self._own), json.dumps(live)
            # Each file written when it changed, or when it is gone (removed by a tmp cleaner).
            if counts_text != self._counts_written or not self._counts_path.exists():
                _replace(self._counts_path, counts_text)
                self._counts_written = counts_text
            if live_text != self._live_written or not self._live_path.exists():
                _replace(self._live_path, live_text)
                self._live_written = live_text

    def read(self) -> tuple[Snapshot, dict[int, Snapshot]]:
        """Every process's counts added up, and the gauges of each process still running, by pid."""
        try:
            check_private(self.directory)
        except UntrustedDirectory:  # not ours (publishing logged why): nothing read or written there
            with self._seen_lock:
                seen = dict(self._seen)
            if self._own is not None:
                seen[self._counts_path.name] = self._own
            total: Snapshot = {}
            for snapshot in seen.values():
                total = add(total, snapshot)
            return total, {}
        except OSError:
            pass  # removed: made again as this process's files and the ended ones' are written back
        counts, live, gone = self._listed()
        ended = {name: snapshot for name, snapshot in gone.items() if self._of_ended_process(name)}
        if ended and self._write_back(ended):
            counts, live, gone = self._listed()  # as every process reads it now
        if gone:
            counts.update(self._republished({name for name in gone if not self._of_ended_process(name)}))
            gone = {name: snapshot for name, snapshot in gone.items() if name not in counts}
        total: Snapshot = {}
        for snapshot in [*counts.values(), *gone.values()]:
            total = add(total, snapshot)
        return total, live

    def _listed(self) -> tuple[dict[str, Snapshot], dict[int, Snapshot], dict[str, Snapshot]]:
        """The counts files found, the gauges of running processes by pid, and the counts read before of files gone."""
        counts: dict[str, Snapshot] = {}
        live: dict[int, Snapshot] = {}
        folded: dict[str, int] | None = None
        folds = 0
        # Once found held, not waited for again until had: the scrapes meanwhile answer at once.
        wait_s = 0.0 if self._lock_held_said else SCRAPE_LOCK_WAIT_S
        with _locked(self.directory, fcntl.LOCK_SH, wait_s=wait_s) as locked:  # no fold between listing and reads
            if not locked:
                return self._as_read_before()
            try:
                names = [path.name for path in self.directory.iterdir()]
            except (FileNotFoundError, NotADirectoryError):
                names = []  # removed (or a file put in its place) since this process published: what it read stands
            for name in names:
                if not name.endswith(SUFFIX):
                    continue
                if name.startswith(COUNTS):
                    snapshot = _read(self.directory / name, self._check_counts)
                    if snapshot is not None and name == RETIRED:
                        snapshot, folded, folds = snapshot["counts"], snapshot["folded"], folds_made(snapshot)
                    if snapshot is not None:
                        counts[name] = snapshot
                elif name.startswith(LIVE):
                    snapshot = _read(self.directory / name, self._check_live)
                    pid = name[len(LIVE) : -len(SUFFIX)]
                    if snapshot is not None and pid.isdigit():
                        live[int(pid)] = snapshot
        self._lock_held_said = False
        with self._seen_lock:
            self._seen.update(counts)
            self._live_seen = dict(live)
            if folded is not None:  # files folded since the last read are in the retired counts now
                # Some folds since the last read are no longer named: an ended process's file missing may be one.
                unnamed = folds - FOLDS_NAMED > self._folds
                for name in [name for name in self._seen if name not in counts]:
                    if name in folded:  # folded again since, or a copy written back that the record had folded already
                        if folded[name] > self._folded.get(name, 0) or self._of_ended_process(name):
                            del self._seen[name]
                    elif unnamed and self._of_ended_process(name):
                        del self._seen[name]
                self._folded, self._folds = folded, folds
            self._not_republished.difference_update(counts)
            gone = {name: snapshot for name, snapshot in self._seen.items() if name not in counts}
            if self._own is not None and self._counts_path.name in gone:
                gone[self._counts_path.name] = self._own  # this process's own: its latest, not its last read
        return counts, live, gone

    def _as_read_before(self) -> tuple[dict[str, Snapshot], dict[int, Snapshot], dict[str, Snapshot]]:
        """What ``_listed`` found last, this process's own counts and gauges current: for a scrape that could not
        have the fold lock within SCRAPE_LOCK_WAIT_S (no counts file ``gone``, so nothing is written back)."""
        if not self._lock_held_said:
            self._lock_held_said = True
            log.warning(
                "the metrics lock of %s was held for more than %.1f s (a process stopped while it folded or wrote "
                "counts?): scrapes answer the counts read before, this process's own current, until it is released",
                self.directory,
                SCRAPE_LOCK_WAIT_S,
            )
        with self._seen_lock:
            counts, live = dict(self._seen), dict(self._live_seen)
        if self._own is not None:
            counts[self._counts_path.name] = self._own
        if self._own_live is not None:
            live[self.pid] = self._own_live
        return counts, live, {}

    def _republished(self, names: set[str]) -> dict[str, Snapshot]:
        """The removed counts files ``names`` of running processes, as those processes write them again.

        What this process read of one may be older than what that process has answered since: summed
        instead, a scrape answered here would go back by the counts in between. One that ends meanwhile
        is not written back from here this time (the arbiter may be folding its last counts): its counts
        read before stand, and the next read settles it.
        """
        with self._seen_lock:
            waiting = names - self._not_republished - {self._counts_path.name}
        back: dict[str, Snapshot] = {}
        for _ in range(round(REPUBLISH_WAIT_S / REPUBLISH_POLL_S)):
            if not waiting:
                break
            self._wait(REPUBLISH_POLL_S)
            for name in sorted(waiting):
                try:
                    snapshot = _read(self.directory / name, self._check_counts)
                except OSError:
                    snapshot = None
                if snapshot is not None:
                    back[name] = snapshot
                    waiting.discard(name)
                elif self._of_ended_process(name):
                    waiting.discard(name)
        stalled = {name for name in waiting if not self._of_ended_process(name)}
        with self._seen_lock:
            self._seen.update(back)
            self._not_republished.update(stalled)
        return back

    def _write_back(self, ended: dict[str, Snapshot]) -> bool:
        """Write again the counts files of ended processes that were removed, from what was read of them.

        Whether anything was written. Under the fold lock held exclusively, so that no fold, and no
        other reader's writing back, comes between what is found in the directory and what is written.
        """
        # Never a running process's: it writes its own, and an older copy from here could replace a newer one.
        written = 0
        try:
            _make_again(self.directory)  # now, so that the lock below is the one the others take
        except OSError as error:  # not private any more, say: the counts stay in this process's sum meanwhile
            log.warning("could not write back the removed metrics files in %s: %s", self.directory, error)
            return False
        with _locked(self.directory, fcntl.LOCK_EX, wait_s=SCRAPE_LOCK_WAIT_S) as locked:
            if not locked:  # the next scrape tries again; the counts stay in this one's sum meanwhile
                return False
            try:
                record = _read(self.directory / RETIRED, self._check_counts)
            except OSError:
                record = None
            folded = record["folded"] if record is not None else {}
            for name in sorted(ended, key=lambda name: name != RETIRED):  # the retired counts first
                path = self.directory / name
                if name == RETIRED:
                    if record is not None:
                        continue  # written back meanwhile by another process, or by the arbiter's next fold
                    with self._seen_lock:
                        folded, folds = dict(self._folded), self._folds
                    text = json.dumps({"counts": ended[name], "folds": folds, "folded": folded})
                elif name in folded or os.path.lexists(path):
                    continue  # its counts are in the retired ones, or its file was written back meanwhile
                else:
                    text = json.dumps(ended[name])
                try:
                    _replace(path, text)
                except OSError as error:  # a full disk, say: the counts stay in this process's sum meanwhile
                    log.warning("could not write back the removed metrics file %s: %s", path, error)
                    continue
                written += 1
                if name == RETIRED:
                    _drop_folded_copies(self.directory, folded)
        if written:
            log.warning(
                "%d metrics file(s) of ended processes were removed from %s (a tmp cleaner?): written back",
                written,
                self.directory,
            )
        return written > 0

    def _of_ended_process(self, counts_name: str) -> bool:
        if counts_name == RETIRED:
            return True
        pid = counts_name[len(COUNTS) : -len(SUFFIX)]
        return pid.isdigit() and int(pid) != self.pid and not _alive(int(pid))


def _replace(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` whole, making its directory again if it was removed.

    Raises UntrustedDirectory, writing nothing, if the directory is not private (see check_private).
    """
    # A name of this thread's own: several processes, or scrapes of one, may write one file back at once.
    partial = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}{PARTIAL}")
    _make_again(path.parent)
    try:
        _write(partial, text)
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):  # a full disk leaves the file begun: one a round would pile up
            partial.unlink(missing_ok=True)
        raise


def _make_again(directory: Path) -> None:
    """Make ``directory`` again if it was removed; raise UntrustedDirectory if it is not private (see check_private)."""
    try:
        check_private(directory)
    except FileNotFoundError:
        # Made as mkdtemp does: if another user made one at this path meanwhile, it is not adopted.
        with contextlib.suppress(FileExistsError):  # made again meanwhile by another of our processes
            directory.mkdir(mode=0o700, parents=True)
            log.warning("the metrics directory %s was removed (a tmp cleaner?): made again", directory)
        check_private(directory)


def _write(path: Path, text: str) -> None:
    # Neither a symlink followed nor a FIFO waited on (ENXIO without a reader).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o600)
    with open(fd, "w", encoding="utf-8") as file:
        file.write(text)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs (on this host, where the directory is)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


# The files logged as unreadable (not a snapshot's JSON), each once per process: a scrape meets them every time.
_unreadable_lock = threading.Lock()
_unreadable_told: set[Path] = set()


def _read(path: Path, check: Check = _any_object) -> Snapshot | None:
    """A snapshot, or None if its file is gone (an ended process's live file, removed meanwhile), not a regular
    file or not a snapshot (logged once: a truncated file, a hand edit), which the sum then does without.
    ``check`` tells whether the object read is shaped as a snapshot (the retired record's counts, for RETIRED).

    A FIFO is opened without waiting for a writer, a symlink not followed (ELOOP), a device not read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file now stands for the directory
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            return None
        raise
    with open(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = file.read()
    try:
        snapshot = json.loads(data.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
    except ValueError as error:
        _tell_unreadable(path, f"not JSON ({error})")
        return None
    if not isinstance(snapshot, dict):
        _tell_unreadable(path, f"a JSON {type(snapshot).__name__}, not an object")
        return None
    if path.name == RETIRED:
        if not (
            all(isinstance(snapshot.get(key), dict) for key in ("counts", "folded"))
            and _is_fold_number(snapshot.get("folds", 0))
            and all(map(_is_fold_number, snapshot["folded"].values()))
        ):
            _tell_unreadable(path, 'not an object of "counts", "folds" and "folded"')
            return None
        why = check(snapshot["counts"])
    else:
        why = check(snapshot)
    if why is not None:
        _tell_unreadable(path, why)
        return None
    return snapshot


def _is_fold_number(value: object) -> bool:
    return type(value) is int and value >= 0


def _tell_unreadable(path: Path, why: str) -> None:
    with _unreadable_lock:
        told = path in _unreadable_told
        _unreadable_told.add(path)
    if not told:
        log.warning("the metrics file %s is not a snapshot: %s; the sum goes on without it", path, why)


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
