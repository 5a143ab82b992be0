"""How the service copes with slow, silent and never-closing clients, measured against a real server.

    python -m bench.slow_clients gunicorn partial 8 1000   # hold N partial request heads, time /healthz
    python -m bench.slow_clients app silent 500            # the same under `python app.py`
    python -m bench.slow_clients --project DIR gunicorn exit 100

Scenarios, each run once per N on a fresh server (127.0.0.1, port 0):

- ``partial``: N connections that sent ``GET /healthz HTTP/1.1`` and one header, nothing more;
- ``silent``: N connections that sent nothing;
- ``body``: N ``POST /enqueue`` with ``Content-Length: 100`` and 5 bytes of body;
- ``close``: N clients that sent ``Connection: close``, read the answer and never close their end;
- ``exit``: N partial heads and N silent connections, then SIGTERM: time to exit and the last log line.

For each it prints how long two ``GET /healthz`` took (or how they failed) and the
server process's thread count. ``--project`` points at another checkout (to
measure an older version with this interpreter).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADS = {
    "partial": b"GET /healthz HTTP/1.1\r\nHost: a\r\n",
    "silent": b"",
    "body": b'POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"id"',
    "close": b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
}


def start(project: Path, server: str, log: Path) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "INFO"}
    command = ["-m", "gunicorn", "-c", "gunicorn.conf.py"] if server == "gunicorn" else ["app.py"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *command],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not (found := re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)
    port = int(found.group(1))
    while health(port, 2) is None:
        time.sleep(0.1)
    return proc, port


def health(port: int, timeout: float) -> float | None:
    """Seconds a GET /healthz took, or None if it failed."""
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        return time.monotonic() - started if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def probe(port: int, timeout: float = 15.0) -> str:
    started = time.monotonic()
    seconds = health(port, timeout)
    return f"200 in {seconds:.2f} s" if seconds is not None else f"failed after {time.monotonic() - started:.2f} s"


def connect(port: int, count: int, data: bytes) -> list[socket.socket]:
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if data:
            sock.sendall(data)
        sockets.append(sock)
    return sockets


def server_pid(proc: subprocess.Popen, log: Path) -> int:
    booted = re.findall(r"Booting worker with pid: (\d+)", log.read_text(errors="replace"))
    return int(booted[-1]) if booted else proc.pid


def measure(project: Path, server: str, scenario: str, count: int, log: Path) -> str:
    proc, port = start(project, server, log)
    sockets: list[socket.socket] = []
    try:
        if scenario == "exit":
            sockets = connect(port, count, HEADS["partial"]) + connect(port, count, HEADS["silent"])
            time.sleep(1)
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
            last = log.read_text(errors="replace").strip().splitlines()[-1]
            return f"exit with {count} partial + {count} silent: {time.monotonic() - started:.2f} s; last: {last}"
        sockets = connect(port, count, HEADS[scenario])
        if scenario == "close":
            for sock in sockets:
                with contextlib.suppress(OSError):  # a stalled server may not answer in 10 s
                    sock.recv(65536)  # the answer; the socket stays open
        time.sleep(1)
        first, second = probe(port), probe(port)
        threads = len(os.listdir(f"/proc/{server_pid(proc, log)}/task"))
        return f"{scenario} x{count}: /healthz {first}, then {second}; {threads} threads"
    finally:
        for sock in sockets:
            sock.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    parser.add_argument("server", choices=("gunicorn", "app"))
    parser.add_argument("scenario", choices=(*HEADS, "exit"))
    parser.add_argument("counts", type=int, nargs="+")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for count in args.counts:
            print(measure(args.project, args.server, args.scenario, count, Path(scratch) / "server.log"), flush=True)


if __name__ == "__main__":
    main()
