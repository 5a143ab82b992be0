"""Log lines: text or one JSON object per line, each with its task id and request id."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import os
import re
import subprocess
import sys
import threading

import pytest
from doubles import WAIT_S
from http_fixtures import PROJECT_ROOT, failing, instant, make_harness

from service import logs
from workerpool import PoolObserver, Task, WorkerPool, current_task

TASK_LOGGER = "workerpool.pool"


@pytest.fixture
def capture(monkeypatch):
    """Configure logging as the service does, writing to a buffer; restore the root logger afterwards."""
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    buffers = {"stderr": io.StringIO(), "stdout": io.StringIO()}

    def configure(log_format: str, level: str = "DEBUG") -> dict[str, io.StringIO]:
        monkeypatch.setattr("sys.stderr", buffers["stderr"])
        monkeypatch.setattr("sys.stdout", buffers["stdout"])
        logging.config.dictConfig(logs.logging_config(level, log_format))
        return buffers

    yield configure
    for name in ("gunicorn.error", logs.ACCESS_LOGGER):
        logging.getLogger(name).handlers.clear()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def run_one_task(handler, task_id: str, request_id: str) -> None:
    harness = make_harness(handler)
    response = harness.client.post(
        "/enqueue", json={"id": task_id, "payload": "", "max_retries": 0}, headers={"X-Request-ID": request_id}
    )
    assert response.status_code == 202
    harness.final.wait(task_id)
    harness.pool.shutdown(0)


def test_json_lines_parse_and_carry_the_task_and_request_ids(capture):
    out = capture("json")
    run_one_task(failing, "job-1", "rid-json")
    records = json_lines(out["stderr"].getvalue())
    task_lines = [r for r in records if r["task_id"] == "job-1"]
    assert [(r["level"], r["message"]) for r in task_lines] == [
        ("DEBUG", "task job-1 queued"),
        ("DEBUG", "task job-1 attempt 1 started"),
        ("WARNING", "task job-1 failed after 1 attempt(s): RuntimeError: boom"),
    ]
    for record in task_lines:
        keys = [key for key in record if key != "exc_info"]
        assert keys[:7] == ["level", "logger", "message", "task_id", "request_id", "timestamp", "pid"]
        assert record["pid"] == os.getpid()  # which process of several (-w N) wrote it
        assert (record["logger"], record["request_id"]) == (TASK_LOGGER, "rid-json")
        assert record["timestamp"].endswith("+00:00")
    # At DEBUG the failure carries the handler's traceback; the other lines carry none.
    assert [("exc_info" in r) for r in task_lines] == [False, False, True]
    assert 'raise RuntimeError("boom")' in task_lines[-1]["exc_info"]


def test_every_json_line_has_the_same_keys_even_without_a_task(capture):
    out = capture("json", level="INFO")
    logging.getLogger("somewhere").info("hello %s", "world")
    try:
        raise ValueError("broken")
    except ValueError:
        logging.getLogger("somewhere").exception("it broke")
    first, second = json_lines(out["stderr"].getvalue())
    assert first["message"] == "hello world"
    assert (first["task_id"], first["request_id"]) == (None, None)
    assert second["level"] == "ERROR"
    assert "ValueError: broken" in second["exc_info"]


def test_a_record_logged_while_handling_a_request_gets_its_id(capture, monkeypatch):
    out = capture("json", level="ERROR")
    harness = make_harness(instant)
    # /healthz now fails: the error is logged inside the request (the pool's class is patched: its
    # instances have slots, no dict of their own)
    monkeypatch.setattr(type(harness.pool), "stats", None)
    response = harness.client.get("/healthz", headers={"X-Request-ID": "rid-error"})
    assert response.status_code == 500
    (record,) = json_lines(out["stderr"].getvalue())
    assert (record["logger"], record["request_id"]) == ("service.problems", "rid-error")
    assert "Traceback" in record["exc_info"]


def test_text_lines_keep_the_gunicorn_layout_and_append_the_task_and_request_ids(capture):
    out = capture("text")
    run_one_task(instant, "job-2", "rid-text")
    lines = [line for line in out["stderr"].getvalue().splitlines() if "job-2" in line]
    assert len(lines) == 3
    assert lines[2].endswith(
        "[DEBUG] workerpool.pool: task job-2 done after 1 attempt(s) task_id=job-2 request_id=rid-text"
    )
    assert lines[2].startswith("[")  # [2026-11-27 10:00:00 +0000] [pid] ...


def logging_handler(task, cancel) -> None:
    """A handler that logs with a logger of its own, and from a coroutine it runs."""
    logging.getLogger("handlers.mine").info("fetched %s", task.payload)

    async def step() -> None:
        logging.getLogger("handlers.mine").info("and awaited")

    asyncio.run(step())


def test_a_handlers_own_lines_carry_its_task_and_request_ids(capture):
    out = capture("json", level="INFO")
    run_one_task(logging_handler, "job-own", "rid-own")
    logging.getLogger("handlers.mine").info("outside any task")
    records = [r for r in json_lines(out["stderr"].getvalue()) if r["logger"] == "handlers.mine"]
    assert [(r["message"], r["task_id"], r["request_id"]) for r in records] == [
        ("fetched ", "job-own", "rid-own"),
        ("and awaited", "job-own", "rid-own"),
        ("outside any task", None, None),
    ]


def test_a_handlers_own_text_lines_carry_its_task_id_beside_the_request_id_its_batch_shares(capture):
    out = capture("text", level="INFO")
    harness = make_harness(logging_handler)
    tasks = [{"id": "job-a", "payload": "u1"}, {"id": "job-b", "payload": "u2"}]
    response = harness.client.post("/enqueue/batch", json={"tasks": tasks}, headers={"X-Request-ID": "rid-batch"})
    assert response.status_code == 200
    for task in tasks:
        harness.final.wait(task["id"])
    harness.pool.shutdown(0)
    logging.getLogger("handlers.mine").info("outside any task")
    lines = [line for line in out["stderr"].getvalue().splitlines() if "handlers.mine" in line]
    assert sorted(line.split("handlers.mine: ")[1] for line in lines) == [
        "and awaited task_id=job-a request_id=rid-batch",
        "and awaited task_id=job-b request_id=rid-batch",
        "fetched u1 task_id=job-a request_id=rid-batch",
        "fetched u2 task_id=job-b request_id=rid-batch",
        "outside any task",
    ]


@pytest.mark.parametrize(
    ("task_id", "written"),
    [
        ("job-1", "task_id=job-1"),
        ("victim request_id=forged", 'task_id="victim request_id=forged"'),
        ('a"b', 'task_id="a\\"b"'),
        ("a=b", 'task_id="a=b"'),
        ("a\u00a0b", 'task_id="a\u00a0b"'),
    ],
    ids=["plain", "space", "quote", "equals", "no-break-space"],
)
def test_a_task_id_that_would_read_as_more_fields_is_quoted_in_text_lines(capture, task_id, written):
    # A bare "victim request_id=forged" read as task victim of request forged.
    out = capture("text", level="INFO")
    logging.getLogger("handlers.mine").info("fetched", extra={"task_id": task_id, "request_id": "rid-real"})
    (line,) = out["stderr"].getvalue().splitlines()
    assert line.endswith(f"handlers.mine: fetched {written} request_id=rid-real"), line


class RunningTaskSeen(PoolObserver):
    """Notes, on the worker thread, which task is running as an attempt starts and once it ended."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Task | None]] = []
        self.ended = threading.Event()

    def attempt_started(self, task: Task) -> None:
        self.seen.append(("started", current_task()))

    def attempt_finished(self, task: Task, seconds: float) -> None:
        self.seen.append(("finished", current_task()))
        self.ended.set()


def test_the_running_task_is_known_only_during_its_handler():
    observer = RunningTaskSeen()

    def handler(task: Task, cancel: threading.Event) -> None:
        observer.seen.append(("handler", current_task()))

    pool = WorkerPool(handler, workers=1, observers=[observer])
    try:
        pool.submit("t-1", None, request_id="rid-1")
        assert observer.ended.wait(WAIT_S)
    finally:
        pool.shutdown(timeout=WAIT_S)
    (started, running, finished) = observer.seen
    assert started == ("started", None) and finished == ("finished", None)
    assert running[0] == "handler" and (running[1].id, running[1].request_id) == ("t-1", "rid-1")
    assert current_task() is None


def test_a_json_line_escapes_the_unicode_line_separators_that_line_readers_split_on(capture):
    out = capture("json", level="INFO")
    logging.getLogger("somewhere").info("a\u2028b\u2029c\nd")
    (line,) = out["stderr"].getvalue().splitlines()
    assert json.loads(line)["message"] == "a\u2028b\u2029c\nd"


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="log_format"):
        logs.logging_config("INFO", "xml")


LINE_BREAKERS = ["\n", "\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1b", "\x00", "\x7f"]


@pytest.mark.parametrize("breaker", [*LINE_BREAKERS, "\x9b"])
def test_a_json_line_stays_one_line_whatever_its_message_and_ids_hold(capture, breaker):
    out = capture("json", level="INFO")
    forged = f"x{breaker}[2026-11-27 10:00:00 +0000] [1] [INFO] forged"
    logging.getLogger("somewhere").info("task %s failed", forged, extra={"request_id": forged, "task_id": forged})
    (line,) = out["stderr"].getvalue().splitlines()
    assert not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029]", line), line  # a terminal would act on a raw one
    record = json.loads(line)
    assert (record["message"], record["request_id"], record["task_id"]) == (f"task {forged} failed", forged, forged)


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
def test_a_text_line_stays_one_line_whatever_its_message_and_ids_hold(capture, breaker):
    out = capture("text", level="INFO")
    forged = f"x{breaker}[2026-11-27 10:00:00 +0000] [1] [INFO] forged"
    logging.getLogger("somewhere").info("task %s failed (%s)", forged, forged, extra={"request_id": forged})
    text = out["stderr"].getvalue()
    assert len(text.splitlines()) == 1, text
    assert f"\\x{ord(breaker):02x}" in text or f"\\u{ord(breaker):04x}" in text


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_bidi_control_cannot_reorder_a_line(capture, log_format):
    # A handler's error quoting a payload with U+202E showed the rest of its line reversed, request_id and all.
    out = capture(log_format, level="INFO")
    controls = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    forged = f"x{controls}1 deliaf"
    logging.getLogger("somewhere").info("task a failed: %s", forged, extra={"request_id": forged})
    (line,) = out["stderr"].getvalue().splitlines()
    assert not any(control in line for control in controls), ascii(line)
    assert "\\u202e" in line
    if log_format == "json":
        record = json.loads(line)
        assert (record["message"], record["request_id"]) == (f"task a failed: {forged}", forged)


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_record(capture):
    out = capture("text", level="INFO")
    try:
        raise ValueError("bad\n[2026-11-27 10:00:00 +0000] [1] [INFO] forged\u2028too")
    except ValueError:
        logging.getLogger("somewhere").exception("it broke")
    first, *rest = out["stderr"].getvalue().splitlines()
    assert first.endswith("[ERROR] somewhere: it broke")
    assert any("Traceback" in line for line in rest)
    assert all(line.startswith("    ") for line in rest), rest


def test_a_line_is_written_while_another_thread_holds_the_handler_lock(tmp_path):
    # Worker threads log a line per finished task: none may queue behind a handler lock whose holder lost the GIL.
    with open(tmp_path / "log", "w") as stream:
        handler = logs.LineHandler(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger = logging.Logger("test.line-handler")
        logger.addHandler(handler)
        writer = threading.Thread(target=logger.warning, args=("task job-1 done",))
        with handler.lock:
            writer.start()
            writer.join(timeout=10)
            assert not writer.is_alive()
    assert (tmp_path / "log").read_text() == "task job-1 done\n"


def test_a_line_handler_still_applies_its_filters():
    stream = io.StringIO()  # no file descriptor: written under the handler's lock instead
    handler = logs.LineHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(lambda record: "secret" not in record.getMessage())
    logger = logging.Logger("test.line-handler-filter")
    logger.addHandler(handler)
    logger.warning("kept")
    logger.warning("a secret")
    assert stream.getvalue() == "kept\n"


def test_a_level_above_info_leaves_the_start_and_stop_lines_out_but_not_the_access_lines_as_the_readme_says():
    script = (
        "import logging; from app import configure_logging; configure_logging('ERROR'); "
        "print([logging.getLogger(name).isEnabledFor(logging.INFO) for name in "
        "('app', 'service.lifecycle', 'gunicorn.access')])"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert run.stdout.strip() == "[False, False, True]", run.stderr
    readme = " ".join((PROJECT_ROOT / "README.md").read_text().split())
    assert "above `INFO` the start and stop lines" in readme
    assert "access lines follow `ACCESS_LOG` only" in readme
