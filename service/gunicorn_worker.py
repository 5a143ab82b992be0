"""gunicorn's gthread worker, made to drain the pool on a stop signal and to withstand slow or idle clients.

Stop signals. gunicorn owns the worker's signal handlers (an app that
replaces them stops gunicorn's own shutdown from working), so the drain is
started by extending the worker's handlers rather than installing new ones.
Every stop signal (SIGTERM, and SIGINT/SIGQUIT, gunicorn's "quick" stop)
takes gunicorn's graceful path: stop accepting, finish requests in progress,
leave the loop, then the worker_exit hook waits for the drain. gthread's own
quick stop shuts its request thread pool down and raises SystemExit from
inside the signal handler; when the signal lands while the main thread holds
that pool's lock (it hands every new connection to the pool), the worker
deadlocks until gunicorn kills it and the queued tasks are lost. The graceful
path only sets a flag and writes a wake-up byte, which is safe at any moment.
gunicorn sets SA_RESTART on SIGTERM, which lets a blocking wait on the main
thread hold the handler back until the wait ends; it is cleared here, so a
second SIGTERM acts at once. SIGHUP and SIGUSR2 are the arbiter's (reload,
binary upgrade); gunicorn leaves the worker their default action, which
kills it without a drain, so the worker ignores them.

Clients. The main loop never blocks on a client and request threads only
serve whole requests:

- a request is read on the main loop (``RequestReader``) and handed to a
  thread once its head and body are there (a body up to its route's limit,
  chunked or not, ``100 Continue`` answered from the loop); it must arrive
  within ``request_timeout`` seconds, idle or not; a head over 64 KiB is
  answered 431 from the loop;
- a kept-alive connection idle for ``keepalive`` seconds (gunicorn's
  ``--keep-alive``) is closed, unless its next request has begun to arrive:
  that one is read and served, not reset unread;
- closing a connection gracefully lingers on the poller (``LingeringCloser``),
  not in the main loop as gunicorn's ``util.close_graceful`` does;
- with ``worker_connections`` all taken, the connection that has waited
  longest for its request is closed to make room for a new one;
- once stopping, requests still arriving get ``STOP_LINGER_S`` more at most,
  so open connections cannot hold the exit back;
- a response is written with a deadline (``SendDeadline``): a client that
  takes nothing of it for ``request_timeout`` seconds is closed and its
  thread freed; once stopping, one that takes nothing for ``STOP_LINGER_S``.

Responses. ``SendDeadline`` holds a response's head until its first body
bytes, to send both at once. gunicorn takes a response as begun once it has
written the head, and answers an application that fails after that by
closing the connection (a 500 would corrupt a response under way): with the
head still held the client would get an empty reply. ``HeldHeadResponse``
counts the head as sent only once it has left, so such a failure takes
gunicorn's path for an application that fails before its head: the held
head is dropped and the client gets the 500 problem document.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.http.errors import (
    ConfigurationProblem,
    InvalidHeader,
    InvalidRequestLine,
    LimitRequestLine,
    UnsupportedTransferCoding,
)
from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

import config

from . import gunicorn_caches, logs, server_errors
from .access_log import response_request_id
from .connection import SendDeadline, StopGrace
from .drain_reports import RETIRING
from .drain_reports import send as send_report
from .head_problems import BodyFraming, fields_message, head_problem, unsupported_coding
from .lifecycle import NO_SIGNAL, ShutdownController
from .lingering_close import LingeringCloser
from .logs import redact_request_line
from .request_reader import (
    REQUEST_TIMEOUT_S,
    BodyLimits,
    MissingHost,
    RequestReader,
    missing_host,
    request_line_too_long,
)

# Signals meant for the arbiter (reload, binary upgrade) that also reach the worker when sent to the whole
# process group (a closed terminal, ``kill -HUP -<pgid>``, ``pkill -HUP gunicorn``) or to its pid. The
# worker ignores them: the arbiter acts on them and retires the worker with a stop signal, which drains.
ARBITER_SIGNALS = (signal.SIGHUP, signal.SIGUSR2)
# The signals that stop a worker (gunicorn's graceful SIGTERM, its quick SIGINT and SIGQUIT: all drain here).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# How long a stopping worker still waits for requests clients are sending (as gthread's keep-alive linger),
# and for a client to take something of its response.
STOP_LINGER_S = 2.0
# How long a worker that has a connection for each of its request threads leaves a new connection to the
# other workers before it accepts the connection itself (see AcceptBalance).
ACCEPT_DEFER_S = 0.002


class AcceptBalance:
    """Whether a worker leaves a waiting connection to the other workers for now: one that serves enough already.

    The workers of ``gunicorn -w N`` share one listening socket, and each new
    connection goes to whichever worker calls ``accept`` first: a client
    that opens its connections all at once and keeps them (a load balancer's
    or a connection pool's keep-alive connections, a benchmark) often finds
    most of them on one worker, which then queues requests while the others
    idle. A worker that has a connection for each of its request threads
    already stops accepting for ``defer`` seconds, so that a worker with
    fewer takes the connection; after the pause it accepts the next
    connection whatever the others did (so a connection waits ``defer`` at
    most, also when every worker is busy). It pauses at most ``threads``
    times a second (in bursts of as many): under clients that open a
    connection per request, a busy worker's accepting is paused for at most
    ``threads x defer`` of each second (16 ms with 8 threads). It balances
    the first ``workers x threads`` connections: past them every worker has
    enough, and connections go to whichever accepts first, as without it.
    With one worker nothing is deferred.
    """

    def __init__(
        self, workers: int, threads: int, *, defer: float = ACCEPT_DEFER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.enabled = workers > 1
        self.threads = threads
        self.defer = defer
        self.clock = clock
        self.paused_until = 0.0  # while accepting is paused, when the pause ends; else 0
        self.owed = False  # a pause ended: the next waiting connection is this worker's
        self.pauses = float(threads)  # pauses left now (refilled at ``threads`` a second, up to ``threads``)
        self.refilled_at = clock()

    def leave_to_others(self, connections: int) -> bool:
        """Whether to leave the waiting connection for now (and pause accepting), with ``connections`` open here."""
        if not self.enabled or connections < self.threads or self.owed:
            self.owed = False
            return False
        now = self.clock()
        self.pauses = min(float(self.threads), self.pauses + (now - self.refilled_at) * self.threads)
        self.refilled_at = now
        if self.pauses < 1:
            return False
        self.pauses -= 1
        self.paused_until = now + self.defer
        return True

    def paused(self) -> bool:
        """Whether accepting is still paused; when a pause has just ended, the next connection is accepted."""
        if not self.paused_until:
            return False
        if self.clock() < self.paused_until:
            return True
        self.paused_until, self.owed = 0.0, True
        return False

    def wait_at_most(self, timeout: float) -> float:
        """The poller's timeout: a pause ends on time even when nothing else happens."""
        if not self.paused_until:
            return timeout
        return max(0.0, min(timeout, self.paused_until - self.clock()))


class DrainingThreadWorker(ThreadWorker):
    controller: ShutdownController | None = None  # set by the post_worker_init hook
    orphaned = False  # the arbiter is gone: nobody reads the drain report pipe, the worker logs its summary
    drain_report_fd: int | None = None  # set by the post_fork hook
    retiring = False  # it told the arbiter it stops by itself (max_requests)
    request_timeout: float = REQUEST_TIMEOUT_S  # set by the post_worker_init hook (REQUEST_TIMEOUT_S)
    body_limits: BodyLimits = BodyLimits()  # set by the post_worker_init hook (MAX_*BODY_BYTES, API_TOKEN)
    stop_grace: StopGrace | None = None  # set by run(): when the worker stops, what a stalled response still gets

    def get_thread_pool(self) -> ThreadPoolExecutor:
        pool = super().get_thread_pool()
        start_every_thread(pool, self.cfg.threads)
        return pool

    # -- stop signals

    def init_signals(self) -> None:
        super().init_signals()
        signal.siginterrupt(signal.SIGTERM, True)  # no SA_RESTART: see the module's docstring
        for signum in ARBITER_SIGNALS:  # gunicorn leaves them at their default action: terminate, undrained
            signal.signal(signum, signal.SIG_IGN)
        # The arbiter forks with the stop signals blocked (see gunicorn.conf.py): one sent meanwhile waits until now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def handle_exit(self, sig, frame) -> None:
        if self.controller is not None:
            self.controller.request_stop(sig)  # a reentrant queue put: signal-safe
        super().handle_exit(sig, frame)  # idempotent: only the first one stops the loop

    handle_quit = handle_exit

    def is_parent_alive(self) -> bool:
        """Whether the arbiter still runs; when it is gone (killed with SIGKILL), stop as on SIGTERM.

        gthread checks this once a turn and, when the arbiter has gone, leaves
        its loop without a stop: the drain would only begin at ``worker_exit``,
        after gthread has waited for open connections with the worker still
        taking tasks. Nothing will send this worker a signal any more.
        """
        if super().is_parent_alive():
            return True
        self.orphaned = True
        self.handle_exit(NO_SIGNAL, None)
        return False

    def load_wsgi(self) -> None:
        super().load_wsgi()
        gunicorn_caches.install(self.cfg)  # forwarded_allow_ips once per peer, the Date header once a second
        server_errors.install()  # the errors gunicorn answers itself, as problem documents
        wsgi.Response = HeldHeadResponse  # the class wsgi.create builds each request's response from

    # -- errors gunicorn answers itself

    def handle_error(self, req, client, addr, exc) -> None:
        redact(exc, self.body_limits.token)  # gunicorn quotes what the client sent in its warning
        if isinstance(exc, LimitRequestLine) and exc.max_size is not None:  # "Request Line is too large (5014 > 4094)"
            exc = request_line_too_long(exc.max_size)  # as every other 414 says
        exc = framing_refusal(exc, self.body_limits.token)
        # The answer's id is chosen first: gunicorn logs before it writes (see service/server_errors.py).
        with server_errors.answering() as answer:
            if isinstance(exc, ConfigurationProblem):
                self._outside_the_root_path(req, client, addr)
            else:
                super().handle_error(req, client, addr, exc)
            error_answered = getattr(self.log, "error_answered", None)
            if error_answered is not None:
                error_answered(addr, answer)

    def _outside_the_root_path(self, req, client, addr) -> None:
        """Answer 404 to a request whose path does not begin with the root path (``SCRIPT_NAME``).

        gunicorn raises ``ConfigurationProblem`` for it alone (``wsgi.create``)
        and answers 500: a client's miss, such as a probe of ``/healthz`` under
        ``SCRIPT_NAME=/wp``, would count as a failure of the server. As for any
        other unknown path, no warning: the access line tells it.
        """
        # A trusted proxy's SCRIPT_NAME header wins over the environment's, as in wsgi.create.
        root = next((value for name, value in req.headers if name == "SCRIPT_NAME"), None) or config.root_path()
        detail = f"nothing is served at this path: every path of this server begins with {root!r}"
        addr = addr or ("", -1)
        environ = wsgi.default_environ(req, client, self.cfg)
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = addr[0], str(addr[1])
        response = wsgi.Response(req, client, self.cfg)
        response.status = "404 Not Found"
        self.log.access(response, req, environ, datetime.timedelta(0))  # answered at once, as gunicorn's errors
        util.write_error(client, 404, "Not Found", detail)

    # -- clients

    def run(self) -> None:
        self.reader = RequestReader(
            self.cfg, self.poller, ready=self._serve, drop=self._drop, refuse=self._refuse,
            timeout=self.request_timeout, limits=self.body_limits,
        )  # fmt: skip
        self.closer = LingeringCloser(self.poller)
        self._serving: set[TConn] = set()  # connections a request thread has
        self._stopping = False
        self.stop_grace = StopGrace(STOP_LINGER_S)
        self.balance = AcceptBalance(self.cfg.workers, self.cfg.threads)
        try:
            super().run()
        finally:
            self.reader.drop_all()
            self.closer.expire(force=True)

    def accept(self, listener) -> None:
        if self.balance.leave_to_others(self.nr_conns):
            self.set_accept_enabled(False)  # gthread's loop enables it again on a turn after the pause
            return
        super().accept(listener)

    def set_accept_enabled(self, enabled: bool) -> None:
        if enabled and self.balance.paused():
            return
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        super().wait_for_and_dispatch_events(self.balance.wait_at_most(timeout))

    def enqueue_req(self, conn: TConn) -> None:
        """Wait on the poller for the connection's next request (gthread would give it a thread at once)."""
        reads_ahead = getattr(conn, "reads_ahead", None)
        if reads_ahead is None:  # the same for every request of the connection: four settings lookups, once
            reads_ahead = conn.reads_ahead = self._reads_ahead(conn)
        if not reads_ahead:
            self._serve(conn)
            return
        buffered = conn.parser.unreader.take_buffered() if conn.parser is not None else b""
        self.reader.add(conn, buffered)

    def handle_request(self, req, conn: TConn) -> bool:
        """Serve one request on a request thread, giving up on a client that stops reading its response."""
        if not getattr(conn, "reads_ahead", True) and missing_host(req.version, req.headers):
            raise MissingHost()  # checked on the loop for the requests read there; gthread answers it 400
        if getattr(conn, "continue_answered", False):
            # The event loop answered Expect: 100-continue (or chose not to, refusing the body): gunicorn must not.
            req._expected_100_continue = False
        # Read on the event loop since then: the access line counts the time the request took to arrive too.
        req.began_arriving, conn.request_began = getattr(conn, "request_began", None), None
        sock = conn.sock
        # The response is written to conn.sock; its head leaves with the body's first bytes.
        conn.sock = sending = SendDeadline(sock, self.request_timeout, hold_head=True, stop=self.stop_grace)
        try:
            keep_alive = super().handle_request(req, conn)
            sending.flush()  # a head still held; HeldHeadResponse.close() has sent it already
            return keep_alive
        except TimeoutError:
            response = getattr(req, "response", None)
            self.log.warning(
                "closed the connection from %s: it took nothing of the response to %s %s for %s",
                _address(conn.client), req.method, logs.without_token(req.path, getattr(self.log, "token", "")),
                f"{STOP_LINGER_S:g} s while the worker stops" if sending.cut_by_stop else f"{self.request_timeout:g} s",
                extra={"request_id": None if response is None else response_request_id(response)},
            )  # fmt: skip
            return False  # the response is cut short: the connection cannot be reused
        finally:
            conn.sock = sock
            req.response = None  # the response refers to the request: no cycle left to the collector
            if self.nr >= self.max_requests:  # gunicorn ended the worker's loop with this request
                self.announce_retiring()

    def announce_retiring(self) -> None:
        """Tell the arbiter, once, that this worker stops by itself (max_requests), so that it forks a replacement
        now: it would fork one only when this worker exits, after its drain, and with its other workers recycled
        at the same moment (their request counts stay even) nothing would serve meanwhile."""
        if self.retiring or self.drain_report_fd is None:
            return
        self.retiring = True
        if not send_report(self.drain_report_fd, RETIRING):
            self.log.warning("could not tell the arbiter this worker is retiring (its pipe is full)")

    def finish_request(self, conn: TConn, fs: Future) -> None:
        self._serving.discard(conn)
        if fs.cancelled() or fs.exception() is not None:
            super().finish_request(conn, fs)
            return
        if not fs.result() or getattr(conn, "read_expired", False):
            self.nr_conns -= 1
            self.closer.close(conn.sock)
            return
        super().finish_request(conn, fs)

    def murder_keepalived(self, force: bool = False) -> None:
        """Close the kept-alive connections idle for ``keepalive`` seconds, but serve a request that has arrived.

        gthread closes an expired connection whatever it holds: a request that
        came between the poller's last look and this turn's expiry (a client
        reusing the connection just as it ran out, or while the loop was busy)
        was never read, and the close with its bytes unread reset the
        connection under the client, a POST included. A connection with bytes
        waiting is handed to the reader instead, as if the poller had seen them.
        """
        if not force:
            now = time.monotonic()
            expired = list(itertools.takewhile(lambda conn: conn.timeout <= now, self.keepalived_conns))
            for conn in expired:
                if request_arrived(conn.sock):
                    self.on_client_socket_readable(conn, conn.sock)
        super().murder_keepalived(force)

    def murder_pending(self) -> None:
        """Called on every turn of both of gthread's loops (serving, then stopping)."""
        super().murder_pending()
        if not self.alive and not self._stopping:
            self._stopping = True
            now = time.monotonic()
            self.stop_grace.begin(now)
            self._bring_deadlines_forward(now + STOP_LINGER_S)
        self.reader.expire()
        self.closer.expire()
        # Keep a connection free for the next client: with every one taken, gthread would stop
        # accepting until a slow client gave up. An idle kept-alive connection makes room first (its
        # client opens another when it needs one), else the one waiting longest for its request.
        while self.nr_conns >= self.worker_connections - 1:
            if self.keepalived_conns:
                self._close_longest_idle()
            elif len(self.reader):
                self.reader.drop_oldest()
            else:
                break

    def _close_longest_idle(self) -> None:
        """Close the kept-alive connection idle the longest; serve it instead if its next request has begun.

        With a keep-alive time longer than a load balancer's idle timeout (see
        docs/deployment.md) idle connections accumulate up to gthread's limit
        (``worker_connections - threads``); closed first, they leave the other
        slots to requests under way, which were dropped to make room before.
        """
        conn = self.keepalived_conns[0]
        if request_arrived(conn.sock):
            self.on_client_socket_readable(conn, conn.sock)
            return
        self.keepalived_conns.popleft()
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        conn.close()

    def _reads_ahead(self, conn: TConn) -> bool:
        # TLS and HTTP/2 connections are read by gthread as usual.
        return (
            not self.cfg.is_ssl
            and getattr(self.cfg, "protocol", "http") == "http"
            and not conn.is_http2
            and not negotiation.prior_knowledge_allowed(self.cfg, conn.client)
        )

    def _serve(self, conn: TConn) -> None:
        self._serving.add(conn)
        super().enqueue_req(conn)

    def _drop(self, conn: TConn) -> None:
        self.nr_conns -= 1
        conn.close()

    def _refuse(self, conn: TConn, error: Exception) -> None:
        """Answer gunicorn's error for a request refused on the loop (a head too large), then close gracefully."""
        self.handle_error(None, conn.sock, conn.client, error)  # the answer is small: one non-blocking send
        self.nr_conns -= 1
        self.closer.close(conn.sock)  # reads what the client still sends, so the answer is not reset under it

    def _bring_deadlines_forward(self, deadline: float) -> None:
        self.reader.bring_deadlines_forward(deadline)
        for conn in self._serving:
            if hasattr(conn, "read_deadline"):
                conn.read_deadline = min(conn.read_deadline, deadline)


class HeldHeadResponse(wsgi.Response):
    """gunicorn's response, whose head counts as sent (``headers_sent``) only once it has left the socket.

    Written to a ``SendDeadline`` that may hold the head (see the module's
    docstring); on any other socket it is gunicorn's response unchanged. A
    closed response has left whole, so the access line, written after it,
    can tell a response sent from one the application never finished.
    """

    _head_written = False  # the head was written to the socket, held or not

    def __init__(self, req, sock, cfg) -> None:
        super().__init__(req, sock, cfg)
        req.response = self  # for the warning about a client that stops reading it (handle_request)

    @property
    def headers_sent(self) -> bool:
        return self._head_written and not getattr(self.sock, "holds_head", False)

    @headers_sent.setter
    def headers_sent(self, value: bool) -> None:  # gunicorn sets it once it has written the head
        self._head_written = value

    def send_headers(self) -> None:
        if self._head_written:  # a held head is not written twice
            return
        version = self.req.version
        if version <= (1, 1):
            super().send_headers()
            return
        # HTTP/1.2 to 1.9: gunicorn would answer in the request's version; this server speaks 1.1, the
        # highest version it may answer (RFC 9110 section 6.2). The application saw the request's.
        self.req.version = (1, 1)
        try:
            super().send_headers()
        finally:
            self.req.version = version

    def _emit_body(self, data: bytes) -> None:
        try:
            super()._emit_body(data)
        except TimeoutError:
            # gunicorn counts body bytes before it writes them: the access line tells those that left.
            unsent = getattr(self.sock, "unsent", 0)
            if self.chunked:
                unsent -= 2  # the CRLF that ends the chunk comes after its data
            self.sent -= max(0, min(len(data), unsent))
            raise

    def close(self) -> None:
        super().close()
        flush = getattr(self.sock, "flush", None)
        if flush is not None:  # the response is whole: a head still held (no body) leaves now
            flush()

    def start_response(self, status, headers, exc_info=None):  # gunicorn's signature
        if exc_info and self._head_written and not self.headers_sent:
            # The application replaces a response that failed; the held head is the old one.
            self.sock.drop_head()
            self._head_written = False
        return super().start_response(status, headers, exc_info)


def redact(exc: BaseException, token: str = "") -> None:
    """Take the secrets out of what gunicorn logs, and answers, for ``exc``: the query of a request line it quotes
    (where the target ends is unknown: all of it from its ``?``), and the API token ``token`` anywhere it quotes
    (a header line without a colon, ``Authorization Bearer <token>``, an ``Expect`` or ``Transfer-Encoding`` value,
    a chunk's size line): every text the error holds, since each error class keeps what it quotes under its own name.
    """
    if isinstance(exc, InvalidRequestLine) and isinstance(exc.req, str):
        exc.req = redact_request_line(exc.req)
    if token:
        for name, value in list(vars(exc).items()):
            if isinstance(value, str | bytes):
                setattr(exc, name, logs.without_token_in_any_case(value, token))


class FramingRefused(InvalidHeader):
    """The parser's refusal of a body's framing, saying what is wrong with it (``service/head_problems.py``)."""

    def __init__(self, detail: str, req) -> None:
        super().__init__("CONTENT-LENGTH", req=req)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


def framing_refusal(exc: BaseException, token: str = "") -> BaseException:
    """``exc``, or for the parser's ``Invalid HTTP Header: 'CONTENT-LENGTH'`` (or ``'TRANSFER-ENCODING'``), which
    tells the client nothing, the refusal worded as ``python app.py`` words it: two lengths, one that is not a
    number, chunked with a length, chunked in HTTP/1.0, a coding list that does not end with chunked; and for its
    ``Unsupported transfer coding: 'x-zip, gzip'`` the 501 worded as ``python app.py`` words it, naming the coding."""
    if type(exc) is UnsupportedTransferCoding:  # the parser's own 501 (not request_reader's UnsupportedCoding)
        return unsupported_coding(exc.hdr, token) or exc
    req = getattr(exc, "req", None)
    if type(exc) is not InvalidHeader or exc.hdr not in _FRAMING_FIELDS or not getattr(req, "headers", None):
        return exc
    version = "HTTP/{}.{}".format(*req.version)
    problem = head_problem(version, fields_message(req.headers), token)
    return FramingRefused(problem.detail, req) if isinstance(problem, BodyFraming) else exc


_FRAMING_FIELDS = frozenset(("CONTENT-LENGTH", "TRANSFER-ENCODING"))


def start_every_thread(pool: ThreadPoolExecutor, threads: int) -> None:
    """Start the pool's ``threads`` threads now, rather than one whenever every started one is busy.

    The worker then has as many threads from its first request to its last:
    no burst pays for thread starts, and /proc/<pid>/task shows a steady count
    in which a leaked thread stands out. A pool starts a thread on a submit
    that finds none idle: ``threads`` submits that wait for each other do.
    """
    all_started = threading.Barrier(threads)

    def wait_for_the_others() -> None:
        with contextlib.suppress(threading.BrokenBarrierError):
            all_started.wait(timeout=10)

    for started in [pool.submit(wait_for_the_others) for _ in range(threads)]:
        started.result()


def request_arrived(sock) -> bool:
    """Whether the kept-alive socket ``sock`` is readable now: its client's next request has begun (or it closed,
    which the reader finds as the poller's event would have). Asked of the descriptor, so TLS sockets alike."""
    readable = select.poll()
    try:
        readable.register(sock, select.POLLIN)
        return bool(readable.poll(0))
    except (OSError, ValueError):  # closed meanwhile: nothing to serve
        return False


def _address(client: object) -> str:
    return f"{client[0]}:{client[1]}" if isinstance(client, tuple) and len(client) >= 2 else str(client)


# The exit statuses by which gunicorn's arbiter knows a worker that could not start (Arbiter.WORKER_BOOT_ERROR,
# APP_LOAD_ERROR): on either it stops the whole server, every other worker with it, rather than fork in a loop.
BOOT_FAILURE_STATUSES = (3, 4)
# What such a status becomes once the worker serves: an ordinary failure, on which the worker is replaced.
BOOTED_WORKER_FAILURE_STATUS = 1


def keep_boot_failure_statuses_for_boot(log: Callable[[str], object], exit: Callable[[int], object] = os._exit) -> None:
    """From now on (the worker serves), make ``os._exit(3)`` or ``os._exit(4)`` exit with status 1.

    A task handler, or a library it calls, that ended the process with one of those ended the whole
    service: the arbiter took it for a worker that never started. Only ``os._exit`` is covered: an exit
    from C code (``exit(3)``) does not pass through Python.
    """

    def exit_as_a_failure(status: int) -> None:
        if status in BOOT_FAILURE_STATUSES:
            log(
                f"the worker process is ending with exit status {status}, which gunicorn reads as a worker that "
                f"failed to start (it would stop the whole server): exiting with {BOOTED_WORKER_FAILURE_STATUS}"
            )
            status = BOOTED_WORKER_FAILURE_STATUS
        exit(status)

    os._exit = exit_as_a_failure
