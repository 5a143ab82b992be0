"""The edges of HTTP on the real gunicorn, met by the clients users run (requests, httpx, raw sockets)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from http import HTTPStatus

import httpx
import pytest
import requests
from http_fixtures import LISTENING, PROJECT_ROOT, ServerProcess, clean_environment, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "edge-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 1024
# Far past the limit and past the 64 KiB gunicorn drains before it reuses a connection.
HUGE_BODY = b'{"id": "huge", "payload": "' + b"x" * 200_000 + b'"}'
ROUNDS = 10


# The settings of this module's servers: a token and a small body limit.
SETTINGS = {
    "API_TOKEN": TOKEN, "MAX_BODY_BYTES": str(BODY_LIMIT), "MAX_PAYLOAD_CHARS": "512",
    "WORK_MIN_MS": "0", "WORK_MAX_MS": "0", "FAILURE_RATE": "0",
}  # fmt: skip


def _serve(command, log_path, **env):
    """Start ``command`` with this module's settings (and ``env``), wait until /healthz answers: its URL and
    process, then stop it."""
    process = ServerProcess(command, log_path=log_path, env=clean_environment(**SETTINGS, **env))
    try:
        base = f"http://127.0.0.1:{process.wait_for_port(LISTENING)}"
        wait_until(lambda: requests.get(base + "/healthz", timeout=5).status_code == 200, timeout=20, what="/healthz")
        yield base, process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One gunicorn shared by this module's tests: its URL and process."""
    command = ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"]
    yield from _serve(command, tmp_path_factory.mktemp("edges") / "gunicorn.log")


@pytest.fixture(scope="module")
def served_by_app_py(tmp_path_factory):
    """``python app.py`` with the same settings: its URL and process."""
    yield from _serve(["app.py"], tmp_path_factory.mktemp("edges-app") / "app.log", HOST="127.0.0.1", PORT="0")


@pytest.fixture(scope="module")
def server(served):
    return served[0]


# -- a refused body does not cost the pooled connection's next request -----------


@pytest.mark.parametrize(("headers", "status"), [(AUTH, 413), ({}, 401)], ids=["too-large", "no-token"])
def test_requests_session_survives_a_refused_large_body(server, headers, status):
    with requests.Session() as session:
        for _ in range(ROUNDS):
            refused = session.post(server + "/enqueue", data=HUGE_BODY, headers=headers, timeout=10)
            assert refused.status_code == status
            assert refused.headers["Connection"] == "close"
            assert session.get(server + "/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize(("headers", "status"), [(AUTH, 413), ({}, 401)], ids=["too-large", "no-token"])
def test_httpx_client_survives_a_refused_large_body(server, headers, status):
    with httpx.Client(base_url=server, timeout=10) as client:
        for _ in range(ROUNDS):
            refused = client.post("/enqueue", content=HUGE_BODY, headers=headers)
            assert refused.status_code == status
            assert refused.headers["Connection"] == "close"
            assert client.get("/healthz").status_code == 200


def test_a_read_body_keeps_the_connection_alive(server):
    with requests.Session() as session:
        task = {"id": "kept-alive", "payload": "p"}
        accepted = session.post(server + "/enqueue", json=task, headers=AUTH, timeout=10)
        assert accepted.status_code == 202
        assert accepted.headers["Connection"] == "keep-alive"


# -- errors gunicorn answers itself are problem documents ---------------------------


def raw_exchange(base: str, data: bytes, *, stop_sending: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection (then half-close it if ``stop_sending``) and read the answer."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if stop_sending:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


GUNICORN_ERRORS = {
    "request line too long": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    "header too large": (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),
    "too many headers": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(150)) + b"\r\n",
        431,
    ),
    "head over 64 KiB": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (n, b"h" * 8000) for n in range(9)) + b"\r\n",
        431,
    ),
    "malformed request line": (b"NOT A REQUEST LINE AT ALL\r\n\r\n", 400),
    "unknown expectation": (
        b"POST /enqueue HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\nContent-Length: 2\r\n\r\n{}",
        417,
    ),
    "content-length and transfer-encoding": (
        b"POST /enqueue HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "obsolete line folding": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: one\r\n two\r\n\r\n", 400),
    "HTTP/0.9": (b"GET /healthz\r\n\r\n", 400),
    "transfer coding not chunked": (
        b"POST /enqueue HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x-unknown\r\n\r\n",
        501,
    ),
}


@pytest.mark.parametrize(("data", "status"), GUNICORN_ERRORS.values(), ids=GUNICORN_ERRORS.keys())
def test_errors_gunicorn_answers_itself_are_problem_documents(server, data, status):
    answered, headers, body = raw_exchange(server, data)
    assert answered == status
    assert headers["content-type"] == "application/problem+json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])
    problem = json.loads(body)
    assert problem["type"] == "about:blank"
    assert (problem["status"], problem["title"]) == (status, HTTPStatus(status).phrase)
    assert problem["detail"]


REASONS = {414: "URI Too Long"}
REFUSED_FROM_THE_EVENT_LOOP = {
    "transfer coding before chunked": (
        b"POST /enqueue HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        501,
    ),
    "no host": (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
}


@pytest.mark.parametrize(
    ("data", "status"),
    [*GUNICORN_ERRORS.values(), *REFUSED_FROM_THE_EVENT_LOOP.values()],
    ids=[*GUNICORN_ERRORS, *REFUSED_FROM_THE_EVENT_LOOP],
)
def test_the_status_line_of_an_error_gunicorn_answers_has_its_codes_reason(server, data, status):
    # gunicorn gave its 501 (and 500) answers the reason "Bad Request"; 414's is RFC 9110's, newer than Python 3.11's.
    port = int(server.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while b"\r\n" not in received and (chunk := sock.recv(65536)):
            received += chunk
    reason = REASONS.get(status, HTTPStatus(status).phrase)
    assert received.partition(b"\r\n")[0].decode() == f"HTTP/1.1 {status} {reason}"


@pytest.mark.parametrize("kind", ["served", "served_by_app_py"], ids=["gunicorn", "app.py"])
@pytest.mark.parametrize(("data", "status"), GUNICORN_ERRORS.values(), ids=GUNICORN_ERRORS.keys())
def test_the_log_lines_of_an_error_gunicorn_answers_name_the_answers_request_id(request, kind, data, status):
    # python app.py wrote no warning (its log did not say why a request was refused) and its access line showed
    # the request line.
    base, process = request.getfixturevalue(kind)
    answered, headers, body = raw_exchange(base, data)
    assert answered == status
    tail = f"request_id={headers['x-request-id']}"

    def lines(logger):
        return [line for line in process.log().splitlines() if f" {logger}: " in line and line.endswith(tail)]

    wait_until(lambda: lines("gunicorn.access"), timeout=20, what="the access line")
    [access] = lines("gunicorn.access")
    assert f'" {status} {len(body)} ' in access  # the bytes of the body, as every access line counts them
    [warning] = lines("gunicorn.error")
    assert "[WARNING]" in warning and "Invalid request from ip=127.0.0.1" in warning
    if request.node.callspec.id.startswith("content-length and transfer-encoding"):
        # A body framing refused with the request read: its request line is shown, by both servers.
        assert f' "POST /enqueue HTTP/1.1" {status} ' in access
    elif kind == "served_by_app_py":  # gunicorn shows the request line of the few errors it raises with the request
        assert f' "-" {status} ' in access


def test_every_operation_describes_the_errors_gunicorn_answers_itself(server):
    spec = requests.get(server + "/openapi.json", timeout=10).json()

    def resolved(response):
        ref = response.get("$ref", "")
        return spec["components"]["responses"][ref.rpartition("/")[2]] if ref else response

    problem = {"schema": {"$ref": "#/components/schemas/Problem"}}
    statuses = sorted({str(status) for _, status in GUNICORN_ERRORS.values()})
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for status in statuses:
                response = resolved(operation["responses"].get(status, {}))
                assert response.get("content") == {"application/problem+json": problem}, (method, path, status)


# -- a body the server cannot read is the client's error ---------------------------


def rejections(base: str, reason: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    line = f'workerpool_tasks_rejected_total{{reason="{reason}"}} '
    return float(next(row for row in text.splitlines() if row.startswith(line)).removeprefix(line))


CHUNKED_HEAD = (
    b"POST /enqueue HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nAuthorization: Bearer "
    + TOKEN.encode()
    + b"\r\n\r\n"
)
BAD_CHUNKED_BODIES = {
    "chunk size not hex": CHUNKED_HEAD + b'zz\r\n{"id": "c", "payload": ""}\r\n0\r\n\r\n',
    "cut short": CHUNKED_HEAD + b'5\r\n{"id"\r\n',
}


@pytest.mark.parametrize("data", BAD_CHUNKED_BODIES.values(), ids=BAD_CHUNKED_BODIES.keys())
def test_a_malformed_chunked_body_is_a_400_counted_as_invalid(server, data):
    invalid, errors = rejections(server, "invalid"), rejections(server, "error")
    status, headers, body = raw_exchange(server, data, stop_sending=True)  # a cut-short body ends here
    assert (status, headers["content-type"]) == (400, "application/problem+json")
    assert json.loads(body)["type"] == "urn:workerpool:problem:invalid-request"
    assert (rejections(server, "invalid"), rejections(server, "error")) == (invalid + 1, errors)


# -- under a root path (SCRIPT_NAME), a path outside it is the client's miss --------


def _dockerfile_healthcheck() -> list[str]:
    """The exec-form command of the Dockerfile's HEALTHCHECK."""
    text = (PROJECT_ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    return json.loads(line.partition(" CMD ")[2])


@pytest.fixture(scope="module")
def under_a_root_path(tmp_path_factory):
    """One gunicorn serving under SCRIPT_NAME=/wp: its URL and process."""
    log_dir = tmp_path_factory.mktemp("root-path")
    process = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=log_dir / "gunicorn.log",
        env=clean_environment(SCRIPT_NAME="/wp", WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0"),
    )
    try:
        port = process.wait_for_port(LISTENING)
        base = f"http://127.0.0.1:{port}"
        healthy = lambda: requests.get(base + "/wp/healthz", timeout=5).status_code == 200  # noqa: E731
        wait_until(healthy, timeout=20, what="/wp/healthz")
        yield base, process
    finally:
        process.stop()


@pytest.mark.parametrize(("method", "path"), [("GET", "/healthz"), ("GET", "/WP/healthz"), ("POST", "/enqueue")])
def test_a_path_outside_the_root_path_is_a_404_problem_with_its_access_line(under_a_root_path, method, path):
    # gunicorn answered these 500 ("Configuration problem"): alerts on 5xx fired for a client's miss.
    base, process = under_a_root_path
    response = requests.request(method, base + path, data=b"{}" if method == "POST" else None, timeout=10)
    assert (response.status_code, response.headers["Content-Type"]) == (404, "application/problem+json")
    problem = response.json()
    assert (problem["status"], problem["title"]) == (404, "Not Found")
    assert "/wp" in problem["detail"]
    assert response.headers["Date"] and response.headers["Server"]  # as every other answer of the service
    tail = f"request_id={response.headers['X-Request-ID']}"

    def access_lines():
        return [line for line in process.log().splitlines() if " gunicorn.access: " in line and line.endswith(tail)]

    wait_until(access_lines, timeout=20, what="the access line")
    [access] = access_lines()
    assert f'" 404 {len(response.content)} ' in access
    assert "Configuration problem" not in process.log()


def test_a_script_name_header_the_path_does_not_start_with_is_a_404(server):
    # gunicorn takes SCRIPT_NAME from a trusted proxy's header (127.0.0.1 by default).
    status, headers, body = raw_exchange(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nSCRIPT_NAME: /x\r\n\r\n")
    assert (status, headers["content-type"]) == (404, "application/problem+json")
    assert json.loads(body)["status"] == 404


def _run_the_image_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = _dockerfile_healthcheck()
    assert command[0] == "python"
    return subprocess.run(
        [sys.executable, *command[1:]], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("proxied", [False, True], ids=["no-proxy", "http_proxy-set"])
def test_the_image_healthcheck_probes_the_root_path_directly(under_a_root_path, proxied):
    # Docker passes the client's proxies to every container: the probe of the container's own port went through them.
    base, _ = under_a_root_path
    env = clean_environment(PORT=base.rsplit(":", 1)[1], SCRIPT_NAME="/wp")
    env.pop("GUNICORN_CMD_ARGS", None)
    with socket.socket() as nothing_listens:
        nothing_listens.bind(("127.0.0.1", 0))
        if proxied:
            env["http_proxy"] = env["HTTP_PROXY"] = f"http://127.0.0.1:{nothing_listens.getsockname()[1]}"
        probe = _run_the_image_healthcheck(env)
    assert probe.returncode == 0, probe.stderr


def test_the_image_healthcheck_asks_the_address_that_gunicorn_cmd_args_binds(under_a_root_path):
    # `docker run -e GUNICORN_CMD_ARGS="-b 0.0.0.0:9000"`: the server listens there, not on PORT, and a probe of
    # 127.0.0.1:$PORT marked the container unhealthy for ever.
    base, _ = under_a_root_path
    port = base.rsplit(":", 1)[1]
    with socket.socket() as nothing_listens:
        nothing_listens.bind(("127.0.0.1", 0))
        refusing = nothing_listens.getsockname()[1]
        env = clean_environment(
            PORT=str(refusing),
            SCRIPT_NAME="/wp",
            GUNICORN_CMD_ARGS=f"--threads 8 -b 0.0.0.0:{port} --graceful-timeout 40",
        )
        probe = _run_the_image_healthcheck(env)
        assert probe.returncode == 0, probe.stderr
        env["GUNICORN_CMD_ARGS"] = f"--bind=127.0.0.1:{refusing}"
        probe = _run_the_image_healthcheck({**env, "PORT": port})  # -b beats PORT, as in gunicorn
    assert probe.returncode == 1
    assert probe.stderr.startswith(f"unhealthy: 127.0.0.1:{refusing}/wp/healthz: ")
