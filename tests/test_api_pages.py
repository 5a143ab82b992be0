"""GET /tasks in pages: the `next` cursor and `Link` header, walks while tasks arrive, and refused cursors."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import uuid
from urllib.parse import parse_qsl, urlsplit

import pytest
from http_fixtures import Gate, instant, make_harness
from redis_server import shared_server

from service.cursors import _check, _tag, make_cursor
from workerpool import State
from workerpool.stores.redis_store import RedisStore
from workerpool.stores.sqlite import SqliteStore

pytestmark = pytest.mark.usefixtures("harness_store")  # every test on every store


def enqueue(client, *ids):
    for task_id in ids:
        assert client.post("/enqueue", data=json.dumps({"id": task_id, "payload": ""})).status_code == 202


def walk(client, query, between=lambda: None):
    """The ids of every page of ``query``, following ``next``; ``between`` runs after each page."""
    pages, url = [], f"/tasks?{query}"
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        pages.append([task["id"] for task in body["tasks"]])
        assert body["count"] == len(body["tasks"])
        if body["next"] is None:
            assert "Link" not in response.headers
            return pages
        link = re.fullmatch(r'<([^>]+)>; rel="next"', response.headers["Link"])
        assert link is not None, response.headers["Link"]
        assert dict(parse_qsl(urlsplit(link[1]).query))["cursor"] == body["next"]
        url = link[1]  # the header's URL, as a client following links would
        between()


@pytest.fixture
def harness():
    harness = make_harness(instant, queue_size=100)
    yield harness
    harness.pool.shutdown(5)


def test_a_walk_lists_every_task_once_newest_first_while_tasks_are_added(harness):
    enqueue(harness.client, *(f"t{n}" for n in range(7)))
    added = iter(range(100, 110))
    pages = walk(harness.client, "limit=3", between=lambda: enqueue(harness.client, f"new{next(added)}"))
    assert pages == [["t6", "t5", "t4"], ["t3", "t2", "t1"], ["t0"]]  # the tasks added meanwhile shift nothing


def test_a_walk_by_state_keeps_the_listing_parameters_in_each_next_link(harness):
    enqueue(harness.client, *(f"t{n}" for n in range(5)))
    harness.final.wait(*(f"t{n}" for n in range(5)))
    pages = walk(harness.client, "state=done&results=false&limit=2")
    assert [i for page in pages for i in page] == [task.id for task in harness.pool.list(State.DONE)]
    response = harness.client.get("/tasks?state=done&results=false&limit=2")
    link = response.headers["Link"]
    assert dict(parse_qsl(urlsplit(link[1 : link.index(">")]).query)) == {
        "state": "done",
        "results": "false",
        "limit": "2",
        "cursor": response.get_json()["next"],
    }


def test_the_last_page_has_no_next(harness):
    enqueue(harness.client, "a", "b")
    body = harness.client.get("/tasks?limit=2").get_json()
    assert body["next"] is None and body["count"] == 2


def _cursor(harness, query="limit=1"):
    enqueue(harness.client, "a", "b", "c")
    cursor = harness.client.get(f"/tasks?{query}").get_json()["next"]
    assert cursor
    return cursor


def _refusal(client, query):
    response = client.get(f"/tasks?{query}")
    assert response.status_code == 400
    assert response.mimetype == "application/problem+json"
    return [(error["field"], error["message"]) for error in response.get_json()["errors"]]


def test_a_cursor_for_another_listing_is_refused_naming_it():
    gate = Gate()
    harness = make_harness(gate, queue_size=10)
    try:
        enqueue(harness.client, "a", "b", "c")
        gate.wait_started()  # a runs, b and c wait
        cursor = harness.client.get("/tasks?limit=1").get_json()["next"]
        queued = harness.client.get("/tasks?state=queued&limit=1").get_json()["next"]
        assert _refusal(harness.client, f"state=queued&cursor={cursor}") == [
            ("cursor", "was made for the listing of every task (no state): pass the same state with it")
        ]
        for query in (f"cursor={queued}", f"state=running&cursor={queued}"):
            assert _refusal(harness.client, query) == [
                ("cursor", "was made for the listing of state=queued: pass the same state with it")
            ]
        body = harness.client.get(f"/tasks?state=queued&limit=5&results=false&cursor={queued}").get_json()
        assert [task["id"] for task in body["tasks"]] == ["b"]  # any limit, with or without results
    finally:
        gate.open()
        harness.drain()


def _altered(cursor):
    raw = bytearray(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    raw[5] ^= 1  # one bit of the position
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda c: c[:-3], "was cut short or altered: copy the `next` of the page before, unchanged"),
        (_altered, "was cut short or altered: copy the `next` of the page before, unchanged"),
        (lambda c: "", "is not a cursor this service made: copy the `next` of the page before, unchanged"),
        (lambda c: c + "%2B", "is not a cursor this service made: copy the `next` of the page before, unchanged"),
        (lambda c: c + "==", "is not a cursor this service made: copy the `next` of the page before, unchanged"),
        (lambda c: "A" * 201, "is not a cursor this service made: copy the `next` of the page before, unchanged"),
        (lambda c: "AAAA", "was cut short or altered: copy the `next` of the page before, unchanged"),
    ],
)
def test_a_malformed_or_altered_cursor_is_refused_naming_it(harness, make, message):
    assert _refusal(harness.client, f"cursor={make(_cursor(harness))}") == [("cursor", message)]


def test_a_cursor_holding_no_position_of_this_store_is_refused_naming_it(harness):
    for position in [(1, 2, 3, 4, 5), ()]:  # made by this service's own code: only the store can tell
        cursor = make_cursor(None, position, harness.pool.store.position_key())
        assert _refusal(harness.client, f"cursor={cursor}") == [
            ("cursor", "is not a position in this service's task store: list from the first page again")
        ]


def test_a_repeated_or_bad_cursor_is_listed_with_the_other_bad_parameters(harness):
    cursor = _cursor(harness)
    assert _refusal(harness.client, f"limit=0&cursor={cursor}&cursor={cursor}") == [
        ("cursor", "must be given at most once"),
        ("limit", "must be an integer from 1 to 1000"),
    ]
    assert _refusal(harness.client, "state=bogus&cursor=x") == [  # the cursor is not read for no listing
        ("state", "must be one of queued, running, done, failed, cancelled")
    ]


def _shared_pools(kind, tmp_path):
    """Two pools on one store, as two processes (or instances) sharing it would be."""
    if kind == "sqlite":
        stores = [SqliteStore(tmp_path / "shared.db", capacity=100) for _ in range(2)]
    else:
        prefix = f"test-{uuid.uuid4().hex}"
        stores = [
            RedisStore(shared_server().client(), capacity=100, ttl=3600.0, max_finished=1000, prefix=prefix)
            for _ in range(2)
        ]
    return [make_harness(instant, store=store, queue_size=100) for store in stores]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_cursor_made_by_one_process_reads_the_next_page_in_another_sharing_the_store(kind, tmp_path, harness_store):
    if harness_store != "memory":
        pytest.skip("builds its own pools on their shared store: once is enough")
    first, second = _shared_pools(kind, tmp_path)
    try:
        enqueue(first.client, *(f"t{n}" for n in range(5)))
        cursor = first.client.get("/tasks?limit=2").get_json()["next"]
        enqueue(second.client, "later")
        body = second.client.get(f"/tasks?limit=2&cursor={cursor}").get_json()
        assert [task["id"] for task in body["tasks"]] == ["t2", "t1"]
        body = first.client.get(f"/tasks?limit=2&cursor={body['next']}").get_json()
        assert ([task["id"] for task in body["tasks"]], body["next"]) == (["t0"], None)
    finally:
        for harness in (first, second):
            harness.pool.shutdown(5)
            harness.pool.store.close()  # its connections, closed now rather than whenever collected


@pytest.mark.parametrize("body", [b"x", b'[1,"",Infinity]', b"\xff", b"[1,"])
def test_a_checked_cursor_that_holds_no_json_is_refused_naming_it(harness, body):
    key = harness.pool.store.position_key()  # only a process holding the store knows it
    cursor = base64.urlsafe_b64encode(_tag(key) + body + _check(body, key)).rstrip(b"=").decode()
    assert _refusal(harness.client, f"cursor={cursor}") == [
        ("cursor", "is not a cursor this service made: copy the `next` of the page before, unchanged")
    ]


ANOTHER_STORE = (
    "was made for another task store (another SQLite file, Redis database or prefix, the memory store"
    " before the service restarted, or an older release): list from the first page again"
)


def test_a_cursor_of_another_store_of_the_same_kind_is_refused_naming_it(harness):
    """Another memory store (the service before a restart, another instance) or SQLite file: same positions."""
    other = make_harness(instant, queue_size=100)
    try:
        enqueue(other.client, "x0", "x1", "x2")
        cursor = other.client.get("/tasks?limit=1").get_json()["next"]
        enqueue(harness.client, *(f"t{n}" for n in range(5)))
        assert _refusal(harness.client, f"limit=2&cursor={cursor}") == [("cursor", ANOTHER_STORE)]
        body = other.client.get(f"/tasks?limit=5&cursor={cursor}").get_json()
        assert [task["id"] for task in body["tasks"]] == ["x1", "x0"]
    finally:
        other.pool.shutdown(5)


def test_a_cursor_of_an_older_release_is_refused_naming_it(harness):
    enqueue(harness.client, "a", "b", "c")
    body = b'[1,"",2]'  # what the release before made, checked with the key it had in its source
    older = base64.urlsafe_b64encode(body + hashlib.blake2b(body, digest_size=8, key=OLD_KEY).digest())
    assert _refusal(harness.client, f"cursor={older.rstrip(b'=').decode()}") == [("cursor", ANOTHER_STORE)]


OLD_KEY = b"workerpool GET /tasks cursor"


def _store(kind, path, prefix):
    if kind == "sqlite":
        return SqliteStore(path, capacity=100)
    return RedisStore(shared_server().client(), capacity=100, ttl=3600.0, max_finished=1000, prefix=prefix)


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_a_cursor_of_another_shared_store_is_refused_and_one_of_a_store_opened_again_is_read(
    kind, tmp_path, harness_store
):
    if harness_store != "memory":
        pytest.skip("builds its own pools on their shared stores: once is enough")
    prefix = f"test-{uuid.uuid4().hex}"
    first, other = (make_harness(instant, store=_store(kind, tmp_path / f"{n}.db", f"{prefix}-{n}")) for n in "ab")
    try:
        enqueue(first.client, *(f"t{n}" for n in range(3)))
        enqueue(other.client, *(f"t{n}" for n in range(3)))
        cursor = first.client.get("/tasks?limit=1").get_json()["next"]
        assert _refusal(other.client, f"cursor={cursor}") == [("cursor", ANOTHER_STORE)]
    finally:
        for harness in (first, other):
            harness.pool.shutdown(5)
            harness.pool.store.close()
    again = make_harness(instant, store=_store(kind, tmp_path / "a.db", f"{prefix}-a"))
    try:
        body = again.client.get(f"/tasks?cursor={cursor}").get_json()  # the key is kept in the store
        assert [task["id"] for task in body["tasks"]] == ["t1", "t0"]
    finally:
        again.pool.shutdown(5)
        again.pool.store.close()
