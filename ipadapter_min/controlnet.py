"""ControlNet (Zhang et al., 2023): structure from a control image (edges, depth, pose, …).

A ControlNet is a trained copy of the UNet's first half (``unet.DownPath``: the same blocks,
its own weights) that also sees the control image. Each of its 12 skip outputs and its middle
output goes through a 1×1 "zero convolution" and is added to the UNet's (``unet.Residuals``).
It reads the text tokens only: an image prompt changes the UNet's attention (the hook), never
the ControlNet's, as in diffusers and the official IP-Adapter code.

Module names are the original checkpoints' (``control_model.`` stripped): ``input_hint_block``,
``zero_convs``, ``middle_block_out`` beside the UNet's ``time_embed``, ``input_blocks``,
``middle_block``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from .cfg import CFGBatch
from .configs import ControlNetConfig
from .image_processing import require_output_size, unit_pixels
from .step_ranges import in_step_range
from .unet import DownPath, Residuals, StridedConv2d


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


@dataclass
class ControlNetInput:
    """One ControlNet as a caller gives it: the model, its control image and how strongly and
    when it acts. ``start``/``end``: the fraction of the steps it acts in (diffusers'
    control_guidance_start/end). ``guess_mode``: it guides the conditional half of the batch only,
    its shallow residuals damped (×0.1 rising to ×1 at the middle), so that it works with an
    empty prompt; a global-pool model (shuffle) always runs so."""

    model: ControlNet
    image: Image.Image
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False

    def check(self, width: int, height: int) -> None:
        require_output_size(self.image, width, height, "the control image")
        if not 0 <= self.start < self.end <= 1:
            raise ValueError(f"control start and end must satisfy 0 ≤ start < end ≤ 1, got {self.start} and {self.end}")

    def guide(self, width: int, height: int, device: torch.device, dtype: torch.dtype) -> "ControlNetGuide":
        self.check(width, height)
        hint = unit_pixels(self.image, width, height).to(device, dtype)
        return ControlNetGuide(self, hint, self.guess_mode or self.model.control_cfg.global_pool)


class ControlNetGuide:
    """A ControlNet in the loop: its residuals at each step."""

    def __init__(self, given: ControlNetInput, hint: torch.Tensor, guess_mode: bool):
        self.given, self.hint, self.guess_mode = given, hint, guess_mode

    def scales(self, step: int, steps: int, count: int) -> list[float] | torch.Tensor:
        """Per-residual factors: ``scale``, zero outside [start, end] (the net still runs, as in
        diffusers); in guess mode 10^(−1 … 0) over the 12 skips and the middle."""
        given = self.given
        scale = given.scale * float(in_step_range(step, steps, given.start, given.end))
        if self.guess_mode:
            return torch.logspace(-1, 0, count, device=self.hint.device) * scale
        return [scale] * count

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, batch: CFGBatch, step: int,
                  steps: int) -> Residuals:
        net = self.given.model
        conditional_only = self.guess_mode and batch.guided
        rows = torch.tensor(batch.rows, device=x.device)
        if conditional_only:
            x, context = x[rows], context[rows]
        out = net(x, t, context, self.hint.expand(x.shape[0], -1, -1, -1))
        scales = self.scales(step, steps, len(out.skips) + 1)
        skips = [r * s for r, s in zip(out.skips, scales)]
        middle = out.middle * scales[-1]
        if net.control_cfg.global_pool:
            skips, middle = [r.mean(dim=(2, 3), keepdim=True) for r in skips], middle.mean(dim=(2, 3), keepdim=True)
        if conditional_only:  # the unconditional rows get no control
            skips, middle = [self.on_rows(r, rows) for r in skips], self.on_rows(middle, rows)
        return Residuals(skips=skips, middle=middle)

    @staticmethod
    def on_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Values for the conditional rows, zeros in the others."""
        out = values.new_zeros((len(rows), *values.shape[1:]))
        out[rows] = values
        return out
