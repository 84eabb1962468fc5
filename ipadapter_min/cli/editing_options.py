"""The sample command's img2img and inpainting: start from a picture, or repaint its masked part."""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from ..pipelines.editing import IMG2IMG_STRENGTH, INPAINT_STRENGTH
from .image_files import open_image, open_mask
from .parsing import MAX_SIDE, finite, integer


def add_options(parser: argparse.ArgumentParser) -> None:
    """img2img and inpainting."""
    edit = parser.add_argument_group(
        "img2img and inpainting",
        "Start from a picture instead of pure noise. The output takes the picture's size (rounded down to a "
        "multiple of 8) unless --width/--height say otherwise. Both combine with an image prompt.")
    edit.add_argument("--init-image", type=Path, metavar="FILE",
                      help="img2img: the picture to start from (with --mask: the picture to repaint)")
    edit.add_argument("--strength", type=finite,
                      help="how much of the picture is noised away, in (0, 1]: 1 keeps only faint traces, 0.3 keeps "
                           "most of it; runs that fraction of --steps (default 0.8 for img2img and 1.0 for "
                           "inpainting, as diffusers)")
    edit.add_argument("--mask", type=Path, metavar="FILE",
                      help="inpainting: white repaints, black keeps (with --init-image). Works with a regular SD1.5 "
                           "and with the 9-channel inpainting checkpoints (sd-v1-5-inpainting)")
    edit.add_argument("--mask-crop", type=integer(0, MAX_SIDE), metavar="PAD",
                      help="inpaint only the mask's bounding box widened by PAD pixels, at the output size, and paste "
                           "the result back into the whole picture (diffusers' padding_mask_crop): more detail "
                           "for a small mask in a large picture")


def check_editing(args: argparse.Namespace) -> tuple[Image.Image | None, Image.Image | None]:
    """The img2img and inpainting options; (the init image, the mask), opened once for every image
    of a sweep; --strength defaults to diffusers'."""
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask needs --init-image: the picture whose masked part is repainted")
    if args.mask_crop is not None and args.mask is None:
        raise ValueError("--mask-crop applies to inpainting: give --mask and --init-image")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength applies to img2img and inpainting: give --init-image")
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    images = {flag: read(path, flag) for read, flag, path in ((open_image, "--init-image", args.init_image),
                                                               (open_mask, "--mask", args.mask))
              if path is not None}  # a missing or unreadable file fails before any loading
    if args.mask_crop is not None and images["--mask"].size != images["--init-image"].size:
        raise ValueError(f"--mask-crop: the mask ({'×'.join(map(str, images['--mask'].size))}) must be the size of "
                         f"the init image ({'×'.join(map(str, images['--init-image'].size))}), as the same box is cut "
                         "from both")
    if args.init_image is not None and args.strength is None:
        args.strength = INPAINT_STRENGTH if args.mask else IMG2IMG_STRENGTH
    return images.get("--init-image"), images.get("--mask")
