"""Structure controls from their files: ControlNets and T2I-Adapters."""
from __future__ import annotations

from pathlib import Path

import torch

from ..formats.controlnet import read_controlnet
from ..formats.files import Checkpoint
from ..formats.t2i_adapter import read_t2i_adapter
from ..models.configs import ControlNetConfig, T2IAdapterConfig
from ..models.controlnet import ControlNet
from ..models.t2i_adapter import T2IAdapter
from .checked import assign, build_checked


def controlnet_from_checkpoint(checkpoint: Checkpoint, cfg: ControlNetConfig, device: str | torch.device = "cpu",
                               dtype: torch.dtype = torch.float32) -> ControlNet:
    model = build_checked(lambda: ControlNet(cfg), checkpoint, "an SD1.5 ControlNet")
    return assign(model, checkpoint, device, dtype)


def load_controlnet(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> ControlNet:
    """An original ControlNet file (.pth or .safetensors, with or without ``control_model.``), a
    diffusers folder or a converted file."""
    return controlnet_from_checkpoint(*read_controlnet(path), device, dtype)


def t2i_adapter_what(cfg: T2IAdapterConfig) -> str:
    return f"a {'light' if cfg.light else 'full'} SD1.5 T2I-Adapter ({'grayscale' if cfg.in_channels == 1 else 'colour'} input)"


def t2i_adapter_from_checkpoint(checkpoint: Checkpoint, cfg: T2IAdapterConfig, device: str | torch.device = "cpu",
                                dtype: torch.dtype = torch.float32) -> T2IAdapter:
    model = build_checked(lambda: T2IAdapter(cfg), checkpoint, t2i_adapter_what(cfg))
    return assign(model, checkpoint, device, dtype)


def load_t2i_adapter(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                     ) -> T2IAdapter:
    """An original TencentARC T2I-Adapter file, a diffusers folder or a converted file."""
    return t2i_adapter_from_checkpoint(*read_t2i_adapter(path), device, dtype)
