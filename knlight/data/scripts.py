"""Heuristic writing-system check: does a record's text use the script its language is written in?"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable

# Scripts (first word of the Unicode character name) a language's templates are expected to contain.
# Languages not listed are not checked.
# fmt: off
LATIN_SCRIPT_LANGUAGES: tuple[str, ...] = (
    "af", "az", "ca", "cs", "cy", "da", "de", "en", "es", "et", "fi", "fr", "ga", "gl", "hr", "hu",
    "id", "is", "it", "lt", "lv", "ms", "nl", "pl", "pt", "ro", "sk", "sl", "sq", "sv", "tr", "vi",
)
# fmt: on
EXPECTED_SCRIPTS: dict[str, frozenset[str]] = {
    **{code: frozenset({"LATIN"}) for code in LATIN_SCRIPT_LANGUAGES},
    **{code: frozenset({"CYRILLIC"}) for code in ("ru", "uk", "bg")},
    "ja": frozenset({"HIRAGANA", "KATAKANA", "CJK"}),
    "zh-hans": frozenset({"CJK"}),
    "zh-hant": frozenset({"CJK"}),
    "zh": frozenset({"CJK"}),
    "ko": frozenset({"HANGUL"}),
    "ar": frozenset({"ARABIC"}),
    "fa": frozenset({"ARABIC"}),
    "he": frozenset({"HEBREW"}),
    "el": frozenset({"GREEK"}),
    "hy": frozenset({"ARMENIAN"}),
    "th": frozenset({"THAI"}),
    "bn": frozenset({"BENGALI"}),
    "hi": frozenset({"DEVANAGARI"}),
}


@functools.lru_cache(maxsize=65536)
def letter_script(character: str) -> str | None:
    """Returns the script of a letter (e.g. "LATIN", "CJK", "HANGUL"), or None for non-letters."""
    if not unicodedata.category(character).startswith("L"):
        return None
    name = unicodedata.name(character, "")
    return name.split(" ", 1)[0] if name else None


def scripts_in(texts: Iterable[str]) -> set[str]:
    """Returns the set of scripts of the letters in some texts."""
    characters = set().union(*(set(text) for text in texts))
    return {script for script in map(letter_script, characters) if script is not None}


def lacks_expected_script(language: str, texts: Iterable[str]) -> bool:
    """Flags texts that contain letters but none in the script their language is written in.

    Args:
        language: The language code.
        texts: The texts to check (e.g. queries with subject and slot removed).

    Returns:
        True when the language is known, the texts contain letters, and none of them is in an expected
        script (e.g. a "ja" record whose template text is all Latin). False otherwise, including for
        languages without an entry in :data:`EXPECTED_SCRIPTS`.
    """
    expected = EXPECTED_SCRIPTS.get(language)
    if expected is None:
        return False
    found = scripts_in(texts)
    return bool(found) and not (found & expected)
