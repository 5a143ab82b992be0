"""Requests that change tasks, sent by a page of another origin (Sec-Fetch-Site, else Origin), are refused with 403."""

from __future__ import annotations

import json

import pytest
from http_fixtures import make_harness

REFUSED = ("cross-site", "same-site", " Cross-Site ")  # another port of localhost is another origin of the same site
SERVED = (None, "same-origin", "none")  # the dashboard's requests, the user's own, clients that are not browsers


def _headers(site: str | None) -> dict[str, str]:
    return {} if site is None else {"Sec-Fetch-Site": site}


@pytest.mark.parametrize("site", REFUSED)
def test_a_submission_from_a_page_of_another_origin_is_refused_unread(site):
    # A page the user opened could submit tasks (a simple POST: text/plain, no preflight), without API_TOKEN.
    harness = make_harness()
    client = harness.client
    for path, body in (("/enqueue", b'{"id": "a", "payload": 1}'), ("/enqueue/batch", b'{"tasks": [{"id": "b"}]}')):
        response = client.post(path, data=body, headers={**_headers(site), "Content-Type": "text/plain"})
        assert (response.status_code, response.mimetype) == (403, "application/problem+json"), path
        assert f"Sec-Fetch-Site: {site.strip().lower()}" in response.get_json()["detail"]
        assert response.headers["Connection"] == "close"  # the body was not read
    assert client.get("/tasks/a").status_code == 404 and client.get("/tasks/b").status_code == 404
    samples = client.get("/metrics").text
    assert 'workerpool_tasks_rejected_total{reason="unauthorized"} 2.0' in samples
    harness.drain()


@pytest.mark.parametrize("site", REFUSED)
def test_a_cancel_from_a_page_of_another_origin_is_refused_and_reads_are_answered(site):
    harness = make_harness()
    client = harness.client
    assert client.post("/enqueue", json={"id": "a", "payload": 1, "delay_ms": 60_000}).status_code == 202
    assert client.delete("/tasks/a", headers=_headers(site)).status_code == 403
    # A read changes nothing, and without CORS the page cannot read the answer.
    assert client.get("/tasks/a", headers=_headers(site)).get_json()["state"] == "queued"
    assert client.get("/tasks", headers=_headers(site)).status_code == 200
    assert client.delete("/tasks/a").status_code == 200  # by a client that is no browser
    harness.drain()


@pytest.mark.parametrize("site", SERVED)
def test_requests_of_the_service_s_own_pages_and_of_other_clients_are_served(site):
    harness = make_harness()
    client = harness.client
    assert client.post("/enqueue", json={"id": "a", "payload": 1}, headers=_headers(site)).status_code == 202
    batch = client.post("/enqueue/batch", json={"tasks": [{"id": "b", "payload": 1}]}, headers=_headers(site))
    assert batch.status_code == 200 and batch.get_json()["results"][0]["status"] == 202
    assert client.delete("/tasks/a", headers=_headers(site)).status_code in (200, 409)
    harness.drain()


# Over plain http to an address that is not a loopback one, browsers send no Sec-Fetch-Site, only the page's Origin.
SERVICE = "http://192.0.2.2:18609"
FOREIGN_ORIGINS = (
    "http://127.0.0.1:18698",  # a page served on this machine
    "http://192.0.2.2:18698",  # another port of the service's own host
    "http://192.0.2.2",
    "https://evil.example",
    "null",  # a sandboxed frame, a file:// page
    "http://192.0.2.2:18609, http://evil.example",
    "",
)


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
def test_without_fetch_metadata_a_change_from_a_page_of_another_origin_is_refused_unread(origin):
    harness = make_harness()
    client = harness.client
    headers = {"Origin": origin, "Content-Type": "text/plain"}
    for path, body in (("/enqueue", b'{"id": "a", "payload": 1}'), ("/enqueue/batch", b'{"tasks": [{"id": "b"}]}')):
        response = client.post(path, data=body, headers=headers, base_url=SERVICE)
        assert (response.status_code, response.mimetype) == (403, "application/problem+json"), path
        said = f'(its Origin {json.dumps(origin)} does not match its Host "192.0.2.2:18609")'
        assert said in response.get_json()["detail"]
        assert response.headers["Connection"] == "close"  # the body was not read
    assert client.get("/tasks/a", base_url=SERVICE).status_code == 404
    assert client.post("/enqueue", json={"id": "c", "payload": 1, "delay_ms": 60_000}).status_code == 202
    assert client.delete("/tasks/c", headers={"Origin": origin}, base_url=SERVICE).status_code == 403
    assert client.get("/tasks/c", headers={"Origin": origin}, base_url=SERVICE).get_json()["state"] == "queued"
    assert client.delete("/tasks/c", base_url=SERVICE).status_code == 200  # by a client that is no browser
    harness.drain()


def test_a_refusal_by_origin_names_what_it_compared_quoted_and_cut_short():
    # A proxy rewriting Host without X-Forwarded-Host is told apart from a foreign page by what the detail shows.
    harness = make_harness()
    client = harness.client
    origin = 'http://evil.example/"\x1b[2J' + "x" * 300
    headers = {"Origin": origin, "X-Forwarded-Host": "public.example:8080\x7f"}
    response = client.post("/enqueue", json={"id": "a", "payload": 1}, headers=headers, base_url=SERVICE)
    assert response.status_code == 403
    detail = response.get_json()["detail"]
    shown = json.dumps(origin[:100])
    assert f"its Origin {shown}... ({len(origin)} characters) matches neither its Host " in detail
    assert 'its Host "192.0.2.2:18609" nor its X-Forwarded-Host "public.example:8080\\u007f")' in detail
    assert "\x1b" not in detail and "\x7f" not in detail and "x" * 101 not in detail
    assert detail.isascii() and detail.isprintable()
    harness.drain()


@pytest.mark.parametrize(
    ("origin", "base_url", "headers"),
    [
        ("http://192.0.2.2:18609", SERVICE, {}),  # the dashboard's own requests
        ("http://SVC.example", "http://svc.example", {}),
        ("http://svc.example", "http://svc.example", {"Host": "svc.example:80"}),  # the default port written out
        ("https://svc.example", "http://svc.example", {}),  # a proxy that terminates TLS and keeps Host
        ("http://public.example:8080", "http://workerpool:8080", {"X-Forwarded-Host": "public.example:8080"}),
        ("http://[2001:db8::2]:8080", "http://[2001:db8::2]:8080", {}),
        # Where the browser says where the request comes from, that is taken (a proxy rewriting Host, over https).
        ("https://public.example", "http://workerpool:8080", {"Sec-Fetch-Site": "same-origin"}),
    ],
)
def test_a_change_from_the_service_s_own_page_is_served_without_fetch_metadata(origin, base_url, headers):
    harness = make_harness()
    client = harness.client
    sent = {"headers": {"Origin": origin, **headers}, "base_url": base_url}
    assert client.post("/enqueue", json={"id": "a", "payload": 1}, **sent).status_code == 202
    batch = client.post("/enqueue/batch", json={"tasks": [{"id": "b", "payload": 1}]}, **sent)
    assert batch.status_code == 200 and batch.get_json()["results"][0]["status"] == 202
    assert client.delete("/tasks/a", **sent).status_code in (200, 409)
    harness.drain()
