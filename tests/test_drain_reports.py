"""The pipe on which gunicorn workers report their drains to the arbiter."""

from __future__ import annotations

import os

import pytest

from service.drain_reports import RETIRING, DrainReports, send


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
