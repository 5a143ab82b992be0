"""Requests that change tasks, sent by a page of another origin (Sec-Fetch-Site), are refused with 403."""

from __future__ import annotations

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
