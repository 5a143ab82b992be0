"""Every error is an RFC 9457 problem document, never HTML, never a traceback."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest
from http_fixtures import TEST_CONFIG, make_harness

from config import StoreSetting
from workerpool import StoreNotSynced, StoreOutOfMemory, StoreOutOfSpace, StoreUnavailable

PROBLEM_KEYS = {"type", "title", "status", "detail"}


@pytest.fixture
def harness():
    harness = make_harness()

    @harness.app.get("/boom")
    def boom():
        raise RuntimeError("secret database password in the message")

    yield harness
    harness.pool.shutdown(5)


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/", 404, None),
        ("GET", "/nope", 404, None),
        ("POST", "/tasks", 405, "GET, HEAD"),
        ("GET", "/enqueue", 405, "POST"),
        ("PUT", "/enqueue", 405, "POST"),
        ("PUT", "/tasks/a", 405, "DELETE, GET, HEAD"),
        ("POST", "/healthz", 405, "GET, HEAD"),
        ("POST", "/health", 405, "GET, HEAD"),
        ("POST", "/metrics", 405, "GET, HEAD"),
        ("GET", "/tasks/", 404, None),
    ],
)
def test_routing_errors_are_problems(harness, method, path, status, allow):
    response = harness.client.open(path, method=method)
    assert response.status_code == status
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert set(problem) == PROBLEM_KEYS
    assert problem["status"] == status
    assert problem["type"] == "about:blank"
    assert b"<" not in response.data  # no HTML
    if allow is None:
        assert "Allow" not in response.headers
    else:
        assert set(response.headers["Allow"].split(", ")) == set(allow.split(", "))


def test_an_unexpected_error_is_a_generic_500_and_logged(harness, caplog):
    with caplog.at_level(logging.ERROR, logger="service.problems"):
        response = harness.client.get("/boom")
    assert response.status_code == 500
    assert response.mimetype == "application/problem+json"
    assert response.get_json() == {
        "type": "about:blank",
        "title": "Internal Server Error",
        "status": 500,
        "detail": "the server could not handle the request; the error has been logged",
    }
    assert b"secret" not in response.data
    assert b"Traceback" not in response.data
    [record] = caplog.records
    assert record.getMessage() == "unhandled error on GET /boom"
    assert record.exc_info[0] is RuntimeError


def test_an_engine_bug_during_submit_is_a_500(harness, monkeypatch, caplog):
    def broken_submit(*args, **kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(type(harness.pool), "submit", broken_submit)  # a pool has slots: patch its class
    with caplog.at_level(logging.ERROR, logger="service.problems"):
        response = harness.client.post("/enqueue", json={"id": "a", "payload": ""})
    assert response.status_code == 500
    assert b"internal" not in response.data
    assert len(caplog.records) == 1


def test_problem_fields_keep_rfc_order(harness):
    response = harness.client.post("/enqueue", data="{}")
    assert list(response.get_json()) == ["type", "title", "status", "detail", "errors"]


def test_a_store_that_cannot_be_written_is_a_503_that_invites_a_retry(harness, monkeypatch, caplog):
    def unavailable(*args, **kwargs):
        raise StoreUnavailable("the disk is full (database or disk is full)")

    monkeypatch.setattr(type(harness.pool), "submit", unavailable)
    with caplog.at_level(logging.ERROR, logger="service.problems"):
        response = harness.client.post("/enqueue", json={"id": "a", "payload": ""})
    assert (response.status_code, response.mimetype) == (503, "application/problem+json")
    assert response.headers["Retry-After"] == "1"
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:store-unavailable"
    assert "the task may not have been stored, retry later with the same id" in problem["detail"]
    assert "disk" not in problem["detail"]  # the reason goes to the log and /healthz
    [record] = caplog.records
    assert "the disk is full" in record.getMessage()
    assert 'workerpool_tasks_rejected_total{reason="store_unavailable"} 1.0' in harness.client.get("/metrics").text


@pytest.mark.parametrize(
    ("failure", "detail"),
    [
        (
            StoreOutOfMemory("redis: command not allowed when used memory > 'maxmemory'"),
            "the task store is at its memory limit (Redis maxmemory), which this request's size counts toward: "
            "nothing was stored; a smaller request (a batch split in parts) may pass, or retry once the store has room",
        ),
        (
            StoreOutOfSpace("writing to the disk failed (disk full, file size limit, ...)"),
            "the task store could not write this request to its disk (full, or at its file size limit): nothing was "
            "stored; a smaller request (a batch split in parts) may pass, or retry once the store has room",
        ),
    ],
    ids=["memory", "disk"],
)
def test_a_request_too_large_for_the_room_the_store_has_left_is_told_so(harness, monkeypatch, failure, detail):
    # "retry later" was said for ever to a batch that did not fit, while single tasks and smaller batches passed.
    _store_fails(harness, monkeypatch, failure)
    response = harness.client.post("/enqueue/batch", json={"tasks": [{"payload": "x" * 1000}]})
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:store-unavailable"
    assert problem["detail"] == detail


def test_the_api_token_a_client_put_in_the_path_is_not_in_the_error_line(monkeypatch, caplog):
    token = "0123456789abcdef-token"
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, api_token=token))
    try:
        _store_fails(harness, monkeypatch, StoreUnavailable("redis: Connection refused"))
        with caplog.at_level(logging.ERROR, logger="service.problems"):
            response = harness.client.get(f"/tasks/{token}", headers={"Authorization": f"Bearer {token}"})
    finally:
        harness.pool.shutdown(5)
    assert response.status_code == 503
    [record] = caplog.records
    assert record.getMessage() == "task store unavailable on GET /tasks/REDACTED: redis: Connection refused"


def _store_fails(harness, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    for method in ("submit", "submit_many", "get", "list", "page", "cancel", "stats"):
        monkeypatch.setattr(type(harness.pool), method, fail)


@pytest.mark.parametrize(
    ("method", "path", "body", "told"),
    [
        (
            "POST",
            "/enqueue/batch",
            {"tasks": [{"payload": ""}]},
            "the task may not have been stored, retry later with the same id (409 if it was)",
        ),
        ("GET", "/tasks/a", None, "the task store cannot be used right now; retry later"),
        ("GET", "/tasks", None, "the task store cannot be used right now; retry later"),
        ("GET", "/dashboard/live", None, "the task store cannot be used right now; retry later"),
        ("DELETE", "/tasks/a", None, "the cancel may not have been recorded, retry later"),
    ],
)
def test_a_503_for_an_unavailable_store_says_what_became_of_the_request(harness, monkeypatch, method, path, body, told):
    _store_fails(harness, monkeypatch, StoreUnavailable("redis: Connection refused"))
    response = harness.client.open(path, method=method, json=body)
    assert (response.status_code, response.mimetype) == (503, "application/problem+json")
    assert response.headers["Retry-After"] == "1"
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:store-unavailable"
    assert problem["detail"].endswith(told)
    assert "nothing was stored" not in problem["detail"]  # with Redis, a lost answer may follow a stored task


def test_the_dashboard_s_figures_are_a_503_while_the_store_cannot_be_written_though_it_reads(harness, monkeypatch):
    # They answered 200 "ok" (the page: Live, accepting) while /healthz said 503 and every task was refused.
    monkeypatch.setattr(type(harness.pool.store), "health", lambda store: "the disk is full")
    response = harness.client.get("/dashboard/live")
    assert (response.status_code, response.headers["Retry-After"]) == (503, "1")
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:store-unavailable"
    assert "disk" not in problem["detail"]  # the reason goes to the log and /healthz
    assert harness.client.get("/healthz").get_json()["store_error"] == "the disk is full"


@pytest.mark.parametrize(
    ("store", "reason", "said"),
    [
        (
            StoreSetting("redis", url="redis://:secret@10.0.3.7:6390/0"),
            "redis: Error 111 connecting to 10.0.3.7:6390. Connection refused.",
            "redis: Error 111 connecting to the Redis server. Connection refused.",
        ),
        (
            StoreSetting("redis", url="redis://cache.internal/0"),
            "redis: Timeout reading from cache.internal:6379",
            "redis: Timeout reading from the Redis server",
        ),
        (
            StoreSetting("redis", url="rediss://10.0.3.7:6390/0"),
            "redis: Error 1 connecting to 10.0.3.7:6390. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "IP address mismatch, certificate is not valid for '10.0.3.7'. (_ssl.c:992).",
            "redis: Error 1 connecting to the Redis server. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: IP address mismatch, certificate is not valid for the Redis server's host. (_ssl.c:992).",
        ),
        (
            StoreSetting("redis", url="rediss://redis/0"),
            "redis: Error 1 connecting to redis:6379. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "Hostname mismatch, certificate is not valid for 'redis'. (_ssl.c:992).",
            "redis: Error 1 connecting to the Redis server. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
            "failed: Hostname mismatch, certificate is not valid for the Redis server's host. (_ssl.c:992).",
        ),
        (
            StoreSetting("redis", url="redis://10.0.3.7:7000/0"),
            "redis: the store's keys (hash slot 8856) are served by the cluster node 10.0.3.9:7001, not by ...",
            "redis: the store's keys (hash slot 8856) are served by another cluster node, not by ...",
        ),
        (
            StoreSetting("sqlite", path="/srv/secret/tasks.db"),
            "/srv/secret/tasks.db: the task file was removed while open; /srv/secret is full",
            "the task file was removed while open; the task file's directory is full",
        ),
        (
            StoreSetting("sqlite", path="/srv/secret/tasks.db"),
            "/srv/secret/tasks.db: the task file's -wal file was replaced by another file while ...",
            "the task file's -wal file was replaced by another file while ...",
        ),
        (
            StoreSetting("sqlite", path="/srv/secret/tasks.db"),
            "/srv/secret/tasks.db: the database is read-only",
            "the task file: the database is read-only",
        ),
    ],
)
def test_health_says_why_the_store_cannot_be_used_but_not_where_it_is(monkeypatch, store, reason, said):
    # /healthz is open to anyone: it showed the SQLite file's path and the Redis server's address.
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, store=store))
    monkeypatch.setattr(type(harness.pool.store), "health", lambda self: reason)
    assert harness.client.get("/healthz").get_json() == {"status": "store_unavailable", "store_error": said}
    harness.pool.shutdown(5)


@pytest.mark.parametrize("path", ["/healthz", "/health"])
def test_health_while_the_store_cannot_be_used_is_a_503_with_retry_after(harness, monkeypatch, path):
    _store_fails(harness, monkeypatch, StoreUnavailable("redis: Connection refused"))
    response = harness.client.get(path)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"  # as every 503 of the service
    assert response.get_json() == {"status": "store_unavailable", "store_error": "redis: Connection refused"}


def test_liveness_stays_200_while_the_store_cannot_be_used(harness, monkeypatch):
    # A restart mends no store: a liveness probe that failed with /healthz restarted every process of an outage.
    _store_fails(harness, monkeypatch, StoreUnavailable("redis: Connection refused"))
    monkeypatch.setattr(type(harness.pool.store), "health", lambda self: "redis: Connection refused")
    assert harness.client.get("/healthz").status_code == 503
    response = harness.client.get("/livez")
    assert (response.status_code, response.get_json()["status"]) == (200, "ok")


def test_the_requests_the_readme_lists_as_503_while_the_store_cannot_be_used_are_those_that_answer_it(
    harness, monkeypatch
):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    paragraph = " ".join(readme.split("When the task store cannot be used", 1)[1].split("\n\n", 1)[0].split())
    listed = paragraph.split("`Retry-After: 1`:", 1)[1].split(". ", 1)[0]
    requests = [tuple(r.split(" ", 1)) if " " in r else ("GET", r) for r in re.findall(r"`([^`]+)`", listed)]
    assert ("GET", "/tasks") in requests and ("GET", "/dashboard/live") in requests
    _store_fails(harness, monkeypatch, StoreUnavailable("redis: Connection refused"))
    for method, path in [*requests, ("GET", "/metrics")]:
        body = {"id": "a", "payload": ""} if path == "/enqueue" else {"tasks": [{"payload": ""}]}
        response = harness.client.open(
            path.replace("<id>", "a"), method=method, json=body if method == "POST" else None
        )
        answered = response.status_code, response.mimetype
        assert answered == ((200, "text/plain") if path == "/metrics" else (503, "application/problem+json")), path
        assert ((method, path) in requests) == (response.status_code == 503), path  # /metrics is not listed


@pytest.mark.parametrize(("method", "path"), [("POST", "/enqueue"), ("DELETE", "/tasks/a")])
def test_a_change_whose_fsync_failed_is_a_503_that_says_it_stands(harness, monkeypatch, method, path):
    _store_fails(harness, monkeypatch, StoreNotSynced("syncing the WAL failed: [Errno 5] Input/output error"))
    response = harness.client.open(path, method=method, json={"id": "a", "payload": ""} if method == "POST" else None)
    assert response.status_code == 503
    assert "Retry-After" not in response.headers  # sending it again would only repeat it
    detail = response.get_json()["detail"]
    assert "it stands (do not send it again)" in detail and "Errno" not in detail


def test_a_submission_whose_fsync_failed_is_not_counted_as_refused(harness, monkeypatch):
    def not_synced(*args, **kwargs):
        raise StoreNotSynced("syncing the WAL failed: [Errno 5] Input/output error")

    monkeypatch.setattr(type(harness.pool), "submit", not_synced)
    assert harness.client.post("/enqueue", json={"id": "a", "payload": ""}).status_code == 503
    # The task stands (the pool tells observers of it as accepted): not a refusal.
    assert 'workerpool_tasks_rejected_total{reason="store_unavailable"} 0.0' in harness.client.get("/metrics").text
