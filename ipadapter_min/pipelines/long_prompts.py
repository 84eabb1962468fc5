"""Prompts longer than CLIP's 75 tokens, two ways (``LONG_PROMPT_MODES``).

- "truncate" (diffusers, the default): BOS, the first 75 tokens, EOS. The rest is dropped, with a
  warning that names the dropped words, so that a long prompt does not lose its end silently.
- "chunk" (AUTOMATIC1111's long prompts, ``FrozenCLIPEmbedderWithCustomWords``): the tokens are cut
  into chunks of 75, each encoded on its own as a 77-id row (BOS, tokens, EOS, EOS padding), and
  the embeddings are concatenated along the sequence: [1, 77 · chunks, width]. As in A1111, a full
  chunk whose last comma is at most 20 tokens back is cut after that comma (the words after it
  start the next chunk, so a phrase is not split), and the word BREAK ends a chunk. A1111's
  emphasis syntax ("(word:1.2)", "[word]") is not implemented: brackets are ordinary text here.

Classifier-free guidance batches the prompt with the negative prompt, so their embeddings must
have the same length: the shorter is padded with the empty prompt's embedding (A1111's pad_cond).
"""
from __future__ import annotations

import logging
import re

import torch

from ..models.tokenizer import Tokenizer

LONG_PROMPT_MODES = ("truncate", "chunk")
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack setting, at its default
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)  # A1111's: BREAK in capitals, as a word of its own

logger = logging.getLogger("ipadapter_min")


def prompt_ids(tokenizer: Tokenizer, text: str, mode: str = "truncate", which: str = "prompt") -> torch.Tensor:
    """Token ids [chunks, 77] for the text encoder: one row when truncating (with a warning naming
    the dropped words; ``which`` says whose they are), one per chunk otherwise."""
    if mode not in LONG_PROMPT_MODES:
        raise ValueError(f"long_prompt must be one of {', '.join(LONG_PROMPT_MODES)}, got {mode!r}")
    if mode == "chunk":
        return chunk_ids(tokenizer, text)
    ids, limit = tokenizer.encode(text), tokenizer.max_length - 2
    if len(ids) > limit:
        logger.warning('the %s is %d tokens, more than CLIP\'s %d: dropped "%s" (--long-prompt chunk keeps them)',
                       which, len(ids), limit, tokenizer.decode(ids[limit:]))
    return tokenizer([text])


def chunk_ids(tokenizer: Tokenizer, text: str, backtrack: int = COMMA_BACKTRACK) -> torch.Tensor:
    """A1111's chunks of ``text``, [chunks, 77]: at least one (an empty prompt is one chunk of
    padding), each laid out as the tokenizer lays out a short prompt. ``backtrack`` 0 turns the
    cut after a comma off."""
    size = tokenizer.max_length - 2
    comma, = tokenizer.encode(",")
    rows: list[list[int]] = []
    chunk: list[int] = []
    last_comma = -1  # the position of the current chunk's last comma, -1 if none

    def close(carry: list[int]) -> None:
        """End the current chunk; ``carry`` starts the next one."""
        nonlocal chunk, last_comma
        rows.append([tokenizer.bos_id, *chunk, tokenizer.eos_id] + [tokenizer.pad_id] * (size - len(chunk)))
        chunk, last_comma = carry, -1

    for k, piece in enumerate(_BREAK.split(text)):
        if k:  # a BREAK before this piece
            close([])
        for token in tokenizer.encode(piece):
            if token == comma:
                last_comma = len(chunk)
            elif backtrack and len(chunk) == size and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                cut = last_comma + 1
                chunk, carry = chunk[:cut], chunk[cut:]
                close(carry)
            if len(chunk) == size:
                close([])
            chunk.append(token)
    if chunk or not rows:
        close([])
    return torch.tensor(rows, dtype=torch.long)


def pad_with_empty(embedding: torch.Tensor, length: int, empty: torch.Tensor) -> torch.Tensor:
    """``embedding`` [1, n, width] followed by copies of the empty prompt's ``empty`` [1, 77, width]
    up to ``length`` tokens, so that it can share a guidance batch with a longer one."""
    repeats, rest = divmod(length - embedding.shape[1], empty.shape[1])
    if repeats < 0 or rest:
        raise ValueError(f"cannot pad {embedding.shape[1]} tokens to {length} with chunks of {empty.shape[1]}")
    return torch.cat([embedding, empty.repeat(1, repeats, 1)], dim=1)
