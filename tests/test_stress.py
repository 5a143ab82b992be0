"""Load, soak and fault tests against the real gunicorn server on 127.0.0.1.

Each test starts ``gunicorn -c gunicorn.conf.py -b 127.0.0.1:0`` as in
production, drives it over HTTP and checks what every accepted task became,
from the API and from the JSON log the server wrote. The default variants are
short and run with ``make test``; the variants marked ``stress`` are long and
run only when ``STRESS=1`` is set (``make stress``). Run them with ``-s`` to
see the figures they print; ``STRESS_SEED=<n>`` replays the request mix of a
printed seed.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, wait_until, worker_pids
from traffic import EXPECTED, Outcome, Traffic, tally, unexpected

pytestmark = pytest.mark.e2e

STRESS = os.environ.get("STRESS") == "1"
TESTS_DIR = Path(__file__).resolve().parent
GUNICORN = ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
BOOTING = r"Booting worker with pid: (\d+)"
SUMMARY = re.compile(
    r"shutdown complete: drained in [\d.]+ s; (?P<queued>\d+) queued, (?P<running>\d+) running, "
    r"(?P<done>\d+) done, (?P<failed>\d+) failed, (?P<cancelled>\d+) cancelled; (?P<abandoned>\d+) abandoned"
)
MAX_BODY_BYTES = 1024
# Fast attempts that often fail, short backoffs, a queue small enough to overflow.
STORM = {
    "WORKERS": "2",
    "QUEUE_SIZE": "4",
    "WORK_MIN_MS": "0",
    "WORK_MAX_MS": "5",
    "FAILURE_RATE": "0.3",
    "BACKOFF_BASE_MS": "1",
    "BACKOFF_CAP_MS": "20",
    "MAX_BODY_BYTES": str(MAX_BODY_BYTES),
    "SHUTDOWN_TIMEOUT_S": "10",
}
CLIENTS = 32
SEED = int(os.environ.get("STRESS_SEED", "0")) or random.SystemRandom().randrange(1, 1_000_000)


def long_variant(timeout_s: int) -> list[pytest.MarkDecorator]:
    return [
        pytest.mark.stress,
        pytest.mark.skipif(not STRESS, reason="long variant: runs with STRESS=1 (make stress)"),
        pytest.mark.timeout(timeout_s),
    ]


def pause(seconds: float) -> None:
    """Let load run for ``seconds`` (a duration, not a wait for some other thread)."""
    threading.Event().wait(seconds)


# -- the server -----------------------------------------------------------------


class Gunicorn:
    """A running gunicorn with its worker processes (one unless told), seen from outside."""

    def __init__(self, server: ServerProcess, workers: int = 1) -> None:
        self.server = server
        self.port = server.wait_for_port(LISTENING)
        self.client = Client(self.port)
        wait_until(lambda: self.client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        booted = wait_until(
            lambda: len(found := re.findall(BOOTING, server.log())) >= workers and found, timeout=20, what="workers"
        )
        assert len(booted) == workers, booted
        self.workers = [int(pid) for pid in booted]
        self.worker = self.workers[0]

    # -- the worker process, from /proc

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.worker}/task"))

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.worker}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE).group(1))

    # -- the service, over HTTP

    def health(self) -> dict:
        status, body = self.client.json("GET", "/healthz")
        assert status == 200, body
        return body

    def wait_idle(self, timeout: float) -> None:
        def idle() -> bool:
            health = self.health()
            return health["tasks"]["queued"] == 0 and health["tasks"]["running"] == 0

        wait_until(idle, timeout=timeout, what="every task to finish", interval=0.1)

    def metric(self, sample: str) -> float:
        _, _, text = self.client.request("GET", "/metrics")
        match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
        assert match, f"no {sample} in /metrics"
        return float(match.group(1))

    def states(self, task_ids: list[str], connections: int = 4) -> Counter[str]:
        """The state of each task (or the status when it is not 200), read with ``GET /tasks/<id>``."""
        return Counter(
            body["state"] if status == 200 else str(status)
            for status, body in self.tasks(task_ids, connections).values()
        )

    def tasks(self, task_ids: list[str], connections: int = 4) -> dict[str, tuple[int, dict]]:
        """Each task's status and body, read with ``GET /tasks/<id>`` on a few kept-alive connections."""
        results: list[dict[str, tuple[int, dict]]] = [{} for _ in range(connections)]

        def read(part: list[str], found: dict[str, tuple[int, dict]]) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                for task_id in part:
                    connection.request("GET", f"/tasks/{task_id}")
                    response = connection.getresponse()
                    found[task_id] = (response.status, json.loads(response.read()))
            finally:
                connection.close()

        readers = [
            threading.Thread(target=read, args=(task_ids[n::connections], results[n])) for n in range(connections)
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(60)
        assert not any(r.is_alive() for r in readers), "reading the tasks took over a minute"
        return {task_id: found for part in results for task_id, found in part.items()}

    # -- stopping

    def terminate(self, timeout: float = 30) -> tuple[int, float]:
        """SIGTERM the arbiter; its exit code and how long it took to exit."""
        started = time.monotonic()
        self.server.proc.send_signal(signal.SIGTERM)
        code = self.server.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def records(self) -> list[dict]:
        """The log as JSON objects: every line must be one."""
        records, bad = [], []
        for line in self.server.log().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                bad.append(line)
        assert not bad, f"{len(bad)} log lines are not JSON, e.g. {bad[:3]}"
        return records


@pytest.fixture
def gunicorn(tmp_path):
    servers: list[ServerProcess] = []

    def start(workers: int = 1, **settings: str) -> Gunicorn:
        pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
        env = clean_environment(HOST="127.0.0.1", PORT="0", PYTHONPATH=pythonpath, **settings)
        server = ServerProcess(
            [*GUNICORN, "-w", str(workers)], log_path=tmp_path / f"gunicorn{len(servers)}.log", env=env
        )
        servers.append(server)
        return Gunicorn(server, workers)

    yield start
    for server in servers:
        server.stop()  # SIGKILL to its process group if still running


@pytest.fixture
def storm():
    """Start client threads on a service; they are stopped at the end of the test whatever happens."""
    started: list[Traffic] = []

    def start(service: Gunicorn) -> Traffic:
        traffic = Traffic(service.port, max_body_bytes=MAX_BODY_BYTES, seed=SEED)
        started.append(traffic)
        traffic.start(CLIENTS)
        return traffic

    yield start
    for traffic in started:
        traffic.stop()


# -- the JSON log -----------------------------------------------------------------


@dataclass
class TaskLines:
    """One task's state-change lines, without the ``task <id> `` prefix."""

    queued: int = 0
    retries: list[str] = field(default_factory=list)
    finals: list[str] = field(default_factory=list)


def task_lines(records: list[dict]) -> dict[str, TaskLines]:
    tasks: dict[str, TaskLines] = {}
    for record in records:
        task_id = record.get("task_id")
        if task_id is None or record["logger"] != "workerpool.pool":
            continue
        rest = record["message"].removeprefix(f"task {task_id} ")
        lines = tasks.setdefault(task_id, TaskLines())
        if rest == "queued":
            lines.queued += 1
        elif re.fullmatch(r"attempt \d+ failed \(.*\); retry \d+ of \d+ in [\d.]+ s", rest, re.DOTALL):
            lines.retries.append(rest)
        elif rest.startswith(("done after ", "failed after ")) or rest == "abandoned at shutdown":
            lines.finals.append(rest)
    return tasks


@dataclass(frozen=True)
class Accounting:
    done: int
    failed: int
    abandoned: int
    tasks: dict[str, TaskLines]


def account(records: list[dict], accepted: list[str]) -> Accounting:
    """Check that the log accounts for exactly the accepted tasks, each with one final line, and that the
    arbiter's last line, the drain summary, agrees with those lines."""
    tasks = task_lines(records)
    queued = {task_id for task_id, lines in tasks.items() if lines.queued}
    assert len(accepted) == len(set(accepted)), "an id was answered 202 twice"
    assert queued == set(accepted), (
        f"answered 202 but never queued: {sorted(set(accepted) - queued)[:10]}; "
        f"queued without a 202: {sorted(queued - set(accepted))[:10]}"
    )
    assert all(lines.queued == 1 for lines in tasks.values())
    wrong = {task_id: lines.finals for task_id, lines in tasks.items() if len(lines.finals) != 1}
    assert not wrong, f"{len(wrong)} task(s) without exactly one final line, e.g. {list(wrong.items())[:5]}"
    finals = Counter(lines.finals[0].split(" ", 1)[0] for lines in tasks.values())
    last = records[-1]
    summary = SUMMARY.fullmatch(last["message"])
    assert summary and last["logger"] == "gunicorn.error", f"the last line is not the drain summary: {last}"
    counts = {name: int(value) for name, value in summary.groupdict().items()}
    assert counts == {
        "queued": 0,
        "running": 0,
        "done": finals["done"],
        "failed": finals["failed"] + finals["abandoned"],
        "cancelled": 0,
        "abandoned": finals["abandoned"],
    }, (counts, finals)
    assert len(re.findall(BOOTING, "\n".join(r["message"] for r in records))) == 1, "the worker was replaced"
    return Accounting(finals["done"], finals["failed"], finals["abandoned"], tasks)


def logged_at(records: list[dict], message: str) -> float:
    """When the first line starting with ``message`` was logged, as time.time()."""
    record = next(r for r in records if r["message"].startswith(message))
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def print_tally(title: str, outcomes: list[Outcome]) -> None:
    print(f"\n{title}: {len(outcomes)} requests")
    for kind, results in sorted(tally(outcomes).items()):
        print(f"  {kind:14} {sum(results.values()):6}  {dict(results.most_common())}")


# -- 1. a storm of requests -------------------------------------------------------------


@pytest.mark.parametrize("seconds", [pytest.param(4, id="4s"), pytest.param(60, id="60s", marks=long_variant(600))])
def test_a_storm_of_good_bad_and_broken_requests(gunicorn, storm, seconds):
    service = gunicorn(**STORM, LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    baseline = service.threads()

    started = time.monotonic()
    traffic = storm(service)
    pause(seconds / 2)
    during = service.threads()
    pause(seconds / 2)
    outcomes = traffic.stop()
    elapsed = time.monotonic() - started
    print_tally(f"storm, seed {SEED}, {CLIENTS} clients, {elapsed:.1f} s", outcomes)

    assert service.client.request("GET", "/healthz")[0] == 200
    assert not unexpected(outcomes), unexpected(outcomes)
    assert tally(outcomes)["enqueue"]["503 queue-full"] > 0, "the queue never overflowed: make the load heavier"

    service.wait_idle(timeout=30)
    states = service.states(traffic.accepted)
    never = service.states(random.Random(SEED).sample(traffic.refused, min(300, len(traffic.refused))))
    wait_until(lambda: service.threads() == baseline, timeout=15, what=f"the worker's threads back to {baseline}")
    accepted_total = service.metric("workerpool_tasks_accepted_total")
    final = states["done"] + states["failed"]
    print(
        f"tasks: {len(traffic.accepted)} accepted, {final} final {dict(states)}, {len(traffic.accepted) - final} lost; "
        f"refused ids read back: {dict(never)}; worker threads: {baseline} before, {during} during, back to {baseline}"
    )
    assert final == len(traffic.accepted), states
    assert set(never) <= {"404"}, f"a refused request left a task behind: {never}"
    assert accepted_total == len(traffic.accepted), "the service accepted a task whose 202 no client saw"

    code, _ = service.terminate()
    assert code == 0
    accounting = account(service.records(), traffic.accepted)
    assert accounting.abandoned == 0
    print(f"log: {accounting.done} done, {accounting.failed} failed, {accounting.abandoned} abandoned")


# -- 2. many tasks, bounded memory -------------------------------------------------------


SOAK = {
    "WORKERS": "4",
    "QUEUE_SIZE": "1000",
    "WORK_MIN_MS": "0",
    "WORK_MAX_MS": "0",
    "FAILURE_RATE": "0",
    "STATE_MAX_TASKS": "1000",
    "LOG_LEVEL": "INFO",  # the default: a line per request (a task that succeeds logs at DEBUG)
}
SOAK_TASKS = 200_000
SOAK_CLIENTS = 6
SAMPLE_EVERY = 10_000
RSS_GROWTH_LIMIT_KIB = 8 * 1024


@dataclass
class SoakClients:
    """Threads submitting distinct tasks over kept-alive connections, sampling the worker's RSS as they go."""

    service: Gunicorn
    total: int
    submitted: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (tasks accepted, RSS in KiB)
    resent: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, clients: int) -> None:
        threads = [threading.Thread(target=self._client, args=(n, clients)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(1800)
        assert not any(t.is_alive() for t in threads), "a soak client is stuck"

    def _client(self, first: int, step: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.service.port, timeout=10)
        backoff = threading.Event()  # never set: wait() spaces retries after a 503
        try:
            for n in range(first, self.total, step):
                body = json.dumps({"id": f"soak-{n}", "payload": "p", "max_retries": 0}).encode()
                resent = False
                while True:
                    try:
                        connection.request("POST", "/enqueue", body)
                        response = connection.getresponse()
                        response.read()
                    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                        # The server closed a kept-alive connection: send again on a new one.
                        connection.close()
                        self._count(self.resent, type(exc).__name__)
                        resent = True
                        continue
                    if response.status == 503:
                        self._count(self.resent, "503")
                        backoff.wait(0.005)
                        continue
                    break
                if response.status == 409 and resent:
                    self._count(self.resent, "409 after a resend")  # the first answer was lost, not the task
                elif response.status != 202:
                    self._count(self.unexpected, str(response.status))
                    continue
                self._accepted()
        finally:
            connection.close()

    def _count(self, counter: Counter[str], key: str) -> None:
        with self.lock:
            counter[key] += 1

    def _accepted(self) -> None:
        with self.lock:
            self.submitted += 1
            sample = self.submitted % SAMPLE_EVERY == 0
            count = self.submitted
        if sample:
            rss = self.service.rss_kib()
            with self.lock:
                self.samples.append((count, rss))


@pytest.mark.stress
@pytest.mark.skipif(not STRESS, reason="long: runs with STRESS=1 (make stress)")
@pytest.mark.timeout(1800)
def test_a_long_run_of_tasks_keeps_memory_bounded(gunicorn):
    service = gunicorn(**SOAK)
    threads_before = service.threads()
    clients = SoakClients(service, SOAK_TASKS)
    started = time.monotonic()
    clients.run(SOAK_CLIENTS)
    service.wait_idle(timeout=60)
    seconds = time.monotonic() - started
    final_rss = service.rss_kib()
    done = service.metric('workerpool_tasks_finished_total{state="done"}')
    health = service.health()

    samples = sorted(clients.samples)
    warm = next(rss for count, rss in samples if count >= SOAK_TASKS // 4)
    growth = max(rss for count, rss in samples if count >= SOAK_TASKS // 4) - warm
    print(f"\nsoak: {SOAK_TASKS} tasks in {seconds:.1f} s ({SOAK_TASKS / seconds:.0f} tasks/s), {SOAK_CLIENTS} clients")
    print(f"resent: {dict(clients.resent)}; unexpected: {dict(clients.unexpected)}")
    print("tasks accepted -> worker RSS (MiB): " + ", ".join(f"{c}: {r / 1024:.1f}" for c, r in samples))
    print(
        f"after the drain: {final_rss / 1024:.1f} MiB; growth from 25 %: {growth / 1024:.2f} MiB; "
        f"retained: {health['tasks']}; worker threads {threads_before} -> {service.threads()}"
    )

    assert len(samples) == SOAK_TASKS // SAMPLE_EVERY
    assert growth <= RSS_GROWTH_LIMIT_KIB, f"the worker grew by {growth} KiB after warming up"
    assert not clients.unexpected
    assert clients.submitted == SOAK_TASKS
    assert done == SOAK_TASKS
    assert health["tasks"]["done"] <= int(SOAK["STATE_MAX_TASKS"])
    wait_until(lambda: service.threads() == threads_before, timeout=15, what="the thread baseline")
    code, _ = service.terminate()
    assert code == 0


# -- 3. faulty handlers ---------------------------------------------------------------------


FAULTS = {
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "DEBUG",
    "WORKERS": "2",
    "QUEUE_SIZE": "1000",
    "BACKOFF_BASE_MS": "1",
    "BACKOFF_CAP_MS": "10",
    "MAX_RETRIES_LIMIT": "5",
}
COPIES = [pytest.param(3, id="x3"), pytest.param(100, id="x100", marks=long_variant(300))]


def submit(service: Gunicorn, task_id: str, payload: str, max_retries: int) -> None:
    body = json.dumps({"id": task_id, "payload": payload, "max_retries": max_retries}).encode()
    status, _, text = service.client.request("POST", "/enqueue", body)
    assert status == 202, text


def expected_for_raises(payload: str, max_retries: int) -> tuple[str, int]:
    """The final line and the number of retries of a task run by ``faults.raises``."""
    how, _, count = payload.partition(":")
    if how == "permanent":
        return "failed after 1 attempt(s): PermanentFailure: fault: permanent on attempt 1", 0
    failures = int(count) if how in ("error", "exit") else 0
    if failures <= max_retries:
        return f"done after {failures + 1} attempt(s)", failures
    attempts = max_retries + 1
    error = "RuntimeError: fault: error" if how == "error" else "SystemExit: fault: exit"
    return f"failed after {attempts} attempt(s): {error} on attempt {attempts}", max_retries


RAISES = [
    ("ok", 0),
    ("error:1", 0),
    ("error:1", 1),
    ("error:2", 3),
    ("error:1000", 2),
    ("error:1000", 5),
    ("exit:1", 1),
    ("exit:1000", 1),
    ("permanent", 3),
]


@pytest.mark.parametrize("copies", COPIES)
def test_a_handler_that_raises_fails_or_retries_every_task_as_told(gunicorn, copies):
    service = gunicorn(**FAULTS, TASK_HANDLER="faults:raises")
    plan = {f"r{n}-{i}": (payload, retries) for n in range(copies) for i, (payload, retries) in enumerate(RAISES)}
    for task_id, (payload, retries) in plan.items():
        submit(service, task_id, payload, retries)
    service.wait_idle(timeout=30)
    code, _ = service.terminate()
    assert code == 0

    accounting = account(service.records(), list(plan))
    for task_id, (payload, retries) in plan.items():
        final, retried = expected_for_raises(payload, retries)
        lines = accounting.tasks[task_id]
        assert (lines.finals[0], len(lines.retries)) == (final, retried), (task_id, payload, retries, lines)
    assert accounting.abandoned == 0


@pytest.mark.parametrize("copies", COPIES)
def test_a_handler_result_is_kept_and_one_that_is_not_json_fails_the_task_at_once(gunicorn, copies):
    service = gunicorn(**FAULTS, TASK_HANDLER="faults:returns_garbage")
    # JSON values are results; a coroutine is not.
    returned = {"none": None, "false": None, "zero": None, "dict": None, "coroutine": "coroutine"}
    results = {"none": None, "false": False, "zero": 0, "dict": {"ok": True}, "coroutine": None}
    plan = {f"g{n}-{payload}": payload for n in range(copies) for payload in returned}
    for task_id, payload in plan.items():
        submit(service, task_id, payload, 3)
    service.wait_idle(timeout=30)
    for task_id, payload in plan.items():  # kept as returned, falsy ones too, through the store and the API
        status, _, text = service.client.request("GET", f"/tasks/{task_id}")
        assert status == 200, text
        result = json.loads(text)["result"]
        assert (result, type(result)) == (results[payload], type(results[payload])), (task_id, text)
    code, _ = service.terminate()
    assert code == 0

    accounting = account(service.records(), list(plan))  # also: no stray "never awaited" warning line
    for task_id, payload in plan.items():
        lines = accounting.tasks[task_id]
        type_name = returned[payload]
        final = (
            "done after 1 attempt(s)"
            if type_name is None
            else f"failed after 1 attempt(s): the handler returned a {type_name}: this pool runs plain functions"
        )
        assert (lines.finals, lines.retries) == ([final], []), (task_id, lines)


@pytest.mark.parametrize("copies", COPIES)
def test_a_handler_that_hangs_past_the_deadline_is_abandoned_and_the_process_exits(gunicorn, copies):
    service = gunicorn(**FAULTS, TASK_HANDLER="faults:hangs", SHUTDOWN_TIMEOUT_S="1")
    first = [f"before-{n}" for n in range(copies)]
    hanging = ["hang-1", "hang-2"]  # one per worker thread
    behind = [f"behind-{n}" for n in range(copies)]
    for task_id in first:
        submit(service, task_id, "ok", 0)
    service.wait_idle(timeout=30)
    for task_id in hanging:
        submit(service, task_id, "hang", 0)
    wait_until(lambda: service.health()["tasks"]["running"] == 2, timeout=10, what="both workers to hang")
    for task_id in behind:
        submit(service, task_id, "ok", 0)

    code, _ = service.terminate()
    assert code == 0
    # The 1 s drain (the hanging threads are not waited for past it), then the worker exits by itself and reports its
    # drain: gunicorn did not have to SIGKILL it (graceful_timeout = 1 + 5 s). Its log says which, however
    # slow a loaded machine made the exit.
    assert not Path(f"/proc/{service.worker}").exists(), "the worker process is still there"
    records = service.records()
    killed = [m for r in records if "SIGKILL" in (m := r["message"]) or "without reporting its drain" in m]
    assert not killed, killed
    accounting = account(records, first + hanging + behind)
    finals = {task_id: lines.finals[0] for task_id, lines in accounting.tasks.items()}
    assert {finals[t] for t in first} == {"done after 1 attempt(s)"}
    assert {finals[t] for t in hanging + behind} == {"abandoned at shutdown"}
    assert accounting.abandoned == len(hanging) + len(behind)


# -- 4. SIGTERM in the middle of a storm ---------------------------------------------------------


GONE = frozenset({"refused", "reset", "closed"})  # no listener, or a connection it never accepted
AFTER_SIGNAL = GONE | {"503 shutting-down", "503 draining"}
# What a request sent after admission closed gets, when it reaches the app at all.
ONCE_CLOSED = {kind: GONE | {"503 shutting-down"} for kind in ("enqueue", "duplicate")} | {
    kind: GONE | {"503 draining"} for kind in ("health", "slow_head")
}


@pytest.mark.parametrize("seconds", [pytest.param(1.5, id="1.5s"), pytest.param(20, id="20s", marks=long_variant(300))])
def test_sigterm_during_a_storm_finishes_every_accepted_task(gunicorn, storm, seconds):
    service = gunicorn(**STORM, LOG_FORMAT="json", LOG_LEVEL="DEBUG")
    traffic = storm(service)
    pause(seconds)
    signalled = time.time()
    code, _ = service.terminate()
    exited = time.time()
    wait_until(
        lambda: any(o.started > exited and o.result == "refused" for o in traffic.so_far()),
        timeout=10,
        what="a request after the exit",
    )
    outcomes = traffic.stop()
    print_tally(f"storm, SIGTERM after {seconds} s, seed {SEED}", outcomes)
    print_tally("  of which ended after the signal", [o for o in outcomes if o.ended >= signalled])

    assert code == 0
    records = service.records()
    accounting = account(records, traffic.accepted)
    print(
        f"tasks: {len(traffic.accepted)} accepted; log: {accounting.done} done, {accounting.failed} failed, "
        f"{accounting.abandoned} abandoned"
    )
    assert accounting.abandoned == 0  # attempts of a few ms: the 10 s drain is ample

    before = [o for o in outcomes if o.ended < signalled]
    assert not unexpected(before), unexpected(before)
    after = [o for o in outcomes if o.ended >= signalled]
    after_expected = {kind: results | AFTER_SIGNAL for kind, results in EXPECTED.items()}
    assert not unexpected(after, after_expected), unexpected(after, after_expected)
    closed = logged_at(records, "shutdown: admission closed")
    late = [o for o in outcomes if o.kind in ONCE_CLOSED and o.started > closed]
    assert not unexpected(late, ONCE_CLOSED), unexpected(late, ONCE_CLOSED)
    assert {o.result for o in outcomes if o.started > exited} == {"refused"}


# -- 5. two worker processes on one SQLite file, one of them killed mid-storm ----------------------


def check_final_lines(records: list[dict], tasks: dict[str, dict], killed: int) -> int:
    """Each task's final line is logged at most once, and matches its state; the number without a line.

    A task failed by a lost attempt ends with an "attempt N lost" line. A
    worker killed between committing an attempt's end and logging it leaves
    that task without a line: at most one per worker thread of that process.
    """
    lines = task_lines(records)
    lost = {r["task_id"] for r in records if r.get("task_id") and " lost: " in r["message"]}
    silent = []
    for task_id, task in tasks.items():
        finals = lines[task_id].finals if task_id in lines else []
        assert len(finals) <= 1, (task_id, finals)
        if finals:
            assert finals[0].startswith(f"{task['state']} after {task['attempts']} attempt(s)"), (task, finals)
        elif not (task["state"] == "failed" and task_id in lost and task["last_error"].startswith("lost:")):
            silent.append(task_id)
    assert len(silent) <= killed * int(STORM["WORKERS"]), silent
    return len(silent)


@pytest.mark.parametrize("seconds", [pytest.param(4, id="4s"), pytest.param(60, id="60s", marks=long_variant(600))])
def test_two_workers_on_one_sqlite_file_lose_nothing_when_one_is_killed_mid_storm(gunicorn, storm, tmp_path, seconds):
    service = gunicorn(
        **STORM, workers=2, STORE=f"sqlite://{tmp_path / 'tasks.db'}", LOG_FORMAT="json", LOG_LEVEL="DEBUG"
    )
    arbiter = service.server.proc.pid
    traffic = storm(service)
    pause(seconds / 2)
    victim = random.Random(SEED).choice(service.workers)
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    replaced = wait_until(
        lambda: len(pids := worker_pids(arbiter) - {victim}) == 2 and pids, timeout=20, what="a new worker"
    )
    pause(seconds / 2)
    outcomes = traffic.stop()
    print_tally(f"two workers, one killed after {seconds / 2} s, seed {SEED}", outcomes)

    # Requests the killed process held lose their connection; every other one gets a documented answer.
    held = [o for o in outcomes if o.started <= killed <= o.ended]
    others = [o for o in outcomes if not o.started <= killed <= o.ended]
    assert not unexpected(others), unexpected(others)
    held_expected = {kind: results | GONE | {"cut"} for kind, results in EXPECTED.items()}
    assert not unexpected(held, held_expected), unexpected(held, held_expected)

    service.wait_idle(timeout=60)
    tasks = service.tasks(traffic.accepted)
    assert {status for status, _ in tasks.values()} <= {200}, "an accepted task is unknown"
    bodies = {task_id: body for task_id, (_, body) in tasks.items()}
    wrong = [
        t
        for t in bodies.values()
        if t["state"] not in ("done", "failed") or not 1 <= t["attempts"] <= t["max_retries"] + 1
    ]
    assert not wrong, wrong[:5]
    never = service.states(random.Random(SEED).sample(traffic.refused, min(300, len(traffic.refused))))
    assert set(never) <= {"404"}, f"a refused request left a task behind: {never}"
    unanswered = service.states(traffic.unanswered)  # stored or not: if stored, it ran to the end
    assert set(unanswered) <= {"404", "done", "failed"}, unanswered

    code, _ = service.terminate()
    assert code == 0
    records = service.records()
    queued = {task_id for task_id, lines in task_lines(records).items() if lines.queued}
    assert len(set(traffic.accepted)) == len(traffic.accepted), "an id was answered 202 twice"
    assert set(traffic.accepted) <= queued <= set(traffic.accepted) | set(traffic.unanswered)
    # A task stored by the killed process just before it died may have no "queued" line (its answer was cut).
    twice = {task_id: lines for task_id, lines in task_lines(records).items() if lines.queued > 1}
    assert not twice, [(t, [r["message"] for r in records if r.get("task_id") == t]) for t in twice][:3]
    silent = check_final_lines(records, bodies, killed=1)
    lost = [t for t in bodies.values() if (t["last_error"] or "").startswith("lost:")]
    print(
        f"tasks: {len(bodies)} accepted, all final {dict(Counter(t['state'] for t in bodies.values()))}; "
        f"{len(lost)} with a lost attempt; {len(held)} requests in flight at the kill; "
        f"{len(traffic.unanswered)} enqueues unanswered ({dict(unanswered)}); {silent} final without a log line; "
        f"workers {sorted(service.workers)} -> {sorted(replaced)}"
    )
