"""Reference images → one prompt's positive and negative image tokens: encode, project."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..models.configs import AdapterSpec
from .adapter import IPAdapter


def _encoder_dtype(encoder: Callable) -> tuple[torch.device, torch.dtype] | None:
    if isinstance(encoder, nn.Module):
        p = next(encoder.parameters(), None)
        if p is not None:
            return p.device, p.dtype
    return None


def encode_images(encoder: Callable, pixels: torch.Tensor, spec: AdapterSpec,
                  negative_pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, negative_features) for N reference images, one row per image.

    ``encoder(pixels) -> (image_embeds, penultimate)`` takes normalized pixels (N, 3, S, S) at its
    input size S (224 for the releases' encoders; ``preprocess(images, size=S)``).
    The features are the projected embedding (base, light, vit-G) or the penultimate hidden
    states (plus, full-face). The negative features are, as the reference does, a zero embedding or
    the encoder's features of an all-zero normalized pixel tensor; or those of ``negative_pixels``
    (one image, or one per reference image) when given.
    """
    where = _encoder_dtype(encoder)

    def run(x: torch.Tensor) -> torch.Tensor:
        if where is not None:
            x = x.to(device=where[0], dtype=where[1])
        if spec.uses_hidden_states:  # ImageEncoder.penultimate skips the unused last layer
            out = encoder.penultimate(x) if hasattr(encoder, "penultimate") else encoder(x)[1]
        else:
            out = encoder(x)[0]
        if out.shape[-1] != spec.feature_dim:
            raise ValueError(f"the {spec.variant} adapter needs {spec.encoder} {spec.encoder_output} of width "
                             f"{spec.feature_dim}, the encoder gave width {out.shape[-1]}")
        return out

    features = run(pixels)
    if negative_pixels is not None:
        negative = run(negative_pixels)
        if negative.shape[0] not in (1, features.shape[0]):
            raise ValueError(f"{negative.shape[0]} negative images for {features.shape[0]} reference images")
        negative = negative.expand_as(features)
    elif spec.uses_hidden_states:
        negative = run(torch.zeros_like(pixels[:1])).expand_as(features)  # identical for every image: encode once
    else:
        negative = torch.zeros_like(features)
    return features, negative


def tokens_from_features(adapter: IPAdapter, features: torch.Tensor, negative_features: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) image tokens of one prompt, (1, tokens, context_dim) each, from the features of
    N reference images; the hook puts them in the UNet batch's rows.

    Several images' tokens are concatenated along the token axis, as diffusers does (one softmax
    over all images' tokens, N·T tokens; ``combine.combined_tokens`` has ComfyUI's other ways).
    ``negative_features`` default to a zero embedding (base, light, vit-G); plus and full-face
    need the encoder's features of a zero image (see :func:`encode_images`).
    """
    if negative_features is None:
        if adapter.spec.uses_hidden_states:
            raise ValueError(f"the {adapter.spec.variant} adapter's negative tokens come from the image encoder "
                             f"(features of an all-zero pixel tensor): pass negative_features (encode_images)")
        negative_features = torch.zeros_like(features)
    positive, negative = adapter(features), adapter(negative_features)  # (N, T, C) each
    return positive.flatten(0, 1)[None], negative.flatten(0, 1)[None]  # (1, N·T, C), image-major as diffusers


def image_prompt_tokens(adapter: IPAdapter, encoder: Callable, pixels: torch.Tensor, *,
                        negative_pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_images` then :func:`tokens_from_features`."""
    features, negative = encode_images(encoder, pixels, adapter.spec, negative_pixels)
    return tokens_from_features(adapter, features, negative)
