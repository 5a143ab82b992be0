"""gunicorn settings for the task service: one worker process, HTTP threads, a drained pool on exit.

Run ``gunicorn -c gunicorn.conf.py`` from the project root. Task state lives
in the worker's memory, so there is exactly one worker process; HTTP
concurrency comes from its threads.
"""

import math
import os
import resource
import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent)
if _ROOT not in sys.path:  # so `config` and `app` import from any working directory
    sys.path.insert(0, _ROOT)

import config as _config  # noqa: E402  (a bare `config` would be read as a gunicorn setting)
from service import logs as _logs  # noqa: E402
from service.lingering_close import MAX_LINGERING  # noqa: E402

_settings = _config.load()  # a bad value stops gunicorn here with exit code 2

# Seconds between the end of the drain deadline and gunicorn's SIGKILL.
DRAIN_MARGIN_S = 5

wsgi_app = "app:create_app()"
bind = [f"[{_settings.host}]:{_settings.port}" if ":" in _settings.host else f"{_settings.host}:{_settings.port}"]
workers = 1  # pinned: each worker process would have its own queue and task table
# gthread, with stop-signal handlers that start the pool's drain at once
# (see service/gunicorn_worker.py).
worker_class = "service.gunicorn_worker.DrainingThreadWorker"
threads = 8  # HTTP request threads; the task pool has its own WORKERS threads
# Connections held at once, slow and idle ones included (with all taken, the one waiting longest
# for its request makes room). Each costs a file descriptor, as do up to MAX_LINGERING closing ones
# and the process's own files: running out would make accept() fail and gunicorn end the worker.
worker_connections = max(64, min(1000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - MAX_LINGERING - 128))
preload_app = False  # the pool must be built in the worker, not in the arbiter before fork
max_requests = 0  # recycling the only worker would stall the service and cut a drain short
graceful_timeout = math.ceil(_settings.shutdown_timeout_s) + DRAIN_MARGIN_S  # whole seconds only
control_socket_disable = True  # parallel servers would share ~/.gunicorn/gunicorn.ctl
accesslog = "-" if _settings.access_log else None  # ACCESS_LOG=on|off
errorlog = "-"
loglevel = _settings.log_level.lower()
# The app's format for gunicorn's own lines too (LOG_FORMAT=text or json).
logconfig_dict = _logs.logging_config(_settings.log_level, _settings.log_format)
logger_class = "service.access_log.AccessLogger"  # one cheap access line per request


def _drain_timeout(worker) -> float:
    # graceful_timeout may come from the command line; keep the margin before SIGKILL.
    return max(0.0, min(_settings.shutdown_timeout_s, worker.cfg.graceful_timeout - DRAIN_MARGIN_S))


def on_starting(server):
    """Open the pipe on which the worker reports its drain (the worker inherits it when forked)."""
    server.drain_reports = os.pipe()
    os.set_blocking(server.drain_reports[0], False)


def post_worker_init(worker):
    """Start the pool and its stop watcher in the worker, after the fork and before serving."""
    from app import pool_of
    from service.lifecycle import ShutdownController, describe

    def report(summary):
        # As soon as the drain ends, before connections close: one short line
        # (a pipe write under PIPE_BUF bytes is atomic), the arbiter logs it last.
        os.write(worker.drain_report_fd, describe(summary).encode()[:500] + b"\n")

    pool = pool_of(worker.wsgi)
    pool.start()
    worker.request_timeout = _settings.request_timeout_s
    worker.controller = ShutdownController(pool, _drain_timeout(worker), on_drained=report)
    worker.controller.start()


def post_fork(server, worker):
    worker.drain_report_fd = server.drain_reports[1]


def worker_exit(server, worker):
    """Wait for the drain the stop signal began (or begin it), then for threads handlers left behind."""
    controller = getattr(worker, "controller", None)
    if controller is None:  # the app never loaded
        return
    from service.lifecycle import NO_SIGNAL, exit_without

    controller.request_stop(NO_SIGNAL)  # a no-op once a signal began the drain
    controller.join()  # in short slices: a second signal still acts at once
    exit_without(controller.wait_for_threads())


def on_exit(server):
    """Make the worker's drain summary the last log line, or say loudly that there was none.

    gunicorn exits 0 even after SIGKILLing a worker that overran
    graceful_timeout, so this line is what tells a lost drain apart.
    """
    reports = b""
    while True:
        try:
            chunk = os.read(server.drain_reports[0], 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        reports += chunk
    lines = reports.decode(errors="replace").splitlines()
    if lines:
        server.log.info("%s", lines[-1])
    else:
        server.log.error("the worker ended without reporting its drain (killed?): tasks it held may be lost")
