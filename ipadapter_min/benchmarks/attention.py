"""Benchmark IP-Adapter decoupled cross-attention at SD1.5's 16 cross-attention layers.

    python -m ipadapter_min.benchmarks.attention  # GPU: fused vs two-SDPA vs naive
    python -m ipadapter_min.benchmarks.attention --help

Three implementations of  out = softmax(QK_tᵀ/√d)V_t + λ·softmax(QK_iᵀ/√d)V_i :

  fused      the Triton kernel (kernels.decoupled_attention_triton): Q read once, O written once
  two_sdpa   the reference implementation's way (diffusers' IPAdapterAttnProcessor2_0):
             sdpa(q,k_t,v_t) + λ * sdpa(q,k_i,v_i) — two attention kernels, a scale, an add
  naive      explicit matmul → softmax (fp32) → matmul for each branch, then scale and add

Shapes: SD1.5 at 512×512 with classifier-free guidance (batch 2), 8 heads, 77 text tokens;
query length / head dim 4096/40 (5 layers), 1024/80 (5), 256/160 (5), 64/160 (1); image
tokens 4 (ip-adapter_sd15), 16 (plus) and 257 (full-face); fp16 and bf16. Inputs are in the
layout the UNet produces: (B, L, H·d) projections viewed as (B, H, L, d), not contiguous.

Reported per case: median µs; achieved GB/s counted over the memory floor (read Q, K_t, V_t,
K_i, V_i once, write O once — what an ideal fused kernel must move); that as % of the
device's peak memory bandwidth (from a table of known devices, else 'unknown'); speedup vs
two_sdpa; max |fused − two_sdpa|. Also per-UNet-call totals (the 16 layers summed). GPU
timing uses triton.testing.do_bench, which zeroes a 256 MB buffer before every timed run, so
L2 (50 MB on an H100) never holds the inputs.

On a machine without CUDA only the two PyTorch paths run (the fused kernel is a GPU kernel;
its CPU interpreter is for tests, not timing), with few repeats and fp32 by default; the
output says so. Results go to JSON (--out, default results-<device>.json in the current
folder) and, if matplotlib is importable, a plot next to it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..formats.files import write_atomically

# SD1.5 cross-attention layers (attn2) in UNet execution order: name, query length at
# 512×512 (64×64 latent), heads, head dim.
SD15_CROSS_ATTENTION_LAYERS = (
    [(f"down0.{i}", 4096, 8, 40) for i in range(2)]
    + [(f"down1.{i}", 1024, 8, 80) for i in range(2)]
    + [(f"down2.{i}", 256, 8, 160) for i in range(2)]
    + [("mid", 64, 8, 160)]
    + [(f"up1.{i}", 256, 8, 160) for i in range(3)]
    + [(f"up2.{i}", 1024, 8, 80) for i in range(3)]
    + [(f"up3.{i}", 4096, 8, 40) for i in range(3)]
)
BATCH = 2  # CFG: unconditional + conditional
TEXT_TOKENS = 77
IMAGE_TOKENS = (4, 16, 257)

# Peak DRAM bandwidth in TB/s, matched against torch.cuda.get_device_name() in this order
# (first regex that matches wins; more specific names first).
PEAK_BANDWIDTH_TBPS = [
    (r"GH200", 4.0),
    (r"H200", 4.8),
    (r"H100.*NVL", 3.9),
    (r"H100.*PCIe", 2.0),
    (r"H100", 3.35),  # SXM5, "NVIDIA H100 80GB HBM3"
    (r"H800.*PCIe", 2.0),
    (r"H800", 3.35),
    (r"B200", 8.0),
    (r"A100.*80GB.*PCIe", 1.935),
    (r"A100.*SXM.*80GB", 2.039),
    (r"A100", 1.555),  # 40 GB, SXM4 or PCIe
    (r"A800.*80GB", 2.039),
    (r"L40S", 0.864),
    (r"L40", 0.864),
    (r"L4\b", 0.300),
    (r"A10G", 0.600),
    (r"A10\b", 0.600),
    (r"RTX 4090", 1.008),
    (r"RTX 3090", 0.936),
    (r"V100", 0.900),
    (r"T4\b", 0.320),
]

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def peak_bandwidth_tbps(device_name: str) -> float | None:
    for pattern, tbps in PEAK_BANDWIDTH_TBPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return tbps
    return None


# ----------------------------------------------------------------------------- implementations

def two_sdpa(q, kt, vt, ki, vi, lam):
    out = F.scaled_dot_product_attention(q, kt, vt)
    return out + lam * F.scaled_dot_product_attention(q, ki, vi)


def _naive_branch(q, k, v):
    w = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return torch.matmul(w.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def naive(q, kt, vt, ki, vi, lam):
    return _naive_branch(q, kt, vt) + lam * _naive_branch(q, ki, vi)


def fused(q, kt, vt, ki, vi, lam, config=None):
    from ..kernels import decoupled_attention_triton
    return decoupled_attention_triton(q, kt, vt, ki, vi, lam, config=config)


# ----------------------------------------------------------------------------- inputs, timing

def unet_layout_inputs(lq, heads, d, li, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def proj(length):  # (B, L, H·d) → (B, H, L, d) view, as the UNet's attention does
        x = torch.randn(BATCH, length, heads * d, generator=gen).to(device=device, dtype=dtype)
        return x.view(BATCH, length, heads, d).transpose(1, 2)

    return proj(lq), proj(TEXT_TOKENS), proj(TEXT_TOKENS), proj(li), proj(li)


def floor_bytes(lq, heads, d, li, element_size):
    """Bytes an ideal kernel must move: read Q, K_t, V_t, K_i, V_i once, write O once."""
    return BATCH * heads * d * (2 * lq + 2 * TEXT_TOKENS + 2 * li) * element_size


def time_cuda_us(fn, reps_ms: int) -> float:
    import triton.testing
    fn()  # compile / autotune outside the timed region (do_bench sizes its loop from a first run)
    torch.cuda.synchronize()
    # do_bench zeroes a 256 MB buffer before each timed call (L2 flush) and times the call
    # alone with CUDA events; median over ~reps_ms of runs.
    return 1e3 * triton.testing.do_bench(fn, warmup=max(5, reps_ms // 4), rep=reps_ms,
                                         return_mode="median")


def time_cpu_us(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


# BLOCK_M 16 too: default_config shrinks to it for the small-Lq layers (d 160), to fill the SMs.
TUNE_GRID = [
    dict(block_m=bm, block_n_text=bn, num_warps=w, num_stages=s)
    for bm in (16, 32, 64, 128) for bn in (32, 64) for w in (4, 8) for s in (1, 2, 3)
]


def tune(q, kt, vt, ki, vi, lam, timer, grid=TUNE_GRID):
    """Time the fused kernel over ``grid`` (image block from the default); best first."""
    from ..kernels.triton_decoupled_attention import KernelConfig, default_config
    base = default_config(q.shape[-1], kt.shape[2], ki.shape[2], q.dtype)
    results = []
    for g in grid:
        cfg = KernelConfig(block_n_image=min(base.block_n_image, g["block_n_text"]), **g)
        try:
            us = timer(lambda: fused(q, kt, vt, ki, vi, lam, cfg))
        except Exception as e:  # e.g. out of shared memory / registers for this config
            results.append(dict(config=cfg.__dict__, us=None, error=type(e).__name__))
            continue
        results.append(dict(config=cfg.__dict__, us=us))
    return sorted(results, key=lambda r: math.inf if r["us"] is None else r["us"])


IMPLEMENTATIONS = {"fused": fused, "two_sdpa": two_sdpa, "naive": naive}


def measure_case(dtype_name, lq, heads, d, li, methods, device, timer, scale, peak=None, layers=1) -> dict:
    """Time ``methods`` at one shape (which ``layers`` of the UNet have); with "fused" among
    them, also its speedup over two_sdpa and the largest difference between the two."""
    q, kt, vt, ki, vi = unet_layout_inputs(lq, heads, d, li, DTYPES[dtype_name], device)
    nbytes = floor_bytes(lq, heads, d, li, q.element_size())
    row = dict(dtype=dtype_name, len_q=lq, heads=heads, head_dim=d, image_tokens=li,
               text_tokens=TEXT_TOKENS, batch=BATCH, layers=layers, floor_bytes=nbytes, results={})
    for m in methods:
        us = timer(lambda m=m: IMPLEMENTATIONS[m](q, kt, vt, ki, vi, scale))
        gbps = nbytes / (us * 1e-6) / 1e9
        row["results"][m] = dict(us=us, gb_per_s=gbps,
                                 pct_peak=(100 * gbps / (peak * 1e3)) if peak else "unknown")
    if "fused" in methods:
        ref = two_sdpa(q, kt, vt, ki, vi, scale)
        out = fused(q, kt, vt, ki, vi, scale)
        row["max_abs_diff_fused_vs_two_sdpa"] = (out.float() - ref.float()).abs().max().item()
        row["speedup_fused_vs_two_sdpa"] = row["results"]["two_sdpa"]["us"] / row["results"]["fused"]["us"]
    return row


def format_row(row, methods) -> str:
    cells = []
    for m in methods:
        r = row["results"][m]
        pct = f"{r['pct_peak']:5.1f}%" if r["pct_peak"] != "unknown" else "  n/a "
        cells.append(f"{r['us']:11.1f} {r['gb_per_s']:6.1f} {pct:>6}")
    line = (f"{row['dtype']:5} {row['len_q']:5d} {row['head_dim']:4d} {row['image_tokens']:4d} "
            f"{row['layers']:2d} | " + " | ".join(cells))
    if "speedup_fused_vs_two_sdpa" in row:
        line += f" | {row['speedup_fused_vs_two_sdpa']:6.2f}×  {row['max_abs_diff_fused_vs_two_sdpa']:.1e}"
    return line


def per_unet_call(rows, methods) -> list[dict]:
    """The 16 layers summed (each distinct shape times its layer count), per dtype and image tokens."""
    totals = []
    for key in dict.fromkeys((r["dtype"], r["image_tokens"]) for r in rows):
        sel = [r for r in rows if (r["dtype"], r["image_tokens"]) == key]
        tot = {m: sum(r["results"][m]["us"] * r["layers"] for r in sel) for m in methods}
        entry = dict(dtype=key[0], image_tokens=key[1], us_per_unet_call=tot)
        if "fused" in methods:
            entry["speedup_fused_vs_two_sdpa"] = tot["two_sdpa"] / tot["fused"]
        totals.append(entry)
    return totals


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m ipadapter_min.benchmarks.attention",
        description=__doc__.split("\n\n")[0] + " Fused Triton kernel vs two SDPA calls "
        "(diffusers' way) vs a naive matmul-softmax-matmul, at the 4 distinct SD1.5 "
        "cross-attention shapes (512×512, CFG batch 2) × 4/16/257 image tokens × dtypes.",
        epilog="On a CUDA machine all three run (needs triton). Without CUDA only two_sdpa and "
        "naive run, fp32 and --cpu-reps repeats by default (about a minute on 2 cores): the "
        "numbers are CPU reference timings, not the kernel's. GB/s is counted over the memory "
        "floor (Q, K_t, V_t, K_i, V_i read once, O written once).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: results-<device>.json in the current folder)")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated among fp16,bf16,fp32 (default: fp16,bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--image-tokens", default=",".join(map(str, IMAGE_TOKENS)),
                   help="comma-separated image token counts (default: 4,16,257)")
    p.add_argument("--scale", type=float, default=1.0, help="λ (default 1.0)")
    p.add_argument("--rep-ms", type=int, default=100,
                   help="CUDA: milliseconds of timed runs per measurement (default 100)")
    p.add_argument("--cpu-reps", type=int, default=2, help="CPU: timed repeats per measurement (default 2)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive path")
    p.add_argument("--tune", action="store_true",
                   help=f"CUDA only: also time the fused kernel over {len(TUNE_GRID)} block/warp/stage "
                   "configs per shape (first dtype only) and record the best in the JSON")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if cuda:
        device_name = torch.cuda.get_device_name()
        peak = peak_bandwidth_tbps(device_name)
        timer = lambda fn: time_cuda_us(fn, args.rep_ms)  # noqa: E731
    else:
        device_name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        peak = None
        timer = lambda fn: time_cpu_us(fn, args.cpu_reps)  # noqa: E731
    dtype_names = (args.dtypes or ("fp16,bf16" if cuda else "fp32")).split(",")
    unknown = sorted(set(dtype_names) - set(DTYPES))
    if unknown:
        raise SystemExit(f"error: --dtypes: unknown {unknown}; choose among {', '.join(DTYPES)}")
    image_tokens = [int(x) for x in args.image_tokens.split(",")]
    methods = (["fused"] if cuda else []) + ["two_sdpa"] + ([] if args.no_naive else ["naive"])

    print(f"device: {device_name}; peak memory bandwidth: "
          f"{f'{peak:.2f} TB/s' if peak else 'unknown'}")
    if not cuda:
        print("NO CUDA DEVICE: running the PyTorch reference paths only (two_sdpa, naive) on CPU, "
              f"{args.cpu_reps} timed repeats each. These are not fused-kernel figures; run this "
              "on a GPU for those.")
    print(f"torch {torch.__version__}; batch {BATCH} (CFG), text tokens {TEXT_TOKENS}, λ = {args.scale}")

    distinct = sorted({(lq, h, d) for _, lq, h, d in SD15_CROSS_ATTENTION_LAYERS}, reverse=True)
    header = (f"{'dtype':5} {'Lq':>5} {'d':>4} {'img':>4} {'n':>2} | " +
              " | ".join(f"{m:>8} µs {'GB/s':>6} {'%peak':>6}" for m in methods) +
              (" | speedup  max|Δ|" if "fused" in methods else ""))
    print(header)
    print("-" * len(header))
    rows, tuned = [], []
    t_start = time.perf_counter()
    for dname in dtype_names:
        for (lq, heads, d) in distinct:
            for li in image_tokens:
                layers = sum(1 for _, *shape in SD15_CROSS_ATTENTION_LAYERS if tuple(shape) == (lq, heads, d))
                row = measure_case(dname, lq, heads, d, li, methods, device, timer, args.scale, peak, layers)
                rows.append(row)
                print(format_row(row, methods), flush=True)
                if cuda and args.tune and dname == dtype_names[0]:
                    inputs = unet_layout_inputs(lq, heads, d, li, DTYPES[dname], device)
                    best = tune(*inputs, args.scale, lambda fn: time_cuda_us(fn, max(20, args.rep_ms // 4)))
                    tuned.append(dict(dtype=dname, len_q=lq, head_dim=d, image_tokens=li,
                                      best=best[:5], n_tried=len(best)))

    totals = per_unet_call(rows, methods)
    print("\nper UNet call (16 cross-attention layers):")
    for e in totals:
        parts = ", ".join(f"{m} {us / 1e3:.3f} ms" for m, us in e["us_per_unet_call"].items())
        extra = f", fused speedup {e['speedup_fused_vs_two_sdpa']:.2f}×" if "fused" in methods else ""
        print(f"  {e['dtype']} {e['image_tokens']:3d} image tokens: {parts}{extra}")

    result = dict(
        benchmark="IP-Adapter decoupled cross-attention, SD1.5 512x512 CFG",
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        device=device_name, cuda=cuda, peak_bandwidth_tbps=peak if peak else "unknown",
        torch=torch.__version__, python=sys.version.split()[0], scale=args.scale,
        methods=methods,
        note=None if cuda else "CPU: reference paths only (no fused kernel), few repeats; not GPU figures",
        timing=("triton.testing.do_bench median, L2 flushed (256 MB zeroed) before each run" if cuda
                else f"time.perf_counter median of {args.cpu_reps} after one warm-up"),
        cases=rows, per_unet_call=totals, tuning=tuned or None,
        wall_s=time.perf_counter() - t_start,
    )
    if cuda:
        import triton
        result["triton"] = triton.__version__
    slug = re.sub(r"[^a-z0-9]+", "-", ("cpu" if not cuda else device_name).lower()).strip("-")
    out = args.out or Path(f"results-{slug}.json")  # in the current folder, not inside the package
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=1)
    write_atomically(out, lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(f"\nwrote {out}")
    if not args.no_plot:
        _plot(result, out.with_suffix(".png"))
    return result


def _plot(result, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not importable: no plot")
        return
    cases = result["cases"]
    methods = result["methods"]
    labels = [f"{c['dtype']}\nLq{c['len_q']} d{c['head_dim']}\n{c['image_tokens']} img" for c in cases]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(cases)), 4.5))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, [c["results"][m]["us"] for c in cases], width, label=m)
    ax.set_yscale("log")
    ax.set_ylabel("µs (median, log scale)")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(labels, fontsize=6)
    ax.set_title(f"decoupled cross-attention, SD1.5 512² CFG — {result['device']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format=Path(path).suffix[1:] or "png"), overwrite=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
