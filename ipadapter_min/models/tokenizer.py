"""CLIP byte-level BPE tokenizer for Stable Diffusion 1.5 prompts, in plain Python.

It gives the same ids as ``transformers.CLIPTokenizer`` (the tokenizers-backed class that
diffusers pipelines use) built from the same vocabulary, called as
``tok(texts, padding="max_length", max_length=77, truncation=True)``. The pipeline it
reproduces, step by step:

1. ``<|startoftext|>`` / ``<|endoftext|>`` written literally in the raw text become their
   special ids; the text between them is processed piece by piece.
2. NFC, then per-character lower case (no context: a final "Σ" becomes "σ", not "ς";
   "İ" becomes "i" + U+0307).
3. Split into words: a literal ``<|startoftext|>`` / ``<|endoftext|>`` (as "<|", name, "|>"),
   the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits, runs of
   anything else that is not white space. White space only separates.
4. Each word's UTF-8 bytes are mapped to printable characters (GPT-2's byte-to-unicode
   table), "</w>" is appended to the last one, and BPE merges are applied by rank.

Unlike open_clip's tokenizer there is no ftfy repair and no HTML unescaping: "ﬁ", "½" and
mojibake such as "Ã©" are tokenised as written, as diffusers users get them.

The vocabulary is open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing
open_clip. Runtime dependencies: the standard library and torch.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import importlib.util
import os
import re
import unicodedata
from typing import Sequence

import torch

BOS_ID = 49406
EOS_ID = 49407
_SPECIALS = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
_SPECIAL_RE = re.compile("(<\\|startoftext\\|>|<\\|endoftext\\|>)")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")

# --- Unicode tables --------------------------------------------------------------------
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
def _char_class(ch: str) -> str:
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


def _nfc(text: str) -> str:
    parts = _NFC_BARRIER_RE.split(text)  # [text, barrier, text, barrier, ..., text]
    parts[::2] = [unicodedata.normalize("NFC", p) for p in parts[::2]]
    return "".join(parts)


def _lowercase(text: str) -> str:
    # Per character: str.lower() on a whole string would turn a final "Σ" into "ς".
    text = text.lower() if "\u03a3" not in text else "".join(c.lower() for c in text)
    return text.translate(_LOWER_TABLE)


def _split_words(text: str) -> list[str]:
    """The reference's pre-tokenizer: its Split regex followed by ByteLevel's regex."""
    words = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "<":
            special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
            if special is not None:  # ByteLevel's regex then splits it in three
                words += ["<|", special[2:-2], "|>"]
                i += len(special)
                continue
        elif ch == "'":
            c = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
            if c is not None:
                words.append(c)
                i += len(c)
                continue
        kind = _char_class(ch)
        if kind == "S":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # letters and symbols come in runs, digits one by one
            while j < n and _char_class(text[j]) == kind:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, in vocabulary order
    (printable bytes first, the others after)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_vocab_path() -> str:
    """open_clip's bpe_simple_vocab_16e6.txt.gz, located without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its BPE vocabulary file is needed")
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
        if os.path.exists(path):
            return path
    raise FileNotFoundError("bpe_simple_vocab_16e6.txt.gz not found in the open_clip package")


@functools.lru_cache(maxsize=None)
def _load_vocab(path: str) -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += list(_SPECIALS)
    vocab = {t: i for i, t in enumerate(tokens)}
    ranks = {m: i for i, m in enumerate(merges)}
    return vocab, ranks


class Tokenizer:
    """SD1.5's CLIP tokenizer, pure Python: same ids as the transformers one that diffusers
    uses, without depending on transformers/tokenizers (or open_clip's ftfy cleanup).

    ``tok(texts)`` gives a LongTensor [N, max_length]: BOS, at most max_length - 2 tokens,
    EOS, then EOS as padding. ``tok.encode(text)`` gives the bare token ids, ``tok.decode(ids)``
    text back.
    """

    def __init__(self, max_length: int = 77):
        if max_length < 2:
            raise ValueError(f"max_length must leave room for BOS and EOS, got {max_length}")
        self.max_length = max_length
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, EOS_ID
        self._vocab, self._ranks = _load_vocab(bpe_vocab_path())
        self._byte_chars = _bytes_to_unicode()
        self._tokens = {i: t for t, i in self._vocab.items()}
        self._bytes = {c: b for b, c in self._byte_chars.items()}
        self._cache: dict[str, list[int]] = {}

    def _bpe(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        chars = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
        parts = [*chars[:-1], chars[-1] + "</w>"]
        ranks = self._ranks
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: ranks.get(p, len(ranks)))
            if pair not in ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self._vocab[p] for p in parts]
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS, EOS, padding or truncation."""
        ids = []
        for k, piece in enumerate(_SPECIAL_RE.split(text)):
            if k % 2:  # a literal special token
                ids.append(_SPECIALS[piece])
            else:
                for word in _split_words(_lowercase(_nfc(piece))):
                    ids += self._bpe(word)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text back from token ids, as transformers' CLIPTokenizer.decode gives it (to name words
        in messages): lower case, a space after each word ("a photo, of" → "a photo , of"), special
        tokens written out. Bytes that are not UTF-8 (a character cut between tokens) become U+FFFD."""
        text = "".join(self._tokens[int(i)] for i in ids)  # special tokens are printable ASCII: their own bytes
        data = bytes(self._bytes[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = self.max_length
        rows = []
        for text in texts:
            ids = [self.bos_id, *self.encode(text)[: n - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (n - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)
