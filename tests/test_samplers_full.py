"""Every sampler other than DDIM (test_sd15_full and test_ip_adapter_full cover it) end to end at
the full architecture (SD1.5, and OpenCLIP ViT-H/14 with the base ip-adapter_sd15 in its official
file), random weights, fp32, CPU: our image against diffusers' StableDiffusionPipeline with the
matching scheduler (test_samplers.reference_scheduler: the release's scheduler_config.json, each
scheduler's own timestep spacing) and the same seed, text-to-image with each, and with an image
prompt (``load_ip_adapter``) with Euler a. Tolerance: 2/255 per pixel.

64×64 and 3 steps keep it cheap; 3 steps are enough for DPM++ 2M to take both its orders (1, 2,
then 1 for the last step) and for Euler a to draw fresh noise at every step, which the test checks
on diffusers' scheduler (and our noise draws on ours). Measured: ≤ 1/255 in every case; each image
≈ 25/255 on average from our DDIM image, and the image prompt ≈ 20/255 from the text-only one.

Memory: as in test_ip_adapter_full, diffusers' images for every case are made first, from one set
of reference models read back from the folders, which are dropped before ours are loaded, once,
for all our images.
"""
import gc

import numpy as np
import pytest
import torch

import reference_models as ref
from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from test_samplers import reference_scheduler

SIZE, STEPS, SEED, SCALE = 64, 3, 5, 0.7
PIXEL_TOL = 2
PROMPT, NEGATIVE = "a red bicycle", "blurry"
ADAPTER = "ip-adapter_sd15.bin"
SAMPLERS = ["euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"]
KINDS = ["text", "image-prompt"]
# The image prompt with one sampler here (the ancestral one, whose noise draws must line up with
# the adapter's extra work); test_samplers checks it with every sampler on small models.
CASES = [(name, "text") for name in SAMPLERS] + [("euler-a", "image-prompt")]
IDS = [f"{name}-{kind}" for name, kind in CASES]
# What diffusers' scheduler does in 3 steps: DPM++ 2M's order at each step, Euler a's noise draws
EXPECTED_TRACE = {"euler": [], "euler-a": ["noise"] * STEPS, "dpmpp-2m": [1, 2, 1], "dpmpp-2m-karras": [1, 2, 1]}

pytestmark = [pytest.mark.usefixtures("free_memory"),  # diffusers' schedulers call np.array on tensors:
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = tmp_path_factory.mktemp("ip_adapter") / ADAPTER
    ref.write_official(ref.official_state("base", seed=30), path)
    return path


@pytest.fixture(scope="module")
def reference_image():
    return ref.sample_images()[0]


def selected_cases(request, ours: bool = False) -> list[tuple[str, str]]:
    """The cases of the selected test_matches_diffusers items (with ``ours``: all of them if
    test_samplers_give_distinct_images is selected)."""
    items = [item for item in request.session.items if item.module is request.module]
    if ours and any(item.name == "test_samplers_give_distinct_images" for item in items):
        return list(CASES)
    ids = {item.callspec.id for item in items if getattr(item, "originalname", None) == "test_matches_diffusers"}
    return [case for case, case_id in zip(CASES, IDS) if case_id in ids]


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def traced_scheduler(name: str, trace: list):
    """The reference scheduler, recording the DPM++ orders it takes and Euler a's noise draws."""
    scheduler = reference_scheduler(name)
    if name.startswith("dpmpp"):
        for order, method in ((1, "dpm_solver_first_order_update"), (2, "multistep_dpm_solver_second_order_update"),
                              (3, "multistep_dpm_solver_third_order_update")):
            def spy(*args, _order=order, _update=getattr(scheduler, method), **kwargs):
                trace.append(_order)
                return _update(*args, **kwargs)
            setattr(scheduler, method, spy)
    return scheduler


@pytest.fixture(scope="module")
@torch.no_grad()
def diffusers_results(request, full, vit_h_reference, adapter, reference_image) -> dict:
    """(image, trace) for each selected case, text-only ones first, then the adapter loaded."""
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a
    from transformers import CLIPImageProcessor
    cases = selected_cases(request)
    pipe = ref.diffusers_pipeline(full.load_unet(), full.load_vae(), full.load_text_encoder(), full.tokenizer,
                                  image_encoder=vit_h_reference.load(), feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    results, trace = {}, []
    draw = euler_a.randn_tensor

    def counted_draw(*args, **kwargs):
        trace.append("noise")
        return draw(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(euler_a, "randn_tensor", counted_draw)
        for kind in KINDS:
            if not any(k == kind for _, k in cases):
                continue
            image_prompt = {}
            if kind == "image-prompt":
                pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name)
                pipe.set_ip_adapter_scale(SCALE)
                # encoded once for every sampler: what the pipeline does with ip_adapter_image
                embeds = pipe.prepare_ip_adapter_image_embeds(reference_image, None, torch.device("cpu"), 1, True)
                image_prompt = {"ip_adapter_image_embeds": embeds}
            for name, k in cases:
                if k == kind:
                    trace.clear()
                    pipe.scheduler = traced_scheduler(name, trace)
                    out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, width=SIZE, height=SIZE,
                               generator=torch.Generator("cpu").manual_seed(SEED), **image_prompt).images[0]
                    results[name, kind] = pixels(out), list(trace)
    del pipe
    gc.collect()
    return results


@pytest.fixture(scope="module")
@torch.no_grad()
def our_results(request, full, vit_h_reference, adapter, reference_image, diffusers_results) -> dict:
    """Our image and our number of fresh noise draws for each selected case (and the text-only one
    of each image-prompt case), and our DDIM image of each kind, from one load of our models (after
    diffusers' are dropped)."""
    import ipadapter_min.samplers.euler_ancestral as euler_a
    models = load_sd15(full.folder)
    sd = StableDiffusion(models["unet"], models["vae"], models["text_encoder"])
    del models
    pipe = IPAdapterPipeline(sd, load_ip_adapter(adapter), load_image_encoder(vit_h_reference.folder))
    tokens = pipe.image_tokens([reference_image])  # encoded once for every sampler
    cases = selected_cases(request, ours=True)
    cases += [(name, "text") for name, kind in cases if kind == "image-prompt" and (name, "text") not in cases]
    cases += [("ddim", kind) for kind in KINDS if any(k == kind for _, k in cases)]
    results, draws = {}, []
    draw = euler_a.fresh_noise

    def counted_draw(*args, **kwargs):
        draws.append(1)
        return draw(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(euler_a, "fresh_noise", counted_draw)
        for name, kind in cases:
            draws.clear()
            common = dict(negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, width=SIZE, height=SIZE, sampler=name,
                          progress=False)
            if kind == "text":
                out = pipe.sd(PROMPT, **common)[0]
            else:
                out = pipe.sd(PROMPT, hook=pipe.adapter.hook(*tokens, SCALE), **common)[0]
            results[name, kind] = pixels(out), len(draws)
    del sd, pipe, tokens
    gc.collect()
    return results


@pytest.mark.parametrize("name,kind", CASES, ids=IDS)
def test_matches_diffusers(diffusers_results, our_results, name, kind):
    theirs, trace = diffusers_results[name, kind]
    mine, draws = our_results[name, kind]
    ddim, _ = our_results["ddim", kind]
    diff = np.abs(mine - theirs).max()
    from_ddim = np.abs(mine - ddim).mean()
    line = f"{name} {kind}: max pixel difference {diff}/255; mean difference from our DDIM image {from_ddim:.1f}"
    from_text = np.abs(mine - our_results[name, "text"][0]).mean() if kind == "image-prompt" else None
    if from_text is not None:
        line += f", from the text-only image {from_text:.1f}"
    print(f"{line}; std {mine.std():.1f}; diffusers' steps {trace}, our noise draws {draws}")
    assert trace == EXPECTED_TRACE[name]  # DPM++'s second-order step and first-order last step; Euler a's noise
    assert draws == (STEPS if name == "euler-a" else 0)
    assert diff <= PIXEL_TOL
    assert mine.std() > 5  # a real image, not a flat one
    assert from_ddim > 2  # the sampler matters
    assert from_text is None or from_text > 2  # the image prompt matters


def test_samplers_give_distinct_images(our_results):
    """No two samplers give the same image within the tolerance, so that a sampler mistaken for
    another would fail the parity test. (At 3 steps the four end at σ = 0 from the same σ_max and
    differ only in the middle step: Euler and DPM++ 2M Karras are the closest, a few /255 apart.)"""
    for i, a in enumerate(SAMPLERS):
        for b in SAMPLERS[i + 1:]:
            diff = np.abs(our_results[a, "text"][0] - our_results[b, "text"][0])
            print(f"{a} vs {b}: max difference {diff.max()}/255, mean {diff.mean():.1f}")
            assert diff.max() > PIXEL_TOL, (a, b)
