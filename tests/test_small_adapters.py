"""IP-Adapters and image encoders that are not SD1.5 / ViT-H sized: a small world at the demo's sizes
(SD1.5's UNet structure with 128-wide cross-attention context and layer widths 32/64/128, a
128-wide text encoder, a 64 px ViT with a 128-wide embedding), written as converted files, trained
on with ``python -m ipadapter_min.train`` and sampled from with ``python -m ipadapter_min.sample``;
and an SD1.5-sized adapter refused by its UNet before any SD weights load."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ipadapter_min.pipelines import image_prompt_input, image_prompt_models
from ipadapter_min.cli import sample, train
from ipadapter_min.models.configs import ImageEncoderConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ipadapter_min.formats.files import save_safetensors
from ipadapter_min.formats.image_encoder import image_encoder_metadata
from ipadapter_min.formats.sd15 import sd15_metadata
from ipadapter_min.models.image_encoder import ImageEncoder
from ipadapter_min.loading.ip_adapter import load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.models.text_encoder import TextEncoder
from ipadapter_min.models.unet import UNet
from ipadapter_min.models.vae import VAE
from reference_models import official_state, sample_images, write_official

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 128
SD_CONFIGS = {"unet": UNetConfig(channels=32, heads=4, context_dim=CONTEXT, groups=8),
              "vae": VAEConfig(channels=32, channel_mult=(1, 2, 2, 2), res_blocks=1, groups=8),
              "text_encoder": TextEncoderConfig(width=CONTEXT, layers=2, heads=4, mlp_width=256)}
ENCODER = ImageEncoderConfig(width=128, layers=2, heads=4, mlp_width=256, patch_size=8, image_size=64, proj_dim=128)


def save_encoder(config: ImageEncoderConfig, path: Path) -> Path:
    save_safetensors(ImageEncoder(config).state_dict(), path, image_encoder_metadata(config))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """The small models with random weights as converted files, training data and a reference image."""
    folder = tmp_path_factory.mktemp("small_world")
    torch.manual_seed(0)
    models = {"unet": UNet(SD_CONFIGS["unet"]), "vae": VAE(SD_CONFIGS["vae"]),
              "text_encoder": TextEncoder(SD_CONFIGS["text_encoder"])}
    tensors = {f"{part}.{k}": v for part, model in models.items() for k, v in model.state_dict().items()}
    save_safetensors(tensors, folder / "sd.safetensors", sd15_metadata(SD_CONFIGS))
    entries = []
    for i, image in enumerate(sample_images()):
        image.save(folder / f"{i}.png")
        entries.append({"image_file": f"{i}.png", "text": f"a pattern of waves number {i}"})
    (folder / "data.json").write_text(json.dumps(entries))
    return {"model": folder / "sd.safetensors", "encoder": save_encoder(ENCODER, folder / "encoder.safetensors"),
            "data": folder / "data.json", "image": folder / "0.png", "folder": folder}


@pytest.fixture(scope="module")
def trained(world) -> Path:
    out = world["folder"] / "run"
    assert train.main(["--model", str(world["model"]), "--image-encoder", str(world["encoder"]), "--data",
                       str(world["data"]), "--resolution", "64", "--steps", "2", "--batch-size", "2", "--seed", "3",
                       "--no-progress", "--out", str(out)]) == 0
    return out


def generate(world: dict, out: Path, *extra: str) -> np.ndarray:
    assert sample.main(["--model", str(world["model"]), "--prompt", "waves", "--width", "64", "--height", "64",
                        "--steps", "3", "--seed", "1", "--device", "cpu", "--no-progress", "--out", str(out),
                        *extra]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def test_train_then_sample_at_demo_sizes(world, trained, tmp_path):
    unet = load_sd15(world["model"])["unet"]
    adapter = load_ip_adapter(trained / "ip-adapter.bin", widths=unet.cross_attention_widths(), context_dim=CONTEXT)
    spec = adapter.spec
    assert (spec.variant, spec.encoder, spec.feature_dim, spec.tokens, spec.context_dim) == \
        ("base", "custom 128-wide", 128, 4, CONTEXT)
    assert [layer.to_k_ip.weight.shape for layer in adapter.ip_layers] == \
        [(width, CONTEXT) for width in unet.cross_attention_widths()]

    plain = generate(world, tmp_path / "plain.png")
    image_prompt = ["--image-encoder", str(world["encoder"]), "--image", str(world["image"])]
    for name in ("ip-adapter.safetensors", "ip-adapter.bin"):
        adapter_args = ["--ip-adapter", str(trained / name), *image_prompt]
        prompted = generate(world, tmp_path / f"{name}.png", *adapter_args)
        off = generate(world, tmp_path / f"{name}-0.png", *adapter_args, "--scale", "0")
        changed = np.abs(prompted.astype(int) - plain.astype(int)).max()
        print(f"{name}: the image prompt changes pixels by up to {changed}/255")
        assert changed > 0, f"{name}: the image prompt changed nothing"
        assert np.array_equal(off, plain), f"{name}: λ = 0 is not the image made without an adapter"


def test_cache_encodes_at_the_encoders_size(world, tmp_path):
    """--cache reads the images at the encoder's input size (64 px here), as training from images does."""
    cache = tmp_path / "cache"
    assert train.main(["--model", str(world["model"]), "--image-encoder", str(world["encoder"]), "--data",
                       str(world["data"]), "--resolution", "64", "--steps", "1", "--batch-size", "2", "--no-progress",
                       "--cache", str(cache), "--out", str(tmp_path / "run")]) == 0
    assert load_file(cache / "00000000.safetensors")["features"].shape == (ENCODER.proj_dim,)


def test_sd15_sized_adapter_is_refused_before_sd_weights_load(world, tmp_path, monkeypatch, capsys):
    """A release-shaped base adapter (768-wide tokens, ViT-H's 1024-wide embedding) with an encoder
    of that embedding width: the encoder fits, the UNet does not; said in one line, by sample and by
    train --init, with no SD weights loaded."""
    adapter = tmp_path / "ip-adapter_sd15.bin"
    write_official(official_state("base"), adapter)
    encoder = save_encoder(ImageEncoderConfig(width=64, layers=1, heads=4, mlp_width=128, patch_size=8, image_size=64,
                                              proj_dim=1024), tmp_path / "encoder.safetensors")

    def no_sd_load(*args, **kwargs):
        raise AssertionError("SD weights were loaded before the adapter was checked")

    monkeypatch.setattr(image_prompt_models, "sd15_from_checkpoint", no_sd_load)
    monkeypatch.setattr(train, "sd15_from_checkpoint", no_sd_load)
    widths = "the adapter's image tokens are 768 wide, this UNet's cross-attention takes 128 " \
             "(an adapter for another base model, e.g. SDXL?)"
    capsys.readouterr()
    assert sample.main(["--model", str(world["model"]), "--ip-adapter", str(adapter), "--image-encoder", str(encoder),
                        "--image", str(world["image"]), "--out", str(tmp_path / "o.png")]) == 2
    assert capsys.readouterr().err == f"error: {adapter} with {world['model']}: {widths}\n"
    assert train.main(["--model", str(world["model"]), "--image-encoder", str(encoder), "--data", str(world["data"]),
                       "--init", str(adapter), "--resolution", "64", "--out", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == f"error: --init {adapter} with --model {world['model']}: {widths}\n"
    assert not (tmp_path / "o.png").exists() and not (tmp_path / "run").exists()


def halves(tmp_path: Path) -> list[Path]:
    paths = []
    for i, box in enumerate(((0, 0, 31, 64), (32, 0, 64, 64))):
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, box)
        paths.append(tmp_path / f"half-{i}.png")
        mask.save(paths[-1])
    return paths


def test_image_prompt_groups_are_the_apis_several_adapters(world, trained, tmp_path):
    """Two --ip-adapter groups, the second with two masked images, a weight type and a step range,
    give the image of the Python API's image_prompt_hook with the same settings."""
    from ipadapter_min.loading.ip_adapter import load_image_encoder
    from ipadapter_min.pipelines.text_to_image import StableDiffusion
    adapter_file, masks = trained / "ip-adapter.bin", halves(tmp_path)
    images = [world["folder"] / f"{i}.png" for i in range(3)]
    groups = ["--ip-adapter", str(adapter_file), "--image-encoder", str(world["encoder"]), "--image", str(images[0]),
              "--scale", "0.7", "--ip-adapter", str(adapter_file), "--image-encoder", str(world["encoder"]),
              "--image", str(images[1]), str(images[2]), "--image-mask", *map(str, masks), "--scale", "0.9",
              "--weight-type", "ease out", "--start", "0.3"]
    got = generate(world, tmp_path / "groups.png", *groups)
    sd = StableDiffusion(**load_sd15(world["model"]))
    adapter = load_ip_adapter(adapter_file, widths=sd.unet.cross_attention_widths(), context_dim=CONTEXT)
    encoder = load_image_encoder(world["encoder"])
    prompts = [image_prompt_input.ImagePromptInput(adapter, encoder, [Image.open(images[0])], 0.7),
               image_prompt_input.ImagePromptInput(adapter, encoder, [Image.open(p) for p in images[1:]], 0.9,
                                                   weight_type="ease out", masks=[Image.open(p) for p in masks], start=0.3)]
    hook = image_prompt_input.image_prompt_hook(prompts, 64, 64)
    expected = np.asarray(sd("waves", steps=3, seed=1, width=64, height=64, hook=hook, progress=False)[0])
    assert np.array_equal(got, expected)
    first_only = generate(world, tmp_path / "first.png", *groups[:8])
    assert np.abs(got.astype(int) - first_only).max() > 2  # the second group acts


def test_saved_embeds_give_the_same_image_without_the_encoder(world, trained, tmp_path):
    adapter_file, embeds = trained / "ip-adapter.bin", tmp_path / "embeds.safetensors"
    with_images = generate(world, tmp_path / "a.png", "--ip-adapter", str(adapter_file), "--image-encoder",
                           str(world["encoder"]), "--image", str(world["image"]), "--scale", "0.8",
                           "--save-embeds", str(embeds))
    from_embeds = generate(world, tmp_path / "b.png", "--ip-adapter", str(adapter_file), "--embeds", str(embeds),
                           "--scale", "0.8")
    assert np.array_equal(with_images, from_embeds)
    features = load_file(embeds)["image_embeds"]
    assert features.shape == (2, 1, 128) and torch.equal(features[0], torch.zeros(1, 128))  # negative first: zeros


@pytest.mark.parametrize("extra,message", [
    (["--scale", "0.5", "--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--ip-adapter", "{a}",
      "--image-encoder", "{e}", "--image", "{i}"], "--scale stands before the first --ip-adapter"),
    (["--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--image-mask", "{m}", "{m}"],
     "--image-mask: 2 masks for 1 images"),
    (["--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--start", "0.6", "--end", "0.4"],
     "need 0 ≤ --start < --end ≤ 1"),
    (["--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--weight-type", "style"],
     "unknown weight type 'style' for SD1.5"),
    (["--ip-adapter", "{a}", "--embeds", "{x}"], "made for a plus adapter"),
    (["--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--image-mask", "{w}"],
     "not of the output's aspect"),
    (["--ip-adapter", "{a}", "--image-encoder", "{e}", "--image", "{i}", "--save-embeds", "{x}"],
     "plus-embeds.safetensors already exists (pass --force"),
    (["--ip-adapter", "{a}", "--embeds", "{x}", "--save-embeds", "{x}"], "with --embeds they are already saved"),
])
def test_bad_image_prompt_groups_are_refused_in_one_line(world, trained, tmp_path, capsys, extra, message):
    from ipadapter_min.models.configs import AdapterSpec
    from ipadapter_min.cli.image_embeds import save_image_embeds
    mask, wide = halves(tmp_path)[0], tmp_path / "wide.png"
    Image.new("L", (96, 64), 255).save(wide)
    other = tmp_path / "plus-embeds.safetensors"
    plus = AdapterSpec("plus", "custom 128-wide", "penultimate", 128, 16, CONTEXT)
    save_image_embeds(other, torch.zeros(2, 1, 65, 128), plus, "custom")
    paths = dict(a=trained / "ip-adapter.bin", e=world["encoder"], i=world["image"], m=mask, x=other, w=wide)
    args = ["--model", str(world["model"]), "--width", "64", "--height", "64", "--out", str(tmp_path / "o.png")]
    try:
        code = sample.main(args + [a.format(**paths) for a in extra])
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_negative_images_and_noise_change_the_negative_side(world, trained, tmp_path):
    """A --negative-image or --negative-noise replaces the default negative (a zero embedding for
    this base adapter) and changes the image; --black-negative leaves a base adapter's as ComfyUI does."""
    common = ["--ip-adapter", str(trained / "ip-adapter.bin"), "--image-encoder", str(world["encoder"]), "--image",
              str(world["image"]), "--scale", "0.8"]
    default = generate(world, tmp_path / "default.png", *common)
    negative = generate(world, tmp_path / "neg.png", *common, "--negative-image", str(world["folder"] / "1.png"))
    noise = generate(world, tmp_path / "noise.png", *common, "--negative-noise", "dissolve:0.6")
    black = generate(world, tmp_path / "black.png", *common, "--black-negative")
    assert np.abs(default.astype(int) - negative).max() > 2 and np.abs(default.astype(int) - noise).max() > 2
    assert np.array_equal(black, default)


def test_adapters_for_different_encoders_work_together(world, trained, tmp_path):
    """Each group brings its own encoder (here 128- and 96-wide embeddings, as ViT-H's and
    ViT-bigG's differ): what diffusers cannot do without precomputed embeddings."""
    other_encoder = save_encoder(ImageEncoderConfig(width=96, layers=2, heads=4, mlp_width=192, patch_size=8,
                                                    image_size=64, proj_dim=96), tmp_path / "encoder96.safetensors")
    other = tmp_path / "run96"
    assert train.main(["--model", str(world["model"]), "--image-encoder", str(other_encoder), "--data",
                       str(world["data"]), "--resolution", "64", "--steps", "1", "--batch-size", "2", "--seed", "4",
                       "--no-progress", "--out", str(other)]) == 0
    first = ["--ip-adapter", str(trained / "ip-adapter.bin"), "--image-encoder", str(world["encoder"]), "--image",
             str(world["image"]), "--scale", "0.6"]
    second = ["--ip-adapter", str(other / "ip-adapter.bin"), "--image-encoder", str(other_encoder), "--image",
              str(world["folder"] / "1.png"), "--scale", "0.6"]
    both = generate(world, tmp_path / "both.png", *first, *second)
    alone = generate(world, tmp_path / "alone.png", *first)
    assert np.abs(both.astype(int) - alone).max() > 2
    swapped = ["--ip-adapter", str(other / "ip-adapter.bin"), "--image-encoder", str(world["encoder"]), "--image",
               str(world["image"])]
    assert sample.main(["--model", str(world["model"]), "--out", str(tmp_path / "x.png"), *first, *swapped]) == 2
