"""ComfyUI's embeds scaling: where λ applies, to the attention output (diffusers' and the paper's)
or to the image keys and values."""
from __future__ import annotations

import torch

EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")


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
