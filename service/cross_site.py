"""Requests that change tasks, sent by a page of another origin, are refused.

A browser lets any page send a simple request (a ``POST`` with a ``text/plain``
or form body, no preflight) to any address, the loopback one included, and the
service reads a body as JSON whatever its ``Content-Type``: without ``API_TOKEN``
a page the user opens could submit tasks to a service reachable from this
machine only. Browsers say where a request comes from (``Sec-Fetch-Site``,
Fetch Metadata): ``same-origin`` for the dashboard's own requests, ``none`` for
one the user made, ``same-site`` or ``cross-site`` for one a page of another
origin made (another port of ``localhost`` is another origin of the same site).
The service answers no CORS preflight, so no page of another origin has a use
for it anyway; clients that are not browsers send no such header.
"""

from __future__ import annotations

from typing import Any

from .problems import Problem

_FOREIGN = frozenset({"cross-site", "same-site"})
# Methods whose requests change nothing: a page of another origin cannot read their answers (no CORS).
SAFE_METHODS = frozenset({"GET", "HEAD"})


def from_foreign_page(site: str | None) -> bool:
    """Whether a ``Sec-Fetch-Site`` value (None: the field is absent) says a page of another origin sent the request.

    The event loop that decides whether to read a body (``service.request_reader``) asks this too: one
    definition of who is refused, so that such a body is refused unread.
    """
    return site is not None and site.strip().lower() in _FOREIGN


def refuse_foreign_page(environ: dict[str, Any]) -> None:
    """Raise a 403 Problem when the request was sent by a page of another origin."""
    site = environ.get("HTTP_SEC_FETCH_SITE")
    if from_foreign_page(site):
        raise Problem(
            403,
            f"the request was sent by a page of another origin (Sec-Fetch-Site: {site.strip().lower()}): "
            "tasks are changed from this service's own pages and from clients that are not browsers only",
        )
