"""The example handler (handlers/fetch_url.py) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from doubles import WAIT_S
from http_fixtures import make_harness

from handlers.fetch_url import PREVIEW_CHARS, fetch
from workerpool import AttemptCancelled, PermanentFailure, Task

BODY = ("héllo " * 100).encode()


class Site(BaseHTTPRequestHandler):
    """/ok: a page; /status/<n>: that status; /redirect: to /ok; /slow: one piece, then the rest on release."""

    first_piece_sent = threading.Event()
    release = threading.Event()

    def do_GET(self) -> None:
        if self.path == "/ok":
            self._answer(200, BODY, "text/plain; charset=utf-8")
        elif self.path.startswith("/status/"):
            self._answer(int(self.path.removeprefix("/status/")), b"nope", "text/plain")
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":
            self.send_response(200)
            self.send_header("Content-Length", "8")
            self.end_headers()
            self.wfile.write(b"1234")
            self.wfile.flush()
            Site.first_piece_sent.set()
            Site.release.wait(WAIT_S)
            self.wfile.write(b"5678")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    thread = threading.Thread(target=server.serve_forever, name="test-site", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    Site.release.set()
    server.shutdown()
    server.server_close()
    thread.join(WAIT_S)


def task(payload: object) -> Task:
    return Task("t", payload, 0, attempts=1)


def test_a_page_is_described_in_the_result(site):
    result = fetch(task({"url": f"{site}/redirect", "timeout_s": 5}), threading.Event())
    assert result == {
        "url": f"{site}/ok",
        "status": 200,
        "content_type": "text/plain",
        "bytes": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
        "text": BODY.decode()[:PREVIEW_CHARS],
    }


def test_the_payload_may_be_the_url_alone(site):
    assert fetch(task(f"{site}/ok"), threading.Event())["status"] == 200


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_a_client_error_fails_the_task_for_good(site, status):
    with pytest.raises(PermanentFailure, match=f"answered {status} "):
        fetch(task(f"{site}/status/{status}"), threading.Event())


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_server_error_or_a_request_to_slow_down_is_retried(site, status):
    with pytest.raises(urllib.error.HTTPError) as caught:
        fetch(task(f"{site}/status/{status}"), threading.Event())
    assert not isinstance(caught.value, PermanentFailure)
    assert caught.value.code == status


@pytest.mark.parametrize(
    "payload",
    [
        "file:///etc/passwd",
        "ftp://example.com/x",
        "http:///no-host",
        {"link": "http://x"},
        7,
        {"url": "http://127.0.0.1/", "timeout_s": 0},
        {"url": "http://127.0.0.1/", "timeout_s": "5"},
        {"url": "http://127.0.0.1/", "timeout_s": 61},
    ],
)
def test_a_payload_that_no_retry_can_fix_fails_the_task_for_good(payload):
    with pytest.raises(PermanentFailure):
        fetch(task(payload), threading.Event())


def test_a_refused_connection_is_retried():
    with pytest.raises(urllib.error.URLError) as caught:
        fetch(task("http://127.0.0.1:9/"), threading.Event())  # the discard port: nobody listens
    assert not isinstance(caught.value, urllib.error.HTTPError)


def test_a_cancel_stops_the_download_at_the_next_piece(site):
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetch(task(f"{site}/slow"), cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert Site.first_piece_sent.wait(WAIT_S)
    cancel.set()
    Site.release.set()
    thread.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], AttemptCancelled), outcome


def test_a_cancelled_attempt_sends_no_request():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AttemptCancelled):
        fetch(task("http://127.0.0.1:9/"), cancel)


def test_through_the_service_the_result_is_in_the_task(site):
    harness = make_harness(fetch)
    response = harness.client.post("/enqueue", json={"id": "page", "payload": {"url": f"{site}/ok"}})
    assert response.status_code == 202
    missing = harness.client.post("/enqueue", json={"id": "missing", "payload": f"{site}/status/404", "max_retries": 3})
    assert missing.status_code == 202
    harness.drain()
    page = harness.client.get("/tasks/page").get_json()
    assert (page["state"], page["result"]["status"], page["result"]["bytes"]) == ("done", 200, len(BODY))
    gone = harness.client.get("/tasks/missing").get_json()
    assert (gone["state"], gone["attempts"]) == ("failed", 1)
    assert gone["last_error"] == f"PermanentFailure: {site}/status/404 answered 404 Not Found"
