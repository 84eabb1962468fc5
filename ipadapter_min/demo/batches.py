"""Batches of the demo world drawn from (seed, step) alone, so every stage is resumable."""
from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from .world import Scene, random_scene, render


def draw_scenes(seed: int, step: int, count: int) -> tuple[list[Scene], list[Image.Image], random.Random]:
    """``count`` random scenes and their renders for this step; the generator, for further draws."""
    rng = random.Random(seed * 1_000_003 + step)
    scenes = [random_scene(rng) for _ in range(count)]
    return scenes, [render(s, rng.randrange(2**31)) for s in scenes], rng


def to_unit_range(images: list[Image.Image]) -> torch.Tensor:
    """RGB images → [N, 3, H, W] in [-1, 1] (the VAE's range)."""
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 127.5 - 1
