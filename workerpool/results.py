"""What an attempt's end records: the handler's return value, checked before it becomes the task's
result, or the text of the error that ended the attempt."""

from __future__ import annotations

import inspect
import json
import re

from .bounded_json import TooLong, dumps_within
from .nesting import MAX_RESULT_DEPTH, SHORTEST_TOO_DEEP, nested_deeper_than

_MAX_ERROR_CHARS = 500


def check_result(returned: object, limit: int) -> tuple[str | None, object]:
    """Why a handler's return value cannot be the task's result, or None and the result to keep.

    What the result's own code raises as it is read (a lazy mapping's ``items``, an ``__eq__``) is the
    reason it cannot be the result: even SystemExit, which would end the worker thread silently and
    leave the task running for ever, and never an error of the pool's.
    """
    try:
        return _check_unguarded(returned, limit)
    except BaseException as exc:
        why = f"the handler returned {type(returned).__name__}, which is not JSON: {_describe_safely(exc)}"
        return _truncate(why), None


def _check_unguarded(returned: object, limit: int) -> tuple[str | None, object]:
    """``check_result``, without its guard against the result's own code.

    A container is kept as a decoded copy of the JSON just checked: the handler's own object (a cache
    or a memoised value it returns) may change later, and the memory store would otherwise keep it
    by reference, showing the change and escaping both checks (a set added to it made every read of
    the task fail). Every store now keeps what the handler returned at the moment it returned.
    """
    if returned is None:  # most handlers return nothing: the cost of an attempt's end stays the engine's
        return None, None
    if inspect.iscoroutine(returned) or inspect.isgenerator(returned):
        returned.close()  # never run: close it, or Python warns when it is collected
        return f"the handler returned a {type(returned).__name__}: this pool runs plain functions", None
    try:
        text = dumps_within(returned, limit)
    except TooLong as exc:  # refused before the encoding of a huge string inside it was built
        return (
            f"the handler's result is at least {exc.at_least} bytes as JSON; the limit is {limit} (MAX_RESULT_BYTES)",
            None,
        )
    except (TypeError, ValueError, RecursionError) as exc:
        why = f"the handler returned {type(returned).__name__}, which is not JSON: {_describe_safely(exc)}"
        return _truncate(why), None
    size = len(text) if text.isascii() else len(text.encode())
    if size > limit:
        return f"the handler's result is {size} bytes as JSON; the limit is {limit} (MAX_RESULT_BYTES)", None
    immutable = type(returned) in _IMMUTABLE_RESULTS
    if not immutable and len(text) >= SHORTEST_TOO_DEEP and nested_deeper_than(text, MAX_RESULT_DEPTH):
        return f"the handler's result is nested more than {MAX_RESULT_DEPTH} levels deep", None
    if _SUSPECT_RESULT.search(text) is not None:  # rare: only then the exact checks (after the depth's)
        why = _refused_in_payloads(returned, text)
        if why is not None:
            return f"the handler returned {type(returned).__name__}, which is not JSON clients can read: {why}", None
    if immutable:  # nothing the handler can change later, and no keys to merge: kept as returned
        return None, returned
    kept = json.loads(text)
    if kept != returned and (key := _merged_key(returned, kept)) is not None:  # keys that are not str: 1 is "1"
        return _truncate(f"the handler's result has two keys that are both {json.dumps(key)} in JSON"), None
    return None, kept


# What a payload may not hold (service/schema.py) is refused in a result too: the API would serve JSON
# it refuses as input and that clients misread. An integer of more than 100 digits reads as Infinity,
# or loses digits, in JavaScript; a lone surrogate (text decoded with surrogateescape, a file name) has
# no UTF-8 form, so strict clients refuse the whole body and others read U+FFFD.
MAX_RESULT_INTEGER_DIGITS = 100
# json.dumps escapes every non-ASCII character: a surrogate shows as \ud800 to \udfff. A match may be
# a pair (one character beyond U+FFFF), a string's own backslash or digits: _refused_in_payloads decides.
_SUSPECT_RESULT = re.compile(rf"\\ud[89abcdef]|[0-9]{{{MAX_RESULT_INTEGER_DIGITS + 1}}}")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _refused_in_payloads(returned: object, text: str) -> str | None:
    """Why a result (``text``, its JSON) breaks a rule payloads are held to, or None."""
    if _LONE_SURROGATE.search(json.dumps(returned, ensure_ascii=False)) is not None:
        return "it holds a lone surrogate (\\ud800 to \\udfff without its pair), which has no UTF-8 form"
    longest = 0

    def integer(digits: str) -> int:
        nonlocal longest
        longest = max(longest, len(digits) - digits.startswith("-"))
        return 0

    json.loads(text, parse_int=integer)
    if longest > MAX_RESULT_INTEGER_DIGITS:
        return f"it holds an integer of {longest} digits, more than {MAX_RESULT_INTEGER_DIGITS} (as in payloads)"
    return None


_IMMUTABLE_RESULTS = (str, int, float, bool)


def _merged_key(returned: object, kept: object) -> str | None:
    """A key that two keys of one of ``returned``'s dicts both became in JSON (``1`` and ``"1"``), if any.

    ``kept`` is ``returned`` encoded and decoded: JSON keeps only the last of such keys, and the other
    value would be lost without a word.
    """
    pending = [(returned, kept)]
    try:
        while pending:
            value, copy = pending.pop()
            if isinstance(value, dict):
                if len(value) != len(copy):
                    seen: set[str] = set()
                    for key in value:
                        name = next(iter(json.loads(json.dumps({key: None}))))
                        if name in seen:
                            return name
                        seen.add(name)
                pending.extend(zip(value.values(), copy.values(), strict=False))
            elif isinstance(value, list | tuple):
                pending.extend(zip(value, copy, strict=False))
    except Exception:  # the handler's object changed since it was encoded: what was encoded is kept
        return None
    return None


def describe_error(exc: BaseException) -> str:
    """``Type: message`` of an exception, never raising (its ``__str__`` may, or return a non-string)."""
    return _truncate(_describe_safely(exc))


def _describe_safely(exc: BaseException) -> str:
    name = type(exc).__name__
    try:
        text = str(exc)
    except BaseException as broken:  # noqa: BLE001  (any failure gets the fallback, even SystemExit)
        return f"{name} (its message could not be read: {type(broken).__name__})"
    return f"{name}: {text}" if text else name


def _truncate(text: str) -> str:
    if not text.isascii():
        # A lone surrogate (a file name decoded with surrogateescape, say) has no UTF-8 form: the
        # SQLite and Redis stores could not write the error, and the task would fail without its
        # retries. Escaped ("\\udce9") it reads the same on every store.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
