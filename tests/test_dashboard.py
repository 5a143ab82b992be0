"""The dashboard's routes: the page and its files, and the live figures it polls."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from doubles import FakeClock
from http_fixtures import TEST_CONFIG, WAIT_S, Gate, instant, make_harness

from app import create_app
from service.dashboard import CONTENT_SECURITY_POLICY
from service.live import LiveFigures
from service.metrics import Metrics
from workerpool import WorkerPool

FILES = {
    "/dashboard": "text/html",
    "/dashboard/dashboard.js": "text/javascript",
    "/dashboard/dashboard.css": "text/css",
}


@pytest.fixture
def harness():
    harness = make_harness()
    yield harness
    harness.pool.shutdown(WAIT_S)


@pytest.mark.parametrize("path", FILES)
def test_the_page_and_its_files_are_served_with_a_strict_policy(harness, path):
    response = harness.client.get(path)
    assert response.status_code == 200
    assert response.mimetype == FILES[path]
    assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # Revalidated on each load, and answered 304 when unchanged.
    assert response.headers["Cache-Control"] == "no-cache"
    again = harness.client.get(path, headers={"If-None-Match": response.headers["ETag"]})
    assert again.status_code == 304


def test_the_page_loads_nothing_from_elsewhere(harness):
    html = harness.client.get("/dashboard").get_data(as_text=True)
    assert "<script>" not in html and "style=" not in html  # inline code would need a weaker policy
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html
    script = harness.client.get("/dashboard/dashboard.js").get_data(as_text=True)
    assert "innerHTML" not in script  # task ids and errors come from clients: set as text only


def test_the_live_figures_are_those_of_the_health_check(harness):
    gate = Gate()
    harness = make_harness(gate, workers=1, queue_size=4)
    try:
        for task_id in ("a", "b", "c"):
            assert harness.client.post("/enqueue", json={"id": task_id, "payload": ""}).status_code == 202
        gate.wait_started()
        live = harness.client.get("/dashboard/live").get_json()
        health = harness.client.get("/healthz").get_json()
        for name in ("status", "workers", "queue_capacity", "queue_waiting", "queue_depth", "retries_pending", "tasks"):
            assert live[name] == health[name], name
        assert (live["busy_workers"], live["queue_depth"], live["store"]) == (1, 2, "memory")
        assert live["token_required"] is False
        assert live["pid"] == os.getpid()
    finally:
        gate.open()
        harness.drain()


def test_the_series_are_fed_by_the_pool_of_the_app():
    clock = FakeClock(1_800_000_000.5)
    live = LiveFigures(window_s=60, clock=clock.time)
    metrics = Metrics()
    pool = WorkerPool(instant, threads=False, observers=[metrics, live])
    client = create_app(TEST_CONFIG, pool=pool, metrics=metrics, live=live).test_client()
    assert client.post("/enqueue", json={"id": "x", "payload": ""}).status_code == 202
    assert pool.step()
    clock.advance(1)  # the second of the submission is complete
    series = client.get("/dashboard/live").get_json()["series"]
    assert (series["accepted"][-1], series["done"][-1]) == (1, 1)
    assert len(series["accepted"]) == 60


def test_create_app_wires_the_figures_to_the_pool_it_builds():
    clock = FakeClock(1_800_000_000.5)
    app = create_app(dataclasses.replace(TEST_CONFIG, workers=1), live=LiveFigures(clock=clock.time))
    client = app.test_client()
    try:
        assert client.post("/enqueue", json={"id": "x", "payload": ""}).status_code == 202
        clock.advance(1)
        assert client.get("/dashboard/live").get_json()["series"]["accepted"][-1] == 1
    finally:
        app.extensions["workerpool"].pool.shutdown(WAIT_S)


def test_with_a_token_the_page_and_figures_stay_open_and_the_tasks_do_not():
    harness = make_harness(config=dataclasses.replace(TEST_CONFIG, api_token="dashboard-t0ken-0123456789"))
    try:
        for path in (*FILES, "/dashboard/live"):
            assert harness.client.get(path).status_code == 200, path
        assert harness.client.get("/dashboard/live").get_json()["token_required"] is True
        assert harness.client.get("/tasks").status_code == 401
    finally:
        harness.pool.shutdown(WAIT_S)


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_every_text_colour_keeps_a_contrast_of_at_least_4_5_to_1(harness):
    css = harness.client.get("/dashboard/dashboard.css").get_data(as_text=True)
    colours = dict(re.findall(r"--([a-z]+): (#[0-9a-f]{6});", css))
    backgrounds = (colours.pop("panel"), "#ffffff")
    colours.pop("line")  # borders and grid lines, not text
    assert {"text", "muted", "accent", "done", "failed", "cancelled"} <= set(colours)
    for name, colour in colours.items():
        for background in backgrounds:
            lighter, darker = sorted((_luminance(colour), _luminance(background)), reverse=True)
            assert (lighter + 0.05) / (darker + 0.05) >= 4.5, (name, colour, background)  # WCAG 2 AA


@pytest.mark.parametrize(("stuck", "status"), [(0, "ok"), (1, "ok"), (2, "unhealthy")])
def test_the_live_figures_keep_to_the_served_description(harness, monkeypatch, stuck, status):
    # "unhealthy" (more stuck threads than get a replacement) was missing from the described statuses.
    from jsonschema import Draft202012Validator
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    stats = WorkerPool.stats
    monkeypatch.setattr(
        WorkerPool, "stats", lambda pool: dataclasses.replace(stats(pool), stuck_threads=stuck, stuck_threads_limit=1)
    )
    body = harness.client.get("/dashboard/live").get_json()
    assert body["status"] == status
    spec = Resource(contents=harness.client.get("/openapi.json").get_json(), specification=DRAFT202012)
    schema = {"$ref": "urn:openapi#/components/schemas/DashboardLive"}
    validator = Draft202012Validator(schema, registry=Registry().with_resource("urn:openapi", spec))
    assert [error.message for error in validator.iter_errors(body)] == []
