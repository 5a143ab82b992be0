"""Server-made ids, delays, results and cancellation (DELETE /tasks/<id>) through the API."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import sqlite3
import threading
import uuid

import pytest
from doubles import WAIT_S, FakeClock, wait_until
from http_fixtures import TEST_CONFIG, Gate, failing, instant, make_harness
from redis_server import shared_server

from workerpool import FINAL_STATES, AttemptCancelled, State, Task
from workerpool.pool import MAX_RESULT_DEPTH
from workerpool.stores.redis_store import RedisStore
from workerpool.stores.sqlite import SqliteStore

ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")  # Crockford's base32: no I, L, O or U


def enqueue(harness, **body):
    return harness.client.post("/enqueue", json={"payload": "", **body})


def advance_until_final(harness, clock: FakeClock, seconds: float, task_id: str) -> None:
    """Move fake time on by ``seconds`` until the task is final.

    A worker that computed how long to wait just before a jump starts its wait
    after it, so one jump may not be enough: keep jumping.
    """
    wait_until(
        lambda: clock.advance(seconds) or harness.pool.get(task_id).state in FINAL_STATES,
        timeout=WAIT_S,
        what=f"{task_id} to finish",
    )


# -- server-made ids -----------------------------------------------------------


def test_a_task_without_an_id_gets_one_made_by_the_service():
    harness = make_harness()
    response = enqueue(harness, payload={"k": 1})
    assert response.status_code == 202
    task_id = response.get_json()["id"]
    assert ULID.fullmatch(task_id), task_id
    assert response.headers["Location"] == f"/tasks/{task_id}"
    harness.drain()
    assert harness.client.get(f"/tasks/{task_id}").get_json()["state"] == "done"


def test_made_ids_sort_in_the_order_the_tasks_were_accepted():
    harness = make_harness(queue_size=20)
    ids = [enqueue(harness).get_json()["id"] for _ in range(20)]
    harness.drain()
    assert len(set(ids)) == 20
    assert sorted(ids) == ids


def test_an_id_of_null_is_refused_rather_than_taken_as_absent():
    response = enqueue(make_harness(), id=None)
    assert response.status_code == 400
    assert response.get_json()["errors"] == [{"field": "id", "message": "must be a string, not null"}]


# -- delays --------------------------------------------------------------------


def test_a_delayed_task_is_queued_until_it_falls_due(clock: FakeClock):
    calls: list[str] = []
    harness = make_harness(lambda task, cancel: calls.append(task.id), clock=clock.time, wait=clock.wait)
    response = enqueue(harness, id="later", delay_ms=60_000)
    assert response.status_code == 202
    task = response.get_json()
    assert (task["state"], task["created_at"]) == ("queued", "2027-01-15T08:00:00.000Z")
    assert task["next_attempt_at"] == "2027-01-15T08:01:00.000Z"
    # A task without a delay, accepted later, runs first: the delayed one is not due.
    assert enqueue(harness, id="now").status_code == 202
    harness.final.wait("now")
    assert calls == ["now"]
    assert harness.client.get("/tasks/later").get_json()["state"] == "queued"
    assert harness.pool.stats().waiting == 1  # it holds its place in the queue
    advance_until_final(harness, clock, 60, "later")
    assert calls == ["now", "later"]
    harness.drain()


def test_delay_ms_may_be_max_delay_ms_and_no_more():
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, max_delay_ms=5000))
    assert enqueue(harness, id="a", delay_ms=5000).status_code == 202
    response = enqueue(harness, id="b", delay_ms=5001)
    assert response.status_code == 400
    assert response.get_json()["errors"] == [{"field": "delay_ms", "message": "must be between 0 and 5000"}]
    harness.pool.shutdown(0)


def test_delayed_tasks_count_against_the_queue_capacity():
    harness = make_harness(queue_size=2)
    assert enqueue(harness, id="a", delay_ms=60_000).status_code == 202
    assert enqueue(harness, id="b", delay_ms=60_000).status_code == 202
    response = enqueue(harness, id="c")
    assert response.status_code == 503
    assert response.get_json()["type"] == "urn:workerpool:problem:queue-full"
    summary = harness.pool.shutdown(0)
    assert sorted(summary.abandoned) == ["a", "b"]  # not due at shutdown: reported as unfinished work


# -- results -------------------------------------------------------------------


def test_a_handlers_return_value_is_the_tasks_result():
    harness = make_harness(lambda task, cancel: {"echo": task.payload, "rows": [1, 2.5, None]}, threads=False)
    assert enqueue(harness, id="a", payload=["x"]).status_code == 202
    assert harness.client.get("/tasks/a").get_json()["result"] is None  # null until done
    assert harness.pool.step()
    task = harness.client.get("/tasks/a").get_json()
    assert (task["state"], task["result"]) == ("done", {"echo": ["x"], "rows": [1, 2.5, None]})


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        ("x" * 20, "the handler's result is at least 22 bytes as JSON; the limit is 16 (MAX_RESULT_BYTES)"),
        ({1, 2}, "the handler returned set, which is not JSON"),
        (float("nan"), "the handler returned float, which is not JSON"),
    ],
)
def test_a_result_that_cannot_be_kept_fails_the_task_for_good(returned, error):
    harness = make_harness(lambda task, cancel: returned, max_result_bytes=16)
    assert enqueue(harness, id="a", max_retries=3).status_code == 202
    harness.drain()
    task = harness.client.get("/tasks/a").get_json()
    assert (task["state"], task["attempts"], task["result"]) == ("failed", 1, None)
    assert task["last_error"].startswith(error)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_result_nested_as_deep_as_allowed_can_be_read_and_listed(store, tmp_path):
    value = []
    for _ in range(MAX_RESULT_DEPTH - 1):
        value = [value]
    options = {"store": SqliteStore(tmp_path / "tasks.db", capacity=4)} if store == "sqlite" else {}
    harness = make_harness(lambda task, cancel: value if task.id == "deep" else [value], threads=False, **options)
    assert enqueue(harness, id="deep").status_code == 202
    assert enqueue(harness, id="deeper", max_retries=3).status_code == 202
    assert harness.pool.step() and harness.pool.step()
    # Read on the request thread, decoded (SQLite) and encoded deeper than the worker checked it.
    response = harness.client.get("/tasks/deep")
    assert (response.status_code, response.get_json()["state"]) == (200, "done")
    listing = harness.client.get("/tasks?state=done")
    assert listing.status_code == 200 and [t["id"] for t in listing.get_json()["tasks"]] == ["deep"]
    deeper = harness.client.get("/tasks/deeper").get_json()
    assert (deeper["state"], deeper["attempts"]) == ("failed", 1)
    assert deeper["last_error"] == f"the handler's result is nested more than {MAX_RESULT_DEPTH} levels deep"
    assert harness.client.get("/tasks").status_code == 200


def nested_text(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_a_stored_result_nested_deeper_than_allowed_is_served_as_unreadable_and_logged_once(store, tmp_path, caplog):
    if store == "sqlite":
        kept = SqliteStore(tmp_path / "tasks.db", capacity=4)

        def write_result(task_id: str, text: str) -> None:
            with sqlite3.connect(tmp_path / "tasks.db") as conn:
                conn.execute("UPDATE tasks SET result = ? WHERE id = ?", (text, task_id))
    else:
        prefix = f"test-{uuid.uuid4().hex}"
        kept = RedisStore(shared_server().client(), capacity=4, ttl=3600, max_finished=100, prefix=prefix)

        def write_result(task_id: str, text: str) -> None:
            shared_server().client().hset(f"{{{prefix}}}:t:{task_id}", "result", text)

    harness = make_harness(lambda task, cancel: [1], threads=False, store=kept)
    try:
        for task_id in ("at_limit", "over", "far_over"):
            assert enqueue(harness, id=task_id).status_code == 202
            assert harness.pool.step()
        # As a release older than the limit could keep them; far_over cannot even be decoded.
        for task_id, depth in (("at_limit", MAX_RESULT_DEPTH), ("over", MAX_RESULT_DEPTH + 1), ("far_over", 3000)):
            write_result(task_id, nested_text(depth))
        caplog.set_level(logging.WARNING, logger="workerpool")
        unreadable = {
            "unreadable_result": f"the stored result is nested more than {MAX_RESULT_DEPTH} levels deep"
            " (kept by an older release): it is not served"
        }
        for _ in range(2):
            for task_id in ("over", "far_over"):
                response = harness.client.get(f"/tasks/{task_id}")
                assert response.status_code == 200, response.data
                assert (response.get_json()["state"], response.get_json()["result"]) == ("done", unreadable)
                assert harness.client.delete(f"/tasks/{task_id}").status_code == 409
            listing = harness.client.get("/tasks")
            assert listing.status_code == 200, listing.data
            results = {task["id"]: task["result"] for task in listing.get_json()["tasks"]}
            assert results == {"at_limit": json.loads(nested_text(MAX_RESULT_DEPTH)), "over": unreadable,
                               "far_over": unreadable}  # fmt: skip
        told = [r.task_id for r in caplog.records if "levels deep (kept by an older release)" in r.getMessage()]
        assert sorted(told) == ["far_over", "over"]  # once each, however often read
    finally:
        kept.close()


# -- DELETE /tasks/<id> --------------------------------------------------------


def cancel(harness, task_id, **kwargs):
    return harness.client.delete(f"/tasks/{task_id}", **kwargs)


def test_an_unknown_task_cannot_be_cancelled():
    response = cancel(make_harness(), "nope")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["type"] == "urn:workerpool:problem:task-not-found"


def test_a_queued_task_is_cancelled_at_once_and_never_runs(clock: FakeClock):
    calls: list[str] = []
    harness = make_harness(lambda task, cancel: calls.append(task.id), clock=clock.time, wait=clock.wait)
    assert enqueue(harness, id="a", delay_ms=1000).status_code == 202
    first = cancel(harness, "a")
    assert first.status_code == 200
    task = first.get_json()
    assert (task["state"], task["attempts"], task["cancel_requested"]) == ("cancelled", 0, False)
    assert task["finished_at"] == "2027-01-15T08:00:00.000Z"
    again = cancel(harness, "a")  # idempotent: the same answer
    assert (again.status_code, again.get_json()) == (200, task)
    # "b" falls due after "a" would have: once it ran, "a" was passed over.
    assert enqueue(harness, id="b", delay_ms=2000).status_code == 202
    advance_until_final(harness, clock, 3, "b")
    assert calls == ["b"]
    assert harness.client.get("/tasks/a").get_json() == task
    harness.drain()


def test_a_task_waiting_out_a_retry_is_cancelled_at_once():
    harness = make_harness(failing, threads=False, backoff_base=10.0, backoff_cap=10.0)
    assert enqueue(harness, id="a", max_retries=3).status_code == 202
    assert harness.pool.step()  # the first attempt fails: a retry is due within 10 s
    task = harness.client.get("/tasks/a").get_json()
    assert (task["state"], task["attempts"]) == ("queued", 1)
    assert task["next_attempt_at"] is not None
    response = cancel(harness, "a")
    assert response.status_code == 200
    cancelled = response.get_json()
    assert (cancelled["state"], cancelled["attempts"]) == ("cancelled", 1)
    assert cancelled["last_error"] == "RuntimeError: boom"  # the failure it was waiting to retry
    assert not harness.pool.step()
    harness.drain()


class Cooperative:
    """A handler that waits for its cancel event, then for ``proceed``, then stops or returns a result."""

    def __init__(self, *, honours_cancel: bool = True) -> None:
        self.started = threading.Event()
        self.saw_cancel = threading.Event()
        self.proceed = threading.Event()
        self.honours_cancel = honours_cancel

    def __call__(self, task: Task, cancel: threading.Event) -> object:
        self.started.set()
        if cancel.wait(WAIT_S):
            self.saw_cancel.set()
        self.proceed.wait(WAIT_S)
        if self.honours_cancel:
            raise AttemptCancelled("stopped on request")
        return "finished anyway"


def test_a_running_task_is_asked_to_stop_and_ends_cancelled_without_a_retry():
    handler = Cooperative()
    harness = make_harness(handler)
    assert enqueue(harness, id="a", max_retries=3).status_code == 202
    assert handler.started.wait(WAIT_S)
    first = cancel(harness, "a")
    assert first.status_code == 202
    task = first.get_json()
    assert (task["state"], task["cancel_requested"], task["attempts"]) == ("running", True, 1)
    assert handler.saw_cancel.wait(WAIT_S), "the handler's cancel event was not set"
    again = cancel(harness, "a")
    assert (again.status_code, again.get_json()) == (202, task)
    handler.proceed.set()
    harness.final.wait("a")
    ended = harness.client.get("/tasks/a").get_json()
    assert (ended["state"], ended["attempts"]) == ("cancelled", 1)
    assert ended["last_error"] == "AttemptCancelled: stopped on request"
    assert cancel(harness, "a").get_json() == ended
    assert cancel(harness, "a").status_code == 200
    harness.drain()


def test_a_running_task_that_succeeds_anyway_is_done_and_then_409():
    handler = Cooperative(honours_cancel=False)
    harness = make_harness(handler)
    assert enqueue(harness, id="a").status_code == 202
    assert handler.started.wait(WAIT_S)
    assert cancel(harness, "a").status_code == 202
    handler.proceed.set()
    harness.final.wait("a")
    task = harness.client.get("/tasks/a").get_json()
    assert (task["state"], task["result"], task["cancel_requested"]) == ("done", "finished anyway", True)
    response = cancel(harness, "a")
    assert response.status_code == 409
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:task-finished"
    assert problem["detail"] == "task 'a' is already done: only queued and running tasks can be cancelled"
    harness.drain()


def test_a_failed_task_cannot_be_cancelled():
    harness = make_harness(failing)
    assert enqueue(harness, id="a", max_retries=0).status_code == 202
    harness.drain()
    response = cancel(harness, "a")
    assert response.status_code == 409
    assert "is already failed" in response.get_json()["detail"]


def test_cancel_requires_the_token_when_one_is_set():
    gate = Gate()
    harness = make_harness(gate, config=dataclasses.replace(TEST_CONFIG, api_token="t0ken-t0ken-t0ken"))
    headers = {"Authorization": "Bearer t0ken-t0ken-t0ken"}
    try:
        assert harness.client.post("/enqueue", json={"id": "a", "payload": ""}, headers=headers).status_code == 202
        response = cancel(harness, "a")
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="workerpool"'
        assert cancel(harness, "a", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert harness.pool.get("a").cancel_requested is False
        assert harness.pool.get("a").state is not State.CANCELLED
        assert cancel(harness, "a", headers=headers).status_code in (200, 202)
    finally:
        gate.open()
        harness.drain()


def test_cancelled_is_a_final_state_in_the_metrics_and_the_health_check():
    harness = make_harness(instant)
    assert enqueue(harness, id="a", delay_ms=60_000).status_code == 202
    assert cancel(harness, "a").status_code == 200
    text = harness.client.get("/metrics").get_data(as_text=True)
    assert 'workerpool_tasks_finished_total{state="cancelled"} 1.0' in text
    assert 'workerpool_tasks_retained{state="cancelled"} 1.0' in text
    assert harness.client.get("/healthz").get_json()["tasks"]["cancelled"] == 1
    listed = harness.client.get("/tasks?state=cancelled").get_json()
    assert [task["id"] for task in listed["tasks"]] == ["a"]
    harness.drain()


def test_a_batch_task_may_be_delayed_and_have_no_id():
    harness = make_harness(clock=lambda: 1_800_000_000.0)
    body = {"tasks": [{"payload": "", "delay_ms": 1500}, {"id": "b", "payload": {"k": 1}}]}
    response = harness.client.post("/enqueue/batch", json=body)
    assert [r["status"] for r in response.get_json()["results"]] == [202, 202]
    delayed = response.get_json()["results"][0]["task"]
    assert ULID.fullmatch(delayed["id"])
    assert delayed["next_attempt_at"] == "2027-01-15T08:00:01.500Z"
    harness.pool.shutdown(0)


@pytest.mark.parametrize("method", ["get", "delete"])
@pytest.mark.parametrize("path", ["/tasks/%ff", "/tasks/%fe", "/tasks/%80", "/tasks/a%c3"])
def test_a_path_that_is_not_utf8_names_no_task_not_the_one_holding_the_replacement_character(method, path):
    harness = make_harness()
    for task_id in ("\ufffd", "a\ufffd"):
        assert enqueue(harness, id=task_id, delay_ms=60_000).status_code == 202
    response = getattr(harness.client, method)(path)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert "the path is not UTF-8" in response.get_json()["detail"]
    assert harness.pool.get("\ufffd").state is harness.pool.get("a\ufffd").state is State.QUEUED
    assert harness.client.get("/tasks/%EF%BF%BD").get_json()["id"] == "\ufffd"  # its UTF-8 spelling reaches it


def test_a_fragment_of_the_request_target_is_no_part_of_the_id():
    # gunicorn routes `/tasks/a#%ff` to task "a" (it drops the fragment); its raw target, fragment and
    # all, was checked as the id's bytes and answered 404 "not UTF-8".
    harness = make_harness()
    assert enqueue(harness, id="a", delay_ms=60_000).status_code == 202
    response = harness.client.get("/tasks/a", environ_overrides={"RAW_URI": "/tasks/a#%ff"})
    assert response.status_code == 200
    assert response.get_json()["id"] == "a"
    harness.pool.shutdown(0)
