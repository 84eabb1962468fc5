"""PIL images → the image encoder's input: normalized pixels, exactly as transformers'
``CLIPImageProcessor`` makes them for the IP-Adapter pipelines (both of its backends)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def _shortest_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) with the short side at ``size``, long side truncated as transformers does."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess(images: Image.Image | Sequence[Image.Image], size: int = 224, crop: bool = True,
               backend: str = "torch") -> torch.Tensor:
    """PIL image(s) → normalized pixels [B, 3, size, size] float32 (on the CPU).

    crop=True (CLIPImageProcessor's default): shortest side → ``size`` (bicubic), center crop.
    crop=False: a plain ``size``×``size`` bicubic resize of the whole image (nothing cut away,
    the aspect ratio is not kept).

    backend="torch" resizes uint8 tensors with antialiased bicubic interpolation, exactly as
    transformers 5's default ``CLIPImageProcessor`` (torchvision backend) does, and so as
    diffusers' IP-Adapter pipelines do under transformers 5. backend="pil" resizes with PIL,
    exactly as ``CLIPImageProcessorPil`` (the transformers 4 default, which the official
    IP-Adapter code used). The two differ by at most a few uint8 levels on some pixels.
    """
    if isinstance(images, Image.Image):
        images = [images]
    if backend not in ("torch", "pil"):
        raise ValueError(f"backend must be 'torch' or 'pil', not {backend!r}")
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)
    out = []
    for image in images:
        image = _to_rgb(image)
        width, height = image.size
        new_w, new_h = _shortest_side_size(width, height, size) if crop else (size, size)
        if backend == "pil":
            if (new_w, new_h) != (width, height):
                image = image.resize((new_w, new_h), Image.BICUBIC)
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        else:
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            if (new_w, new_h) != (width, height):
                x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True,
                                  align_corners=False)[0]
        top, left = (new_h - size) // 2, (new_w - size) // 2
        x = x[:, top:top + size, left:left + size].float()
        if backend == "pil":  # transformers' PIL path: rescale, then normalize
            out.append((x / 255 - mean) / std)
        else:  # its torchvision path fuses the two
            out.append((x - mean * 255) / (std * 255))
    return torch.stack(out)
