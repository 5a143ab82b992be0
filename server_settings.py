"""The settings a gunicorn server runs with: checked in full at its start, checked again at a reload and kept if wrong.

gunicorn runs gunicorn.conf.py again inside the running arbiter at each reload
(``kill -HUP``, as logrotate or ``systemctl reload`` send it), and any exit there
ends the arbiter for good: the port closes and the workers are orphaned. So only
the first load exits on a bad value; a reload that a check refuses logs why and
keeps the settings the server runs with, and gunicorn then replaces the workers
with those. The workers build their app from the settings accepted here (see
``worker_app``), not by reading the environment again, so a ``.env`` edited
since cannot reach a new or replaced worker unchecked; and a worker that cannot
open the store ends alone instead of making gunicorn stop the server.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import NoReturn

from flask import Flask

import app
import config
from config import Config, ConfigError
from workerpool import StoreUnavailable

# gunicorn's own error log: the arbiter's lines, where an operator looks after a reload.
log = logging.getLogger("gunicorn.error")

# Set by the first load in this process; a later load is a reload of the running server.
_accepted: Config | None = None


def _no_check(settings: Config) -> None:
    """No check beyond the settings' own (``load``'s default)."""


# gunicorn.conf.py's own checks, given at the first load, for check_reload.
_check: Callable[[Config], object] = _no_check
# Settings check_reload accepted, which gunicorn.conf.py's next run (the reload's) takes without checking again.
_checked: Config | None = None
# The worker processes the server runs (gunicorn's `workers`, `-w` included), once on_starting has said.
_processes: int | None = None
# How a worker process tells its arbiter why it ended (set in the worker by post_fork).
_report: Callable[[str], object] | None = None
# How long a worker that could not open the store waits before it exits: gunicorn starts the next at once.
NOT_STARTED_PAUSE_S = 1.0


def load(check: Callable[[Config], object] = _no_check) -> Config:
    """The settings to run with: on a bad value, exit 2 at the start, keep the running settings at a reload.

    ``check`` raises ConfigError for settings the server cannot run with (gunicorn.conf.py's own checks).
    """
    global _accepted, _check, _checked
    if _accepted is None:
        _check = check
        _accepted = _first_load(check)
    elif _checked is not None:  # read and checked by check_reload just before gunicorn runs this file again
        _accepted, _checked = _checked, None
    else:
        _accepted = _reload_or_keep(_accepted, check) or _accepted
    return _accepted


def check_reload() -> bool:
    """Whether a reload may go on: its settings read and checked now, for ``load`` to give; or refused, said once.

    gunicorn's reload replaces every worker process whatever settings it gets,
    which on STORE=memory empties the task table: gunicorn.conf.py asks this
    first and leaves the running workers alone when the reload is refused.
    """
    global _checked
    _checked = None if _accepted is None else _reload_or_keep(_accepted, _check, refused=" and worker processes")
    return _checked is not None


def _reload_or_keep(running: Config, check: Callable[[Config], object], refused: str = "") -> Config | None:
    """The settings read again and checked, or None (logged) to keep ``running``."""
    try:
        return _reload(running, check)
    except ConfigError as error:
        log.error("reload refused: %s; the server keeps running with the settings%s it had", error, refused)
    except Exception:  # an unreadable .env, say: raised from here, it would end the running arbiter
        log.exception(
            "reload refused: the settings could not be read or checked; the server keeps running with the "
            "settings%s it had",
            refused,
        )
    return None


def started(processes: int) -> None:
    """Note how many worker processes the server runs, which a reload's STORE must allow (from on_starting)."""
    global _processes
    _processes = processes


def report_with(report: Callable[[str], object]) -> None:
    """Give this worker process the way to tell its arbiter why it ended (from post_fork)."""
    global _report
    _report = report


def worker_app() -> Flask:
    """The application of a worker process, with the settings its arbiter accepted (gunicorn's ``wsgi_app``).

    A store that cannot be opened now (a SQLite file locked past the busy timeout
    by another program) ends this worker alone, with exit code 1, and gunicorn
    starts another: an exception here would count as a worker that cannot boot,
    on which gunicorn stops the whole server, the other workers included.
    """
    try:
        return app.create_app(_accepted)  # None only when the app is loaded without gunicorn.conf.py's settings
    except StoreUnavailable as error:
        _not_started(error)


def _not_started(error: StoreUnavailable) -> NoReturn:
    log.error("worker not started: STORE cannot be used now (%s); gunicorn starts another", error)
    if _report is not None:  # what the arbiter logs as this worker's end, rather than a lost drain
        _report("not started (STORE could not be used); it held no task")
    time.sleep(NOT_STARTED_PAUSE_S)  # a store that fails at once must not make gunicorn fork without pause
    raise SystemExit(1)


def _first_load(check: Callable[[Config], object]) -> Config:
    settings = config.load()  # a bad value stops gunicorn here with exit code 2
    try:
        check(settings)
        # Imported now, in the arbiter, so a TASK_HANDLER that does not resolve stops gunicorn before it listens.
        app.load_handler(settings)
    except ConfigError as error:
        config.exit_on_error(error)
    app.check_store(settings)  # so does a store that cannot be opened, before any worker starts
    return settings


def _reload(running: Config, check: Callable[[Config], object]) -> Config:
    """The settings read again, checked as at the start; raises ConfigError to keep ``running``."""
    settings = config.from_env(config.read_environment())
    check(settings)
    app.load_handler(settings)
    if _processes is not None:
        config.check_server_processes(settings, _processes)
    if (settings.host, settings.port) != (running.host, running.port):
        _check_new_address(running, settings)
    if _store_of(settings) != _store_of(running):
        # Only a new store is opened here: the running one, even if it is down for a moment, is the
        # workers' to retry (a reload that depended on it would turn a Redis restart into an outage).
        try:
            warnings = app.reach_store(settings)
        except StoreUnavailable as error:
            raise ConfigError(f"STORE cannot be used: {error}") from None
        for warning in warnings:
            log.warning("%s", warning)
        if _place_of(settings) != _place_of(running):
            log.warning("%s", _left_behind(running))
    if settings.metrics_dir != running.metrics_dir:
        log.warning("METRICS_DIR changes at the next start, not at a reload: the workers go on with the old one")
    return settings


def _check_new_address(running: Config, settings: Config) -> None:
    """Raise ConfigError for a new HOST or PORT this machine cannot listen on.

    At a reload that changes the address gunicorn closes every listener first,
    then binds the new one, and exits when that fails: the server would be gone.
    A port unchanged is still held by the running listener, so only the new
    HOST is checked then. (Another program may still take the port between this
    check and gunicorn's bind.)
    """
    app.check_listen(settings.host, settings.port if settings.port != running.port else 0)


def _store_of(settings: Config) -> tuple[object, ...]:
    return settings.store, settings.store_prefix, settings.redis_password


def _place_of(settings: Config) -> tuple[object, ...]:
    """Where the tasks are kept: another place is another task store (a new password, or an option of SQLite's
    or of the Redis client's, is not; nor is the same SQLite file named through a symlink or a ``..``)."""
    store = settings.store
    if store.kind == "sqlite":
        return store.kind, os.path.realpath(store.path)
    if store.kind == "redis":
        from redis.connection import parse_url  # only a Redis store needs it (see config._check_redis_options)

        url = parse_url(store.url)  # the host lowercased, the port and database as numbers, or absent
        return store.kind, url["host"], url.get("port", 6379), url.get("db", 0), settings.store_prefix
    return (store.kind,)


def _left_behind(running: Config) -> str:
    """What a reload to another task store does to the tasks of the running one, which nothing moves over."""
    if not running.store.shared:
        return (
            "reload from STORE=memory to another store: every task id accepted before answers 404 from the new "
            "workers (the running worker runs its queued tasks while it drains, up to SHUTDOWN_TIMEOUT_S)"
        )
    return (
        "reload to another task store (STORE or STORE_PREFIX changed): the tasks queued in the running one stay "
        "there, counted by the drain lines of the workers that stop ('N queued'); the new workers neither run them "
        "nor find them (404) until a server runs on that store again"
    )
