"""The Stable Diffusion 1.5 VAE (KL autoencoder): images ↔ latents at 1/8 resolution.

Module names are those of the original single-file checkpoints (``encoder.down.0.block.0``),
like the UNet's; diffusers names are mapped to them in ``formats/sd15.py``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configs import VAEConfig
from .strided_conv2d import StridedConv2d
from .unet import Upsample


def group_norm(cfg: VAEConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(cfg.groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, cin: int, cout: int):
        super().__init__()
        self.norm1 = group_norm(cfg, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = group_norm(cfg, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1 convolutions as projections."""

    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.norm = group_norm(cfg, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2)[:, None] for proj in (self.q, self.k, self.v))  # (B, 1, h·w, c)
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, h·w, c)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))  # (B, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, cfg: VAEConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(cfg, channels, channels)
        self.attn_1 = AttnBlock(cfg, channels)
        self.block_2 = ResnetBlock(cfg, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = StridedConv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as SD was trained


class Level(nn.Module):
    """One resolution of the encoder (``down.i``) or decoder (``up.i``)."""

    def __init__(self, blocks: list[ResnetBlock], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.resample_name = resample_name
        if resample is not None:
            self.add_module(resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        resample = getattr(self, self.resample_name, None)
        return x if resample is None else resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.image_channels, cfg.channels, 3, padding=1)
        self.down = nn.ModuleList()
        cur = cfg.channels
        for i, width in enumerate(widths):
            blocks = []
            for _ in range(cfg.res_blocks):
                blocks.append(ResnetBlock(cfg, cur, width))
                cur = width
            last = i == len(widths) - 1
            self.down.append(Level(blocks, None if last else Downsample(cur), "downsample"))
        self.mid = MidBlock(cfg, cur)
        self.norm_out = group_norm(cfg, cur)
        self.conv_out = nn.Conv2d(cur, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        cur = widths[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, cur, 3, padding=1)
        self.mid = MidBlock(cfg, cur)
        levels = []
        for i in reversed(range(len(widths))):  # ``up`` is indexed by resolution, run from deepest
            blocks = []
            for _ in range(cfg.res_blocks + 1):
                blocks.append(ResnetBlock(cfg, cur, widths[i]))
                cur = widths[i]
            levels.insert(0, Level(blocks, Upsample(cur) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(cfg, cur)
        self.conv_out = nn.Conv2d(cur, cfg.image_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    """``encode``: image in [-1, 1] → scaled latent mean; ``decode``: scaled latent → image in [-1, 1]."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode_moments(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the latent distribution (unscaled)."""
        mean, logvar = self.quant_conv(self.encoder(image)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self.encode_moments(image)[0] * self.cfg.scaling_factor

    def sample(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A scaled sample of the latent distribution, mean + std·ε (diffusers' ``latent_dist.sample``,
        which img2img and inpainting use): ε is drawn on the CPU generator in float32 and then moved
        and cast, as diffusers draws it from a CPU generator."""
        mean, logvar = self.encode_moments(image)
        eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
        return (mean + torch.exp(0.5 * logvar) * eps) * self.cfg.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latents / self.cfg.scaling_factor))
