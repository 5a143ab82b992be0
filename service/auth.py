"""The optional bearer token (``API_TOKEN``) that guards the task endpoints."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from flask import request

from .bearer import MISSING, WRONG, bearer_problem
from .context import services
from .cross_site import SAFE_METHODS, refuse_foreign_page
from .problems import unauthorized

CHALLENGE = 'Bearer realm="workerpool"'

__all__ = ["CHALLENGE", "MISSING", "WRONG", "check_bearer", "require_token", "token_required"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


def token_required(view: Callable[_P, _R]) -> Callable[_P, _R]:
    """Run ``view`` only for requests with the configured token; with no token configured, always."""

    @functools.wraps(view)
    def guarded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        if request.method not in SAFE_METHODS:  # DELETE: a page of another origin is refused, as for POST
            refuse_foreign_page(request.environ)
        require_token()
        return view(*args, **kwargs)

    return guarded


def require_token(token: str | None = None) -> None:
    """Raise a 401 Problem unless the current request carries the configured token (if any).

    ``token``: the configured one, from a caller that has the settings at hand (else they are looked up).
    """
    if token is None:
        token = services().config.api_token
    if token:
        check_bearer(request.headers.get("Authorization"), token)


def check_bearer(authorization: str | None, token: str) -> None:
    """Raise a 401 Problem unless ``authorization`` is ``Bearer <token>``; the comparison takes constant time."""
    problem = bearer_problem(authorization, token)
    if problem is not None:
        raise unauthorized(problem, challenge=CHALLENGE)
