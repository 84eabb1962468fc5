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

from ipadapter_min import ip_pipeline, sample, train
from ipadapter_min.configs import ImageEncoderConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ipadapter_min.formats.files import save_safetensors
from ipadapter_min.formats.image_encoder import image_encoder_metadata
from ipadapter_min.formats.sd15 import sd15_metadata
from ipadapter_min.image_encoder import ImageEncoder
from ipadapter_min.loading import load_ip_adapter, load_sd15
from ipadapter_min.text_encoder import TextEncoder
from ipadapter_min.unet import UNet
from ipadapter_min.vae import VAE
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

    monkeypatch.setattr(ip_pipeline, "sd15_from_checkpoint", no_sd_load)
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
