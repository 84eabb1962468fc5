"""The demo's models: the project's own classes at small configs, in SD1.5's structure.

The UNet keeps SD1.5's four levels, two res blocks and attention on the first three levels, so it
has the 16 cross-attention layers an IP-Adapter hooks; only widths shrink. The VAE keeps f = 8
(four levels) and 4 latent channels. The text encoder keeps CLIP's tokenizer and 77 positions;
the image encoder is open_clip's VisionTransformer at 64 px with 8-px patches (65 tokens).
Sizes from the feasibility study (shared notes: demo-feasibility.md).
"""
from __future__ import annotations

from ..models.configs import ImageEncoderConfig, TextEncoderConfig, UNetConfig, VAEConfig

RESOLUTION = 64  # images; latents are 8×8
WIDTH = 128  # text width = cross-attention context = image embedding: image tokens can start as text tokens

UNET = UNetConfig(channels=32, heads=4, context_dim=WIDTH, groups=8)
VAE = VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), res_blocks=1, groups=8)  # scaling_factor set by training
TEXT = TextEncoderConfig(width=WIDTH, layers=4, heads=4, mlp_width=4 * WIDTH)
# QuickGELU as the text encoder (CLIP's): open_clip builds both towers with one activation, and the
# demo's CLIP is read by open_clip for `python -m ipadapter_min.evaluate`.
IMAGE = ImageEncoderConfig(width=WIDTH, layers=4, heads=4, mlp_width=4 * WIDTH, patch_size=8, image_size=RESOLUTION,
                           proj_dim=WIDTH, act="quick_gelu")
