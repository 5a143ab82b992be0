"""Request parsing and task serialisation, without HTTP."""

from __future__ import annotations

import dataclasses
import json
import sys
import unicodedata
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from config import Config
from service.problems import FieldError, Problem
from service.schema import (
    FORBIDDEN_ID_CHARACTER,
    LONE_SURROGATE,
    ListQuery,
    TaskLimits,
    TaskSpec,
    parse_enqueue,
    parse_list_query,
    parse_task,
    rfc3339,
    task_to_json,
)
from workerpool import State, Task

LIMITS = TaskLimits(default_max_retries=3, max_retries_limit=20, max_payload_chars=1000, max_delay_ms=60_000)


def parse(body: bytes, *, max_payload_chars: int = 1000) -> TaskSpec:
    return parse_enqueue(body, dataclasses.replace(LIMITS, max_payload_chars=max_payload_chars))


def test_a_valid_body_becomes_a_frozen_spec():
    spec = parse_enqueue(b'{"id": "a", "payload": "p", "max_retries": 20}', LIMITS, request_id="r1")
    assert spec == TaskSpec(id="a", payload="p", max_retries=20, request_id="r1")
    with pytest.raises(AttributeError):
        spec.id = "b"  # type: ignore[misc]


def test_the_limits_come_from_the_config():
    config = Config(default_max_retries=1, max_retries_limit=7, max_payload_chars=9, max_delay_ms=11)
    assert TaskLimits.of(config) == TaskLimits(
        default_max_retries=1, max_retries_limit=7, max_payload_chars=9, max_delay_ms=11
    )


def test_without_an_id_the_spec_asks_the_pool_for_one():
    assert parse_task({"payload": {"k": 1}}, LIMITS) == TaskSpec(id=None, payload={"k": 1}, max_retries=3)


@pytest.mark.parametrize(("delay_ms", "delay"), [(0, 0.0), (1, 0.001), (1500, 1.5), (60_000, 60.0)])
def test_delay_ms_becomes_the_specs_delay_in_seconds(delay_ms, delay):
    assert parse_task({"payload": "", "delay_ms": delay_ms}, LIMITS).delay == delay


@pytest.mark.parametrize(
    ("delay_ms", "message"),
    [
        (-1, "must be between 0 and 60000"),
        (60_001, "must be between 0 and 60000"),
        (10**200, "must be between 0 and 60000"),
        (1.5, "must be an integer, not a number"),
        (1000.5, "must be an integer, not a number"),
        ("10", "must be an integer, not a string"),
        (True, "must be an integer, not a boolean"),
        (None, "must be an integer, not null"),
    ],
)
def test_a_bad_delay_ms_is_a_field_error(delay_ms, message):
    assert parse_task({"payload": "", "delay_ms": delay_ms}, LIMITS) == [FieldError("delay_ms", message)]


def test_parse_task_checks_one_decoded_object_without_raising():
    assert parse_task({"id": "a", "payload": ""}, LIMITS) == TaskSpec(id="a", payload="", max_retries=3)
    assert parse_task({"id": 1, "payload": "", "x": 0}, LIMITS) == [
        FieldError("x", "is not a known field"),
        FieldError("id", "must be a string, not a number"),
    ]


def test_unknown_fields_past_ten_are_counted_not_named():
    # One error each made a 4 MiB batch of tasks of 1,000 unknown keys answer 23.6 MB.
    document = {"payload": "", **{f"k{i}": 0 for i in range(1000)}}
    assert parse_task(document, LIMITS) == [
        *(FieldError(f"k{i}", "is not a known field") for i in range(10)),
        FieldError("", "has 990 more fields that are not known (not named)"),
    ]
    eleven = {"payload": "", **{f"k{i}": 0 for i in range(11)}}
    assert parse_task(eleven, LIMITS)[-1] == FieldError("", "has 1 more field that is not known (not named)")
    ten = {"payload": "", **{f"k{i}": 0 for i in range(10)}}
    assert [error.field for error in parse_task(ten, LIMITS)] == [f"k{i}" for i in range(10)]


@pytest.mark.parametrize(("document", "kind"), [([], "an array"), ("a", "a string"), (None, "null")])
def test_parse_task_names_a_document_that_is_not_an_object_by_the_empty_field(document, kind):
    assert parse_task(document, LIMITS) == [FieldError("", f"must be a JSON object, not {kind}")]


def test_an_omitted_max_retries_takes_the_default():
    assert parse(b'{"payload": "", "id": "a"}').max_retries == 3


def test_the_body_may_be_utf16():
    assert parse('{"id": "ü", "payload": ""}'.encode("utf-16")).id == "ü"


@pytest.mark.parametrize("inner", ["[]", '{"k": 1}', '"[[[[ not nesting"'])
def test_a_payload_may_nest_500_deep_and_no_deeper(inner):
    def payload(depth):
        return json.loads("[" * (depth - 1) + inner + "]" * (depth - 1))

    limits = dataclasses.replace(LIMITS, max_payload_chars=5000)
    deepest = 500 if inner != '"[[[[ not nesting"' else 501  # the string inside is no level
    assert parse_task({"payload": payload(deepest)}, limits).payload == payload(deepest)
    assert parse_task({"payload": payload(deepest + 1)}, limits) == [
        FieldError("payload", "must not nest lists and objects more than 500 levels deep")
    ]
    assert parse_task({"payload": "[" * 4000}, limits).payload == "[" * 4000  # a string does not nest


def test_the_payload_limit_counts_characters_not_bytes():
    assert parse('{"id": "a", "payload": "😀😀😀"}'.encode(), max_payload_chars=3).payload == "😀😀😀"
    with pytest.raises(Problem) as caught:
        parse('{"id": "a", "payload": "😀😀😀😀"}'.encode(), max_payload_chars=3)
    assert [(e.field, e.message) for e in caught.value.errors] == [("payload", "must be at most 3 characters")]


def test_a_json_payload_limit_counts_characters_of_its_compact_json_not_bytes():
    assert parse('{"id": "a", "payload": {"k": ["😀😀"]}}'.encode(), max_payload_chars=12).payload == {"k": ["😀😀"]}
    with pytest.raises(Problem) as caught:
        parse('{"id": "a", "payload": {"k": ["😀😀😀"]}}'.encode(), max_payload_chars=12)
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("payload", "must be at most 12 characters as compact JSON")
    ]


def test_measuring_a_json_payload_builds_no_encoder(monkeypatch):
    """json.dumps with options built a JSONEncoder for every non-string payload (about 9,000 instructions) and
    its C encoder (about 7,000 more): both are built once."""
    built = []
    real_init, real_c = json.JSONEncoder.__init__, json.encoder.c_make_encoder

    def counting_init(self, *args, **kwargs):
        built.append("JSONEncoder")
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(json.JSONEncoder, "__init__", counting_init)
    if real_c is not None:
        counting_c = lambda *args: built.append("c_make_encoder") or real_c(*args)  # noqa: E731
        monkeypatch.setattr(json.encoder, "c_make_encoder", counting_c)
    for payload in ('{"k": [1, 2.5, "x"]}', "[]", "7", "null"):
        parse(f'{{"id": "a", "payload": {payload}}}'.encode())
    assert built == []


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**30), 10**30) | st.text()
JSON_SCALARS |= st.floats(allow_nan=False, allow_infinity=False)


@given(st.recursive(JSON_SCALARS, lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=20))
@settings(max_examples=200, deadline=None)
def test_a_json_payload_is_measured_on_the_compact_json_that_json_dumps_writes(payload):
    compact = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    body = json.dumps({"id": "a", "payload": payload}).encode()
    if isinstance(payload, str) or LONE_SURROGATE.search(compact):
        return
    assert parse(body, max_payload_chars=len(compact)).payload == payload
    if compact:
        with pytest.raises(Problem):
            parse(body, max_payload_chars=len(compact) - 1)


def test_a_refusal_is_a_400_problem_with_field_errors():
    with pytest.raises(Problem) as caught:
        parse(b'{"id": "", "payload": 1e400, "max_retries": 21}')
    assert caught.value.status == 400
    assert [(e.field, e.message) for e in caught.value.errors] == [
        ("id", "must be 1 to 256 characters long"),
        ("payload", "must not contain a number too large for a 64-bit float"),
        ("max_retries", "must be between 0 and 20"),
    ]


@pytest.mark.parametrize(
    ("args", "query"),
    [
        ({}, ListQuery(None, 100)),
        ({"state": "running"}, ListQuery(State.RUNNING, 100)),
        ({"limit": "1"}, ListQuery(None, 1)),
        ({"limit": "1000", "state": "failed"}, ListQuery(State.FAILED, 1000)),
    ],
)
def test_list_query(args, query):
    assert parse_list_query(MultiDict(args), position_key=lambda: b"key") == query


# Fractions at a rounding edge of microseconds or milliseconds.
HALFWAY_FRACTIONS = (0.0, 0.0000005, 0.0005, 0.0004995, 0.4999995, 0.9995, 0.9999995, 0.99999949)


@pytest.mark.parametrize(
    ("timestamp", "text"),
    [
        (None, None),
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_800_000_000.125, "2027-01-15T08:00:00.125Z"),
        (1_800_000_000.9999, "2027-01-15T08:00:00.999Z"),  # truncated, never rounded into the next second
    ],
)
def test_times_are_rfc3339_utc_with_milliseconds(timestamp, text):
    assert rfc3339(timestamp) == text


def _datetime_text(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@settings(max_examples=2000)
@given(
    st.floats(0, 4e9)
    | st.builds(lambda whole, part: whole + part, st.integers(0, 4_000_000_000), st.sampled_from(HALFWAY_FRACTIONS))
)
def test_times_are_the_text_datetime_gives(timestamp):
    assert rfc3339(timestamp) == _datetime_text(timestamp)


def test_task_json_leaves_out_the_payload():
    task = Task("a", "secret payload", 2, State.QUEUED, 1, "RuntimeError: x", 0.0, 1.0, None, 2.5)
    assert task_to_json(task) == {
        "id": "a",
        "state": "queued",
        "attempts": 1,
        "max_retries": 2,
        "last_error": "RuntimeError: x",
        "result": None,
        "cancel_requested": False,
        "created_at": "1970-01-01T00:00:00.000Z",
        "started_at": "1970-01-01T00:00:01.000Z",
        "finished_at": None,
        "next_attempt_at": "1970-01-01T00:00:02.500Z",
    }


def test_the_forbidden_id_characters_are_exactly_the_control_and_surrogate_categories():
    forbidden = {chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Cc", "Cs")}
    matched = {chr(c) for c in range(sys.maxunicode + 1) if FORBIDDEN_ID_CHARACTER.fullmatch(chr(c))}
    assert matched == forbidden


def test_every_format_character_is_refused_in_an_id_and_other_non_ascii_characters_are_not():
    # Bidi overrides and zero-width characters reorder a log line or make an id read as another.
    for code in range(sys.maxunicode + 1):
        if unicodedata.category(chr(code)) == "Cf":
            (error,) = parse_task({"id": f"a{chr(code)}", "payload": ""}, LIMITS)
            assert (error.field, error.message.endswith(f": U+{code:04X} at index 1")) == ("id", True), error
    for task_id in ("äö 😀", "\u0645\u06cc", "ṩ\u0307", "a b c", "\u4e00 \u0416", "\U0001f469\U0001f3fd"):
        assert parse_task({"id": task_id, "payload": ""}, LIMITS).id == task_id


# Shown as nothing, or as a space: "vis-1\u3164" read as "vis-1" on the dashboard and in a log line.
BLANK_CHARACTER = (
    "must not contain blank or invisible characters (whitespace other than U+0020, fillers, variation selectors)"
)


def test_blank_and_default_ignorable_characters_are_refused_in_an_id():
    blank = [c for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp") and c != 0x20]
    # Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt) beyond category Cf, and U+2800 BRAILLE BLANK.
    ignorable = [0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180F, 0x2065, 0x3164, 0xFE00, 0xFE0F, 0xFFA0]
    ignorable += [0xFFF0, 0xFFF8, 0xE0000, 0xE0100, 0xE01EF, 0xE0FFF, 0x2800]
    for code in blank + ignorable:
        (error,) = parse_task({"id": f"vis-1{chr(code)}", "payload": ""}, LIMITS)
        assert (error.field, error.message) == ("id", f"{BLANK_CHARACTER}: U+{code:04X} at index 5"), error
    for code in (0x200B, 0x2060, 0xFEFF, 0xE0001):  # default-ignorable and Cf: named as format characters
        (error,) = parse_task({"id": f"vis-1{chr(code)}", "payload": ""}, LIMITS)
        assert error.message.startswith("must not contain invisible format characters"), error


@pytest.mark.parametrize("task_id", [" vis-1", "vis-1 ", "vis  1", " "])
def test_a_space_at_either_end_or_next_to_another_is_refused_in_an_id(task_id):
    # A page shows " vis-1" and "vis  1" as "vis-1" and "vis 1".
    (error,) = parse_task({"id": task_id, "payload": ""}, LIMITS)
    assert (error.field, error.message) == ("id", "must not start or end with a space, nor hold two in a row")


def test_task_json_carries_the_result_and_the_cancel_request():
    task = Task("a", "", 0, State.RUNNING, 1, created_at=0.0, result=[1, {"k": None}], cancel_requested=True)
    view = task_to_json(task)
    assert (view["result"], view["cancel_requested"]) == ([1, {"k": None}], True)
