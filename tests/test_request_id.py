"""X-Request-ID: honoured when sane, generated otherwise, echoed on every response, carried by the task."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re

import pytest
from http_fixtures import TEST_CONFIG, failing, make_harness

from service import request_id
from service.request_id import new_id

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
def harness():
    harness = make_harness(failing, queue_size=8)
    yield harness
    harness.pool.shutdown(0)


@pytest.mark.parametrize("given", ["abc", "req-2026-11-27T10:00:00Z", "a/b+c=d@e.f_g", "x" * 128])
def test_a_sane_request_id_is_echoed(harness, given):
    response = harness.client.get("/healthz", headers={"X-Request-ID": given})
    assert response.headers["X-Request-ID"] == given


@pytest.mark.parametrize("given", ["", "x" * 129, "two words", 'quote"d', "new\\nline", "caf\u00e9", "a\tb"])
def test_an_unusable_request_id_is_replaced(harness, given):
    response = harness.client.get("/healthz", headers={"X-Request-ID": given})
    assert GENERATED.fullmatch(response.headers["X-Request-ID"])


@pytest.mark.parametrize(
    ("given", "kept"), [([], False), (["rid-1"], True), (["two words"], False), (["rid-a", "rid-b"], False)]
)
def test_an_id_pinned_before_the_app_runs_is_the_one_the_app_takes(harness, given, kept):
    # gunicorn's DEBUG line for a request is written before the app runs: it names the id pinned in its fields.
    headers = [("HOST", "x"), *(("X-REQUEST-ID", value) for value in given), ("ACCEPT", "*/*")]
    pinned = request_id.pin(headers)
    if kept:
        assert pinned == given[0]
    else:
        assert GENERATED.fullmatch(pinned)
    assert [value for name, value in headers if name == "X-REQUEST-ID"] == [pinned]
    assert ("HOST", "x") in headers and ("ACCEPT", "*/*") in headers
    response = harness.client.get("/healthz", headers={"X-Request-ID": pinned})
    assert response.headers["X-Request-ID"] == pinned


TOKEN = "0123456789abcdef-token"


@pytest.mark.parametrize("given", [TOKEN, f"rid-{TOKEN}-1"])
def test_an_id_holding_the_api_token_is_replaced(given):
    # It was echoed in the response and written with every log line of the request.
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, api_token=TOKEN))
    try:
        response = harness.client.get("/healthz", headers={"X-Request-ID": given})
        assert GENERATED.fullmatch(response.headers["X-Request-ID"])
        assert harness.client.get("/healthz", headers={"X-Request-ID": "rid-1"}).headers["X-Request-ID"] == "rid-1"
    finally:
        harness.pool.shutdown(0)
    headers = [("X-REQUEST-ID", given)]
    assert GENERATED.fullmatch(request_id.pin(headers, TOKEN)) and headers[0][1] != given
    assert request_id.pin([("X-REQUEST-ID", given)]) == given  # without a token, any sane id is kept


def test_a_forked_worker_makes_other_ids_than_its_parent():
    # Ids come from the random module: a gunicorn worker forked from the arbiter must not repeat
    # the ids of its parent or of its siblings (the random module reseeds itself after a fork).
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover  (the child)
        try:
            os.write(write, new_id().encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        child_id = os.read(read, 64).decode()
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert GENERATED.fullmatch(child_id) and child_id != new_id()


@pytest.fixture
def random_state():
    """The random module's state, restored after a test that seeds it."""
    state = random.getstate()
    yield
    random.setstate(state)


def test_a_handler_seeding_the_random_module_does_not_make_ids_repeat(random_state):
    # Simulations seed the random module for reproducible work; the ids must not follow it.
    harness = make_harness(lambda task, cancel: random.seed(task.payload))
    try:
        ids = []
        for n in range(3):
            response = harness.client.post("/enqueue", json={"id": f"seeding-{n}", "payload": 7})
            assert response.status_code == 202
            ids.append(response.headers["X-Request-ID"])
            harness.final.wait(f"seeding-{n}")  # the handler has seeded the module before the next request
        assert len(set(ids)) == 3, ids
    finally:
        harness.drain()


def test_each_request_without_an_id_gets_a_new_one(harness):
    first = harness.client.get("/healthz").headers["X-Request-ID"]
    second = harness.client.get("/healthz").headers["X-Request-ID"]
    assert GENERATED.fullmatch(first) and GENERATED.fullmatch(second) and first != second


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/enqueue", b"{", 400),
        ("POST", "/enqueue", b"x" * 2000, 413),
        ("GET", "/tasks/missing", None, 404),
        ("GET", "/nowhere", None, 404),
        ("DELETE", "/enqueue", None, 405),
        ("GET", "/metrics", None, 200),
    ],
)
def test_errors_and_other_endpoints_echo_the_id_too(harness, method, path, body, status):
    response = harness.client.open(path, method=method, data=body, headers={"X-Request-ID": "rid-1"})
    assert (response.status_code, response.headers["X-Request-ID"]) == (status, "rid-1")


def test_an_unexpected_error_still_echoes_the_id(harness, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(type(harness.pool), "stats", broken)  # a pool has slots: patch its class
    response = harness.client.get("/healthz", headers={"X-Request-ID": "rid-500"})
    assert (response.status_code, response.headers["X-Request-ID"]) == (500, "rid-500")


def test_the_task_carries_the_request_id_into_its_log_lines(harness, caplog):
    caplog.set_level(logging.DEBUG, logger="workerpool")
    response = harness.client.post(
        "/enqueue", json={"id": "t1", "payload": "", "max_retries": 0}, headers={"X-Request-ID": "rid-task"}
    )
    assert (response.status_code, response.headers["X-Request-ID"]) == (202, "rid-task")
    harness.final.wait("t1")
    lines = [r for r in caplog.records if getattr(r, "task_id", None) == "t1"]
    # queued (request thread), started and failed (worker thread): one line per state change.
    assert [r.levelname for r in lines] == ["DEBUG", "DEBUG", "WARNING"]
    assert {r.request_id for r in lines} == {"rid-task"}
