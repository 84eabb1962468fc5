"""An image prompt's models from their files: the IP-Adapter and its CLIP image encoder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch

from ..formats.files import Checkpoint, CheckpointError
from ..formats.image_encoder import read_image_encoder
from ..formats.ip_adapter import read_ip_adapter, to_project_layout
from ..ip_adapter.adapter import IPAdapter
from ..ip_adapter.layers import CROSS_ATTENTION_WIDTHS
from ..models.configs import CONTEXT_DIM, AdapterSpec, ImageEncoderConfig
from ..models.image_encoder import ImageEncoder, import_open_clip
from .checked import assign, build_checked


def check_compatible(spec: AdapterSpec, encoder: ImageEncoderConfig, where: str = "") -> None:
    """An adapter only works with the encoder it was trained with: say so before any work (both
    are known from their files' headers, before any weights are read)."""
    width = encoder.width if spec.uses_hidden_states else encoder.proj_dim
    if width != spec.feature_dim:
        kind = "hidden width" if spec.uses_hidden_states else "projection width"
        raise ValueError(f"{where}the {spec.variant} IP-Adapter needs a {spec.encoder} image encoder ({spec.encoder_output} "
                         f"of width {spec.feature_dim}); the given encoder ({encoder.name}) has {kind} {width}")


def check_context_width(spec: AdapterSpec, context_dim: int, where: str) -> None:
    """The image tokens are attended to beside the text tokens, so they must be as wide as the
    UNet's cross-attention context. Told apart here, where an adapter meets a UNet, not when its
    file is read: the file alone cannot say which base model it is for."""
    if spec.context_dim != context_dim:
        raise CheckpointError(f"{where}: the adapter's image tokens are {spec.context_dim} wide, this UNet's "
                              f"cross-attention takes {context_dim} (an adapter for another base model, e.g. SDXL?)")


def ip_adapter_from_checkpoint(checkpoint: Checkpoint, spec: AdapterSpec, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32, widths: Sequence[int] = CROSS_ATTENTION_WIDTHS,
                               context_dim: int = CONTEXT_DIM) -> IPAdapter:
    """``widths`` and ``context_dim``: the UNet's cross-attention widths (``UNet.cross_attention_widths()``)
    and context width (``unet.cfg.context_dim``), SD1.5's by default."""
    check_context_width(spec, context_dim, checkpoint.source)
    what = f"a {spec.variant} IP-Adapter for " + ("SD1.5" if list(widths) == list(CROSS_ATTENTION_WIDTHS)
                                                  else f"a UNet of cross-attention widths {list(widths)}")
    model = build_checked(lambda: IPAdapter(spec, widths), checkpoint, what)
    return assign(model, checkpoint, device, dtype)


def ip_adapter_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict",
                               device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                               widths: Sequence[int] = CROSS_ATTENTION_WIDTHS, context_dim: int = CONTEXT_DIM
                               ) -> IPAdapter:
    """An IP-Adapter from an official or converted state dict (flat keys), every key and shape checked."""
    return ip_adapter_from_checkpoint(*to_project_layout(state, source), device, dtype, widths, context_dim)


def load_ip_adapter(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    widths: Sequence[int] = CROSS_ATTENTION_WIDTHS, context_dim: int = CONTEXT_DIM) -> IPAdapter:
    """An official IP-Adapter file (.bin or .safetensors) or a converted one; the variant comes
    from the keys and shapes."""
    return ip_adapter_from_checkpoint(*read_ip_adapter(path), device, dtype, widths, context_dim)


def image_encoder_from_checkpoint(checkpoint: Checkpoint, config: ImageEncoderConfig,
                                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    import_open_clip()  # before the meta-device context: open_clip's module-level tensors stay real
    model = build_checked(lambda: ImageEncoder(config), checkpoint, f"a {config.name} image encoder")
    return assign(model, checkpoint, device, dtype)


def image_encoder_from_state_dict(config: ImageEncoderConfig, state: dict[str, torch.Tensor], source: str = "state dict",
                                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """An image encoder whose weights are ``state`` (keys ``visual.*``); every key must be present
    with the right shape (a CheckpointError naming the key and ``source``)."""
    return image_encoder_from_checkpoint(Checkpoint(dict(state), source), config, device, dtype)


def load_image_encoder(path: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """Load an image encoder from a transformers CLIPVisionModelWithProjection folder (or its
    weights file), or from the project's converted ``.safetensors`` file. ViT-H/14 and
    ViT-bigG/14 (and any other plain CLIP ViT) are told apart by config.json or by shapes."""
    return image_encoder_from_checkpoint(*read_image_encoder(path), device, dtype)
