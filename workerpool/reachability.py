"""What the lease keeper saw of the store's reachability, so that a sweep does not count live attempts lost.

A shared store that stops answering (Redis paused or restarting, a SQLite
file locked) for longer than a lease lets every lease expire, including
those of attempts still running in live processes: their keepers could not
renew them either. The first sweep after the store answers again would end
those attempts as lost, whichever process ran it first. Every process's
lease keeper reaches the store once every third of a lease, so it sees such
an outage itself: a step that fails, or one that answers only after longer
than ``slow`` seconds (a paused Redis answers late, within the socket
timeout, rather than failing). Leases that expired from the end of the last
step that answered to the end of the next one are then held back from the
sweep for ``grace`` seconds (a lease) after the store answers again: an
owner that is alive renews them meanwhile. One that is still expired after
that is ended with a reason that says the store was unreachable, not that
its process stopped, which nobody here can tell.

A process that starts while the store is unreachable (a new instance, or
gunicorn's replacement of a worker) cannot tell when the outage began: until
its first step answers it counts as never having reached the store, so that
outage is held back from its start of time, not from the process's start.

A process that took no step for a while (stopped by SIGSTOP, a paused VM or
container, a thread starved of CPU) cannot tell what the store went through
meanwhile: an outage that began and ended between two of its steps let the
leases of live owners expire all the same. So a step that begins longer
than ``quiet`` seconds after the last answer (the keeper's period plus a
slow step: more than its schedule allows) holds back the leases that expired
since for a lease as an outage does, without counting that span as one:
those still expired after the hold are ended with the usual reason, not as
lost while the store was unreachable, which nobody here saw.
"""

from __future__ import annotations

import math


class Reachability:
    """The lease keeper's record of when it reached the store, and of the latest span it could not.

    Times are the store's clock (the one leases are written in). Used by the
    lease keeper's thread alone: no lock.
    """

    def __init__(self, *, grace: float, slow: float, quiet: float) -> None:
        self._grace = grace
        self._slow = slow
        self._quiet = quiet
        # When a step last answered: never yet. An outage seen before the first answer may have begun any
        # time before this process started, and let the leases of live owners expire then.
        self._reached_at = -math.inf
        self._down_since: float | None = None  # while steps fail: when the store last answered before
        self._held_from = 0.0  # leases that expired from then until _held_until - grace wait for _held_until
        self._held_until = -math.inf
        self.span: tuple[float, float] | None = None  # the latest span in which the store was unreachable

    @property
    def failing(self) -> bool:
        """Whether the latest step got no answer from the store."""
        return self._down_since is not None

    def failed(self) -> None:
        """A step got no answer from the store."""
        if self._down_since is None:
            self._down_since = self._outage_began()

    def answered(self, now: float, seconds: float) -> None:
        """A step that took ``seconds`` got the store's answer at ``now``."""
        if self._down_since is not None or seconds > self._slow:
            began = self._outage_began() if self._down_since is None else self._down_since
            self.span = (began, now)
            self._held_from, self._held_until = began, now + self._grace
            self._down_since = None
        self._reached_at = now

    def stepping(self, now: float) -> None:
        """A step begins at ``now``: after a pause of this process, hold back what expired during it.

        Called before the step's sweep reads the cutoff. A first step after
        the process's start follows no pause (see the module doc).
        """
        if self._down_since is None and -math.inf < self._reached_at < now - self._quiet:
            self._held_from, self._held_until = self._outage_began(), now + self._grace

    def _outage_began(self) -> float:
        """When the outage that a step just saw began: the last answer, or an earlier outage's start.

        An outage that begins while the leases of an earlier one are still held
        back is the same outage to their owners (they could renew only in the
        short window between): the hold goes on from its start until a lease
        after this one ends.
        """
        if self._reached_at < self._held_until:
            return min(self._reached_at, self._held_from)
        return self._reached_at

    def cutoff(self, now: float) -> float:
        """Sweep only the leases that expired before this time (``now`` unless an outage holds some back)."""
        if self._down_since is not None:
            return min(now, self._down_since)
        if now < self._held_until:
            return min(now, self._held_from)
        return now
