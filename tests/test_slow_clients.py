"""Slow, silent and never-closing clients against the real servers (gunicorn and ``python app.py``) on 127.0.0.1.

Each test holds raw sockets open the way a careless or hostile client would
and checks that other clients are still served, that the server gives up on
requests that do not arrive in time, and that no client costs a thread of
its own for long.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, wait_until

pytestmark = pytest.mark.e2e

GUNICORN = ["-m", "gunicorn", "-c", "gunicorn.conf.py"]
APP = ["app.py"]
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
PARTIAL_BODY = b'POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{"id": "slow"'


@pytest.fixture
def start(tmp_path):
    servers: list[ServerProcess] = []
    sockets: list[socket.socket] = []

    def start(command: list[str], **env: str) -> Client:
        settings = {"HOST": "127.0.0.1", "PORT": "0", "WORK_MIN_MS": "0", "WORK_MAX_MS": "0", **env}
        server = ServerProcess(
            command, log_path=tmp_path / f"server{len(servers)}.log", env=clean_environment(**settings)
        )
        servers.append(server)
        client = Client(server.wait_for_port(LISTENING))
        client.server = server  # type: ignore[attr-defined]
        client.open = lambda count, data=b"": _open(client.port, count, data, sockets)  # type: ignore[attr-defined]
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        return client

    yield start
    for sock in sockets:
        sock.close()
    for server in servers:
        server.stop()


def _open(port: int, count: int, data: bytes, sockets: list[socket.socket]) -> list[socket.socket]:
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sockets.append(sock)
        opened.append(sock)
        if data:
            sock.sendall(data)
    return opened


def timed_health(client: Client) -> float:
    started = time.monotonic()
    status, _, body = client.request("GET", "/healthz")  # the client gives up after 10 s
    assert status == 200, body
    return time.monotonic() - started


def worker_pid(client: Client) -> int:
    server = client.server  # type: ignore[attr-defined]
    booted = re.findall(r"Booting worker with pid: (\d+)", server.log())
    return int(booted[-1]) if booted else server.proc.pid


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def read_to_end(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sends on ``sock`` until it closes it, or None if it is still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while data := sock.recv(65536):
            received += data
    except TimeoutError:
        return None
    except OSError:
        pass  # reset: closed too
    return received


def ends_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (after an answer or not) within ``seconds``."""
    return read_to_end(sock, seconds) is not None


def test_clients_that_never_close_do_not_stall_gunicorn(start):
    # gunicorn's graceful close lingers up to 2 s per such socket; on the main
    # loop, 10 of them stalled every other client for 6 s in a measurement, 40 for 14 s.
    client = start(GUNICORN)
    for sock in client.open(20, b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"):
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert timed_health(client) < 5  # milliseconds in practice

    assert "WORKER TIMEOUT" not in client.server.log()  # type: ignore[attr-defined]


def test_slow_and_silent_clients_leave_gunicorns_threads_to_others(start):
    # 8 request threads: one partial head each used to take them all, as long as the client liked.
    client = start(GUNICORN)
    client.open(20, PARTIAL_HEAD)
    client.open(20, PARTIAL_BODY)
    client.open(20)
    assert timed_health(client) < 5


def test_with_every_gunicorn_connection_taken_the_longest_waiting_makes_room(start):
    # gthread stopped accepting at worker_connections: clients waited in the backlog until a slow one gave up.
    client = start([*GUNICORN, "--worker-connections", "40"])
    slow = client.open(100, PARTIAL_HEAD)
    assert timed_health(client) < 5
    assert ends_within(slow[0], 10)


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_a_request_not_sent_in_time_is_given_up(start, command):
    client = start(command, REQUEST_TIMEOUT_S="1")
    (partial_head,) = client.open(1, PARTIAL_HEAD)
    (partial_body,) = client.open(1, PARTIAL_BODY)
    assert ends_within(partial_head, 8)
    assert ends_within(partial_body, 8)
    assert client.request("GET", "/tasks/slow")[0] == 404  # never accepted


def test_python_app_py_serves_a_bounded_number_of_connections_and_evicts_the_slowest(start):
    # Werkzeug alone started a thread per connection: 2,000 partial heads, 2,007 threads.
    client = start(APP)
    baseline = threads(worker_pid(client))
    slow = client.open(150, PARTIAL_HEAD)
    assert ends_within(slow[0], 10)  # evicted to make room for later ones
    # One thread per connection served, 64 at most; an evicted one may take a moment to end.
    bound = baseline + 64 + 4
    assert threads(worker_pid(client)) <= bound
    assert timed_health(client) < 5
    assert threads(worker_pid(client)) <= bound


def test_python_app_py_answers_health_checks_beside_slow_clients(start):
    client = start(APP)
    client.open(30, PARTIAL_HEAD)
    client.open(30)
    assert timed_health(client) < 5


def test_pipelined_requests_on_a_kept_alive_connection_are_answered(start):
    client = start(GUNICORN)
    (sock,) = client.open(1)
    sock.sendall(
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\nGET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    answers = read_to_end(sock, 10)  # both answered, then closed as asked
    assert answers is not None and answers.count(b"HTTP/1.1 200 ") == 2, answers


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        (GUNICORN, b"Expect: 100-continue\r\n"),
        (APP, b"Expect: 100-continue\r\n"),
        (GUNICORN, b"Expect: 100-continue\r\nExpect: 100-continue\r\n"),  # taken as one by gunicorn's parser
    ],
    ids=["gunicorn", "app.py", "gunicorn-repeated-field"],
)
def test_a_body_sent_after_100_continue_is_read(start, command, expect):
    client = start(command)
    body = b'{"id": "continued", "payload": ""}'
    (sock,) = client.open(
        1,
        b"POST /enqueue HTTP/1.1\r\nHost: a\r\n" + expect + b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body),
    )
    sock.settimeout(10)
    interim = b""
    while b"\r\n\r\n" not in interim and (data := sock.recv(65536)):  # the interim answer may come in pieces
        interim += data
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
    _, _, early = interim.partition(b"\r\n\r\n")
    assert early == b""  # nothing before the body is sent
    sock.sendall(body)
    answers = read_to_end(sock, 10)
    assert answers is not None and answers.startswith(b"HTTP/1.1 202 "), answers
    assert client.request("GET", "/tasks/continued")[0] == 200


def test_a_client_that_stops_reading_a_large_response_frees_its_thread(start):
    # A blocking write had no deadline: 8 such clients (one per request thread) took the service down.
    client = start(
        GUNICORN,
        REQUEST_TIMEOUT_S="1",
        MAX_RESULT_BYTES="2000000",
        TASK_HANDLER="faults:returns_a_large_result",
        PYTHONPATH=str(Path(__file__).parent),
    )
    for n in range(8):  # results of 1 MB each: the listing of the 8 is about 8 MB
        assert client.request("POST", "/enqueue", b'{"id": "big%d", "payload": "1000000"}' % n)[0] == 202
    wait_until(
        lambda: all(client.json("GET", f"/tasks/big{n}")[1]["state"] == "done" for n in range(8)),
        timeout=20,
        what="the 8 tasks to be done",
    )
    readers = []
    for n in range(8):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.connect(("127.0.0.1", client.port))
        sock.sendall(b"GET /tasks?limit=8 HTTP/1.1\r\nHost: a\r\nX-Request-ID: stalled-%d\r\n\r\n" % n)
        readers.append(sock)  # never read until the server gave up
    try:
        assert timed_health(client) < 8  # a thread is free once the server gave up (1 s without progress)
        log = wait_until(
            lambda: (text := client.server.log()).count("took nothing of the response") == 8 and text,
            timeout=20,
            what="the server to give up on the 8 clients that stopped reading",
        )
        assert "closed the connection from 127.0.0.1:" in log and "to GET /tasks for 1 s" in log
        assert "Traceback" not in log and "Socket error" not in log
        for n, sock in enumerate(readers):
            received = read_to_end(sock, 10)
            assert received is not None and received.startswith(b"HTTP/1.1 200 ")  # closed by the server...
            assert len(received) < 8_000_000  # ...before the whole listing was sent
            # The warning names the request; its access line counts the body bytes that left, not the whole body.
            assert re.search(rf"took nothing of the response to GET /tasks for 1 s request_id=stalled-{n}$", log, re.M)
            body = len(received.partition(b"\r\n\r\n")[2])
            assert re.search(rf'"GET /tasks\?limit=8 HTTP/1.1" 200 {body} .* request_id=stalled-{n}$', log, re.M), body
    finally:
        for sock in readers:
            sock.close()
    assert client.request("POST", "/enqueue", b'{"id": "a", "payload": "1"}')[0] == 202


HELD_BACK_BODIES = [
    # A chunk begun, then nothing.
    b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n",
    # Waiting for 100 Continue, or sending nothing after it.
    b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n",
    # The same with the field repeated, which gunicorn's parser takes as one.
    b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nExpect: 100-continue\r\nContent-Length: 50\r\n\r\n",
    # A body over 1 MiB (within the batch limit), one byte of it sent.
    b"POST /enqueue/batch HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n{",
]


@pytest.mark.parametrize(
    "request_head", HELD_BACK_BODIES, ids=["chunked", "expect-100-continue", "expect-repeated", "large"]
)
def test_bodies_that_stop_arriving_leave_gunicorns_threads_to_others(start, request_head):
    # These bodies were read on request threads: 8 such clients (one per thread) held them all for
    # REQUEST_TIMEOUT_S, and nothing else, health checks included, was answered.
    client = start(GUNICORN, REQUEST_TIMEOUT_S="60")
    client.open(16, request_head)
    assert timed_health(client) < 5  # the client gives up after 10 s


LARGE_FIELDS = b"".join(b"X-F%d: %s\r\n" % (n, b"f" * 8000) for n in range(9))  # 72 KB, 8 KB a field
HEADS_OVER_64_KIB = [
    b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + LARGE_FIELDS,  # then nothing
    b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n" + LARGE_FIELDS,
]


@pytest.mark.parametrize("request_head", HEADS_OVER_64_KIB, ids=["head", "trailer-section"])
def test_a_head_over_64_kib_is_refused_431_without_taking_a_thread(start, request_head):
    # Such a head went to a request thread, whose parser (gunicorn takes about 800 KB) waited for the rest:
    # 8 clients that sent 72 KB of fields and stopped held every thread for REQUEST_TIMEOUT_S.
    client = start(GUNICORN, REQUEST_TIMEOUT_S="60")
    held = client.open(16, request_head)
    assert timed_health(client) < 5  # the client gives up after 10 s
    for sock in held:
        answer = read_to_end(sock, 8)  # answered and closed by the server while the client still holds it open
        assert answer is not None and answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer
        assert b"Connection: close\r\n" in answer and b"Content-Type: application/problem+json\r\n" in answer
        assert b"longer than 65536 bytes" in answer


@pytest.mark.parametrize("chunks", [[66000], [10000] * 7], ids=["one-chunk-past-the-limit", "chunks-past-the-limit"])
def test_a_chunked_body_past_its_limit_is_answered_413_at_once(start, chunks):
    # It was read on to 64 KiB past the limit (MAX_BODY_BYTES, 64 KiB): a client still sending got
    # nothing until REQUEST_TIMEOUT_S, then a 413, or a 408 (which says to send it again).
    client = start(GUNICORN, REQUEST_TIMEOUT_S="60")
    (sock,) = client.open(1, b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    sock.sendall(b"".join(b"%x\r\n%s\r\n" % (size, b"a" * size) for size in chunks))  # no last chunk: still sending
    answer = read_to_end(sock, 8)  # answered and closed while the client holds its end open
    assert answer is not None and answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"Connection: close\r\n" in answer and b"the request body is larger than 65536 bytes" in answer


def test_a_chunked_body_of_long_chunk_extensions_is_answered_413_at_once(start):
    # Only the decoded bytes counted against the limit: one byte per 8 KB chunk line kept the body
    # "short" while the worker buffered all of it (830 MB of RSS from a single connection in 12 s).
    client = start(GUNICORN, REQUEST_TIMEOUT_S="60")
    (sock,) = client.open(1, b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    with contextlib.suppress(OSError):  # the server may close before all of it is sent
        sock.sendall((b"1;" + b"e" * 8000 + b"\r\nx\r\n") * 128)  # 1 MB for 128 bytes of body, no last chunk
    answer = read_to_end(sock, 8)  # answered and closed while the client holds its end open
    assert answer is not None and answer.startswith(b"HTTP/1.1 413 "), answer
    # What is refused is the framing: the body itself (a few bytes) is not larger than the limit.
    assert b"the chunked framing of the request body" in answer and b"larger than" not in answer


@pytest.mark.parametrize("framing", [b"0\n\n", b"0\r\n\n", b"0\r\nX-T: a\n\r\n"], ids=["last-chunk", "end", "trailer"])
def test_a_chunked_body_whose_framing_has_a_bare_lf_is_answered_400_at_once(start, framing):
    # Its CRLF was waited for: the client got 408 (or 400) only at REQUEST_TIMEOUT_S.
    client = start(GUNICORN, REQUEST_TIMEOUT_S="60")
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    (sock,) = client.open(1, head + b'e\r\n{"payload": 1}\r\n' + framing)
    answer = read_to_end(sock, 8)  # answered and closed while the client holds its end open
    assert answer is not None and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"ends with a bare LF" in answer


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_a_json_body_sent_token_by_token_in_small_chunks_is_accepted(start, command):
    # requests.post(data=json.JSONEncoder().iterencode(obj)) sends a chunk per token (1 to 10 bytes):
    # a 37.9 KB body was refused 413 "larger than 65536 bytes" for its 75 KB of framing.
    client = start(command, REQUEST_TIMEOUT_S="60")
    payload = {"payload": {"items": [{"id": i, "ok": True} for i in range(1500)]}}
    chunks = [token.encode() for token in json.JSONEncoder().iterencode(payload)]
    assert 35_000 < sum(map(len, chunks)) < 65_536 and len(chunks) > 10_000
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nConnection: close\r\n"
    (sock,) = client.open(1, head + b"Transfer-Encoding: chunked\r\n\r\n")
    sock.sendall(b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n")
    answer = read_to_end(sock, 10)
    assert answer is not None and answer.startswith(b"HTTP/1.1 202 "), answer


@pytest.mark.parametrize("command", [GUNICORN, APP], ids=["gunicorn", "app.py"])
def test_a_body_that_stops_arriving_is_answered_408_and_one_cut_short_400(start, command):
    client = start(command, REQUEST_TIMEOUT_S="1")
    (slow,) = client.open(1, PARTIAL_BODY)  # 13 of 100 bytes, then nothing
    answer = read_to_end(slow, 8)
    assert answer is not None and answer.startswith(b"HTTP/1.1 408 "), answer
    head = answer.partition(b"\r\n\r\n")[0].lower()
    assert head.count(b"\r\nconnection:") == 1 and b"\r\nconnection: close\r\n" in head + b"\r\n", answer
    assert b"the request body did not arrive within REQUEST_TIMEOUT_S (1 s): 13 of 100 bytes" in answer

    (cut,) = client.open(1, PARTIAL_BODY)
    cut.shutdown(socket.SHUT_WR)  # the client ends its body early
    answer = read_to_end(cut, 8)
    assert answer is not None and answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"the request body ended after 13 of its 100 bytes" in answer
    assert answer.partition(b"\r\n\r\n")[0].lower().count(b"\r\nconnection:") == 1, answer


def test_a_chunked_body_and_one_after_100_continue_are_read_and_queued(start):
    client = start(GUNICORN)
    body = b'{"id": "chunked", "payload": ""}'
    (sock,) = client.open(
        1,
        b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
        b"Connection: close\r\n\r\n",
    )
    sock.settimeout(10)
    assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")  # once: from the event loop, not again by gunicorn
    for start_at in range(0, len(body), 10):
        part = body[start_at : start_at + 10]
        sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    sock.sendall(b"0\r\n\r\n")
    answers = read_to_end(sock, 10)
    assert answers is not None and answers.startswith(b"HTTP/1.1 202 "), answers
    assert client.request("GET", "/tasks/chunked")[0] == 200


@pytest.mark.parametrize(
    ("env", "request_head", "status"),
    [
        ({}, b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n", 413),
        (
            {},
            b"POST /enqueue/batch HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 100000000\r\n\r\n",
            413,
        ),
        (
            {"API_TOKEN": "a-token-of-16-chars-at-least"},
            b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
            401,
        ),
        (
            {"API_TOKEN": "a-token-of-16-chars-at-least"},
            b"POST /enqueue/batch HTTP/1.1\r\nHost: a\r\nContent-Length: 4000000\r\n\r\n",
            401,
        ),
        (  # 100 Continue was sent and the body read, for a 415 known from the head
            {},
            b"POST /enqueue HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Type: application/json\r\n"
            b"Content-Encoding: gzip\r\nContent-Length: 60000\r\n\r\n",
            415,
        ),
    ],
    ids=["over-the-limit", "over-the-batch-limit", "no-token", "no-token-no-expect", "content-coding"],
)
def test_a_body_refused_from_its_head_is_neither_read_nor_asked_for(start, env, request_head, status):
    client = start(GUNICORN, **env)
    (sock,) = client.open(1, request_head)
    answer = read_to_end(sock, 8)  # the final answer at once, then closed; the body was never sent
    assert answer is not None and answer.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"Connection: close" in answer and b"100 Continue" not in answer


def test_workers_that_leave_connections_to_each_other_go_on_accepting(start, tmp_path):
    """With ``-w 2``, a worker holding a connection per request thread pauses its accepting (AcceptBalance in
    service/gunicorn_worker.py); its loop must take accepting up again, or once every worker holds that many,
    new connections would wait for ever. Twelve kept-alive connections on two workers of two threads each."""
    client = start(GUNICORN, GUNICORN_CMD_ARGS="-w 2 --threads 2", STORE=f"sqlite://{tmp_path / 'tasks.db'}")
    kept = client.open(12, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
    for sock in kept:
        answer = sock.recv(65536)  # each is answered, and stays open (kept alive)
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert client.request("GET", "/healthz")[0] == 200  # and one more connection still gets in
