"""IP-Adapter for SD1.5: image projection + 16 (to_k_ip, to_v_ip) pairs, and the attention hook.

The layers are numbered as the UNet runs them (``ip_layers.py``); official files are read by
``formats/ip_adapter.py`` and loaded by ``loading.load_ip_adapter``.

CFG batch order. The hook holds one prompt's positive and negative image tokens, not a batch:
it puts their keys and values in the UNet batch's rows by the row layout (``cfg``) the runtime
sets, the same layout the text embeddings were put in rows by. Training has no unconditional
rows and one reference image per row: there the hook holds one set of tokens per row instead.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cfg import CFGBatch, Rows, as_rows, per_row
from .configs import CONTEXT_DIM, AdapterSpec
from .image_projection import build_projection
from .ip_layers import CROSS_ATTENTION_WIDTHS, NUM_LAYERS, expand_scale
from .kernels import (decoupled_attention, decoupled_attention_branches, decoupled_attention_branches_reference,
                      decoupled_attention_reference)
from .step_ranges import in_sigma_range, in_step_range

# (q, k_text, v_text, k_image, v_image, scale) -> out, as kernels.decoupled_attention
DecoupledAttention = Callable[..., torch.Tensor]

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
        self.image_proj = build_projection(spec)
        self.ip_layers = IPAdapterLayers(widths, spec.context_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features for N images → (N, tokens, context_dim)."""
        return self.image_proj(features)

    def hook(self, positive: torch.Tensor, negative: torch.Tensor | None = None, scale: object = 1.0, *,
             rows: Sequence[bool] | None = None, strict: bool = True,
             attention: DecoupledAttention = decoupled_attention) -> "ImagePromptAttention":
        """The cross-attention hook for one prompt's image tokens (:func:`image_prompt_tokens`) at λ ``scale``,
        or, without ``negative``, for one set of tokens per UNet row (training)."""
        return ImagePromptAttention(self.ip_layers, positive, negative, scale, rows=rows, strict=strict,
                                    attention=attention)


# ----------------------------------------------------------------------------------------------
# The hook


EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
STEP_RANGES = ("steps", "sigmas")


def scale_image_kv(mode: str, k: torch.Tensor, v: torch.Tensor, weight: float, width: int
                   ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """ComfyUI's embeds scaling of one layer's image keys and values (…, tokens, head_dim): the
    scaled (k, v) and the weight still to apply to the attention output. "V only" scales the output
    (diffusers' λ); "K+V" scales keys and values, which also sharpens or flattens the softmax; the
    C-penalty modes first weaken narrow layers (weight · width/1280); "K+mean(V)" scales only the
    values' mean over the tokens."""
    if mode not in EMBEDS_SCALING:
        raise ValueError(f"unknown embeds scaling {mode!r}; expected one of: {', '.join(EMBEDS_SCALING)}")
    if mode == "V only":
        return k, v, weight
    if mode.endswith("w/ C penalty"):
        weight = weight * width / 1280.0
    if mode == "K+mean(V) w/ C penalty":
        mean = v.mean(dim=-2, keepdim=True)
        return k * weight, (v - mean) + mean * weight, 1.0
    return k * weight, v * weight, 1.0


def mask_grid(mask_height: int, mask_width: int, queries: int) -> tuple[int, int]:
    """The (h, w) grid a mask is resized to for a layer of ``queries`` positions, as diffusers'
    IPAdapterMaskProcessor.downsample sizes it from the mask's aspect; an error where that grid
    does not cover the layer exactly (diffusers would pad or cut it silently)."""
    ratio = mask_width / mask_height
    h = int(math.sqrt(queries / ratio))
    h = h + int(queries % h != 0)
    w = queries // h
    if h * w != queries:
        raise ValueError(f"a {mask_width}×{mask_height} mask does not fit a layer of {queries} positions: give masks "
                         f"of the output's aspect ratio")
    return h, w


class ImagePromptAttention:
    """Decoupled cross-attention of one IP-Adapter (implements ``attention.CrossAttentionHook``):

        out = softmax(q kᵀ/√d) v + λ_layer · softmax(q k_imgᵀ/√d) v_img

    with k_img, v_img = to_k_ip(tokens), to_v_ip(tokens) split into q's heads, the tokens being one
    prompt's ``positive`` tokens in the batch's conditional rows and its ``negative`` tokens in the
    unconditional ones. ``rows`` says which rows are which (``cfg``: one bool per row, True where
    conditional); the runtime that lays out the batch sets it before the UNet calls
    (``StableDiffusion.denoise`` does; ComfyUI-like runtimes per call). Left None, it is diffusers'
    layout for the batch the hook is called with: first half unconditional, second half conditional.
    Without ``negative`` (training: every row conditional, each with its own reference image),
    ``positive`` holds one set of tokens per UNet row, (batch, tokens, context_dim), and ``rows`` is moot.

    The image K/V of both token sets are computed at a layer's first call and cached: the tokens
    are the same at every denoising step, so make a new hook when the tokens change (and per step
    when training). A layer whose λ is 0 (including -0.0 and a zero tensor), and every layer at a
    step outside [``start``, ``end``], calls ``decoupled_attention(q, k, v)`` without image tokens:
    bit-identical to the base model, whatever the tokens hold (NaN included), and the image K/V are
    never computed.

    Options, each as a reference defines it:
    - ``masks`` (images, H, W) in [0, 1]: regional prompting, diffusers' ``ip_adapter_masks``. The
      tokens are one group per mask (the images' tokens concatenated in order); each group gets its
      own attention, times its mask resized (bicubic) to the layer's grid.
    - ``start``/``end``: the fraction of the denoising the image acts in; ``step_range`` "steps"
      (diffusers' ControlNet convention) or "sigmas" (ComfyUI's start_at/end_at). The loop tells
      the hook where it is with :meth:`set_step`.
    - ``swapped``: layers where the image tokens go to the unconditional rows and the conditional
      rows get none (ComfyUI's precise weight types).
    - ``embeds_scaling``: ComfyUI's (:func:`scale_image_kv`).

    ``attention`` computes the two-softmax sum where nothing of the above applies:
    ``kernels.decoupled_attention`` (the fused kernel on CUDA) by default, or
    ``kernels.decoupled_attention_reference`` for diffusers' exact op order; otherwise (masks,
    several adapters, the other scalings) ``kernels.decoupled_attention_branches`` runs every
    image branch in one kernel launch on CUDA, or its reference.
    """

    def __init__(self, layers: IPAdapterLayers, positive: torch.Tensor, negative: torch.Tensor | None = None,
                 scale: object = 1.0, *, rows: Sequence[bool] | None = None, strict: bool = True,
                 attention: DecoupledAttention = decoupled_attention, masks: torch.Tensor | None = None,
                 start: float = 0.0, end: float = 1.0, step_range: str = "steps",
                 swapped: frozenset[int] = frozenset(), embeds_scaling: str = "V only"):
        self.per_row_tokens = negative is None
        if self.per_row_tokens:
            if positive.ndim != 3 or positive.shape[-1] != layers.context_dim:
                raise ValueError(f"image tokens without negative ones must be (rows, tokens, {layers.context_dim}), "
                                 f"got {list(positive.shape)}")
        else:
            for name, tokens in (("positive", positive), ("negative", negative)):
                if tokens.ndim != 3 or tokens.shape[0] != 1 or tokens.shape[-1] != layers.context_dim:
                    raise ValueError(f"{name} image tokens must be (1, tokens, {layers.context_dim}), "
                                     f"got {list(tokens.shape)}")
            if negative.shape != positive.shape:
                raise ValueError(f"positive image tokens have shape {list(positive.shape)} but negative ones "
                                 f"{list(negative.shape)}")
        if len(layers) != NUM_LAYERS:
            raise ValueError(f"expected {NUM_LAYERS} adapter layers, got {len(layers)}")
        if masks is not None and (masks.ndim != 3 or positive.shape[1] % masks.shape[0]):
            raise ValueError(f"masks must be (images, height, width), one per image whose tokens the hook holds; got "
                             f"{list(masks.shape)} for {positive.shape[1]} tokens")
        if not 0 <= start < end <= 1:
            raise ValueError(f"start and end must satisfy 0 ≤ start < end ≤ 1, got {start} and {end}")
        if step_range not in STEP_RANGES:
            raise ValueError(f"step_range must be one of {STEP_RANGES}, got {step_range!r}")
        if embeds_scaling not in EMBEDS_SCALING:
            raise ValueError(f"unknown embeds scaling {embeds_scaling!r}; expected one of: {', '.join(EMBEDS_SCALING)}")
        self.layers = layers
        # projected together; per_row picks [1] for cond rows, [0] for uncond ones
        self.tokens = positive if self.per_row_tokens else torch.cat([negative, positive])
        self.rows = rows
        self.scales = expand_scale(scale, strict=strict)
        self.attention = attention
        self.masks, self.start, self.end, self.step_range = masks, start, end, step_range
        self.swapped, self.embeds_scaling = frozenset(swapped), embeds_scaling
        self.active = True
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def rows(self) -> Rows | None:
        return self._rows

    @rows.setter
    def rows(self, rows: Sequence[bool] | torch.Tensor | None) -> None:
        """Set the row layout (the cached image K/V stay valid); None for diffusers' layout."""
        self._rows = None if rows is None else as_rows(rows)
        if self.per_row_tokens and self._rows is not None and not all(self._rows):
            raise ValueError(f"without negative image tokens every row is conditional, got rows {self._rows}")

    def set_scale(self, scale: object, *, strict: bool = True) -> None:
        """Change λ (same forms as :func:`expand_scale`); the cached image K/V stay valid."""
        self.scales = expand_scale(scale, strict=strict)

    def set_step(self, step: int, steps: int, timestep: float) -> None:
        """Where the denoising loop is: step ``step`` (0-based) of ``steps``, at ``timestep``
        (fractional with the Euler samplers)."""
        if self.step_range == "steps":
            self.active = in_step_range(step, steps, self.start, self.end)
        else:
            self.active = in_sigma_range(timestep, self.start, self.end)

    def acts(self, layer: int) -> bool:
        return self.active and self.scales[layer] != 0.0

    def layout(self, batch: int, layer: int) -> Rows:
        """The row layout for a UNet batch of ``batch`` rows; a one-line error naming both sizes."""
        if self.per_row_tokens:
            if batch != len(self.tokens):
                raise ValueError(f"the hook holds image tokens for {len(self.tokens)} rows but cross-attention layer "
                                 f"{layer} has batch {batch}")
            return (True,) * batch
        if self._rows is None:
            if batch % 2:
                raise ValueError(f"cross-attention layer {layer} has batch {batch}, which cannot be diffusers' "
                                 f"unconditional half + conditional half: set hook.rows (one bool per row)")
            return CFGBatch(batch // 2, guided=True).rows
        if len(self._rows) != batch:
            raise ValueError(f"hook.rows has {len(self._rows)} rows but cross-attention layer {layer} has batch "
                             f"{batch}: set it to one bool per UNet batch row (True where conditional)")
        return self._rows

    def image_kv(self, layer: int, heads: int, dtype: torch.dtype, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's image keys and values of [negative, positive], (2, heads, tokens, head_dim), or of
        each row's tokens, (batch, heads, tokens, head_dim); cached."""
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

    def row_kv(self, layer: int, q: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The image keys and values of each UNet row: positive in conditional rows, negative in
        the others; on a swapped layer the positive in the unconditional rows and none (zeros,
        which attend to exactly 0: the projections have no bias) in the conditional ones."""
        k_img, v_img = self.image_kv(layer, q.shape[1], q.dtype, q.device)
        if self.per_row_tokens:
            return k_img, v_img
        if layer in self.swapped:
            return tuple(per_row(rows, torch.zeros_like(kv[1:]), kv[1:]) for kv in (k_img, v_img))
        return tuple(per_row(rows, kv[1:], kv[:1]) for kv in (k_img, v_img))

    def plain(self, layer: int) -> bool:
        """Whether this layer is the paper's decoupled attention and nothing more (the fused path)."""
        return self.masks is None and self.embeds_scaling == "V only" and layer not in self.swapped

    def branches(self, layer: int, q: torch.Tensor, rows: Rows) -> list[tuple]:
        """This adapter's image branches at ``layer``, (k, v, weight, mask) each, as
        ``kernels.decoupled_attention_branches`` takes them: one, or one per masked image."""
        k_img, v_img = self.row_kv(layer, q, rows)
        width = self.layers[layer].to_k_ip.out_features
        k_img, v_img, weight = scale_image_kv(self.embeds_scaling, k_img, v_img, self.scales[layer], width)
        if self.masks is None:
            return [(k_img, v_img, weight, None)]
        groups = self.masks.shape[0]
        return [(k_i, v_i, weight, self.layer_mask(image, q.shape[2]).to(q.dtype))
                for image, (k_i, v_i) in enumerate(zip(k_img.chunk(groups, dim=2), v_img.chunk(groups, dim=2)))]

    def layer_mask(self, image: int, queries: int) -> torch.Tensor:
        """Image ``image``'s mask on a layer of ``queries`` positions, (queries, 1): bicubic, not
        clamped (it may overshoot [0, 1] a little, as diffusers')."""
        mask = self.masks[image]
        h, w = mask_grid(mask.shape[0], mask.shape[1], queries)
        small = F.interpolate(mask[None, None].float(), size=(h, w), mode="bicubic")
        return small.reshape(queries, 1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = self.layout(q.shape[0], layer)
        if not self.acts(layer):
            return decoupled_attention(q, k, v)
        if self.plain(layer):
            k_img, v_img = self.row_kv(layer, q, rows)
            return self.attention(q, k, v, k_img, v_img, self.scales[layer])
        return self.branch_attention(q, k, v, self.branches(layer, q, rows))

    @property
    def branch_attention(self) -> Callable:
        """Several branches: in one kernel launch, or (``attention`` the reference) diffusers' way."""
        reference = self.attention is decoupled_attention_reference
        return decoupled_attention_branches_reference if reference else decoupled_attention_branches


class ImagePrompts:
    """Several IP-Adapters at once (implements ``attention.CrossAttentionHook``): the text
    attention plus each adapter's image term in turn, as diffusers adds them. Each adapter keeps
    its own tokens, λ, masks, step range and options (an :class:`ImagePromptAttention` each); the
    row layout and the step are passed on to all."""

    def __init__(self, hooks: Sequence[ImagePromptAttention]):
        if not hooks:
            raise ValueError("no image prompts given")
        self.hooks = list(hooks)

    @property
    def rows(self) -> Rows | None:
        return self.hooks[0].rows

    @rows.setter
    def rows(self, rows: Sequence[bool] | torch.Tensor | None) -> None:
        for hook in self.hooks:
            hook.rows = rows

    def set_step(self, step: int, steps: int, timestep: float) -> None:
        for hook in self.hooks:
            hook.set_step(step, steps, timestep)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        branches = []
        for hook in self.hooks:
            rows = hook.layout(q.shape[0], layer)
            if hook.acts(layer):
                branches += hook.branches(layer, q, rows)
        return self.hooks[0].branch_attention(q, k, v, branches)


# ----------------------------------------------------------------------------------------------
# Encoder outputs → one prompt's positive and negative image tokens


def _encoder_dtype(encoder: Callable) -> tuple[torch.device, torch.dtype] | None:
    if isinstance(encoder, nn.Module):
        p = next(encoder.parameters(), None)
        if p is not None:
            return p.device, p.dtype
    return None


def encode_images(encoder: Callable, pixels: torch.Tensor, spec: AdapterSpec,
                  negative_pixels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, negative_features) for N reference images, one row per image.

    ``encoder(pixels) -> (image_embeds, penultimate)`` takes normalized pixels (N, 3, S, S) at its
    input size S (224 for the releases' encoders; ``preprocess(images, size=S)``).
    The features are the projected embedding (base, light, vit-G) or the penultimate hidden
    states (plus, full-face). The negative features are, as the reference does, a zero embedding or
    the encoder's features of an all-zero normalized pixel tensor; or those of ``negative_pixels``
    (one image, or one per reference image) when given.
    """
    where = _encoder_dtype(encoder)

    def run(x: torch.Tensor) -> torch.Tensor:
        if where is not None:
            x = x.to(device=where[0], dtype=where[1])
        if spec.uses_hidden_states:  # ImageEncoder.penultimate skips the unused last layer
            out = encoder.penultimate(x) if hasattr(encoder, "penultimate") else encoder(x)[1]
        else:
            out = encoder(x)[0]
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


COMBINE = ("concat", "average", "add", "subtract", "norm average")


def combine_features(features: torch.Tensor, combine: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """N images' encoder features → one image's, by ComfyUI_IPAdapter_plus's ``combine_embeds``:
    ``average`` (optionally weighted), ``add`` (the sum), ``subtract`` (the first minus the mean of
    the others) or ``norm average`` (the mean after dividing by the norm taken across the images)."""
    n = features.shape[0]
    if weights is not None and combine != "average":
        raise ValueError("weights apply to combine='average' only")
    if combine == "average":
        w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != n or not torch.isfinite(w).all() or w.sum() == 0:
            raise ValueError(f"need {n} finite weights with a nonzero sum, got {weights}")
        w = (w / w.sum()).to(features.device).reshape((n,) + (1,) * (features.ndim - 1))
        return (w * features.float()).sum(0, keepdim=True).to(features.dtype)
    if combine == "add":
        return features.sum(0, keepdim=True)
    if combine == "subtract":
        return (features[0] - features[1:].mean(0)).unsqueeze(0) if n > 1 else features
    if combine == "norm average":
        return (features / features.norm(dim=0, keepdim=True)).mean(0, keepdim=True)
    raise ValueError(f"unknown combine {combine!r}: expected one of {', '.join(COMBINE)}")


def _combine(adapter: IPAdapter, features: torch.Tensor, combine: str, weights: Sequence[float] | None
             ) -> torch.Tensor:
    if combine == "concat":
        if weights is not None:
            raise ValueError("weights apply to combine='average' only")
        tokens = adapter(features)
        return tokens.reshape(1, features.shape[0] * tokens.shape[1], tokens.shape[2])  # image-major, as diffusers
    return adapter(combine_features(features, combine, weights))


def tokens_from_features(adapter: IPAdapter, features: torch.Tensor, negative_features: torch.Tensor | None = None,
                         *, combine: str = "concat", weights: Sequence[float] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) image tokens of one prompt, (1, tokens, context_dim) each, from the features of
    N reference images; the hook puts them in the UNet batch's rows.

    Several images are combined by concatenating their tokens along the token axis (default, as
    diffusers: one softmax over all images' tokens, N·T tokens), or into one image's features
    before projecting (T tokens; :func:`combine_features`), whose negative is then the first
    image's negative, as ComfyUI has it. ``negative_features`` default to a zero embedding
    (base, light, vit-G); plus and full-face need the encoder's features of a zero image (see
    :func:`encode_images`).
    """
    if negative_features is None:
        if adapter.spec.uses_hidden_states:
            raise ValueError(f"the {adapter.spec.variant} adapter's negative tokens come from the image encoder "
                             f"(features of an all-zero pixel tensor): pass negative_features (encode_images)")
        negative_features = torch.zeros_like(features)
    positive = _combine(adapter, features, combine, weights)
    if combine == "concat":
        return positive, _combine(adapter, negative_features, combine, None)
    return positive, adapter(negative_features[:1])


def image_prompt_tokens(adapter: IPAdapter, encoder: Callable, pixels: torch.Tensor, *,
                        negative_pixels: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_images` then :func:`tokens_from_features` (same keyword arguments)."""
    features, negative = encode_images(encoder, pixels, adapter.spec, negative_pixels)
    return tokens_from_features(adapter, features, negative, **kwargs)
