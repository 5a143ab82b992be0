"""Redis faults seen from outside: a real gunicorn on a private redis-server that the test stops,
restarts (AOF on), pauses past the socket timeout and fills up (maxmemory).

While Redis cannot take a task, a submission gets a 503 problem document and stores nothing, and
/healthz answers 503 with the reason; once Redis is back, the workers resume on their own and every
task Redis kept ends once, in one attempt.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from pathlib import Path

import pytest
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, wait_until, worker_pids
from redis_server import RedisServer, running_redis

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TESTS_DIR = Path(__file__).resolve().parent
SOCKET_TIMEOUT_S = 5  # the service's Redis socket timeout (workerpool.stores.redis_store.connect)


class Service:
    """One gunicorn instance on ``redis_server``, with the test handlers (``hold`` takes 3 s, ``ok`` none)."""

    def __init__(self, tmp_path: Path, redis_server: RedisServer, shutdown_timeout_s: int = 10) -> None:
        pythonpath = os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))
        self.server = ServerProcess(
            ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
            log_path=tmp_path / "service.log",
            env=clean_environment(
                STORE=redis_server.url,
                PYTHONPATH=pythonpath,
                TASK_HANDLER="faults:flaky_or_holds",
                WORKERS="2",
                QUEUE_SIZE="100",
                SHUTDOWN_TIMEOUT_S=str(shutdown_timeout_s),
            ),
        )
        self.client = Client(self.server.wait_for_port(LISTENING))
        self.wait_healthy()

    def submit(self, task_id: str, payload: str) -> tuple[int, dict, dict]:
        body = json.dumps({"id": task_id, "payload": payload, "max_retries": 0}).encode()
        status, headers, text = self.client.request("POST", "/enqueue", body)
        return status, headers, json.loads(text)

    def health(self) -> tuple[int, dict]:
        return self.client.json("GET", "/healthz")

    def wait_healthy(self) -> None:
        wait_until(lambda: self.health()[0] == 200, timeout=30, what="/healthz to answer 200")

    def wait_running(self, count: int) -> None:
        wait_until(lambda: self.health()[1]["tasks"]["running"] == count, timeout=20, what=f"{count} running")

    def task(self, task_id: str) -> tuple[int, dict]:
        return self.client.json("GET", f"/tasks/{task_id}")

    def wait_done_once(self, task_ids: list[str]) -> None:
        """Each task reaches done in exactly one attempt: none was lost, none ran twice."""

        def final() -> bool:
            def ended(task_id: str) -> bool:
                status, body = self.task(task_id)  # a 503 while connections to a restarted Redis reopen
                return status == 200 and body["state"] in ("done", "failed", "cancelled")

            return all(ended(t) for t in task_ids)

        wait_until(final, timeout=40, what="every task to finish", interval=0.1)
        outcomes = {t: (self.task(t)[1]["state"], self.task(t)[1]["attempts"]) for t in task_ids}
        assert set(outcomes.values()) == {("done", 1)}, outcomes


def assert_refused_unstored(service: Service, task_id: str, status: int, headers: dict, problem: dict) -> None:
    assert status == 503, problem
    assert headers["Content-Type"] == "application/problem+json"
    assert problem["type"].endswith("store-unavailable") and problem["status"] == 503
    assert headers["Retry-After"] == "1"
    service.wait_healthy()
    assert service.task(task_id)[0] == 404  # never a 503 for a task that was stored


@pytest.fixture
def redis_and_service(tmp_path):
    with running_redis(tmp_path) as redis_server:
        service = Service(tmp_path, redis_server)
        try:
            yield redis_server, service
            assert service.server.terminate() == 0
        finally:
            service.server.stop()


def test_a_stopped_redis_gets_503s_and_a_restarted_one_resumes_every_task(redis_and_service):
    redis_server, service = redis_and_service
    held = ["hold-1", "hold-2"]  # one per worker: both end while Redis is down
    for task_id in held:
        assert service.submit(task_id, "hold")[0] == 202
    service.wait_running(2)
    queued = [f"queued-{n}" for n in range(4)]
    for task_id in queued:
        assert service.submit(task_id, "ok")[0] == 202

    redis_server.stop(signal.SIGKILL)
    status, headers, problem = service.submit("during", "ok")
    status_h, health = service.health()
    assert (status_h, health["status"]) == (503, "store_unavailable"), health
    assert "redis" in health["store_error"]
    # The held attempts end now, and their ends wait for Redis.
    wait_until(
        lambda: (
            len(re.findall(r"task hold-\d attempt 1 ended, but the store is unavailable", service.server.log())) >= 2
        ),
        timeout=20,
        what="both held attempts to end while Redis is down",
    )
    redis_server.start()  # same port, same directory: what the AOF kept
    assert_refused_unstored(service, "during", status, headers, problem)
    assert service.submit("after", "ok")[0] == 202
    service.wait_done_once(held + queued + ["after"])


def test_a_reload_while_redis_is_down_keeps_the_server_and_its_new_worker_resumes(redis_and_service):
    """A reload (logrotate, `systemctl reload`) during a Redis restart: the server goes on, as its workers do."""
    redis_server, service = redis_and_service
    arbiter = service.server.proc.pid
    (first,) = worker_pids(arbiter)
    assert service.submit("before", "ok")[0] == 202
    service.wait_done_once(["before"])

    redis_server.stop(signal.SIGKILL)
    os.kill(arbiter, signal.SIGHUP)
    # The new worker starts without reaching Redis, and the old one drains and ends.
    wait_until(lambda: f"worker (pid:{first}) ended" in service.server.log(), timeout=30, what="the old worker's end")
    wait_until(lambda: service.server.log().count("pool started") == 2, timeout=20, what="the new worker's pool")
    assert service.server.proc.poll() is None, service.server.log()
    (second,) = worker_pids(arbiter)
    assert second != first
    status_h, health = service.health()
    assert (status_h, health["status"]) == (503, "store_unavailable"), health

    redis_server.start()  # same port, same directory: what the AOF kept
    service.wait_healthy()
    assert service.submit("after", "ok")[0] == 202
    service.wait_done_once(["before", "after"])
    assert "Traceback" not in service.server.log()


def test_a_redis_slower_than_the_socket_timeout_gets_503s_and_loses_nothing(redis_and_service):
    redis_server, service = redis_and_service
    assert service.submit("held", "hold")[0] == 202
    service.wait_running(1)
    admin = redis_server.client(timeout=SOCKET_TIMEOUT_S * 4)
    # Redis busy for longer than the service waits: the held attempt ends in the middle of it.
    sleeper = threading.Thread(target=admin.execute_command, args=("DEBUG", "SLEEP", SOCKET_TIMEOUT_S + 2))
    sleeper.start()
    try:
        wait_until(lambda: admin_sees_sleep(redis_server), timeout=10, what="Redis to be busy")
        # Both answered after the socket timeout, before the sleep ends.
        submitted: list[tuple[int, dict, dict]] = []
        submitter = threading.Thread(target=lambda: submitted.append(service.submit("during", "ok")))
        submitter.start()
        status_h, health = service.health()
        assert (status_h, health["status"]) == (503, "store_unavailable"), health
        assert "Timeout" in health["store_error"], health
        submitter.join(SOCKET_TIMEOUT_S * 4)
        [(status, headers, problem)] = submitted
    finally:
        sleeper.join(SOCKET_TIMEOUT_S * 4)
    # The submission reached Redis after the sleep, past its deadline: it stored nothing.
    assert_refused_unstored(service, "during", status, headers, problem)
    assert service.submit("after", "ok")[0] == 202
    service.wait_done_once(["held", "after"])


def admin_sees_sleep(redis_server: RedisServer) -> bool:
    """Whether Redis is busy: a PING with a short timeout does not come back."""
    try:
        redis_server.client(timeout=0.2).ping()
    except Exception:
        return True
    return False


def test_a_redis_refusing_writes_gets_503s_and_healthz_says_why(redis_and_service):
    redis_server, service = redis_and_service
    admin = redis_server.client()
    admin.config_set("maxmemory", 1)
    try:
        status, headers, problem = service.submit("full", "ok")
        assert status == 503 and problem["type"].endswith("store-unavailable"), problem
        status_h, health = service.health()
        assert (status_h, health["status"]) == (503, "store_unavailable"), health
        assert "maxmemory" in health["store_error"]
    finally:
        admin.config_set("maxmemory", 0)
    assert_refused_unstored(service, "full", status, headers, problem)
    assert service.submit("after", "ok")[0] == 202
    service.wait_done_once(["after"])


def test_a_drain_holds_its_deadline_on_a_paused_redis_and_says_what_it_left_to_leases(tmp_path):
    # Paused, Redis answers nothing: every step of the service waits out its socket timeout (5 s).
    with running_redis(tmp_path) as redis_server:
        service = Service(tmp_path, redis_server, shutdown_timeout_s=2)  # gunicorn's graceful_timeout: 7 s
        try:
            for task_id in ("hold-1", "hold-2"):
                assert service.submit(task_id, "hold")[0] == 202
            service.wait_running(2)
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                assert service.server.terminate(timeout=20) == 0
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            log = service.server.log()
            assert "ended without reporting its drain" not in log, log
            assert "draining 2 running attempt(s)" in log, log
            summary = re.search(r"shutdown complete: drained in ([\d.]+) s; .*", log)
            assert summary is not None, log
            # The deadline (2 s) and the store's grace (1 s), the join of the threads blocked in it included: never
            # a step's socket timeout (5 s), which a drain waiting for the paused store would take at least. Bound
            # by that alone, not by the 3 s it takes, which a loaded machine overruns without any such wait.
            assert float(summary[1]) < 5, summary[0]
            assert summary[0].endswith(
                "2 running, 0 done, 0 failed, 0 cancelled; 0 abandoned; "
                "2 attempt(s) left to their leases: the store was unavailable"
            ), summary[0]
        finally:
            service.server.stop()
