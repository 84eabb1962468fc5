"""``--from-png FILE``: run again the command that made a PNG, for the same bits.

A1111's text (``png_parameters``) names files without their folders and leaves options out, so
each PNG also carries the command line that made it, as JSON in a text chunk of its own
(``ipadapter_min``): paths made absolute, a drawn ``--seed -1`` and a sweep's values written
out, the precision written in, the output options left out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image

from .formats.lora import lora_argument
from .image_prompt_args import flag_spans

CHUNK = "ipadapter_min"
FLAG = "--from-png"
NOT_RECORDED = ("out", "force", "no_progress", "from_png")


def option_tokens(tokens: list[str]) -> tuple[str, list[str]]:
    """(the flag, its values) of one option's tokens, ``--flag=value`` or ``--flag value…``."""
    flag, equals, value = tokens[0].partition("=")
    return flag, ([value] if equals else []) + tokens[1:]


def recorded_argv(argv: list[str], parser: argparse.ArgumentParser, values: dict[str, str]) -> list[str]:
    """``argv`` as it is to be run again: the options in ``values`` (dest → text: a sweep's
    cell, a drawn seed, the precision) set to those, paths absolute, the output options out."""
    recorded, given = [], set()
    for dest, tokens in flag_spans(argv, parser):
        if dest in NOT_RECORDED:
            continue
        flag, texts = option_tokens(tokens) if dest else (None, tokens)
        if dest in values:
            texts = [values[dest]]
            given.add(dest)
        elif dest == "lora":
            texts = [absolute_lora(text) for text in texts]
        elif dest is not None and parser._option_string_actions[flag].type is Path:
            texts = [str(Path(text).absolute()) for text in texts]
        recorded += ([flag] if flag else []) + texts
    for dest in [d for d in values if d not in given]:  # in a fixed order: the same run, the same bytes
        recorded += ["--" + dest.replace("_", "-"), values[dest]]
    return recorded


def absolute_lora(text: str) -> str:
    """``FILE[:WEIGHT]`` with FILE absolute."""
    path, weight = lora_argument(text)
    return f"{path.absolute()}:{weight!r}"


def record(argv: list[str]) -> str:
    return json.dumps({"argv": argv})


def expand(argv: list[str]) -> list[str]:
    """``argv`` with ``--from-png FILE`` replaced by the command line recorded in FILE; the
    options given besides it come after, so they override the recorded ones (repeatable ones,
    such as --lora, add to them)."""
    for i, token in enumerate(argv):
        flag, equals, value = token.partition("=")
        if flag != FLAG:
            continue
        if not equals and i + 1 == len(argv):
            raise ValueError(f"{FLAG} needs the PNG file whose generation to run again")
        path = Path(value if equals else argv[i + 1])
        rest = argv[:i] + argv[i + (1 if equals else 2):]
        if FLAG in (t.partition("=")[0] for t in rest):
            raise ValueError(f"{FLAG} may be given once")
        return read(path) + rest
    return argv


def read(path: Path) -> list[str]:
    """The command line recorded in the PNG at ``path``."""
    if not path.is_file():
        raise ValueError(f"{FLAG} {path}: no such file")
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(CHUNK)
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{FLAG} {path}: not a readable image ({exc})") from None
    if text is None:
        raise ValueError(f"{FLAG} {path}: the PNG holds no {CHUNK} record of its command line (it was not made by "
                         "python -m ipadapter_min.sample, or its metadata were stripped)")
    try:
        argv = json.loads(text)["argv"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{FLAG} {path}: its {CHUNK} record is not the JSON this command writes") from None
    if not (isinstance(argv, list) and all(isinstance(t, str) for t in argv)):
        raise ValueError(f"{FLAG} {path}: its {CHUNK} record's argv is not a list of strings")
    return argv
