"""Fused decoupled-attention kernel: numerics, layouts, λ handling, dispatch.

Without a GPU the Triton kernel runs through the interpreter (conftest sets
TRITON_INTERPRET=1 before triton is imported), one program at a time in numpy, so shapes
stay small: Lq ≤ 128, batch·heads ≤ 6. Reference: the same formula in float64 from the same
(rounded) inputs.

Tolerances, |out - ref64| ≤ atol + rtol·|ref64|:
  fp32: atol 1e-5, rtol 1e-5   (ieee dots; measured ≲ 1e-6)
  fp16: atol 1e-3, rtol 2e-3   (P rounded to fp16 before P·V, output rounded to fp16:
                                half an fp16 ulp is 4.9e-4 relative)
  bf16: atol 1e-2, rtol 1.6e-2 (GPU only: the interpreter computes bf16 wrongly)
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kernel_spy
from ipadapter_min.kernels import decoupled_attention, decoupled_attention_reference, decoupled_attention_triton

REPO = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
FUSED_GPU = HAS_CUDA and torch.cuda.get_device_capability() >= (8, 0)  # the dispatcher's own condition
DEVICE = "cuda" if HAS_CUDA else "cpu"
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}


def hypothesis_settings(max_examples: int) -> settings:
    return settings(max_examples=max_examples, derandomize=True, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- helpers

def unet_layout(B: int, L: int, H: int, D: int, dtype, gen: torch.Generator, pad: int = 0,
                scale: float = 1.0) -> torch.Tensor:
    """(B, H, L, D) the way the UNet makes it: a (B, L, H·D) projection viewed per head and
    transposed — strided, not contiguous. ``pad`` extra columns make the row stride odd-sized
    (a slice of a wider buffer)."""
    x = torch.randn(B, L, H * D + pad, generator=gen) * scale
    x = x.to(DEVICE, dtype)[..., : H * D]
    return x.view(B, L, H, D).transpose(1, 2) if pad == 0 else x.unflatten(-1, (H, D)).transpose(1, 2)


def contiguous_layout(B, L, H, D, dtype, gen, scale=1.0):
    return (torch.randn(B, H, L, D, generator=gen) * scale).to(DEVICE, dtype)


def attention64(q, k, v):
    q, k, v = (t.double() for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
    return w @ v


def reference64(q, kt, vt, ki, vi, lam):
    return attention64(q, kt, vt) + float(lam) * attention64(q, ki, vi)


def assert_close_to(out, ref, dtype, what=""):
    tol = TOL[dtype]
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out.double().cpu() - ref.cpu()).abs()
    bound = tol["atol"] + tol["rtol"] * ref.cpu().abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"{what}: max err {err.max().item():.3g}, worst at ref {ref.flatten()[worst].item():.4g} "
        f"(allowed {tol})")


def assert_far_from(out, ref, dtype, what=""):
    """The control of assert_close_to: ``out`` misses ``ref`` by far more than the tolerance, so
    a check against ``ref`` could tell the two apart."""
    err = (out.double().cpu() - ref.cpu()).abs().max().item()
    assert err > 20 * TOL[dtype]["atol"], f"{what}: only {err:.3g} apart"


def make_inputs(B, H, Lq, Lt, Li, D, dtype, seed, layout="unet"):
    gen = torch.Generator().manual_seed(seed)
    mk = unet_layout if layout == "unet" else contiguous_layout
    return tuple(mk(B, L, H, D, dtype, gen) for L in (Lq, Lt, Lt, Li, Li))


@pytest.fixture
def launches(monkeypatch) -> kernel_spy.KernelLaunches:
    """Every launch of the fused Triton kernel during the test (tests/kernel_spy.py)."""
    return kernel_spy.spy_on_kernel(monkeypatch)


@pytest.fixture(params=["this machine"] + ([] if HAS_CUDA else ["as on an sm_80+ GPU"]))
def dispatch(request, monkeypatch) -> str:
    """Dispatch as this machine does and, on a machine without CUDA, once more with the device
    check answering as on an sm_80+ GPU, so that the fused branch runs through the interpreter.
    Returns the branch that a supported call with image tokens and λ ≠ 0 takes."""
    if request.param != "this machine":
        kernel_spy.dispatch_as_on_a_gpu(monkeypatch)
        return "fused"
    return "fused" if FUSED_GPU else "reference"


def assert_launched_on(launch: kernel_spy.Launch, inputs, out) -> None:
    """The kernel read the caller's very tensors (no copies, in order) and wrote the result."""
    assert all(a is b for a, b in zip(launch.inputs, inputs)), "kernel got copies or a wrong order"
    assert launch.out is out, "the result is not the buffer the kernel wrote"


# ----------------------------------------------------------------------------- numerics

shapes = st.fixed_dictionaries(dict(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Lq=st.sampled_from([1, 7, 33, 64, 77, 100, 128]) | st.integers(1, 128),
    Lt=st.sampled_from([77, 154]) | st.integers(1, 200),
    # one image (4 / 16 / 257 tokens) or several images' tokens concatenated
    Li=st.sampled_from([4, 16, 257, 2 * 4, 3 * 16, 2 * 257]) | st.integers(1, 300),
    D=st.sampled_from([40, 80, 160]) | st.integers(1, 256),
    lam=st.sampled_from([1.0, 0.5, 0.0, -0.7]) | st.floats(-2.0, 2.0),
    layout=st.sampled_from(["unet", "contiguous"]),
    seed=st.integers(0, 2**16),
))


def _check_against_fp64(case, dtype):
    q, kt, vt, ki, vi = make_inputs(case["B"], case["H"], case["Lq"], case["Lt"], case["Li"],
                                    case["D"], dtype, case["seed"], case["layout"])
    out = decoupled_attention_triton(q, kt, vt, ki, vi, case["lam"])
    assert out.shape == q.shape
    assert_close_to(out, reference64(q, kt, vt, ki, vi, case["lam"]), dtype, str(case))


@hypothesis_settings(20)
@given(case=shapes)
def test_fp32_matches_fp64_reference(case):
    _check_against_fp64(case, torch.float32)


@hypothesis_settings(20)
@given(case=shapes)
def test_fp16_matches_fp64_reference(case):
    _check_against_fp64(case, torch.float16)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs a GPU: the Triton interpreter computes bf16 "
                                         "silently wrong, so a CPU run would test nothing")
@pytest.mark.parametrize("D,Li", [(40, 4), (80, 16), (160, 257), (64, 33)])
def test_bf16_matches_fp64_reference(D, Li):
    q, kt, vt, ki, vi = make_inputs(2, 8, 1000, 77, Li, D, torch.bfloat16, seed=D + Li)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 0.8)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 0.8), torch.bfloat16, f"D={D} Li={Li}")


@pytest.mark.parametrize("D", [40, 80, 160])
@pytest.mark.parametrize("Li", [4, 16, 257])
def test_sd15_head_dims_and_token_counts(D, Li):
    """Every SD1.5 head dim × every adapter's token count, fp16, UNet layout."""
    q, kt, vt, ki, vi = make_inputs(2, 2, 64, 77, Li, D, torch.float16, seed=D * 1000 + Li)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 1.0)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 1.0), torch.float16, f"D={D} Li={Li}")


# ----------------------------------------------------------------------------- tiles and paths

@pytest.mark.parametrize("Lt,Li,dtype,lam", [
    (77, 4, torch.float16, 0.7),  # text 64 + a 16-wide tail; 4 image tokens folded as one 16-wide tile
    (64, 16, torch.float16, "tensor"),  # text tiles exactly full, no tail; 16 tokens fill the tile
    (15, 1, torch.float16, -0.6),  # text: the tail tile alone; one image token
    (130, 17, torch.float16, 1.3),  # 2 × 64 + a 16-wide tail; 17 tokens: one 32-wide tile
    (130, 257, torch.float16, "tensor"),  # 257 tokens: the two-state online image pass, 4 × 64 + tail
    (77, 257, torch.float32, 0.7),  # fp32: every tile masked in one loop, online image pass
])
def test_text_tiles_and_image_paths(Lt, Li, dtype, lam, launches):
    """Each text tiling (full tiles, tail, both) and each image path (one exact tile folded into
    the output, online softmax) against float64; and every part counts: the result is far from
    the same formula without the last text key, without the last image token, or with λ = 0."""
    q, kt, vt, ki, vi = make_inputs(1, 2, 33, Lt, Li, 40, dtype, seed=Lt + Li)
    scale = torch.tensor(0.625, device=q.device) if lam == "tensor" else lam
    out = decoupled_attention_triton(q, kt, vt, ki, vi, scale)
    lam = float(scale)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, lam), dtype, f"Lt={Lt} Li={Li}")
    (launch,) = launches.launches
    k = launch.kwargs
    assert k["IMAGE_ONE_TILE"] == (dtype != torch.float32 and Li <= 64), k  # BLOCK_NI at most 64 at d 40
    assert k["TAIL_NT"] == (0 if dtype == torch.float32 else 16), k  # 77, 15, 130: a 13/15/2-key tail
    assert_far_from(out, reference64(q, kt[:, :, :-1], vt[:, :, :-1], ki, vi, lam), dtype, "last text key")
    assert_far_from(out, reference64(q, kt, vt, ki, vi, 0.0), dtype, "image branch")
    if Li > 1:
        assert_far_from(out, reference64(q, kt, vt, ki[:, :, :-1], vi[:, :, :-1], lam), dtype, "last image token")


def test_block_m_shrinks_for_small_grids(launches):
    """Given len_q and batch·heads (the launcher gives them for CUDA tensors), BLOCK_M halves (not
    below 16) until the grid has two programs per SM of an H100, where len_q allows; the table's
    BLOCK_M and the small one give the same numbers, at an odd len_q and a multiple of 16."""
    from ipadapter_min.kernels.triton_decoupled_attention import default_config
    # SD1.5 at 512², 16 batch·heads, fp16: the 4096-query layers keep 128 rows, the others shrink
    sd15 = ((4096, 40), (1024, 80), (256, 160), (64, 160))
    configs = [default_config(d, 77, 4, torch.float16, lq, 16) for lq, d in sd15]
    assert [(c.block_m, c.num_warps) for c in configs] == [(128, 8), (32, 4), (16, 4), (16, 4)]
    assert default_config(40, 77, 4, torch.float16).block_m == 128  # no grid given (CPU tensors): the table's
    for Lq, D in ((33, 40), (64, 80)):
        q, kt, vt, ki, vi = make_inputs(1, 2, Lq, 77, 16, D, torch.float16, seed=Lq)
        ref = reference64(q, kt, vt, ki, vi, 0.8)
        table = default_config(D, 77, 16, torch.float16)
        for config in (default_config(D, 77, 16, torch.float16, Lq, 2), table):
            assert_close_to(decoupled_attention_triton(q, kt, vt, ki, vi, 0.8, config=config), ref, torch.float16,
                            f"Lq={Lq} D={D} config={config}")
        small, big = launches.launches[-2:]
        assert small.kwargs["BLOCK_M"] == 16 and small.grid == (-(-Lq // 16) * 2,)
        assert big.kwargs["BLOCK_M"] == table.block_m > 16 and big.grid == (2,)


# ----------------------------------------------------------------------------- layouts

def test_strided_unet_layout_without_copies(monkeypatch, launches):
    """q, k, v as views of (B, L, H·D + pad) buffers (row stride not a multiple of 8), image
    tokens broadcast over the batch with stride 0: read through strides, no copy, and the
    output keeps q's (B, L, H, D) memory layout."""
    B, H, Lq, Lt, Li, D = 2, 2, 50, 77, 16, 40
    gen = torch.Generator().manual_seed(0)
    q, kt, vt = (unet_layout(B, L, H, D, torch.float32, gen, pad=3) for L in (Lq, Lt, Lt))
    ki, vi = (unet_layout(1, Li, H, D, torch.float32, gen).expand(B, H, Li, D) for _ in range(2))
    assert not q.is_contiguous() and q.stride() == (Lq * (H * D + 3), D, H * D + 3, 1)
    assert ki.stride(0) == 0

    def no_copies(*a, **k):
        raise AssertionError("the kernel launcher must not copy its inputs")
    monkeypatch.setattr(torch.Tensor, "contiguous", no_copies)
    monkeypatch.setattr(torch.Tensor, "clone", no_copies)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 0.6)
    (launch,) = launches.launches
    monkeypatch.undo()
    assert_launched_on(launch, (q, kt, vt, ki, vi), out)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 0.6), torch.float32, "strided")

    q2, kt2, vt2, ki2, vi2 = make_inputs(B, H, Lq, Lt, Li, D, torch.float16, seed=1)
    out2 = decoupled_attention_triton(q2, kt2, vt2, ki2, vi2, 0.6)
    assert out2.stride() == q2.stride()  # (B, L, H·D) underneath: to_out needs no copy
    assert out2.transpose(1, 2).is_contiguous()


# ----------------------------------------------------------------------------- λ

def test_lambda_zero_gives_text_only_attention(launches, dispatch):
    q, kt, vt, ki, vi = make_inputs(1, 2, 40, 77, 16, 80, torch.float32, seed=2)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 0.0)
    assert len(launches) == 1  # the kernel itself handles λ = 0 ...
    assert_close_to(out, attention64(q, kt, vt), torch.float32, "λ=0 kernel")
    # ... but through the public entry point a Python λ = 0 never reaches it: the base model's
    # SDPA, bit for bit, even where the fused branch is taken for λ ≠ 0
    for zero in (0.0, 0, -0.0):
        assert torch.equal(decoupled_attention(q, kt, vt, ki, vi, scale=zero),
                           F.scaled_dot_product_attention(q, kt, vt)), zero
    assert len(launches) == 1, "λ = 0 launched the fused kernel"
    # control: the same call with λ ≠ 0 does launch it where the dispatch is fused
    decoupled_attention(q, kt, vt, ki, vi, scale=0.5)
    assert len(launches) == (2 if dispatch == "fused" else 1)


@pytest.mark.parametrize("lam_dtype", [torch.float32, torch.float16, torch.float64])
def test_lambda_as_0dim_tensor(lam_dtype, launches):
    q, kt, vt, ki, vi = make_inputs(2, 1, 30, 77, 4, 40, torch.float16, seed=3)
    lam = torch.tensor(0.625, dtype=lam_dtype, device=q.device)  # exact in every dtype
    by_tensor = decoupled_attention_triton(q, kt, vt, ki, vi, lam)
    by_float = decoupled_attention_triton(q, kt, vt, ki, vi, 0.625)
    # the tensor went to the kernel as a pointer (read on the device, no host sync), the float
    # as a value
    tensor_launch, float_launch = launches.launches
    assert tensor_launch.kwargs["LAM_IS_PTR"] and isinstance(tensor_launch.lam, torch.Tensor)
    assert tensor_launch.lam.shape == () and tensor_launch.lam.device == q.device
    assert not float_launch.kwargs["LAM_IS_PTR"] and float_launch.lam == 0.625
    assert_close_to(by_tensor, reference64(q, kt, vt, ki, vi, 0.625), torch.float16, "λ tensor")
    assert torch.equal(by_tensor, by_float)
    zero = decoupled_attention_triton(q, kt, vt, ki, vi, torch.tensor(0.0))
    assert_close_to(zero, attention64(q, kt, vt), torch.float16, "λ tensor 0")
    with pytest.raises(ValueError):
        decoupled_attention_triton(q, kt, vt, ki, vi, torch.ones(2))


# ----------------------------------------------------------------------------- robustness

def test_long_sequences_and_large_logits_stay_finite():
    # 2,048 text tokens (33 key blocks) and 1,028 image tokens (4 images × 257)
    q, kt, vt, ki, vi = make_inputs(1, 1, 48, 2048, 4 * 257, 40, torch.float16, seed=4)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 1.0)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 1.0), torch.float16, "long")

    # logits around ±1e4: exp would overflow without the running max; the result must be
    # finite and a convex combination of the values in each branch
    gen = torch.Generator().manual_seed(5)
    B, H, Lq, Lt, Li, D = 1, 2, 64, 77, 16, 64
    q = unet_layout(B, Lq, H, D, torch.float16, gen, scale=40.0)
    kt, ki = (unet_layout(B, L, H, D, torch.float16, gen, scale=40.0) for L in (Lt, Li))
    vt, vi = (unet_layout(B, L, H, D, torch.float16, gen) for L in (Lt, Li))
    for lam in (1.0, 0.5):
        out = decoupled_attention_triton(q, kt, vt, ki, vi, lam)
        assert torch.isfinite(out).all()
        bound = vt.abs().amax() + lam * vi.abs().amax()
        assert (out.abs() <= bound * (1 + 2e-3)).all()

    # moderately sharp softmax (logits ~ ±50) still matches fp64 closely
    q, kt, vt, ki, vi = make_inputs(1, 2, 64, 77, 16, 40, torch.float32, seed=6)
    q = q * 8
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 1.0)
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 1.0), torch.float32, "sharp")


def test_rejects_bad_inputs():
    q, kt, vt, ki, vi = make_inputs(1, 2, 8, 77, 4, 40, torch.float32, seed=7)
    with pytest.raises(ValueError):
        decoupled_attention_triton(q, kt, vt, ki[:, :1], vi[:, :1])  # head mismatch
    with pytest.raises(ValueError):
        decoupled_attention_triton(q, kt, vt, ki.half(), vi.half())  # dtype mismatch
    with pytest.raises(ValueError):
        decoupled_attention_triton(q, kt, vt, ki[:, :, :0], vi[:, :, :0])  # no image tokens
    with pytest.raises(ValueError):
        qq = torch.randn(1, 2, 8, 300)
        decoupled_attention_triton(qq, qq, qq, qq, qq)  # head_dim > 256


# ----------------------------------------------------------------------------- dispatch

def test_no_image_tokens_is_exactly_sdpa(launches, dispatch):
    q, kt, vt, ki, vi = make_inputs(2, 2, 40, 77, 4, 40, torch.float32, seed=8)
    sdpa = F.scaled_dot_product_attention(q, kt, vt)
    assert torch.equal(decoupled_attention(q, kt, vt), sdpa)
    assert torch.equal(decoupled_attention(q, kt, vt, None, None, scale=0.7), sdpa)
    assert torch.equal(decoupled_attention(q, kt, vt, ki[:, :, :0], vi[:, :, :0], 0.7), sdpa)
    for dt in (torch.float16, torch.bfloat16):
        q2, kt2, vt2 = (t.to(dt) for t in (q, kt, vt))
        assert torch.equal(decoupled_attention(q2, kt2, vt2), F.scaled_dot_product_attention(q2, kt2, vt2))
    assert len(launches) == 0, "plain attention launched the fused kernel"
    # control: with image tokens the same dispatch does launch it where it is fused
    decoupled_attention(q, kt, vt, ki, vi, 0.7)
    assert len(launches) == (1 if dispatch == "fused" else 0)


@pytest.mark.skipif(HAS_CUDA and not FUSED_GPU, reason="a pre-sm_80 GPU has no fused branch")
def test_fused_dispatch_passes_the_inputs_through(launches, monkeypatch):
    """Where the dispatcher takes the fused branch (a GPU, or here the interpreter with the device
    check answered as on one): one launch, on the caller's tensors in order, its output returned,
    numerically the decoupled attention. A tensor λ — even 0 — is not inspected (no host sync) and
    goes to the kernel too."""
    if not HAS_CUDA:
        kernel_spy.dispatch_as_on_a_gpu(monkeypatch)
    q, kt, vt, ki, vi = make_inputs(2, 2, 33, 77, 16, 40, torch.float32, seed=11)
    # distinct text and image lengths and values: swapped arguments would not go unnoticed
    out = decoupled_attention(q, kt, vt, ki, vi, 0.8)
    (launch,) = launches.launches
    assert_launched_on(launch, (q, kt, vt, ki, vi), out)
    assert launch.lam == 0.8
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 0.8), torch.float32, "fused dispatch")
    out0 = decoupled_attention(q, kt, vt, ki, vi, torch.tensor(0.0, device=q.device))
    assert len(launches) == 2 and launches.launches[1].kwargs["LAM_IS_PTR"]
    assert_close_to(out0, attention64(q, kt, vt), torch.float32, "fused dispatch, λ tensor 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_dispatch_is_the_two_sdpa_reference_bit_for_bit(dtype, launches):
    gen = torch.Generator().manual_seed(9)
    q, kt, vt, ki, vi = (torch.randn(2, 2, L, 40, generator=gen).to(dtype) for L in (33, 77, 77, 16, 16))
    for lam in (0.7, torch.tensor(0.7)):
        # diffusers' IPAdapterAttnProcessor2_0, op for op: hidden_states + scale * ip_hidden_states
        expected = F.scaled_dot_product_attention(q, kt, vt) + lam * F.scaled_dot_product_attention(q, ki, vi)
        assert torch.equal(decoupled_attention(q, kt, vt, ki, vi, lam), expected)
        assert torch.equal(decoupled_attention_reference(q, kt, vt, ki, vi, lam), expected)
    assert len(launches) == 0, "CPU dispatch launched the fused kernel"
    # the reference path keeps autograd (training the adapter goes through it)
    ki.requires_grad_(True)
    decoupled_attention(q, kt, vt, ki, vi, 0.7).float().sum().backward()
    assert ki.grad is not None and torch.isfinite(ki.grad).all()


@pytest.mark.slow  # commands in subprocesses
def test_importing_kernels_and_cpu_dispatch_do_not_import_triton():
    code = textwrap.dedent("""
        import sys, torch
        import ipadapter_min.kernels as kernels
        assert "triton" not in sys.modules, "import kernels imported triton"
        q = torch.randn(1, 2, 8, 40)
        kernels.decoupled_attention(q, q, q, q[:, :, :4], q[:, :, :4], 0.5)
        kernels.decoupled_attention(q, q, q)
        assert "triton" not in sys.modules, "CPU dispatch imported triton"
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.skipif(not FUSED_GPU, reason="CUDA dispatch to the kernel needs an sm_80+ GPU")
def test_cuda_dispatch_uses_the_fused_kernel(launches):
    q, kt, vt, ki, vi = make_inputs(2, 8, 4096, 77, 16, 40, torch.float16, seed=10)
    out = decoupled_attention(q, kt, vt, ki, vi, 0.8)
    (launch,) = launches.launches
    assert_launched_on(launch, (q, kt, vt, ki, vi), out)
    assert out.stride() == q.stride()
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 0.8), torch.float16, "cuda dispatch")
    # gradients needed → the differentiable reference path, no launch
    ki.requires_grad_(True)
    out = decoupled_attention(q, kt, vt, ki, vi, 0.8)
    assert out.grad_fn is not None
    assert len(launches) == 1, "a call needing gradients launched the kernel (it has no backward)"


# ----------------------------------------------------------------------------- GPU compile

@pytest.mark.slow  # compiles the kernel for three GPU archs in a subprocess
def test_default_configs_fit_every_gpu_arch():
    """Compile the kernel with its default configs for sm_80, sm_86 and sm_90 (Triton's own
    ptxas, no driver; tests/gpu_compile.py; ~40 s on 2 cores with a cold Triton cache). A
    config that needs more shared memory than the arch allows would fail at launch on that
    GPU; one that spills registers runs slowly; unvectorised loads at the SD1.5 head dims mean
    the alignment hints were lost."""
    import json

    import gpu_compile
    if not gpu_compile.ptxas_available():
        pytest.skip("triton ships no ptxas/cuobjdump here")
    if not gpu_compile.compiler_api_known():
        pytest.skip(f"Triton {gpu_compile.triton.__version__}'s compiler API predates ASTSource(constexprs=...)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(REPO / "tests" / "gpu_compile.py")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == len(gpu_compile.CASES)
    # the cases reach every path: one-tile image fold and online pass, both kernels, 16-row blocks
    assert {(row["kernel"], row["image_one_tile"]) for row in rows} == {(k, p) for k in ("one image", "branches")
                                                                        for p in (True, False)}
    assert any(row["config"]["block_m"] == 16 and row["dtype"] != "fp32" for row in rows)
    for row in rows:
        assert row["ctas_per_sm"] >= 1, f"does not fit an SM: {row}"
        assert row["shared_bytes"] <= row["max_shared_bytes"], f"too much shared memory: {row}"
        # fp32 (IEEE dots on FMA units) may keep a word or two on the stack on some archs;
        # the earlier 128-row fp32 tiles spilled 1.5-12 KB.
        assert row["stack_bytes"] <= (64 if row["dtype"] == "fp32" else 0), f"register spills: {row}"
        if row["head_dim"] in (40, 80, 160):
            assert row["scalar_loads"] == 0, f"unvectorised loads: {row}"


# ----------------------------------------------------------------------------- several image branches

def branches64(q, kt, vt, branches):
    """The several-branch formula in float64 from the same (rounded) inputs."""
    def attend(k, v):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    out = attend(kt, vt)
    for k, v, scale, mask in branches:
        term = attend(k, v)
        out = out + scale * (term if mask is None else term * mask.double().reshape(-1, 1))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("D,Lq", [(40, 33), (80, 64)])
def test_several_branches_in_one_launch_match_the_reference(dtype, D, Lq):
    """Two adapters, the second with two masked images: three branches of 4, 16 and 16 tokens,
    each its own λ and (for two) a per-query mask, against the per-branch formula in float64;
    and the CPU dispatch is the per-branch reference (diffusers' op order) bit for bit."""
    from ipadapter_min.kernels import decoupled_attention_branches, decoupled_attention_branches_reference
    from ipadapter_min.kernels.decoupled_attention import _triton
    gen = torch.Generator().manual_seed(D + Lq)
    q = unet_layout(2, Lq, 3, D, dtype, gen)
    kt, vt = (unet_layout(2, 77, 3, D, dtype, gen) for _ in range(2))
    masks = [None, torch.rand(Lq, generator=gen).to(DEVICE), (torch.rand(Lq, generator=gen) > 0.5).float().to(DEVICE)]
    branches = [(*(contiguous_layout(2, n, 3, D, dtype, gen) for _ in range(2)), lam, mask)
                for n, lam, mask in zip((4, 16, 16), (0.7, -0.4, 1.3), masks)]
    out = _triton().decoupled_attention_branches_triton(q, kt, vt, branches)
    assert_close_to(out, branches64(q, kt, vt, branches), dtype, f"D={D} Lq={Lq}")
    one = _triton().decoupled_attention_branches_triton(q, kt, vt, branches[:1])
    assert (one.float() - out.float()).abs().max() > 1e-2  # the masked branches count
    if not FUSED_GPU:
        reference = decoupled_attention_branches_reference(q, kt, vt, [(k, v, s, None if m is None else m.reshape(-1, 1))
                                                                       for k, v, s, m in branches])
        dispatched = decoupled_attention_branches(q, kt, vt, [(k, v, s, None if m is None else m.reshape(-1, 1))
                                                              for k, v, s, m in branches])
        assert torch.equal(dispatched, reference)


def test_branches_with_more_tokens_than_one_tile_take_the_online_pass():
    """fp16, a 257-token branch beside a 4-token one: no one-tile fold (one branch does not fit a
    tile), an online softmax per branch, against float64; each branch counts."""
    from ipadapter_min.kernels.decoupled_attention import _triton
    gen = torch.Generator().manual_seed(12)
    Lq, D, dtype = 33, 40, torch.float16
    q = unet_layout(1, Lq, 2, D, dtype, gen)
    kt, vt = (unet_layout(1, 77, 2, D, dtype, gen) for _ in range(2))
    mask = torch.rand(Lq, generator=gen).to(DEVICE)
    branches = [(*(contiguous_layout(1, n, 2, D, dtype, gen) for _ in range(2)), lam, m)
                for n, lam, m in ((4, 0.7, None), (257, -0.9, mask))]
    out = _triton().decoupled_attention_branches_triton(q, kt, vt, branches)
    assert_close_to(out, branches64(q, kt, vt, branches), dtype, "4 + 257 tokens")
    for dropped in range(2):
        others = branches[:dropped] + branches[dropped + 1:]
        assert_far_from(out, branches64(q, kt, vt, others), dtype, f"without branch {dropped}")
    k, v, lam, m = branches[1]
    assert_far_from(out, branches64(q, kt, vt, [branches[0], (k[:, :, :-1], v[:, :, :-1], lam, m)]), dtype,
                    "the 257th token")
