"""The image encoder against transformers' CLIPVisionModelWithProjection (the test-only oracle).

Weights are random but saved in the real format (``save_pretrained``: config.json +
model.safetensors), then loaded through ``load_image_encoder`` directly and through the
converter (``ipadapter_min.formats.image_encoder``). One full-size ViT-H/14 model is written per
session (conftest's ``vit_h_reference``); the reference outputs come from it read back with
``from_pretrained`` and dropped before ours are loaded, so one 2.5 GB model is in memory at a
time (3.3 GB peak RSS for the file). The file takes ~25 s on 2 idle cores, most of it the random
fill, save_pretrained and three batch-1 forward passes. Everything else uses tiny models or the
meta device.
"""
from __future__ import annotations

import gc
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from transformers import (
    CLIPImageProcessor,
    CLIPImageProcessorPil,
    CLIPVisionModelWithProjection,
)

from ipadapter_min.models.configs import ImageEncoderConfig  # noqa: E402
from ipadapter_min.models.clip_preprocess import preprocess  # noqa: E402
from ipadapter_min.models.image_encoder import ImageEncoder  # noqa: E402
from ipadapter_min.loading.ip_adapter import image_encoder_from_state_dict, load_image_encoder
from reference_models import hf_config, random_hf_model, sample_images  # noqa: E402
from ipadapter_min.formats.files import CheckpointError, read_metadata  # noqa: E402
from ipadapter_min.formats.image_encoder import (  # noqa: E402
    FORMAT,
    config_from_transformers_json,
    config_from_transformers_shapes,
    transformers_shapes,
    transformers_to_open_clip,
)
from weights_convert.convert import convert_image_encoder, write_image_encoder  # noqa: E402

# fp32, both outputs. Measured: full ViT-H/14 image_embeds 3.3e-6, penultimate 1.6e-5 (its std
# is 5.7); tiny 9e-7 / 1.8e-6. The directly loaded and the converted model give the same numbers.
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("free_memory")


def reference(model, pixels):
    with torch.inference_mode():
        out = model(pixel_values=pixels, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def check_parity(encoder, pixels, ref, atol=ATOL):
    with torch.inference_mode():
        embeds, penultimate = encoder(pixels)
    ref_embeds, ref_pen = ref
    assert embeds.shape == ref_embeds.shape and penultimate.shape == ref_pen.shape
    # Not degenerate: real spread, and the batch's images are told apart.
    for t in (ref_embeds, ref_pen):
        assert torch.isfinite(t).all() and t.std() > 0.1
    assert ref_pen.std(dim=1).mean() > 0.1  # tokens differ from one another
    if len(ref_embeds) > 1:  # the class token depends on the image
        assert (ref_embeds[0] - ref_embeds[1]).norm() > 0.1 * ref_embeds[0].norm()
    err = ((embeds - ref_embeds).abs().max().item(), (penultimate - ref_pen).abs().max().item())
    print(f"max abs error: image_embeds {err[0]:.2e}, penultimate {err[1]:.2e} "
          f"(reference std {ref_embeds.std():.2f}, {ref_pen.std():.2f})")
    assert max(err) <= atol, err
    return err


# ---------------------------------------------------------------- full-size ViT-H/14
# Batch 1 to keep the three forward passes affordable on 2 cores; batching and the class
# token's dependence on the image are checked on the tiny model (batch 2).

@pytest.fixture(scope="module")
def vit_h(vit_h_reference):
    cfg = ImageEncoderConfig.vit_h_14()
    shape = (cfg.width, cfg.layers, cfg.heads, cfg.mlp_width, cfg.patch_size, cfg.image_size, cfg.proj_dim)
    assert shape == (1280, 32, 16, 5120, 14, 224, 1024) and (cfg.act, cfg.layer_norm_eps) == ("gelu", 1e-5)
    pixels = preprocess(sample_images()[:1])
    model = vit_h_reference.load()  # transformers' from_pretrained, dropped before ours are loaded
    outputs = reference(model, pixels)
    del model
    gc.collect()
    return vit_h_reference.folder, pixels, outputs


def test_vit_h_parity_direct(vit_h):
    folder, pixels, ref = vit_h
    encoder = load_image_encoder(folder)
    assert encoder.config == ImageEncoderConfig.vit_h_14() and encoder.config.name == "ViT-H/14"
    check_parity(encoder, pixels, ref)


def test_vit_h_parity_converted(vit_h):
    """Through the converter, in memory (the file round trip is tested on the tiny model:
    writing and re-reading 2.5 GB costs ~15 s here and tests nothing size-specific)."""
    folder, pixels, ref = vit_h
    tensors, meta = convert_image_encoder(folder)
    assert meta["format"] == FORMAT and meta["model"] == "ViT-H/14"
    config = ImageEncoderConfig.from_json(meta["config"])
    assert config == ImageEncoderConfig.vit_h_14()
    check_parity(image_encoder_from_state_dict(config, tensors), pixels, ref)


# ---------------------------------------------------------------- tiny models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = ImageEncoderConfig.tiny()
    folder = tmp_path_factory.mktemp("tiny") / "image_encoder"
    model = random_hf_model(cfg, seed=1)
    model.save_pretrained(folder)
    pixels = preprocess(sample_images()[2:4])
    return folder, pixels, reference(model, pixels)


def test_tiny_parity_direct_and_converted(tiny, tmp_path):
    folder, pixels, ref = tiny
    encoder = load_image_encoder(folder)
    assert encoder.config == ImageEncoderConfig.tiny()
    check_parity(encoder, pixels, ref)
    tensors, meta = convert_image_encoder(folder)
    assert set(tensors) == set(encoder.state_dict())
    out = tmp_path / "tiny.safetensors"
    write_image_encoder(folder, out)
    assert read_metadata(out) == meta and ImageEncoderConfig.from_json(meta["config"]) == ImageEncoderConfig.tiny()
    converted = load_image_encoder(out)
    check_parity(converted, pixels, ref)
    for key, value in encoder.state_dict().items():
        assert torch.equal(value, converted.state_dict()[key]), key
    # Only the penultimate states: the last layer is skipped, the result is the same.
    with torch.inference_mode():
        assert torch.equal(converted.penultimate(pixels), converted(pixels)[1])


def test_loading_runs_no_random_init(tiny, monkeypatch):
    """Every random fill during loading must hit meta tensors only (no real init work)."""
    devices = []
    for name in ("uniform_", "normal_"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, **kwargs):
            devices.append(self.device.type)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    real_randn = torch.randn

    def randn_spy(*args, **kwargs):
        t = real_randn(*args, **kwargs)
        devices.append(t.device.type)
        return t
    monkeypatch.setattr(torch, "randn", randn_spy)
    encoder = load_image_encoder(tiny[0])
    assert devices and set(devices) == {"meta"}, devices
    assert all(p.device.type == "cpu" for p in encoder.state_dict().values())


def test_dtype_and_position_ids(tiny, tmp_path):
    """A float16 file with the position_ids buffer (as older transformers saved it): the buffer
    is ignored, the converter keeps the file's dtype, the loader casts to the one asked for."""
    folder, pixels, ref = tiny
    state = load_file(folder / "model.safetensors")
    state = {k: v.half() for k, v in state.items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(257)[None]
    (tmp_path / "enc").mkdir()
    save_file(state, tmp_path / "enc" / "model.safetensors")
    (tmp_path / "enc" / "config.json").write_text((folder / "config.json").read_text())
    tensors, _ = convert_image_encoder(tmp_path / "enc")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    encoder = load_image_encoder(tmp_path / "enc", dtype=torch.float32)
    assert encoder.dtype == torch.float32
    check_parity(encoder, pixels, ref, atol=0.05)  # fp16-rounded weights
    assert load_image_encoder(tmp_path / "enc", dtype=torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------- telling models apart

def meta_state(cfg: ImageEncoderConfig) -> dict[str, torch.Tensor]:
    return {k: torch.empty(s, device="meta") for k, s in transformers_shapes(cfg).items()}


@pytest.mark.parametrize("preset", ["vit_h_14", "vit_bigg_14"])
def test_presets_match_transformers_and_open_clip(preset):
    """The key table agrees with transformers' own model, the converted keys with open_clip's
    VisionTransformer (bigG's MLP width 8192 = 1664 · 4.923… survives open_clip's mlp_ratio)."""
    cfg = getattr(ImageEncoderConfig, preset)()
    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(hf_config(cfg))
    assert {k: tuple(v.shape) for k, v in hf.state_dict().items()} == transformers_shapes(cfg)
    converted = transformers_to_open_clip(meta_state(cfg), cfg, "meta")
    encoder = image_encoder_from_state_dict(cfg, converted, device="meta")
    assert encoder.visual.transformer.resblocks[0].mlp.c_fc.out_features == cfg.mlp_width


@pytest.mark.parametrize("preset,name", [("vit_h_14", "ViT-H/14"), ("vit_bigg_14", "ViT-bigG/14")])
def test_detection(preset, name):
    cfg = getattr(ImageEncoderConfig, preset)()
    assert cfg.name == name
    # From the config.json transformers writes (as in the release's image_encoder folders).
    as_json = json.loads(hf_config(cfg).to_json_string())
    assert config_from_transformers_json(as_json, "config.json") == cfg
    # From shapes alone (a weights file without config.json).
    assert config_from_transformers_shapes(meta_state(cfg), "file") == cfg


# ---------------------------------------------------------------- preprocessing

def test_preprocess_matches_clip_image_processor():
    """transformers 5's CLIPImageProcessor is the torchvision backend; diffusers' IP-Adapter
    pipelines create/load exactly that class (``feature_extractor(image).pixel_values``).
    CLIPImageProcessorPil is the PIL backend (the transformers 4 default). Measured: our torch
    path equals the first and our PIL path the second exactly (0.0 max abs); the two backends
    differ from each other by up to 6 uint8 levels (0.088 normalized) on some pixels, so the
    tolerance here is 1e-6."""
    images = sample_images()
    rgba = Image.new("RGBA", (320, 240), (200, 30, 60, 0))
    rgba.paste((10, 200, 40, 255), (40, 40, 200, 160))
    images += [rgba, images[0].convert("L"), images[1].convert("P")]
    fast, pil = CLIPImageProcessor(), CLIPImageProcessorPil()
    assert fast.backend == "torchvision"
    squash = dict(do_center_crop=False, size={"height": 224, "width": 224})
    worst = 0.0
    for image in images:
        ours_t, ours_p = preprocess(image), preprocess(image, backend="pil")
        assert ours_t.shape == (1, 3, 224, 224) and ours_t.dtype == torch.float32
        assert (ours_t - fast(image, return_tensors="pt").pixel_values).abs().max() <= 1e-6
        assert (ours_p - pil(image, return_tensors="pt").pixel_values).abs().max() <= 1e-6
        squashed = fast(image, return_tensors="pt", **squash).pixel_values
        assert (preprocess(image, crop=False) - squashed).abs().max() <= 1e-6
        assert (preprocess(image, crop=False, backend="pil")
                - pil(image, return_tensors="pt", **squash).pixel_values).abs().max() <= 1e-6
        levels = ((ours_t - ours_p) * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1) * 255).abs()
        worst = max(worst, levels.max().item())
    assert worst <= 8  # torch vs PIL bicubic: a few uint8 levels at most
    assert preprocess(images[:3]).shape == (3, 3, 224, 224)


# ---------------------------------------------------------------- bad files

@pytest.fixture
def tiny_state(tiny):
    return load_file(tiny[0] / "model.safetensors"), (tiny[0] / "config.json").read_text()


def write_folder(path, state, config_text):
    path.mkdir()
    save_file(state, path / "model.safetensors")
    (path / "config.json").write_text(config_text)
    return path


def expect_error(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_image_encoder(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_errors_transformers_folder(tiny_state, tmp_path):
    state, config = tiny_state
    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    missing = write_folder(tmp_path / "missing", {k: v for k, v in state.items() if k != key}, config)
    expect_error(missing, "missing key", key, str(missing / "model.safetensors"))
    extra = write_folder(tmp_path / "extra", {**state, "vision_model.encoder.layers.9.foo": torch.zeros(1)}, config)
    expect_error(extra, "unexpected key", "vision_model.encoder.layers.9.foo", str(extra))
    shaped = write_folder(tmp_path / "shape", {**state, key: torch.zeros(3, 64)}, config)
    expect_error(shaped, key, "[3, 64]", "[128, 64]", str(shaped))
    # A weights file alone (no config.json): the config is read off the shapes, the bad one named.
    (tmp_path / "alone").mkdir()
    save_file({k: v for k, v in state.items() if k != "visual_projection.weight"}, tmp_path / "alone" / "w.safetensors")
    expect_error(tmp_path / "alone" / "w.safetensors", "visual_projection.weight", "w.safetensors")


def test_errors_converted_file(tiny, tmp_path):
    tensors, meta = convert_image_encoder(tiny[0])
    key = "visual.transformer.resblocks.2.attn.in_proj_weight"
    save_file({k: v for k, v in tensors.items() if k != key}, tmp_path / "missing.safetensors", metadata=meta)
    expect_error(tmp_path / "missing.safetensors", "missing key", key, "missing.safetensors")
    save_file({**tensors, key: torch.zeros(64, 64)}, tmp_path / "shape.safetensors", metadata=meta)
    expect_error(tmp_path / "shape.safetensors", key, "[64, 64]", "[192, 64]")
    save_file({**tensors, "visual.extra": torch.zeros(1)}, tmp_path / "extra.safetensors", metadata=meta)
    expect_error(tmp_path / "extra.safetensors", "key 'visual.extra' is unexpected")
    save_file(tensors, tmp_path / "no_meta.safetensors")  # not transformers' layout either
    expect_error(tmp_path / "no_meta.safetensors", "vision_model")


def test_errors_paths(tiny, tmp_path):
    expect_error(tmp_path / "nowhere", "no such file", "nowhere")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "no model.safetensors", "empty")
    (tmp_path / "notes.txt").write_text("hello")
    expect_error(tmp_path / "notes.txt", "notes.txt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    expect_error(tmp_path / "junk.safetensors", "junk.safetensors")
    out = tmp_path / "out.safetensors"
    write_image_encoder(tiny[0], out)
    with pytest.raises(FileExistsError):
        write_image_encoder(tiny[0], out)
    write_image_encoder(tiny[0], out, force=True)


def test_an_open_clip_with_a_sequence_first_transformer_is_refused(monkeypatch):
    """open_clip before 2.26.1 ran its blocks on [tokens, batch, width]: the encoder's forward
    would give wrong embeddings without an error, so it is refused by name and version."""
    import open_clip.transformer

    class SequenceFirstTransformer:  # the signature of open_clip 2.24.0's Transformer
        def __init__(self, width, layers, heads, mlp_ratio=4.0, ls_init_value=None, act_layer=None, norm_layer=None):
            pass

    monkeypatch.setattr(open_clip.transformer, "Transformer", SequenceFirstTransformer)
    with pytest.raises(RuntimeError, match=r"open_clip_torch \S+ is too old: the image encoder needs 2\.26\.1"):
        ImageEncoder(ImageEncoderConfig(image_size=32, patch_size=16, width=64, layers=1, heads=2, mlp_width=256,
                                        proj_dim=32))
