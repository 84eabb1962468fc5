"""A spy on the fused Triton kernel's launch: what "the fused path ran" means in a test.

``kernels.triton_decoupled_attention.decoupled_attention_triton`` launches the kernel as
``_decoupled_attention_kernel[grid](*args, **kwargs)``, looking the kernel up in its module at
call time. ``spy_on_kernel(monkeypatch)`` puts a wrapper there that records every launch
(grid, arguments, compile-time constants) and then launches the real kernel, so outputs are
unchanged. A test asserts the count: one where the fused path must run, zero where it must not.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Launch:
    grid: tuple
    args: tuple  # Q, KT, VT, KI, VI, O, LAM, strides…, n_heads, len_q, len_t, len_i, qk_scale
    kwargs: dict  # HEAD_DIM, BLOCK_M, BLOCK_NT, BLOCK_NI, LAM_IS_PTR, …, num_warps, num_stages

    @property
    def inputs(self) -> tuple:
        return self.args[:5]

    @property
    def out(self):
        return self.args[5]

    @property
    def lam(self):
        return self.args[6]


class KernelLaunches:
    """Stands in for the ``@triton.jit`` kernel object: ``spy[grid](...)`` records, then launches."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[Launch] = []

    def __getitem__(self, grid):
        launcher = self.kernel[grid]

        def launch(*args, **kwargs):
            self.launches.append(Launch(grid, args, kwargs))
            return launcher(*args, **kwargs)
        return launch

    def __len__(self) -> int:
        return len(self.launches)


def spy_on_kernel(monkeypatch) -> KernelLaunches:
    from ipadapter_min.kernels import triton_decoupled_attention as module
    spy = KernelLaunches(module._decoupled_attention_kernel)
    monkeypatch.setattr(module, "_decoupled_attention_kernel", spy)
    return spy


def dispatch_as_on_a_gpu(monkeypatch) -> None:
    """Make ``kernels.decoupled_attention`` take its fused branch for CPU tensors, as it does for
    CUDA tensors on an sm_80+ GPU: the device/capability check (``_fused_kernel_applies``) answers
    yes whenever triton imports. The kernel then runs through the interpreter. What is under test
    is everything around that check: the early returns before it and the call after it."""
    import importlib
    dispatch = importlib.import_module("ipadapter_min.kernels.decoupled_attention")  # the module, not the function
    monkeypatch.setattr(dispatch, "_fused_kernel_applies", lambda *args: dispatch._triton() is not None)
