"""Reading the picture files users give (reference images, init images, masks, control images)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image


def open_image(path: Path, flag: str = "--image") -> Image.Image:
    if not path.is_file():
        raise ValueError(f"{flag} {path}: no such file")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{flag} {path}: not a readable image ({exc})") from None
