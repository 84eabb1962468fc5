"""SD1.5's 16 cross-attention layers as an IP-Adapter sees them, and λ for each of them.

The UNet numbers its cross-attention layers 0..15 in the order it runs them (input_blocks
1,2,4,5,7,8 → 0..5; middle_block.1 → 6; output_blocks 3..11 → 7..15). :data:`LAYERS` relates
that number to the layer's width, its original single-file name, diffusers' block naming (used
by per-block λ dicts) and the key number in the official files (1, 3, …, 31: attention
processors counted down blocks → up blocks → mid block, self- and cross-attention interleaved).
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Mapping

import torch

from ..models.configs import UNetConfig

_SD15 = UNetConfig()
BLOCK_OUT_CHANNELS = tuple(_SD15.channels * m for m in _SD15.channel_mult)
LAYERS_PER_BLOCK = _SD15.res_blocks  # resnet (+ attention) pairs per down block; up blocks have one more


@dataclass(frozen=True)
class CrossAttentionLayer:
    index: int  # 0..15, the order the UNet runs them
    width: int  # hidden size (= to_k_ip / to_v_ip outputs)
    name: str  # original single-file name
    block: str  # diffusers block: "down.block_0", "mid", "up.block_1", ...
    position: int  # which attention inside that block (diffusers' attentions.<position>)
    official: int  # key number in the official files


def _build_layers() -> tuple[CrossAttentionLayer, ...]:
    ch = BLOCK_OUT_CHANNELS
    down, up = [], []
    # Every down block but the last has attention; input_blocks.0 is conv_in, each level adds
    # LAYERS_PER_BLOCK blocks and a downsampler.
    for b in range(len(ch) - 1):
        for j in range(LAYERS_PER_BLOCK):
            down.append((ch[b], f"input_blocks.{1 + (LAYERS_PER_BLOCK + 1) * b + j}.1", f"down.block_{b}", j))
    mid = [(ch[-1], "middle_block.1", "mid", 0)]
    # Up blocks mirror the down blocks: diffusers' up block 0 (no attention) mirrors the last down block.
    for u in range(1, len(ch)):
        for j in range(LAYERS_PER_BLOCK + 1):
            up.append((ch[::-1][u], f"output_blocks.{(LAYERS_PER_BLOCK + 1) * u + j}.1", f"up.block_{u}", j))
    run_order = down + mid + up
    official_order = down + up + mid  # diffusers' attn_processors order, which numbers the official keys
    official = {entry[1]: 2 * k + 1 for k, entry in enumerate(official_order)}
    return tuple(CrossAttentionLayer(i, w, f"{name}.transformer_blocks.0.attn2", block, pos, official[name])
                 for i, (w, name, block, pos) in enumerate(run_order))


LAYERS = _build_layers()
NUM_LAYERS = len(LAYERS)
CROSS_ATTENTION_WIDTHS = tuple(layer.width for layer in LAYERS)
LAYER_OF_OFFICIAL = {layer.official: layer.index for layer in LAYERS}
# diffusers block name → our layer indices, in attention order: {"down": {0: [0, 1], ...}, "up": {1: [7, 8, 9], ...}}
_BLOCKS: dict[str, dict[int, list[int]]] = {"down": {}, "up": {}}
for _layer in LAYERS:
    if _layer.block != "mid":
        _updown, _b = _layer.block.split(".block_")
        _BLOCKS[_updown].setdefault(int(_b), []).append(_layer.index)
MID_LAYER = next(layer.index for layer in LAYERS if layer.block == "mid")



# ----------------------------------------------------------------------------------------------
# λ per layer


def _number(x: object, where: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"λ at {where} must be one number, got a tensor of shape {list(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"λ at {where} must be a number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"λ at {where} is {x}; it must be finite")
    return 0.0 if x == 0 else x  # -0.0 → 0.0


def _listlike(x: object) -> list | None:
    if isinstance(x, torch.Tensor) and x.ndim > 0:
        return list(x.reshape(-1))
    if isinstance(x, (list, tuple)):
        return list(x)
    return None


def expand_scale(scale: object, *, strict: bool = True) -> tuple[float, ...]:
    """λ for each of the 16 cross-attention layers (in UNet run order).

    ``scale`` is one number (or 0-d tensor) for every layer; a list/tuple/1-d tensor of 16
    values, one per layer in run order (this differs from diffusers, where a list holds one config
    per adapter); or a diffusers / InstantStyle dict over blocks with diffusers' semantics
    (``diffusers.loaders.unet_loader_utils._maybe_expand_lora_scales``, default 0):

    - keys "down", "mid", "up"; a missing one is 0;
    - "mid": a number or a 1-element list;
    - "down"/"up": a number or list (applied to every attention block) or {"block_<i>": value};
      blocks not named are 0; a value is a number for all the block's layers, a 1-element list
      (broadcast), or one number per layer (2 per down block, 3 per up block);
    - SD1.5's attention blocks are down.block_0..2 (320, 640, 1280) and up.block_1..3 (1280, 640,
      320); up.block_0 and down.block_3 have none. diffusers silently ignores entries for blocks
      without attention (e.g. SDXL's InstantStyle ``{"up": {"block_0": ...}}`` does nothing on
      SD1.5); with ``strict`` (default) they raise instead, ``strict=False`` ignores them as diffusers.
    """
    if isinstance(scale, Mapping):
        return _expand_block_dict(scale, strict)
    values = _listlike(scale)
    if values is None:
        return (_number(scale, "scale"),) * NUM_LAYERS
    if len(values) != NUM_LAYERS:
        raise ValueError(f"a list of λ needs one value per cross-attention layer ({NUM_LAYERS}), got {len(values)} "
                         f"(for per-block values use a dict such as {{'down': {{'block_2': [0.0, 1.0]}}}})")
    return tuple(_number(x, f"layer {i}") for i, x in enumerate(values))


def _expand_block_dict(scale: Mapping, strict: bool) -> tuple[float, ...]:
    unknown = sorted(map(str, set(scale) - {"down", "mid", "up"}))
    if unknown:
        raise ValueError(f"unknown λ block(s) {unknown}: expected keys 'down', 'mid', 'up'")
    out = [0.0] * NUM_LAYERS
    mid = scale.get("mid", 0.0)
    if (values := _listlike(mid)) is not None:
        if len(values) != 1:
            raise ValueError(f"'mid' has one attention layer, got {len(values)} λ values")
        mid = values[0]
    out[MID_LAYER] = _number(mid, "mid")
    for updown in ("down", "up"):
        blocks = _BLOCKS[updown]
        value = scale.get(updown, 0.0)
        if not isinstance(value, Mapping):
            value = {f"block_{b}": value for b in blocks}
        named = {}
        for name, v in value.items():
            m = re.fullmatch(r"block_(\d+)", str(name))
            if m and int(m.group(1)) in blocks:
                named[int(m.group(1))] = v
            elif strict:
                valid = ", ".join(f"block_{b}" for b in blocks)
                raise ValueError(
                    f"'{updown}.{name}' is not an SD1.5 block with attention layers (those are {valid}); "
                    f"diffusers silently ignores such entries (the Python API's strict=False does too)")
        for b, layers in blocks.items():
            v = named.get(b, 0.0)
            values = _listlike(v)
            if values is None:
                values = [v] * len(layers)
            elif len(values) == 1:
                values = values * len(layers)
            elif len(values) != len(layers):
                raise ValueError(f"'{updown}.block_{b}' has {len(layers)} attention layers, "
                                 f"got {len(values)} λ values")
            for layer, x in zip(layers, values):
                out[layer] = _number(x, f"{updown}.block_{b}")
    return tuple(out)
