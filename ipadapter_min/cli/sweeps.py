"""Comma lists on the command line: ``--scale 0,0.25,0.5,0.75,1`` (and ``--seed``, ``--sampler``,
``--guidance``) make one image per value, or per pair of values when two options are lists, and
a grid of them all with each column and row labelled, the reference image in its corner, because
a λ sweep is the first thing anyone does with an IP-Adapter and should not need a loop.
"""
from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from .parsing import value_text

SWEPT = ("scale", "seed", "sampler", "guidance")  # in this order, the first list is the columns, the second the rows
MIN_CELL = 128  # smaller images (the demo's 64×64) are enlarged in the grid, so that labels fit above them


def comma_list(convert):
    """An argparse ``type``: one value, or several separated by commas."""
    def parse(text: str) -> list:
        try:
            return [convert(part.strip()) for part in text.split(",")]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    parse.__name__ = getattr(convert, "__name__", "value")  # argparse names the type in its error message
    return parse


@dataclass(frozen=True)
class Axis:
    """One option given as a list."""

    dest: str
    values: tuple

    def label(self, value) -> str:
        return f"{self.dest} {value_text(value)}"


@dataclass(frozen=True)
class Cell:
    """One image of the sweep: the value of each listed option."""

    values: dict

    def label(self) -> str:
        """What the progress line says of it, e.g. ``scale 0.5, seed 3``."""
        return ", ".join(f"{dest} {value_text(value)}" for dest, value in self.values.items())

    def suffix(self) -> str:
        """What the image's file name gets after the output's stem, e.g. ``-scale0.5-seed3``."""
        return "".join(f"-{dest}{value_text(value)}" for dest, value in self.values.items())


class Sweep:
    """The listed options of a command (none, one or two)."""

    def __init__(self, axes: list[Axis]):
        if len(axes) > 2:
            raise ValueError("at most two of " + ", ".join(f"--{d}" for d in SWEPT) + " may be comma lists (the grid "
                             f"has columns and rows), got {len(axes)}: " + ", ".join(f"--{a.dest}" for a in axes))
        self.axes = axes

    @classmethod
    def from_args(cls, args: argparse.Namespace, groups: list[argparse.Namespace]) -> "Sweep":
        """The lists among ``args`` (``--scale``: of the image-prompt group), each option then set
        to its first value, so that checks made for one image see one value."""
        axes = []
        for dest in SWEPT:
            holders = groups if dest == "scale" else [args]
            lists = [h for h in holders if isinstance(getattr(h, dest), list) and len(getattr(h, dest)) > 1]
            if lists and len(holders) > 1:
                raise ValueError(f"--{dest} with a comma list sweeps a single image prompt: with several --ip-adapter "
                                 "give each one value")
            if lists:
                axes.append(Axis(dest, tuple(getattr(lists[0], dest))))
            for holder in holders:
                value = getattr(holder, dest)
                if isinstance(value, list):
                    setattr(holder, dest, value[0])
        return cls(axes)

    def __bool__(self) -> bool:
        return bool(self.axes)

    def cells(self) -> list[Cell]:
        """Row by row: the first axis varies fastest."""
        rows = itertools.product(*(axis.values for axis in reversed(self.axes)))
        return [Cell({axis.dest: value for axis, value in zip(self.axes, reversed(row))}) for row in rows]

    def grid(self, images: list[Image.Image], reference: Image.Image | None = None) -> Image.Image:
        """The images of ``cells()`` in a labelled grid; ``reference`` (the first reference
        image) in the top-left corner."""
        columns = self.axes[0] if self.axes else Axis("", ("",))
        rows = self.axes[1] if len(self.axes) > 1 else None
        width, height = images[0].size
        zoom = max(1, -(-MIN_CELL // min(width, height)))
        cell_w, cell_h = width * zoom, height * zoom
        font = label_font()
        row_labels = [rows.label(v) for v in rows.values] if rows else []
        corner = cell_w if reference is not None else 0
        left = corner + max([text_width(font, label) + 8 for label in row_labels], default=0)
        top = getattr(font, "size", 10) + 10
        sheet = Image.new("RGB", (left + cell_w * len(columns.values), top + cell_h * (len(images) // len(columns.values))),
                          "white")
        draw = ImageDraw.Draw(sheet)
        if reference is not None:
            sheet.paste(reference.convert("RGB").resize((cell_w, cell_h), Image.LANCZOS), (0, top))
            draw.text((4, 4), "reference", fill="black", font=font)
        for x, value in enumerate(columns.values):
            draw.text((left + x * cell_w + 4, 4), columns.label(value), fill="black", font=font)
        for y, label in enumerate(row_labels):
            draw.text((corner + 4, top + y * cell_h + (cell_h - top) // 2), label, fill="black", font=font)
        for i, image in enumerate(images):
            y, x = divmod(i, len(columns.values))
            sheet.paste(image.resize((cell_w, cell_h), Image.NEAREST), (left + x * cell_w, top + y * cell_h))
        return sheet


def label_font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=14)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: its small bitmap font
        return ImageFont.load_default()


def text_width(font, text: str) -> int:
    left, _, right, _ = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return right - left
