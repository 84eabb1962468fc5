"""Several IP-Adapters in one generation, as diffusers adds them: each keeps its own hook."""
from __future__ import annotations

from typing import Sequence

import torch

from ..samplers.cfg import Rows
from .hook_options import ImagePromptAttention


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
