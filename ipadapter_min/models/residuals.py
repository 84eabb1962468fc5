"""What structural controls add to the UNet: the one seam for ControlNets and T2I-Adapters."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Residuals:
    """What structural controls add to the UNet's activations: the one input through which
    ControlNets and T2I-Adapters reach it, the way image prompts reach it through the hook.

    ``skips``: one tensor per skip connection (12 for SD1.5), added to what the input blocks hand
    to the output blocks, the hidden state going down unchanged (ControlNet). ``middle``: added to
    the middle block's output (ControlNet). ``levels``: one tensor per resolution level, added to
    the hidden state after the level's last input block, so that both its skip connection and the
    path down carry it (T2I-Adapter). Several controls add up."""

    skips: list[torch.Tensor] | None = None
    middle: torch.Tensor | None = None
    levels: list[torch.Tensor] | None = None

    def __add__(self, other: "Residuals") -> "Residuals":
        def add(a, b):
            if a is None or b is None:
                return b if a is None else a
            return [x + y for x, y in zip(a, b, strict=True)] if isinstance(a, list) else a + b
        return Residuals(*(add(getattr(self, f), getattr(other, f)) for f in ("skips", "middle", "levels")))
