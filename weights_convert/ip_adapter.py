"""IP-Adapter files → the project's layout (``python -m weights_convert ip-adapter SRC -o OUT``).

Input: the official nested ``.bin`` or flat ``.safetensors`` (h94/IP-Adapter, SD1.5 variants), or
an already converted file. Output keys are ``ipadapter_min.ip_adapter.IPAdapter``'s state dict:

    image_proj.<official image_proj key>      unchanged (dtype as stored: fp16, the plus resampler fp32)
    ip_layers.<0..15>.to_k_ip.weight          official ip_adapter.<1,3,…,31>.to_k_ip.weight, renumbered
    ip_layers.<0..15>.to_v_ip.weight          to the order the UNet runs its cross-attention layers

Metadata: format, format_version, variant (base | vit-g | plus | full-face, from keys and shapes),
encoder, encoder_output, tokens, source (the input's file name, for information only).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ipadapter_min.image_projection import AdapterSpec, detect_variant
from ipadapter_min.ip_adapter import IPAdapter
from ipadapter_min.ip_layers import LAYER_OF_OFFICIAL, LAYERS, NUM_LAYERS
from weights_convert.files import CheckpointError, read_metadata, read_state_dict, save_safetensors

FORMAT = "ipadapter_min.ip_adapter"
FORMAT_VERSION = "1"


def _file_key(key: str, official: bool) -> str:
    m = re.fullmatch(r"ip_layers\.(\d+)\.(to_[kv]_ip\.weight)", key)
    if official and m and int(m.group(1)) < NUM_LAYERS:
        return f"ip_adapter.{LAYERS[int(m.group(1))].official}.{m.group(2)}"
    return key


def to_project_layout(state: Mapping[str, torch.Tensor], source: object = "checkpoint"
                      ) -> tuple[dict[str, torch.Tensor], AdapterSpec]:
    """Official or converted IP-Adapter state (flat keys) → (this module's state dict, spec),
    every key and shape checked. Raises a one-line :class:`CheckpointError` naming key and file."""
    tensors, file_key = {}, {}
    official = any(k.startswith("ip_adapter.") for k in state)
    for key, value in state.items():
        new = key
        if key.startswith("ip_adapter."):
            m = re.fullmatch(r"ip_adapter\.(\d+)\.(to_[kv]_ip\.weight)", key)
            if not m or int(m.group(1)) not in LAYER_OF_OFFICIAL:
                raise CheckpointError(f"{source}: unexpected key {key!r} "
                                      f"(not an SD1.5 IP-Adapter cross-attention weight)")
            new = f"ip_layers.{LAYER_OF_OFFICIAL[int(m.group(1))]}.{m.group(2)}"
        elif not key.startswith(("image_proj.", "ip_layers.")):
            raise CheckpointError(f"{source}: unexpected key {key!r} (IP-Adapter keys start with image_proj. and "
                                  f"ip_adapter.)")
        if new in tensors:
            raise CheckpointError(f"{source}: key {key!r} duplicates {file_key[new]!r}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} is not a floating-point tensor")
        tensors[new], file_key[new] = value, key
    spec = detect_variant({k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")},
                          str(source))
    with torch.device("meta"):
        expected = {k: v.shape for k, v in IPAdapter(spec).state_dict().items()}
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    for problem, keys in (("missing key", missing), ("unexpected key", unexpected)):
        if keys:
            more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
            name = file_key.get(keys[0]) or _file_key(keys[0], official)
            raise CheckpointError(f"{source}: {problem} {name!r} for a {spec.variant} IP-Adapter{more}")
    for key, shape in expected.items():
        if tensors[key].shape != shape:
            raise CheckpointError(f"{source}: {file_key[key]!r} has shape {list(tensors[key].shape)}, a {spec.variant} "
                                  f"IP-Adapter for SD1.5 needs {list(shape)}")
    return tensors, spec


def read_ip_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], AdapterSpec]:
    """An official (.bin / .safetensors) or converted IP-Adapter file → (our layout, spec), checked."""
    metadata = read_metadata(path)
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT:
        raise CheckpointError(f"{path}: a {fmt!r} file, not an IP-Adapter ({FORMAT!r})")
    tensors, spec = to_project_layout(read_state_dict(path), path)
    if fmt == FORMAT and "variant" in metadata and metadata["variant"] != spec.variant:
        raise CheckpointError(f"{path}: metadata says variant {metadata['variant']!r}, the weights are {spec.variant!r}")
    return tensors, spec


def convert_ip_adapter(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an IP-Adapter file; return (tensors in the project's layout, metadata)."""
    tensors, spec = read_ip_adapter(src)
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "variant": spec.variant,
        "encoder": spec.encoder,
        "encoder_output": spec.encoder_output,
        "tokens": str(spec.tokens),
        "source": Path(src).name,
    }
    return {k: v.contiguous() for k, v in sorted(tensors.items())}, metadata


def write_ip_adapter(src: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> str:
    """Convert ``src`` and write ``out`` (atomically; an existing file only with ``force``).
    Returns a one-line summary for the CLI."""
    tensors, metadata = convert_ip_adapter(src)
    save_safetensors(tensors, out, metadata, overwrite=force)
    params = sum(t.numel() for t in tensors.values())
    return (f"{out}: IP-Adapter {metadata['variant']} ({metadata['encoder']} {metadata['encoder_output']}, "
            f"{metadata['tokens']} tokens), {len(tensors)} tensors, {params / 1e6:.1f} M parameters")

