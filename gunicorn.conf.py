"""gunicorn settings for the task service: one worker process, HTTP threads, a drained pool on exit.

Run ``gunicorn -c gunicorn.conf.py`` from the project root. Task state lives
in the worker's memory, so there is exactly one worker process; HTTP
concurrency comes from its threads.
"""

import functools
import logging as _logging
import math
import os
import signal as _signal
import sys
import time as _time
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:  # so `config` and `app` import from any working directory
    sys.path.insert(0, _ROOT)

import config as _config  # noqa: E402  (a bare `config` would be read as a gunicorn setting)

# The arbiter's other signals ask a running server for something: a reload (HUP, which systemctl reload and
# logrotate send), its logs reopened (USR1), a binary upgrade (USR2), a worker more or less (TTIN, TTOU). Before
# gunicorn's handlers are in place their default actions ended the start without a word (HUP, USR1, USR2) or
# froze it until a SIGCONT (TTIN, TTOU).
_NOT_YET_SIGNALS = (_signal.SIGHUP, _signal.SIGUSR1, _signal.SIGUSR2, _signal.SIGTTIN, _signal.SIGTTOU)


def _ignored_while_starting(signum, frame):
    """A signal for the running server that comes before it runs: said, and ignored (it has nothing to act on)."""
    ignored = f"received {_signal.Signals(signum).name} while starting: ignored, the server is not running yet"
    os.write(2, f"{_config.startup_line(ignored, 'WARNING')}\n".encode())


# A stop signal (docker stop, a pod's termination) may come while the app, TASK_HANDLER's module and the
# store are still being checked below, before gunicorn installs its handlers (Arbiter.start). As PID 1 (the
# image's CMD) a signal with no handler is dropped by the kernel: the start went on and the server served until
# the container's SIGKILL. gunicorn runs this file again at a reload, with its handlers in place: they stay
# (Arbiter.init_signals replaces these with its own for all of them).
if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
    for _stop in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT):
        _signal.signal(_stop, _config.stop_while_starting)
    for _other in _NOT_YET_SIGNALS:
        if _signal.getsignal(_other) == _signal.SIG_DFL:  # one the parent ignores (nohup) stays ignored
            _signal.signal(_other, _ignored_while_starting)
# run_gunicorn.py (`make run`, the image) held them until now, through its exec of gunicorn: one sent meanwhile
# comes here, at once, to the handlers above.
_signal.pthread_sigmask(_signal.SIG_UNBLOCK, (_signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT, *_NOT_YET_SIGNALS))

from gunicorn import systemd as _systemd  # noqa: E402

import app as _app  # noqa: E402
import server_settings as _server_settings  # noqa: E402
from service import file_limits as _file_limits  # noqa: E402
from service import logs as _logs  # noqa: E402
from service import metrics_share as _metrics_share  # noqa: E402
from service import request_id as _request_id  # noqa: E402
from service.drain_reports import KEPT_BY_THE_STORE, LOST_WITH_IT, DrainReports  # noqa: E402
from service.drain_reports import Drain as _Drain  # noqa: E402
from service.drain_reports import send as _send_report  # noqa: E402
from service.drain_reports import server_summary as _server_summary  # noqa: E402
from service.gunicorn_worker import STOP_SIGNALS as _STOP_SIGNALS  # noqa: E402
from service.gunicorn_worker import (  # noqa: E402
    keep_boot_failure_statuses_for_boot as _keep_boot_failure_statuses_for_boot,
)
from service.metrics import counts_problem as _counts_problem  # noqa: E402
from service.tls_files import check_tls as _check_tls  # noqa: E402

# At the start a bad value, a TASK_HANDLER that does not resolve or a store that cannot be opened stops
# gunicorn here with exit code 2. gunicorn runs this file again at each reload (kill -HUP): then a bad
# value is logged and the running settings are kept (see server_settings.py).
threads = 8  # HTTP request threads; the task pool has its own WORKERS threads


def _given_options() -> list:
    """gunicorn's parsed options from GUNICORN_CMD_ARGS, then its command line (which overrides them).

    gunicorn applies its command line to the settings after it has run this file (and the environment
    only later, in the arbiter), so they are read here from where gunicorn reads them: its own parser,
    on its own arguments. Run otherwise than by gunicorn's load (its module name), there are none.
    """
    if __name__ != "__config__":
        return []
    from gunicorn.config import Config as _GunicornConfig

    gunicorn_config = _GunicornConfig()
    parser = gunicorn_config.parser()
    return [parser.parse_args(argv) for argv in (gunicorn_config.get_cmd_args_from_env(), sys.argv[1:])]


def _env_options() -> list[str]:
    """gunicorn's ``-e``/``--env`` values, from GUNICORN_CMD_ARGS and its command line."""
    given: list[str] = []
    for options in _given_options():
        given += options.raw_env or []
    return given


def _given(name: str, default):
    """The value gunicorn will run for the option ``name`` (``--threads``, ``--worker-connections``), or default."""
    values = [getattr(options, name) for options in _given_options() if getattr(options, name, None) is not None]
    return values[-1] if values else default


def _worker_connections(settings) -> int:
    """worker_connections for the request threads gunicorn will run (``--threads`` overrides ``threads``); a
    ``--worker-connections`` given is checked against the open-file limit instead (gunicorn takes it over ours)."""
    return _file_limits.worker_connections(
        settings, max(_given("threads", threads), 0), _given("worker_connections", None)
    )


def _check_settings(settings) -> None:
    """Refuse a configuration whose store leaves too few file descriptors for connections, a variable gunicorn
    reads itself with a value it cannot take (run_gunicorn.py checks those before gunicorn starts, this a gunicorn
    started by hand, whose own start ended at a bad WEB_CONCURRENCY, before reading this file), and a setting given
    to gunicorn's -e, which would be ignored (and shown, at LOG_LEVEL=debug, in gunicorn's configuration line), or a
    variable gunicorn reads itself that -e sets to a value it cannot take (SCRIPT_NAME, LISTEN_FDS, LISTEN_PID)."""
    _config.check_gunicorn_environment()
    given = _env_options()
    _config.check_env_options(given)
    _config.check_gunicorn_env_options(given)
    _worker_connections(settings)


_settings = _server_settings.load(check=_check_settings)

# Seconds between the end of the drain deadline and gunicorn's SIGKILL.
DRAIN_MARGIN_S = 5

wsgi_app = "server_settings:worker_app()"  # the app, with the settings checked above


bind = [_app.bind_text(_settings.host, _settings.port)]
# WEB_CONCURRENCY is gunicorn's default for -w, which platforms (Heroku among them) set: a value in
# this file would hide it. Several processes share a SQLite or Redis store; with STORE=memory each
# would have its own queue and task table, so one runs, and on_starting says why the value is not taken.
_web_concurrency = _config.web_concurrency()  # None when unset; checked with the settings above
workers = _web_concurrency if _settings.store.shared and _web_concurrency is not None else 1
# gthread, with stop-signal handlers that start the pool's drain at once
# (see service/gunicorn_worker.py).
worker_class = "service.gunicorn_worker.DrainingThreadWorker"
# Connections held at once, slow and idle ones included (with all taken, the one waiting longest
# for its request makes room). Each costs a file descriptor, as do closing ones, the process's own
# files and the store's: running out would make accept() fail and gunicorn end the worker. The soft
# limit on open files is raised toward the hard one as far as needed (see service/file_limits.py).
worker_connections = _worker_connections(_settings)
# keepalive: gunicorn's, 2 s by default. Behind a load balancer that keeps idle connections to the service
# longer (AWS ALB, nginx upstream keepalive: 60 s) give `--keep-alive 75` (in GUNICORN_CMD_ARGS too), above
# whatever it keeps, or a POST it sends on a connection just closed gets a 502 (docs/deployment.md).
preload_app = False  # the pool must be built in the worker, not in the arbiter before fork
# Recycling a worker with STORE=memory would forget every task: on_starting refuses a --max-requests
# that overrides this there (config.check_worker_recycling).
max_requests = 0
graceful_timeout = math.ceil(_settings.shutdown_timeout_s) + DRAIN_MARGIN_S  # whole seconds only
control_socket_disable = True  # parallel servers would share ~/.gunicorn/gunicorn.ctl
accesslog = "-" if _settings.access_log else None  # ACCESS_LOG=on|off
errorlog = "-"
loglevel = _settings.log_level.lower()
# The app's format for gunicorn's own lines too (LOG_FORMAT=text or json).
logconfig_dict = _logs.logging_config(_settings.log_level, _settings.log_format)
logger_class = "service.access_log.AccessLogger"  # one cheap access line per request


def _drain_timeout(worker) -> float:
    # graceful_timeout may come from the command line (see _warn_of_a_shorter_drain); keep the margin before SIGKILL.
    return max(0.0, min(_settings.shutdown_timeout_s, worker.cfg.graceful_timeout - DRAIN_MARGIN_S))


def _warn_of_a_shorter_drain(server) -> None:
    """Say so when ``--graceful-timeout`` (or in GUNICORN_CMD_ARGS) leaves the drain less than SHUTDOWN_TIMEOUT_S.

    gunicorn kills a worker graceful_timeout seconds after the stop signal, so the drain ends
    DRAIN_MARGIN_S before that: a value below this file's shortens it, down to 0 s. A shorter stop is
    a choice the command line may make, so it is taken, but not silently.
    """
    drain, shutdown = _drain_timeout(server), _settings.shutdown_timeout_s
    if drain < shutdown:
        given = server.cfg.graceful_timeout
        server.log.warning(
            "--graceful-timeout %d leaves the drain %g s, not SHUTDOWN_TIMEOUT_S=%g: gunicorn kills the worker %d s "
            "after a stop signal and the drain leaves it the last %d s to exit, so the tasks still unfinished fail "
            '("abandoned at shutdown") sooner. Drop --graceful-timeout (in GUNICORN_CMD_ARGS too), or give at least '
            "%d, to drain for SHUTDOWN_TIMEOUT_S; for a shorter stop lower SHUTDOWN_TIMEOUT_S",
            given, drain, shutdown, given, DRAIN_MARGIN_S, math.ceil(shutdown) + DRAIN_MARGIN_S,
        )  # fmt: skip


def on_starting(server):
    """Refuse processes that would not share tasks; open the pipe on which the worker reports its drain."""
    # From here a stop signal waits in the arbiter's queue, as it will once its handlers are in place (next,
    # in Arbiter.start): it stops the server gracefully as soon as it runs, so this hook is not cut short.
    if _signal.getsignal(_signal.SIGTERM) == _config.stop_while_starting:
        for stop in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGQUIT):
            _signal.signal(stop, server.signal)
    try:  # `-w N` on the command line overrides `workers` above: only a hook sees it, before listening
        _check_worker_class(server.worker_class)  # and `-k` overrides `worker_class`
        _check_no_preload(getattr(server.cfg, "preload_app", False))  # and `--preload` overrides `preload_app`
        _check_no_code_reloader(getattr(server.cfg, "reload", False))  # `--reload`
        _check_request_threads(getattr(server.cfg, "threads", threads))  # and `--threads` overrides `threads`
        _check_tls(server.cfg)  # `--certfile`, `--keyfile`, `--ca-certs`
        _config.check_server_processes(_settings, server.cfg.workers)
        _config.check_worker_recycling(_settings, server.cfg.max_requests)  # max_requests below
        if server.master_pid:  # started by `kill -USR2` to the server still running (gunicorn sets it just before)
            _config.check_binary_upgrade(_settings, server.master_pid)
        else:  # the listening sockets are made next, unless inherited (binary upgrade, systemd socket activation)
            _check_listen(server.cfg)
        _share_metrics(server)
    except _config.ConfigError as error:
        if server.pidfile is not None:  # written just before: it would name a server that never ran
            server.pidfile.unlink()
        _config.exit_on_error(error)
    start_checked = getattr(server.log, "start_checked", None)  # None with a --logger-class of one's own
    if start_checked is not None:
        start_checked()
    if not _settings.store.shared and _web_concurrency not in (None, 1) and server.cfg.workers == 1:
        server.log.warning(
            "WEB_CONCURRENCY=%s not taken: with STORE=%s each worker process would keep its own tasks, so one runs "
            "(several share STORE=sqlite:///path or redis://...)",
            _web_concurrency,
            _settings.store.kind,
        )
    _warn_of_a_shorter_drain(server)
    _server_settings.started(server.cfg.workers)
    server.drain_reports = DrainReports()
    _hook_arbiter(server)


def _hook_arbiter(server) -> None:
    """Wrap the arbiter's methods that reload, count and signal its workers (see each wrapper)."""
    server.retiring, server.held = set(), {}
    if callable(getattr(server, "reload", None)):  # what kill -HUP calls
        server.reload = functools.partial(_reload_unless_refused, server, server.reload)
    if callable(getattr(server, "manage_workers", None)):  # what kill -TTOU calls, and every turn of the loop
        server.manage_workers = functools.partial(_manage_workers_stopping_each_once, server, server.manage_workers)
    if callable(getattr(server, "kill_worker", None)):  # every signal the arbiter sends a worker
        server.kill_worker = functools.partial(_kill_worker_stopping_each_once, server, server.kill_worker)
    if callable(getattr(server, "spawn_worker", None)):  # every fork of a worker
        server.spawn_worker = functools.partial(_spawn_worker_holding_stop_signals, server.spawn_worker)


def _check_worker_class(worker_class) -> None:
    """Refuse a worker class that does not drain the pool: its stops would lose tasks, and slow clients hold threads."""
    from service.gunicorn_worker import DrainingThreadWorker

    if not (isinstance(worker_class, type) and issubclass(worker_class, DrainingThreadWorker)):
        name = getattr(worker_class, "__module__", "") + "." + getattr(worker_class, "__qualname__", repr(worker_class))
        raise _config.ConfigError(
            f"worker class {name} does not run this service: its stops would not drain the task pool and its "
            f"request threads would wait on slow clients (drop -k/--worker-class; threads = {threads} sets "
            "the HTTP threads, --threads N too)"
        )


def _check_request_threads(given) -> None:
    """Refuse ``--threads 0``: gunicorn takes it and listens, then the worker cannot start (a traceback, exit 3)."""
    if given < 1:
        raise _config.ConfigError(
            f"--threads {given} would leave no thread to answer a request: give at least 1 (in GUNICORN_CMD_ARGS "
            f"too), or drop it for the default {threads}"
        )


def _check_no_preload(preload_app) -> None:
    """Refuse ``--preload``: the app, and with it the task pool, would be built in the arbiter before the fork."""
    if preload_app:
        raise _config.ConfigError(
            "--preload would build the task pool in the arbiter, before the fork: every worker process would run "
            "under one lease owner, and one that stops would abandon the running tasks of the others; drop --preload "
            "(in GUNICORN_CMD_ARGS too)"
        )


def _check_no_code_reloader(reload) -> None:
    """Refuse ``--reload``: it restarts the workers at each change of a file, but they run the code loaded before."""
    if reload:
        memory = " (and with STORE=memory each restart would forget every task)" if not _settings.store.shared else ""
        raise _config.ConfigError(
            "--reload would restart the worker processes at each change of a source file, but the workers the "
            "arbiter forks run the code it loaded at its start (the app and TASK_HANDLER's module), so no change "
            f"would be taken{memory}: drop --reload (in GUNICORN_CMD_ARGS too); new code takes kill -USR2 (a binary "
            "upgrade) or a restart"
        )


def _reload_unless_refused(server, reload):
    """gunicorn's reload, unless the settings it would read are refused: then the running workers go on.

    gunicorn replaces every worker at a reload whatever the settings (on
    STORE=memory the new one starts with an empty task table), and no hook can
    stop it once it has begun, so the settings are checked before.
    """
    if _server_settings.check_reload():
        # gunicorn's reload ends waiting for the old workers to exit (for graceful_timeout, "to prevent double
        # SIGTERM"), and meanwhile reads no signal: a SIGTERM (docker stop) was acted on only once they had
        # drained, and the new workers went on accepting tasks a SIGKILL then lost. The workers it stops are held
        # out of its table while it runs, so its wait ends at once; _manage_workers_stopping_each_once never tells
        # them twice.
        server.reloading = True
        try:
            reload()
        finally:
            server.reloading = False
            held = getattr(server, "held", {})
            server.WORKERS.update(held)
            held.clear()
    else:
        server.log.reopen_files()  # what logrotate sends the HUP for


def _manage_workers_stopping_each_once(server, manage_workers):
    """gunicorn's manage_workers, which does not count a worker it has told to stop, nor tell it again.

    It sends SIGTERM to the oldest workers past the count on every turn of the
    arbiter's loop (about once a second) for as long as they run: after kill
    -TTOU the worker stopping got a second SIGTERM a second into its drain,
    which it takes for an operator's second stop signal, and its running
    tasks were abandoned, failed retries left or not. Hidden from it while it
    runs, a worker it stopped is told once and drains for SHUTDOWN_TIMEOUT_S.

    A worker stopping by itself (max_requests) says so on the drain reports'
    pipe and is not counted either: its replacement is forked now, not when
    it exits after its drain (with -w N the N workers reach max_requests
    together, and nothing served while they drained).
    """
    reports = getattr(server, "drain_reports", None)
    if reports is not None:
        server.retiring |= reports.retiring()
    server.retiring &= server.WORKERS.keys() | server.held.keys()  # those that have exited are gone
    hidden = {pid: server.WORKERS.pop(pid) for pid in server.retiring if pid in server.WORKERS}
    try:
        manage_workers()
    finally:
        server.WORKERS.update(hidden)
        if getattr(server, "reloading", False):  # see _reload_unless_refused
            server.held.update((pid, server.WORKERS.pop(pid)) for pid in server.retiring if pid in server.WORKERS)


def _kill_worker_stopping_each_once(server, kill_worker, pid, sig):
    """gunicorn's kill_worker, which sends a worker SIGTERM once.

    A worker takes a SIGTERM more than a second after the first for the
    operator's second stop signal and abandons its running tasks. A worker a
    reload or kill -TTOU told to stop, and still draining when the server is
    stopped, would get its second from the stop: it drains on instead, within
    the deadline its own SIGTERM set. SIGQUIT (a quick stop: SIGINT or SIGQUIT
    to the arbiter) and SIGKILL still reach every worker.
    """
    if sig == _signal.SIGTERM:
        if pid in server.retiring:
            return
        server.retiring.add(pid)
    kill_worker(pid, sig)


def _spawn_worker_holding_stop_signals(spawn_worker):
    """gunicorn's spawn_worker, forking with the stop signals blocked: the new worker unblocks them once its
    own handlers are in place (DrainingThreadWorker.init_signals), and a stop signal sent meanwhile waits.

    Sent to a process just forked, before it runs, a signal was lost: Python clears the
    signals pending in a child after a fork, and until the worker's handlers are in place
    the arbiter's, inherited with the fork, only queue it where no one reads it. A stop
    right after a reload, a start or kill -TTIN left the new worker serving, and taking
    tasks, until the arbiter killed it graceful_timeout later.
    """
    held = _signal.pthread_sigmask(_signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return spawn_worker()
    finally:  # in the arbiter (the worker leaves spawn_worker only as it exits)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, held)


def _check_listen(cfg):
    """Exit 2 at once, with one line, for an address that cannot be listened on (gunicorn retries for 5 s, exits 1)."""
    if _systemd.listen_fds(unset_environment=False):
        return
    tcp = [(address[0], address[1]) for address in cfg.address if isinstance(address, tuple)]  # not unix sockets
    for host, port in tcp:  # `-b` on the command line overrides `bind` above
        given = None if (host, port) == (_settings.host, _settings.port) else _app.bind_text(host, port)
        _app.check_listen(host, port, reuse_port=cfg.reuse_port, bind=given)
    _app.check_listen_together(tcp, reuse_port=cfg.reuse_port)  # gunicorn listens on all of them at once


def _share_metrics(server):
    """Choose where the worker processes publish their metrics: METRICS_DIR, or a directory of our own with -w > 1.

    Raises ConfigError for a METRICS_DIR that cannot be used.

    Counts an earlier run left there are removed first: they would add to this run's. A server
    started by a binary upgrade (``kill -USR2``) shares the running server's directory instead (the
    old server passes it in ``INHERITED_METRICS_DIR``), so that while both serve the port each
    answers /metrics with the sum of all their processes, instead of its own, in turn.
    """
    server.metrics_dir, server.metrics_dir_owned = None, False
    inherited = os.environ.get(_metrics_share.INHERITED_METRICS_DIR, "") if server.master_pid else ""
    if _settings.metrics_dir:
        server.metrics_dir = Path(_settings.metrics_dir)
        try:
            if server.master_pid:  # the running server's counts, not an earlier run's: kept
                _metrics_share.make(server.metrics_dir)
            else:
                _metrics_share.prepare(server.metrics_dir)
            _metrics_share.check_private(server.metrics_dir)  # else another local user could inject counts
        except OSError as error:
            reason = _metrics_share.why_unusable(error)
            raise _config.ConfigError(f"METRICS_DIR={_settings.metrics_dir!r} is invalid: {reason}") from None
    elif inherited and _metrics_share.is_private(Path(inherited)):
        # Removed at the exit by whichever of the two servers ends last (see on_exit).
        server.metrics_dir, server.metrics_dir_owned = Path(inherited), True
    elif server.cfg.workers > 1 or server.cfg.max_requests > 0:  # a recycled worker's counts stay in the sum
        server.metrics_dir, server.metrics_dir_owned = _metrics_share.make_directory(), True


def pre_exec(server):
    """In the new server of a binary upgrade, before gunicorn runs it: hand it our metrics directory."""
    if server.metrics_dir_owned:  # METRICS_DIR is read from the environment by the new server itself
        server.cfg.env_orig[_metrics_share.INHERITED_METRICS_DIR] = str(server.metrics_dir)


def nworkers_changed(server, new_value, old_value):
    """Keep one worker process when ``kill -TTIN`` asks for more and the store is not shared."""
    # The first count is on_starting's to check; a reload sets the count again, unchanged, with settings
    # server_settings has checked. Setting the old count back below would call this hook again, without end.
    if old_value is None or new_value <= 1 or new_value <= old_value:
        return
    try:
        _config.check_server_processes(_settings, new_value)
    except _config.ConfigError as error:
        server.log.error("not adding a worker process: %s", error)
        server.num_workers = old_value  # calls this hook again, with a count it accepts


def on_reload(server):
    """Say what a reload changes (the settings, not the code), and what it costs when tasks live in memory."""
    # The arbiter imported the app and TASK_HANDLER's module to check them before listening; each
    # worker it forks has them already, so gunicorn's reload cannot load newer ones.
    server.log.info(
        "reload: the new workers take the settings read again and run the code loaded when the server started "
        "(new code takes kill -USR2, a binary upgrade, or a restart)"
    )
    if not _settings.store.shared:
        server.log.warning(
            "reload with STORE=memory: the new worker starts with an empty task table, so every task id "
            "accepted before answers 404 (STORE=sqlite:///path/to/tasks.db keeps them across reloads)"
        )
    _warn_of_a_shorter_drain(server)  # the settings read again, with the command line's graceful_timeout


def post_worker_init(worker):
    """Start the pool and its stop watcher in the worker, after the fork and before serving."""
    from app import pool_of
    from service.context import services
    from service.drain_reports import send
    from service.lifecycle import ShutdownController, describe
    from service.request_reader import BodyLimits

    def report(summary):
        # As soon as the drain ends, before connections close (see service/drain_reports.py).
        # The arbiter that would log the summary is gone: it is this worker's last line. A worker finds that
        # out in its serving loop, which has ended if the arbiter was killed during the drain (supervisord's
        # SIGKILL after stopwaitsecs): the summary would go to a pipe nobody reads.
        if summary is None:  # the drain failed (logged): there is nothing to report
            return
        if worker.orphaned or os.getppid() != worker.ppid:
            worker.log.info("%s (the arbiter was gone: worker pid %s stopped by itself)", describe(summary), worker.pid)
        elif not send(worker.drain_report_fd, describe(summary)):
            worker.log.error("could not report the drain to the arbiter (its pipe is full): %s", describe(summary))

    _keep_boot_failure_statuses_for_boot(worker.log.error)  # the app is loaded: the worker has started
    pool = pool_of(worker.wsgi)
    pool.start()
    if worker.metrics_dir is not None:
        services(worker.wsgi).metrics.share(worker.metrics_dir)
    worker.request_timeout = _settings.request_timeout_s
    worker.body_limits = BodyLimits(_settings.max_body_bytes, _settings.max_batch_body_bytes, _settings.api_token)
    worker.log.token = _settings.api_token  # left out of the access line wherever a client puts it in a target
    worker.controller = ShutdownController(pool, _drain_timeout(worker), on_drained=report)
    worker.controller.start()
    # gunicorn closes worker.tmp, the file whose time tells the arbiter the worker is alive, before
    # worker_exit: a copy of its descriptor lets the worker go on saying so while it drains there.
    worker.heartbeat_fd = os.dup(worker.tmp.fileno())


# Seconds between two signs of life while a worker drains in worker_exit (gunicorn's loop gives one a second).
HEARTBEAT_S = 1.0


def _heartbeat(worker) -> None:
    """What gunicorn's worker.notify() does, on the copy of the descriptor of the file it has closed."""
    fd = getattr(worker, "heartbeat_fd", None)
    if fd is not None:
        now = _time.monotonic()  # the arbiter compares the file's time with its own monotonic clock
        os.utime(fd, (now, now))


def pre_request(worker, req):
    """gunicorn's DEBUG line as it hands a request to the app (``GET /healthz``), with the id that request carries:
    chosen here, as the app's middleware would choose it, and passed on to it (gunicorn's own line had none)."""
    if worker.log.error_log.isEnabledFor(_logging.DEBUG):  # else nothing to do: every request passes here
        token = getattr(worker.log, "token", "")
        path = _logs.without_token(req.path, token)  # a client may put the token there
        worker.log.debug("%s %s", req.method, path, extra={"request_id": _request_id.pin(req.headers, token)})


def post_fork(server, worker):
    worker.drain_report_fd = server.drain_reports.write_fd
    worker.metrics_dir = server.metrics_dir
    _server_settings.report_with(lambda text: _send_report(worker.drain_report_fd, text))


def worker_exit(server, worker):
    """Wait for the drain the stop signal began (or begin it) and for threads handlers left behind; close the store."""
    controller = getattr(worker, "controller", None)
    if controller is None:  # the app never loaded
        return
    from service.context import services
    from service.lifecycle import NO_SIGNAL, close_store, exit_without

    controller.request_stop(NO_SIGNAL)  # a no-op once a signal began the drain
    # A worker retired while the server runs (kill -TTOU, --max-requests) drains with the arbiter's loop
    # still killing any worker silent for --timeout s (30 by default, whatever SHUTDOWN_TIMEOUT_S says):
    # so it says it is alive until its drain could have ended, and stays silent if it hangs past that.
    alive_until = _time.monotonic() + _drain_timeout(worker) + DRAIN_MARGIN_S
    while True:
        if _time.monotonic() < alive_until:
            _heartbeat(worker)
        if controller.join(HEARTBEAT_S):  # in short slices: a second signal still acts at once
            break
    if worker.metrics_dir is not None:  # the drain's counts too, before the process ends
        services(worker.wsgi).metrics.stop_sharing()
    leftover = controller.wait_for_threads()
    close_store(services(worker.wsgi).pool.store)
    # Nothing is left for a stop signal to stop: the worker only exits. Python's exit gives the signals it
    # handles their default action back (terminate) before the process ends, so a stop arriving then (the
    # arbiter's, to a worker that drained by itself for --max-requests) ended a clean exit as killed by SIGTERM.
    for stop in _STOP_SIGNALS:
        _signal.signal(stop, _signal.SIG_IGN)
    exit_without(leftover)


def child_exit(server, worker):
    """Take the drain report of a worker that exited: log it now, or at the exit if the server is stopping."""
    report = server.drain_reports.take(worker.pid)
    if server.metrics_dir is not None:
        _metrics_share.mark_process_dead(server.metrics_dir, worker.pid, check_counts=_counts_problem)
    if not server.LISTENERS:  # gunicorn closes its listeners first thing in a stop
        server.drain_reports.at_stop.append((worker.pid, report))
    else:
        _log_drain(server, worker.pid, report, at_exit=False)


def on_exit(server):
    """Make each stopped worker's drain summary the last log lines, or say loudly that there was none.

    gunicorn exits 0 even after SIGKILLing a worker that overran
    graceful_timeout, so these lines are what tell a lost drain apart.
    """
    reports = server.drain_reports
    # A worker SIGKILLed at the end of the stop may not have been reaped yet (no child_exit).
    unreaped = [(pid, reports.take(pid)) for pid in server.WORKERS]
    stopped = reports.at_stop + unreaped
    drains = [(pid, None if report is None else _Drain.read(report)) for pid, report in stopped]
    read = [drain for _, drain in drains if drain is not None]
    if len(stopped) > 1 and read and len(read) == sum(report is not None for _, report in stopped):
        # Several workers on one store: a line each for what it did, then the server's, which counts the tasks
        # the store still holds once (each worker's summary counted them all) and adds up the rest.
        for pid, drain in drains:
            if drain is None:
                _log_drain(server, pid, None, at_exit=True)
            else:
                server.log.info("worker (pid:%s) %s", pid, drain.described_alone())
        server.log.info("%s", _server_summary(read, workers=len(stopped)))
    else:
        for pid, report in stopped:
            _log_drain(server, pid, report, at_exit=True)
    # During a binary upgrade the other server still publishes there: the new one (reexec_pid, ours
    # while it runs) or the old one (master_pid, until this one is promoted).
    if server.metrics_dir_owned and not server.reexec_pid and not server.master_pid:
        _metrics_share.remove_directory(server.metrics_dir)


def _log_drain(server, pid: int, report: str | None, *, at_exit: bool) -> None:
    """One line for a worker's drain: its report, or if it sent none an error (a warning with a shared store,
    which keeps the tasks a killed process held)."""
    if report is None and _settings.store.shared:
        server.log.warning("%s (pid %s)", KEPT_BY_THE_STORE, pid)
    elif report is None:
        server.log.error("%s (pid %s)", LOST_WITH_IT, pid)
    elif at_exit:  # the server's last lines: the summary alone, as the drain wrote it
        server.log.info("%s", report)
    else:
        server.log.info("worker (pid:%s) ended: %s", pid, report)
