"""IP-Adapter for SD1.5: image projection + 16 (to_k_ip, to_v_ip) pairs, and the attention hook.

The layers are numbered as the UNet runs them (``ip_layers.py``); official files are read by
``formats/ip_adapter.py`` and loaded by ``loading.load_ip_adapter``.

CFG batch order. The hook holds one prompt's positive and negative image tokens, not a batch:
it puts their keys and values in the UNet batch's rows by the row layout (``cfg``) the runtime
sets, the same layout the text embeddings were put in rows by. Training has no unconditional
rows and one reference image per row: there the hook holds one set of tokens per row instead.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from kernels import decoupled_attention

from .cfg import CFGBatch, Rows, as_rows, per_row
from .configs import CONTEXT_DIM, AdapterSpec
from .image_projection import build_projection
from .ip_layers import CROSS_ATTENTION_WIDTHS, NUM_LAYERS, expand_scale

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
    when training). A layer whose λ is 0 (including -0.0 and a zero tensor) calls
    ``decoupled_attention(q, k, v)`` without image tokens: bit-identical to the base model,
    whatever the tokens hold (NaN included), and the image K/V are never computed.

    ``attention`` computes the two-softmax sum: ``kernels.decoupled_attention`` (the fused kernel
    on CUDA) by default, or ``kernels.decoupled_attention_reference`` for diffusers' exact op
    order (two SDPA calls, a scale, an add) when comparing with the reference on a GPU.

    Where later features go (all inside this class; the UNet stays as it is):
    - start/end step: the sampler sets the current step on the hook (e.g. ``hook.step = i``) and
      ``__call__`` treats λ as 0 outside the range — the same no-image-tokens path.
    - several adapters: hold one (layers, tokens, λ per layer) entry per adapter and add one image
      term per entry (a kernel call taking several image K/V sets, or repeated calls).
    - masks per reference image: keep each image's tokens apart (T tokens per image), attend to
      each image separately and multiply its term by the mask resized to the layer's q length
      (q length → latent h·w at this layer) before adding, as diffusers does with ip_adapter_masks.
    """

    def __init__(self, layers: IPAdapterLayers, positive: torch.Tensor, negative: torch.Tensor | None = None,
                 scale: object = 1.0, *, rows: Sequence[bool] | None = None, strict: bool = True,
                 attention: DecoupledAttention = decoupled_attention):
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
        self.layers = layers
        # projected together; per_row picks [1] for cond rows, [0] for uncond ones
        self.tokens = positive if self.per_row_tokens else torch.cat([negative, positive])
        self.rows = rows
        self.scales = expand_scale(scale, strict=strict)
        self.attention = attention
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

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = self.layout(q.shape[0], layer)
        scale = self.scales[layer]
        if scale == 0.0:
            return decoupled_attention(q, k, v)
        k_img, v_img = self.image_kv(layer, q.shape[1], q.dtype, q.device)
        if not self.per_row_tokens:
            k_img, v_img = (per_row(rows, kv[1:], kv[:1]) for kv in (k_img, v_img))
        return self.attention(q, k, v, k_img, v_img, scale)


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


def tokens_from_features(adapter: IPAdapter, features: torch.Tensor, negative_features: torch.Tensor | None = None,
                         *, combine: str = "concat", weights: Sequence[float] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) image tokens of one prompt, (1, tokens, context_dim) each, from the features of
    N reference images; the hook puts them in the UNet batch's rows.

    Several images are combined by concatenating their tokens along the token axis (default, as
    diffusers: one softmax over all images' tokens, N·T tokens) or by averaging their features with
    ``weights`` before projecting (T tokens). ``negative_features`` default to a zero embedding
    (base, light, vit-G); plus and full-face need the encoder's features of a zero image (see
    :func:`encode_images`).
    """
    if negative_features is None:
        if adapter.spec.uses_hidden_states:
            raise ValueError(f"the {adapter.spec.variant} adapter's negative tokens come from the image encoder "
                             f"(features of an all-zero pixel tensor): pass negative_features (encode_images)")
        negative_features = torch.zeros_like(features)
    return _combine(adapter, features, combine, weights), _combine(adapter, negative_features, combine, weights)


def image_prompt_tokens(adapter: IPAdapter, encoder: Callable, pixels: torch.Tensor, *,
                        negative_pixels: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_images` then :func:`tokens_from_features` (same keyword arguments)."""
    features, negative = encode_images(encoder, pixels, adapter.spec, negative_pixels)
    return tokens_from_features(adapter, features, negative, **kwargs)
