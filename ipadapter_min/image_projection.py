"""IP-Adapter image projection models: CLIP image features → image tokens for cross-attention.

Three models cover the SD1.5 releases (h94/IP-Adapter, models/):

- :class:`ImageProjection` (ip-adapter_sd15, _sd15_light, _sd15_vit-G): Linear → reshape → LayerNorm
  on the *projected* CLIP image embedding; 4 tokens.
- :class:`Resampler` (ip-adapter-plus_sd15, plus-face): a Perceiver resampler over the
  *penultimate* hidden states of the image encoder; 16 tokens.
- :class:`MLPProjection` (ip-adapter-full-face_sd15): Linear → GELU → Linear → LayerNorm applied to
  every penultimate hidden state; 257 tokens.

Attribute names follow the official checkpoint keys (``image_proj.*`` without the prefix), so a
release file loads with ``load_state_dict(strict=True)``. Which model a file holds is told from
its keys and shapes alone (:func:`detect_variant`), never from the file name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from weights_convert.files import CheckpointError

CONTEXT_DIM = 768  # SD1.5's cross-attention (text-token) width
VIT_H = "ViT-H/14"  # OpenCLIP ViT-H/14: width 1280, projection 1024, 257 tokens at 224 px
VIT_BIGG = "ViT-bigG/14"  # OpenCLIP ViT-bigG/14: width 1664, projection 1280
VIT_H_WIDTH, VIT_H_PROJECTION, VIT_BIGG_PROJECTION = 1280, 1024, 1280
VIT_H_TOKENS = 257  # 16×16 patches + class token


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
        return self.norm(x.reshape(x.shape[0], self.tokens, self.context_dim))


class MLPProjection(nn.Module):
    """``proj`` = Linear(e, e) → GELU → Linear(e, context_dim) → LayerNorm, token by token."""

    def __init__(self, embed_dim: int = VIT_H_WIDTH, context_dim: int = CONTEXT_DIM):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, embed_dim) penultimate hidden states → (B, L, context_dim)."""
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))


@dataclass(frozen=True)
class ResamplerConfig:
    """The plus / plus-face resampler (official ``Resampler(dim=768, depth=4, dim_head=64, heads=12,
    num_queries=16, embedding_dim=1280, output_dim=768, ff_mult=4)``)."""
    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = VIT_H_WIDTH
    output_dim: int = CONTEXT_DIM
    ff_mult: int = 4


class PerceiverAttention(nn.Module):
    """Queries from the latents; keys and values from [features; latents]. Bias-free projections."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.dim_head, self.heads = dim_head, heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)  # for the image features
        self.norm2 = nn.LayerNorm(dim)  # for the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)  # k and v stacked along the output axis
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        s = self.dim_head ** -0.25  # applied to q and k each, as the official code does (fp16 range)
        weights = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        out = (weights @ v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # Keys .0 (LayerNorm), .1 and .3 (bias-free Linears); .2 is the GELU.
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Perceiver resampler: ``num_queries`` learned latents attend to the projected image features.

    Keys: latents, proj_in, proj_out, norm_out, layers.L.0.{norm1,norm2,to_q,to_kv,to_out},
    layers.L.1.{0,1,3}.
    """

    def __init__(self, config: ResamplerConfig = ResamplerConfig()):
        super().__init__()
        c = self.config = config
        self.latents = nn.Parameter(torch.empty(1, c.num_queries, c.dim))
        if not self.latents.is_meta:  # (random ops on meta tensors cost seconds of lazy imports)
            nn.init.normal_(self.latents, std=c.dim ** -0.5)  # the official init, randn / √dim
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.dim_head, c.heads), _feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, embedding_dim) penultimate hidden states → (B, num_queries, output_dim)."""
        x = self.proj_in(hidden_states.to(self.proj_in.weight.dtype))
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


@dataclass(frozen=True)
class AdapterSpec:
    """What an IP-Adapter file needs, read from its image-projection keys and shapes.

    variant: "base" (also _light: same shapes), "vit-g", "plus" (also plus-face), "full-face".
    encoder: the image encoder it was trained with (``VIT_H`` or ``VIT_BIGG``).
    encoder_output: "image_embeds" (the projected embedding, (B, feature_dim)) or "penultimate"
        (hidden states of the last-but-one layer before post-LayerNorm, (B, 257, feature_dim)).
    feature_dim: the width the projection consumes.
    tokens: image tokens per reference image.
    """
    variant: str
    encoder: str
    encoder_output: str
    feature_dim: int
    tokens: int
    context_dim: int = CONTEXT_DIM
    resampler: ResamplerConfig | None = field(default=None, repr=False)

    @property
    def uses_hidden_states(self) -> bool:
        return self.encoder_output == "penultimate"

    def build_projection(self) -> nn.Module:
        """The projection module for this variant (weights uninitialised on the meta device: load them)."""
        if self.variant in ("base", "vit-g"):
            return ImageProjection(self.feature_dim, self.tokens, self.context_dim)
        if self.variant == "full-face":
            return MLPProjection(self.feature_dim, self.context_dim)
        if self.variant == "plus":
            return Resampler(self.resampler)
        raise ValueError(f"unknown IP-Adapter variant {self.variant!r}")


def _shape(state: Mapping, key: str, source: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{source}: missing key 'image_proj.{key}'")
    value = state[key]
    shape = tuple(value.shape) if hasattr(value, "shape") else tuple(value)
    if len(shape) != ndim:
        raise CheckpointError(f"{source}: 'image_proj.{key}' has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def _check_context(width: int, key: str, source: str) -> None:
    if width != CONTEXT_DIM:
        raise CheckpointError(f"{source}: 'image_proj.{key}' gives token width {width}, SD1.5 needs {CONTEXT_DIM} "
                              f"(an adapter for another base model, e.g. SDXL's 2048?)")


def detect_variant(state: Mapping[str, object], source: str = "checkpoint") -> AdapterSpec:
    """Tell the IP-Adapter variant from the image-projection state (keys without ``image_proj.``;
    values are tensors or shapes). Raises a one-line :class:`CheckpointError` naming ``source``."""
    keys = set(state)
    if any(k.startswith("perceiver_resampler.") for k in keys) or (
            "proj.0.weight" in keys and "norm.weight" in keys and "proj.3.weight" not in keys):
        raise CheckpointError(f"{source}: an IP-Adapter FaceID projection (face-recognition embeddings); "
                              f"only the CLIP-image variants (base, light, vit-G, plus, plus-face, full-face) "
                              f"are supported")
    if "proj.weight" in keys:
        out, embed = _shape(state, "proj.weight", source, 2)
        (width,) = _shape(state, "norm.weight", source, 1)
        _check_context(width, "norm.weight", source)
        if out % width:
            raise CheckpointError(f"{source}: 'image_proj.proj.weight' has {out} outputs, not a multiple of {width}")
        if embed == VIT_H_PROJECTION:
            return AdapterSpec("base", VIT_H, "image_embeds", embed, out // width)
        if embed == VIT_BIGG_PROJECTION:
            return AdapterSpec("vit-g", VIT_BIGG, "image_embeds", embed, out // width)
        raise CheckpointError(f"{source}: 'image_proj.proj.weight' takes {embed}-wide image embeddings; known are "
                              f"{VIT_H_PROJECTION} (ViT-H/14) and {VIT_BIGG_PROJECTION} (ViT-bigG/14)")
    if "proj.3.weight" in keys:
        hidden, embed = _shape(state, "proj.0.weight", source, 2)
        width, _ = _shape(state, "proj.2.weight", source, 2)
        _check_context(width, "proj.2.weight", source)
        if embed != VIT_H_WIDTH:
            raise CheckpointError(f"{source}: 'image_proj.proj.0.weight' takes {embed}-wide hidden states, "
                                  f"expected ViT-H/14's {VIT_H_WIDTH}")
        return AdapterSpec("full-face", VIT_H, "penultimate", embed, VIT_H_TOKENS)
    if "latents" in keys:
        _, queries, dim = _shape(state, "latents", source, 3)
        _, embed = _shape(state, "proj_in.weight", source, 2)
        output, _ = _shape(state, "proj_out.weight", source, 2)
        _check_context(output, "proj_out.weight", source)
        depth = sum(1 for k in keys if k.startswith("layers.") and k.endswith(".0.to_q.weight"))
        if depth == 0:
            raise CheckpointError(f"{source}: missing key 'image_proj.layers.0.0.to_q.weight'")
        inner, _ = _shape(state, "layers.0.0.to_q.weight", source, 2)
        ff, _ = _shape(state, "layers.0.1.1.weight", source, 2)
        dim_head = ResamplerConfig.dim_head  # not recorded in the file; the release uses 64
        if embed != VIT_H_WIDTH:
            raise CheckpointError(f"{source}: 'image_proj.proj_in.weight' takes {embed}-wide hidden states, "
                                  f"expected ViT-H/14's {VIT_H_WIDTH}")
        if inner % dim_head or ff % dim:
            raise CheckpointError(f"{source}: resampler widths (attention {inner}, feed-forward {ff}) do not fit "
                                  f"dim_head {dim_head} and dim {dim}")
        config = ResamplerConfig(dim=dim, depth=depth, dim_head=dim_head, heads=inner // dim_head,
                                 num_queries=queries, embedding_dim=embed, output_dim=output, ff_mult=ff // dim)
        return AdapterSpec("plus", VIT_H, "penultimate", embed, queries, resampler=config)
    raise CheckpointError(f"{source}: not an IP-Adapter image projection (none of 'image_proj.proj.weight', "
                          f"'image_proj.proj.3.weight', 'image_proj.latents' found)")
