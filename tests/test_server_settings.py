"""server_settings.py: exit 2 on a bad setting at the start; at a reload, log it and keep the running settings."""

from __future__ import annotations

import logging
import socket

import pytest
from redis_server import free_port

import server_settings
from config import VARIABLES
from service.context import services
from workerpool import StoreUnavailable


@pytest.fixture
def environ(monkeypatch):
    """A clean service environment, this process's first load still to come; returns a setter for variables."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(server_settings, "_accepted", None)
    monkeypatch.setattr(server_settings, "_processes", None)
    monkeypatch.setattr(server_settings, "_checked", None)
    monkeypatch.setattr(server_settings, "_check", server_settings._no_check)
    monkeypatch.setattr(server_settings, "_report", None)
    # gunicorn's logging set up by an earlier test (dictConfig) would keep its lines from caplog.
    monkeypatch.setattr(server_settings.log, "propagate", True)
    monkeypatch.setattr(server_settings.log, "disabled", False)

    def set_variables(**values: str) -> None:
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_variables


def test_the_first_load_stops_on_a_bad_value_with_exit_code_2(environ, capsys):
    environ(WORK_MIN_MS="oops")
    with pytest.raises(SystemExit) as exited:
        server_settings.load()
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("configuration error: WORK_MIN_MS='oops' is invalid")


def test_the_first_load_stops_on_a_store_that_cannot_be_reached(environ, capsys):
    environ(STORE=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(SystemExit) as exited:
        server_settings.load()
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith("store error: STORE cannot be used: redis: ")


BAD_AT_RELOAD = {
    "a bad value": ({"WORK_MIN_MS": "oops"}, "WORK_MIN_MS='oops' is invalid"),
    "a handler that does not resolve": ({"TASK_HANDLER": "json:no_such_function"}, "TASK_HANDLER='json:no_such"),
    "a new store that cannot be reached": ({"STORE": "redis://127.0.0.1:{port}/0"}, "STORE cannot be used: redis: "),
}


@pytest.mark.parametrize(("changes", "reason"), BAD_AT_RELOAD.values(), ids=BAD_AT_RELOAD.keys())
def test_a_reload_with_a_bad_setting_logs_it_and_keeps_the_running_settings(environ, caplog, changes, reason):
    environ(WORKERS="3")
    running = server_settings.load()
    environ(WORKERS="5", **{name: value.format(port=free_port()) for name, value in changes.items()})
    with caplog.at_level(logging.ERROR, "gunicorn.error"):
        assert server_settings.load() is running
    (record,) = caplog.records
    assert record.getMessage().startswith(f"reload refused: {reason}")
    assert record.getMessage().endswith("the server keeps running with the settings it had")
    assert services(server_settings.worker_app()).config is running


@pytest.fixture
def listener():
    """A socket listening on 127.0.0.1 (another server, or the running one), closed after the test."""
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"PORT": "{taken}"}, "PORT={taken} is already in use on 127.0.0.1: another server listens there"),
        ({"HOST": "203.0.113.5"}, "HOST='203.0.113.5' cannot be listened on: it is not an address of this machine"),
    ],
    ids=["a port in use", "an address of another machine"],
)
def test_a_reload_to_an_address_that_cannot_be_listened_on_is_refused(environ, caplog, listener, changes, reason):
    """gunicorn would close its listeners, fail to bind the new address and exit: the server would be gone."""
    taken = listener.getsockname()[1]
    environ(HOST="127.0.0.1", PORT="0")
    running = server_settings.load()
    environ(**{name: value.format(taken=taken) for name, value in changes.items()})
    with caplog.at_level(logging.ERROR, "gunicorn.error"):
        assert server_settings.load() is running
    (record,) = caplog.records
    assert record.getMessage().startswith(f"reload refused: {reason.format(taken=taken)}")


def test_a_reload_that_changes_host_alone_does_not_count_the_running_listener_as_another_server(environ, listener):
    port = str(listener.getsockname()[1])  # held by the running server, which gunicorn closes before it binds again
    environ(HOST="127.0.0.1", PORT=port)
    server_settings.load()
    environ(HOST="0.0.0.0")
    assert (server_settings.load().host, server_settings.load().port) == ("0.0.0.0", int(port))


@pytest.mark.parametrize(
    "error", [PermissionError(13, "Permission denied"), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid")]
)
def test_a_reload_that_cannot_read_the_settings_keeps_the_running_ones(environ, monkeypatch, caplog, error):
    running = server_settings.load()

    def unreadable(*args):
        raise error

    monkeypatch.setattr(server_settings.config, "read_environment", unreadable)
    with caplog.at_level(logging.ERROR, "gunicorn.error"):
        assert server_settings.load() is running
    (record,) = caplog.records
    assert record.getMessage().startswith("reload refused: the settings could not be read or checked")
    assert record.exc_info is not None and record.exc_info[1] is error


def test_a_reload_with_good_settings_takes_them_for_the_next_workers(environ, tmp_path):
    environ(WORKERS="3")
    server_settings.load()
    environ(WORKERS="5", STORE=f"sqlite://{tmp_path / 'tasks.db'}")
    reloaded = server_settings.load()
    assert (reloaded.workers, reloaded.store.kind) == (5, "sqlite")
    assert services(server_settings.worker_app()).config is reloaded


def test_a_reload_does_not_reach_the_running_store(environ, monkeypatch, caplog):
    """A Redis restarting at the moment of a reload is the workers' to retry, not a reason to refuse."""
    environ(STORE=f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setattr(server_settings.app, "check_store", lambda settings: None)  # it was up at the start
    running = server_settings.load()
    environ(WORKERS="7")
    with caplog.at_level(logging.WARNING, "gunicorn.error"):
        assert server_settings.load().workers == 7
    assert caplog.records == []
    assert server_settings.load().store == running.store


LEFT_BEHIND = "reload to another task store (STORE or STORE_PREFIX changed): the tasks queued in the running one"


def test_a_reload_to_another_sqlite_file_says_the_tasks_queued_in_the_running_one_stay_there(environ, tmp_path, caplog):
    # The old workers drained, leaving their queued tasks "for other processes", and the new ones answered 404.
    environ(STORE=f"sqlite://{tmp_path / 'a.db'}")
    server_settings.load()
    environ(STORE=f"sqlite://{tmp_path / 'a.db'}?synchronous=full")  # the same file
    with caplog.at_level(logging.WARNING, "gunicorn.error"):
        assert server_settings.load().store.synchronous == "FULL"
    assert caplog.records == []
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.db").symlink_to(tmp_path / "a.db")
    for same in (tmp_path / "sub" / ".." / "a.db", tmp_path / "link.db"):  # the same file, named otherwise
        environ(STORE=f"sqlite://{same}")
        with caplog.at_level(logging.WARNING, "gunicorn.error"):
            assert server_settings.load().store.path == str(same)
        assert caplog.records == []
    environ(STORE=f"sqlite://{tmp_path / 'b.db'}")
    with caplog.at_level(logging.WARNING, "gunicorn.error"):
        assert server_settings.load().store.path == str(tmp_path / "b.db")
    (record,) = caplog.records
    assert record.levelname == "WARNING" and record.getMessage().startswith(LEFT_BEHIND)


def test_a_reload_from_the_memory_store_to_another_says_the_accepted_ids_answer_404(environ, tmp_path, caplog):
    environ()
    server_settings.load()
    environ(STORE=f"sqlite://{tmp_path / 'tasks.db'}")
    with caplog.at_level(logging.WARNING, "gunicorn.error"):
        server_settings.load()
    (record,) = caplog.records
    assert record.getMessage().startswith("reload from STORE=memory to another store: every task id accepted before")


@pytest.mark.parametrize(
    ("changes", "another"),
    [
        ({"STORE_PREFIX": "other"}, True),
        ({"STORE": "redis://127.0.0.1:{port}/1"}, True),
        ({"STORE": "redis://:new-secret@127.0.0.1:{port}/0"}, False),  # a new password: the same database
        ({"REDIS_PASSWORD": "another-secret"}, False),
        # The same database, named otherwise: an option of the client's, the default database, the host's case.
        ({"STORE": "redis://:a-secret@127.0.0.1:{port}/0?socket_timeout=5"}, False),
        ({"STORE": "redis://:a-secret@127.0.0.1:{port}"}, False),
        ({"STORE": "redis://:a-secret@LOCALHOST:{port}/0"}, True),  # another name may be another server
        ({"STORE": "redis://:a-secret@127.0.0.1:{port}?db=1"}, True),
    ],
    ids=["prefix", "database", "password-in-url", "password", "option", "default-database", "host", "db-option"],
)
def test_a_reload_to_another_redis_store_says_the_queued_tasks_stay_in_the_running_one(
    environ, monkeypatch, caplog, changes, another
):
    port = free_port()
    monkeypatch.setattr(server_settings.app, "check_store", lambda settings: None)
    monkeypatch.setattr(server_settings.app, "reach_store", lambda settings: [])  # no Redis needed: not reached
    environ(STORE=f"redis://:a-secret@127.0.0.1:{port}/0")
    server_settings.load()
    environ(**{name: value.format(port=port) for name, value in changes.items()})
    with caplog.at_level(logging.WARNING, "gunicorn.error"):
        server_settings.load()
    assert [record.getMessage().startswith(LEFT_BEHIND) for record in caplog.records] == ([True] if another else [])
    assert "secret" not in caplog.text


def test_a_reload_refuses_the_memory_store_for_several_worker_processes(environ, tmp_path, caplog):
    environ(STORE=f"sqlite://{tmp_path / 'tasks.db'}")
    running = server_settings.load()
    server_settings.started(2)  # gunicorn -w 2
    environ(STORE="memory")
    with caplog.at_level(logging.ERROR, "gunicorn.error"):
        assert server_settings.load() is running
    assert "2 worker processes would each keep their own tasks with STORE=memory" in caplog.text


def test_a_worker_that_cannot_open_the_store_ends_alone_with_exit_code_1_and_says_why(environ, monkeypatch, caplog):
    """Not an exception: gunicorn takes one from a starting worker as a reason to stop the whole server."""
    environ()
    server_settings.load()
    reports: list[str] = []
    server_settings.report_with(reports.append)

    def locked(settings):
        raise StoreUnavailable("tasks.db: the database is locked by another process")

    monkeypatch.setattr(server_settings.app, "create_app", locked)
    monkeypatch.setattr(server_settings, "NOT_STARTED_PAUSE_S", 0)
    with caplog.at_level(logging.ERROR, "gunicorn.error"), pytest.raises(SystemExit) as exited:
        server_settings.worker_app()
    assert exited.value.code == 1
    assert "worker not started: STORE cannot be used now (tasks.db: the database is locked" in caplog.text
    assert reports == ["not started (STORE could not be used); it held no task"]


def test_a_reload_checked_before_gunicorn_begins_it_is_refused_once_or_taken_without_a_second_check(
    environ, monkeypatch, caplog
):
    """gunicorn replaces every worker at a reload: gunicorn.conf.py asks first, and a refused one never begins."""
    environ(WORKERS="3")
    running = server_settings.load()
    environ(WORK_MIN_MS="oops")
    with caplog.at_level(logging.ERROR, "gunicorn.error"):
        assert server_settings.check_reload() is False
    (record,) = caplog.records
    assert record.getMessage().startswith("reload refused: WORK_MIN_MS='oops' is invalid")
    assert record.getMessage().endswith("the server keeps running with the settings and worker processes it had")
    assert server_settings.load() is running  # had gunicorn read the file again all the same
    environ(WORK_MIN_MS="0", WORKERS="5")
    assert server_settings.check_reload() is True
    monkeypatch.setattr(server_settings, "_reload", lambda *args: pytest.fail("checked twice"))
    assert server_settings.load().workers == 5
