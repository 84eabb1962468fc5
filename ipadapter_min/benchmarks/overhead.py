"""Host time per decoupled-attention call: the Python around a ~10 µs SD1.5 kernel.

    python -m ipadapter_min.benchmarks.overhead  # on CUDA where there is a GPU, else on the CPU

An SD1.5 cross-attention kernel runs for about 10 µs on a current GPU, so the host's work per
call (the dispatch's checks, λ, the launch's arguments, Triton's launcher) decides whether the
GPU waits for the CPU. The tensors are tiny (one layer's shapes with 16 queries) so that device
work is negligible; each row is µs per call, the median of 7 runs of ``--calls`` calls.

  reference             sdpa + λ·sdpa, the reference path's own ops
  dispatch → reference  decoupled_attention where it takes that path (the CPU): the
                        dispatch's cost is the difference from the row above
  fused checks          the dispatch's checks (_fused_kernel_applies) on a call the kernel takes
  fused, no launch      decoupled_attention on the fused path with the kernel replaced by a
                        no-op: all of our host work up to Triton's launcher
  custom op, no launch  the same through ipadapter_min::decoupled_attention, as a compiled
                        graph without CUDA graphs calls it (eager calls skip the operator)
  fused call            (CUDA only) decoupled_attention with the real launch, not synchronised
                        per call: what a UNet step pays per layer when the host is the bottleneck

Without CUDA the fused rows answer the device question (``_fused_device``) as on an sm_80 GPU,
as the tests do, and never launch the kernel (its CPU interpreter is no timing).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import statistics
import time

import torch
import torch.nn.functional as F

dispatch = importlib.import_module("ipadapter_min.kernels.decoupled_attention")  # the module, not the function

BATCH, HEADS, HEAD_DIM, QUERIES, TEXT_TOKENS, IMAGE_TOKENS = 2, 8, 40, 16, 77, 4
SCALE = 0.7


class _NoLaunch:
    """Stands in for the @triton.jit kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def kernel_not_launched():
    module = dispatch._triton()
    real = module._decoupled_attention_kernel
    module._decoupled_attention_kernel = _NoLaunch()
    try:
        yield
    finally:
        module._decoupled_attention_kernel = real


@contextlib.contextmanager
def device_answered_as_a_gpu(device: torch.device):
    """On the CPU, let the fused path's checks and host work run on CPU tensors."""
    if device.type == "cuda":
        yield
        return
    real = dispatch._fused_device
    dispatch._fused_device = lambda device: True
    try:
        yield
    finally:
        dispatch._fused_device = real


def inputs(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k_text, v_text, k_image, v_image as the UNet makes them: (B, L, H·d) viewed as (B, H, L, d)."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(BATCH, n, HEADS * HEAD_DIM, generator=g).to(device, dtype)
                 .view(BATCH, n, HEADS, HEAD_DIM).transpose(1, 2)
                 for n in (QUERIES, TEXT_TOKENS, TEXT_TOKENS, IMAGE_TOKENS, IMAGE_TOKENS))


def per_call_us(fn, calls: int, device: torch.device, runs: int = 7) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(min(calls, 200)):
        fn()
    sync()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def measure(device: torch.device, dtype: torch.dtype, calls: int) -> dict[str, float]:
    if dispatch._triton() is None:
        raise SystemExit(f"triton is not importable: {dispatch._triton_import_error!r}")
    q, kt, vt, ki, vi = args = inputs(device, dtype)
    rows = {}

    def row(name, fn):
        rows[name] = per_call_us(fn, calls, device)

    def call():
        return dispatch.decoupled_attention(*args, SCALE)

    with torch.no_grad():
        if device.type == "cpu":
            row("reference", lambda: F.scaled_dot_product_attention(q, kt, vt)
                + SCALE * F.scaled_dot_product_attention(q, ki, vi))
            row("dispatch → reference", call)
        with device_answered_as_a_gpu(device):
            if not dispatch._fused_kernel_applies(*args, SCALE):
                raise SystemExit(f"the fused kernel does not take these inputs on {device} ({dtype})")
            row("fused checks", lambda: dispatch._fused_kernel_applies(*args, SCALE))
            op = dispatch._triton().decoupled_attention_op
            with kernel_not_launched():
                row("fused, no launch", call)
                row("custom op, no launch", lambda: op(*args, SCALE))
            if device.type == "cuda":
                row("fused call", call)
    return rows


def main(argv=None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp16", "fp32"), default=None, help="default: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--calls", type=int, default=2000, help="calls per timed run (default 2000)")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"fp16": torch.float16, "fp32": torch.float32}[a.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        torch.set_num_threads(1)  # tiny tensors: one thread is the fastest and the steadiest
    rows = measure(device, dtype, a.calls)
    print(f"{device} {dtype}, q {BATCH}×{HEADS}×{QUERIES}×{HEAD_DIM}, {TEXT_TOKENS} text and {IMAGE_TOKENS} image "
          f"tokens; µs per call, median of 7 runs of {a.calls}")
    for name, us in rows.items():
        print(f"  {name:<22} {us:8.2f}")
    return rows


if __name__ == "__main__":
    main()
