"""Instructions per request of a gunicorn worker process, counted by callgrind: repeatable on a loaded machine.

``python -m bench.instructions [--requests-seconds S] [NAME ...]`` starts each server (the names of
``SERVERS``) under ``valgrind --tool=callgrind``, warms it up, zeroes the worker's counters, posts to
``/enqueue`` with wrk (unique ids, ``bench/enqueue.lua``) for S seconds, dumps the counters and prints
the worker's instructions divided by the requests wrk counted. Everything the worker process runs is
counted: the main loop, the request threads, the pool's threads; not wrk. Not part of ``make bench``
(a server under callgrind runs about 50 times slower): a tool to compare versions of the request path.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from config import VARIABLES as SERVICE_VARIABLES

from .harness import LUA
from .reference import _SERVICE_ENV
from .server import ROOT

GUNICORN = [sys.executable, "-m", "gunicorn"]
# Tasks that outlast the count: at callgrind's pace, the default 100-500 ms tasks would finish about
# one per request served and be counted as part of the request path.
_IDLE = {**_SERVICE_ENV, "WORK_MIN_MS": "3600000", "WORK_MAX_MS": "3600000"}
SERVERS = {
    "on": (["-c", "gunicorn.conf.py"], _IDLE),
    "off": (["-c", "gunicorn.conf.py"], {**_IDLE, "ACCESS_LOG": "off"}),
    "bare": (["-c", "bench/hello.conf.py", "bench.bare_flask:app"], {}),
    "sqlite": (["-c", "gunicorn.conf.py"], {**_IDLE, "STORE": "sqlite://{out_dir}/tasks.db"}),
    # A private redis-server (no persistence), started for the run; its own CPU is not counted.
    "redis": (["-c", "gunicorn.conf.py"], {**_IDLE, "STORE": "{redis_url}"}),
}
_LISTENING = re.compile(r"Listening at: http://127\.0\.0\.1:(\d+)")
_WORKER = re.compile(r"Booting worker with pid: (\d+)")
_TOTALS = re.compile(r"^(?:summary|totals): (\d+)", re.MULTILINE)


def _wait_for(pattern: re.Pattern[str], log: Path, proc: subprocess.Popen, timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        if match := pattern.search(log.read_text(errors="replace")):
            return match
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {pattern.pattern} in {log}")


def _wrk(port: int, seconds: float, connections: int) -> int:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "30s", "-s", LUA,
         f"http://127.0.0.1:{port}", "--", "/enqueue", uuid.uuid4().hex[:12]],
        capture_output=True, text=True, timeout=seconds + 120, check=True,
    )  # fmt: skip
    match = re.search(r'"requests":(\d+).*"non_2xx_3xx":(\d+)', out.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
    if int(match.group(2)):
        raise RuntimeError(f"{match.group(2)} responses were not 2xx")
    return int(match.group(1))


def _worker_total(out_dir: Path, prefix: str, worker: int, timeout: float = 120.0) -> int:
    """The instruction total callgrind wrote when ``worker`` died."""
    path = out_dir / f"{prefix}.{worker}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and (match := _TOTALS.search(path.read_text(errors="replace"))):
            return int(match.group(1))
        time.sleep(0.5)
    raise RuntimeError(f"no callgrind output {path}")


def _next_worker(log: Path, index: int) -> int:
    while True:
        workers = _WORKER.findall(log.read_text(errors="replace"))
        if len(workers) > index:
            return int(workers[index])
        time.sleep(0.5)


def measure(name: str, *, seconds: int, connections: int, out_dir: Path, redis_url: str = "") -> tuple[int, int]:
    """(instructions, requests) of one server's worker process for ``seconds`` more of wrk.

    A worker forked under valgrind cannot be reached by ``callgrind_control``; it writes its counts
    when it dies. So two workers of the same arbiter serve the same warm-up, then ``seconds / 4``
    and ``seconds`` of wrk, and are killed with SIGSEGV (no exit path: a drain or log lines at exit
    would cost more with more tasks); the difference of their totals is what the extra requests cost.
    """
    args, env_overrides = SERVERS[name]
    environ = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    environ.update({"HOST": "127.0.0.1", "PORT": "0"})
    environ.update({key: value.format(out_dir=out_dir, redis_url=redis_url) for key, value in env_overrides.items()})
    log = out_dir / f"{name}.log"
    prefix = f"callgrind.{name}"
    command = [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out_dir / prefix}.%p",
        *GUNICORN, *args, "-b", "127.0.0.1:0", "--timeout", "600",
    ]  # fmt: skip
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=environ, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        port = int(_wait_for(_LISTENING, log, proc, 300).group(1))
        counts = []
        for index, duration in enumerate((max(1, seconds // 4), seconds)):
            worker = _next_worker(log, index)
            requests = _wrk(port, 5, connections)  # warm-up: imports, caches, first allocations
            requests += _wrk(port, duration, connections)
            os.kill(worker, signal.SIGSEGV)
            counts.append((_worker_total(out_dir, prefix, worker), requests))
        (first, first_requests), (second, second_requests) = counts
        return second - first, second_requests - first_requests
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(SERVERS), help=f"servers to count ({', '.join(SERVERS)})")
    parser.add_argument("--seconds", type=int, default=60, help="wrk's duration once counting")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    options = parser.parse_args(argv)
    redis = None
    if any("{redis_url}" in str(SERVERS[name][1]) for name in options.names):
        from .redis_figures import RedisProcess

        redis = RedisProcess()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-instructions-") as tmp:
            for round_no in range(options.rounds):
                for name in options.names:
                    if redis is not None:
                        redis.client().flushall()  # each count starts from an empty store
                    instructions, requests = measure(
                        name, seconds=options.seconds, connections=options.connections, out_dir=Path(tmp),
                        redis_url=redis.url if redis is not None else "",
                    )  # fmt: skip
                    print(
                        f"round {round_no + 1} {name:5} {instructions / max(1, requests):10,.0f} "
                        f"instructions/request ({requests} requests)",
                        flush=True,
                    )
    finally:
        if redis is not None:
            redis.stop()


if __name__ == "__main__":
    main()
