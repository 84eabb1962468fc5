"""Building models from checkpoints without ever running a random initialisation.

Models are built on the meta device (no memory, no init), then the loaded tensors are
assigned as their parameters. Every format goes through ``weights_convert``, which checks
each key and shape against the model first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from weights_convert.files import CheckpointError, read_metadata, read_state_dict
from weights_convert.image_encoder import read_transformers_image_encoder
from weights_convert.ip_adapter import read_ip_adapter
from weights_convert.sd15 import PARTS, read_sd15

from .image_encoder import FORMAT as IMAGE_ENCODER_FORMAT
from .image_encoder import ImageEncoder, ImageEncoderConfig, check_state, import_open_clip
from .ip_adapter import IPAdapter


def assign(build: Callable[[], nn.Module], tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    """``build()`` on the meta device, then the tensors (already checked) become its parameters."""
    with torch.device("meta"):
        model = build()
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_sd15(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_encoder"} from a converted file, an original single file or a diffusers folder."""
    tensors, configs = read_sd15(path)
    models = {}
    for part, (model_cls, _) in PARTS.items():
        prefix = part + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        models[part] = assign(lambda: model_cls(configs[part]), own, device, dtype)
    return models


def load_ip_adapter(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> IPAdapter:
    """An official IP-Adapter file (.bin or .safetensors) or a converted one; the variant comes
    from the keys and shapes."""
    tensors, spec = read_ip_adapter(path)
    return assign(lambda: IPAdapter(spec), tensors, device, dtype)


def load_image_encoder(path: str | os.PathLike, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """Load an image encoder from a transformers CLIPVisionModelWithProjection folder (or its
    weights file), or from the project's converted ``.safetensors`` file. ViT-H/14 and
    ViT-bigG/14 (and any other plain CLIP ViT) are told apart by config.json or by shapes."""
    path = Path(path)
    metadata = read_metadata(path) if path.is_file() else {}
    if metadata.get("format") == IMAGE_ENCODER_FORMAT:
        try:
            config = ImageEncoderConfig.from_json(metadata["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad 'config' metadata ({exc})") from None
        return image_encoder_from_state_dict(config, read_state_dict(path), str(path), device, dtype)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    state, config = read_transformers_image_encoder(path)
    return image_encoder_from_state_dict(config, state, str(path), device, dtype)


def image_encoder_from_state_dict(config: ImageEncoderConfig, state: dict[str, torch.Tensor], source: str = "state dict",
                                  device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> ImageEncoder:
    """An image encoder whose weights are ``state`` (keys ``visual.*``); every key must be present
    with the right shape (a CheckpointError naming the key and ``source``)."""
    import_open_clip()  # before the meta-device context: open_clip's module-level tensors stay real
    with torch.device("meta"):
        expected = ImageEncoder(config).state_dict()
    check_state(state, expected, source, config)
    return assign(lambda: ImageEncoder(config), state, device, dtype)
