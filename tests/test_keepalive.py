"""HTTP keep-alive: gunicorn's ``keepalive`` setting as the service's worker applies it, and the idle close.

A kept-alive connection waits on the worker's poller for its next request
and is closed once idle for ``keepalive`` seconds; a request that has arrived
by then is served, never closed unread under the client (a load balancer
answers 502 for a POST sent on a connection closed under it, and does not
send it again).
"""

from __future__ import annotations

import selectors
import socket
import time
from collections import deque

import pytest
from http_fixtures import LISTENING, ServerProcess, clean_environment, wait_until

from service.gunicorn_worker import DrainingThreadWorker, request_arrived

GUNICORN = ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
HEALTH = b"GET /livez HTTP/1.1\r\nHost: a\r\n\r\n"
ENQUEUE = (
    b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n"
    b'{"payload": 1}\r\n'
)


class Kept:
    """A kept-alive connection as gthread holds it: a server socket, non-blocking, with its idle deadline."""

    def __init__(self, timeout: float) -> None:
        self.sock, self.client = socket.socketpair()
        self.sock.setblocking(False)
        self.timeout = timeout
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def idle_worker(*kept: Kept) -> tuple[DrainingThreadWorker, list[Kept]]:
    """A worker holding ``kept`` on its poller as gthread's finish_request leaves them; what it serves is listed."""
    worker = DrainingThreadWorker.__new__(DrainingThreadWorker)
    worker.poller = selectors.DefaultSelector()
    worker.keepalived_conns = deque(kept)
    worker.nr_conns = len(kept)
    served: list[Kept] = []
    worker.enqueue_req = served.append
    for conn in kept:
        worker.poller.register(conn.sock, selectors.EVENT_READ, None)
    return worker, served


def test_an_idle_connection_past_keepalive_is_closed_and_one_within_it_kept():
    now = time.monotonic()
    expired, kept = Kept(now - 1), Kept(now + 60)
    worker, served = idle_worker(expired, kept)
    try:
        worker.murder_keepalived()
        assert expired.closed and not kept.closed and not served
        assert list(worker.keepalived_conns) == [kept] and worker.nr_conns == 1
    finally:
        for conn in (expired, kept):
            conn.client.close()
            conn.sock.close()


def test_a_request_arrived_as_the_connection_expires_is_served_not_closed_unread():
    # The poller's last look saw nothing; the request came before this turn's expiry: closing would reset it.
    now = time.monotonic()
    arrived, idle = Kept(now - 1), Kept(now - 1)
    arrived.client.sendall(ENQUEUE)
    worker, served = idle_worker(arrived, idle)
    try:
        worker.murder_keepalived()
        assert served == [arrived] and not arrived.closed
        assert idle.closed and not worker.keepalived_conns
        assert worker.nr_conns == 1  # the one served is still the worker's
        with pytest.raises(KeyError):
            worker.poller.get_key(arrived.sock)  # the reader registers it again for its own reads
    finally:
        for conn in (arrived, idle):
            conn.client.close()
            conn.sock.close()


def test_at_the_final_forced_close_nothing_is_served():
    arrived = Kept(time.monotonic() + 60)
    arrived.client.sendall(HEALTH)
    worker, served = idle_worker(arrived)
    try:
        worker.murder_keepalived(force=True)
        assert arrived.closed and not served
    finally:
        arrived.client.close()


def test_request_arrived_tells_bytes_and_a_closed_end_from_nothing():
    server, client = socket.socketpair()
    with server, client:
        server.setblocking(False)
        assert not request_arrived(server)
        client.sendall(b"G")
        assert request_arrived(server)
        assert server.recv(1) == b"G"  # only looked at, not taken
        client.close()
        assert request_arrived(server)  # the reader reads the end and drops it, as on the poller's event
    assert not request_arrived(server)  # closed here


# -- real gunicorn


@pytest.fixture
def gunicorn(tmp_path):
    servers: list[ServerProcess] = []

    def start(*args: str, **env: str) -> int:
        settings = {"HOST": "127.0.0.1", "PORT": "0", "WORK_MIN_MS": "0", "WORK_MAX_MS": "0", **env}
        server = ServerProcess(
            [*GUNICORN, *args], log_path=tmp_path / f"gunicorn{len(servers)}.log", env=clean_environment(**settings)
        )
        servers.append(server)
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: _answers(port), timeout=20, what="/livez")
        return port

    yield start
    for server in servers:
        server.stop()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            return exchange(sock, HEALTH).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send ``request`` and read its whole response (the service's answers carry Content-Length)."""
    sock.sendall(request)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    fields = (line.partition(b":") for line in head.split(b"\r\n")[1:])
    length = next(int(value) for name, _, value in fields if name.lower() == b"content-length")
    while len(body) < length:
        body += sock.recv(65536)
    return received


def seconds_until_closed(sock: socket.socket, at_most: float) -> float:
    """How long the server takes to close the connection, idle from now (at most ``at_most``)."""
    began = time.monotonic()
    sock.settimeout(at_most)
    try:
        assert sock.recv(1) == b"", "the server sent something on an idle connection"
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"an idle kept-alive connection still open after {at_most} s") from None
    return time.monotonic() - began


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["command line", "GUNICORN_CMD_ARGS"])
def test_keep_alive_given_to_gunicorn_is_the_idle_time_of_a_kept_alive_connection(gunicorn, how):
    keepalive = 3
    port = (
        gunicorn("--keep-alive", str(keepalive))
        if how == "command line"
        else gunicorn(GUNICORN_CMD_ARGS=f"--keep-alive {keepalive}")
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert b"\r\nConnection: keep-alive\r\n" in exchange(sock, HEALTH)
        # Reused after some idle time within the setting: served on the same connection.
        time.sleep(keepalive / 3)
        assert exchange(sock, ENQUEUE).startswith(b"HTTP/1.1 202")
        idle = seconds_until_closed(sock, at_most=keepalive + 30)
    # Closed by the server once idle for the setting: not at once, not never (wide bounds: a shared machine).
    assert keepalive / 2 <= idle


@pytest.mark.e2e
def test_keep_alive_0_answers_each_request_with_connection_close_and_closes(gunicorn):
    port = gunicorn("--keep-alive", "0")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        answer = exchange(sock, ENQUEUE)
        assert answer.startswith(b"HTTP/1.1 202") and b"\r\nConnection: close\r\n" in answer
        seconds_until_closed(sock, at_most=30)


@pytest.mark.e2e
def test_with_every_connection_taken_an_idle_kept_alive_one_makes_room_not_a_request_under_way(gunicorn):
    # 40 connections: gthread keeps 32 alive at most (worker_connections - threads); 8 uploads under way take the
    # rest. Room for the next client came from the uploads, dropped half-read, while idle connections stayed.
    port = gunicorn("--worker-connections", "40", "--keep-alive", "300", REQUEST_TIMEOUT_S="120")
    body = b'{"payload": "' + b"x" * 64 + b'"}'
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    opened: list[socket.socket] = []
    try:
        for _ in range(32):
            opened.append(idle := socket.create_connection(("127.0.0.1", port), timeout=30))
            assert b"\r\nConnection: keep-alive\r\n" in exchange(idle, HEALTH)
        uploads = []
        for _ in range(8):
            opened.append(upload := socket.create_connection(("127.0.0.1", port), timeout=30))
            upload.sendall(head % len(body) + body[:10])
            uploads.append(upload)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as newcomer:
            assert exchange(newcomer, HEALTH).startswith(b"HTTP/1.1 200")
        for upload in uploads:  # every upload under way is still read to its end and answered
            assert exchange(upload, body[10:]).startswith(b"HTTP/1.1 202")
        seconds_until_closed(opened[0], at_most=30)  # the longest idle made room
    finally:
        for sock in opened:
            sock.close()
