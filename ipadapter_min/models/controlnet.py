"""ControlNet (Zhang et al., 2023): structure from a control image (edges, depth, pose, …).

A ControlNet is a trained copy of the UNet's first half (``unet.DownPath``: the same blocks,
its own weights) that also sees the control image. Each of its 12 skip outputs and its middle
output goes through a 1×1 "zero convolution" and is added to the UNet's (``residuals.Residuals``).
It reads the text tokens only: an image prompt changes the UNet's attention (the hook), never
the ControlNet's, as in diffusers and the official IP-Adapter code.

Module names are the original checkpoints' (``control_model.`` stripped): ``input_hint_block``,
``zero_convs``, ``middle_block_out`` beside the UNet's ``time_embed``, ``input_blocks``,
``middle_block``.
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import ControlNetConfig
from .residuals import Residuals
from .strided_conv2d import StridedConv2d
from .unet import DownPath


def hint_encoder(cfg: ControlNetConfig) -> nn.Sequential:
    """Control image (pixel size) → the UNet's first width at latent size: pairs of 3×3
    convolutions, the second of each pair halving the size, SiLU between (the original's layer
    indices: convolutions at 0, 2, 4, …, SiLU at the odd ones)."""
    widths = cfg.hint_channels
    layers = [nn.Conv2d(cfg.conditioning_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, wider in zip(widths, widths[1:]):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                   StridedConv2d(width, wider, 3, padding=1, stride=2), nn.SiLU()]
    layers.append(nn.Conv2d(widths[-1], cfg.unet.channels, 3, padding=1))
    return nn.Sequential(*layers)


class ControlNet(DownPath):
    def __init__(self, cfg: ControlNetConfig = ControlNetConfig()):
        super().__init__(cfg.unet)
        self.control_cfg = cfg
        self.input_hint_block = hint_encoder(cfg)
        self.zero_convs = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1)) for c in self.skip_channels])
        width = self.skip_channels[-1]
        self.middle_block_out = nn.Sequential(nn.Conv2d(width, width, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hint: torch.Tensor) -> Residuals:
        """Unscaled residuals for latents ``x`` and the control image ``hint`` ([0, 1], pixel size)."""
        emb = self.embed_time(t, x)
        skips = []
        for index, (step, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            x = step(x, emb, context, None)
            if index == 0:  # after the first convolution
                x = x + self.input_hint_block(hint)
            skips.append(zero_conv(x))
        middle = self.middle_block_out(self.middle_block(x, emb, context, None))
        return Residuals(skips=skips, middle=middle)
