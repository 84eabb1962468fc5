"""IP-Adapter decoupled cross-attention: the public entry point and its dispatch.

    out = softmax(Q K_tᵀ/√d) V_t + λ · softmax(Q K_iᵀ/√d) V_i        (paper, eq. 5)

Two separate softmaxes, one over the text tokens and one over the image tokens, summed with
weight λ. (One softmax over the concatenated tokens is a different method.)

Importing this module does not import triton: the fused kernel lives in
``kernels.triton_decoupled_attention`` and is imported on first CUDA use (or first direct
call of :func:`decoupled_attention_triton`).
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

Scale = Union[float, int, torch.Tensor]

_triton_module = None  # the imported kernels.triton_decoupled_attention, once needed
_triton_import_error: Exception | None = None


def _triton():
    """Import the Triton kernel module on first use; None where triton cannot be imported."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from kernels import triton_decoupled_attention
        except Exception as e:  # no triton wheel (Windows, macOS), or a broken install
            _triton_import_error = e
        else:
            _triton_module = triton_decoupled_attention
    return _triton_module


def decoupled_attention_reference(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                                  k_image: torch.Tensor, v_image: torch.Tensor,
                                  scale: Scale = 1.0) -> torch.Tensor:
    """``sdpa(q, k_t, v_t) + scale * sdpa(q, k_i, v_i)``: two SDPA calls, a scale, an add.

    The op order of diffusers' IPAdapterAttnProcessor2_0 (``hidden_states = hidden_states +
    scale * ip_hidden_states``), so on the same device and dtype it gives diffusers' numbers.
    Differentiable; any device and dtype SDPA takes.
    """
    out = F.scaled_dot_product_attention(q, k_text, v_text)
    return out + scale * F.scaled_dot_product_attention(q, k_image, v_image)


def decoupled_attention_triton(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                               k_image: torch.Tensor, v_image: torch.Tensor,
                               scale: Scale = 1.0, config=None) -> torch.Tensor:
    """The fused Triton kernel, whatever the device: CUDA tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` was set before triton was first imported (tests do this).

    Reads Q once and writes O once. fp16, bf16 (GPU only: the interpreter gets bf16 wrong)
    and fp32; head_dim ≤ 256; all five tensors (batch, heads, length, head_dim) with the
    same batch, heads and head_dim, any strides as long as head_dim is contiguous; at least
    one text and one image token. The result has q's dtype and q's memory layout. No
    autograd. ``config`` (a ``KernelConfig``) overrides the per-head-dim block sizes.
    """
    mod = _triton()
    if mod is None:
        raise RuntimeError(f"triton is not importable: {_triton_import_error!r}")
    return mod.decoupled_attention_triton(q, k_text, v_text, k_image, v_image, scale, config=config)


def _fused_kernel_applies(q, k_text, v_text, k_image, v_image, scale) -> bool:
    """CUDA on sm_80 or newer, kernel-supported shapes/dtypes, no gradient needed, triton importable."""
    ts = (q, k_text, v_text, k_image, v_image)
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            return False
        ts_grad = ts + (scale,)
    else:
        ts_grad = ts
    if not all(t.is_cuda and t.device == q.device and t.dtype == q.dtype and t.dim() == 4 for t in ts):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return False  # block sizes compile-checked for sm_80/86/90; older GPUs (T4, V100) use SDPA
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts_grad):
        return False  # the kernel has no backward; training goes through SDPA
    B, H, _, D = q.shape
    if not 0 < D <= 256:
        return False
    if any(t.shape[0] != B or t.shape[1] != H or t.shape[3] != D or t.stride(3) != 1 for t in ts):
        return False  # broadcasting, Ev != E, or a strided head dim: SDPA handles these
    if k_text.shape[2] == 0 or k_text.shape[2] != v_text.shape[2] or k_image.shape[2] != v_image.shape[2]:
        return False
    return _triton() is not None


def decoupled_attention(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                        k_image: torch.Tensor | None = None, v_image: torch.Tensor | None = None,
                        scale: Scale = 1.0) -> torch.Tensor:
    """IP-Adapter decoupled attention ``softmax(QK_tᵀ/√d)V_t + scale·softmax(QK_iᵀ/√d)V_i``.

    Args:
        q: queries, (batch, heads, len_q, head_dim).
        k_text, v_text: text keys and values, (batch, heads, len_text, head_dim).
        k_image, v_image: image-prompt keys and values, (batch, heads, len_image, head_dim),
            or None for plain attention (no adapter). Several reference images are passed
            as their tokens concatenated along len_image (one softmax over all of them, as
            diffusers does).
        scale: λ, the image branch's weight: a Python number or a 0-dim tensor (a tensor
            is read on the device: no host sync, fine under CUDA graphs).

    Returns:
        (batch, heads, len_q, head_dim) in q's dtype.

    Dispatch, in this order:
      * no image tokens (``k_image`` None or of length 0), or ``scale`` the Python number 0:
        exactly ``F.scaled_dot_product_attention(q, k_text, v_text)`` on every device, so
        no adapter, and λ = 0, give the base model's bits. (A 0-dim tensor λ is not
        inspected — that would sync — and takes the paths below.)
      * CUDA tensors on an sm_80+ GPU (A100, RTX 30xx/40xx, H100, …) that the kernel
        supports, with no gradient needed: the fused Triton kernel
        (one read of Q, one write of O; the result keeps q's memory layout).
      * anything else — CPU, autograd, unsupported dtype / shape / broadcasting:
        :func:`decoupled_attention_reference`, ``sdpa + scale * sdpa`` in diffusers' order.
    """
    if k_image is None or k_image.shape[-2] == 0:
        if v_image is not None and k_image is not None and v_image.shape[-2] != 0:
            raise ValueError("v_image has tokens but k_image has none")
        return F.scaled_dot_product_attention(q, k_text, v_text)
    if v_image is None:
        raise ValueError("k_image given without v_image")
    if not isinstance(scale, torch.Tensor) and scale == 0:
        return F.scaled_dot_product_attention(q, k_text, v_text)
    if _fused_kernel_applies(q, k_text, v_text, k_image, v_image, scale):
        return _triton_module.decoupled_attention_triton(q, k_text, v_text, k_image, v_image, scale)
    return decoupled_attention_reference(q, k_text, v_text, k_image, v_image, scale)


Branch = tuple  # (k_image, v_image, scale, mask): mask None or one weight per query position


def decoupled_attention_branches_reference(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                                           branches: list[Branch]) -> torch.Tensor:
    """``sdpa(q, k_t, v_t) + Σ_b scale_b · (sdpa(q, k_b, v_b) · mask_b)``, one branch at a time in
    diffusers' op order (its IP-Adapter processor adds each adapter, and each masked image, in
    turn). A mask is (len_q, 1) or broadcastable to the output."""
    out = F.scaled_dot_product_attention(q, k_text, v_text)
    for k, v, scale, mask in branches:
        term = F.scaled_dot_product_attention(q, k, v)
        out = out + scale * (term if mask is None else term * mask)
    return out


def decoupled_attention_branches(q: torch.Tensor, k_text: torch.Tensor, v_text: torch.Tensor,
                                 branches: list[Branch]) -> torch.Tensor:
    """Decoupled attention with several image branches (several adapters, or the masked images
    of one): the fused kernel, one launch, on an sm_80+ GPU where every branch is supported;
    :func:`decoupled_attention_branches_reference` elsewhere."""
    if not branches:
        return F.scaled_dot_product_attention(q, k_text, v_text)
    if all(_fused_kernel_applies(q, k_text, v_text, k, v, scale) and not isinstance(scale, torch.Tensor)
           for k, v, scale, _ in branches):
        return _triton_module.decoupled_attention_branches_triton(q, k_text, v_text, branches)
    return decoupled_attention_branches_reference(q, k_text, v_text, branches)
