"""A client generated from the served OpenAPI document by openapi-python-client reads every answer of the API."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import httpx
import pytest
from http_fixtures import TEST_CONFIG, Gate, make_harness

from service.openapi import openapi_spec

pytestmark = pytest.mark.slow

TOKEN = "generated-client-token-0123"
CONFIG = dataclasses.replace(TEST_CONFIG, api_token=TOKEN)
PACKAGE = "workerpool_generated_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The client package generated from this instance's /openapi.json, imported."""
    root = tmp_path_factory.mktemp("generated")
    spec = root / "openapi.json"
    spec.write_text(json.dumps(openapi_spec(CONFIG)))
    settings = root / "generator.json"
    settings.write_text(json.dumps({"post_hooks": []}))  # no formatter run: ruff's version is ours to pin
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "openapi_python_client",
            "generate",
            "--path",
            str(spec),
            "--meta",
            "none",
            "--output-path",
            str(root / PACKAGE),
            "--config",
            str(settings),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout, result.stdout  # a skipped operation or model would hide here
    sys.path.insert(0, str(root))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name.split(".")[0] == PACKAGE]:
            del sys.modules[name]


def client_for(generated, app, *, token: str | None = TOKEN):
    """A generated client talking HTTP to ``app`` in-process through httpx's WSGI transport."""
    options = {"base_url": "http://workerpool.test", "httpx_args": {"transport": httpx.WSGITransport(app=app)}}
    if token is None:
        return generated.Client(**options)
    return generated.AuthenticatedClient(token=token, **options)


def api(generated, operation: str):
    return importlib.import_module(f"{PACKAGE}.api.default.{operation}")


def test_every_documented_answer_reads_back_through_the_generated_client(generated):
    models = importlib.import_module(f"{PACKAGE}.models")
    enqueue, get_task, list_tasks = api(generated, "enqueue"), api(generated, "get_task"), api(generated, "list_tasks")
    harness = make_harness(config=CONFIG, queue_size=10)
    client = client_for(generated, harness.app)

    accepted = enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="job-1", payload="p"))
    assert accepted.status_code == 202
    assert isinstance(accepted.parsed, models.Task) and accepted.parsed.id == "job-1"
    harness.final.wait("job-1")

    read = get_task.sync_detailed("job-1", client=client)
    assert read.status_code == 200 and read.parsed.state == models.State.DONE
    listed = list_tasks.sync_detailed(client=client)
    assert listed.status_code == 200 and [task.id for task in listed.parsed.tasks] == ["job-1"]

    problems = {
        400: enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="", payload="p")),
        401: enqueue.sync_detailed(
            client=client_for(generated, harness.app, token=None), body=models.EnqueueRequest(id="x", payload="p")
        ),
        404: get_task.sync_detailed("missing", client=client),
        409: enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="job-1", payload="p")),
        413: enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="big", payload="x" * 2000)),
    }
    kinds = {}
    for status, response in problems.items():
        assert response.status_code == status
        assert isinstance(response.parsed, models.Problem), (status, response.content)
        assert response.parsed.status == status
        kinds[status] = str(response.parsed.type_)
    assert kinds == {
        400: "urn:workerpool:problem:invalid-request",
        401: "urn:workerpool:problem:unauthorized",
        404: "urn:workerpool:problem:task-not-found",
        409: "urn:workerpool:problem:duplicate-task",
        413: "about:blank",
    }
    harness.drain()


def test_a_full_queue_and_shutdown_read_back_as_503_problems(generated):
    models = importlib.import_module(f"{PACKAGE}.models")
    enqueue, health = api(generated, "enqueue"), api(generated, "health")
    gate = Gate()
    harness = make_harness(gate, config=CONFIG, queue_size=1)
    client = client_for(generated, harness.app)
    assert enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="running", payload="")).status_code == 202
    gate.wait_started()
    assert enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="queued", payload="")).status_code == 202

    full = enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="refused", payload=""))
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
    assert str(full.parsed.type_) == "urn:workerpool:problem:queue-full"

    gate.open()
    harness.drain()
    closed = enqueue.sync_detailed(client=client, body=models.EnqueueRequest(id="late", payload=""))
    assert closed.status_code == 503 and str(closed.parsed.type_) == "urn:workerpool:problem:shutting-down"
    draining = health.sync_detailed(client=client)
    assert draining.status_code == 503 and draining.parsed.status == models.HealthStatus.DRAINING
