"""POST /enqueue/batch: per-task answers in order, whole-batch refusals, admission, token, metrics and logs."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re

import pytest
from http_fixtures import (
    LISTENING,
    PROJECT_ROOT,
    TEST_CONFIG,
    Client,
    Gate,
    ServerProcess,
    clean_environment,
    instant,
    make_harness,
    wait_until,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from app import create_app
from service.metrics import Metrics
from workerpool import MemoryStore, State, StoreOutOfMemory, StorePartlyAdmitted, StoreUnavailable, WorkerPool
from workerpool.stores.sqlite import SqliteStore

BATCH_CONFIG = dataclasses.replace(TEST_CONFIG, max_batch_tasks=5, max_batch_body_bytes=2048)
TOKEN = "batch-t0ken-0123456789"


def task(task_id, payload="", **fields):
    return {"id": task_id, "payload": payload, **fields}


def post_batch(client, body, **kwargs):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post("/enqueue/batch", data=data, **kwargs)


def statuses(response):
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    return [result["status"] for result in response.get_json()["results"]]


def rejected(harness, *reasons):
    """The tasks refused so far, counted by the metrics, for each of ``reasons``."""
    registry = harness.metrics.registry
    return {
        reason: registry.get_sample_value("workerpool_tasks_rejected_total", {"reason": reason}) for reason in reasons
    }


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.open()


@pytest.fixture
def harness():
    harness = make_harness(instant, config=BATCH_CONFIG, queue_size=10)
    yield harness
    harness.pool.shutdown(5)


# -- per-task answers ------------------------------------------------------------


def test_every_task_of_a_valid_batch_is_queued_in_order(harness):
    response = post_batch(harness.client, {"tasks": [task("a", max_retries=0), task("b", "p"), task("c/d")]})
    assert statuses(response) == [202, 202, 202]
    results = response.get_json()["results"]
    assert [r["task"]["id"] for r in results] == ["a", "b", "c/d"]
    assert [r["task"]["max_retries"] for r in results] == [0, 2, 2]  # the default of the test config
    assert [r["location"] for r in results] == ["/tasks/a", "/tasks/b", "/tasks/c/d"]
    assert all(set(r) == {"status", "task", "location"} for r in results)
    harness.final.wait("a", "b", "c/d")
    for result in results:
        found = harness.client.get(result["location"])
        assert found.status_code == 200
        assert found.get_json()["state"] == "done"


def test_each_task_gets_the_answer_of_the_single_endpoint(harness):
    assert harness.client.post("/enqueue", json=task("known")).status_code == 202
    body = {
        "tasks": [
            task("new"),
            task("known"),  # retained: 409
            {"id": 5, "payload": "", "max_retry": 1},  # invalid: 400 naming each field
            [],  # not an object: 400
            task("later", max_retries=6),  # over MAX_RETRIES_LIMIT
        ]
    }
    response = post_batch(harness.client, body)
    assert statuses(response) == [202, 409, 400, 400, 400]
    results = response.get_json()["results"]
    assert results[1]["problem"]["type"] == "urn:workerpool:problem:duplicate-task"
    assert results[1]["location"] == "/tasks/known"  # the task that holds the id, as the single endpoint says
    assert results[2]["problem"]["errors"] == [
        {"field": "max_retry", "message": "is not a known field"},
        {"field": "id", "message": "must be a string, not a number"},
    ]
    assert results[3]["problem"]["detail"] == "the task must be a JSON object, not an array"
    for result in results[1:]:
        assert set(result) == {"status", "problem"} | ({"location"} if result["status"] == 409 else set())
        assert result["problem"]["status"] == result["status"]
        assert result["problem"]["title"] in ("Conflict", "Bad Request")
    assert harness.pool.get("later") is None
    assert harness.pool.get("new") is not None


def test_the_readme_batch_example_answers_as_shown_after_the_readme_s_earlier_submissions():
    readme = (PROJECT_ROOT / "README.md").read_text()
    examples = re.findall(r"curl [^\n']*-d '(\{[^']*\})' (?:\\\n\s*)?http://127\.0\.0\.1:8080(/enqueue\S*)", readme)
    batch = next(n for n, (_, path) in enumerate(examples) if path == "/enqueue/batch")
    shown = readme[readme.index(examples[batch][0]) :].split("```json", 1)[1].split("```", 1)[0]
    harness = make_harness(threads=False)
    for body, path in examples[:batch]:  # a reader who follows the README submits these first
        harness.client.post(path, data=body)
    response = harness.client.post("/enqueue/batch", data=examples[batch][0])
    assert statuses(response) == [int(status) for status in re.findall(r'^  \{"status": (\d+)', shown, re.M)]
    for result, location in zip(response.get_json()["results"], re.findall(r'"location": "([^"]+)"', shown)):
        assert result["location"] == location


def test_a_count_that_a_float_rounds_to_an_integer_is_refused_alone(harness):
    body = (
        '{"tasks": [{"id": "a", "payload": 1.5, "max_retries": 2.0}, {"id": "b", "payload": "", "max_retries": 1e-400},'
        ' {"id": "c", "payload": "", "delay_ms": 2.0000000000000001}, {"id": "d", "payload": "", "delay_ms": 3}]}'
    )
    response = post_batch(harness.client, body)
    assert statuses(response) == [202, 400, 400, 202]
    results = response.get_json()["results"]
    assert results[0]["task"]["max_retries"] == 2
    assert [r["problem"]["errors"] for r in results[1:3]] == [
        [{"field": "max_retries", "message": "must be an integer, not a number"}],
        [{"field": "delay_ms", "message": "must be an integer, not a number"}],
    ]


def test_a_task_the_stores_cannot_keep_is_refused_alone(harness):
    response = post_batch(harness.client, {"tasks": [task("a"), task("b", "lone \ud800"), task("c")]})
    assert statuses(response) == [202, 400, 202]
    assert response.get_json()["results"][1]["problem"]["errors"] == [
        {"field": "payload", "message": "must not contain a lone surrogate (\\ud800 to \\udfff without its pair)"}
    ]


def test_an_answer_names_ten_unknown_fields_per_object_at_most(harness):
    # A 4 MiB batch of 471 tasks of 1,000 unknown keys each was answered 23.6 MB: one error per key.
    many = {f"k{i}": 0 for i in range(100)}
    body = json.dumps({"tasks": [{"id": "a", "payload": 1}, {"payload": 1, **many}], **many}).encode()
    response = post_batch(harness.client, body)
    assert response.status_code == 400  # the batch itself has unknown fields
    errors = response.get_json()["errors"]
    assert len(errors) == 11
    assert errors[-1] == {"field": "", "message": "has 90 more fields that are not known (not named)"}
    response = post_batch(harness.client, json.dumps({"tasks": [{"id": "a", "payload": 1}, {"payload": 1, **many}]}))
    assert statuses(response) == [202, 400]
    errors = response.get_json()["results"][1]["problem"]["errors"]
    assert [error["field"] for error in errors] == [*(f"k{i}" for i in range(10)), ""]
    assert len(response.data) < 2000


def test_an_unknown_field_named_with_a_lone_surrogate_is_refused_alone_and_the_others_answered(harness):
    # orjson cannot write the field's name (no UTF-8 form): the batch answered 500, its valid tasks queued.
    response = post_batch(harness.client, b'{"tasks":[{"id":"a","payload":1},{"payload":1,"\\udfff":2}]}')
    assert statuses(response) == [202, 400]
    refused = response.get_json()["results"][1]["problem"]
    assert refused["errors"] == [{"field": "\udfff", "message": "is not a known field"}]
    assert b'"field":"\\udfff"' in response.data  # escaped, as POST /enqueue's 400 names it
    single = harness.client.post("/enqueue", data=b'{"payload":1,"\\udfff":2}')
    assert single.get_json()["errors"] == [{"field": "\udfff", "message": "is not a known field"}]
    assert harness.client.get("/tasks/a").status_code == 200


def test_a_repeated_id_in_one_batch_is_409_for_the_later_task(harness):
    response = post_batch(harness.client, {"tasks": [task("a", "first"), task("b"), task("a", "second")]})
    assert statuses(response) == [202, 202, 409]
    assert response.get_json()["results"][2]["problem"]["detail"] == "a task with id 'a' already exists"


def test_an_id_whose_first_task_was_invalid_is_taken_by_the_later_one(harness):
    # As if the tasks had been sent one by one: the invalid one left no trace.
    response = post_batch(harness.client, {"tasks": [task("a", max_retries=-1), task("a")]})
    assert statuses(response) == [400, 202]


def test_a_full_queue_takes_what_fits_and_refuses_the_rest_with_retry_after(gate):
    harness = make_harness(gate, config=BATCH_CONFIG, workers=1, queue_size=2)
    try:
        assert harness.client.post("/enqueue", json=task("running")).status_code == 202
        gate.wait_started()  # the worker holds "running"; the queue is empty
        response = post_batch(harness.client, {"tasks": [task("a"), task("b"), task("c"), task("d")]})
        assert statuses(response) == [202, 202, 503, 503]
        refused = response.get_json()["results"][2]
        assert refused["retry_after"] == 1
        assert refused["problem"]["type"] == "urn:workerpool:problem:queue-full"
        assert harness.pool.get("c") is None
    finally:
        gate.open()
        harness.drain()
    assert harness.pool.get("b").state is State.DONE


def test_the_tasks_a_full_queue_refuses_are_logged_in_one_line_with_the_request_id(gate, caplog):
    caplog.set_level(logging.INFO, logger="service.batch")
    harness = make_harness(gate, config=BATCH_CONFIG, workers=1, queue_size=2)
    try:
        assert harness.client.post("/enqueue", json=task("running")).status_code == 202
        gate.wait_started()
        body = {"tasks": [task("a"), task("b"), task("c"), task("a"), task("d")]}
        response = post_batch(harness.client, body, headers={"X-Request-ID": "rid-full"})
        assert statuses(response) == [202, 202, 503, 409, 503]
    finally:
        gate.open()
        harness.drain()
    lines = [(r.getMessage(), r.task_id, r.request_id) for r in caplog.records if r.name == "service.batch"]
    assert lines == [
        ("batch task 3 ('a') refused: 409 a task with id 'a' already exists", "a", "rid-full"),
        (
            "batch: 2 of 5 task(s) refused, the first task 2: 503 the queue is full (2 tasks waiting); retry later",
            None,
            "rid-full",
        ),
    ]


def test_a_batch_after_shutdown_began_is_refused_task_by_task(harness):
    harness.drain()
    response = post_batch(harness.client, {"tasks": [task("a"), task("b", max_retries=99)]})
    assert statuses(response) == [503, 400]
    refused = response.get_json()["results"][0]
    assert refused["problem"]["type"] == "urn:workerpool:problem:shutting-down"
    assert refused["retry_after"] == 1  # the single endpoint's Retry-After


def test_the_valid_tasks_go_to_the_engine_in_one_call(harness, monkeypatch):
    calls = []
    submit_many = harness.pool.submit_many
    # A pool has slots, no dict of its own: its class is patched.
    monkeypatch.setattr(WorkerPool, "submit_many", lambda pool, specs: calls.append(specs) or submit_many(specs))
    monkeypatch.setattr(WorkerPool, "submit", None)  # never one task at a time
    body = {"tasks": [task("a"), task("b"), {"id": "c"}, task("a"), task("d", max_retries=1)]}
    response = post_batch(harness.client, body, headers={"X-Request-ID": "rid-one"})
    assert statuses(response) == [202, 202, 400, 409, 202]
    (specs,) = calls
    assert [(s.id, s.max_retries, s.request_id) for s in specs] == [
        ("a", 2, "rid-one"),
        ("b", 2, "rid-one"),
        ("a", 2, "rid-one"),
        ("d", 1, "rid-one"),
    ]


# -- the batch refused as a whole ------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail", "errors"),
    [
        ("{", "the body is not valid JSON", None),
        ('{"tasks": [{"id": "a", "payload": ""}]} trailing', "the body is not valid JSON", None),
        ('{"tasks": [{"id": "a", "payload": "", "payload": ""}]}', "duplicate key 'payload'", None),
        ('[{"id": "a", "payload": ""}]', "the body must be a JSON object, not an array", None),
        ("{}", "the batch is invalid", [("tasks", "is required")]),
        (
            '{"tasks": {"id": "a", "payload": ""}}',
            "the batch is invalid",
            [("tasks", "must be an array, not an object")],
        ),
        ('{"tasks": "a"}', "the batch is invalid", [("tasks", "must be an array, not a string")]),
        ('{"tasks": null}', "the batch is invalid", [("tasks", "must be an array, not null")]),
        ('{"tasks": []}', "the batch is invalid", [("tasks", "must hold at least one task")]),
        (
            '{"tasks": [{"id": "a", "payload": ""}], "task": 1}',
            "the batch is invalid",
            [("task", "is not a known field")],
        ),
    ],
)
def test_a_malformed_batch_is_one_400_and_nothing_is_queued(harness, body, detail, errors):
    response = post_batch(harness.client, body)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert detail in problem["detail"]
    if errors is not None:
        assert [(e["field"], e["message"]) for e in problem["errors"]] == errors
    assert harness.pool.get("a") is None


def test_more_tasks_than_max_batch_tasks_is_413_and_nothing_is_queued(harness):
    response = post_batch(harness.client, {"tasks": [task(str(n)) for n in range(6)]})
    assert response.status_code == 413
    assert response.get_json()["detail"] == "the batch holds 6 tasks; at most 5 are accepted in one request"
    assert harness.pool.get("0") is None
    assert statuses(post_batch(harness.client, {"tasks": [task(str(n)) for n in range(5)]})) == [202] * 5


def batch_of_size(size: int) -> bytes:
    body = json.dumps({"tasks": [task("a")]}).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(("size", "status"), [(2048, 200), (2049, 413), (10_000, 413)])
def test_the_batch_has_its_own_body_limit(harness, size, status):
    # 2048 is over MAX_BODY_BYTES (1024), which holds for POST /enqueue only.
    response = post_batch(harness.client, batch_of_size(size))
    assert response.status_code == status
    if status == 413:
        assert response.get_json()["detail"] == "the request body is larger than 2048 bytes"
        assert harness.pool.get("a") is None


@pytest.mark.parametrize(("size", "status"), [(2048, 200), (2049, 413), (10_000, 413)])
def test_a_chunked_batch_is_held_to_its_limit(harness, size, status):
    response = harness.client.post(
        "/enqueue/batch",
        input_stream=io.BytesIO(batch_of_size(size)),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == status


def test_a_batch_cut_short_is_400(harness):
    body = batch_of_size(100)
    response = harness.client.post(
        "/enqueue/batch",
        input_stream=io.BytesIO(body),
        environ_overrides={"CONTENT_LENGTH": str(len(body) + 10), "wsgi.input_terminated": True},
    )
    assert response.status_code == 400
    assert harness.pool.get("a") is None


def test_with_a_token_the_batch_needs_it():
    harness = make_harness(config=dataclasses.replace(BATCH_CONFIG, api_token=TOKEN))
    try:
        body = {"tasks": [task("a")]}
        response = post_batch(harness.client, body)
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="workerpool"'
        assert post_batch(harness.client, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert harness.pool.get("a") is None
        assert statuses(post_batch(harness.client, body, headers={"Authorization": f"Bearer {TOKEN}"})) == [202]
    finally:
        harness.pool.shutdown(5)


# -- the same as the single endpoint, task for task ------------------------------

ids = st.sampled_from(["a", "b", "c", "", "d/"])
tasks = st.one_of(
    st.fixed_dictionaries({"id": ids, "payload": st.sampled_from(["", "p", 7])}),
    st.fixed_dictionaries({"id": ids, "payload": st.just(""), "max_retries": st.integers(-1, 6)}),
    st.sampled_from([[], "task", None]),
)


def _unstarted_app(queue_size: int):
    """An app on a pool without threads: admission alone decides, so the two runs compare exactly."""
    metrics = Metrics()
    pool = WorkerPool(instant, workers=1, queue_size=queue_size, threads=False, observers=[metrics])
    return create_app(BATCH_CONFIG, pool=pool, metrics=metrics).test_client()


def _answer(status, body):
    """What a client learns from one answer: the status, the problem type or the task."""
    if status == 202:
        return status, {k: v for k, v in body.items() if k != "created_at"}
    return status, body["type"]


@settings(max_examples=50, deadline=None)
@given(
    before=st.lists(st.sampled_from(["a", "b"]), max_size=2, unique=True),
    batch=st.lists(tasks, min_size=1, max_size=5),
    queue_size=st.integers(1, 4),
)
def test_a_batch_answers_as_its_tasks_sent_one_by_one_would(before, batch, queue_size):
    by_batch, one_by_one = _unstarted_app(queue_size), _unstarted_app(queue_size)
    for client in (by_batch, one_by_one):
        for task_id in before:
            assert client.post("/enqueue", json=task(task_id)).status_code in (202, 503)
    results = post_batch(by_batch, {"tasks": batch}).get_json()["results"]
    batched = [_answer(r["status"], r.get("task") or r["problem"]) for r in results]
    singles = []
    for document in batch:
        response = one_by_one.post("/enqueue", json=document)
        singles.append(_answer(response.status_code, response.get_json()))
    assert batched == singles
    assert _retained(by_batch) == _retained(one_by_one)


def _retained(client):
    return [(t["id"], t["state"], t["max_retries"]) for t in client.get("/tasks").get_json()["tasks"]]


# -- metrics and logs ------------------------------------------------------------


def test_each_task_is_counted_as_accepted_or_by_its_reason_for_refusal(gate):
    harness = make_harness(gate, config=BATCH_CONFIG, workers=1, queue_size=2)
    try:
        assert harness.client.post("/enqueue", json=task("running")).status_code == 202
        gate.wait_started()
        body = {"tasks": [task("a"), task("a"), {"id": 1}, task("b"), task("c")]}
        assert statuses(post_batch(harness.client, body)) == [202, 409, 400, 202, 503]
        assert post_batch(harness.client, "{").status_code == 400  # refused as a whole: counted once
        assert post_batch(harness.client, batch_of_size(3000)).status_code == 413
        registry = harness.metrics.registry
        assert registry.get_sample_value("workerpool_tasks_accepted_total") == 3
        reasons = ("duplicate", "invalid", "queue_full", "too_large")
        assert rejected(harness, *reasons) == {"duplicate": 1, "invalid": 2, "queue_full": 1, "too_large": 1}
    finally:
        gate.open()
        harness.drain()


def test_a_batch_the_store_cannot_take_is_a_503_counted_once(harness, monkeypatch):
    def unavailable(pool, specs):
        raise StoreUnavailable("the disk is full (database or disk is full)")

    monkeypatch.setattr(WorkerPool, "submit_many", unavailable)  # a pool has slots: patch its class
    response = post_batch(harness.client, {"tasks": [task("a"), task("b")]})
    assert (response.status_code, response.mimetype) == (503, "application/problem+json")
    assert response.get_json()["type"] == "urn:workerpool:problem:store-unavailable"
    # Refused as a whole, as a malformed batch is: one refusal, as POST /enqueue counts its own.
    registry = harness.metrics.registry
    assert registry.get_sample_value("workerpool_tasks_rejected_total", {"reason": "store_unavailable"}) == 1


def test_a_batch_with_no_valid_task_is_answered_without_the_store(harness, monkeypatch):
    # It went to the store all the same: a busy SQLite file or a paused Redis turned its 400s into one 503
    # "may not have been stored" after the store's timeout, though there was nothing to store.
    def unavailable(store, tasks):
        raise StoreUnavailable("the task file is busy")

    monkeypatch.setattr(type(harness.pool.store), "admit", unavailable)
    response = post_batch(harness.client, {"tasks": [{"id": 3}, task("b", max_retries=-1)]})
    assert statuses(response) == [400, 400]
    fields = [[e["field"] for e in r["problem"]["errors"]] for r in response.get_json()["results"]]
    assert fields == [["id", "payload"], ["max_retries"]]
    registry = harness.metrics.registry
    assert registry.get_sample_value("workerpool_tasks_rejected_total", {"reason": "invalid"}) == 2
    assert registry.get_sample_value("workerpool_tasks_rejected_total", {"reason": "store_unavailable"}) == 0


def test_a_batch_whose_sync_to_disk_failed_answers_each_task_its_own_outcome(tmp_path, monkeypatch, caplog):
    # One 503 "stored, do not send it again" answered the whole batch: its refused tasks were lost unsaid.
    store = SqliteStore(tmp_path / "tasks.db", capacity=3, synchronous="FULL")
    harness = make_harness(instant, config=BATCH_CONFIG, queue_size=3, store=store)
    try:
        assert harness.client.post("/enqueue", json=task("old", delay_ms=600_000)).status_code == 202

        def failing_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fdatasync", failing_fsync)
        later = {"delay_ms": 600_000}
        body = {"tasks": [task("old"), task("n1", **later), task("n2", **later), task("n3", **later), {"id": 1}]}
        with caplog.at_level(logging.ERROR, logger="service.batch"):
            response = post_batch(harness.client, body)
        monkeypatch.undo()
        assert statuses(response) == [409, 503, 503, 503, 400]
        duplicate, n1, n2, full, _ = response.get_json()["results"]
        assert duplicate["location"] == "/tasks/old"
        for stored, task_id in ((n1, "n1"), (n2, "n2")):
            assert stored["location"] == f"/tasks/{task_id}" and "retry_after" not in stored
            assert "it stands (do not send it again)" in stored["problem"]["detail"]
            assert harness.client.get(f"/tasks/{task_id}").get_json()["state"] == "queued"
        assert full["problem"]["type"] == "urn:workerpool:problem:queue-full" and full["retry_after"] >= 1
        assert harness.client.get("/tasks/n3").status_code == 404  # refused, and told so
        registry = harness.metrics.registry
        assert registry.get_sample_value("workerpool_tasks_accepted_total") == 3
        assert rejected(harness, "duplicate", "invalid", "queue_full", "store_unavailable") == {
            "duplicate": 1,
            "invalid": 1,
            "queue_full": 1,
            "store_unavailable": 0,
        }
        assert any("syncing the WAL failed" in r.getMessage() for r in caplog.records)
    finally:
        harness.pool.shutdown(5)


class SecondPartFails(MemoryStore):
    """Takes more than two tasks in parts of two (as Redis takes more than GROUP_MAX_TASKS), the second part failing."""

    def admit(self, tasks):
        if len(tasks) <= 2:
            return super().admit(tasks)
        raise StorePartlyAdmitted("redis: Timeout (the first 2 were admitted)", super().admit(tasks[:2]))


def test_a_batch_whose_later_part_the_store_could_not_take_answers_each_task_its_own_outcome(caplog):
    # One 503 answered the whole batch although its first tasks were stored: sent again, they were 409s.
    harness = make_harness(instant, config=BATCH_CONFIG, queue_size=10, store=SecondPartFails(10))
    try:
        body = {"tasks": [task("a"), {"id": 1}, task("a"), task("b"), task("c")]}
        with caplog.at_level(logging.ERROR, logger="service.batch"):
            response = post_batch(harness.client, body)
        assert statuses(response) == [202, 400, 409, 503, 503]
        *_, b, c = response.get_json()["results"]
        for refused, task_id in ((b, "b"), (c, "c")):
            assert refused["problem"]["type"] == "urn:workerpool:problem:store-unavailable"
            assert "retry later with the same id (409 if it was)" in refused["problem"]["detail"]
            assert refused["retry_after"] == 1
            assert harness.client.get(f"/tasks/{task_id}").status_code == 404
        assert harness.client.get("/tasks/a").status_code == 200
        registry = harness.metrics.registry
        assert registry.get_sample_value("workerpool_tasks_accepted_total") == 1
        assert rejected(harness, "duplicate", "invalid", "store_unavailable") == {
            "duplicate": 1,
            "invalid": 1,
            "store_unavailable": 2,
        }
        assert any("answered 503 for the other 2 task(s)" in r.getMessage() for r in caplog.records)
    finally:
        harness.pool.shutdown(5)


class SecondPartOutOfMemory(MemoryStore):
    """As SecondPartFails, the second part refused for the store's memory limit (Redis maxmemory)."""

    def admit(self, tasks):
        if len(tasks) <= 2:
            return super().admit(tasks)
        try:
            raise StoreOutOfMemory("redis: OOM command not allowed when used memory > 'maxmemory'")
        except StoreOutOfMemory as exc:
            raise StorePartlyAdmitted(f"{exc} (the first 2 were admitted)", super().admit(tasks[:2])) from exc


def test_a_later_part_refused_for_the_stores_memory_limit_says_so_not_that_it_may_have_been_stored():
    harness = make_harness(instant, config=BATCH_CONFIG, queue_size=10, store=SecondPartOutOfMemory(10))
    try:
        response = post_batch(harness.client, {"tasks": [task("a"), task("b"), task("c")]})
        assert statuses(response) == [202, 202, 503]
        refused = response.get_json()["results"][2]["problem"]
        assert refused["type"] == "urn:workerpool:problem:store-unavailable"
        assert refused["detail"].startswith("the task store is at its memory limit (Redis maxmemory)")
        assert "nothing was stored; a smaller request (a batch split in parts) may pass" in refused["detail"]
        assert harness.client.get("/tasks/c").status_code == 404
    finally:
        harness.pool.shutdown(5)


def test_each_refused_task_is_logged_with_the_request_id(harness, caplog):
    caplog.set_level(logging.DEBUG)
    body = {"tasks": [task("a"), task("a"), {"id": "b"}]}
    response = post_batch(harness.client, body, headers={"X-Request-ID": "rid-batch"})
    assert statuses(response) == [202, 409, 400]
    lines = [
        (r.levelname, r.getMessage(), r.task_id, r.request_id)
        for r in caplog.records
        if r.name == "service.batch" or r.getMessage().endswith("queued")
    ]
    assert lines == [
        ("DEBUG", "task a queued", "a", "rid-batch"),
        ("INFO", "batch task 1 ('a') refused: 409 a task with id 'a' already exists", "a", "rid-batch"),
        ("INFO", "batch task 2 refused: 400 the task is invalid", None, "rid-batch"),
    ]


@pytest.mark.parametrize("task_id", ["a b", "ü/x", "a?b#c", "100%", "x:y@z"])
def test_each_location_is_the_one_post_enqueue_gives(harness, task_id):
    single = harness.client.post("/enqueue", json=task(task_id)).headers["Location"]
    harness.drain()
    fresh = make_harness(instant, config=BATCH_CONFIG)
    try:
        (result,) = post_batch(fresh.client, {"tasks": [task(task_id)]}).get_json()["results"]
    finally:
        fresh.pool.shutdown(5)
    assert result["location"] == single
    assert fresh.client.get(result["location"]).status_code == 200


# -- through gunicorn --------------------------------------------------------------


@pytest.mark.e2e
def test_gunicorn_takes_a_full_batch_and_runs_every_task(tmp_path):
    server = ServerProcess(
        ["-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0"],
        log_path=tmp_path / "gunicorn.log",
        env=clean_environment(
            QUEUE_SIZE="1000", WORK_MIN_MS="0", WORK_MAX_MS="0", FAILURE_RATE="0", MAX_BATCH_BODY_BYTES="100000"
        ),
    )
    try:
        client = Client(server.wait_for_port(LISTENING))
        wait_until(lambda: client.request("GET", "/healthz")[0] == 200, timeout=10, what="/healthz")
        body = json.dumps({"tasks": [task(f"t{n}", "p" * 50) for n in range(1000)]}).encode()
        assert len(body) < 100_000
        status, headers, text = client.request("POST", "/enqueue/batch", body, headers={"X-Request-ID": "rid-big"})
        assert (status, headers["X-Request-ID"]) == (200, "rid-big")
        results = json.loads(text)["results"]
        assert [r["task"]["id"] for r in results] == [f"t{n}" for n in range(1000)]
        too_large = json.dumps({"tasks": [task(f"u{n}", "p" * 200) for n in range(1000)]}).encode()
        status, _, text = client.request("POST", "/enqueue/batch", too_large)
        assert (status, json.loads(text)["detail"]) == (413, "the request body is larger than 100000 bytes")
        wait_until(
            lambda: client.json("GET", "/healthz")[1]["tasks"]["done"] == 1000, timeout=30, what="every task done"
        )
        assert client.json("GET", "/tasks/u0")[0] == 404
        assert server.terminate(timeout=20) == 0
    finally:
        server.stop()
    assert '"POST /enqueue/batch HTTP/1.1" 200' in server.log()


def test_many_refused_tasks_log_a_line_per_status_at_info_and_each_at_debug(harness, caplog):
    # A thousand bad tasks in a few kilobytes would otherwise write a line each: some fifty times the request.
    caplog.set_level(logging.DEBUG, logger="service.batch")
    body = {"tasks": [task("a"), {}, {}, task("a"), task("a")]}
    response = post_batch(harness.client, body, headers={"X-Request-ID": "rid-many"})
    assert statuses(response) == [202, 400, 400, 409, 409]
    lines = [(r.levelname, r.getMessage(), r.task_id) for r in caplog.records if r.name == "service.batch"]
    assert lines == [
        ("INFO", "batch task 1 refused: 400 the task is invalid", None),
        ("DEBUG", "batch task 2 refused: 400 the task is invalid", None),
        ("INFO", "batch task 3 ('a') refused: 409 a task with id 'a' already exists", "a"),
        ("DEBUG", "batch task 4 ('a') refused: 409 a task with id 'a' already exists", "a"),
        ("INFO", "batch: 2 of 5 task(s) refused with 400, the first task 1 (the others are logged at DEBUG)", None),
        ("INFO", "batch: 2 of 5 task(s) refused with 409, the first task 3 (the others are logged at DEBUG)", None),
    ]
    assert {r.request_id for r in caplog.records if r.name == "service.batch"} == {"rid-many"}
