"""The demo's judge: a small CNN that reads a scene's five attributes back from its pixels.

Whether a generated image follows its prompt is scored by how many attributes the judge reads as
the prompt asked. The judge is independent of every model it judges: it shares no weights,
features or training loop with the VAE, UNet, text or image encoder, and learns only from freshly
rendered images labelled with their exact scene. So a model cannot score well by matching its own
encoder's idea of a "red star" (as a CLIP score computed with the adapter's own image encoder
could let it), only by drawing one.

Design:

- Fresh scenes every step (deterministic from the seed), never a fixed set: the judge cannot
  memorise images, and held-out renders from another seed measure exactly what it will see.
- Stride-2 convolutions down to a 4×4 map, flattened (no global pooling), so that the position and
  size heads keep where the shape is; GroupNorm rather than BatchNorm, so that a verdict on one
  image depends on that image only, never on running statistics of renders that generated images
  do not share.
- Mild augmentation, because generated images are blurrier and noisier than renders: gaussian
  blur (radius up to 1.5 px, half the images), pixel noise (std up to 0.04) and a slight colour
  jitter (gain ±6% per channel, offset ±0.03). It stays small so that neighbouring colours of the
  palette (orange/yellow, white/gray, red/pink) stay distinct.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from ..formats.files import CheckpointError, read_metadata, read_state_dict, save_safetensors
from .batches import draw_scenes
from .stage import run_stage, schedule, step_rng
from .world import ATTRIBUTES, SIZE, Scene

FORMAT = "ipadapter_min.demo.judge"
MAX_BLUR = 1.5
MAX_NOISE = 0.04
MAX_GAIN = 0.06
MAX_OFFSET = 0.03


class Judge(nn.Module):
    """Four stride-2 conv layers (64 → 4 px) and one hidden layer, then a linear head per
    attribute: 230k parameters, a training step of 64 images in ~0.1 s on one CPU core."""

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        chans = (3, width, 2 * width, 2 * width, 2 * width)
        layers = []
        for cin, cout in zip(chans, chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(),
                                      nn.Linear(chans[-1] * (SIZE // 16) ** 2, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels`` (N, 3, 64, 64) in [0, 1] (see :func:`judge_pixels`) → logits per attribute."""
        h = self.features(pixels * 2 - 1)
        return {name: head(h) for name, head in self.heads.items()}


def judge_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images → float32 (N, 3, 64, 64) in [0, 1], the judge's input. Images must be 64×64:
    the judge knows sizes and positions in pixels, so a resized image would be misread."""
    arrays = []
    for image in images:
        if image.size != (SIZE, SIZE):
            raise ValueError(f"the judge reads {SIZE}×{SIZE} images, got {image.size[0]}×{image.size[1]}")
        arrays.append(torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8))
    return torch.stack(arrays).view(len(arrays), SIZE, SIZE, 3).permute(0, 3, 1, 2).float() / 255


def _batch(seed: int, step: int, batch_size: int) -> tuple[torch.Tensor, dict]:
    """Fresh augmented renders and their labels (class indices per attribute), from (seed, step)."""
    scenes, images, rng = draw_scenes(seed, step, batch_size)
    images = [image.filter(ImageFilter.GaussianBlur(rng.uniform(0, MAX_BLUR))) if rng.random() < 0.5 else image
              for image in images]
    pixels = judge_pixels(images)
    n = len(scenes)
    generator = step_rng(seed, step)
    gain = 1 + MAX_GAIN * (2 * torch.rand(n, 3, 1, 1, generator=generator) - 1)
    offset = MAX_OFFSET * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    noise = MAX_NOISE * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(pixels.shape, generator=generator)
    pixels = (pixels * gain + offset + noise).clamp(0, 1)
    return pixels, attribute_labels(scenes)


def attribute_labels(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    """Each attribute's value index per scene: the heads' targets (and the probes')."""
    return {name: torch.tensor([values.index(s.attribute(name)) for s in scenes])
            for name, values in ATTRIBUTES.items()}


def judge_loss(judge: Judge, seed: int, step: int, batch_size: int) -> torch.Tensor:
    """The summed cross-entropy of the five heads on one step's fresh scenes."""
    pixels, labels = _batch(seed, step, batch_size)
    logits = judge(pixels)
    return sum(F.cross_entropy(logits[name], labels[name]) for name in ATTRIBUTES)


def train_judge(steps: int, folder: Path, batch_size: int = 64, seed: int = 0, progress: bool = True,
                lr: float = 3e-3) -> Judge:
    """A judge trained for ``steps`` steps on fresh scenes (resumable from ``folder``), the same for
    the same arguments. Adam (AdamW without decay), warm-up, cosine decay."""
    if steps < 1:
        raise ValueError(f"the judge needs at least one training step, got {steps}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        judge = Judge()
    run_stage("judge", folder, {"judge": judge}, lambda step: judge_loss(judge, seed, step, batch_size), steps,
              schedule(lr, steps, warmup=max(1, min(100, steps // 10))), progress=progress)
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
    """The judge's reading of each image: {attribute: value}."""
    judge.eval()
    readings = []
    for i in range(0, len(images), batch_size):
        logits = judge(judge_pixels(images[i:i + batch_size]))
        values = {name: [ATTRIBUTES[name][k] for k in logits[name].argmax(1).tolist()] for name in ATTRIBUTES}
        readings += [dict(zip(values, row)) for row in zip(*values.values())]
    return readings


def accuracy(judge: Judge, scenes: Sequence[Scene], images: Sequence[Image.Image]) -> dict[str, float]:
    """The fraction of images whose attribute the judge reads as in their scene, per attribute."""
    if len(scenes) != len(images) or not scenes:
        raise ValueError(f"accuracy needs as many scenes as images (and some), got {len(scenes)} and {len(images)}")
    readings = predict(judge, images)
    return {name: sum(r[name] == s.attribute(name) for r, s in zip(readings, scenes)) / len(scenes)
            for name in ATTRIBUTES}


def _metadata() -> dict[str, str]:
    """The class order of every head: a file is only read back against the same order."""
    return {"format": FORMAT, "attributes": json.dumps(ATTRIBUTES)}


def save_judge(judge: Judge, path: str | os.PathLike, overwrite: bool = False) -> None:
    save_safetensors(judge.state_dict(), path, _metadata(), overwrite)


def load_judge(path: str | os.PathLike) -> Judge:
    """A judge from :func:`save_judge`'s file; a one-line CheckpointError for another file, other
    attribute values, or a missing, unexpected or mis-shaped key."""
    tensors = read_state_dict(path)
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a judge file (metadata format {metadata.get('format')!r}, "
                              f"expected {FORMAT!r})")
    if metadata.get("attributes") != _metadata()["attributes"]:
        raise CheckpointError(f"{path}: the judge was trained on other attribute values than the demo world's")
    judge = Judge()
    expected = judge.state_dict()
    for key, value in tensors.items():
        if key not in expected:
            raise CheckpointError(f"{path}: key {key!r} is unexpected for the judge")
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{path}: key {key!r} has shape {list(value.shape)}, "
                                  f"expected {list(expected[key].shape)}")
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]!r} for the judge ({len(missing)} missing in all)")
    judge.load_state_dict(tensors)
    return judge.eval()
