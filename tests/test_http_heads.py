"""Request heads both real servers (gunicorn and ``python app.py``) refuse before the application reads a body."""

from __future__ import annotations

import email.utils
import gzip
import json
import re
import socket
import time

import pytest
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, half_closed_exchange, wait_until

pytestmark = pytest.mark.e2e

COMMANDS = {"gunicorn": ["-m", "gunicorn", "-c", "gunicorn.conf.py"], "app.py": ["app.py"]}


@pytest.fixture(scope="module", params=list(COMMANDS))
def port(request, tmp_path_factory):
    """The port of one server of each kind, shared by this module's tests."""
    settings = {"HOST": "127.0.0.1", "PORT": "0", "WORK_MIN_MS": "0", "WORK_MAX_MS": "0", "FAILURE_RATE": "0"}
    log_path = tmp_path_factory.mktemp("heads") / "server.log"
    server = ServerProcess(COMMANDS[request.param], log_path=log_path, env=clean_environment(**settings))
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        yield client.port
    finally:
        server.stop()


def exchange(port: int, data: bytes, seconds: float = 8) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a new connection and read until the server closes it: status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def problem(headers: dict[str, str], body: bytes) -> dict:
    assert headers["content-type"] == "application/problem+json"
    return json.loads(body)


@pytest.mark.parametrize("fields", [b"", b"Host: a\r\nHost: b\r\n"], ids=["no-host", "two-hosts"])
def test_an_http_1_1_request_without_exactly_one_host_is_refused_400(port, fields):
    status, headers, body = exchange(port, b"GET /healthz HTTP/1.1\r\n" + fields + b"Connection: close\r\n\r\n")
    assert status == 400
    assert headers["connection"] == "close"
    assert "x-request-id" in headers
    assert "HOST" in problem(headers, body)["detail"].upper()


@pytest.mark.parametrize("field", [b"Host : a", b"Host\t: a"])
def test_a_host_field_with_whitespace_before_its_colon_is_refused_400_as_a_malformed_name(port, field):
    status, headers, body = exchange(port, b"GET /healthz HTTP/1.1\r\n" + field + b"\r\nConnection: close\r\n\r\n")
    assert status == 400
    detail = problem(headers, body)["detail"]
    assert "no Host header" not in detail
    assert repr(field.partition(b":")[0].decode()) in detail  # the name as sent, whitespace included


@pytest.mark.parametrize("version", [b"1.2", b"1.9"])
def test_a_later_http_1_request_without_host_is_refused_400_as_an_http_1_1_one(port, version):
    # Both servers served HTTP/1.2 to 1.9 without Host (200): only the literal HTTP/1.1 was checked.
    status, headers, body = exchange(port, b"GET /healthz HTTP/" + version + b"\r\nConnection: close\r\n\r\n")
    assert status == 400
    assert headers["connection"] == "close"
    assert "no Host header" in problem(headers, body)["detail"]
    body = b'{"id": "no-host-%s", "payload": "p"}' % version
    head = b"POST /enqueue HTTP/%s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    assert exchange(port, head % (version, len(body)) + body)[0] == 400
    assert Client(port).request("GET", f"/tasks/no-host-{version.decode()}")[0] == 404


def test_an_http_1_1_enqueue_without_host_queues_nothing(port):
    body = b'{"id": "no-host", "payload": "p"}'
    head = b"POST /enqueue HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    status, headers, answer = exchange(port, head + body)
    assert status == 400
    assert "Host header" in problem(headers, answer)["detail"]
    assert Client(port).request("GET", "/tasks/no-host")[0] == 404


def test_an_http_1_0_request_without_host_is_served(port):
    status, _, body = exchange(port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert status == 200
    assert json.loads(body)["status"] == "ok"


def test_pipelined_requests_are_answered_in_turn_by_gunicorn_and_the_first_alone_by_app_py(request, port):
    # python app.py serves one request per connection (README): the second is neither read nor acted on.
    task = json.dumps({"id": f"pipelined-{request.node.callspec.id}", "payload": 1}).encode()
    second = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    received = half_closed_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n" + second % len(task) + task)
    answers = re.findall(rb"^HTTP/1\.1 (\d{3})", received, re.MULTILINE)
    if request.node.callspec.params["port"] == "app.py":
        assert answers == [b"200"]
        assert b"\r\nConnection: close\r\n" in received
        assert Client(port).request("GET", f"/tasks/pipelined-{request.node.callspec.id}")[0] == 404
    else:
        assert answers == [b"200", b"202"]


@pytest.mark.parametrize("version", [b"1.1", b"1.2", b"1.9"])
def test_a_request_of_a_later_http_1_version_is_answered_in_http_1_1(port, version):
    # gunicorn answered an HTTP/1.2 ... 1.9 request with HTTP/1.2 ... 1.9, versions it does not speak.
    # (An HTTP/1.0 request may be answered in 1.0, as gunicorn does, or 1.1, as python app.py does.)
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(b"GET /healthz HTTP/" + version + b"\r\nHost: a\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 "), received[:80]
    assert json.loads(received.partition(b"\r\n\r\n")[2])["status"] == "ok"


HEADS_OVER_THE_LIMITS = {
    "request-line": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "request line"),
    "field": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431, "field"),
    "fields": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(150)) + b"\r\n",
        431,
        "fields",
    ),
    "head": (
        b"GET /healthz HTTP/1.1\r\nHost: a\r\n"
        + b"".join(b"X-H%d: %s\r\n" % (n, b"h" * 8000) for n in range(9))
        + b"\r\n",
        431,
        "request head",
    ),
}


@pytest.mark.parametrize(("head", "status", "detail"), HEADS_OVER_THE_LIMITS.values(), ids=HEADS_OVER_THE_LIMITS)
def test_a_head_over_the_limits_is_refused_with_a_problem_document(port, head, status, detail):
    # python app.py's server answered 431 with an HTML page, and served the others.
    answer, headers, body = exchange(port, head)
    assert answer == status
    assert headers["connection"] == "close"
    assert "x-request-id" in headers
    assert detail in problem(headers, body)["detail"].lower()


REFUSED_BEFORE_THE_APPLICATION = {
    "no-host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    "expectation": (b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: foo\r\n\r\n", 417),
    "coding": (b"POST /enqueue HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
    "request-line": HEADS_OVER_THE_LIMITS["request-line"][:2],
    "field": HEADS_OVER_THE_LIMITS["field"][:2],
}


@pytest.mark.parametrize(
    ("head", "status"), REFUSED_BEFORE_THE_APPLICATION.values(), ids=REFUSED_BEFORE_THE_APPLICATION
)
def test_a_request_refused_before_the_application_is_answered_with_date_and_server(port, head, status):
    # RFC 9110 section 6.6.1: a server with a clock sends Date in its 4xx answers; gunicorn's own errors had none.
    answer, headers, _ = exchange(port, head)
    assert answer == status
    sent = email.utils.parsedate_to_datetime(headers["date"])
    assert abs(sent.timestamp() - time.time()) < 600  # wide: only a date far off would be wrong
    assert headers["server"]


def test_a_request_line_too_long_is_answered_414_uri_too_long(port):
    # python app.py's server said "414 Request-URI Too Long"; gunicorn says RFC 9110's "URI Too Long".
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(HEADS_OVER_THE_LIMITS["request-line"][0])
        received = b""
        while b"\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    assert received.partition(b"\r\n")[0] == b"HTTP/1.1 414 URI Too Long"


@pytest.mark.parametrize("length", [5000, 70_000])
def test_a_request_line_too_long_names_the_limit_whatever_its_length(port, length):
    # gunicorn's parser said "Request Line is too large (5014 > 4094)", and its event loop, past 64 KiB, "longer
    # than 65536 bytes", as if lines up to that length were taken.
    answer, headers, body = exchange(port, b"GET /" + b"a" * length + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert answer == 414
    assert problem(headers, body)["detail"] == "the request line is longer than 4094 bytes"


@pytest.mark.parametrize(
    "line",
    [
        b"GET /healthz HTTP/2.0",
        b"GET /healthz HTTP/0.9",
        b"GET /healthz",
        b"NOT A REQUEST LINE AT ALL",
        b"get /healthz HTTP/1.1",
        b"GE /healthz HTTP/1.1",
        b"GET healthz HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET /h\xe9 HTTP/1.1",
        b"GET /healthz\tHTTP/1.1",
        b"GET\t/healthz HTTP/1.1",
        b"GET  /healthz HTTP/1.1",
        b"GET /healthz HTTP/1.1 ",
    ],
    ids=[
        "http-2.0",
        "http-0.9",
        "no-version",
        "malformed",
        "lowercase",
        "short-method",
        "no-slash",
        "star",
        "latin-1",
        "tab-before-version",
        "tab-after-method",
        "two-spaces",
        "trailing-space",
    ],  # fmt: skip
)
def test_a_request_line_without_http_1_is_refused_400_with_a_status_line(port, line):
    # python app.py's server answered HTTP/2.0 with a 505 HTML page, the next three without a status line, and
    # served the others.
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(line + b"\r\nHost: a\r\n\r\n")
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 400 "), received[:80]
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"\r\nContent-Type: application/problem+json\r\n" in head
    assert json.loads(body)["status"] == 400


@pytest.mark.parametrize(
    ("version", "fields"),
    [
        (b"1.1", b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n"),
        (b"1.1", b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n"),
        (b"1.0", b"Transfer-Encoding: chunked\r\n"),
        (b"1.1", b"Content-Length: %d\r\nContent-Length: %d\r\n"),
        (b"1.1", b"Content-Length: 1\r\nContent-Length: %d\r\n"),
        (b"1.1", b"Content-Length: +%d\r\n"),
        (b"1.1", b"Content-Length: -1\r\n"),
    ],
    ids=[
        "length-and-chunked",
        "chunked-and-length",
        "chunked-http-1.0",
        "two-lengths",
        "conflicting-lengths",
        "signed-length",
        "negative-length",
    ],  # fmt: skip
)
def test_a_body_whose_length_is_ambiguous_is_refused_400_and_queues_nothing(port, version, fields):
    # python app.py's server read the chunked body (or the first length) and queued the task: 202.
    task = b'{"id": "ambiguous", "payload": "p"}'
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(task), task)
    head = b"POST /enqueue HTTP/%s\r\nHost: a\r\nContent-Type: application/json\r\n" % version
    length = len(chunked if b"chunked" in fields else task)
    fields = fields.replace(b"%d", b"%d" % length)
    status, headers, body = exchange(port, head + fields + b"\r\n" + (chunked if b"chunked" in fields else task))
    assert status == 400
    assert headers["connection"] == "close"
    assert problem(headers, body)["type"] == "about:blank"
    assert Client(port).request("GET", "/tasks/ambiguous")[0] == 404


@pytest.mark.parametrize(
    ("field", "detail"),
    [
        (b"X-A: one\r\n two\r\n", "fold"),
        (b"X-A: a\x00b\r\n", "control character"),
        (b"X-A: a\rb\r\n", "control character"),
        (b"X A: b\r\n", "field name"),
        (b": b\r\n", "field name"),
    ],
    ids=["folded", "nul", "bare-cr", "space-in-name", "no-name"],
)
def test_a_malformed_header_field_is_refused_400(request, port, field, detail):
    # python app.py's server read each of these and served the request (200).
    status, headers, body = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n")
    assert status == 400
    assert headers["connection"] == "close"
    assert problem(headers, body)["type"] == "about:blank"
    if request.node.callspec.params["port"] == "app.py":  # gunicorn's details are its own
        assert detail in problem(headers, body)["detail"]


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_two_host_fields_are_refused_400_whatever_the_version(port, version):
    # python app.py's server served an HTTP/1.0 request with two: it counted Host in HTTP/1.1 requests only.
    status, headers, body = exchange(port, b"GET /healthz HTTP/%s\r\nHost: a\r\nHost: b\r\n\r\n" % version)
    assert status == 400
    assert headers["connection"] == "close"


def test_a_head_of_100_fields_is_served_and_one_of_101_refused(port):
    # python app.py's server refused 100 already: its parser counted the empty line that ends the head as a field.
    head = b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
    assert exchange(port, head + b"".join(b"X-H%d: v\r\n" % n for n in range(98)) + b"\r\n")[0] == 200
    assert exchange(port, head + b"".join(b"X-H%d: v\r\n" % n for n in range(99)) + b"\r\n")[0] == 431


CHUNKED_TASK = b'{"id": "%s", "payload": "p"}'
CHUNKED_FRAMINGS = {  # a task's chunked body, framed as each case says
    "extension": (b"%x;name=value\r\n%s\r\n0\r\n\r\n", 202),
    "quoted-extension-after-whitespace": (b'%x ;name="v; v"\r\n%s\r\n0\r\n\r\n', 202),
    "extension-on-the-last-chunk": (b"%x\r\n%s\r\n0;x=1\r\n\r\n", 202),
    "trailer-field": (b"%x\r\n%s\r\n0\r\nX-Checksum: abc\r\n\r\n", 202),
    "malformed-trailer-field": (b"%x\r\n%s\r\n0\r\nbad trailer\r\n\r\n", 400),
    "trailer-field-with-nul": (b"%x\r\n%s\r\n0\r\nX-A: a\x00b\r\n\r\n", 400),
    # Fields a trailer may not carry (RFC 9110 section 6.5.1), a repeated singleton field, one field too many.
    "content-length-trailer": (b"%x\r\n%s\r\n0\r\nContent-Length: 5\r\n\r\n", 400),
    "transfer-encoding-trailer": (b"%x\r\n%s\r\n0\r\ntransfer-encoding: gzip\r\n\r\n", 400),
    "authorization-trailer": (b"%x\r\n%s\r\n0\r\nAuthorization: Bearer x\r\n\r\n", 400),
    "content-type-trailer": (b"%x\r\n%s\r\n0\r\nContent-Type: text/plain\r\n\r\n", 202),
    "content-type-trailer-twice": (b"%x\r\n%s\r\n0\r\nContent-Type: a\r\nContent-Type: b\r\n\r\n", 400),
    "100-trailer-fields": (b"%x\r\n%s\r\n0\r\n" + b"X-T: v\r\n" * 100 + b"\r\n", 202),
    # Past the limits on a head's fields (431), as gunicorn's parser and the event loop refuse them.
    "101-trailer-fields": (b"%x\r\n%s\r\n0\r\n" + b"X-T: v\r\n" * 101 + b"\r\n", 431),
    "trailer-field-of-8190-bytes": (b"%x\r\n%s\r\n0\r\nX-T: " + b"v" * 8183 + b"\r\n\r\n", 202),
    "trailer-field-over-8190-bytes": (b"%x\r\n%s\r\n0\r\nX-T: " + b"v" * 8184 + b"\r\n\r\n", 431),
    "trailer-section-over-64-kib": (b"%x\r\n%s\r\n0\r\n" + (b"X-T: " + b"v" * 1000 + b"\r\n") * 70 + b"\r\n", 431),
    # A chunk-size line over 8190 bytes with its extensions: gunicorn took one that came whole with its CRLF.
    "chunk-size-line-of-8190-bytes": (b"%02x;" + b"e" * 8187 + b"\r\n%s\r\n0\r\n\r\n", 202),
    "chunk-size-line-of-8191-bytes": (b"%02x;" + b"e" * 8188 + b"\r\n%s\r\n0\r\n\r\n", 400),
    "chunk-extension-of-60000-bytes": (b"%x;" + b"e" * 60000 + b"\r\n%s\r\n0\r\n\r\n", 400),
    "last-chunk-extension-of-20000-bytes": (b"%x\r\n%s\r\n0;" + b"e" * 20000 + b"\r\n\r\n", 400),
    "last-crlf-cut": (b"%x\r\n%s\r\n0\r\n\r", 400),
    "trailer-section-missing": (b"%x\r\n%s\r\n0\r\n", 400),
    "data-without-crlf": (b"%x\r\n%sXX0\r\n\r\n", 400),
}


@pytest.mark.parametrize(("framing", "status"), CHUNKED_FRAMINGS.values(), ids=CHUNKED_FRAMINGS)
def test_a_chunked_body_is_read_as_gunicorn_reads_it(request, port, framing, status):
    # python app.py's server (werkzeug's decoder) refused chunk extensions, which are to be ignored (RFC 9112
    # section 7.1.1), and trailer fields, and took a body that ended in its last CRLF for a whole one.
    task_id = f"framed-{request.node.callspec.id}"
    task = CHUNKED_TASK % task_id.encode()
    sent = CHUNKED_HEAD % b"chunked" + framing % (len(task), task)
    answer = half_closed_exchange(port, sent)  # the client's end follows the body: a body cut short ends there
    assert answer.split(b" ", 2)[1] == b"%d" % status, answer[:200]
    if phrase := ANSWERED_AS_GUNICORN_DOES.get(request.node.callspec.id.partition("-")[2]):  # without the server
        # python app.py answered a chunk-size line too long 400 BAD REQUEST, as a malformed body (invalid-request),
        # and a trailer section too large 431 REQUEST HEADER FIELDS TOO LARGE: werkzeug's phrases, not gunicorn's.
        assert answer.startswith(b"HTTP/1.1 %d %s\r\n" % (status, phrase)), answer[:200]
        document = json.loads(answer.partition(b"\r\n\r\n")[2])
        assert document["type"] == "about:blank"
        if status == 400:
            assert document["detail"].startswith("a chunk-size line of the chunked body, with its extensions")
    assert Client(port).request("GET", f"/tasks/{task_id}")[0] == (200 if status == 202 else 404)


# The framings refused as gunicorn refuses a head, with its reason phrase, whichever server meets them first.
ANSWERED_AS_GUNICORN_DOES = {
    "101-trailer-fields": b"Request Header Fields Too Large",
    "trailer-field-over-8190-bytes": b"Request Header Fields Too Large",
    "trailer-section-over-64-kib": b"Request Header Fields Too Large",
    "chunk-size-line-of-8191-bytes": b"Bad Request",
    "chunk-extension-of-60000-bytes": b"Bad Request",
    "last-chunk-extension-of-20000-bytes": b"Bad Request",
}


EXPECTING = b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nExpect: 100-continue\r\n"
REFUSED_FROM_THE_HEAD = {
    "too-long": (EXPECTING % b"/enqueue" + b"Content-Length: 999999\r\n\r\n", 413),
    "content-coding": (EXPECTING % b"/enqueue" + b"Content-Encoding: gzip\r\nContent-Length: 20\r\n\r\n", 415),
    "page-of-another-origin": (
        EXPECTING % b"/enqueue/batch" + b"Sec-Fetch-Site: cross-site\r\nContent-Length: 20\r\n\r\n",
        403,
    ),
}


@pytest.mark.parametrize(("head", "status"), REFUSED_FROM_THE_HEAD.values(), ids=REFUSED_FROM_THE_HEAD)
def test_a_request_refused_from_its_head_is_not_told_to_send_its_body(port, head, status):
    # python app.py's server answered 100 Continue first, whatever came next: the client sent its body in vain.
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(head)  # the body is never sent: the answer must come from the head
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 %d " % status), first[:80]


@pytest.mark.parametrize("version", [b"1.1", b"1.2"])
def test_a_request_that_expects_100_continue_gets_it_once_then_its_answer(port, version):
    # gunicorn did not answer it to an HTTP/1.2 request, which waited for it until the request's deadline.
    body = b'{"id": "expecting-%s", "payload": "p"}' % version
    head = (EXPECTING % b"/enqueue").replace(b"HTTP/1.1", b"HTTP/" + version, 1)
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 202 ")


def test_a_request_to_an_unknown_route_that_expects_100_continue_gets_404_without_being_asked_for_its_body(port):
    # No route takes its body: it is not asked for (gunicorn asked for it, then answered 404).
    with socket.create_connection(("127.0.0.1", port), timeout=8) as sock:
        sock.sendall(EXPECTING % b"/no-such-route" + b"Content-Length: 5\r\n\r\n")
        received = b""
        while b"\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
        assert received.startswith(b"HTTP/1.1 404 "), received[:120]
        # Then the connection closes (the body was not read), within the 2 s a closing connection lingers.
        sock.settimeout(6)
        while sock.recv(65536):
            pass


def test_an_expectation_other_than_100_continue_is_refused_417(port):
    # python app.py's server ignored it and served the request.
    status, headers, body = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: a\r\nExpect: something-else\r\n\r\n")
    assert status == 417
    assert problem(headers, body)["status"] == 417


@pytest.mark.parametrize(
    "cut",
    [
        b"DELETE /tasks/%s HTTP/1.1\r\nHost: a\r\n",
        b"DELETE /tasks/%s HTTP/1.1\r\nHost: a\r\nX-A: b",
        b"DELETE /tasks/%s",
    ],
    ids=["after-a-field", "inside-a-field", "inside-the-request-line"],
)
def test_a_request_whose_head_is_cut_short_is_neither_served_nor_answered(request, port, cut):
    # python app.py's server took what had come of the head as the whole of it: the task was cancelled (200).
    task = f"cut-{request.node.callspec.id}".encode()
    body = b'{"id": "%s", "payload": "p", "delay_ms": 600000}' % task
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    assert exchange(port, head % len(body) + body)[0] == 202
    assert half_closed_exchange(port, cut % task) == b""
    status, _, answer = Client(port).request("GET", f"/tasks/{task.decode()}")
    assert status == 200 and json.loads(answer)["state"] != "cancelled"


GZIPPED_TASK = gzip.compress(b'{"id": "gzipped", "payload": "p"}')


@pytest.mark.parametrize("path", ["/enqueue", "/enqueue/batch"])
def test_a_body_with_a_content_coding_is_refused_415_naming_it(port, path):
    head = (
        b"POST %s HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\n\r\n" % (path.encode(), len(GZIPPED_TASK))
    )
    status, headers, body = exchange(port, head + GZIPPED_TASK)
    assert status == 415
    assert headers["accept-encoding"] == "identity"
    assert headers["connection"] == "close"  # the body was not read
    assert "Content-Encoding 'gzip'" in problem(headers, body)["detail"]
    assert Client(port).request("GET", "/tasks/gzipped")[0] == 404


def test_an_identity_content_coding_is_read_as_no_coding(port):
    task = b'{"id": "identity-coded", "payload": "p"}'
    status, _, _ = Client(port).request(
        "POST", "/enqueue", task, headers={"Content-Type": "application/json", "Content-Encoding": "identity"}
    )
    assert status == 202


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"deflate,chunked", b"gzip\r\nTransfer-Encoding: chunked"])
def test_a_transfer_coding_other_than_chunked_is_refused_501_at_once(port, codings):
    # The body is never sent: the answer must come from the head alone, not after a read times out.
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: %s\r\n\r\n"
    started = time.monotonic()
    status, headers, body = exchange(port, head % codings, seconds=4)
    assert time.monotonic() - started < 4
    assert status == 501
    assert headers["connection"] == "close"
    assert "Transfer-Encoding" in problem(headers, body)["detail"]


@pytest.mark.parametrize(
    ("codings", "status", "unknown"),
    [
        (b"x-unknown", 501, "x-unknown"),
        (b"gzip, X-Unknown, br", 501, "x-unknown"),
        (b"chunked, x-unknown", 501, "x-unknown"),
        (b"gzip\r\nTransfer-Encoding: br", 501, "br"),
        (b"chunked, chunked, x-unknown", 400, None),
        (b"gzip,", 501, ""),  # an empty coding is one gunicorn does not know either
        (b"chunked, ", 501, ""),
        (b"gzip", 400, None),
        (b"chunked, gzip", 400, None),
        (b"identity", 400, None),
    ],
)
def test_a_transfer_coding_list_not_ending_with_chunked_is_refused_as_gunicorn_refuses_it(
    port, codings, status, unknown
):
    # python app.py answered 400 to all: gunicorn's parser answers 501 to a coding it does not know, unless it
    # found the list malformed before it. Both name the first unknown coding in the same words (gunicorn's
    # parser quoted the whole field: "Unsupported transfer coding: 'gzip, X-Unknown, br'").
    head = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: %s\r\n\r\n"
    answered, headers, body = exchange(port, head % codings, seconds=4)
    assert answered == status
    if unknown is not None:
        detail = f"Transfer-Encoding {unknown!r} is not supported: send the body with Transfer-Encoding: chunked only"
        assert problem(headers, body)["detail"] == detail


@pytest.mark.parametrize("codings", [b"gzip, chunked", b"deflate\r\nTransfer-Encoding: chunked", b"chunked"])
def test_a_chunked_body_in_http_1_0_is_refused_400_whatever_codings_come_before_chunked(port, codings):
    # python app.py answered "gzip, chunked" 501 (a coding it does not take), gunicorn 400 "Invalid HTTP Header:
    # 'TRANSFER-ENCODING'" (chunked in HTTP/1.0): both now say the second, in words that tell the client why.
    head = b"POST /enqueue HTTP/1.0\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: %s\r\n\r\n"
    status, headers, body = exchange(port, head % codings + b"0\r\n\r\n", seconds=4)
    assert status == 400
    detail = "Transfer-Encoding is not allowed in an HTTP/1.0 request: send Content-Length"
    assert problem(headers, body)["detail"] == detail


@pytest.mark.parametrize(
    "head",
    [b"GET /healthz HTTP/1.1\nHost: a\n\n", b"GET /healthz HTTP/1.0\n\n", b"GET /healthz HTTP/1.1\r\nHost: a\n\r\n"],
    ids=["lf-1.1", "lf-1.0", "one-lf"],
)
def test_a_head_with_bare_lf_lines_is_answered_at_once(port, head):
    # The connection stays open on the client's side: the answer must not wait for the request's deadline.
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=4) as sock:
        sock.sendall(head)
        status_line = sock.recv(65536).partition(b"\r\n")[0]
    assert time.monotonic() - started < 4
    assert status_line.split()[1] == b"400"  # python app.py's server took bare LF lines as whole ones


CHUNKED_HEAD = b"POST /enqueue HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\nTransfer-Encoding: %s\r\n\r\n"


def test_chunked_requests_after_an_empty_line_hold_no_request_thread(port):
    # Their bodies wait on the event loop as without the empty line: handed to a thread with the head
    # alone, ten of them held all 8 threads and /healthz waited for the request deadline (10 s).
    held = [socket.create_connection(("127.0.0.1", port), timeout=4) for _ in range(10)]
    try:
        for sock in held:
            sock.sendall(b"\r\n" + CHUNKED_HEAD % b"chunked" + b"1\r\n{\r\n")
        started = time.monotonic()
        assert Client(port).request("GET", "/healthz")[0] == 200
        assert time.monotonic() - started < 4
    finally:
        for sock in held:
            sock.close()


def test_a_chunked_task_after_an_empty_line_is_accepted(port):
    # python app.py's server closed the connection on the empty line, without an answer.
    body = b'{"id": "after-crlf", "payload": "p"}'
    status, _, _ = exchange(port, b"\r\n" + CHUNKED_HEAD % b"chunked" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    assert status == 202
    assert Client(port).request("GET", "/tasks/after-crlf")[0] == 200


@pytest.mark.parametrize(
    ("head", "status", "detail"),
    [
        (CHUNKED_HEAD % b"gzip, chunked", 501, "Transfer-Encoding"),
        (b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n", 400, "Host header"),
        (b"POST /enqueue HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 400, "Host header"),
    ],
    ids=["gzip-chunked", "get-without-host", "post-without-host"],
)
def test_a_head_after_an_empty_line_is_refused_as_without_it(port, head, status, detail):
    started = time.monotonic()
    answer, headers, body = exchange(port, b"\r\n" + head, seconds=4)
    assert time.monotonic() - started < 4
    assert answer == status
    assert detail in problem(headers, body)["detail"]


EMPTY_REQUEST_LINE = (
    "the request line is empty: at most one empty line (CRLF) may come before it (RFC 9112 section 2.2)"
)
BARE_LF = "a line of the request head ends with a bare LF: every line must end with CRLF (RFC 9112 section 2.2)"


@pytest.mark.parametrize(
    ("sent", "detail"),
    [
        (b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", EMPTY_REQUEST_LINE),
        (b"\nGET /healthz HTTP/1.1\r\n\r\n", BARE_LF),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX: 1\n\r\n", BARE_LF),  # a header line: no "Invalid Request Line"
    ],
    ids=["two-empty-lines", "bare-lf-first", "bare-lf-header"],
)
def test_a_second_empty_line_or_a_bare_lf_is_refused_with_its_own_detail(port, sent, detail):
    # The same detail on both servers: gunicorn's wrapped it in "Invalid Request Line '...'", whatever the line.
    started = time.monotonic()
    status, headers, body = exchange(port, sent, seconds=4)
    assert time.monotonic() - started < 4
    assert status == 400
    assert problem(headers, body)["detail"] == detail
