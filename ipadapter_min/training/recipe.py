"""Training an IP-Adapter as the official recipe does (tencent-ailab/IP-Adapter tutorial_train.py):
the UNet, text and image encoders frozen; the image projection and the 16 (to_k_ip, to_v_ip)
pairs trained on the ε-prediction loss, every UNet row conditional with its own image tokens at λ = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..ip_adapter.adapter import IPAdapter
from ..models.configs import (CONTEXT_DIM, VIT_H, VIT_H_TOKENS, VIT_H_WIDTH, AdapterSpec, ImageEncoderConfig,
                              ResamplerConfig)
from ..models.image_encoder import ImageEncoder
from ..models.text_encoder import TextEncoder
from ..models.tokenizer import Tokenizer
from ..models.unet import UNet
from ..models.vae import VAE
from ..samplers import NoiseSchedule

# MyDataset.__getitem__'s rates: image only, text only, both (one uniform draw per sample)
DROP_IMAGE, DROP_TEXT, DROP_BOTH = 0.05, 0.05, 0.05
VARIANTS = ("base", "plus", "full-face")
TRAIN_TIMESTEPS = 1000


def variant_spec(variant: str, encoder: ImageEncoderConfig, context_dim: int = CONTEXT_DIM) -> AdapterSpec:
    """The official architecture of a variant, its tokens ``context_dim`` wide (the UNet's
    cross-attention width, as the official scripts take it): base (4 tokens from the projected
    embedding, of any width; with a ViT-bigG/14 encoder, the vit-G adapter), plus (the 16-query
    resampler on the penultimate hidden states) or full-face (an MLP on all 257 of them). plus and
    full-face read ViT-H/14's hidden states, as the releases do."""
    if variant == "base":
        return AdapterSpec.on_embedding(encoder.proj_dim, 4, context_dim)
    if variant == "plus":
        resampler = ResamplerConfig(dim=context_dim, output_dim=context_dim)  # tutorial_train_plus.py's
        return AdapterSpec("plus", VIT_H, "penultimate", VIT_H_WIDTH, 16, context_dim, resampler)
    if variant == "full-face":
        return AdapterSpec("full-face", VIT_H, "penultimate", VIT_H_WIDTH, VIT_H_TOKENS, context_dim)
    raise ValueError(f"unknown variant {variant!r}: expected one of {', '.join(VARIANTS)}")


def new_adapter(spec: AdapterSpec, unet: UNet) -> IPAdapter:
    """A fresh adapter for ``unet``: the projection as PyTorch initialises it (as the official
    script), the image key/value projections copied from the text ones."""
    adapter = IPAdapter(spec, widths=unet.cross_attention_widths())
    init_ip_layers_from_unet(adapter, unet)
    return adapter


@torch.no_grad()
def init_ip_layers_from_unet(adapter: IPAdapter, unet: UNet) -> None:
    """Start each image key/value projection from its layer's text one (the official init): at the
    first step the image tokens are attended to as if they were text."""
    for ip, attn in zip(adapter.ip_layers, unet.cross_attention_layers(), strict=True):
        ip.to_k_ip.weight.copy_(attn.to_k.weight)
        ip.to_v_ip.weight.copy_(attn.to_v.weight)


def draw_drops(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_image, drop_text), n bools each: which samples train the unconditional branches CFG
    needs at sampling time. One uniform draw r per sample, as the official dataset: r < 0.05 drops
    the image, then 0.05 drops the text, then 0.05 both."""
    r = torch.rand(n, generator=generator)
    image_only = r < DROP_IMAGE
    text_only = (r >= DROP_IMAGE) & (r < DROP_IMAGE + DROP_TEXT)
    both = (r >= DROP_IMAGE + DROP_TEXT) & (r < DROP_IMAGE + DROP_TEXT + DROP_BOTH)
    return image_only | both, text_only | both


def diffusion_loss(unet: UNet, adapter: IPAdapter, latents: torch.Tensor, text_states: torch.Tensor,
                   image_features: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   schedule: NoiseSchedule) -> torch.Tensor:
    """The ε-MSE (fp32) of one training batch, differentiable in the adapter's weights.

    ``image_features`` are the image encoder's, one row per sample, already zeroed where the
    image is dropped (base variant: zeros in the projected-embedding space); ``text_states`` hold
    the empty prompt's where the text is dropped. A fresh hook per call, so its cached image K/V
    are this step's and carry the graph back to the projection and to_k_ip/to_v_ip.
    """
    hook = adapter.hook(adapter(image_features))  # no negative tokens: every row conditional, λ = 1
    pred = unet(schedule.add_noise(latents, noise, timesteps), timesteps, text_states, hook)
    return F.mse_loss(pred.float(), noise.float())


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one optimizer step's randomness, a function of (seed, step) only: a
    resumed run draws what the uninterrupted one drew, and every process of a data-parallel run
    draws the values of all the step's samples and takes its own slice."""
    state = np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


@dataclass
class StepDraws:
    """Everything random about one step's n samples (all processes, all micro-steps), drawn in
    one fixed order."""
    drop_image: torch.Tensor
    drop_text: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor  # ε, the UNet's target
    latent_noise: torch.Tensor  # samples the VAE's latent distribution

    @classmethod
    def draw(cls, n: int, latent_shape: tuple[int, ...], generator: torch.Generator) -> "StepDraws":
        drop_image, drop_text = draw_drops(n, generator)
        timesteps = torch.randint(0, TRAIN_TIMESTEPS, (n,), generator=generator)
        noise = torch.randn((n, *latent_shape), generator=generator)
        return cls(drop_image, drop_text, timesteps, noise, torch.randn((n, *latent_shape), generator=generator))

    def take(self, rows: torch.Tensor) -> "StepDraws":
        return StepDraws(*(getattr(self, f)[rows] for f in self.__dataclass_fields__))


class FrozenEncoders:
    """The frozen half of training: text states, VAE latent moments and image features. Only
    these differ between reading images and reading a --cache."""

    def __init__(self, vae: VAE, text_encoder: TextEncoder, image_encoder: ImageEncoder, spec: AdapterSpec,
                 tokenizer: Tokenizer | None = None):
        self.vae, self.text_encoder, self.image_encoder, self.spec = vae, text_encoder, image_encoder, spec
        self.tokenizer = tokenizer or Tokenizer()

    @torch.no_grad()
    def text_states(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return self.text_encoder(self.tokenizer(texts).to(next(self.text_encoder.parameters()).device)).to(device)

    @torch.no_grad()
    def latent_moments(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of the VAE's latent distribution (unscaled), fp32."""
        weight = self.vae.quant_conv.weight
        mean, logvar = self.vae.encode_moments(pixels.to(weight.device, weight.dtype))
        return mean.float(), torch.exp(0.5 * logvar.float())

    @torch.no_grad()
    def image_features(self, clip_pixels: torch.Tensor) -> torch.Tensor:
        """What the projection consumes: the embedding (base) or penultimate hidden states."""
        encoder = self.image_encoder
        pixels = clip_pixels.to(encoder.device, encoder.dtype)
        return (encoder.penultimate(pixels) if self.spec.uses_hidden_states else encoder(pixels)[0]).float()

    @torch.no_grad()
    def dropped_image_features(self) -> torch.Tensor:
        """A dropped image's features, one row: base zeroes the embedding; plus and full-face
        (tutorial_train_plus.py) zero the pixels and encode them."""
        size = self.image_encoder.config.image_size
        zeros = torch.zeros(1, 3, size, size)
        if self.spec.uses_hidden_states:
            return self.image_features(zeros)
        return torch.zeros(1, self.spec.feature_dim, device=self.image_encoder.device)

    def scaled_latents(self, mean: torch.Tensor, std: torch.Tensor, latent_noise: torch.Tensor) -> torch.Tensor:
        """A sample of the latent distribution (diffusers' latent_dist.sample(): mean + std·ε),
        times the VAE's scaling factor."""
        return (mean + std * latent_noise.to(mean.device)) * self.vae.cfg.scaling_factor


class AdapterLoss(nn.Module):
    """The trained module: the adapter (its parameters are the only ones here), with a forward
    that returns the loss, so that DistributedDataParallel wraps exactly what trains. The frozen
    UNet is held outside the module tree: DDP neither broadcasts nor watches its 860M weights."""

    def __init__(self, adapter: IPAdapter, unet: UNet, schedule: NoiseSchedule):
        super().__init__()
        self.adapter = adapter
        self.frozen = (unet, schedule)

    def forward(self, latents: torch.Tensor | None, text_states: torch.Tensor, image_features: torch.Tensor,
                noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``latents`` None: this process has no sample this micro-step (every image damaged); a zero
        loss still takes part in DDP's gradient averaging."""
        if latents is None:
            return sum(p.sum() for p in self.adapter.parameters()) * 0.0
        unet, schedule = self.frozen
        return diffusion_loss(unet, self.adapter, latents, text_states, image_features, noise, timesteps, schedule)
