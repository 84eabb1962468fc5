"""IP-Adapter decoupled cross-attention: the public entry point and its dispatch.

    out = softmax(Q K_tᵀ/√d) V_t + λ · softmax(Q K_iᵀ/√d) V_i        (paper, eq. 5)

Two separate softmaxes, one over the text tokens and one over the image tokens, summed with
weight λ. (One softmax over the concatenated tokens is a different method.)

Importing this module does not import triton: the fused kernel lives in
``kernels.triton_decoupled_attention`` and is imported on first CUDA use (or first direct
call of :func:`decoupled_attention_triton`); that module also registers it as PyTorch
operators for torch.compile.
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
            from . import triton_decoupled_attention
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


_FUSED_DEVICES: dict[torch.device, bool] = {}


def _fused_device(device: torch.device) -> bool:
    """CUDA on sm_80 or newer with triton importable. Block sizes are compile-checked for
    sm_80/86/90; older GPUs (T4, V100) use SDPA. Asked once per device, since the capability
    query costs microseconds per call; a constant to torch.compile (below)."""
    fused = _FUSED_DEVICES.get(device)
    if fused is None:
        fused = (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
                 and _triton() is not None)
        _FUSED_DEVICES[device] = fused
    return fused


# What torch.compiler.assume_constant_result(_fused_device) does, without the import of
# torch._dynamo it makes (seconds, and triton with it) on `import kernels`: dynamo calls the
# function while tracing instead of tracing into torch.cuda's query and triton's import.
_fused_device._dynamo_marked_constant = True


def _fused_kernel_applies(q, k_text, v_text, k_image, v_image, scale) -> bool:
    """An sm_80+ GPU, kernel-supported shapes/dtypes, no gradient needed. Plain loops and
    unpacking: this runs on every call, around kernels of ~10 µs."""
    device, dtype = q.device, q.dtype
    if not _fused_device(device) or dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.dim() != 4:
        return False
    grad = torch.is_grad_enabled()
    if isinstance(scale, torch.Tensor) and (scale.numel() != 1 or (grad and scale.requires_grad)):
        return False
    B, H, _, D = q.shape
    if not 0 < D <= 256 or q.stride(3) != 1 or (grad and q.requires_grad):
        return False
    for t in (k_text, v_text, k_image, v_image):
        if t.device != device or t.dtype != dtype or t.dim() != 4 or t.stride(3) != 1:
            return False  # a strided head dim: SDPA handles it
        b, h, _, d = t.shape
        if b != B or h != H or d != D:
            return False  # broadcasting, or Ev != E: SDPA handles these
        if grad and t.requires_grad:
            return False  # the kernel has no backward; training goes through SDPA
    return 0 < k_text.shape[2] == v_text.shape[2] and k_image.shape[2] == v_image.shape[2]


def _fused(q, k_text, v_text, k_image, v_image, scale) -> torch.Tensor:
    """The fused kernel for a call the dispatch has checked. Eagerly: its launcher, unchecked
    (``launch``), since the dispatcher's round trip of a custom operator costs more host time
    than the kernel runs. Under torch.compile: the operator ``ipadapter_min::decoupled_attention``
    (or ``…_tensor_scale``), one opaque node with a fake implementation, as dynamo cannot trace
    the launcher."""
    mod = _triton_module
    if torch.compiler.is_compiling():
        if isinstance(scale, torch.Tensor):
            return mod.decoupled_attention_tensor_scale_op(q, k_text, v_text, k_image, v_image, scale)
        return mod.decoupled_attention_op(q, k_text, v_text, k_image, v_image, float(scale))
    return mod.launch(q, k_text, v_text, k_image, v_image, scale)


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

    Under torch.compile the same dispatch runs while tracing (its checks read only shapes,
    strides, dtypes and devices, which dynamo guards on) and the fused kernel becomes the
    custom operator ``torch.ops.ipadapter_min.decoupled_attention``: no graph break.
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
        return _fused(q, k_text, v_text, k_image, v_image, scale)
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
        if torch.compiler.is_compiling():  # as in _fused: an opaque operator node
            ks, vs, scales, masks = zip(*branches)
            return _triton_module.decoupled_attention_branches_op(q, k_text, v_text, list(ks), list(vs),
                                                                  [float(s) for s in scales], list(masks))
        return _triton_module.decoupled_attention_branches_triton(q, k_text, v_text, branches)
    return decoupled_attention_branches_reference(q, k_text, v_text, branches)
