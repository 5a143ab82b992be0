"""The pipe on which gunicorn workers report their drains to the arbiter."""

from __future__ import annotations

import os

import pytest

from service.drain_reports import RETIRING, Drain, DrainReports, send, server_summary
from service.lifecycle import QUEUED_UNKNOWN, describe
from workerpool import ShutdownSummary, State


@pytest.fixture
def reports():
    reports = DrainReports()
    yield reports
    os.close(reports.write_fd)
    os.close(reports._read_fd)


def test_each_worker_is_told_its_own_report_once(reports):
    os.write(reports.write_fd, b"101 shutdown complete: first\n202 shutdown complete: second\n")
    assert reports.take(202) == "shutdown complete: second"
    assert reports.take(202) is None
    assert reports.take(101) == "shutdown complete: first"
    assert reports.take(303) is None


def test_a_line_whose_end_has_not_arrived_is_kept_for_the_next_read(reports):
    os.write(reports.write_fd, b"101 shutdown comp")
    assert reports.take(101) is None
    os.write(reports.write_fd, b"lete\n")
    assert reports.take(101) == "shutdown complete"


def test_lines_no_worker_wrote_are_ignored(reports):
    os.write(reports.write_fd, b"garbage\n\n 7 x\n12\n")
    assert reports.take(7) is None
    assert reports.take(12) is None


def test_a_worker_sends_one_line_with_its_pid(reports):
    assert send(reports.write_fd, "shutdown complete: line\nbreak" + "x" * 1000)
    report = reports.take(os.getpid())
    assert report is not None and report.startswith("shutdown complete: line break")
    assert len(report) == 500


def test_a_worker_never_waits_on_a_full_pipe(reports):
    # Reports nobody read (or bytes written into the pipe from outside) must not block a draining worker.
    while True:
        try:
            os.write(reports.write_fd, b"x" * 4096)
        except BlockingIOError:
            break
    assert send(reports.write_fd, "shutdown complete") is False


def test_a_worker_stopping_by_itself_is_announced_once_and_is_not_its_report(reports):
    os.write(reports.write_fd, f"101 {RETIRING}\n202 shutdown complete: second\n".encode())
    assert reports.retiring() == {101}
    assert reports.retiring() == set()
    assert reports.take(101) is None  # an announcement, not how its drain ended
    assert reports.take(202) == "shutdown complete: second"


# -- several workers stopping together ---------------------------------------------------------


def _summary(queued, running, done, failed, cancelled, *, abandoned=(), seconds=0.5, **more) -> ShutdownSummary:
    counts = dict(zip(State, (queued, running, done, failed, cancelled), strict=True))
    return ShutdownSummary(counts=counts, abandoned=tuple(abandoned), drain_seconds=seconds, **more)


def test_a_drain_is_read_back_from_the_line_its_worker_wrote():
    drain = Drain.read(describe(_summary(10, 1, 74, 11, 12, abandoned=["a", "b"], seconds=1.234, left_to_leases=1)))
    assert drain == Drain(
        seconds=1.23,
        queued=10,
        own={"running": 1, "done": 74, "failed": 11, "cancelled": 12},
        abandoned=2,
        left_to_leases=1,
    )
    assert drain.described_alone() == (
        "drained in 1.23 s; 1 running, 74 done, 11 failed, 12 cancelled; 2 abandoned; 1 attempt(s) left to their leases"
    )
    uncounted = Drain.read(describe(_summary(0, 0, 3, 0, 0, queued_counted=False)))
    assert uncounted is not None and uncounted.queued is None
    assert Drain.read("not started (STORE could not be used); it held no task") is None


def test_the_server_line_counts_the_stores_queued_tasks_once_and_adds_up_what_each_worker_did():
    # Each worker's own summary counts every task the store still holds: summed, 10 left read as 20.
    first = Drain.read(describe(_summary(10, 0, 74, 11, 12, seconds=0.25)))
    second = Drain.read(describe(_summary(10, 0, 83, 12, 8, abandoned=["x"], seconds=1.5)))
    assert server_summary([first, second], workers=2) == (
        "shutdown complete: drained in 1.50 s; 10 queued, 0 running, 157 done, 23 failed, 20 cancelled; "
        "1 abandoned (2 workers added up)"
    )
    unknown = Drain.read(describe(_summary(0, 2, 1, 0, 0, queued_counted=False, left_to_leases=2)))
    assert server_summary([first, unknown], workers=3) == (
        "shutdown complete: drained in 0.50 s; 10 queued, 2 running, 75 done, 11 failed, 12 cancelled; "
        "0 abandoned; 2 attempt(s) left to their leases: the store was unavailable "
        "(2 of 3 workers added up: 1 sent no report, see above)"
    )
    assert server_summary([unknown], workers=2).startswith(f"shutdown complete: drained in 0.50 s; {QUEUED_UNKNOWN},")
