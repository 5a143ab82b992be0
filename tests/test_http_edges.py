"""The edges of HTTP on the real gunicorn, met by the clients users run (requests, httpx, raw sockets)."""

from __future__ import annotations

import httpx
import pytest
import requests
from http_fixtures import LISTENING, ServerProcess, clean_environment, wait_until

pytestmark = pytest.mark.e2e

TOKEN = "edge-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY_LIMIT = 1024
# Far past the limit and past the 64 KiB gunicorn drains before it reuses a connection.
HUGE_BODY = b'{"id": "huge", "payload": "' + b"x" * 200_000 + b'"}'
ROUNDS = 10


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One gunicorn with a token and a small body limit, shared by this module's tests."""
    log_dir = tmp_path_factory.mktemp("edges")
    process = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=log_dir / "gunicorn.log",
        env=clean_environment(
            API_TOKEN=TOKEN, MAX_BODY_BYTES=str(BODY_LIMIT), MAX_PAYLOAD_CHARS="512",
            WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0",
        ),
    )
    try:
        port = process.wait_for_port(LISTENING)
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: requests.get(base + "/healthz", timeout=5).status_code == 200, timeout=20, what="/healthz")
        yield base
    finally:
        process.stop()


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
        accepted = session.post(server + "/enqueue", json={"id": "kept-alive", "payload": "p"}, headers=AUTH, timeout=10)
        assert accepted.status_code == 202
        assert accepted.headers["Connection"] == "keep-alive"
