"""SD1.5 from its files: the UNet, VAE and text encoder, LoRAs merged and another VAE put in
before any weight is read; or a VAE alone.

The format readers (``formats``) hand over memory-mapped tensors renamed to our layout; here they
are cast and moved one at a time, each source dropped as soon as it is used, so loading needs
about the memory of the weights in the target dtype and no more.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..formats.files import Checkpoint, CheckpointError, read_metadata, release
from ..formats.lora import PARTS as LORA_PARTS, LayerUpdate, read_lora
from ..formats.sd15 import read_converted, read_sd15
from ..formats.vae import read_vae
from ..models.configs import VAEConfig
from ..models.text_encoder import TextEncoder
from ..models.unet import UNet
from ..models.vae import VAE
from .checked import assign, build_checked, refuse_leftovers

SD15_MODELS = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder}


def build_sd15(checkpoint: Checkpoint, configs: dict[str, object]) -> dict[str, nn.Module]:
    """The three SD1.5 models on the meta device, the checkpoint checked against them (converters
    stop here; loading goes on to assign)."""
    refuse_leftovers(checkpoint, [f"{part}." for part in SD15_MODELS], "SD1.5")
    return {part: build_part(checkpoint, configs, part) for part in SD15_MODELS}


def build_part(checkpoint: Checkpoint, configs: dict[str, object], part: str) -> nn.Module:
    """One of the three on the meta device, its ``part.`` keys checked against it."""
    return build_checked(lambda: SD15_MODELS[part](configs[part]), checkpoint, f"SD1.5's {part}", f"{part}.")


def load_part(path: str | Path, part: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
              ) -> nn.Module:
    """One of the three from a converted file of its own (``unet.safetensors``, …): the demo's
    parts, each written by its own training stage, load one at a time while the others are trained."""
    tensors, configs, _ = read_converted(Path(path), read_metadata(path), (part,))
    checkpoint = Checkpoint(tensors, str(path))
    return assign(build_part(checkpoint, configs, part), checkpoint, device, dtype, f"{part}.")


LoRAs = Sequence[tuple[str | Path, float]]  # (LoRA file, weight) pairs


def sd15_from_checkpoint(checkpoint: Checkpoint, configs: dict[str, object], device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, loras: LoRAs = (), vae: str | Path | None = None
                         ) -> dict[str, nn.Module]:
    """:func:`load_sd15` after ``read_sd15``, for callers that check the configs first. The LoRAs
    and the VAE are checked against the models built on the meta device, before any weight is read."""
    models = build_sd15(checkpoint, configs)
    updates = read_loras(models, loras)
    sources = {part: (checkpoint, f"{part}.") for part in models}
    if vae is not None:
        vae_file, vae_config = read_vae(vae)
        check_vae_fits(vae_config, configs["unet"].out_channels, str(vae))
        models["vae"], sources["vae"] = build_checked(lambda: VAE(vae_config), vae_file, "an SD1.5 VAE"), (vae_file, "")
        for key in [k for k in checkpoint.tensors if k.startswith("vae.")]:
            release(checkpoint.tensors.pop(key))  # the checkpoint's own VAE, never read
    loaded = {}
    for part, model in models.items():
        source, prefix = sources[part]
        loaded[part] = assign(model, source, device, dtype, prefix)
    for weight, layer_updates in updates:
        merge_lora(loaded, layer_updates, weight)
    return loaded


def load_sd15(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              loras: LoRAs = (), vae: str | Path | None = None) -> dict[str, nn.Module]:
    """{"unet", "vae", "text_encoder"} from a converted file, an original single file or a diffusers folder.
    ``loras``: (file, weight) pairs, merged into the UNet and text encoder (:func:`merge_lora`), in
    order (they add up); ``vae``: a separately distributed VAE (:func:`load_vae`) instead of the
    checkpoint's."""
    return sd15_from_checkpoint(*read_sd15(path), device, dtype, loras, vae)


# ----------------------------------------------------------------------------- LoRA and VAE files

def read_loras(models: dict[str, nn.Module], loras: LoRAs) -> list[tuple[float, list[LayerUpdate]]]:
    """Each LoRA's updates, checked against the models' keys and shapes (meta-device models will do)."""
    shapes = {f"{part}.{k}": v.shape for part in LORA_PARTS for k, v in models[part].state_dict().items()}
    read = []
    for path, weight in loras:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{path}: the LoRA weight must be a finite number, got {weight!r}")
        read.append((float(weight), read_lora(path, shapes, models["unet"].cfg)))
    return read


@torch.no_grad()
def merge_lora(models: dict[str, nn.Module], updates: Sequence[LayerUpdate], weight: float = 1.0) -> None:
    """W ← W + weight · alpha/rank · up @ down for each updated layer, computed in float32 whatever
    the model's dtype and rounded once into the weight (diffusers' ``fuse_lora(lora_scale=weight)`` on the CPU; on CUDA in
    fp16 peft computes the product in fp16, so there the merge is more exact than diffusers')."""
    for update in updates:
        part, _, name = update.key.partition(".")
        param = models[part].get_parameter(name)
        param.copy_(param.float() + update.delta(param.shape, param.device) * (weight * update.scale))


def check_vae_fits(cfg: VAEConfig, latent_channels: int, where: str) -> None:
    if cfg.latent_channels != latent_channels:
        raise CheckpointError(f"{where}: the VAE's latents have {cfg.latent_channels} channels, the UNet's "
                              f"{latent_channels}")


def vae_from_checkpoint(checkpoint: Checkpoint, cfg: VAEConfig, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> VAE:
    return assign(build_checked(lambda: VAE(cfg), checkpoint, "an SD1.5 VAE"), checkpoint, device, dtype)


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> VAE:
    """A separately distributed SD1.5 VAE: an original file (``vae-ft-mse-840000-ema-pruned.safetensors``
    or ``.ckpt``, with or without ``first_stage_model.``) or a diffusers folder (``config.json`` +
    ``diffusion_pytorch_model.*``, or a model folder with ``vae/``)."""
    return vae_from_checkpoint(*read_vae(path), device, dtype)
