"""Characters a name lokid shows may not hold, by Unicode category, not by a hand list.

A token's or a registry project's name is shown in terminals (`loki token ls`,
`loki registry ls`), logs and the web page. A character that is not seen but acts
would let a name rewrite or reorder what is shown around it, or pass for another
name: control characters (Cc: an escape sequence), format characters (Cf: every
bidirectional control - U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069 -
zero-width characters such as U+200B, U+FEFF), surrogates (Cs), and line and
paragraph separators (Zl, Zp). The same set is what the CLI shows escaped.

Two format characters are let through: the zero-width joiner and non-joiner
(U+200D, U+200C). They only change how the visible characters beside them are
drawn, and names need them: an emoji sequence (👩‍💻), Persian and Indic words.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

UNSHOWN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})
JOINERS = frozenset("\u200c\u200d")  # format characters that are part of what is drawn


def unshown(char: str) -> bool:
    """Whether `char` is one a shown name may not hold (and the CLI escapes)."""
    return unicodedata.category(char) in UNSHOWN_CATEGORIES and char not in JOINERS


def forbidden_character(text: str) -> str | None:
    """The first character of `text` a shown name may not hold, else None."""
    if text.isprintable():  # C: no Cc, Cf, Cs, Zl, Zp (nor other spaces, Co, Cn)
        return None
    return next((char for char in text if unshown(char)), None)


def regex_class(refused: Callable[[str], bool] = unshown) -> str:
    """The characters of the Basic Multilingual Plane `refused` names, as the body of a
    regular expression class (`\\u0000-\\u001f...`): for the OpenAPI document's
    patterns, which cannot name a category. Surrogates are left out: a pattern
    engine reads them as halves of other characters (the server refuses them)."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if not 0xD800 <= code <= 0xDFFF and refused(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))
    return "".join(
        f"\\u{low:04x}" if low == high else f"\\u{low:04x}-\\u{high:04x}" for low, high in ranges
    )
