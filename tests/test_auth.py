"""The optional bearer token: which endpoints it guards, what a refusal looks like, how it is compared."""

from __future__ import annotations

import dataclasses
import hmac
import re

import pytest
from http_fixtures import PROJECT_ROOT, TEST_CONFIG, make_harness

from service import auth

TOKEN = "s3cret-t0ken-0123456789"
GUARDED = [("POST", "/enqueue"), ("GET", "/tasks"), ("GET", "/tasks/a")]
OPEN = [("GET", "/healthz"), ("GET", "/health"), ("GET", "/livez"), ("GET", "/metrics"), ("GET", "/openapi.json")]
TASK = {"id": "a", "payload": ""}


@pytest.fixture
def harness():
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, api_token=TOKEN))
    yield harness
    harness.pool.shutdown(5)


def call(harness, method, path, authorization=None, **kwargs):
    headers = {} if authorization is None else {"Authorization": authorization}
    if method == "POST" and "data" not in kwargs:
        kwargs["json"] = TASK
    return harness.client.open(path, method=method, headers=headers, **kwargs)


@pytest.mark.parametrize(("method", "path"), GUARDED)
@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (None, auth.MISSING),
        ("", auth.MISSING),
        (f"Basic {TOKEN}", auth.MISSING),
        (TOKEN, auth.MISSING),
        ("Bearer", auth.MISSING),
        ("Bearer  ", auth.MISSING),
        ("Bearer wrong-token-0123456789", auth.WRONG),
        (f"Bearer {TOKEN}x", auth.WRONG),
        (f"Bearer {TOKEN[:-1]}", auth.WRONG),
        (f"Bearer {TOKEN.upper()}", auth.WRONG),
        (f"Bearer {TOKEN[:-1]}\u00e9", auth.WRONG),  # one latin-1 byte that is not ASCII
    ],
    ids=[
        *("absent", "empty", "basic", "no-scheme", "scheme-only", "blank"),
        *("wrong", "longer", "shorter", "case", "latin1"),
    ],
)
def test_a_guarded_endpoint_refuses_a_missing_or_wrong_token(harness, method, path, authorization, detail):
    response = call(harness, method, path, authorization)
    assert response.status_code == 401
    assert response.mimetype == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="workerpool"'
    assert response.get_json() == {
        "type": "urn:workerpool:problem:unauthorized",
        "title": "Unauthorized",
        "status": 401,
        "detail": detail,
    }
    assert TOKEN.encode() not in response.data
    assert harness.pool.get("a") is None


@pytest.mark.parametrize(("method", "path", "status"), [(m, p, s) for (m, p), s in zip(GUARDED, (202, 200, 200))])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_token_lets_the_request_through(harness, method, path, status, scheme):
    if path == "/tasks/a":
        assert call(harness, "POST", "/enqueue", f"Bearer {TOKEN}").status_code == 202
    assert call(harness, method, path, f"{scheme} {TOKEN}").status_code == status


def test_spaces_between_scheme_and_token_are_allowed(harness):
    assert call(harness, "GET", "/tasks", f"Bearer   {TOKEN}").status_code == 200


@pytest.mark.parametrize(("method", "path"), OPEN)
def test_health_metrics_and_the_description_stay_open(harness, method, path):
    assert call(harness, method, path).status_code == 200


def test_a_refused_request_is_not_read(harness):
    # An unknown client cannot make the service parse (or even receive the limit of) a body.
    response = call(harness, "POST", "/enqueue", data=b"x" * 10_000)
    assert response.status_code == 401


def test_the_token_is_compared_in_constant_time_as_bytes(harness, monkeypatch):
    compared = []
    compare_digest = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module service.bearer compares with
    assert call(harness, "GET", "/tasks", "Bearer nearly-the-t0ken-012").status_code == 401
    assert call(harness, "GET", "/tasks", f"Bearer {TOKEN}").status_code == 200
    assert compared == [(b"nearly-the-t0ken-012", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


@pytest.mark.parametrize("authorization", [None, "Bearer anything", "Basic dXNlcjpwYXNz"])
def test_without_a_configured_token_nothing_is_required(authorization):
    harness = make_harness()
    try:
        assert call(harness, "POST", "/enqueue", authorization).status_code == 202
        assert call(harness, "GET", "/tasks/a", authorization).status_code == 200
        assert call(harness, "GET", "/tasks", authorization).status_code == 200
    finally:
        harness.pool.shutdown(5)


def test_a_refused_submission_is_counted_as_unauthorized(harness):
    assert call(harness, "POST", "/enqueue").status_code == 401
    assert call(harness, "GET", "/tasks").status_code == 401  # not a submission: not counted
    metrics = harness.client.get("/metrics").get_data(as_text=True)
    assert 'workerpool_tasks_rejected_total{reason="unauthorized"} 1.0' in metrics
    assert 'workerpool_tasks_rejected_total{reason="invalid"} 0.0' in metrics
    assert "workerpool_tasks_accepted_total 0.0" in metrics


def test_env_example_names_every_endpoint_the_token_guards(harness):
    # It named three of the five: DELETE /tasks/<id> and POST /enqueue/batch read as open to anyone.
    guarded = set()
    for rule in harness.app.url_map.iter_rules():
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            if call(harness, method, re.sub(r"<[^>]*>", "a", rule.rule)).status_code == 401:
                guarded.add(f"{method} {re.sub(r'<[^>]*>', '<id>', rule.rule)}")
    assert {"POST /enqueue", "GET /tasks", "DELETE /tasks/<id>"} <= guarded
    lines = (PROJECT_ROOT / ".env.example").read_text().splitlines()
    end = next(n for n, line in enumerate(lines) if line.startswith("API_TOKEN="))
    start = end
    while lines[start - 1].startswith("#"):
        start -= 1
    comment = " ".join(lines[start:end])
    assert set(re.findall(r"\b(?:GET|POST|PUT|PATCH|DELETE) /[\w/<>]*\b>?", comment)) == guarded
