"""Stable Diffusion 1.5's noise schedule, shared by every sampler and by training.

SD1.5 was trained with 1000 noise levels: "scaled linear" betas (√β evenly spaced from √0.00085 to
√0.012), ᾱ_t = ∏(1 − β) and x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε. Samplers that think in noise levels
σ instead (Euler, DPM++) use σ_t = √((1 − ᾱ_t)/ᾱ_t), the same point in the "x_0 + σ·ε" scaling,
between 0.0292 (t = 0) and 14.61 (t = 999); ``sigmas.py`` works with them. Everything is float32 as
the reference computes it (diffusers' schedulers from the release's scheduler_config.json), so
timesteps and σ match it.
"""
from __future__ import annotations

import torch

TRAIN_STEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012


class NoiseSchedule:
    def __init__(self, train_steps: int = TRAIN_STEPS, beta_start: float = BETA_START, beta_end: float = BETA_END):
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, train_steps, dtype=torch.float32) ** 2
        self.train_steps = train_steps
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε: a clean sample noised to integer timestep t (one t, or
        one per sample), in diffusers' op order (DDPMScheduler.add_noise and DDIMScheduler.add_noise
        agree). Training's forward process, and DDIM's."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)  # (1,) or (B,)
        alphas = self.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
        shape = (-1,) + (1,) * (latents.ndim - 1)  # (B, 1, 1, 1) for latents (B, 4, h, w)
        return (alphas**0.5).reshape(shape) * latents + ((1 - alphas) ** 0.5).reshape(shape) * noise  # (B, 4, h, w)


SD15 = NoiseSchedule()
