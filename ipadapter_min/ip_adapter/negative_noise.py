"""Noise images for an image prompt's negative side (ComfyUI_IPAdapter_plus's IPAdapterNoise).

Classifier-free guidance steers away from the negative image's tokens. By default they are those
of nothing (a zero embedding, or for plus adapters an empty image); a noisy negative instead
steers away from the *texture* of noise, which tends to sharpen results. Four kinds:

* fade: the picture (or black) faded towards uniform noise by ``strength``;
* dissolve: a ``strength`` fraction of the pixels replaced by uniform noise;
* gaussian: the picture plus Gaussian noise of standard deviation ``strength``;
* shuffle: the picture scrambled (an elastic warp, both flips) and multiplied by noise.

The randomness is seeded by the picture itself (the sum of its pixel values), as ComfyUI seeds
it, so a picture always gives the same noise.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

KINDS = ("fade", "dissolve", "gaussian", "shuffle")


def transforms():
    """torchvision's transforms, imported when a noise is made: importing torchvision takes about
    1.7 s, which every run of the sample command would otherwise pay."""
    import torchvision.transforms
    return torchvision.transforms


def square_pixels(image: Image.Image | None, size: int) -> torch.Tensor:
    """(1, size, size, 3) in [0, 1]: black, or the picture's centre square resized (bicubic,
    antialiased)."""
    if image is None:
        return torch.zeros(1, size, size, 3)
    pixels = torch.from_numpy(np.asarray(image.convert("RGB")).astype(np.float32) / 255.0)[None]
    T = transforms()
    resize = T.Compose([T.CenterCrop(min(pixels.shape[1], pixels.shape[2])),
                        T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC, antialias=True)])
    return resize(pixels.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


def negative_noise(kind: str, strength: float, image: Image.Image | None = None, blur: int = 0,
                   size: int = 224) -> Image.Image:
    """A ``size``×``size`` noise image of ``kind`` at ``strength`` (0…1), from ``image`` or black,
    optionally Gaussian-blurred with a kernel of ``blur`` pixels (made odd)."""
    if kind not in KINDS:
        raise ValueError(f"unknown negative noise {kind!r}; expected one of: {', '.join(KINDS)}")
    if not 0 <= strength <= 1:
        raise ValueError(f"noise strength must be in [0, 1], got {strength}")
    pixels, T = square_pixels(image, size), transforms()
    with torch.random.fork_rng(devices=[]):  # the global generator, as torchvision's transforms draw from it
        torch.manual_seed(int(torch.sum(pixels).item()) % 1000000007)
        if kind == "fade":
            noise = pixels * (1 - strength) + torch.rand_like(pixels) * strength
        elif kind == "dissolve":
            replaced = (torch.rand_like(pixels) < strength).float()
            noise = pixels * (1 - replaced) + torch.rand_like(pixels) * replaced
        elif kind == "gaussian":
            noise = pixels + torch.randn_like(pixels) * strength
        else:
            scramble = T.Compose([T.ElasticTransform(alpha=75.0, sigma=(1 - strength) * 3.5),
                                  T.RandomVerticalFlip(p=1.0), T.RandomHorizontalFlip(p=1.0)])
            pixels = scramble(pixels.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            factor = torch.randn_like(pixels) * (strength * 0.75)
            noise = pixels * (1 - factor) + factor
    noise = noise.clamp(0, 1)
    if blur > 0:
        noise = T.functional.gaussian_blur(noise.permute(0, 3, 1, 2), blur + (blur % 2 == 0)).permute(0, 2, 3, 1)
    return Image.fromarray((noise[0] * 255).round().clamp(0, 255).to(torch.uint8).numpy())
