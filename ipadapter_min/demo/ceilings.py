"""``python -m ipadapter_min.demo evaluate --ceilings``: where the demo's errors come from.

Two ceilings, each the best any later stage could do with what it is given:

- **the VAE's**: the judge's reading of renders after a VAE round trip (encode, decode), against
  the renders' own attributes. Whatever the judge cannot read there, no UNet that works through
  this VAE and its 8×8 latent can draw.
- **the image encoder's**: a linear probe per attribute (multinomial logistic regression, trained
  on fresh renders, read on the held-out ones) from exactly the features an adapter sees: the
  projected embedding for the base adapter, the penultimate patch tokens, flattened, for plus.
  What a linear map cannot read there, the adapter's linear projection cannot carry either.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ..loading.ip_adapter import load_image_encoder
from ..loading.sd15 import load_part
from ..models.clip_preprocess import preprocess
from ..models.image_encoder import ImageEncoder
from ..models.vae import VAE
from ..pipelines.image_processing import to_images
from .batches import draw_scenes, to_unit_range
from .judge import accuracy, attribute_labels, load_judge
from .world import ATTRIBUTES, Scene

PROBE_SEED = 31_337  # the probes' training renders: a seed no training stage draws from
PROBE_STEPS, PROBE_LR = 300, 1e-2  # full-batch Adam; the base probe's figures match L-BFGS's to 0.1%
CHUNK = 250


@torch.no_grad()
def vae_round_trip(vae: VAE, images: Sequence[Image.Image]) -> list[Image.Image]:
    """The images through the VAE and back, as the pipeline decodes (the latent mean, no sampling)."""
    return [image for i in range(0, len(images), CHUNK)
            for image in to_images(vae.decode(vae.encode(to_unit_range(images[i:i + CHUNK]))))]


@torch.no_grad()
def adapter_features(encoder: ImageEncoder, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
    """What each adapter variant sees: "base" the projected embedding (N, width), "plus" the
    penultimate hidden states (N, tokens, width)."""
    embeds, tokens = [], []
    for i in range(0, len(images), CHUNK):
        e, p = encoder(preprocess(list(images[i:i + CHUNK]), size=encoder.config.image_size))
        embeds.append(e)
        tokens.append(p)
    return {"base": torch.cat(embeds), "plus": torch.cat(tokens)}


def linear_probe(train: torch.Tensor, train_labels: dict[str, torch.Tensor], test: torch.Tensor,
                 test_labels: dict[str, torch.Tensor], steps: int = PROBE_STEPS) -> dict[str, float]:
    """Held-out accuracy per attribute of a linear classifier on standardised, flattened features."""
    train, test = train.flatten(1).float(), test.flatten(1).float()
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    scores = {}
    for name, values in ATTRIBUTES.items():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            layer = torch.nn.Linear(train.shape[1], len(values))
        optimizer = torch.optim.Adam(layer.parameters(), lr=PROBE_LR)
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(layer(train), train_labels[name]).backward()
            optimizer.step()
        with torch.no_grad():
            scores[name] = (layer(test).argmax(1) == test_labels[name]).float().mean().item()
    return scores


def rendered(seed: int, count: int) -> tuple[list[Scene], list[Image.Image]]:
    scenes, images = [], []
    for start in range(0, count, CHUNK):
        s, im, _ = draw_scenes(seed, start, min(CHUNK, count - start))
        scenes += s
        images += im
    return scenes, images


def ceilings(weights: Path, held_out: Sequence[Scene], references: Sequence[Image.Image], probe_images: int) -> dict:
    """The judge on the held-out renders and after the VAE's round trip; each adapter variant's probe."""
    judge = load_judge(weights / "judge.safetensors")
    vae = load_part(weights / "vae.safetensors", "vae").eval()
    report = {"judge_on_renders": accuracy(judge, held_out, references),
              "judge_after_vae_round_trip": accuracy(judge, held_out, vae_round_trip(vae, references))}
    encoder = load_image_encoder(weights / "image_encoder.safetensors").eval()
    train_scenes, train_images = rendered(PROBE_SEED, probe_images)
    train, test = adapter_features(encoder, train_images), adapter_features(encoder, references)
    train_labels, test_labels = attribute_labels(train_scenes), attribute_labels(held_out)
    for variant in ("base", "plus"):
        report[f"linear_probe_{variant}"] = linear_probe(train[variant], train_labels, test[variant], test_labels)
    report["probe_images"] = probe_images
    return report
