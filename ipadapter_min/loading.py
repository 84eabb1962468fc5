"""Building models from checkpoints without ever running a random initialisation.

Models are built on the meta device (no memory, no init), then the loaded tensors are
assigned as their parameters. Every format goes through ``weights_convert``, which checks
each key and shape against the model first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from weights_convert.sd15 import PARTS, read_sd15


def assign(model_cls, config, tensors: dict[str, torch.Tensor], device, dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_cls(config)
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
        models[part] = assign(model_cls, configs[part], own, device, dtype)
    return models
