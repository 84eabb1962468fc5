"""CUDA only (skipped elsewhere; ``bash benchmarks/gpu_check.sh`` runs them): the fused kernel at
every SD1.5 cross-attention shape in fp16, bf16 and fp32, and a full-size UNet step with an
IP-Adapter hook through the fused kernel against the same step with the reference attention
(two SDPA calls: ``reference_attention=True``)."""
from __future__ import annotations

import copy

import pytest
import torch

import kernel_spy
from ipadapter_min.benchmarks.attention import SD15_CROSS_ATTENTION_LAYERS
from ipadapter_min.models.configs import UNetConfig
from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.models.unet import UNet
from ipadapter_min.kernels import decoupled_attention, decoupled_attention_reference, decoupled_attention_triton
from test_kernel import assert_close_to, make_inputs, reference64

FUSED_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
pytestmark = pytest.mark.skipif(not FUSED_GPU, reason="the fused kernel runs on an sm_80+ GPU")

SD15_SHAPES = sorted({(lq, heads, d) for _, lq, heads, d in SD15_CROSS_ATTENTION_LAYERS}, reverse=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("image_tokens", [4, 16, 257])
@pytest.mark.parametrize("len_q,heads,head_dim", SD15_SHAPES, ids=[f"Lq{s[0]}-d{s[2]}" for s in SD15_SHAPES])
def test_cuda_kernel_at_every_sd15_shape(len_q, heads, head_dim, image_tokens, dtype):
    """512×512 with CFG (batch 2), 77 text tokens, in the UNet's strided layout, against float64."""
    q, kt, vt, ki, vi = make_inputs(2, heads, len_q, 77, image_tokens, head_dim, dtype, seed=len_q + image_tokens)
    out = decoupled_attention_triton(q, kt, vt, ki, vi, 0.8)
    assert out.shape == q.shape and out.stride() == q.stride()
    assert_close_to(out, reference64(q, kt, vt, ki, vi, 0.8), dtype, f"Lq={len_q} d={head_dim} Li={image_tokens}")


def test_cuda_unet_step_fused_matches_reference_attention(monkeypatch):
    """SD1.5's UNet (random weights) at 512×512, CFG batch, fp16, with a base IP-Adapter's hook:
    the fused kernel in all 16 layers against the reference attention. Both are measured
    against the same step in fp32 (reference attention): the fused step is no further from it than
    the reference's own fp16 step, give or take fp16's resolution."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        unet32 = UNet(UNetConfig()).eval()
        layers32 = IPAdapterLayers(unet32.cross_attention_widths())
        positive, negative = torch.randn(2, 1, 4, 768)
        x, context = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    t = torch.tensor(500.0, device="cuda")
    unet16, layers16 = copy.deepcopy(unet32).half(), copy.deepcopy(layers32).half()

    def step(unet, layers, dtype, attention):
        hook = ImagePromptAttention(layers, positive.to(dtype), negative.to(dtype), 0.8, attention=attention)
        with torch.no_grad():
            return unet(x.to(dtype), t, context.to(dtype), hook).float()

    launches = kernel_spy.spy_on_kernel(monkeypatch)
    fused = step(unet16, layers16, torch.float16, decoupled_attention)
    assert len(launches) == 16
    reference = step(unet16, layers16, torch.float16, decoupled_attention_reference)
    assert len(launches) == 16, "the reference attention launched the kernel"
    exact = step(unet32, layers32, torch.float32, decoupled_attention_reference)
    assert torch.isfinite(fused).all() and exact.abs().max() > 0.1
    fused_error, reference_error = ((out - exact).abs().max().item() for out in (fused, reference))
    assert fused_error <= 1.5 * reference_error + 1e-3 * exact.abs().max().item(), (fused_error, reference_error)
    with torch.no_grad():  # control: the image prompt acts in this step, far above the fp16 error
        assert (unet32(x, t, context) - exact).abs().max() > 10 * reference_error
