"""Image prompts: Stable Diffusion 1.5 + a CLIP image encoder + an IP-Adapter.

Reference images → encoder features → adapter projection → positive and negative image tokens
→ the adapter's cross-attention hook → the ordinary SD1.5 loop, which tells the hook which
batch rows are conditional (the layout it put the text embeddings in).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from ..formats.image_encoder import read_image_encoder
from ..formats.ip_adapter import read_ip_adapter
from ..formats.sd15 import read_sd15
from ..ip_adapter.adapter import IPAdapter
from ..ip_adapter.hook_options import ImagePromptAttention
from ..ip_adapter.several import ImagePrompts
from ..ip_adapter.tokens import encode_images, image_prompt_tokens, tokens_from_features
from ..ip_adapter.weight_types import weight_type as weight_type_scales
from ..kernels import decoupled_attention, decoupled_attention_reference
from ..loading.ip_adapter import check_context_width, image_encoder_from_checkpoint, ip_adapter_from_checkpoint
from ..loading.sd15 import sd15_from_checkpoint
from ..models.configs import AdapterSpec, ImageEncoderConfig
from ..models.image_encoder import ImageEncoder, preprocess
from .image_processing import binary_mask
from .text_to_image import StableDiffusion


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
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   loras: Sequence[tuple[str | Path, float]] = (), vae: str | Path | None = None) -> "IPAdapterPipeline":
        """SD1.5 weights (any format ``StableDiffusion.from_file`` takes, with its ``loras`` and
        ``vae``), an official or converted IP-Adapter file, and an image-encoder folder or converted file."""
        sd, (adapter,), (encoder,) = load_image_prompt_models(model, [ip_adapter], [image_encoder], device, dtype,
                                                              loras, vae)
        return cls(sd, adapter, encoder)

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


def load_image_prompt_models(model: str | Path, ip_adapters: Sequence[str | Path],
                             image_encoders: Sequence[str | Path | None], device: str | torch.device = "cpu",
                             dtype: torch.dtype = torch.float32, loras: Sequence[tuple[str | Path, float]] = (),
                             vae: str | Path | None = None
                             ) -> tuple[StableDiffusion, list[IPAdapter], list[ImageEncoder | None]]:
    """SD1.5 (with ``loras`` and ``vae`` as ``loading.load_sd15`` takes them), and one IP-Adapter
    per file with its image encoder (None where precomputed features stand in; an encoder given for
    several adapters is loaded once). Every adapter is checked against its encoder and the UNet
    from the files' headers, before any weights are read."""
    adapters, encoders = [read_ip_adapter(path) for path in ip_adapters], {}
    for path in image_encoders:
        if path is not None and str(path) not in encoders:
            encoders[str(path)] = read_image_encoder(path)
    for (_, spec), adapter_path, encoder_path in zip(adapters, ip_adapters, image_encoders):
        if encoder_path is not None:
            check_compatible(spec, encoders[str(encoder_path)][1], f"{adapter_path} with {encoder_path}: ")
    sd_file, sd_configs = read_sd15(model)  # its configs; the tensors stay mapped until built
    for (_, spec), adapter_path in zip(adapters, ip_adapters):
        check_context_width(spec, sd_configs["unet"].context_dim, f"{adapter_path} with {model}")
    sd = StableDiffusion(**sd15_from_checkpoint(sd_file, sd_configs, device, dtype, loras, vae))
    loaded = [ip_adapter_from_checkpoint(checkpoint, spec, device, dtype, sd.unet.cross_attention_widths(),
                                         sd.unet.cfg.context_dim) for checkpoint, spec in adapters]
    built = {path: image_encoder_from_checkpoint(checkpoint, config, device, dtype)
             for path, (checkpoint, config) in encoders.items()}
    return sd, loaded, [None if path is None else built[str(path)] for path in image_encoders]


@dataclass
class ImagePromptInput:
    """One IP-Adapter's part of a generation, as a caller gives it; several make a multi-adapter
    image prompt (:func:`image_prompt_hook`).

    ``scale``: λ (a number, 16 per-layer values or a per-block dict), or with ``weight_type`` (one
    of ComfyUI's, ``weight_types.WEIGHT_TYPES``) that type's weight; ``composition`` its second
    weight. ``masks``: one per reference image (white: where that image acts), at the output's
    aspect. ``start``/``end``: the fraction of the denoising it acts in, by ``step_range`` "steps"
    or ComfyUI's "sigmas". ``features``: precomputed encoder features in diffusers'
    ``ip_adapter_image_embeds`` layout, (2, images, …) with the negative first, instead of
    ``images`` and ``encoder``. ``negative_images``: one, or one per image, instead of the
    reference's default negative."""

    adapter: IPAdapter
    encoder: ImageEncoder | None = None
    images: Sequence[Image.Image] = ()
    scale: object = 1.0
    weight_type: str | None = None
    composition: float | None = None
    masks: Sequence[Image.Image] | None = None
    start: float = 0.0
    end: float = 1.0
    step_range: str = "steps"
    embeds_scaling: str = "V only"
    combine: str = "concat"
    negative_images: Sequence[Image.Image] | None = None
    features: torch.Tensor | None = None
    crop: bool = True

    @torch.no_grad()
    def encoded(self) -> torch.Tensor:
        """(2, images, …) encoder features, negative first (diffusers' ip_adapter_image_embeds)."""
        if self.features is not None:
            if self.features.ndim not in (3, 4) or self.features.shape[0] != 2:
                raise ValueError(f"precomputed image features must be (2, images, …) with the negative first, got "
                                 f"{list(self.features.shape)}")
            return self.features
        if self.encoder is None or not self.images:
            raise ValueError("an image prompt needs reference images and an image encoder, or precomputed features")
        check_compatible(self.adapter.spec, self.encoder.config)
        size = self.encoder.config.image_size
        pixels = preprocess(list(self.images), size=size, crop=self.crop)
        negative_pixels = None if not self.negative_images else preprocess(list(self.negative_images), size=size,
                                                                            crop=self.crop)
        features, negative = encode_images(self.encoder, pixels, self.adapter.spec, negative_pixels)
        return torch.stack([negative, features])

    def hook(self, width: int, height: int, attention=decoupled_attention) -> ImagePromptAttention:
        features = self.encoded()
        positive, negative = tokens_from_features(self.adapter, features[1], features[0], combine=self.combine)
        scales, swapped = self.scale, frozenset()
        if self.weight_type is not None:
            preset = weight_type_scales(self.weight_type, float(self.scale), self.composition)
            scales, swapped = preset.scales, preset.swapped
        masks = None
        if self.masks is not None:
            if self.combine != "concat" or len(self.masks) != features.shape[1]:
                raise ValueError(f"masks need one reference image each, kept apart (combine 'concat'): "
                                 f"{len(self.masks)} masks for {features.shape[1]} images")
            masks = torch.cat([binary_mask(mask, width, height)[0] for mask in self.masks])
        return ImagePromptAttention(self.adapter.ip_layers, positive, negative, scales, attention=attention,
                                    masks=masks, start=self.start, end=self.end, step_range=self.step_range,
                                    swapped=swapped, embeds_scaling=self.embeds_scaling)


def image_prompt_hook(prompts: Sequence[ImagePromptInput], width: int, height: int,
                      attention=decoupled_attention) -> ImagePrompts:
    """The cross-attention hook of several IP-Adapters at once, for an output of width × height
    (``StableDiffusion.__call__(…, hook=…)``)."""
    return ImagePrompts([prompt.hook(width, height, attention) for prompt in prompts])
