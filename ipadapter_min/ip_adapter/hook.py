"""The paper's decoupled cross-attention (Ye et al. 2023, Eq. 5): the hook one IP-Adapter gives the
UNet, which calls it at each of its 16 cross-attention layers in place of plain attention:

    out = softmax(q kᵀ/√d) v + λ_layer · softmax(q k_imgᵀ/√d) v_img

with k_img, v_img = to_k_ip(tokens), to_v_ip(tokens) split into q's heads. The references' options
on the same seam (masks, step ranges, embeds scaling, ComfyUI's weight types) extend it in
``hook_options.py``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from ..kernels import decoupled_attention
from ..samplers.cfg import CFGBatch, Rows, as_rows, per_row
from .layers import NUM_LAYERS, expand_scale

# (q, k_text, v_text, k_image, v_image, scale) -> out, as kernels.decoupled_attention
DecoupledAttention = Callable[..., torch.Tensor]


class DecoupledCrossAttention:
    """The hook (``models.attention.CrossAttentionHook``) of one prompt's image tokens at λ ``scale``:
    its ``positive`` tokens in the batch's conditional rows, its ``negative`` tokens in the
    unconditional ones. ``rows`` says which rows are which (``samplers.cfg``: one bool per row,
    True where conditional); the runtime that lays out the batch sets it before the UNet calls
    (``StableDiffusion.denoise`` does; ComfyUI-like runtimes per call). Left None, it is diffusers'
    layout for the batch the hook is called with: first half unconditional, second half conditional.
    Without ``negative`` (training: every row conditional, each with its own reference image),
    ``positive`` holds one set of tokens per UNet row, (batch, tokens, context_dim), and ``rows`` is moot.

    The image K/V of both token sets are computed at a layer's first call and cached: the tokens
    are the same at every denoising step, so make a new hook when the tokens change (and per step
    when training). A layer whose λ is 0 (including -0.0 and a zero tensor) calls
    ``decoupled_attention(q, k, v)`` without image tokens: bit-identical to the base model, whatever
    the tokens hold (NaN included), and the image K/V are never computed.

    ``attention`` computes the two-softmax sum: ``kernels.decoupled_attention`` (the fused kernel
    on CUDA) by default, or ``kernels.decoupled_attention_reference`` for diffusers' exact op order.
    """

    def __init__(self, layers: nn.ModuleList, positive: torch.Tensor, negative: torch.Tensor | None = None,
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
        self.tokens = positive if self.per_row_tokens else torch.cat([negative, positive])  # (2 or B, tokens, C)
        self.rows = rows
        self.scales = expand_scale(scale, strict=strict)  # λ of each of the 16 layers
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

    def set_step(self, step: int, steps: int, timestep: float) -> None:
        """Where the denoising loop is (step ``step`` of ``steps``, at ``timestep``): the paper's
        adapter acts at every step, so this one ignores it (``hook_options`` has step ranges)."""

    def acts(self, layer: int) -> bool:
        return self.scales[layer] != 0.0

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
                for lin in (proj.to_k_ip, proj.to_v_ip))  # (b, heads, n, d) each
        self._kv[layer] = (k, v)
        return k, v

    def row_kv(self, layer: int, q: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """The image keys and values of each UNet row, (batch, heads, tokens, head_dim): positive in
        conditional rows, negative in the others."""
        k_img, v_img = self.image_kv(layer, q.shape[1], q.dtype, q.device)
        if self.per_row_tokens:
            return k_img, v_img
        return tuple(per_row(rows, kv[1:], kv[:1]) for kv in (k_img, v_img))

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, heads, Lq, d); k, v the text's (B, heads, 77, d) → (B, heads, Lq, d)."""
        rows = self.layout(q.shape[0], layer)
        if not self.acts(layer):
            return decoupled_attention(q, k, v)  # (B, heads, Lq, d), the base model's bits
        k_img, v_img = self.row_kv(layer, q, rows)  # (B, heads, tokens, d) each
        return self.attention(q, k, v, k_img, v_img, self.scales[layer])  # (B, heads, Lq, d)
