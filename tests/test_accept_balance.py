"""AcceptBalance: a worker with a connection per request thread leaves new connections to the others, briefly."""

from __future__ import annotations

import pytest

from service.gunicorn_worker import AcceptBalance


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_lone_worker_accepts_every_connection():
    balance = AcceptBalance(1, 2, defer=0.002, clock=Clock())
    assert not balance.leave_to_others(50)
    assert not balance.paused()


def test_a_worker_with_a_free_request_thread_accepts_at_once():
    balance = AcceptBalance(2, 2, defer=0.002, clock=Clock())
    assert not balance.leave_to_others(0)
    assert not balance.leave_to_others(1)


def test_a_worker_with_a_connection_per_thread_pauses_then_takes_the_next_connection_itself():
    clock = Clock()
    balance = AcceptBalance(2, 2, defer=0.002, clock=clock)
    assert balance.leave_to_others(2)
    assert balance.paused()
    assert balance.wait_at_most(1.0) == pytest.approx(0.002)  # the poller wakes when the pause ends
    clock.now = 100.001
    assert balance.paused()
    clock.now = 100.0025
    assert not balance.paused()  # the pause is over: accepting again
    assert balance.wait_at_most(1.0) == 1.0
    assert not balance.leave_to_others(2)  # the connection that waited through the pause is taken here
    assert balance.leave_to_others(3)  # the next one is left to the others again


def test_pauses_are_limited_to_as_many_a_second_as_threads():
    clock = Clock()
    balance = AcceptBalance(2, 2, defer=0.002, clock=clock)
    for _ in range(2):  # a burst of `threads` pauses
        assert balance.leave_to_others(5)
        clock.now += 0.0025
        assert not balance.paused()
        assert not balance.leave_to_others(5)
    assert not balance.leave_to_others(5)  # none left: accepted at once
    assert not balance.paused()
    clock.now += 0.5  # refilled at two a second: one more
    assert balance.leave_to_others(5)
