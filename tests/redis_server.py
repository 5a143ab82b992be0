"""A private redis-server for the tests: a free port, a temporary directory, AOF on, stopped by pid."""

from __future__ import annotations

import atexit
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
from doubles import wait_until

from workerpool.stores.redis_store import connect

START_S = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep its data directory (AOF), as a restart would."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return connect(self.url, timeout=timeout)

    def start(self, *extra: str) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "everysec",
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
                "--enable-debug-command", "local",  # DEBUG SLEEP plays a slow Redis
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=START_S, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(START_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(START_S)
        self.process = None


@contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: `make test` installs it (Debian package redis-server)")
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


_shared: RedisServer | None = None


def shared_server() -> RedisServer:
    """One redis-server for the whole test run, started on first use and killed by pid at exit.

    Stores on it keep apart by a prefix of their own, so no test sees another's keys.
    """
    global _shared
    if _shared is None:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed: `make test` installs it (Debian package redis-server)")
        server = RedisServer(Path(tempfile.mkdtemp(prefix="workerpool-redis-")))
        server.start()
        atexit.register(shutil.rmtree, server.directory, ignore_errors=True)
        atexit.register(server.stop, signal.SIGKILL)
        _shared = server
    return _shared
