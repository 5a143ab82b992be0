"""The RQ reference for POST /enqueue: a bare Flask endpoint that checks the task and enqueues it with RQ.

``RQ_REDIS_URL=redis://... gunicorn -c bench/hello.conf.py bench.rq_app:app``: what users write instead
of running this service, on the same Redis (figure 9a).
"""

from __future__ import annotations

import os

from flask import Flask, jsonify, request
from redis import Redis
from rq import Queue

app = Flask(__name__)
queue = Queue("bench", connection=Redis.from_url(os.environ["RQ_REDIS_URL"]))


def noop(payload: str) -> None:
    """The job: nothing."""


@app.post("/enqueue")
def enqueue():
    """Check the three fields as bench/bare_flask.py does, enqueue the job under the task's id, answer 202."""
    body = request.get_json(force=True, silent=True)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("id"), str)
        or not isinstance(body.get("payload"), str)
        or not isinstance(body.get("max_retries", 0), int)
    ):
        return jsonify({"error": "invalid task"}), 400
    job = queue.enqueue(noop, body["payload"], job_id=body["id"])
    return jsonify({"id": job.id, "state": "queued"}), 202
