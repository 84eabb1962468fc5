"""Stable Diffusion 1.5's noise schedule, shared by every sampler and by training.

SD1.5 was trained with 1000 noise levels: "scaled linear" betas (√β evenly spaced from √0.00085 to
√0.012), ᾱ_t = ∏(1 − β) and x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε. Samplers that think in noise levels
σ instead (Euler, DPM++) use σ_t = √((1 − ᾱ_t)/ᾱ_t), the same point in the "x_0 + σ·ε" scaling,
between 0.0292 (t = 0) and 14.61 (t = 999). Everything is float32 as the reference computes it
(diffusers' schedulers from the release's scheduler_config.json), so timesteps and σ match it.
"""
from __future__ import annotations

import torch

TRAIN_STEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012
KARRAS_RHO = 7.0  # Karras et al. (2022)'s ρ, as everyone uses it


def linspace(start: float, stop: float, count: int) -> torch.Tensor:
    """``count`` evenly spaced float64 values from start to stop, computed as numpy.linspace does
    (i · step + start, the last one exactly stop), which the reference's schedules are built with."""
    values = torch.arange(count, dtype=torch.float64) * ((stop - start) / max(count - 1, 1)) + start
    if count > 1:
        values[-1] = stop
    return values


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
        timesteps = torch.as_tensor(timesteps).reshape(-1)
        alphas = self.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
        shape = (-1,) + (1,) * (latents.ndim - 1)
        return (alphas**0.5).reshape(shape) * latents + ((1 - alphas) ** 0.5).reshape(shape) * noise

    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """σ at fractional timesteps, linear between the table's entries (numpy.interp's formula, in
        float64, then rounded to float32)."""
        t = timesteps.double().clamp(0, self.train_steps - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=self.train_steps - 1)
        table = self.sigmas.double()
        return ((table[high] - table[low]) * (t - low) + table[low]).float()

    def sigma_to_t(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The fractional timestep (float64) of each σ: linear in log σ between the two neighbouring
        entries of the table, clamped to [0, 999]."""
        log_sigma = sigmas.double().clamp(min=1e-10).log()
        log_table = self.log_sigmas
        below = (log_table.double()[None, :] <= log_sigma[:, None]).sum(dim=1)
        low = (below - 1).clamp(0, self.train_steps - 2)
        high = low + 1
        w = (log_table[low].double() - log_sigma) / (log_table[low] - log_table[high]).double()  # float32 difference
        w = w.clamp(0, 1)
        return (1 - w) * low + w * high

    def karras_sigmas(self, steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
        """Karras et al.'s ``steps`` noise levels from sigma_max down to sigma_min, evenly spaced in
        σ^(1/ρ) (float64): small steps where the noise is low."""
        ramp = linspace(0, 1, steps)
        lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
        return (hi + ramp * (lo - hi)) ** KARRAS_RHO


SD15 = NoiseSchedule()
