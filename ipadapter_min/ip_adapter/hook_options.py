"""The references' options on the decoupled attention hook, each as its reference defines it:
regional masks (diffusers), step ranges (diffusers' ControlNet convention, ComfyUI's σ), swapped
layers (ComfyUI's precise weight types) and embeds scaling (ComfyUI). Each runs on the core
hook's seam: where none applies, a layer is the paper's (``hook.DecoupledCrossAttention``)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (decoupled_attention, decoupled_attention_branches, decoupled_attention_branches_reference,
                       decoupled_attention_reference)
from ..samplers.cfg import Rows, per_row
from ..samplers.step_ranges import in_sigma_range, in_step_range
from .embeds_scaling import EMBEDS_SCALING, scale_image_kv
from .hook import DecoupledAttention, DecoupledCrossAttention
from .masks import mask_grid

STEP_RANGES = ("steps", "sigmas")


class ImagePromptAttention(DecoupledCrossAttention):
    """Decoupled cross-attention of one IP-Adapter with the references' options (every one off by
    default, which is the paper's hook):

    - ``masks`` (images, H, W) in [0, 1]: regional prompting, diffusers' ``ip_adapter_masks``. The
      tokens are one group per mask (the images' tokens concatenated in order); each group gets its
      own attention, times its mask resized (bicubic) to the layer's grid.
    - ``start``/``end``: the fraction of the denoising the image acts in; ``step_range`` "steps"
      (diffusers' ControlNet convention) or "sigmas" (ComfyUI's start_at/end_at). The loop tells
      the hook where it is with :meth:`set_step`; outside the range every layer is the base
      model's, bit for bit.
    - ``swapped``: layers where the image tokens go to the unconditional rows and the conditional
      rows get none (ComfyUI's precise weight types).
    - ``embeds_scaling``: ComfyUI's (:func:`scale_image_kv`).

    Where one of them applies to a layer (masks, several adapters, the other scalings),
    ``kernels.decoupled_attention_branches`` runs every image branch in one kernel launch on CUDA,
    or its reference where ``attention`` is the reference.
    """

    def __init__(self, layers: nn.ModuleList, positive: torch.Tensor, negative: torch.Tensor | None = None,
                 scale: object = 1.0, *, rows: Sequence[bool] | None = None, strict: bool = True,
                 attention: DecoupledAttention = decoupled_attention, masks: torch.Tensor | None = None,
                 start: float = 0.0, end: float = 1.0, step_range: str = "steps",
                 swapped: frozenset[int] = frozenset(), embeds_scaling: str = "V only"):
        super().__init__(layers, positive, negative, scale, rows=rows, strict=strict, attention=attention)
        if masks is not None and (masks.ndim != 3 or positive.shape[1] % masks.shape[0]):
            raise ValueError(f"masks must be (images, height, width), one per image whose tokens the hook holds; got "
                             f"{list(masks.shape)} for {positive.shape[1]} tokens")
        if not 0 <= start < end <= 1:
            raise ValueError(f"start and end must satisfy 0 ≤ start < end ≤ 1, got {start} and {end}")
        if step_range not in STEP_RANGES:
            raise ValueError(f"step_range must be one of {STEP_RANGES}, got {step_range!r}")
        if embeds_scaling not in EMBEDS_SCALING:
            raise ValueError(f"unknown embeds scaling {embeds_scaling!r}; expected one of: {', '.join(EMBEDS_SCALING)}")
        self.masks, self.start, self.end, self.step_range = masks, start, end, step_range
        self.swapped, self.embeds_scaling = frozenset(swapped), embeds_scaling
        self.active = True

    def set_step(self, step: int, steps: int, timestep: float) -> None:
        """Where the denoising loop is: step ``step`` (0-based) of ``steps``, at ``timestep``
        (fractional with the Euler samplers)."""
        if self.step_range == "steps":
            self.active = in_step_range(step, steps, self.start, self.end)
        else:
            self.active = in_sigma_range(timestep, self.start, self.end)

    def acts(self, layer: int) -> bool:
        return self.active and super().acts(layer)

    def row_kv(self, layer: int, q: torch.Tensor, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """As the paper's, but on a swapped layer the positive in the unconditional rows and none
        (zeros, which attend to exactly 0: the projections have no bias) in the conditional ones."""
        if self.per_row_tokens or layer not in self.swapped:
            return super().row_kv(layer, q, rows)
        k_img, v_img = self.image_kv(layer, q.shape[1], q.dtype, q.device)
        return tuple(per_row(rows, torch.zeros_like(kv[1:]), kv[1:]) for kv in (k_img, v_img))

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
        small = F.interpolate(mask[None, None].float(), size=(h, w), mode="bicubic")  # (1, 1, h, w)
        return small.reshape(queries, 1)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.plain(layer) or not self.acts(layer):
            return super().__call__(layer, q, k, v)
        return self.branch_attention(q, k, v, self.branches(layer, q, self.layout(q.shape[0], layer)))

    @property
    def branch_attention(self) -> Callable:
        """Several branches: in one kernel launch, or (``attention`` the reference) diffusers' way."""
        reference = self.attention is decoupled_attention_reference
        return decoupled_attention_branches_reference if reference else decoupled_attention_branches
