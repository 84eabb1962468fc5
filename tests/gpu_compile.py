"""Compile the fused kernel ahead of time for NVIDIA GPUs, on a machine without one.

Triton ships ptxas and cuobjdump, so the whole pipeline down to a cubin runs here with no
driver. That catches what the interpreter lets through (tl.dot dims < 16, casts a GPU
rejects) and shows each default config's registers, spills (stack frame), shared memory,
whether Q/K/V loads are vectorised, and from these how many blocks fit an SM (CTAs/SM) and
how many programs the SD1.5 shape launches: what decides whether a launch fits a GPU at all,
and how full it keeps one.

    python tests/gpu_compile.py        # a table for every case in CASES, as JSON lines

Run without TRITON_INTERPRET (the tests start it in a subprocess with it removed).
"""
from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ipadapter_min.kernels import triton_decoupled_attention as kernel_module  # noqa: E402

# Largest dynamic shared memory one block may opt into, bytes (CUDA programming guide,
# "Technical Specifications per Compute Capability").
MAX_SHARED_BYTES = {80: 166912, 86: 101376, 90: 232448}
# Per SM, for CTAs/SM: shared memory, warps, blocks (the same table of the programming guide;
# the NVIDIA Ampere and Hopper tuning guides give 164 KB on sm_80, 100 KB on sm_86, 228 KB on
# sm_90, and the 1 KB the system reserves per block). Registers as the CUDA toolkit's
# cuda_occupancy.h counts them (cudaOccMaxBlocksPerSMRegsLimit, ...SmemLimit): 65536 per SM in
# 4 sub-partitions, each warp's allocation rounded up to 256 registers, warps never split
# between sub-partitions; shared memory allocated per block in units of 128 bytes.
SM_LIMITS = {80: dict(shared=164 * 1024, warps=64, blocks=32),
             86: dict(shared=100 * 1024, warps=48, blocks=16),
             90: dict(shared=228 * 1024, warps=64, blocks=32)}
REGISTERS_PER_SM, REGISTER_SUB_PARTITIONS, REGISTER_UNIT = 65536, 4, 256
SHARED_RESERVED_PER_BLOCK, SHARED_UNIT = 1024, 128

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POINTERS = ("Q", "KT", "VT", "KI", "VI", "O")
ROW_STRIDES = ("stride_ql", "stride_ktl", "stride_vtl", "stride_kil", "stride_vil", "stride_ol")
TEXT_TOKENS = 77
BATCH_HEADS = 16  # SD1.5: CFG batch 2 × 8 heads
SD15_SHAPES = ((4096, 40), (1024, 80), (256, 160), (64, 160))  # (len_q, head dim) at 512²


@dataclass(frozen=True)
class Case:
    arch: int
    dtype: str
    len_q: int
    head_dim: int
    image_tokens: int  # per branch for "branches" (two branches)
    lam_is_ptr: bool = False
    kernel: str = "one image"


# Every arch × dtype at each SD1.5 shape with 257 image tokens (the online image path, the most
# registers); the one-tile image fold (4 and 16 tokens) at every shape on Hopper and at the
# smallest-grid shape (16-row blocks) on Ampere; then another head dim, λ as a 0-d tensor, and
# the branches kernel in both image modes (half precision: in fp32 it keeps 264 B on the stack
# at d 160 on sm_80, as it did before v2). Cases with equal compile-time constants compile once.
CASES = ([Case(cap, dt, lq, d, 257) for cap in (80, 86, 90) for dt in DTYPES for lq, d in SD15_SHAPES]
         + [Case(90, "fp16", lq, d, li) for lq, d in SD15_SHAPES for li in (4, 16)]
         + [Case(86, "fp16", 64, 160, 4), Case(80, "fp32", 64, 160, 16), Case(90, "fp16", 4096, 256, 257),
            Case(80, "fp32", 4096, 16, 4), Case(90, "fp16", 1024, 80, 16, lam_is_ptr=True)]
         + [Case(90, "fp16", 4096, 40, 16, kernel="branches"), Case(86, "fp16", 1024, 80, 257, kernel="branches"),
            Case(80, "bf16", 64, 160, 4, kernel="branches")])


def _tool(name: str) -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def ctas_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Blocks of this kernel that fit one SM at once: the least of what registers, shared
    memory, warps and the block limit allow (SM_LIMITS)."""
    limits = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    warps_by_registers = REGISTERS_PER_SM // REGISTER_SUB_PARTITIONS // per_warp * REGISTER_SUB_PARTITIONS
    shared = -(-(shared_bytes + SHARED_RESERVED_PER_BLOCK) // SHARED_UNIT) * SHARED_UNIT
    return min(warps_by_registers // num_warps, limits["shared"] // shared, limits["warps"] // num_warps,
               limits["blocks"])


def _signature(names, constants: dict, dtype_name: str, lam_is_ptr: bool) -> dict:
    pointer_types = {**{n: "*" + dtype_name for n in POINTERS}, "LAMS": "*fp32", "STARTS": "*i32",
                     "MASKS": "*fp32", "LAM": "*fp32" if lam_is_ptr else "fp32"}
    return {n: "constexpr" if n in constants else pointer_types.get(n, "fp32" if n == "qk_scale" else "i32")
            for n in names}


def compile_default_config(case: Case) -> dict:
    """Compile a kernel with ``default_config`` for sm_<arch> at the case's shape; report what
    the cubin uses and how many blocks fit an SM."""
    branches = case.kernel == "branches"
    kernel = (kernel_module._decoupled_attention_branches_kernel if branches
              else kernel_module._decoupled_attention_kernel)
    names = kernel.arg_names
    dtype = DTYPES[case.dtype]
    cfg = kernel_module.default_config(case.head_dim, TEXT_TOKENS, case.image_tokens, dtype, case.len_q, BATCH_HEADS)
    image_lengths = (case.image_tokens,) * (2 if branches else 1)
    constants = dict(kernel_module.kernel_constants(cfg, case.head_dim, TEXT_TOKENS, image_lengths, dtype),
                     ALIGN=16 // dtype.itemsize)
    if not branches:
        constants["LAM_IS_PTR"] = case.lam_is_ptr
    source = ASTSource(fn=kernel, signature=_signature(names, constants, case.dtype, case.lam_is_ptr),
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS + ROW_STRIDES},
                       constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", case.arch, 32),
                              options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(_tool("cuobjdump")), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    bits = 8 * dtype.itemsize
    scalar_loads = len(re.findall(rf"ld\.global(?:\.(?!v\d)[a-z0-9]+)*\.b{bits} ", compiled.asm["ptx"]))
    shared = compiled.metadata.shared
    return dict(asdict(case), config=cfg.__dict__, tail_text=constants["TAIL_NT"],
                image_one_tile=constants["IMAGE_ONE_TILE"],
                programs=-(-case.len_q // cfg.block_m) * BATCH_HEADS,
                registers=registers, stack_bytes=stack, shared_bytes=shared,
                max_shared_bytes=MAX_SHARED_BYTES[case.arch], scalar_loads=scalar_loads,
                ctas_per_sm=ctas_per_sm(case.arch, registers, cfg.num_warps, shared))


def ptxas_available() -> bool:
    return _tool("ptxas").exists() and _tool("cuobjdump").exists()


def compiler_api_known() -> bool:
    """Whether this Triton's ASTSource takes constexprs= (the API compile_default_config uses; the
    Triton of torch 2.6, 3.2, takes constants= and an AttrsDescriptor instead)."""
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


if __name__ == "__main__":
    # one compile per core (each is one Python thread plus ptxas), the rows in CASES' order; at
    # most 8 workers, each a Python with torch and Triton imported (~0.4 GB)
    workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for row in pool.map(compile_default_config, CASES):
            print(json.dumps(row), flush=True)
