"""The one interface every sampler has: what the denoising loop asks of it.

A sampler is built for one generation (``steps`` steps) and used once, in order, because some keep
state from step to step (DPM++ 2M its previous prediction). At step i (0 ≤ i < steps; img2img
starts at a later i):

    x_in = sampler.scale_input(x, i)             # what the UNet (and a ControlNet) sees
    eps = unet(x_in, sampler.timesteps[i], …)   # the predicted noise
    x = sampler.step(eps, i, x, generator)       # the next, less noisy latents

The starting latents are noise × ``init_noise_sigma`` (from pure noise), or ``add_noise(x0, noise, i)``:
a picture's latents noised to the level of step i (img2img starting at step i, and inpainting
putting the picture back at each next step's level).
"""
from __future__ import annotations

import torch

from .schedule import SD15, TRAIN_STEPS, NoiseSchedule


class Sampler:
    max_steps = TRAIN_STEPS
    timesteps: torch.Tensor  # the UNet's timestep at each step, noisiest first (int64, or float32 for Euler)
    init_noise_sigma: float | torch.Tensor = 1.0  # the starting noise's scale

    def __init__(self, steps: int, schedule: NoiseSchedule = SD15):
        if not 1 <= steps <= self.max_steps:
            raise ValueError(f"steps must be in [1, {self.max_steps}], got {steps}")
        self.steps, self.schedule = steps, schedule

    def scale_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The latents as the UNet takes them at step i."""
        return x

    def step(self, eps: torch.Tensor, i: int, x: torch.Tensor, generator: torch.Generator | None = None
             ) -> torch.Tensor:
        """x at step i → x at step i + 1, given the (guided) noise prediction ``eps``. Samplers that
        add fresh noise draw it from ``generator``."""
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, i: int) -> torch.Tensor:
        """Clean latents ``x0`` noised with ``noise`` to the level of step i."""
        raise NotImplementedError


def fresh_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise of ``like``'s shape and dtype, drawn on the generator's device (the
    CPU's, as the pipelines use) and moved to ``like``'s, as diffusers' randn_tensor draws it."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)
