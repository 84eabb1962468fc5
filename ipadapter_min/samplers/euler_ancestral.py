"""Euler ancestral: diffusers' EulerAncestralDiscreteScheduler, A1111's "Euler a".

Euler's timesteps, σ and scaling, but each step goes below the next σ (to σ_down) and adds fresh
noise of size σ_up back, σ_down² + σ_up² = σ_(i+1)²: it keeps forgetting, so the image changes
with the step count more than with the deterministic samplers. The noise is drawn at every step,
the last one too (where σ_up = 0), from the generator of the starting noise, as diffusers draws
it: the same seed gives the same image.
"""
from __future__ import annotations

import torch

from .euler import Euler
from .sampler import fresh_noise


class EulerAncestral(Euler):

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = x.float()
        denoised = x - sigma * eps
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        return (x + fresh_noise(eps, generator) * sigma_up).to(eps.dtype)
