"""`loads_bounded`: JSON from outside, with bounds on depth and integer size."""

from __future__ import annotations

import json
import re

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


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('{"scopes": ["read"], "scopes": ["admin"]}', "scopes"),
        ('{"a": 1, "options": {"x": 1, "y": 2, "x": 1}}', "x"),  # nested, same value
        ('[{"ok": 1}, {"b": 1, "b": 2}]', "b"),
        ('{"\\u00e9": 1, "\u00e9": 2}', "\u00e9"),  # one key escaped, one not
        ('{"\\ud800": 1, "\\ud800": 2}', "\ud800"),  # shown escaped: any error body can hold it
    ],
)
def test_a_key_twice_is_unusable_where_asked(text: str, key: str) -> None:
    said = f"the key {json.dumps(key)} appears twice in one object"
    with pytest.raises(UnusableJson, match=re.escape(said)):
        loads_bounded(text, unique_keys=True)
    assert loads_bounded(text) == json.loads(text)  # files from other tools: last one wins


def test_unique_keys_parses_ordinary_text_as_json_loads_does() -> None:
    text = '{"a": {"b": [1, {"c": null}]}, "d": "e", "f": {}}'
    assert loads_bounded(text, unique_keys=True) == json.loads(text)
