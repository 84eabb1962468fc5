"""The paper's image projection: the CLIP image embedding → image tokens for cross-attention
(ip-adapter_sd15, _sd15_light, _sd15_vit-G); the other releases' are in ``variants.py``.

Attribute names follow the official checkpoint keys (``image_proj.*`` without the prefix), so a
release file loads with ``load_state_dict(strict=True)``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.configs import CONTEXT_DIM, VIT_H_PROJECTION


class ImageProjection(nn.Module):
    """``proj`` Linear(embed_dim → tokens·context_dim), reshape to (tokens, context_dim), ``norm``."""

    def __init__(self, embed_dim: int = VIT_H_PROJECTION, tokens: int = 4, context_dim: int = CONTEXT_DIM):
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) projected CLIP embeddings → (B, tokens, context_dim)."""
        x = self.proj(image_embeds.to(self.proj.weight.dtype))
        return self.norm(x.reshape(x.shape[0], self.tokens, self.context_dim))  # (B, tokens, context_dim)
