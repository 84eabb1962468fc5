"""Euler (Karras et al., 2022, Algorithm 1 without churn): diffusers' EulerDiscreteScheduler, A1111's
"Euler".

It works in the "x_0 + σ·ε" scaling: the latents start as noise × σ_max, the UNet sees them divided
by √(σ² + 1) (the scale it was trained at), and each step follows the predicted noise from σ_i to
σ_(i+1), the last one to σ = 0. The timesteps are spread evenly over [0, 999] ("linspace", the
scheduler's own default: the release's config names no spacing), so they are fractional (999,
978.61, …, 0) and σ is interpolated between the table's entries.
"""
from __future__ import annotations

import torch

from .sampler import Sampler
from .schedule import SD15, NoiseSchedule
from .sigmas import linspace, sigma_at


class Euler(Sampler):

    def __init__(self, steps: int, schedule: NoiseSchedule = SD15):
        super().__init__(steps, schedule)
        self.timesteps = linspace(0, schedule.train_steps - 1, steps).flip(0).float()
        self.sigmas = torch.cat([sigma_at(schedule, self.timesteps), torch.zeros(1)])  # σ of each step, then 0
        self.init_noise_sigma = self.sigmas.max()

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        return x / (self.sigmas[i] ** 2 + 1) ** 0.5

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return x0 + noise * self.sigmas[i].to(x0.dtype)

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        sigma = self.sigmas[i]
        x = x.float()
        denoised = x - sigma * eps
        slope = (x - denoised) / sigma
        return (x + slope * (self.sigmas[i + 1] - sigma)).to(eps.dtype)
