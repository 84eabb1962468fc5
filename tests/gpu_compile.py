"""Compile the fused kernel ahead of time for NVIDIA GPUs, on a machine without one.

Triton ships ptxas and cuobjdump, so the whole pipeline down to a cubin runs here with no
driver. That catches what the interpreter lets through (tl.dot dims < 16, casts a GPU
rejects) and shows each default config's registers, spills (stack frame), shared memory and
whether Q/K/V loads are vectorised: what decides whether a launch fits a GPU at all.

    python tests/gpu_compile.py        # a table for every case in CASES, as JSON lines

Run without TRITON_INTERPRET (the tests start it in a subprocess with it removed).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import triton_decoupled_attention as kernel_module  # noqa: E402

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide,
# "Technical Specifications per Compute Capability").
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 90: 232448}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POINTERS = ("Q", "KT", "VT", "KI", "VI", "O")
ROW_STRIDES = ("stride_ql", "stride_ktl", "stride_vtl", "stride_kil", "stride_vil", "stride_ol")
TEXT_TOKENS = 77

# (arch, dtype, head dim, image tokens, λ as a pointer): every dtype at SD1.5's head dims on
# Ampere (A100, RTX 30xx) and Hopper, the largest image block (257 tokens) being the most
# registers; then other head dims, token counts and λ passed as a 0-d tensor.
CASES = ([(cap, dt, d, 257, False) for cap in (80, 86, 90) for dt in DTYPES for d in (40, 80, 160)]
         + [(90, "fp16", 256, 257, False), (86, "bf16", 256, 16, False), (90, "fp16", 40, 4, False),
            (80, "fp32", 16, 4, False), (90, "fp16", 80, 16, True)])


def _tool(name: str) -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def compile_default_config(cap: int, dtype_name: str, head_dim: int, len_i: int, lam_is_ptr: bool) -> dict:
    """Compile the kernel with ``default_config`` for sm_<cap>; report what the cubin uses."""
    kernel = kernel_module._decoupled_attention_kernel
    names = kernel.arg_names
    cfg = kernel_module.default_config(head_dim, TEXT_TOKENS, len_i, DTYPES[dtype_name])
    element_size = DTYPES[dtype_name].itemsize
    constants = dict(
        HEAD_DIM=head_dim, BLOCK_D=kernel_module._pow2_at_least_16(head_dim), BLOCK_M=cfg.block_m,
        BLOCK_NT=cfg.block_n_text, BLOCK_NI=cfg.block_n_image, ALIGN=16 // element_size,
        LAM_IS_PTR=lam_is_ptr, DOT_PRECISION="ieee" if dtype_name == "fp32" else "tf32")
    signature = {n: "constexpr" if n in constants else "*" + dtype_name if n in POINTERS
                 else "*fp32" if n == "LAM" and lam_is_ptr else "fp32" if n in ("LAM", "qk_scale")
                 else "i32" for n in names}
    source = ASTSource(fn=kernel, signature=signature,
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS + ROW_STRIDES},
                       constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", cap, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    bits = 8 * element_size
    scalar_loads = len(re.findall(rf"ld\.global(?:\.(?!v\d)[a-z0-9]+)*\.b{bits} ", compiled.asm["ptx"]))
    return dict(arch=cap, dtype=dtype_name, head_dim=head_dim, image_tokens=len_i, lam_is_ptr=lam_is_ptr,
                config=cfg.__dict__,
                registers=registers, stack_bytes=stack, shared_bytes=compiled.metadata.shared,
                max_shared_bytes=MAX_SHARED_BYTES[cap], scalar_loads=scalar_loads)


def ptxas_available() -> bool:
    return _tool("ptxas").exists() and _tool("cuobjdump").exists()


if __name__ == "__main__":
    for case in CASES:
        print(json.dumps(compile_default_config(*case)), flush=True)
