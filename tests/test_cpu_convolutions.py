"""The CPU inference convolutions (ipadapter_min/models/cpu_convolutions.py) against eager PyTorch in
float64: reordered oneDNN weights and upsampling in four phases give the same numbers to fp32
rounding, follow weight changes, keep the state dict, and step aside for gradients and other
dtypes; the sample command uses them."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ipadapter_min.cli import sample
from ipadapter_min.models.configs import UNetConfig
from ipadapter_min.models.cpu_convolutions import PackedConv2d, PackedUpsample, pack_convolutions
from ipadapter_min.models.unet import UNet, Upsample

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = UNetConfig(channels=32, groups=8, heads=2)  # 32..128 channels, 2 heads

# fp32 against float64, for O(1) outputs: a few ulps of the ~1e3 terms each output sums.
TOLERANCE = 2e-5


def eager64(module, *inputs):
    """The eager module in float64: the ground truth both fp32 paths are held to."""
    with torch.no_grad():
        return copy.deepcopy(module).double()(*(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs))


def test_upsampling_in_phases_is_nearest_then_convolution():
    """Odd sides (the edges of every phase), and a requested size other than ×2 (latents whose
    sides are not multiples of 8), against F.interpolate + conv in float64."""
    torch.manual_seed(0)
    up = Upsample(16)
    x = torch.randn(2, 16, 5, 7)
    packed = copy.deepcopy(up)
    packed = torch.nn.Sequential(packed)
    assert pack_convolutions(packed) == 2 and isinstance(packed[0], PackedUpsample)  # and its own conv
    with torch.no_grad():
        out = packed[0](x)
        assert packed[0]._phases[1] is not None, "the phase path did not run"
        assert (out - eager64(up, x).float()).abs().max() < TOLERANCE
        odd = packed[0](x, torch.Size([9, 13]))
        assert odd.shape == (2, 16, 9, 13)
        assert (odd - eager64(up, x, torch.Size([9, 13])).float()).abs().max() < TOLERANCE


def test_packed_unet_matches_eager_and_keeps_its_state_dict():
    """A small UNet at a 16×16 latent, batch 2: every level is small enough for reordered weights
    (checked: each PackedConv2d has a cached weight after the call)."""
    torch.manual_seed(0)
    unet = UNet(SMALL).eval()
    keys = {k: v.clone() for k, v in unet.state_dict().items()}
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.randn(2, 77, 768)
    expected = eager64(unet, x, t, ctx).float()
    with torch.no_grad():
        eager = unet(x, t, ctx)
    made = pack_convolutions(unet)
    convs = [m for m in unet.modules() if isinstance(m, PackedConv2d)]
    assert made == len(convs) + sum(isinstance(m, PackedUpsample) for m in unet.modules()) and made > 30
    with torch.no_grad():
        out = unet(x, t, ctx)
    upsampling = [m.conv for m in unet.modules() if isinstance(m, PackedUpsample)]  # their phases ran instead
    assert all(m._packed is not None for m in convs if not any(m is u for u in upsampling))
    assert (out - expected).abs().max() < TOLERANCE
    assert (eager - expected).abs().max() < TOLERANCE
    assert not torch.equal(out, eager)  # a different oneDNN path ran, not the eager one
    assert unet.state_dict().keys() == keys.keys() and all(torch.equal(unet.state_dict()[k], keys[k]) for k in keys)


def test_a_changed_weight_is_reordered_again():
    """A LoRA merge or load_state_dict after the first call: the cached layouts must follow."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), Upsample(8))
    pack_convolutions(model)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        before = model(x)
        model[0].weight.add_(0.5)
        model[1].conv.weight.mul_(-1)
        after = model(x)
    assert (after - before).abs().max() > 0.1
    reference = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), Upsample(8))
    reference.load_state_dict(model.state_dict())
    assert (after - eager64(reference, x).float()).abs().max() < TOLERANCE


def test_gradients_and_other_dtypes_take_the_eager_path():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    reference = copy.deepcopy(conv)
    model = torch.nn.Sequential(conv)
    pack_convolutions(model)
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    model(x).sum().backward()
    assert model[0]._packed is None and x.grad is not None
    assert torch.equal(model[0].weight.grad, torch.autograd.grad(reference(x).sum(), reference.weight)[0])
    with torch.no_grad():
        half = model.to(torch.bfloat16)(x.detach().bfloat16())
    assert model[0]._packed is None and torch.equal(half, F.conv2d(x.detach().bfloat16(), model[0].weight,
                                                                   model[0].bias, padding=1))


def test_sample_packs_the_models_it_loads(monkeypatch, tmp_path):
    """--packed-convolutions hands the UNet and VAE over packed (they act on the CPU in fp32 only);
    without it nothing is packed, so the command's images are the API's bit for bit."""
    from ipadapter_min import demo
    if not demo.installed():
        pytest.skip("the demo weights are not installed")
    packed = []
    monkeypatch.setattr(sample, "pack_convolutions", lambda model: packed.append(model) or pack_convolutions(model))
    common = ["--prompt", "a red circle", "--steps", "1", "--no-progress"]
    assert sample.main([*common, "--out", str(tmp_path / "a.png")]) == 0
    assert packed == []
    assert sample.main([*common, "--packed-convolutions", "--out", str(tmp_path / "b.png")]) == 0
    unet, vae = packed
    assert any(isinstance(m, PackedConv2d) and m._packed is not None for m in unet.modules())
    assert any(isinstance(m, PackedUpsample) and m._phases[1] is not None for m in vae.modules())
