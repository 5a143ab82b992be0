"""Figure 2: pool efficiency under failures, through the real service, retry timer vs sleep-in-worker."""

from __future__ import annotations

import heapq
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from workerpool.backoff import compute_backoff

from .harness import Run, table
from .server import Server
from .stats import ratios, spread, verdict
from .wsgi import attempt_rng, jitter_rng

RETRY_TIMER = "retry-timer"
SLEEP_IN_WORKER = "sleep-in-worker"
POLICIES = ("fifo", "retries-first", SLEEP_IN_WORKER)


@dataclass(frozen=True)
class Batch:
    tasks: int = 400
    workers: int = 4
    min_ms: int = 20
    max_ms: int = 100
    failure_rate: float = 0.2
    max_retries: int = 3
    backoff_base_ms: int = 1000
    backoff_cap_ms: int = 10_000

    def env(self, seed: int, design: str) -> dict[str, str]:
        return {
            "WORKERS": str(self.workers),
            "QUEUE_SIZE": str(self.tasks),
            "WORK_MIN_MS": str(self.min_ms),
            "WORK_MAX_MS": str(self.max_ms),
            "FAILURE_RATE": str(self.failure_rate),
            "BACKOFF_BASE_MS": str(self.backoff_base_ms),
            "BACKOFF_CAP_MS": str(self.backoff_cap_ms),
            "DEFAULT_MAX_RETRIES": str(self.max_retries),
            "SHUTDOWN_TIMEOUT_S": "0",
            "BENCH_SEED": str(seed),
            "BENCH_DESIGN": design,
        }


@dataclass(frozen=True)
class Plan:
    """What the seeded tasks will do, known before running them."""

    work_s: float  # summed attempt durations of all tasks
    longest_chain_s: float  # one task's attempts plus its backoffs, the longest
    attempts: dict[str, int]
    failed: frozenset[str]
    # per task, in submission order: (attempt seconds, backoff seconds after it or None) per attempt
    steps: dict[str, tuple[tuple[float, float | None], ...]] = field(default_factory=dict)

    def lower_bound(self, workers: int) -> float:
        return max(self.work_s / workers, self.longest_chain_s)

    def simulate(self, workers: int, policy: str) -> float:
        """Makespan of an ideal scheduler with zero overhead running these tasks under ``policy``.

        ``retries-first``: the service's policy, a due retry goes to the front of the queue; ``fifo``: a
        due retry joins the back; ``sleep-in-worker``: a worker keeps its task through every backoff.
        """
        if policy == "sleep-in-worker":
            free = [0.0] * workers
            for steps in self.steps.values():
                start = heapq.heappop(free)
                heapq.heappush(free, start + sum(d + (b or 0.0) for d, b in steps))
            return max(free)
        ready = deque((task_id, 0) for task_id in self.steps)
        retries: list[tuple[float, int, str, int]] = []  # (due, seq, task id, next attempt index)
        free = [0.0] * workers
        seq = end = 0.0
        while ready or retries:
            now = heapq.heappop(free)
            if not ready and retries[0][0] > now:
                now = retries[0][0]  # idle until the next retry is due
            while retries and retries[0][0] <= now:
                _, _, task_id, index = heapq.heappop(retries)
                if policy == "retries-first":
                    ready.appendleft((task_id, index))
                else:
                    ready.append((task_id, index))
            task_id, index = ready.popleft()
            duration, backoff = self.steps[task_id][index]
            done = now + duration
            end = max(end, done)
            if backoff is not None:
                seq += 1
                heapq.heappush(retries, (done + backoff, seq, task_id, index + 1))
            heapq.heappush(free, done)
        return end


def task_ids(batch: Batch, seed: int) -> list[str]:
    return [f"s{seed}-t{n:04d}" for n in range(batch.tasks)]


def plan(batch: Batch, seed: int) -> Plan:
    """Replay the draws PlannedWork and PlannedJitter make: (duration, fails) per attempt, then the jitter."""
    work = chain_max = 0.0
    attempts: dict[str, int] = {}
    failed = set()
    steps: dict[str, tuple[tuple[float, float | None], ...]] = {}
    for task_id in task_ids(batch, seed):
        chain = 0.0
        task_steps: list[tuple[float, float | None]] = []
        for attempt in range(1, batch.max_retries + 2):
            rng = attempt_rng(seed, task_id, attempt)
            duration = rng.uniform(batch.min_ms / 1000, batch.max_ms / 1000)
            fails = rng.random() < batch.failure_rate
            work += duration
            chain += duration
            attempts[task_id] = attempt
            if not fails or attempt > batch.max_retries:
                task_steps.append((duration, None))
                if fails:
                    failed.add(task_id)
                break
            backoff = compute_backoff(
                attempt,
                base=batch.backoff_base_ms / 1000,
                cap=batch.backoff_cap_ms / 1000,
                rng=jitter_rng(seed, task_id, attempt),
            )
            task_steps.append((duration, backoff))
            chain += backoff
        steps[task_id] = tuple(task_steps)
        chain_max = max(chain_max, chain)
    return Plan(work, chain_max, attempts, frozenset(failed), steps)


@dataclass(frozen=True)
class Outcome:
    makespan_s: float
    busy_s: float  # summed wall time of handler calls, from the service's own histogram
    final: dict[str, tuple[str, int]]  # id -> (state, attempts as the service reports them)


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def run_batch(run: Run, batch: Batch, seed: int, design: str) -> Outcome:
    with Server(f"efficiency-{design}", env=batch.env(seed, design), app="bench.wsgi:planned_app()") as server:
        server.wait_ready()
        run.record(server.command.replace(f"BENCH_SEED={seed}", "BENCH_SEED=<round>"))
        for task_id in task_ids(batch, seed):
            status, body = server.request(
                "POST", "/enqueue", {"id": task_id, "payload": "", "max_retries": batch.max_retries}
            )
            if status != 202:
                raise RuntimeError(f"task {task_id} refused: {status} {body}")
        deadline = time.monotonic() + 600
        while True:
            _, health = server.request("GET", "/healthz")
            tasks = health["tasks"]  # type: ignore[index]
            if tasks["done"] + tasks["failed"] == batch.tasks:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"batch not finished: {tasks}")
            time.sleep(0.1)
        _, listing = server.request("GET", f"/tasks?limit={max(batch.tasks, 1)}")
        _, metrics = server.request("GET", "/metrics")
    rows = listing["tasks"]  # type: ignore[index]
    start = min(_epoch(t["created_at"]) for t in rows)
    end = max(_epoch(t["finished_at"]) for t in rows)
    busy = 0.0
    for line in str(metrics).splitlines():
        if line.startswith("workerpool_attempt_duration_seconds_sum "):
            busy = float(line.split()[1])
    return Outcome(end - start, busy, {t["id"]: (t["state"], t["attempts"]) for t in rows})


def pool_efficiency(run: Run, batch: Batch | None = None) -> None:
    batch = batch or Batch()
    designs = (RETRY_TIMER, SLEEP_IN_WORKER)
    makespan: dict[str, list[float]] = {d: [] for d in designs}
    useful: dict[str, list[float]] = {d: [] for d in designs}
    busy: dict[str, list[float]] = {d: [] for d in designs}
    bounds, mismatches = [], []
    ideal: dict[str, list[float]] = {p: [] for p in POLICIES}
    for round_no in range(run.rounds):
        seed = round_no + 1
        expected = plan(batch, seed)
        bound = expected.lower_bound(batch.workers)
        bounds.append(bound)
        for policy in POLICIES:
            ideal[policy].append(expected.simulate(batch.workers, policy))
        for design in run.order(round_no, *designs):
            outcome = run_batch(run, batch, seed, design)
            makespan[design].append(outcome.makespan_s)
            useful[design].append(expected.work_s / (batch.workers * outcome.makespan_s))
            busy[design].append(outcome.busy_s / (batch.workers * outcome.makespan_s))
            states = {tid: ("failed" if tid in expected.failed else "done") for tid in expected.attempts}
            wrong = [tid for tid, (state, _) in outcome.final.items() if states.get(tid) != state]
            if design == RETRY_TIMER:  # the sleep-in-worker reference counts one pool attempt per task
                wrong += [tid for tid, (_, n) in outcome.final.items() if expected.attempts.get(tid) != n]
            if wrong or len(outcome.final) != batch.tasks:
                mismatches.append(f"round {round_no + 1} {design}: {len(set(wrong))} tasks differ from the plan")
            run.progress(
                f"fig 2 round {round_no + 1}/{run.rounds} {design:15} makespan {outcome.makespan_s:6.2f} s, "
                f"lower bound {bound:6.2f} s, ratio {outcome.makespan_s / bound:5.2f}"
            )
    timer_ratio = spread([m / b for m, b in zip(makespan[RETRY_TIMER], bounds)])
    rows = []
    for design in designs:
        policy = "retries-first" if design == RETRY_TIMER else SLEEP_IN_WORKER
        rows.append(
            [
                "service (retries on a timer)"
                if design == RETRY_TIMER
                else "reference: sleep through backoff in the worker",
                spread(makespan[design]).fmt(".2f", " s"),
                spread([m / b for m, b in zip(makespan[design], bounds)]).fmt(".3f"),
                spread([i / b for i, b in zip(ideal[policy], bounds)]).fmt(".3f"),
                spread([m / i for m, i in zip(makespan[design], ideal[policy])]).fmt(".3f"),
                spread(useful[design]).fmt(".1%"),
                spread(busy[design]).fmt(".1%"),
            ]
        )
    what_if = spread([i / b for i, b in zip(ideal["fifo"], bounds)])
    run.summary.append(
        (
            f"2. makespan / lower bound, {batch.tasks} tasks with failures",
            f"{timer_ratio.median:.3f}",
            "<= 1.10",
            verdict(timer_ratio.median <= 1.10),
        )
    )
    reference_ratio = ratios(makespan[SLEEP_IN_WORKER], makespan[RETRY_TIMER])
    text = table(
        [
            "design",
            "makespan",
            "makespan / lower bound",
            "ideal scheduler of this design / lower bound",
            "makespan / ideal",
            "utilisation (planned work)",
            "worker busy (measured)",
        ],
        rows,
    )
    plans = [plan(batch, round_no + 1) for round_no in range(run.rounds)]
    text += (
        f"\n\nSleep-in-worker makespan / service makespan: **{reference_ratio.fmt('.2f')}**. Lower bound per round = "
        "max(total work / workers, longest task chain incl. its backoffs): "
        + ", ".join(
            f"{b:.2f} s ({'work' if p.work_s / batch.workers >= p.longest_chain_s else 'chain'})"
            for b, p in zip(bounds, plans)
        )
        + f".\n\n{batch.tasks} tasks through HTTP, work uniform {batch.min_ms}-{batch.max_ms} ms, "
        f"`FAILURE_RATE={batch.failure_rate}`, max_retries {batch.max_retries}, backoff base "
        f"{batch.backoff_base_ms / 1000:g} s cap {batch.backoff_cap_ms / 1000:g} s, `WORKERS={batch.workers}`. "
        "Each round uses a new seed for both designs: attempt durations, failures and backoff jitter are drawn "
        "per (seed, task, attempt) (`bench/wsgi.py: PlannedWork, PlannedJitter`), so both designs run exactly "
        "the same tasks and the lower bound is known in advance. Makespan: first `created_at` to last "
        "`finished_at`. Utilisation = planned work / (workers x makespan); worker busy = the service's "
        "`workerpool_attempt_duration_seconds_sum` / (workers x makespan), which for the reference includes "
        "the backoff it sleeps."
    )
    if mismatches:
        text += "\n\n" + "\n".join(f"- {m}" for m in mismatches)
    else:
        text += " Every task ended in the planned state (and, for the service, after the planned attempts)."
    text += (
        "\n\n**Ideal scheduler**: the same planned tasks replayed through a zero-overhead simulation of each "
        "design (`Plan.simulate`): all tasks present at time 0, a due retry goes to the front of the queue as "
        "in `WorkerPool.release_due_retries`. It separates the cost of the scheduling policy (ideal / lower "
        "bound) from the cost of the implementation (makespan / ideal). The lower bound assumes a clairvoyant "
        "scheduler that starts the tasks destined to fail first; an online scheduler cannot know them, so a task "
        "failing near the end of the batch still adds its backoffs after everything else is done. What-if, same "
        f"simulation with a due retry sent to the *back* of the queue: ideal / lower bound {what_if.fmt('.3f')}."
    )
    run.sections["2. Pool efficiency under failures"] = text
