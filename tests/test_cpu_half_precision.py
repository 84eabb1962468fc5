"""bf16 on the CPU: the UNet's and the VAE's downsampling give the same bits on every call and
stay within bf16 rounding of fp32, down to the small sizes where torch's own CPU bf16 strided
convolution was measured returning garbage (see ``StridedConv2d``).

That torch bug shows only on some CPUs (oneDNN's AMX kernel); elsewhere torch's op is right, and
these checks would pass without the workaround. So the bug is also simulated
(``broken_strided_bf16_conv``: an output element that is huge or NaN, different on every call),
the models are checked under it, and the controls show the same checks failing on the plain
strided convolution.
"""
from __future__ import annotations

import copy
import functools
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipadapter_min.models import unet as unet_module
from ipadapter_min.models import vae as vae_module
from ipadapter_min.models.configs import UNetConfig, VAEConfig
from ipadapter_min.models.strided_conv2d import StridedConv2d
from ipadapter_min.models.unet import UNet
from ipadapter_min.models.vae import VAE

# A correct bf16 convolution accumulates in fp32 and rounds once: within bf16's unit roundoff
# (2^-8, relative) of the fp32 result, plus a little for fp32 summation order (measured ≤ 3e-7
# beyond the rounding for torch's bf16 kernel where it is right).
RTOL, ATOL = 2.0 ** -8, 1e-5
# Whole models round every activation to bf16 on the way (~30 layers): measured ≤ 1.5% of the
# output's largest magnitude for these random-weight models; a broken convolution gives 1e36 or NaN.
MODEL_TOL = 2.0 ** -4

KINDS = ["unet", "vae"]  # the UNet's Downsample (padding 1) and the VAE encoder's (pads (0, 1, 0, 1))
SIZES = [(2, 2), (3, 2), (4, 2), (5, 3), (6, 4), (7, 5), (8, 8)]  # (3, 2) and (4, 2) are the measured bad ones


pytestmark = pytest.mark.usefixtures("one_thread")  # small models: fastest on one thread (conftest)


@pytest.fixture
def broken_strided_bf16_conv(monkeypatch):
    """torch's CPU bf16 strided convolution as measured on the affected CPUs: one output element
    huge or NaN, a different one on every call."""
    conv2d, calls = F.conv2d, itertools.count()

    def broken(x, weight, bias=None, stride=1, *args):
        out = conv2d(x, weight, bias, stride, *args)
        if x.device.type == "cpu" and x.dtype == torch.bfloat16 and stride not in (1, (1, 1)):
            n = next(calls)
            out.view(-1)[n % out.numel()] = float("nan") if n % 2 else 5e36
        return out

    monkeypatch.setattr(F, "conv2d", broken)


def without_workaround(monkeypatch):
    monkeypatch.setattr(StridedConv2d, "forward", nn.Conv2d.forward)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def assert_repeatable(f, calls: int = 3) -> torch.Tensor:
    outs = [f() for _ in range(calls)]
    for out in outs[1:]:
        assert torch.equal(bits(out), bits(outs[0])), "different bits on repeated calls"
    return outs[0]


@functools.lru_cache(maxsize=None)
def downsample(kind: str, channels: int) -> tuple[nn.Module, nn.Module]:
    """A bf16 Downsample and its fp32 copy (the same, bf16-rounded, weights)."""
    torch.manual_seed(channels)
    module = {"unet": unet_module.Downsample, "vae": vae_module.Downsample}[kind](channels).bfloat16()
    return module, copy.deepcopy(module).float()


def check_downsample(kind: str, batch: int, channels: int, size: tuple[int, int]) -> None:
    down, down32 = downsample(kind, channels)
    x = torch.randn(batch, channels, *size, generator=torch.Generator().manual_seed(batch * size[0])).bfloat16()
    with torch.no_grad():
        out = assert_repeatable(lambda: down(x)).float()
        ref = down32(x.float())
    err = (out - ref).abs()
    assert (err <= RTOL * ref.abs() + ATOL).all(), f"max error {err.max().item():.3g} vs fp32"


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("channels", [128, 320, 1280])
@pytest.mark.parametrize("batch", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_downsample_in_bf16_is_repeatable_and_within_bf16_rounding_of_fp32(kind, batch, channels, size):
    check_downsample(kind, batch, channels, size)


@pytest.mark.parametrize("kind", KINDS)
def test_downsample_is_right_under_the_simulated_bug(kind, broken_strided_bf16_conv):
    for batch, channels, size in [(3, 128, (4, 2)), (4, 1280, (3, 2))]:
        check_downsample(kind, batch, channels, size)


@pytest.mark.parametrize("kind", KINDS)
def test_control_the_check_fails_on_the_plain_strided_conv(kind, broken_strided_bf16_conv, monkeypatch):
    without_workaround(monkeypatch)
    with pytest.raises(AssertionError, match="different bits"):
        check_downsample(kind, 3, 128, (4, 2))


# ----------------------------------------------------------------------------------------------
# Small models, at latent sizes that reach 2×1 or 3×2 before the last downsample


@functools.lru_cache(maxsize=None)
def small_unet() -> tuple[UNet, UNet]:
    torch.manual_seed(0)
    unet = UNet(UNetConfig(channels=32, groups=8, heads=2, context_dim=32)).eval().bfloat16()  # 32..128 channels
    return unet, copy.deepcopy(unet).float()


@functools.lru_cache(maxsize=None)
def small_vae() -> tuple[VAE, VAE]:
    torch.manual_seed(1)
    vae = VAE(VAEConfig(channels=32, channel_mult=(1, 2, 4, 4), res_blocks=1, groups=8)).eval().bfloat16()
    return vae, copy.deepcopy(vae).float()


def assert_close_to_fp32(out: torch.Tensor, ref: torch.Tensor) -> None:
    err, scale = (out.float() - ref).abs().max(), ref.abs().max()
    assert err <= MODEL_TOL * scale, f"max error {err.item():.3g} vs fp32 (largest |fp32| {scale.item():.3g})"


def check_unet(batch: int, hw: tuple[int, int]) -> None:
    unet, unet32 = small_unet()
    g = torch.Generator().manual_seed(batch)
    x, context = torch.randn(batch, 4, *hw, generator=g).bfloat16(), torch.randn(batch, 5, 32, generator=g).bfloat16()
    t = torch.tensor(500)
    with torch.no_grad():
        out = assert_repeatable(lambda: unet(x, t, context), calls=2)
        assert_close_to_fp32(out, unet32(x.float(), t, context.float()))


def check_vae_encoder(batch: int, hw: tuple[int, int]) -> None:
    vae, vae32 = small_vae()
    image = (torch.rand(batch, 3, *hw, generator=torch.Generator().manual_seed(batch)) * 2 - 1).bfloat16()
    with torch.no_grad():
        out = assert_repeatable(lambda: vae.encode(image), calls=2)
        assert_close_to_fp32(out, vae32.encode(image.float()))


UNET_LATENTS = [(3, (16, 8)), (3, (12, 8)), (4, (10, 6)), (1, (12, 8))]  # 4×2, 3×2, 3×2 before the last downsample
VAE_IMAGES = [(3, (20, 12)), (4, (24, 16)), (1, (18, 10))]  # 5×3, 6×4, 4×2 before the last downsample


SMALL_MODELS = [(check_unet, b, hw) for b, hw in UNET_LATENTS] + [(check_vae_encoder, b, hw) for b, hw in VAE_IMAGES]


@pytest.mark.parametrize("simulated_bug", [False, True], ids=["torch", "simulated-bug"])
@pytest.mark.parametrize("check,batch,hw", SMALL_MODELS,
                         ids=[f"{c.__name__[6:]}-{b}-{h}x{w}" for c, b, (h, w) in SMALL_MODELS])
def test_small_models_in_bf16_are_repeatable_and_close_to_fp32(check, batch, hw, simulated_bug, request):
    if simulated_bug:
        request.getfixturevalue("broken_strided_bf16_conv")
    check(batch, hw)


def test_control_small_models_fail_on_the_plain_strided_conv(broken_strided_bf16_conv, monkeypatch):
    without_workaround(monkeypatch)
    for check, (batch, hw) in [(check_unet, UNET_LATENTS[0]), (check_vae_encoder, VAE_IMAGES[0])]:
        with pytest.raises(AssertionError, match="different bits|max error (nan|inf)"):  # NaN spreads: same bits
            check(batch, hw)
