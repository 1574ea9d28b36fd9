"""`loads_bounded`: JSON from outside, with bounds on depth and integer size."""

from __future__ import annotations

import json

import pytest

from lokid.jsontypes import MAX_JSON_DEPTH, UnusableJson, loads_bounded


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("text", [nested(MAX_JSON_DEPTH), "[" + ", ".join(["[[1]]"] * 500) + "]"])
def test_text_within_the_bounds_parses_as_json_loads_does(text: str) -> None:
    assert loads_bounded(text) == json.loads(text)
    assert loads_bounded(text.encode()) == json.loads(text)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 100_000])
def test_deeper_than_the_bound_is_unusable(depth: int) -> None:
    with pytest.raises(UnusableJson, match=f"nested more than {MAX_JSON_DEPTH} levels"):
        loads_bounded(nested(depth))


def test_an_integer_python_will_not_convert_is_unusable() -> None:
    with pytest.raises(UnusableJson, match="an integer has more than 4300 digits"):
        loads_bounded('{"n": -' + "9" * 5000 + "}")


def test_malformed_text_is_still_a_decode_error() -> None:
    with pytest.raises(json.JSONDecodeError):
        loads_bounded("[1,")
