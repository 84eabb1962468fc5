"""Training an IP-Adapter as the official recipe does (tencent-ailab/IP-Adapter tutorial_train.py):
the UNet, text and image encoders frozen; the image projection and the 16 (to_k_ip, to_v_ip)
pairs trained on the ε-prediction loss, every UNet row conditional with its own image tokens at λ = 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ddim import DDIM
from .ip_adapter import IPAdapter
from .unet import UNet

# MyDataset.__getitem__'s rates: image only, text only, both (one uniform draw per sample)
DROP_IMAGE, DROP_TEXT, DROP_BOTH = 0.05, 0.05, 0.05


@torch.no_grad()
def init_ip_layers_from_unet(adapter: IPAdapter, unet: UNet) -> None:
    """Start each image key/value projection from its layer's text one (the official init): at the
    first step the image tokens are attended to as if they were text."""
    for ip, attn in zip(adapter.ip_layers, unet.cross_attention_layers(), strict=True):
        ip.to_k_ip.weight.copy_(attn.to_k.weight)
        ip.to_v_ip.weight.copy_(attn.to_v.weight)


def draw_drops(n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_image, drop_text), n bools each: which samples train the unconditional branches CFG
    needs at sampling time. One uniform draw r per sample, as the official dataset: r < 0.05 drops
    the image, then 0.05 drops the text, then 0.05 both."""
    r = torch.rand(n, generator=generator)
    image_only = r < DROP_IMAGE
    text_only = (r >= DROP_IMAGE) & (r < DROP_IMAGE + DROP_TEXT)
    both = (r >= DROP_IMAGE + DROP_TEXT) & (r < DROP_IMAGE + DROP_TEXT + DROP_BOTH)
    return image_only | both, text_only | both


def add_noise(schedule: DDIM, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, per sample (diffusers' DDPMScheduler.add_noise, same op order)."""
    alphas = schedule.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps.to(latents.device)]
    shape = (-1,) + (1,) * (latents.ndim - 1)
    return (alphas**0.5).reshape(shape) * latents + ((1 - alphas) ** 0.5).reshape(shape) * noise


def diffusion_loss(unet: UNet, adapter: IPAdapter, latents: torch.Tensor, text_states: torch.Tensor,
                   image_features: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                   schedule: DDIM) -> torch.Tensor:
    """The ε-MSE (fp32) of one training batch, differentiable in the adapter's weights.

    ``image_features`` are the image encoder's, one row per sample, already zeroed where the
    image is dropped (base variant: zeros in the projected-embedding space); ``text_states`` hold
    the empty prompt's where the text is dropped. A fresh hook per call, so its cached image K/V
    are this step's and carry the graph back to the projection and to_k_ip/to_v_ip.
    """
    hook = adapter.hook(adapter(image_features))  # no negative tokens: every row conditional, λ = 1
    pred = unet(add_noise(schedule, latents, noise, timesteps), timesteps, text_states, hook)
    return F.mse_loss(pred.float(), noise.float())
