"""Several reference images combined into one image's features (ComfyUI_IPAdapter_plus's
combine_embeds), instead of concatenating their tokens."""
from __future__ import annotations

from typing import Sequence

import torch

from .adapter import IPAdapter
from .tokens import tokens_from_features

COMBINE = ("concat", "average", "add", "subtract", "norm average")


def combine_features(features: torch.Tensor, combine: str, weights: Sequence[float] | None = None) -> torch.Tensor:
    """N images' encoder features → one image's, by ComfyUI_IPAdapter_plus's ``combine_embeds``:
    ``average`` (optionally weighted), ``add`` (the sum), ``subtract`` (the first minus the mean of
    the others) or ``norm average`` (the mean after dividing by the norm taken across the images)."""
    n = features.shape[0]
    if weights is not None and combine != "average":
        raise ValueError("weights apply to combine='average' only")
    if combine == "average":
        w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != n or not torch.isfinite(w).all() or w.sum() == 0:
            raise ValueError(f"need {n} finite weights with a nonzero sum, got {weights}")
        w = (w / w.sum()).to(features.device).reshape((n,) + (1,) * (features.ndim - 1))
        return (w * features.float()).sum(0, keepdim=True).to(features.dtype)
    if combine == "add":
        return features.sum(0, keepdim=True)
    if combine == "subtract":
        return (features[0] - features[1:].mean(0)).unsqueeze(0) if n > 1 else features
    if combine == "norm average":
        return (features / features.norm(dim=0, keepdim=True)).mean(0, keepdim=True)
    raise ValueError(f"unknown combine {combine!r}: expected one of {', '.join(COMBINE)}")


def combined_tokens(adapter: IPAdapter, features: torch.Tensor, negative_features: torch.Tensor, combine: str = "concat",
                    weights: Sequence[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) image tokens of one prompt from N images' features: "concat" keeps every
    image's tokens (``tokens.tokens_from_features``, the paper's and diffusers' way); the others
    project one image's features combined by :func:`combine_features`, whose negative is the first
    image's, as ComfyUI has it."""
    if combine == "concat":
        if weights is not None:
            raise ValueError("weights apply to combine='average' only")
        return tokens_from_features(adapter, features, negative_features)
    return adapter(combine_features(features, combine, weights)), adapter(negative_features[:1])
