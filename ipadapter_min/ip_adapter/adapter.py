"""IP-Adapter for SD1.5: image projection + 16 (to_k_ip, to_v_ip) pairs, and the attention hook
they make for one prompt's image tokens (``hook.py``).

The layers are numbered as the UNet runs them (``layers.py``); official files are read by
``formats/ip_adapter.py`` and loaded by ``loading.ip_adapter.load_ip_adapter``.

CFG batch order. The hook holds one prompt's positive and negative image tokens, not a batch:
it puts their keys and values in the UNet batch's rows by the row layout (``cfg``) the runtime
sets, the same layout the text embeddings were put in rows by. Training has no unconditional
rows and one reference image per row: there the hook holds one set of tokens per row instead.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..kernels import decoupled_attention
from ..models.configs import CONTEXT_DIM, AdapterSpec
from .hook import DecoupledAttention, DecoupledCrossAttention
from .layers import CROSS_ATTENTION_WIDTHS
from .variants import build_projection


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
             attention: DecoupledAttention = decoupled_attention) -> DecoupledCrossAttention:
        """The cross-attention hook for one prompt's image tokens (:func:`image_prompt_tokens`) at λ ``scale``,
        or, without ``negative``, for one set of tokens per UNet row (training)."""
        return DecoupledCrossAttention(self.ip_layers, positive, negative, scale, rows=rows, strict=strict,
                                       attention=attention)
