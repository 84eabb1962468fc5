"""Image prompts: Stable Diffusion 1.5 + a CLIP image encoder + an IP-Adapter.

Reference images → encoder features → adapter projection → positive and negative image tokens
→ the adapter's cross-attention hook → the ordinary SD1.5 loop, which tells the hook which
batch rows are conditional (the layout it put the text embeddings in).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..ip_adapter.adapter import IPAdapter
from ..ip_adapter.tokens import image_prompt_tokens
from ..kernels import decoupled_attention, decoupled_attention_reference
from ..loading.ip_adapter import check_compatible
from ..models.clip_preprocess import preprocess
from ..models.image_encoder import ImageEncoder
from .image_prompt_models import load_image_prompt_models
from .text_to_image import StableDiffusion


class IPAdapterPipeline:
    """Load once, generate many: ``pipe(prompt, images, scale)``."""

    def __init__(self, sd: StableDiffusion, adapter: IPAdapter, encoder: ImageEncoder):
        check_compatible(adapter.spec, encoder.config)
        self.sd, self.adapter, self.encoder = sd, adapter, encoder

    @classmethod
    def from_files(cls, model: str | Path, ip_adapter: str | Path, image_encoder: str | Path,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   loras: Sequence[tuple[str | Path, float]] = (), vae: str | Path | None = None) -> "IPAdapterPipeline":
        """SD1.5 weights (any format ``StableDiffusion.from_file`` takes, with its ``loras`` and
        ``vae``), an official or converted IP-Adapter file, and an image-encoder folder or converted file."""
        sd, (adapter,), (encoder,) = load_image_prompt_models(model, [ip_adapter], [image_encoder], device, dtype,
                                                              loras, vae)
        return cls(sd, adapter, encoder)

    @torch.no_grad()
    def image_tokens(self, images: Sequence[Image.Image], crop: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) image tokens, (1, tokens, context width) each; several reference
        images' tokens are concatenated, as the reference does."""
        size = self.encoder.config.image_size  # 224 for the releases' encoders
        pixels = preprocess(list(images), size=size, crop=crop)  # encode_images moves them to the encoder
        return image_prompt_tokens(self.adapter, self.encoder, pixels)

    def __call__(self, prompt: str, images: Sequence[Image.Image], scale: object = 1.0, negative_prompt: str = "",
                 guidance: float = 7.5, num_images: int = 1, crop: bool = True, reference_attention: bool = False,
                 **generation) -> list[Image.Image]:
        """``scale`` (λ) weighs the image against the text: 1.0 follows the image closely, about
        0.5 balances image and prompt, 0 ignores the image (the base model's exact output).
        It may also be 16 per-layer values or a per-block dict ({"down": {"block_2": [0, 1]}}).
        ``reference_attention`` computes decoupled attention as diffusers does (two SDPA calls)
        instead of with the fused kernel on CUDA: slower, for comparing with the reference.
        The references' other options (ComfyUI's combine modes, masks, weight types, …) and several
        adapters at once: ``image_prompt_input.ImagePromptInput``."""
        if not images:
            raise ValueError("at least one reference image is needed")
        positive, negative = self.image_tokens(images, crop)
        attention = decoupled_attention_reference if reference_attention else decoupled_attention
        return self.sd(prompt, negative_prompt, guidance=guidance, num_images=num_images,
                       hook=self.adapter.hook(positive, negative, scale, attention=attention), **generation)
