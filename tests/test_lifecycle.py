import signal
import threading

import pytest

from service.lifecycle import ShutdownController, describe, is_echo
from workerpool import ShutdownSummary, State

TIMEOUT = 10
SUMMARY = ShutdownSummary(
    counts={State.QUEUED: 0, State.RUNNING: 0, State.DONE: 5, State.FAILED: 1}, abandoned=("x",), drain_seconds=1.5
)


class FakePool:
    """Records shutdown calls; the first (the drain) blocks until released or pulled in."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []
        self.release = threading.Event()
        self.pulled_in = threading.Event()

    def shutdown(self, timeout=None, *, wait=True):
        self.calls.append((timeout, wait))
        if timeout == 0:
            self.pulled_in.set()
            self.release.set()
        if wait:
            assert self.release.wait(TIMEOUT)
            return SUMMARY
        return None


def start(pool):
    drained = []
    done = threading.Event()
    controller = ShutdownController(pool, 20, on_drained=lambda summary: (drained.append(summary), done.set()))
    controller.start()
    return controller, drained, done


def test_the_first_signal_drains_with_the_timeout():
    pool = FakePool()
    controller, drained, done = start(pool)
    controller.request_stop(signal.SIGTERM)
    pool.release.set()
    assert done.wait(TIMEOUT)
    assert pool.calls == [(20, True)]
    assert drained == [SUMMARY]
    assert controller.join(TIMEOUT)


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT),
                                           (signal.SIGTERM, signal.SIGQUIT), (signal.SIGQUIT, signal.SIGINT)])
def test_a_second_signal_pulls_the_deadline_in(first, second):
    pool = FakePool()
    controller, drained, done = start(pool)
    controller.request_stop(first)
    controller.request_stop(second)
    assert pool.pulled_in.wait(TIMEOUT)
    assert done.wait(TIMEOUT)
    assert (0, False) in pool.calls
    assert drained == [SUMMARY]


def test_the_arbiters_echo_of_a_ctrl_c_is_not_a_second_signal():
    pool = FakePool()
    controller, drained, done = start(pool)
    controller.request_stop(signal.SIGINT)  # the terminal's Ctrl-C
    controller.request_stop(signal.SIGQUIT)  # gunicorn's arbiter passing it on
    pool.release.set()
    assert done.wait(TIMEOUT)
    assert pool.calls == [(20, True)]
    assert not pool.pulled_in.is_set()


@pytest.mark.parametrize(
    "previous, signum, echo",
    [(signal.SIGINT, signal.SIGQUIT, True), (signal.SIGTERM, signal.SIGQUIT, False),
     (signal.SIGQUIT, signal.SIGINT, False), (signal.SIGINT, signal.SIGINT, False)],
)
def test_is_echo(previous, signum, echo):
    assert is_echo(previous, signum) is echo


def test_describe_names_counts_and_abandoned():
    assert describe(SUMMARY) == (
        "shutdown complete: drained in 1.50 s; 0 queued, 0 running, 5 done, 1 failed; 1 abandoned"
    )
