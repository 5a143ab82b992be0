"""The bare Flask reference for POST /enqueue: one route, no pool, no logging, ids, metrics or problems.

``gunicorn -c bench/hello.conf.py bench.bare_flask:app``: what Flask and gunicorn alone cost
for a request shaped like a task submission, the floor the service is measured against.
"""

from __future__ import annotations

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.post("/enqueue")
def enqueue():
    """Check the three fields and answer 202, as a minimal Flask app would."""
    body = request.get_json(force=True, silent=True)
    if (
        not isinstance(body, dict)
        or not isinstance(body.get("id"), str)
        or not isinstance(body.get("payload"), str)
        or not isinstance(body.get("max_retries", 0), int)
    ):
        return jsonify({"error": "invalid task"}), 400
    return jsonify({"id": body["id"], "state": "queued"}), 202
