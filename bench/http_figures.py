"""Figures measured through the real service under gunicorn: enqueue overhead, RSS growth, lifecycle."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

from .harness import Run, table
from .server import OUT, Server
from .stats import ratios, spread, verdict
from .wsgi import REFERENCE_ACCEPT, REFERENCE_REJECT

# Server settings shared by the enqueue figures; everything else comes from .env like `make run`.
_QUICK_EXIT = {"SHUTDOWN_TIMEOUT_S": "0"}  # these servers are killed, not drained


def enqueue_overhead(run: Run) -> None:
    """Figure 1: POST /enqueue vs a parse-only route in the same process, accepted and rejected paths."""
    rows, notes = [], []
    accepted = _ab(run, "accepted (202)", {"QUEUE_SIZE": "1000000", **_QUICK_EXIT}, "/enqueue", REFERENCE_ACCEPT)
    rejected = _ab(
        run,
        "rejected (503, queue full)",
        # Attempts that never end keep the 64-slot queue full for the whole run.
        {"QUEUE_SIZE": "64", "WORK_MIN_MS": "86400000", "WORK_MAX_MS": "86400000", **_QUICK_EXIT},
        "/enqueue",
        REFERENCE_REJECT,
        fill=True,
    )
    for label, (a, b, wrong) in (("accepted (202)", accepted), ("rejected (503, queue full)", rejected)):
        rps, p99 = (
            ratios([r["rps"] for r in a], [r["rps"] for r in b]),
            ratios([r["p99_us"] for r in a], [r["p99_us"] for r in b]),
        )
        rows.append(
            [
                label,
                spread([r["rps"] for r in a]).fmt(),
                spread([r["rps"] for r in b]).fmt(),
                rps.fmt(".3f"),
                spread([r["p99_us"] / 1000 for r in a]).fmt(".1f"),
                spread([r["p99_us"] / 1000 for r in b]).fmt(".1f"),
                p99.fmt(".3f"),
            ]
        )
        if wrong:
            notes.append(f"{label}: {wrong} responses had an unexpected status class.")
        run.summary.append(
            (f"1. enqueue throughput ratio, {label}", f"{rps.median:.3f}", ">= 0.95", verdict(rps.median >= 0.95))
        )
        if label.startswith("accepted"):
            run.summary.append(
                (f"1. enqueue p99 ratio, {label}", f"{p99.median:.3f}", "<= 1.10", verdict(p99.median <= 1.10))
            )
    text = table(
        [
            "path",
            "enqueue req/s",
            "reference req/s",
            "throughput ratio",
            "enqueue p99 ms",
            "reference p99 ms",
            "p99 ratio",
        ],
        rows,
    )
    text += (
        f"\n\nMedian (min-max) of {run.rounds} rounds; ratios are per round (enqueue / reference, measured back to "
        f"back, order alternating). wrk -t{run.wrk_threads} -c{run.wrk_connections} -d{run.wrk_seconds}s, one "
        "server per path, both routes on it. Reference routes: `POST "
        f"{REFERENCE_ACCEPT}` parses with the same `parse_enqueue` and returns the same 202 body and Location "
        f"header from a locally built task; `POST {REFERENCE_REJECT}` parses and raises the same `QueueFull`, "
        "answered by the same problem handler. Neither touches the pool or the metrics."
    )
    if notes:
        text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    run.sections["1. Enqueue overhead"] = text


def _ab(run: Run, label: str, env: dict[str, str], a: str, b: str, *, fill: bool = False):
    results: dict[str, list[dict]] = {a: [], b: []}
    wrong = 0
    expect_ok = not fill
    with Server(f"enqueue-{'reject' if fill else 'accept'}", env=env, app="bench.wsgi:app") as server:
        server.wait_ready()
        run.record(server.command)
        if fill:
            for n in range(10_000):
                if server.request("POST", "/enqueue", {"id": f"fill-{n}", "payload": ""})[0] == 503:
                    break
        run.progress(f"fig 1 {label}: warm-up")
        for path in (a, b):
            run.wrk(server.url, path, seconds=1)
        for round_no in range(run.rounds):
            for path in run.order(round_no, a, b):
                r = run.wrk(server.url, path)
                results[path].append(r)
                ok = r["requests"] - r["non_2xx_3xx"]
                wrong += r["non_2xx_3xx"] if expect_ok else ok
                run.progress(
                    f"fig 1 {label}: round {round_no + 1}/{run.rounds} {path:18} {r['rps']:8,.0f} req/s "
                    f"p99 {r['p99_us'] / 1000:6.1f} ms"
                )
    return results[a], results[b], wrong


PYSPY = shutil.which("py-spy") or str(OUT.parent.parent / ".venv" / "bin" / "py-spy")


def profile_during_wrk(run: Run, server: Server, raw: Path, path: str, *, batch: int = 0) -> None:
    """Record the server's worker with py-spy (GIL-holding samples, collapsed) into ``raw`` during a wrk run."""
    cmd = [
        PYSPY,
        "record",
        "--pid",
        str(server.worker_pid),
        "--duration",
        str(run.wrk_seconds),
        "--rate",
        "250",
        "--gil",
        "--format",
        "raw",
        "--output",
        str(raw),
        "--nonblocking",
    ]
    run.record(
        f"py-spy record --pid $WORKER_PID --duration {run.wrk_seconds} --rate 250 --gil --format raw --output "
        f"bench/out/{raw.name} --nonblocking  # during a wrk run on {path}"
    )
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run.wrk(server.url, path, batch=batch)
        spy.wait(timeout=run.wrk_seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()


# -- memory --------------------------------------------------------------------------------


def _accepted_total(server: Server) -> int:
    status, text = server.request("GET", "/metrics")
    match = re.search(r"^workerpool_tasks_accepted_total ([0-9.e+]+)$", str(text), re.M)
    return int(float(match.group(1))) if match else 0


def wait_idle(server: Server, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, body = server.request("GET", "/healthz")
        tasks = body["tasks"]  # type: ignore[index]
        if tasks["queued"] + tasks["running"] == 0:
            return tasks
        if time.monotonic() > deadline:
            raise RuntimeError(f"tasks still unfinished after {timeout} s: {tasks}")
        time.sleep(0.1)


def rss_growth(run: Run, total: int = 200_000, retained: int = 10_000) -> None:
    """Figure 4b: RSS of the worker process while 200,000 tasks go through with STATE_MAX_TASKS=10000."""
    warm = 2 * retained
    env = {
        "STATE_MAX_TASKS": str(retained),
        "QUEUE_SIZE": "200000",
        "WORK_MIN_MS": "0",
        "WORK_MAX_MS": "0",
        "FAILURE_RATE": "0",
        **_QUICK_EXIT,
    }
    samples: list[tuple[int, float]] = []
    with Server("rss", env=env, app="bench.wsgi:app") as server:
        server.wait_ready()
        run.record(server.command)
        samples.append((0, server.rss_bytes() / 2**20))
        pushed, baseline = 0, None
        while pushed < total:
            goal = warm if baseline is None else total
            # seconds for what is left at ~2,000 req/s, in short slices so progress shows
            seconds = max(1, min(run.wrk_seconds * 2, (goal - pushed) // 2000 + 1))
            run.wrk(server.url, "/enqueue", seconds=seconds)
            pushed = _accepted_total(server)
            if baseline is None and pushed >= warm:
                wait_idle(server)
                baseline = server.rss_bytes() / 2**20
                samples.append((pushed, baseline))
            else:
                samples.append((pushed, server.rss_bytes() / 2**20))
            run.progress(f"fig 4 RSS: {pushed:,} tasks pushed, RSS {samples[-1][1]:.1f} MiB")
        counts = wait_idle(server)
        final = server.rss_bytes() / 2**20
        samples.append((pushed, final))
    assert baseline is not None
    growth = final - baseline
    peak = max(mib for n, mib in samples if n >= warm) - baseline
    retained_now = counts["done"] + counts["failed"]
    run.summary.append(
        (
            "4. RSS growth after warm-up, 200k tasks, STATE_MAX_TASKS=10000",
            f"{growth:+.1f} MiB",
            "< 20 MB",
            verdict(growth * 1.048576 < 20),
        )
    )
    rows = [[f"{n:,}", f"{mib:.1f}"] for n, mib in samples]
    run.sections["4b. RSS under retention"] = (
        f"Service with `STATE_MAX_TASKS={retained}`, instant work (`WORK_MIN_MS=WORK_MAX_MS=0`, "
        f"`FAILURE_RATE=0`), tasks pushed with wrk. Warm-up: the first {warm:,} tasks (twice the retention), then "
        f"the baseline is taken once they are finished.\n\n"
        + table(["tasks accepted", "worker RSS MiB"], rows)
        + f"\n\nGrowth after warm-up: **{growth:+.1f} MiB** at the end, peak {peak:+.1f} MiB; "
        f"{retained_now:,} finished tasks retained at the end (cap {retained:,}). One run (200,000 tasks take ~2 "
        "minutes through HTTP), not rounds."
    )


# -- lifecycle -------------------------------------------------------------------------------


def lifecycle(run: Run) -> None:
    """Figure 5: start to first 200 on /healthz and SIGTERM (empty queue) to exit, vs a bare gunicorn app."""
    service, bare = "service", "bare gunicorn"
    start: dict[str, list[float]] = {service: [], bare: []}
    stop: dict[str, list[float]] = {service: [], bare: []}
    for round_no in range(run.rounds):
        for which in run.order(round_no, service, bare):
            if which == service:
                server = Server("lifecycle-service", env={})
            else:
                server = Server("lifecycle-bare", env={}, app="bench.hello:app", config="bench/hello.conf.py")
            with server:
                start[which].append(server.wait_ready())
                run.record(server.command)
                stop[which].append(server.terminate())
            run.progress(
                f"fig 5 round {round_no + 1}/{run.rounds} {which:13} start {start[which][-1] * 1000:6.0f} ms, "
                f"SIGTERM to exit {stop[which][-1] * 1000:6.0f} ms"
            )
    rows = []
    for label, data in (("start to first 200 on /healthz", start), ("SIGTERM (empty queue) to exit", stop)):
        rows.append(
            [
                label,
                spread([s * 1000 for s in data[service]]).fmt(",.0f", " ms"),
                spread([s * 1000 for s in data[bare]]).fmt(",.0f", " ms"),
                ratios(data[service], data[bare]).fmt(".2f"),
            ]
        )
    exit_s = spread(stop[service]).median
    run.summary.append(("5. SIGTERM (empty queue) to exit", f"{exit_s * 1000:,.0f} ms", "< 1 s", verdict(exit_s < 1)))
    run.summary.append(
        ("5. start to first 200 on /healthz", f"{spread(start[service]).median * 1000:,.0f} ms", "(none)", "-")
    )
    run.sections["5. Lifecycle latency"] = (
        table(["", "service", "bare gunicorn reference", "ratio"], rows)
        + "\n\n`service` is `make run`'s command (`gunicorn -c gunicorn.conf.py`, the real app and hooks) on a free "
        "port; the reference is the same gunicorn settings serving a 3-line WSGI app with no hooks "
        "(`bench/hello.py`, `bench/hello.conf.py`): the floor set by Python, gunicorn and the gthread worker. "
        "Start is measured from spawning the process to the first 200 (polled every 5 ms); exit from sending "
        "SIGTERM to the arbiter to its exit."
    )
