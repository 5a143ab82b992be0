"""The gunicorn worker (service/gunicorn_worker.py) serving an application that fails, on real connections."""

from __future__ import annotations

import json
import re

import pytest
from http_fixtures import LISTENING, PROJECT_ROOT, ServerProcess, clean_environment, half_closed_exchange, wait_until

pytestmark = pytest.mark.e2e

SETTINGS = """
from service import logs

logconfig_dict = logs.logging_config("INFO", "text")  # the service's lines, with their request ids
worker_class = "service.gunicorn_worker.DrainingThreadWorker"
logger_class = "service.access_log.AccessLogger"
accesslog = errorlog = "-"
threads = 2
control_socket_disable = True
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """gunicorn with the service's worker serving tests/faulty_wsgi.py: its port and process."""
    directory = tmp_path_factory.mktemp("faulty")
    conf = directory / "gunicorn.conf.py"
    conf.write_text(SETTINGS)
    process = ServerProcess(
        ["-m", "gunicorn", "-c", str(conf), "-b", "127.0.0.1:0", "--pythonpath", str(PROJECT_ROOT / "tests"),
         "faulty_wsgi:app"],
        log_path=directory / "gunicorn.log",
        env=clean_environment(),
    )  # fmt: skip
    try:
        port = process.wait_for_port(LISTENING)
        fine = b"GET /fine HTTP/1.1\r\nHost: x\r\n\r\n"
        wait_until(lambda: half_closed_exchange(port, fine), timeout=20, what="an answer")
        yield port, process
    finally:
        process.stop()


FAILS_BEFORE_THE_BODY = {
    "an empty chunk, then an error (chunked)": b"GET /empty-chunk-then-raise HTTP/1.1\r\nHost: x\r\n\r\n",
    "an empty chunk, then an error (HTTP/1.0)": b"GET /empty-chunk-then-raise HTTP/1.0\r\n\r\n",
    "an empty chunk, then an error (Content-Length)": b"GET /empty-chunk-then-raise?length HTTP/1.1\r\nHost: x\r\n\r\n",
    "a chunk that is not bytes": b"GET /text-chunk HTTP/1.1\r\nHost: x\r\n\r\n",
    "HEAD: body bytes (dropped), then an error": b"HEAD /head-then-raise HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("data", FAILS_BEFORE_THE_BODY.values(), ids=FAILS_BEFORE_THE_BODY.keys())
def test_an_app_failing_before_any_of_its_response_left_is_answered_500(served, data):
    port, _ = served
    received = half_closed_exchange(port, data)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), received
    headers = dict(line.split(": ", 1) for line in head.decode("latin-1").split("\r\n")[1:])
    assert headers["Content-Type"] == "application/problem+json"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    assert json.loads(body)["status"] == 500


@pytest.mark.parametrize("how", ["raise-at-once", "text-chunk"])
def test_an_app_failing_before_any_of_its_response_left_has_one_access_line_for_the_answer_sent(served, how):
    port, process = served
    request_line = f"GET /{how}?probe=access-line HTTP/1.1"
    received = half_closed_exchange(port, f"{request_line}\r\nHost: x\r\n\r\n".encode())
    answer_id = re.search(rb"X-Request-ID: (\w+)", received).group(1).decode()
    answer_bytes = len(received.partition(b"\r\n\r\n")[2])
    # gunicorn logs the error's own access line before it writes the answer: it is in the log by now.
    lines = [line for line in process.log().splitlines() if f'"{request_line}"' in line]
    assert len(lines) == 1, lines  # not also a 200 for the response the app never finished
    assert f'"{request_line}" 500 {answer_bytes} ' in lines[0]
    assert lines[0].endswith(f" request_id={answer_id}")


def test_an_app_may_replace_a_response_whose_head_has_not_left(served):
    port, _ = served
    received = half_closed_exchange(port, b"GET /replaced-after-empty-chunk HTTP/1.1\r\nHost: x\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), received
    assert received.endswith(b"\r\n\r\n9\r\ntry again\r\n0\r\n\r\n")


def test_an_app_failing_after_body_bytes_left_cuts_the_response_short(served):
    port, _ = served
    received = half_closed_exchange(port, b"GET /raise-after-body?length HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert body == b"01234"  # of the 10 announced: the client sees the response was cut


def test_a_response_without_a_failure_is_whole(served):
    port, _ = served
    for request in (b"GET /fine?length HTTP/1.1\r\nHost: x\r\n\r\n", b"HEAD /fine?length HTTP/1.1\r\nHost: x\r\n\r\n"):
        head, _, body = half_closed_exchange(port, request).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert body == (b"0123456789" if request.startswith(b"GET") else b"")
