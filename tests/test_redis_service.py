"""Several service instances (separate gunicorn processes) on one Redis store, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from http_fixtures import LISTENING, PROJECT_ROOT, Client, ServerProcess, clean_environment, wait_until
from redis_server import running_redis

from workerpool import FINAL_STATES

FINAL = {str(state) for state in FINAL_STATES}


def instance(tmp_path, name: str, url: str, **settings: str) -> ServerProcess:
    return ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / f"{name}.log",
        env=clean_environment(
            STORE=url,
            STORE_PREFIX="service-test",
            WORKERS="2",
            QUEUE_SIZE="100",
            WORK_MIN_MS="1",
            WORK_MAX_MS="5",
            FAILURE_RATE="0.3",
            BACKOFF_BASE_MS="10",
            BACKOFF_CAP_MS="50",
            SHUTDOWN_TIMEOUT_S="5",
            **settings,
        ),
    )


@pytest.mark.e2e
def test_instances_share_one_queue_one_id_space_and_one_view(tmp_path):
    with running_redis(tmp_path) as redis_server:
        servers = [instance(tmp_path, name, redis_server.url) for name in ("a", "b")]
        try:
            a, b = (Client(server.wait_for_port(LISTENING)) for server in servers)
            ids = [f"job-{n}" for n in range(30)]
            for n, task_id in enumerate(ids):
                client = (a, b)[n % 2]
                body = json.dumps({"id": task_id, "payload": {"n": n}, "max_retries": 5}).encode()
                status, task = client.json("POST", "/enqueue", body)
                assert status == 202, task
            status, problem = b.json("POST", "/enqueue", json.dumps({"id": "job-0", "payload": ""}).encode())
            assert status == 409, problem  # admitted by a, refused by b

            def all_final() -> bool:
                return all(a.json("GET", f"/tasks/{task_id}")[1]["state"] in FINAL for task_id in ids)

            wait_until(all_final, timeout=60, what="every task to finish")
            for task_id in ids:
                status_a, seen_by_a = a.json("GET", f"/tasks/{task_id}")
                status_b, seen_by_b = b.json("GET", f"/tasks/{task_id}")
                assert status_a == status_b == 200
                assert seen_by_a == seen_by_b
                assert seen_by_a["attempts"] <= 6
            listing_a = a.json("GET", "/tasks?limit=100")[1]["tasks"]
            listing_b = b.json("GET", "/tasks?limit=100")[1]["tasks"]
            assert [t["id"] for t in listing_a] == [t["id"] for t in listing_b]
            assert sorted(t["id"] for t in listing_a) == sorted(ids)
            health = a.json("GET", "/healthz")[1]
            assert health["queue_capacity"] == 100
            for server in servers:
                assert server.terminate() == 0
        finally:
            for server in servers:
                server.stop()


@pytest.mark.e2e
@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "redis://user:hunter2@127.0.0.1:1/0"], ids=["unreachable", "with-password"]
)
def test_an_unreachable_redis_stops_start_up_with_exit_code_2_and_one_line(url):
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        cwd=PROJECT_ROOT,
        env=clean_environment(STORE=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "STORE cannot be used" in lines[0] and "Connection refused" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("command", ["gunicorn", "python app.py"])
def test_a_password_the_redis_server_does_not_ask_for_is_warned_about_once_and_never_shown(tmp_path, command):
    with running_redis(tmp_path) as redis_server:
        url = f"redis://:hunter2-password@127.0.0.1:{redis_server.port}/0"
        argv = (
            ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
            if command == "gunicorn"
            else ["app.py", "--port", "0"]
        )
        server = ServerProcess(
            argv, log_path=tmp_path / "server.log", env=clean_environment(STORE=url, STORE_PREFIX="password-test")
        )
        try:
            client = Client(server.wait_for_port(LISTENING))
            wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
            log = server.log()
        finally:
            server.stop()
    warnings = [line for line in log.splitlines() if "answers without a password" in line]
    assert warnings == [
        f"warning: STORE: the Redis server at 127.0.0.1:{redis_server.port} answers without a password: the password "
        "given (in STORE or REDIS_PASSWORD) protects nothing; set requirepass (or an ACL user) on the server"
    ]
    assert "hunter2" not in log
