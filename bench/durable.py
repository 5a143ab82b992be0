"""Figure 8: the SQLite store. HTTP enqueue against the memory store, two processes against one, engine
throughput against huey's ``SqliteHuey`` at the same durability (and fsyncs per task), and the time from a
restart to the first recovered task.

The engine figures run in child processes (``python -m bench.durable ...``), so each starts cold, and
``strace -c`` can count the fsyncs of exactly one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .harness import Run, pickup_latencies, table
from .server import ROOT, Server
from .stats import ratios, spread, verdict

SYNC_MODES = ("FULL", "NORMAL")
CEILING = "memory, 2 instances (not shared)"
WORKERS = 4


# -- children: one measurement each -----------------------------------------------------------


def ours(path: str, sync: str, n: int) -> float:
    """Seconds to submit ``n`` tasks one by one (a commit each) and run them all on 4 worker threads."""
    from workerpool import PoolObserver, State, WorkerPool
    from workerpool.stores.sqlite import SqliteStore

    class Finished(PoolObserver):
        """Sets ``all_done`` once ``n`` attempts have been committed done."""

        def __init__(self) -> None:
            self.done = 0
            self.lock = threading.Lock()
            self.all_done = threading.Event()

        def attempt_finished(self, task, seconds):  # noqa: ANN001
            if task.state is State.DONE:
                with self.lock:
                    self.done += 1
                    if self.done == n:
                        self.all_done.set()

    finished = Finished()
    store = SqliteStore(path, capacity=n, max_finished=n, synchronous=sync)
    pool = WorkerPool(
        lambda task, cancel: None,
        store=store,
        workers=WORKERS,
        backoff_base=0.0,
        backoff_cap=0.0,
        observers=[finished],
    )
    pool.start()
    started = time.perf_counter()
    for i in range(n):
        pool.submit(f"task-{i}")
    finished.all_done.wait()
    elapsed = time.perf_counter() - started
    pool.shutdown(5)
    store.close()
    return elapsed


def huey(path: str, sync: str, n: int) -> float:
    """The same work on huey's SqliteHuey: ``n`` enqueues (a commit each), 4 threads dequeuing and executing."""
    from huey import SqliteHuey
    from huey.storage import SqliteStorage

    class Storage(SqliteStorage):
        def _create_connection(self):  # noqa: ANN202  (huey offers fsync on/off only; NORMAL needs the pragma)
            conn = super()._create_connection()
            conn.execute(f"pragma synchronous = {sync}")
            return conn

    queue = SqliteHuey("bench", filename=path, storage_class=Storage)

    @queue.task()
    def noop() -> None:
        pass

    executed = 0
    lock = threading.Lock()
    stop = threading.Event()

    def consume() -> None:
        nonlocal executed
        while not stop.is_set():
            task = queue.dequeue()
            if task is None:
                stop.wait(0.001)  # huey's consumer polls too (with a longer back-off)
                continue
            queue.execute(task)
            with lock:
                executed += 1
                if executed == n:
                    stop.set()

    threads = [threading.Thread(target=consume) for _ in range(WORKERS)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    for _ in range(n):
        noop()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def first_recovered(path: str) -> None:
    """Start a pool on a file whose running attempts belong to a dead process; print when the first one reruns."""
    from workerpool import WorkerPool
    from workerpool.stores.sqlite import SqliteStore

    begun = time.time()
    ran = threading.Event()

    def handler(task, cancel):  # noqa: ANN001
        if task.attempts == 2 and not ran.is_set():
            ran.set()
            print(json.dumps({"pool_started": started, "first_recovered": time.time(), "begun": begun}), flush=True)

    store = SqliteStore(path, capacity=100_000)
    pool = WorkerPool(handler, store=store, workers=WORKERS, backoff_base=0.0, backoff_cap=0.0)
    started = time.time()
    pool.start()
    ran.wait(60)
    pool.shutdown(0)


def pickup_worker(path: str) -> None:
    """A pool in its own process whose handler returns when it started; runs until stdin closes."""
    from workerpool import WorkerPool
    from workerpool.stores.sqlite import SqliteStore

    pool = WorkerPool(lambda task, cancel: time.time(), store=SqliteStore(path), workers=WORKERS)
    pool.start()
    print("ready", flush=True)
    sys.stdin.read()
    pool.shutdown(5)


def _prepare_crashed_file(path: str, tasks: int, running: int) -> None:
    """``tasks`` queued tasks, ``running`` of them claimed by a process that has exited (as after kill -9)."""
    from workerpool import Task
    from workerpool.stores.sqlite import SqliteStore

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{socket.gethostname()}:{int(gone.stdout)}:deadbeef"
    store = SqliteStore(path, capacity=tasks)
    now = time.time()
    for start in range(0, tasks, 1000):
        store.admit([Task(f"t{i}", "x" * 64, 3, created_at=now) for i in range(start, min(tasks, start + 1000))])
    for _ in range(running):
        store.claim(owner, now + 30)
    store.close()


# -- the parent: rounds, strace, the report ---------------------------------------------------


def _child(args: list[str], *, strace_to: Path | None = None, cpu: list[float] | None = None) -> str:
    """Run one measurement in a child; its last line of output. ``cpu`` gets the child's CPU seconds."""
    command = [sys.executable, "-m", "bench.durable", *args]
    if strace_to is not None:
        command = ["strace", "-f", "-qq", "-c", "-e", "trace=fsync,fdatasync", "-o", str(strace_to), *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cpu is not None:  # children run one at a time: the difference is this one's
        cpu.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return out.stdout.strip().splitlines()[-1]


def _fsyncs(report: Path) -> int:
    total = 0
    for line in report.read_text().splitlines():
        fields = line.split()
        if fields and fields[-1] in ("fsync", "fdatasync"):
            total += int(fields[3])  # % time, seconds, usecs/call, calls, [errors], syscall
    return total


def engine_vs_huey(run: Run, n: int) -> None:
    """Figure 8b: tasks/s with durable commits, ours against SqliteHuey, and fsyncs per task."""
    work = Path(tempfile.mkdtemp(prefix="bench-durable-", dir=ROOT / "bench"))
    try:
        rows = []
        for sync in SYNC_MODES:
            seconds: dict[str, list[float]] = {"ours": [], "huey": []}
            cpu: dict[str, list[float]] = {"ours": [], "huey": []}
            for round_no in range(run.rounds):
                for kind in run.order(round_no, "ours", "huey"):
                    db = work / f"{kind}-{sync}-{round_no}.db"
                    seconds[kind].append(float(_child([kind, str(db), sync, str(n)], cpu=cpu[kind])))
                    rate_now = n / seconds[kind][-1]
                    run.progress(f"fig 8 engine {sync}: round {round_no + 1} {kind} {rate_now:,.0f} tasks/s")
            fsyncs = {}
            if shutil.which("strace"):
                small = max(200, n // 10)
                for kind in ("ours", "huey"):
                    report = work / f"strace-{kind}-{sync}.txt"
                    _child([kind, str(work / f"strace-{kind}-{sync}.db"), sync, str(small)], strace_to=report)
                    fsyncs[kind] = f"{_fsyncs(report) / small:.2f}"
            rate = ratios([1 / s for s in seconds["ours"]], [1 / s for s in seconds["huey"]])
            for kind in ("ours", "huey"):
                rows.append(
                    [
                        f"{'workerpool SqliteStore' if kind == 'ours' else 'huey SqliteHuey'}, synchronous={sync}",
                        spread([n / s for s in seconds[kind]]).fmt(),
                        rate.fmt(".2f") if kind == "ours" else "1",
                        spread([1e6 * c / n for c in cpu[kind]]).fmt(".0f"),
                        fsyncs.get(kind, "strace missing"),
                    ]
                )
            label = f"8. engine tasks/s vs SqliteHuey, synchronous={sync}"
            run.summary.append((label, f"{rate.median:.2f}", "> 1", verdict(rate.median > 1)))
        text = table(["", "tasks/s", "ratio to huey", "CPU µs per task", "fsyncs per task"], rows)
        text += (
            f"\n\n{n:,} no-op tasks per round, {run.rounds} rounds alternating, each side in a fresh child "
            f"process on a fresh file: `submit` one task at a time (one commit each) while {WORKERS} worker "
            "threads run them; the finish line is every task committed `done` (ours) or executed (huey). "
            "The work differs in what it keeps: ours writes three steps per task (admit, claim with a lease, "
            "finish with the outcome kept for `GET /tasks/<id>`; a worker's finish and its next claim share one "
            "transaction when a task is due, and with FULL only admit and finish wait for an fsync, which "
            "steps committed meanwhile share); huey writes two (enqueue, dequeue deleting "
            "the row; a `None` result is not stored) and keeps nothing once a task ran, and a consumer that dies "
            "mid-task loses it (at most once). CPU: user + system time of the whole child process. "
            "huey gets `synchronous` through a storage subclass (its own "
            "option only switches between OFF and FULL). fsyncs counted with `strace -f -c` on a "
            f"{max(200, n // 10):,}-task run of each."
        )
        run.sections["8b. Durable engine throughput against SqliteHuey"] = text
    finally:
        shutil.rmtree(work, ignore_errors=True)


def restart_recovery(run: Run, tasks: int = 10_000, running: int = WORKERS) -> None:
    """Figure 8d: seconds from starting a process on a crashed file to the first recovered attempt running."""
    work = Path(tempfile.mkdtemp(prefix="bench-recover-", dir=ROOT / "bench"))
    try:
        template = work / "template.db"
        _prepare_crashed_file(str(template), tasks, running)
        spawn, start = [], []
        for round_no in range(run.rounds):
            db = work / f"round-{round_no}.db"
            shutil.copy(template, db)
            began = time.time()
            times = json.loads(_child(["recover", str(db)]))
            spawn.append(times["first_recovered"] - began)
            start.append(times["first_recovered"] - times["pool_started"])
            run.progress(f"fig 8 restart: round {round_no + 1} first recovered after {spawn[-1]:.3f} s")
        run.summary.append(
            ("8. restart to first recovered task, 10,000 tasks in the file", f"{spread(spawn).median:.2f} s", "", "")
        )
        run.sections["8d. Restart to the first recovered task"] = table(
            ["", "seconds"],
            [
                ["process spawned -> first recovered attempt running", spread(spawn).fmt(".3f")],
                ["pool.start() -> first recovered attempt running", spread(start).fmt(".3f")],
            ],
        ) + (
            f"\n\nThe file holds {tasks:,} queued tasks, {running} of them claimed by a process that has exited "
            "(as after `kill -9`, leases still 30 s from expiring). A new process opens it and starts a pool: its "
            "lease keeper sees that the owning process is gone and recovers the attempts at once, and a recovered "
            f"attempt (a due retry) runs before the queued tasks. Median (min-max) of {run.rounds} rounds."
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def pickup_latency(run: Run, tasks: int = 50, gap: float = 0.2) -> None:
    """Figure 8c: from the commit of a task in one process to its start on an idle worker of another."""
    from workerpool.stores.sqlite import SqliteStore

    work = Path(tempfile.mkdtemp(prefix="bench-pickup-", dir=ROOT / "bench"))
    db = work / "tasks.db"
    submitter = SqliteStore(db, capacity=tasks)
    worker = subprocess.Popen(
        [sys.executable, "-m", "bench.durable", "pickup", str(db)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        # idle between tasks: the other process's workers back off to their longest poll
        p50, p95, worst = pickup_latencies(submitter, worker, tasks, gap)
    finally:
        submitter.close()
        shutil.rmtree(work, ignore_errors=True)
    run.summary.append(("8. pick-up latency across processes, p95", f"{p95:.1f} ms", "well under 100 ms", ""))
    run.sections["8c. Pick-up latency across processes"] = table(
        ["", "ms"], [["median", f"{p50:.1f}"], ["95th percentile", f"{p95:.1f}"], ["worst", f"{worst:.1f}"]]
    ) + (
        f"\n\n{tasks} tasks admitted one at a time by a process without workers, {gap * 1000:.0f} ms apart (so the "
        f"other process's {WORKERS} idle workers have backed off to their longest poll, 25 ms); the latency is "
        "from just before the admitting commit to the handler's first line in the other process (one wall clock)."
    )


def http_stores(run: Run) -> None:
    """Figure 8a: POST /enqueue with the SQLite store against the memory store; two processes against one, and
    against the most two processes serve on this machine in the same rounds."""
    work = Path(tempfile.mkdtemp(prefix="bench-http-", dir=ROOT / "bench"))
    env = {"QUEUE_SIZE": "1000000", "SHUTDOWN_TIMEOUT_S": "0"}
    setups = {
        "memory -w 1": lambda: [Server("store-memory-w1", env=env)],
        "sqlite -w 1": lambda: [Server("store-sqlite-w1", env={**env, "STORE": f"sqlite://{work / 'one.db'}"})],
        "sqlite -w 2": lambda: [
            Server("store-sqlite-w2", env={**env, "STORE": f"sqlite://{work / 'two.db'}", "GUNICORN_CMD_ARGS": "-w 2"})
        ],
        # Each instance keeps its own tasks: not a deployment, the most two processes get out of these 2 cores
        # beside wrk. Other work on the machine takes from two processes first (one is held to about a core by
        # the interpreter lock), so -w 2 is read against this, measured in the same rounds.
        CEILING: lambda: [Server(f"store-memory{n}", env=env) for n in range(2)],
    }
    results: dict[str, list[dict]] = {name: [] for name in setups}
    servers = {name: make() for name, make in setups.items()}
    try:
        for group in servers.values():
            for server in group:
                server.wait_ready()
                run.record(server.command)
                run.wrk(server.url, "/enqueue", seconds=1)
        names = list(setups)
        for round_no in range(run.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                r = run.wrk_together([server.url for server in servers[name]], "/enqueue")
                results[name].append(r)
                run.progress(f"fig 8 http: round {round_no + 1} {name} {r['rps']:8,.0f} req/s")
    finally:
        for group in servers.values():
            for server in group:
                server.stop()
        shutil.rmtree(work, ignore_errors=True)
    rps = {name: [r["rps"] for r in rs] for name, rs in results.items()}
    one = ratios(rps["sqlite -w 1"], rps["memory -w 1"])
    two = ratios(rps["sqlite -w 2"], rps["memory -w 1"])
    ceiling = ratios(rps[CEILING], rps["memory -w 1"])
    run.summary.append(
        ("8. enqueue req/s, sqlite / memory (-w 1)", f"{one.median:.2f}", ">= 0.90", verdict(one.median >= 0.90))
    )
    run.summary.append(
        ("8. enqueue req/s, sqlite -w 2 / memory -w 1", f"{two.median:.2f}", ">= 1.6", verdict(two.median >= 1.6))
    )
    run.summary.append(("8. ceiling: 2 memory instances (not shared) / memory -w 1", f"{ceiling.median:.2f}", "-", "-"))
    share = ratios(rps["sqlite -w 2"], rps[CEILING])
    run.summary.append(("8. enqueue req/s, sqlite -w 2 / the ceiling", f"{share.median:.2f}", "-", "-"))
    rows = [
        [name, spread(rps[name]).fmt(), spread([r["p99_us"] / 1000 for r in results[name]]).fmt(".1f"), ratio]
        for name, ratio in (
            ("memory -w 1", "1"),
            ("sqlite -w 1", one.fmt(".2f")),
            ("sqlite -w 2", two.fmt(".2f")),
            (CEILING, ceiling.fmt(".2f")),
        )
    ]
    bad = {name: sum(r["non_2xx_3xx"] for r in rs) for name, rs in results.items()}
    run.sections["8a. POST /enqueue on the SQLite store"] = table(
        ["STORE, gunicorn workers", "req/s", "p99 ms", "ratio to memory -w 1"], rows
    ) + (
        f"\n\nThe servers run side by side (default simulated work, WORKERS=4 per process, "
        f"synchronous=NORMAL), wrk -t{run.wrk_threads} -c{run.wrk_connections} -d{run.wrk_seconds}s against each "
        f"in rotating order, {run.rounds} rounds, median (min-max); ratios are per round. The two memory instances "
        "share nothing (each keeps its own tasks; two wrk runs at once with half the threads and connections each, "
        "their rates added): the most two service processes serve on these 2 cores beside wrk in the same rounds, "
        "the ceiling of sqlite -w 2, which other work on the machine lowers first. Non-2xx answers: "
        + ", ".join(f"{name} {count}" for name, count in bad.items())
        + "."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="one measurement of bench/durable.py, run as a child process")
    parser.add_argument("what", choices=["ours", "huey", "recover", "pickup"])
    parser.add_argument("path")
    parser.add_argument("sync", nargs="?", default="NORMAL")
    parser.add_argument("n", nargs="?", type=int, default=0)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.what == "recover":
        first_recovered(args.path)
    elif args.what == "pickup":
        pickup_worker(args.path)
    else:
        print((ours if args.what == "ours" else huey)(args.path, args.sync, args.n))


if __name__ == "__main__":
    main()
