"""Figure 6: tasks accepted per second over HTTP, batches of 100 and 1,000 against POST /enqueue, with the
engine finishing them (a no-op handler) in the same process; then the rate a bounded queue sustains."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .harness import Run, collapsed_inclusive, collapsed_self_time, table
from .http_figures import PYSPY, profile_during_wrk, wait_idle
from .server import OUT, ROOT, Server
from .stats import ratios, spread, verdict

SINGLE = "POST /enqueue"
BATCH_SIZES = (100, 1000)
GOAL_TASKS_PER_S = 20_000
# The real app (`make run`'s command) with a handler that does nothing, so the figure is the service's own
# cost; a queue large enough that no task is refused for room. Everything else comes from .env.
ENV = {
    "QUEUE_SIZE": "1000000",
    "TASK_HANDLER": "bench.engine:noop",
    "SHUTDOWN_TIMEOUT_S": "0",  # the server is killed, not drained
}
# The second server: a bound a deployment would set. Whatever the workers do not finish is refused (503 per
# task) once the queue is full, so accepted tasks/s settles at what the engine finishes: the sustained rate.
BOUNDED_ENV = {**ENV, "QUEUE_SIZE": "10000"}
_COUNTERS = {
    "accepted": re.compile(r"^workerpool_tasks_accepted_total ([0-9.e+]+)$", re.M),
    "finished": re.compile(r'^workerpool_tasks_finished_total\{state="done"\} ([0-9.e+]+)$', re.M),
    "rejected": re.compile(r"^workerpool_tasks_rejected_total\{[^}]*\} ([0-9.e+]+)$", re.M),
}


def _label(size: int) -> str:
    return f"POST /enqueue/batch, {size:,} tasks per request"


def _counters(server: Server) -> dict[str, float]:
    status, text = server.request("GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    return {name: sum(float(v) for v in pattern.findall(str(text))) for name, pattern in _COUNTERS.items()}


def batch_throughput(run: Run, sizes: tuple[int, ...] = BATCH_SIZES) -> None:
    """Figure 6: rounds of single-task and batch runs on one server, order rotating, the queue emptied between."""
    variants = [(SINGLE, "/enqueue", 0)] + [(_label(size), "/enqueue/batch", size) for size in sizes]
    accepted: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    finished: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    latency: dict[str, list[float]] = {label: [] for label, _, _ in variants}
    refused = 0
    with Server("batch", env=ENV) as server:
        server.wait_ready()
        run.record(server.command)
        run.progress("fig 6: warm-up")
        for _, path, size in variants:
            run.wrk(server.url, path, seconds=1, batch=size)
        wait_idle(server)
        for round_no in range(run.rounds):
            shift = round_no % len(variants)
            for label, path, size in variants[shift:] + variants[:shift]:
                before = _counters(server)
                result = run.wrk(server.url, path, batch=size)
                after = _counters(server)
                seconds = result["seconds"]
                accepted[label].append((after["accepted"] - before["accepted"]) / seconds)
                finished[label].append((after["finished"] - before["finished"]) / seconds)
                latency[label].append(result["p99_us"] / 1000)
                refused += int(after["rejected"] - before["rejected"]) + result["non_2xx_3xx"]
                run.progress(
                    f"fig 6 round {round_no + 1}/{run.rounds} {label:42} accepted {accepted[label][-1]:9,.0f} "
                    f"tasks/s, finished {finished[label][-1]:9,.0f} tasks/s, p99 {latency[label][-1]:7.1f} ms"
                )
                wait_idle(server)  # each run starts with an empty queue: no backlog carried over
        profile = _profile(run, server, sizes[0])
    rows = [
        [
            label,
            spread(accepted[label]).fmt(),
            ratios(accepted[label], accepted[SINGLE]).fmt(".1f"),
            spread(finished[label]).fmt(),
            ratios(finished[label], accepted[label]).fmt(".2f"),
            spread(latency[label]).fmt(".1f"),
        ]
        for label, _, _ in variants
    ]
    for size in sizes:
        label = _label(size)
        value = spread(accepted[label]).median
        goal = f">= {GOAL_TASKS_PER_S:,}"
        run.summary.append(
            (
                f"6. tasks accepted/s over HTTP, batches of {size:,}",
                f"{value:,.0f}",
                goal,
                verdict(value >= GOAL_TASKS_PER_S),
            )
        )
        keep_up = ratios(finished[label], accepted[label]).median
        run.summary.append(
            (
                f"6. tasks finished / accepted during the run, batches of {size:,}",
                f"{keep_up:.2f}",
                ">= 0.95",
                verdict(keep_up >= 0.95),
            )
        )
    text = table(
        [
            "request",
            "tasks accepted/s",
            "vs POST /enqueue",
            "tasks finished/s",
            "finished / accepted",
            "p99 per request ms",
        ],
        rows,
    )
    text += (
        f"\n\nMedian (min-max) of {run.rounds} rounds; ratios are per round. One server (`make run`'s command: "
        "gunicorn, one worker process, 8 HTTP threads, the default 4 task workers) with a no-op `TASK_HANDLER`, "
        f"`QUEUE_SIZE=1000000` and the rest of `.env`; wrk -t{run.wrk_threads} -c{run.wrk_connections} "
        f"-d{run.wrk_seconds}s posting unique ids (64-byte payloads), the three kinds of request in rotating order, "
        "the queue left to empty between runs. Tasks accepted and finished are the differences of "
        '`workerpool_tasks_accepted_total` and `workerpool_tasks_finished_total{state="done"}` across each run, '
        "over wrk's duration: finished / accepted below 1 means the queue grew during the run."
    )
    if refused:
        text += f"\n\n- {refused:,} tasks or requests were refused (expected none)."
    run.sections["6. Batch submission"] = text + "\n\n" + _sustained(run, sizes) + "\n\n" + profile


def _sustained(run: Run, sizes: tuple[int, ...]) -> str:
    """Batches against a bounded queue: tasks accepted, finished and refused per second (the sustained rate),
    from producers that ignore Retry-After (wrk as above) and from producers that honour it."""
    variants = [(size, honour) for honour in (False, True) for size in sizes]
    labels = {
        (size, honour): f"batches of {size:,}, producer {'honours' if honour else 'ignores'} Retry-After"
        for size, honour in variants
    }
    accepted: dict[str, list[float]] = {label: [] for label in labels.values()}
    finished: dict[str, list[float]] = {label: [] for label in labels.values()}
    refused: dict[str, list[float]] = {label: [] for label in labels.values()}
    with Server("batch-bounded", env=BOUNDED_ENV) as server:
        server.wait_ready()
        run.record(server.command)
        run.wrk(server.url, "/enqueue/batch", seconds=1, batch=sizes[0])  # warm-up
        wait_idle(server)
        for round_no in range(run.rounds):
            shift = round_no % len(variants)
            for size, honour in variants[shift:] + variants[:shift]:
                label = labels[size, honour]
                before = _counters(server)
                result = run.wrk(server.url, "/enqueue/batch", batch=size, honour_retry=honour)
                after = _counters(server)
                seconds = result["seconds"]
                accepted[label].append((after["accepted"] - before["accepted"]) / seconds)
                finished[label].append((after["finished"] - before["finished"]) / seconds)
                refused[label].append((after["rejected"] - before["rejected"]) / seconds)
                run.progress(
                    f"fig 6 bounded round {round_no + 1}/{run.rounds} {label:52} accepted "
                    f"{accepted[label][-1]:9,.0f} tasks/s, finished {finished[label][-1]:9,.0f} tasks/s, "
                    f"refused {refused[label][-1]:9,.0f} tasks/s"
                )
                wait_idle(server)
    bound = BOUNDED_ENV["QUEUE_SIZE"]
    for size in sizes:
        value = spread(finished[labels[size, True]]).median
        run.summary.append(
            (
                f"6. tasks/s sustained, QUEUE_SIZE={bound}, producers honouring Retry-After, batches of {size:,}",
                f"{value:,.0f}",
                f">= {GOAL_TASKS_PER_S:,}",
                verdict(value >= GOAL_TASKS_PER_S),
            )
        )
    rows = [
        [
            label,
            spread(accepted[label]).fmt(),
            spread(finished[label]).fmt(),
            ratios(finished[label], accepted[label]).fmt(".2f"),
            spread(refused[label]).fmt(),
        ]
        for label in labels.values()
    ]
    return (
        f"The rate the service sustains: the same server and load with `QUEUE_SIZE={bound}` (a bound a "
        "deployment would set): once the queue is full, a task the workers have not made room for is refused "
        "(`503` in its batch entry, with `retry_after`) instead of queued, so tasks accepted per second settle at "
        f"what the engine finishes (they can differ by at most the queue's {int(bound):,} tasks over a run). "
        "wrk ignores `Retry-After` and sends its next batch at once, so refusing tasks takes the same threads "
        "and interpreter as finishing them; a producer that honours it (`bench/enqueue_retry.lua`: each "
        "connection of a wrk thread that got a `retry_after` pauses that long once) leaves the workers the "
        "time. The summary's sustained figure is tasks finished per second with producers that honour it.\n\n"
        + table(["producer", "tasks accepted/s", "tasks finished/s", "finished / accepted", "tasks refused/s"], rows)
    )


def _profile(run: Run, server: Server, size: int) -> str:
    """Where the server's worker process holds the GIL during a run of batches of ``size`` (py-spy)."""
    if run.quick or not os.path.exists(PYSPY):
        return "(profile skipped)"
    raw = OUT / "batch-profile.txt"
    profile_during_wrk(run, server, raw, "/enqueue/batch", batch=size)
    if not raw.exists():
        return "(profile: py-spy produced no output)"
    parts = collapsed_inclusive(
        raw,
        {
            "batch view (service/batch.py enqueue_batch)": "enqueue_batch (",
            "  JSON decoding of the body": "decode_json (",
            "  per-task validation (parse_task)": "parse_task (",
            "  engine admission (submit_many)": "submit_many (",
            "  task_to_json (result bodies)": "task_to_json (",
            "  jsonify (response encoding)": "jsonify (",
            "werkzeug/Flask request handling (wsgi_app)": "wsgi_app (",
            "gunicorn access log": "access (",
            "log records written (Handler.emit)": "emit (",
            "garbage collection": "gc_collect",
            "pool worker threads (_work)": "_work (",
        },
    )
    return "\n".join(
        [
            f"Where the worker process holds the GIL while wrk posts batches of {size} (py-spy, 250 Hz, `--gil`; "
            "share of samples whose stack contains the function):",
            "",
            table(["function", "share"], [[label, f"{share:.1%}"] for label, share in parts]),
            "",
            "Top self time:",
            "",
            table(["function", "share"], [[f"`{name}`", f"{share:.1%}"] for name, share in collapsed_self_time(raw)]),
        ]
    )


def batch_on_stores(run: Run, size: int = BATCH_SIZES[0]) -> None:
    """Figure 6b: the sustained rate of figure 6 on the SQLite and Redis stores, beside the memory store, with
    single-task requests on each store for comparison; the servers run side by side, in rotating order."""
    from .redis_figures import RedisProcess  # only this figure needs a redis-server

    work = Path(tempfile.mkdtemp(prefix="bench-batch-", dir=ROOT / "bench"))
    redis = RedisProcess()
    stores = {
        "memory": {},
        "sqlite": {"STORE": f"sqlite://{work / 'batch.db'}"},
        "redis": {"STORE": redis.url, "STORE_PREFIX": "batch"},
    }
    requests = {"batch": ("/enqueue/batch", size), "single": ("/enqueue", 0)}
    variants = [(store, kind) for store in stores for kind in requests]
    accepted: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    finished: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    refused: dict[tuple[str, str], list[float]] = {variant: [] for variant in variants}
    servers = {store: Server(f"batch-{store}", env={**BOUNDED_ENV, **extra}) for store, extra in stores.items()}
    try:
        run.record(redis.command)
        for server in servers.values():
            server.wait_ready()
            run.record(server.command.replace(redis.url, "redis://127.0.0.1:$REDIS_PORT/0"))
            run.wrk(server.url, "/enqueue/batch", seconds=1, batch=size, honour_retry=True)  # warm-up
            wait_idle(server)
        for round_no in range(run.rounds):
            shift = round_no % len(variants)
            for store, kind in variants[shift:] + variants[:shift]:
                server = servers[store]
                path, batch = requests[kind]
                before = _counters(server)
                result = run.wrk(server.url, path, batch=batch, honour_retry=bool(batch))
                after = _counters(server)
                seconds = result["seconds"]
                accepted[store, kind].append((after["accepted"] - before["accepted"]) / seconds)
                finished[store, kind].append((after["finished"] - before["finished"]) / seconds)
                refused[store, kind].append((after["rejected"] - before["rejected"]) / seconds)
                run.progress(
                    f"fig 6b round {round_no + 1}/{run.rounds} {store:6} {kind:6} accepted "
                    f"{accepted[store, kind][-1]:9,.0f} tasks/s, finished {finished[store, kind][-1]:9,.0f} tasks/s"
                )
                wait_idle(server)
    finally:
        for server in servers.values():
            server.stop()
        redis.stop()
        shutil.rmtree(work, ignore_errors=True)
    for store in ("sqlite", "redis"):
        run.summary.append(
            (
                f"6b. tasks/s sustained, {store} store, batches of {size:,} (memory store: figure 6)",
                f"{spread(finished[store, 'batch']).median:,.0f}",
                "-",
                "-",
            )
        )
    rows = [
        [
            f"{store}, {'POST /enqueue/batch of ' + format(size, ',') if kind == 'batch' else 'POST /enqueue'}",
            spread(accepted[store, kind]).fmt(),
            spread(finished[store, kind]).fmt(),
            ratios(finished[store, kind], finished["memory", kind]).fmt(".2f"),
            ratios(finished[store, kind], finished[store, "single"]).fmt(".1f"),
            spread(refused[store, kind]).fmt(),
        ]
        for store, kind in variants
    ]
    run.sections["6b. Batch submission on the SQLite and Redis stores"] = table(
        [
            "store, request",
            "tasks accepted/s",
            "tasks finished/s",
            "finished / memory store's",
            "vs the store's POST /enqueue",
            "tasks refused/s",
        ],
        rows,
    ) + (
        f"\n\nThree servers side by side (`make run`'s command, one worker process, a no-op `TASK_HANDLER`, "
        f"`QUEUE_SIZE={BOUNDED_ENV['QUEUE_SIZE']}`; the SQLite store at its default `synchronous=NORMAL` on a "
        "fresh file, the Redis store on a private redis-server), each posting batches from producers that honour "
        "`Retry-After` (`bench/enqueue_retry.lua`) and single tasks (`bench/enqueue.lua`), "
        f"wrk -t{run.wrk_threads} -c{run.wrk_connections} -d{run.wrk_seconds}s, the six runs in rotating order, "
        f"{run.rounds} rounds, median (min-max), ratios per round; the queue left to empty between runs. "
        "Tasks finished per second is the rate each store sustains: the bound refuses what the workers have not "
        "made room for."
    )
