"""Separately distributed SD1.5 autoencoders (stabilityai's sd-vae-ft-mse and the like) → our VAE's layout.

| source | keys | config |
|---|---|---|
| original file (``vae-ft-mse-840000-ema-pruned.safetensors`` or ``.ckpt``) | ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``: our names as they are; or under ``first_stage_model.``, whose other keys (a whole checkpoint's UNet, say) are then ignored; a ``.ckpt``'s ``state_dict`` unwrapped; ``model_ema.*`` and ``loss.*`` ignored | SD1.5's (the file has none) |
| diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``; or a model folder with ``vae/``) | renamed by ``sd15.vae_table`` | ``config.json`` |

A VAE whose latents are not SD1.5's 4 channels (SD3's and Flux's have 16) is refused. SDXL's VAE
has SD1.5's shapes and reads like one (its scaling factor is in its config.json).
"""
from __future__ import annotations

from pathlib import Path

from ..models.configs import VAEConfig
from .files import Checkpoint, CheckpointError, read_state_dict
from .sd15 import (config_from, read_json, rename, vae_attention_as_convolutions, vae_config_from_diffusers, vae_table,
                   weights_file)

VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # our VAE's (and the original's) parts
IGNORED_PREFIXES = ("model_ema.", "loss.")  # EMA copies and the training loss's discriminator in the original files
WRAPPER = "first_stage_model."  # the VAE's prefix in a whole original checkpoint
DIFFUSERS_PARTS = ("down_blocks.", "up_blocks.", "mid_block.")  # names only diffusers' layout has
SD15_LATENT_CHANNELS = 4


def check_latent_channels(channels: int, where: str) -> None:
    if channels != SD15_LATENT_CHANNELS:
        raise CheckpointError(f"{where}: a VAE with {channels}-channel latents (SD3's and Flux's have 16); SD1.5's has "
                              f"{SD15_LATENT_CHANNELS}")


def read_diffusers_vae(folder: Path) -> tuple[Checkpoint, VAEConfig]:
    config_path = folder / "config.json"
    raw = read_json(config_path)
    if raw.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise CheckpointError(f"{config_path}: a {raw['_class_name']}, not an AutoencoderKL (SD1.5's VAE)")
    cfg = config_from(vae_config_from_diffusers, raw, config_path)
    check_latent_channels(cfg.latent_channels, str(folder))
    weights = weights_file(folder, ("diffusion_pytorch_model",))
    table, tensors, origin = vae_table(cfg), {}, {}
    for key, value in read_state_dict(weights).items():
        ours = rename(key, table)
        tensors[ours], origin[ours] = value, f"{weights}: key {key!r}"
    vae_attention_as_convolutions(tensors, "")
    return Checkpoint(tensors, str(folder), origin), cfg


def read_original_vae(path: Path) -> tuple[Checkpoint, VAEConfig]:
    raw = read_state_dict(path)
    prefix = WRAPPER if any(k.startswith(WRAPPER) for k in raw) else ""
    tensors, origin = {}, {}
    for key, value in raw.items():
        if not key.startswith(prefix):
            continue  # the rest of a whole checkpoint
        ours = key[len(prefix):]
        if ours.startswith(IGNORED_PREFIXES):
            continue
        if not ours.startswith(VAE_PREFIXES):
            raise CheckpointError(f"{path}: unexpected key {key!r} (an SD1.x VAE has {', '.join(VAE_PREFIXES)})")
        tensors[ours], origin[ours] = value, f"{path}: key {key!r}"
    if not tensors:
        raise CheckpointError(f"{path}: no VAE weights found (expected encoder.*, decoder.* keys)")
    conv_in = tensors.get("decoder.conv_in.weight")
    if conv_in is not None and conv_in.dim() == 4:
        check_latent_channels(conv_in.shape[1], str(path))
    cfg = VAEConfig()
    if any(part in key for key in tensors for part in DIFFUSERS_PARTS):  # diffusers' names in one file
        table = vae_table(cfg)
        renamed = {rename(k, table): k for k in tensors}
        tensors, origin = {k: tensors[old] for k, old in renamed.items()}, {k: origin[old] for k, old in renamed.items()}
    vae_attention_as_convolutions(tensors, "")
    return Checkpoint(tensors, str(path), origin, file_key=lambda key: prefix + key), cfg


def read_vae(path: str | Path) -> tuple[Checkpoint, VAEConfig]:
    """Any supported VAE file or folder → (its tensors in our VAE's names, its config)."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        return read_diffusers_vae(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return read_original_vae(path)
