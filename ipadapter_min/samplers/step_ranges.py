"""When an image prompt or a control acts: from a start to an end fraction of the denoising.

Two ways to say it, after the two references:

* diffusers (ControlNet's ``control_guidance_start``/``end``, and here every start/end): by
  steps. Step i of n acts unless i/n < start or (i + 1)/n > end; 50 steps with end 0.5 act in
  steps 0–24.
* ComfyUI (IPAdapter's ``start_at``/``end_at``): by noise level. Each fraction becomes a σ
  (``percent_to_sigma``: the σ at timestep (1 − fraction)·999 of SD1.5's schedule, interpolated
  in log σ), and a step acts while σ_end ≤ σ(t) ≤ σ_start. With DDIM the two differ a little,
  since its timesteps are not spread evenly in σ. A fractional timestep (the Euler samplers')
  gets its σ the same way, interpolated in log σ (ComfyUI's ``ModelSamplingDiscrete.sigma``).
"""
from __future__ import annotations

import torch

TRAIN_STEPS, BETA_START, BETA_END = 1000, 0.00085, 0.012


def in_step_range(step: int, steps: int, start: float, end: float) -> bool:
    """Whether step ``step`` (0-based) of ``steps`` lies within [start, end] of the run."""
    return not (step / steps < start or (step + 1) / steps > end)


def _sigmas() -> torch.Tensor:
    """SD1.5's σ per timestep, σ = √((1 − ᾱ)/ᾱ), in float64 as ComfyUI's ModelSamplingDiscrete
    computes them (it keeps σ and log σ in float32)."""
    betas = torch.linspace(BETA_START**0.5, BETA_END**0.5, TRAIN_STEPS, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


_SIGMAS64 = _sigmas()
SIGMAS, LOG_SIGMAS = _SIGMAS64.float(), _SIGMAS64.log().float()


def interpolated_sigma(timestep: float) -> float:
    """ComfyUI's σ(t) at a fractional timestep (float32): linear in log σ between the neighbours."""
    t = torch.tensor(timestep).clamp(0, TRAIN_STEPS - 1)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * LOG_SIGMAS[low] + w * LOG_SIGMAS[high]).exp().item()


def sigma_at(timestep: float) -> float:
    """σ at a timestep: the table's at a whole one, else interpolated."""
    return SIGMAS[int(timestep)].item() if float(timestep).is_integer() else interpolated_sigma(timestep)


def percent_to_sigma(fraction: float) -> float:
    """ComfyUI's ``percent_to_sigma``: the σ at which a fraction of the denoising is done."""
    if fraction <= 0:
        return 999999999.9
    if fraction >= 1:
        return 0.0
    return interpolated_sigma((1 - fraction) * 999.0)


def in_sigma_range(timestep: float, start: float, end: float) -> bool:
    """Whether the step at ``timestep`` acts under ComfyUI's start_at/end_at."""
    return percent_to_sigma(end) <= sigma_at(timestep) <= percent_to_sigma(start)
