"""The dashboard's per-second figures, driven by hand on a fake clock."""

from __future__ import annotations

import threading

import pytest
from doubles import FakeClock

from service.live import LATENCY_STEP_S, LiveFigures, bucket_bound, latency_bucket, percentiles
from workerpool import State, Task

T0 = 1_800_000_000  # a multiple of LATENCY_STEP_S: the steps line up with whole tens of seconds


def task(state: State = State.QUEUED) -> Task:
    return Task("t", "", 0, state=state)


def test_counts_land_in_the_second_they_happened_and_the_current_second_is_left_out():
    clock = FakeClock(T0 + 0.5)
    live = LiveFigures(window_s=60, clock=clock.time)
    live.task_queued(task())
    live.tasks_queued([task()])  # a batch of one: counted as its tasks
    live.attempt_finished(task(State.DONE), 0.2)
    clock.advance(0.75)  # T0 + 1.25
    live.attempt_finished(task(State.FAILED), 0.2)
    live.attempt_finished(task(State.QUEUED), 0.2)  # failed, retry scheduled
    live.task_abandoned(task(State.FAILED))

    series = live.series()  # at T0 + 1: second T0 is complete, T0 + 1 is not
    assert (series["start"], series["seconds"]) == (T0 + 1 - 60, 60)
    assert series["accepted"][-1] == 2 and sum(series["accepted"]) == 2
    assert series["done"][-1] == 1 and sum(series["failed"]) == 0

    clock.advance(0.75)  # T0 + 2
    series = live.series()
    assert series["accepted"][-2:] == [2, 0]
    assert series["done"][-2:] == [1, 0]
    assert series["failed"][-2:] == [0, 2]
    assert series["retried"][-2:] == [0, 1]
    assert len(series["accepted"]) == len(series["cancelled"]) == 60


def test_the_series_says_since_when_it_counts():
    # The seconds before a process started (a reload, a replaced worker) are zeros never counted: `since` says so.
    clock = FakeClock(T0 + 0.5)
    live = LiveFigures(window_s=60, clock=clock.time)
    clock.advance(5)
    assert live.series()["since"] == T0
    clock.advance(100)  # counting began before the window: still the same second
    series = live.series()
    assert series["since"] == T0 and series["start"] == T0 + 105 - 60


def test_a_cancelled_task_is_counted_whether_it_was_running_or_not():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    live.attempt_finished(Task("a", "", 0, state="cancelled"), 0.1)  # type: ignore[arg-type]
    live.task_cancelled(Task("b", "", 0, state="cancelled"))  # type: ignore[arg-type]
    clock.advance(1)
    assert live.series()["cancelled"][-1] == 2


def test_seconds_that_left_the_window_are_forgotten_and_their_slots_reused():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=20, clock=clock.time)
    live.task_queued(task())
    clock.advance(20)  # same slot of the ring, twenty seconds later
    live.task_queued(task())
    live.task_queued(task())
    clock.advance(1)
    series = live.series()
    assert series["accepted"][-1] == 2
    assert sum(series["accepted"]) == 2
    clock.advance(79)  # T0 + 100: nothing for longer than the window
    assert sum(live.series()["accepted"]) == 0


def test_latency_percentiles_per_step_and_over_the_last_minute():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    for n in range(1, 101):  # 10 ms .. 1 s in this step
        live.attempt_finished(task(State.DONE), n / 100)
    clock.advance(LATENCY_STEP_S + 3)  # the next step holds one slow attempt
    live.attempt_finished(task(State.DONE), 5.0)
    clock.advance(LATENCY_STEP_S - 3)  # T0 + 2 steps: both complete
    latency = live.series()["latency"]
    assert latency["step"] == LATENCY_STEP_S
    steps = {latency["start"] + i * LATENCY_STEP_S: i for i in range(len(latency["attempts"]))}
    first, second = steps[T0], steps[T0 + LATENCY_STEP_S]
    assert latency["attempts"][first] == 100 and latency["attempts"][second] == 1
    # Upper bounds of their buckets: never below the true value, at most 19 % above it.
    for p, true_value in ((50, 0.50), (90, 0.90), (99, 0.99)):
        assert true_value <= latency[f"p{p}"][first] <= true_value * 1.19
    assert 5.0 <= latency["p50"][second] <= 5.0 * 1.19
    assert latency["p50"][first - 1] is None  # no attempt in that step
    recent = live.series()["recent_latency"]
    assert 0.50 <= recent["p50"] <= 0.50 * 1.19
    assert 1.0 <= recent["p99"] <= 1.0 * 1.19  # rank 100 of 101: the slowest of the first step


def _reported(seconds: float) -> float:
    """The recent p50 the dashboard shows for a single attempt of ``seconds``."""
    clock = FakeClock(T0)
    live = LiveFigures(clock=clock.time)
    live.attempt_finished(task(State.DONE), seconds)
    clock.advance(1)
    return live.series()["recent_latency"]["p50"]


@pytest.mark.parametrize("seconds", [0.0, 0.0005, 0.001, 0.0010001, 0.0011, 0.0123, 0.25, 1.0, 7.5, 600.0])
def test_a_duration_falls_in_a_bucket_at_most_19_percent_wider(seconds):
    reported = _reported(seconds)
    assert reported == bucket_bound(latency_bucket(seconds))
    assert seconds <= reported <= max(seconds * 2**0.25, 0.001)


def test_durations_beyond_the_last_bucket_share_it():
    assert latency_bucket(10**13) == latency_bucket(10**12)
    assert _reported(10**13) == _reported(10**12)


@pytest.mark.parametrize("seconds", [16_777.0, 36_000.0, 72_000.0, 86_400.0, 30 * 86_400.0, 10 * 365 * 86_400.0])
def test_an_attempt_of_hours_or_years_is_never_reported_below_its_duration(seconds):
    # Attempts past 4.7 hours shared a last bucket reported as 4.7 hours (ATTEMPT_TIMEOUT_S allows 24 h, 0 none).
    clock = FakeClock(T0)
    live = LiveFigures(clock=clock.time)
    live.attempt_finished(task(state=State.DONE), seconds)
    clock.advance(1)
    recent = live.series()["recent_latency"]
    assert seconds <= recent["p50"] <= seconds * 2**0.25


def test_percentiles_use_the_nearest_rank():
    assert percentiles({}) == {"p50": None, "p90": None, "p99": None}
    histogram = {latency_bucket(0.1): 9, latency_bucket(2.0): 1}
    assert percentiles(histogram, (90, 91)) == {
        "p90": bucket_bound(latency_bucket(0.1)),
        "p91": bucket_bound(latency_bucket(2.0)),
    }
    assert percentiles(histogram, (0, 100)) == {
        "p0": bucket_bound(latency_bucket(0.1)),
        "p100": bucket_bound(latency_bucket(2.0)),
    }


def test_a_window_shorter_than_a_latency_step_is_refused():
    with pytest.raises(ValueError, match="window_s"):
        LiveFigures(window_s=5)


def test_the_series_of_a_second_is_computed_once_and_shared():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    live.task_queued(task())
    clock.advance(1)
    first = live.series()
    assert live.series() is first
    clock.advance(1)
    assert live.series() is not first
    assert live.series()["accepted"][-2:] == [1, 0]


def _in_thread(target, *args) -> None:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    thread.join()


def test_a_second_a_thread_has_not_moved_to_the_ring_yet_is_read_all_the_same():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    counted, go_on, counted_again, stop = (threading.Event() for _ in range(4))

    def worker() -> None:  # counts in second T0, then stays alive without counting
        live.attempt_finished(task(State.DONE), 0.2)
        live.tasks_queued([task(), task()])
        counted.set()
        go_on.wait(10)
        live.attempt_finished(task(State.QUEUED), 0.2)  # in T0 + 2: moves T0 to the ring first
        counted_again.set()
        stop.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert counted.wait(10)
        live.tasks_queued([task()])  # this thread's T0
        clock.advance(1)
        series = live.series()
        assert (series["accepted"][-1], series["done"][-1]) == (3, 1)
        assert series["recent_latency"]["p50"] == bucket_bound(latency_bucket(0.2))
        clock.advance(1)
        go_on.set()
        assert counted_again.wait(10)
        clock.advance(1)
        series = live.series()
        assert (series["accepted"][-3:], series["done"][-3:], series["retried"][-3:]) == (
            [3, 0, 0],
            [1, 0, 0],
            [0, 0, 1],
        )
    finally:
        go_on.set()
        stop.set()
        thread.join(10)


def test_the_counts_of_threads_that_ended_are_kept():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    for _ in range(30):  # a thread per connection, as `python app.py` serves
        _in_thread(live.task_queued, task())
        _in_thread(live.attempt_finished, task(State.FAILED), 0.5)
    clock.advance(1)
    series = live.series()
    assert (series["accepted"][-1], series["failed"][-1]) == (30, 30)
    assert live._pending == []  # each thread's counts went to the ring once it had ended


def test_a_second_moved_late_does_not_overwrite_a_later_second_in_its_slot():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=20, clock=clock.time)
    counted, go_on = threading.Event(), threading.Event()

    def late() -> None:
        live.task_queued(task())  # second T0, moved only after T0 + 20 took the slot
        counted.set()
        go_on.wait(10)
        live.task_queued(task())

    thread = threading.Thread(target=late)
    thread.start()
    assert counted.wait(10)
    clock.advance(20)
    live.task_queued(task())  # T0 + 20: the slot of T0
    clock.advance(1)
    live.task_queued(task())  # T0 + 21: this thread's T0 + 20 goes to the ring
    go_on.set()
    thread.join(10)  # its T0 is moved now, into a slot T0 + 20 holds
    clock.advance(1)
    assert live.series()["accepted"][-2:] == [1, 2]


def test_threads_counting_at_once_lose_no_event():
    clock = FakeClock(T0)
    live = LiveFigures(window_s=60, clock=clock.time)
    threads, rounds = 8, 2_000
    go = threading.Barrier(threads + 1)

    def count() -> None:
        go.wait()
        for n in range(rounds):
            live.tasks_queued([task()])
            live.attempt_finished(task(State.DONE if n % 2 else State.QUEUED), 0.01)

    workers = [threading.Thread(target=count) for _ in range(threads)]
    for worker in workers:
        worker.start()
    go.wait()
    for _ in range(40):  # seconds end while the threads count (10 s of fake time, within the window)
        clock.advance(0.25)
        live.series()
    for worker in workers:
        worker.join()
    clock.advance(1)
    series = live.series()
    n = threads * rounds
    assert (sum(series["accepted"]), sum(series["done"]), sum(series["retried"])) == (n, n // 2, n // 2)
