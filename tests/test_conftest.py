"""The test run itself: a runner stopped by SIGTERM still stops the processes its tests started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from doubles import wait_until

TESTS = Path(__file__).resolve().parent

INNER_TEST = """
import subprocess, threading

def test_holds_a_server(tmp_path):
    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        with open({pid_file!r}, "w") as f:
            f.write(str(child.pid))
        threading.Event().wait(120)
    finally:
        child.kill()
        child.wait()
"""


@pytest.mark.e2e
def test_a_runner_stopped_by_sigterm_still_stops_the_processes_its_tests_started(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_inner.py").write_text(INNER_TEST.format(pid_file=str(pid_file)))
    runner = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "-o", "addopts="]
        + ["test_inner.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{TESTS.parent}"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    child = None
    try:

        def started() -> str:
            assert runner.poll() is None, runner.stdout.read().decode()
            return pid_file.exists() and pid_file.read_text()

        child = int(wait_until(started, timeout=60, what="the inner test to start its child"))
        runner.send_signal(signal.SIGTERM)
        output = runner.communicate(timeout=60)[0].decode()
        assert "KeyboardInterrupt" in output or "stopped by signal" in output, output
        assert not _alive(child), f"the inner test's child {child} outlived the runner"
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
