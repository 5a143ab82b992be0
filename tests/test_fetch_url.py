"""The example handler (handlers/fetch_url.py) against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import socket
import threading
import urllib.error
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from doubles import WAIT_S, wait_until
from http_fixtures import make_harness

from handlers import fetch_url
from handlers.fetch_url import PREVIEW_CHARS, fetch, fetcher, is_public
from workerpool import AttemptCancelled, PermanentFailure, Task

BODY = ("héllo " * 100).encode()
# The site below is on 127.0.0.1, where ``fetch`` sends nothing: the tests of its answers allow loopback.
fetch_local = fetcher(allow_address=lambda address: address.is_loopback)


class Site(BaseHTTPRequestHandler):
    """/ok: a page; /status/<n>: that status; /redirect: to /ok; /redirect-to?<url>: to that URL;
    /slow: one piece, then the rest on release."""

    first_piece_sent = threading.Event()
    release = threading.Event()
    paths: list[str] = []  # of every request received

    def do_GET(self) -> None:
        Site.paths.append(self.path)
        if self.path == "/ok":
            self._answer(200, BODY, "text/plain; charset=utf-8")
        elif self.path.startswith("/status/"):
            self._answer(int(self.path.removeprefix("/status/")), b"nope", "text/plain")
        elif self.path == "/redirect" or self.path.startswith("/redirect-to?"):
            self.send_response(302)
            self.send_header("Location", self.path.partition("?")[2] or "/ok")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/loop", "/loop2"):
            self.send_response(302)
            self.send_header("Location", "/loop2" if self.path == "/loop" else "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path.startswith("/charset="):
            self._answer(200, b"\\ud800 hello", f"text/plain; charset={self.path.removeprefix('/charset=')}")
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
    result = fetch_local(task({"url": f"{site}/redirect", "timeout_s": 5}), threading.Event())
    assert result == {
        "url": f"{site}/ok",
        "status": 200,
        "content_type": "text/plain",
        "bytes": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
        "text": BODY.decode()[:PREVIEW_CHARS],
    }


def test_the_payload_may_be_the_url_alone(site):
    assert fetch_local(task(f"{site}/ok"), threading.Event())["status"] == 200


@pytest.mark.parametrize("status", [400, 403, 404, 410])
def test_a_client_error_fails_the_task_for_good(site, status):
    with pytest.raises(PermanentFailure, match=f"answered {status} "):
        fetch_local(task(f"{site}/status/{status}"), threading.Event())


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_a_server_error_or_a_request_to_slow_down_is_retried(site, status):
    with pytest.raises(urllib.error.HTTPError) as caught:
        fetch_local(task(f"{site}/status/{status}"), threading.Event())
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
        fetch_local(task("http://127.0.0.1:9/"), threading.Event())  # the discard port: nobody listens
    assert not isinstance(caught.value, urllib.error.HTTPError)


def test_a_cancel_stops_the_download_at_the_next_piece(site):
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            fetch_local(task(f"{site}/slow"), cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    assert Site.first_piece_sent.wait(WAIT_S)
    cancel.set()
    Site.release.set()
    thread.join(WAIT_S)
    assert len(outcome) == 1 and isinstance(outcome[0], AttemptCancelled), outcome


@pytest.fixture
def dripping_site() -> Iterator[tuple[str, threading.Event]]:
    """A server that answers a status line, then a header one byte every 50 ms, for ever: its URL, and an event
    set once it has a request."""
    with dripping_server(b"HTTP/1.1 200 OK\r\n") as served:
        yield served


@contextlib.contextmanager
def dripping_server(head: bytes) -> Iterator[tuple[str, threading.Event]]:
    listener = socket.create_server(("127.0.0.1", 0))
    asked, stop = threading.Event(), threading.Event()
    connections: list[socket.socket] = []

    def drip(connection: socket.socket) -> None:
        with contextlib.suppress(OSError):
            connection.recv(65536)
            connection.sendall(head)
            asked.set()
            while not stop.wait(0.05):
                connection.sendall(b"X")

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                connection, _ = listener.accept()
                connections.append(connection)
                threading.Thread(target=drip, args=(connection,), daemon=True).start()

    threading.Thread(target=serve, name="test-drip", daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/", asked
    stop.set()
    listener.close()
    for connection in connections:
        connection.close()


def fetch_in_a_thread(
    payload: object, cancel: threading.Event, handler=fetch_local
) -> tuple[threading.Thread, list[BaseException]]:
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            handler(task(payload), cancel)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def test_a_cancel_stops_a_fetch_waiting_for_the_headers(dripping_site):
    # Only the body's reads looked at cancel: a server dripping its headers held the worker thread for hours.
    url, asked = dripping_site
    cancel = threading.Event()
    thread, outcome = fetch_in_a_thread({"url": url, "timeout_s": 60}, cancel)
    assert asked.wait(WAIT_S)
    cancel.set()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the fetch went on after its cancel"
    assert len(outcome) == 1 and isinstance(outcome[0], AttemptCancelled), outcome


@pytest.mark.parametrize(
    ("head", "late"),
    [
        (b"HTTP/1.1 200 OK\r\n", "the status line and headers"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", "the whole body"),
    ],
    ids=["headers", "body"],
)
def test_an_answer_that_does_not_arrive_within_timeout_s_fails_the_attempt(head, late):
    # Each byte came within the socket timeout: a line of 64 KiB at 2 bytes a second took 9 hours, and a body
    # held the worker until ATTEMPT_TIMEOUT_S, at every retry.
    with dripping_server(head) as (url, _):
        thread, outcome = fetch_in_a_thread({"url": url, "timeout_s": 0.5}, threading.Event())
        thread.join(WAIT_S)
    assert not thread.is_alive(), "the fetch went on past timeout_s"
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert f"did not send {late} of its answer within 0.5 s" in str(outcome[0])


class SlowResolver:
    """A name server that answers only once released: ``asked`` is set when a name is looked up."""

    def __init__(self) -> None:
        self.asked, self.release = threading.Event(), threading.Event()

    def __call__(self, host: str, port: int, family: int, kind: int) -> list:
        self.asked.set()
        self.release.wait()  # set when the test ends
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


@pytest.fixture
def slow_resolver() -> Iterator[SlowResolver]:
    resolver = SlowResolver()
    yield resolver
    resolver.release.set()


def test_a_cancel_stops_a_fetch_waiting_for_the_name_to_resolve(slow_resolver):
    # getaddrinfo cannot be interrupted: a slow DNS server held the worker thread past its cancel.
    cancel = threading.Event()
    handler = fetcher(allow_address=lambda address: True, resolve=slow_resolver)
    thread, outcome = fetch_in_a_thread({"url": "http://slow.example/", "timeout_s": 60}, cancel, handler)
    assert slow_resolver.asked.wait(WAIT_S)
    cancel.set()
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the fetch went on after its cancel"
    assert len(outcome) == 1 and isinstance(outcome[0], AttemptCancelled), outcome


def test_a_name_that_does_not_resolve_within_timeout_s_fails_the_attempt(slow_resolver):
    handler = fetcher(allow_address=lambda address: True, resolve=slow_resolver)
    thread, outcome = fetch_in_a_thread({"url": "http://slow.example/", "timeout_s": 0.2}, threading.Event(), handler)
    thread.join(WAIT_S)
    assert not thread.is_alive(), "the fetch went on past timeout_s"
    assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert "within 0.2 s" in str(outcome[0])


def test_names_given_up_on_leave_at_most_max_resolving_threads_behind(slow_resolver, monkeypatch):
    # Each attempt on a name whose DNS server never answers left a thread: one batch grew the process by hundreds.
    monkeypatch.setattr(fetch_url, "_resolving", threading.BoundedSemaphore(2), raising=False)
    monkeypatch.setattr(fetch_url, "MAX_RESOLVING", 2, raising=False)
    asked: list[str] = []

    def resolve(host: str, port: int, family: int, kind: int) -> list:
        asked.append(host)
        return slow_resolver(host, port, family, kind)

    handler = fetcher(allow_address=lambda address: True, resolve=resolve)
    for _ in range(5):
        thread, outcome = fetch_in_a_thread(
            {"url": "http://never.example/", "timeout_s": 0.1}, threading.Event(), handler
        )
        thread.join(WAIT_S)
        assert len(outcome) == 1 and isinstance(outcome[0], TimeoutError), outcome
    assert asked == ["never.example"] * 2  # the later attempts waited for a place, then gave up
    slow_resolver.release.set()  # the resolver gives up: the places are free again
    wait_until(
        lambda: not any(t.name == "fetch-url-resolve" for t in threading.enumerate()),
        timeout=WAIT_S,
        what="the resolutions given up on to end",
    )
    thread, outcome = fetch_in_a_thread({"url": "http://never.example/", "timeout_s": 5}, threading.Event(), handler)
    thread.join(WAIT_S)
    assert len(asked) == 3 and len(outcome) == 1, outcome  # a place was free: the name was asked again
    assert isinstance(outcome[0], urllib.error.URLError) and isinstance(outcome[0].reason, socket.gaierror)


def test_a_name_is_resolved_by_the_resolver_given_and_its_failure_is_retried(site):
    port = int(site.rpartition(":")[2])
    names: list[tuple[str, int]] = []

    def resolve(host: str, port: int, family: int, kind: int) -> list:
        names.append((host, port))
        if host != "site.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]

    handler = fetcher(allow_address=lambda address: address.is_loopback, resolve=resolve)
    result = handler(task(f"http://site.example:{port}/ok"), threading.Event())
    assert result["status"] == 200 and names == [("site.example", port)]
    with pytest.raises(urllib.error.URLError) as caught:  # not PermanentFailure: the attempt is retried
        handler(task("http://gone.example/ok"), threading.Event())
    assert isinstance(caught.value.reason, socket.gaierror)


def test_a_cancelled_attempt_sends_no_request():
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(AttemptCancelled):
        fetch(task("http://127.0.0.1:9/"), cancel)


def test_through_the_service_the_result_is_in_the_task(site):
    harness = make_harness(fetch_local)
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


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1",
     "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
     "2002:7f00:1::", "64:ff9b::a9fe:a9fe", "2001:0:4136:e378:8000:63bf:3fff:fdd2",
     # IPv6 forms of internal IPv4 addresses that Python counts as global, and site-local
     "64:ff9b:1::a00:1", "64:ff9b:1::7f00:1", "64:ff9b:1:a00:1::", "::a9fe:a9fe", "::7f00:1", "::a00:1",
     "::ffff:0:7f00:1", "::ffff:0:808:808", "fec0::1"],
)  # fmt: skip
def test_loopback_private_link_local_multicast_and_reserved_addresses_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1:248:1893:25c8:1946", "2002:5db8:d822::"]
)
def test_addresses_of_the_internet_are_public(address):
    assert is_public(ipaddress.ip_address(address))


def test_the_handler_sends_nothing_to_a_loopback_or_internal_address(site):
    # Any client could make the service fetch an internal URL (loopback, the private network, the cloud
    # metadata service at 169.254.169.254) and read the answer in the task's result.
    port = site.rsplit(":", 1)[1]
    before = len(Site.paths)
    for url in [f"{site}/ok", f"http://localhost:{port}/ok", f"http://[::ffff:127.0.0.1]:{port}/ok",
                "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://[::1]:9/",
                "http://[64:ff9b:1::a00:1]:80/", "http://[::a9fe:a9fe]/", "http://[fec0::1]/"]:  # fmt: skip
        with pytest.raises(PermanentFailure, match="is not a public address: no request is sent there"):
            fetch(task({"url": url, "timeout_s": 5}), threading.Event())
    assert len(Site.paths) == before


def test_a_refused_name_is_not_told_what_it_resolves_to_the_operator_is(site, caplog):
    # Whoever submits a task reads its error: naming the addresses made the service a resolver of internal names.
    port = site.rsplit(":", 1)[1]
    with caplog.at_level(logging.WARNING, logger="handlers.fetch_url"), pytest.raises(PermanentFailure) as refused:
        fetch(task({"url": f"http://localhost:{port}/ok", "timeout_s": 5}), threading.Event())
    assert str(refused.value) == "localhost is not a public address: no request is sent there"
    [record] = [r for r in caplog.records if r.name == "handlers.fetch_url"]
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("localhost resolves to ") and "127.0.0.1" in record.getMessage()


def test_each_redirect_is_checked_as_the_first_request(site):
    only_this_site = fetcher(allow_address=lambda address: address == ipaddress.ip_address("127.0.0.1"))
    port = site.rsplit(":", 1)[1]
    with pytest.raises(PermanentFailure, match=r"^127\.0\.0\.2 is not a public address"):
        only_this_site(task(f"{site}/redirect-to?http://127.0.0.2:{port}/ok"), threading.Event())


def test_a_redirect_to_another_scheme_than_http_fails_the_task_for_good(site):
    # urllib followed redirects to ftp:// on its own.
    with pytest.raises(PermanentFailure, match="redirected to 'ftp://127.0.0.1/x': only http and https"):
        fetch_local(task(f"{site}/redirect-to?ftp://127.0.0.1/x"), threading.Event())


@pytest.mark.parametrize("target", ["file:///etc/passwd", "data:,hello"])
def test_a_redirect_urllib_refuses_itself_fails_the_task_for_good(site, target):
    # urllib refused these before the handler saw them: a 302 HTTPError, retried as a server error.
    with pytest.raises(PermanentFailure, match="302"):
        fetch_local(task(f"{site}/redirect-to?{target}"), threading.Event())


def test_a_redirect_loop_fails_the_task_for_good(site):
    with pytest.raises(PermanentFailure, match="infinite loop"):
        fetch_local(task(f"{site}/loop"), threading.Event())


@pytest.mark.parametrize("path", ["/a b", "/a\tb"])
def test_a_url_with_a_space_or_a_control_character_fails_the_task_for_good(site, path):
    with pytest.raises(PermanentFailure, match="space or control character"):
        fetch_local(task(site + path), threading.Event())


def test_a_url_with_a_user_and_password_fails_the_task_for_good(site):
    # urllib kept them in the host name and asked the resolver for "user:pw@127.0.0.1" on every attempt.
    with pytest.raises(PermanentFailure, match="user name or password"):
        fetch_local(task(site.replace("http://", "http://user:pw@") + "/ok"), threading.Event())


@pytest.mark.parametrize("charset", ["bogus", "base64", "unicode_escape", "x-user-defined"])
def test_an_answer_in_a_charset_python_cannot_read_as_text_is_previewed_as_utf_8(site, charset):
    # An unknown name raised LookupError (retried); unicode_escape put a lone surrogate in the result.
    result = fetch_local(task(f"{site}/charset={charset}"), threading.Event())
    assert (result["status"], result["bytes"], result["text"]) == (200, 12, "\\ud800 hello")


def test_a_proxy_of_the_environment_is_not_used(site, monkeypatch):
    # Through a proxy the address requests go to is not known to the handler: none is used.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    assert fetch_local(task(f"{site}/ok"), threading.Event())["status"] == 200


def test_through_the_service_an_internal_url_fails_the_task_without_retries(site):
    harness = make_harness(fetch)
    response = harness.client.post("/enqueue", json={"id": "inside", "payload": f"{site}/ok", "max_retries": 3})
    assert response.status_code == 202
    harness.drain()
    inside = harness.client.get("/tasks/inside").get_json()
    assert (inside["state"], inside["attempts"], inside.get("result")) == ("failed", 1, None)
    assert inside["last_error"] == "PermanentFailure: 127.0.0.1 is not a public address: no request is sent there"
