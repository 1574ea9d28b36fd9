"""JSON shapes: one cattrs converter per API surface, so naming is decided once.

The HTTP API speaks camelCase, the Dashboard API snake_case (DESIGN.md §4).
Records inside records (e.g. a child's `detail: object` holding an actor's
statistics) are unstructured by their runtime class.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

from lokid.jsontypes import LONE_SURROGATE

log = logging.getLogger("lokid.http")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _make_converter(rename: bool) -> cattrs.Converter:
    converter = cattrs.Converter()

    def attrs_hook(cls: type) -> Any:
        renames = (
            {a.name: override(rename=camel(a.name)) for a in attrs.fields(cls)} if rename else {}
        )
        return make_dict_unstructure_fn(cls, converter, **renames)  # type: ignore[arg-type]

    converter.register_unstructure_hook_factory(attrs.has, attrs_hook)
    converter.register_unstructure_hook(Path, str)
    converter.register_unstructure_hook(
        enum.Enum, lambda member: converter.unstructure(member.value)
    )
    converter.register_unstructure_hook(
        float, lambda x: None if math.isinf(x) or math.isnan(x) else x
    )
    # `object`-typed fields: dispatch on what the value really is.
    converter.register_unstructure_hook_func(
        lambda t: t is object,
        lambda value: converter.unstructure(value, unstructure_as=value.__class__),
    )
    return converter


api_converter = _make_converter(rename=True)
dashboard_converter = _make_converter(rename=False)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes, the one encoder of every response body.

    A lone surrogate (a name whose bytes are not UTF-8) is refused or replaced where
    lokid reads it (docs/registry.md "Names that are not UTF-8"); one that got past
    every check becomes U+FFFD here, as there, rather than a 500.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        log.warning("a response held a lone surrogate; sent as U+FFFD")
        return LONE_SURROGATE.sub("\ufffd", text).encode()
