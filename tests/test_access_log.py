"""The access line: one per request in the chosen format, with its request id, secrets left out."""

from __future__ import annotations

import email.message
import io
import json
import logging
import logging.config
import re
from datetime import timedelta
from types import SimpleNamespace

import pytest
from gunicorn.config import Config as GunicornConfig
from http_fixtures import LISTENING, Client, ServerProcess, clean_environment, half_closed_exchange, wait_until

from service import logs
from service.access_log import AccessLogger

ENVIRON = {
    "REMOTE_ADDR": "127.0.0.1",
    "REQUEST_METHOD": "POST",
    "RAW_URI": "/enqueue",
    "PATH_INFO": "/enqueue",
    "SERVER_PROTOCOL": "HTTP/1.1",
    "HTTP_USER_AGENT": "curl/8.5.0",
}


@pytest.fixture
def gunicorn_logger(monkeypatch):
    """An AccessLogger set up as gunicorn.conf.py sets it up, writing to a buffer."""
    root = logging.getLogger()
    saved = (root.level, root.handlers[:])
    stdout = io.StringIO()

    def make(log_format: str = "text", *, accesslog: str | None = "-") -> tuple[AccessLogger, io.StringIO]:
        monkeypatch.setattr("sys.stdout", stdout)
        monkeypatch.setattr("sys.stderr", io.StringIO())
        cfg = GunicornConfig()
        cfg.set("accesslog", accesslog)
        cfg.set("logconfig_dict", logs.logging_config("INFO", log_format))
        return AccessLogger(cfg), stdout

    yield make
    for name in ("gunicorn.error", logs.ACCESS_LOGGER):
        logging.getLogger(name).handlers.clear()
    root.handlers[:] = saved[1]
    root.setLevel(saved[0])


def request(logger: AccessLogger, status: str = "202 ACCEPTED", **environ: str) -> None:
    headers = [("Content-Type", "application/json"), ("X-Request-ID", "rid-1")]
    response = SimpleNamespace(status=status, sent=236, headers=headers)
    logger.access(response, None, {**ENVIRON, **environ}, timedelta(milliseconds=2, microseconds=700))


def test_gunicorns_start_line_waits_for_the_start_checks(gunicorn_logger, monkeypatch):
    """A start refused by on_starting's checks said "Starting gunicorn" before its one configuration line."""
    logger, _ = gunicorn_logger("text")
    said: list[str] = []
    monkeypatch.setattr(logger.error_log, "info", lambda message, *args, **kwargs: said.append(message % args))
    logger.info("Starting gunicorn %s", "27.0.1")  # as Arbiter.start logs it, before on_starting
    logger.info("Arbiter booted")
    assert said == ["Arbiter booted"]
    logger.start_checked()
    logger.info("Listening at: %s", "http://127.0.0.1:8000")
    assert said == ["Arbiter booted", "Starting gunicorn 27.0.1", "Listening at: http://127.0.0.1:8000"]


def test_a_text_access_line_keeps_gunicorn_layout_and_appends_the_request_id(gunicorn_logger):
    logger, out = gunicorn_logger("text")
    request(logger)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("[") and "] [INFO] gunicorn.access: " in line
    assert line.endswith(
        ' gunicorn.access: 127.0.0.1 "POST /enqueue HTTP/1.1" 202 236 2ms "curl/8.5.0" request_id=rid-1'
    )


def test_a_json_access_line_has_the_usual_keys_and_the_request_fields(gunicorn_logger):
    logger, out = gunicorn_logger("json")
    request(logger)
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert list(record)[:6] == ["level", "logger", "message", "task_id", "request_id", "timestamp"]
    assert record["message"] == '127.0.0.1 "POST /enqueue HTTP/1.1" 202 236 2ms "curl/8.5.0"'
    assert (record["level"], record["logger"], record["task_id"], record["request_id"]) == (
        "INFO",
        "gunicorn.access",
        None,
        "rid-1",
    )
    assert record["timestamp"].endswith("+00:00")
    fields = ("remote_addr", "method", "path", "status", "response_bytes", "duration_ms")
    assert [record[f] for f in fields] == ["127.0.0.1", "POST", "/enqueue", 202, 236, 2]


def test_a_json_access_line_s_path_is_the_one_the_client_asked_for(gunicorn_logger):
    logger, out = gunicorn_logger("json")
    request(logger, RAW_URI="/wp/tasks/abc?token=x", SCRIPT_NAME="/wp", PATH_INFO="/tasks/abc")  # under a root path
    # A path outside the root path, answered before the app (gunicorn's environ for it has no PATH_INFO
    # nor headers), and an absolute-form target.
    outside = {name: value for name, value in ENVIRON.items() if name not in ("PATH_INFO", "HTTP_USER_AGENT")}
    asked = SimpleNamespace(path="/other", headers=[("HOST", "x"), ("USER-AGENT", "curl/8.5.0")])
    response = SimpleNamespace(status="404 Not Found", sent=0, headers=[])
    logger.access(response, asked, {**outside, "RAW_URI": "/other"}, timedelta(0))
    absolute = SimpleNamespace(path="/tasks/abc", headers=[])
    logger.access(response, absolute, {**ENVIRON, "RAW_URI": "http://x/tasks/abc?a=1"}, timedelta(0))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [record["path"] for record in records] == ["/wp/tasks/abc", "/other", "/tasks/abc"]
    assert records[1]["message"].endswith('"POST /other HTTP/1.1" 404 0 0ms "curl/8.5.0"')


def test_the_duration_counts_from_when_the_request_began_to_arrive(gunicorn_logger, monkeypatch):
    # Read on the event loop (a slow upload, or a body that never came: a 408) before a thread had it.
    logger, out = gunicorn_logger("json")
    monkeypatch.setattr("service.access_log._clock", lambda: 101.5)
    response = SimpleNamespace(status="408 REQUEST TIMEOUT", sent=152, headers=[])
    logger.access(response, SimpleNamespace(path="/enqueue", headers=[], began_arriving=100.0), ENVIRON, timedelta(0))
    (record,) = [json.loads(line) for line in out.getvalue().splitlines()]
    assert record["duration_ms"] == 1500
    assert " 408 152 1500ms " in record["message"]


def test_access_log_off_writes_nothing(gunicorn_logger):
    logger, out = gunicorn_logger("text", accesslog=None)
    request(logger)
    assert out.getvalue() == ""


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_forged_user_agent_cannot_split_or_shift_the_line(gunicorn_logger, log_format):
    logger, out = gunicorn_logger(log_format)
    request(logger, HTTP_USER_AGENT='x" 500 0 0ms "y\n[2026-11-27 10:00:00 +0000] [1] [INFO] forged\u2028a\x85b')
    (line,) = out.getvalue().splitlines()
    message = json.loads(line)["message"] if log_format == "json" else line
    assert '"x\\" 500 0 0ms \\"y' in message


@pytest.mark.parametrize(
    ("target", "status", "logged"),
    [
        ("/healthz?token=s3cret", "200 OK", "/healthz?token=REDACTED"),
        ("/tasks?state=done&api_key=s3cret&limit=5", "200 OK", "/tasks?state=done&api_key=REDACTED&limit=5"),
        ("/tasks?Access_Token=s3cret", "200 OK", "/tasks?Access_Token=REDACTED"),
        ("/tasks?access%5Ftoken=s3cret", "200 OK", "/tasks?access%5Ftoken=REDACTED"),
        ("/tasks?password=s3cret&state=x", "400 BAD REQUEST", "/tasks?password=REDACTED&state=x"),
        ("/tasks/a?t=s3cret", "401 UNAUTHORIZED", "/tasks/a?REDACTED"),  # a refused request keeps no query
        # A bearer token, a JWT, a password, an authorization code or a session id: they were logged.
        (
            "/tasks?limit=2&bearer=s3cret&jwt=s3cret&pass=s3cret&code=s3cret&sid=s3cret&PHPSESSID=s3cret",
            "400 BAD REQUEST",
            "/tasks?limit=2&bearer=REDACTED&jwt=REDACTED&pass=REDACTED&code=REDACTED&sid=REDACTED&PHPSESSID=REDACTED",
        ),
        (
            "/tasks?user_pass=s3cret&Auth-Code=s3cret&passphrase=s3cret",
            "400 BAD REQUEST",
            "/tasks?user_pass=REDACTED&Auth-Code=REDACTED&passphrase=REDACTED",
        ),
        # Short names count only as words of their own: these are not secrets.
        (
            "/tasks?compass=n&zipcode=1&inside=y&state=done",
            "400 BAD REQUEST",
            "/tasks?compass=n&zipcode=1&inside=y&state=done",
        ),
        ("/tasks?state=done&limit=5", "200 OK", "/tasks?state=done&limit=5"),
    ],
)
def test_secrets_in_the_query_are_never_logged(gunicorn_logger, target, status, logged):
    logger, out = gunicorn_logger("text")
    request(logger, status=status, REQUEST_METHOD="GET", RAW_URI=target, PATH_INFO=target.partition("?")[0])
    text = out.getvalue()
    assert "s3cret" not in text
    assert f'"GET {logged} HTTP/1.1"' in text


TOKEN = "0123456789abcdef-token"


@pytest.mark.parametrize(
    ("target", "status", "logged", "path"),
    [
        (f"/healthz?{TOKEN}", "200 OK", "/healthz?REDACTED", "/healthz"),
        (f"/metrics?otp={TOKEN}&x=1", "200 OK", "/metrics?otp=REDACTED&x=1", "/metrics"),
        (f"/tasks/{TOKEN}", "404 NOT FOUND", "/tasks/REDACTED", "/tasks/REDACTED"),
        (f"/tasks/x{TOKEN}y?state={TOKEN}", "400 BAD REQUEST", "/tasks/xREDACTEDy?state=REDACTED", "/tasks/xREDACTEDy"),
        ("/tasks/0123456789abcdef%2Dtoken", "404 NOT FOUND", "/tasks/REDACTED", "/tasks/REDACTED"),  # percent-encoded
        ("/tasks/%30%31?a=%32", "404 NOT FOUND", "/tasks/%30%31?a=%32", "/tasks/%30%31"),  # as sent when no token
    ],
)
@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_api_token_is_not_logged_wherever_the_client_put_it_in_the_target(
    gunicorn_logger, log_format, target, status, logged, path
):
    logger, out = gunicorn_logger(log_format)
    logger.token = TOKEN
    raw_path = target.partition("?")[0]
    request(logger, status=status, REQUEST_METHOD="GET", RAW_URI=target, PATH_INFO=raw_path)
    (line,) = out.getvalue().splitlines()
    assert TOKEN not in line
    if log_format == "json":
        assert json.loads(line)["path"] == path
        line = json.loads(line)["message"]
    assert f'"GET {logged} HTTP/1.1"' in line


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_the_api_token_in_the_user_agent_is_not_logged(gunicorn_logger, log_format):
    logger, out = gunicorn_logger(log_format)
    logger.token = TOKEN
    request(logger, HTTP_USER_AGENT=f"probe/1 {TOKEN}")
    (line,) = out.getvalue().splitlines()
    assert TOKEN not in line
    assert '"probe/1 REDACTED"' in (json.loads(line)["message"] if log_format == "json" else line)


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"], ["app.py"]])
def test_the_api_token_in_a_request_target_is_not_logged(tmp_path, command):
    # The open endpoints keep their query, and only secret-looking parameter names were redacted. At DEBUG, the
    # line gunicorn writes as it hands each request to the app showed the token a path carried.
    env = clean_environment(
        API_TOKEN=TOKEN, WORK_MIN_MS="0", WORK_MAX_MS="0", HOST="127.0.0.1", PORT="0", LOG_LEVEL="DEBUG"
    )
    server = ServerProcess(command, log_path=tmp_path / "server.log", env=env)
    sent = [
        (f"/healthz?{TOKEN}", 200, "/healthz?REDACTED"),
        (f"/metrics?otp={TOKEN}", 200, "/metrics?otp=REDACTED"),
        (f"/tasks/{TOKEN}", 404, "/tasks/REDACTED"),
    ]
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        for n, (path, status, _) in enumerate(sent):
            headers = {"X-Request-ID": f"rid-{n}", "Authorization": f"Bearer {TOKEN}"}
            assert client.request("GET", path, headers=headers)[0] == status
        # The token as a request id or in the user agent (a 401 included): it was echoed and logged.
        for path, status in [("/healthz", 200), ("/tasks/zz", 401)]:
            headers = {"X-Request-ID": TOKEN, "User-Agent": f"probe/1 {TOKEN}"}
            answered, answer_headers, _ = client.request("GET", path, headers=headers)
            assert answered == status and TOKEN not in answer_headers["X-Request-ID"]
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    log = server.log()
    assert TOKEN not in log
    assert log.count('"probe/1 REDACTED"') == 2
    for n, (_, status, logged) in enumerate(sent):
        [line] = [line for line in log.splitlines() if line.endswith(f"request_id=rid-{n}") and '"GET ' in line]
        assert f'"GET {logged} HTTP/1.1" {status}' in line


@pytest.mark.e2e
def test_gunicorn_writes_one_access_line_per_request_without_the_secrets(tmp_path):
    token = "0123456789abcdef-token"
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(API_TOKEN=token, WORK_MIN_MS="0", WORK_MAX_MS="0"),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        sent = [
            ("GET", f"/healthz?access_token={token}", 200),
            ("GET", f"/tasks/a?auth={token}", 401),
            ("GET", f"/tasks?state=done&api_key={token}", 401),
            ("GET", "/nowhere?x=1", 404),
        ]
        for n, (method, path, status) in enumerate(sent):
            answer = client.request(method, path, headers={"X-Request-ID": f"rid-{n}"})
            assert answer[0] == status
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    log = server.log()
    assert token not in log
    access = [line for line in log.splitlines() if "gunicorn.access:" in line and "request_id=rid-" in line]
    # In request order: gunicorn writes a request's line after its response, so on a loaded machine
    # the next request, on another thread, may be logged first.
    access.sort(key=lambda line: line.rpartition("request_id=")[2])
    assert [line.rpartition("request_id=")[2] for line in access] == ["rid-0", "rid-1", "rid-2", "rid-3"]
    worker = re.search(r"Booting worker with pid: (\d+)", log).group(1)
    assert all(f"] [{worker}] [INFO] gunicorn.access: " in line for line in access)  # the worker's pid
    assert '"GET /healthz?access_token=REDACTED HTTP/1.1" 200' in access[0]
    assert '"GET /tasks/a?REDACTED HTTP/1.1" 401' in access[1]
    assert '"GET /nowhere?x=1 HTTP/1.1" 404' in access[3]


@pytest.mark.parametrize(
    ("line", "logged"),
    [
        ("GET /tasks?access_token=s3cret\tHTTP/1.1", "GET /tasks?REDACTED\tHTTP/1.1"),
        ("GET /tasks?x=1 token=s3cret and HTTP/1.1", "GET /tasks?REDACTED HTTP/1.1"),
        ("GET /tasks?api_token=s3cret\x01T HTTP/9.1", "GET /tasks?REDACTED HTTP/9.1"),
        ("GET /tasks?token=s3cret", "GET /tasks?REDACTED"),
        ("GET /tasks HTTP/1.1 extra", "GET /tasks HTTP/1.1 extra"),
    ],
)
def test_a_request_line_not_parsed_keeps_nothing_after_its_question_mark(line, logged):
    assert logs.redact_request_line(line) == logged


MALFORMED_WITH_THE_TOKEN = [
    b"GET /tasks?access_token=%s\tHTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tasks?api_token=%s\x01T HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tasks?access_token=%s and HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /tasks?access_token=%s HTTP/9.1\r\nHost: x\r\n\r\n",
    b"GET /tasks HTTP/1.1\r\nHost: x\r\nAuthorization Bearer %s\r\n\r\n",
    b"GET /tasks?token=%s HTTP/1.1 junk\r\nHost: x\r\n\r\n",
    b"GET /tasks?access_token=%s\r\nHost: x\r\n\r\n",
    b"GET /tasks HTTP/1.1\r\nHost: x\r\nBearer %s: x\r\n\r\n",
    b"POST /enqueue HTTP/1.1\r\nHost: x\r\nExpect: %s\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /enqueue HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: %s\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /enqueue HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, %s, chunked\r\n\r\n0\r\n\r\n",
    b"POST /enqueue HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}",
]


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"], ["app.py"]])
def test_the_token_in_a_malformed_request_is_neither_logged_nor_answered(tmp_path, command):
    # gunicorn's warning quoted the request line (and a header line without a colon) as sent, and python app.py's
    # access line the request line it could not parse: the token with them. python app.py's answer quoted it too
    # (the request line whole, the first 40 characters of a header line).
    token = "0123456789abcdef-token"
    env = clean_environment(API_TOKEN=token, WORK_MIN_MS="0", WORK_MAX_MS="0", HOST="127.0.0.1", PORT="0")
    server = ServerProcess(command, log_path=tmp_path / "server.log", env=env)
    try:
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: Client(port).request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        for sent in MALFORMED_WITH_THE_TOKEN:
            answer = half_closed_exchange(port, sent % token.encode())
            assert answer.startswith((b"HTTP/1.1 4", b"HTTP/1.1 501")), answer[:200]
            assert token[:12].encode() not in answer, answer  # not even the part a detail cut short kept
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    log = server.log()
    assert "REDACTED" in log
    assert token not in log


FRAMINGS_REFUSED = {
    b"Content-Length: abc\r\n": "Content-Length 'abc' is not a number of bytes",
    b"Content-Length: 2\r\nContent-Length: 2\r\n": "the request has more than one Content-Length header",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n": "the request has both Content-Length and Transfer-Encoding",
    b"Transfer-Encoding: gzip\r\n": "the Transfer-Encoding does not end with chunked",
}


@pytest.mark.e2e
@pytest.mark.parametrize("command", [["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"], ["app.py"]])
def test_a_refused_body_framing_is_logged_alike_by_both_servers(tmp_path, command):
    # gunicorn answered and logged "Invalid HTTP Header: 'CONTENT-LENGTH'" with the request line and user agent in
    # its access line; python app.py said what was wrong, but logged "-" for both.
    env = clean_environment(WORK_MIN_MS="0", WORK_MAX_MS="0", HOST="127.0.0.1", PORT="0")
    server = ServerProcess(command, log_path=tmp_path / "server.log", env=env)
    answered = {}
    try:
        port = server.wait_for_port(LISTENING)
        wait_until(lambda: Client(port).request("GET", "/healthz")[0] == 200, timeout=20, what="/healthz")
        for fields, detail in FRAMINGS_REFUSED.items():
            head = b"POST /enqueue?n=1 HTTP/1.1\r\nHost: x\r\nUser-Agent: probe/1\r\n" + fields + b"\r\n"
            answer = half_closed_exchange(port, head + b"{}")
            assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["detail"].startswith(detail)
            answered[detail] = re.search(rb"X-Request-ID: (\w+)", answer)[1].decode()
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    log = server.log().splitlines()
    for detail, request_id in answered.items():
        [warning] = [line for line in log if "gunicorn.error: " in line and line.endswith(f"request_id={request_id}")]
        assert f"Invalid request from ip=127.0.0.1: {detail}" in warning
        [access] = [line for line in log if "gunicorn.access: " in line and line.endswith(f"request_id={request_id}")]
        assert '127.0.0.1 "POST /enqueue?n=1 HTTP/1.1" 400 ' in access and ' "probe/1" ' in access


def test_the_token_is_left_out_of_every_text_a_refused_head_quotes_in_any_case():
    # gunicorn's errors keep what they quote under names of their own (Expect's value in ``expect``, a chunk size line
    # in ``data``): only four names were redacted. A transfer coding is quoted lowercased.
    from gunicorn.http import errors

    from service.gunicorn_worker import redact
    from service.head_problems import head_problem

    token = "Mixed-Case-Token-0123456789"
    quoted = [
        errors.ExpectationFailed(f"x{token}"),
        errors.UnsupportedTransferCoding(token.lower()),
        errors.InvalidChunkSize(token.encode()),
        errors.ChunkMissingTerminator(token.upper().encode()),
        errors.InvalidProxyLine(f"PROXY {token}"),
        errors.NoMoreData(token.encode()),
        errors.InvalidHeader(f"Bearer {token}"),
    ]
    for exc in quoted:
        redact(exc, token)
        assert "REDACTED" in str(exc)
        assert "0123456789" not in str(exc), exc
    for field, value in [("Transfer-Encoding", token), ("Transfer-Encoding", f"gzip, {token}, chunked")]:
        head = email.message.Message()
        head["Host"], head[field] = "x", value
        status, detail = head_problem("HTTP/1.1", head, token)
        assert (status, "REDACTED" in detail, "0123456789" in detail) == (501, True, False), detail
    head = email.message.Message()
    head["Host"], head["Content-Length"] = "x", token
    assert "Mixed-Case" not in head_problem("HTTP/1.1", head, token)[1]
