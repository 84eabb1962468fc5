"""The conversions behind ``python -m weights_convert``: read a downloaded checkpoint with the
format readers, check it against the models it is for, and write the project's safetensors file.
Each returns the one-line summary the command prints."""
from __future__ import annotations

import os

import torch

from ipadapter_min.formats.controlnet import controlnet_metadata, read_controlnet
from ipadapter_min.formats.files import Checkpoint, save_safetensors
from ipadapter_min.formats.image_encoder import image_encoder_metadata, read_transformers_image_encoder
from ipadapter_min.formats.ip_adapter import ip_adapter_metadata, read_ip_adapter
from ipadapter_min.formats.sd15 import read_sd15, sd15_metadata
from ipadapter_min.formats.t2i_adapter import read_t2i_adapter, t2i_adapter_metadata
from ipadapter_min.ip_adapter.adapter import IPAdapter
from ipadapter_min.loading.checked import build_checked
from ipadapter_min.loading.controls import t2i_adapter_what
from ipadapter_min.loading.sd15 import build_sd15
from ipadapter_min.models.controlnet import ControlNet
from ipadapter_min.models.image_encoder import ImageEncoder, import_open_clip
from ipadapter_min.models.t2i_adapter import T2IAdapter


def write_sd15(src: str | os.PathLike, out: str | os.PathLike, force: bool = False,
               dtype: torch.dtype | None = None) -> str:
    checkpoint, configs = read_sd15(src)
    build_sd15(checkpoint, configs)
    tensors = checkpoint.tensors
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_safetensors(tensors, out, sd15_metadata(configs), overwrite=force)
    return f"{out}: SD1.5 UNet, VAE and text encoder, {len(tensors)} tensors"


def convert_ip_adapter(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an IP-Adapter file; return (tensors in the project's layout, metadata)."""
    checkpoint, spec = read_ip_adapter(src)
    build_checked(lambda: IPAdapter(spec), checkpoint, f"a {spec.variant} IP-Adapter for SD1.5")
    return dict(sorted(checkpoint.tensors.items())), ip_adapter_metadata(spec, src)


def write_ip_adapter(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    tensors, metadata = convert_ip_adapter(src)
    save_safetensors(tensors, out, metadata, overwrite=force)
    params = sum(t.numel() for t in tensors.values())
    return (f"{out}: IP-Adapter {metadata['variant']} ({metadata['encoder']} {metadata['encoder_output']}, "
            f"{metadata['tokens']} tokens), {len(tensors)} tensors, {params / 1e6:.1f} M parameters")


def convert_image_encoder(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A transformers CLIPVisionModelWithProjection folder or file → (tensors in the project's
    layout, metadata)."""
    tensors, config = read_transformers_image_encoder(src)
    import_open_clip()  # before the meta-device build: open_clip's module-level tensors stay real
    build_checked(lambda: ImageEncoder(config), Checkpoint(tensors, str(src)), f"a {config.name} image encoder")
    return tensors, image_encoder_metadata(config)


def write_image_encoder(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    tensors, metadata = convert_image_encoder(src)
    save_safetensors(tensors, out, metadata, overwrite=force)
    dtype = next(iter(tensors.values())).dtype
    return (f"{out}: {metadata['model']} image encoder, {len(tensors)} tensors, "
            f"{sum(t.numel() for t in tensors.values()) / 1e6:.0f}M parameters, {str(dtype).removeprefix('torch.')}")


def write_controlnet(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    checkpoint, cfg = read_controlnet(src)
    build_checked(lambda: ControlNet(cfg), checkpoint, "an SD1.5 ControlNet")
    tensors = dict(sorted(checkpoint.tensors.items()))
    save_safetensors(tensors, out, controlnet_metadata(cfg), overwrite=force)
    pooled = ", global pooling (shuffle)" if cfg.global_pool else ""
    return (f"{out}: SD1.5 ControlNet{pooled}, {len(tensors)} tensors, "
            f"{sum(t.numel() for t in tensors.values()) / 1e6:.0f}M parameters")


def write_t2i_adapter(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    checkpoint, cfg = read_t2i_adapter(src)
    what = t2i_adapter_what(cfg)
    build_checked(lambda: T2IAdapter(cfg), checkpoint, what)
    tensors = dict(sorted(checkpoint.tensors.items()))
    save_safetensors(tensors, out, t2i_adapter_metadata(cfg), overwrite=force)
    return f"{out}: {what.removeprefix('a ')}, {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e6:.0f}M parameters"
