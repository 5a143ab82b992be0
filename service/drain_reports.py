"""How each gunicorn worker's drain ended, told to the arbiter over one pipe.

gunicorn exits 0 even after SIGKILLing a worker that overran
``graceful_timeout``, so the arbiter's last log lines are what tell a lost
drain from a clean one. A worker writes one line, ``<pid> <summary>``, the
moment its drain ends. The arbiter reads the pipe each time a worker exits
and keeps the line of that worker alone:

- a worker that exits while the server runs (retired by a reload or
  ``TTOU``, or dead) has its line logged at once, or an error if it sent
  none; reports never pile up in the pipe;
- a worker that exits during the server's stop has its line (or the error)
  logged at the arbiter's exit, after gunicorn's own lines.

A worker that stops by itself while the server runs (gunicorn's
``max_requests``) first writes ``<pid> retiring``: the arbiter then forks its
replacement at once rather than when it exits, after its drain (see
``retiring``). That line is not a report.

Both ends are non-blocking: the arbiter reads only what is there, and a
worker never waits on a full pipe (its report is then missing, and the
arbiter says so).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .lifecycle import QUEUED_UNKNOWN

NOT_REPORTED = "the worker ended without reporting its drain (killed?)"
# What became of its tasks: with STORE=memory they were the process's own; a shared store keeps them, and
# recovers the attempts the process ran (at once on this host, else once their leases expire).
LOST_WITH_IT = f"{NOT_REPORTED}: tasks it held may be lost"
KEPT_BY_THE_STORE = (
    f"{NOT_REPORTED}: the store keeps its tasks; the attempts it ran count as lost, retried if retries are left"
)
RETIRING = "retiring"  # a worker stopping by itself, not a drain's report
_MAX_LINE = 500  # bytes of summary: with the pid, well under PIPE_BUF, so each write is atomic


class DrainReports:
    """The arbiter's end of the pipe, and what it read from it, by worker pid."""

    def __init__(self) -> None:
        self._read_fd, self.write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self.write_fd, False)  # shared with the workers: set once, before they fork
        self._unread = b""  # the start of a line whose end has not arrived
        self._reports: dict[int, str] = {}
        self._retiring: set[int] = set()  # announced, not yet taken by ``retiring``
        # Workers that exited during the stop, and their reports (None: sent none).
        self.at_stop: list[tuple[int, str | None]] = []

    def take(self, pid: int) -> str | None:
        """The report of worker ``pid``, which has exited, or None if it sent none."""
        self._read()
        return self._reports.pop(pid, None)

    def retiring(self) -> set[int]:
        """The workers that announced, since the last call, that they stop by themselves."""
        self._read()
        announced, self._retiring = self._retiring, set()
        return announced

    def _read(self) -> None:
        data = self._unread
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            data += chunk
        *lines, self._unread = data.split(b"\n")
        for line in lines:
            pid, _, text = line.decode(errors="replace").partition(" ")
            if not (pid.isdigit() and text):  # not written by a worker
                continue
            if text == RETIRING:
                self._retiring.add(int(pid))
            else:
                self._reports[int(pid)] = text


def send(fd: int, text: str) -> bool:
    """Write this worker's report; False if the pipe was full (the arbiter then reports it missing)."""
    line = f"{os.getpid()} ".encode() + text.encode()[:_MAX_LINE].replace(b"\n", b" ") + b"\n"
    try:
        return os.write(fd, line) == len(line)
    except BlockingIOError:
        return False


# The line service/lifecycle.py's describe() writes, read back.
_DRAINED = re.compile(
    r"shutdown complete: drained in (?P<seconds>\d+(?:\.\d+)?) s; (?P<counts>[^;]*); (?P<abandoned>\d+) abandoned"
    r"(?:; (?P<leases>\d+) attempt\(s\) left to their leases: the store was unavailable)?"
)
_COUNT = re.compile(r"(\d+) (\w+)")
_OWN_STATES = ("running", "done", "failed", "cancelled")  # counted by each worker alone; queued is the store's


@dataclass(frozen=True, slots=True)
class Drain:
    """One worker's drain, read from its report."""

    seconds: float
    queued: int | None  # the tasks the store still held (all workers see the same ones); None: it could not count
    own: dict[str, int]  # the attempts left running and the tasks brought to each final state, by this worker
    abandoned: int
    left_to_leases: int

    @classmethod
    def read(cls, report: str) -> Drain | None:
        """The drain a report describes, or None for a report of another kind (a worker that never started)."""
        drained = _DRAINED.fullmatch(report)
        if drained is None:
            return None
        counts = {state: int(count) for count, state in _COUNT.findall(drained["counts"])}
        if not set(_OWN_STATES) <= counts.keys() or ("queued" not in counts and QUEUED_UNKNOWN not in report):
            return None
        return cls(
            seconds=float(drained["seconds"]),
            queued=counts.get("queued"),
            own={state: counts[state] for state in _OWN_STATES},
            abandoned=int(drained["abandoned"]),
            left_to_leases=int(drained["leases"] or 0),
        )

    def described_alone(self) -> str:
        """This worker's part, when several stopped together: without the store's queued count, which the
        server's line gives once (each worker counts the same tasks)."""
        own = ", ".join(f"{count} {state}" for state, count in self.own.items())
        leases = f"; {self.left_to_leases} attempt(s) left to their leases" if self.left_to_leases else ""
        return f"drained in {self.seconds:.2f} s; {own}; {self.abandoned} abandoned{leases}"


def server_summary(drains: Sequence[Drain], workers: int) -> str:
    """The server's last line when several workers stopped together: their counts added up, the store's queued
    count once (the last worker to report counted it last), the longest drain; ``workers`` counts those
    without a report too (their tasks are not in the sums)."""
    queued = next((drain.queued for drain in reversed(drains) if drain.queued is not None), None)
    counts = [QUEUED_UNKNOWN if queued is None else f"{queued} queued"]
    counts += [f"{sum(drain.own[state] for drain in drains)} {state}" for state in _OWN_STATES]
    seconds = max((drain.seconds for drain in drains), default=0.0)
    line = f"shutdown complete: drained in {seconds:.2f} s; {', '.join(counts)}; "
    line += f"{sum(drain.abandoned for drain in drains)} abandoned"
    leases = sum(drain.left_to_leases for drain in drains)
    if leases:
        line += f"; {leases} attempt(s) left to their leases: the store was unavailable"
    if len(drains) == workers:
        return f"{line} ({workers} workers added up)"
    return f"{line} ({len(drains)} of {workers} workers added up: {workers - len(drains)} sent no report, see above)"
