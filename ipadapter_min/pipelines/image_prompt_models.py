"""The models of an image prompt from their files: SD1.5, IP-Adapters and image encoders, checked
against each other from the files' headers before any weights are read."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..formats.image_encoder import read_image_encoder
from ..formats.ip_adapter import read_ip_adapter
from ..formats.sd15 import read_sd15
from ..ip_adapter.adapter import IPAdapter
from ..loading.ip_adapter import (check_compatible, check_context_width, image_encoder_from_checkpoint,
                                  ip_adapter_from_checkpoint)
from ..loading.sd15 import sd15_from_checkpoint
from ..models.image_encoder import ImageEncoder
from .text_to_image import StableDiffusion


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
