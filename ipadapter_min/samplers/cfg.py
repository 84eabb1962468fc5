"""Classifier-free guidance: which rows of a UNet batch are conditional, decided in one place.

With guidance every sample goes through the UNet twice: with the prompt (a *conditional* row)
and with the negative prompt (an *unconditional* row). A row layout, ``rows[i]`` True where batch
row i is conditional, says which row is which. :func:`per_row` lays out by it whatever differs
between the two kinds: the text embeddings (``pipelines.text_to_image``) and an IP-Adapter's image keys and
values (``ip_adapter.ImagePromptAttention``), so the two cannot disagree.

:class:`CFGBatch` is the pipeline's layout, diffusers' order: all unconditional rows, then all
conditional ones. A runtime that batches otherwise (ComfyUI: conditional and unconditional rows
in separate UNet calls, or in either order) sets its own layout on the hook before each call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

Rows = tuple[bool, ...]


def as_rows(rows: Sequence[bool] | torch.Tensor) -> Rows:
    """A row layout as a tuple of bools. Integers are refused: runtimes disagree on whether 0
    means conditional (ComfyUI's ``cond_or_uncond``) or unconditional."""
    values = rows.tolist() if isinstance(rows, torch.Tensor) else list(rows)
    if not values or not all(isinstance(r, bool) for r in values):
        raise ValueError(f"a row layout is one bool per UNet batch row (True where conditional), got {values!r}")
    return tuple(values)


def per_row(rows: Rows, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
    """The batch for ``rows``: ``cond`` in every conditional row, ``uncond`` in every unconditional
    one (one item each, leading size 1; ``uncond`` may be None when no row is unconditional)."""
    if cond.shape[0] != 1 or (uncond is not None and uncond.shape != cond.shape):
        got = list(cond.shape) if uncond is None else f"{list(cond.shape)} and {list(uncond.shape)}"
        raise ValueError(f"expected one conditional and one unconditional item of the same shape "
                         f"(leading size 1), got {got}")
    if uncond is None and not all(rows):
        raise ValueError(f"the layout has {rows.count(False)} unconditional rows but no unconditional item was given")
    return torch.cat([cond if row else uncond for row in rows])


@dataclass(frozen=True)
class CFGBatch:
    """The pipeline's UNet batch for ``copies`` samples: ``copies`` unconditional rows, then
    ``copies`` conditional ones (diffusers' order, so the same seed gives the same image);
    only the conditional rows when not ``guided``."""

    copies: int
    guided: bool

    @property
    def rows(self) -> Rows:
        return (False,) * (self.copies if self.guided else 0) + (True,) * self.copies

    def per_row(self, cond: torch.Tensor, uncond: torch.Tensor | None = None) -> torch.Tensor:
        return per_row(self.rows, cond, uncond)

    def inputs(self, latents: torch.Tensor) -> torch.Tensor:
        """Each sample's latents in its rows."""
        return torch.cat([latents, latents]) if self.guided else latents

    def guide(self, eps: torch.Tensor, scale: float) -> torch.Tensor:
        """One noise prediction per sample: uncond + scale · (cond − uncond)."""
        if not self.guided:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + scale * (eps_cond - eps_uncond)
