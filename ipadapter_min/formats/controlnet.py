"""ControlNet checkpoints → the project's layout: the original module names with no prefix
(``time_embed``, ``input_blocks``, ``middle_block``, ``input_hint_block``, ``zero_convs``,
``middle_block_out``). Three sources are read:

* the original single files (lllyasviel's ``control_v11p_sd15_*.pth`` and the ``.safetensors``
  exports): keys ``control_model.*``, some exports without that prefix; our names once it is
  stripped;
* a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``): the UNet's
  first half is renamed by the UNet's own table (``sd15.unet_table``), the ControlNet's parts by
  the table below;
* the project's converted file (``python -m weights_convert controlnet``), config in its metadata.

The original files say nothing of their configuration; it is SD1.5's, except that a shuffle
model (``*shuffle*`` in the file name, as ComfyUI decides it) pools its residuals globally.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..models.configs import ControlNetConfig, UNetConfig
from .files import Checkpoint, CheckpointError, read_metadata, read_state_dict
from .sd15 import config_from_json, unet_config_from_diffusers, unet_table
from .single_model import converted_metadata, read_converted_model, read_diffusers_model

FORMAT = "ipadapter_min.controlnet"
PREFIX = "control_model."


def controlnet_table(cfg: ControlNetConfig) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) pairs: the UNet's down path, then the hint encoder
    (convolutions at the even indices of ``input_hint_block``), the zero convolutions and the
    middle output."""
    table = [pair for pair in unet_table(cfg.unet) if not pair[1].startswith(("output_blocks.", "out."))]
    table.append(("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    blocks = 2 * (len(cfg.hint_channels) - 1)
    for k in range(blocks):
        table.append((f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * k + 2}."))
    table.append(("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * blocks + 2}."))
    levels, n = len(cfg.unet.channel_mult), cfg.unet.res_blocks
    for i in range(1 + levels * n + levels - 1):  # one per skip connection
        table.append((f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0."))
    table.append(("controlnet_mid_block.", "middle_block_out.0."))
    return table


def refuse_other_families(keys: dict[str, torch.Tensor], source: Path) -> None:
    """ControlNets for SDXL and SD2.x fail with a line that says so, not with a shape mismatch."""
    if any(k.startswith("label_emb.") for k in keys):
        raise CheckpointError(f"{source}: this looks like a ControlNet for SDXL (label_emb.*); only SD1.5 ControlNets "
                              "are supported")
    context = keys.get("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None and context.dim() == 2 and context.shape[1] == 1024:
        raise CheckpointError(f"{source}: this looks like a ControlNet for Stable Diffusion 2.x (1024-wide text "
                              "tokens); only SD1.5 ControlNets (768) are supported")


def controlnet_config_from_diffusers(c: dict) -> ControlNetConfig:
    if c.get("addition_embed_type") == "text_time":
        raise ValueError("addition_embed_type text_time: a ControlNet for SDXL, only SD1.5 ControlNets are supported")
    if c.get("cross_attention_dim") == 1024:
        raise ValueError("cross_attention_dim 1024: a ControlNet for Stable Diffusion 2.x, only SD1.5 is supported")
    if c.get("controlnet_conditioning_channel_order", "rgb") != "rgb":
        raise ValueError(f"controlnet_conditioning_channel_order {c['controlnet_conditioning_channel_order']!r}: "
                         "only 'rgb' is supported")
    return ControlNetConfig(unet=unet_config_from_diffusers(c),
                            hint_channels=tuple(c.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                            conditioning_channels=c.get("conditioning_channels", 3),
                            global_pool=bool(c.get("global_pool_conditions", False)))


def read_controlnet(path: str | Path) -> tuple[Checkpoint, ControlNetConfig]:
    """Any supported ControlNet → (its tensors in our layout, its config)."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers_model(path, controlnet_config_from_diffusers, controlnet_table)
    metadata = read_metadata(path)
    if metadata.get("format") == FORMAT:
        return read_converted_model(path, metadata, controlnet_config_from_json)
    raw = read_state_dict(path)
    if not any(k.startswith(PREFIX) or k.startswith("input_hint_block.") for k in raw):
        raise CheckpointError(f"{path}: not a ControlNet (no control_model.* or input_hint_block.* keys)")
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    refuse_other_families(tensors, path)
    prefixed = any(k.startswith(PREFIX) for k in raw)
    origin = {k.removeprefix(PREFIX): f"{path}: key {k!r}" for k in raw}
    hint = tensors.get("input_hint_block.0.weight")
    cfg = ControlNetConfig(unet=UNetConfig(), conditioning_channels=hint.shape[1] if hint is not None else 3,
                           global_pool="shuffle" in path.name.lower())
    return Checkpoint(tensors, str(path), origin, (lambda k: PREFIX + k) if prefixed else str), cfg


def controlnet_metadata(cfg: ControlNetConfig) -> dict[str, str]:
    return converted_metadata(FORMAT, cfg)


def controlnet_config_from_json(text: str) -> ControlNetConfig:
    return config_from_json(ControlNetConfig, text)
