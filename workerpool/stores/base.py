"""The store interface: where tasks live, and every change of a task as one atomic step.

The pool (``workerpool/pool.py``) is a thin runner over a store: worker
threads ``claim`` a due task, run the handler outside every lock, and
``finish`` the attempt. Everything that must be consistent (the admission
bound, the duplicate check, which task runs next, the retry decision racing a
cancel, recovery of attempts whose owner died) happens inside one method of a
store, under one lock (memory), in one transaction (SQLite) or in one script
(Redis). This module is therefore the whole locking story of the engine: a
store's methods are atomic and thread-safe, they never call out (no
handlers, observers or logging under their lock), and they return snapshots
(frozen ``Task`` values), never live records. A store that cannot reach or
write its data raises ``StoreUnavailable`` from any method, having changed
nothing it reported as done; but ``StoreNotSynced``, a kind of it, says the
change was made and only its fsync failed, and ``StorePartlyAdmitted`` that
the first steps of a large admission were made.

Time. Stores stamp and compare times with the wall clock they are given
(``clock``, seconds since the epoch): a store shared by several processes has
no common monotonic clock. Tests inject a fake clock.

Ownership. Each pool names itself with an ``owner`` string unique to the
process and pool (e.g. ``"host:pid:random"``). ``claim`` leases the task to
its owner until ``lease_until``; the owner renews leases while attempts run
(``renew``) from a thread of its own, whatever the handler does, as long as
the handler lets that thread run: one call that holds the GIL longer than a
lease (a C function that does not release it) stops the renewals too. An attempt whose lease expired is
``recover``-ed by any pool: counted as a failed attempt and retried by the
policy, or failed when out of retries. Delivery is therefore at least once.
A store used by one process only (``shared = False``, the memory store) may
treat leases as never expiring.

Admission bound. ``capacity`` bounds the tasks admitted and not yet started
(state ``queued`` with ``attempts == 0``, delayed tasks included). Tasks
waiting out a retry backoff were admitted once already and never count
against it, and a full store never refuses or drops them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import SubmitError
from ..task import State, Task


def full_queue_delays(*, delayed: int, waiting: int, first_due: float | None, now: float) -> tuple[int, float | None]:
    """``QueueFull``'s ``delayed`` and ``due_in``, from what a store read of its queue at ``now``.

    ``delayed`` of the ``waiting`` tasks are not due yet; ``first_due`` is
    the earliest due time of a waiting task (never a retry's: a retry holds
    no place and frees none when it runs). ``due_in`` is told only when
    every waiting task is delayed and none is due yet.
    """
    if delayed >= waiting and first_due is not None and first_due > now:
        return delayed, first_due - now
    return delayed, None


# Why an attempt whose lease expired was ended. The sweeping process cannot tell why its owner did not renew
# it: the owner may have ended, or be alive but stopped (SIGSTOP), paused (a VM, a long GC) or cut off from
# the store while this process was not (a network partition); the reason must be true in each case.
LOST_EXPIRED = (
    "lost: its lease expired, not renewed by the process running it (stopped, paused or cut off from the store)"
)

# Why an attempt whose lease expired while the store was unreachable, and stayed expired for a lease after
# it answered again, was ended: the process running it may still be alive (cut off from the store).
LOST_UNREACHABLE = "lost: its lease expired while the store was unreachable, and was not renewed once it was back"


def lost_while_unreachable(lease_until: float, unreachable: tuple[float, float] | None) -> bool:
    """Whether a lease that ran until ``lease_until`` expired within the span ``unreachable``."""
    return unreachable is not None and unreachable[0] <= lease_until <= unreachable[1]


@dataclass(frozen=True, slots=True)
class Renewal:
    """What ``renew`` learned about the attempts an owner holds."""

    lost: frozenset[str]
    """Ids no longer running under this owner (lease expired and recovered, or abandoned): drop their results."""
    cancel_requested: frozenset[str]
    """Ids whose cancellation was requested (possibly by another process): set their cancel events."""


Position = tuple[int, ...]
"""Where a listing stopped, in the store's own order (its sequence numbers, never an offset): the store reads
the next page from there, however many tasks were admitted meanwhile. What it holds is the store's own;
only the same listing (the same ``state``) of the same store can read it back: a caller that hands positions
out tells its own from others by ``TaskStore.position_key``."""


class InvalidPosition(ValueError):
    """A position no listing of this store could have made (another shape, a number out of range)."""


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a listing: its tasks, and where the next page starts (None: this is the last)."""

    tasks: list[Task]
    next: Position | None


def check_position(position: Position, size: int) -> Position:
    """``position`` itself if it is ``size`` non-negative 64-bit integers, else InvalidPosition."""
    if (
        type(position) is not tuple
        or len(position) != size
        or not all(type(n) is int and 0 <= n < 2**63 for n in position)
    ):
        raise InvalidPosition(f"not a position of this store's listings: {position!r}")
    return position


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Figures for health and metrics, read in one step."""

    counts: dict[State, int]
    """Retained tasks by state."""
    waiting: int
    """Queued tasks not yet started (the admission bound counts these), delayed ones included."""
    due: int
    """Queued tasks (new or retries) whose time has come: what idle workers would claim next."""
    retries_pending: int
    """Queued tasks waiting out a retry backoff (attempts > 0, not yet due)."""
    unavailable: str | None = None
    """Why the store cannot be written now, when the figures could be read all the same (a SQLite file whose
    write lock another program holds: they are as last committed); None when it can."""


class TaskStore(abc.ABC):
    """Every task by id, and the atomic transitions between its states.

    Legal transitions are those of ``task.TRANSITIONS``; a store checks them
    with ``task.check_transition``. Finished tasks (done, failed, cancelled)
    are retained for ``ttl`` seconds after they finish and at most
    ``max_finished`` of them, oldest finished first; queued and running tasks
    are never evicted. A final task's payload is dropped.
    """

    shared: ClassVar[bool] = False
    """True when other processes may use the same tasks (leases then matter, and
    shutdown hands unstarted work back instead of failing it)."""

    capacity: int
    """The admission bound (see the module docstring)."""

    @abc.abstractmethod
    def admit(self, tasks: Sequence[Task]) -> list[Task | SubmitError]:
        """Insert new tasks in one atomic step, in order; for each, its stored snapshot or why it was refused.

        Each task arrives ``queued`` with ``attempts == 0``; ``next_attempt_at``
        set means delayed until then. Refusals: ``DuplicateTask`` if the id is
        retained (or appeared earlier in ``tasks``), ``QueueFull`` once the
        bound is reached (later tasks of the batch may still fit no better:
        each is checked against the room left). A refused task leaves no trace.
        A task's ``created_at`` is raised to the latest one admitted before it
        (submitters stamp it before this step, so racing submits may arrive out
        of stamp order): creation times never run backwards in listing order.
        A store may bound the tasks of one step (Redis: GROUP_MAX_TASKS, so that
        no script outlasts the socket timeout) and take more in several, in
        order; one that fails after the first raises ``StorePartlyAdmitted``.
        """

    @abc.abstractmethod
    def claim(self, owner: str, lease_until: float) -> Task | None:
        """Start the next due task: ``running``, ``attempts + 1``, ``started_at`` now, leased to ``owner``.

        Due retries go first (they were accepted earlier), then the oldest due
        task. None when nothing is due.
        """

    @abc.abstractmethod
    def put_back(self, task_id: str, attempt: int, owner: str) -> Task | None:
        """Undo a claim whose attempt never started: if ``owner`` still runs attempt ``attempt`` of the task, it is
        queued again unrun, that attempt not counted (``attempts - 1``, no lease): a new task back at the head of the
        new tasks, where it was claimed from, a retry due now; one whose cancel was requested meanwhile is
        ``cancelled``, as a queued one is. Its snapshot; None when ``owner`` no longer runs that attempt
        (abandoned, recovered).

        For a pool whose drain abandoned its work while one of its workers claimed: that claim, made
        after the abandon, would otherwise run out its lease unrun, then count as a failed attempt.
        """

    def put_back_lost_claim(self, owner: str) -> None:  # noqa: B027  (only a store whose steps can run unanswered)
        """The calling thread claims no more for ``owner`` (its pool drains): if its last claim failed on the client
        though the store may have run it (a reply lost past the socket timeout), put the task it took back in the
        queue unrun, rather than leave it running with no thread to run it (the drain would wait for it to its
        deadline, then fail it as abandoned). StoreUnavailable if the store cannot be reached."""

    def forget_expired(self) -> bool:
        """One short step of retention's work left behind, for a store whose steps forget a bounded number of the
        finished tasks past their time each (after a mass expiry the rest wait for later steps): forget some
        more; whether any is left. The lease keeper calls it after each sweep, so that an idle service forgets
        them too. A store that forgets them all as it goes has nothing to do (False)."""
        return False

    @abc.abstractmethod
    def seconds_until_due(self) -> float | None:
        """0 if a queued task is due now, else seconds until the next one is; None if nothing is queued."""

    @abc.abstractmethod
    def wait_for_work(self, timeout: float | None) -> None:
        """Block until a task may have become claimable, ``wake`` is called, or ``timeout`` passes.

        A spurious return is allowed (the caller claims and waits again); a
        missed wake-up is not: work admitted by this process must wake a
        waiting worker at once, and a shared store must notice work admitted
        elsewhere within a short bounded time (poll or notification). The pool
        calls it right after a ``claim`` or ``finish_and_claim`` that found
        nothing, without claiming again: work admitted or falling due after
        that step must end the wait as it would any other.
        """

    @abc.abstractmethod
    def wake(self) -> None:
        """Release every ``wait_for_work`` in this process; later ones return at once too (used at shutdown)."""

    @abc.abstractmethod
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
        """End attempt ``attempt`` of a task ``owner`` holds; None if it no longer does (a late writer).

        - ``error is None``: ``done``, with ``result`` stored.
        - ``error`` and the task's cancellation was requested: ``cancelled`` (never retried).
        - ``error`` and ``retry_at``: ``queued`` again, due at ``retry_at`` (a retry).
        - ``error`` otherwise: ``failed``.
        ``last_error`` records ``error``.

        With ``created_at`` (the claimed task's), only the task created then is ended: once a
        task is forgotten its id may be used again, and a shared store's owner may run attempt 1
        of the new task while the late attempt of the old one, recovered meanwhile, returns.
        A store whose running tasks never change hands (the memory store) may ignore it.
        """

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
        """``finish`` then ``claim`` for the same owner: the ended snapshot (or None) and the next attempt (or None).

        A worker that ends an attempt usually starts the next one at once; a
        store may do both in one step (the memory store: one lock hold instead
        of two). The result is the same as the two calls made one after the
        other; a retry scheduled due now may be the task claimed next.
        """
        ended = self.finish(
            task_id, attempt, owner, error=error, result=result, retry_at=retry_at, created_at=created_at
        )  # fmt: skip
        try:
            return ended, self.claim(owner, lease_until)
        except Exception:  # the end is recorded: a failing claim is left to the worker's next one to meet
            return ended, None

    @abc.abstractmethod
    def renew(self, owner: str, task_ids: Iterable[str], lease_until: float) -> Renewal:
        """Extend the leases ``owner`` holds on ``task_ids``; report the lost ones and cancel requests."""

    def cancel_requested(self, task_ids: Iterable[str]) -> frozenset[str]:
        """Those of ``task_ids`` whose cancellation was requested, by any process; reads only.

        A shared store's owner asks this often (every CANCEL_POLL_S while its
        attempts run), so that a cancel requested in another process reaches
        the attempt at once rather than at its next lease renewal. A store of
        one process sets the cancel event itself: it has nothing to report.
        """
        return frozenset()

    @abc.abstractmethod
    def cancel(self, task_id: str) -> tuple[Task | None, bool]:
        """Cancel a task: its snapshot after the cancel (None if the id is unknown), and whether this call changed it.

        Queued (new, delayed or waiting for a retry): ``cancelled`` at once,
        never to run. Running: ``cancel_requested`` set, state unchanged (the
        attempt's end decides, see ``finish``). Final, or its cancel requested
        already: unchanged. A repeat is harmless; of calls racing in several
        threads or processes, exactly one is told it changed the task.
        """

    @abc.abstractmethod
    def recover(
        self,
        retry_at: Callable[[Task], float | None],
        *,
        before: float | None = None,
        unreachable: tuple[float, float] | None = None,
    ) -> list[Task]:
        """End every attempt whose lease has expired, as a failed attempt ("lost: ...").

        ``retry_at(task)`` gives the due time of its retry, or None when it
        is out of retries (then it is ``failed``); a cancel request makes it
        ``cancelled``. Only leases that expired before ``before`` (default:
        now) are ended; a lease that expired within ``unreachable`` (a span
        in which the caller could not reach the store) is ended as
        ``LOST_UNREACHABLE``: its process may be alive. Returns the new
        snapshots.
        """

    @abc.abstractmethod
    def abandon(self, reason: str, *, owner: str) -> list[Task]:
        """Shutdown gave up: fail unfinished work with ``reason``; return the new snapshots.

        Not shared: every queued and running task. Shared: only the attempts
        ``owner`` is running (the rest stays queued for other processes).
        """

    @abc.abstractmethod
    def get(self, task_id: str) -> Task | None:
        """The task's snapshot, or None if it is unknown or forgotten."""

    @abc.abstractmethod
    def list(self, state: State | None = None, limit: int = 100, *, results: bool = True) -> list[Task]:
        """Retained tasks, newest first: by creation, or by entry into ``state``.

        Listed tasks carry no payload (``""``), which a listing never shows, and with
        ``results=False`` no result (None) either: a store that keeps them elsewhere (SQLite,
        Redis) then does not read them (up to MAX_PAYLOAD_CHARS, MAX_RESULT_BYTES per task).
        """

    @abc.abstractmethod
    def page(
        self, state: State | None = None, limit: int = 100, *, results: bool = True, after: Position | None = None
    ) -> Page:
        """``list``'s tasks in pages: the first ``limit`` (``after`` None), or those listed after ``after``.

        ``Page.next`` is set when more tasks follow the page's last one: passed back as ``after``, it
        yields the page after it in the same order, keyed on the store's own ordering (never an
        offset), so that tasks admitted or entering ``state`` meanwhile (which list first) shift no
        later page. A walk lists no task twice, and skips none that stayed retained (in ``state``)
        throughout: a task that enters ``state`` again (a retry) lists by its new entry, ahead of the
        pages still to come. Each page is one
        read, found from ``after`` without reading the tasks before it where the store keeps an index
        (SQLite, Redis). ``InvalidPosition`` if ``after`` is not one of this store's positions for
        ``state``'s listing.
        """

    @abc.abstractmethod
    def position_key(self) -> bytes:
        """A random secret of this store's own, kept where its tasks are: the same in every process sharing
        them, another for another store (SQLite file, Redis database and prefix, memory store of another
        process or made anew). What a caller that hands out ``page``'s positions signs them with, so that it
        reads back only this store's, unaltered; the store's positions mean nothing to another store."""

    @abc.abstractmethod
    def stats(self) -> StoreStats:
        """Counts for health and metrics, read in one step."""

    @abc.abstractmethod
    def unfinished(self, owner: str | None = None) -> int:
        """Queued and running tasks (not shared), or the attempts ``owner`` is running (shared)."""

    def health(self) -> str | None:
        """Why the store cannot be used right now (e.g. "the disk is full"), or None when it can."""
        return None

    def close(self) -> None:  # noqa: B027  (optional: most stores hold nothing to release)
        """Release connections and files; the store is unusable afterwards."""
