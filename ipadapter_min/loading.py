"""Building models from checkpoints: each model is built once, on the meta device (no memory, no
random initialisation), every key and shape of the checkpoint is checked against that build, and
the tensors become its parameters.

The format readers (``formats``) hand over memory-mapped tensors renamed to our layout; here they
are cast and moved one at a time, each source dropped as soon as it is used, so loading needs
about the memory of the weights in the target dtype and no more.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .configs import CONTEXT_DIM, AdapterSpec, ControlNetConfig, ImageEncoderConfig, T2IAdapterConfig, VAEConfig
from .controlnet import ControlNet
from .formats.controlnet import read_controlnet
from .formats.files import Checkpoint, CheckpointError, release
from .formats.image_encoder import read_image_encoder
from .formats.ip_adapter import read_ip_adapter, to_project_layout
from .formats.lora import PARTS as LORA_PARTS, LayerUpdate, read_lora
from .formats.t2i_adapter import read_t2i_adapter
from .formats.sd15 import read_sd15
from .formats.vae import read_vae
from .ip_layers import CROSS_ATTENTION_WIDTHS
from .image_encoder import ImageEncoder, import_open_clip
from .ip_adapter import IPAdapter
from .t2i_adapter import T2IAdapter
from .text_encoder import TextEncoder
from .unet import UNet
from .vae import VAE

SD15_MODELS = {"unet": UNet, "vae": VAE, "text_encoder": TextEncoder}
_INIT_FILLS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "xavier_uniform_",
               "xavier_normal_", "kaiming_uniform_", "kaiming_normal_")


@contextlib.contextmanager
def skip_init():
    """``torch.nn.init``'s fills do nothing for a while. Modules fill their weights as they are
    built; on the meta device there is nothing to fill, yet the first ``normal_`` there imports
    torch's decomposition machinery (sympy and ~900 modules: ~150 MB and seconds), for weights
    that the checkpoint replaces anyway. (diffusers and transformers skip them the same way.)"""
    saved = {name: getattr(nn.init, name) for name in _INIT_FILLS}
    try:
        for name in _INIT_FILLS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def build_checked(build: Callable[[], nn.Module], checkpoint: Checkpoint, what: str, prefix: str = "") -> nn.Module:
    """``build()`` on the meta device, and the checkpoint's tensors under ``prefix`` checked
    against it: a one-line CheckpointError names the first unexpected, mis-shaped or missing key."""
    with torch.device("meta"), skip_init():
        model = build()
    expected = {prefix + k: v.shape for k, v in model.state_dict().items()}
    for key, value in checkpoint.tensors.items():
        if not key.startswith(prefix):
            continue
        if key not in expected:
            raise CheckpointError(f"{checkpoint.where(key)} is unexpected for {what}")
        if value.shape != expected[key]:
            raise CheckpointError(f"{checkpoint.where(key)} has shape {list(value.shape)}, expected "
                                  f"{list(expected[key])} for {what}")
    missing = [k for k in expected if k not in checkpoint.tensors]
    if missing:
        raise CheckpointError(f"{checkpoint.source}: missing key {checkpoint.file_key(missing[0])!r} for {what} "
                              f"({len(missing)} missing in all)")
    return model


def assign(model: nn.Module, checkpoint: Checkpoint, device, dtype, prefix: str = "") -> nn.Module:
    """Move the (checked) tensors under ``prefix`` out of the checkpoint into ``model``'s
    parameters, cast one at a time so that each source is freed before the next is read."""
    state = {}
    for key in [k for k in checkpoint.tensors if k.startswith(prefix)]:
        source = checkpoint.tensors.pop(key)
        target = source.to(device=device, dtype=dtype if source.is_floating_point() else source.dtype)
        if target is not source:
            release(source)
        state[key[len(prefix):]] = target
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def refuse_leftovers(checkpoint: Checkpoint, prefixes: list[str], what: str) -> None:
    """Keys that belong to none of the models being loaded."""
    for key in checkpoint.tensors:
        if not key.startswith(tuple(prefixes)):
            raise CheckpointError(f"{checkpoint.where(key)} is unexpected for {what}")


def build_sd15(checkpoint: Checkpoint, configs: dict[str, object]) -> dict[str, nn.Module]:
    """The three SD1.5 models on the meta device, the checkpoint checked against them (converters
    stop here; loading goes on to assign)."""
    refuse_leftovers(checkpoint, [f"{part}." for part in SD15_MODELS], "SD1.5")
    return {part: build_checked(lambda: model_cls(configs[part]), checkpoint, f"SD1.5's {part}", f"{part}.")
            for part, model_cls in SD15_MODELS.items()}


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
