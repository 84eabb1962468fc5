"""The plus adapters' projection (ip-adapter-plus_sd15, plus-face): a Perceiver resampler whose 16
learned queries attend to the image encoder's penultimate hidden states, the fine-grained features
of the paper's ablation. Keys as the official ``image_proj.*``."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from ..models.configs import ResamplerConfig


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
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        s = self.dim_head ** -0.25  # applied to q and k each, as the official code does (fp16 range)
        weights = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(weights.float(), dim=-1).to(weights.dtype)
        return self.to_out(rearrange(weights @ v, "b h n d -> b n (h d)"))


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
