"""The cost of one poll of the dashboard's table: a page far down the listing against the first, per store.

``python -m bench.dashboard_pages [--tasks 100000] [--rounds 7]``: the app in this process, without
worker threads (nothing moves), retains ``--tasks`` queued tasks in each store (SQLite in a temporary
file, Redis on a private redis-server), then times the request a poll of each page sends, through
Flask's test client: ``GET /tasks?limit=25&results=false``, without a cursor (the first page) and with
the cursor of a page ``--tasks`` - 1,000 tasks down, in alternating order. Each round's figure is the
median of ``--repeats`` requests, in wall time and in this thread's CPU time; the table gives the
median (min-max) of the rounds.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from app import create_app
from config import Config
from workerpool import MemoryStore, TaskSpec, TaskStore, WorkerPool
from workerpool.stores.redis_store import RedisStore
from workerpool.stores.sqlite import SqliteStore

from .harness import table
from .stats import ratios, spread

PAGE_SIZE = 25  # the dashboard's
POLL = f"/tasks?limit={PAGE_SIZE}&results=false"
STEP = 1000  # the most GET /tasks lists at once: the walk down to the deep page
ADMIT = 1000  # tasks per submit_many
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def deep_cursor(get: Callable[[str], dict], depth: int, *, step: int = STEP) -> str:
    """The cursor after the newest ``depth`` tasks of the listing, walked ``step`` tasks a page."""
    cursor, passed = None, 0
    while passed < depth:
        limit = min(step, depth - passed)
        body = get(f"/tasks?limit={limit}&results=false" + (f"&cursor={cursor}" if cursor else ""))
        if body["next"] is None:
            raise ValueError(f"the listing holds {passed + body['count']} tasks, not more than {depth}")
        cursor, passed = body["next"], passed + body["count"]
    if cursor is None:
        raise ValueError("depth must be at least 1")
    return cursor


def poll_times(
    get: Callable[[str], dict], paths: dict[str, str], *, rounds: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per clock and path, each round's median seconds of ``repeats`` requests; the order alternates by round.

    The clocks: wall time, and this thread's CPU time, which a busy machine moves far less (it leaves out
    a redis-server's own work).
    """
    times: dict[str, dict[str, list[float]]] = {clock: {name: [] for name in paths} for clock in CLOCKS}
    names = list(paths)
    for round_no in range(rounds):
        for name in names if round_no % 2 == 0 else reversed(names):
            seconds: dict[str, list[float]] = {clock: [] for clock in CLOCKS}
            for _ in range(repeats):
                started = {clock: read() for clock, read in CLOCKS.items()}
                get(paths[name])
                for clock, read in CLOCKS.items():
                    seconds[clock].append(read() - started[clock])
            for clock in CLOCKS:
                times[clock][name].append(statistics.median(seconds[clock]))
    return times


@contextmanager
def _store(kind: str, capacity: int) -> Iterator[TaskStore]:
    limits = {"capacity": capacity, "ttl": 3600.0, "max_finished": capacity}
    if kind == "memory":
        yield MemoryStore(**limits)
    elif kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bench-pages-") as directory:
            yield SqliteStore(Path(directory) / "tasks.db", **limits)
    else:
        from .redis_figures import RedisProcess

        server = RedisProcess()
        try:
            yield RedisStore(server.client(), prefix="bench-pages", **limits)
        finally:
            server.stop()


def measure(kind: str, tasks: int, *, depth: int, rounds: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """``poll_times`` of a poll of the first page and of the page ``depth`` tasks down."""
    with _store(kind, tasks) as store:
        pool = WorkerPool(store=store, threads=False)
        try:
            for first in range(0, tasks, ADMIT):
                pool.submit_many([TaskSpec(f"task-{n:07d}") for n in range(first, min(tasks, first + ADMIT))])
            client = create_app(Config(), pool=pool).test_client()

            def get(path: str) -> dict:
                response = client.get(path)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {path} answered {response.status_code}: {response.get_data(as_text=True)}")
                return response.get_json()

            paths = {"first": POLL, "deep": f"{POLL}&cursor={deep_cursor(get, depth)}"}
            return poll_times(get, paths, rounds=rounds, repeats=repeats)
        finally:
            pool.shutdown(0)  # the tasks were only listed: none is run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks retained (default 100000)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--repeats", type=int, default=20, help="requests per page per round (default 20)")
    parser.add_argument("--stores", default="memory,sqlite,redis", help="comma-separated (default all three)")
    args = parser.parse_args()
    logging.getLogger("workerpool").setLevel(logging.ERROR)  # not each queued task left at the end
    rows, depth = [], args.tasks - STEP
    for kind in args.stores.split(","):
        times = measure(kind, args.tasks, depth=depth, rounds=args.rounds, repeats=args.repeats)
        for clock in CLOCKS:
            first, deep = (spread([s * 1000 for s in times[clock][name]]) for name in ("first", "deep"))
            ratio = ratios(times[clock]["deep"], times[clock]["first"])
            rows.append([kind, clock, first.fmt(".2f"), deep.fmt(".2f"), ratio.fmt(".2f")])
    print(table(["store", "time", "first page, ms", f"{depth:,} tasks down, ms", "deep / first"], rows))
    print(
        f"\n{args.tasks:,} tasks retained, {args.rounds} rounds of {args.repeats} requests per page, medians (min-max)."
        " cpu: this thread's CPU time (without a redis-server's)."
    )


if __name__ == "__main__":
    main()
