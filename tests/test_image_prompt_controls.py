"""Image-prompt controls at the attention hook, against the references, on the small config
(SD1.5's 16 cross-attention layers, 768-wide tokens), fp32, CPU:

* several adapters and masks per image: one UNet step against diffusers' UNet with its
  IPAdapterAttnProcessor2_0 (several ``to_k_ip``, ``ip_adapter_masks``), ≤ 1e-4;
* ComfyUI's embeds scaling and its σ-based start/end, against its formulas written out here
  (CrossAttentionPatch.py / comfy model_sampling.py, as quoted in
  shared/notes/reference-facts-wave2.md §6.3–6.4);
* what must stay the base model's exact bits: a range that excludes the step, a mask of zeros.
"""
import pytest
import torch
import torch.nn.functional as F

from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
from ipadapter_min.ip_adapter.several import ImagePrompts
from ipadapter_min.ip_adapter.masks import mask_grid
from ipadapter_min.ip_adapter.embeds_scaling import scale_image_kv
from ipadapter_min.ip_adapter.layers import LAYERS
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.samplers.step_ranges import in_sigma_range, percent_to_sigma, sigma_at
from reference_models import randomize_

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL_WIDTHS = (32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32)  # ref.SMALL's UNet


def diffusers_name(layer) -> str:
    block = "mid_block" if layer.block == "mid" else layer.block.replace(".block_", "_blocks.")
    return f"{block}.attentions.{layer.position}.transformer_blocks.0.attn2"


def random_layers(seed: int) -> IPAdapterLayers:
    return randomize_(IPAdapterLayers(SMALL_WIDTHS, 768), seed)


def reference_processors(theirs, adapters, scales, tokens_per_adapter):
    """diffusers' IP-Adapter processors on every cross-attention layer, holding our adapters'
    to_k_ip/to_v_ip weights (one pair per adapter)."""
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    procs = {name: AttnProcessor2_0() for name in theirs.attn_processors}
    for layer in LAYERS:
        name = f"{diffusers_name(layer)}.processor"
        proc = IPAdapterAttnProcessor2_0(SMALL_WIDTHS[layer.index], 768, num_tokens=tokens_per_adapter, scale=scales)
        with torch.no_grad():
            for i, adapter in enumerate(adapters):
                proc.to_k_ip[i].weight.copy_(adapter[layer.index].to_k_ip.weight)
                proc.to_v_ip[i].weight.copy_(adapter[layer.index].to_v_ip.weight)
        procs[name] = proc
    theirs.set_attn_processor(procs)


def region_masks() -> torch.Tensor:
    """Two masks over a 64×64 output (the small UNet's 8×8 latents): left and right halves,
    soft-edged so that the bicubic resize has something to do."""
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :30] = 1
    masks[1, :, 34:] = 1
    masks[:, :, 30:34] = 0.5
    return masks


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:You have passed a tensor")
def test_two_adapters_with_masks_match_diffusers(small):
    unet = load_sd15(small.folder)["unet"]
    theirs = small.load_unet()
    adapters = [random_layers(1), random_layers(2)]
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 768, generator=g)
    # adapter 0: two masked images of 4 tokens each; adapter 1: one image of 16 tokens, unmasked
    positive = [torch.randn(1, 2, 4, 768, generator=g), torch.randn(1, 1, 16, 768, generator=g)]
    negative = [torch.randn(1, 2, 4, 768, generator=g), torch.randn(1, 1, 16, 768, generator=g)]
    scales, masks = [0.8, 0.6], region_masks()
    reference_processors(theirs, adapters, scales, (4, 16))
    ip_states = [torch.cat([n, p]) for n, p in zip(negative, positive)]  # diffusers' CFG order: negative rows first
    t = torch.tensor(700)
    expected = theirs(x, t, (text, ip_states), cross_attention_kwargs={"ip_adapter_masks": [masks[None], None]}).sample

    hooks = [ImagePromptAttention(adapters[0], positive[0].reshape(1, 8, 768), negative[0].reshape(1, 8, 768), 0.8,
                                  masks=masks),
             ImagePromptAttention(adapters[1], positive[1].reshape(1, 16, 768), negative[1].reshape(1, 16, 768), 0.6)]
    mine = unet(x, t, text, ImagePrompts(hooks))
    error = (mine - expected).abs().max().item()
    print(f"two adapters, one with two masked images: max abs error {error:.2e}")
    assert error <= 1e-4
    one = unet(x, t, text, ImagePrompts(hooks[1:]))
    unmasked = unet(x, t, text, ImagePrompts([ImagePromptAttention(adapters[0], positive[0].reshape(1, 8, 768),
                                                                   negative[0].reshape(1, 8, 768), 0.8), hooks[1]]))
    assert (mine - one).abs().max() > 100 * 1e-4  # the second adapter adds something
    assert (mine - unmasked).abs().max() > 100 * 1e-4  # and the masks change it


def test_mask_grid_is_diffusers_and_refuses_other_aspects():
    from diffusers.image_processor import IPAdapterMaskProcessor
    for size, queries in (((64, 64), 4096), ((64, 96), 24 * 16), ((48, 64), 6 * 8)):
        mask = torch.rand(1, *size)
        h, w = mask_grid(size[0], size[1], queries)
        expected = IPAdapterMaskProcessor.downsample(mask, 1, queries, 1)[0, :, 0]
        ours = F.interpolate(mask[None], size=(h, w), mode="bicubic").reshape(-1)
        assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="a 64×64 mask does not fit a layer of 384 positions"):
        mask_grid(64, 64, 24 * 16)


def comfyui_out_ip(q, ip_k, ip_v, weight, embeds_scaling, width):
    """CrossAttentionPatch.ipadapter_attention's image term for (batch, tokens, channels) keys."""
    if embeds_scaling == "K+mean(V) w/ C penalty":
        scaling = float(width) / 1280.0
        weight = weight * scaling
        ip_k = ip_k * weight
        ip_v_mean = torch.mean(ip_v, dim=1, keepdim=True)
        ip_v = (ip_v - ip_v_mean) + ip_v_mean * weight
        return F.scaled_dot_product_attention(q, ip_k, ip_v)
    if embeds_scaling == "K+V w/ C penalty":
        weight = weight * float(width) / 1280.0
        return F.scaled_dot_product_attention(q, ip_k * weight, ip_v * weight)
    if embeds_scaling == "K+V":
        return F.scaled_dot_product_attention(q, ip_k * weight, ip_v * weight)
    return F.scaled_dot_product_attention(q, ip_k, ip_v) * weight


@pytest.mark.parametrize("mode", ["V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_embeds_scaling_matches_comfyui(mode):
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 10, 640, generator=g), torch.randn(1, 4, 640, generator=g), torch.randn(1, 4, 640, generator=g)
    expected = comfyui_out_ip(q, k, v, 0.7, mode, 640)
    k2, v2, weight = scale_image_kv(mode, k, v, 0.7, 640)
    ours = weight * F.scaled_dot_product_attention(q, k2, v2)
    assert (ours - expected).abs().max() <= 1e-6
    plain = F.scaled_dot_product_attention(q, k, v)
    assert (ours - plain).abs().max() > 1e-3  # each mode changes the term


def comfyui_percent_to_sigma(percent):
    """comfy/model_sampling.py ModelSamplingDiscrete, SD1.5's "linear" (= scaled linear) betas."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    log_sigmas = sigmas.log().float()
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    t = torch.clamp(torch.tensor((1.0 - percent) * 999.0).float(), min=0, max=999)
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp().item()


def test_sigma_range_is_comfyuis():
    for percent in (0.0, 0.1, 0.25, 0.5, 0.777, 1.0):
        assert percent_to_sigma(percent) == comfyui_percent_to_sigma(percent)
    # DDIM-30's timesteps under start_at 0.2 / end_at 0.6: the steps whose σ lies in between
    timesteps = [i * 33 + 1 for i in reversed(range(30))]
    active = [t for t in timesteps if in_sigma_range(t, 0.2, 0.6)]
    hi, lo = comfyui_percent_to_sigma(0.2), comfyui_percent_to_sigma(0.6)
    assert active == [t for t in timesteps if lo <= sigma_at(t) <= hi] and 0 < len(active) < 30


@torch.no_grad()
@pytest.mark.parametrize("step_range", ["steps", "sigmas"])
def test_outside_the_range_and_under_zero_masks_the_base_bits(small, step_range):
    unet = load_sd15(small.folder)["unet"]
    g = torch.Generator().manual_seed(3)
    x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, 768, generator=g)
    positive, negative = torch.randn(1, 8, 768, generator=g), torch.randn(1, 8, 768, generator=g)
    base = unet(x, torch.tensor(500), text)
    hook = ImagePromptAttention(random_layers(4), positive, negative, 0.9, start=0.5, end=1.0, step_range=step_range)
    hook.set_step(0, 10, 901)  # early: outside [0.5, 1]
    assert torch.equal(unet(x, torch.tensor(500), text, hook), base)
    hook.set_step(9, 10, 1)
    assert not torch.equal(unet(x, torch.tensor(500), text, hook), base)
    zeros = ImagePromptAttention(random_layers(4), positive, negative, 0.9, masks=torch.zeros(2, 64, 64))
    assert torch.equal(unet(x, torch.tensor(500), text, ImagePrompts([zeros])), base)


def test_precise_types_swap_the_rows():
    """On a swapped layer the unconditional rows attend to the positive image and the conditional
    rows get exactly nothing from the image."""
    layers = random_layers(5)
    g = torch.Generator().manual_seed(6)
    positive, negative = torch.randn(1, 4, 768, generator=g), torch.randn(1, 4, 768, generator=g)
    q, k, v = (torch.randn(2, 8, 16, 16, generator=g) for _ in range(3))  # layer 4: 128 wide here, 8 heads
    text = F.scaled_dot_product_attention(q, k, v)
    swapped = ImagePromptAttention(layers, positive, negative, 0.7, swapped=frozenset({4}))
    plain = ImagePromptAttention(layers, positive, negative, 0.7)
    out, reference = swapped(4, q, k, v), plain(4, q, k, v)
    assert torch.equal(out[1], text[1])  # conditional row: no image
    flipped = ImagePromptAttention(layers, negative, positive, 0.7)(4, q, k, v)  # positive tokens in uncond rows
    assert (out[0] - flipped[0]).abs().max() <= 1e-6 and (out[0] - reference[0]).abs().max() > 1e-3


def comfyui_combine(img_cond_embeds, combine_embeds):
    """ipadapter_execute's combine_embeds (IPAdapterPlus.py)."""
    if combine_embeds == "add":
        return torch.sum(img_cond_embeds, dim=0).unsqueeze(0)
    if combine_embeds == "subtract":
        return (img_cond_embeds[0] - torch.mean(img_cond_embeds[1:], dim=0)).unsqueeze(0)
    if combine_embeds == "average":
        return torch.mean(img_cond_embeds, dim=0).unsqueeze(0)
    return torch.mean(img_cond_embeds / torch.norm(img_cond_embeds, dim=0, keepdim=True), dim=0).unsqueeze(0)


@pytest.mark.parametrize("mode", ["add", "subtract", "average", "norm average"])
@pytest.mark.parametrize("shape", [(3, 1024), (3, 257, 1280)])  # base embeddings, plus hidden states
def test_combine_modes_match_comfyui(mode, shape):
    from ipadapter_min.ip_adapter.combine import combine_features
    features = torch.randn(*shape, generator=torch.Generator().manual_seed(7))
    expected = comfyui_combine(features, mode)
    ours = combine_features(features, mode)
    assert ours.shape == expected.shape and (ours - expected).abs().max() <= 1e-5
    assert (ours - features[:1]).abs().max() > 1e-2  # not just the first image
