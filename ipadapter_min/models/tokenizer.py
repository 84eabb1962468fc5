"""CLIP byte-level BPE tokenizer for Stable Diffusion 1.5 prompts, in plain Python.

It gives the same ids as ``transformers.CLIPTokenizer`` (the tokenizers-backed class that
diffusers pipelines use) built from the same vocabulary, called as
``tok(texts, padding="max_length", max_length=77, truncation=True)``. The pipeline it
reproduces, step by step:

1. ``<|startoftext|>`` / ``<|endoftext|>`` written literally in the raw text become their
   special ids; the text between them is processed piece by piece.
2. NFC, then per-character lower case (no context: a final "Σ" becomes "σ", not "ς";
   "İ" becomes "i" + U+0307), with the reference's Unicode tables (``tokenizer_unicode.py``).
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

import functools
import gzip
import importlib.util
import os
import re
from typing import Sequence

import torch

from .tokenizer_unicode import char_class, lowercase, nfc

BOS_ID = 49406
EOS_ID = 49407
_SPECIALS = {"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID}
_SPECIAL_RE = re.compile("(<\\|startoftext\\|>|<\\|endoftext\\|>)")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


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
        kind = char_class(ch)
        if kind == "S":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # letters and symbols come in runs, digits one by one
            while j < n and char_class(text[j]) == kind:
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
                for word in _split_words(lowercase(nfc(piece))):
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
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), n)  # (N, 77)
