"""DDIM (Song et al., 2021): SD1.5's default sampler, as diffusers' DDIMScheduler with the release's
settings ("leading" timesteps with steps_offset 1, so 30 steps visit 958, 925, …, 1; the step past
t = 0 uses ᾱ_0, set_alpha_to_one False).

η = 0 (the default) is deterministic: each step predicts x_0 and moves to the next timestep along
the predicted noise. η > 0 replaces part of that noise by fresh noise at every step; η = 1 is
DDPM-like ancestral sampling.
"""
from __future__ import annotations

import torch

from .sampler import Sampler, fresh_noise
from .schedule import SD15, NoiseSchedule

STEPS_OFFSET = 1


class DDIM(Sampler):
    max_steps = SD15.train_steps - STEPS_OFFSET  # with steps_offset 1, 1000 steps would visit t = 1000

    def __init__(self, steps: int, eta: float = 0.0, schedule: NoiseSchedule = SD15):
        super().__init__(steps, schedule)
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = eta
        self.stride = schedule.train_steps // steps
        self.timesteps = torch.arange(steps - 1, -1, -1) * self.stride + STEPS_OFFSET

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        return self.schedule.add_noise(x0, noise, self.timesteps[i])

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        alphas_cumprod = self.schedule.alphas_cumprod
        t = int(self.timesteps[i])
        prev_t = t - self.stride
        a_t = alphas_cumprod[t]
        a_prev = alphas_cumprod[prev_t] if prev_t >= 0 else alphas_cumprod[0]
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        std = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5  # exactly 0 at η = 0
        x_prev = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if self.eta > 0:
            x_prev = x_prev + std * fresh_noise(eps, generator)
        return x_prev
