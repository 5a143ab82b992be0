"""Configuration errors found at start-up stop gunicorn and `python app.py` before they listen: exit 2, one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from http_fixtures import PROJECT_ROOT, clean_environment

pytestmark = pytest.mark.e2e

GUNICORN = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
APP = [sys.executable, "app.py", "--port", "0"]


def start(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    """Run a server that must refuse to start; a server that starts is killed by the timeout."""
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=clean_environment(**env), capture_output=True, text=True, timeout=60
    )


HANDLERS = {
    "missing module": ("no_such_module_anywhere:run", "No module named 'no_such_module_anywhere'"),
    "missing attribute": ("json:no_such_function", "module 'json' has no attribute 'no_such_function'"),
}


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "python app.py"])
@pytest.mark.parametrize(("handler", "reason"), HANDLERS.values(), ids=HANDLERS.keys())
def test_a_task_handler_that_does_not_resolve_stops_start_up(command, handler, reason):
    result = start(command, TASK_HANDLER=handler)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert output == f"configuration error: TASK_HANDLER={handler!r} is invalid: {reason}\n"


def test_gunicorn_refuses_several_worker_processes_sharing_no_store():
    result = start([*GUNICORN, "-w", "3"])
    assert result.returncode == 2
    output = result.stdout + result.stderr
    assert "configuration error: 3 worker processes would each keep their own tasks with STORE=memory" in output
    assert "Listening at" not in output
    assert "Traceback" not in output
