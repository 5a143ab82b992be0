import signal
import threading
from types import SimpleNamespace

import pytest
from doubles import FakeClock

from service.lifecycle import ECHO_WINDOW_S, NO_SIGNAL, ShutdownController, describe, is_copy
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
        self.store = SimpleNamespace(shared=False)  # a store of this process alone

    def shutdown(self, timeout=None, *, wait=True):
        self.calls.append((timeout, wait))
        if timeout == 0:
            self.pulled_in.set()
            self.release.set()
        if wait:
            assert self.release.wait(TIMEOUT)
            return SUMMARY
        return None


def start(pool, clock=None):
    drained = []
    done = threading.Event()
    controller = ShutdownController(
        pool,
        20,
        on_drained=lambda summary: (drained.append(summary), done.set()),
        clock=(clock or FakeClock()).monotonic,
    )
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


@pytest.mark.parametrize(
    "first, second",
    [
        (signal.SIGTERM, signal.SIGTERM),
        (signal.SIGINT, signal.SIGINT),
        (signal.SIGTERM, signal.SIGQUIT),
        (signal.SIGQUIT, signal.SIGINT),
    ],
)
def test_a_later_second_signal_pulls_the_deadline_in(first, second):
    pool = FakePool()
    clock = FakeClock()
    controller, drained, done = start(pool, clock)
    controller.request_stop(first)
    clock.advance(ECHO_WINDOW_S + 0.01)
    controller.request_stop(second)
    assert pool.pulled_in.wait(TIMEOUT)
    assert done.wait(TIMEOUT)
    assert (0, False) in pool.calls
    assert drained == [SUMMARY]


@pytest.mark.parametrize(
    "copies",
    [
        [signal.SIGINT, signal.SIGQUIT],  # a Ctrl-C: the terminal's SIGINT, then the arbiter passing it on
        [signal.SIGTERM, signal.SIGTERM],  # kill -TERM -<pgid>, systemd: to the worker, then from the arbiter
        [signal.SIGTERM, signal.SIGTERM, signal.SIGTERM],  # `timeout`: to gunicorn, to the group, from the arbiter
        [signal.SIGQUIT, signal.SIGINT],
    ],
)
def test_copies_of_one_request_drain_once_and_abandon_nothing(copies):
    pool = FakePool()
    clock = FakeClock()
    controller, drained, done = start(pool, clock)
    for signum in copies:
        controller.request_stop(signum)
        clock.advance(ECHO_WINDOW_S / len(copies))
    controller.request_stop(NO_SIGNAL)  # the worker's exit hook asking too
    pool.release.set()
    assert done.wait(TIMEOUT)
    assert pool.calls == [(20, True)]
    assert not pool.pulled_in.is_set()


@pytest.mark.parametrize(
    "first, signum, seconds, copy",
    [
        (signal.SIGINT, signal.SIGQUIT, 0.0, True),
        (signal.SIGQUIT, signal.SIGINT, 0.1, True),
        # The window the README and docs/shutdown.md give: 1 s; an operator's second Ctrl-C after it stops waiting.
        (signal.SIGTERM, signal.SIGTERM, 1.0, True),
        (signal.SIGTERM, signal.SIGTERM, 1.01, False),
        (signal.SIGINT, signal.SIGQUIT, 1.01, False),
        (signal.SIGINT, signal.SIGINT, 2.0, False),
        (signal.SIGTERM, signal.SIGQUIT, 0.0, False),  # gunicorn: SIGTERM to the arbiter, then SIGINT
        (signal.SIGTERM, signal.SIGINT, 0.0, False),
    ],
)
def test_is_copy(first, signum, seconds, copy):
    assert is_copy(first, signum, seconds) is copy


def test_a_stop_without_a_signal_drains_too():
    pool = FakePool()
    controller, drained, done = start(pool)
    controller.request_stop()
    pool.release.set()
    assert controller.join(TIMEOUT)
    assert drained == [SUMMARY]


def test_after_a_stop_the_process_began_itself_the_first_signal_is_not_a_second_one(caplog):
    # max_requests, or the arbiter gone: the drain began with no signal, and the operator's first stop signal
    # (systemctl stop, the arbiter's own stop) abandoned the running tasks at once as if it were a second.
    pool = FakePool()
    clock = FakeClock()
    controller, drained, done = start(pool, clock)
    controller.request_stop(NO_SIGNAL)
    clock.advance(5)
    with caplog.at_level("INFO", logger="service.lifecycle"):
        controller.request_stop(signal.SIGTERM)
        clock.advance(ECHO_WINDOW_S / 2)
        controller.request_stop(signal.SIGTERM)  # its copy from the arbiter
        controller.request_stop(NO_SIGNAL)  # the worker's exit hook
        clock.advance(ECHO_WINDOW_S)
        assert not pool.pulled_in.wait(0.2)
        controller.request_stop(signal.SIGTERM)  # asked again: stop waiting
        assert pool.pulled_in.wait(TIMEOUT)
    assert done.wait(TIMEOUT)
    assert pool.calls[0] == (20, True) and (0, False) in pool.calls
    messages = [record.getMessage() for record in caplog.records]
    assert "received SIGTERM: already draining (signal again to stop waiting)" in messages
    abandoning = [message for message in messages if "again: abandoning" in message]
    assert abandoning == ["received SIGTERM again: abandoning unfinished tasks now"]


def test_a_failing_report_still_ends_the_wait():
    def report(summary):
        raise OSError("the arbiter is gone")

    pool = FakePool()
    controller = ShutdownController(pool, 20, on_drained=report, clock=FakeClock().monotonic)
    controller.start()
    controller.request_stop(signal.SIGTERM)
    pool.release.set()
    assert controller.join(TIMEOUT)


def test_a_drain_that_ends_without_a_summary_is_still_reported_so_that_the_process_stops():
    # The report is what stops `python app.py`'s server: skipped without a summary, the process served on.
    class FailingPool(FakePool):
        def shutdown(self, timeout, wait=True):
            return None  # a step of the drain failed (and was logged) before the summary

    controller, drained, done = start(FailingPool())
    controller.request_stop(signal.SIGTERM)
    assert done.wait(TIMEOUT)
    assert drained == [None]
    assert controller.join(TIMEOUT)


def test_waiting_for_leftover_threads_is_bounded_and_a_stop_request_ends_it():
    pool = FakePool()
    clock = FakeClock()
    controller, _, done = start(pool, clock)
    controller.request_stop(signal.SIGTERM)
    pool.release.set()
    assert done.wait(TIMEOUT)
    release = threading.Event()
    leftover = threading.Thread(target=release.wait, args=(TIMEOUT,), name="leftover")
    leftover.start()
    try:
        assert controller.wait_for_threads(0.05) == ["leftover"]
        clock.advance(ECHO_WINDOW_S + 0.01)
        controller.request_stop(signal.SIGTERM)  # a later signal: stop waiting
        waited = threading.Thread(target=lambda: controller.wait_for_threads(TIMEOUT * 10))
        waited.start()
        waited.join(TIMEOUT)
        assert not waited.is_alive()
        release.set()
        leftover.join(TIMEOUT)
        assert controller.wait_for_threads(TIMEOUT) == []
    finally:
        release.set()


def test_describe_names_counts_and_abandoned():
    assert describe(SUMMARY) == (
        "shutdown complete: drained in 1.50 s; 0 queued, 0 running, 5 done, 1 failed; 1 abandoned"
    )


def test_a_drain_that_raises_still_ends_and_is_logged(caplog):
    class BrokenPool(FakePool):
        def shutdown(self, timeout=None, *, wait=True):
            raise RuntimeError("the drain broke")

    controller, drained, done = start(BrokenPool())
    controller.request_stop(signal.SIGTERM)
    assert controller.join(TIMEOUT)  # used to wait until the worker was killed
    assert drained == [None]  # no summary, reported all the same: it is what stops `python app.py`'s server
    assert "RuntimeError: the drain broke" in caplog.text
