"""The dashboard: one page with its script and style, and the live figures it polls once a second.

The page holds no data: it reads the task endpoints with the token the
operator gives it, so a token instance shows nothing of its tasks without
it. The live figures are aggregates only, the same kind as /healthz and
/metrics, and like them open without a token (a monitoring screen can show
them); ``token_required`` tells the page to ask for the token.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

from flask import Blueprint, Response, jsonify, request

from workerpool import State, StoreUnavailable

from .api import health_figures, why_store_fails
from .context import services

STATIC = Path(__file__).resolve().parent / "static"
# Everything comes from this service (the empty icon is a data: URL); no inline script or style,
# no frames, no form posts elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

bp = Blueprint("dashboard", __name__)


@bp.after_request
def _protect(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@functools.cache
def _read(name: str) -> tuple[bytes, str]:
    """A static file's bytes and their ETag, read once per process (the files are a few kilobytes)."""
    data = (STATIC / name).read_bytes()
    return data, hashlib.sha256(data).hexdigest()[:32]


def _static(name: str, mimetype: str) -> Response:
    data, etag = _read(name)
    response = Response(data, mimetype=mimetype)
    # Revalidated on every load: a new release's page never runs an old script.
    response.headers["Cache-Control"] = "no-cache"
    response.set_etag(etag)
    return response.make_conditional(request)


@bp.get("/dashboard")
def page() -> Response:
    """Serve the dashboard page."""
    return _static("dashboard.html", "text/html")


@bp.get("/dashboard/dashboard.js")
def script() -> Response:
    """Serve the dashboard's script."""
    return _static("dashboard.js", "text/javascript")


@bp.get("/dashboard/dashboard.css")
def style() -> Response:
    """Serve the dashboard's style sheet."""
    return _static("dashboard.css", "text/css")


@bp.get("/dashboard/live")
def live() -> Response:
    """Report the pool's figures now and per second over the last minutes."""
    svc = services()
    stats = svc.pool.stats()
    store_error = why_store_fails(svc.pool, stats)  # as /healthz
    if store_error is not None:
        raise StoreUnavailable(store_error)
    body = {
        **health_figures(stats),
        "busy_workers": stats.counts[State.RUNNING],
        "store": svc.config.store.kind,  # not its path: this endpoint is open
        "token_required": bool(svc.config.api_token),
        "series": svc.live.series(),
        # Under gunicorn -w N each worker process answers with its own figures: say whose these are.
        "pid": os.getpid(),
    }
    response = jsonify(body)
    response.headers["Cache-Control"] = "no-store"
    return response
