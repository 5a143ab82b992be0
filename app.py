"""The task service over HTTP: ``create_app()`` for gunicorn and tests, ``python app.py`` for local use."""

from __future__ import annotations

import _signal  # the C half of `signal`, loaded with the interpreter: `signal` imports enum and more first

# The signals that stop this process with a drain: SIGHUP too, as a closed terminal would otherwise kill it without
# one; and SIGQUIT (Ctrl-\), which drains under gunicorn and would otherwise kill this process at once.
_STOP_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP, _signal.SIGQUIT)
# The signals that ask gunicorn's arbiter for something: its log files reopened (USR1, which logrotate's postrotate
# sends), a binary upgrade (USR2), a worker more or less (TTIN, TTOU). This process has no arbiter and logs to its
# standard streams; their default actions killed it without a drain (USR1, USR2) or froze it until a SIGCONT.
_ARBITER_SIGNALS = (_signal.SIGUSR1, _signal.SIGUSR2)
_WORKER_COUNT_SIGNALS = (_signal.SIGTTIN, _signal.SIGTTOU)
if __name__ == "__main__":
    # Held through the imports below (seconds on a loaded host) until main() handles them: a Ctrl-C then was a
    # KeyboardInterrupt traceback and an exit by the signal, not the start's one line and exit code 0; a USR1
    # (logrotate racing a restart) killed the process without a line.
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _STOP_SIGNALS + _ARBITER_SIGNALS + _WORKER_COUNT_SIGNALS)

import argparse
import atexit
import contextlib
import dataclasses
import errno
import importlib
import inspect
import logging
import logging.config
import operator
import os
import queue
import signal
import socket
import sys
import threading
import weakref
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from flask import Flask
from werkzeug.routing import Map

from config import (
    EXIT_BAD_CONFIG,
    Config,
    ConfigError,
    StoppedWhileStarting,
    exit_on_error,
    parse_host,
    root_path,
    stop_while_starting,
    write_startup_line,
)
from config import load as load_config
from service import connection, lifecycle, logs, problems, request_id
from service.api import bp as api_bp
from service.batch import bp as batch_bp
from service.context import EXTENSION, Services, services
from service.dashboard import bp as dashboard_bp
from service.dev_server import BoundedRequestHandler, BoundedThreadedServer
from service.live import LiveFigures
from service.metrics import Metrics
from service.metrics import bp as metrics_bp
from service.request_reader import BodyLimits
from service.root_path import under_root_path
from workerpool import (
    Handler,
    PoolObserver,
    ShutdownSummary,
    SimulatedWork,
    StoreOutOfMemory,
    StoreUnavailable,
    TaskStore,
    WorkerPool,
)
from workerpool.stores.sqlite import SqliteStore

if TYPE_CHECKING:
    from workerpool.stores.redis_store import RedisStore  # redis-py only when it is used

log = logging.getLogger(__name__)


def open_store(config: Config) -> TaskStore | None:
    """The store ``STORE`` names, opened; None for memory (the pool makes its own). Raises StoreUnavailable.

    A Redis server is not reached here: a worker process that starts while it is
    down for a moment (a reload, a replaced worker) serves and retries it as the
    running ones do. ``reach_store`` is the check made before a server listens.
    """
    if config.store.kind == "redis":
        from workerpool.stores.redis_store import RedisStore, connect  # redis-py only when it is used

        return RedisStore(
            connect(config.store.url, password=config.redis_password or None),
            capacity=config.queue_size,
            ttl=config.state_ttl_s,
            max_finished=config.state_max_tasks,
            prefix=config.store_prefix,
        )
    if config.store.kind == "sqlite":
        return SqliteStore(
            config.store.path,
            capacity=config.queue_size,
            ttl=config.state_ttl_s,
            max_finished=config.state_max_tasks,
            synchronous=config.store.synchronous,
        )
    return None


def listen_error(
    host: str, port: int, error: OSError, *, bind: str | None = None, flags: Collection[str] = ()
) -> ConfigError:
    """The one-line start-up error for an address this machine cannot listen on (HOST, PORT).

    ``bind``: the address as gunicorn's ``-b`` gave it, when it is not HOST and PORT's (``-b`` overrides them):
    the line names it, not variables that say something else. ``flags``: which of ``python app.py``'s ``--host``
    and ``--port`` gave the address instead of HOST and PORT, named the same way.
    """
    reason = _listen_reason(error)
    if bind is not None:
        return ConfigError(f"-b {bind} (gunicorn's --bind, which overrides HOST and PORT) {reason}")
    host_given = f"--host {host}" if "--host" in flags else f"HOST={host!r}"
    port_given = f"--port {port}" if "--port" in flags else f"PORT={port}"
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return ConfigError(f"{host_given} {reason}")
    if error.errno == errno.EADDRINUSE:
        return ConfigError(f"{port_given} is already in use on {host}: another server listens there")
    if error.errno == errno.EACCES:
        return ConfigError(f"{port_given} on {host} {reason}")
    return ConfigError(f"cannot listen on {host_given} {port_given}: {error.strerror or error}")


def _listen_reason(error: OSError) -> str:
    if isinstance(error, socket.gaierror):
        return f"cannot be listened on: the name does not resolve ({error.strerror})"
    if error.errno == errno.EADDRNOTAVAIL:
        return "cannot be listened on: it is not an address of this machine"
    if error.errno == errno.EADDRINUSE:
        return "is already in use: another server listens there"
    if error.errno == errno.EACCES:
        return "cannot be listened on: a port below 1024 needs privileges"
    return f"cannot be listened on: {error.strerror or error}"


def check_listen(
    host: str, port: int, *, reuse_port: bool = False, bind: str | None = None, flags: Collection[str] = ()
) -> None:
    """Raise ConfigError if this machine cannot listen on ``host``:``port`` (bound as gunicorn binds, then closed).

    gunicorn retries a failed bind five times, a second apart, then exits 1
    with messages of its own: a name that does not resolve or an address of
    another machine never binds, so it is said at once instead. ``bind``, ``flags``: see ``listen_error``.
    """
    with _socket_as_gunicorn_makes(host, reuse_port) as sock:
        try:
            sock.bind((host, port))
        except OSError as error:
            raise listen_error(host, port, error, bind=bind, flags=flags) from None


def check_listen_together(addresses: Sequence[tuple[str, int]], *, reuse_port: bool = False) -> None:
    """Raise ConfigError if two of gunicorn's ``-b`` addresses cannot both be listened on (each is checked alone
    by ``check_listen``).

    gunicorn listens on them one after the other: one whose port an address before it already holds (the same
    address twice, ``0.0.0.0`` or ``[::]`` beside a more specific one, ``[::]`` beside ``0.0.0.0``, which it
    covers unless net.ipv6.bindv6only is set) failed as a port in use: 5 s of retries, then exit 1. Each pair on
    one port is tried here as gunicorn would make it, the earlier one listening, then both are closed.
    """
    for later, (host, port) in enumerate(addresses):
        for earlier_host, earlier_port in addresses[:later]:
            if port == 0 or port != earlier_port:  # different ports never collide; nor do two chosen by the kernel
                continue
            with _socket_as_gunicorn_makes(earlier_host, reuse_port) as earlier:
                try:
                    earlier.bind((earlier_host, earlier_port))
                    earlier.listen()
                except OSError:  # taken by another server meanwhile: said by check_listen, or by gunicorn
                    continue
                with _socket_as_gunicorn_makes(host, reuse_port) as sock:
                    try:
                        sock.bind((host, port))
                    except OSError as error:
                        if error.errno != errno.EADDRINUSE:  # alone it binds (checked before): left to gunicorn
                            continue
                        first, second = bind_text(earlier_host, earlier_port), bind_text(host, port)
                        raise ConfigError(
                            f"-b {first} and -b {second} (gunicorn's --bind) cannot both be listened on: the first "
                            f"already holds that port for the second ({_HELD_FOR_THE_SECOND}); give only one of them"
                        ) from None


# Why two -b addresses on one port collide, as Linux decides by default.
_HELD_FOR_THE_SECOND = (
    "the same address, or one covering the other: 0.0.0.0 covers every IPv4 address, [::] every address, IPv4 included"
)


def bind_text(host: str, port: int) -> str:
    """``host``:``port`` as written after gunicorn's ``-b`` (an IPv6 address in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _socket_as_gunicorn_makes(host: str, reuse_port: bool) -> socket.socket:
    """A TCP socket for ``host`` with the options gunicorn sets before it binds one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn: TIME_WAIT connections do not count
    if reuse_port and hasattr(socket, "SO_REUSEPORT"):  # as gunicorn: then several sockets may share one address
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def reach_store(config: Config) -> list[str]:
    """Open the store and close it, reaching a Redis server (a wrong URL or password fails). Raises StoreUnavailable.

    Returns the warnings a Redis server that works calls for: it would answer as well without the
    password it is given (``password_warning``), or it evicts keys at ``maxmemory`` (``eviction_warning``) or
    does not tell whether it does (``unknown_policy_warning``).
    """
    store = open_store(config)
    if store is None:
        return []
    try:
        if config.store.kind == "redis":
            store.stats()
            # A server that never takes the store's writes (a read-only replica, an ACL user without write rights)
            # would refuse every submission and claim. One at maxmemory passes: it takes writes again once tasks
            # end and retention frees room, which needs the service running.
            with contextlib.suppress(StoreOutOfMemory):
                store.check_writes()
            # One that takes them as a replica (replica-read-only no) keeps them to itself: its primary, which the
            # other instances share, never has them, and a full resync from it drops them.
            if (primary := store.primary()) is not None:
                raise StoreUnavailable(
                    f"redis: the server at {_redis_address(config)} is a replica of {primary} that takes writes "
                    f"(replica-read-only no): tasks written there never reach {primary}, which other instances "
                    f"share, and a full resync from it drops them; point STORE at {primary}"
                )
            return _redis_warnings(config, store)
        return []
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        # Answers of the wrong shape: a server on that port that is not Redis (one that echoes what it is sent
        # passes redis-py's checks once it is given a password) made this a traceback and exit code 1.
        url = urlsplit(config.store.url)
        reason = f"{type(exc).__name__}: {exc}"[:200]
        for secret in (url.password, config.redis_password):  # such a server may send back what it was sent
            if secret:
                reason = reason.replace(secret, "<not shown>")
        raise StoreUnavailable(
            f"redis: the server at {_redis_address(config)} does not answer as a Redis server ({reason})"
        ) from None
    finally:
        store.close()


def _redis_address(config: Config) -> str:
    url = urlsplit(config.store.url)
    return f"{url.hostname}:{url.port or 6379}"


def password_warning(config: Config) -> str:
    """The start-up warning for a Redis password the server does not ask for; the password is never shown."""
    return (
        f"STORE: the Redis server at {_redis_address(config)} answers without a password: the password "
        "given (in STORE or REDIS_PASSWORD) protects nothing; set requirepass (or an ACL user) on the server"
    )


def eviction_warning(config: Config, policy: str) -> str:
    """The start-up warning for a Redis server whose ``maxmemory-policy`` evicts keys without an expiry."""
    return (
        f"STORE: the Redis server at {_redis_address(config)} has maxmemory-policy {policy}: at maxmemory "
        "it evicts task data, and those tasks are lost; set maxmemory-policy noeviction (a full Redis then "
        "refuses submissions with 503)"
    )


def unknown_policy_warning(config: Config, reason: str) -> str:
    """The start-up warning for a Redis server that does not tell its ``maxmemory-policy`` (``reason``)."""
    return (
        f"STORE: the Redis server at {_redis_address(config)} did not tell its maxmemory-policy ({reason}): "
        "make sure it is noeviction; an allkeys-* policy evicts task data at maxmemory, and those tasks are lost"
    )


def check_store(config: Config) -> None:
    """Reach the store once at start-up; if it cannot be used, print one line and exit 2.

    A Redis that would answer without the password it is given, or that evicts keys, is used, with a warning line.
    """
    try:
        warnings = reach_store(config)
    except StoreUnavailable as exc:
        write_startup_line(f"store error: STORE cannot be used: {exc}")
        raise SystemExit(EXIT_BAD_CONFIG) from None
    for warning in warnings:  # said, not refused: the store works, but not as the operator believes
        write_startup_line(f"warning: {warning}", "WARNING")


def _redis_warnings(config: Config, store: RedisStore) -> list[str]:
    warnings = [password_warning(config)] if store.password_unneeded() else []
    try:
        policy = store.evicting_policy()
    except StoreUnavailable as exc:
        warnings.append(unknown_policy_warning(config, str(exc)))
    else:
        if policy is not None:
            warnings.append(eviction_warning(config, policy))
    return warnings


def build_pool(config: Config, *, observers: Iterable[PoolObserver] = ()) -> WorkerPool:
    """A pool running ``TASK_HANDLER`` or simulated work as ``config`` describes; its threads start on first use."""
    return WorkerPool(
        load_handler(config),
        store=open_store(config),
        workers=config.workers,
        queue_size=config.queue_size,
        backoff_base=config.backoff_base_ms / 1000,
        backoff_cap=config.backoff_cap_ms / 1000,
        state_ttl=config.state_ttl_s,
        state_max_tasks=config.state_max_tasks,
        max_result_bytes=config.max_result_bytes,
        attempt_timeout=config.attempt_timeout_s,
        lease=config.lease_s,
        observers=observers,
    )


class _HttpOnlyMap(Map):
    """Routes matched as HTTP whatever ``Upgrade`` asks for: the service upgrades no connection.

    werkzeug matches a request that asks for ``Upgrade: websocket`` against websocket routes only, and
    answered every such request (a valid ``POST /enqueue`` too) with a generic 400 naming nothing; a
    server may ignore the header and answer over HTTP/1.1 (RFC 9110, section 7.8), as this one does.
    """

    def bind_to_environ(self, environ, server_name=None, subdomain=None):  # type: ignore[override]
        if "HTTP_UPGRADE" in environ:
            environ = {name: value for name, value in environ.items() if name != "HTTP_UPGRADE"}
        return super().bind_to_environ(environ, server_name, subdomain)


def create_app(
    config: Config | None = None,
    pool: WorkerPool | None = None,
    metrics: Metrics | None = None,
    live: LiveFigures | None = None,
) -> Flask:
    """Build the app; settings come from the environment unless ``config`` is given.

    The pool's threads are not started here (under gunicorn that would happen
    before the fork with ``--preload``): gunicorn's ``post_worker_init`` hook,
    ``python app.py`` or the first submission starts them. Pass ``pool`` to use
    your own; give it ``metrics`` and ``live`` as observers and pass them too
    if task metrics and the dashboard's charts matter.
    """
    config = config or load_config()
    metrics = metrics or Metrics()
    live = live or LiveFigures()
    if pool is None:
        pool = build_pool(config, observers=[metrics, live])
    metrics.watch(pool)

    app = Flask(__name__, static_folder=None)  # no static files: no /static/<filename> route
    app.url_map = _HttpOnlyMap()  # before any route is added (there is none: no static route)
    # A backstop: the routes that take a body read it through read_body, which answers 413 itself with the
    # route's own limit (MAX_BATCH_BODY_BYTES for a batch). This bounds any other read of a body through
    # werkzeug (request.get_data, .form, .stream), which would otherwise read a body of any size.
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    # No redirects: werkzeug would answer `//` in a path with a 308 whose Location it builds from the
    # client's Host header. `/tasks//x` is then just an id that cannot exist (404).
    app.url_map.merge_slashes = False
    # No automatic OPTIONS answers (200, empty text/html): OPTIONS gets 405 with Allow, like any other
    # method a route does not take.
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep problem fields in RFC order
    app.extensions[EXTENSION] = Services(config=config, pool=pool, metrics=metrics, live=live)
    request_id.init_app(app, config.api_token)
    connection.init_app(app)
    problems.register(app)
    app.register_blueprint(api_bp)
    app.register_blueprint(batch_bp)
    app.register_blueprint(metrics_bp)
    app.register_blueprint(dashboard_bp)
    # The safety net for servers without shutdown hooks (`flask run`, other
    # WSGI servers): drain whatever the pool still holds when the process ends.
    atexit.register(_drain_at_exit, weakref.ref(pool), config.shutdown_timeout_s)
    return app


def _drain_at_exit(pool_ref: weakref.ref[WorkerPool], timeout: float) -> None:
    pool = pool_ref()
    if pool is not None and pool.started and pool.accepting:
        summary = pool.shutdown(timeout)
        if summary is not None:  # None: the drain failed, and said so
            log.info("%s", lifecycle.describe(summary))
        lifecycle.close_store(pool.store)


def load_handler(config: Config) -> Handler:
    """The callable ``TASK_HANDLER`` names, or the simulated work when it is empty."""
    if not config.task_handler:
        return SimulatedWork(
            min_s=config.work_min_ms / 1000,
            max_s=config.work_max_ms / 1000,
            failure_rate=config.failure_rate,
        )
    module_name, _, attribute = config.task_handler.partition(":")
    try:
        handler = operator.attrgetter(attribute)(importlib.import_module(module_name))
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"TASK_HANDLER={config.task_handler!r} is invalid: {_one_line(exc)}") from None
    except StoppedWhileStarting:  # a stop signal during the import: the start ends, exit code 0
        raise
    except (Exception, SystemExit, KeyboardInterrupt) as exc:  # a syntax error in the module, or anything its
        # import raised (the commonest broken deploy); a sys.exit() or argparse at the top of a script reused as a
        # handler too.
        message = _one_line(exc)
        raised = f"importing it raised {type(exc).__name__}" + (f": {message}" if message else "")
        raise ConfigError(f"TASK_HANDLER={config.task_handler!r} is invalid: {raised}") from None
    if not callable(handler):
        raise ConfigError(f"TASK_HANDLER={config.task_handler!r} is invalid: it names a {type(handler).__name__}")
    _check_called_with_task_and_cancel(config.task_handler, handler)
    return handler


def _check_called_with_task_and_cancel(name: str, handler: Handler) -> None:
    """Raise ConfigError for a handler that cannot be called as ``handler(task, cancel)``.

    It started, and failed every task after all its retries (a factory such as
    ``handlers.fetch_url:fetcher`` named instead of the handler it builds).
    """
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some callables written in C have none to read: called as they are
        return
    try:
        signature.bind(None, None)
    except TypeError as exc:
        called = f"it cannot be called as handler(task, cancel): {exc}"
        raise ConfigError(f"TASK_HANDLER={name!r} is invalid: {called}") from None
    # A call of these returns a coroutine or a generator and runs none of the body: every task failed
    # (its last_error said so) while the service looked well. An instance is looked at through its __call__.
    for runs_nothing, what in _NOT_PLAIN:
        if runs_nothing(handler) or runs_nothing(type(handler).__call__):
            raise ConfigError(
                f"TASK_HANDLER={name!r} is invalid: it is {what}, whose call runs none of its body: the pool calls"
                " plain functions (a plain one may run a coroutine with asyncio.run)"
            )


_NOT_PLAIN = (
    (inspect.iscoroutinefunction, "an async def function"),
    (inspect.isasyncgenfunction, "an async generator function"),
    (inspect.isgeneratorfunction, "a generator function (it yields)"),
)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())  # a message with line breaks would not be the one line a bad setting gets


def pool_of(app: Flask) -> WorkerPool:
    return services(app).pool


def configure_logging(level: str, log_format: str = "text", *, access_log: bool = True) -> None:
    """Set up logging as gunicorn.conf.py does; entry points call this, ``create_app`` never does."""
    logging.config.dictConfig(logs.logging_config(level, log_format, access_log=access_log))


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and int(text) <= 65_535):
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: must be an integer from 0 to 65535")
    return int(text)


def _host(text: str) -> str:
    # Checked as HOST is: an empty host would bind the wildcard address, every interface of the machine.
    try:
        return parse_host(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"invalid host {text!r}: {error}") from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the task service on Flask's development server (use gunicorn in production)."
    )
    parser.add_argument("--host", type=_host, help="address to listen on (default: $HOST, else 127.0.0.1)")
    parser.add_argument("--port", type=_port, help="port to listen on (default: $PORT, else 8080)")
    return parser.parse_args(argv)


def ignore_arbiter_signals() -> None:
    """Ignore the arbiter's signals, with one WARNING line for each USR1 or USR2."""
    received: queue.SimpleQueue[int] = queue.SimpleQueue()  # a handler only queues: it may interrupt a log line

    def say_ignored() -> None:
        while True:
            log.warning(
                "received %s: ignored, python app.py has no arbiter to ask (SIGTERM stops it with a drain)",
                signal.Signals(received.get()).name,
            )

    threading.Thread(target=say_ignored, name="workerpool-ignored-signals", daemon=True).start()
    for signum in _ARBITER_SIGNALS:
        signal.signal(signum, lambda signum, frame: received.put(signum))
    for signum in _WORKER_COUNT_SIGNALS:
        # Ignored without a line: these are also the terminal's own signals, and with a handler a line written to
        # a terminal under `stty tostop` from the background would raise SIGTTOU again, for ever.
        signal.signal(signum, signal.SIG_IGN)
    # Held since the imports when run as a script: one sent then comes now, to these handlers.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _ARBITER_SIGNALS + _WORKER_COUNT_SIGNALS)


def main(argv: Sequence[str] | None = None) -> None:
    """Serve on Werkzeug's threaded server; SIGINT/SIGTERM/SIGHUP/SIGQUIT drain the pool, a second one stops waiting.

    This path owns its process, so it installs its own signal handlers (under
    gunicorn the worker's handlers start the drain instead); the arbiter's
    SIGUSR1/SIGUSR2/SIGTTIN/SIGTTOU are ignored. The server keeps
    answering during the drain: new tasks get 503 and /healthz says "draining".
    After the drain the process waits a few seconds at most for threads a
    handler left running (a further signal stops that wait), then exits.
    """
    # Until the drain's handlers are in place (the store reached, TASK_HANDLER imported: either may take long), a
    # stop ends the start in one line, exit 0, as under gunicorn: a Ctrl-C printed a KeyboardInterrupt traceback.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, stop_while_starting)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # held since the imports when run as a script
    args = parse_args(argv)
    # A TASK_HANDLER module is imported from the project root (this script's directory), then the working directory,
    # as gunicorn does (its `chdir`): a module there loaded under gunicorn and was "No module named ..." here.
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())
    config = load_config()
    config = dataclasses.replace(
        config,
        host=args.host if args.host is not None else config.host,
        port=args.port if args.port is not None else config.port,
    )
    configure_logging(config.log_level, config.log_format, access_log=config.access_log)
    ignore_arbiter_signals()
    try:  # Werkzeug's server would print the system's message alone and exit 1
        root = root_path()  # SCRIPT_NAME, which gunicorn reads for itself
        flags = [flag for flag, value in (("--host", args.host), ("--port", args.port)) if value is not None]
        check_listen(config.host, config.port, flags=flags)
    except ConfigError as error:
        exit_on_error(error)
    check_store(config)
    try:
        app = create_app(config)  # imports TASK_HANDLER
    except ConfigError as error:
        exit_on_error(error)
    pool = pool_of(app)
    handler = type("RequestHandler", (BoundedRequestHandler,), {"access_log": config.access_log})
    served = under_root_path(app, root) if root else app  # as gunicorn serves it under SCRIPT_NAME
    server = BoundedThreadedServer(
        config.host, config.port, served, handler=handler, request_timeout=config.request_timeout_s,
        body_limits=BodyLimits(config.max_body_bytes, config.max_batch_body_bytes, config.api_token),
    )  # fmt: skip

    summaries: list[ShutdownSummary | None] = []

    def drained(summary: ShutdownSummary | None) -> None:
        summaries.append(summary)
        server.shutdown()  # returns once serve_forever has stopped

    controller = lifecycle.ShutdownController(pool, config.shutdown_timeout_s, on_drained=drained)
    controller.start()
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda signum, frame: controller.request_stop(signum))
    pool.start()
    log.info("Listening at: http://%s:%d", f"[{config.host}]" if ":" in config.host else config.host, server.port)
    server.serve_forever()
    server.server_close()  # the requests clients are still sending get a little longer
    controller.join()
    if summaries[0] is None:  # the drain failed (the error is logged): stop all the same, saying so
        log.error("shutdown failed: the drain did not complete (the error is above); exiting with status 1")
        lifecycle.close_store(pool.store)
        logging.shutdown()
        os._exit(1)
    log.info("%s", lifecycle.describe(summaries[0]))  # the last line, after the access lines of those requests
    leftover = controller.wait_for_threads()
    lifecycle.close_store(pool.store)
    lifecycle.exit_without(leftover)


if __name__ == "__main__":
    main()
