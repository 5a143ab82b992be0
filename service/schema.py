"""Request bodies and query strings in, task JSON out."""

from __future__ import annotations

import functools
import json
import math
import re
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from werkzeug.datastructures import MultiDict

from config import Config
from workerpool import State, Task, TaskSpec  # a validated task is the engine's TaskSpec
from workerpool.nesting import MAX_RESULT_DEPTH, SHORTEST_TOO_DEEP, nested_deeper_than
from workerpool.stores.base import Position

from .cursors import InvalidCursor, read_cursor
from .problems import FieldError, invalid_request

MAX_ID_CHARS = 256
# Longer JSON integers are left unconverted: no field takes a value of that size, and int() refuses
# more than 4,300 digits with a message about sys.set_int_max_str_digits.
MAX_INTEGER_DIGITS = 100
# Lists and objects in a payload nest at most as deep as in a result: a store (SQLite, Redis) decodes a
# queued task's payload on every read of it, on a request thread deeper than the one that accepted it.
MAX_PAYLOAD_DEPTH = MAX_RESULT_DEPTH
ID_PATH_RULE = "must not start or end with '/', contain '//', or have a '.' or '..' segment"
DEFAULT_LIST_LIMIT = 100
MAX_LIST_LIMIT = 1000
ENQUEUE_FIELDS = ("id", "payload", "max_retries", "delay_ms")
# Unknown fields named one by one in an answer, per object: past them one error counts the rest. Each named
# one took about 50 bytes of answer: a 4 MiB batch of tasks of 1,000 unknown keys each was answered 23.6 MB.
MAX_UNKNOWN_FIELDS_NAMED = 10
LIST_PARAMETERS = ("state", "limit", "results", "cursor")
# Unicode categories Cc (control characters) and Cs (lone surrogates), as one character class:
# a regex search costs a fraction of a unicodedata.category() call per character.
FORBIDDEN_ID_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# JSON may escape half of a surrogate pair alone ("\ud800"): such a string has no UTF-8 form, so the
# SQLite and Redis stores could not keep the payload (a pair is decoded to the one character it stands for).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE_RULE = "must not contain a lone surrogate (\\ud800 to \\udfff without its pair)"
# Unicode category Cf (format characters: bidi overrides and isolates, zero-width spaces, U+FEFF) shows as nothing
# or reorders the text around it: an id holding one would read as another in logs and on the dashboard
# ("zw-\u200bjob" as "zw-job"), or reverse the rest of its log line (U+202E). None is an ASCII character.
FORMAT_CHARACTER_RULE = "must not contain invisible format characters (Unicode category Cf: bidi controls, zero-width)"
# Blank or invisible characters of other categories read as another id the same way ("vis-1\u3164" as "vis-1"):
# whitespace other than U+0020 (Zs, Zl, Zp), Unicode's Default_Ignorable_Code_Point characters (Hangul fillers,
# variation selectors, the combining grapheme joiner, unassigned ones to come) and U+2800 BRAILLE PATTERN BLANK.
BLANK_ID_CHARACTER = re.compile(
    "[\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"  # whitespace
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff"
    "\u2800]"
)
BLANK_CHARACTER_RULE = (
    "must not contain blank or invisible characters (whitespace other than U+0020, fillers, variation selectors)"
)
# A page collapses spaces: " vis-1" shows as "vis-1", "vis  1" as "vis 1".
SPACE_RULE = "must not start or end with a space, nor hold two in a row"


@dataclass(frozen=True, slots=True)
class TaskLimits:
    """The configured bounds a task is checked against."""

    default_max_retries: int
    max_retries_limit: int
    max_payload_chars: int
    max_delay_ms: int = 0

    @classmethod
    def of(cls, config: Config) -> TaskLimits:
        return cls(
            default_max_retries=config.default_max_retries,
            max_retries_limit=config.max_retries_limit,
            max_payload_chars=config.max_payload_chars,
            max_delay_ms=config.max_delay_ms,
        )


@dataclass(frozen=True, slots=True)
class _OversizedInteger:
    """A JSON integer of more than MAX_INTEGER_DIGITS digits, kept as its digit count."""

    digits: int


@dataclass(frozen=True, slots=True)
class ListQuery:
    state: State | None = None
    limit: int = DEFAULT_LIST_LIMIT
    # False: the listing leaves each task's result out (up to MAX_RESULT_BYTES each), and the store does not read it.
    results: bool = True
    # Where the page starts: the position a `cursor` holds (see service/cursors.py); None for the first page.
    after: Position | None = None


def parse_enqueue(body: bytes, limits: TaskLimits, *, request_id: str | None = None) -> TaskSpec:
    """Validate a POST /enqueue body; raise a 400 Problem listing every failing field."""
    document = decode_json(body)
    if counts_as_floats([document]):
        document = decode_json(body, exact=True)
    if not isinstance(document, dict):
        raise invalid_request(f"the body must be a JSON object, not {_json_type(document)}")
    spec = parse_task(document, limits, request_id=request_id)
    if isinstance(spec, list):
        raise invalid_request("the task is invalid", tuple(spec))
    return spec


def parse_task(document: Any, limits: TaskLimits, *, request_id: str | None = None) -> TaskSpec | list[FieldError]:
    """Validate one decoded task object: its spec, or every failing field (never an empty list).

    A document that is not an object gives one error whose field is ``""``
    (the document itself), for a caller to name by its place in a larger body.
    """
    if not isinstance(document, dict):
        return [FieldError("", f"must be a JSON object, not {_json_type(document)}")]
    errors = unknown_fields(document, ENQUEUE_FIELDS)
    errors += _check_id(document)
    errors += _check_payload(document, limits.max_payload_chars)
    errors += _check_count(document, "max_retries", limits.max_retries_limit)
    errors += _check_count(document, "delay_ms", limits.max_delay_ms)
    if errors:
        return errors
    return TaskSpec(
        id=document.get("id"),
        payload=document["payload"],
        max_retries=_as_integer(document.get("max_retries", limits.default_max_retries)),
        delay=_as_integer(document.get("delay_ms", 0)) / 1000,
        request_id=request_id,
    )


def unknown_fields(document: Mapping[str, Any], known: tuple[str, ...]) -> list[FieldError]:
    """An error for each field of ``document`` not in ``known``: the first ``MAX_UNKNOWN_FIELDS_NAMED`` named,
    then, if there are more, one for the object itself (field ``""``) that counts them."""
    unknown = [name for name in document if name not in known]
    errors = [FieldError(name, "is not a known field") for name in unknown[:MAX_UNKNOWN_FIELDS_NAMED]]
    if len(unknown) > MAX_UNKNOWN_FIELDS_NAMED:
        more = len(unknown) - MAX_UNKNOWN_FIELDS_NAMED
        fields = "field that is" if more == 1 else "fields that are"
        errors.append(FieldError("", f"has {more} more {fields} not known (not named)"))
    return errors


def decode_json(body: bytes, *, exact: bool = False) -> Any:
    """The JSON value of a request body; raise a 400 Problem if it is not strict JSON.

    ``exact``: a number literal that is not an integer but whose nearest float is one
    (``2.0000000000000001``, ``1e-400``) is kept apart from one that is (``2.0``) as a
    ``_RoundedFloat``, which a count field refuses. Each float literal then costs a Python
    call (a body of floats takes half as long again): only a body whose count fields read
    as integral floats (``counts_as_floats``) is decoded again this way.
    """
    decoder = _EXACT_DECODER if exact else _DECODER
    try:
        # json.loads(bytes) decodes the same way, then builds a new decoder on every call.
        return decoder.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, ours
        raise invalid_request(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid_request("the body is not valid JSON: nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)  # in C: a batch decodes thousands of objects
    if len(document) < len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return document


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(text: str) -> int | _OversizedInteger:
    digits = len(text) - text.startswith("-")
    return int(text) if digits <= MAX_INTEGER_DIGITS else _OversizedInteger(digits)


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_int=_bounded_int)


class _RoundedFloat(float):
    """A JSON number that is not an integer, whose nearest float is one: ``2.0000000000000001`` is 2.0, ``1e-400``
    is 0.0. A payload keeps it as that float; a count field refuses it, as JSON Schema's ``integer`` does."""

    __slots__ = ()


def _exact_float(text: str) -> float:
    value = float(text)
    if value.is_integer() and not _is_integral_literal(text):
        return _RoundedFloat(value)
    return value


def _is_integral_literal(text: str) -> bool:
    """Whether a JSON number literal with a fraction or an exponent (``2.50e1``) is exactly an integer."""
    mantissa, _, exponent = text.lower().partition("e")
    whole, _, fraction = mantissa.lstrip("-").partition(".")
    significant = (whole + fraction).rstrip("0")
    if not significant.strip("0"):
        return True  # zero, however written
    power = exponent.lstrip("+-").lstrip("0")
    if len(power) > 18:  # far past any float: only a negative one is reached here (a positive one overflows)
        return not exponent.startswith("-")
    magnitude = int(power or "0")
    scale = (-magnitude if exponent.startswith("-") else magnitude) - len(fraction)
    return scale + len(whole + fraction) - len(significant) >= 0


_EXACT_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_keys, parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_exact_float
)


def counts_as_floats(tasks: list[Any]) -> bool:
    """Whether a count field of a decoded task reads as a float with an integral value, which only the body's
    literal tells from one that is not an integer (see ``decode_json``)."""
    for task in tasks:  # the two fields spelt out: an inner loop over them costs more per task
        if type(task) is dict:
            retries, delay = task.get("max_retries"), task.get("delay_ms")
            if (type(retries) is float and retries.is_integer()) or (type(delay) is float and delay.is_integer()):
                return True
    return False


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        _OversizedInteger: "a number",
        _RoundedFloat: "a number",
    }
    return "null" if value is None else names.get(type(value), type(value).__name__)


def json_type(value: Any) -> str:
    """How error messages name the type of a decoded JSON value: "an object", "an array", "null", ..."""
    return _json_type(value)


def _check_id(document: Mapping[str, Any]) -> list[FieldError]:
    if "id" not in document:
        return []  # the pool makes one
    value = document["id"]
    if not isinstance(value, str):
        return [FieldError("id", f"must be a string, not {_json_type(value)}")]
    if not 1 <= len(value) <= MAX_ID_CHARS:
        return [FieldError("id", f"must be 1 to {MAX_ID_CHARS} characters long")]
    if found := FORBIDDEN_ID_CHARACTER.search(value):
        rule = LONE_SURROGATE_RULE if LONE_SURROGATE.match(found[0]) else "must not contain control characters"
        return [FieldError("id", rule)]
    if not value.isascii() and (found := _invisible_character(value)) is not None:
        rule = FORMAT_CHARACTER_RULE if unicodedata.category(found) == "Cf" else BLANK_CHARACTER_RULE
        return [FieldError("id", f"{rule}: U+{ord(found):04X} at index {value.index(found)}")]
    if value[0] == " " or value[-1] == " " or "  " in value:
        return [FieldError("id", SPACE_RULE)]
    # The id is the tail of its URL, /tasks/<id>: clients drop "." and ".."
    # segments and servers merge "//", so such ids could never be read back.
    if value in (".", "..") or ("/" in value and any(part in ("", ".", "..") for part in value.split("/"))):
        return [FieldError("id", ID_PATH_RULE)]
    return []


def _invisible_character(text: str) -> str | None:
    """The first character of ``text`` that is a format character (Cf) or blank (``BLANK_ID_CHARACTER``)."""
    return next((c for c in text if unicodedata.category(c) == "Cf" or BLANK_ID_CHARACTER.match(c) is not None), None)


def _check_payload(document: Mapping[str, Any], limit: int) -> list[FieldError]:
    if "payload" not in document:
        return [FieldError("payload", "is required (any JSON value; it may be an empty string)")]
    value = document["payload"]
    if isinstance(value, str):  # counted in characters, as before payloads could be other JSON values
        text, unit = value, "characters"
    else:
        try:
            text, unit = _compact_json(value), "characters as compact JSON"
        except _HugeInteger:
            return [FieldError("payload", f"must not contain an integer of more than {MAX_INTEGER_DIGITS} digits")]
        except ValueError:  # 1e400 decodes to inf, which has no JSON form
            return [FieldError("payload", "must not contain a number too large for a 64-bit float")]
        except RecursionError:  # decoded just short of the interpreter's limit, then encoded deeper
            return [FieldError("payload", _DEPTH_RULE)]
    if len(text) > limit:
        return [FieldError("payload", f"must be at most {limit} {unit}")]
    if len(text) >= SHORTEST_TOO_DEEP and not isinstance(value, str) and nested_deeper_than(text, MAX_PAYLOAD_DEPTH):
        return [FieldError("payload", _DEPTH_RULE)]
    if not text.isascii() and LONE_SURROGATE.search(text):  # isascii() is a flag lookup: most payloads stop there
        return [FieldError("payload", LONE_SURROGATE_RULE)]
    return []


_DEPTH_RULE = f"must not nest lists and objects more than {MAX_PAYLOAD_DEPTH} levels deep"


class _HugeInteger(Exception):
    pass


def _refuse_huge_integer(value: object) -> None:
    if isinstance(value, _OversizedInteger):
        raise _HugeInteger()
    raise TypeError(f"{type(value).__name__} is not JSON")  # never: a decoded document holds JSON types only


# Built once: json.dumps with options builds a JSONEncoder at every call, and JSONEncoder.encode its C encoder
# at every call too (together about 17,000 of the 27,000 instructions of a small payload's measure). A decoded
# document cannot contain itself, so no circular check (too deep a nesting still raises RecursionError).
_COMPACT_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False, default=_refuse_huge_integer
)
_C_COMPACT_ENCODER = (  # json's own accelerator, as JSONEncoder.encode builds it (None where Python has none)
    json.encoder.c_make_encoder(
        None, _refuse_huge_integer, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def _compact_json(value: Any) -> str:
    """``value`` (not a string) as the shortest JSON text: what a payload's size is measured on."""
    if _C_COMPACT_ENCODER is None:
        return _COMPACT_ENCODER.encode(value)
    return "".join(_C_COMPACT_ENCODER(value, 0))


def _as_integer(value: Any) -> Any:
    """``value`` as an int if it is a float with an integral value, as JSON Schema's ``integer`` allows.

    Clients that serialise numbers as floats send 2.0 for 2; the published schema
    (``type: integer``) accepts it, so the service does too.
    """
    if type(value) is float and value.is_integer():
        return int(value)
    return value


def _check_count(document: Mapping[str, Any], field: str, limit: int) -> list[FieldError]:
    """An optional integer field from 0 to ``limit``."""
    if field not in document:
        return []
    value = _as_integer(document[field])
    if isinstance(value, _OversizedInteger):
        return [FieldError(field, f"must be between 0 and {limit}")]
    # bool is an int subclass: true is refused, as are 2.5 and "3".
    if type(value) is not int:
        return [FieldError(field, f"must be an integer, not {_json_type(value)}")]
    if not 0 <= value <= limit:
        return [FieldError(field, f"must be between 0 and {limit}")]
    return []


def parse_list_query(args: MultiDict[str, str], position_key: Callable[[], bytes]) -> ListQuery:
    """Validate the query string of GET /tasks; raise a 400 Problem listing every bad parameter.

    ``position_key``: the store's (``TaskStore.position_key``), asked for only to read a ``cursor``."""
    errors = [FieldError(name, "is not a known parameter") for name in args if name not in LIST_PARAMETERS]
    errors += [
        FieldError(name, "must be given at most once") for name in LIST_PARAMETERS if len(args.getlist(name)) > 1
    ]
    state, limit, results, after = None, DEFAULT_LIST_LIMIT, True, None
    state_ok = True
    if "state" in args:
        try:
            state = State(args["state"])
        except ValueError:
            state_ok = False
            errors.append(FieldError("state", f"must be one of {', '.join(State)}"))
    if "cursor" in args and state_ok:  # read for the listing asked for: a cursor passes with its own only
        try:
            after = read_cursor(args["cursor"], state, position_key)
        except InvalidCursor as exc:
            errors.append(FieldError("cursor", str(exc)))
    if "limit" in args:
        text = args["limit"]
        if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_LIST_LIMIT:
            limit = int(text)
        else:
            errors.append(FieldError("limit", f"must be an integer from 1 to {MAX_LIST_LIMIT}"))
    if "results" in args:
        if args["results"] in ("true", "false"):
            results = args["results"] == "true"
        else:
            errors.append(FieldError("results", "must be true or false"))
    if errors:
        raise invalid_request("the query parameters are invalid", tuple(errors))
    return ListQuery(state=state, limit=limit, results=results, after=after)


def rfc3339(timestamp: float | None) -> str | None:
    """Seconds since the epoch as an RFC 3339 UTC string with milliseconds, e.g. 2026-01-02T03:04:05.678Z.

    The text of ``datetime.fromtimestamp(timestamp, UTC)`` cut to milliseconds, at a third of its cost
    (a batch serialises a thousand tasks): microseconds rounded half to even as datetime rounds them,
    the date and time of each whole second formatted once.
    """
    if timestamp is None:
        return None
    fraction, second = math.modf(timestamp)
    micros = round(fraction * 1_000_000)
    if micros == 1_000_000:
        second, micros = second + 1, 0
    return f"{_utc_second(int(second))}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=256)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def task_to_json(task: Task) -> dict[str, Any]:
    """The public view of a task; the payload is never echoed back."""
    return {
        "id": task.id,
        "state": str(task.state),
        "attempts": task.attempts,
        "max_retries": task.max_retries,
        "last_error": task.last_error,
        "result": task.result,
        "cancel_requested": task.cancel_requested,
        "created_at": rfc3339(task.created_at),
        "started_at": rfc3339(task.started_at),
        "finished_at": rfc3339(task.finished_at),
        "next_attempt_at": rfc3339(task.next_attempt_at),
    }
