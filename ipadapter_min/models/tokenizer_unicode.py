"""The Unicode the tokenizer's reference runs: character classes, NFC and lower case as its Rust
code has them, where they differ from Python's ``unicodedata``."""
from __future__ import annotations

import bisect
import functools
import re
import unicodedata

# The reference runs Rust code whose Unicode data differ from Python's `unicodedata`
# (14.0 in Python 3.11). These tables hold exactly the differences, measured over every
# code point against tokenizers 0.23 (tests/test_tokenizer.py re-checks them all).

# White space for the Oniguruma `\s` used by tokenizers: the Unicode White_Space property.
# Python's str.isspace() also counts U+001C..U+001F, which the reference keeps as symbols.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Code points that Oniguruma's \p{L} / \p{N} (Unicode 16/17) know and Python 3.11 does not.
_EXTRA_LETTERS = (
    (0x1C89, 0x1C8A), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3),
    (0x10D4A, 0x10D65), (0x10D6F, 0x10D85), (0x10EC2, 0x10EC4), (0x1123F, 0x11240),
    (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5),
    (0x113B7, 0x113B7), (0x113D1, 0x113D1), (0x113D3, 0x113D3), (0x11BC0, 0x11BE0),
    (0x11F02, 0x11F02), (0x11F04, 0x11F10), (0x11F12, 0x11F33), (0x1342F, 0x1342F),
    (0x13441, 0x13446), (0x13460, 0x143FA), (0x16100, 0x1611D), (0x16D40, 0x16D6C),
    (0x18CFF, 0x18CFF), (0x1B132, 0x1B132), (0x1B155, 0x1B155), (0x1DF25, 0x1DF2A),
    (0x1E030, 0x1E06D), (0x1E4D0, 0x1E4EB), (0x1E5D0, 0x1E5ED), (0x1E5F0, 0x1E5F0),
    (0x2B739, 0x2B739), (0x2EBF0, 0x2EE5D), (0x31350, 0x323AF),
)
_EXTRA_NUMBERS = (
    (0x10D40, 0x10D49), (0x116D0, 0x116E3), (0x11BF0, 0x11BF9), (0x11F50, 0x11F59),
    (0x16130, 0x16139), (0x16D70, 0x16D79), (0x1CCF0, 0x1CCF9), (0x1D2C0, 0x1D2D3),
    (0x1E4F0, 0x1E4F9), (0x1E5F1, 0x1E5FA),
)
# Lower-case mappings that Rust's char::to_lowercase has and Python 3.11 lacks:
# (first, last, target of first); the run maps onto consecutive targets.
_EXTRA_LOWER = (
    (0x1C89, 0x1C89, 0x1C8A), (0xA7CB, 0xA7CB, 0x0264), (0xA7CC, 0xA7CC, 0xA7CD),
    (0xA7CE, 0xA7CE, 0xA7CF), (0xA7D2, 0xA7D2, 0xA7D3), (0xA7D4, 0xA7D4, 0xA7D5),
    (0xA7DA, 0xA7DA, 0xA7DB), (0xA7DC, 0xA7DC, 0x019B), (0x10D50, 0x10D65, 0x10D70),
    (0x16EA0, 0x16EB8, 0x16EBB),
)
# The reference's NFC (Rust crate unicode-normalization-alignments) has older tables: these
# combining marks (Unicode 10+) have class 0 there and the Dives Akuru pair U+11935 U+11930
# does not compose. They act as barriers: NFC runs on the text between them only.
_NFC_BARRIERS = (
    (0x07FD, 0x07FD), (0x0898, 0x089F), (0x08CA, 0x08D3), (0x09FE, 0x09FE),
    (0x0C3C, 0x0C3C), (0x0D3B, 0x0D3C), (0x0EBA, 0x0EBA), (0x1715, 0x1715),
    (0x1ABF, 0x1ACE), (0x1DF6, 0x1DFA), (0xA82C, 0xA82C), (0x10D24, 0x10D27),
    (0x10EAB, 0x10EAC), (0x10F46, 0x10F50), (0x10F82, 0x10F85), (0x11070, 0x11070),
    (0x1133B, 0x1133B), (0x1145E, 0x1145E), (0x11839, 0x1183A), (0x11930, 0x11930),
    (0x11935, 0x11935), (0x1193D, 0x1193E), (0x11943, 0x11943), (0x119E0, 0x119E0),
    (0x11A34, 0x11A34), (0x11A47, 0x11A47), (0x11A99, 0x11A99), (0x11D42, 0x11D42),
    (0x11D44, 0x11D45), (0x11D97, 0x11D97), (0x16FF0, 0x16FF1), (0x1E130, 0x1E136),
    (0x1E2AE, 0x1E2AE), (0x1E2EC, 0x1E2EF),
)
_NFC_BARRIER_RE = re.compile(
    "([" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in _NFC_BARRIERS) + "])"
)
_LOWER_TABLE = {
    c: chr(target + c - first)
    for first, last, target in _EXTRA_LOWER
    for c in range(first, last + 1)
}


def _in_ranges(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    i = bisect.bisect_right(ranges, (code, 0x10FFFF)) - 1
    return i >= 0 and ranges[i][0] <= code <= ranges[i][1]


@functools.lru_cache(maxsize=65536)
def char_class(ch: str) -> str:
    """'S' white space, 'L' letter, 'N' number, 'P' anything else."""
    if ch in _WHITESPACE:
        return "S"
    cat = unicodedata.category(ch)
    if cat[0] in "LN":
        return cat[0]
    if cat == "Cn":  # unassigned for Python, maybe not for the reference
        if _in_ranges(ord(ch), _EXTRA_LETTERS):
            return "L"
        if _in_ranges(ord(ch), _EXTRA_NUMBERS):
            return "N"
    return "P"


def nfc(text: str) -> str:
    parts = _NFC_BARRIER_RE.split(text)  # [text, barrier, text, barrier, ..., text]
    parts[::2] = [unicodedata.normalize("NFC", p) for p in parts[::2]]
    return "".join(parts)


def lowercase(text: str) -> str:
    # Per character: str.lower() on a whole string would turn a final "Σ" into "ς".
    text = text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)
    return text.translate(_LOWER_TABLE)
