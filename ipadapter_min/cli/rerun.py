"""``--from-png FILE``: run again the command that made a PNG, for the same bits.

A1111's text (``png_parameters``) names files without their folders and leaves options out, so
each PNG also carries the command line that made it, as JSON in a text chunk of its own
(``ipadapter_min``): paths made absolute, a drawn ``--seed -1`` and a sweep's values written
out, the precision written in, the output options left out.

A PNG may come from anyone, so its record is data, not a command: only the options in
``REPLAYED`` are taken from it, those that say what the image is and which files it is made
from (files that are only read). Whatever else it holds (``--out``, ``--force``,
``--save-embeds``, ``--threads``, any option a later version adds) is dropped with a note, so a
shared PNG can never choose what is written. The command line that will run is printed first.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from PIL import Image

from ..formats.files import FileFormatError, one_line, shown
from ..formats.lora import lora_argument
from .parsing import flag_spans

CHUNK = "ipadapter_min"
FLAG = "--from-png"
NOT_RECORDED = ("out", "force", "no_progress", "from_png")
# What a record may set: the image's description and the files it is read from. An allowlist,
# so that an option added later is not taken from a record until it is added here.
REPLAYED = frozenset({
    "prompt", "negative_prompt", "seed", "steps", "guidance", "sampler", "eta", "width", "height", "num_images",
    "clip_skip", "long_prompt", "device", "dtype", "packed_convolutions", "model", "lora", "vae",
    "init_image", "strength", "mask", "mask_crop",
    "controlnet", "control_image", "control_scale", "control_start", "control_end", "guess_mode",
    "t2i_adapter", "adapter_image", "adapter_scale",
    "ip_adapter", "image_encoder", "image", "scale", "image_combine", "image_mask", "start", "end", "sigma_range",
    "weight_type", "composition_weight", "embeds_scaling", "negative_image", "black_negative", "negative_noise",
    "embeds", "no_crop", "reference_attention"})


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


def expand(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--from-png FILE`` replaced by what FILE's record may set (``REPLAYED``); the
    options given besides it come after, so they override the recorded ones (repeatable ones,
    such as --lora, add to them), and one given for a recorded file that is missing here takes
    its place. The command line that will run is printed, in one line."""
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
        expanded = replayed(read(path), path, parser, rest) + rest
        print("running: python -m ipadapter_min.sample " + one_line_command(expanded))
        return expanded
    return argv


def replayed(recorded: list[str], png: Path, parser: argparse.ArgumentParser, given: list[str]) -> list[str]:
    """The tokens of ``recorded`` that a record may set, each option whole; a recorded file that
    is missing here is an error naming it and its option, unless ``given`` supplies that option."""
    given_dests = {dest for dest, _ in flag_spans(given, parser)}
    kept, dropped = [], []
    for dest, tokens in flag_spans(recorded, parser):
        if dest not in REPLAYED:
            dropped.append(tokens[0].partition("=")[0])
            continue
        flag, texts = option_tokens(tokens)
        arity = parser._option_string_actions[flag].nargs
        if len(texts) != {None: 1, 0: 0}.get(arity, max(len(texts), 1)):
            raise FileFormatError(f"{FLAG} {png}: its record gives {flag} without its value")
        missing = [text for text in texts if is_path(parser, flag) and not file_of(flag, text).exists()]
        if missing and dest in given_dests:
            continue  # the option given with --from-png supplies it
        if missing:
            raise FileFormatError(f"{FLAG} {png}: its record reads {flag} {shown(missing[0])}, which is not here; give "
                             f"{flag} {parser._option_string_actions[flag].metavar or 'FILE'} to supply it")
        kept += [f"{flag}={texts[0]}"] if arity is None else tokens  # a value such as "--out" stays a value
    if dropped:
        print(f"{FLAG} {png}: not taken from its record (a PNG may not choose what is written or how the command "
              f"runs): {one_line_command(list(dict.fromkeys(dropped)))}", file=sys.stderr)
    return kept


def is_path(parser: argparse.ArgumentParser, flag: str) -> bool:
    return flag == "--lora" or parser._option_string_actions[flag].type is Path


def file_of(flag: str, text: str) -> Path:
    return lora_argument(text)[0] if flag == "--lora" else Path(text)


def one_line_command(argv: list[str]) -> str:
    """``argv`` as a shell would take it, on one line: a token holding a line break or another
    control character (a record may hold terminal escapes) is written in bash's $'…' quoting."""
    return " ".join(shlex.quote(t) if t.isprintable() else "$'" + t.encode("unicode_escape").decode("ascii")
                    .replace("'", "\\'") + "'" for t in argv)


def read(path: Path) -> list[str]:
    """The command line recorded in the PNG at ``path``."""
    if not path.is_file():
        raise FileFormatError(f"{FLAG} {path}: no such file")
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(CHUNK)
    except Exception as exc:  # PIL's decoders raise many kinds on damaged bytes (zlib's, struct's, …)
        raise FileFormatError(f"{FLAG} {path}: not a readable image ({one_line(exc)})") from None
    if text is None:
        raise FileFormatError(f"{FLAG} {path}: the PNG holds no {CHUNK} record of its command line (it was not made by "
                         "python -m ipadapter_min.sample, or its metadata were stripped)")
    try:
        argv = json.loads(text)["argv"]
    except (json.JSONDecodeError, KeyError, TypeError, RecursionError):
        raise FileFormatError(f"{FLAG} {path}: its {CHUNK} record is not the JSON this command writes") from None
    if not (isinstance(argv, list) and all(isinstance(t, str) for t in argv)):
        raise FileFormatError(f"{FLAG} {path}: its {CHUNK} record's argv is not a list of strings")
    return argv
