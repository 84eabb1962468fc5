"""The one attention entry point of the UNet, and the hook through which adapters change it.

Every cross-attention layer of the UNet computes its heads' q, k, v and then either calls
:func:`attention` or, when a hook is given, ``hook(layer, q, k, v)``. Everything an adapter
does to a layer (image tokens, λ per layer, masks, step ranges, several adapters) lives
behind that hook; the UNet never changes for it.
"""
from __future__ import annotations

from typing import Protocol

import torch

from ..kernels import decoupled_attention


class CrossAttentionHook(Protocol):
    # Which UNet batch rows are conditional (``cfg``): the runtime that lays out the batch
    # sets it before calling the UNet (the pipeline does in ``StableDiffusion.denoise``).
    rows: tuple[bool, ...] | None

    def set_step(self, step: int, steps: int, timestep: float) -> None:
        """Called by the denoising loop before each step (0-based ``step`` of ``steps``, at
        ``timestep``: a whole number, or fractional with the Euler samplers), for hooks that act in
        part of the run only."""
        ...

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Return the attention output for cross-attention ``layer`` (0..15, in the order the
        UNet runs them). q, k, v are (batch, heads, length, head_dim); so is the result."""
        ...


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax(QKᵀ/√d)V for (batch, heads, length, head_dim) tensors."""
    return decoupled_attention(q, k, v)  # (B, heads, Lq, d)
