"""The sample command's output: the PNG files, which never overwrite what is there without
--force, each with the settings that made it (A1111's text, and the command line for --from-png)."""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import PngImagePlugin

from ..formats.files import write_atomically
from . import rerun
from .sweeps import Sweep


def add_options(parser: argparse.ArgumentParser) -> None:
    """Where the images go, and a PNG's command to run again."""
    g = parser.add_argument_group("output")
    g.add_argument("--out", type=Path, default=Path("out.png"),
                   help="PNG file to write, with the settings in its metadata (AUTOMATIC1111's 'parameters' text, "
                        "and the command line for --from-png). With comma lists: the labelled grid, each image "
                        "beside it as OUT-<option><value>.png")
    g.add_argument("--from-png", type=Path, metavar="FILE",
                   help="run again the command that made FILE (a PNG written by this command), for the same bits on "
                        "the same device; options given besides it override the recorded ones (repeatable ones such as "
                        "--lora and --image add to them)")
    g.add_argument("--force", action="store_true", help="overwrite existing output files")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    return [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def sweep_paths(out: Path, sweep: Sweep, count: int) -> list[list[Path]]:
    """The files of each cell's images: OUT's own without a sweep, else OUT-<option><value>.png
    beside the grid at OUT."""
    if not sweep:
        return [output_paths(out, count)]
    if count > 1:
        raise ValueError("--num-images makes several images of one setting: with comma lists each cell of the grid "
                         "is one image (list several --seed values instead)")
    output_paths(out, 1)
    paths = [[out.with_name(f"{out.stem}{cell.suffix()}{out.suffix}")] for cell in sweep.cells()]
    names = [p for [p] in paths]
    twice = next((p for p in names if names.count(p) > 1), None)
    if twice is not None:
        raise ValueError(f"two images of the sweep would both be {twice}: give each value of a comma list once")
    return paths


def check_outputs(args: argparse.Namespace, groups: list[argparse.Namespace], sweep: Sweep) -> list[list[Path]]:
    """The files of each of the sweep's cells; an error where one of them, the grid or a
    --save-embeds file exists and --force is not given."""
    paths = sweep_paths(args.out, sweep, args.num_images)
    saved = [g.save_embeds for g in groups if g.ip_adapter and g.save_embeds is not None]
    existing = [p for p in [*sum(paths, []), *([args.out] if sweep else []), *saved] if p.exists()]
    if existing and not args.force:
        raise ValueError(f"{existing[0]} already exists (pass --force to overwrite it)")
    return paths


def save_png(image, path: Path, parameters: str, overwrite: bool, run: str | None = None) -> None:
    """Write atomically: a crash leaves either the old file or the whole new one. ``parameters``:
    A1111's text; ``run``: the command line to make it again (``rerun``)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    if run is not None:
        info.add_text(rerun.CHUNK, run)
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite)


def recorded(args: argparse.Namespace, parser: argparse.ArgumentParser, values: dict) -> str:
    """The PNG's record of the command line, with ``values`` (dest → value) written in."""
    values = {"seed": args.seed, "dtype": args.dtype, **values}
    return rerun.record(rerun.recorded_argv(args.argv, parser, {d: str(v) for d, v in values.items()}))
