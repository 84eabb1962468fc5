"""DPM++ 2M (Lu et al., 2022, multistep DPM-Solver++ of order 2): diffusers' DPMSolverMultistepScheduler
with its defaults, A1111's "DPM++ 2M"; with ``karras``, "DPM++ 2M Karras" (use_karras_sigmas).

Each step turns the noise prediction into a prediction of x_0 and moves in λ = log(α/σ) (the log
signal-to-noise ratio, α = 1/√(σ² + 1)); from the second step on it also uses the previous step's
x_0 to correct for its change (second order). The first step of a run and the last one (to σ = 0,
which lands exactly on the x_0 prediction) are first order. The UNet sees the latents unscaled
(α·x_0 + σ_t·ε, as trained), and a picture is noised that way too.

Timesteps: 999, 979, …, 20 for 50 steps (every 999/steps, rounded; the last level, t = 0, is never
visited). Karras σ: steps levels from σ(999) = 14.6 down to σ(0) = 0.029, evenly spaced in σ^(1/7),
each run at the nearest whole timestep (so small σ may share one), with its exact σ.
"""
from __future__ import annotations

import torch

from .sampler import Sampler
from .schedule import SD15, NoiseSchedule
from .sigmas import karras_sigmas, linspace, sigma_to_t


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """σ in the "x_0 + σ·ε" scaling → (α_t, σ_t) of the "α·x_0 + σ_t·ε" one."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    alpha, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma_t)


class DPMPlusPlus2M(Sampler):
    # 1000 steps (999/1000 apart, rounded) would visit one timestep twice: a step of zero length,
    # which turns the next second-order update into NaN (in diffusers too).
    max_steps = SD15.train_steps - 1

    def __init__(self, steps: int, karras: bool = False, schedule: NoiseSchedule = SD15):
        super().__init__(steps, schedule)
        if karras:
            sigmas = karras_sigmas(steps, schedule.sigmas[0].item(), schedule.sigmas[-1].item())
            self.timesteps = sigma_to_t(schedule, sigmas).round().long()
        else:
            self.timesteps = linspace(0, schedule.train_steps - 1, steps + 1).round().flip(0)[:-1].long()
            sigmas = schedule.sigmas[self.timesteps]
        self.sigmas = torch.cat([sigmas.float(), torch.zeros(1)])  # σ of each step, then 0
        self.previous: torch.Tensor | None = None  # the last step's x_0 prediction

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        alpha, sigma = alpha_sigma(self.sigmas[i].to(x0.dtype))
        return alpha * x0 + sigma * noise

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        sigma_s, sigma_t = self.sigmas[i], self.sigmas[i + 1]
        alpha_s, scale_s = alpha_sigma(sigma_s)
        alpha_t, scale_t = alpha_sigma(sigma_t)
        denoised = (x - scale_s * eps) / alpha_s
        previous, self.previous = self.previous, denoised
        x = x.float()
        h = log_snr(sigma_t) - log_snr(sigma_s)
        update = alpha_t * (torch.exp(-h) - 1.0)
        if previous is None or i == self.steps - 1:  # first order
            x_next = scale_t / scale_s * x - update * denoised
        else:
            r = (log_snr(sigma_s) - log_snr(self.sigmas[i - 1])) / h  # the last step's size, relative to this one
            correction = 1.0 / r * (denoised - previous)
            x_next = scale_t / scale_s * x - update * denoised - 0.5 * update * correction
        return x_next.to(eps.dtype)
