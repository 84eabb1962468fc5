"""An up-front estimate of a generation's activation memory, checked against the device's free
memory, so that a size or batch that cannot fit is refused at once, with both figures, instead
of starting and dying in the allocator minutes later.

The estimate is the larger of two peaks, each linear in the pixels: the UNet's at its first
level (the guidance batch, two rows an image, at latent size) and the VAE decoder's at full
size. The factors are the tensors of that size alive at once, measured on the CPU in fp32 at full
SD1.5 size from 256 to 1024 px (peak RSS above the weights): the UNet 32-43 (40 taken), the VAE
decoder 7.6-8.9 (9 taken). Weights, ControlNets and the image encoder come on top.
"""
from __future__ import annotations

import os

import torch

from ..models.configs import UNetConfig, VAEConfig

UNET_TENSORS, VAE_TENSORS = 40, 9


def activation_bytes(unet: UNetConfig, vae: VAEConfig, width: int, height: int, images: int,
                     element_size: int) -> int:
    latents = (width // 8) * (height // 8)
    unet_peak = UNET_TENSORS * 2 * images * unet.channels * unet.channel_mult[0] * latents
    vae_peak = VAE_TENSORS * images * vae.channels * vae.channel_mult[0] * width * height
    return max(unet_peak, vae_peak) * element_size


def free_bytes(device: torch.device) -> int | None:
    """What can be allocated on ``device`` now (on the CPU: MemAvailable, free memory and
    reclaimable cache); None where this system does not say, or for other devices."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:  # no driver: the device's own error comes when it is used
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(unet: UNetConfig, vae: VAEConfig, width: int, height: int, images: int, dtype: torch.dtype,
               device: str | torch.device) -> None:
    """A one-line ValueError, stating both figures, when the activations cannot fit."""
    device = torch.device(device)
    needed = activation_bytes(unet, vae, width, height, images, torch.empty((), dtype=dtype).element_size())
    free = free_bytes(device)
    if free is not None and needed > free:
        raise ValueError(f"{width}×{height}, {images} image{'s' if images > 1 else ''} at a time: the generation "
                         f"needs about {size_text(needed)} of activations, and {device} has {size_text(free)} "
                         "free; give a smaller --width/--height or fewer --num-images")


def size_text(size: int) -> str:
    return f"{size / 2 ** 30:.1f} GiB" if size >= 2 ** 30 else f"{size / 2 ** 20:.0f} MiB"
