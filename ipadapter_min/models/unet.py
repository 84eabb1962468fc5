"""The Stable Diffusion 1.5 UNet.

Module names are those of the original single-file checkpoints (``input_blocks``,
``middle_block``, ``output_blocks``), so that format loads by stripping a prefix; the
diffusers layout is renamed to these names in ``formats/sd15.py``.

The 16 cross-attention layers are numbered 0..15 in the order the UNet runs them; an
adapter reaches them only through the ``hook`` argument (see ``attention.py``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import CrossAttentionHook, attention
from .configs import UNetConfig
from .residuals import Residuals
from .strided_conv2d import StridedConv2d


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] with frequencies 10000^(-i/half), as SD was trained."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1)
        )
        self.skip_connection = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))
        self.layer: int | None = None  # cross-attention layers get their number (0..15) from the UNet

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)  # (B, L, dim) → (B, heads, L, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                hook: CrossAttentionHook | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self.split_heads(self.to_q(x))  # (B, heads, Lq, d)
        k, v = self.split_heads(self.to_k(context)), self.split_heads(self.to_v(context))  # (B, heads, Lk, d) each
        out = attention(q, k, v) if hook is None or self.layer is None else hook(self.layer, q, k, v)  # (B, heads, Lq, d)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))  # (B, Lq, dim)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, hook: CrossAttentionHook | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, hook)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, context_dim, heads)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, hook: CrossAttentionHook | None) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, h·w, c): one token per pixel
        for block in self.transformer_blocks:
            y = block(y, context, hook)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))  # (B, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = StridedConv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        """×2, or to ``size``: the UNet passes the next skip connection's size, so latents whose
        sides are not multiples of 8 (images not multiples of 64) come back to their own size."""
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Step(nn.ModuleList):
    """One entry of input_blocks/middle_block/output_blocks: layers applied in order."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                hook: CrossAttentionHook | None, upsample_size: torch.Size | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, hook)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x


class DownPath(nn.Module):
    """The UNet's first half: time embedding, input blocks and middle block. The UNet goes on
    with its output blocks; a ControlNet is a second, separately trained copy of this half
    (``controlnet.py``). Module names are the original checkpoints', for both."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch, tdim, g = cfg.channels, cfg.time_dim, cfg.groups

        def transformer(dim: int) -> SpatialTransformer:
            return SpatialTransformer(dim, cfg.context_dim, cfg.heads, g)

        self.time_embed = nn.Sequential(nn.Linear(ch, tdim), nn.SiLU(), nn.Linear(tdim, tdim))

        self.input_blocks = nn.ModuleList([Step([nn.Conv2d(cfg.in_channels, ch, 3, padding=1)])])
        self.skip_channels = [ch]  # what each input block hands to the output blocks
        self.level_ends = []  # the index of each level's last input block (before its downsampler)
        cur = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.res_blocks):
                layers = [ResBlock(cur, ch * mult, tdim, g)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    layers.append(transformer(cur))
                self.input_blocks.append(Step(layers))
                self.skip_channels.append(cur)
            self.level_ends.append(len(self.input_blocks) - 1)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Step([Downsample(cur)]))
                self.skip_channels.append(cur)

        self.middle_block = Step([ResBlock(cur, cur, tdim, g), transformer(cur), ResBlock(cur, cur, tdim, g)])

    def embed_time(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        return self.time_embed(timestep_embedding(t, self.cfg.channels).to(x.dtype))


class UNet(DownPath):
    """Noise prediction ε(x_t, t, text tokens) for latents [B, 4, H/8, W/8]."""

    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__(cfg)
        ch, tdim, g = cfg.channels, cfg.time_dim, cfg.groups
        skip_channels = list(self.skip_channels)
        cur = skip_channels[-1]
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.res_blocks + 1):
                layers = [ResBlock(cur + skip_channels.pop(), ch * mult, tdim, g)]
                cur = ch * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(cur, cfg.context_dim, cfg.heads, g))
                if level != 0 and i == cfg.res_blocks:
                    layers.append(Upsample(cur))
                self.output_blocks.append(Step(layers))

        self.out = nn.Sequential(nn.GroupNorm(g, cur), nn.SiLU(), nn.Conv2d(cur, cfg.out_channels, 3, padding=1))

        for index, layer in enumerate(self.cross_attention_layers()):
            layer.layer = index

    def cross_attention_layers(self) -> list[Attention]:
        """The cross-attention layers in the order they run: input, middle, output blocks."""
        steps = [*self.input_blocks, self.middle_block, *self.output_blocks]
        return [m.attn2 for step in steps for m in step.modules() if isinstance(m, TransformerBlock)]

    def cross_attention_widths(self) -> list[int]:
        """Each cross-attention layer's key/value width: the widths an IP-Adapter for this UNet has."""
        return [attn.to_k.out_features for attn in self.cross_attention_layers()]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                hook: CrossAttentionHook | None = None, residuals: Residuals | None = None) -> torch.Tensor:
        residuals = residuals or Residuals()
        emb = self.embed_time(t, x)
        levels = iter(residuals.levels or [])
        skips = []
        for index, step in enumerate(self.input_blocks):
            x = step(x, emb, context, hook)
            if residuals.levels is not None and index in self.level_ends:
                x = x + next(levels)
            skips.append(x)
        x = self.middle_block(x, emb, context, hook)
        if residuals.middle is not None:
            x = x + residuals.middle
        if residuals.skips is not None:
            skips = [skip + extra for skip, extra in zip(skips, residuals.skips, strict=True)]
        for step in self.output_blocks:
            x = torch.cat([x, skips.pop()], dim=1)
            x = step(x, emb, context, hook, skips[-1].shape[-2:] if skips else None)
        return self.out(x)
