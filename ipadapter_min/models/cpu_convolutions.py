"""Faster exact convolutions for fp32 inference on the CPU: SD1.5's UNet, VAE and ControlNets.

Two things eager PyTorch leaves on the table there, both measured on one core of this project's
machine (AMD EPYC, AVX2):

* **Weight reorders.** Eager PyTorch hands oneDNN each Conv2d weight in PyTorch's plain layout,
  and oneDNN reorders it into its blocked layout on every call. Where the UNet is deep and small
  (1280 channels at 4×4 to 16×16 latents) that costs as much as the convolution: 1280 → 1280 3×3
  on 2×1280×4×4 takes 72 ms eagerly and 24 ms with the weight reordered once, 147 → 95 ms at
  8×8, 108 → 93 ms at 640 channels 16×16. At 32×32 the two tie, and at 64×64 a reordered weight
  is slower (422 → 460-570 ms), so only small inputs take it. The layout oneDNN picks depends on
  the input's shape (one reordered for 2×1280×64×64 takes 1.6 s on 2×1280×8×8), so the weight is
  reordered again whenever the shape changes. torch.compile's CPU backend does the same reorder
  when it freezes weights; this is its oneDNN operator without the compile.
* **Upsampling into a convolution.** Nearest ×2 then a 3×3 convolution (the UNet's and the VAE's
  Upsample) sees, for each of the four output pixels of an input pixel, a 2×2 window of the
  input with the 3×3 taps summed in groups: one 2×2 convolution with 4× the output channels gives
  all four phases at 16/36 of the multiply-adds, without the upsampled image. 2.2 → 1.2-1.4 s for
  the VAE decoder's 512- and 256-channel upsampling at 512 px.

Both change only the order of fp32 rounding (outputs within ~1e-5 of the eager layers). The
modules keep their parameters and state-dict keys; the reordered and summed weights are caches,
remade when a weight changes (LoRA merges, ``load_state_dict``). Anything else (gradients, other
dtypes and devices) takes the eager path.
"""
from __future__ import annotations

import torch
from torch import nn

from .unet import Upsample

# Batch × height × width at or below which a reordered weight wins (the measurements above:
# 2×16×16 wins, 2×32×32 ties).
SMALL_INPUT = 2 * 16 * 16


def _eager(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type != "cpu" or x.dtype != torch.float32 or not torch.backends.mkldnn.is_available()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


class PackedConv2d(nn.Conv2d):
    """An nn.Conv2d whose weight oneDNN reorders once per input shape, for small inputs."""

    _packed: torch.Tensor | None = None
    _packed_for: tuple = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _eager(x, self.weight) or x.shape[0] * x.shape[2] * x.shape[3] > SMALL_INPUT:
            return super().forward(x)
        key = (tuple(x.shape), self.weight.data_ptr(), self.weight._version)
        if self._packed_for != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups,
                list(x.shape))
            self._packed_for = key
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed, self.bias, list(self.padding),
                                                       list(self.stride), list(self.dilation), self.groups,
                                                       "none", [], "")


# Which taps of a 3×3 kernel row (or column) land on each of the two input rows an output pixel
# of phase 0 (even) or 1 (odd) sees after nearest ×2 upsampling: phase 0 sees input rows i-1
# (tap 0) and i (taps 1, 2); phase 1 sees rows i (taps 0, 1) and i+1 (tap 2).
_PHASE_TAPS = torch.tensor([[[1, 0, 0], [0, 1, 1]],
                            [[1, 1, 0], [0, 0, 1]]], dtype=torch.float64)
_PHASES = ((0, 0), (0, 1), (1, 0), (1, 1))


class PackedUpsample(Upsample):
    """:class:`~ipadapter_min.unet.Upsample` (nearest ×2, 3×3 convolution) as one 2×2
    convolution into the four output phases. A ``size`` other than twice the input (latents whose
    sides are not multiples of 8) upsamples, then convolves."""

    _phases: tuple = ((), None)  # (the weight's identity and version, its PackedConv2d): a cache, not a submodule

    def forward(self, x: torch.Tensor, size: torch.Size | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        if _eager(x, self.conv.weight) or (size is not None and tuple(size) != (2 * h, 2 * w)):
            return super().forward(x, size)
        y = self._phase_convolution()(x)  # (b, 4c, h + 1, w + 1): phase (a, b)'s pixel (i, j) at [i + a, j + b]
        out = x.new_empty(b, c, 2 * h, 2 * w)
        for p, (ra, cb) in enumerate(_PHASES):
            out[:, :, ra::2, cb::2] = y[:, p * c:(p + 1) * c, ra:ra + h, cb:cb + w]
        return out

    def _phase_convolution(self) -> PackedConv2d:
        weight = self.conv.weight
        key = (weight.data_ptr(), weight._version)
        if self._phases[0] != key:
            w = weight.detach().double()
            conv = PackedConv2d(w.shape[1], 4 * w.shape[0], 2, padding=1, device="meta")
            conv.weight = nn.Parameter(torch.cat([torch.einsum("rk,oikl,cl->oirc", _PHASE_TAPS[a], w, _PHASE_TAPS[b])
                                                  for a, b in _PHASES]).float(), requires_grad=False)
            conv.bias = nn.Parameter(self.conv.bias.detach().repeat(4), requires_grad=False)
            self._phases = (key, conv)
        return self._phases[1]


def _like(module: nn.Module, cls: type) -> nn.Module:
    """``module`` as an instance of its subclass ``cls``, sharing its parameters and submodules."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_parameters"] = dict(module._parameters)
    new.__dict__["_modules"] = dict(module._modules)
    return new


def pack_convolutions(model: nn.Module) -> int:
    """Make, in place, each Upsample of ``model`` a :class:`PackedUpsample` and each other plain
    nn.Conv2d with zero padding a :class:`PackedConv2d`, sharing their parameters; the number
    made. State-dict keys do not change. (StridedConv2d, the downsampling, keeps its own forward:
    its bf16 path works around a CPU bug.)"""
    made = 0
    for name, child in model.named_children():
        if type(child) is Upsample:
            setattr(model, name, _like(child, PackedUpsample))
            made += 1
            child = getattr(model, name)
        elif type(child) is nn.Conv2d and child.padding_mode == "zeros" and isinstance(child.padding, tuple):
            setattr(model, name, _like(child, PackedConv2d))
            made += 1
            continue
        made += pack_convolutions(child)
    return made
