"""Structure and editing at the full architecture (SD1.5, OpenCLIP ViT-H/14, a 361 M-parameter
ControlNet), random weights in the released formats, fp32, CPU:

* the ControlNet from lllyasviel's original file layouts (.pth with ``control_model.``, and an
  unprefixed .safetensors), checked with diffusers' own single-file converter, ≤ 1e-4 against
  diffusers' ControlNetModel;
* each of img2img, inpainting and ControlNet together with an IP-Adapter, against diffusers'
  StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline / StableDiffusionControlNetPipeline
  with ``load_ip_adapter`` and DDIM at the same seed: ≤ 2/255 per pixel.

64×64 and 3 steps keep it affordable on 2 cores. Memory: diffusers' images are made first with
one set of reference models, dropped before ours load (see test_ip_adapter_full.py).
"""
import gc
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import reference_models as ref
from ipadapter_min.pipelines.controls import ControlNetInput
from ipadapter_min.formats.controlnet import read_controlnet
from ipadapter_min.formats.files import read_state_dict
from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
from ipadapter_min.loading.controls import load_controlnet
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion

SIZE, STEPS, SEED, SCALE = 64, 3, 11, 0.6
PROMPT = "a watercolor painting"
ADAPTER = "ip-adapter_sd15.bin"

pytestmark = pytest.mark.usefixtures("free_memory")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The IP-Adapter (official .bin) and the ControlNet as a diffusers folder, an original .pth
    (prefixed) and an original .safetensors (unprefixed). Paths only; the 4.3 GB of files go when
    the module is done."""
    root = tmp_path_factory.mktemp("controls_full")
    ref.write_official(ref.official_state("base", seed=30), root / ADAPTER)
    model = ref.make_controlnet(ref.FULL, seed=31)
    model.save_pretrained(root / "controlnet")
    del model
    gc.collect()
    checkpoint, _ = read_controlnet(root / "controlnet")
    torch.save({"control_model." + k: v for k, v in checkpoint.tensors.items()}, root / "control_v11p_sd15_canny.pth")
    save_file({k: v.contiguous() for k, v in checkpoint.tensors.items()}, root / "control_sd15_canny.safetensors")
    del checkpoint
    gc.collect()
    yield root
    shutil.rmtree(root)


def pictures():
    """The init picture, its mask (white = repaint), the control image and the reference image."""
    init = ref.sample_images()[1].convert("RGB").resize((SIZE, SIZE))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).ellipse((30, 20, 100, 90), fill=255)
    control = Image.new("RGB", (SIZE, SIZE), "black")
    draw = ImageDraw.Draw(control)
    for i in range(0, SIZE, 24):
        draw.line((i, 0, SIZE - i, SIZE), fill="white", width=2)
    return init, mask, control, ref.sample_images()[0]


@torch.no_grad()
def test_controlnet_original_files_match_diffusers(files):
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    reference = ref.from_folder(ControlNetModel, files / "controlnet")
    original = read_state_dict(files / "control_v11p_sd15_canny.pth")
    converted = convert_controlnet_checkpoint(original, dict(reference.config))
    assert converted.keys() == reference.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())
    del original, converted
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=g)
    context, hint = torch.randn(1, 77, 768, generator=g), torch.rand(1, 3, SIZE, SIZE, generator=g)
    down, mid = reference(x, torch.tensor(500), encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    del reference
    gc.collect()
    for name in ("control_v11p_sd15_canny.pth", "control_sd15_canny.safetensors"):
        out = load_controlnet(files / name)(x, torch.tensor(500), context, hint)
        errors = [(a - b).abs().max().item() for a, b in zip([*out.skips, out.middle], [*down, mid])]
        print(f"{name}: ControlNet max abs error {max(errors):.2e} over 12 skips and the middle")
        assert len(out.skips) == 12 and max(errors) <= 1e-4
        del out
        gc.collect()


CASES = ["img2img", "inpaint", "controlnet"]


def diffusers_image(case, models, tokenizer, files, embeds=None):
    """diffusers' image for the case; ``embeds``: the reference image's, from
    ``prepare_ip_adapter_image_embeds`` (what each pipeline does with ``ip_adapter_image``);
    without, the case's pipeline encodes it and the result carries the embeds."""
    import diffusers
    from transformers import CLIPImageProcessor
    init, mask, control, reference_image = pictures()
    kind, extra, kwargs = {
        "img2img": ("StableDiffusionImg2ImgPipeline", {}, dict(image=init, strength=0.7)),
        "inpaint": ("StableDiffusionInpaintPipeline", {}, dict(image=init, mask_image=mask, strength=0.9,
                                                                width=SIZE, height=SIZE)),
        "controlnet": ("StableDiffusionControlNetPipeline", {"controlnet": models["controlnet"]},
                       dict(image=control, controlnet_conditioning_scale=0.8)),
    }[case]
    pipe = getattr(diffusers, kind)(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
                                    unet=models["unet"], scheduler=ref.ddim_scheduler(), safety_checker=None,
                                    feature_extractor=CLIPImageProcessor(), image_encoder=models["image_encoder"],
                                    requires_safety_checker=False, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_ip_adapter(str(files), subfolder="", weight_name=ADAPTER)
    try:
        pipe.set_ip_adapter_scale(SCALE)
        if embeds is None:
            embeds = pipe.prepare_ip_adapter_image_embeds([[reference_image]], None, torch.device("cpu"), 1, True)
        out = pipe(PROMPT, ip_adapter_image_embeds=embeds, num_inference_steps=STEPS,
                   generator=torch.Generator("cpu").manual_seed(SEED), **kwargs).images[0]
    finally:
        pipe.unload_ip_adapter()
    return np.asarray(out).astype(np.int16), embeds


@pytest.fixture(scope="module")
@torch.no_grad()
def diffusers_results(full, vit_h_reference, files) -> dict[str, np.ndarray]:
    from diffusers import ControlNetModel
    models = dict(unet=full.load_unet(), vae=full.load_vae(), text_encoder=full.load_text_encoder(),
                  image_encoder=vit_h_reference.load(), controlnet=ref.from_folder(ControlNetModel, files / "controlnet"))
    results, embeds = {}, None
    for case in CASES:  # the reference image encoded once, by the first case's pipeline
        results[case], embeds = diffusers_image(case, models, full.tokenizer, files, embeds)
    del models
    gc.collect()
    return results


@pytest.fixture(scope="module")
def ours(full, vit_h_reference, files, diffusers_results):
    """Our pipeline, loaded after diffusers' models are gone, shared by the module's cases, with
    the ControlNet, the image the image prompt alone gives (from the reference image) and the
    reference's image tokens (encoded once, as the sample command does)."""
    sd = StableDiffusion(**load_sd15(full.folder))
    pipe = IPAdapterPipeline(sd, load_ip_adapter(files / ADAPTER), load_image_encoder(vit_h_reference.folder))
    reference_image = pictures()[3]
    image_prompt_only = np.asarray(pipe(PROMPT, [reference_image], scale=SCALE, steps=STEPS, seed=SEED, width=SIZE,
                                        height=SIZE, progress=False)[0]).astype(np.int16)
    tokens = pipe.image_tokens([reference_image])
    yield pipe, load_controlnet(files / "control_v11p_sd15_canny.pth"), image_prompt_only, tokens
    del sd, pipe
    gc.collect()


@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
def test_with_an_image_prompt_matches_diffusers(case, ours, diffusers_results):
    pipe, controlnet, image_prompt_only, tokens = ours
    init, mask, control, _ = pictures()
    kwargs = {"img2img": dict(init_image=init, strength=0.7),
              "inpaint": dict(init_image=init, mask=mask, strength=0.9),
              "controlnet": dict(controls=[ControlNetInput(controlnet, control, scale=0.8)])}[case]
    mine = np.asarray(pipe.sd(PROMPT, hook=pipe.adapter.hook(*tokens, SCALE), steps=STEPS, seed=SEED, progress=False,
                              **kwargs)[0]).astype(np.int16)
    diff = np.abs(mine - diffusers_results[case]).max()
    change = np.abs(mine - image_prompt_only).mean()
    print(f"{case} + IP-Adapter: max pixel difference {diff}/255; mean change from the image prompt alone {change:.1f}")
    assert mine.shape == (SIZE, SIZE, 3) and diff <= 2
    assert change > 2  # the edit or control changes the image
