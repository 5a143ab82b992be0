"""Figure 9: the Redis store, on a private redis-server started for the run (no persistence, a free port).

9a POST /enqueue: the Redis store with ``gunicorn -w 2`` and as two instances against one process on the
memory store, and one process against a bare Flask endpoint that enqueues with RQ. 9b engine tasks/s with
a no-op handler, one process and two, against RQ's ``SimpleWorker`` and forking ``Worker``, with Redis round
trips and CPU time per task. 9c pick-up latency from one instance to an idle worker of another. 9d Redis
memory per retained task, and retention bounding it.

The engine figures run in child processes (``python -m bench.redis_figures ...``) so that each starts cold
and counts its own round trips: every write of a request to a Redis socket (a pipeline is one), counted in
memory shared with forked children.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing
import os
import resource
import shutil
import signal
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

WORKERS = 4
PREFIX = "bench"
PAYLOAD = "x" * 64


# -- a private Redis -----------------------------------------------------------------------------


class RedisProcess:
    """redis-server on a free port in a temporary directory, without persistence; killed by pid."""

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.command = "redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no"
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client().ping()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis.from_url(self.url)

    def commands(self) -> int:
        """Commands Redis ran so far, those run by scripts included (INFO commandstats)."""
        return sum(stat["calls"] for stat in self.client().info("commandstats").values())

    def used_memory(self) -> int:
        return int(self.client().info("memory")["used_memory"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


# -- round trips, counted in the client ----------------------------------------------------------


def count_round_trips():  # noqa: ANN201
    """Count every request written to a Redis socket in this process and in children it forks."""
    import redis.connection

    counter = multiprocessing.Value(ctypes.c_long, 0, lock=True)
    send = redis.connection.AbstractConnection.send_packed_command

    def counted(self, command, check_health=True):  # noqa: ANN001, ANN202
        with counter.get_lock():
            counter.value += 1
        return send(self, command, check_health)

    redis.connection.AbstractConnection.send_packed_command = counted
    return counter


def cpu_seconds() -> float:
    """CPU time of this process and of its children that were waited for."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# -- children: one measurement each ---------------------------------------------------------------


def _store(url: str, n: int):  # noqa: ANN202
    from workerpool.stores.redis_store import RedisStore, connect

    return RedisStore(connect(url), capacity=max(n, 1), ttl=3600.0, max_finished=max(n, 1), prefix=PREFIX)


def ours_worker(url: str, n: int, workers: int) -> None:
    """A pool of ``workers`` threads with a no-op handler on the store the parent filled; runs from "go" to "stop"."""
    from workerpool import WorkerPool

    trips = count_round_trips()
    pool = WorkerPool(lambda task, cancel: None, store=_store(url, n), workers=workers, backoff_base=0.0,
                      backoff_cap=0.0)  # fmt: skip
    print("ready", flush=True)
    sys.stdin.readline()
    cpu, before = cpu_seconds(), trips.value
    pool.start()
    sys.stdin.readline()
    print(json.dumps({"cpu": cpu_seconds() - cpu, "trips": trips.value - before}), flush=True)
    pool.shutdown(5)


def rq_worker(url: str, kind: str) -> None:
    """RQ's ``SimpleWorker`` or forking ``Worker`` in burst mode over the jobs the parent enqueued."""
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker

    trips = count_round_trips()
    connection = Redis.from_url(url)
    worker_class = SimpleWorker if kind == "simple" else Worker
    worker = worker_class([Queue("bench", connection=connection)], connection=connection)
    print("ready", flush=True)
    sys.stdin.readline()
    cpu, before, started = cpu_seconds(), trips.value, time.perf_counter()
    worker.work(burst=True, logging_level="WARNING", with_scheduler=False)
    elapsed = time.perf_counter() - started
    print(json.dumps({"seconds": elapsed, "cpu": cpu_seconds() - cpu, "trips": trips.value - before}), flush=True)


def pickup_worker(url: str) -> None:
    """An instance whose idle workers start tasks admitted elsewhere; the handler returns when it started."""
    from workerpool import WorkerPool

    pool = WorkerPool(lambda task, cancel: time.time(), store=_store(url, 1000), workers=WORKERS)
    pool.start()
    print("ready", flush=True)
    sys.stdin.read()
    pool.shutdown(5)


def noop(payload: str = "") -> None:
    """RQ's job in the engine figure: nothing."""


# -- the parent --------------------------------------------------------------------------------


def _spawn(*args: str) -> subprocess.Popen[str]:
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.redis_figures", *args], cwd=ROOT,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == "ready\n", f"{args} did not start"
    return child


def _tell(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def _result(child: subprocess.Popen[str]) -> dict:
    assert child.stdout is not None
    out = json.loads(child.stdout.readline())
    child.communicate(timeout=60)
    return out


def _fill_ours(redis: RedisProcess, n: int) -> float:
    """Admit ``n`` tasks one at a time as ``POST /enqueue`` does; round trips per task."""
    from workerpool import Task

    redis.client().flushall()
    store = _store(redis.url, n)
    before = _TRIPS.value
    for i in range(n):
        store.admit([Task(f"t{i}", PAYLOAD, 0, created_at=time.time())])
    trips = (_TRIPS.value - before) / n
    store.close()
    return trips


def _fill_rq(redis: RedisProcess, n: int) -> float:
    from rq import Queue

    redis.client().flushall()
    queue = Queue("bench", connection=redis.client())
    before = _TRIPS.value
    for i in range(n):
        queue.enqueue(noop, PAYLOAD, job_id=f"t{i}")
    return (_TRIPS.value - before) / n


def _run_ours(redis: RedisProcess, n: int, processes: int, workers: int) -> dict:
    from workerpool import State

    children = [_spawn("ours", redis.url, str(n), str(workers)) for _ in range(processes)]
    store = _store(redis.url, n)
    commands = redis.commands()
    started = time.perf_counter()
    for child in children:
        _tell(child, "go")
    pause = threading.Event()
    while store.stats().counts[State.DONE] < n:  # the parent's reads are not counted for the children
        pause.wait(0.005)
    seconds = time.perf_counter() - started
    commands = redis.commands() - commands
    for child in children:
        _tell(child, "stop")
    results = [_result(child) for child in children]
    store.close()
    return {
        "seconds": seconds,
        "cpu": sum(r["cpu"] for r in results) / n,
        "trips": sum(r["trips"] for r in results) / n,
        "commands": commands / n,
    }


def _run_rq(redis: RedisProcess, n: int, kind: str) -> dict:
    child = _spawn("rq", redis.url, kind)
    commands = redis.commands()
    _tell(child, "go")
    result = _result(child)
    commands = redis.commands() - commands
    done = redis.client().zcard("rq:finished:bench")
    if done != n:
        raise RuntimeError(f"RQ finished {done} of {n} jobs")
    return {"seconds": result["seconds"], "cpu": result["cpu"] / n, "trips": result["trips"] / n,
            "commands": commands / n}  # fmt: skip


def engine_throughput(run: Run, n: int, forking_n: int) -> None:
    """Figure 9b: tasks/s of a no-op handler over Redis, ours against RQ's workers."""
    install_parent_counter()
    setups = {
        "workerpool, 1 process x 4 threads": lambda r: _run_ours(r, n, 1, WORKERS),
        "workerpool, 2 processes x 4 threads": lambda r: _run_ours(r, n, 2, WORKERS),
        "workerpool, 1 process x 1 thread": lambda r: _run_ours(r, n, 1, 1),
        "RQ SimpleWorker (1 process)": lambda r: _run_rq(r, n, "simple"),
        "RQ Worker (forks per job)": lambda r: _run_rq(r, forking_n, "fork"),
    }
    fills = {name: (n if "forks" not in name else forking_n) for name in setups}
    redis = RedisProcess()
    results: dict[str, list[dict]] = {name: [] for name in setups}
    enqueue_trips: dict[str, float] = {}
    try:
        names = list(setups)
        for round_no in range(run.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                ours = name.startswith("workerpool")
                trips = (_fill_ours if ours else _fill_rq)(redis, fills[name])
                enqueue_trips["workerpool" if ours else "RQ"] = trips
                result = setups[name](redis)
                results[name].append(result)
                rate = fills[name] / result["seconds"]
                run.progress(f"fig 9 engine: round {round_no + 1} {name} {rate:,.0f} tasks/s")
    finally:
        redis.stop()
    rates = {name: [fills[name] / r["seconds"] for r in rs] for name, rs in results.items()}
    reference = "RQ SimpleWorker (1 process)"
    rows = []
    for name in setups:
        rs = results[name]
        rows.append([
            name,
            spread(rates[name]).fmt(),
            ratios(rates[name], rates[reference]).fmt(".2f"),
            spread([r["cpu"] * 1e6 for r in rs]).fmt(),
            f"{spread([r['trips'] for r in rs]).median:.2f}",
            f"{spread([r['commands'] for r in rs]).median:.1f}",
        ])  # fmt: skip
    one = ratios(rates["workerpool, 1 process x 4 threads"], rates[reference])
    thread = ratios(rates["workerpool, 1 process x 1 thread"], rates[reference])
    fork = ratios(rates["workerpool, 1 process x 4 threads"], rates["RQ Worker (forks per job)"])
    two = ratios(rates["workerpool, 2 processes x 4 threads"], rates["workerpool, 1 process x 4 threads"])
    run.summary.append(("9. engine tasks/s over Redis, 1 process / RQ SimpleWorker", f"{one.median:.2f}", "> 1",
                        verdict(one.median > 1)))  # fmt: skip
    run.summary.append(("9. engine tasks/s over Redis, 1 thread / RQ SimpleWorker", f"{thread.median:.2f}", "> 1",
                        verdict(thread.median > 1)))  # fmt: skip
    run.summary.append(("9. engine tasks/s over Redis, 1 process / RQ Worker (fork)", f"{fork.median:.2f}", "> 1",
                        verdict(fork.median > 1)))  # fmt: skip
    run.summary.append(("9. engine tasks/s over Redis, 2 processes / 1", f"{two.median:.2f}", "", ""))
    text = table(["", "tasks/s", "ratio to RQ SimpleWorker", "CPU µs per task", "round trips per task",
                  "Redis commands per task"], rows)  # fmt: skip
    text += (
        f"\n\nEnqueue side, round trips per task: workerpool {enqueue_trips.get('workerpool', 0):.2f} (one script: "
        f"admission, bound and duplicate check), RQ {enqueue_trips.get('RQ', 0):.2f} (`Queue.enqueue`).\n\n"
        f"Each round fills the store with {n:,} tasks ({forking_n:,} for the forking worker, which forks once per "
        'job) submitted one at a time, then times a fresh child process (or two) from "go" to the last task done: '
        "ours until the store counts every task `done` (the parent polls every 5 ms), RQ's `work(burst=True)` until "
        f"the queue is empty. {run.rounds} rounds, setups in rotating order, median (min-max); ratios per round. "
        "CPU time is the worker processes' own (and their forked children's), per task. Round trips are requests "
        "written to a Redis socket by the workers (a pipeline or a script is one); Redis commands include those "
        "run inside scripts (`INFO commandstats`). Ours keeps every task's outcome for `GET /tasks/<id>` and holds "
        "a lease per attempt; RQ keeps its job hashes and registries."
    )
    run.sections["9b. Engine throughput over Redis against RQ"] = text


def http_enqueue(run: Run) -> None:
    """Figure 9a: POST /enqueue over Redis against the memory store and against a Flask endpoint enqueueing with RQ."""
    redis = RedisProcess()
    env = {"QUEUE_SIZE": "1000000", "SHUTDOWN_TIMEOUT_S": "0", "STATE_MAX_TASKS": "10000"}
    store = {**env, "STORE": redis.url, "STORE_PREFIX": "http"}
    setups = {
        "memory -w 1": lambda: [Server("redis-memory", env=env)],
        # Each instance keeps its own tasks: not a deployment, the most two processes get out of these 2 cores.
        "memory, 2 instances (not shared)": lambda: [Server(f"redis-memory{n}", env=env) for n in range(2)],
        "redis -w 1": lambda: [Server("redis-w1", env=store)],
        "redis -w 2": lambda: [Server("redis-w2", env={**store, "GUNICORN_CMD_ARGS": "-w 2"})],
        "redis, 2 instances": lambda: [Server(f"redis-instance{n}", env=store) for n in range(2)],
        "RQ + bare Flask -w 1": lambda: [
            Server(
                "redis-rq",
                env={"RQ_REDIS_URL": redis.url},
                app="bench.rq_app:app",
                config="bench/hello.conf.py",
                ready=("/enqueue", 405),
            )
        ],
    }
    servers = {name: make() for name, make in setups.items()}
    results: dict[str, list[dict]] = {name: [] for name in setups}
    try:
        run.record(redis.command)
        for group in servers.values():
            for server in group:
                server.wait_ready()
                run.record(server.command.replace(redis.url, "redis://127.0.0.1:$REDIS_PORT/0"))
                run.wrk(server.url, "/enqueue", seconds=1)
        names = list(setups)
        for round_no in range(run.rounds):
            order = names[round_no % len(names) :] + names[: round_no % len(names)]
            for name in order:
                result = _wrk_group(run, servers[name], redis, one_worker=name.endswith("-w 1"))
                results[name].append(result)
                run.progress(f"fig 9 http: round {round_no + 1} {name} {result['rps']:8,.0f} req/s")
    finally:
        for group in servers.values():
            for server in group:
                server.stop()
        redis.stop()
    rps = {name: [r["rps"] for r in rs] for name, rs in results.items()}
    base = "memory -w 1"
    w2 = ratios(rps["redis -w 2"], rps[base])
    two = ratios(rps["redis, 2 instances"], rps[base])
    rq = ratios(rps["redis -w 1"], rps["RQ + bare Flask -w 1"])
    ceiling = ratios(rps["memory, 2 instances (not shared)"], rps[base])
    run.summary.append(
        ("9. enqueue req/s, redis -w 2 / memory -w 1", f"{w2.median:.2f}", ">= 1.7", verdict(w2.median >= 1.7))
    )
    run.summary.append(
        ("9. enqueue req/s, 2 redis instances / memory -w 1", f"{two.median:.2f}", ">= 1.7", verdict(two.median >= 1.7))
    )
    run.summary.append(("9. ceiling: 2 memory instances (not shared) / memory -w 1", f"{ceiling.median:.2f}", "-", "-"))
    run.summary.append(("9. enqueue req/s, redis -w 1 / RQ + Flask", f"{rq.median:.2f}", "> 1", verdict(rq.median > 1)))
    rows = []
    for name in setups:
        rs = results[name]
        cpu = [r["cpu_us"] for r in rs if r["cpu_us"] is not None]
        rows.append([
            name,
            spread(rps[name]).fmt(),
            ratios(rps[name], rps[base]).fmt(".2f"),
            spread(cpu).fmt() if cpu else "",
            f"{spread([r['commands'] for r in rs]).median:.1f}",
            str(sum(r["non_2xx"] for r in rs)),
        ])  # fmt: skip
    run.sections["9a. POST /enqueue on the Redis store"] = table(
        [
            "setup",
            "req/s",
            "ratio to memory -w 1",
            "server CPU µs per request",
            "Redis commands per request",
            "non-2xx",
        ],
        rows,
    ) + (
        f"\n\nAll servers run side by side on one private Redis (default simulated work, WORKERS=4 per process, "
        f"so the workers claim and finish tasks while wrk submits), wrk -t{run.wrk_threads} "
        f"-c{run.wrk_connections} -d{run.wrk_seconds}s against each setup in rotating order ({run.rounds} "
        "rounds, median (min-max), ratios per round); for two instances, two wrk runs at once with half the "
        "threads and connections each, their rates added. Server CPU is the worker process's user + system time "
        "over the run per answered request (one-worker setups only). Redis commands per request include those "
        "of the workers running the tasks and those run inside scripts. The RQ endpoint checks the same fields and "
        "calls `Queue.enqueue` with the task's id as the job id, on gunicorn's gthread worker with 8 threads as "
        "ours. The two memory instances share nothing (each keeps its own tasks): no deployment, but the most two "
        "service processes serve on these 2 cores beside wrk, so the ceiling of any shared store's two processes "
        "(figure 8a's too). Redis round trips per enqueue are counted in figure 9b."
    )


def _wrk_group(run: Run, group: list[Server], redis: RedisProcess, *, one_worker: bool) -> dict:
    commands = redis.commands()
    cpu = group[0].cpu_seconds() if one_worker and group[0].worker_pid else None
    result = run.wrk_together([server.url for server in group], "/enqueue")
    requests = result["requests"]
    return {
        "rps": result["rps"],
        "cpu_us": None if cpu is None else (group[0].cpu_seconds() - cpu) / max(requests, 1) * 1e6,
        "commands": (redis.commands() - commands) / max(requests, 1),
        "non_2xx": result["non_2xx_3xx"],
    }


def pickup_latency(run: Run, tasks: int, gap: float = 0.2) -> None:
    """Figure 9c: from admission by one instance to the start on an idle worker of another."""
    redis = RedisProcess()
    submitter = _store(redis.url, 1000)
    worker = _spawn("pickup", redis.url)
    try:  # the other instance's workers are idle between tasks, blocked in BLPOP
        p50, p95, worst = pickup_latencies(submitter, worker, tasks, gap)
    finally:
        submitter.close()
        redis.stop()
    run.summary.append(("9. pick-up latency across instances (Redis), p95", f"{p95:.1f} ms", "a few ms",
                        verdict(p95 < 10)))  # fmt: skip
    run.sections["9c. Pick-up latency across instances"] = table(
        ["", "ms"], [["median", f"{p50:.1f}"], ["95th percentile", f"{p95:.1f}"], ["worst", f"{worst:.1f}"]]
    ) + (
        f"\n\n{tasks} tasks admitted one at a time by one store client (instance A, no workers), "
        f"{gap * 1000:.0f} ms apart, so that the {WORKERS} workers of another process (instance B) are idle, "
        "blocked in `BLPOP`; the latency is from just before the admission to the handler's first line in B "
        "(one wall clock)."
    )


def retained_memory(run: Run, tasks: int, bound: int) -> None:
    """Figure 9d: Redis memory per retained finished task, and retention bounding it."""
    from workerpool import Task
    from workerpool.stores.redis_store import RedisStore, connect

    redis = RedisProcess()
    rows = []
    try:
        for retained in (tasks, bound):
            redis.client().flushall()
            store = RedisStore(connect(redis.url), capacity=1000, ttl=3600.0, max_finished=retained, prefix=PREFIX)
            store.admit([Task("warm", PAYLOAD, 0, created_at=time.time())])  # the scripts are loaded
            before = redis.used_memory()
            for start in range(0, tasks, 500):
                now = time.time()
                store.admit([Task(f"t{i}", PAYLOAD, 0, created_at=now) for i in range(start, min(tasks, start + 500))])
                while (task := store.claim("bench", time.time() + 30)) is not None:
                    store.finish(task.id, task.attempts, "bench", result=None)
            used = redis.used_memory() - before
            kept = store.stats().counts
            store.close()
            finished = sum(v for k, v in kept.items() if str(k) in ("done", "failed", "cancelled"))
            rows.append([f"{tasks:,} tasks run, STATE_MAX_TASKS={retained:,}", f"{finished:,}",
                         f"{used / 1024 / 1024:.2f}", f"{used / max(finished, 1):,.0f}"])  # fmt: skip
            run.progress(f"fig 9 memory: {rows[-1]}")
    finally:
        redis.stop()
    per_task = rows[0][-1]
    run.summary.append(("9. Redis memory per retained finished task", f"{per_task} B", "bounded by retention", ""))
    run.sections["9d. Redis memory per retained task"] = table(
        ["", "finished tasks kept", "used_memory growth (MiB)", "bytes per kept task"], rows
    ) + (
        f"\n\n`INFO memory` `used_memory` before and after running the tasks (payload {len(PAYLOAD)} bytes, "
        "dropped when a task finishes; a `null` result), each task's hash and its entries in the listing and "
        "retention indexes included. With `STATE_MAX_TASKS` below the number run, the oldest finished tasks are "
        "forgotten as new ones finish, so memory stays proportional to the bound."
    )


_TRIPS = None  # the parent's round-trip counter, installed by install_parent_counter()


def install_parent_counter() -> None:
    global _TRIPS
    if _TRIPS is None:
        _TRIPS = count_round_trips()


def main() -> None:
    parser = argparse.ArgumentParser(description="one measurement of bench/redis_figures.py, run as a child process")
    parser.add_argument("what", choices=["ours", "rq", "pickup"])
    parser.add_argument("url")
    parser.add_argument("args", nargs="*")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.what == "ours":
        ours_worker(args.url, int(args.args[0]), int(args.args[1]))
    elif args.what == "rq":
        rq_worker(args.url, args.args[0])
    else:
        pickup_worker(args.url)


if __name__ == "__main__":
    main()
