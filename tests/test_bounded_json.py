import json
import math

import pytest

from workerpool.bounded_json import TooLong, dumps_within


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        1,
        -2.5,
        "",
        'é\U0001f600\n"',
        [],
        {},
        [1, "two", [3.0], {"k": None}],
        {1: "int key", 2.5: "float key", None: "null key", False: "bool key"},
        ("a", "tuple"),
    ],
)
def test_what_fits_is_the_compact_json_json_dumps_writes(value):
    # Compact, as the stores keep a result and the API serves it: the limit is on that size.
    assert dumps_within(value, 1_000) == json.dumps(value, allow_nan=False, separators=(",", ":"))


@pytest.mark.parametrize(
    "value, error",
    [({1, 2}, TypeError), ([math.nan], ValueError), ({"k": math.inf}, ValueError), ([object()], TypeError)],
)
def test_what_is_not_json_raises_as_json_dumps_does(value, error):
    with pytest.raises(error) as caught:
        dumps_within(value, 1_000)
    with pytest.raises(error) as expected:
        json.dumps(value, allow_nan=False)
    assert str(caught.value) == str(expected.value)


def test_a_circular_value_raises_as_json_dumps_does():
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        dumps_within(loop, 1_000)


def test_strings_and_keys_past_the_limit_stop_the_encoding_at_the_first_string_past_it():
    with pytest.raises(TooLong) as caught:
        dumps_within({"ab": ["cde", "f" * 10, "never counted"]}, 9)
    assert caught.value.at_least == 4 + 5 + 12  # each string with its two quotes, up to the one past the limit


def test_a_text_whose_strings_take_exactly_the_limit_is_encoded():
    assert dumps_within(["abc"], 5) == '["abc"]'  # its string takes 5; the rest is not counted
