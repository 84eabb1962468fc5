"""IP-Adapter files → the project's layout (read here, written by ``python -m weights_convert ip-adapter``).

Input: the official nested ``.bin`` or flat ``.safetensors`` (h94/IP-Adapter, SD1.5 variants), or
an already converted file. Output keys are ``ipadapter_min.ip_adapter.adapter.IPAdapter``'s state dict:

    image_proj.<official image_proj key>      unchanged (dtype as stored: fp16, the plus resampler fp32)
    ip_layers.<0..15>.to_k_ip.weight          official ip_adapter.<1,3,…,31>.to_k_ip.weight, renumbered
    ip_layers.<0..15>.to_v_ip.weight          to the order the UNet runs its cross-attention layers

Metadata: format, format_version, variant (base | vit-g | plus | full-face, from keys and shapes),
encoder, encoder_output, feature_dim, tokens, context_dim, source (the input's file name, for
information only). Files written before feature_dim and context_dim were recorded read the same.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

import torch

from ..ip_adapter.layers import LAYER_OF_OFFICIAL, LAYERS, NUM_LAYERS
from ..models.configs import VIT_H, VIT_H_TOKENS, VIT_H_WIDTH, AdapterSpec, ResamplerConfig, encoder_name
from .files import Checkpoint, CheckpointError, read_metadata, read_state_dict, save_safetensors, write_atomically

FORMAT = "ipadapter_min.ip_adapter"
FORMAT_VERSION = "1"
RECORDED = ("variant", "encoder", "encoder_output", "feature_dim", "tokens", "context_dim")  # spec fields in the metadata


def official_key(key: str) -> str:
    """Our ``ip_layers.<i>.…`` key as the official files name it (``ip_adapter.<1,3,…,31>.…``)."""
    m = re.fullmatch(r"ip_layers\.(\d+)\.(to_[kv]_ip\.weight)", key)
    if m and int(m.group(1)) < NUM_LAYERS:
        return f"ip_adapter.{LAYERS[int(m.group(1))].official}.{m.group(2)}"
    return key


def to_project_layout(state: Mapping[str, torch.Tensor], source: object = "checkpoint"
                      ) -> tuple[Checkpoint, AdapterSpec]:
    """Official or converted IP-Adapter state (flat keys) → (renamed tensors, spec). Raises a
    one-line :class:`CheckpointError` naming the key and ``source``; shapes are checked by
    ``loading`` against the adapter it builds."""
    tensors, file_keys = {}, {}
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
            raise CheckpointError(f"{source}: key {key!r} duplicates {file_keys[new]!r}")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} is not a floating-point tensor")
        tensors[new], file_keys[new] = value, key
    spec = detect_variant({k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")},
                          str(source))
    origin = {new: f"{source}: key {key!r}" for new, key in file_keys.items()}
    return Checkpoint(tensors, str(source), origin, official_key if official else str), spec


def read_ip_adapter(path: str | os.PathLike) -> tuple[Checkpoint, AdapterSpec]:
    """An official (.bin / .safetensors) or converted IP-Adapter file → (our layout, spec)."""
    metadata = read_metadata(path)
    fmt = metadata.get("format")
    if fmt is not None and fmt.startswith("ipadapter_min.") and fmt != FORMAT:  # another of our files
        raise CheckpointError(f"{path}: a {fmt!r} file, not an IP-Adapter ({FORMAT!r})")
    checkpoint, spec = to_project_layout(read_state_dict(path), path)
    if fmt == FORMAT:
        for key in RECORDED:  # each read from the weights again: a file edited since is refused
            found = str(getattr(spec, key))
            if metadata.get(key, found) != found:
                raise CheckpointError(f"{path}: metadata says {key} {metadata[key]!r}, the weights give {found!r}")
    return checkpoint, spec


def official_layout(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Our layout → the release's nested ``{"image_proj": …, "ip_adapter": {"1.to_k_ip.weight": …}}``
    (the inverse of :func:`to_project_layout`), which every IP-Adapter runtime reads."""
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, _, rest = official_key(key).partition(".")
        nested[part][rest] = value
    return nested


def save_official(tensors: Mapping[str, torch.Tensor], folder: str | os.PathLike, overwrite: bool = False
                  ) -> tuple[Path, Path]:
    """``folder/ip-adapter.safetensors`` (flat ``image_proj.*`` / ``ip_adapter.*`` keys, dtype kept)
    and ``folder/ip-adapter.bin`` (the nested pickle, fp16), as the release ships them; each
    written atomically, an existing one replaced only with ``overwrite``."""
    folder = Path(folder)
    nested = official_layout({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    flat = {f"{part}.{k}": v for part, part_tensors in nested.items() for k, v in part_tensors.items()}
    half = {part: {k: v.half() for k, v in part_tensors.items()} for part, part_tensors in nested.items()}
    paths = folder / "ip-adapter.safetensors", folder / "ip-adapter.bin"
    for path in paths:
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} already exists (pass --force to overwrite it)")
    save_safetensors(flat, paths[0], {"format": "pt"}, overwrite)
    write_atomically(paths[1], lambda tmp: torch.save(half, tmp), overwrite)
    return paths


def ip_adapter_metadata(spec: AdapterSpec, source: str | os.PathLike) -> dict[str, str]:
    """The metadata of a converted IP-Adapter file."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **{key: str(getattr(spec, key)) for key in RECORDED},
            "source": Path(source).name}


# ----------------------------------------------------------------------------------------------
# Which variant: told from the image projection's keys and shapes, never from the file name


def _shape(state: Mapping, key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key 'image_proj.{key}'")
    value = state[key]
    shape = tuple(value.shape) if hasattr(value, "shape") else tuple(value)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: 'image_proj.{key}' has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def detect_variant(state: Mapping[str, object], source: str = "checkpoint") -> AdapterSpec:
    """Tell the IP-Adapter variant from the image-projection state (keys without ``image_proj.``;
    values are tensors or shapes). Raises a one-line :class:`CheckpointError` naming ``source``.

    Any token width (``context_dim``) is accepted here: whether it fits a UNet is checked where the
    adapter meets one (``loading.ip_adapter.check_context_width``). Base and plus take embeddings and hidden
    states of any width, so that adapters for small models of our own read as the releases do."""
    keys = set(state)
    if any(k.startswith("perceiver_resampler.") for k in keys) or (
            "proj.0.weight" in keys and "norm.weight" in keys and "proj.3.weight" not in keys):
        raise CheckpointError(f"{source}: an IP-Adapter FaceID projection (face-recognition embeddings); "
                              f"only the CLIP-image variants (base, light, vit-G, plus, plus-face, full-face) "
                              f"are supported")
    if "proj.weight" in keys:
        out, embed = _shape(state, "proj.weight", source, 2)
        (width,) = _shape(state, "norm.weight", source, 1)
        if out % width:
            raise CheckpointError(f"{source}: 'image_proj.proj.weight' has {out} outputs, not a multiple of {width}")
        return AdapterSpec.on_embedding(embed, out // width, width)
    if "proj.3.weight" in keys:
        hidden, embed = _shape(state, "proj.0.weight", source, 2)
        width, _ = _shape(state, "proj.2.weight", source, 2)
        if embed != VIT_H_WIDTH:  # one token per hidden state: the count is ViT-H/14's only for its width
            raise CheckpointError(f"{source}: 'image_proj.proj.0.weight' takes {embed}-wide hidden states, "
                                  f"expected ViT-H/14's {VIT_H_WIDTH}")
        return AdapterSpec("full-face", VIT_H, "penultimate", embed, VIT_H_TOKENS, width)
    if "latents" in keys:
        _, queries, dim = _shape(state, "latents", source, 3)
        _, embed = _shape(state, "proj_in.weight", source, 2)
        output, _ = _shape(state, "proj_out.weight", source, 2)
        depth = sum(1 for k in keys if k.startswith("layers.") and k.endswith(".0.to_q.weight"))
        if depth == 0:
            raise CheckpointError(f"{source}: missing key 'image_proj.layers.0.0.to_q.weight'")
        inner, _ = _shape(state, "layers.0.0.to_q.weight", source, 2)
        ff, _ = _shape(state, "layers.0.1.1.weight", source, 2)
        dim_head = ResamplerConfig.dim_head  # not recorded in the file; the release uses 64
        if inner % dim_head or ff % dim:
            raise CheckpointError(f"{source}: resampler widths (attention {inner}, feed-forward {ff}) do not fit "
                                  f"dim_head {dim_head} and dim {dim}")
        config = ResamplerConfig(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                                 num_queries=queries, embedding_dim=embed, output_dim=output, ff_mult=ff // dim)
        return AdapterSpec("plus", encoder_name(embed, "penultimate"), "penultimate", embed, queries, output,
                           resampler=config)
    raise CheckpointError(f"{source}: not an IP-Adapter image projection (none of 'image_proj.proj.weight', "
                          f"'image_proj.proj.3.weight', 'image_proj.latents' found)")
