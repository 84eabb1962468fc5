"""Stage 3: the demo's UNet, trained as SD1.5 was: ε-prediction at uniform timesteps of SD1.5's
schedule, conditioned on the frozen text encoder's states, 10% empty captions (so that
classifier-free guidance has an unconditional branch), with an EMA of the weights for sampling.

The training images are rendered and encoded once (the VAE's latent mean and std, so each step
still draws its own latent sample); captions are drawn afresh at every step, full, partial or
empty (``world.training_caption``), so one image teaches every way of describing it.
"""
from __future__ import annotations

import copy
import random

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..models.text_encoder import TextEncoder
from ..models.tokenizer import Tokenizer
from ..models.unet import UNet
from ..models.vae import VAE
from ..samplers.schedule import SD15
from .batches import draw_scenes, to_unit_range
from .models import UNET
from .world import scene_from_index, scene_index, training_caption

EMA_DECAY = 0.999


@torch.no_grad()
def encode_dataset(vae: VAE, count: int, seed: int, progress: bool = True) -> dict:
    """``count`` scenes (fixed by ``seed``) with their latent moments: {"scenes" (attribute
    indices, ``world.scene_index``), "mean", "std"}: tensors only, so it loads without pickle."""
    scenes, means, stds = [], [], []
    chunk = 256
    for start in tqdm(range(0, count, chunk), desc="encoding the UNet's images", disable=not progress):
        batch_scenes, images, _ = draw_scenes(seed, start, min(chunk, count - start))
        mean, logvar = vae.encode_moments(to_unit_range(images))
        scenes += [scene_index(scene) for scene in batch_scenes]
        means.append(mean)
        stds.append(torch.exp(0.5 * logvar))
    return {"scenes": torch.tensor(scenes), "mean": torch.cat(means), "std": torch.cat(stds)}


class DenoiserTraining:
    """The trained UNet, its EMA, and the frozen parts one step needs."""

    def __init__(self, text_encoder: TextEncoder, vae: VAE, dataset: dict, seed: int, batch: int):
        self.unet = UNet(UNET)
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.text_encoder, self.scaling = text_encoder.eval().requires_grad_(False), vae.cfg.scaling_factor
        self.dataset, self.seed, self.batch = dataset, seed, batch
        self.tokenizer, self.schedule = Tokenizer(), SD15
        self.states: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def text_states(self, captions: list[str]) -> torch.Tensor:
        """The frozen text encoder's states, (B, 77, width): each caption's computed once, and alone, as
        the pipeline computes a prompt's, so a state never depends on the batch it first came in. The
        world has about 48,000 captions (1.9 GB of states); encoding them took a fifth of a step."""
        for caption in dict.fromkeys(captions):
            if caption not in self.states:
                self.states[caption] = self.text_encoder(self.tokenizer([caption]))[0]
        return torch.stack([self.states[caption] for caption in captions])

    def loss(self, step: int) -> torch.Tensor:
        rng = random.Random(self.seed * 1_000_003 + step)
        generator = torch.Generator().manual_seed(self.seed * 7919 + step)
        rows = torch.tensor([rng.randrange(len(self.dataset["scenes"])) for _ in range(self.batch)])
        scenes = [scene_from_index(self.dataset["scenes"][i].tolist()) for i in rows.tolist()]
        text = self.text_states([training_caption(s, rng) for s in scenes])
        mean, std = self.dataset["mean"][rows], self.dataset["std"][rows]
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * self.scaling
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, 1000, (self.batch,), generator=generator)
        pred = self.unet(self.schedule.add_noise(latents, noise, timesteps), timesteps, text)
        return F.mse_loss(pred, noise)

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))  # a short memory early on
        for averaged, current in zip(self.ema.parameters(), self.unet.parameters()):
            averaged.lerp_(current, 1 - decay)
