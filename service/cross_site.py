"""Requests that change tasks, sent by a page of another origin, are refused.

A browser lets any page send a simple request (a ``POST`` with a ``text/plain``
or form body, no preflight) to any address, the loopback one included, and the
service reads a body as JSON whatever its ``Content-Type``: without ``API_TOKEN``
a page the user opens could submit tasks to a service reachable from this
machine only. Browsers say where a request comes from (``Sec-Fetch-Site``,
Fetch Metadata): ``same-origin`` for the dashboard's own requests, ``none`` for
one the user made, ``same-site`` or ``cross-site`` for one a page of another
origin made (another port of ``localhost`` is another origin of the same site).
Browsers send Fetch Metadata to potentially trustworthy addresses only (https,
the loopback ones): to a service reached over plain http by another address (a
LAN address, a container's published port) they send none, but every ``POST``
and ``DELETE`` still carries the page's ``Origin``, which is then compared with
the address the browser sent the request to (``Host``, or the ``X-Forwarded-Host``
of a proxy that rewrites it; a page cannot set either in a request it may send
without a preflight). The service answers no CORS preflight, so no page of
another origin has a use for it anyway; clients that are not browsers send none
of these fields.
"""

from __future__ import annotations

import json
from typing import Any

from .problems import Problem

_FOREIGN = frozenset({"cross-site", "same-site"})
# Methods whose requests change nothing: a page of another origin cannot read their answers (no CORS).
SAFE_METHODS = frozenset({"GET", "HEAD"})


def from_foreign_page(site: str | None, origin: str | None = None, hosts: str = "") -> bool:
    """Whether a request's ``Sec-Fetch-Site`` value (``site``; None: the field is absent), or without one its
    ``Origin`` (None: absent), says a page of another origin sent it. ``hosts``: its ``Host`` and
    ``X-Forwarded-Host`` values, joined with commas (as a repeated field reaches the application).

    The event loop that decides whether to read a body (``service.request_reader``) asks this too: one
    definition of who is refused, so that such a body is refused unread.
    """
    if site is not None:  # said by the browser itself: the origin compared with the page's address
        return site.strip().lower() in _FOREIGN
    return origin is not None and not _same_origin(origin, hosts)


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _same_origin(origin: str, hosts: str) -> bool:
    """Whether ``origin`` (``scheme://host[:port]``; ``null`` for a sandboxed or local page) names one of ``hosts``.

    The scheme is not compared: a proxy terminating TLS hands an ``https`` page's request on over http.
    """
    scheme, separator, authority = origin.strip().lower().partition("://")
    if not separator or scheme not in _DEFAULT_PORTS or not authority or any(c in authority for c in "/?#, \t@"):
        return False  # "null", a list of origins, anything a browser does not send for a page of its own
    # A proxy may write the default port out in Host; an Origin leaves it out.
    own = (authority, authority + _DEFAULT_PORTS[scheme])
    return any(host.strip() in own for host in hosts.lower().split(","))


def refuse_foreign_page(environ: dict[str, Any]) -> None:
    """Raise a 403 Problem when the request was sent by a page of another origin."""
    site = environ.get("HTTP_SEC_FETCH_SITE")
    origin = environ.get("HTTP_ORIGIN")
    if site is None and origin is None:  # clients that are not browsers: most requests
        return
    hosts = f"{environ.get('HTTP_HOST', '')},{environ.get('HTTP_X_FORWARDED_HOST', '')}"
    if from_foreign_page(site, origin, hosts):
        said = f"Sec-Fetch-Site: {site.strip().lower()}" if site is not None else _compared(environ)
        raise Problem(
            403,
            f"the request was sent by a page of another origin ({said}): "
            "tasks are changed from this service's own pages and from clients that are not browsers only",
        )


# How much of a header a refusal quotes: enough to recognise an address, not a client's whole header.
_QUOTED_CHARS = 100


def _compared(environ: dict[str, Any]) -> str:
    """What the Origin was compared with, each value quoted as a JSON string (control characters, quotes and
    non-ASCII escaped: a client cannot end a log line or forge one) and cut at ``_QUOTED_CHARS``."""
    origin, host = _quoted(environ.get("HTTP_ORIGIN")), _quoted(environ.get("HTTP_HOST"))
    forwarded = environ.get("HTTP_X_FORWARDED_HOST")
    if forwarded is None:
        return f"its Origin {origin} does not match its Host {host}"
    return f"its Origin {origin} matches neither its Host {host} nor its X-Forwarded-Host {_quoted(forwarded)}"


def _quoted(value: str | None) -> str:
    if value is None:
        return "(absent)"
    if len(value) > _QUOTED_CHARS:
        return f"{json.dumps(value[:_QUOTED_CHARS])}... ({len(value)} characters)"
    return json.dumps(value)
