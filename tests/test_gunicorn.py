"""gunicorn.conf.py: the settings it pins, and the real server end to end."""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import runpy
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.workers.gthread import ThreadWorker
from http_fixtures import (
    LISTENING,
    PROJECT_ROOT,
    Client,
    ServerProcess,
    clean_environment,
    half_closed_exchange,
    wait_until,
    worker_pids,
)

from config import VARIABLES
from service.gunicorn_worker import DrainingThreadWorker, HeldHeadResponse

CONF = str(PROJECT_ROOT / "gunicorn.conf.py")


def load_conf(monkeypatch, **env: str) -> dict:
    """gunicorn.conf.py run as at a server's start (not as at a reload: see test_server_settings.py)."""
    import server_settings

    monkeypatch.setattr(server_settings, "_accepted", None)
    monkeypatch.setattr(server_settings, "_processes", None)
    monkeypatch.setattr(server_settings, "_checked", None)
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
    handlers = [signal.getsignal(stop) for stop in stops]
    try:
        return runpy.run_path(CONF)
    finally:  # the handlers it installs for a stop during a server's start would stay in the test process
        for stop, handler in zip(stops, handlers, strict=True):
            signal.signal(stop, handler)


def test_the_worker_class_is_gthread_with_draining_stop_handlers():
    from gunicorn.workers.gthread import ThreadWorker

    from service.gunicorn_worker import DrainingThreadWorker

    assert issubclass(DrainingThreadWorker, ThreadWorker)


def test_gunicorn_conf_py_lets_through_every_signal_run_gunicorn_py_holds(monkeypatch):
    # run_gunicorn.py holds them through its exec of gunicorn: one gunicorn.conf.py left held would never reach
    # the running server (a reload, a binary upgrade, a stop).
    import run_gunicorn

    held = set(run_gunicorn.HELD_UNTIL_CONFIGURED)
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        conf = load_conf(monkeypatch)
        assert not held & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
    assert held == {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, *conf["_NOT_YET_SIGNALS"]}  # those it handles


def test_one_threaded_worker_without_preload_or_recycling(monkeypatch):
    conf = load_conf(monkeypatch)
    assert conf["workers"] == 1
    assert conf["worker_class"] == "service.gunicorn_worker.DrainingThreadWorker"
    assert conf["threads"] == 8
    assert conf["preload_app"] is False
    assert conf["max_requests"] == 0
    assert conf["control_socket_disable"] is True
    assert (conf["accesslog"], conf["errorlog"]) == ("-", "-")
    assert conf["wsgi_app"] == "server_settings:worker_app()"
    assert callable(conf["post_worker_init"])
    assert callable(conf["worker_exit"])


@pytest.mark.parametrize(
    ("env", "limits", "soft", "connections"),
    [
        ({}, (1024, 1024), 1024, 768),  # the memory store holds no descriptor
        ({}, (20_000, 20_000), 20_000, 1000),
        ({}, (256, 4096), 1256, 1000),  # the soft limit raised as far as needed
        ({"WORKERS": "200"}, (1024, 524_288), 1688, 1000),  # 2 x (200 + 8 + 8) for SQLite's files
        ({"WORKERS": "200"}, (1024, 1024), 1024, 336),  # the hard limit: fewer connections
        ({"WORKERS": "200", "STORE": "redis://127.0.0.1:1/0"}, (1024, 1024), 1024, 552),
    ],
)
def test_connections_leave_file_descriptors_for_closing_sockets_the_process_and_the_store(
    monkeypatch, tmp_path, env, limits, soft, connections
):
    import resource

    from service.file_limits import MAX_LINGERING, RESERVED, store_descriptors

    now = [limits]
    monkeypatch.setattr(resource, "getrlimit", lambda which: now[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: now.append(value))
    monkeypatch.setattr("app.check_store", lambda settings: None)
    env = {"STORE": f"sqlite://{tmp_path / 'tasks.db'}", **env} if "WORKERS" in env else env
    conf = load_conf(monkeypatch, **env)
    assert conf["worker_connections"] == connections
    assert now == ([limits] if soft == limits[0] else [limits, (soft, limits[1])])
    settings = conf["_settings"]
    assert connections + MAX_LINGERING + RESERVED + store_descriptors(settings, conf["threads"]) <= soft


@pytest.mark.parametrize(("store", "hard"), [("sqlite", 700), ("memory", 300)])
def test_a_store_that_leaves_too_few_descriptors_for_connections_stops_gunicorn_with_one_line(
    monkeypatch, tmp_path, capsys, store, hard
):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (hard, hard))
    monkeypatch.setattr("app.check_store", lambda settings: None)
    path = f"sqlite://{tmp_path / 'tasks.db'}" if store == "sqlite" else "memory"
    with pytest.raises(SystemExit) as exited:
        load_conf(monkeypatch, STORE=path, WORKERS="256")
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"configuration error: the open-file limit ({hard}, ulimit -n) leaves room for ")
    assert "raise it to at least" in line and "or lower WORKERS" in line


@pytest.mark.parametrize(
    ("argv", "env", "limits", "connections"),
    [
        (["--threads", "300"], {"GUNICORN_CMD_ARGS": "--threads 2"}, (1024, 1024), 1024 - 128 - 128 - 2 * 312),
        (["--threads", "300"], {}, (700, 700), None),  # 2 x (4 + 300 + 8) SQLite files: no room left
        (["--worker-connections", "500"], {}, (512, 4096), 500),  # the soft limit raised for it
        (["--worker-connections", "900"], {}, (1024, 1024), None),  # 1024 - 128 - 128 - 2 x 20 leaves 728
        ([], {"GUNICORN_CMD_ARGS": "--threads 100 --worker-connections 100"}, (1024, 1024), 100),
    ],
)
def test_the_threads_and_worker_connections_gunicorn_is_given_count_in_the_file_descriptor_budget(
    monkeypatch, tmp_path, capsys, argv, env, limits, connections
):
    # The budget was made for this file's `threads = 8`: with --threads 300 the store's files took the
    # descriptors left for connections, and accept() failed with EMFILE (the worker ended).
    import resource

    from service.file_limits import MAX_LINGERING, RESERVED

    assert (MAX_LINGERING, RESERVED) == (128, 128)
    now = [limits]
    monkeypatch.setattr(resource, "getrlimit", lambda which: now[-1])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: now.append(value))
    monkeypatch.setattr("app.check_store", lambda settings: None)
    monkeypatch.setattr(sys, "argv", ["gunicorn", "-c", CONF, *argv])
    for name, value in {"STORE": f"sqlite://{tmp_path / 'tasks.db'}", "WORKERS": "4", **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(runpy, "run_path", functools.partial(runpy.run_path, run_name="__config__"))
    if connections is None:
        with pytest.raises(SystemExit) as exited:
            load_conf(monkeypatch, **{name: os.environ[name] for name in ("STORE", "WORKERS")})
        assert exited.value.code == 2
        [line] = capsys.readouterr().err.splitlines()
        assert "raise it to at least" in line
        assert ("--worker-connections" in line) == ("--worker-connections" in argv)
    else:
        conf = load_conf(monkeypatch, **{name: os.environ[name] for name in ("STORE", "WORKERS")})
        assert conf["worker_connections"] == connections


@pytest.mark.parametrize(
    ("env", "bind"),
    [
        ({}, ["127.0.0.1:8080"]),
        ({"HOST": "0.0.0.0", "PORT": "9000"}, ["0.0.0.0:9000"]),
        ({"HOST": "::"}, ["[::]:8080"]),
    ],
)
def test_bind_comes_from_host_and_port(monkeypatch, env, bind):
    assert load_conf(monkeypatch, **env)["bind"] == bind


def test_the_worker_timeout_that_ends_a_handler_holding_the_gil_is_the_one_the_readme_states(monkeypatch):
    # The configuration leaves gunicorn's default: a worker silent for 30 s is killed, with the tasks a
    # memory store held. The README tells handler authors that figure, and how to change it.
    from gunicorn.config import Config

    conf = load_conf(monkeypatch)
    assert "timeout" not in conf
    assert Config().timeout == 30
    readme = " ".join((PROJECT_ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "gunicorn's worker timeout (`--timeout`, 30 s by default" in readme
    assert "With `STORE=memory` every task that process held is lost with it" in readme


@pytest.mark.parametrize(("shutdown", "graceful"), [("20", 25), ("0", 5), ("2.5", 8)])
def test_graceful_timeout_leaves_a_margin_after_the_drain(monkeypatch, shutdown, graceful):
    conf = load_conf(monkeypatch, SHUTDOWN_TIMEOUT_S=shutdown, LOG_LEVEL="warning")
    assert conf["graceful_timeout"] == graceful
    assert conf["loglevel"] == "warning"


@pytest.mark.parametrize(
    ("shutdown", "given", "drain"),
    [("20", 25, None), ("20", 60, None), ("20", 10, 5), ("20", 4, 0), ("2.5", 8, None), ("2.5", 7, 2)],
)
@pytest.mark.parametrize("hook", ["on_starting", "on_reload"])
def test_a_graceful_timeout_that_shortens_the_drain_is_taken_with_a_warning(monkeypatch, shutdown, given, drain, hook):
    """--graceful-timeout (or in GUNICORN_CMD_ARGS) below SHUTDOWN_TIMEOUT_S + 5 cut the drain short, to 0 s at
    most, and nothing said that the documented setting was not the one in force."""
    from types import SimpleNamespace

    conf = load_conf(monkeypatch, SHUTDOWN_TIMEOUT_S=shutdown)
    cfg = SimpleNamespace(workers=1, address=[], reuse_port=False, max_requests=0, graceful_timeout=given)
    server = SimpleNamespace(
        cfg=cfg, worker_class=DrainingThreadWorker, master_pid=0, reexec_pid=0, pidfile=None, log=_RecordedLog()
    )
    conf[hook](server)
    warnings = [line for level, line in server.log.lines if level == "warning" and "--graceful-timeout" in line]
    if drain is None:
        assert warnings == []
        return
    [warning] = warnings
    assert warning.startswith(
        f"--graceful-timeout {given} leaves the drain {drain} s, not SHUTDOWN_TIMEOUT_S={shutdown}: "
        f"gunicorn kills the worker {given} s after a stop signal and the drain leaves it the last 5 s to exit"
    )
    assert f"give at least {conf['graceful_timeout']}, to drain for SHUTDOWN_TIMEOUT_S" in warning
    # ...and the drain is the shorter one, as the warning says.
    assert conf["_drain_timeout"](SimpleNamespace(cfg=cfg)) == drain


class _RecordedLog:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def info(self, message, *args):
        self.lines.append(("info", message % args))

    def error(self, message, *args):
        self.lines.append(("error", message % args))

    def warning(self, message, *args):
        self.lines.append(("warning", message % args))


@pytest.mark.parametrize("stopping", [False, True])
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_drain_report_is_logged_at_once_or_as_a_last_line_at_the_exit(monkeypatch, tmp_path, stopping, store):
    from types import SimpleNamespace

    from service.drain_reports import KEPT_BY_THE_STORE, LOST_WITH_IT

    conf = load_conf(monkeypatch, STORE="memory" if store == "memory" else f"sqlite:///{tmp_path / 'tasks.db'}")
    reports = SimpleNamespace(at_stop=[], take={11: "shutdown complete: drained", 12: None}.get)
    server = SimpleNamespace(
        drain_reports=reports,
        LISTENERS=[] if stopping else ["listener"],
        WORKERS={},
        log=_RecordedLog(),
        metrics_dir=None,
        metrics_dir_owned=False,
    )
    for pid in (11, 12):
        conf["child_exit"](server, SimpleNamespace(pid=pid))
    if stopping:
        assert server.log.lines == []  # kept for the exit, after gunicorn's own lines
        conf["on_exit"](server)
    # At the exit the summary is the line alone: the server's last lines, read as they are.
    named = "shutdown complete: drained" if stopping else "worker (pid:11) ended: shutdown complete: drained"
    # Without a report: an error where the tasks were the process's own, a warning where the store keeps them.
    missing = ("error", f"{LOST_WITH_IT} (pid 12)")
    if store == "sqlite":
        missing = ("warning", f"{KEPT_BY_THE_STORE} (pid 12)")
    assert server.log.lines == [("info", named), missing]


@pytest.mark.parametrize("one_killed", [False, True])
def test_workers_stopping_together_get_a_line_each_and_the_server_one_that_counts_the_store_once(
    monkeypatch, tmp_path, one_killed
):
    # `-w 2` on one store: two identical-looking summaries, no pid, each counting the 10 tasks the store still held.
    from types import SimpleNamespace

    from service.drain_reports import KEPT_BY_THE_STORE

    conf = load_conf(monkeypatch, STORE=f"sqlite:///{tmp_path / 'tasks.db'}")
    sent = {
        11: "shutdown complete: drained in 0.01 s; 10 queued, 0 running, 74 done, 11 failed, 12 cancelled; 0 abandoned",
        12: "shutdown complete: drained in 0.02 s; 10 queued, 0 running, 83 done, 12 failed, 8 cancelled; 1 abandoned",
        13: None if one_killed else "shutdown complete: drained in 0.00 s; 10 queued, 0 running, 0 done, 0 failed, "
        "0 cancelled; 0 abandoned",
    }  # fmt: skip
    reports = SimpleNamespace(at_stop=[], take=sent.get)
    server = SimpleNamespace(
        drain_reports=reports, LISTENERS=[], WORKERS={}, log=_RecordedLog(), metrics_dir=None, metrics_dir_owned=False
    )
    for pid in sent:
        conf["child_exit"](server, SimpleNamespace(pid=pid))
    conf["on_exit"](server)
    third = ("warning", f"{KEPT_BY_THE_STORE} (pid 13)") if one_killed else (
        "info", "worker (pid:13) drained in 0.00 s; 0 running, 0 done, 0 failed, 0 cancelled; 0 abandoned")  # fmt: skip
    added_up = "2 of 3 workers added up: 1 sent no report, see above" if one_killed else "3 workers added up"
    assert server.log.lines == [
        ("info", "worker (pid:11) drained in 0.01 s; 0 running, 74 done, 11 failed, 12 cancelled; 0 abandoned"),
        ("info", "worker (pid:12) drained in 0.02 s; 0 running, 83 done, 12 failed, 8 cancelled; 1 abandoned"),
        third,
        (
            "info",
            "shutdown complete: drained in 0.02 s; 10 queued, 0 running, 157 done, 23 failed, 20 cancelled; "
            f"1 abandoned ({added_up})",
        ),
    ]


@pytest.mark.parametrize(
    ("workers", "metrics_dir", "shared"),
    [(1, "", False), (2, "", True), (1, "recycled", True), (1, "given", True), (3, "given", True)],
)
def test_metrics_are_shared_with_several_workers_or_a_given_directory(
    monkeypatch, tmp_path, workers, metrics_dir, shared
):
    # "recycled": --max-requests runs a replacement beside the worker it replaces, whose counts stay in the sum
    from types import SimpleNamespace

    given = tmp_path / "metrics"
    given.mkdir()
    (given / "counts-7.json").write_text('{"row": {"accepted": 5}}')  # an earlier run's
    env = {"STORE": f"sqlite://{tmp_path / 'tasks.db'}", "METRICS_DIR": str(given) if metrics_dir == "given" else ""}
    conf = load_conf(monkeypatch, **env)
    max_requests = 100 if metrics_dir == "recycled" else 0
    cfg = SimpleNamespace(workers=workers, address=[], reuse_port=False, max_requests=max_requests, graceful_timeout=25)
    # (no address to check)
    server = SimpleNamespace(
        cfg=cfg, worker_class=DrainingThreadWorker, master_pid=0, reexec_pid=0, pidfile=None, log=_RecordedLog()
    )
    conf["on_starting"](server)
    try:
        assert (server.metrics_dir is not None) == shared
        if metrics_dir == "given":
            assert (server.metrics_dir, server.metrics_dir_owned) == (given, False)
            assert list(given.iterdir()) == []  # no old counts add to this run's
        elif shared:
            assert server.metrics_dir.is_dir() and server.metrics_dir_owned
        worker = SimpleNamespace(pid=12)
        conf["post_fork"](server, worker)
        assert worker.metrics_dir == server.metrics_dir
        if shared:
            (server.metrics_dir / "live-12.json").write_text("{}")
            server.drain_reports.take = lambda pid: None
            server.LISTENERS, server.log = ["listener"], _RecordedLog()
            conf["child_exit"](server, worker)
            assert not (server.metrics_dir / "live-12.json").exists()
    finally:
        if server.metrics_dir_owned:
            server.drain_reports.at_stop, server.WORKERS, server.log = [], {}, _RecordedLog()
            conf["on_exit"](server)
            assert not server.metrics_dir.exists()


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        # anyone could add counts to /metrics, or a FIFO that blocks every scrape
        ("metrics", "{given} is not a private directory"),
        ("file", "it is not a directory"),  # was "[Errno 17] File exists: '...'"
        ("file/metrics", "a part of its path is not a directory"),  # was "[Errno 20] Not a directory: '...'"
    ],
)
def test_a_metrics_dir_that_cannot_be_used_stops_gunicorn_with_one_line(monkeypatch, tmp_path, capsys, given, reason):
    from types import SimpleNamespace

    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics").chmod(0o777)
    (tmp_path / "file").write_text("")
    given = tmp_path / given
    conf = load_conf(monkeypatch, STORE=f"sqlite://{tmp_path / 'tasks.db'}", METRICS_DIR=str(given))
    cfg = SimpleNamespace(workers=2, address=[], reuse_port=False, max_requests=0, graceful_timeout=25)
    server = SimpleNamespace(
        cfg=cfg, worker_class=DrainingThreadWorker, master_pid=0, reexec_pid=0, pidfile=None, log=_RecordedLog()
    )
    with pytest.raises(SystemExit) as exited:
        conf["on_starting"](server)
    assert exited.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"configuration error: METRICS_DIR='{given}' is invalid: {reason.format(given=given)}")


@pytest.mark.parametrize("given", [False, True], ids=["own-directory", "METRICS_DIR"])
def test_a_binary_upgrade_shares_the_running_servers_metrics_directory(monkeypatch, tmp_path, given):
    from types import SimpleNamespace

    from service.metrics_share import INHERITED_METRICS_DIR

    metrics_dir = tmp_path / "metrics"
    env = {"STORE": f"sqlite://{tmp_path / 'tasks.db'}", "METRICS_DIR": str(metrics_dir) if given else ""}
    conf = load_conf(monkeypatch, **env)

    def server(master_pid):
        cfg = SimpleNamespace(workers=2, address=[], reuse_port=False, env_orig={}, max_requests=0, graceful_timeout=25)
        arbiter = SimpleNamespace(
            cfg=cfg, worker_class=DrainingThreadWorker, master_pid=master_pid, reexec_pid=0, pidfile=None
        )
        arbiter.WORKERS, arbiter.log = {}, _RecordedLog()
        conf["on_starting"](arbiter)
        arbiter.drain_reports.at_stop = []
        return arbiter

    old = server(master_pid=0)
    conf["pre_exec"](old)  # in the new server's process, just before gunicorn runs it
    for name, value in old.cfg.env_orig.items():
        monkeypatch.setenv(name, value)
    assert (INHERITED_METRICS_DIR in old.cfg.env_orig) is not given  # METRICS_DIR passes by itself
    (old.metrics_dir / "counts-7.json").write_text('{"row": {"accepted": 5}}')  # an old worker's
    old.reexec_pid = 4321
    new = server(master_pid=1234)
    try:
        assert new.metrics_dir == old.metrics_dir
        assert (old.metrics_dir / "counts-7.json").exists()  # the running server's counts are kept
        conf["on_exit"](old)  # the old server stops, the new one still publishes there
        assert new.metrics_dir.is_dir()
        new.master_pid = 0  # promoted
        conf["on_exit"](new)
        assert new.metrics_dir.exists() is given  # the last one removes a directory of its own
    finally:
        monkeypatch.delenv(INHERITED_METRICS_DIR, raising=False)


@pytest.mark.parametrize(
    ("setting", "said"),
    [
        # A root path no request path can begin with: it started, and answered every request 500 (later 404).
        ({"SCRIPT_NAME": "wp"}, "configuration error: SCRIPT_NAME='wp' is invalid: "),
        (
            {"QUEUE_SIZE": "0"},
            "configuration error: QUEUE_SIZE='0' is invalid: must be an integer from 1 to 1000000",
        ),
    ],
    ids=["root-path", "queue-size"],
)
def test_a_bad_setting_stops_gunicorn_with_exit_code_2(tmp_path, setting, said):
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", CONF, "-b", "127.0.0.1:0"],
        cwd=tmp_path,
        env=clean_environment(**setting),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert said in result.stderr


@pytest.mark.parametrize("where", ["command line", "GUNICORN_CMD_ARGS"])
def test_a_setting_given_to_gunicorns_env_option_stops_it_without_showing_the_value(tmp_path, where):
    # gunicorn sets -e's variables after the settings are read: the token was dropped and the task endpoints
    # ran open, and at LOG_LEVEL=debug gunicorn's configuration line showed it.
    token = "SeCrEtToKeN-abcdef-123456"
    options = ["-e", f"API_TOKEN={token}", "--env=LOG_FORMAT=json", "-e", "HANDLER_OWN=1"]
    argv, env = ([*options], {}) if where == "command line" else ([], {"GUNICORN_CMD_ARGS": shlex.join(options)})
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", CONF, "-b", "127.0.0.1:0", *argv],
        cwd=tmp_path,
        env=clean_environment(LOG_LEVEL="DEBUG", **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "configuration error: -e API_TOKEN=..., -e LOG_FORMAT=... would not be taken: gunicorn sets its -e/--env "
        "variables only after the settings are read, so API_TOKEN, LOG_FORMAT would silently keep the value of the "
        "environment or .env; set API_TOKEN, LOG_FORMAT there instead and drop the -e (in GUNICORN_CMD_ARGS too)"
    ]
    assert token not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("option", "said"),
    [
        ("SCRIPT_NAME=wp", "configuration error: -e SCRIPT_NAME='wp' is invalid: must begin with /"),
        ("LISTEN_FDS=abc", "configuration error: -e LISTEN_FDS='abc' is invalid: must be an integer"),
    ],
)
def test_a_bad_value_of_a_variable_gunicorn_reads_itself_given_to_its_env_option_stops_it_in_one_line(
    tmp_path, option, said
):
    # Checked in the environment, not in -e: SCRIPT_NAME=wp left a server that answered every request with an
    # error, and LISTEN_FDS=abc ended the start in gunicorn's traceback, exit code 1.
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", CONF, "-b", "127.0.0.1:0", "-e", option],
        cwd=tmp_path,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith(said)


# -- the real server -------------------------------------------------------------


@pytest.mark.e2e
def test_idle_connections_within_worker_connections_leave_a_sqlite_worker_running(tmp_path):
    # A soft limit of 1024 (systemd's default) under a higher hard one: 200 task threads hold about
    # 400 SQLite files, and 800 idle connections made accept() fail with EMFILE, which ended the worker.
    command = ["prlimit", "--nofile=1024:20000", sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    server = ServerProcess(
        [*command, "-b", "127.0.0.1:0"],
        python=False,
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(STORE=f"sqlite://{tmp_path / 'tasks.db'}", WORKERS="200"),
    )
    sockets = []
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        [worker] = worker_pids(server.proc.pid)
        limits = Path(f"/proc/{worker}/limits").read_text()
        assert [line.split()[3:5] for line in limits.splitlines() if line.startswith("Max open files")] == [
            ["1688", "20000"]
        ]
        for _ in range(800):
            sock = socket.create_connection(("127.0.0.1", client.port), timeout=5)
            sock.sendall(b"POST /enqueue HTTP/1.1\r\nHost: a\r\n")  # and nothing more
            sockets.append(sock)
        wait_until(lambda: len(os.listdir(f"/proc/{worker}/fd")) > 1000, timeout=20, what="the connections")
        assert client.request("GET", "/healthz")[0] == 200
        assert worker_pids(server.proc.pid) == {worker}
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
    assert "Too many open files" not in server.log()


def start_gunicorn(tmp_path, **env: str) -> ServerProcess:
    return ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(**env),
    )


@pytest.mark.e2e
def test_gunicorn_s_debug_line_for_each_request_carries_the_id_of_its_answer(tmp_path):
    # It had none: at LOG_LEVEL=DEBUG, grep <request id> missed the one line a request that hangs leaves.
    server = start_gunicorn(tmp_path, LOG_LEVEL="DEBUG")
    try:
        port = server.wait_for_port(LISTENING)
        given = {"none": [], "sane": ["rid-sane-1"], "bad": ["two words"], "repeated": ["rid-a", "rid-b"]}
        answered = {}
        for case, ids in given.items():
            fields = "".join(f"X-Request-ID: {value}\r\n" for value in ids)
            head = f"GET /healthz?case={case} HTTP/1.1\r\nHost: x\r\n{fields}Connection: close\r\n\r\n"
            answer = half_closed_exchange(port, head.encode()).decode("latin-1")
            assert answer.startswith("HTTP/1.1 200"), answer
            answered[case] = re.search(r"(?im)^X-Request-ID: (\S+)\r$", answer).group(1)
        assert answered["sane"] == "rid-sane-1"
        assert len(set(answered.values())) == 4  # the others are new ids, each its own

        def debug_lines() -> list[str]:
            return [line for line in server.log().splitlines() if "[DEBUG] gunicorn.error: GET /healthz" in line]

        wait_until(lambda: len(debug_lines()) == 4, timeout=20, what="a DEBUG line for each request")
        assert [line.rpartition(" request_id=")[2] for line in debug_lines()] == list(answered.values())
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_gunicorn_serves_tasks_to_their_final_states(tmp_path, store):
    server = start_gunicorn(
        tmp_path,
        STORE=f"sqlite://{tmp_path / 'tasks.db'}" if store == "sqlite" else "memory",
        WORK_MIN_MS="1",
        WORK_MAX_MS="5",
        FAILURE_RATE="0.5",
        BACKOFF_BASE_MS="1",
        BACKOFF_CAP_MS="5",
        MAX_BODY_BYTES="1024",
        MAX_PAYLOAD_CHARS="512",
        SHUTDOWN_TIMEOUT_S="5",
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        ids = [f"task-{n}" for n in range(20)]
        for task_id in ids:
            # Sent like `curl -d`: a form Content-Type, parsed as JSON all the same.
            status, headers, _ = client.request(
                "POST",
                "/enqueue",
                json.dumps({"id": task_id, "payload": "p", "max_retries": 3}).encode(),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert (status, headers["Location"]) == (202, f"/tasks/{task_id}")

        def all_final() -> bool:
            states = [client.json("GET", f"/tasks/{task_id}")[1]["state"] for task_id in ids]
            return all(state in ("done", "failed") for state in states)

        wait_until(all_final, timeout=20, what="every task to finish")
        status, listing = client.json("GET", "/tasks?limit=1000")
        assert status == 200
        assert sorted(task["id"] for task in listing["tasks"]) == sorted(ids)
        assert client.json("POST", "/enqueue", b'{"id": "task-0", "payload": ""}')[0] == 409
        assert client.json("GET", "/tasks/missing")[0] == 404

        # A chunked body over the limit is refused, not truncated.
        chunks = iter([b'{"id": "big", "payload": "', b"x" * 2000, b'"}'])
        status, headers, _ = client.request("POST", "/enqueue", chunks, encode_chunked=True)
        assert (status, headers["Content-Type"]) == (413, "application/problem+json")
        assert client.json("GET", "/tasks/big")[0] == 404

        status, _, metrics = client.request("GET", "/metrics")
        assert status == 200
        assert "workerpool_tasks_accepted_total 20.0" in metrics

        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    log = server.log()
    assert "Booting worker" in log
    assert "Traceback" not in log


@pytest.mark.e2e
@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_web_concurrency_sets_the_worker_processes_on_a_shared_store_and_is_named_where_not_taken(tmp_path, store):
    # gunicorn takes WEB_CONCURRENCY (set by platforms such as Heroku) as its default for -w; the
    # `workers` of a configuration file hid it, and nothing said so.
    env = {"STORE": f"sqlite://{tmp_path / 'tasks.db'}"} if store == "sqlite" else {}
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(WEB_CONCURRENCY="2", **env),
    )
    try:
        server.wait_for_port(LISTENING)
        wanted = 2 if store == "sqlite" else 1
        wait_until(lambda: server.log().count("Booting worker") == wanted, timeout=30, what="the workers")
        assert len(worker_pids(server.proc.pid)) == wanted
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    log = server.log()
    assert log.count("Booting worker") == wanted
    not_taken = "WEB_CONCURRENCY=2 not taken: with STORE=memory each worker process would keep its own tasks"
    assert (not_taken in log) == (store == "memory")
    assert "Traceback" not in log


@pytest.mark.e2e
def test_with_log_format_json_every_line_gunicorn_and_the_app_write_is_json(tmp_path):
    server = start_gunicorn(
        tmp_path, LOG_FORMAT="json", LOG_LEVEL="DEBUG", WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0"
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        status, headers, _ = client.request(
            "POST", "/enqueue", b'{"id": "j1", "payload": ""}', headers={"X-Request-ID": "rid-e2e"}
        )
        assert (status, headers["X-Request-ID"]) == (202, "rid-e2e")
        wait_until(lambda: client.json("GET", "/tasks/j1")[1]["state"] == "done", timeout=10, what="j1 to finish")
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    records = [json.loads(line) for line in server.log().splitlines()]  # every line, or this raises
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "gunicorn.access", "workerpool.pool"} <= loggers
    (access,) = [r for r in records if r["logger"] == "gunicorn.access" and r.get("path") == "/enqueue"]
    assert (access["method"], access["status"], access["request_id"]) == ("POST", 202, "rid-e2e")
    task_lines = [r for r in records if r["task_id"] == "j1"]
    messages = [r["message"] for r in task_lines]
    assert messages == ["task j1 queued", "task j1 attempt 1 started", "task j1 done after 1 attempt(s)"]
    assert {r["request_id"] for r in task_lines} == {"rid-e2e"}


def project_copy(tmp_path: Path) -> Path:
    """A copy of the project's top-level modules, so that a test has a .env of its own (config.DOTENV_PATH)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("app.py", "config.py", "gunicorn.conf.py", "server_settings.py"):
        (project / name).write_bytes((PROJECT_ROOT / name).read_bytes())
    for name in ("service", "workerpool", "handlers"):
        (project / name).symlink_to(PROJECT_ROOT / name)
    return project


@pytest.mark.e2e
def test_a_reload_refuses_a_bad_value_in_dotenv_keeps_serving_and_takes_a_good_one(tmp_path):
    project = project_copy(tmp_path)
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            STORE=f"sqlite://{tmp_path / 'tasks.db'}", WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0"
        ),
        cwd=project,
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        (first,) = wait_until(lambda: worker_pids(arbiter), timeout=20, what="the worker")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        assert client.json("POST", "/enqueue", b'{"id": "before", "payload": ""}')[0] == 202

        (project / ".env").write_text("QUEUE_SIZE=oops\n")  # the real environment would win over .env
        os.kill(arbiter, signal.SIGHUP)  # what logrotate or `systemctl reload` send
        wait_until(lambda: "reload refused" in server.log(), timeout=20, what="the refusal")
        # The worker goes on: gunicorn's reload, which would replace it, did not begin.
        assert worker_pids(arbiter) == {first}
        assert server.proc.poll() is None
        assert client.request("GET", "/healthz")[0] == 200
        assert client.json("POST", "/enqueue", b'{"id": "after", "payload": ""}')[0] == 202

        (project / ".env").write_bytes(b"WORKERS=3\n\xff=1\n")  # not UTF-8: it cannot be read at all
        os.kill(arbiter, signal.SIGHUP)
        wait_until(lambda: server.log().count("reload refused") == 2, timeout=20, what="the second refusal")
        assert "line 2 is not UTF-8 text" in server.log()
        assert worker_pids(arbiter) == {first}

        (project / ".env").write_text("WORKERS=2\n")
        os.kill(arbiter, signal.SIGHUP)
        wait_until(lambda: f"worker (pid:{first}) ended" in server.log(), timeout=20, what="the first worker's end")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        states = lambda: {client.json("GET", f"/tasks/{t}")[1]["state"] for t in ("before", "after")}  # noqa: E731
        wait_until(lambda: states() == {"done"}, timeout=10, what="both tasks to finish")
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    log = server.log()
    refusals = [line for line in log.splitlines() if "reload refused" in line]
    assert "[ERROR] gunicorn.error: reload refused: QUEUE_SIZE='oops' is invalid" in refusals[0]
    assert f"[ERROR] gunicorn.error: reload refused: {project / '.env'} line 2 is not UTF-8 text" in refusals[1]
    assert len(refusals) == 2
    pools = [line.partition("pool started: ")[2] for line in log.splitlines() if "pool started: " in line]
    assert pools == ["4 worker thread(s), queue of 64", "2 worker thread(s), queue of 64"]
    assert "Traceback" not in log
    assert log.rstrip().endswith("0 abandoned")  # the arbiter's drain summary, its last line


@pytest.mark.e2e
def test_a_reload_to_the_memory_store_with_two_worker_processes_is_refused_and_both_keep_serving(tmp_path):
    project = project_copy(tmp_path)
    (project / ".env").write_text(f"STORE=sqlite://{tmp_path / 'tasks.db'}\n")
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(),
        cwd=project,
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        first = wait_until(lambda: len(pids := worker_pids(arbiter)) == 2 and pids, timeout=20, what="two workers")
        (project / ".env").write_text("")  # STORE back to its default, memory
        os.kill(arbiter, signal.SIGHUP)
        wait_until(lambda: "reload refused" in server.log(), timeout=20, what="the refusal")
        # The two workers go on, on the SQLite file still: gunicorn's reload did not begin.
        assert worker_pids(arbiter) == first
        assert client.request("GET", "/healthz")[0] == 200
        assert client.json("GET", "/dashboard/live")[1]["store"] == "sqlite"
        assert server.proc.poll() is None
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    log = server.log()
    (refusal,) = [line for line in log.splitlines() if "refused" in line or "not adding" in line]
    assert "reload refused: 2 worker processes would each keep their own tasks with STORE=memory" in refusal
    assert "Traceback" not in log


@pytest.mark.e2e
def test_a_reload_to_a_port_in_use_or_a_foreign_host_is_refused_and_the_server_keeps_its_port(tmp_path):
    """gunicorn closes its listeners before binding a new address and exits if that fails: checked before."""
    project = project_copy(tmp_path)
    (project / ".env").write_text("HOST=127.0.0.1\nPORT=0\n")  # no -b: the address comes from the settings
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(WORK_MIN_MS="0", WORK_MAX_MS="0"),
        cwd=project,
    )
    try:
        with socket.create_server(("127.0.0.1", 0)) as other:  # another server's port
            taken = other.getsockname()[1]
            client = Client(server.wait_for_port(LISTENING))
            arbiter = server.proc.pid
            wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
            for n, settings in enumerate((f"HOST=127.0.0.1\nPORT={taken}", "HOST=203.0.113.5\nPORT=0"), start=1):
                (project / ".env").write_text(f"{settings}\n")
                os.kill(arbiter, signal.SIGHUP)
                wait_until(lambda: server.log().count("reload refused") == n, timeout=20, what="the refusal")  # noqa: B023
                wait_until(lambda: len(worker_pids(arbiter)) == 1, timeout=20, what="the next worker")
                wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
                assert server.proc.poll() is None
        assert server.terminate(timeout=30) == 0
    finally:
        server.stop()
    log = server.log()
    refusals = [line.partition("[ERROR] gunicorn.error: ")[2] for line in log.splitlines() if "reload refused" in line]
    assert [refusal.partition(";")[0] for refusal in refusals] == [
        f"reload refused: PORT={taken} is already in use on 127.0.0.1: another server listens there",
        "reload refused: HOST='203.0.113.5' cannot be listened on: it is not an address of this machine",
    ]
    assert "Connection in use" not in log and "Traceback" not in log


@pytest.mark.parametrize(("store", "warned"), [("memory", True), ("sqlite", False)])
def test_a_reload_warns_that_the_memory_store_forgets_every_task(monkeypatch, tmp_path, store, warned):
    conf = load_conf(monkeypatch, STORE=f"sqlite://{tmp_path / 'tasks.db'}" if store == "sqlite" else store)
    warnings: list[str] = []
    infos: list[str] = []

    class Log:
        def warning(self, message, *args):
            warnings.append(message % args if args else message)

        def info(self, message, *args):
            infos.append(message % args if args else message)

    cfg = type("Cfg", (), {"graceful_timeout": 25})()
    conf["on_reload"](type("Arbiter", (), {"log": Log(), "cfg": cfg})())
    assert bool(warnings) == warned
    # Said at every reload: gunicorn documents HUP as loading the new code when the app is not preloaded.
    assert infos == [
        "reload: the new workers take the settings read again and run the code loaded when the server started "
        "(new code takes kill -USR2, a binary upgrade, or a restart)"
    ]
    if warned:
        assert "empty task table" in warnings[0] and "404" in warnings[0]


@pytest.mark.parametrize(
    ("store", "old_arbiter", "refused"),
    [("memory", 4711, "with STORE=memory"), ("sqlite", 4711, None), ("sqlite", 1, "that is PID 1")],
    ids=["memory", "sqlite", "sqlite-under-pid-1"],
)
def test_a_binary_upgrade_is_refused_by_the_new_server_on_the_memory_store_or_under_pid_1(
    monkeypatch, tmp_path, capsys, store, old_arbiter, refused
):
    # As PID 1 (a container's command) the old server's exit ends every process of the container, the new one too.
    conf = load_conf(monkeypatch, STORE=f"sqlite://{tmp_path / 'tasks.db'}" if store == "sqlite" else store)
    (pidfile := tmp_path / "gunicorn.pid.2").write_text(f"{os.getpid()}\n")

    class Pidfile:
        pid = os.getpid()
        unlink = lambda self: pidfile.unlink()  # noqa: E731

    class Arbiter:  # what `kill -USR2` started: gunicorn sets master_pid, the first server's pid
        cfg = type("Cfg", (), {"workers": 1, "max_requests": 0, "graceful_timeout": 25})()
        worker_class = DrainingThreadWorker
        master_pid = old_arbiter
        pidfile = Pidfile()
        log = _RecordedLog()

    if refused:
        with pytest.raises(SystemExit) as exited:
            conf["on_starting"](Arbiter)
        assert exited.value.code == 2
        assert not pidfile.exists()
        line = capsys.readouterr().err
        assert line.startswith("configuration error: a binary upgrade (kill -USR2)") and refused in line, line
    else:
        conf["on_starting"](Arbiter)
        assert pidfile.exists()


@pytest.mark.parametrize(("store", "kept"), [("memory", 1), ("sqlite", 2)])
def test_ttin_adds_a_worker_process_only_with_a_shared_store(monkeypatch, tmp_path, store, kept):
    conf = load_conf(monkeypatch, STORE=f"sqlite://{tmp_path / 'tasks.db'}" if store == "sqlite" else store)
    errors: list[str] = []

    class Arbiter:
        log = type("Log", (), {"error": lambda self, message, *args: errors.append(message % args)})()
        num_workers = 2  # what gunicorn's TTIN handler set; the hook runs after

    conf["nworkers_changed"](Arbiter, 2, 1)
    assert Arbiter.num_workers == kept
    assert bool(errors) == (store == "memory")


@pytest.mark.parametrize(("new", "old"), [(2, 2), (1, 2), (2, 3)])
def test_a_count_that_does_not_grow_is_not_checked_again(monkeypatch, new, old):
    conf = load_conf(monkeypatch)  # STORE=memory: a growing count would be refused

    class Arbiter:
        log = None  # nothing to log
        num_workers = new  # a reload sets the same count again; TTOU lowers it

    conf["nworkers_changed"](Arbiter, new, old)
    assert Arbiter.num_workers == new


class _Arbiter:
    """What gunicorn's Arbiter.manage_workers and kill_workers use, with a reload that does what gunicorn's does
    to the workers (spawn the new ones, manage_workers) and notes the workers its wait for the old ones sees."""

    _last_logged_active_worker_count = None
    cfg = type("Cfg", (), {"enable_backlog_metric": False})()
    log = type("Log", (), {"debug": lambda self, *args, **kwargs: None})()

    def __init__(self, num_workers: int, *ages: int) -> None:
        from gunicorn.arbiter import Arbiter

        self.num_workers = num_workers
        self.WORKERS = {10 + age: type("W", (), {"age": age})() for age in ages}
        self.worker_age = max(ages)
        self.killed: list[tuple[int, int]] = []
        self.spawned = 0
        self.seen_by_the_reload_wait: set[int] | None = None
        self.manage_workers = Arbiter.manage_workers.__get__(self)
        self.kill_workers = Arbiter.kill_workers.__get__(self)

    def kill_worker(self, pid, sig):
        self.killed.append((pid, sig))

    def spawn_workers(self):
        self.spawned += 1

    def reload(self):
        for _ in range(self.num_workers):
            self.worker_age += 1
            self.WORKERS[10 + self.worker_age] = type("W", (), {"age": self.worker_age})()
        self.manage_workers()
        self.seen_by_the_reload_wait = set(self.WORKERS)  # it waits while one of these is older than the new ones


def test_a_worker_past_the_count_is_told_to_stop_once_and_not_counted_while_it_drains(monkeypatch):
    # gunicorn sent it SIGTERM again on each turn of its loop (after kill -TTOU): the worker took the second for an
    # operator's "stop waiting" and abandoned its running tasks a second into the drain.
    conf = load_conf(monkeypatch)
    server = _Arbiter(1, 1, 2)  # kill -TTOU lowered the count from 2
    conf["_hook_arbiter"](server)
    for _ in range(3):  # three turns of the arbiter's loop while worker 11 drains
        server.manage_workers()
        assert set(server.WORKERS) == {11, 12}
    assert server.killed == [(11, signal.SIGTERM)]
    assert server.spawned == 0
    del server.WORKERS[11]  # it exited and was reaped
    server.num_workers = 2  # kill -TTIN
    server.manage_workers()
    assert server.retiring == set() and server.spawned == 1 and len(server.killed) == 1


def test_a_stop_does_not_signal_a_draining_worker_again_but_quick_stop_and_kill_reach_it(monkeypatch):
    # After kill -TTOU (or a reload), the stop's SIGTERM to every worker was the draining one's second signal:
    # it abandoned its running tasks at once.
    conf = load_conf(monkeypatch)
    server = _Arbiter(1, 1, 2)
    conf["_hook_arbiter"](server)
    server.manage_workers()
    server.kill_workers(signal.SIGTERM)  # the arbiter's stop
    server.kill_workers(signal.SIGTERM)  # not again either
    assert server.killed == [(11, signal.SIGTERM), (12, signal.SIGTERM)]
    server.kill_workers(signal.SIGQUIT)  # SIGINT to the arbiter during the stop: stop now
    server.kill_workers(signal.SIGKILL)  # graceful_timeout passed
    assert server.killed[2:] == [(11, signal.SIGQUIT), (12, signal.SIGQUIT), (11, signal.SIGKILL), (12, signal.SIGKILL)]


def test_a_reload_does_not_wait_for_the_old_workers_it_stopped(monkeypatch):
    # gunicorn's reload waited for them to end (up to graceful_timeout) inside the handling of the HUP: the arbiter
    # read no signal meanwhile, so a SIGTERM was acted on only once the old worker had drained.
    conf = load_conf(monkeypatch)
    monkeypatch.setattr(conf["_server_settings"], "check_reload", lambda: True)
    server = _Arbiter(2, 1, 2)
    conf["_hook_arbiter"](server)
    server.reload()
    assert server.seen_by_the_reload_wait == {13, 14}  # the new ones only: its wait ends at once
    assert set(server.WORKERS) == {11, 12, 13, 14} and server.retiring == {11, 12}  # back in sight once it returned
    assert server.killed == [(11, signal.SIGTERM), (12, signal.SIGTERM)]
    server.manage_workers()  # the next turns of the loop neither count them nor signal them again
    server.kill_workers(signal.SIGTERM)  # nor does a stop
    assert server.killed[2:] == [(13, signal.SIGTERM), (14, signal.SIGTERM)]
    assert set(server.WORKERS) == {11, 12, 13, 14} and server.spawned == 0


def submit_running(client, count):
    """Submit tasks t0.. t<count - 1> (no retries) and wait until every one's attempt runs."""
    for n in range(count):
        body = json.dumps({"id": f"t{n}", "payload": n, "max_retries": 0}).encode()
        assert client.request("POST", "/enqueue", body, headers={"Content-Type": "application/json"})[0] == 202
    wait_until(lambda: len(client.json("GET", "/tasks?state=running")[1]["tasks"]) == count, timeout=20,
               what="every attempt running")  # fmt: skip


def test_a_worker_stopping_by_itself_is_replaced_at_once_and_never_told_to_stop(monkeypatch):
    # With -w 2 and --max-requests both workers stopped together, and gunicorn forked their replacements only when
    # they had exited, after their drains: nothing served meanwhile (up to SHUTDOWN_TIMEOUT_S).
    from gunicorn.arbiter import Arbiter

    from service.drain_reports import RETIRING, DrainReports, send

    conf = load_conf(monkeypatch)
    reports = DrainReports()
    server = SimpleNamespace(
        num_workers=2, _last_logged_active_worker_count=None, cfg=SimpleNamespace(enable_backlog_metric=False),
        log=SimpleNamespace(debug=lambda *args, **kwargs: None), WORKERS={11: SimpleNamespace(age=1),
        os.getpid(): SimpleNamespace(age=2)}, retiring=set(), held={}, killed=[], spawned=[], drain_reports=reports,
    )  # fmt: skip
    server.kill_worker = lambda pid, sig: server.killed.append((pid, sig))
    server.spawn_workers = lambda: server.spawned.append(server.num_workers - len(server.WORKERS))
    manage = conf["_manage_workers_stopping_each_once"]
    try:
        manage(server, Arbiter.manage_workers.__get__(server))
        assert server.spawned == [] and server.killed == []
        assert send(reports.write_fd, RETIRING)  # this process plays the worker that reached max_requests
        manage(server, Arbiter.manage_workers.__get__(server))
        assert server.spawned == [1]  # its replacement, while it drains
        assert server.retiring == {os.getpid()} and set(server.WORKERS) == {11, os.getpid()}
        assert server.killed == []
    finally:
        os.close(reports.write_fd)
        os.close(reports._read_fd)


@pytest.mark.e2e
@pytest.mark.parametrize("processes", [1, 2])
def test_max_requests_forks_the_replacement_when_the_worker_begins_its_drain(tmp_path, processes):
    server = start_gunicorn(
        tmp_path, STORE=f"sqlite://{tmp_path / 'tasks.db'}", WEB_CONCURRENCY=str(processes), WORKERS="2",
        WORK_MIN_MS="8000", WORK_MAX_MS="8000", FAILURE_RATE="0", GUNICORN_CMD_ARGS=f"--max-requests {6 * processes}",
    )  # fmt: skip
    tasks = 2 * processes
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        wait_until(lambda: len(worker_pids(arbiter)) == processes, timeout=20, what="the workers")
        # Two attempts at a time in each process: each has two running when it reaches max_requests.
        submit_running(client, tasks)
        wait_until(lambda: client.request("GET", "/healthz") and "Autorestarting" in server.log(), timeout=20,
                   what="a worker to reach max_requests")  # fmt: skip
        wait_until(lambda: server.log().count("Booting worker") > processes, timeout=20, what="a replacement")
        assert "ended: " not in server.log()  # forked while the retiring worker still drains its 8 s attempts
        wait_until(lambda: all(client.json("GET", f"/tasks/t{n}")[1]["state"] == "done" for n in range(tasks)),
                   timeout=30, what="every task done")  # fmt: skip
        wait_until(lambda: "ended: shutdown complete" in server.log(), timeout=30, what="the retired worker's drain")
        log = server.log()
        assert "SIGTERM again" not in log and "abandoned at shutdown" not in log
    finally:
        server.stop()


@pytest.mark.e2e
def test_ttou_drains_the_running_tasks_of_the_worker_it_stops(tmp_path):
    # The worker stopped got SIGTERM again a second into its drain and abandoned its running tasks (failed).
    server = start_gunicorn(
        tmp_path, STORE=f"sqlite://{tmp_path / 'tasks.db'}", WEB_CONCURRENCY="2", WORKERS="2",
        WORK_MIN_MS="3000", WORK_MAX_MS="3000", FAILURE_RATE="0", SHUTDOWN_TIMEOUT_S="20",
    )  # fmt: skip
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        wait_until(lambda: len(worker_pids(arbiter)) == 2, timeout=20, what="two workers")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        # Two attempts at a time in each process: every one runs, whichever process took it.
        submit_running(client, 4)
        os.kill(arbiter, signal.SIGTTOU)
        wait_until(lambda: "ended: shutdown complete" in server.log(), timeout=30, what="the stopped worker's drain")
        wait_until(lambda: all(client.json("GET", f"/tasks/t{n}")[1]["state"] == "done" for n in range(4)),
                   timeout=30, what="every task done")  # fmt: skip
        log = server.log()
        assert "SIGTERM again" not in log
        assert "; 0 abandoned" in log
    finally:
        server.stop()


@pytest.fixture
def stop_handlers_kept():
    """The test process's stop-signal handlers as they were: worker_exit leaves the stop signals ignored."""
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
    handlers = [signal.getsignal(stop) for stop in stops]
    yield
    for stop, handler in zip(stops, handlers, strict=True):
        signal.signal(stop, handler)


def test_a_worker_whose_drain_is_over_ignores_stop_signals_until_it_has_exited(
    monkeypatch, tmp_path, stop_handlers_kept
):
    # Python's exit gives the signals the worker handles their default action back before the process ends:
    # the arbiter's stop reaching a worker that had drained by itself (--max-requests) then killed it, and
    # gunicorn logged "Worker (pid:N) was sent SIGTERM!" for a clean exit.
    conf = load_conf(monkeypatch)
    seen_during_the_drain: list = []

    class Controller:
        def request_stop(self, signum):
            pass

        def join(self, timeout=None):
            seen_during_the_drain.extend(signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT))
            return True

        def wait_for_threads(self):
            return []

    def handler(signum, frame):
        pass

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    store = SimpleNamespace(closed=False)
    store.close = lambda: setattr(store, "closed", True)
    app = SimpleNamespace(extensions={"workerpool": SimpleNamespace(pool=SimpleNamespace(store=store))})
    cfg = SimpleNamespace(graceful_timeout=conf["graceful_timeout"])
    with (tmp_path / "tmp").open("wb") as heartbeat:
        worker = SimpleNamespace(
            controller=Controller(), cfg=cfg, metrics_dir=None, heartbeat_fd=heartbeat.fileno(), wsgi=app
        )
        conf["worker_exit"](None, worker)
    assert seen_during_the_drain == [handler, handler]  # a second signal still stops waiting
    assert store.closed
    assert [signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)] == [signal.SIG_IGN] * 3


def test_a_worker_draining_in_its_exit_hook_tells_the_arbiter_it_is_alive_until_the_drain_could_have_ended(
    monkeypatch, tmp_path, stop_handlers_kept
):
    # gunicorn closes worker.tmp before worker_exit; the arbiter killed a worker silent for --timeout s (30 by
    # default) in the middle of a longer drain (kill -TTOU, --max-requests): its running attempts were lost.
    import time

    conf = load_conf(monkeypatch, SHUTDOWN_TIMEOUT_S="10")
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    seen: list[float] = []  # the file's time at each wait, as the arbiter reads it

    class Controller:
        def request_stop(self, signum):
            pass

        def join(self, timeout=None):  # drained after 20 s: past the drain's 10 s and the margin
            seen.append(os.fstat(heartbeat.fileno()).st_mtime)
            clock[0] += 20 if timeout is None else timeout
            return timeout is None or len(seen) == 20

        def wait_for_threads(self):
            return []

    with (tmp_path / "tmp").open("wb") as heartbeat:
        os.utime(heartbeat.fileno(), (0.0, 0.0))
        cfg = SimpleNamespace(graceful_timeout=conf["graceful_timeout"])
        store = SimpleNamespace(closed=False)
        store.close = lambda: setattr(store, "closed", True)
        app = SimpleNamespace(extensions={"workerpool": SimpleNamespace(pool=SimpleNamespace(store=store))})
        worker = SimpleNamespace(
            controller=Controller(), cfg=cfg, metrics_dir=None, heartbeat_fd=heartbeat.fileno(), wsgi=app
        )
        conf["worker_exit"](None, worker)
    assert store.closed  # once the drain is over
    alive_for = 10 + conf["DRAIN_MARGIN_S"]
    assert seen[: alive_for + 1] == [1000.0 + n for n in range(alive_for)] + [1000.0 + alive_for - 1]
    assert set(seen[alive_for:]) == {1000.0 + alive_for - 1}  # a drain hung past its deadline is left to --timeout


@pytest.mark.e2e
def test_a_worker_stopped_by_ttou_drains_past_gunicorns_timeout(tmp_path):
    # The arbiter killed it --timeout s into its drain (WORKER TIMEOUT): its running attempts failed "lost".
    server = start_gunicorn(
        tmp_path, STORE=f"sqlite://{tmp_path / 'tasks.db'}", WEB_CONCURRENCY="2", WORKERS="2",
        WORK_MIN_MS="7000", WORK_MAX_MS="7000", FAILURE_RATE="0", GUNICORN_CMD_ARGS="--timeout 3",
    )  # fmt: skip
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        wait_until(lambda: len(worker_pids(arbiter)) == 2, timeout=20, what="two workers")
        submit_running(client, 4)
        os.kill(arbiter, signal.SIGTTOU)
        wait_until(lambda: "ended: " in server.log() or "killed?" in server.log(), timeout=30,
                   what="the stopped worker's end")  # fmt: skip
        wait_until(lambda: all(client.json("GET", f"/tasks/t{n}")[1]["state"] in ("done", "failed") for n in range(4)),
                   timeout=60, what="every task finished")  # fmt: skip
        assert [client.json("GET", f"/tasks/t{n}")[1]["state"] for n in range(4)] == ["done"] * 4
        log = server.log()
        assert "WORKER TIMEOUT" not in log
        assert "ended: shutdown complete" in log and "; 0 abandoned" in log
    finally:
        server.stop()


def test_a_worker_is_forked_with_the_stop_signals_blocked(monkeypatch):
    # Sent to a process just forked, before it ran, a SIGTERM was lost (Python clears a child's pending signals,
    # and the arbiter's inherited handler only queued it): the new worker went on serving after a stop.
    from service.gunicorn_worker import STOP_SIGNALS

    conf = load_conf(monkeypatch)
    held_during: list[set[int]] = []

    def spawn_worker():
        held_during.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        return 4711

    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert conf["_spawn_worker_holding_stop_signals"](spawn_worker) == 4711
    assert set(STOP_SIGNALS) <= held_during[0]
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_the_line_for_a_client_that_stops_reading_names_its_request_and_leaves_out_the_api_token(monkeypatch):
    token = "0123456789abcdef-token"
    said = []
    worker = DrainingThreadWorker.__new__(DrainingThreadWorker)
    worker.log = SimpleNamespace(token=token, warning=lambda text, *args, extra: said.append((text % args, extra)))
    worker.request_timeout, worker.nr, worker.max_requests = 1.0, 0, 100

    def stops_reading(self, req, conn):
        req.response = SimpleNamespace(headers=[("Content-Type", "application/json"), ("X-Request-ID", "stalled-1")])
        raise TimeoutError

    monkeypatch.setattr(ThreadWorker, "handle_request", stops_reading)
    req = SimpleNamespace(method="GET", path=f"/tasks/{token}", version=(1, 1), headers=[("HOST", "a")])
    conn = SimpleNamespace(sock=socket.socket(), client=("127.0.0.1", 40000))
    try:
        assert worker.handle_request(req, conn) is False
    finally:
        conn.sock.close()
    assert said == [
        (
            "closed the connection from 127.0.0.1:40000: it took nothing of the response to GET /tasks/REDACTED"
            " for 1 s",
            {"request_id": "stalled-1"},  # the warning carries the request's id, as its access line does
        )
    ]
    assert req.response is None  # the request lets go of its response


class StallingSocket:
    """A response's socket whose client takes ``took`` bytes of the next write, then nothing (as SendDeadline)."""

    def __init__(self, took: int) -> None:
        self.took = took
        self.unsent = 0

    def sendall(self, data: bytes) -> None:
        self.unsent = len(data) - self.took
        raise TimeoutError


@pytest.mark.parametrize(
    ("chunked", "took", "left"),
    [
        (False, 600, 600),
        (False, 0, 0),
        (True, 605, 600),  # the chunk's size line "3E8\r\n" went first
        (True, 3, 0),
        (True, 1006, 1000),  # all of the data left, not the CRLF after it
    ],
)
def test_a_response_cut_short_counts_the_body_bytes_that_left(chunked, took, left):
    # gunicorn counts a write's bytes before it writes them: the access line showed the whole body of a cut response.
    response = HeldHeadResponse.__new__(HeldHeadResponse)
    response.chunked, response.sent = chunked, 5000 + 1000  # 5000 sent before; 1000 counted for this write
    response.sock = StallingSocket(took)
    with pytest.raises(TimeoutError):
        response._emit_body(b"x" * 1000)
    assert response.sent == 5000 + left


def test_a_stop_signal_held_until_the_worker_handles_signals_stops_it():
    # What the fork held is released once the worker's own handlers are in place, and acted on.
    script = """
import os, signal
from gunicorn.workers.gthread import PollableMethodQueue
from service.gunicorn_worker import STOP_SIGNALS, DrainingThreadWorker

signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # as the arbiter forks the worker
os.kill(os.getpid(), signal.SIGTERM)  # the arbiter's stop, before the worker handles signals
worker = DrainingThreadWorker.__new__(DrainingThreadWorker)  # what init_process has set up when it calls init_signals
worker.alive, worker.PIPE, worker.method_queue = True, os.pipe(), PollableMethodQueue()
worker.method_queue.init()
os.set_blocking(worker.PIPE[1], False)
worker.init_signals()
print("alive" if worker.alive else "stopping", sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []) & set(STOP_SIGNALS)))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=30,
        env=clean_environment(),
    )  # fmt: skip
    assert result.stdout == "stopping []\n", result.stderr


@pytest.mark.e2e
def test_a_stop_after_a_reload_leaves_the_old_worker_to_drain_its_running_task(tmp_path):
    # The stop's SIGTERM to every worker reached the old one, retired by the reload and draining, a second time:
    # more than a second after the first, it took it for the operator's second signal and abandoned its task.
    gate = tmp_path / "gate"
    server = start_gunicorn(
        tmp_path, TASK_HANDLER="faults:waits_for_file", PYTHONPATH=str(Path(__file__).parent), WORKERS="1",
        SHUTDOWN_TIMEOUT_S="60",
    )  # fmt: skip
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        body = json.dumps({"id": "held", "payload": str(gate), "max_retries": 0}).encode()
        assert client.request("POST", "/enqueue", body, headers={"Content-Type": "application/json"})[0] == 202
        wait_until(lambda: client.json("GET", "/tasks/held")[1]["state"] == "running", timeout=20, what="running")
        (old,) = worker_pids(arbiter)
        os.kill(arbiter, signal.SIGHUP)
        wait_until(lambda: "received SIGTERM" in server.log(), timeout=20, what="the old worker's drain")
        # Copies of one signal within a second of the first count as one: the stop comes later, as a deploy's would.
        threading.Event().wait(1.5)
        os.kill(arbiter, signal.SIGTERM)
        wait_until(lambda: "Handling signal: term" in server.log(), timeout=20, what="the stop signal handled")
        assert old in worker_pids(arbiter)  # still running its task, which waits for the gate
        gate.touch()
        assert server.proc.wait(timeout=30) == 0
        log = server.log()
        # Both the retired worker and the new one stop with the server: a line each, then the server's.
        drained = re.findall(r"worker \(pid:(\d+)\) drained in [\d.]+ s; 0 running, (\d) done, .*; 0 abandoned\n", log)
        assert len(drained) == 2 and dict(drained)[str(old)] == "1"  # the old one ran the task, the new one none
        [summary] = [line for line in log.splitlines() if "shutdown complete" in line]
        assert summary.endswith(" 0 running, 1 done, 0 failed, 0 cancelled; 0 abandoned (2 workers added up)")
        assert "SIGTERM again" not in log
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_stop_signal_during_a_reload_is_acted_on_at_once(tmp_path):
    # gunicorn's reload waited for the old worker's drain before reading another signal: a SIGTERM sent meanwhile
    # was handled once that drain had ended, and the new worker accepted tasks after it.
    server = start_gunicorn(tmp_path, WORK_MIN_MS="15000", WORK_MAX_MS="15000", FAILURE_RATE="0")
    try:
        client = Client(server.wait_for_port(LISTENING))
        arbiter = server.proc.pid
        (old,) = wait_until(lambda: worker_pids(arbiter), timeout=20, what="the worker")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        body = json.dumps({"id": "long", "payload": 1, "max_retries": 0}).encode()
        assert client.request("POST", "/enqueue", body, headers={"Content-Type": "application/json"})[0] == 202
        wait_until(lambda: client.json("GET", "/tasks/long")[1]["state"] == "running", timeout=10, what="the attempt")
        os.kill(arbiter, signal.SIGHUP)  # the old worker drains its 15 s attempt
        wait_until(lambda: worker_pids(arbiter) - {old}, timeout=20, what="the new worker")
        wait_until(lambda: "received SIGTERM" in server.log(), timeout=10, what="the old worker's stop")
        os.kill(arbiter, signal.SIGTERM)
        wait_until(lambda: "Handling signal: term" in server.log(), timeout=5, what="the arbiter to handle SIGTERM")
        log = server.log()
        assert "ended: shutdown complete" not in log  # handled while the old worker still drains
        assert server.proc.wait(timeout=30) == 0  # both drained: the old one's attempt done
        assert "1 done" in server.log()
    finally:
        server.stop()


@pytest.mark.e2e
def test_a_request_a_retiring_worker_refuses_on_a_kept_alive_connection_says_when_to_retry(tmp_path):
    # A reload retires the old worker; a client's kept-alive connection to it still carries a request or two
    # (gunicorn lingers on it for 2 s). The 503 said neither to retry nor that a new connection would succeed.
    server = start_gunicorn(tmp_path, WORK_MIN_MS="15000", WORK_MAX_MS="15000", FAILURE_RATE="0", WORKERS="1")
    try:
        port = server.wait_for_port(LISTENING)
        client = Client(port)
        arbiter = server.proc.pid
        (old,) = wait_until(lambda: worker_pids(arbiter), timeout=20, what="the worker")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # the old worker's: it is the only one
        kept.request("GET", "/healthz")
        answer = kept.getresponse()
        answer.read()
        assert answer.status == 200 and not answer.will_close
        body = json.dumps({"id": "long", "payload": 1, "max_retries": 0}).encode()
        assert client.request("POST", "/enqueue", body, headers={"Content-Type": "application/json"})[0] == 202
        os.kill(arbiter, signal.SIGHUP)  # the old worker drains its 15 s attempt
        wait_until(lambda: "admission closed" in server.log(), timeout=20, what="the old worker's drain")
        late = json.dumps({"id": "late", "payload": 1, "max_retries": 0}).encode()
        kept.request("POST", "/enqueue", late, headers={"Content-Type": "application/json"})
        refused = kept.getresponse()
        document = json.loads(refused.read())
        kept.close()
        assert refused.status == 503 and document["type"] == "urn:workerpool:problem:shutting-down"
        assert refused.getheader("Retry-After") == "1"
        assert refused.will_close  # Connection: close: the retry goes out on a new connection
        wait_until(lambda: worker_pids(arbiter) - {old}, timeout=20, what="the new worker")
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="the new worker's /healthz")
        assert client.request("POST", "/enqueue", late, headers={"Content-Type": "application/json"})[0] == 202
    finally:
        server.stop()


@pytest.mark.e2e
def test_ttin_does_not_start_a_second_worker_on_the_memory_store(tmp_path):
    server = start_gunicorn(tmp_path)
    try:
        server.wait_for_port(LISTENING)
        arbiter = server.proc.pid
        (worker,) = wait_until(lambda: worker_pids(arbiter), timeout=20, what="the worker")
        os.kill(arbiter, signal.SIGTTIN)
        wait_until(lambda: "not adding a worker process" in server.log(), timeout=10, what="the refusal")
        os.kill(arbiter, signal.SIGWINCH)  # handled after TTIN's handler, which spawns what it decided on
        wait_until(lambda: "Handling signal: winch" in server.log(), timeout=10, what="the arbiter's next signal")
        assert worker_pids(arbiter) == {worker}
    finally:
        server.stop()


@pytest.mark.e2e
def test_during_a_binary_upgrade_metrics_sum_both_servers_processes(tmp_path):
    # Both servers' workers accept on one socket: each answered with its own sum before, in turn.
    pidfile = tmp_path / "gunicorn.pid"
    command = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
    server = ServerProcess(
        [*command, "-w", "2", "-p", str(pidfile)],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(STORE=f"sqlite://{tmp_path / 'tasks.db'}"),
        python=False,
    )
    old = server.proc.pid
    new = None

    def accepted() -> set[str]:  # each scrape on a new connection, so on any of the processes
        values = set()
        for _ in range(12):
            metrics = Client(port).request("GET", "/metrics")[2]
            values |= {
                line.split()[1] for line in metrics.splitlines() if line.startswith("workerpool_tasks_accepted_total")
            }
        return values

    try:
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: len(worker_pids(old)) == 2, timeout=30, what="the workers")
        for n in range(3):
            assert (
                Client(port).request("POST", "/enqueue", json.dumps({"id": f"m{n}", "payload": 1}).encode())[0] == 202
            )
        [directory] = tmp_path.glob("workerpool-metrics-*")
        # Each worker publishes its counts within a second: until then a scrape may not see the other's.
        wait_until(lambda: accepted() == {"3.0"}, timeout=20, what="both workers' counts in the sum")
        os.kill(old, signal.SIGUSR2)
        new = int(
            wait_until(
                lambda: Path(f"{pidfile}.2").exists() and Path(f"{pidfile}.2").read_text().strip(),
                timeout=30,
                what="the new server",
            )
        )
        wait_until(lambda: len(worker_pids(new)) == 2, timeout=30, what="the new server's workers")
        wait_until(
            lambda: "Booting worker" in server.log() and server.log().count("pool started") >= 4,
            timeout=30,
            what="the new workers' pools",
        )
        assert accepted() == {"3.0"}
        os.kill(old, signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
        wait_until(lambda: "Master has been promoted" in server.log(), timeout=30, what="the new server's promotion")
        assert directory.is_dir() and accepted() == {"3.0"}  # the old workers' counts stay in the sum
        os.kill(new, signal.SIGTERM)
        wait_until(
            lambda: not Path(f"/proc/{new}").exists() or "Z" in Path(f"/proc/{new}/stat").read_text().split()[2],
            timeout=60,
            what="the new server's exit",
        )
        assert not directory.exists()
    finally:
        server.stop()
        if new is not None and Path(f"/proc/{new}").exists():
            os.killpg(old, signal.SIGKILL)  # the new server and its workers, in the old server's process group


@pytest.mark.e2e
def test_a_binary_upgrade_does_not_start_a_second_server_on_the_memory_store(tmp_path):
    # The console script, as in production: the upgrade re-runs the command line (see test_sqlite_takeover.py).
    pidfile = tmp_path / "gunicorn.pid"
    command = [str(Path(sys.executable).with_name("gunicorn")), "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
    server = ServerProcess(
        [*command, "-p", str(pidfile)], log_path=tmp_path / "gunicorn.log", env=clean_environment(), python=False
    )
    try:
        port = server.wait_for_port(LISTENING)
        arbiter = server.proc.pid
        (worker,) = wait_until(lambda: worker_pids(arbiter), timeout=20, what="the worker")
        body = json.dumps({"id": "u1", "payload": 1, "delay_ms": 60000}).encode()
        assert Client(port).request("POST", "/enqueue", body)[0] == 202
        os.kill(arbiter, signal.SIGUSR2)
        wait_until(lambda: "configuration error: a binary upgrade" in server.log(), timeout=30, what="the refusal")
        wait_until(lambda: worker_pids(arbiter) == {worker}, timeout=10, what="the refused server to be reaped")
        assert not Path(f"{pidfile}.2").exists() and int(pidfile.read_text()) == arbiter
        for _ in range(5):  # one server, one table: the task is always found
            assert Client(port).request("GET", "/tasks/u1")[0] == 200
    finally:
        server.stop()


@pytest.mark.e2e
def test_with_two_worker_processes_the_dashboard_names_the_process_whose_figures_it_shows(tmp_path):
    # Each process answers with its own per-second figures: the page showed one process's (about half
    # the traffic), switching between them, with nothing to say so.
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "-w", "2"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(STORE=f"sqlite://{tmp_path / 'tasks.db'}", ACCESS_LOG="off"),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        workers = wait_until(lambda: len(pids := worker_pids(server.proc.pid)) == 2 and pids, timeout=20, what="2")
        seen: set[int] = set()

        def both_answered() -> bool:
            status, live = client.json("GET", "/dashboard/live")  # a new connection each time
            if status == 200:
                seen.add(live["pid"])
            return seen == workers

        wait_until(both_answered, timeout=20, what="an answer from each worker process")
        assert server.terminate() == 0
    finally:
        server.stop()
