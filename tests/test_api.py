"""The task API through Flask's test client: every endpoint and status code."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from urllib.parse import urljoin, urlsplit

import pytest
from http_fixtures import EPOCH, TEST_CONFIG, Gate, failing, failing_permanently, instant, make_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from service.schema import ID_PATH_RULE
from workerpool import State

pytestmark = pytest.mark.usefixtures("harness_store")  # every test on every store

TASK_FIELDS = {
    "id",
    "state",
    "attempts",
    "max_retries",
    "last_error",
    "result",
    "cancel_requested",
    "created_at",
    "started_at",
    "finished_at",
    "next_attempt_at",
}


@pytest.fixture
def gate():
    gate = Gate()
    yield gate
    gate.open()


@pytest.fixture
def harness():
    harness = make_harness(instant)
    yield harness
    harness.pool.shutdown(5)


@pytest.fixture
def client(harness):
    return harness.client


def enqueue(client, body, **kwargs):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post("/enqueue", data=data, **kwargs)


# -- POST /enqueue: accepted -----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "max_retries"),
    [
        ({"id": "a", "payload": "p", "max_retries": 3}, 3),
        ({"id": "a", "payload": ""}, 2),  # omitted: DEFAULT_MAX_RETRIES of the test config
        ({"id": "a", "payload": "", "max_retries": 0}, 0),
        ({"id": "a", "payload": "", "max_retries": 5}, 5),  # exactly MAX_RETRIES_LIMIT
        ({"id": "a", "payload": "", "max_retries": 4.0}, 4),  # an integer to JSON Schema, as sent by float clients
        ({"id": "x" * 256, "payload": ""}, 2),
        ({"id": "a", "payload": "x" * 512}, 2),  # exactly MAX_PAYLOAD_CHARS
        ({"id": "äö 😀 task", "payload": "ünïcode"}, 2),
    ],
)
def test_enqueue_accepts_a_valid_task(client, body, max_retries):
    response = enqueue(client, body)
    assert response.status_code == 202
    assert response.mimetype == "application/json"
    task = response.get_json()
    assert set(task) == TASK_FIELDS  # the payload is never echoed
    assert task["id"] == body["id"]
    assert task["max_retries"] == max_retries
    assert type(task["max_retries"]) is int
    assert task["state"] == "queued"
    assert task["attempts"] == 0
    assert response.headers["Location"].startswith("/tasks/")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "application/octet-stream"],
)
def test_enqueue_parses_json_whatever_the_content_type(client, content_type):
    response = enqueue(client, '{"id": "a", "payload": "x=1&y=2"}', content_type=content_type)
    assert response.status_code == 202


@pytest.mark.parametrize(
    "task_id", ["plain", "with space", "a/b/c", "q?x=1#frag", "100%", "ünï", "a.b", "..a", ".hidden/x", "a../b"]
)
def test_location_leads_back_to_the_task(client, task_id):
    response = enqueue(client, {"id": task_id, "payload": ""})
    assert response.status_code == 202
    # What a real client sends after resolving the reference (RFC 3986 5.2).
    assert urlsplit(urljoin("http://host/", response.headers["Location"])).path == response.headers["Location"]
    found = client.get(response.headers["Location"])
    assert found.status_code == 200
    assert found.get_json()["id"] == task_id


PAYLOADS = [
    {"url": "https://example.com/a", "tries": [1, 2.5, None, True], "nested": {"deep": [[]]}},
    ["a", {"b": []}],
    0,
    -1.5,
    10**99,  # 100 digits: the longest integer taken
    True,
    None,
    "",
    "ünïcode",
    {"\U0001f600": ["\U0001f600"]},  # sent as the escaped surrogate pair "\ud83d\ude00"
]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_handler_receives_any_json_payload_as_decoded(payload):
    received = []
    harness = make_harness(lambda task, cancel: received.append(task.payload))
    assert enqueue(harness.client, {"id": "a", "payload": payload}).status_code == 202
    harness.drain()
    assert len(received) == 1
    assert json.dumps(received[0]) == json.dumps(payload)  # also tells True from 1 and 1.0 from 1


def test_a_json_payload_is_measured_as_compact_json(client):
    at_limit = ["x" * 508]  # ["xx...x"]: 512 characters, the limit of the test config
    assert enqueue(client, {"id": "a", "payload": at_limit}).status_code == 202
    # The spaces of the body do not count.
    assert enqueue(client, '{"id": "b", "payload": [ "' + "x" * 508 + '" ] }').status_code == 202
    assert enqueue(client, {"id": "c", "payload": ["x" * 509]}).status_code == 400


def test_a_payload_nests_at_most_500_deep_and_a_queued_one_that_deep_reads_back():
    config = dataclasses.replace(TEST_CONFIG, max_body_bytes=10_000, max_payload_chars=5_000)
    harness = make_harness(config=config, threads=False)  # the tasks stay queued, their payloads kept
    assert enqueue(harness.client, '{"id": "a", "payload": ' + "[" * 500 + "]" * 500 + "}").status_code == 202
    assert harness.client.get("/tasks/a").status_code == 200
    assert harness.client.get("/tasks").status_code == 200
    # Up to about 975 levels were taken (what the body's decoder allows), and then every read of the
    # queued task on SQLite or Redis could fail: the store decodes its payload on a request thread
    # deeper than the one that accepted it.
    for depth in (501, 800):
        body = '{"id": "b", "payload": {"k": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}}"
        response = enqueue(harness.client, body)
        assert response.status_code == 400, response.data
        assert [(e["field"], e["message"]) for e in response.get_json()["errors"]] == [
            ("payload", "must not nest lists and objects more than 500 levels deep")
        ]
    assert harness.pool.get("b") is None


def test_a_body_at_both_limits_is_accepted(client):
    body = json.dumps({"id": "a", "payload": "x" * 512}).encode()
    body += b" " * (1024 - len(body))
    assert enqueue(client, body).status_code == 202


# -- POST /enqueue: refused ---------------------------------------------------


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ("", "not valid JSON"),
        ("{", "not valid JSON"),
        ('{"id": "a", "payload": ""} trailing', "not valid JSON"),
        ('{"id": "a", "payload": ""}{}', "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ('{"id": "a", "payload": "", "max_retries": NaN}', "NaN is not a JSON number"),
        ('{"id": "a", "payload": "", "max_retries": Infinity}', "not a JSON number"),
        ('{"id": "a", "id": "b", "payload": ""}', "duplicate key 'id'"),
        ("[]", "must be a JSON object, not an array"),
        ('"task"', "not a string"),
        ("42", "not a number"),
        ("true", "not a boolean"),
        ("null", "not null"),
    ],
)
def test_enqueue_refuses_a_body_that_is_not_a_json_object(client, body, detail):
    response = enqueue(client, body)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == 400
    assert detail in problem["detail"]
    assert "errors" not in problem


@pytest.mark.timeout(5)  # refused quickly, not merely eventually
@pytest.mark.parametrize(
    "body",
    [
        "[" * 100_000,
        "[" * 50_000 + "]" * 50_000,
        '{"id": "a", "payload": ' + "[" * 50_000,
        '{"a": ' * 50_000 + "1" + "}" * 50_000,
    ],
    ids=["unclosed", "closed", "in-a-field", "objects"],
)
def test_a_deeply_nested_body_within_the_limit_is_a_400(body):
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, max_body_bytes=400_000))
    assert len(body) <= 400_000
    response = enqueue(harness.client, body)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"] == "the body is not valid JSON: nested too deeply"


HUGE = "9" * 5000  # more digits than int() converts (4300), far more than any field takes
PAYLOAD_HUGE_INTEGER = "must not contain an integer of more than 100 digits"
PAYLOAD_FLOAT_OVERFLOW = "must not contain a number too large for a 64-bit float"


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("body", "errors"),
    [
        (f'{{"id": "a", "payload": "", "max_retries": {HUGE}}}', [("max_retries", "must be between 0 and 5")]),
        (f'{{"id": "a", "payload": "", "max_retries": -{HUGE}}}', [("max_retries", "must be between 0 and 5")]),
        (f'{{"id": "a", "payload": "", "max_retries": {"1" * 101}}}', [("max_retries", "must be between 0 and 5")]),
        ('{"id": "a", "payload": "", "max_retries": 1e999999}', [("max_retries", "must be an integer, not a number")]),
        ('{"id": "a", "payload": "", "max_retries": -1e999999}', [("max_retries", "must be an integer, not a number")]),
        (
            f'{{"id": {HUGE}, "payload": 1e999999}}',
            [("id", "must be a string, not a number"), ("payload", PAYLOAD_FLOAT_OVERFLOW)],
        ),
        (f'{{"id": "a", "payload": "", "{HUGE}": {HUGE}}}', [(HUGE, "is not a known field")]),
        (f'{{"id": "a", "payload": {{"n": [{HUGE}]}}}}', [("payload", PAYLOAD_HUGE_INTEGER)]),
        (f'{{"id": "a", "payload": {"1" * 101}}}', [("payload", PAYLOAD_HUGE_INTEGER)]),
        ('{"id": "a", "payload": [-1e999999]}', [("payload", PAYLOAD_FLOAT_OVERFLOW)]),
    ],
    ids=[
        "huge",
        "huge-negative",
        "101-digits",
        "float-overflow",
        "negative-float-overflow",
        "id-payload",
        "unknown",
        "in-payload",
        "payload-101-digits",
        "payload-float-overflow",
    ],
)
def test_huge_numbers_are_field_errors(body, errors):
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, max_body_bytes=16_384))
    response = enqueue(harness.client, body)
    assert response.status_code == 400
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:invalid-request"
    assert [(e["field"], e["message"]) for e in problem["errors"]] == errors


@pytest.mark.parametrize(
    "literal", ["1e-400", "-1e-400", "2.0000000000000001", "20.000000000000001", "4.00000000000000000001e0"]
)
@pytest.mark.parametrize("field", ["max_retries", "delay_ms"])
def test_a_count_that_a_float_rounds_to_an_integer_is_refused_as_not_one(client, field, literal):
    # Taken as the integer the float rounded it to: 1e-400 was stored as max_retries 0.
    response = enqueue(client, f'{{"id": "a", "payload": [2.0000000000000001, 1e-400], "{field}": {literal}}}')
    assert response.status_code == 400
    assert [(e["field"], e["message"]) for e in response.get_json()["errors"]] == [
        (field, f"{NOT_INTEGER}, not a number")
    ]


@pytest.mark.parametrize("literal", ["4.0", "4e0", "40e-1", "0.4e1", "4.000e+0", "0.0e-400"])
def test_a_count_written_as_an_integral_float_is_that_integer(client, literal):
    body = f'{{"id": "a", "payload": [2.0000000000000001], "max_retries": {literal}, "delay_ms": {literal}}}'
    response = enqueue(client, body)
    assert response.status_code == 202
    assert response.get_json()["max_retries"] == round(float(literal))


@pytest.mark.timeout(5)
def test_a_huge_number_as_the_body_is_a_400():
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, max_body_bytes=16_384))
    response = enqueue(harness.client, HUGE)
    assert response.status_code == 400
    assert response.get_json()["detail"] == "the body must be a JSON object, not a number"


ID_TOO_LONG = "must be 1 to 256 characters long"
PAYLOAD_REQUIRED = "is required (any JSON value; it may be an empty string)"
NOT_INTEGER = "must be an integer"
# "\ud800" is valid JSON text, but a lone surrogate has no UTF-8 form: the SQLite and Redis stores cannot keep it.
LONE_SURROGATE = "must not contain a lone surrogate (\\ud800 to \\udfff without its pair)"
# Invisible or reordering: an id holding one reads as another in logs and on the dashboard.
FORMAT_CHARACTER = "must not contain invisible format characters (Unicode category Cf: bidi controls, zero-width)"


@pytest.mark.parametrize(
    ("body", "errors"),
    [
        ({}, [("payload", PAYLOAD_REQUIRED)]),
        ({"id": "a"}, [("payload", PAYLOAD_REQUIRED)]),
        ({"id": 1, "payload": ""}, [("id", "must be a string, not a number")]),
        ({"id": None, "payload": ""}, [("id", "must be a string, not null")]),
        ({"id": ["a"], "payload": ""}, [("id", "must be a string, not an array")]),
        ({"id": "", "payload": ""}, [("id", ID_TOO_LONG)]),
        ({"id": "x" * 257, "payload": ""}, [("id", ID_TOO_LONG)]),
        ({"id": "a\nb", "payload": ""}, [("id", "must not contain control characters")]),
        ({"id": "a\x00", "payload": ""}, [("id", "must not contain control characters")]),
        ({"id": "\x7f", "payload": ""}, [("id", "must not contain control characters")]),
        ({"id": "a\x85", "payload": ""}, [("id", "must not contain control characters")]),
        ({"id": "a\ud800", "payload": ""}, [("id", LONE_SURROGATE)]),
        ({"id": "bidi-\u202e1 deliaf", "payload": ""}, [("id", f"{FORMAT_CHARACTER}: U+202E at index 5")]),
        ({"id": "zw-\u200bjob", "payload": ""}, [("id", f"{FORMAT_CHARACTER}: U+200B at index 3")]),
        ({"id": "\ufeffx", "payload": ""}, [("id", f"{FORMAT_CHARACTER}: U+FEFF at index 0")]),
        ({"id": "iso-\u2066x\u2069", "payload": ""}, [("id", f"{FORMAT_CHARACTER}: U+2066 at index 4")]),
        ({"id": "tag-\U000e0041", "payload": ""}, [("id", f"{FORMAT_CHARACTER}: U+E0041 at index 4")]),
        *[
            ({"id": bad, "payload": ""}, [("id", ID_PATH_RULE)])
            for bad in ["/a", "a/", "a//b", ".", "..", "a/./b", "a/../b", "./a"]
        ],
        ({"id": "a", "payload": "a\ud800"}, [("payload", LONE_SURROGATE)]),
        ({"id": "a", "payload": "\udc00\ud83d"}, [("payload", LONE_SURROGATE)]),  # reversed: not a pair
        ({"id": "a", "payload": {"k\udfff": 1}}, [("payload", LONE_SURROGATE)]),
        ({"id": "a", "payload": [["\ud800"]]}, [("payload", LONE_SURROGATE)]),
        ({"id": "a", "payload": "x" * 513}, [("payload", "must be at most 512 characters")]),
        ({"id": "a", "payload": ["x" * 509]}, [("payload", "must be at most 512 characters as compact JSON")]),
        ({"id": "a", "payload": {"k": "x" * 506}}, [("payload", "must be at most 512 characters as compact JSON")]),
        ({"id": "a", "payload": "", "max_retries": True}, [("max_retries", f"{NOT_INTEGER}, not a boolean")]),
        ({"id": "a", "payload": "", "max_retries": 2.5}, [("max_retries", f"{NOT_INTEGER}, not a number")]),
        ({"id": "a", "payload": "", "max_retries": 6.0}, [("max_retries", "must be between 0 and 5")]),
        ({"id": "a", "payload": "", "max_retries": "3"}, [("max_retries", f"{NOT_INTEGER}, not a string")]),
        ({"id": "a", "payload": "", "max_retries": None}, [("max_retries", f"{NOT_INTEGER}, not null")]),
        ({"id": "a", "payload": "", "max_retries": -1}, [("max_retries", "must be between 0 and 5")]),
        ({"id": "a", "payload": "", "max_retries": 6}, [("max_retries", "must be between 0 and 5")]),
        ({"id": "a", "payload": "", "max_retries": 10**30}, [("max_retries", "must be between 0 and 5")]),
        ({"id": "a", "payload": "", "max_retry": 3}, [("max_retry", "is not a known field")]),
        (
            {"id": 5, "payload": "x" * 600, "max_retries": "x", "extra": 1, "other": None},
            [
                ("extra", "is not a known field"),
                ("other", "is not a known field"),
                ("id", "must be a string, not a number"),
                ("payload", "must be at most 512 characters"),
                ("max_retries", f"{NOT_INTEGER}, not a string"),
            ],
        ),
    ],
)
def test_enqueue_lists_every_invalid_field(harness, body, errors):
    response = enqueue(harness.client, body)
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:invalid-request"
    assert problem["title"] == "Bad Request"
    assert [(e["field"], e["message"]) for e in problem["errors"]] == errors
    assert harness.pool.stats().counts[State.QUEUED] == 0  # nothing was submitted


def test_a_body_over_the_limit_is_413(harness):
    response = enqueue(harness.client, {"id": "a", "payload": "x" * 1024})
    assert response.status_code == 413
    assert response.mimetype == "application/problem+json"
    assert response.get_json()["detail"] == "the request body is larger than 1024 bytes"
    assert harness.pool.get("a") is None


def post_chunked(client, body: bytes):
    return client.post(
        "/enqueue",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn and werkzeug's server set it
    )


def body_of_size(size: int, task_id: str = "a") -> bytes:
    """A valid task body padded with trailing spaces to exactly ``size`` bytes."""
    body = json.dumps({"id": task_id, "payload": ""}).encode()
    return body + b" " * (size - len(body))


@pytest.mark.parametrize(("size", "status"), [(1024, 202), (1025, 413), (5000, 413)])
def test_a_chunked_body_is_held_to_the_limit(harness, size, status):
    # werkzeug alone would hand over the first 1024 bytes of a longer chunked
    # body; here the padding makes such a truncated body valid JSON.
    assert post_chunked(harness.client, body_of_size(size)).status_code == status


class _RefusedTrailer:
    """A chunked body whose reader refuses its trailer section as ``message`` says."""

    def __init__(self, message: str) -> None:
        self.message = message

    def read(self, size: int = -1) -> bytes:
        from gunicorn.http.errors import LimitRequestHeaders

        raise LimitRequestHeaders(self.message)


@pytest.mark.parametrize(
    ("message", "detail"),
    [
        # gunicorn's parser: its limits are whatever the server was given (--limit-request-fields 5...)
        ("limit request headers fields", "it has more fields than the server takes in a request head"),
        ("limit request headers fields size", "a field of it is longer than the server takes in a request head"),
        ("limit request trailer section size", "it is longer than the server takes"),
        # python app.py's reader and the event loop: their limits, named by them
        ("the trailer section has more than 100 fields", "the trailer section has more than 100 fields"),
        ("the trailer section is longer than 65536 bytes", "the trailer section is longer than 65536 bytes"),
    ],
)
def test_a_trailer_section_too_large_is_refused_431_naming_only_the_limits_in_force(harness, message, detail):
    # The detail said "at most 100 fields, of 8190 bytes each" whatever limits gunicorn had been given.
    response = harness.client.post(
        "/enqueue",
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": _RefusedTrailer(message), "wsgi.input_terminated": True},
    )
    assert response.status_code == 431
    assert response.get_json()["detail"] == f"the chunked body's trailer section is too large: {detail}"
    assert harness.pool.get("a") is None


class _RefusedByWerkzeug:
    """A chunked body whose reading werkzeug cuts off with its own 413."""

    def read(self, size: int = -1) -> bytes:
        from werkzeug.exceptions import RequestEntityTooLarge

        raise RequestEntityTooLarge()


@pytest.mark.parametrize(
    ("path", "limit"), [("/enqueue", "max_body_bytes"), ("/enqueue/batch", "max_batch_body_bytes")]
)
def test_werkzeug_refusing_a_body_as_too_large_is_answered_with_the_routes_own_limit(harness, path, limit):
    # werkzeug's 413 named the app-wide MAX_CONTENT_LENGTH (the single task's limit), also for a batch.
    response = harness.client.post(
        path,
        headers={"Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input": _RefusedByWerkzeug(), "wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    limit_bytes = getattr(harness.app.extensions["workerpool"].config, limit)
    assert response.get_json()["detail"] == f"the request body is larger than {limit_bytes} bytes"


@pytest.mark.parametrize(("size", "status"), [(1024, 202), (1025, 413)])
def test_a_body_with_content_length_is_held_to_the_limit(harness, size, status):
    assert enqueue(harness.client, body_of_size(size)).status_code == status


def test_a_body_shorter_than_its_content_length_is_400(harness):
    # What arrived before the client stopped sending is a valid task here; the
    # WSGI server hands it over as if it were the whole body.
    body = body_of_size(64)
    response = harness.client.post(
        "/enqueue",
        input_stream=io.BytesIO(body),
        environ_overrides={"CONTENT_LENGTH": str(len(body) + 16), "wsgi.input_terminated": True},  # as gunicorn
    )
    assert response.status_code == 400
    assert response.get_json()["detail"] == "the request body ended after 64 of its 80 bytes"
    assert harness.pool.get("a") is None


def test_a_409_leads_to_the_task_that_holds_the_id_with_its_url_encoded(harness):
    task_id = "dir/ünï code"
    assert enqueue(harness.client, {"id": task_id, "payload": "mine"}).status_code == 202
    response = enqueue(harness.client, {"id": task_id, "payload": "mine"})
    assert (response.status_code, response.headers["Location"]) == (409, "/tasks/dir/%C3%BCn%C3%AF%20code")
    assert harness.client.get(response.headers["Location"]).get_json()["id"] == task_id


def test_a_known_id_is_409(harness):
    assert enqueue(harness.client, {"id": "a", "payload": ""}).status_code == 202
    response = enqueue(harness.client, {"id": "a", "payload": "other", "max_retries": 0})
    assert response.status_code == 409
    assert response.get_json()["type"] == "urn:workerpool:problem:duplicate-task"
    assert response.headers["Location"] == "/tasks/a"  # the task that holds the id
    harness.final.wait("a")
    # Still refused once it is finished, for as long as it is retained.
    assert harness.pool.get("a").state is State.DONE
    assert enqueue(harness.client, {"id": "a", "payload": ""}).status_code == 409


def test_a_queue_full_answer_counts_the_tasks_the_store_holds_waiting_not_this_process_s_bound():
    # Processes sharing a store hold more than a smaller bound during a rolling change of QUEUE_SIZE.
    from service.problems import submit_problem
    from workerpool import QueueFull

    problem = submit_problem(QueueFull(3, delayed=5, due_in=599.5, waiting=5))
    assert problem.detail == (
        "the queue is full (5 tasks waiting, 5 of them delayed; the first falls due in 600 s); retry later"
    )


def test_a_queue_full_of_delayed_tasks_says_so_and_when_a_place_can_free(clock):
    harness = make_harness(instant, clock=clock.time, queue_size=2)
    try:
        for task_id in ("a", "b"):
            assert enqueue(harness.client, {"id": task_id, "payload": "", "delay_ms": 600_000}).status_code == 202
        response = enqueue(harness.client, {"id": "refused", "payload": ""})
        assert response.status_code == 503
        assert response.get_json()["detail"] == (
            "the queue is full (2 tasks waiting, 2 of them delayed; the first falls due in 600 s); retry later"
        )
        assert response.headers["Retry-After"] == "600"  # no place frees before then
        batch = harness.client.post("/enqueue/batch", json={"tasks": [{"id": "c", "payload": ""}]}).get_json()
        assert batch["results"][0]["retry_after"] == 600
        # Health shows the places taken, as admission counts them: none of the tasks is due yet.
        health = harness.client.get("/healthz").get_json()
        assert (health["status"], health["queue_waiting"], health["queue_capacity"], health["queue_depth"]) == (
            "ok",
            2,
            2,
            0,
        )
    finally:
        harness.pool.shutdown(timeout=0)  # the delayed tasks never fall due on the test's clock


def test_a_full_queue_is_503_with_retry_after(gate):
    harness = make_harness(gate, workers=1, queue_size=1)
    try:
        assert enqueue(harness.client, {"id": "running", "payload": ""}).status_code == 202
        gate.wait_started()  # the worker holds "running"; the queue is empty
        assert enqueue(harness.client, {"id": "waiting", "payload": ""}).status_code == 202
        response = enqueue(harness.client, {"id": "refused", "payload": ""})
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "1"
        assert response.get_json()["type"] == "urn:workerpool:problem:queue-full"
        assert harness.pool.get("refused") is None
    finally:
        gate.open()
        harness.drain()
    assert harness.pool.get("waiting").state is State.DONE


def test_enqueue_after_shutdown_began_is_503_unless_other_processes_share_the_store(harness):
    harness.drain()
    response = enqueue(harness.client, {"id": "late", "payload": ""})
    if harness.pool.store.shared:  # stored for the other processes (or the next start), as queued tasks are
        assert response.status_code == 202
        assert harness.pool.get("late").state is State.QUEUED
        assert harness.client.get("/healthz").get_json()["status"] == "draining"
        return
    assert response.status_code == 503
    # Retried on a new connection: under gunicorn, after a reload, one that a serving worker takes.
    assert response.headers["Retry-After"] == "1"
    assert response.headers["Connection"] == "close"
    assert response.get_json()["type"] == "urn:workerpool:problem:shutting-down"


# -- GET /tasks/<id> -------------------------------------------------------------


def test_a_task_reports_its_progress():
    harness = make_harness(failing, clock=lambda: EPOCH)
    assert enqueue(harness.client, {"id": "a", "payload": "", "max_retries": 1}).status_code == 202
    harness.drain()
    response = harness.client.get("/tasks/a")
    assert response.status_code == 200
    assert response.get_json() == {
        "id": "a",
        "state": "failed",
        "attempts": 2,
        "max_retries": 1,
        "last_error": "RuntimeError: boom",
        "result": None,
        "cancel_requested": False,
        "created_at": "2027-01-15T08:00:00.125Z",
        "started_at": "2027-01-15T08:00:00.125Z",
        "finished_at": "2027-01-15T08:00:00.125Z",
        "next_attempt_at": None,
    }


def test_a_queued_task_has_null_times(gate):
    harness = make_harness(gate, workers=1)
    try:
        enqueue(harness.client, {"id": "first", "payload": ""})
        gate.wait_started()
        enqueue(harness.client, {"id": "second", "payload": ""})
        first = harness.client.get("/tasks/first").get_json()
        second = harness.client.get("/tasks/second").get_json()
    finally:
        gate.open()
        harness.drain()
    assert (first["state"], first["attempts"]) == ("running", 1)
    assert first["started_at"] is not None
    assert first["finished_at"] is None
    assert (second["state"], second["attempts"], second["started_at"]) == ("queued", 0, None)


def test_a_permanent_failure_reports_its_error():
    harness = make_harness(failing_permanently)
    enqueue(harness.client, {"id": "a", "payload": "", "max_retries": 5})
    harness.drain()
    task = harness.client.get("/tasks/a").get_json()
    assert (task["state"], task["attempts"], task["last_error"]) == ("failed", 1, "PermanentFailure: bad payload")


def test_an_unknown_task_is_404(client):
    response = client.get("/tasks/nope")
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"] == "urn:workerpool:problem:task-not-found"
    assert "'nope'" in problem["detail"]


def test_an_evicted_task_is_404():
    harness = make_harness(instant, state_max_tasks=1)
    for task_id in ("old", "new"):
        enqueue(harness.client, {"id": task_id, "payload": ""})
    harness.drain()
    assert harness.client.get("/tasks/old").status_code == 404
    assert harness.client.get("/tasks/new").status_code == 200


# -- GET /tasks ------------------------------------------------------------------


@pytest.fixture
def finished_harness():
    """Tasks t0..t5: even ones done, odd ones failed."""

    def handler(task, cancel):
        if int(task.id[1:]) % 2:
            raise RuntimeError("odd")

    harness = make_harness(handler, queue_size=10)
    for n in range(6):
        assert enqueue(harness.client, {"id": f"t{n}", "payload": "", "max_retries": 0}).status_code == 202
    harness.drain()
    return harness


@pytest.mark.parametrize(
    ("query", "ids"),
    [
        ("", ["t5", "t4", "t3", "t2", "t1", "t0"]),
        ("?limit=2", ["t5", "t4"]),
        ("?state=done", ["t4", "t2", "t0"]),
        ("?state=failed&limit=1", ["t5"]),
        ("?state=queued", []),
        ("?state=running", []),
        ("?limit=1000", ["t5", "t4", "t3", "t2", "t1", "t0"]),
    ],
)
def test_list_tasks_newest_first(finished_harness, query, ids):
    response = finished_harness.client.get(f"/tasks{query}")
    assert response.status_code == 200
    body = response.get_json()
    assert [task["id"] for task in body["tasks"]] == ids
    assert body["count"] == len(ids)
    assert all(set(task) == TASK_FIELDS for task in body["tasks"])


def test_list_tasks_defaults_to_100():
    harness = make_harness(instant, queue_size=200)
    for n in range(101):
        enqueue(harness.client, {"id": str(n), "payload": ""})
    harness.drain()
    body = harness.client.get("/tasks").get_json()
    assert (body["count"], body["limit"], body["tasks"][0]["id"]) == (100, 100, "100")


def test_list_tasks_pages_on_past_the_largest_limit_to_the_oldest_task():
    harness = make_harness(instant, queue_size=1100)
    for n in range(1001):
        enqueue(harness.client, {"id": str(n), "payload": ""})
    harness.drain()
    first = harness.client.get("/tasks?limit=1000").get_json()
    assert [task["id"] for task in first["tasks"]] == [str(n) for n in range(1000, 0, -1)]
    second = harness.client.get(f"/tasks?limit=1000&cursor={first['next']}").get_json()
    assert ([task["id"] for task in second["tasks"]], second["next"]) == (["0"], None)
    assert harness.client.get("/tasks?limit=1001").status_code == 400


def test_list_tasks_leaves_results_out_when_asked():
    harness = make_harness(lambda task, cancel: {"echo": task.id * 1000}, queue_size=10)
    for task_id in ("a", "b"):
        enqueue(harness.client, {"id": task_id, "payload": ""})
    harness.drain()
    full = harness.client.get("/tasks?state=done&results=true").get_json()
    assert [task["result"] for task in full["tasks"]] == [{"echo": "b" * 1000}, {"echo": "a" * 1000}]
    assert harness.client.get("/tasks?state=done").get_json() == full
    for query in ("?results=false", "?state=done&results=false&limit=2"):
        brief = harness.client.get(f"/tasks{query}").get_json()
        assert [set(task) for task in brief["tasks"]] == [TASK_FIELDS - {"result"}] * 2
        assert brief["tasks"] == [{k: v for k, v in task.items() if k != "result"} for task in full["tasks"]]
    assert harness.client.get("/tasks/a").get_json()["result"] == {"echo": "a" * 1000}


@pytest.mark.parametrize(
    ("query", "errors"),
    [
        ("?results=False", [("results", "must be true or false")]),
        ("?results=0", [("results", "must be true or false")]),
        ("?results=", [("results", "must be true or false")]),
        ("?results=false&results=false", [("results", "must be given at most once")]),
        ("?state=bogus", [("state", "must be one of queued, running, done, failed, cancelled")]),
        ("?state=", [("state", "must be one of queued, running, done, failed, cancelled")]),
        ("?state=DONE", [("state", "must be one of queued, running, done, failed, cancelled")]),
        ("?limit=0", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=1001", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=-1", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=1.5", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=ten", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=", [("limit", "must be an integer from 1 to 1000")]),
        ("?limit=%D9%A3", [("limit", "must be an integer from 1 to 1000")]),  # Arabic-Indic digit three
        ("?status=done", [("status", "is not a known parameter")]),
        ("?state=done&state=failed", [("state", "must be given at most once")]),
        (
            "?state=x&limit=0&page=2",
            [
                ("page", "is not a known parameter"),
                ("state", "must be one of queued, running, done, failed, cancelled"),
                ("limit", "must be an integer from 1 to 1000"),
            ],
        ),
    ],
)
def test_list_tasks_refuses_bad_parameters(client, query, errors):
    response = client.get(f"/tasks{query}")
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    assert [(e["field"], e["message"]) for e in response.get_json()["errors"]] == errors


# -- GET /healthz, /health -------------------------------------------------------


@pytest.mark.parametrize("path", ["/healthz", "/health"])
def test_health_reports_the_pool(gate, path):
    harness = make_harness(gate, workers=1, queue_size=3)
    try:
        enqueue(harness.client, {"id": "a", "payload": ""})
        gate.wait_started()
        enqueue(harness.client, {"id": "b", "payload": ""})
        response = harness.client.get(path)
    finally:
        gate.open()
        harness.drain()
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ok",
        "workers": 1,
        "queue_capacity": 3,
        "queue_waiting": 1,
        "queue_depth": 1,
        "retries_pending": 0,
        "stuck_threads": 0,
        "stuck_threads_limit": 1,
        "tasks": {"queued": 1, "running": 1, "done": 0, "failed": 0, "cancelled": 0},
    }


@pytest.mark.parametrize("path", ["/healthz", "/health"])
def test_health_is_503_once_shutdown_began(harness, path):
    enqueue(harness.client, {"id": "a", "payload": ""})
    harness.drain()
    response = harness.client.get(path)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"  # as every 503 of the service
    body = response.get_json()
    assert body["status"] == "draining"
    assert body["tasks"]["done"] == 1


def test_liveness_stays_200_while_draining(harness):
    # A draining process ends by itself: a liveness probe failing then would kill it before its drain ends.
    harness.drain()
    response = harness.client.get("/livez")
    assert (response.status_code, response.get_json()) == (
        200,
        {"status": "ok", "stuck_threads": 0, "stuck_threads_limit": harness.pool.workers},
    )


def test_health_answers_head(client):
    response = client.head("/healthz")
    assert response.status_code == 200
    assert response.data == b""


@given(
    task_id=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40),
    script_name=st.sampled_from(["", "/", "/app", "/app/", "/caf%C3%A9"]),
)
@settings(max_examples=200, deadline=None)
def test_the_location_of_a_task_is_what_url_for_builds(task_id, script_name):
    from flask import request, url_for

    from service.api import task_url

    with _location_app().test_request_context("/enqueue", method="POST", environ_base={"SCRIPT_NAME": script_name}):
        expected = url_for("api.get_task", task_id=task_id)
        assert task_url(task_id) == expected
        assert task_url(task_id, request.root_path) == expected  # the batch reads the root once per request


@functools.cache
def _location_app():
    return make_harness(instant).app


@given(
    task_id=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=40),
    root=st.sampled_from(["", "/app", "/caf\u00e9", "/a b", "//twice", "/100%", "/q?x"]),
)
@settings(max_examples=200, deadline=None)
def test_the_location_header_of_a_202_is_what_werkzeug_would_send(task_id, root):
    from flask import request
    from werkzeug.urls import iri_to_uri

    from service.api import accepted, task_url

    location = task_url(task_id, root)
    with _location_app().test_request_context("/enqueue", method="POST"):
        _, status, headers = accepted({"id": task_id}, location).get_wsgi_response(request.environ)
    assert status == "202 ACCEPTED"
    assert dict(headers)["Location"] == iri_to_uri(location)  # what werkzeug's own pass would send


def test_the_202_body_is_the_task_in_utf_8_json(client):
    response = enqueue(client, {"id": "ünï-1", "payload": "x", "max_retries": 2})
    assert response.status_code == 202
    assert response.headers["Content-Length"] == str(len(response.data))
    assert response.data.endswith(b"\n")  # as jsonify ends every other JSON body
    task = json.loads(response.data.decode("utf-8"))
    assert set(task) == TASK_FIELDS
    assert (task["id"], task["max_retries"], task["state"]) == ("ünï-1", 2, "queued")
