"""Property: with λ = 0 the IP-Adapter changes nothing, bit for bit.

For random small SD1.5-structured UNets (channel_mult (1, 2, 4, 4), attention at levels 0..2,
2 res blocks: the 16 cross-attention layers), random inputs, dtypes (fp32, bf16, fp16) and every
device the machine has (CPU, plus CUDA when available), a UNet called with an adapter hook whose λ
is zero — in any of its forms: 0, 0.0, -0.0, 0-d tensors of any dtype, a list of 16 zeros, a
per-block dict of zeros, an empty dict — returns exactly the base UNet's bits. "Exactly" means
the raw bits (an integer view), so -0.0 vs +0.0 and NaN payloads count. The image tokens hold
NaN, ±inf and -0.0 (λ = 0 must not look at them); text tokens and latents hold -0.0 entries;
the batch's rows are conditional or unconditional in any layout (``hook.rows``). The same holds for the whole DDIM loop with CFG (``StableDiffusion.denoise``) and for
``StableDiffusion.__call__`` with a tiny text encoder and VAE.

Controls show each comparison can fail: a nonzero λ on a single layer changes the output bits.

Which path ran is checked on the fused kernel's launches (tests/kernel_spy.py), dispatching as on
an sm_80+ GPU (``fused_dispatch``): a λ = 0 call launches nothing, and each layer with λ ≠ 0
launches the kernel once (the interpreter runs it; only the tiny focused test does, to stay fast).
"""
from __future__ import annotations

import contextlib
import fractions
import functools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import kernel_spy
from ipadapter_min.benchmarks.pipeline import make_tokenizer
from ipadapter_min.models.attention import attention
from ipadapter_min.models.configs import VIT_H, AdapterSpec, TextEncoderConfig, UNetConfig, VAEConfig
from ipadapter_min.ip_adapter.adapter import IPAdapter, IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.ip_adapter.tokens import tokens_from_features
from ipadapter_min.ip_adapter.layers import expand_scale
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.samplers import DDIM
from ipadapter_min.models.text_encoder import TextEncoder
from ipadapter_min.models.tokenizer import Tokenizer
from ipadapter_min.models.unet import UNet
from ipadapter_min.models.vae import VAE

DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]  # fp16 convolutions run on CPU too
PROPERTY = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])



# Tiny models (conftest.one_thread). Base and hooked runs always share the thread count, so it
# does not bear on the property.
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Bits


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a floating-point tensor, as integers (on the CPU)."""
    t = t.detach().cpu().contiguous()
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def describe_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    differ = (bits(a) != bits(b)).nonzero()
    i = tuple(differ[0].tolist())
    return (f"{len(differ)} of {a.numel()} elements differ in their bits; first at {i}: "
            f"{a.detach().cpu()[i].item()!r} vs {b.detach().cpu()[i].item()!r}")


# ----------------------------------------------------------------------------------------------
# Models (small, cached: building dominates otherwise)

CHANNELS = (16, 32)
GROUPS = (4, 8, 16)
HEADS = (1, 2, 4, 8)
TEXT_WIDTHS = (32, 768)
TOKEN_WIDTHS = (768, 48)  # IPAdapterLayers' input width; the product's is 768


@functools.lru_cache(maxsize=6)
def small_unet(channels: int, groups: int, heads: int, context_dim: int, dtype: torch.dtype, device: str) -> UNet:
    cfg = UNetConfig(channels=channels, groups=groups, heads=heads, context_dim=context_dim)
    assert (cfg.channel_mult, cfg.attention_levels, cfg.res_blocks) == ((1, 2, 4, 4), (0, 1, 2), 2)  # SD1.5's
    torch.manual_seed(hash((channels, groups, heads, context_dim)) % 2**31)
    unet = UNet(cfg).eval()
    assert len(unet.cross_attention_layers()) == 16
    return unet.to(device=device, dtype=dtype)


def widths_of(unet: UNet) -> list[int]:
    return [layer.to_q.out_features for layer in unet.cross_attention_layers()]


@functools.lru_cache(maxsize=6)
def adapter_layers(widths: tuple[int, ...], token_width: int, dtype: torch.dtype, device: str) -> IPAdapterLayers:
    torch.manual_seed(sum(widths) + token_width)
    return IPAdapterLayers(widths=widths, context_dim=token_width).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """Ours, or without open_clip's vocabulary (a bare GPU machine: benchmarks/gpu_check.sh) the
    benchmark's one-id-per-character stand-in: the properties hold for any token ids."""
    return make_tokenizer()[0]


@st.composite
def unet_configs(draw) -> tuple[int, int, int, int]:
    channels = draw(st.sampled_from(CHANNELS))
    groups = draw(st.sampled_from([g for g in GROUPS if channels % g == 0]))
    heads = draw(st.sampled_from([h for h in HEADS if channels % h == 0]))
    return channels, groups, heads, draw(st.sampled_from(TEXT_WIDTHS))


# ----------------------------------------------------------------------------------------------
# Inputs with corner values


def special(values: list[float], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(dtype)


def nan_payloads(dtype: torch.dtype) -> torch.Tensor:
    """NaNs with unusual payloads and signs, built from their bits."""
    if dtype == torch.float32:
        return torch.tensor([0x7FC00001, -0x00400001, 0x7F800001], dtype=torch.int32).view(dtype)  # +q, -q, signaling
    if dtype == torch.float16:
        return torch.tensor([0x7E01, -0x01FF, 0x7C01], dtype=torch.int16).view(dtype)
    return torch.tensor([0x7FC1, -0x003F, 0x7F81], dtype=torch.int16).view(dtype)  # bfloat16


def random_tensor(shape, dtype: torch.dtype, seed: int, corners: torch.Tensor, fraction: float) -> torch.Tensor:
    """Standard normal values with a ``fraction`` of the entries replaced by ``corners`` (cycled)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if len(corners) and fraction > 0:
        where = (torch.rand(shape, generator=g) < fraction).nonzero(as_tuple=True)
        picks = torch.randint(len(corners), (len(where[0]),), generator=g)
        x[where] = corners.to(dtype)[picks]
    return x


def latents_like(shape, dtype, seed, fraction):
    return random_tensor(shape, dtype, seed, special([-0.0, 0.0], dtype), fraction)


def text_tokens(shape, dtype, seed, fraction):
    return random_tensor(shape, dtype, seed, special([-0.0], dtype), fraction)


def image_tokens(shape, dtype, seed, fraction):
    corners = torch.cat([special([float("nan"), float("inf"), -float("inf"), -0.0, 1e4], dtype), nan_payloads(dtype)])
    return random_tensor(shape, dtype, seed, corners, fraction)


# ----------------------------------------------------------------------------------------------
# λ = 0 in every form

def _zero_scalars():
    return [0, 0.0, -0.0, np.float32(-0.0), np.float64(0.0), np.int64(0), fractions.Fraction(0),
            torch.tensor(0.0), torch.tensor(-0.0), torch.tensor(-0.0, dtype=torch.float16),
            torch.tensor(0.0, dtype=torch.float16), torch.tensor(-0.0, dtype=torch.bfloat16),
            torch.tensor(-0.0, dtype=torch.float64), torch.tensor(0), torch.tensor(-0.0, requires_grad=True)]


zero_scalars = st.sampled_from(_zero_scalars())


def zero_lists(n: int):
    return st.one_of(st.lists(zero_scalars, min_size=n, max_size=n),
                     st.lists(zero_scalars, min_size=n, max_size=n).map(tuple),
                     st.sampled_from([torch.zeros(n), -torch.zeros(n, dtype=torch.float16),
                                      -torch.zeros(n, dtype=torch.bfloat16)]))


def zero_block_values(layers: int):
    """What diffusers accepts for one block: a number, a 1-element list, or one value per layer."""
    return st.one_of(zero_scalars, zero_lists(1), zero_lists(layers))


@st.composite
def zero_block_dicts(draw) -> dict:
    """diffusers / InstantStyle per-block dicts, every value zero (missing blocks are 0 too)."""
    out = {}
    if draw(st.booleans()):
        out["mid"] = draw(st.one_of(zero_scalars, zero_lists(1)))
    for updown, blocks, layers in (("down", (0, 1, 2), 2), ("up", (1, 2, 3), 3)):
        form = draw(st.sampled_from(["missing", "all", "named"]))
        if form == "all":  # a value for every attention block
            out[updown] = draw(zero_block_values(layers))
        elif form == "named":
            names = draw(st.lists(st.sampled_from(blocks), unique=True, max_size=3))
            out[updown] = {f"block_{b}": draw(zero_block_values(layers)) for b in names}
    return out


# (λ, strict): forms whose λ is zero in every layer. The last kind is diffusers' leniency: with
# strict=False, entries for blocks without attention layers are ignored, so nonzero values there
# still mean λ = 0 everywhere.
zero_scales = st.one_of(
    st.tuples(zero_scalars, st.just(True)),
    st.tuples(zero_lists(16), st.just(True)),
    st.tuples(zero_block_dicts(), st.just(True)),
    st.just(({}, True)),
    st.just(({"down": {"block_3": 0.8}, "up": {"block_0": [1.0, 0.5, 2.0]}}, False)),
)


def on(device: str, scale):
    """The λ value with its tensors moved to ``device`` (a CUDA 0-d tensor λ is a form too)."""
    if isinstance(scale, torch.Tensor):
        return scale.detach().to(device).requires_grad_(scale.requires_grad)
    if isinstance(scale, (list, tuple)):
        return type(scale)(on(device, x) for x in scale)
    if isinstance(scale, dict):
        return {k: on(device, v) for k, v in scale.items()}
    return scale


def lambda_kind(scale) -> str:
    if isinstance(scale, dict):
        return "per-block dict" if scale else "empty dict"
    if isinstance(scale, (list, tuple)) or (isinstance(scale, torch.Tensor) and scale.ndim):
        return "16 values"
    return f"one {type(scale).__name__}"


class ProjectionCalls:
    """Counts calls of the adapter's to_k_ip / to_v_ip layers (λ = 0 must not compute image K/V)."""

    def __init__(self, layers: IPAdapterLayers):
        self.layers = []
        self.handles = [lin.register_forward_hook(lambda m, a, o, i=i: self.layers.append(i))
                        for i, layer in enumerate(layers) for lin in (layer.to_k_ip, layer.to_v_ip)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@contextlib.contextmanager
def fused_dispatch():
    """Inside: ``kernels.decoupled_attention`` takes its fused branch for CPU tensors too, as on an
    sm_80+ GPU (the Triton interpreter runs the kernel), and every kernel launch is recorded.
    A context manager, not the ``monkeypatch`` fixture, so that hypothesis tests can use it."""
    with pytest.MonkeyPatch.context() as mp:
        kernel_spy.dispatch_as_on_a_gpu(mp)
        yield kernel_spy.spy_on_kernel(mp)


def grad_mode(mode: str):
    return {"no_grad": torch.no_grad, "inference": torch.inference_mode, "grad": contextlib.nullcontext}[mode]()


# ----------------------------------------------------------------------------------------------
# One UNet call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=12)
@given(config=unet_configs(), layers_dtype=st.sampled_from(["unet", torch.float32]),
       token_width=st.sampled_from(TOKEN_WIDTHS), rows=st.lists(st.booleans(), min_size=1, max_size=3),
       hw=st.sampled_from([(8, 8), (16, 8), (8, 16)]), text_len=st.integers(1, 9), image_len=st.integers(1, 6),
       per_row_t=st.booleans(), t=st.integers(0, 999), seed=st.integers(0, 2**31 - 1),
       fraction=st.sampled_from([0.0, 0.05, 0.3, 1.0]), zero=zero_scales,
       used_before=st.booleans(), mode=st.sampled_from(["no_grad", "inference", "grad"]))
def test_unet_with_zero_lambda_hook_is_bit_identical(device, config, dtype, layers_dtype, token_width, rows, hw,
                                                      text_len, image_len, per_row_t, t, seed, fraction, zero,
                                                      used_before, mode):
    batch = len(rows)
    unet = small_unet(*config, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), token_width, dtype if layers_dtype == "unet" else layers_dtype,
                            device)
    x = latents_like((batch, 4, *hw), dtype, seed, fraction).to(device)
    context = text_tokens((batch, text_len, config[3]), dtype, seed + 1, fraction).to(device)
    positive, negative = image_tokens((2, 1, image_len, token_width), dtype, seed + 2, max(fraction, 0.05)).to(device)
    timestep = (torch.arange(batch) * 97 + t) % 1000 if per_row_t else torch.tensor(t)
    timestep = timestep.to(device)
    scale, strict = zero
    assert expand_scale(scale, strict=strict) == (0.0,) * 16
    for e in (f"λ {lambda_kind(scale)}", f"mode {mode}", f"used before {used_before}"):
        event(e)  # shown by pytest --hypothesis-show-statistics

    with grad_mode(mode):
        base = unet(x, timestep, context)
        if used_before:  # a hook that ran with λ ≠ 0 (image K/V cached) and was then set to 0
            hook = ImagePromptAttention(layers, positive.nan_to_num(), negative.nan_to_num(), 0.7, rows=rows)
            unet(x, timestep, context, hook)
            hook.set_scale(on(device, scale), strict=strict)
        else:
            hook = ImagePromptAttention(layers, positive, negative, on(device, scale), rows=rows, strict=strict)
        with ProjectionCalls(layers) as calls, fused_dispatch() as launches:
            with_hook = unet(x, timestep, context, hook)

    assert same_bits(with_hook, base), describe_difference(with_hook, base)
    assert calls.layers == []  # λ = 0: the image tokens were not even projected
    assert len(launches) == 0  # ... nor sent to the fused kernel, where it would run


def _every_zero_form():
    """Each scalar zero form, and a few of each composite form, spelled out (the property test
    above draws these at random; this makes sure none is left out)."""
    zeros = _zero_scalars()
    forms = [(z, True) for z in zeros]
    forms += [(zeros[i:] + zeros[:i] + zeros[:16 - len(zeros)], True) for i in (0, 5)]  # lists of 16, every kind
    forms += [(torch.zeros(16), True), (tuple([-0.0] * 16), True), (-torch.zeros(16, dtype=torch.float16), True)]
    forms += [({}, True), ({"mid": -0.0}, True), ({"mid": [torch.tensor(-0.0)]}, True),
              ({"down": 0, "mid": 0.0, "up": -0.0}, True), ({"down": [0.0], "up": [-0.0]}, True),
              ({"down": [0.0, -0.0], "up": torch.zeros(3)}, True),
              ({"down": {"block_0": [0, -0.0], "block_2": torch.tensor(0.0)}, "up": {"block_3": [0.0, -0.0, 0]}}, True),
              ({"up": {"block_1": np.float32(-0.0), "block_2": [fractions.Fraction(0)]}}, True),
              ({"down": {"block_3": 0.8}, "up": {"block_0": [1.0, 0.5, 2.0]}}, False)]
    return forms


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_zero_form_is_bit_identical(device, dtype, monkeypatch):
    kernel_spy.dispatch_as_on_a_gpu(monkeypatch)  # where a λ ≠ 0 layer would launch the fused kernel
    launches = kernel_spy.spy_on_kernel(monkeypatch)
    unet = small_unet(16, 8, 2, 32, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    x = latents_like((2, 4, 8, 8), dtype, 7, 0.1).to(device)
    context = text_tokens((2, 5, 32), dtype, 8, 0.1).to(device)
    positive, negative = image_tokens((2, 1, 4, 768), dtype, 9, 0.5).to(device)
    t = torch.tensor(750, device=device)
    with torch.no_grad():
        base = unet(x, t, context)
        for scale, strict in _every_zero_form():
            assert expand_scale(scale, strict=strict) == (0.0,) * 16, scale
            with ProjectionCalls(layers) as calls:
                out = unet(x, t, context, ImagePromptAttention(layers, positive, negative, on(device, scale), strict=strict))
            assert same_bits(out, base), f"λ = {scale!r}: {describe_difference(out, base)}"
            assert calls.layers == [], scale
            assert len(launches) == 0, f"λ = {scale!r} launched the fused kernel"


# ----------------------------------------------------------------------------------------------
# λ per layer: the zero layers give plain attention's bits, the others do not


class CheckingHook:
    """Runs the adapter hook and compares each layer's output with plain attention on the same q, k, v."""

    def __init__(self, inner):
        self.inner, self.order, self.same = inner, [], {}

    def __call__(self, layer, q, k, v):
        out = self.inner(layer, q, k, v)
        self.order.append(layer)
        self.same[layer] = same_bits(out, attention(q, k, v))
        return out


@pytest.mark.parametrize("device", DEVICES)
@settings(PROPERTY, max_examples=12)
@given(config=unet_configs(), dtype=st.sampled_from(DTYPES), rows=st.lists(st.booleans(), min_size=1, max_size=2),
       seed=st.integers(0, 2**31 - 1), zeros=st.lists(st.booleans(), min_size=16, max_size=16),
       zero=zero_scalars, nonzero=st.sampled_from([1.0, 0.5, -0.3, torch.tensor(2.0)]),
       fraction=st.sampled_from([0.0, 0.1]))
def test_zero_layers_are_plain_attention_and_others_are_not(device, config, dtype, rows, seed, zeros, zero,
                                                            nonzero, fraction):
    batch = len(rows)
    unet = small_unet(*config, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    x = latents_like((batch, 4, 8, 8), dtype, seed, fraction).to(device)
    context = text_tokens((batch, 5, config[3]), dtype, seed + 1, fraction).to(device)
    # Finite image tokens, so that a nonzero layer's difference is a real one (NaN would also differ).
    positive, negative = random_tensor((2, 1, 4, 768), dtype, seed + 2, special([-0.0], dtype), fraction).to(device)
    scale = [on(device, zero) if z else on(device, nonzero) for z in zeros]
    hook = CheckingHook(ImagePromptAttention(layers, positive, negative, scale, rows=rows))
    with torch.no_grad(), ProjectionCalls(layers) as calls:
        unet(x, torch.tensor(321, device=device), context, hook)
    assert hook.order == list(range(16))  # the hook sees the 16 layers in run order
    assert [hook.same[i] for i in range(16)] == zeros  # bit-identical exactly where λ is 0
    assert sorted(set(calls.layers)) == [i for i in range(16) if not zeros[i]]


class LaunchesPerLayer:
    """Runs the adapter hook and records how many fused-kernel launches each layer call made."""

    def __init__(self, inner, launches: kernel_spy.KernelLaunches):
        self.inner, self.launches, self.calls = inner, launches, []  # calls: (layer, launches, output)

    def __call__(self, layer, q, k, v):
        before = len(self.launches)
        out = self.inner(layer, q, k, v)
        self.calls.append((layer, self.launches.launches[before:], out))
        return out


def test_fused_kernel_runs_once_in_each_nonzero_layer_and_never_in_a_zero_one():
    """Dispatching as on an sm_80+ GPU (the interpreter runs the kernel): in one UNet call the
    fused kernel is launched exactly once in each layer whose λ ≠ 0 (a float or a 0-d tensor), with
    that layer's λ, its output being the layer's; and never in a layer whose λ = 0, whatever the
    zero's form, that layer giving plain attention's bits. The hypothesis test above checks the
    bits for random λ patterns without launching the interpreter (too slow for every example);
    this one is the smallest SD1.5-structured UNet (16 channels, 8×8 latents)."""
    dtype, device = torch.float32, "cpu"
    unet = small_unet(16, 8, 2, 32, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    x = latents_like((2, 4, 8, 8), dtype, 12, 0.1)
    context = text_tokens((2, 5, 32), dtype, 13, 0.1)
    positive, negative = torch.randn(2, 1, 4, 768, generator=torch.Generator().manual_seed(14))
    zero_forms = [0, -0.0, torch.tensor(0.0), torch.tensor(-0.0, dtype=torch.float16), np.float32(-0.0),
                  fractions.Fraction(0), torch.tensor(0), torch.tensor(-0.0, dtype=torch.bfloat16)]
    nonzero_forms = [0.7, torch.tensor(-0.4), 1, torch.tensor(2.0, dtype=torch.float16)]
    # each down and up block has zero and nonzero layers; mid (6) is nonzero, layer 0 (64 queries) zero
    nonzero = [1, 3, 4, 6, 8, 10, 12, 15]
    forms = iter(zero_forms)
    scale = [nonzero_forms[nonzero.index(i) % 4] if i in nonzero else next(forms) for i in range(16)]
    lam = expand_scale(scale)
    with torch.no_grad(), fused_dispatch() as launches:
        hook = LaunchesPerLayer(CheckingHook(ImagePromptAttention(layers, positive, negative, scale)), launches)
        fused = unet(x, torch.tensor(400), context, hook)
    assert [layer for layer, _, _ in hook.calls] == list(range(16))
    for layer, launched, out in hook.calls:
        if layer in nonzero:
            assert len(launched) == 1, f"layer {layer} (λ {lam[layer]}): {len(launched)} launches"
            assert launched[0].lam == lam[layer] and launched[0].out is out
        else:
            assert launched == [], f"layer {layer} (λ = {scale[layer]!r}) launched the fused kernel"
    assert [hook.inner.same[i] for i in range(16)] == [i not in nonzero for i in range(16)]
    assert len(launches) == len(nonzero)
    # the kernel's outputs are the decoupled attention: the UNet output is the reference path's
    with torch.no_grad():
        reference = unet(x, torch.tensor(400), context, ImagePromptAttention(layers, positive, negative, scale))
    assert (fused - reference).abs().max() <= 1e-5  # measured 5e-7 (outputs up to ~1.2)


# ----------------------------------------------------------------------------------------------
# The DDIM loop with CFG


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(PROPERTY, max_examples=5)
@given(config=unet_configs(), copies=st.integers(1, 2), steps=st.integers(1, 3),
       guidance=st.sampled_from([1.0, 3.0, 7.5]), hw=st.sampled_from([(8, 8), (16, 8)]),
       seed=st.integers(0, 2**31 - 1), fraction=st.sampled_from([0.0, 0.1]), zero=zero_scales)
def test_denoise_with_zero_lambda_hook_is_bit_identical(device, config, dtype, copies, steps, guidance, hw, seed,
                                                        fraction, zero):
    unet = small_unet(*config, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    sd = StableDiffusion(unet, None, None, tokenizer=tokenizer())
    cond = text_tokens((1, 7, config[3]), dtype, seed, fraction).to(device)
    uncond = text_tokens((1, 7, config[3]), dtype, seed + 1, fraction).to(device) if guidance > 1 else None
    latents = latents_like((copies, 4, *hw), dtype, seed + 2, fraction).to(device)
    positive, negative = image_tokens((2, 1, 4, 768), dtype, seed + 3, 0.3).to(device)
    scale, strict = zero

    base = sd.denoise(latents, cond, uncond, DDIM(steps), guidance, progress=False)
    with ProjectionCalls(layers) as calls, fused_dispatch() as launches:
        with_hook = sd.denoise(latents, cond, uncond, DDIM(steps), guidance,
                               ImagePromptAttention(layers, positive, negative, on(device, scale), strict=strict),
                               progress=False)
    assert same_bits(with_hook, base), describe_difference(with_hook, base)
    assert calls.layers == [] and len(launches) == 0


# ----------------------------------------------------------------------------------------------
# The whole pipeline (tiny text encoder and VAE), with an IPAdapter built the public way


class RecordingVAE(torch.nn.Module):
    def __init__(self, vae: VAE):
        super().__init__()
        self.vae, self.latents = vae, []

    def decode(self, latents):
        self.latents.append(latents.clone())
        return self.vae.decode(latents)


@functools.lru_cache(maxsize=2)
def tiny_pipeline(dtype: torch.dtype, device: str) -> tuple[StableDiffusion, IPAdapter]:
    unet = small_unet(16, 8, 2, 32, dtype, device)
    torch.manual_seed(11)
    text = TextEncoder(TextEncoderConfig(width=32, layers=1, heads=2, mlp_width=37)).eval().to(device, dtype)
    vae = VAE(VAEConfig(channels=16, channel_mult=(1, 1, 1, 1), res_blocks=1, groups=8)).eval().to(device, dtype)
    adapter = IPAdapter(AdapterSpec("base", VIT_H, "image_embeds", 1024, 4), widths_of(unet)).eval().to(device, dtype)
    return StableDiffusion(unet, RecordingVAE(vae), text, tokenizer=tokenizer()), adapter


def generate(sd: StableDiffusion, hook, guidance: float, num_images: int):
    sd.vae.latents.clear()
    images = sd("a red bicycle", "blurry", steps=2, guidance=guidance, seed=5, width=64, height=64,
                num_images=num_images, hook=hook, progress=False)
    return b"".join(im.tobytes() for im in images), sd.vae.latents[0]


@pytest.mark.parametrize("device", DEVICES)
@settings(PROPERTY, max_examples=4)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), guidance=st.sampled_from([1.0, 7.5]),
       num_images=st.integers(1, 2), zero=zero_scales, seed=st.integers(0, 2**31 - 1))
def test_pipeline_with_zero_lambda_adapter_is_bit_identical(device, dtype, guidance, num_images, zero, seed):
    sd, adapter = tiny_pipeline(dtype, device)
    features = image_tokens((1, 1024), dtype, seed, 0.1).to(device)  # NaN / inf in the image features
    with torch.no_grad():
        positive, negative = tokens_from_features(adapter, features)
    scale, strict = zero
    base_images, base_latents = generate(sd, None, guidance, num_images)
    with fused_dispatch() as launches:
        images, latents = generate(sd, adapter.hook(positive, negative, on(device, scale), strict=strict), guidance,
                                   num_images)
    assert same_bits(latents, base_latents), describe_difference(latents, base_latents)
    assert images == base_images
    assert len(launches) == 0


# ----------------------------------------------------------------------------------------------
# Controls: the comparisons above can fail


def one_layer_dicts():
    """Per-block dicts with exactly one nonzero layer (and zeros elsewhere)."""
    return [{"mid": 0.5}, {"down": {"block_0": [0.0, 1.0]}}, {"up": {"block_3": [0.0, 0.0, -0.0]}, "mid": [1.0]},
            {"down": 0.0, "up": {"block_1": [0.0, 0.25, 0.0]}}]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1.0, torch.tensor(0.5), [0.0] * 15 + [1.0], *one_layer_dicts()],
                         ids=lambda s: repr(s).replace(" ", ""))
def test_control_nonzero_lambda_changes_the_unet_output(device, dtype, scale):
    unet = small_unet(32, 8, 4, 768, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    x = latents_like((2, 4, 8, 8), dtype, 0, 0.1).to(device)
    context = text_tokens((2, 5, 768), dtype, 1, 0.1).to(device)
    positive, negative = torch.randn(2, 1, 4, 768, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    with torch.no_grad():
        base = unet(x, torch.tensor(500, device=device), context)
        hook = ImagePromptAttention(layers, positive, negative, on(device, scale))
        with_hook = unet(x, torch.tensor(500, device=device), context, hook)
        hook.set_scale(-0.0)  # ... and back to λ = 0 gives the base bits again, K/V cache and all
        again = unet(x, torch.tensor(500, device=device), context, hook)
    assert torch.isfinite(base).all() and torch.isfinite(with_hook).all()
    assert not same_bits(with_hook, base)
    assert (bits(with_hook) != bits(base)).float().mean() > 0.5  # not just a stray bit
    assert same_bits(again, base)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_control_nonzero_lambda_changes_denoised_latents_and_images(device, dtype):
    unet = small_unet(16, 4, 2, 32, dtype, device)
    layers = adapter_layers(tuple(widths_of(unet)), 768, dtype, device)
    sd = StableDiffusion(unet, None, None, tokenizer=tokenizer())
    cond, uncond = text_tokens((2, 1, 6, 32), dtype, 3, 0.1).to(device)
    latents = latents_like((1, 4, 8, 8), dtype, 4, 0.1).to(device)
    positive, negative = torch.randn(2, 1, 4, 768, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    base = sd.denoise(latents, cond, uncond, DDIM(3), 7.5, progress=False)
    changed = sd.denoise(latents, cond, uncond, DDIM(3), 7.5,
                         ImagePromptAttention(layers, positive, negative, {"mid": 1.0}), progress=False)
    assert torch.isfinite(changed).all() and not same_bits(changed, base)

    if dtype != torch.float16:
        pipe, adapter = tiny_pipeline(dtype, device)
        features = torch.randn(1, 1024, generator=torch.Generator().manual_seed(6)).to(device, pipe.dtype)
        with torch.no_grad():
            positive, negative = tokens_from_features(adapter, features)
        base_images, base_latents = generate(pipe, None, 7.5, 1)
        images, lat = generate(pipe, adapter.hook(positive, negative, {"up": {"block_1": 1.0}}), 7.5, 1)
        assert not same_bits(lat, base_latents)
        assert images != base_images


def test_bits_see_signed_zeros_and_nan_payloads():
    """The comparison itself: equal values with different bits are different."""
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    for dtype in DTYPES:
        nans = nan_payloads(dtype)
        assert torch.isnan(nans).all()
        assert not same_bits(nans[:1], nans[1:2])
        assert same_bits(nans, nans.clone())
