"""Paths and methods no route takes: problem documents, never a redirect or an empty page."""

from __future__ import annotations

import pytest
from http_fixtures import make_harness


@pytest.mark.parametrize("path", ["/tasks//x", "/tasks/a//b", "//healthz"])
def test_a_double_slash_is_not_redirected_with_the_clients_host(path):
    # An id never contains "//", so such a path names nothing: 404, like any unknown route.
    client = make_harness().client
    response = client.get(path, headers={"Host": "attacker.example"})
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    assert "Location" not in response.headers
    assert "attacker.example" not in response.get_data(as_text=True)


@pytest.mark.parametrize(
    ("path", "allowed"),
    [("/enqueue", {"POST"}), ("/tasks/x", {"DELETE", "GET", "HEAD"}), ("/healthz", {"GET", "HEAD"})],
)
def test_options_is_a_405_problem_listing_the_methods(path, allowed):
    response = make_harness().client.options(path)
    assert response.status_code == 405
    assert response.mimetype == "application/problem+json"
    assert set(response.headers["Allow"].split(", ")) == allowed


UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket"}


def test_a_request_asking_for_an_upgrade_is_answered_over_http():
    # The service upgrades no connection and may ignore Upgrade (RFC 9110 §7.8): werkzeug matched such a
    # request against websocket routes only and answered a generic 400 naming nothing, a valid task too.
    harness = make_harness()
    assert harness.client.get("/healthz", headers=UPGRADE).status_code == 200
    response = harness.client.post("/enqueue", json={"id": "a", "payload": ""}, headers=UPGRADE)
    assert response.status_code == 202, response.get_json()
    assert harness.client.get("/tasks/nope", headers=UPGRADE).status_code == 404
    harness.pool.shutdown(0)
