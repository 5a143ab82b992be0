"""Graceful shutdown with real processes and real signals.

Every test starts the service as a subprocess (gunicorn with gunicorn.conf.py,
or ``python app.py``) on 127.0.0.1 port 0, enqueues over real HTTP, signals
it and checks from the log that every task answered 202 reached a final
state before the process exited. gunicorn exits 0 even after SIGKILLing its
worker, so the exit code alone proves nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from http_fixtures import (
    LISTENING,
    PROJECT_ROOT,
    Client,
    ServerProcess,
    clean_environment,
    wait_until,
    worker_pids,
)

from service.lifecycle import ECHO_WINDOW_S

pytestmark = pytest.mark.e2e

FINAL_LINE = re.compile(r"task (\S+) (?:done after|failed after|abandoned at shutdown)")
SUMMARY = re.compile(r"shutdown complete: drained in ([\d.]+) s; (.*); (\d+) abandoned")
GUNICORN = ["-m", "gunicorn", "-c", "gunicorn.conf.py"]
APP = ["app.py"]
TESTS_DIR = Path(__file__).resolve().parent
# The commands on the memory store, and gunicorn on a SQLite file (a fresh one per test).
ON_EVERY_STORE = [(GUNICORN, "memory"), (APP, "memory"), (GUNICORN, "sqlite")]
ON_EVERY_STORE_IDS = ["gunicorn", "app.py", "gunicorn-sqlite"]
FAST_WORK = {"WORK_MIN_MS": "20", "WORK_MAX_MS": "60", "BACKOFF_BASE_MS": "10", "BACKOFF_CAP_MS": "50"}


def store_env(store: str, directory: Path) -> dict[str, str]:
    return {"STORE": f"sqlite://{directory / 'tasks.db'}"} if store == "sqlite" else {}


def pause(seconds: float) -> None:
    """Let ``seconds`` pass (a duration between two signals, not a wait for some other thread)."""
    threading.Event().wait(seconds)


def _accepts(port: int) -> bool:
    with closing(socket.socket()) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _waiting_to_be_accepted(port: int) -> int:
    """How many connections wait in the accept queue of the socket listening on 127.0.0.1 ``port``."""
    local = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[3] == "0A":  # LISTEN: its rx_queue is the accept queue's length
            return int(fields[4].split(":")[1], 16)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


class Service:
    def __init__(self, server: ServerProcess, port: int) -> None:
        self.server = server
        self.port = port

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict, str]:
        return Client(self.port).request(method, path, None if body is None else json.dumps(body).encode())

    def enqueue(self, count: int, prefix: str = "t", max_retries: int = 2) -> list[str]:
        accepted = []
        for n in range(count):
            task_id = f"{prefix}{n}"
            status, _, _ = self.request("POST", "/enqueue", {"id": task_id, "payload": "p", "max_retries": max_retries})
            assert status == 202, status
            accepted.append(task_id)
        return accepted

    def signal(self, signum: int, *, group: bool = False) -> None:
        if group:  # what a terminal's Ctrl-C or systemd does: every process of the group
            os.killpg(self.server.proc.pid, signum)
        else:
            self.server.proc.send_signal(signum)

    def worker(self) -> int:
        """The gunicorn worker's pid."""
        return int(re.search(r"Booting worker with pid: (\d+)", self.server.log()).group(1))

    def last_line(self) -> str:
        return self.server.log().strip().splitlines()[-1]

    def wait_exit(self, timeout: float) -> tuple[int, float]:
        started = time.monotonic()
        code = self.server.proc.wait(timeout=timeout)
        return code, time.monotonic() - started

    def wait_exit_after(self, signum: int, timeout: float) -> tuple[int, float]:
        self.signal(signum)
        return self.wait_exit(timeout)

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> None:
        wait_until(lambda: re.search(pattern, self.server.log()), timeout=timeout, what=pattern)

    def finals(self) -> set[str]:
        return set(FINAL_LINE.findall(self.server.log()))

    def summary(self) -> re.Match:
        matches = list(SUMMARY.finditer(self.server.log()))
        assert len(matches) == 1, self.server.log()[-3000:]
        return matches[0]


@pytest.fixture
def start(tmp_path):
    servers: list[ServerProcess] = []

    def start(command: list[str], **env: str) -> Service:
        # DEBUG: a task's final line is the witness that it finished, and a success logs at DEBUG.
        settings = {"HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "DEBUG", "SHUTDOWN_TIMEOUT_S": "15", **FAST_WORK}
        settings.update(env)
        server = ServerProcess(
            command, log_path=tmp_path / f"server{len(servers)}.log", env=clean_environment(**settings)
        )
        servers.append(server)
        port = server.wait_for_port(LISTENING)
        service = Service(server, port)
        wait_until(lambda: service.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        return service

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
@pytest.mark.parametrize(
    "signum, group",
    [(signal.SIGTERM, False), (signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, True)],
    ids=["SIGTERM", "SIGINT", "ctrl-c", "SIGTERM-to-the-group"],
)
def test_a_stop_signal_drains_every_accepted_task(start, command, signum, group):
    service = start(command)
    accepted = service.enqueue(40)
    service.signal(signum, group=group)
    code, _ = service.wait_exit(timeout=30)
    assert code == 0
    assert set(accepted) <= service.finals()
    summary = service.summary()
    assert summary.group(3) == "0"  # nothing abandoned: the deadline was ample
    assert "0 queued, 0 running" in summary.group(2)


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_work_beyond_the_deadline_is_abandoned_and_reported(start, command):
    service = start(command, WORKERS="1", WORK_MIN_MS="300", WORK_MAX_MS="400", SHUTDOWN_TIMEOUT_S="1")
    accepted = service.enqueue(12, max_retries=0)
    service.signal(signal.SIGTERM)
    code, seconds = service.wait_exit(timeout=30)
    assert code == 0
    assert seconds < 1 + 9  # the deadline plus a generous margin for a busy machine (the drain alone: 4 s)
    assert set(accepted) <= service.finals()
    abandoned = int(service.summary().group(3))
    assert 0 < abandoned < len(accepted)
    assert len(re.findall(r"task \S+ abandoned at shutdown", service.server.log())) == abandoned


@pytest.mark.parametrize(
    "command, first, second, group",
    [
        (GUNICORN, signal.SIGTERM, signal.SIGINT, False),  # the arbiter escalates only after a SIGTERM
        (GUNICORN, signal.SIGINT, signal.SIGINT, True),  # Ctrl-C twice
        (APP, signal.SIGTERM, signal.SIGTERM, False),
        (APP, signal.SIGINT, signal.SIGINT, False),
    ],
    ids=["gunicorn-TERM-INT", "gunicorn-ctrl-c-twice", "app.py-TERM-TERM", "app.py-INT-INT"],
)
def test_a_second_signal_stops_waiting(start, command, first, second, group):
    # 20 attempts of 4 s on 2 threads: 40 s to drain them all.
    service = start(command, WORKERS="2", WORK_MIN_MS="4000", WORK_MAX_MS="4000", SHUTDOWN_TIMEOUT_S="60")
    accepted = service.enqueue(20, max_retries=0)
    service.signal(first, group=group)
    service.wait_for_log(rf"received {first.name}")
    pause(ECHO_WINDOW_S + 0.5)  # a later signal, not a copy of the first
    service.signal(second, group=group)
    code, seconds = service.wait_exit(timeout=40)
    assert code == 0
    assert seconds < 20  # far from the 40 s the drain would take
    assert set(accepted) <= service.finals()
    assert int(service.summary().group(3)) > 0


def test_a_second_sigterm_to_the_gunicorn_worker_acts_while_its_exit_hook_waits(start):
    # The worker's main thread leaves its loop at once and waits for the drain
    # in the worker_exit hook: the second SIGTERM must interrupt that wait.
    service = start(GUNICORN, WORKERS="2", WORK_MIN_MS="4000", WORK_MAX_MS="4000", SHUTDOWN_TIMEOUT_S="60")
    accepted = service.enqueue(20, max_retries=0)
    service.signal(signal.SIGTERM)
    service.wait_for_log(r"received SIGTERM")
    pause(ECHO_WINDOW_S + 0.5)
    os.kill(service.worker(), signal.SIGTERM)
    code, seconds = service.wait_exit(timeout=40)
    assert code == 0
    assert seconds < 20
    assert set(accepted) <= service.finals()
    assert int(service.summary().group(3)) > 0
    assert SUMMARY.search(service.last_line())


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_a_half_sent_request_does_not_hold_the_exit_back(start, command):
    service = start(command)  # the drain may take 15 s, gunicorn's graceful_timeout is 20 s
    accepted = service.enqueue(5)
    with socket.create_connection(("127.0.0.1", service.port)) as half_sent:
        half_sent.sendall(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        service.signal(signal.SIGTERM)
        code, seconds = service.wait_exit(timeout=30)
    assert code == 0
    assert seconds < 12  # the drain (well under a second) and about 3 s of grace for open connections
    assert set(accepted) <= service.finals()
    assert SUMMARY.search(service.last_line())  # not "the worker ended without reporting its drain (killed?)"


def test_a_client_that_does_not_read_its_response_does_not_hold_the_exit_back(start):
    # Its write waited out the whole REQUEST_TIMEOUT_S after the stop: with 60 s, until gunicorn killed the worker.
    service = start(
        GUNICORN, REQUEST_TIMEOUT_S="60", MAX_RESULT_BYTES="2000000",
        TASK_HANDLER="faults:returns_a_large_result", PYTHONPATH=str(TESTS_DIR),
    )  # fmt: skip
    big = {f"big{n}" for n in range(8)}  # results of 1 MB each: the listing is twice what the socket buffers hold
    for task_id in big:
        assert service.request("POST", "/enqueue", {"id": task_id, "payload": "1000000"})[0] == 202
    wait_until(lambda: service.finals() >= big, timeout=20, what="the 8 tasks to finish")
    with socket.socket() as reader:
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        reader.settimeout(20)
        reader.connect(("127.0.0.1", service.port))
        reader.sendall(b"GET /tasks?limit=8 HTTP/1.1\r\nHost: a\r\n\r\n")
        assert reader.recv(1, socket.MSG_PEEK) == b"H"  # the response has begun; nothing of it is taken
        service.signal(signal.SIGTERM)
        code, seconds = service.wait_exit(timeout=40)
    assert code == 0
    assert seconds < 12  # the drain (well under a second) and 2 s of grace for the client
    log = service.server.log()
    assert "it took nothing of the response to GET /tasks for 2 s while the worker stops" in log
    assert SUMMARY.search(service.last_line())  # not "the worker ended without reporting its drain (killed?)"


@pytest.mark.parametrize(
    ("command", "store"), [(APP, "memory"), (APP, "sqlite"), (GUNICORN, "sqlite")],
    ids=["app.py", "app.py-sqlite", "gunicorn-sqlite"],
)  # fmt: skip
def test_a_request_still_being_sent_at_the_stop_is_answered(start, command, store, tmp_path):
    # python app.py exited as soon as the drain ended, resetting the connection under the request:
    # its client could not tell whether the task had been taken.
    service = start(command, **store_env(store, tmp_path))
    body = json.dumps({"id": "late", "payload": "p"}).encode()
    with socket.create_connection(("127.0.0.1", service.port), timeout=20) as client:
        client.sendall(b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
        # Taken by the server before the stop: a connection still in the accept queue when the server stops
        # accepting is reset by the kernel, unanswered, whatever the server would give a request being sent.
        wait_until(lambda: _waiting_to_be_accepted(service.port) == 0, timeout=20, what="the connection's accept")
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        # The first line the stop writes, at once: the drain's own lines come later, on another thread, and may
        # come seconds later on a busy machine, past the grace gunicorn's worker counts from the signal.
        service.wait_for_log(r"received SIGTERM")
        # The client is slow: the rest arrives once the stop has been taken.
        if command is APP:  # which closes its listening socket after the drain, and counts its grace from then
            wait_until(lambda: not _accepts(service.port), timeout=20, what="the drain's end")
        else:  # gunicorn's worker gives it STOP_LINGER_S (2 s) counted from the signal: 0.3 s in, or the line's arrival
            pause(max(0.0, signalled + 0.3 - time.monotonic()))
        client.sendall(body[5:])
        answer = client.makefile("rb").readline()
    # A store of this process refuses the task; a shared one takes it for the other processes.
    assert answer.split()[1] == (b"202" if store == "sqlite" else b"503"), answer
    assert service.wait_exit(timeout=30)[0] == 0
    assert SUMMARY.search(service.last_line())


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_a_thread_left_running_by_a_handler_delays_the_exit_a_bounded_time(start, command):
    service = start(command, TASK_HANDLER="faults:leaves_a_thread", PYTHONPATH=str(TESTS_DIR))
    accepted = service.enqueue(3)
    wait_until(lambda: service.finals() >= set(accepted), timeout=20, what="the tasks to finish")
    service.signal(signal.SIGTERM)
    code, seconds = service.wait_exit(timeout=30)
    assert code == 0
    assert seconds < 12  # 3 s for the leftover threads; gunicorn would kill its worker after 20 s
    assert "exiting without waiting for 3 thread(s) still running: left-behind" in service.server.log()
    assert service.summary().group(3) == "0"


@pytest.mark.parametrize(
    "command, handler",
    [(GUNICORN, {}), (APP, {}), (GUNICORN, {"TASK_HANDLER": "faults:leaves_a_thread", "PYTHONPATH": str(TESTS_DIR)})],
    ids=["gunicorn", "app.py", "gunicorn-leftover-threads"],
)
def test_a_stopped_process_leaves_every_task_in_the_sqlite_file_itself(start, tmp_path, command, handler):
    service = start(command, **store_env("sqlite", tmp_path), **handler)
    accepted = service.enqueue(20)
    code, _ = service.wait_exit_after(signal.SIGTERM, timeout=30)
    assert code == 0
    assert not (tmp_path / "tasks.db-wal").exists()  # copied into the file when the process closed it
    copy = tmp_path / "copy.db"
    shutil.copyfile(tmp_path / "tasks.db", copy)  # the file alone, as a plain copy takes it
    with closing(sqlite3.connect(copy)) as conn:
        assert {task_id for (task_id,) in conn.execute("SELECT id FROM tasks")} == set(accepted)


def test_a_further_signal_ends_the_wait_for_leftover_threads(start):
    service = start(APP, TASK_HANDLER="faults:leaves_a_thread", PYTHONPATH=str(TESTS_DIR))
    accepted = service.enqueue(1)
    wait_until(lambda: service.finals() >= set(accepted), timeout=20, what="the task to finish")
    service.signal(signal.SIGTERM)
    service.wait_for_log(r"shutdown complete")
    pause(ECHO_WINDOW_S + 0.5)
    service.signal(signal.SIGTERM)
    code, _ = service.wait_exit(timeout=30)
    assert code == 0
    assert "received SIGTERM again: not waiting for leftover threads" in service.server.log()


def test_gunicorn_says_so_when_its_worker_was_killed_before_reporting(start):
    # The worker is frozen, so gunicorn SIGKILLs it at graceful_timeout and
    # still exits 0: the last log line is then an error, not a summary.
    service = start([*GUNICORN, "--graceful-timeout", "1"])
    service.enqueue(5)
    worker = int(re.search(r"Booting worker with pid: (\d+)", service.server.log()).group(1))
    os.kill(worker, signal.SIGSTOP)
    service.signal(signal.SIGTERM)
    code, _ = service.wait_exit(timeout=30)
    assert code == 0
    last = service.server.log().strip().splitlines()[-1]
    assert "[ERROR] gunicorn.error: the worker ended without reporting its drain" in last
    assert not SUMMARY.search(service.server.log())
    # The drain the command line left (0 s of SHUTDOWN_TIMEOUT_S) was said at the start.
    assert "[WARNING] gunicorn.error: --graceful-timeout 1 leaves the drain 0 s, not SHUTDOWN_TIMEOUT_S=" in (
        service.server.log()
    )


def test_a_worker_retired_by_a_reload_reports_at_once_and_cannot_stand_in_for_a_lost_drain(start):
    service = start([*GUNICORN, "--graceful-timeout", "1"])
    retired = service.worker()
    service.signal(signal.SIGHUP)
    service.wait_for_log(rf"worker \(pid:{retired}\) ended: shutdown complete")
    (worker,) = wait_until(lambda: worker_pids(service.server.proc.pid) - {retired}, timeout=10, what="a new worker")
    service.enqueue(5)
    os.kill(worker, signal.SIGSTOP)  # its drain never ends: gunicorn SIGKILLs it after graceful_timeout
    service.signal(signal.SIGTERM)
    code, _ = service.wait_exit(timeout=30)
    assert code == 0
    last = service.last_line()  # not the retired worker's summary, left over from the reload
    assert "[ERROR] gunicorn.error: the worker ended without reporting its drain (killed?)" in last
    assert last.endswith(f"(pid {worker})")


SLOW_WORK = {"WORKERS": "2", "WORK_MIN_MS": "150", "WORK_MAX_MS": "250"}  # attempts still running at the signal


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGUSR2], ids=["SIGHUP", "SIGUSR2"])
def test_a_reload_or_upgrade_signal_to_the_gunicorn_worker_alone_leaves_it_serving(start, signum):
    # These are the arbiter's signals; reaching the worker (kill <worker pid>) they must not end it undrained.
    service = start(GUNICORN, **SLOW_WORK)
    worker = service.worker()
    accepted = service.enqueue(10)
    os.kill(worker, signum)
    for task_id in accepted:  # the same worker, with its table, still answers
        status, _, _ = service.request("GET", f"/tasks/{task_id}")
        assert status == 200, (task_id, status)
    assert worker_pids(service.server.proc.pid) == {worker}
    code, _ = service.wait_exit_after(signal.SIGTERM, timeout=30)
    assert code == 0
    assert set(accepted) <= service.finals()
    assert service.summary().group(3) == "0"
    assert "without reporting its drain" not in service.server.log()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_hangup_to_the_whole_group_reloads_and_the_old_worker_drains(start, store, tmp_path):
    # What closing the terminal of `make run` sends (and `kill -HUP -<pgid>`, `pkill -HUP gunicorn`).
    service = start(GUNICORN, **SLOW_WORK, **store_env(store, tmp_path))
    old = service.worker()
    accepted = service.enqueue(10)
    service.signal(signal.SIGHUP, group=True)
    service.wait_for_log(rf"worker \(pid:{old}\) ended: |without reporting its drain.*\(pid {old}\)", timeout=30)
    assert re.search(rf"worker \(pid:{old}\) ended: shutdown complete: .*; 0 abandoned", service.server.log())
    assert "without reporting its drain" not in service.server.log()
    if store == "memory":  # the old worker's table is gone with it: its task lines say how each ended
        assert set(accepted) <= service.finals()
        return

    def unfinished() -> list[str]:  # read back from the new worker, which runs what the old one left queued
        states = {task_id: Client(service.port).json("GET", f"/tasks/{task_id}") for task_id in accepted}
        assert all(status == 200 for status, _ in states.values()), states
        return [task_id for task_id, (_, body) in states.items() if body["state"] not in {"done", "failed"}]

    wait_until(lambda: not unfinished(), timeout=20, what="every accepted task to end")


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT], ids=["SIGHUP", "SIGQUIT"])
def test_a_hangup_or_quit_drains_python_app_py(start, signum):
    # SIGQUIT (Ctrl-\) drains under gunicorn; python app.py died at once, its accepted tasks lost.
    service = start(APP, **SLOW_WORK)
    accepted = service.enqueue(10)
    code, _ = service.wait_exit_after(signum, timeout=30)
    assert code == 0
    assert set(accepted) <= service.finals()
    assert service.summary().group(3) == "0"


def test_the_arbiters_other_signals_leave_python_app_py_serving(start):
    # USR1 (logrotate's postrotate) and USR2 killed it at once, its accepted tasks lost; TTIN and TTOU stopped it.
    service = start(APP, **SLOW_WORK)
    accepted = service.enqueue(10)
    for signum in (signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2):
        service.signal(signum)
    service.wait_for_log(r"received SIGUSR2: ignored")  # a stopped process would never write it
    assert "received SIGUSR1: ignored, python app.py has no arbiter to ask" in service.server.log()
    for task_id in accepted:
        status, _, _ = service.request("GET", f"/tasks/{task_id}")
        assert status == 200, (task_id, status)
    code, _ = service.wait_exit_after(signal.SIGTERM, timeout=30)
    assert code == 0
    assert set(accepted) <= service.finals()
    assert service.summary().group(3) == "0"


@pytest.mark.parametrize(("command", "store"), ON_EVERY_STORE, ids=ON_EVERY_STORE_IDS)
def test_the_summary_is_the_last_log_line(start, command, store, tmp_path):
    service = start(command, **store_env(store, tmp_path))
    service.enqueue(5)
    service.signal(signal.SIGTERM)
    assert service.wait_exit(timeout=30)[0] == 0
    assert SUMMARY.search(service.server.log().strip().splitlines()[-1])


@pytest.mark.parametrize(("command", "store"), ON_EVERY_STORE, ids=ON_EVERY_STORE_IDS)
def test_an_enqueue_during_the_drain_is_refused_not_hung(start, command, store, tmp_path):
    slow = {"WORKERS": "1", "WORK_MIN_MS": "200", "WORK_MAX_MS": "200", "SHUTDOWN_TIMEOUT_S": "30"}
    service = start(command, **store_env(store, tmp_path), **slow)
    service.enqueue(10, max_retries=0)
    service.signal(signal.SIGTERM)
    # The drain's first line, written once the pool has closed its admission: "received SIGTERM" comes before
    # the drain begins, and an enqueue right after it could still be taken (202, then run) by a store of this process.
    service.wait_for_log(r"shutdown: ")
    try:
        status, _, body = service.request("POST", "/enqueue", {"id": "late", "payload": ""})
    except (ConnectionRefusedError, ConnectionResetError, http.client.RemoteDisconnected):
        pass  # gunicorn closed its listener: refused at once, which is fine
    else:
        # The stop line is written by another thread than the one that stops accepting: a connection
        # made meanwhile is still served. A store of this process then refuses the task; a shared
        # one takes it and leaves it queued for other processes (the pool claims no more).
        assert status == 503 or (store == "sqlite" and status == 202), body
    code, _ = service.wait_exit(timeout=30)
    assert code == 0
    assert "late" not in service.finals()


@pytest.mark.parametrize(("command", "store"), ON_EVERY_STORE, ids=ON_EVERY_STORE_IDS)
def test_an_idle_service_exits_promptly(start, command, store, tmp_path):
    service = start(command, **store_env(store, tmp_path))
    service.signal(signal.SIGTERM)
    code, seconds = service.wait_exit(timeout=30)
    assert code == 0
    assert seconds < 5  # about a second in practice; `make bench` measures it


def _running(pid: int) -> bool:
    """Whether process ``pid`` still runs (an orphan is not the test's child: it cannot be waited for)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_worker_whose_arbiter_was_killed_drains_reports_and_exits(start, store, tmp_path):
    service = start(GUNICORN, **SLOW_WORK, **store_env(store, tmp_path))
    worker = service.worker()
    try:
        accepted = service.enqueue(20)
        os.kill(service.server.proc.pid, signal.SIGKILL)  # the arbiter alone: nothing signals the worker
        service.server.proc.wait(timeout=10)
        wait_until(lambda: not _running(worker), timeout=30, what="the orphaned worker to exit")
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
    log = service.server.log()
    assert "Parent changed, shutting down" in log
    last = service.last_line()
    assert SUMMARY.search(last) and f"the arbiter was gone: worker pid {worker} stopped by itself" in last, last
    assert service.summary().group(3) == "0"
    if store == "memory":  # it drained as on SIGTERM: every accepted task ran to its end
        assert set(accepted) <= service.finals()
        return
    # A shared store: what the worker left queued is there for the next server to run.
    restarted = start(GUNICORN, **SLOW_WORK, **store_env(store, tmp_path))

    def unfinished() -> list[str]:
        states = {task_id: Client(restarted.port).json("GET", f"/tasks/{task_id}") for task_id in accepted}
        assert all(status == 200 for status, _ in states.values()), states
        return [task_id for task_id, (_, body) in states.items() if body["state"] not in {"done", "failed"}]

    wait_until(lambda: not unfinished(), timeout=30, what="every accepted task to end")
    assert " lost: " not in restarted.server.log()  # no attempt was counted lost, whatever the reason


def test_a_worker_whose_arbiter_is_killed_during_its_drain_logs_the_summary_itself(start):
    # SIGTERM, then SIGKILL of the arbiter alone while the worker drains (supervisord's stopwaitsecs): the
    # summary went to the dead arbiter's pipe and no line said what became of the accepted tasks.
    service = start(GUNICORN, WORKERS="2", WORK_MIN_MS="1500", WORK_MAX_MS="1500", FAILURE_RATE="0")
    worker = service.worker()
    try:
        accepted = service.enqueue(4)
        service.signal(signal.SIGTERM)
        service.wait_for_log(r"received SIGTERM")
        os.kill(service.server.proc.pid, signal.SIGKILL)
        service.server.proc.wait(timeout=10)
        wait_until(lambda: not _running(worker), timeout=30, what="the orphaned worker to exit")
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
    last = service.last_line()
    assert SUMMARY.search(last) and f"the arbiter was gone: worker pid {worker} stopped by itself" in last, last
    assert set(accepted) <= service.finals()


def test_a_worker_draining_since_its_arbiter_died_takes_its_first_stop_signal_as_the_first(start):
    # The drain began without a signal; the operator's first SIGTERM (systemctl stop, kill -TERM -<pgid>) was
    # taken for a second one: the running attempts failed "abandoned at shutdown" at once, retries left or not.
    service = start(GUNICORN, WORKERS="2", WORK_MIN_MS="4000", WORK_MAX_MS="4000", FAILURE_RATE="0")
    worker = service.worker()
    try:
        accepted = service.enqueue(2, max_retries=3)
        running = lambda: Client(service.port).json("GET", "/tasks?state=running")[1]["tasks"]  # noqa: E731
        wait_until(lambda: len(running()) == 2, timeout=20, what="two running attempts")
        os.kill(service.server.proc.pid, signal.SIGKILL)  # the arbiter alone
        service.server.proc.wait(timeout=10)
        service.wait_for_log(r"received a stop request")
        pause(ECHO_WINDOW_S + 0.5)
        os.kill(worker, signal.SIGTERM)
        wait_until(lambda: not _running(worker), timeout=30, what="the orphaned worker to exit")
    finally:
        if _running(worker):
            os.kill(worker, signal.SIGKILL)
    log = service.server.log()
    assert "SIGTERM again" not in log and "abandoned at shutdown" not in log
    assert "received SIGTERM: already draining" in log
    assert set(accepted) <= service.finals()
    assert service.summary().group(3) == "0"


DOCKERFILE = (PROJECT_ROOT / "Dockerfile").read_text().splitlines()


def _dockerfile_cmd() -> list[str]:
    for line in DOCKERFILE:
        if line.startswith("CMD "):
            return json.loads(line[len("CMD ") :])
    raise AssertionError("Dockerfile has no exec-form CMD")


def _dockerfile_healthcheck() -> list[str]:
    for line in DOCKERFILE:
        if line.startswith("HEALTHCHECK ") and " CMD [" in line:
            return json.loads(line.partition(" CMD ")[2])
    raise AssertionError("Dockerfile has no one-line exec-form HEALTHCHECK")


def _lay_out_image(workdir: Path) -> None:
    """Copy what the Dockerfile's COPY lines put in the image's WORKDIR, and nothing else."""
    for line in DOCKERFILE:
        if not line.startswith("COPY "):
            continue
        *sources, target = line.split()[1:]
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(PROJECT_ROOT / source, workdir / target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                assert target in (".", "./"), line
                shutil.copy2(PROJECT_ROOT / source, workdir / source)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--pid", "--fork", "--mount-proc", "true"]
    return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0


def test_the_container_command_drains_as_pid_1(tmp_path):
    if not _unshare_works():
        pytest.skip("unshare --pid --fork --mount-proc is not permitted here (needs root or user namespaces)")
    command = _dockerfile_cmd()
    assert command == ["python", "run_gunicorn.py"]  # which becomes gunicorn, with the same pid
    workdir = tmp_path / "app"  # the image's files only: no .env, no tests
    workdir.mkdir()
    _lay_out_image(workdir)
    # DEBUG: the final lines of successes witness that the tasks finished.
    env = clean_environment(HOST="127.0.0.1", PORT="0", LOG_LEVEL="DEBUG", SHUTDOWN_TIMEOUT_S="15", **FAST_WORK)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    server = ServerProcess(
        ["unshare", "--pid", "--fork", "--mount-proc", *command],
        log_path=tmp_path / "pid1.log",
        env=env,
        python=False,
        cwd=workdir,
    )
    try:
        service = Service(server, server.wait_for_port(LISTENING))
        wait_until(lambda: service.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        status, _, body = service.request("GET", "/openapi.json")  # openapi.yaml is in the image
        assert status == 200, body
        healthcheck = _dockerfile_healthcheck()  # its script is in the image, and finds the server
        assert healthcheck[0] == "python"
        env_of_the_check = {**env, "PORT": str(service.port)}
        probe = subprocess.run(
            [sys.executable, *healthcheck[1:]], cwd=workdir, env=env_of_the_check, capture_output=True, timeout=30
        )
        assert probe.returncode == 0, probe.stderr
        accepted = service.enqueue(30)
        unshare = server.proc.pid
        children = Path(f"/proc/{unshare}/task/{unshare}/children").read_text().split()
        assert len(children) == 1
        gunicorn = int(children[0])
        # NSpid lists its pid in each namespace: the last one, its own, is 1.
        assert re.search(r"NSpid:\s+\d+\s+1\n", Path(f"/proc/{gunicorn}/status").read_text())
        os.kill(gunicorn, signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        assert set(accepted) <= service.finals()
        assert service.summary().group(3) == "0"
    finally:
        server.stop()


# A TASK_HANDLER module whose import, during the server's start, waits for a file that never comes.
START_GATE = """
import os, time
from pathlib import Path
gate = Path(os.environ["START_GATE"])
(gate / "reached").touch()
while not (gate / "open").exists():
    time.sleep(0.01)
def handle(task, cancel):
    return None
"""


def test_a_stop_signal_during_the_start_ends_it_before_serving_even_as_pid_1(tmp_path):
    # As PID 1 the kernel drops a signal that has no handler: the start went on and the server served.
    pid_1 = _unshare_works()
    (tmp_path / "startgate.py").write_text(START_GATE)
    env = clean_environment(
        HOST="127.0.0.1", PORT="0", PYTHONPATH=str(tmp_path), TASK_HANDLER="startgate:handle", START_GATE=str(tmp_path)
    )
    gunicorn = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py"]
    command = ["unshare", "--pid", "--fork", "--mount-proc", *gunicorn] if pid_1 else gunicorn
    server = ServerProcess(command, log_path=tmp_path / "start.log", env=env, python=False)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=20, what="the start to import TASK_HANDLER")
        if pid_1:
            (arbiter,) = worker_pids(server.proc.pid)  # unshare's one child
            assert re.search(r"NSpid:\s+\d+\s+1\n", Path(f"/proc/{arbiter}/status").read_text())
        else:
            arbiter = server.proc.pid
        os.kill(arbiter, signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        log = server.log()
        assert "received SIGTERM while starting: stopped before serving" in log, log
        assert "Listening at" not in log, log
    finally:
        (tmp_path / "open").touch()
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_stop_signal_during_the_start_of_python_app_py_ends_it_in_one_line(tmp_path, signum):
    # A Ctrl-C ended it in a KeyboardInterrupt traceback (or a TASK_HANDLER error), a SIGTERM without a word.
    (tmp_path / "startgate.py").write_text(START_GATE)
    env = clean_environment(
        HOST="127.0.0.1", PORT="0", PYTHONPATH=str(tmp_path), TASK_HANDLER="startgate:handle", START_GATE=str(tmp_path)
    )
    server = ServerProcess(APP, log_path=tmp_path / "start.log", env=env)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=20, what="the start to import TASK_HANDLER")
        server.proc.send_signal(signum)
        assert server.proc.wait(timeout=20) == 0
        log = server.log()
        assert log.strip().splitlines()[-1].endswith(f"received {signum.name} while starting: stopped before serving")
        assert "Traceback" not in log and "Listening at" not in log, log
    finally:
        (tmp_path / "open").touch()
        server.stop()


# Code put at a point of a copy of the project's files, where the start then waits for a file: a slow import there.
SLOW_POINT = """import os as _os, time as _time
open(_os.path.join(_os.environ["START_GATE"], "reached"), "w").close()
while not _os.path.exists(_os.path.join(_os.environ["START_GATE"], "open")):
    _time.sleep(0.01)
"""


def _slowed_at(workdir: Path, name: str, before: str) -> None:
    source = (workdir / name).read_text()
    assert before in source, before
    (workdir / name).write_text(source.replace(before, SLOW_POINT + before, 1))


@pytest.mark.parametrize(
    "command, slowed, before",
    [
        # gunicorn loading itself before it reads gunicorn.conf.py (run_gunicorn.py has become gunicorn by then)
        (["run_gunicorn.py"], "gunicorn.conf.py", "import functools\n"),
        (APP, "app.py", "import argparse\n"),  # the imports of python app.py
    ],
    ids=["run_gunicorn.py", "python app.py"],
)
def test_a_ctrl_c_before_the_start_handles_signals_ends_it_in_the_one_line(tmp_path, command, slowed, before):
    """A Ctrl-C while `make run` or `python app.py` imported its modules was a KeyboardInterrupt traceback."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    _lay_out_image(workdir)
    _slowed_at(workdir, slowed, before)
    env = clean_environment(HOST="127.0.0.1", PORT="0", START_GATE=str(tmp_path))
    server = ServerProcess(command, log_path=tmp_path / "start.log", env=env, cwd=workdir)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=30, what="the start to reach the slow import")
        server.proc.send_signal(signal.SIGINT)
        (tmp_path / "open").touch()
        assert server.proc.wait(timeout=30) == 0, server.log()
        log = server.log()
        assert log.strip().splitlines() == ["received SIGINT while starting: stopped before serving"], log
    finally:
        (tmp_path / "open").touch()
        server.stop()


def test_the_signals_python_app_py_ignores_are_held_through_its_imports(tmp_path):
    """A USR1 (logrotate racing a restart) or USR2 while `python app.py` imported its modules killed it without a
    line, and a TTIN or TTOU froze it: only the stop signals were held."""
    workdir = tmp_path / "app"
    workdir.mkdir()
    _lay_out_image(workdir)
    _slowed_at(workdir, "app.py", "import argparse\n")
    env = clean_environment(HOST="127.0.0.1", PORT="0", START_GATE=str(tmp_path))
    server = ServerProcess(APP, log_path=tmp_path / "start.log", env=env, cwd=workdir)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=30, what="the start to reach the slow import")
        for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU):
            server.proc.send_signal(signum)
        (tmp_path / "open").touch()
        wait_until(lambda: "Listening at" in server.log() or server.proc.poll() is not None, timeout=30, what="serving")
        assert server.proc.poll() is None, server.log()
        wait_until(lambda: "received SIGUSR2: ignored" in server.log(), timeout=20, what="the SIGUSR2 line")
        assert "received SIGUSR1: ignored, python app.py has no arbiter to ask" in server.log()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0, server.log()
        assert "Traceback" not in server.log()
    finally:
        (tmp_path / "open").touch()
        server.stop()


@pytest.mark.parametrize(
    "argv, names_one",
    [
        (["-b", "127.0.0.1:0", "-w", "2", "--access-logfile", "-"], False),
        (["--chdir", "/srv", "--certfile=x.pem", "--capture-output", "--", "-c"], False),
        (["-c", "other.py"], True),
        (["-cother.py"], True),
        (["-Dc", "other.py"], True),
        (["--config", "other.py"], True),
        (["--conf=other.py"], True),
    ],
)
def test_run_gunicorn_holds_no_signal_for_a_config_file_that_would_not_let_them_through(argv, names_one):
    import run_gunicorn

    assert run_gunicorn.names_another_config_file(argv) is names_one


def test_a_stop_during_the_start_is_said_in_one_json_line_with_log_format_json(tmp_path):
    """Its line was plain text where every other line was JSON."""
    (tmp_path / "startgate.py").write_text(START_GATE)
    env = clean_environment(
        HOST="127.0.0.1", PORT="0", PYTHONPATH=str(tmp_path), TASK_HANDLER="startgate:handle",
        START_GATE=str(tmp_path), LOG_FORMAT="json",
    )  # fmt: skip
    gunicorn = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py"]
    server = ServerProcess(gunicorn, log_path=tmp_path / "start.log", env=env, python=False)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=20, what="the start to import TASK_HANDLER")
        os.kill(server.proc.pid, signal.SIGHUP)
        wait_until(lambda: "SIGHUP" in server.log(), timeout=20, what="the SIGHUP line")
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=20) == 0
        lines = [json.loads(line) for line in server.log().splitlines()]
        assert [(line["level"], line["message"]) for line in lines] == [
            ("WARNING", "received SIGHUP while starting: ignored, the server is not running yet"),
            ("INFO", "received SIGTERM while starting: stopped before serving"),
        ]
    finally:
        (tmp_path / "open").touch()
        server.stop()


def test_a_reload_or_scaling_signal_during_the_start_is_ignored_with_a_line(tmp_path):
    """HUP (systemctl reload, logrotate), USR1 or USR2 during the start ended it without a word (exit 129...),
    and TTIN or TTOU froze it until a SIGCONT."""
    (tmp_path / "startgate.py").write_text(START_GATE)
    env = clean_environment(
        HOST="127.0.0.1", PORT="0", PYTHONPATH=str(tmp_path), TASK_HANDLER="startgate:handle", START_GATE=str(tmp_path)
    )
    gunicorn = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py"]
    server = ServerProcess(gunicorn, log_path=tmp_path / "start.log", env=env, python=False)
    try:
        wait_until(lambda: (tmp_path / "reached").exists(), timeout=20, what="the start to import TASK_HANDLER")
        names = ("SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTTIN", "SIGTTOU")
        for name in names:
            os.kill(server.proc.pid, getattr(signal, name))
            line = f"received {name} while starting: ignored, the server is not running yet"
            wait_until(lambda line=line: line in server.log(), timeout=20, what=line)
        assert server.proc.poll() is None
        (tmp_path / "open").touch()
        wait_until(lambda: "Listening at" in server.log(), timeout=30, what="the server to listen")
        os.kill(server.proc.pid, signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
    finally:
        (tmp_path / "open").touch()
        server.stop()


def test_app_py_exits_with_status_1_when_its_drain_fails(start):
    # Its only way out of serving was the drain's report, skipped without a summary: /healthz went on answering
    # and later stop signals were ignored, until a SIGKILL.
    script = (
        "import sys, app, workerpool\n"
        "def broken(self, *args, **kwargs):\n"
        "    raise RuntimeError('the store broke')\n"
        "workerpool.WorkerPool.shutdown = broken\n"
        "app.main(sys.argv[1:])\n"
    )
    service = start(["-c", script])
    code, _ = service.wait_exit_after(signal.SIGTERM, timeout=20)
    assert code == 1
    log = service.server.log()
    assert "the drain failed" in log and "RuntimeError: the store broke" in log
    assert "shutdown failed: the drain did not complete" in service.last_line()


def test_a_server_without_hooks_still_drains_at_exit(tmp_path):
    script = (
        "from app import configure_logging, create_app\n"
        "configure_logging('DEBUG')\n"  # a success's final line is a DEBUG one
        "client = create_app().test_client()\n"
        "for n in range(5):\n"
        "    assert client.post('/enqueue', json={'id': f'x{n}', 'payload': ''}).status_code == 202\n"
    )
    env = clean_environment(**FAST_WORK, SHUTDOWN_TIMEOUT_S="15")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert set(FINAL_LINE.findall(result.stderr)) == {f"x{n}" for n in range(5)}
    assert "shutdown complete" in result.stderr
