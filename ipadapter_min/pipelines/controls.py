"""Structure controls in the denoising loop: a ControlNet or T2I-Adapter as a caller gives it (the
model, its control image, how strongly and when it acts), and its guide, which gives the UNet its
one residual input (``models.residuals.Residuals``) at each step."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from ..models.controlnet import ControlNet
from ..models.t2i_adapter import T2IAdapter
from ..models.residuals import Residuals
from ..samplers.cfg import CFGBatch
from ..samplers.step_ranges import in_step_range
from .image_processing import require_output_size, unit_pixels


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


@dataclass
class T2IAdapterInput:
    """One T2I-Adapter as a caller gives it: the model, its control image, how strongly it acts."""

    model: T2IAdapter
    image: Image.Image
    scale: float = 1.0

    def guide(self, width: int, height: int, device: torch.device, dtype: torch.dtype) -> "T2IAdapterGuide":
        require_output_size(self.image, width, height, "the adapter image")
        pixels = unit_pixels(self.image, width, height, grayscale=self.model.cfg.in_channels == 1).to(device, dtype)
        with torch.no_grad():
            features = [f * self.scale for f in self.model(pixels)]
        return T2IAdapterGuide(features)


@dataclass
class T2IAdapterGuide:
    """A T2I-Adapter in the loop: the same features at every step, in every row."""

    features: list[torch.Tensor] = field(default_factory=list)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, batch: CFGBatch, step: int,
                  steps: int) -> Residuals:
        return Residuals(levels=[f.expand(x.shape[0], -1, -1, -1) for f in self.features])
