"""Serve the app under a root path (``SCRIPT_NAME``) on the development server, as gunicorn does.

gunicorn reads ``SCRIPT_NAME`` from the environment and serves the app under
it: a request path must begin with it (compared raw, still percent-encoded),
which moves from ``PATH_INFO`` to ``SCRIPT_NAME``; any other path is a 404
(see ``service/gunicorn_worker.py``). ``python app.py`` serves through
Werkzeug's server, which knows nothing of it: this middleware does the same.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from .problems import PROBLEM_JSON, problem_document
from .request_id import HEADER as REQUEST_ID_HEADER
from .request_id import new_id

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def under_root_path(app: WSGIApp, root: str) -> WSGIApp:
    """``app`` served under ``root`` (a checked ``SCRIPT_NAME``: only characters a path carries unencoded)."""
    detail = f"nothing is served at this path: every path of this server begins with {root!r}"
    body = json.dumps(problem_document(404, detail)).encode()

    def served(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        raw_path = environ.get("RAW_URI", environ.get("PATH_INFO", "")).partition("?")[0]
        if not raw_path.startswith(root):
            headers = [("Content-Type", PROBLEM_JSON), ("Content-Length", str(len(body)))]
            start_response("404 NOT FOUND", [*headers, (REQUEST_ID_HEADER, new_id())])
            return [body]
        # root holds no escaped character: the decoded PATH_INFO begins with it as the raw path does.
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = root, environ["PATH_INFO"][len(root) :]
        return app(environ, start_response)

    return served
