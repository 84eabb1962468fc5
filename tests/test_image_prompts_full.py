"""Several IP-Adapters, masks and precomputed embeddings end to end at the full architecture
(SD1.5 + OpenCLIP ViT-H/14, official adapter files with random weights), against diffusers'
StableDiffusionPipeline with ``load_ip_adapter`` of several files, ``ip_adapter_masks`` and
``ip_adapter_image_embeds``; DDIM, the same seed, fp32, CPU: ≤ 2/255 per pixel.

64×64 and 3 steps keep it affordable; diffusers' images are made first and its models dropped
before ours load (see test_ip_adapter_full.py).
"""
import gc
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import reference_models as ref
from ipadapter_min.pipelines.image_prompt_input import ImagePromptInput, image_prompt_hook
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion

SIZE, STEPS, SEED, PROMPT = 64, 3, 5, "a watercolor painting"
FILES = {"base": "ip-adapter_sd15.bin", "plus": "ip-adapter-plus_sd15.safetensors"}

pytestmark = pytest.mark.usefixtures("free_memory")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image_prompts")
    for i, (variant, name) in enumerate(FILES.items()):
        ref.write_official(ref.official_state(variant, seed=40 + i), folder / name)
    return folder


def halves():
    """Left and right masks over the output."""
    masks = []
    for box in ((0, 0, SIZE // 2 - 1, SIZE), (SIZE // 2, 0, SIZE, SIZE)):
        mask = Image.new("L", (SIZE, SIZE), 0)
        ImageDraw.Draw(mask).rectangle(box, fill=255)
        masks.append(mask)
    return masks


def pipe_with(models, tokenizer, adapters, names):
    from transformers import CLIPImageProcessor
    pipe = ref.diffusers_pipeline(models["unet"], models["vae"], models["text_encoder"], tokenizer,
                                  image_encoder=models["image_encoder"], feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter([str(adapters)] * len(names), subfolder=[""] * len(names), weight_name=names)
    return pipe


def as_array(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
@torch.no_grad()
def diffusers_results(full, vit_h_reference, adapters):
    from diffusers.image_processor import IPAdapterMaskProcessor
    images = ref.sample_images()
    models = dict(unet=full.load_unet(), vae=full.load_vae(), text_encoder=full.load_text_encoder(),
                  image_encoder=vit_h_reference.load())
    generator = lambda: torch.Generator("cpu").manual_seed(SEED)  # noqa: E731
    results = {}
    pipe = pipe_with(models, full.tokenizer, adapters, [FILES["base"], FILES["plus"]])
    pipe.set_ip_adapter_scale([0.7, 0.5])
    results["two adapters"] = as_array(pipe(PROMPT, ip_adapter_image=[[images[0]], [images[1]]], num_inference_steps=STEPS,
                                            width=SIZE, height=SIZE, generator=generator()).images[0])
    pipe.unload_ip_adapter()
    pipe = pipe_with(models, full.tokenizer, adapters, [FILES["base"]])
    pipe.set_ip_adapter_scale([[0.8, 0.8]])
    masks = IPAdapterMaskProcessor().preprocess(halves(), height=SIZE, width=SIZE).reshape(1, 2, SIZE, SIZE)
    results["masks"] = as_array(pipe(PROMPT, ip_adapter_image=[[images[0], images[1]]], num_inference_steps=STEPS,
                                     width=SIZE, height=SIZE, generator=generator(),
                                     cross_attention_kwargs={"ip_adapter_masks": [masks]}).images[0])
    pipe.set_ip_adapter_scale(0.6)
    embeds = pipe.prepare_ip_adapter_image_embeds([[images[2]]], None, "cpu", 1, True)
    results["embeds"] = as_array(pipe(PROMPT, ip_adapter_image_embeds=embeds, num_inference_steps=STEPS,
                                      width=SIZE, height=SIZE, generator=generator()).images[0])
    results["embeds tensor"] = embeds[0]
    pipe.unload_ip_adapter()
    del models, pipe
    gc.collect()
    return results


@pytest.fixture(scope="module")
def ours(full, vit_h_reference, adapters, diffusers_results):
    sd = StableDiffusion(**load_sd15(full.folder))
    yield sd, load_image_encoder(vit_h_reference.folder), {v: load_ip_adapter(adapters / f) for v, f in FILES.items()}
    del sd
    gc.collect()


def generate(sd, prompts) -> np.ndarray:
    hook = image_prompt_hook(prompts, SIZE, SIZE)
    return as_array(sd(PROMPT, steps=STEPS, seed=SEED, width=SIZE, height=SIZE, hook=hook, progress=False)[0])


def encoded_once(prompt: ImagePromptInput) -> ImagePromptInput:
    """The prompt with its images encoded, for a second generation (as the sample command does)."""
    return replace(prompt, features=prompt.encoded())


@torch.no_grad()
def test_two_adapters_match_diffusers(ours, diffusers_results):
    sd, encoder, adapters = ours
    images = ref.sample_images()
    base = encoded_once(ImagePromptInput(adapters["base"], encoder, [images[0]], 0.7))
    both = generate(sd, [base, ImagePromptInput(adapters["plus"], encoder, [images[1]], 0.5)])
    base_only = generate(sd, [base])
    diff = np.abs(both - diffusers_results["two adapters"]).max()
    print(f"base + plus adapters: max pixel difference {diff}/255; mean change from base alone "
          f"{np.abs(both - base_only).mean():.1f}")
    assert diff <= 2 and np.abs(both - base_only).mean() > 1


@torch.no_grad()
def test_masks_match_diffusers(ours, diffusers_results):
    sd, encoder, adapters = ours
    images = ref.sample_images()
    masked = ImagePromptInput(adapters["base"], encoder, images[:2], 0.8, masks=halves())
    unmasked = generate(sd, [replace(encoded_once(masked), masks=None)])
    masked = generate(sd, [masked])
    diff = np.abs(masked - diffusers_results["masks"]).max()
    print(f"two images, two masks: max pixel difference {diff}/255; mean change from no masks "
          f"{np.abs(masked - unmasked).mean():.1f}")
    assert diff <= 2 and np.abs(masked - unmasked).mean() > 1


@torch.no_grad()
def test_precomputed_embeds_match_diffusers_and_our_own_encoding(ours, diffusers_results):
    sd, encoder, adapters = ours
    image = ref.sample_images()[2]
    features = ImagePromptInput(adapters["base"], encoder, [image], 0.6).encoded()
    theirs = diffusers_results["embeds tensor"]
    assert features.shape == theirs.shape == (2, 1, 1024)
    assert (features - theirs).abs().max() <= 1e-4
    from_theirs = generate(sd, [ImagePromptInput(adapters["base"], scale=0.6, features=theirs)])
    diff = np.abs(from_theirs - diffusers_results["embeds"]).max()
    print(f"diffusers' precomputed embeds: max pixel difference {diff}/255")
    assert diff <= 2
