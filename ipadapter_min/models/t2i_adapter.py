"""T2I-Adapter (Mou et al., 2023): structure from a control image, more cheaply than a ControlNet.

A small convolutional network turns the control image into one feature map per UNet resolution
level, once per image rather than once per step; the UNet adds each to its hidden state after the
level's last input block (``residuals.Residuals.levels``). It never sees the text or the timestep.

Two architectures, with the original TencentARC module names (``conv_in``, ``body.*``):

* full (sketch, canny, depth, pose, …): pixel-unshuffle by 8, a 3×3 convolution, then per level
  ``res_blocks`` residual blocks (3×3, ReLU, 1×1), the first of levels 1… halving the size and,
  where the width changes, a 1×1 ``in_conv``;
* light (color): per level an extractor: 1×1 down to a quarter of the width, ``res_blocks``
  residual blocks (3×3, ReLU, 3×3), 1×1 back up.
"""
from __future__ import annotations

import torch
from torch import nn

from .configs import T2IAdapterConfig


class ResBlock(nn.Module):
    """Optionally halve the size (average pooling) and change the width (1×1 ``in_conv``), then
    x + block2(ReLU(block1(x)))."""

    def __init__(self, cin: int, cout: int, down: bool = False, second_kernel: int = 1):
        super().__init__()
        self.down = nn.AvgPool2d(2, 2, ceil_mode=True) if down else nn.Identity()
        self.in_conv = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.block1 = nn.Conv2d(cout, cout, 3, padding=1)
        self.block2 = nn.Conv2d(cout, cout, second_kernel, padding=second_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_conv(self.down(x))
        return x + self.block2(torch.relu(self.block1(x)))


class Extractor(nn.Module):
    """A light adapter's level: 1×1 to a quarter of the width, residual blocks, 1×1 back."""

    def __init__(self, cin: int, cout: int, res_blocks: int, down: bool):
        super().__init__()
        self.down = nn.AvgPool2d(2, 2, ceil_mode=True) if down else nn.Identity()
        self.in_conv = nn.Conv2d(cin, cout // 4, 1)
        self.body = nn.Sequential(*[ResBlock(cout // 4, cout // 4, second_kernel=3) for _ in range(res_blocks)])
        self.out_conv = nn.Conv2d(cout // 4, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_conv(self.body(self.in_conv(self.down(x))))


class T2IAdapter(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig = T2IAdapterConfig()):
        super().__init__()
        self.cfg = cfg
        self.unshuffle = nn.PixelUnshuffle(cfg.unshuffle)
        cin, widths, n = cfg.in_channels * cfg.unshuffle**2, cfg.channels, cfg.res_blocks
        if cfg.light:
            self.conv_in = nn.Identity()
            self.body = nn.ModuleList([Extractor(cin if i == 0 else widths[i - 1], width, n, down=i > 0)
                                       for i, width in enumerate(widths)])
        else:
            self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
            self.body = nn.ModuleList([ResBlock(widths[i - 1] if i > 0 and j == 0 else width, width, i > 0 and j == 0)
                                       for i, width in enumerate(widths) for j in range(n)])

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Control image ([0, 1], pixel size) → one feature map per level."""
        x = self.conv_in(self.unshuffle(image))
        per_level = 1 if self.cfg.light else self.cfg.res_blocks
        features = []
        for index, block in enumerate(self.body):
            x = block(x)
            if (index + 1) % per_level == 0:
                features.append(x)
        return features
