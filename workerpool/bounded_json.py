"""A value's JSON text, given up on as soon as its strings alone make it longer than a limit."""

from __future__ import annotations

import json
from json.encoder import c_make_encoder, encode_basestring_ascii
from typing import Any


class TooLong(Exception):
    """The value's JSON is longer than the limit: at least ``at_least`` characters (its strings with their quotes)."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"its JSON is at least {at_least} characters")
        self.at_least = at_least


_NOT_JSON = json.JSONEncoder().default  # raises json.dumps's TypeError, naming the type


def dumps_within(value: Any, limit: int) -> str:
    """``json.dumps(value, allow_nan=False, separators=(",", ":"))``, the compact JSON the stores keep and the API
    serves (its length is the size a limit means), or ``TooLong`` once its strings (keys too) pass ``limit`` characters.

    ``json.dumps`` builds the whole text before its length can be looked at,
    and a string's JSON may be 6 bytes a character (``\\u00e9``), 12 for one
    beyond U+FFFF: one huge string inside a list cost that much memory only
    to be refused. Here the C encoder hands each string to a function that
    adds its length and two quotes (the least its JSON takes) to a count
    before encoding it, and stops the whole encoding once the count passes
    ``limit``: the text built by then is at most about six times ``limit``.
    """
    seen = 0

    def encode_string(text: str) -> str:
        nonlocal seen
        seen += len(text) + 2
        if seen > limit:
            raise TooLong(seen)
        return encode_basestring_ascii(text)

    # What json.dumps builds (check_circular: the markers; allow_nan=False; compact separators), but for the strings.
    encode = c_make_encoder({}, _NOT_JSON, encode_string, None, ":", ",", False, False, False)
    return "".join(encode(value, 0))
