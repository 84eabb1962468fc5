"""A strided convolution that is right in bf16 on the CPU, for the UNet's, the VAE's and the
ControlNets' downsampling (torch 2.14.1's own is wrong at some shapes)."""
from __future__ import annotations

import torch
from torch import nn


class StridedConv2d(nn.Conv2d):
    """A strided convolution that is right in bf16 on the CPU (the UNet's and the VAE's downsampling).

    torch 2.14.1's CPU bf16 convolution with stride 2 returns garbage at small sizes on some CPUs:
    errors up to ~1e37 or NaN, different bits on every call, e.g. 128 channels 4×2 → 2×1, or
    1280 channels 3×2 → 2×1, which SD1.5 reaches at its third downsample of a 96×64 image. (This
    fits oneDNN 3.12's AMX bf16 kernel, reported wrong for one-pixel-wide strided outputs,
    pytorch#169688; CPUs without AMX get a correct kernel.) So on the CPU a bf16 input is
    convolved in fp32 and rounded once to bf16: what a correct bf16 convolution gives (it
    accumulates in fp32 too), the same bits on every call. Under CPU bf16 autocast (mixed-precision
    training) likewise, with autocast held off for the one op. CUDA and other dtypes take the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and (x.dtype == torch.bfloat16 or (
                torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)):
            with torch.autocast("cpu", enabled=False):
                y = self._conv_forward(x.float(), self.weight.float(), self.bias.float())
            return y.to(torch.bfloat16)
        return super().forward(x)
