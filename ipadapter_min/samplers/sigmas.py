"""Noise levels σ for the samplers that work in them (Euler, DPM++): σ at fractional timesteps, the
timestep of a σ, and Karras's spacing, computed as diffusers' schedulers do (numpy's float64), so
the timesteps and σ match the reference's."""
from __future__ import annotations

import torch

from .schedule import NoiseSchedule

KARRAS_RHO = 7.0  # Karras et al. (2022)'s ρ, as everyone uses it


def linspace(start: float, stop: float, count: int) -> torch.Tensor:
    """``count`` evenly spaced float64 values from start to stop, computed as numpy.linspace does
    (i · step + start, the last one exactly stop), which the reference's schedules are built with."""
    values = torch.arange(count, dtype=torch.float64) * ((stop - start) / max(count - 1, 1)) + start
    if count > 1:
        values[-1] = stop
    return values


def sigma_at(schedule: NoiseSchedule, timesteps: torch.Tensor) -> torch.Tensor:
    """σ at fractional timesteps, linear between the table's entries (numpy.interp's formula, in
    float64, then rounded to float32)."""
    t = timesteps.double().clamp(0, schedule.train_steps - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=schedule.train_steps - 1)
    table = schedule.sigmas.double()
    return ((table[high] - table[low]) * (t - low) + table[low]).float()


def sigma_to_t(schedule: NoiseSchedule, sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep (float64) of each σ: linear in log σ between the two neighbouring
    entries of the table, clamped to [0, 999]."""
    log_sigma = sigmas.double().clamp(min=1e-10).log()
    log_table = schedule.log_sigmas
    below = (log_table.double()[None, :] <= log_sigma[:, None]).sum(dim=1)
    low = (below - 1).clamp(0, schedule.train_steps - 2)
    high = low + 1
    w = (log_table[low].double() - log_sigma) / (log_table[low] - log_table[high]).double()  # float32 difference
    w = w.clamp(0, 1)
    return (1 - w) * low + w * high


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Karras et al.'s ``steps`` noise levels from sigma_max down to sigma_min, evenly spaced in
    σ^(1/ρ) (float64): small steps where the noise is low."""
    ramp = linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / KARRAS_RHO), sigma_max ** (1 / KARRAS_RHO)
    return (hi + ramp * (lo - hi)) ** KARRAS_RHO
