"""IP-Adapter for SD1.5: image projection + 16 (to_k_ip, to_v_ip) pairs, the attention hook, and loading.

Layer numbering. The UNet numbers its 16 cross-attention layers 0..15 in the order it runs them
(input_blocks 1,2,4,5,7,8 → 0..5; middle_block.1 → 6; output_blocks 3..11 → 7..15). :data:`LAYERS`
relates that number to the layer's width, its original single-file name, diffusers' block naming
(used by per-block λ dicts) and the key number in the official files (1, 3, …, 31: attention
processors counted down blocks → up blocks → mid block, self- and cross-attention interleaved).

Files. :func:`load_ip_adapter` reads the official nested ``.bin`` ({"image_proj", "ip_adapter"}),
the official flat ``.safetensors`` ("image_proj.*", "ip_adapter.*") and the project's converted
file, whose keys are this module's ``state_dict`` keys:

    image_proj.<official image_proj key>          (unchanged; dtype as stored)
    ip_layers.<layer 0..15>.to_k_ip.weight        [width, 768]
    ip_layers.<layer 0..15>.to_v_ip.weight        [width, 768]

with metadata ``format`` = :data:`FORMAT` and the detected ``variant``.

CFG batch order. The image tokens the hook receives must follow the UNet batch. Helpers here
build them as diffusers does: unconditional (negative) rows first, then conditional ones.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ipadapter_min.image_projection import CONTEXT_DIM, AdapterSpec, detect_variant
from kernels import decoupled_attention
from weights_convert.files import CheckpointError, read_metadata, read_state_dict

FORMAT = "ipadapter_min.ip_adapter"
FORMAT_VERSION = "1"

# ----------------------------------------------------------------------------------------------
# The 16 cross-attention layers of SD1.5, built from the UNet's structure.

BLOCK_OUT_CHANNELS = (320, 640, 1280, 1280)
LAYERS_PER_BLOCK = 2  # resnet (+ attention) pairs per down block; up blocks have one more
HEADS = 8


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
_LAYER_OF_OFFICIAL = {layer.official: layer.index for layer in LAYERS}
# diffusers block name → our layer indices, in attention order: {"down": {0: [0, 1], ...}, "up": {1: [7, 8, 9], ...}}
_BLOCKS: dict[str, dict[int, list[int]]] = {"down": {}, "up": {}}
for _layer in LAYERS:
    if _layer.block != "mid":
        _updown, _b = _layer.block.split(".block_")
        _BLOCKS[_updown].setdefault(int(_b), []).append(_layer.index)
MID_LAYER = next(layer.index for layer in LAYERS if layer.block == "mid")


def layer_of_official_index(n: int) -> int:
    """Our layer number for the official key number ``n`` (1, 3, …, 31)."""
    return _LAYER_OF_OFFICIAL[n]


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
                    f"diffusers ignores such entries silently, pass strict=False to do the same")
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


# ----------------------------------------------------------------------------------------------
# Modules


class IPAdapterLayer(nn.Module):
    def __init__(self, width: int, context_dim: int = CONTEXT_DIM):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, width, bias=False)
        self.to_v_ip = nn.Linear(context_dim, width, bias=False)


class IPAdapterLayers(nn.ModuleList):
    """The 16 bias-free (to_k_ip, to_v_ip) pairs, indexed by our layer number 0..15."""

    def __init__(self, widths: Sequence[int] = CROSS_ATTENTION_WIDTHS, context_dim: int = CONTEXT_DIM):
        super().__init__(IPAdapterLayer(w, context_dim) for w in widths)
        self.context_dim = context_dim


class IPAdapter(nn.Module):
    """Image projection (``image_proj``) + image key/value projections (``ip_layers``).

    Build with :func:`load_ip_adapter`; constructing it directly initialises weights randomly
    (for training) unless done under ``torch.device("meta")``.
    """

    def __init__(self, spec: AdapterSpec, widths: Sequence[int] = CROSS_ATTENTION_WIDTHS):
        super().__init__()
        self.spec = spec
        self.image_proj = spec.build_projection()
        self.ip_layers = IPAdapterLayers(widths, spec.context_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features for N images → (N, tokens, 768)."""
        return self.image_proj(features)

    def hook(self, tokens: torch.Tensor, scale: object = 1.0, *, strict: bool = True) -> "ImagePromptAttention":
        """The cross-attention hook for image ``tokens`` (UNet batch order) at λ ``scale``."""
        return ImagePromptAttention(self.ip_layers, tokens, scale, strict=strict)


# ----------------------------------------------------------------------------------------------
# The hook


class ImagePromptAttention:
    """Decoupled cross-attention of one IP-Adapter (implements ``attention.CrossAttentionHook``):

        out = softmax(q kᵀ/√d) v + λ_layer · softmax(q k_imgᵀ/√d) v_img

    with k_img, v_img = to_k_ip(tokens), to_v_ip(tokens) split into q's heads. They are computed
    at a layer's first call and cached: the tokens are the same at every denoising step, so make a
    new hook when the tokens change (and per step when training). A layer whose λ is 0 (including
    -0.0 and a zero tensor) calls ``decoupled_attention(q, k, v)`` without image tokens: bit-identical
    to the base model, whatever the tokens hold (NaN included), and the image K/V are never computed.

    Where later features go (all inside this class; the UNet stays as it is):
    - start/end step: the sampler sets the current step on the hook (e.g. ``hook.step = i``) and
      ``__call__`` treats λ as 0 outside the range — the same no-image-tokens path.
    - several adapters: hold one (layers, tokens, λ per layer) entry per adapter and add one image
      term per entry (a kernel call taking several image K/V sets, or repeated calls).
    - masks per reference image: keep each image's tokens apart (T tokens per image), attend to
      each image separately and multiply its term by the mask resized to the layer's q length
      (q length → latent h·w at this layer) before adding, as diffusers does with ip_adapter_masks.
    """

    def __init__(self, layers: IPAdapterLayers, tokens: torch.Tensor, scale: object = 1.0, *, strict: bool = True):
        if tokens.ndim != 3 or tokens.shape[-1] != layers.context_dim:
            raise ValueError(f"image tokens must be (batch, tokens, {layers.context_dim}), got {list(tokens.shape)}")
        if len(layers) != NUM_LAYERS:
            raise ValueError(f"expected {NUM_LAYERS} adapter layers, got {len(layers)}")
        self.layers = layers
        self.tokens = tokens
        self.scales = expand_scale(scale, strict=strict)
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set_scale(self, scale: object, *, strict: bool = True) -> None:
        """Change λ (same forms as :func:`expand_scale`); the cached image K/V stay valid."""
        self.scales = expand_scale(scale, strict=strict)

    def image_kv(self, layer: int, heads: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's image keys and values, (batch, heads, tokens, head_dim), cached."""
        cached = self._kv.get(layer)
        if cached is not None and (cached[0].dtype, cached[0].device, cached[0].shape[1]) == (dtype, device, heads):
            return cached
        proj = self.layers[layer]
        weight = proj.to_k_ip.weight
        tokens = self.tokens.to(device=weight.device, dtype=weight.dtype)
        b, n, _ = tokens.shape
        k, v = (lin(tokens).view(b, n, heads, -1).transpose(1, 2).to(device=device, dtype=dtype).contiguous()
                for lin in (proj.to_k_ip, proj.to_v_ip))
        self._kv[layer] = (k, v)
        return k, v

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scale = self.scales[layer]
        if scale == 0.0:
            return decoupled_attention(q, k, v)
        k_img, v_img = self.image_kv(layer, q.shape[1], q.dtype, q.device)
        if k_img.shape[0] != q.shape[0]:
            raise ValueError(f"image tokens have batch {k_img.shape[0]} but cross-attention layer {layer} has batch "
                             f"{q.shape[0]}: build the tokens in the UNet's batch order (cfg_image_tokens)")
        return decoupled_attention(q, k, v, k_img, v_img, scale)


# ----------------------------------------------------------------------------------------------
# Encoder outputs → image tokens for CFG


def _encoder_dtype(encoder: Callable) -> tuple[torch.device, torch.dtype] | None:
    if isinstance(encoder, nn.Module):
        p = next(encoder.parameters(), None)
        if p is not None:
            return p.device, p.dtype
    return None


def encode_images(encoder: Callable, pixels: torch.Tensor, spec: AdapterSpec,
                  negative_pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, negative_features) for N reference images, one row per image.

    ``encoder(pixels) -> (image_embeds, penultimate)`` takes normalized pixels (N, 3, 224, 224).
    The features are the projected embedding (base, light, vit-G) or the penultimate hidden
    states (plus, full-face). The negative features are, as the reference does, a zero embedding or
    the encoder's features of an all-zero normalized pixel tensor; or those of ``negative_pixels``
    (one image, or one per reference image) when given.
    """
    where = _encoder_dtype(encoder)

    def run(x: torch.Tensor) -> torch.Tensor:
        if where is not None:
            x = x.to(device=where[0], dtype=where[1])
        out = encoder(x)[1 if spec.uses_hidden_states else 0]
        if out.shape[-1] != spec.feature_dim:
            raise ValueError(f"the {spec.variant} adapter needs {spec.encoder} {spec.encoder_output} of width "
                             f"{spec.feature_dim}, the encoder gave width {out.shape[-1]}")
        return out

    features = run(pixels)
    if negative_pixels is not None:
        negative = run(negative_pixels)
        if negative.shape[0] not in (1, features.shape[0]):
            raise ValueError(f"{negative.shape[0]} negative images for {features.shape[0]} reference images")
        negative = negative.expand_as(features)
    elif spec.uses_hidden_states:
        negative = run(torch.zeros_like(pixels[:1])).expand_as(features)  # identical for every image: encode once
    else:
        negative = torch.zeros_like(features)
    return features, negative


def _combine(adapter: IPAdapter, features: torch.Tensor, combine: str, weights: Sequence[float] | None
             ) -> torch.Tensor:
    n = features.shape[0]
    if combine == "concat":
        if weights is not None:
            raise ValueError("weights apply to combine='average' only")
        tokens = adapter(features)
        return tokens.reshape(1, n * tokens.shape[1], tokens.shape[2])  # image-major, as diffusers
    if combine == "average":
        w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != n or not torch.isfinite(w).all() or w.sum() == 0:
            raise ValueError(f"need {n} finite weights with a nonzero sum, got {weights}")
        w = (w / w.sum()).to(features.device).reshape((n,) + (1,) * (features.ndim - 1))
        return adapter((w * features.float()).sum(0, keepdim=True).to(features.dtype))
    raise ValueError(f"unknown combine {combine!r}: expected 'concat' or 'average'")


def cfg_image_tokens(adapter: IPAdapter, features: torch.Tensor, negative_features: torch.Tensor | None = None, *,
                     batch_size: int = 1, combine: str = "concat", weights: Sequence[float] | None = None,
                     guidance: bool = True) -> torch.Tensor:
    """Image tokens for a UNet batch from the features of N reference images.

    Several images are combined by concatenating their tokens along the token axis (default, as
    diffusers: one softmax over all images' tokens, N·T tokens) or by averaging their features with
    ``weights`` before projecting (T tokens). With ``guidance`` the result is
    ``[negative] * batch_size + [positive] * batch_size`` (diffusers' order: unconditional first),
    shape (2·batch_size, tokens, 768); without, ``[positive] * batch_size``. ``negative_features``
    default to a zero embedding (base, light, vit-G); plus and full-face need the encoder's
    features of a zero image (see :func:`encode_images`).
    """
    positive = _combine(adapter, features, combine, weights)
    rows = [positive] * batch_size
    if guidance:
        if negative_features is None:
            if adapter.spec.uses_hidden_states:
                raise ValueError(f"the {adapter.spec.variant} adapter's negative tokens come from the image encoder "
                                 f"(features of an all-zero pixel tensor): pass negative_features (encode_images)")
            negative_features = torch.zeros_like(features)
        rows = [_combine(adapter, negative_features, combine, weights)] * batch_size + rows
    return torch.cat(rows)


def image_prompt_tokens(adapter: IPAdapter, encoder: Callable, pixels: torch.Tensor, *,
                        negative_pixels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """:func:`encode_images` then :func:`cfg_image_tokens` (same keyword arguments)."""
    features, negative = encode_images(encoder, pixels, adapter.spec, negative_pixels)
    return cfg_image_tokens(adapter, features, negative, **kwargs)


# ----------------------------------------------------------------------------------------------
# Files


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
            if not m or int(m.group(1)) not in _LAYER_OF_OFFICIAL:
                raise CheckpointError(f"{source}: unexpected key {key!r} "
                                      f"(not an SD1.5 IP-Adapter cross-attention weight)")
            new = f"ip_layers.{_LAYER_OF_OFFICIAL[int(m.group(1))]}.{m.group(2)}"
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


def load_ip_adapter(path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> IPAdapter:
    """Load an official (.bin / .safetensors) or converted IP-Adapter file, every key checked.

    The module is built on the meta device and the file's tensors are assigned (no random init).
    """
    metadata = read_metadata(path)
    fmt = metadata.get("format")
    if fmt is not None and fmt != FORMAT:
        raise CheckpointError(f"{path}: a {fmt!r} file, not an IP-Adapter ({FORMAT!r})")
    tensors, spec = to_project_layout(read_state_dict(path), path)
    if "variant" in metadata and fmt == FORMAT and metadata["variant"] != spec.variant:
        raise CheckpointError(f"{path}: metadata says variant {metadata['variant']!r}, "
                              f"the weights are {spec.variant!r}")
    with torch.device("meta"):
        adapter = IPAdapter(spec)
    adapter.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return adapter.eval()
