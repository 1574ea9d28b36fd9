"""JSON from outside: how error messages name a value's type ("expected a string, got a
number"), and `loads_bounded`, the parse for text lokid did not write."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from typing import Any

MAX_JSON_DEPTH = 100
"""How deeply JSON from outside (request bodies, WebSocket messages, `.loki` files) may
nest. Deeper values are refused when parsed: near Python's recursion limit they would
fail later, wherever they are encoded or walked (a 500, a crashed task)."""


class UnusableJson(ValueError):
    """Valid JSON that lokid does not take: nested past `MAX_JSON_DEPTH`, an integer
    with more digits than Python converts (`sys.get_int_max_str_digits`, 4300), or
    (where asked for) an object with the same key twice."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict; `UnusableJson` when a key comes twice."""
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise UnusableJson(f"the key {json.dumps(key[:80])} appears twice in one object")
            seen.add(key)
    return value


def loads_bounded(text: str | bytes, *, unique_keys: bool = False, **options: Any) -> Any:
    """`json.loads` for untrusted text: `json.JSONDecodeError` for malformed text,
    `UnusableJson` for text it parses but lokid refuses (see there).

    `unique_keys`: refuse an object with a key twice. JSON leaves its meaning open
    (RFC 8259 §4) and `json.loads` keeps the last, so `{"scopes": ["read"],
    "scopes": ["admin"]}` would be read one way by a proxy or log in front and
    another by lokid; requests and WebSocket messages ask for it, files written by
    other tools (which the reference reads last-wins) do not.

    As cheap as `json.loads` for ordinary text: the integer bound is Python's own
    (its `ValueError` is translated), and the depth is walked only when the text
    has more brackets than the bound allows.
    """
    if unique_keys:
        options["object_pairs_hook"] = _unique_keys
    try:
        value = json.loads(text, **options)
    except (json.JSONDecodeError, UnusableJson):
        raise
    except RecursionError:
        raise UnusableJson(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:  # int() past `sys.get_int_max_str_digits`
        if "digits" not in str(exc):
            raise
        most = sys.get_int_max_str_digits()
        raise UnusableJson(f"an integer has more than {most} digits") from None
    if _brackets(text) > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise UnusableJson(f"nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _brackets(text: str | bytes) -> int:
    """How many arrays and objects `text` may open at most (a bound on its depth)."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


LONE_SURROGATE = re.compile("[\ud800-\udfff]")
"""A character UTF-8 cannot encode: a file name's byte that is not UTF-8 (PEP 383), or what
JSON's "\\ud800" escape decodes to when it is not half of a pair."""
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


def may_hold_lone_surrogates(text: str) -> bool:
    """Whether JSON `text` may decode to a lone surrogate (cheap: one search of the text)."""
    return LONE_SURROGATE.search(text) is not None or _ESCAPED_SURROGATE.search(text) is not None


def undecodable(text: str) -> bool:
    """Whether `text` holds a lone surrogate: a file name whose bytes are not UTF-8 (Python
    turns each such byte into U+DC80-U+DCFF, PEP 383), or a JSON string's lone "\\ud800".

    JSON answers, SQLite and the API cannot carry such a name faithfully (UTF-8 cannot
    encode it), so a path holding one is never registered, listed or stored: it is only
    reported, `shown` (docs/registry.md "Names that are not UTF-8"; a session's folders likewise).
    """
    return LONE_SURROGATE.search(text) is not None


def shown(text: str) -> str:
    """`text` with each lone surrogate written as an escape, for problems and messages: a
    byte that is not UTF-8 as `\\xff` (its value, as the CLI shows a control character),
    any other lone surrogate as `\\ud800`. Valid text is returned as it is."""
    if not undecodable(text):
        return text
    return LONE_SURROGATE.sub(_escape_surrogate, text)


def _escape_surrogate(found: re.Match[str]) -> str:
    code = ord(found.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte it stands for
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def without_lone_surrogates(value: Any) -> Any:
    """`value` (parsed JSON) with each lone surrogate in its strings and keys replaced by
    U+FFFD, as `errors="replace"` does for bytes that are not UTF-8: text lokid did not
    write goes into SQLite, events and answers, none of which can carry one (a crashed
    actor, a 500). The same object when there is none."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value) if LONE_SURROGATE.search(value) else value
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    return value


def json_error_text(exc: json.JSONDecodeError) -> str:
    """`exc`'s message and place: "Invalid control character at line 1 column 11".
    Some of the decoder's messages end in "at" already (they expect its own format)."""
    return f"{exc.msg.removesuffix(' at')} at line {exc.lineno} column {exc.colno}"


def _deeper_than(value: Any, most: int) -> bool:
    """Whether `value` nests arrays and objects more than `most` levels (no recursion)."""
    pending: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, dict | list) else []
    while pending:
        item, depth = pending.pop()
        if depth > most:
            return True
        children = item.values() if isinstance(item, dict) else item
        pending.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__
