"""Fused IP-Adapter decoupled cross-attention in Triton.

    out = softmax(Q K_tᵀ/√d) V_t + λ · softmax(Q K_iᵀ/√d) V_i

One program owns BLOCK_M query rows of one (batch, head). It loads those rows of Q once and
writes O once; in between:

- the text keys go through an online softmax in full BLOCK_NT-wide tiles with no key mask,
  then, if BLOCK_NT does not divide their number, one masked tail tile only as wide as the
  remainder needs (77 keys: 64 + a 16-wide tail, not two masked 64-wide tiles). The result,
  normalised (acc_t / l_t), becomes the output accumulator;
- image tokens that fit one BLOCK_NI tile (4 and 16 tokens, the common adapters) get one
  exact softmax over that tile, with no running max or rescaling; its normaliser and λ are
  folded into P, so P·V accumulates straight into the output: no second accumulator;
- more image tokens (257, the full-face adapter) get a second, independent online softmax with
  its own (m, l, acc) state, tiled like the text, added as λ·acc_i/l_i at the end.

Two normalizers, not one softmax over both key sets. Logits and accumulators are fp32; O has
q's dtype. fp32 inputs (IEEE dots on FMA units) keep every key tile masked in one loop and the
online image pass (``kernel_constants`` says why). ``_decoupled_attention_branches_kernel``
does the same for several image branches (adapters, masked images) in one pass.

Every tensor is addressed through its four strides, so the (B, L, H·d) projections the
UNet produces go in as ``x.view(B, L, H, d).transpose(1, 2)`` without a copy, and O is
allocated with q's memory layout (``torch.empty_like``), so the caller's
``out.transpose(1, 2).reshape(B, L, H·d)`` is free too.

Head dims that are not powers of two (SD1.5: 40, 80, 160) are padded to the next power of
two (64, 128, 256) inside the block and masked on load and store; the head dim is a
compile-time constant, so the mask is uniform over 8-element chunks and loads stay
vectorised. Every tl.dot dimension is ≥ 16 (the GPU rejects smaller ones; the interpreter
does not).

This module imports triton at import time; ``kernels.decoupled_attention`` imports it only
on first use. Importing it also registers the launchers as PyTorch operators for
torch.compile (``torch.ops.ipadapter_min.*``, at the end of the file). Nothing here touches
``triton.runtime.driver.active`` or autotuning, so it also runs under ``TRITON_INTERPRET=1`` on
CPU tensors (fp32 and fp16; bf16 is silently wrong in the interpreter).
"""
from __future__ import annotations

import functools
import math
import triton
import triton.language as tl
from dataclasses import dataclass
from typing import List, Optional

import torch

_LOG2E = 1.4426950408889634


@triton.jit
def _online_tile(
    q, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, start_n, length,
    offs_d, d_mask, qk_scale,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Fold keys [start_n, start_n + BLOCK_N) into an online-softmax state. Only a tile that
    runs past ``length`` is MASKED: full tiles load and exponentiate without a key mask."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < length
    # K is loaded transposed, [BLOCK_D, BLOCK_N]; V as [BLOCK_N, BLOCK_D].
    k_ptrs = k_base + offs_n[None, :] * stride_kl + offs_d[:, None]
    v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=d_mask[:, None] & n_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # log2 domain
    if MASKED:
        # The tile starts at a real key (start_n < length), so m_new is finite.
        s = tl.where(n_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit
def _online_softmax(
    q, k_base, v_base, stride_kl, stride_vl, length, offs_d, d_mask, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attention of q over ``length`` keys as (acc, l), unnormalised: full BLOCK_N tiles, then
    one masked TAIL_N tile (TAIL_N ≥ length % BLOCK_N) if BLOCK_N does not divide length.
    TAIL_N = 0: every tile masked, in one loop (fp32: see ``kernel_constants``)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TAIL_N == 0:
        for start_n in range(0, length, BLOCK_N):
            acc, m_i, l_i = _online_tile(q, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, start_n, length,
                                         offs_d, d_mask, qk_scale, BLOCK_N, True, DOT_PRECISION)
    else:
        full_end = length - length % BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _online_tile(q, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, start_n, length,
                                         offs_d, d_mask, qk_scale, BLOCK_N, False, DOT_PRECISION)
        if full_end < length:
            acc, m_i, l_i = _online_tile(q, acc, m_i, l_i, k_base, v_base, stride_kl, stride_vl, full_end, length,
                                         offs_d, d_mask, qk_scale, TAIL_N, True, DOT_PRECISION)
    return acc, l_i


@triton.jit
def _fold_one_tile(
    out, q, k_base, v_base, stride_kl, stride_vl, length, weight, offs_d, d_mask, qk_scale,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out + weight · softmax(q kᵀ) v for ``length`` ≤ BLOCK_N keys: one exact softmax over one
    tile (max, exp2, sum; nothing to rescale), with weight / l folded into P so that P·V
    accumulates into ``out`` itself. ``weight``: λ, or one weight per query row."""
    offs_n = tl.arange(0, BLOCK_N)
    n_mask = offs_n < length
    k = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None],
                mask=d_mask[:, None] & n_mask[None, :], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :],
                mask=n_mask[:, None] & d_mask[None, :], other=0.0)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(n_mask[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, 1)[:, None])
    p = p * (weight / tl.sum(p, 1))[:, None]
    return tl.dot(p.to(v.dtype), v, out, input_precision=DOT_PRECISION)


@triton.jit
def _decoupled_attention_kernel(
    Q, KT, VT, KI, VI, O, LAM,
    stride_qb, stride_qh, stride_ql,
    stride_ktb, stride_kth, stride_ktl,
    stride_vtb, stride_vth, stride_vtl,
    stride_kib, stride_kih, stride_kil,
    stride_vib, stride_vih, stride_vil,
    stride_ob, stride_oh, stride_ol,
    n_heads, len_q, len_t, len_i, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_NT: tl.constexpr, TAIL_NT: tl.constexpr, BLOCK_NI: tl.constexpr, TAIL_NI: tl.constexpr,
    IMAGE_ONE_TILE: tl.constexpr, ALIGN: tl.constexpr, LAM_IS_PTR: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One flat grid: query blocks fastest, then (batch, head); no 65535 limit on B·H.
    pid = tl.program_id(0)
    n_m_blocks = tl.cdiv(len_q, BLOCK_M)
    pid_m = pid % n_m_blocks
    pid_bh = pid // n_m_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)

    # ALIGN divides every row/head/batch stride (checked on the host): tells the compiler
    # that each row starts ALIGN-element aligned (d = 40 in a (B, L, H·d) layout has an
    # 80-byte head stride that it could not otherwise prove 16-byte aligned).
    q_base = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ALIGN)
    kt_base = KT + tl.multiple_of(b * stride_ktb + h * stride_kth, ALIGN)
    vt_base = VT + tl.multiple_of(b * stride_vtb + h * stride_vth, ALIGN)
    ki_base = KI + tl.multiple_of(b * stride_kib + h * stride_kih, ALIGN)
    vi_base = VI + tl.multiple_of(b * stride_vib + h * stride_vih, ALIGN)
    o_base = O + tl.multiple_of(b * stride_ob + h * stride_oh, ALIGN)
    stride_ql = tl.multiple_of(stride_ql, ALIGN)
    stride_ol = tl.multiple_of(stride_ol, ALIGN)
    stride_ktl = tl.multiple_of(stride_ktl, ALIGN)
    stride_vtl = tl.multiple_of(stride_vtl, ALIGN)
    stride_kil = tl.multiple_of(stride_kil, ALIGN)
    stride_vil = tl.multiple_of(stride_vil, ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < HEAD_DIM
    qo_mask = m_mask[:, None] & d_mask[None, :]

    # Q is read once and serves both branches. Rows past len_q load zeros: they stay finite
    # (uniform softmax) and are never stored.
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=qo_mask, other=0.0)

    acc_t, l_t = _online_softmax(q, kt_base, vt_base, stride_ktl, stride_vtl, len_t, offs_d, d_mask, qk_scale,
                                 BLOCK_M, BLOCK_D, BLOCK_NT, TAIL_NT, DOT_PRECISION)
    if LAM_IS_PTR:
        lam = tl.load(LAM).to(tl.float32)
    else:
        lam = LAM
    if IMAGE_ONE_TILE:
        out = _fold_one_tile(acc_t * (1.0 / l_t)[:, None], q, ki_base, vi_base, stride_kil, stride_vil, len_i, lam,
                             offs_d, d_mask, qk_scale, BLOCK_NI, DOT_PRECISION)
    else:
        acc_i, l_i = _online_softmax(q, ki_base, vi_base, stride_kil, stride_vil, len_i, offs_d, d_mask, qk_scale,
                                     BLOCK_M, BLOCK_D, BLOCK_NI, TAIL_NI, DOT_PRECISION)
        out = acc_t * (1.0 / l_t)[:, None] + acc_i * (lam / l_i)[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=qo_mask)


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters. Chosen per head dim and grid size, not autotuned (see
    ``default_config``). The tail tiles and the image path follow from these and the key counts."""

    block_m: int
    block_n_text: int
    block_n_image: int
    num_warps: int
    num_stages: int


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())  # triton.next_power_of_2, without its µs of wrapping


def tail_width(block_n: int, *lengths: int) -> int:
    """Width of the masked tail tile after the full ``block_n``-wide key tiles: the largest
    remainder rounded up to a power of two ≥ 16 (tl.dot's least). Unused where block_n divides
    every length."""
    return _pow2_at_least_16(max(n % block_n for n in lengths))


# (BLOCK_M, largest key block, num_warps, num_stages) per padded head dim. Half-precision
# dots run on tensor cores: during the 257-token image pass two fp32 BLOCK_M × BLOCK_D
# accumulators are live (the output and the image's), so the query block shrinks as the head
# dim grows. fp32 dots are IEEE ("ieee"), which Triton lowers to FMA loops with far more live
# registers: smaller tiles, one stage. Each entry, and each smaller BLOCK_M that
# ``default_config`` picks for small grids, compiles for sm_80, sm_86 and sm_90 within the
# arch's shared memory and without register spills (fp32: a word at most); tests/test_kernel.py
# checks this ahead of time (tests/gpu_compile.py).
_HALF_CONFIGS = {64: (128, 64, 8, 2), 128: (64, 64, 4, 2), 256: (64, 32, 8, 2)}
_FP32_CONFIGS = {64: (64, 32, 8, 1), 128: (32, 16, 8, 1), 256: (16, 16, 8, 1)}

# Programs a grid should have to fill a GPU: two per SM of an H100 SXM (132 SMs). The smaller
# SD1.5 layers (Lq 1024, 256, 64 with 16 batch·heads) have fewer at the tables' BLOCK_M.
MIN_PROGRAMS = 2 * 132


@functools.cache
def default_config(head_dim: int, len_t: int, len_i: int, dtype: torch.dtype = torch.float16,
                   len_q: int = 0, batch_heads: int = 0) -> KernelConfig:
    """Block sizes per dtype and padded head dim (tables above), BLOCK_M shrunk for small grids.

    Given len_q and batch·heads, BLOCK_M halves (not below 16, nor above what len_q needs)
    while the grid has fewer than MIN_PROGRAMS programs, and the warps shrink with it (not
    below 4): Lq 1024 at d 80 gets 32-row blocks, Lq 256 and 64 at d 160 16-row ones. Key
    blocks are as small as the key count allows (≥ 16 for tl.dot): 4 or 16 image tokens use one
    16-wide block, not a mostly masked 64-wide one. Reasoned and compile-checked, not timed;
    re-tune with ``python -m ipadapter_min.benchmarks.attention --tune`` on a GPU. Cached: it runs on every
    call, and working it out costs more host time than an SD1.5 layer's kernel runs.
    """
    block_d = max(64, _pow2_at_least_16(head_dim))
    table = _FP32_CONFIGS if dtype == torch.float32 else _HALF_CONFIGS
    table_m, cap_n, warps, stages = table[block_d]
    block_m = table_m
    if len_q:
        block_m = min(block_m, _pow2_at_least_16(len_q))
        while block_m > 16 and -(-len_q // block_m) * batch_heads < MIN_PROGRAMS:
            block_m //= 2
        warps = max(4, warps * block_m // table_m) if block_m < table_m else warps
    return KernelConfig(
        block_m=block_m,
        block_n_text=min(cap_n, _pow2_at_least_16(len_t)),
        block_n_image=min(cap_n, _pow2_at_least_16(len_i)),
        num_warps=warps,
        num_stages=stages,
    )


def _alignment(tensors, element_size: int) -> int:
    """Largest ALIGN (a power of two, at most 16 bytes' worth of elements) such that ALIGN
    elements divide every base address and every batch/head/row stride of ``tensors``
    (strides of size-1 dims are never multiplied by anything but 0, so they do not count).
    In bytes that is the lowest set bit of all of them OR-ed together: one pass, no trials,
    unrolled, since it runs on every launch."""
    ptrs = strides = 0
    for t in tensors:
        ptrs |= t.data_ptr()
        (s0, s1, s2, _), (n0, n1, n2, _) = t.stride(), t.shape
        if n0 > 1:
            strides |= s0
        if n1 > 1:
            strides |= s1
        if n2 > 1:
            strides |= s2
    bits = ptrs | strides * element_size  # element_size is a power of two: OR commutes with the shift
    most = max(1, 16 // element_size)
    return max(1, min(most, (bits & -bits) // element_size)) if bits else most


MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_inputs(q, k_text, v_text, k_image, v_image) -> None:
    """Raise ValueError unless the five tensors can go to the kernel."""
    ts = (q, k_text, v_text, k_image, v_image)
    names = ("q", "k_text", "v_text", "k_image", "v_image")
    for name, t in zip(names, ts):
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, length, head_dim), got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} is {t.dtype}, q is {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
        if t.stride(3) != 1:
            raise ValueError(f"{name} must be contiguous along head_dim (stride {t.stride(3)})")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {q.dtype} not supported (fp16, bf16, fp32)")
    B, H, _, D = q.shape
    if not 0 < D <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim {D} outside 1..{MAX_HEAD_DIM}")
    for name, t in zip(names[1:], ts[1:]):
        if t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(f"{name} {tuple(t.shape)} does not match q {tuple(q.shape)}")
    if k_text.shape[2] != v_text.shape[2] or k_image.shape[2] != v_image.shape[2]:
        raise ValueError("keys and values must have the same length")
    if k_text.shape[2] == 0 or k_image.shape[2] == 0:
        raise ValueError("the kernel needs at least one text and one image token")


def _output_like(q: torch.Tensor) -> torch.Tensor:
    """O with q's memory layout: for q = x.view(B, L, H, d).transpose(1, 2) the result is
    (B, L, H·d)-contiguous underneath, so the caller's reshape back is free."""
    out = torch.empty_like(q)
    return out if out.stride(3) == 1 else torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _row_strides(*tensors: torch.Tensor) -> list[int]:
    """The batch, head and row strides of each tensor, in the kernels' argument order."""
    return [s for t in tensors for s in t.stride()[:3]]


def _grid_len_q(q: torch.Tensor) -> int:
    """len_q for ``default_config`` to size the grid by, on a GPU; 0 (the table's blocks) for CPU
    tensors: the interpreter has no SMs to fill and runs one program at a time, so the bigger
    blocks are faster there (2-3x, the kernel tests)."""
    return q.shape[2] if q.is_cuda else 0


def _launch(kernel, grid, q: torch.Tensor, args: tuple, kwargs: dict) -> None:
    if q.is_cuda:
        with torch.cuda.device(q.device):
            kernel[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision dots (SDPA's fp32 accuracy), not tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def kernel_constants(cfg: KernelConfig, head_dim: int, len_t: int, image_lengths: tuple[int, ...],
                     dtype: torch.dtype) -> dict:
    """Both kernels' compile-time constants but ALIGN and LAM_IS_PTR: the block sizes, the tail
    tiles' widths and the image path (one exact tile where every branch of ``image_lengths``
    fits one). One place for the launchers, tests/gpu_compile.py and benchmarks/kernel_work.py.
    Cached, as ``default_config`` is; callers copy the dict, never change it.

    fp32 keeps every key tile masked in one loop and the two-state image pass (TAIL 0, no
    one-tile fold): its IEEE dots become FMA loops, and with a tail tile or the fold those
    spilled 0.2–2 KB per thread on sm_80–90 (tests/gpu_compile.py; seemingly a second dot on q
    outside the key loop keeps q's operand copy live across it)."""
    split = dtype != torch.float32
    return dict(HEAD_DIM=head_dim, BLOCK_D=_pow2_at_least_16(head_dim), BLOCK_M=cfg.block_m,
                BLOCK_NT=cfg.block_n_text, TAIL_NT=tail_width(cfg.block_n_text, len_t) if split else 0,
                BLOCK_NI=cfg.block_n_image, TAIL_NI=tail_width(cfg.block_n_image, *image_lengths) if split else 0,
                IMAGE_ONE_TILE=split and max(image_lengths) <= cfg.block_n_image,
                DOT_PRECISION=_dot_precision(dtype))


def decoupled_attention_triton(q, k_text, v_text, k_image, v_image, scale=1.0,
                               config: KernelConfig | None = None) -> torch.Tensor:
    """Launch the fused kernel. Any device Triton can run on (CUDA, or CPU tensors under
    TRITON_INTERPRET=1). ``scale`` is λ: a Python number or a 0-dim tensor (read on the
    device, no host sync). No autograd."""
    check_inputs(q, k_text, v_text, k_image, v_image)
    return launch(q, k_text, v_text, k_image, v_image, scale, config)


def launch(q, k_text, v_text, k_image, v_image, scale=1.0, config: KernelConfig | None = None) -> torch.Tensor:
    """:func:`decoupled_attention_triton` without :func:`check_inputs`, for a caller that has
    checked as much already (``kernels.decoupled_attention``'s dispatch): the checks cost host
    time on every call, more than an SD1.5 layer's kernel runs."""
    B, H, Lq, D = q.shape
    Lt, Li = k_text.shape[2], k_image.shape[2]
    cfg = config or default_config(D, Lt, Li, q.dtype, _grid_len_q(q), B * H)

    out = _output_like(q)
    if Lq == 0 or B * H == 0:
        return out

    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"scale must be a number or a 0-dim tensor, got shape {tuple(scale.shape)}")
        lam = scale.reshape(()).to(device=q.device, dtype=torch.float32)
        lam_is_ptr = True
    else:
        lam = float(scale)  # a Python int 1 would be specialised as a constant: keep it float
        lam_is_ptr = False

    tensors = (q, k_text, v_text, k_image, v_image, out)
    align = _alignment(tensors, q.element_size())
    grid = ((Lq + cfg.block_m - 1) // cfg.block_m * B * H,)
    args = (*tensors, lam, *_row_strides(*tensors), H, Lq, Lt, Li, _LOG2E / math.sqrt(D))
    kwargs = dict(kernel_constants(cfg, D, Lt, (Li,), q.dtype), ALIGN=align, LAM_IS_PTR=lam_is_ptr,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _launch(_decoupled_attention_kernel, grid, q, args, kwargs)
    return out


@triton.jit
def _decoupled_attention_branches_kernel(
    Q, KT, VT, KI, VI, O, LAMS, STARTS, MASKS,
    stride_qb, stride_qh, stride_ql,
    stride_ktb, stride_kth, stride_ktl,
    stride_vtb, stride_vth, stride_vtl,
    stride_kib, stride_kih, stride_kil,
    stride_vib, stride_vih, stride_vil,
    stride_ob, stride_oh, stride_ol,
    n_heads, len_q, len_t, n_branches, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_NT: tl.constexpr, TAIL_NT: tl.constexpr, BLOCK_NI: tl.constexpr, TAIL_NI: tl.constexpr,
    IMAGE_ONE_TILE: tl.constexpr, ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The text as in ``_decoupled_attention_kernel``, then each image branch over its own key
    range [STARTS[b], STARTS[b+1]) of the concatenated image keys, weighted by LAMS[b] times its
    per-query mask MASKS[b, q]: folded as one exact tile where every branch fits one
    (IMAGE_ONE_TILE), else an online softmax per branch. Q read once, O written once."""
    pid = tl.program_id(0)
    n_m_blocks = tl.cdiv(len_q, BLOCK_M)
    pid_m = pid % n_m_blocks
    pid_bh = pid // n_m_blocks
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    # ALIGN as in _decoupled_attention_kernel.
    q_base = Q + tl.multiple_of(b * stride_qb + h * stride_qh, ALIGN)
    kt_base = KT + tl.multiple_of(b * stride_ktb + h * stride_kth, ALIGN)
    vt_base = VT + tl.multiple_of(b * stride_vtb + h * stride_vth, ALIGN)
    ki_base = KI + tl.multiple_of(b * stride_kib + h * stride_kih, ALIGN)
    vi_base = VI + tl.multiple_of(b * stride_vib + h * stride_vih, ALIGN)
    o_base = O + tl.multiple_of(b * stride_ob + h * stride_oh, ALIGN)
    stride_ql = tl.multiple_of(stride_ql, ALIGN)
    stride_ol = tl.multiple_of(stride_ol, ALIGN)
    stride_ktl = tl.multiple_of(stride_ktl, ALIGN)
    stride_vtl = tl.multiple_of(stride_vtl, ALIGN)
    stride_kil = tl.multiple_of(stride_kil, ALIGN)
    stride_vil = tl.multiple_of(stride_vil, ALIGN)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < len_q
    d_mask = offs_d < HEAD_DIM
    qo_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d[None, :], mask=qo_mask, other=0.0)

    acc_t, l_t = _online_softmax(q, kt_base, vt_base, stride_ktl, stride_vtl, len_t, offs_d, d_mask, qk_scale,
                                 BLOCK_M, BLOCK_D, BLOCK_NT, TAIL_NT, DOT_PRECISION)
    out = acc_t * (1.0 / l_t)[:, None]

    for branch in range(n_branches):
        start = tl.load(STARTS + branch)
        length = tl.load(STARTS + branch + 1) - start
        k_base = ki_base + start * stride_kil
        v_base = vi_base + start * stride_vil
        weight = tl.load(LAMS + branch) * tl.load(MASKS + branch * len_q + offs_m, mask=m_mask, other=0.0)
        if IMAGE_ONE_TILE:
            out = _fold_one_tile(out, q, k_base, v_base, stride_kil, stride_vil, length, weight, offs_d, d_mask,
                                 qk_scale, BLOCK_NI, DOT_PRECISION)
        else:
            acc_i, l_i = _online_softmax(q, k_base, v_base, stride_kil, stride_vil, length, offs_d, d_mask,
                                         qk_scale, BLOCK_M, BLOCK_D, BLOCK_NI, TAIL_NI, DOT_PRECISION)
            out += acc_i * (weight / l_i)[:, None]
    tl.store(o_base + offs_m[:, None] * stride_ol + offs_d[None, :], out.to(O.dtype.element_ty), mask=qo_mask)


def decoupled_attention_branches_triton(q, k_text, v_text, branches, config: KernelConfig | None = None
                                        ) -> torch.Tensor:
    """Several image branches in one launch: ``branches`` is a list of (k, v, scale, mask), k/v
    (batch, heads, tokens, head_dim) like the text's, ``scale`` a number, ``mask`` None or one
    weight per query position (len_q values). Any device Triton runs on; no autograd."""
    if not branches:
        raise ValueError("no image branches given")
    for k, v, _, _ in branches:
        check_inputs(q, k_text, v_text, k, v)
    B, H, Lq, D = q.shape
    Lt = k_text.shape[2]
    k_image = torch.cat([k for k, _, _, _ in branches], dim=2).contiguous()
    v_image = torch.cat([v for _, v, _, _ in branches], dim=2).contiguous()
    lengths = [k.shape[2] for k, _, _, _ in branches]
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=q.device)
    lams = torch.tensor([float(s) for _, _, s, _ in branches], dtype=torch.float32, device=q.device)
    masks = torch.stack([torch.ones(Lq, device=q.device) if m is None else m.reshape(Lq).float().to(q.device)
                         for _, _, _, m in branches]).contiguous()
    cfg = config or default_config(D, Lt, max(lengths), q.dtype, _grid_len_q(q), B * H)
    out = _output_like(q)
    if Lq == 0 or B * H == 0:
        return out
    tensors = (q, k_text, v_text, k_image, v_image, out)
    grid = (triton.cdiv(Lq, cfg.block_m) * B * H,)
    args = (*tensors, lams, starts, masks, *_row_strides(*tensors), H, Lq, Lt, len(branches), _LOG2E / math.sqrt(D))
    kwargs = dict(kernel_constants(cfg, D, Lt, tuple(lengths), q.dtype), ALIGN=_alignment(tensors, q.element_size()),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _launch(_decoupled_attention_branches_kernel, grid, q, args, kwargs)
    return out


# ----------------------------------------------------------------------------------------------
# The launchers as PyTorch operators, for torch.compile: dynamo cannot trace a launcher (it
# reads data_ptr(), builds Triton's arguments), so a compiled graph holds one opaque node per
# call instead, and FakeTensor tracing gets the output from the fake implementation: q's shape,
# dtype and memory layout, what ``_output_like`` gives the real one. One operator per form of
# λ (an operator's schema has one type per argument): a float, or a 0-dim tensor read on the
# device. Eager calls (``kernels.decoupled_attention``) launch directly and skip the
# dispatcher's round trip, which costs more host time than the kernel runs.


@torch.library.custom_op("ipadapter_min::decoupled_attention", mutates_args=())
def decoupled_attention_op(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor, k_image: torch.Tensor,
                           v_image: torch.Tensor, scale: float) -> torch.Tensor:
    return decoupled_attention_triton(q, k_text, v_text, k_image, v_image, scale)


@torch.library.custom_op("ipadapter_min::decoupled_attention_tensor_scale", mutates_args=())
def decoupled_attention_tensor_scale_op(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                                        k_image: torch.Tensor, v_image: torch.Tensor,
                                        scale: torch.Tensor) -> torch.Tensor:
    return decoupled_attention_triton(q, k_text, v_text, k_image, v_image, scale)


@torch.library.custom_op("ipadapter_min::decoupled_attention_branches", mutates_args=())
def decoupled_attention_branches_op(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                                    k_images: List[torch.Tensor], v_images: List[torch.Tensor], scales: List[float],
                                    masks: List[Optional[torch.Tensor]]) -> torch.Tensor:
    """:func:`decoupled_attention_branches_triton` with the branches as four parallel lists. (typing's
    List and Optional: torch 2.6 infers no operator schema from ``list[...]`` or ``X | None``.)"""
    return decoupled_attention_branches_triton(q, k_text, v_text, list(zip(k_images, v_images, scales, masks)))


def _fake_output(q: torch.Tensor, *args) -> torch.Tensor:
    return _output_like(q)


for _op in (decoupled_attention_op, decoupled_attention_tensor_scale_op, decoupled_attention_branches_op):
    _op.register_fake(_fake_output)
