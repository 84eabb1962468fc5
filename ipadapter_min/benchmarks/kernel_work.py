"""Issued vs useful work of the fused kernel at SD1.5's cross-attention shapes, on paper.

    python -m ipadapter_min.benchmarks.kernel_work         # a table
    python -m ipadapter_min.benchmarks.kernel_work --json  # the same rows as JSON

No GPU and no timing: what a kernel issues follows from its block sizes and the tiles each
program works through. Per shape (512², CFG batch 2, 8 heads, 77 text tokens; Lq/d 4096/40,
1024/80, 256/160, 64/160) × image tokens (4, 16, 257), fp16, for the kernel before v2 (git
d608ad0) and for today's:

  programs   the launch grid: ⌈Lq / BLOCK_M⌉ · batch · heads (132 SMs on an H100)
  MMA        FLOPs of Q·Kᵀ and P·V as issued, 4·BLOCK_M·BLOCK_D·width per key tile and
             program (padded head dim, key tile widths, query rows), against the useful
             4·Lq·d·(Lt + Li) per (batch, head)
  exp2       exponentials as issued, BLOCK_M per key of a tile plus BLOCK_M per online-softmax
             step (the rescale α), against the useful Lq·(Lt + Li) per (batch, head)

Today's tile plan comes from the kernel module's own ``default_config`` and
``kernel_constants`` (what the launcher passes), so it cannot drift from the kernel; the old one
is written out below as it was.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from ..kernels import triton_decoupled_attention as kernel
from .attention import BATCH, IMAGE_TOKENS, SD15_CROSS_ATTENTION_LAYERS, TEXT_TOKENS

# (len_q, heads, head_dim) → how many of the UNet's 16 cross-attention layers have it
LAYERS: dict[tuple[int, int, int], int] = {}
for _, _lq, _heads, _d in SD15_CROSS_ATTENTION_LAYERS:
    LAYERS[_lq, _heads, _d] = LAYERS.get((_lq, _heads, _d), 0) + 1


@dataclass(frozen=True)
class Tile:
    width: int  # keys the tile holds, padding included
    online: bool  # an online-softmax step (one more exp2 per row, α); False: the exact one-tile fold


@dataclass(frozen=True)
class Plan:
    block_m: int
    block_d: int
    text: tuple[Tile, ...]
    image: tuple[Tile, ...]


def _pow2_at_least(n: int, least: int) -> int:
    return max(least, 1 << (n - 1).bit_length())


# The kernel at d608ad0: (BLOCK_M, largest key block, warps, stages) per padded head dim, every
# key tile masked and an online-softmax step, text and image alike.
OLD_HALF_CONFIGS = {64: (128, 64, 8, 2), 128: (64, 64, 4, 2), 256: (64, 32, 8, 2)}


def old_plan(len_q: int, batch_heads: int, head_dim: int, len_t: int, len_i: int) -> Plan:
    block_d = _pow2_at_least(head_dim, 16)
    block_m, cap_n, _, _ = OLD_HALF_CONFIGS[max(64, block_d)]
    block_nt, block_ni = min(cap_n, _pow2_at_least(len_t, 16)), min(cap_n, _pow2_at_least(len_i, 16))
    return Plan(block_m, block_d, (Tile(block_nt, True),) * -(-len_t // block_nt),
                (Tile(block_ni, True),) * -(-len_i // block_ni))


def _online_tiles(length: int, block_n: int, tail_n: int) -> tuple[Tile, ...]:
    """The kernel's ``_online_softmax``: full block_n tiles and, if block_n does not divide
    length, a tail_n-wide tail (tail_n 0: every tile block_n wide, masked)."""
    if not tail_n:
        return (Tile(block_n, True),) * -(-length // block_n)
    return (Tile(block_n, True),) * (length // block_n) + ((Tile(tail_n, True),) if length % block_n else ())


def v2_plan(len_q: int, batch_heads: int, head_dim: int, len_t: int, len_i: int) -> Plan:
    """Today's kernel, from the constants its launcher passes for this shape in fp16."""
    cfg = kernel.default_config(head_dim, len_t, len_i, torch.float16, len_q, batch_heads)
    c = kernel.kernel_constants(cfg, head_dim, len_t, (len_i,), torch.float16)
    image = ((Tile(c["BLOCK_NI"], False),) if c["IMAGE_ONE_TILE"]
             else _online_tiles(len_i, c["BLOCK_NI"], c["TAIL_NI"]))
    return Plan(c["BLOCK_M"], c["BLOCK_D"], _online_tiles(len_t, c["BLOCK_NT"], c["TAIL_NT"]), image)


PLANS = {"d608ad0": old_plan, "v2": v2_plan}


def _describe(tiles: tuple[Tile, ...]) -> str:
    widths = [t.width for t in tiles]
    full = [w for w in widths if w == widths[0]]
    text = f"{len(full)}×{widths[0]}" if len(full) > 1 else str(widths[0])
    text += "".join(f"+{w}" for w in widths[len(full):])
    return text + ("" if tiles[0].online else " exact")


def work(kernel_name: str, len_q: int, heads: int, head_dim: int, len_i: int,
         len_t: int = TEXT_TOKENS, batch: int = BATCH) -> dict:
    """One row: the plan, and MMA FLOPs and exp2 issued and useful, over the whole launch."""
    batch_heads = batch * heads
    plan = PLANS[kernel_name](len_q, batch_heads, head_dim, len_t, len_i)
    tiles = plan.text + plan.image
    programs = -(-len_q // plan.block_m) * batch_heads
    mma = programs * sum(4 * plan.block_m * plan.block_d * t.width for t in tiles)
    exp2 = programs * sum(plan.block_m * (t.width + t.online) for t in tiles)
    useful_mma = batch_heads * 4 * len_q * head_dim * (len_t + len_i)
    useful_exp2 = batch_heads * len_q * (len_t + len_i)
    return dict(kernel=kernel_name, len_q=len_q, head_dim=head_dim, image_tokens=len_i, text_tokens=len_t,
                batch_heads=batch_heads, layers=LAYERS.get((len_q, heads, head_dim), 0), block_m=plan.block_m,
                block_d=plan.block_d, text_tiles=_describe(plan.text), image_tiles=_describe(plan.image),
                programs=programs, mma_flops=mma, useful_mma_flops=useful_mma, exp2=exp2, useful_exp2=useful_exp2)


def rows() -> list[dict]:
    return [work(name, lq, heads, d, li) for (lq, heads, d) in LAYERS for li in IMAGE_TOKENS for name in PLANS]


def per_unet_call(table: list[dict]) -> list[dict]:
    """Useful fractions over the 16 layers of one UNet call, per kernel and image-token count."""
    totals = []
    for name in PLANS:
        for li in IMAGE_TOKENS:
            rs = [r for r in table if r["kernel"] == name and r["image_tokens"] == li]
            total = {k: sum(r["layers"] * r[k] for r in rs)
                     for k in ("mma_flops", "useful_mma_flops", "exp2", "useful_exp2")}
            totals.append(dict(kernel=name, image_tokens=li, **total))
    return totals


def _pct(useful: int, issued: int) -> str:
    return f"{100 * useful / issued:.0f}%"


def format_table(table: list[dict]) -> str:
    lines = ["Lq/d      img  kernel   programs  BLOCK_M  text tiles  image tiles     MMA GFLOP issued/useful"
             "   exp2 M issued/useful"]
    for r in table:
        lines.append(
            f"{r['len_q']:>4}/{r['head_dim']:<4} {r['image_tokens']:>4}  {r['kernel']:<8} {r['programs']:>8}  "
            f"{r['block_m']:>7}  {r['text_tiles']:<10}  {r['image_tiles']:<14}  "
            f"{r['mma_flops'] / 1e9:7.3f}/{r['useful_mma_flops'] / 1e9:6.3f} "
            f"{_pct(r['useful_mma_flops'], r['mma_flops']):>4}   "
            f"{r['exp2'] / 1e6:6.2f}/{r['useful_exp2'] / 1e6:5.2f} {_pct(r['useful_exp2'], r['exp2']):>4}")
    lines.append("tiles: key-tile widths, each an online-softmax step; 'exact': the one-tile image fold")
    lines.append("")
    lines.append("One UNet call (16 layers), useful share of MMA / exp2:")
    for t in per_unet_call(table):
        lines.append(f"  {t['kernel']:<8} {t['image_tokens']:>3} image tokens: "
                     f"{_pct(t['useful_mma_flops'], t['mma_flops'])} / {_pct(t['useful_exp2'], t['exp2'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows and per-UNet totals as JSON")
    args = parser.parse_args(argv)
    table = rows()
    if args.json:
        print(json.dumps(dict(rows=table, per_unet_call=per_unet_call(table)), indent=1))
    else:
        print(format_table(table))


if __name__ == "__main__":
    main()
