"""transformers ``CLIPVisionModelWithProjection`` → the project's image encoder layout.

The IP-Adapter release ships its image encoders (``models/image_encoder``: OpenCLIP ViT-H/14;
``sdxl_models/image_encoder``: ViT-bigG/14) as transformers folders: ``config.json`` and
``model.safetensors`` with keys ``vision_model.*`` and ``visual_projection.weight``. The project
keeps open_clip's own module names (``visual.*``, as in open_clip checkpoints):

    vision_model.embeddings.class_embedding            → visual.class_embedding
    vision_model.embeddings.patch_embedding.weight     → visual.conv1.weight
    vision_model.embeddings.position_embedding.weight  → visual.positional_embedding
    vision_model.pre_layrnorm.*                        → visual.ln_pre.*
    vision_model.encoder.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}
                                                       → visual.transformer.resblocks.{i}.attn.in_proj_{weight,bias}
                                                         (q, k, v stacked along dim 0)
    ….self_attn.out_proj.* / layer_norm1.* / layer_norm2.* / mlp.fc1.* / mlp.fc2.*
                                                       → ….attn.out_proj.* / ln_1.* / ln_2.* / mlp.c_fc.* / mlp.c_proj.*
    vision_model.post_layernorm.*                      → visual.ln_post.*
    visual_projection.weight [proj, width]             → visual.proj [width, proj] (transposed)

``vision_model.embeddings.position_ids`` (a buffer older transformers saved) is ignored.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from ..models.configs import ImageEncoderConfig
from .files import Checkpoint, CheckpointError, read_metadata, read_state_dict

FORMAT = "ipadapter_min.image_encoder"  # the project's converted file: keys visual.*, config in metadata

IGNORED_KEYS = ("vision_model.embeddings.position_ids",)

# (transformers name, open_clip name): whole-model tensors, then per-layer ones (renamed as-is).
TOP_LEVEL = (
    ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
    ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
    ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
    ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
    ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
    ("vision_model.post_layernorm.weight", "visual.ln_post.weight"),
    ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
)
LAYER_RENAMES = (
    ("self_attn.out_proj", "attn.out_proj"),
    ("layer_norm1", "ln_1"),
    ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"),
    ("mlp.fc2", "mlp.c_proj"),
)
PROJECTION = "visual_projection.weight"

# Heads cannot be read off the shapes; these widths have known head counts (ViT-B/L/H/bigG).
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 16, 1664: 16}


def hf_layer(i: int) -> str:
    return f"vision_model.encoder.layers.{i}."


def oc_layer(i: int) -> str:
    return f"visual.transformer.resblocks.{i}."


def transformers_shapes(config: ImageEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every key of a transformers CLIPVisionModelWithProjection of this shape, with its shape."""
    w, m = config.width, config.mlp_width
    shapes = {
        "vision_model.embeddings.class_embedding": (w,),
        "vision_model.embeddings.patch_embedding.weight": (w, 3, config.patch_size, config.patch_size),
        "vision_model.embeddings.position_embedding.weight": (config.num_tokens, w),
        "vision_model.pre_layrnorm.weight": (w,),
        "vision_model.pre_layrnorm.bias": (w,),
    }
    for i in range(config.layers):
        p = hf_layer(i)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (w, w)
            shapes[f"{p}self_attn.{proj}.bias"] = (w,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{p}{norm}.weight"] = (w,)
            shapes[f"{p}{norm}.bias"] = (w,)
        shapes[f"{p}mlp.fc1.weight"] = (m, w)
        shapes[f"{p}mlp.fc1.bias"] = (m,)
        shapes[f"{p}mlp.fc2.weight"] = (w, m)
        shapes[f"{p}mlp.fc2.bias"] = (w,)
    shapes["vision_model.post_layernorm.weight"] = (w,)
    shapes["vision_model.post_layernorm.bias"] = (w,)
    shapes[PROJECTION] = (config.proj_dim, w)
    return shapes


def config_from_transformers_json(cfg: dict, source: str) -> ImageEncoderConfig:
    """ImageEncoderConfig from a CLIPVisionConfig config.json (missing fields take transformers'
    defaults, as transformers itself would)."""
    if cfg.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"{source}: model_type {cfg.get('model_type')!r}, expected 'clip_vision_model'")
    if cfg.get("num_channels", 3) != 3:
        raise CheckpointError(f"{source}: num_channels {cfg['num_channels']}, expected 3")
    try:
        return ImageEncoderConfig(
            width=int(cfg.get("hidden_size", 768)),
            layers=int(cfg.get("num_hidden_layers", 12)),
            heads=int(cfg.get("num_attention_heads", 12)),
            mlp_width=int(cfg.get("intermediate_size", 3072)),
            patch_size=int(cfg.get("patch_size", 32)),
            image_size=int(cfg.get("image_size", 224)),
            proj_dim=int(cfg.get("projection_dim", 512)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
            act=cfg.get("hidden_act", "quick_gelu"),
        )
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: unsupported config ({exc})") from None


def config_from_transformers_shapes(state: dict[str, torch.Tensor], source: str) -> ImageEncoderConfig:
    """Guess the config of a transformers-layout state dict from its shapes alone (no
    config.json): OpenCLIP conventions (gelu, eps 1e-5), heads from HEADS_BY_WIDTH."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} (needed to tell the model's size)")
        return tuple(state[key].shape)

    width = shape("vision_model.embeddings.class_embedding")[0]
    patch = shape("vision_model.embeddings.patch_embedding.weight")[-1]
    grid = math.isqrt(max(shape("vision_model.embeddings.position_embedding.weight")[0] - 1, 0))
    layers = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", k))),
                     default=-1)
    if layers == 0:
        raise CheckpointError(f"{source}: no 'vision_model.encoder.layers.*' keys")
    try:
        return ImageEncoderConfig(
            width=width, layers=layers, heads=HEADS_BY_WIDTH.get(width, max(width // 64, 1)),
            mlp_width=shape(hf_layer(0) + "mlp.fc1.weight")[0], patch_size=patch, image_size=grid * patch,
            proj_dim=shape(PROJECTION)[0],
        )
    except ValueError as exc:
        raise CheckpointError(f"{source}: unsupported shapes ({exc})") from None


def transformers_to_open_clip(state: dict[str, torch.Tensor], config: ImageEncoderConfig,
                              source: str) -> dict[str, torch.Tensor]:
    """Check every key and shape of a transformers-layout state dict against ``config`` (a
    one-line CheckpointError naming the first bad key and ``source``), then rename it."""
    expected = transformers_shapes(config)
    for key in state:
        if key not in expected and key not in IGNORED_KEYS:
            raise CheckpointError(f"{source}: unexpected key {key!r} for a {config.name} CLIPVisionModelWithProjection")
    for key, ref in expected.items():
        if key not in state:
            raise CheckpointError(f"{source}: missing key {key!r} for a {config.name} CLIPVisionModelWithProjection")
        if tuple(state[key].shape) != ref:
            raise CheckpointError(f"{source}: key {key!r} has shape {list(state[key].shape)}, expected {list(ref)} "
                                  f"for a {config.name} CLIPVisionModelWithProjection")

    out = {oc: state[hf] for hf, oc in TOP_LEVEL}
    out["visual.proj"] = state[PROJECTION].t().contiguous()
    for i in range(config.layers):
        src, dst = hf_layer(i), oc_layer(i)
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state[f"{src}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")], dim=0)
            for hf_name, oc_name in LAYER_RENAMES:
                out[f"{dst}{oc_name}.{kind}"] = state[f"{src}{hf_name}.{kind}"]
    return out


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        try:
            shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{file}: not a readable shard index ({exc})") from None
        state = {}
        for shard in shards:
            state.update(read_state_dict(file.parent / shard))
        return state
    return read_state_dict(file)


def read_transformers_image_encoder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ImageEncoderConfig]:
    """Read a CLIPVisionModelWithProjection folder (or its weights file; a config.json beside it
    is used when present, else the config is read off the shapes) → (open_clip-layout tensors,
    config). Tensors keep the file's dtype."""
    path = Path(path)
    if path.is_dir():
        file = _weights_file(path)
        config_file = path / "config.json"
    elif path.is_file():
        file, config_file = path, path.parent / "config.json"
    else:
        raise CheckpointError(f"{path}: no such file or folder")
    state = _read_weights(file)
    if not any(k.startswith("vision_model.") for k in state):
        raise CheckpointError(f"{file}: not a transformers CLIP vision model (no 'vision_model.*' keys)")
    cfg_json = None
    if config_file.is_file():
        try:
            cfg_json = json.loads(config_file.read_text())
        except ValueError as exc:
            raise CheckpointError(f"{config_file}: not valid JSON ({exc})") from None
        if not isinstance(cfg_json, dict) or (path.is_file() and cfg_json.get("model_type") != "clip_vision_model"):
            cfg_json = None  # a weights file given alone: only trust a config.json that describes it
    if cfg_json is not None:
        config = config_from_transformers_json(cfg_json, str(config_file))
    else:
        config = config_from_transformers_shapes(state, str(file))
    return transformers_to_open_clip(state, config, str(file)), config


def image_encoder_metadata(config: ImageEncoderConfig) -> dict[str, str]:
    """The metadata of a converted image-encoder file."""
    return {"format": FORMAT, "config": config.to_json(), "model": config.name,
            "converted_from": "transformers CLIPVisionModelWithProjection"}


def read_image_encoder(path: str | os.PathLike) -> tuple[Checkpoint, ImageEncoderConfig]:
    """A converted file (``python -m weights_convert image-encoder``) or a transformers folder or
    weights file → (open_clip-layout tensors, config)."""
    path = Path(path)
    metadata = read_metadata(path) if path.is_file() else {}
    if metadata.get("format") == FORMAT:
        try:
            config = ImageEncoderConfig.from_json(metadata["config"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: bad 'config' metadata ({exc})") from None
        return Checkpoint(read_state_dict(path), str(path)), config
    state, config = read_transformers_image_encoder(path)
    return Checkpoint(state, str(path)), config
