"""Reading the picture files users give (reference images, init images, masks, control images)
as an image viewer shows them.

The reference implementations open a file and call ``.convert("RGB")``, which gets many files
wrong: a phone photo stored sideways stays sideways (no EXIF orientation), transparent pixels
show whatever colour hides under them (often black), a 16-bit grayscale PNG or TIFF turns almost
white (its 0..65535 values are clipped to 255), a CMYK file ignores its ICC profile. An ordinary
RGB file still gives exactly ``.convert("RGB")``'s pixels: embedded RGB profiles are not applied,
as the references do not colour-manage, so parity with them stays bit-exact. An animation gives
its first frame; a file whose header claims more than PIL's MAX_IMAGE_PIXELS fails at once.
"""
from __future__ import annotations

import io
import re
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageOps

from ..formats.files import FileFormatError, one_line


def open_image(path: Path, flag: str = "--image") -> Image.Image:
    """The file's first frame, upright, as RGB, fully loaded and the file closed; a missing,
    unreadable or too large file raises a one-line ValueError naming ``flag`` and ``path``."""
    return viewed_rgb(*decoded(path, flag))


def open_mask(path: Path, flag: str = "--mask") -> Image.Image:
    """As :func:`open_image`, but a transparent pixel of a mask means "not painted", not white: a
    mask with transparency is its alpha channel (opaque = painted), as AUTOMATIC1111's
    create_binary_mask reads it; an opaque mask is read as any other picture."""
    image, name = decoded(path, flag)
    image = eight_bit(image, name)
    if has_alpha(image):
        alpha = image.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.convert("RGB")
    return viewed_rgb(image, name)


def decoded(path: Path, flag: str) -> tuple[Image.Image, str]:
    """(the first frame, decoded and turned upright (EXIF orientation), in the file's own mode;
    the name errors give it)."""
    name = f"{flag} {path}"
    if not path.is_file():
        raise FileFormatError(f"{name}: no such file")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes for minutes.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.seek(0)  # the first frame of an animation
                image.load()
                return upright(image), name
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        # raised inside Image.open, before there is an image: PIL's message holds the size
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{pixels[1]} pixels" if pixels else "the image"
        raise FileFormatError(f"{name}: {size} is more than the {Image.MAX_IMAGE_PIXELS} this reads "
                         "(a decompression bomb?)") from None
    except (OSError, SyntaxError, EOFError, struct.error, ValueError, TypeError, IndexError, ZeroDivisionError,
            MemoryError) as exc:  # what PIL's decoders raise on damaged bytes
        raise FileFormatError(f"{name}: not a readable image ({one_line(exc)})") from None


def upright(image: Image.Image) -> Image.Image:
    """A copy, detached from the file, turned as its EXIF orientation says; a damaged EXIF block
    is ignored (the picture as stored), as viewers do."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL's "Corrupt EXIF data" warnings
            return ImageOps.exif_transpose(image)
    except (SyntaxError, ValueError, struct.error):
        return image.copy()


def has_alpha(image: Image.Image) -> bool:
    """An alpha channel or a transparent colour (as PIL's has_transparency_data, which Pillow < 10.1 lacks)."""
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def viewed_rgb(image: Image.Image, name: str) -> Image.Image:
    image = eight_bit(image, name)
    if image.mode == "CMYK":
        return cmyk_rgb(image)
    if has_alpha(image):
        # Onto white, as AUTOMATIC1111 flattens img2img inputs (its default background #ffffff)
        # and as a viewer shows them; .convert("RGB") would show the colour hidden under them.
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    try:
        return image.convert("RGB")  # L, 1, P, RGB, YCbCr, ...
    except ValueError:
        raise FileFormatError(f"{name}: images of mode {image.mode} are not read (save it as RGB)") from None


def eight_bit(image: Image.Image, name: str) -> Image.Image:
    """16-bit grayscale (modes I;16*; and I, as PIL opens signed 16-bit and 32-bit TIFFs, taken as
    0..65535 and clipped) to 8-bit L by >> 8, the high byte, which is what PIL itself does to
    16-bit RGB(A) PNGs; a tRNS gray value becomes an alpha channel (LA). Other modes are returned
    as they are."""
    if image.mode == "F":
        raise FileFormatError(f"{name}: a floating-point image (mode F) has no agreed 0..255 range; save it as "
                         "an 8- or 16-bit file")
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image).astype(np.int64)
    gray = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray.putalpha(Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8)))
    return gray


def cmyk_rgb(image: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile to sRGB; without one (or with a broken one), PIL's
    own conversion. Adobe's inverted CMYK JPEGs are already un-inverted by PIL on load."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            return ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(profile)),
                                             ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError):
            pass
    return image.convert("RGB")
