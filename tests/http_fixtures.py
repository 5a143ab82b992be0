"""Helpers for the HTTP tests: controllable handlers, an app on an injected pool, a real server process."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from doubles import WAIT_S, Gate, failing, instant, wait_until  # noqa: F401  (re-exported)
from flask import Flask
from flask.testing import FlaskClient

from app import create_app
from config import VARIABLES, Config
from service.metrics import Metrics
from workerpool import FINAL_STATES, PermanentFailure, PoolObserver, Task, WorkerPool
from workerpool.stores.sqlite import SqliteStore

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LISTENING = r"Listening at: http://127\.0\.0\.1:(\d+)"  # logged by gunicorn and by `python app.py`
EPOCH = 1_800_000_000.125  # 2027-01-15T08:00:00.125Z


def failing_permanently(task: Task, cancel: threading.Event) -> None:
    raise PermanentFailure("bad payload")


class FinalStates(PoolObserver):
    """Lets a test wait until given tasks are final."""

    def __init__(self) -> None:
        self._final: dict[str, Task] = {}
        self._changed = threading.Condition()

    def attempt_finished(self, task: Task, seconds: float) -> None:
        if task.state in FINAL_STATES:
            with self._changed:
                self._final[task.id] = task
                self._changed.notify_all()

    def wait(self, *task_ids: str) -> None:
        with self._changed:
            done = self._changed.wait_for(lambda: all(t in self._final for t in task_ids), WAIT_S)
        assert done, f"tasks not final: {sorted(set(task_ids) - set(self._final))}"


@dataclass
class Harness:
    """An app on a pool built by the test, with the pool's attempt metrics wired."""

    app: Flask
    pool: WorkerPool
    metrics: Metrics
    final: FinalStates
    client: FlaskClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = self.app.test_client()

    def drain(self) -> None:
        """Finish every queued task and stop the pool (bounded; raises if it takes too long)."""
        if self.pool.store.shared:  # a shared store's pool stops claiming at shutdown: finish first
            wait_until(lambda: not self.pool.store.unfinished(), timeout=WAIT_S, what="every task to finish")
        summary = self.pool.shutdown(WAIT_S)
        assert summary is not None
        assert not summary.abandoned


TEST_CONFIG = Config(max_body_bytes=1024, max_payload_chars=512, default_max_retries=2, max_retries_limit=5)


@dataclass
class HarnessStore:
    """Where ``make_harness`` keeps tasks: the memory store, or SQLite files under ``directory``."""

    directory: Path | None = None


# Set by the ``harness_store`` fixture (tests/conftest.py) for modules that run on every store.
HARNESS_STORE = HarnessStore()


def _sliced_wait(event: threading.Event, timeout: float | None) -> bool:
    """``event.wait`` in slices of at most 50 ms: a spurious False return, as the pool allows."""
    return event.wait(0.05 if timeout is None else min(timeout, 0.05))


def make_harness(
    handler: Callable[[Task, threading.Event], None] = instant,
    *,
    config: Config = TEST_CONFIG,
    clock: Callable[[], float] = time.time,
    **pool_options: object,
) -> Harness:
    metrics = Metrics()
    final = FinalStates()
    options: dict[str, object] = {"workers": 1, "queue_size": 4, "backoff_base": 0.0, "backoff_cap": 0.0}
    options.update(pool_options)
    if HARNESS_STORE.directory is not None and "store" not in options:
        options["store"] = SqliteStore(
            Path(tempfile.mkdtemp(dir=HARNESS_STORE.directory)) / "tasks.db",
            capacity=options["queue_size"],  # type: ignore[arg-type]
            ttl=options.get("state_ttl", 3600.0),  # type: ignore[arg-type]
            max_finished=options.get("state_max_tasks", 100_000),  # type: ignore[arg-type]
            clock=clock,
        )
        # The lease keeper sleeps a third of the lease between renewals, and
        # shutdown waits up to a second for it: slices keep each test short.
        options.setdefault("wait", _sliced_wait)
    pool = WorkerPool(handler, clock=clock, observers=[metrics, final], **options)  # type: ignore[arg-type]
    return Harness(create_app(config, pool=pool, metrics=metrics), pool, metrics, final)


def worker_pids(arbiter: int) -> set[int]:
    """The pids of a gunicorn arbiter's children (its workers, and a new arbiter during a binary upgrade)."""
    children = Path(f"/proc/{arbiter}/task/{arbiter}/children")
    return {int(pid) for pid in children.read_text().split()} if children.exists() else set()


def clean_environment(**overrides: str) -> dict[str, str]:
    """The current environment without any service variable, plus ``overrides``."""
    env = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    env.update(overrides)
    return env


# Whether the test being set up or run is marked e2e (tests/conftest.py sets it before its fixtures): a server
# process started by one that is not would run under `pytest -m "not e2e"`, which promises none.
RUNNING_E2E = True


# The signals a server acts on. One the test runner ignores (`nohup make test` ignores SIGHUP) would be
# inherited ignored, and the server keeps an inherited ignore on purpose; systemd and docker start a service
# with them all at their default actions, and so do the tests.
_SERVER_SIGNALS = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2,
                   signal.SIGTTIN, signal.SIGTTOU)  # fmt: skip


@contextmanager
def _server_signals_at_default():
    """Set the server signals this process ignores to their default actions while a server process starts."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works on the main thread only
        yield
        return
    ignored = [number for number in _SERVER_SIGNALS if signal.getsignal(number) == signal.SIG_IGN]
    for number in ignored:
        signal.signal(number, signal.SIG_DFL)
    try:
        yield
    finally:
        for number in ignored:
            signal.signal(number, signal.SIG_IGN)


class ServerProcess:
    """A server started as a subprocess with its output in a log file; always killed in ``stop``."""

    def __init__(
        self, args: list[str], *, log_path: Path, env: dict[str, str], python: bool = True, cwd: Path = PROJECT_ROOT
    ) -> None:
        """Run ``python args...``, or ``args`` as the whole command line if not ``python``."""
        assert RUNNING_E2E, "a test that starts a server process is marked e2e (@pytest.mark.e2e)"
        self.log_path = log_path
        self._log = log_path.open("wb")
        with _server_signals_at_default():
            self.proc = subprocess.Popen(
                [sys.executable, *args] if python else args,
                cwd=cwd,
                # Temporary files in the test's directory: a server killed with SIGKILL cannot remove its own.
                env={"TMPDIR": str(log_path.parent), **env},
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal to the test runner's group must not reach it
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_port(self, pattern: str, timeout: float = 20.0) -> int:
        def port() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            match = re.search(pattern, self.log())
            return int(match.group(1)) if match else None

        return int(wait_until(port, timeout=timeout, what="the server to listen"))  # type: ignore[arg-type]

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the server and its workers only
            self.proc.wait(timeout=10)
        self._log.close()


class Client:
    def __init__(self, port: int) -> None:
        self.port = port

    def request(self, method: str, path: str, body: bytes | None = None, **kwargs) -> tuple[int, dict, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(method, path, body=body, **kwargs)
            response = connection.getresponse()
            text = response.read().decode()
            return response.status, dict(response.getheaders()), text
        finally:
            connection.close()

    def json(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
        status, _, text = self.request(method, path, body)
        return status, json.loads(text)


def half_closed_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection, end the stream (the client's half-close) and read all that comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received
