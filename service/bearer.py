"""The bearer token check itself, shared by the application (``service.auth``) and the event loop that
decides whether to read a request's body (``service.request_reader``): one definition of who passes."""

from __future__ import annotations

import hmac

MISSING = "the request has no bearer token: send the header 'Authorization: Bearer <token>'"
WRONG = "the bearer token is wrong"


def bearer_problem(authorization: str | None, token: str) -> str | None:
    """Why ``authorization`` (a header's value) is not ``Bearer <token>`` (MISSING or WRONG); None if it is.

    The comparison takes constant time.
    """
    scheme, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip(" ")
    if scheme.lower() != "bearer" or not credentials:  # schemes are case-insensitive (RFC 9110 11.1)
        return MISSING
    # A configured token is ASCII, so a non-ASCII one is wrong; that much may show in the timing.
    if not credentials.isascii() or not hmac.compare_digest(credentials.encode("ascii"), token.encode("ascii")):
        return WRONG
    return None
