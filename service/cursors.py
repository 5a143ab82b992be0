"""The ``cursor`` of GET /tasks: where a listing's next page starts, as opaque text.

A cursor holds the listing it was made for (its ``state``, or none) and the store's position after
the page's last task (``TaskStore.page``): a position in the store's own order, never an offset, so
that it reads the same next page in any process of any instance sharing the store, however many
tasks were admitted meanwhile. It is URL-safe base64 of a tag of the store, a small JSON array and a
check keyed with the store's own random secret (``TaskStore.position_key``, kept in the store): a
cursor of another store (another SQLite file, Redis database or prefix, or a memory store before a
restart), whose position would name an unrelated place here, is told by its tag, and one cut short,
altered or forged fails the check, which only processes holding the store can make. Nothing in a
cursor is secret, and a cursor passes only with the listing it was made for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable

import orjson

from workerpool import State
from workerpool.stores.base import Position

_VERSION = 2
_TAG_BYTES = 4
_CHECK_BYTES = 8
# Longer than any cursor made (the tag, a version, a state's name, four 64-bit numbers, the check): refused unread.
MAX_CURSOR_CHARS = 200
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")
_NOT_MADE = "is not a cursor this service made: copy the `next` of the page before, unchanged"
_ANOTHER_STORE = (
    "was made for another task store (another SQLite file, Redis database or prefix, the memory store"
    " before the service restarted, or an older release): list from the first page again"
)


class InvalidCursor(ValueError):
    """Why a ``cursor`` cannot be read for this listing (the message ends the sentence "cursor ...")."""


def make_cursor(state: State | None, position: Position, key: bytes) -> str:
    """The cursor of the page after ``position`` in the listing of ``state`` (None: every task) of the store
    whose ``position_key`` is ``key``."""
    body = orjson.dumps([_VERSION, "" if state is None else state.value, *position])
    return base64.urlsafe_b64encode(_tag(key) + body + _check(body, key)).rstrip(b"=").decode("ascii")


def read_cursor(text: str, state: State | None, key: Callable[[], bytes]) -> Position:
    """The position ``text`` holds, if it is a cursor made for the listing of ``state`` of the store whose
    ``position_key`` is ``key()`` (asked only for a text that may be a cursor)."""
    if len(text) > MAX_CURSOR_CHARS or not _BASE64URL.fullmatch(text):
        raise InvalidCursor(_NOT_MADE)
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    secret = key()
    tag, body, check = raw[:_TAG_BYTES], raw[_TAG_BYTES:-_CHECK_BYTES], raw[-_CHECK_BYTES:]
    if len(raw) > _TAG_BYTES + _CHECK_BYTES and not hmac.compare_digest(tag, _tag(secret)):
        raise InvalidCursor(_ANOTHER_STORE)
    if len(raw) <= _TAG_BYTES + _CHECK_BYTES or not hmac.compare_digest(check, _check(body, secret)):
        raise InvalidCursor("was cut short or altered: copy the `next` of the page before, unchanged")
    try:
        fields = orjson.loads(body)
    except orjson.JSONDecodeError:  # the check passed, yet not a body make_cursor writes
        raise InvalidCursor(_NOT_MADE) from None
    if not isinstance(fields, list) or len(fields) < 2 or fields[0] != _VERSION or not isinstance(fields[1], str):
        raise InvalidCursor("is of another version of this service: list from the first page again")
    made_for = fields[1]
    if made_for != ("" if state is None else state.value):
        listing = "every task (no state)" if not made_for else f"state={made_for}"
        raise InvalidCursor(f"was made for the listing of {listing}: pass the same state with it")
    return tuple(fields[2:])


def _tag(key: bytes) -> bytes:
    return hashlib.blake2b(b"tag", digest_size=_TAG_BYTES, key=key).digest()


def _check(body: bytes, key: bytes) -> bytes:
    return hashlib.blake2b(b"check:" + body, digest_size=_CHECK_BYTES, key=key).digest()
