"""What a shown name may not hold (`lokid.textrules`), the CLI's escapes, the schema's pattern."""

from __future__ import annotations

import re
import unicodedata

import pytest

from lokid import cli, textrules
from lokid.http.enterprise import TOKEN_BODY

# Unicode's Bidi_Control property (PropList.txt): every one must be refused.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
INVISIBLE = "\u200b\u2060\ufeff\u00ad"


@pytest.mark.parametrize("char", [*BIDI_CONTROLS, *INVISIBLE, "\x1b", "\x85", "\u2028"])
def test_bidi_controls_and_invisible_characters_are_refused_and_shown_escaped(
    char: str,
) -> None:
    assert textrules.forbidden_character(f"a{char}b") == char
    shown = cli._shown(f"a{char}b")
    assert char not in shown and shown == "a" + char.encode("unicode_escape").decode() + "b"
    pattern = TOKEN_BODY["properties"]["name"]["pattern"]
    assert re.fullmatch(pattern, f"a{char}b") is None  # the OpenAPI document says so too


@pytest.mark.parametrize(
    "text",
    [
        "ci bot",
        "Zoë",
        "日本語",
        "a\u00a0b",
        "👩\u200d💻",  # an emoji sequence: a zero-width joiner
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a non-joiner
    ],
)
def test_ordinary_names_pass_and_are_shown_as_they_are(text: str) -> None:
    assert textrules.forbidden_character(text) is None
    assert cli._shown(text) == text
    assert re.fullmatch(TOKEN_BODY["properties"]["name"]["pattern"], text)


def test_the_schema_class_is_every_refused_character_of_the_first_plane() -> None:
    body = textrules.regex_class()
    refused = re.compile(f"[{body}]")
    for code in range(0x10000):
        char = chr(code)
        surrogate = 0xD800 <= code <= 0xDFFF  # left to the server
        assert bool(refused.fullmatch(char)) == (textrules.unshown(char) and not surrogate)
    assert unicodedata.category("\u200e") == "Cf"
