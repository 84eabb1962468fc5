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
from pathlib import Path

import torch

from ipadapter_min.ip_adapter import FORMAT, FORMAT_VERSION, to_project_layout
from weights_convert.files import read_state_dict, save_safetensors


def convert_ip_adapter(src: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and check an IP-Adapter file; return (tensors in the project's layout, metadata)."""
    tensors, spec = to_project_layout(read_state_dict(src), src)
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

