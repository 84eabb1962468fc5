"""IP-Adapter: projection models, file reading, λ per layer and the attention hook, checked against
diffusers (the oracle) with random weights written in the official file formats."""
from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import ipadapter_min.ip_adapter.hook as ipa
from ipadapter_min.ip_adapter.hook_options import ImagePromptAttention
import kernel_spy
from ipadapter_min.models.attention import attention
from ipadapter_min.kernels import decoupled_attention, decoupled_attention_reference
from ipadapter_min.models.configs import VIT_BIGG, VIT_H, ImageEncoderConfig, ResamplerConfig
from ipadapter_min.formats.ip_adapter import FORMAT, detect_variant
from ipadapter_min.samplers.cfg import CFGBatch, per_row
from ipadapter_min.models.clip_preprocess import preprocess
from ipadapter_min.ip_adapter.resampler import Resampler
from ipadapter_min.ip_adapter.adapter import IPAdapterLayers
from ipadapter_min.ip_adapter.combine import combined_tokens
from ipadapter_min.ip_adapter.tokens import encode_images, image_prompt_tokens, tokens_from_features
from ipadapter_min.ip_adapter.layers import LAYERS, expand_scale
from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
from ipadapter_min.loading.ip_adapter import ip_adapter_from_state_dict, load_image_encoder, load_ip_adapter
from reference_models import (OFFICIAL_WIDTHS, official_state, projection_shapes, random_hf_model, random_tensors,
                              sample_images, write_official)
from ipadapter_min.formats.files import CheckpointError, read_metadata
from weights_convert.convert import convert_ip_adapter, write_ip_adapter

@pytest.fixture(scope="module")
def states():
    return {v: official_state(v, seed=i) for i, v in enumerate(("base", "vit-g", "plus", "full-face"))}


@pytest.fixture(scope="module")
def mini_unet():
    """diffusers' SD1.5 UNet structure at a tenth of the width, with the attn2 processor names in
    the order the forward pass runs them."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64, 128, 128), norm_num_groups=8, cross_attention_dim=768,
                                attention_head_dim=8, sample_size=16).eval()
    order = []
    handles = [m.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
               for name, m in unet.named_modules() if name.endswith("attn2")]
    with torch.no_grad():
        unet(torch.zeros(1, 4, 16, 16), 1, torch.zeros(1, 3, 768))
    for h in handles:
        h.remove()
    unet.run_order = order
    return unet


@pytest.fixture(scope="module")
def mini_ip(mini_unet):
    """A random official-format adapter at the mini UNet's widths, loaded by diffusers."""
    state = official_state("base", widths={n: w // 10 for n, w in OFFICIAL_WIDTHS.items()})
    mini_unet._load_ip_adapter_weights({k: {n: t.float() for n, t in v.items()} for k, v in state.items()},
                                       low_cpu_mem_usage=False)
    return state


# ---------------------------------------------------------------------------------------------
# Projection models vs diffusers


@pytest.mark.parametrize("variant,suffix", [("base", ".bin"), ("base", ".safetensors"), ("vit-g", ".safetensors"),
                                            ("plus", ".bin"), ("plus", ".safetensors"), ("full-face", ".bin")])
def test_projection_matches_diffusers(variant, suffix, states, mini_unet, tmp_path):
    from diffusers import UNet2DConditionModel
    state = states[variant]
    path = tmp_path / f"adapter{suffix}"
    write_official(state, path)
    ours = load_ip_adapter(path, dtype=torch.float32)

    fp32 = {k: v.float() for k, v in state["image_proj"].items()}
    theirs = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(mini_unet, fp32, low_cpu_mem_usage=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn({"base": (2, 1024), "vit-g": (2, 1280)}.get(variant, (2, 257, 1280)), generator=g)
    with torch.no_grad():
        got, want = ours(x), theirs(x)
    assert got.shape == want.shape == (2, ours.spec.tokens, 768)
    err = (got - want).abs().max().item()
    print(f"{variant}{suffix}: max abs {err:.2e}")
    assert err <= 1e-5
    for layer in LAYERS:  # the 16 adapter layers sit where the official numbering says
        for kv in "kv":
            assert torch.equal(ours.ip_layers[layer.index].get_submodule(f"to_{kv}_ip").weight,
                               state["ip_adapter"][f"{layer.official}.to_{kv}_ip.weight"].float())


def test_several_images_concatenate_as_diffusers(states, mini_unet):
    from diffusers import UNet2DConditionModel
    from diffusers.models.embeddings import MultiIPAdapterImageProjection
    state = states["plus"]
    adapter = _adapter(state)
    theirs = MultiIPAdapterImageProjection([UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        mini_unet, {k: v.float() for k, v in state["image_proj"].items()}, low_cpu_mem_usage=False)])
    g = torch.Generator().manual_seed(2)
    features, negative = torch.randn(2, 257, 1280, generator=g), torch.randn(2, 257, 1280, generator=g)
    with torch.no_grad():
        positive, negative_tokens = tokens_from_features(adapter, features, negative)
        want = theirs([torch.cat([negative[None], features[None]])])[0]  # (2, images, tokens, 768)
    assert positive.shape == negative_tokens.shape == (1, 2 * 16, 768)
    assert (torch.cat([negative_tokens, positive]) - want.reshape(2, 2 * 16, 768)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Variant detection and file errors


def _base_shapes(embed, tokens, context):
    return {"proj.weight": (tokens * context, embed), "proj.bias": (tokens * context,), "norm.weight": (context,),
            "norm.bias": (context,)}


# A plus adapter on a small encoder's 64-wide hidden states, for a UNet of 128-wide context
SMALL_RESAMPLER = ResamplerConfig(dim=128, depth=2, heads=2, num_queries=8, embedding_dim=64, output_dim=128)


@pytest.mark.parametrize("variant,expected", [
    ("base", ("base", VIT_H, "image_embeds", 1024, 4, 768)),
    ("light", ("base", VIT_H, "image_embeds", 1024, 4, 768)),
    ("vit-g", ("vit-g", VIT_BIGG, "image_embeds", 1280, 4, 768)),
    ("plus", ("plus", VIT_H, "penultimate", 1280, 16, 768)),
    ("full-face", ("full-face", VIT_H, "penultimate", 1280, 257, 768)),
    # not releases: a demo model's adapter, SDXL's token width, an unknown embedding
    (_base_shapes(128, 4, 128), ("base", "custom 128-wide", "image_embeds", 128, 4, 128)),
    (_base_shapes(1280, 4, 2048), ("vit-g", VIT_BIGG, "image_embeds", 1280, 4, 2048)),
    (_base_shapes(512, 16, 768), ("base", "custom 512-wide", "image_embeds", 512, 16, 768)),
    ("small plus", ("plus", "custom 64-wide", "penultimate", 64, 8, 128)),
])
def test_detect_variant(variant, expected):
    """Any embedding and token width is read from the shapes; whether the tokens fit a UNet is
    checked when the adapter meets one (test_adapter_for_another_base_model_is_refused)."""
    if variant == "small plus":
        shapes = {k: v.shape for k, v in Resampler(SMALL_RESAMPLER).state_dict().items()}
    else:
        shapes = projection_shapes(variant) if isinstance(variant, str) else variant
    spec = detect_variant(shapes)
    assert (spec.variant, spec.encoder, spec.encoder_output, spec.feature_dim, spec.tokens, spec.context_dim) == expected
    if variant == "plus":
        c = spec.resampler
        assert (c.dim, c.depth, c.dim_head, c.heads, c.num_queries, c.embedding_dim, c.output_dim, c.ff_mult) == \
            (768, 4, 64, 12, 16, 1280, 768, 4)
    if variant == "small plus":
        assert spec.resampler == SMALL_RESAMPLER


@pytest.mark.parametrize("shapes,message", [
    ({"proj.0.weight": (3072, 512), "proj.0.bias": (3072,), "proj.2.weight": (3072, 3072), "proj.2.bias": (3072,),
      "norm.weight": (768,), "norm.bias": (768,)}, "FaceID"),
    ({"proj.weight": (3070, 1024), "proj.bias": (3070,), "norm.weight": (768,), "norm.bias": (768,)},
     "3070 outputs, not a multiple of 768"),
    ({"proj.0.weight": (1024, 1024), "proj.2.weight": (768, 1024), "proj.3.weight": (768,)},
     "1024-wide hidden states, expected ViT-H/14's 1280"),
    ({"proj.weight": (3072, 1024)}, "image_proj.norm.weight"),
    ({"something": (3,)}, "not an IP-Adapter"),
])
def test_detect_variant_errors(shapes, message):
    with pytest.raises(CheckpointError, match=message):
        detect_variant(shapes, "x.bin")


def _flat(state):
    return {f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}


def test_adapter_for_another_base_model_is_refused(states):
    """An adapter whose tokens are SDXL's 2048 wide reads as a vit-G-shaped adapter, and is
    refused where it meets a UNet of 768-wide context (SD1.5's, by default), before anything is built."""
    state = _flat(states["base"])
    state.update({f"image_proj.{k}": v for k, v in random_tensors(_base_shapes(1280, 4, 2048), 0, torch.float16).items()})
    message = ("/some/sdxl.bin: the adapter's image tokens are 2048 wide, this UNet's cross-attention takes 768 "
               "(an adapter for another base model, e.g. SDXL?)")
    with pytest.raises(CheckpointError) as info:
        ip_adapter_from_state_dict(state, "/some/sdxl.bin")
    assert str(info.value) == message
    with pytest.raises(CheckpointError, match="image tokens are 768 wide, this UNet's cross-attention takes 128"):
        ip_adapter_from_state_dict(_flat(states["base"]), "/some/sd15.bin", context_dim=128)


@pytest.mark.parametrize("edit,message", [
    (lambda s: s.pop("ip_adapter.31.to_v_ip.weight"), "missing key 'ip_adapter.31.to_v_ip.weight'"),
    (lambda s: s.pop("image_proj.norm.bias"), "missing key 'image_proj.norm.bias'"),
    (lambda s: s.update({"ip_adapter.33.to_k_ip.weight": torch.zeros(320, 768)}), "'ip_adapter.33.to_k_ip.weight'"),
    (lambda s: s.update({"ip_adapter.1.to_k_lora.down.weight": torch.zeros(4, 320)}), "unexpected key"),
    (lambda s: s.update({"image_proj.extra": torch.zeros(1)}), "key 'image_proj.extra' is unexpected"),
    (lambda s: s.update({"ip_adapter.5.to_k_ip.weight": torch.zeros(320, 768)}),
     r"'ip_adapter.5.to_k_ip.weight' has shape \[320, 768\].*\[640, 768\]"),
    (lambda s: s.update({"ip_adapter.5.to_k_ip.weight": torch.zeros(640, 768, dtype=torch.int8)}), "floating-point"),
    (lambda s: s.update({"ip_layers.2.to_k_ip.weight": torch.zeros(640, 768)}), "duplicates"),
])
def test_bad_states_give_one_line_errors(edit, message, states):
    state = _flat(states["base"])
    edit(state)
    with pytest.raises(CheckpointError, match=message) as info:
        ip_adapter_from_state_dict(state, "/some/bad.bin")
    assert str(info.value).startswith("/some/bad.bin: ") and "\n" not in str(info.value)


def test_corrupt_and_foreign_files(states, tmp_path):
    state = _flat(states["base"])
    del state["ip_adapter.29.to_k_ip.weight"]
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match="bad.safetensors: missing key 'ip_adapter.29.to_k_ip.weight'"):
        load_ip_adapter(tmp_path / "bad.safetensors")
    for name in ("junk.bin", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"not a checkpoint at all" * 10)
        with pytest.raises(CheckpointError, match="junk"):
            load_ip_adapter(tmp_path / name)
    foreign = tmp_path / "unet.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign), metadata={"format": "ipadapter_min.sd15"})
    with pytest.raises(CheckpointError, match="not an IP-Adapter"):
        load_ip_adapter(foreign)
    torch.save({"image_proj": {"proj.weight": torch.zeros(1)}, "ip_adapter": {}}, tmp_path / "small.bin")
    with pytest.raises(CheckpointError, match="small.bin"):
        load_ip_adapter(tmp_path / "small.bin")


def test_convert_round_trip(states, tmp_path):
    src = tmp_path / "ip-adapter-plus_sd15.bin"
    write_official(states["plus"], src)
    out = tmp_path / "converted.safetensors"
    summary = write_ip_adapter(src, out)
    assert "plus" in summary
    meta = read_metadata(out)
    assert meta["format"] == FORMAT and meta["variant"] == "plus" and meta["tokens"] == "16"
    assert (meta["encoder"], meta["feature_dim"], meta["context_dim"]) == (VIT_H, "1280", "768")
    tensors, _ = convert_ip_adapter(src)
    assert set(tensors) == {f"image_proj.{k}" for k in states["plus"]["image_proj"]} | {
        f"ip_layers.{i}.to_{kv}_ip.weight" for i in range(16) for kv in "kv"}
    assert tensors["image_proj.latents"].dtype == torch.float32  # dtypes as stored
    assert tensors["ip_layers.0.to_k_ip.weight"].dtype == torch.float16
    with pytest.raises(FileExistsError):
        write_ip_adapter(src, out)
    write_ip_adapter(src, out, force=True)
    a, b = load_ip_adapter(src, dtype=torch.float16), load_ip_adapter(out, dtype=torch.float16)
    assert a.spec == b.spec
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert next(b.parameters()).dtype == torch.float16
    # the recorded shape facts are checked against the weights; files written without them still read
    edited = tmp_path / "edited.safetensors"
    for metadata, error in (({**meta, "context_dim": "2048"}, "metadata says context_dim '2048', the weights give '768'"),
                            ({k: v for k, v in meta.items() if k not in ("feature_dim", "context_dim")}, None)):
        save_file(tensors, str(edited), metadata=metadata)
        if error is None:
            assert load_ip_adapter(edited).spec == a.spec
        else:
            with pytest.raises(CheckpointError, match=error):
                load_ip_adapter(edited)


# ---------------------------------------------------------------------------------------------
# Layer numbering and λ per layer vs diffusers


def test_layer_table_matches_diffusers_and_unet(mini_unet, mini_ip):
    """Layer i is the i-th cross-attention diffusers runs, its official key loads into that
    processor in diffusers, and the project's UNet gives the same number to the same module."""
    state, procs = mini_ip, mini_unet.attn_processors
    for layer, name in zip(LAYERS, mini_unet.run_order, strict=True):
        parts = name.split(".")  # down_blocks.0.attentions.1.transformer_blocks.0.attn2, mid_block.attentions.0...
        block = "mid" if parts[0] == "mid_block" else f"{parts[0].removesuffix('_blocks')}.block_{parts[1]}"
        assert (layer.block, layer.position) == (block, int(parts[-4]))
        proc = procs[f"{name}.processor"]
        assert proc.hidden_size * 10 == layer.width
        assert torch.equal(proc.to_k_ip[0].weight, state["ip_adapter"][f"{layer.official}.to_k_ip.weight"].float())

    from ipadapter_min.models.unet import UNet
    with torch.device("meta"):
        unet = UNet()
    numbered = {m.layer: (name, m.to_q.out_features) for name, m in unet.named_modules()
                if getattr(m, "layer", None) is not None}
    assert numbered == {layer.index: (layer.name, layer.width) for layer in LAYERS}


# (λ config, whether it names a block without attention layers: diffusers ignores those silently)
SCALES = [
    (0.6, False),
    ({"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}, False),  # InstantStyle on SD1.5
    ({"up": {"block_0": [0.0, 1.0, 0.0]}}, True),  # SDXL's InstantStyle style block: no attention in SD1.5
    ({"down": 0.3, "mid": 0.5, "up": {"block_3": 0.7}}, False),
    ({"mid": [0.25], "down": [0.1, 0.2], "up": {"block_2": [0.9]}}, False),
    ({"down": {"block_0": 1, "block_1": [0.5, 0.25]}, "up": 2.0}, False),
    ({"up": [0.1, 0.2, 0.3], "down": {"block_3": 4.0}}, True),
]


@pytest.mark.parametrize("scale,ignored_block", SCALES)
def test_scale_expansion_matches_diffusers(scale, ignored_block, mini_unet, mini_ip):
    from diffusers.loaders.ip_adapter import IPAdapterMixin
    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=mini_unet), scale)
    procs = mini_unet.attn_processors
    want = tuple(float(procs[f"{name}.processor"].scale[0]) for name in mini_unet.run_order)
    assert expand_scale(scale, strict=False) == want
    if ignored_block:
        with pytest.raises(ValueError, match="strict=False"):
            expand_scale(scale)
    else:
        assert expand_scale(scale) == want


def test_scale_forms_and_errors():
    per_layer = [i / 10 for i in range(16)]
    assert expand_scale(per_layer) == tuple(per_layer)
    assert expand_scale(torch.tensor(per_layer)) == tuple(torch.tensor(per_layer).tolist())
    assert expand_scale(torch.tensor(0.5)) == (0.5,) * 16
    assert all(str(s) == "0.0" for s in expand_scale(-0.0))  # no -0.0 left
    assert expand_scale({"mid": torch.tensor(2.0)})[6] == 2.0
    for bad, error in [([1.0] * 15, "16"), ({"middle": 1.0}, "unknown"), ({"mid": [1, 2]}, "mid"),
                       ({"up": {"block_1": [1, 2]}}, "up.block_1' has 3"), ({"down": {"block_9": 1}}, "block_9"),
                       ({"down": {"first": 1}}, "first"), (float("nan"), "finite"), ("1", "number"),
                       (torch.ones(2, 2), "16")]:
        with pytest.raises((ValueError, TypeError), match=error):
            expand_scale(bad)


# ---------------------------------------------------------------------------------------------
# The hook

HEADS, HEAD_DIM = 8, 8


def _qkv(batch=2, lq=24, lt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = HEADS * HEAD_DIM
    split = lambda t: t.view(t.shape[0], t.shape[1], HEADS, HEAD_DIM).transpose(1, 2)  # noqa: E731
    q = split(torch.randn(batch, lq, width, generator=g))  # non-contiguous, as the UNet passes it
    return q, split(torch.randn(batch, lt, width, generator=g)), split(torch.randn(batch, lt, width, generator=g))


@pytest.fixture(scope="module")
def small_layers():
    torch.manual_seed(3)
    return IPAdapterLayers(widths=[HEADS * HEAD_DIM] * 16)


@pytest.mark.parametrize("zero", [0, 0.0, -0.0, torch.tensor(0.0), torch.tensor(-0.0),
                                  {"down": {"block_0": [0.0, 1.0]}}, [-0.0] + [1.0] * 15])
def test_zero_scale_is_bit_identical_to_plain_attention(zero, small_layers, monkeypatch):
    """λ = 0 in layer 0, in any form: plain attention's bits, and — dispatching as on an sm_80+ GPU,
    where a call with image tokens takes the fused kernel (run here by the interpreter) — no kernel
    launch. kernels.decoupled_attention short-circuits only a Python-number 0, not a 0-dim tensor
    (that would sync), so a zero tensor λ must be caught by the hook."""
    kernel_spy.dispatch_as_on_a_gpu(monkeypatch)
    launches = kernel_spy.spy_on_kernel(monkeypatch)
    calls = []
    real = ipa.decoupled_attention
    monkeypatch.setattr(ipa, "decoupled_attention", lambda *a, **k: calls.append(len(a) + len(k)) or real(*a, **k))
    nan = torch.full((1, 4, 768), float("nan"))
    hook = ImagePromptAttention(small_layers, nan, nan, zero)
    q, k, v = _qkv()
    out = hook(0, q, k, v)
    assert torch.equal(out, attention(q, k, v)) and torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert calls == [3] and not hook._kv  # no image tokens passed, none computed
    assert len(launches) == 0, f"λ = {zero!r} launched the fused kernel"
    # control: the same dispatch with λ ≠ 0 in this layer (finite tokens) does launch it, once
    finite = torch.zeros(1, 4, 768)
    control = ImagePromptAttention(small_layers, finite, finite, torch.tensor(0.5) if isinstance(zero, torch.Tensor)
                                       else 0.5)
    with torch.no_grad():  # the fused branch is for inference (the patched device check skips the grad test)
        out = control(0, q, k, v)
    assert len(launches) == 1 and launches.launches[0].out is out and launches.launches[0].lam == 0.5


@pytest.mark.parametrize("scale", [1.0, 0.35, [0.5] * 16, {"mid": 0.8}])
def test_hook_matches_direct_computation(scale, small_layers):
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(2, 5, 768, generator=g)  # the default layout: row 0 unconditional, row 1 conditional
    hook = ImagePromptAttention(small_layers, tokens[1:], tokens[:1], scale)
    q, k, v = _qkv()
    layer = 6
    lam = expand_scale(scale)[layer]
    with torch.no_grad():
        out = hook(layer, q, k, v)
        again = hook(layer, q, k, v)  # from the cache
        lin = small_layers[layer]
        ki = (tokens @ lin.to_k_ip.weight.T).view(2, 5, HEADS, HEAD_DIM).transpose(1, 2)
        vi = (tokens @ lin.to_v_ip.weight.T).view(2, 5, HEADS, HEAD_DIM).transpose(1, 2)
        want = F.scaled_dot_product_attention(q, k, v) + lam * F.scaled_dot_product_attention(q, ki, vi)
    assert torch.equal(out, again) and set(hook._kv) == {layer}
    assert (out - want).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="batch 3"):
        hook(layer, *_qkv(batch=3))
    hook.set_scale(0.0)
    assert torch.equal(hook(layer, q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_hook_and_pipeline_take_the_reference_attention(small_layers, monkeypatch):
    """``reference_attention`` (the CLI's --reference-attention) reaches the hook: every image
    layer then runs diffusers' two-SDPA computation instead of kernels.decoupled_attention. Checked
    where the two differ: dispatching as on an sm_80+ GPU (the fused kernel runs through the
    interpreter), the reference hook launches no kernel and the default hook launches it once."""
    kernel_spy.dispatch_as_on_a_gpu(monkeypatch)
    launches = kernel_spy.spy_on_kernel(monkeypatch)
    tokens = torch.randn(2, 1, 5, 768, generator=torch.Generator().manual_seed(5))
    q, k, v = _qkv()
    with torch.no_grad():
        out = ImagePromptAttention(small_layers, *tokens, 0.5, attention=decoupled_attention_reference)(6, q, k, v)
        assert len(launches) == 0, "reference_attention launched the fused kernel"
        default = ImagePromptAttention(small_layers, *tokens, 0.5)(6, q, k, v)
    (launch,) = launches.launches  # the default took the fused kernel, once, and returned its output
    assert launch.out is default and launch.lam == 0.5
    assert (out - default).abs().max() <= 1e-5  # the same attention, computed two ways

    hooks = []
    pipe = IPAdapterPipeline.__new__(IPAdapterPipeline)  # no models: only the wiring is under test
    pipe.adapter = types.SimpleNamespace(hook=lambda positive, negative, scale, attention: hooks.append(attention))
    pipe.sd = lambda *args, **kwargs: []
    monkeypatch.setattr(pipe, "image_tokens", lambda *args: tuple(tokens), raising=False)
    pipe("", ["image"], reference_attention=True)
    pipe("", ["image"])
    assert hooks == [decoupled_attention_reference, decoupled_attention]


def test_hook_matches_diffusers_processor():
    """One SD1.5-sized cross-attention layer (320 wide, 8 heads of 40) with the hook vs diffusers'
    IPAdapterAttnProcessor2_0, two reference images of 4 tokens each."""
    from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
    torch.manual_seed(5)
    layers = IPAdapterLayers(widths=[320] * 16)
    attn = Attention(query_dim=320, cross_attention_dim=768, heads=8, dim_head=40, out_bias=True).eval()
    proc = IPAdapterAttnProcessor2_0(hidden_size=320, cross_attention_dim=768, num_tokens=(8,), scale=0.7)
    proc.to_k_ip[0].weight.data.copy_(layers[13].to_k_ip.weight)
    proc.to_v_ip[0].weight.data.copy_(layers[13].to_v_ip.weight)
    attn.set_processor(proc)
    x, text, images = torch.randn(2, 64, 320), torch.randn(2, 77, 768), torch.randn(2, 2, 4, 768)
    negative, positive = images.reshape(2, 1, 8, 768)  # diffusers' batch: the unconditional row first
    hook = ImagePromptAttention(layers, positive, negative, {"up": {"block_3": [0.7, 0, 0]}})
    split = lambda t: t.view(2, t.shape[1], 8, 40).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        want = attn(x, encoder_hidden_states=(text, [images]))
        out = hook(13, split(attn.to_q(x)), split(attn.to_k(text)), split(attn.to_v(text)))
        got = attn.to_out[0](out.transpose(1, 2).reshape(2, 64, 320))
    assert (got - want).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Reference images → positive and negative tokens vs diffusers' pipeline


def _adapter(state):
    return ip_adapter_from_state_dict(_flat(state))


@pytest.fixture(scope="module")
def small_vit_h(tmp_path_factory):
    """transformers' CLIPVisionModelWithProjection (random weights) and ours loaded from its folder.
    ViT-H's widths, which the adapters read (1024-wide embedding, 1280-wide hidden states), but 2
    layers: ImageEncoderConfig.tiny() is too narrow for them."""
    model = random_hf_model(ImageEncoderConfig(layers=2, mlp_width=512), seed=7)
    folder = tmp_path_factory.mktemp("small_vit_h")
    model.save_pretrained(folder)
    return model, load_image_encoder(folder)


@pytest.mark.parametrize("variant", ["base", "plus"])
def test_negative_and_positive_tokens_match_diffusers(variant, states, mini_unet, small_vit_h):
    """diffusers' StableDiffusionPipeline.prepare_ip_adapter_image_embeds (its encode_image makes
    the negative features: a zero embedding for base, the penultimate states of all-zero pixels for
    plus) and its image projection, against image_prompt_tokens for two reference images, laid out
    by the pipeline's CFG batch. fp32; measured max abs error ~5e-6 (token std 1)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.embeddings import MultiIPAdapterImageProjection
    hf, encoder = small_vit_h
    state = states[variant]
    projection = UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        mini_unet, {k: v.float() for k, v in state["image_proj"].items()}, low_cpu_mem_usage=False)
    reference = types.SimpleNamespace(image_encoder=hf, unet=types.SimpleNamespace(
        encoder_hid_proj=MultiIPAdapterImageProjection([projection])))
    reference.encode_image = functools.partial(StableDiffusionPipeline.encode_image, reference)
    pixels = preprocess(sample_images()[:2])
    copies = 2
    with torch.no_grad():
        embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds(reference, [pixels], None, "cpu", copies, True)
        want = reference.unet.encoder_hid_proj(embeds)[0]  # (2·copies, images, tokens, 768)
        positive, negative = image_prompt_tokens(_adapter(state), encoder, pixels)
    want = want.reshape(2 * copies, -1, 768)
    got = per_row(CFGBatch(copies, guided=True).rows, positive, negative)
    errors = [(got[i] - want[i]).abs().max().item() for i in range(2 * copies)]
    print(f"{variant}: max abs error per row {['%.1e' % e for e in errors]}")
    assert got.shape == want.shape and max(errors) <= 1e-5
    assert (positive - negative).abs().max() > 1  # the negative rows are not the positive ones


def test_average_combine_and_errors(states, small_vit_h):
    _, encoder = small_vit_h
    base, plus = _adapter(states["base"]), _adapter(states["plus"])
    embeds = torch.randn(2, 1024, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        positive, negative = combined_tokens(base, embeds, torch.zeros_like(embeds), "average", weights=[1, 3])
        assert positive.shape == negative.shape == (1, 4, 768)
        assert torch.allclose(positive, base(0.25 * embeds[:1] + 0.75 * embeds[1:]), atol=1e-6)
        assert torch.equal(negative, base(torch.zeros(1, 1024)))
    with pytest.raises(ValueError, match="negative_features"):
        tokens_from_features(plus, torch.zeros(1, 257, 1280))
    with pytest.raises(ValueError, match="width 1280, the encoder gave width 1024"):  # vit-G wants ViT-bigG's embedding
        encode_images(encoder, torch.zeros(1, 3, 224, 224), _adapter(states["vit-g"]).spec)
