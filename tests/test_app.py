"""The app factory and the `python app.py` entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import weakref

import pytest
from doubles import FakeClock, instant
from http_fixtures import LISTENING, PROJECT_ROOT, ServerProcess, clean_environment, wait_until

import app as app_module
from app import build_pool, create_app, load_handler, parse_args, pool_of
from config import VARIABLES, Config, ConfigError, StoreSetting
from workerpool import SimulatedWork, State


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("workerpool")}


def test_create_app_builds_the_pool_from_the_config_without_starting_it():
    before = pool_threads()
    app = create_app(Config(workers=3, queue_size=5, max_body_bytes=4096))
    stats = pool_of(app).stats()
    assert (stats.workers, stats.queue_capacity, stats.accepting) == (3, 5, True)
    assert app.config["MAX_CONTENT_LENGTH"] == 4096
    # None started (after fork, by a hook or the first submit); an earlier test's may end meanwhile.
    assert pool_threads() <= before


def test_the_drain_at_exit_of_other_servers_closes_the_store(tmp_path):
    # `flask run` and other WSGI servers have no stop hook: SQLite copies its log into the file once closed.
    app = create_app(Config(store=StoreSetting("sqlite", str(tmp_path / "tasks.db")), work_min_ms=0, work_max_ms=0))
    pool = pool_of(app)
    pool.start()
    assert app.test_client().post("/enqueue", json={"id": "t1", "payload": "p"}).status_code == 202
    assert (tmp_path / "tasks.db-wal").exists()
    app_module._drain_at_exit(weakref.ref(pool), 5.0)
    assert not (tmp_path / "tasks.db-wal").exists()


def test_the_drain_at_exit_still_closes_the_store_when_the_drain_fails(tmp_path):
    # A drain that fails before its summary returns None: describing it raised AttributeError at exit.
    app = create_app(Config(store=StoreSetting("sqlite", str(tmp_path / "tasks.db")), work_min_ms=0, work_max_ms=0))
    pool = pool_of(app)
    pool.start()
    assert app.test_client().post("/enqueue", json={"id": "t1", "payload": "p"}).status_code == 202

    class FailingDrain:  # the pool, whose drain returns no summary
        started, accepting, store = pool.started, pool.accepting, pool.store

        def shutdown(self, timeout):
            pool.shutdown(timeout)

    failing = FailingDrain()
    app_module._drain_at_exit(weakref.ref(failing), 5.0)
    assert not (tmp_path / "tasks.db-wal").exists()


def test_the_app_serves_no_static_files():
    app = create_app(Config())
    assert "static" not in app.view_functions
    response = app.test_client().get("/static/app.py")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"


def test_create_app_reads_the_environment_by_default(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORKERS", "2")
    monkeypatch.setenv("MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("MAX_PAYLOAD_CHARS", "1024")
    app = create_app()
    assert pool_of(app).workers == 2
    assert app.config["MAX_CONTENT_LENGTH"] == 2048


def test_the_simulated_work_takes_the_configured_times_and_failure_rate_exactly():
    work = load_handler(Config(work_min_ms=120, work_max_ms=480, failure_rate=0.35))
    assert isinstance(work, SimulatedWork)
    assert (work.min_s, work.max_s, work.failure_rate) == (0.12, 0.48, 0.35)
    default = load_handler(Config())  # README: 100-500 ms, 20 % of attempts fail
    assert (default.min_s, default.max_s, default.failure_rate) == (0.1, 0.5, 0.2)


def test_build_pool_runs_simulated_work_with_the_configured_knobs():
    config = Config(workers=2, work_min_ms=0, work_max_ms=0, failure_rate=1.0, backoff_base_ms=0, backoff_cap_ms=0)
    pool = build_pool(config)
    pool.submit("a", "", 2)
    summary = pool.shutdown(10)
    assert summary.counts[State.FAILED] == 1
    task = pool.get("a")
    assert task.attempts == 3
    assert task.last_error.startswith("SimulatedFailure: ")


def returns_a_big_result(task, cancel):
    return "x" * 100


def test_build_pool_applies_the_result_limit_and_the_attempt_timeout():
    config = Config(workers=1, max_result_bytes=64, attempt_timeout_s=7.5, task_handler="test_app:returns_a_big_result")
    pool = build_pool(config)
    pool.submit("a", "")
    pool.shutdown(10)
    assert pool.get("a").last_error.endswith("the limit is 64 (MAX_RESULT_BYTES)")
    assert pool.check_timeouts() == 7.5  # nothing runs: an attempt starting now has the whole timeout
    assert build_pool(Config(attempt_timeout_s=0)).check_timeouts() is None


@pytest.mark.parametrize(
    ("argv", "host", "port"),
    [([], None, None), (["--port", "9000"], None, 9000), (["--host", "0.0.0.0", "--port", "0"], "0.0.0.0", 0)],
)
def test_command_line(argv, host, port):
    args = parse_args(argv)
    assert (args.host, args.port) == (host, port)


@pytest.mark.parametrize("port", ["http", "-1", "65536", "80.5"])
def test_a_bad_port_flag_exits_2(port, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(["--port", port])
    assert caught.value.code == 2
    assert f"invalid port {port!r}" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["", " ", "local host"])
def test_a_bad_host_flag_exits_2_as_a_bad_host_variable_does(host, capsys):
    # An empty --host was taken, and the server listened on every interface (0.0.0.0), where HOST='' is refused.
    with pytest.raises(SystemExit) as caught:
        parse_args(["--host", host])
    assert caught.value.code == 2
    assert f"invalid host {host!r}: must be a host name or IP address" in capsys.readouterr().err


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.mark.e2e
def test_the_development_server_names_an_ipv6_address_in_a_url_that_works(tmp_path):
    """It logged http://::1:PORT, which no client parses; gunicorn logs http://[::1]:PORT."""
    argv = ["app.py", "--host", "::1", "--port", "0"]
    server = ServerProcess(argv, log_path=tmp_path / "dev.log", env=clean_environment())
    try:
        port = server.wait_for_port(r"Listening at: http://\[::1\]:(\d+)")
        assert get_json(f"http://[::1]:{port}/healthz")[0] == 200
        assert server.terminate(timeout=15) == 0
    finally:
        server.stop()


@pytest.mark.e2e
def test_the_development_server_serves_and_stops_on_sigterm(tmp_path):
    # The flags beat PORT from the environment, which beats .env.
    env = clean_environment(PORT="1", WORK_MIN_MS="1", WORK_MAX_MS="2", FAILURE_RATE="0", SHUTDOWN_TIMEOUT_S="5")
    server = ServerProcess(["app.py", "--host", "127.0.0.1", "--port", "0"], log_path=tmp_path / "dev.log", env=env)
    try:
        port = server.wait_for_port(r"Listening at: http://127\.0\.0\.1:(\d+)")
        base = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(
            f"{base}/enqueue", data=b'{"id": "a", "payload": "p"}', method="POST", headers={"X-Request-ID": "dev-1"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
        wait_until(lambda: get_json(f"{base}/tasks/a")[1]["state"] == "done", timeout=10, what="task a")
        assert get_json(f"{base}/healthz") == (200, get_json(f"{base}/health")[1])
        assert server.terminate(timeout=15) == 0
    finally:
        server.stop()
    # Access lines as gunicorn writes them, without terminal colour codes: werkzeug's had no byte count, no
    # duration and no request id ("grep <id>" missed it), and in JSON none of the access fields.
    [access] = [line for line in server.log().splitlines() if "POST /enqueue" in line]
    layout = r'\] \[INFO\] gunicorn\.access: 127\.0\.0\.1 "POST /enqueue HTTP/1\.1" 202 \d+ \d+ms "[^"]+"'
    assert re.search(layout, access), access
    assert access.endswith(" request_id=dev-1")
    assert "\x1b[" not in server.log()


def test_task_handler_names_the_callable_each_attempt_runs():
    assert isinstance(load_handler(Config()), SimulatedWork)
    assert load_handler(Config(task_handler="doubles:instant")) is instant
    assert load_handler(Config(task_handler="doubles:FakeClock.advance")) is FakeClock.advance
    for path, reason in [
        ("no_such_module:run", "No module named 'no_such_module'"),
        ("doubles:missing", "has no attribute 'missing'"),
        ("doubles:WAIT_S", "it names a float"),
    ]:
        with pytest.raises(ConfigError, match=f"TASK_HANDLER='{path}' is invalid: .*{reason}"):
            load_handler(Config(task_handler=path))


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_store_warning_at_start_up_is_a_line_in_log_format(monkeypatch, capsys, log_format):
    """With LOG_FORMAT=json the warnings about a Redis store were plain text, without a level."""
    monkeypatch.setenv("LOG_FORMAT", log_format)
    warning = "STORE: the Redis server at 127.0.0.1:1 answers without a password"
    monkeypatch.setattr(app_module, "reach_store", lambda config: [warning])
    app_module.check_store(Config())
    (line,) = capsys.readouterr().err.splitlines()
    if log_format == "text":
        assert line == f"warning: {warning}"
    else:
        assert json.loads(line) | {"timestamp": None} == {
            "level": "WARNING", "logger": "config", "message": f"warning: {warning}", "task_id": None,
            "request_id": None, "timestamp": None, "pid": os.getpid(),
        }  # fmt: skip


@pytest.mark.e2e
def test_the_development_server_serves_under_the_root_path_as_gunicorn_does(tmp_path):
    # SCRIPT_NAME was gunicorn's alone: python app.py served at / and answered /wp/dashboard 404, silently.
    env = clean_environment(SCRIPT_NAME="/wp", WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0")
    server = ServerProcess(["app.py", "--host", "127.0.0.1", "--port", "0"], log_path=tmp_path / "dev.log", env=env)
    try:
        base = f"http://127.0.0.1:{server.wait_for_port(LISTENING)}"
        assert get_json(f"{base}/wp/healthz")[0] == 200
        with urllib.request.urlopen(f"{base}/wp/dashboard", timeout=5) as response:
            assert response.status == 200
        request = urllib.request.Request(f"{base}/wp/enqueue", data=b'{"id": "a", "payload": 1}', method="POST")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert (response.status, response.headers["Location"]) == (202, "/wp/tasks/a")
        for outside in ("/healthz", "/w%70/healthz"):  # the raw path is compared, as gunicorn does
            try:
                urllib.request.urlopen(base + outside, timeout=5)
            except urllib.error.HTTPError as error:
                assert (error.code, error.headers["Content-Type"]) == (404, "application/problem+json")
                assert error.headers["X-Request-ID"]
                assert json.load(error)["status"] == 404
            else:
                raise AssertionError(f"{outside} was served")
        assert server.terminate(timeout=15) == 0
    finally:
        server.stop()


def test_the_development_server_refuses_a_root_path_no_request_path_can_begin_with(tmp_path):
    result = subprocess.run(
        [sys.executable, "app.py", "--host", "127.0.0.1", "--port", "0"],
        cwd=PROJECT_ROOT, env=clean_environment(SCRIPT_NAME="wp"), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "configuration error: SCRIPT_NAME='wp' is invalid: " in result.stderr


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        ("handlers.fetch_url:fetcher", "too many positional arguments"),  # the factory, not the handler it builds
        ("os:getpid", "too many positional arguments"),
        ("threading:Event", "too many positional arguments"),
        ("operator:not_", "too many positional arguments"),
    ],
)
def test_a_task_handler_that_cannot_take_task_and_cancel_stops_start_up(handler, reason):
    """It started, and every task failed after all its retries with a TypeError."""
    with pytest.raises(ConfigError) as caught:
        load_handler(Config(task_handler=handler))
    assert str(caught.value) == (
        f"TASK_HANDLER={handler!r} is invalid: it cannot be called as handler(task, cancel): {reason}"
    )


_NOT_PLAIN_HANDLERS = """
import functools


async def coroutine(task, cancel):
    return 1


def generator(task, cancel):
    yield 1


async def async_generator(task, cancel):
    yield 1


class Caller:
    async def __call__(self, task, cancel):
        return 1


instance = Caller()
partial = functools.partial(coroutine)
"""


@pytest.mark.parametrize(
    ("attribute", "what"),
    [
        ("coroutine", "an async def function"),
        ("generator", "a generator function (it yields)"),
        ("async_generator", "an async generator function"),
        ("instance", "an async def function"),
        ("partial", "an async def function"),
    ],
)
def test_a_task_handler_whose_call_runs_nothing_stops_start_up(tmp_path, monkeypatch, attribute, what):
    """It started, and every task failed at its first attempt: the call returned a coroutine or a generator."""
    module = f"not_plain_{tmp_path.name}"
    (tmp_path / f"{module}.py").write_text(_NOT_PLAIN_HANDLERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    handler = f"{module}:{attribute}"
    with pytest.raises(ConfigError) as caught:
        load_handler(Config(task_handler=handler))
    assert str(caught.value).startswith(f"TASK_HANDLER={handler!r} is invalid: it is {what}, whose call runs none")


@pytest.mark.parametrize("handler", ["handlers.fetch_url:fetch", "handlers.example:log_payload", "builtins:print"])
def test_a_task_handler_that_takes_task_and_cancel_is_taken(handler):
    assert callable(load_handler(Config(task_handler=handler)))
