"""Start the service under gunicorn the way `make run` does, on a free port, and stop it by pid."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from config import VARIABLES as SERVICE_VARIABLES

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_WORKER = re.compile(r"Booting worker with pid: (\d+)")


class Server:
    """One gunicorn arbiter (own session) with its log in bench/out/; ``stop`` always kills it."""

    def __init__(
        self,
        name: str,
        *,
        env: dict[str, str],
        app: str | None = None,
        config: str | None = None,
        ready: tuple[str, int] = ("/healthz", 200),
    ) -> None:
        """``ready``: the GET path and status that tell the app is serving."""
        OUT.mkdir(parents=True, exist_ok=True)
        self.ready = ready
        self.env_overrides = {"HOST": "127.0.0.1", "PORT": "0", **env}
        args = list(GUNICORN)
        if config is not None:
            args[args.index("gunicorn.conf.py")] = config
        if app is not None:
            args.append(app)
        self.args = args
        self.log_path = OUT / f"{name}.log"
        self._log = self.log_path.open("wb")
        # The caller's service settings must not leak into a bench run.
        environ = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        environ.update(self.env_overrides)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            args,
            cwd=ROOT,
            env=environ,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.port = 0
        self.worker_pid = 0

    @property
    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env_overrides.items())
        args = ["gunicorn", *self.args[3:]]
        return f"{env} {shlex.join(args)}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0, poll: float = 0.005) -> float:
        """Block until the ``ready`` request answers as expected; return seconds since the process was started."""
        deadline = time.monotonic() + timeout
        while not self.port:
            self._check_alive(deadline)
            if match := _LISTENING.search(self.log()):
                self.port = int(match.group(1))
            else:
                time.sleep(poll)
        while True:
            self._check_alive(deadline)
            try:
                if self.request("GET", self.ready[0])[0] == self.ready[1]:
                    ready = time.monotonic() - self.started
                    break
            except OSError:
                pass
            time.sleep(poll)
        if match := _WORKER.search(self.log()):
            self.worker_pid = int(match.group(1))
        return ready

    def _check_alive(self, deadline: float) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}; log {self.log_path}:\n{self.log()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready in time; log {self.log_path}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def rss_bytes(self) -> int:
        """Resident set size of the worker process (where the app and its tasks live)."""
        for line in Path(f"/proc/{self.worker_pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """CPU time (user + system, all threads) the worker process has used so far."""
        fields = Path(f"/proc/{self.worker_pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def terminate(self, timeout: float = 30.0) -> float:
        """SIGTERM the arbiter; return seconds until it exited."""
        sent = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=timeout)
        return time.monotonic() - sent

    def stop(self) -> None:
        """Kill this server's process group if it still runs (it has its own session)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
