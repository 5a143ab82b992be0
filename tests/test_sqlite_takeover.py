"""New processes take over from old ones on one SQLite file, under load: nothing accepted is lost.

Real gunicorn, real signals: a reload (``HUP``), a binary upgrade (``USR2``,
then ``WINCH`` and ``QUIT`` or ``TERM`` to the old master) and a rolling
restart of two services sharing a port (``--reuse-port``). Client threads
send ``POST /enqueue`` all along, each on a new connection; every request
that did not get a ``202`` is counted and must be none (but for what the
kernel resets in the rolling restart, see there), and every accepted id must
be readable and final afterwards. Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, wait_until, worker_pids
from traffic import connection_failure

pytestmark = pytest.mark.e2e

# The console script, as in production: a binary upgrade re-runs the command line, and
# `python -m gunicorn` would then start the gunicorn package's __main__.py as a script,
# whose directory (with gunicorn's own `http` package) shadows the standard library's.
GUNICORN = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py"]
FINAL = {"done", "failed", "cancelled"}
SENDERS = 4
_MIGRATE = Path("/proc/sys/net/ipv4/tcp_migrate_req")  # Linux 5.14+
MIGRATE_REQ = _MIGRATE.read_text().strip() if _MIGRATE.exists() else "absent"
# Short attempts, a queue that never fills: every refusal is the takeover's.
SETTINGS = {
    "WORKERS": "2",
    "QUEUE_SIZE": "100000",
    "WORK_MIN_MS": "1",
    "WORK_MAX_MS": "5",
    "FAILURE_RATE": "0.2",
    "BACKOFF_BASE_MS": "10",
    "BACKOFF_CAP_MS": "50",
    "SHUTDOWN_TIMEOUT_S": "10",
}


class Load:
    """``SENDERS`` threads sending ``POST /enqueue`` to ``port``, a new connection per request, until ``stop``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._ids = itertools.count()
        self._lock = threading.Lock()  # must be held while changing accepted or failures
        self.accepted: list[str] = []
        self.failures: Counter[str] = Counter()  # what the requests that got no 202 got instead
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(SENDERS)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        client = Client(self.port)
        while not self._stop.is_set():
            task_id = f"t{next(self._ids)}"
            body = json.dumps({"id": task_id, "payload": "p", "max_retries": 2}).encode()
            try:
                status, _, text = client.request("POST", "/enqueue", body)
                outcome = str(status) if status == 202 else f"{status} {text[:80]}"
            except OSError as exc:
                outcome = connection_failure(exc)
            with self._lock:
                if outcome == "202":
                    self.accepted.append(task_id)
                else:
                    self.failures[outcome] += 1

    def go_on(self, tasks: int = 20) -> None:
        """Wait until ``tasks`` more tasks were accepted."""
        count = len(self.accepted)
        wait_until(lambda: len(self.accepted) >= count + tasks, timeout=30, what=f"{tasks} more accepted tasks")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self._threads), "a sender is stuck"


def check_every_task_final(port: int, accepted: list[str]) -> Counter[str]:
    client = Client(port)

    def states() -> Counter[str] | None:
        found: Counter[str] = Counter()
        for task_id in accepted:
            status, task = client.json("GET", f"/tasks/{task_id}")
            assert status == 200, (task_id, status, task)  # accepted means known, whoever accepted it
            assert 1 <= task["attempts"] <= task["max_retries"] + 1 or task["state"] == "queued", task
            found[task["state"]] += 1
        return found if set(found) <= FINAL else None

    return wait_until(states, timeout=90, what="every accepted task to end", interval=0.2)  # type: ignore[return-value]


def start(tmp_path: Path, name: str, *args: str, **env: str) -> ServerProcess:
    return ServerProcess(
        [*GUNICORN, *args],
        python=False,
        log_path=tmp_path / f"{name}.log",
        env=clean_environment(STORE=f"sqlite://{tmp_path / 'tasks.db'}", **SETTINGS, **env),
    )


def report(what: str, load: Load, states: Counter[str]) -> None:
    print(
        f"\n{what}: {len(load.accepted)} accepted, {dict(states)}; "
        f"{sum(load.failures.values())} requests failed {dict(load.failures)}"
    )


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group a test started (its session: nothing else)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_under_load_refuses_no_request_and_keeps_every_task(tmp_path, workers):
    server = start(tmp_path, "reload", "-b", "127.0.0.1:0", "-w", str(workers))
    try:
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: Client(port).request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        load = Load(port)
        try:
            load.go_on()
            old = worker_pids(server.proc.pid)
            os.kill(server.proc.pid, signal.SIGHUP)
            wait_until(
                lambda: len(p := worker_pids(server.proc.pid)) == workers and not p & old,
                timeout=30,
                what="new workers",
            )
            load.go_on()
        finally:
            load.stop()
        states = check_every_task_final(port, load.accepted)
        report(f"HUP, -w {workers}", load, states)
        assert not load.failures
    finally:
        server.stop()


@pytest.mark.parametrize("old_master_signal", ["QUIT", "TERM"])
def test_a_binary_upgrade_under_load_refuses_no_request_and_keeps_every_task(tmp_path, old_master_signal):
    pidfile = tmp_path / "gunicorn.pid"
    server = start(tmp_path, "upgrade", "-b", "127.0.0.1:0", "-w", "2", "-p", str(pidfile), LOG_LEVEL="DEBUG")
    old = server.proc.pid
    try:
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: Client(port).request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        assert int(pidfile.read_text()) == old
        load = Load(port)
        try:
            load.go_on()
            os.kill(old, signal.SIGUSR2)  # a new master (a child of the old one) on the same sockets
            # gunicorn 27 writes the new master's pid to "<pidfile>.2" until the old master is gone.
            new = int(wait_until(lambda: _read(Path(f"{pidfile}.2")), timeout=30, what="the new master's pidfile"))
            assert new != old and int(pidfile.read_text()) == old
            wait_until(lambda: len(worker_pids(new)) == 2, timeout=30, what="the new master's workers")
            load.go_on()
            os.kill(old, signal.SIGWINCH)  # stops the old workers only when daemonized; ignored here
            # Handled before the next signal is sent: a loaded machine may not have run the old master yet.
            wait_until(lambda: "SIGWINCH ignored. Not daemonized" in server.log(), timeout=30, what="WINCH handled")
            load.go_on()
            assert len(worker_pids(old)) == 3, "the old master lost a worker on WINCH"  # 2 workers + the new master
            os.kill(old, getattr(signal, f"SIG{old_master_signal}"))
            assert server.proc.wait(timeout=60) == 0
            # Promoted once its parent is gone: the new master takes the pidfile's name.
            wait_until(lambda: _read(pidfile) == str(new), timeout=30, what="the pidfile to name the new master")
            assert not Path(f"{pidfile}.2").exists()
            load.go_on()
        finally:
            load.stop()
        states = check_every_task_final(port, load.accepted)
        report(f"USR2, WINCH, {old_master_signal}", load, states)
        assert not load.failures
    finally:
        server.stop()
        kill_group(old)  # the new master and its workers, in the old master's process group


def test_a_rolling_restart_of_two_services_on_one_port_refuses_no_request_and_keeps_every_task(tmp_path):
    # Each worker binds the port itself (SO_REUSEPORT); this socket only holds the number the kernel chose.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    servers: list[ServerProcess] = []

    def service(name: str) -> ServerProcess:
        server = start(tmp_path, name, "-b", f"127.0.0.1:{port}", "--reuse-port", "-w", "1")
        servers.append(server)
        wait_until(lambda: "Booting worker" in server.log(), timeout=30, what=f"{name} to boot")
        # Its worker listens once the pool has started (post_worker_init) and the app answers.
        wait_until(lambda: "pool started" in server.log(), timeout=30, what=f"{name}'s pool")
        return server

    try:
        running = [service("a"), service("b")]
        wait_until(lambda: Client(port).request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        load = Load(port)
        try:
            load.go_on()
            for n, old in enumerate(list(running)):
                running.append(service(f"new-{n}"))  # the new one first: the port never lacks a listener
                load.go_on()
                assert old.terminate(timeout=60) == 0
                running.remove(old)
                load.go_on()
        finally:
            load.stop()
        states = check_every_task_final(port, load.accepted)
        report(f"rolling restart of two services (tcp_migrate_req={MIGRATE_REQ})", load, states)
        # The kernel resets the connections still waiting in a closing listener's queue unless it may
        # move them to another listener of the port: they never reached the service (nothing accepted).
        assert set(load.failures) <= ({"reset"} if MIGRATE_REQ != "1" else set()), load.failures
    finally:
        for server in servers:
            server.stop()
        holder.close()


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
