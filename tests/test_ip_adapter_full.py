"""IP-Adapter end to end at the full architecture (SD1.5 + OpenCLIP ViT-H/14), random weights in
the official file formats, against diffusers' ``load_ip_adapter`` + StableDiffusionPipeline with
DDIM and the same seed. fp32, CPU. Tolerance: 2/255 per pixel.

Small images (128×128) and 3 steps keep it affordable on 2 cores; the architecture is full size.
"""
import numpy as np
import pytest
import torch

import reference_models as ref
from ipadapter_min import sample
from ipadapter_min.ip_pipeline import IPAdapterPipeline
from ipadapter_min.loading import load_image_encoder, load_ip_adapter, load_sd15
from ipadapter_min.pipeline import StableDiffusion

SIZE, STEPS, SEED = 128, 3, 7
FILES = {"base": "ip-adapter_sd15.bin", "plus": "ip-adapter-plus_sd15.safetensors"}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapter")
    for i, (variant, name) in enumerate(FILES.items()):
        ref.write_official(ref.official_state(variant, seed=10 + i), folder / name)
    return folder


@pytest.fixture(scope="module")
def ours(full, vit_h_reference):
    models = load_sd15(full.folder)
    encoder = load_image_encoder(vit_h_reference.folder)
    return StableDiffusion(models["unet"], models["vae"], models["text_encoder"]), encoder


@pytest.fixture(scope="module")
def base_images(ours):
    """The image each prompt gives without an image prompt, made once per prompt."""
    sd, _ = ours
    cache = {}

    def image(prompt: str) -> np.ndarray:
        if prompt not in cache:
            out = sd(prompt, steps=STEPS, seed=SEED, width=SIZE, height=SIZE, progress=False)[0]
            cache[prompt] = np.asarray(out).astype(np.int16)
        return cache[prompt]
    return image


@pytest.fixture(scope="module")
def reference_images():
    return ref.sample_images()[:2]


def diffusers_images(full, vit_h_reference, adapters, variant, prompt, images, scale, negative=""):
    from transformers import CLIPImageProcessor
    pipe = ref.diffusers_pipeline(full.unet, full.vae, full.text_encoder, full.tokenizer,
                                  image_encoder=vit_h_reference.model, feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapters), subfolder="", weight_name=FILES[variant])
    try:
        pipe.set_ip_adapter_scale(scale)
        out = pipe(prompt, negative_prompt=negative, ip_adapter_image=[images], num_inference_steps=STEPS,
                   width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    finally:
        pipe.unload_ip_adapter()  # the reference UNet is shared with other tests
    return np.asarray(out).astype(np.int16)


CASES = [
    ("base", "", 1, 1.0),
    ("base", "a watercolor painting", 2, 0.6),
    ("plus", "a watercolor painting", 1, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}),
    ("plus", "", 2, 1.0),
]


@torch.no_grad()
@pytest.mark.parametrize("variant,prompt,count,scale", CASES,
                         ids=["base-image-only", "base-text+2-images", "plus-text+per-block", "plus-2-images"])
def test_matches_diffusers(full, vit_h_reference, adapters, ours, base_images, reference_images, variant, prompt, count,
                           scale):
    sd, encoder = ours
    pipe = IPAdapterPipeline(sd, load_ip_adapter(adapters / FILES[variant]), encoder)
    images = reference_images[:count]
    mine = np.asarray(pipe(prompt, images, scale=scale, steps=STEPS, seed=SEED, width=SIZE, height=SIZE,
                           progress=False)[0]).astype(np.int16)
    theirs = diffusers_images(full, vit_h_reference, adapters, variant, prompt, images, scale)
    base = base_images(prompt)
    diff = np.abs(mine - theirs).max()
    print(f"{variant} {prompt!r} {count} image(s) λ={scale}: max pixel difference {diff}/255, "
          f"mean change from the image prompt {np.abs(mine - base).mean():.1f}")
    assert diff <= 2
    assert mine.std() > 5 and np.abs(mine - base).mean() > 1  # a real image, and the image prompt matters


def test_scale_zero_is_the_base_image_bit_for_bit(full, vit_h_reference, adapters, reference_images, tmp_path):
    """The sample command with --scale 0 writes exactly the pixels it writes without an adapter."""
    image = tmp_path / "ref.png"
    reference_images[0].save(image)
    common = ["--model", str(full.folder), "--prompt", "a cat", "--steps", "2", "--seed", "3", "--width", "64",
              "--height", "64", "--no-progress"]
    assert sample.main([*common, "--out", str(tmp_path / "base.png")]) == 0
    assert sample.main([*common, "--out", str(tmp_path / "ip.png"), "--ip-adapter", str(adapters / FILES["plus"]),
                        "--image-encoder", str(vit_h_reference.folder), "--image", str(image), "--scale", "0"]) == 0
    from PIL import Image
    assert Image.open(tmp_path / "base.png").tobytes() == Image.open(tmp_path / "ip.png").tobytes()
