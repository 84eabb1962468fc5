"""Which image projection each SD1.5 release has (h94/IP-Adapter, models/):

- ``projection.ImageProjection``, the paper's (ip-adapter_sd15, _sd15_light, _sd15_vit-G): Linear →
  reshape → LayerNorm on the *projected* CLIP image embedding; 4 tokens.
- ``resampler.Resampler`` (ip-adapter-plus_sd15, plus-face): a Perceiver resampler over the
  *penultimate* hidden states of the image encoder; 16 tokens.
- ``mlp_projection.MLPProjection`` (ip-adapter-full-face_sd15): Linear → GELU → Linear → LayerNorm
  applied to every penultimate hidden state; 257 tokens.

Which one a file holds is told from its keys and shapes alone (``formats.ip_adapter.detect_variant``),
never from the file name.
"""
from __future__ import annotations

from torch import nn

from ..models.configs import AdapterSpec
from .mlp_projection import MLPProjection
from .projection import ImageProjection
from .resampler import Resampler


def build_projection(spec: AdapterSpec) -> nn.Module:
    """The projection module for this variant (weights uninitialised on the meta device: load them)."""
    if spec.variant in ("base", "vit-g"):
        return ImageProjection(spec.feature_dim, spec.tokens, spec.context_dim)
    if spec.variant == "full-face":
        return MLPProjection(spec.feature_dim, spec.context_dim)
    if spec.variant == "plus":
        return Resampler(spec.resampler)
    raise ValueError(f"unknown IP-Adapter variant {spec.variant!r}")
