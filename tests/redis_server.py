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
PORT_TRIES = 5  # ports tried when the free one picked was taken before redis-server bound it


class NotOurServer(Exception):
    """Our redis-server did not come up on its port: it exited (the port was taken), or another process answers."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process; ``stop``/``start`` keep its data directory (AOF), as a restart would."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        # A port picked here may be taken between free_port() and redis-server binding it (many suites start
        # servers at once): the first start then tries another. A port given, or one a restart keeps, is kept.
        self._port_fixed = port is not None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, timeout: float = 5.0) -> redis.Redis:
        return connect(self.url, timeout=timeout)

    def start(self, *extra: str) -> None:
        """Start redis-server and wait until it answers: it, not another process on its port (whose data the
        tests would change). Raises NotOurServer if it cannot serve on its port."""
        for _ in range(PORT_TRIES):
            try:
                self._start_once(extra)
                self._port_fixed = True  # a restart keeps the port: clients know it
                return
            except NotOurServer:
                self.stop(signal.SIGKILL)
                if self._port_fixed:
                    raise
                self.port = free_port()
        raise NotOurServer(f"redis-server found no free port in {PORT_TRIES} tries")

    def _start_once(self, extra: tuple[str, ...]) -> None:
        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                "--enable-debug-command",
                "local",  # DEBUG SLEEP plays a slow Redis
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=START_S, what=f"redis-server on port {self.port}")

    def _answers(self) -> bool:
        """Whether our redis-server answers; NotOurServer if it exited or another process answers on its port."""
        assert self.process is not None
        if (code := self.process.poll()) is not None:
            raise NotOurServer(f"redis-server exited with {code} (port {self.port} taken?)")
        try:
            info = self.client().info("server")
        except redis.RedisError:
            return False
        if info["process_id"] != self.process.pid:
            raise NotOurServer(f"another redis-server (pid {info['process_id']}) answers on port {self.port}")
        return True

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
