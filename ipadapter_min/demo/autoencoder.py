"""Stage 2: the demo's VAE (f = 8, 4 latent channels), trained to reconstruct rendered scenes.

Loss L1 + L2 on pixels plus a small KL term (1e-5), which keeps the latents near a unit
Gaussian in scale without blurring; the pilot reached 24 dB PSNR in 1,350 steps at lr 7e-4
(2e-3 diverged). The scaling factor (SD1.5's 0.18215) is measured afterwards: 1 / std of the
latents, so that the UNet sees unit-variance latents as SD1.5's does.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..models.vae import VAE
from .batches import draw_scenes, to_unit_range
from .models import VAE as VAE_CONFIG

KL_WEIGHT = 1e-5


def vae_loss(vae: VAE, seed: int, step: int, batch: int) -> torch.Tensor:
    _, images, _ = draw_scenes(seed, step, batch)
    x = to_unit_range(images)
    mean, logvar = vae.encode_moments(x)
    generator = torch.Generator().manual_seed(seed * 7919 + step)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    recon = vae.decoder(vae.post_quant_conv(z))
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
    return F.l1_loss(recon, x) + F.mse_loss(recon, x) + KL_WEIGHT * kl


@torch.no_grad()
def psnr(vae: VAE, seed: int, count: int = 64) -> float:
    """Held-out reconstruction quality in dB (images in [0, 1])."""
    _, images, _ = draw_scenes(seed, 10**9, count)
    x = to_unit_range(images)
    recon = vae.decoder(vae.post_quant_conv(vae.encode_moments(x)[0])).clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (x + 1) / 2)
    return float(10 * torch.log10(1 / mse))


@torch.no_grad()
def with_measured_scaling(vae: VAE, seed: int, count: int = 512) -> VAE:
    """The VAE with ``scaling_factor`` = 1 / std of its latent means over ``count`` scenes."""
    _, images, _ = draw_scenes(seed, 10**9 + 1, count)
    std = vae.encode_moments(to_unit_range(images))[0].std().item()
    vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=round(1 / std, 5))
    return vae


def new_vae() -> VAE:
    return VAE(VAE_CONFIG)
