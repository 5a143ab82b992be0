"""Per-second task figures of the last few minutes, fed by the pool's observer hooks, for the dashboard.

Each second of the window has a slot in a ring: counts of accepted tasks,
final states and retries, and the attempt durations as a sparse histogram of
log-spaced buckets (each 2**(1/4), about 19 %, wider than the last), so a
slot's memory is bounded whatever the rate. A slot is reused once its second
has left the window. Percentiles are read from the merged buckets and given
as the upper bound of the bucket they fall in: never below the true value,
at most about 19 % above it.

A thread counts the events of its current second in a ``_Pending`` of its own,
without a lock, and adds them to the ring when its clock reads a later second;
a reader adds in every thread's pending counts. The ring's lock is taken about
once per second per thread instead of once per event.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import Any

from workerpool import PoolObserver, Task

WINDOW_S = 300  # the charts show the last five minutes
LATENCY_STEP_S = 10  # attempt latency percentiles per ten seconds: a second holds too few attempts
PERCENTILES = (50, 90, 99)
RECENT_S = 60  # the summary line's percentiles cover the last minute
# Final states are counted by name: a state the engine adds later is counted without a change here.
COUNTED_STATES = ("done", "failed", "cancelled")

_SMALLEST_S = 0.001  # bucket 0 holds every duration up to a millisecond
_BUCKETS_PER_DOUBLING = 4
# 2**40 ms, about 35 years, past any process's life (ATTEMPT_TIMEOUT_S=0 sets no limit): longer attempts would
# share it. At 2**24 ms (4.7 hours) a 10-hour attempt was reported as 4.7 hours, below its true duration.
_LAST_BUCKET = 160


def bucket_bound(bucket: int) -> float:
    """The largest duration, in seconds, that ``bucket`` holds."""
    return _SMALLEST_S * 2 ** (bucket / _BUCKETS_PER_DOUBLING)


_BOUNDS = tuple(bucket_bound(bucket) for bucket in range(_LAST_BUCKET))  # the last bucket has none


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of an attempt of ``seconds``: the first whose bound is at least ``seconds``."""
    return bisect_left(_BOUNDS, seconds)  # _LAST_BUCKET past the last bound


class _Slot:
    """The figures of one second."""

    __slots__ = ("second", "accepted", "retried", "finished", "latency")

    def __init__(self, second: int) -> None:
        self.reset(second)

    def reset(self, second: int) -> None:
        self.second = second
        self.accepted = 0
        self.retried = 0
        self.finished: dict[str, int] = {}
        self.latency: dict[int, int] = {}  # bucket -> attempts


class _Pending:
    """One thread's counts of one second, not yet in the ring: changed only by that thread (see LiveFigures)."""

    __slots__ = ("thread", "second", "accepted", "retried", "finished", "latency")

    def __init__(self, thread: threading.Thread, second: int) -> None:
        self.thread = thread
        self.start(second)

    def start(self, second: int) -> None:
        self.second = second
        self.accepted = 0
        self.retried = 0
        self.finished: dict[str, int] = {}  # keyed by the task's state as given (a State is a str)
        self.latency: dict[int, int] = {}


def _tally(pending: _Pending, state: str) -> None:
    """Count a task that reached ``state``: a final state, or queued again for a retry."""
    if state in COUNTED_STATES:
        finished = pending.finished
        finished[state] = finished.get(state, 0) + 1
    elif state == "queued":
        pending.retried += 1


class LiveFigures(PoolObserver):
    """The dashboard's time series: give an instance to the pool as an observer.

    The hooks run on the pool's threads, outside the pool's locks. Each thread
    counts its current second in a ``_Pending`` that only it changes, so an
    event costs a clock read and a few increments; the thread takes this
    object's lock when its second is over, to add the second to the ring. A
    reader, under the same lock, adds every thread's pending second to the
    ring's. ``clock`` gives seconds since the epoch (tests inject a fake one).
    """

    def __init__(self, *, window_s: int = WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        if window_s < LATENCY_STEP_S:
            raise ValueError(f"window_s must be at least {LATENCY_STEP_S}, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        # The figures live in this process: the seconds before it are not zero, they were never counted (a
        # reload, a replaced worker or a restart begins again here).
        self._since = int(clock())
        # _lock must be held while reading or changing _slots (the ring, indexed by second % window_s)
        # or any slot in it, or _pending (the list), or while a thread moves its pending counts into the
        # ring; nothing else is done while it is held.
        self._lock = threading.Lock()
        self._slots = [_Slot(-1) for _ in range(window_s)]
        self._local = threading.local()  # .pending: this thread's _Pending
        self._pending: list[_Pending] = []
        self._series: tuple[int, dict[str, Any]] | None = None  # the last series() and its end second

    # -- PoolObserver ----------------------------------------------------

    def task_queued(self, task: Task) -> None:
        self.tasks_queued((task,))

    def tasks_queued(self, tasks: Sequence[Task]) -> None:
        self._pending_now().accepted += len(tasks)  # once per batch

    def attempt_finished(self, task: Task, seconds: float) -> None:
        pending = self._pending_now()
        bucket = latency_bucket(seconds)
        latency = pending.latency
        latency[bucket] = latency.get(bucket, 0) + 1
        _tally(pending, task.state)

    def task_abandoned(self, task: Task) -> None:
        self._count(task)

    def task_cancelled(self, task: Task) -> None:
        """A task was cancelled before an attempt of it ran."""
        self._count(task)

    def _count(self, task: Task) -> None:
        """Count ``task``'s final state, outside an attempt."""
        _tally(self._pending_now(), task.state)

    def _pending_now(self) -> _Pending:
        """This thread's pending counts, counting the current second."""
        second = int(self._clock())
        try:
            pending = self._local.pending
        except AttributeError:
            pending = self._register(second)
        if pending.second != second:
            self._move(pending, second)
        return pending

    def _register(self, second: int) -> _Pending:
        """This thread's first count: its pending counts join the list readers add in."""
        pending = self._local.pending = _Pending(threading.current_thread(), second)
        with self._lock:
            self._retire_ended()  # keeps the list as long as the threads alive, however many come and go
            self._pending.append(pending)
        return pending

    def _move(self, pending: _Pending, second: int) -> None:
        """Add this thread's counts of its last second to the ring and start counting ``second``."""
        with self._lock:
            self._add_to_ring(pending)
            pending.start(second)

    def _retire_ended(self) -> None:
        """Move the counts of threads that ended into the ring and forget them; needs _lock."""
        alive = []
        for pending in self._pending:  # each thread asked once: it may end while we look
            if pending.thread.is_alive():
                alive.append(pending)
            else:
                self._add_to_ring(pending)
        self._pending = alive

    def _add_to_ring(self, pending: _Pending) -> None:
        """Add ``pending``'s counts to its second's slot; needs _lock."""
        second = pending.second
        slot = self._slots[second % self.window_s]
        if slot.second != second:
            if slot.second > second:  # a later second has the slot: this one left the window
                return
            slot.reset(second)
        slot.accepted += pending.accepted
        slot.retried += pending.retried
        for state, n in pending.finished.items():
            state = str(state)
            slot.finished[state] = slot.finished.get(state, 0) + n
        for bucket, n in pending.latency.items():
            slot.latency[bucket] = slot.latency.get(bucket, 0) + n

    # -- reading ---------------------------------------------------------

    def series(self) -> dict[str, Any]:
        """The window's complete seconds, oldest first: counts per second and latency percentiles per step.

        The current second is left out: it is still filling, and would
        always show a dip at the end of the charts. ``since`` is the second
        counting began (this object's creation): the seconds before it hold
        zeros that were never counted.
        """
        end = int(self._clock())  # exclusive
        cached = self._series
        if cached is not None and cached[0] == end:
            return cached[1]  # complete seconds do not change: every page polling in this second shares one
        start = end - self.window_s
        # Latency steps are aligned to multiples of LATENCY_STEP_S, so a step's figures do not shift as time passes.
        latency_start = start + (-start) % LATENCY_STEP_S
        with self._lock:
            self._retire_ended()
            slots = [self._slots[second % self.window_s] for second in range(start, end)]
            copies = [
                (slot.accepted, slot.retried, dict(slot.finished), dict(slot.latency))
                if start <= slot.second < end
                else (0, 0, {}, {})
                for slot in slots
            ]
            # The seconds threads are still counting (their own or one they have not moved yet); read
            # while they may count on: an event counted meanwhile is read at the next second's series.
            pending = [
                (p.second, p.accepted, p.retried, dict(p.finished), dict(p.latency))
                for p in self._pending
                if start <= p.second < end
            ]
        for second, accepted, retried, finished, latency in pending:
            ring_accepted, ring_retried, ring_finished, ring_latency = copies[second - start]
            for state, n in finished.items():
                ring_finished[str(state)] = ring_finished.get(str(state), 0) + n
            for bucket, n in latency.items():
                ring_latency[bucket] = ring_latency.get(bucket, 0) + n
            copies[second - start] = (ring_accepted + accepted, ring_retried + retried, ring_finished, ring_latency)
        counts: dict[str, list[int]] = {
            "accepted": [accepted for accepted, _, _, _ in copies],
            "retried": [retried for _, retried, _, _ in copies],
        }
        for state in COUNTED_STATES:
            counts[state] = [finished.get(state, 0) for _, _, finished, _ in copies]
        histograms = [histogram for _, _, _, histogram in copies]
        latency: dict[str, list[float | None]] = {f"p{p}": [] for p in PERCENTILES}
        attempts = []
        for step in range(latency_start, end - LATENCY_STEP_S + 1, LATENCY_STEP_S):
            merged = _merge(histograms[step - start : step - start + LATENCY_STEP_S])
            attempts.append(sum(merged.values()))
            for name, value in percentiles(merged).items():
                latency[name].append(value)
        series = {
            "start": start,
            "seconds": self.window_s,
            "since": self._since,
            **counts,
            "latency": {"start": latency_start, "step": LATENCY_STEP_S, "attempts": attempts, **latency},
            "recent_latency": percentiles(_merge(histograms[-RECENT_S:])),
        }
        self._series = (end, series)  # one assignment: a reader sees the old pair or the new one
        return series


def _merge(histograms: list[dict[int, int]]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for histogram in histograms:
        for bucket, n in histogram.items():
            merged[bucket] = merged.get(bucket, 0) + n
    return merged


def percentiles(histogram: dict[int, int], ps: tuple[float, ...] = PERCENTILES) -> dict[str, float | None]:
    """``p<p>`` -> the upper bound of the bucket holding the ``p``-th percentile, for ascending ``ps``.

    Nearest rank: the smallest value with at least p % of the attempts at or below it. None when the
    histogram is empty.
    """
    total = sum(histogram.values())
    found: dict[str, float | None] = {f"p{p:g}": None for p in ps}
    if not total:
        return found
    buckets = iter(sorted(histogram))
    bucket, seen = -1, 0
    for p in ps:
        rank = max(1, math.ceil(total * p / 100))
        while seen < rank:
            bucket = next(buckets)
            seen += histogram[bucket]
        found[f"p{p:g}"] = bucket_bound(bucket)
    return found
