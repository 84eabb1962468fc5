"""IP-Adapter end to end at the full architecture (SD1.5 + OpenCLIP ViT-H/14), random weights in
the official file formats, against diffusers' ``load_ip_adapter`` + StableDiffusionPipeline with
DDIM and the same seed. fp32, CPU. Tolerance: 2/255 per pixel.

Small images (64×64: every level of the UNet, down to 1×1 latents at the deepest) and 3 steps
keep it affordable on 2 cores; the architecture is full size.

Memory: one full-size set of models at a time (SD1.5 + ViT-H/14 is 6.8 GB in fp32). diffusers'
images for every case are made first, from reference models read back from the folders and then
dropped; each test then loads ours, and drops them when it ends.
"""
import gc

import numpy as np
import pytest
import torch

import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion

SIZE, STEPS, SEED = 64, 3, 7
FILES = {"base": "ip-adapter_sd15.bin", "plus": "ip-adapter-plus_sd15.safetensors"}

pytestmark = pytest.mark.usefixtures("free_memory")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ip_adapter")
    for i, (variant, name) in enumerate(FILES.items()):
        ref.write_official(ref.official_state(variant, seed=10 + i), folder / name)
    return folder


def load_ours(full, vit_h_reference):
    models = load_sd15(full.folder)
    encoder = load_image_encoder(vit_h_reference.folder)
    return StableDiffusion(models["unet"], models["vae"], models["text_encoder"]), encoder


@pytest.fixture(scope="module")
def base_images():
    """The image each prompt gives without an image prompt, made once per prompt (with the
    models the asking test has loaded)."""
    cache = {}

    def image(sd: StableDiffusion, prompt: str) -> np.ndarray:
        if prompt not in cache:
            out = sd(prompt, steps=STEPS, seed=SEED, width=SIZE, height=SIZE, progress=False)[0]
            cache[prompt] = np.asarray(out).astype(np.int16)
        return cache[prompt]
    return image


@pytest.fixture(scope="module")
def reference_images():
    return ref.sample_images()[:2]


def diffusers_images(models, tokenizer, adapters, variant, prompt, images, scale, negative=""):
    from transformers import CLIPImageProcessor
    pipe = ref.diffusers_pipeline(models["unet"], models["vae"], models["text_encoder"], tokenizer,
                                  image_encoder=models["image_encoder"], feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(adapters), subfolder="", weight_name=FILES[variant])
    try:
        pipe.set_ip_adapter_scale(scale)
        out = pipe(prompt, negative_prompt=negative, ip_adapter_image=[images], num_inference_steps=STEPS,
                   width=SIZE, height=SIZE, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    finally:
        pipe.unload_ip_adapter()  # the reference UNet serves every case
    return np.asarray(out).astype(np.int16)


CASES = [
    ("base", "", 1, 1.0),
    ("base", "a watercolor painting", 2, 0.6),
    ("plus", "a watercolor painting", 2, {"down": {"block_2": [0.0, 1.0]}, "up": {"block_1": [0.0, 1.0, 0.0]}}),
]
IDS = ["base-image-only", "base-text+2-images", "plus-text+2-images+per-block"]


@pytest.fixture(scope="module")
@torch.no_grad()
def diffusers_results(request, full, vit_h_reference, adapters, reference_images) -> dict[str, np.ndarray]:
    """diffusers' image for each selected case of test_matches_diffusers (by id), all from one set
    of reference models read back from the folders, which are dropped before any test loads ours."""
    selected = {item.callspec.id for item in request.session.items
                if getattr(item, "originalname", None) == "test_matches_diffusers" and item.module is request.module}
    models = dict(unet=full.load_unet(), vae=full.load_vae(), text_encoder=full.load_text_encoder(),
                  image_encoder=vit_h_reference.load())
    results = {}
    for case_id, (variant, prompt, count, scale) in zip(IDS, CASES):
        if case_id in selected:
            results[case_id] = diffusers_images(models, full.tokenizer, adapters, variant, prompt,
                                                reference_images[:count], scale)
    del models
    gc.collect()
    return results


@torch.no_grad()
@pytest.mark.parametrize("variant,prompt,count,scale", CASES, ids=IDS)
def test_matches_diffusers(request, full, vit_h_reference, adapters, diffusers_results, base_images, reference_images,
                           variant, prompt, count, scale):
    sd, encoder = load_ours(full, vit_h_reference)
    pipe = IPAdapterPipeline(sd, load_ip_adapter(adapters / FILES[variant]), encoder)
    images = reference_images[:count]
    mine = np.asarray(pipe(prompt, images, scale=scale, steps=STEPS, seed=SEED, width=SIZE, height=SIZE,
                           progress=False)[0]).astype(np.int16)
    theirs = diffusers_results[request.node.callspec.id]
    base = base_images(sd, prompt)
    del sd, encoder, pipe
    gc.collect()
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
