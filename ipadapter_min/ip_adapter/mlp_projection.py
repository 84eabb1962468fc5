"""The full-face adapter's projection (ip-adapter-full-face_sd15): every penultimate hidden state of
the image encoder becomes a token, 257 of them. Keys as the official ``image_proj.proj.*``."""
from __future__ import annotations

import torch
from torch import nn

from ..models.configs import CONTEXT_DIM, VIT_H_WIDTH


class MLPProjection(nn.Module):
    """``proj`` = Linear(e, e) → GELU → Linear(e, context_dim) → LayerNorm, token by token."""

    def __init__(self, embed_dim: int = VIT_H_WIDTH, context_dim: int = CONTEXT_DIM):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, embed_dim) penultimate hidden states → (B, L, context_dim)."""
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))
