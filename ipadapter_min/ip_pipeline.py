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

from kernels import decoupled_attention, decoupled_attention_reference

from .configs import AdapterSpec, ImageEncoderConfig
from .formats.image_encoder import read_image_encoder
from .formats.ip_adapter import read_ip_adapter
from .formats.sd15 import read_sd15
from .image_encoder import ImageEncoder, preprocess
from .ip_adapter import IPAdapter, image_prompt_tokens
from .loading import check_context_width, image_encoder_from_checkpoint, ip_adapter_from_checkpoint, sd15_from_checkpoint
from .pipeline import StableDiffusion


def check_compatible(spec: AdapterSpec, encoder: ImageEncoderConfig, where: str = "") -> None:
    """An adapter only works with the encoder it was trained with: say so before any work (both
    are known from their files' headers, before any weights are read)."""
    width = encoder.width if spec.uses_hidden_states else encoder.proj_dim
    if width != spec.feature_dim:
        kind = "hidden width" if spec.uses_hidden_states else "projection width"
        raise ValueError(f"{where}the {spec.variant} IP-Adapter needs a {spec.encoder} image encoder ({spec.encoder_output} "
                         f"of width {spec.feature_dim}); the given encoder ({encoder.name}) has {kind} {width}")


class IPAdapterPipeline:
    """Load once, generate many: ``pipe(prompt, images, scale)``."""

    def __init__(self, sd: StableDiffusion, adapter: IPAdapter, encoder: ImageEncoder):
        check_compatible(adapter.spec, encoder.config)
        self.sd, self.adapter, self.encoder = sd, adapter, encoder

    @classmethod
    def from_files(cls, model: str | Path, ip_adapter: str | Path, image_encoder: str | Path,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "IPAdapterPipeline":
        """SD1.5 weights (any format ``StableDiffusion.from_file`` takes), an official or converted
        IP-Adapter file, and an image-encoder folder or converted file."""
        adapter_file, spec = read_ip_adapter(ip_adapter)  # foreign or mismatched files fail before the big load
        encoder_file, encoder_config = read_image_encoder(image_encoder)
        check_compatible(spec, encoder_config, f"{ip_adapter} with {image_encoder}: ")
        sd_file, sd_configs = read_sd15(model)  # its configs; the tensors stay mapped until built
        check_context_width(spec, sd_configs["unet"].context_dim, f"{ip_adapter} with {model}")
        sd = StableDiffusion(**sd15_from_checkpoint(sd_file, sd_configs, device, dtype))
        adapter = ip_adapter_from_checkpoint(adapter_file, spec, device, dtype, sd.unet.cross_attention_widths(),
                                             sd.unet.cfg.context_dim)
        return cls(sd, adapter, image_encoder_from_checkpoint(encoder_file, encoder_config, device, dtype))

    @torch.no_grad()
    def image_tokens(self, images: Sequence[Image.Image], combine: str = "concat", crop: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positive, negative) image tokens, (1, tokens, context width) each. Several reference
        images are concatenated (as the reference does) or averaged."""
        size = self.encoder.config.image_size  # 224 for the releases' encoders
        pixels = preprocess(list(images), size=size, crop=crop)  # encode_images moves them to the encoder
        return image_prompt_tokens(self.adapter, self.encoder, pixels, combine=combine)

    def __call__(self, prompt: str, images: Sequence[Image.Image], scale: object = 1.0, negative_prompt: str = "",
                 guidance: float = 7.5, num_images: int = 1, combine: str = "concat", crop: bool = True,
                 reference_attention: bool = False, **generation) -> list[Image.Image]:
        """``scale`` (λ) weighs the image against the text: 1.0 follows the image closely, about
        0.5 balances image and prompt, 0 ignores the image (the base model's exact output).
        It may also be 16 per-layer values or a per-block dict ({"down": {"block_2": [0, 1]}}).
        ``reference_attention`` computes decoupled attention as diffusers does (two SDPA calls)
        instead of with the fused kernel on CUDA: slower, for comparing with the reference."""
        if not images:
            raise ValueError("at least one reference image is needed")
        positive, negative = self.image_tokens(images, combine, crop)
        attention = decoupled_attention_reference if reference_attention else decoupled_attention
        return self.sd(prompt, negative_prompt, guidance=guidance, num_images=num_images,
                       hook=self.adapter.hook(positive, negative, scale, attention=attention), **generation)
