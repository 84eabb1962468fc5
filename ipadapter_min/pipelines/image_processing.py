"""Pictures in and out of the latent pipeline (init images, masks, control images), prepared as
diffusers' ``VaeImageProcessor`` prepares them, so the same inputs give the same tensors.

Its order matters for the bits: crop, then resize (PIL Lanczos, in the picture's own mode), then
convert to RGB or grayscale, then scale to [0, 1].
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps

Box = tuple[int, int, int, int]  # left, top, right, bottom, as PIL's crop takes it


def size_of(image: Image.Image, width: int | None = None, height: int | None = None) -> tuple[int, int]:
    """(width, height) to process at: the given ones, else the picture's, each rounded down to a
    multiple of 8 (the VAE's factor)."""
    width, height = width or image.width, height or image.height
    return width - width % 8, height - height % 8


def require_output_size(image: Image.Image, width: int, height: int, what: str) -> None:
    """A control image must already be the output's size (rounded down to 8): resizing it would
    move the structure it carries. ``what`` names it in the one-line error."""
    if size_of(image) != (width, height):
        raise ValueError(f"{what} is {image.width}×{image.height}, the output {width}×{height}: give a control image "
                         "of the output size")


def resize(image: Image.Image, width: int, height: int, mode: str = "stretch") -> Image.Image:
    """To exactly width × height: ``stretch`` (any aspect), ``fill`` (keep the aspect, centre,
    extend the edges into the bands left over) or ``crop`` (keep the aspect, centre, cut off what
    sticks out)."""
    if mode == "stretch":
        return image.resize((width, height), resample=Image.LANCZOS)
    ratio, source_ratio = width / height, image.width / image.height
    if mode == "fill":
        w = width if ratio < source_ratio else image.width * height // image.height
        h = height if ratio >= source_ratio else image.height * width // image.width
    else:
        w = width if ratio > source_ratio else image.width * height // image.height
        h = height if ratio <= source_ratio else image.height * width // image.width
    resized = image.resize((w, h), resample=Image.LANCZOS)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(resized, box=(width // 2 - w // 2, height // 2 - h // 2))
    if mode == "fill":
        band = (height // 2 - h // 2) if ratio < source_ratio else (width // 2 - w // 2)
        if band > 0 and ratio < source_ratio:  # bands above and below: stretch the first and last rows
            canvas.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(resized.resize((width, band), box=(0, h, width, h)), box=(0, band + h))
        elif band > 0 and ratio > source_ratio:  # bands left and right: the first and last columns
            canvas.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(resized.resize((band, height), box=(w, 0, w, height)), box=(band + w, 0))
    return canvas


def unit_pixels(image: Image.Image, width: int, height: int, mode: str = "stretch", box: Box | None = None,
                grayscale: bool = False) -> torch.Tensor:
    """(1, C, height, width) float32 in [0, 1]; C is 3, or 1 when ``grayscale``."""
    if box is not None:
        image = image.crop(box)
    image = resize(image, width, height, mode)
    image = image.convert("L" if grayscale else "RGB")
    array = np.array(image).astype(np.float32) / 255.0
    array = array[..., None] if grayscale else array
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


def vae_pixels(image: Image.Image, width: int, height: int, mode: str = "stretch", box: Box | None = None
               ) -> torch.Tensor:
    """An image for the VAE's encoder: (1, 3, height, width) in [-1, 1]."""
    return 2.0 * unit_pixels(image, width, height, mode, box) - 1.0


def binary_mask(mask: Image.Image, width: int, height: int, mode: str = "stretch", box: Box | None = None
                ) -> torch.Tensor:
    """(1, 1, height, width): 1 where the picture is repainted (mask ≥ 0.5 after resizing), else 0."""
    values = unit_pixels(mask, width, height, mode, box, grayscale=True)
    return (values >= 0.5).float()


def crop_box(mask: Image.Image, width: int, height: int, pad: int) -> Box:
    """The region around a mask that inpainting with a crop works on: the bounding box of the
    mask's non-zero pixels, ``pad`` wider on each side, then grown to the aspect ratio of the
    output (width / height) and kept inside the picture (diffusers' ``get_crop_region``)."""
    values = np.array(mask.convert("L"))
    rows, cols = np.nonzero(values.any(axis=1))[0], np.nonzero(values.any(axis=0))[0]
    if len(rows) == 0:
        raise ValueError("the mask is all black: there is nothing to repaint, so no region to crop")
    h, w = values.shape
    left, right, top, bottom = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    x1, y1, x2, y2 = int(max(left - pad, 0)), int(max(top - pad, 0)), int(min(right + pad, w)), int(min(bottom + pad, h))
    if (x2 - x1) / (y2 - y1) > width / height:
        y1, y2 = _grow(y1, y2, int((x2 - x1) / (width / height) - (y2 - y1)), h)
    else:
        x1, x2 = _grow(x1, x2, int((y2 - y1) * (width / height) - (x2 - x1)), w)
    return x1, y1, x2, y2


def _grow(start: int, end: int, extra: int, limit: int) -> tuple[int, int]:
    """An interval grown by ``extra`` (half on each side), shifted back inside [0, limit]."""
    start, end = start - extra // 2, end + extra - extra // 2
    if end >= limit:
        start, end = start - (end - limit), limit
    if start < 0:
        start, end = 0, end - start
    return start, min(end, limit)


def paste_back(result: Image.Image, original: Image.Image, mask: Image.Image, box: Box | None = None) -> Image.Image:
    """The original picture over the generated one wherever the mask is black, so only the masked
    region changes; with a ``box``, the result (made for that region) is first scaled into it on a
    canvas of the original's size (diffusers' ``apply_overlay``)."""
    width, height = original.size
    kept = Image.new("RGBa", (width, height))
    kept.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    if box is not None:
        x1, y1, x2, y2 = box
        canvas = Image.new("RGBA", (width, height))
        canvas.paste(resize(result, x2 - x1, y2 - y1, "crop"), (x1, y1))
        result = canvas.convert("RGB")
    result = result.convert("RGBA")
    result.alpha_composite(kept.convert("RGBA"))
    return result.convert("RGB")


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """VAE output in [-1, 1] → 8-bit RGB images (rescaled in the model's dtype, then rounded in
    float32, in diffusers' order, so fp16/bf16 images match the reference's too)."""
    array = ((pixels / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array.permute(0, 2, 3, 1).cpu().numpy()]
