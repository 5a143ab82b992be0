"""Figures measured in-process: engine throughput with a no-op handler, and bytes per retained task."""

from __future__ import annotations

import gc
import queue
import threading
import time
import tracemalloc
import uuid
from collections import Counter

from service.live import LiveFigures
from service.metrics import Metrics
from workerpool import PoolObserver, State, Task, WorkerPool

from .harness import Run, table
from .stats import ratios, spread, verdict

_STOP = object()


def noop(task: Task, cancel: threading.Event) -> None:
    """Succeed at once."""


def pool_throughput(n: int, workers: int = 4) -> float:
    """Seconds from the first submit until all ``n`` tasks are final (shutdown drained them)."""
    pool = WorkerPool(noop, workers=workers, queue_size=n, state_max_tasks=n, backoff_base=0.0, backoff_cap=0.0)
    pool.start()
    ids = [f"task-{i}" for i in range(n)]
    gc.collect()
    started = time.perf_counter()
    for task_id in ids:
        pool.submit(task_id)
    summary = pool.shutdown()
    elapsed = time.perf_counter() - started
    assert summary is not None and pool.stats().counts[State.DONE] == n, summary
    return elapsed


def queue_throughput(n: int, workers: int = 4) -> float:
    """The floor: the same producer, queue.Queue, worker threads and no-op, with a locked dict of outcomes."""
    ready: queue.Queue = queue.Queue(maxsize=n + workers)
    lock = threading.Lock()
    outcome: dict[str, str] = {}

    def work() -> None:
        while (task_id := ready.get()) is not _STOP:
            noop(None, None)  # type: ignore[arg-type]
            with lock:
                outcome[task_id] = "done"

    threads = [threading.Thread(target=work, daemon=True) for _ in range(workers)]
    for thread in threads:
        thread.start()
    ids = [f"task-{i}" for i in range(n)]
    gc.collect()
    started = time.perf_counter()
    for task_id in ids:
        ready.put_nowait(task_id)
    for _ in threads:
        ready.put_nowait(_STOP)
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    assert len(outcome) == n
    return elapsed


def serial_steps(n: int, *, metrics: bool = False, live: bool = False) -> float:
    """Seconds for ``n`` tasks driven on this thread: submit, take from the queue, run the attempt.

    No thread switches at all: the engine's own Python cost per task (with ``metrics``, plus the
    service's Prometheus observer; with ``live``, plus the dashboard's).
    """
    observers: list[PoolObserver] = [Metrics()] if metrics else []
    if live:
        observers.append(LiveFigures())
    pool = WorkerPool(
        noop,
        workers=1,
        queue_size=n,
        state_max_tasks=n,
        backoff_base=0.0,
        backoff_cap=0.0,
        threads=False,
        observers=observers,
    )
    ids = [f"task-{i}" for i in range(n)]
    gc.collect()
    started = time.perf_counter()
    for task_id in ids:
        pool.submit(task_id)
        pool.step()
    return time.perf_counter() - started


def _profile_serial(n: int, top: int = 12) -> list[tuple[str, float]]:
    """pyinstrument over serial_steps: µs per task of self time, by function."""
    try:
        from pyinstrument import Profiler
    except ImportError:
        return []
    profiler = Profiler(interval=0.0002)
    profiler.start()
    serial_steps(n)
    session = profiler.stop()
    totals: Counter[str] = Counter()

    def walk(frame) -> None:
        if frame is None:
            return
        if not frame.is_synthetic:  # a real frame's total_self_time already holds its "[self]" child
            file = "/".join(frame.file_path_short.split("/")[-2:])
            name = "Task.__init__ (dataclass-generated)" if file == "<string>" else f"{frame.function} ({file})"
            totals[name] += frame.total_self_time
        for child in frame.children:
            walk(child)

    walk(session.root_frame())
    return [(name, seconds / n * 1e6) for name, seconds in totals.most_common(top)]


def engine_throughput(run: Run, n: int = 100_000) -> None:
    """Figure 3: tasks/s from submit to final state, pool vs bare queue + threads, then where the time goes."""
    pool_s: list[float] = []
    floor_s: list[float] = []
    serial_s: list[float] = []
    observed_s: list[float] = []
    for round_no in range(run.rounds):
        for which in run.order(round_no, "pool", "queue"):
            if which == "pool":
                pool_s.append(pool_throughput(n))
            else:
                floor_s.append(queue_throughput(n))
        for which in run.order(round_no, "bare", "observed"):
            (serial_s if which == "bare" else observed_s).append(serial_steps(n, metrics=which == "observed"))
        run.progress(
            f"fig 3 round {round_no + 1}/{run.rounds}: pool {n / pool_s[-1]:9,.0f} tasks/s, queue floor "
            f"{n / floor_s[-1]:9,.0f} tasks/s, serial {n / serial_s[-1]:9,.0f} tasks/s"
        )
    rate = spread([n / s for s in pool_s])
    floor = spread([n / s for s in floor_s])
    serial = spread([n / s for s in serial_s])
    observed = spread([n / s for s in observed_s])
    run.summary.append(
        (
            "3. engine throughput, no-op, 4 workers",
            f"{rate.median:,.0f} tasks/s",
            ">= 50,000",
            verdict(rate.median >= 50_000),
        )
    )
    rows = [
        ["WorkerPool, 4 workers", rate.fmt(), spread([s / n * 1e6 for s in pool_s]).fmt(".1f"), "1"],
        [
            "reference: queue.Queue + 4 threads + locked dict",
            floor.fmt(),
            spread([s / n * 1e6 for s in floor_s]).fmt(".1f"),
            ratios([1 / s for s in floor_s], [1 / s for s in pool_s]).fmt(".2f"),
        ],
        [
            "WorkerPool driven on one thread (no switches)",
            serial.fmt(),
            spread([s / n * 1e6 for s in serial_s]).fmt(".1f"),
            ratios([1 / s for s in serial_s], [1 / s for s in pool_s]).fmt(".2f"),
        ],
        [
            "... plus the Prometheus observer (service.metrics)",
            observed.fmt(),
            spread([s / n * 1e6 for s in observed_s]).fmt(".1f"),
            ratios([1 / s for s in observed_s], [1 / s for s in pool_s]).fmt(".2f"),
        ],
    ]
    text = table(["", "tasks/s", "µs per task", "speed vs pool"], rows)
    text += (
        f"\n\n{n:,} tasks per round, {run.rounds} rounds, the same producer loop (`submit` on the main thread) "
        "and shutdown-drain as the finish line. Median (min-max)."
    )
    profile = _profile_serial(min(n, 50_000))
    if profile:
        text += (
            "\n\nWhere one task's time goes, driven on one thread (pyinstrument, self time per task; "
            "`bench/engine.py:serial_steps`):\n\n"
            + table(["function", "µs per task"], [[f"`{name}`", f"{us:.2f}"] for name, us in profile])
        )
    run.sections["3. Engine throughput"] = text


# -- memory ----------------------------------------------------------------------------------


def bytes_per_retained_task(n: int) -> tuple[float, list[tuple[str, float]]]:
    """Traced bytes held per finished task after ``n`` went through a pool (payloads are dropped at finish)."""
    gc.collect()
    tracemalloc.start()
    try:
        pool = WorkerPool(noop, workers=4, queue_size=n, state_max_tasks=n, backoff_base=0.0, backoff_cap=0.0)
        pool.start()
        gc.collect()
        before = tracemalloc.take_snapshot()
        base = tracemalloc.get_traced_memory()[0]
        for _ in range(n):
            pool.submit(str(uuid.uuid4()), payload="x" * 200, max_retries=3)
        summary = pool.shutdown()
        assert summary is not None and pool.stats().counts[State.DONE] == n
        del summary
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - base
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    by_line = after.compare_to(before, "lineno")
    top = [(f"{s.traceback[0].filename.split('/')[-1]}:{s.traceback[0].lineno}", s.size_diff / n) for s in by_line[:6]]
    del pool
    return held / n, top


def bytes_per_reference_task(n: int) -> float:
    """The floor: the same fields as a tuple in a dict, keyed by the same kind of id."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        table_: dict[str, tuple] = {}
        for _ in range(n):
            now = time.time()
            table_[str(uuid.uuid4())] = ("", 3, State.DONE, 1, None, now, time.time(), time.time(), None, None)
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    return held / n


def retained_task_memory(run: Run, sizes: tuple[int, ...] = (10_000, 100_000)) -> None:
    """Figure 4a: bytes per retained finished task, tracemalloc."""
    rows = []
    breakdown: list[tuple[str, float]] = []
    worst = 0.0
    for n in sizes:
        per_task, top = bytes_per_retained_task(n)
        floor = bytes_per_reference_task(n)
        worst = max(worst, per_task)
        breakdown = breakdown or top
        rows.append([f"{n:,}", f"{per_task:,.0f}", f"{floor:,.0f}", f"{per_task / floor:.2f}"])
        run.progress(f"fig 4 tracemalloc: {n:,} tasks, {per_task:,.0f} B per retained task (floor {floor:,.0f} B)")
    run.summary.append(("4. bytes per retained finished task", f"{worst:,.0f} B", "<= 1,024 B", verdict(worst <= 1024)))
    run.sections["4a. Bytes per retained task"] = (
        table(["finished tasks retained", "bytes per task", "reference: tuple in a dict", "ratio"], rows)
        + "\n\nTasks with a 36-character uuid id and a 200-byte payload go through a 4-worker pool with a no-op "
        "handler; the figure is tracemalloc's traced bytes after the drain minus before, divided by the count. "
        "Payloads are dropped when a task finishes, so they are excluded by the engine itself; the id string is "
        "included. The reference holds the same ten fields as a tuple in a plain dict.\n\n"
        f"Largest allocation sites at {sizes[0]:,} tasks (bytes per task):\n\n"
        + table(["site", "bytes per task"], [[f"`{site}`", f"{b:,.0f}"] for site, b in breakdown])
    )
