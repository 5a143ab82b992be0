"""Metrics shared by several processes: snapshots added up, ended processes' counts kept, gauges by pid."""

from __future__ import annotations

import concurrent.futures
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from http_fixtures import LISTENING, WAIT_S, Client, ServerProcess, clean_environment, instant, wait_until, worker_pids
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service import metrics_share
from service.metrics import Metrics, counts_problem
from workerpool import QueueFull, State, StoreUnavailable, Task, WorkerPool


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for sample in family.samples
    }


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def accept(metrics: Metrics, count: int) -> None:
    metrics.tasks_queued([Task(f"t{n}", None, 0, created_at=1000.0) for n in range(count)])


def process(directory, pid: int, *, workers: int = 2) -> tuple[Metrics, WorkerPool]:
    """The metrics of one server process, publishing only when told (or when scraped)."""
    metrics = Metrics()
    pool = WorkerPool(instant, workers=workers, queue_size=4, observers=[metrics])
    metrics.watch(pool)
    metrics.share(directory, interval=None, pid=pid)
    return metrics, pool


def test_add_sums_numbers_and_lists_and_keeps_the_earliest_creation():
    one = {"created": 5.0, "row": {"accepted": 2, "buckets": [1, 0, 2]}, "other": {"x": {"created": 9.0, "value": 1}}}
    two = {"created": 3.0, "row": {"accepted": 5, "buckets": [0, 4, 1]}, "other": {"y": {"created": 1.0, "value": 2}}}
    assert metrics_share.add(one, two) == {
        "created": 3.0,
        "row": {"accepted": 7, "buckets": [1, 4, 3]},
        "other": {"x": {"created": 9.0, "value": 1}, "y": {"created": 1.0, "value": 2}},
    }
    assert metrics_share.add({}, one) == one


def test_two_processes_counts_are_summed_whichever_answers(tmp_path):
    first, _ = process(tmp_path, 101)
    second, _ = process(tmp_path, 102)
    accept(first, 3)
    accept(second, 4)
    first.count_rejection(QueueFull(1))
    second.attempt_finished(Task("t", None, 0, State.DONE, 1, created_at=1000.0, finished_at=1000.2), 0.2)
    first.publish()
    second.publish()
    for answering in (first, second):
        assert value(answering, "workerpool_tasks_accepted_total") == 7
        assert value(answering, "workerpool_tasks_rejected_total", reason="queue_full") == 1
        assert value(answering, "workerpool_attempts_total", outcome="succeeded") == 1
        assert value(answering, "workerpool_attempt_duration_seconds_bucket", le="0.25") == 1
        assert value(answering, "workerpool_task_duration_seconds_count") == 1


def test_a_scrape_publishes_the_answering_process_so_later_scrapes_never_go_back(tmp_path):
    first, _ = process(tmp_path, 101)
    second, _ = process(tmp_path, 102)
    accept(first, 5)
    assert value(first, "workerpool_tasks_accepted_total") == 5  # its own counts, fresh
    assert value(second, "workerpool_tasks_accepted_total") == 5  # first's, as its scrape published them
    accept(first, 2)  # not published yet: another process's scrape does not see them until it is
    assert value(second, "workerpool_tasks_accepted_total") == 5
    first.publish()
    assert value(second, "workerpool_tasks_accepted_total") == 7


def test_an_ended_process_keeps_its_counts_and_loses_its_gauges(tmp_path):
    ended, _ = process(tmp_path, 101)
    running, _ = process(tmp_path, 102, workers=3)
    accept(ended, 6)
    ended.publish()
    assert value(running, "workerpool_workers") == 5
    metrics_share.mark_process_dead(tmp_path, 101)
    found = samples(running)
    assert found[("workerpool_tasks_accepted_total", ())] == 6
    assert found[("workerpool_workers", ())] == 3
    assert ("workerpool_draining", (("pid", "101"),)) not in found
    assert found[("workerpool_draining", (("pid", "102"),))] == 0


def test_a_task_store_that_cannot_be_used_leaves_out_its_gauges_alone(tmp_path, monkeypatch):
    first, pool = process(tmp_path, 101)
    second, _ = process(tmp_path, 102, workers=3)
    accept(first, 2)
    first.publish()

    def down(*args, **kwargs):
        raise StoreUnavailable("the disk is full")

    monkeypatch.setattr(type(pool.store), "stats", down)
    found = samples(second)
    assert found[("workerpool_store_available", ())] == 0
    assert found[("workerpool_tasks_accepted_total", ())] == 2
    assert found[("workerpool_workers", ())] == 5
    assert not any(name.startswith(("workerpool_queue_", "workerpool_tasks_retained")) for name, _ in found)


def test_a_process_that_gets_an_ended_ones_pid_counts_on_from_its_counts(tmp_path):
    ended, _ = process(tmp_path, 101)
    accept(ended, 6)
    ended.publish()
    metrics_share.mark_process_dead(tmp_path, 101)
    successor, _ = process(tmp_path, 101)
    accept(successor, 1)
    assert value(successor, "workerpool_tasks_accepted_total") == 7
    # The ended process's counts were folded into the retired ones: the successor counts from zero.
    assert json.loads((tmp_path / "counts-101.json").read_text())["row"]["accepted"] == 1
    assert json.loads((tmp_path / "counts-retired.json").read_text())["counts"]["row"]["accepted"] == 6


def test_a_process_whose_end_was_not_noted_leaves_its_counts_to_the_one_that_gets_its_pid(tmp_path):
    ended, _ = process(tmp_path, 101)  # its arbiter was killed: nobody folded its counts
    accept(ended, 6)
    ended.publish()
    successor, _ = process(tmp_path, 101)
    accept(successor, 1)
    assert value(successor, "workerpool_tasks_accepted_total") == 7


def _publish(directory: Path, pid: int, accepted: int) -> None:
    metrics_share.ProcessSnapshots(directory, pid=pid).publish(lambda: ({"row": {"accepted": accepted}}, {"up": 1}))


def _accepted(directory: Path) -> int:
    return metrics_share.ProcessSnapshots(directory, pid=1).read()[0].get("row", {}).get("accepted", 0)


def test_ended_processes_counts_are_folded_into_one_file(tmp_path):
    # As under max_requests recycling or many TTIN/TTOU: the files stay as many as the processes running, plus one.
    pids = sorted({ended_pid() for _ in range(50)})  # a fold passes over a process still running
    *ended, last, running = pids
    for pid in pids:
        _publish(tmp_path, pid, 2)
    for pid in ended:
        metrics_share.mark_process_dead(tmp_path, pid)
    names = sorted(path.name for path in tmp_path.glob("*.json"))
    assert names == sorted(
        ["counts-retired.json"] + [f"{kind}-{pid}.json" for kind in ("counts", "live") for pid in (last, running)]
    )
    assert _accepted(tmp_path) == 2 * len(pids)
    metrics_share.mark_process_dead(tmp_path, last)
    metrics_share.mark_process_dead(tmp_path, last)  # noted twice: folded once
    assert _accepted(tmp_path) == 2 * len(pids)


def test_the_retired_record_names_the_latest_folds_only_and_a_reader_that_missed_them_counts_each_once(
    tmp_path, monkeypatch, caplog
):
    # It named every ended process's file for good: one more name per worker recycled, read at every scrape.
    monkeypatch.setattr(metrics_share, "FOLDS_NAMED", 3)
    pids = sorted({ended_pid() for _ in range(8)})
    for pid in pids:
        _publish(tmp_path, pid, 1)
    reader = metrics_share.ProcessSnapshots(tmp_path, pid=os.getpid())  # reads every counts file as it starts
    for pid in pids:
        metrics_share.mark_process_dead(tmp_path, pid)
    record = json.loads((tmp_path / metrics_share.RETIRED).read_text())
    assert record["folds"] == len(pids)
    assert sorted(record["folded"]) == sorted(f"counts-{pid}.json" for pid in pids[-3:])
    assert _accepted(tmp_path) == len(pids)
    assert reader.read()[0]["row"]["accepted"] == len(pids)  # the files of unnamed folds not written back
    assert [path.name for path in tmp_path.glob("counts-*")] == ["counts-retired.json"]
    assert "written back" not in caplog.text


def test_scrapes_never_go_back_while_ended_processes_are_folded(tmp_path, caplog):
    # One reader throughout, which remembers every counts file it read: a folded file is not one to write back.
    pids = sorted({ended_pid() for _ in range(40)})
    reader = metrics_share.ProcessSnapshots(tmp_path, pid=os.getpid())
    folded = threading.Event()
    seen: list[int] = []

    def scrape() -> None:
        while not folded.is_set():
            seen.append(reader.read()[0]["row"]["accepted"])
        seen.append(reader.read()[0]["row"]["accepted"])

    for pid in pids:
        _publish(tmp_path, pid, 1)
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        for pid in pids:
            metrics_share.mark_process_dead(tmp_path, pid)
    finally:
        folded.set()
        scraper.join(WAIT_S)
    assert seen == [len(pids)] * len(seen), sorted(set(seen))
    assert [path.name for path in tmp_path.glob("counts-*")] == ["counts-retired.json"]
    assert "written back" not in caplog.text


def test_the_arbiter_does_not_wait_for_a_fold_lock_a_stopped_reader_holds_and_folds_at_a_later_exit(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(metrics_share, "FOLD_LOCK_WAIT_S", 0.05)
    first, second = ended_pid(), ended_pid()
    _publish(tmp_path, first, 2)
    _publish(tmp_path, second, 3)
    reader = os.open(tmp_path / metrics_share.FOLD_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(reader, fcntl.LOCK_SH)  # a process stopped (SIGSTOP, a debugger) while it reads the directory
    try:
        reaping = threading.Thread(target=metrics_share.mark_process_dead, args=(tmp_path, first), daemon=True)
        reaping.start()
        reaping.join(WAIT_S)
        assert not reaping.is_alive(), "the arbiter waited for the lock"
    finally:
        os.close(reader)
    assert not (tmp_path / f"live-{first}.json").exists()  # its gauges go at once
    assert _counts_files(tmp_path) == {first: 2, second: 3}  # its counts stay, in the sum
    assert "could not fold the metrics counts of 1 ended process(es)" in caplog.text
    assert _accepted(tmp_path) == 5
    metrics_share.mark_process_dead(tmp_path, second)  # the next exit folds both
    assert _counts_files(tmp_path) == {"retired": 5}
    assert _accepted(tmp_path) == 5


def test_a_scrape_does_not_wait_for_a_fold_lock_a_stopped_process_holds_and_answers_the_counts_read_before(
    tmp_path, monkeypatch, caplog
):
    # A process stopped inside a fold or a write-back holds the lock: every scrape waited for it, on a request
    # thread, until the worker's threads were all taken.
    monkeypatch.setattr(metrics_share, "SCRAPE_LOCK_WAIT_S", 0.05)
    other = 2**22 + 17  # a running process's counts, as last read
    metrics_share.ProcessSnapshots(tmp_path, pid=other).publish(lambda: ({"row": {"accepted": 2}}, {"up": 2}))
    reader = metrics_share.ProcessSnapshots(tmp_path, pid=os.getpid())
    reader.publish(lambda: ({"row": {"accepted": 3}}, {"up": 1}))
    assert reader.read()[0]["row"]["accepted"] == 5
    reader.publish(lambda: ({"row": {"accepted": 4}}, {"up": 1}))
    answers: list = []
    holder = os.open(tmp_path / metrics_share.FOLD_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a process stopped (SIGSTOP, a debugger) inside a fold
    try:
        scrape = threading.Thread(target=lambda: answers.append(reader.read()), daemon=True)
        scrape.start()
        scrape.join(WAIT_S)
        assert not scrape.is_alive(), "the scrape waited for the lock"
        ended = {f"counts-{ended_pid()}.json": {"row": {"accepted": 1}}}  # a removed file to write back
        writing = threading.Thread(target=lambda: answers.append(reader._write_back(ended)), daemon=True)
        writing.start()
        writing.join(WAIT_S)
        assert not writing.is_alive(), "the write-back waited for the lock"
        monkeypatch.setattr(metrics_share, "SCRAPE_LOCK_WAIT_S", 100 * WAIT_S)
        later = threading.Thread(target=lambda: answers.append(reader.read()), daemon=True)
        later.start()
        later.join(WAIT_S)
        assert not later.is_alive(), "a later scrape waited for the lock again"
    finally:
        os.close(holder)
    (counts, live), written, (later_counts, _) = answers
    assert counts["row"]["accepted"] == later_counts["row"]["accepted"] == 6  # the other's as read, this one's now
    assert live == {other: {"up": 2}, os.getpid(): {"up": 1}}
    assert written is False and not (tmp_path / next(iter(ended))).exists()  # left to the next scrape
    assert caplog.text.count("the metrics lock of") == 1 and "was held for more than" in caplog.text
    assert reader.read()[0]["row"]["accepted"] == 6  # had again


def test_a_fold_that_fails_leaves_every_file_it_had_to_fold_to_a_later_exit(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(metrics_share, "FOLD_LOCK_WAIT_S", 0.05)
    first, second, third = ended_pid(), ended_pid(), ended_pid()
    for pid, accepted in ((first, 2), (second, 3), (third, 4)):
        _publish(tmp_path, pid, accepted)
    reader = os.open(tmp_path / metrics_share.FOLD_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(reader, fcntl.LOCK_SH)
    try:
        metrics_share.mark_process_dead(tmp_path, first)  # the lock is held: left to fold at a later exit
    finally:
        os.close(reader)
    replace, failures = metrics_share._replace, []

    def full_disk(path, text):  # the retired record cannot be written once
        if path.name == metrics_share.RETIRED and not failures:
            failures.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(path, text)

    monkeypatch.setattr(metrics_share, "_replace", full_disk)
    metrics_share.mark_process_dead(tmp_path, second)
    assert failures and "could not fold the metrics counts of the ended process" in caplog.text
    assert _counts_files(tmp_path) == {first: 2, second: 3, third: 4}  # nothing folded, all still in the sum
    assert _accepted(tmp_path) == 9
    metrics_share.mark_process_dead(tmp_path, third)  # the next exit folds all three
    assert _counts_files(tmp_path) == {"retired": 9}
    assert _accepted(tmp_path) == 9


def test_the_creation_stamp_is_the_earliest_process_s(tmp_path):
    first, _ = process(tmp_path, 101)
    second, _ = process(tmp_path, 102)
    assert value(second, "workerpool_tasks_accepted_created") == first._created
    assert value(second, "workerpool_attempts_timed_out_created") == first._created


def test_per_process_gauges_are_summed_or_labelled_by_pid(tmp_path):
    first, first_pool = process(tmp_path, 101, workers=2)
    second, second_pool = process(tmp_path, 102, workers=3)
    second_pool.shutdown(0)  # draining from now on
    second.publish()
    found = samples(first)
    assert found[("workerpool_workers", ())] == 5
    assert found[("workerpool_draining", (("pid", "101"),))] == int(not first_pool.accepting)
    assert found[("workerpool_draining", (("pid", "102"),))] == 1
    assert found[("workerpool_stuck_threads", (("pid", "102"),))] == 0
    assert found[("workerpool_stuck_threads_limit", (("pid", "102"),))] == 3
    assert found[("workerpool_attempts_timed_out_total", ())] == 0
    assert found[("workerpool_queue_capacity", ())] == 4  # the store's own gauges stay as they are


def test_a_file_is_written_again_only_when_its_snapshot_changed(tmp_path):
    metrics, _ = process(tmp_path, 101)
    counts, live = tmp_path / "counts-101.json", tmp_path / "live-101.json"
    inodes = counts.stat().st_ino, live.stat().st_ino  # each write replaces the file: a new inode
    metrics.publish()
    assert (counts.stat().st_ino, live.stat().st_ino) == inodes
    accept(metrics, 1)
    metrics.publish()
    assert json.loads(counts.read_text())["row"]["accepted"] == 1
    assert counts.stat().st_ino != inodes[0]
    assert live.stat().st_ino == inodes[1]  # the gauges did not change


def test_prepare_removes_an_earlier_run_s_snapshots_only(tmp_path):
    (tmp_path / "counts-7.json").write_text("{}")
    (tmp_path / "live-7.json").write_text("{}")
    (tmp_path / "counts-8.json.partial").write_text("{")
    (tmp_path / "notes.txt").write_text("mine")
    metrics_share.prepare(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]
    metrics_share.prepare(tmp_path / "new" / "dir")
    assert (tmp_path / "new" / "dir").is_dir()


def test_a_directory_prepare_makes_is_private_under_a_umask_that_lets_the_group_write(tmp_path):
    previous = os.umask(0o002)  # the usual umask of a user with a group of their own
    try:
        metrics_share.prepare(tmp_path / "new" / "dir")
    finally:
        os.umask(previous)
    metrics_share.check_private(tmp_path / "new" / "dir")
    assert stat.S_IMODE((tmp_path / "new" / "dir").stat().st_mode) == 0o700


def test_without_sharing_nothing_is_written_and_the_counts_are_this_process_s(tmp_path):
    metrics = Metrics()
    accept(metrics, 2)
    metrics.publish()
    metrics.stop_sharing()
    assert value(metrics, "workerpool_tasks_accepted_total") == 2
    assert list(tmp_path.iterdir()) == []


class Recorder:
    def __init__(self, calls_to_signal: int) -> None:
        self.calls = 0
        self._wanted = calls_to_signal
        self.reached = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        if self.calls >= self._wanted:
            self.reached.set()


def test_the_publisher_publishes_every_interval_and_once_more_at_stop():
    recorder = Recorder(3)
    publisher = metrics_share.Publisher(recorder, interval=0.001)
    publisher.start()
    assert recorder.reached.wait(WAIT_S)
    publisher.stop()
    calls = recorder.calls
    assert not publisher._thread.is_alive()
    publisher.stop()
    assert recorder.calls == calls + 1


def test_stop_sharing_publishes_the_last_counts(tmp_path):
    metrics = Metrics()
    metrics.share(tmp_path, interval=3600.0, pid=5)
    accept(metrics, 4)
    metrics.stop_sharing()
    assert json.loads((tmp_path / "counts-5.json").read_text())["row"]["accepted"] == 4


def test_a_publication_that_fails_is_logged_and_the_next_one_tries_again(tmp_path, caplog):
    metrics = Metrics()
    metrics.share(tmp_path, interval=None, pid=9)
    accept(metrics, 1)
    blocker = tmp_path / f"counts-9.json.{os.getpid()}-{threading.get_ident()}.partial"  # where this thread writes
    blocker.mkdir()  # the file cannot be written (as on a full disk)
    metrics._publish_quietly()
    assert "could not publish the metrics" in caplog.text
    assert value(metrics, "workerpool_tasks_accepted_total") == 0  # the last snapshot: behind, never ahead
    blocker.rmdir()
    metrics._publish_quietly()
    assert value(metrics, "workerpool_tasks_accepted_total") == 1


def test_a_process_starts_sharing_where_it_cannot_write_logs_it_once_and_publishes_once_it_can(tmp_path, caplog):
    # share() raised: a gunicorn worker booting with a full disk (or its directory unmakeable) failed
    # to boot, and gunicorn then stopped the whole server.
    blocked = tmp_path / "blocked"
    blocked.write_text("")  # a file where the directory's parent should be: nothing can be written under it
    metrics = Metrics()
    metrics.share(blocked / "metrics", interval=None, pid=9)
    accept(metrics, 2)
    metrics._publish_quietly()
    assert value(metrics, "workerpool_tasks_accepted_total") == 0  # a scrape answers: what it can read, no error
    assert caplog.text.count("could not publish the metrics") == 1  # once, not every round
    blocked.unlink()
    metrics._publish_quietly()
    assert json.loads((blocked / "metrics" / "counts-9.json").read_text())["row"]["accepted"] == 2
    assert "the metrics are published to" in caplog.text
    assert value(metrics, "workerpool_tasks_accepted_total") == 2
    metrics_share.mark_process_dead(tmp_path / "blocked" / "metrics" / "x", 9)  # the arbiter's side: no error either


def test_a_write_that_fails_midway_leaves_no_partial_file(tmp_path, monkeypatch):
    metrics = Metrics()
    metrics.share(tmp_path, interval=None, pid=9)
    accept(metrics, 1)

    def disk_full(path: Path, text: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics_share, "_write", disk_full)
    metrics._publish_quietly()
    metrics._publish_quietly()
    snapshots = sorted(path.name for path in tmp_path.iterdir() if path.name != metrics_share.FOLD_LOCK)
    assert snapshots == ["counts-9.json", "live-9.json"]  # one a round before


@pytest.mark.parametrize("count", [0, 3])
def test_a_scrape_reads_no_partial_file(tmp_path, count):
    metrics, _ = process(tmp_path, 101)
    (tmp_path / "counts-102.json.partial").write_text("{")  # a process killed while writing
    accept(metrics, count)
    assert value(metrics, "workerpool_tasks_accepted_total") == count


def ended_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_removed_directory_is_made_again_and_the_sum_does_not_go_back(tmp_path, caplog):
    directory, gone = tmp_path / "metrics", ended_pid()
    directory.mkdir()
    ended, _ = process(directory, gone)
    accept(ended, 6)
    ended.publish()
    metrics_share.mark_process_dead(directory, gone)
    running, _ = process(directory, os.getpid())
    accept(running, 3)
    assert value(running, "workerpool_tasks_accepted_total") == 9
    shutil.rmtree(directory)  # a tmp cleaner, or `rm -rf /tmp/*`
    assert value(running, "workerpool_tasks_accepted_total") == 9
    # Its own written again, and the ended one's counts back (folded into the retired ones when it ended).
    assert _counts_files(directory) == {"retired": 6, os.getpid(): 3}
    assert "the metrics directory" in caplog.text and "made again" in caplog.text
    assert "1 metrics file(s) of ended processes were removed" in caplog.text


def test_an_ended_process_s_counts_written_back_are_not_summed_twice_once_the_arbiter_folds_again(tmp_path):
    # A reader that had not read the retired counts writes an ended process's file back; the arbiter, its retired
    # file gone, folds the next ended process into its own copy, which holds that process's counts already.
    directory = tmp_path / "metrics"
    first, second = ended_pid(), ended_pid()  # two workers, which end one after the other
    _counted(metrics_share.ProcessSnapshots(directory, pid=first), 20)
    survivor = metrics_share.ProcessSnapshots(directory, pid=second)
    _counted(survivor, 20)
    assert _summed(survivor) == 40
    metrics_share.mark_process_dead(directory, first)
    shutil.rmtree(directory)  # a tmp cleaner
    _counted(survivor, 20)
    assert _summed(survivor) == 40
    metrics_share.mark_process_dead(directory, second)
    replacement = metrics_share.ProcessSnapshots(directory, pid=os.getpid())
    _counted(replacement, 0)
    assert _summed(replacement) == 40  # not 60: the first one's counts in the retired ones and in its file
    assert _counts_files(directory) == {"retired": 40, os.getpid(): 0}


def test_readers_that_knew_different_records_write_back_an_ended_process_s_counts_once(tmp_path):
    directory, gone = tmp_path / "metrics", ended_pid()
    _counted(metrics_share.ProcessSnapshots(directory, pid=gone), 20)
    stale = metrics_share.ProcessSnapshots(directory, pid=os.getppid(), wait=lambda seconds: None)
    knowing = metrics_share.ProcessSnapshots(directory, pid=os.getpid(), wait=lambda seconds: None)
    _counted(stale, 1)
    _counted(knowing, 2)
    assert _summed(stale) == 23  # read before the fold: it knows the ended process's own file
    metrics_share.mark_process_dead(directory, gone)
    assert _summed(knowing) == 23  # read after it: it knows the retired counts
    shutil.rmtree(directory)  # a tmp cleaner
    _counted(stale, 1)
    assert _summed(stale) == 23  # writes the ended process's file back
    _counted(knowing, 2)
    assert _summed(knowing) == 23  # writes the retired file back: the file written back before is a copy of it
    assert _summed(stale) == 23
    assert _counts_files(directory) == {"retired": 20, os.getppid(): 1, os.getpid(): 2}


def test_a_process_that_answered_no_scrape_yet_keeps_the_sum_when_the_directory_is_removed(tmp_path):
    # A replacement worker: booted after an ended worker was folded, removed before it answers a scrape.
    directory, gone = tmp_path / "metrics", ended_pid()
    _counted(metrics_share.ProcessSnapshots(directory, pid=gone), 20)
    metrics_share.mark_process_dead(directory, gone)
    other = metrics_share.ProcessSnapshots(directory, pid=os.getppid())  # a process that runs
    _counted(other, 20)
    replacement = metrics_share.ProcessSnapshots(directory, pid=os.getpid(), wait=lambda seconds: _counted(other, 20))
    _counted(replacement, 0)
    shutil.rmtree(directory)  # a tmp cleaner
    _counted(replacement, 0)  # its first scrape
    assert _summed(replacement) == 40  # not 0: what it read at its start stands for what it has not read since
    assert _counts_files(directory) == {"retired": 20, os.getppid(): 20, os.getpid(): 0}


def _scrape_in_time(metrics: Metrics) -> float:
    """The accepted count a scrape answers, failing (not hanging the run) if it does not answer within WAIT_S."""
    answers: list[float] = []
    scrape = threading.Thread(target=lambda: answers.append(value(metrics, "workerpool_tasks_accepted_total")))
    scrape.daemon = True
    scrape.start()
    scrape.join(WAIT_S)
    assert not scrape.is_alive(), "the scrape blocked"
    return answers[0]


def test_a_fifo_or_a_symlink_in_the_directory_neither_blocks_nor_redirects_a_scrape(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    other, _ = process(directory, 101)
    accept(other, 2)
    other.publish()
    os.mkfifo(directory / "counts-102.json")  # a read of it waited for a writer: every scrape thread blocked
    os.mkfifo(directory / "live-102.json")
    outside = tmp_path / "injected.json"
    outside.write_text(json.dumps({"row": {"accepted": 1000}}))
    (directory / "counts-103.json").symlink_to(outside)
    metrics, _ = process(directory, 104)
    accept(metrics, 3)
    assert _scrape_in_time(metrics) == 5


def test_a_file_that_is_not_a_snapshot_is_skipped_and_told_once(tmp_path, caplog):
    # A truncated file, a hand edit: it made every scrape of every process a 500 until someone removed it.
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    first, second = ended_pid(), ended_pid()  # the arbiter folds only processes that have ended
    other, _ = process(directory, first)
    accept(other, 2)
    other.publish()
    unreadable = {
        f"counts-{second}.json": b"",
        "counts-103.json": b'{"row": {"accep',
        "counts-104.json": b"\xff\xfe",
        "counts-105.json": b"[1, 2]",
        "live-106.json": b"7",
        metrics_share.RETIRED: b'{"counts": {}}',
    }
    for name, data in unreadable.items():
        (directory / name).write_bytes(data)
    metrics, _ = process(directory, 107)
    accept(metrics, 3)
    assert _scrape_in_time(metrics) == 5
    assert _scrape_in_time(metrics) == 5
    for name in unreadable:
        assert caplog.text.count(f"the metrics file {directory / name} is not a snapshot") == 1, name
    metrics_share.mark_process_dead(directory, second)  # the arbiter's fold leaves it, in no error
    metrics_share.mark_process_dead(directory, first)  # and writes a retired record in place of the one unreadable
    assert json.loads((directory / metrics_share.RETIRED).read_text())["folded"] == {f"counts-{first}.json": 1}
    assert _scrape_in_time(metrics) == 5


def test_a_json_object_not_shaped_as_a_snapshot_is_skipped_and_told_once_also_after_it_is_removed(tmp_path, caplog):
    # Well-formed JSON with a wrong inner shape made every scrape a 500, and stayed in each process's memory
    # (written back from there) after the file was removed.
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    first = ended_pid()
    other, _ = process(directory, first)
    accept(other, 2)
    other.publish()
    own = json.loads((directory / f"counts-{first}.json").read_text())
    misshapen = {
        "counts-201.json": {**own, "other_rejected": {"x": 5}},
        "counts-202.json": {**own, "other_rejected": {"invalid": {"created": 1.0, "value": 9}}},
        "counts-203.json": {**own, "row": {**own["row"], "rejected": [1, 2]}},
        "counts-204.json": {**own, "row": {**own["row"], "accepted": "7"}},
        "counts-205.json": {**own, "row": {**own["row"], "unknown": 1}},
        "counts-206.json": {**own, "created": None},
        "counts-207.json": {**own, "attempts_timed_out": [1]},
        "counts-208.json": {**own, "row": {**own["row"], "accepted": True}},
        "live-209.json": {"workers": "2"},
        "live-210.json": {"workers": 2, "stuck_threads": {"a": 1}},
        metrics_share.RETIRED: {"counts": {"row": {"accepted": [3]}}, "folds": 1, "folded": {"counts-9.json": 1}},
    }
    for name, snapshot in misshapen.items():
        (directory / name).write_text(json.dumps(snapshot))
    metrics, _ = process(directory, 311)
    accept(metrics, 3)
    assert _scrape_in_time(metrics) == 5
    assert value(metrics, "workerpool_tasks_rejected_total", reason="invalid") == 0
    assert value(metrics, "workerpool_workers") == 4  # the two processes' own, as published
    for name in misshapen:
        (directory / name).unlink()
    assert _scrape_in_time(metrics) == 5
    assert not list(directory.glob("counts-2??.json")), "written back"
    for name in misshapen:
        assert caplog.text.count(f"the metrics file {directory / name} is not a snapshot") == 1, name


def test_the_arbiter_folds_past_a_retired_record_or_a_counts_file_not_shaped_as_a_snapshot(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    first, second = ended_pid(), ended_pid()
    for pid in (first, second):
        ended, _ = process(directory, pid)
        accept(ended, 2)
        ended.publish()
    (directory / metrics_share.RETIRED).write_text('{"counts": {}, "folds": 1, "folded": {"counts-9.json": "one"}}')
    metrics_share.mark_process_dead(directory, first, check_counts=counts_problem)
    (directory / f"counts-{second}.json").write_text('{"row": {"accepted": [2]}}')
    metrics_share.mark_process_dead(directory, second, check_counts=counts_problem)  # left where it is, unfolded
    assert json.loads((directory / metrics_share.RETIRED).read_text())["folded"] == {f"counts-{first}.json": 1}
    metrics, _ = process(directory, 301)
    assert _scrape_in_time(metrics) == 2


@pytest.mark.parametrize("owner", ["this user, writable by others", "another user"])
def test_a_directory_another_user_made_after_a_cleaner_is_not_used(tmp_path, caplog, owner):
    if owner == "another user" and os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o700)
    metrics, _ = process(directory, os.getpid())
    accept(metrics, 3)
    assert value(metrics, "workerpool_tasks_accepted_total") == 3
    shutil.rmtree(directory)  # a tmp cleaner; then another local user makes a directory at its path
    directory.mkdir()
    directory.chmod(0o777)
    (directory / "counts-1.json").write_text(json.dumps({"row": {"accepted": 1000000}}))
    os.mkfifo(directory / "counts-2.json")
    if owner == "another user":
        directory.chmod(0o755)
        os.chown(directory, 65534, 65534)
    caplog.clear()
    accept(metrics, 2)
    assert _scrape_in_time(metrics) == 5  # this process's own counts: nothing injected, no hang
    assert _scrape_in_time(metrics) == 5
    assert sorted(path.name for path in directory.iterdir()) == ["counts-1.json", "counts-2.json"]  # nothing written
    assert caplog.text.count("is not a private directory of this server's user") == 1  # one WARNING, not one a scrape
    metrics_share.mark_process_dead(directory, 1)  # the arbiter's side: nothing folded there, no error
    assert sorted(path.name for path in directory.iterdir()) == ["counts-1.json", "counts-2.json"]
    with pytest.raises(metrics_share.UntrustedDirectory):
        metrics_share.check_private(directory)
    metrics_share.remove_directory(directory)  # the arbiter's exit: not ours to empty
    assert sorted(path.name for path in directory.iterdir()) == ["counts-1.json", "counts-2.json"]


def test_a_new_process_does_not_start_from_counts_in_a_directory_that_is_not_private(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir(mode=0o777)
    directory.chmod(0o777)
    (directory / f"counts-{os.getpid()}.json").write_text(json.dumps({"row": {"accepted": 1000000}}))
    metrics, _ = process(directory, os.getpid())
    accept(metrics, 1)
    assert value(metrics, "workerpool_tasks_accepted_total") == 1


def test_removed_files_of_idle_processes_are_written_again_and_stay_in_the_sum(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_share, "REPUBLISH_WAIT_S", 0)  # the running one publishes only when told, below
    idle_pid, gone = os.getppid(), ended_pid()  # a process that runs, one that ended
    idle, _ = process(tmp_path, idle_pid)
    ended, _ = process(tmp_path, gone)
    for metrics, count in ((idle, 5), (ended, 6)):
        accept(metrics, count)
        metrics.publish()
    scraper, _ = process(tmp_path, os.getpid())
    assert value(scraper, "workerpool_tasks_accepted_total") == 11
    for path in tmp_path.iterdir():  # what an age-based cleaner removes of an idle server's files
        path.unlink()
    assert value(scraper, "workerpool_tasks_accepted_total") == 11
    # The ended process's file is written back; a running process's is its own to write (a copy from here
    # could replace a newer one), which it does at its next publication, though its counts did not change.
    assert _counts_files(tmp_path) == {gone: 6, os.getpid(): 0}
    idle.publish()
    assert _counts_files(tmp_path) == {gone: 6, os.getpid(): 0, idle_pid: 5}
    assert (tmp_path / f"live-{idle_pid}.json").exists()


def _counted(snapshots: metrics_share.ProcessSnapshots, count: int) -> None:
    snapshots.publish(lambda: ({"row": {"accepted": count}}, {"up": 1}))


def _summed(snapshots: metrics_share.ProcessSnapshots) -> int:
    return snapshots.read()[0]["row"]["accepted"]


def test_a_scrape_waits_for_a_running_process_to_write_its_removed_counts_again(tmp_path):
    directory = tmp_path / "metrics"
    other = metrics_share.ProcessSnapshots(directory, pid=os.getppid())  # a process that runs
    polls: list[float] = []

    def other_publishes_on_the_third_poll(seconds: float) -> None:  # as its publishing thread does, every second
        polls.append(seconds)
        if len(polls) == 3:
            _counted(other, 8)

    scraper = metrics_share.ProcessSnapshots(directory, pid=os.getpid(), wait=other_publishes_on_the_third_poll)
    _counted(other, 5)
    _counted(scraper, 1)
    assert _summed(scraper) == 6
    _counted(other, 8)  # and a scrape the other process answers says 9
    shutil.rmtree(directory)  # a tmp cleaner
    _counted(scraper, 1)  # a scrape publishes this process's counts first
    assert _summed(scraper) == 9  # not 6, the other's counts as this process last read them
    assert polls == [metrics_share.REPUBLISH_POLL_S] * 3


def test_a_running_process_that_does_not_write_its_removed_counts_again_is_waited_for_once(tmp_path):
    directory = tmp_path / "metrics"
    other = metrics_share.ProcessSnapshots(directory, pid=os.getppid())
    polls: list[float] = []
    scraper = metrics_share.ProcessSnapshots(directory, pid=os.getpid(), wait=polls.append)
    _counted(other, 5)
    _counted(scraper, 1)
    assert _summed(scraper) == 6
    shutil.rmtree(directory)
    _counted(scraper, 1)
    assert _summed(scraper) == 6  # the counts read before, after REPUBLISH_WAIT_S
    assert sum(polls) == pytest.approx(metrics_share.REPUBLISH_WAIT_S)
    assert _summed(scraper) == 6
    assert sum(polls) == pytest.approx(metrics_share.REPUBLISH_WAIT_S)  # a stopped process: no wait at every scrape
    _counted(other, 7)
    assert _summed(scraper) == 8
    (directory / f"counts-{os.getppid()}.json").unlink()  # back once, then removed again: waited for again
    assert _summed(scraper) == 8
    assert sum(polls) == pytest.approx(2 * metrics_share.REPUBLISH_WAIT_S)


# -- gunicorn -w 2 -----------------------------------------------------------------


def _accepted_by_scrape(client: Client) -> float:
    status, _, text = client.request("GET", "/metrics")  # a new connection: either process may answer
    assert status == 200, text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return families["workerpool_tasks_accepted"].samples[0].value


def _submit(client: Client, ids: list[str]) -> None:
    def post(task_id: str) -> None:
        status, _, text = client.request("POST", "/enqueue", json.dumps({"id": task_id, "payload": ""}).encode())
        assert status == 202, (task_id, status, text)

    with concurrent.futures.ThreadPoolExecutor(4) as executor:  # concurrent connections reach both processes
        list(executor.map(post, ids))


def _counts_files(directory: Path) -> dict[int | str, int]:
    """Accepted tasks by process, as each process last published them ("retired": the ended ones folded)."""
    found: dict[int | str, int] = {}
    for path in directory.glob("counts-*.json"):
        snapshot = json.loads(path.read_text())
        if path.name == metrics_share.RETIRED:
            found["retired"] = snapshot["counts"]["row"]["accepted"]
        else:
            found[int(path.name[len("counts-") : -len(".json")])] = snapshot["row"]["accepted"]
    return found


@pytest.mark.e2e
@pytest.mark.slow
def test_any_process_of_gunicorn_w2_answers_the_sum_also_after_one_is_killed_and_replaced(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            STORE=f"sqlite://{tmp_path / 'tasks.db'}",
            WORKERS="2",
            QUEUE_SIZE="1000",
            WORK_MIN_MS="0",
            WORK_MAX_MS="5",
            ACCESS_LOG="off",
            TMPDIR=str(temporary),  # where the arbiter makes its metrics directory
        ),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: len(worker_pids(server.proc.pid)) == 2, timeout=20, what="two workers")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        (directory,) = temporary.glob("workerpool-metrics-*")

        _submit(client, [f"a{n}" for n in range(40)])
        # Once one scrape shows them all, every process has published its share: each later one shows 40.
        wait_until(lambda: _accepted_by_scrape(client) == 40, timeout=20, what="a scrape of all 40")
        assert [_accepted_by_scrape(client) for _ in range(10)] == [40] * 10
        by_pid = _counts_files(directory)
        assert sum(by_pid.values()) == 40

        # The process that accepted the most ends without a word; its replacement starts from zero.
        killed = max(by_pid, key=by_pid.__getitem__)
        before = worker_pids(server.proc.pid)
        os.kill(killed, signal.SIGKILL)
        wait_until(
            lambda: len(after := worker_pids(server.proc.pid)) == 2 and killed not in after and after != before,
            timeout=20,
            what="a replacement worker",
        )
        wait_until(lambda: not (directory / f"live-{killed}.json").exists(), timeout=20, what="the arbiter to note it")
        assert [_accepted_by_scrape(client) for _ in range(10)] == [40] * 10  # the killed process's 40 stay

        _submit(client, [f"b{n}" for n in range(10)])
        wait_until(lambda: _accepted_by_scrape(client) == 50, timeout=20, what="a scrape of all 50")
        assert [_accepted_by_scrape(client) for _ in range(10)] == [50] * 10

        assert server.terminate() == 0
        assert not directory.exists()  # the arbiter's own directory goes at exit
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.slow
def test_gunicorn_w2_answers_metrics_after_its_directory_is_removed_and_makes_it_again(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            STORE=f"sqlite://{tmp_path / 'tasks.db'}", QUEUE_SIZE="1000", ACCESS_LOG="off", TMPDIR=str(temporary)
        ),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        workers = wait_until(lambda: len(pids := worker_pids(server.proc.pid)) == 2 and pids, timeout=20, what="2")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        (directory,) = temporary.glob("workerpool-metrics-*")
        _submit(client, [f"a{n}" for n in range(20)])
        wait_until(lambda: _accepted_by_scrape(client) == 20, timeout=20, what="a scrape of all 20")

        shutil.rmtree(directory)  # what a tmp cleaner does to an idle server's directory
        # Every scrape answers (200, checked by _accepted_by_scrape), and the sum comes back whole as
        # soon as each process has written its counts again (within its publication interval).
        assert all(_accepted_by_scrape(client) <= 20 for _ in range(5))
        wait_until(lambda: set(_counts_files(directory)) == workers, timeout=20, what="both counts files again")
        assert [_accepted_by_scrape(client) for _ in range(10)] == [20] * 10
        assert server.terminate() == 0
    finally:
        server.stop()
    assert "Traceback" not in server.log()


@pytest.mark.e2e
@pytest.mark.slow
def test_gunicorn_w2_replaces_a_killed_worker_and_keeps_serving_when_metrics_cannot_be_written(tmp_path):
    # The replacement failed to boot (OSError from the metrics' first publication) and gunicorn then
    # stopped the whole server: "Reason: Worker failed to boot", the port closed.
    parent = tmp_path / "parent"
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            STORE=f"sqlite://{tmp_path / 'tasks.db'}", ACCESS_LOG="off", METRICS_DIR=str(parent / "metrics")
        ),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        before = wait_until(lambda: len(pids := worker_pids(server.proc.pid)) == 2 and pids, timeout=20, what="2")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        # Moved away in one step: a removal raced the workers still publishing into it ("Directory not empty").
        parent.rename(tmp_path / "moved")
        parent.write_text("")  # nothing can be written in the directory any more (as on a full disk)
        killed = min(before)
        os.kill(killed, signal.SIGKILL)
        after = wait_until(
            lambda: len(pids := worker_pids(server.proc.pid)) == 2 and killed not in pids and pids,
            timeout=20,
            what="a replacement worker",
        )
        (new,) = after - before
        wait_until(lambda: f"Booting worker with pid: {new}" in server.log(), timeout=20, what="it to boot")
        _submit(client, [f"a{n}" for n in range(10)])  # served by both processes (asserts 202 each)
        wait_until(
            lambda: server.log().count("could not publish the metrics") >= 2, timeout=20, what="the publishers to fail"
        )
        assert worker_pids(server.proc.pid) == after  # the replacement stayed up, and the arbiter too
        assert client.request("GET", "/metrics")[0] == 200
        assert server.terminate() == 0
    finally:
        server.stop()
    log = server.log()
    assert "Worker failed to boot" not in log and "Traceback" not in log
