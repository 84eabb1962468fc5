"""T2I-Adapter checkpoints → the project's layout: the original TencentARC module names
(``conv_in``, ``body.*``). Three sources are read:

* the original files (``t2iadapter_*_sd14v1.pth``, ``t2iadapter_*_sd15v2.pth``, ``coadapter``-free
  SD1.x ones; ComfyUI's top-level ``adapter`` wrapper too): our names;
* a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, keys
  ``adapter.*``), renamed by the tables below;
* the project's converted file (``python -m weights_convert t2i-adapter``), config in its metadata.

Full or light, and grayscale or colour input, are read off the keys and shapes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.configs import T2IAdapterConfig
from .files import Checkpoint, CheckpointError, read_metadata, read_state_dict
from .sd15 import config_from_json
from .single_model import converted_metadata, read_converted_model, read_diffusers_model

FORMAT = "ipadapter_min.t2i_adapter"
DIFFUSERS_PREFIX = "adapter."


def t2i_adapter_table(cfg: T2IAdapterConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs."""
    table = []
    for i in range(len(cfg.channels)):
        for j in range(cfg.res_blocks):
            ours = f"body.{i}.body.{j}." if cfg.light else f"body.{i * cfg.res_blocks + j}."
            table.append((f"adapter.body.{i}.resnets.{j}.", ours))
        in_conv = f"body.{i}.in_conv." if cfg.light else f"body.{i * cfg.res_blocks}.in_conv."
        table.append((f"adapter.body.{i}.in_conv.", in_conv))
        table.append((f"adapter.body.{i}.out_conv.", f"body.{i}.out_conv."))
    table.append(("adapter.conv_in.", "conv_in."))
    return table


def config_from_keys(tensors: dict[str, torch.Tensor], source: Path) -> T2IAdapterConfig:
    """Full or light, grayscale or colour, and blocks per level, from the keys (our names) and
    shapes of an SD1.5 adapter."""
    light = "body.0.out_conv.weight" in tensors
    first = tensors.get("body.0.in_conv.weight" if light else "conv_in.weight")
    if first is None or first.dim() != 4:
        raise CheckpointError(f"{source}: not a T2I-Adapter (no conv_in or body.0.in_conv weights)")
    in_channels, rest = divmod(first.shape[1], 64)
    if rest or in_channels not in (1, 3):
        raise CheckpointError(f"{source}: the adapter takes {first.shape[1]} channels after pixel-unshuffle by 8, "
                              "expected 64 (grayscale) or 192 (colour)")
    levels = len(T2IAdapterConfig().channels)
    if light:
        res_blocks = len({k.split(".")[3] for k in tensors if k.startswith("body.0.body.")})
    else:
        res_blocks = len({k.split(".")[1] for k in tensors if k.startswith("body.")}) // levels
    return T2IAdapterConfig(light=light, in_channels=in_channels, res_blocks=res_blocks)


def t2i_config_from_diffusers(c: dict) -> T2IAdapterConfig:
    kind = c.get("adapter_type", "full_adapter")
    if kind == "full_adapter_xl":
        raise ValueError("adapter_type full_adapter_xl: a T2I-Adapter for SDXL, only SD1.5 adapters are supported")
    if kind not in ("full_adapter", "light_adapter"):
        raise ValueError(f"adapter_type {kind!r}, expected full_adapter or light_adapter")
    channels = tuple(c.get("channels", (320, 640, 1280, 1280)))
    if kind == "light_adapter":  # diffusers lists the light adapter's widths without the repeated last one
        channels = channels + channels[-1:]
    return T2IAdapterConfig(light=kind == "light_adapter", in_channels=c.get("in_channels", 3), channels=channels,
                            res_blocks=c.get("num_res_blocks", 2), unshuffle=c.get("downscale_factor", 8))


def read_t2i_adapter(path: str | Path) -> tuple[Checkpoint, T2IAdapterConfig]:
    """Any supported T2I-Adapter → (its tensors in our layout, its config)."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers_model(path, t2i_config_from_diffusers, t2i_adapter_table)
    metadata = read_metadata(path)
    if metadata.get("format") == FORMAT:
        return read_converted_model(path, metadata, lambda text: config_from_json(T2IAdapterConfig, text))
    raw = read_state_dict(path)
    if any(".resnets." in k for k in raw):
        raise CheckpointError(f"{path}: a T2I-Adapter in diffusers' layout: give its folder (with config.json)")
    tensors = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in raw.items()}  # ComfyUI's "adapter" wrapper
    origin = {k.removeprefix(DIFFUSERS_PREFIX): f"{path}: key {k!r}" for k in raw}
    return Checkpoint(tensors, str(path), origin), config_from_keys(tensors, path)


def t2i_adapter_metadata(cfg: T2IAdapterConfig) -> dict[str, str]:
    return converted_metadata(FORMAT, cfg)
