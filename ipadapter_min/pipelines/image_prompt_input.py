"""Several IP-Adapters in one generation, each with the references' options (ComfyUI's weight
types, masks, step ranges, embeds scaling, combine modes, precomputed features): what the command
line and ComfyUI-like runtimes give, built on the paper's hook (``image_prompts.py`` is without them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from ..ip_adapter.adapter import IPAdapter
from ..ip_adapter.combine import combined_tokens
from ..ip_adapter.hook_options import ImagePromptAttention
from ..ip_adapter.several import ImagePrompts
from ..ip_adapter.tokens import encode_images
from ..ip_adapter.weight_types import weight_type as weight_type_scales
from ..kernels import decoupled_attention
from ..loading.ip_adapter import check_compatible
from ..models.clip_preprocess import preprocess
from ..models.image_encoder import ImageEncoder
from .image_processing import binary_mask


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
        positive, negative = combined_tokens(self.adapter, features[1], features[0], self.combine)
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
