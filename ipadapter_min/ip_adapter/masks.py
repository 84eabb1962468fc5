"""Regional image prompts (diffusers' ip_adapter_masks): the grid a mask is resized to at each layer."""
from __future__ import annotations

import math


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
