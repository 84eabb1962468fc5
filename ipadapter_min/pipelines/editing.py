"""img2img and inpainting: denoising that starts from a picture instead of pure noise.

img2img noises the picture's latents up to a point of the schedule set by ``strength`` and runs
only the rest of the steps, so the result keeps the picture's layout and colours. Inpainting
repaints only where the mask is white. A regular UNet is told nothing about the mask: after every
step the picture's own latents, noised to the next timestep, are put back outside it. An
inpainting UNet (9 input channels, e.g. sd-v1-5-inpainting) sees the mask and the masked
picture's latents beside its own latents, and is left alone.

Every random draw comes from the one generator, in diffusers' order, so the same seed gives its
images: the picture's latent sample, then the noise, then the masked picture's latent sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ..models.vae import VAE
from ..samplers import Sampler
from ..samplers.cfg import CFGBatch
from .image_processing import Box, binary_mask, crop_box, vae_pixels

IMG2IMG_STRENGTH, INPAINT_STRENGTH = 0.8, 1.0  # diffusers' defaults


def first_step(steps: int, strength: float) -> int:
    """How many of the ``steps`` timesteps to skip: strength 1 runs them all, 0.5 the cleaner half
    (diffusers' ``get_timesteps``)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = steps - min(int(steps * strength), steps)
    if start == steps:
        raise ValueError(f"strength {strength} of {steps} steps runs no step (steps × strength must be at least 1)")
    return start


def noise(generator: torch.Generator, count: int, height: int, width: int) -> torch.Tensor:
    """Latent-shaped noise for ``count`` images of height × width, drawn as diffusers draws it
    (float32, on the CPU generator), so the same seed gives the same image in both."""
    return torch.randn((count, 4, height // 8, width // 8), generator=generator, dtype=torch.float32)


def img2img_latents(vae: VAE, sampler: Sampler, generator: torch.Generator, pixels: torch.Tensor, count: int,
                    start: int) -> torch.Tensor:
    """The picture's latents, noised to the level of the sampler's step ``start``, one copy per image."""
    clean = vae.sample(pixels, generator).repeat(count, 1, 1, 1)
    eps = noise(generator, count, pixels.shape[-2], pixels.shape[-1]).to(clean.device, clean.dtype)
    return sampler.add_noise(clean, eps, start)


class Inpainting:
    """What inpainting adds to the denoising loop: the UNet's extra input channels (an inpainting
    UNet) or the step-by-step restoring of the unmasked region (a regular one)."""

    def __init__(self, mask: torch.Tensor, masked_latents: torch.Tensor, image_latents: torch.Tensor | None,
                 noise: torch.Tensor, inpainting_unet: bool, sampler: Sampler):
        self.mask, self.masked_latents, self.image_latents, self.noise = mask, masked_latents, image_latents, noise
        self.inpainting_unet, self.sampler = inpainting_unet, sampler

    @classmethod
    def start(cls, vae: VAE, sampler: Sampler, generator: torch.Generator, pixels: torch.Tensor, mask: torch.Tensor,
              count: int, start: int, strength: float, unet_in_channels: int) -> tuple[torch.Tensor, "Inpainting"]:
        """(starting latents, Inpainting) for ``count`` images of the picture ``pixels`` ([-1, 1])
        repainted where ``mask`` (1 = repaint, at pixel size) is 1. At strength 1 the start is pure
        noise (× the sampler's starting scale); below, the picture noised to the level of step ``start``."""
        if unet_in_channels not in (4, 9):
            raise ValueError(f"inpainting needs a UNet of 4 or 9 input channels, this one has {unet_in_channels}")
        inpainting_unet = unet_in_channels == 9
        dtype = vae.quant_conv.weight.dtype
        image_latents = None
        if not inpainting_unet or strength < 1:
            image_latents = vae.sample(pixels.to(dtype), generator).repeat(count, 1, 1, 1)
        eps = noise(generator, count, pixels.shape[-2], pixels.shape[-1]).to(pixels.device, dtype)
        latents = eps * sampler.init_noise_sigma if strength == 1 else sampler.add_noise(image_latents, eps, start)
        masked_picture = pixels * (mask < 0.5)
        masked_latents = vae.sample(masked_picture.to(dtype), generator).repeat(count, 1, 1, 1)
        latent_mask = F.interpolate(mask, size=eps.shape[-2:]).to(dtype).repeat(count, 1, 1, 1)  # nearest
        return latents, cls(latent_mask, masked_latents, image_latents, eps, inpainting_unet, sampler)

    def unet_input(self, x: torch.Tensor, batch: CFGBatch) -> torch.Tensor:
        """An inpainting UNet's input: [latents, mask, masked picture's latents] in channels."""
        if not self.inpainting_unet:
            return x
        return torch.cat([x, batch.inputs(self.mask), batch.inputs(self.masked_latents)], dim=1)

    def keep_unmasked(self, latents: torch.Tensor, next_step: int | None) -> torch.Tensor:
        """After a step of a regular UNet: the picture's latents, noised to the level of the next
        step (clean after the last step), outside the mask."""
        if self.inpainting_unet:
            return latents
        picture = (self.image_latents if next_step is None
                   else self.sampler.add_noise(self.image_latents, self.noise, next_step))
        return (1 - self.mask) * picture + self.mask * latents


def picture_start(vae: VAE, sampler: Sampler, generator: torch.Generator, picture: Image.Image,
                  mask: Image.Image | None, width: int, height: int, count: int, strength: float | None,
                  mask_crop: int | None, unet_in_channels: int, device: torch.device
                  ) -> tuple[torch.Tensor, int, Inpainting | None, Box | None]:
    """Denoising that starts from ``picture``: (starting latents, the first step, the inpainting
    state with a ``mask``, else None, and the box a ``mask_crop`` works in, else None). ``strength``
    defaults to diffusers' for img2img or inpainting."""
    strength = strength if strength is not None else INPAINT_STRENGTH if mask is not None else IMG2IMG_STRENGTH
    start = first_step(sampler.steps, strength)
    box = crop_box(mask, width, height, mask_crop) if mask is not None and mask_crop is not None else None
    resize = "stretch" if box is None else "fill"
    pixels = vae_pixels(picture, width, height, resize, box).to(device)
    if mask is None:
        return img2img_latents(vae, sampler, generator, pixels, count, start), start, None, box
    repaint = binary_mask(mask, width, height, resize, box).to(device)
    latents, inpainting = Inpainting.start(vae, sampler, generator, pixels, repaint, count, start, strength,
                                           unet_in_channels)
    return latents, start, inpainting, box
