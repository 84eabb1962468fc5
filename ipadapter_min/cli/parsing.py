"""What the commands share: checked numbers, values shown as typed, the command line cut into its
options, and errors on one line.

Every numeric option is parsed by one of these argparse types, so that NaN, ±inf or a number
out of range is refused while the command line is read, before any file is opened, with the
option and its allowed range named: ``error: argument --guidance: nan is not a finite number``.
Ranges that depend on other options (steps per sampler, sizes per model) are checked by each
command's checks. A command's main returns :func:`failed` of what stopped it.
"""
from __future__ import annotations

import argparse
import math
import sys

from ..formats.files import message

MAX_SIDE = 16384  # pixels: 2048 latents a side, far past what SD1.5 was trained for (the memory check refuses sooner)
MAX_COUNT = 100_000  # steps, images, batches: a typo's 10**9 is refused, any real run is not


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the option, not the usage block."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def finite(text: str) -> float:
    """A float that is a number: guidance, λ, weights, learning rates."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def integer(low: int, high: int = MAX_COUNT):
    """An argparse type: an int in [low, high]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value
    parse.__name__ = "integer"
    return parse


def fraction(text: str) -> float:
    """A float in [0, 1]: start and end of a step range."""
    value = finite(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g} is outside [0, 1]")
    return value


def at_least(low: float):
    """An argparse type: a finite float ≥ low (learning rates, weight decay)."""
    def parse(text: str) -> float:
        value = finite(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value:g} is below {low:g}")
        return value
    parse.__name__ = "number"
    return parse


def side(text: str) -> int:
    """An image side in pixels: a positive multiple of 8 (the VAE's factor), at most MAX_SIDE."""
    value = integer(8, MAX_SIDE)(text)
    if value % 8:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 8 (the VAE's factor)")
    return value



def value_text(value) -> str:
    """A value as one would type it (0.5, not 0.50000001): for file names, labels and the PNG's text."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def failed(exc: BaseException) -> int:
    """The exit status of a command stopped by ``exc``, its one line printed: 2 for bad input or
    a failed write, 130 for Ctrl-C (every write in flight has been undone by then)."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    print(f"error: {message(exc)}", file=sys.stderr)
    return 2


def flag_spans(argv: list[str], parser: argparse.ArgumentParser) -> list[tuple[str | None, list[str]]]:
    """``argv`` cut into (dest, tokens) spans, one per option with its values (dest None for
    tokens no option claims)."""
    spans, i = [], 0
    while i < len(argv):
        token = argv[i]
        action = parser._option_string_actions.get(token.split("=", 1)[0]) if token.startswith("--") else None
        if action is None or "=" in token:
            spans.append((action.dest if action else None, [token]))
            i += 1
            continue
        end = i + 1
        if action.nargs in ("+", "*"):
            while end < len(argv) and not argv[end].startswith("--"):
                end += 1
        elif action.nargs != 0:
            end = i + 1 + (action.nargs if isinstance(action.nargs, int) else 1)
        spans.append((action.dest, argv[i:end]))
        i = end
    return spans
