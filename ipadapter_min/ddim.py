"""Deterministic DDIM sampling (η = 0) with Stable Diffusion 1.5's noise schedule.

The schedule is computed in float32 exactly as SD1.5's scheduler config specifies
(scaled_linear betas 0.00085→0.012 over 1000 steps, "leading" spacing with steps_offset 1,
set_alpha_to_one False), so timesteps and updates match the reference implementation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DDIMConfig:
    train_steps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1


class DDIM:
    def __init__(self, cfg: DDIMConfig = DDIMConfig()):
        self.cfg = cfg
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.train_steps, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # set_alpha_to_one=False: the step past t=0 uses ᾱ_0 rather than 1.
        self.final_alpha_cumprod = self.alphas_cumprod[0]

    @property
    def max_steps(self) -> int:
        """With steps_offset 1, 1000 steps would visit t = 1000, past the schedule's end."""
        return self.cfg.train_steps - self.cfg.steps_offset

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` timesteps to visit, from noisiest to cleanest ("leading" spacing)."""
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps must be in [1, {self.max_steps}], got {steps}")
        ratio = self.cfg.train_steps // steps
        return [i * ratio + self.cfg.steps_offset for i in reversed(range(steps))]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int) -> torch.Tensor:
        """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε: a clean sample noised to timestep t (one t, or one per
        sample), in diffusers' op order (DDPMScheduler.add_noise and DDIMScheduler.add_noise agree)."""
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        alphas = self.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
        shape = (-1,) + (1,) * (latents.ndim - 1)
        return (alphas**0.5).reshape(shape) * latents + ((1 - alphas) ** 0.5).reshape(shape) * noise

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor, steps: int) -> torch.Tensor:
        """x_t → x_{t - 1000/steps} given the predicted noise ``eps``."""
        prev_t = t - self.cfg.train_steps // steps
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
