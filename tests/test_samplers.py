"""Samplers (``sampler=`` / ``--sampler``) against diffusers' schedulers as users build them: the SD1.5
release's scheduler_config.json read as a PNDMScheduler (``from_config``, as ``from_pretrained``
reads it), then ``X.from_config(pndm.config)``, so that each takes its own default timestep spacing
(the file names none: DDIM "leading", the others "linspace"). fp32, CPU.

* timesteps, σ and the starting noise scale for 1–50 steps: ≤ 1e-6 (measured: equal);
* chains of steps (with their fresh noise), scale_input and add_noise on random tensors: ≤ 1e-6
  relative to the largest value (measured: equal);
* images on the tiny config (text-to-image, img2img, inpainting with a regular and a 9-channel
  UNet, a ControlNet) and with an IP-Adapter on the small one: ≤ 2/255 per pixel, and each at
  least 10× that away from DDIM's image of the same seed, so that a sampler ignored would fail;
* the command line: --sampler gives the API's image and is recorded; --eta is DDIM's only.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import a1111
import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.pipelines.controls import ControlNetInput
from ipadapter_min.pipelines.image_prompts import IPAdapterPipeline
from ipadapter_min.loading.controls import load_controlnet
from ipadapter_min.loading.ip_adapter import load_image_encoder, load_ip_adapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.samplers import DDIM, SAMPLERS, make_sampler
from ipadapter_min.samplers.step_ranges import LOG_SIGMAS, SIGMAS, sigma_at

pytestmark = [pytest.mark.usefixtures("one_thread"),  # diffusers' schedulers call np.array on tensors:
               pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

# stable-diffusion-v1-5's scheduler/scheduler_config.json, as downloaded
RELEASE_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
REFERENCE = {  # our name → diffusers' scheduler, the options users give it, its default spacing
    "ddim": ("DDIMScheduler", {}, "leading"),
    "euler": ("EulerDiscreteScheduler", {}, "linspace"),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}, "linspace"),
    "dpmpp-2m": ("DPMSolverMultistepScheduler", {}, "linspace"),
    "dpmpp-2m-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "linspace"),
}
# every sampler, and DDIM with fresh noise too (η = 0 is test_sd15_tiny's and test_editing's)
CASES = [("ddim", 0.5), ("euler", 0.0), ("euler-a", 0.0), ("dpmpp-2m", 0.0), ("dpmpp-2m-karras", 0.0)]
IDS = ["ddim-eta0.5", "euler", "euler-a", "dpmpp-2m", "dpmpp-2m-karras"]
PROMPT, NEGATIVE = "a red bicycle", "blurry"
STEPS = 5  # Euler's timesteps are fractional (999, 749.25, …); DPM++ 2M takes orders 1, 2, 2, 2, 1
TOL, PIXEL_TOL = 1e-6, 2


def reference_scheduler(name: str):
    import diffusers
    release = diffusers.PNDMScheduler.from_config(RELEASE_SCHEDULER_CONFIG)
    cls, options, spacing = REFERENCE[name]
    scheduler = getattr(diffusers, cls).from_config(release.config, **options)
    assert scheduler.config.timestep_spacing == spacing and scheduler.config.steps_offset == 1
    return scheduler


def test_every_sampler_has_a_reference():
    assert list(SAMPLERS) == list(REFERENCE)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a.double() - b.double()).abs().max().item()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_abs(a, b) / max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------------------------
# Schedules and single steps


@pytest.mark.parametrize("name", SAMPLERS)
def test_timesteps_and_sigmas_match_diffusers(name):
    reference = reference_scheduler(name)
    worst = 0.0
    for steps in (1, 2, 10, 25, 30, 50):
        reference.set_timesteps(steps)
        ours = make_sampler(name, steps)
        assert ours.timesteps.dtype == reference.timesteps.dtype  # float32 for Euler, int64 for the others
        errors = [max_abs(ours.timesteps, reference.timesteps),
                  abs(float(ours.init_noise_sigma) - float(reference.init_noise_sigma))]
        if name != "ddim":
            errors.append(max_abs(ours.sigmas, reference.sigmas))
        worst = max(worst, *errors)
    print(f"{name}: max abs error of timesteps, σ and init_noise_sigma {worst:.1e}")
    assert worst <= TOL
    if name == "euler":
        assert make_sampler(name, 50).timesteps[1].item() == pytest.approx(978.61224)  # fractional
    if name == "dpmpp-2m-karras":
        timesteps = make_sampler(name, 50).timesteps
        assert (timesteps[1:] == timesteps[:-1]).any()  # small Karras σ share a timestep


@pytest.mark.parametrize("name,eta", CASES + [("ddim", 0.0)])
@pytest.mark.parametrize("steps", [3, 10])
def test_steps_match_diffusers(name, eta, steps):
    """A chain of steps on random tensors with the same noise predictions and generator seeds;
    at each step the UNet input (scale_input) and the picture noised to the next step's level
    (inpainting's add_noise, at diffusers' step_index)."""
    reference = reference_scheduler(name)
    reference.set_timesteps(steps)
    if hasattr(reference, "set_begin_index"):
        reference.set_begin_index(0)  # as the inpainting pipeline does
    g = torch.Generator().manual_seed(steps)
    picture, noise = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
    start = torch.randn(2, 4, 6, 8, generator=g) * reference.init_noise_sigma
    predictions = [torch.randn(2, 4, 6, 8, generator=g) for _ in range(steps)]

    def ours(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        sampler, generator, x, seen = make_sampler(name, steps, eta), torch.Generator().manual_seed(seed), start, []
        for i, eps in enumerate(predictions):
            seen.append(sampler.scale_input(x, i))
            x = sampler.step(eps, i, x, generator)
            seen += [x, sampler.add_noise(picture, noise, i + 1)] if i + 1 < steps else [x]
        return x, seen

    generator, x, expected = torch.Generator().manual_seed(7), start, []
    for i, (t, eps) in enumerate(zip(reference.timesteps, predictions)):
        expected.append(reference.scale_model_input(x, t))
        x = reference.step(eps, t, x, generator=generator, **({"eta": eta} if name == "ddim" else {})).prev_sample
        expected.append(x)
        if i + 1 < steps:
            expected.append(reference.add_noise(picture, noise, reference.timesteps[i + 1 : i + 2]))
    final, seen = ours(7)
    error = max(relative(a, b) for a, b in zip(seen, expected, strict=True))
    print(f"{name} η={eta}, {steps} steps: max error relative to |x| {error:.1e}")
    assert error <= TOL
    other_seed, _ = ours(8)
    if name == "euler-a" or eta > 0:  # fresh noise from the generator: another seed, another result
        assert relative(other_seed, final) > 1000 * TOL
    else:
        assert torch.equal(other_seed, final)


@pytest.mark.parametrize("name", SAMPLERS)
def test_add_noise_at_the_first_step_matches_diffusers(name):
    """img2img's start: the picture noised to the level of step ``start`` (diffusers' begin_index)."""
    g = torch.Generator().manual_seed(1)
    picture, noise = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 4, 6, 8, generator=g)
    errors, levels = [], []
    for start in range(10):
        reference = reference_scheduler(name)
        reference.set_timesteps(10)
        if hasattr(reference, "set_begin_index"):
            reference.set_begin_index(start)
        expected = reference.add_noise(picture, noise, reference.timesteps[start : start + 1].repeat(2))
        mine = make_sampler(name, 10).add_noise(picture, noise, start)
        errors.append(relative(mine, expected))
        levels.append(mine)
    print(f"{name}: add_noise max error relative to |x| {max(errors):.1e}")
    assert max(errors) <= TOL
    assert relative(levels[0], levels[-1]) > 1000 * TOL  # the level depends on the step


def test_bad_sampler_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'heun': one of ddim, euler, euler-a"):
        make_sampler("heun", 10)
    with pytest.raises(ValueError, match="eta applies to the DDIM sampler only, not to euler-a"):
        make_sampler("euler-a", 10, eta=0.5)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got 1.5"):
        DDIM(10, eta=1.5)
    with pytest.raises(ValueError, match=r"steps must be in \[1, 999\], got 1000"):
        make_sampler("dpmpp-2m", 1000)  # diffusers' would visit t = 999·k/1000 rounded twice, and give NaN
    assert make_sampler("euler", 1000).timesteps[-2].item() == 1.0


# ----------------------------------------------------------------------------------------------
# Images, tiny config


@pytest.fixture(scope="module")
def ours(tiny) -> StableDiffusion:
    return StableDiffusion(**load_sd15(tiny.folder))


@pytest.fixture(scope="module")
def inpainting_unet(tiny, tmp_path_factory):
    """A 9-channel UNet with the tiny VAE and text encoder: (diffusers' UNet, our pipeline)."""
    unet = ref.make_unet(ref.TINY, seed=5, in_channels=9)
    folder = ref.save_diffusers_folder(tmp_path_factory.mktemp("inpaint") / "model", unet, tiny.vae, tiny.text_encoder)
    return unet, StableDiffusion(**load_sd15(folder))


def reference_pipeline(tiny, name: str, kind: str = "StableDiffusionPipeline", unet=None, **parts):
    import diffusers
    pipe = getattr(diffusers, kind)(vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer,
                                    unet=tiny.unet if unet is None else unet, scheduler=reference_scheduler(name),
                                    safety_checker=None, requires_safety_checker=False,
                                    **{"feature_extractor": None, **parts})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def picture(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    grid = np.random.default_rng(seed).integers(0, 256, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), Image.BILINEAR)


def mask_picture(width: int = 64, height: int = 48) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle((13, 9, 41, 30), fill=255)
    return mask


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")).astype(np.int16) for im in images])


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def compare(what: str, mine, theirs, ddim) -> None:
    """Ours against diffusers' (≤ 2/255), and both far from DDIM's image of the same seed."""
    diff, change = np.abs(pixels(mine) - pixels(theirs)).max(), np.abs(pixels(mine) - pixels(ddim)).max()
    print(f"{what}: max pixel difference {diff}/255; differs from DDIM's image by up to {change}/255")
    assert diff <= PIXEL_TOL, f"max pixel difference {diff}/255"
    assert change > 10 * PIXEL_TOL  # the sampler matters
    assert pixels(mine).std() > 5  # a real image, not a flat one


DDIM_IMAGES = {}


def ddim_image(test: str, pipe: StableDiffusion, **kwargs):
    """Our DDIM image (η = 0) of a test's settings, made once for all its samplers."""
    if test not in DDIM_IMAGES:
        DDIM_IMAGES[test] = pipe(PROMPT, NEGATIVE, progress=False, **kwargs)
    return DDIM_IMAGES[test]


@torch.no_grad()
@pytest.mark.parametrize("name,eta", CASES, ids=IDS)
def test_text_to_image_matches_diffusers(tiny, ours, name, eta):
    common = dict(steps=STEPS, seed=42, width=64, height=48, num_images=2)
    mine = ours(PROMPT, NEGATIVE, sampler=name, eta=eta, progress=False, **common)
    theirs = reference_pipeline(tiny, name)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, width=64, height=48, num_images_per_prompt=2,
        eta=eta, generator=generator(42)).images
    compare(f"{name} η={eta}", mine, theirs, ddim_image("text-to-image", ours, **common))


@torch.no_grad()
@pytest.mark.parametrize("name,eta", CASES, ids=IDS)
def test_img2img_matches_diffusers(tiny, ours, name, eta):
    init = picture(70, 53)  # diffusers works at 64 × 48, the size rounded down to a multiple of 8
    common = dict(steps=STEPS, seed=3, init_image=init, strength=0.6)  # 3 of the 5 steps, from step 2
    mine = ours(PROMPT, NEGATIVE, sampler=name, eta=eta, progress=False, **common)
    theirs = reference_pipeline(tiny, name, "StableDiffusionImg2ImgPipeline")(
        PROMPT, image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=STEPS, eta=eta,
        generator=generator(3)).images
    compare(f"{name} η={eta} img2img", mine, theirs, ddim_image("img2img", ours, **common))


@torch.no_grad()
@pytest.mark.parametrize("unet_channels,strength", [(4, 0.7), (9, 1.0)])
@pytest.mark.parametrize("name,eta", CASES, ids=IDS)
def test_inpainting_matches_diffusers(tiny, ours, inpainting_unet, name, eta, unet_channels, strength):
    """A regular UNet with the picture put back at each step's level (below strength 1), and an
    inpainting UNet that sees the mask and the scaled latents side by side (at strength 1: the
    starting noise × init_noise_sigma)."""
    unet, pipe = (None, ours) if unet_channels == 4 else inpainting_unet
    init, mask = picture(seed=1), mask_picture()
    common = dict(steps=STEPS, seed=7, init_image=init, mask=mask, strength=strength)
    mine = pipe(PROMPT, NEGATIVE, sampler=name, eta=eta, progress=False, **common)
    theirs = reference_pipeline(tiny, name, "StableDiffusionInpaintPipeline", unet)(
        PROMPT, image=init, mask_image=mask, strength=strength, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
        width=64, height=48, eta=eta, generator=generator(7)).images
    compare(f"{name} η={eta} inpainting, {unet_channels}-channel UNet", mine, theirs,
            ddim_image(f"inpainting {unet_channels}", pipe, **common))


@torch.no_grad()
def test_controlnet_sees_the_scaled_latents(tiny, ours, tmp_path):
    """Euler's UNet input is scaled by 1/√(σ² + 1); a ControlNet gets the same input."""
    from diffusers import StableDiffusionControlNetPipeline
    net = ref.make_controlnet(ref.TINY, seed=20)
    net.save_pretrained(tmp_path / "controlnet")
    hint = picture(seed=4)
    control = [ControlNetInput(load_controlnet(tmp_path / "controlnet"), hint, scale=0.8)]
    mine = ours(PROMPT, NEGATIVE, steps=STEPS, seed=5, controls=control, sampler="euler", progress=False)
    pipe = reference_pipeline(tiny, "euler", "StableDiffusionControlNetPipeline", controlnet=net)
    assert isinstance(pipe, StableDiffusionControlNetPipeline)
    theirs = pipe(PROMPT, hint, negative_prompt=NEGATIVE, num_inference_steps=STEPS, controlnet_conditioning_scale=0.8,
                  generator=generator(5)).images
    compare("euler with a ControlNet", mine, theirs, ours(PROMPT, NEGATIVE, steps=STEPS, seed=5, controls=control,
                                                          progress=False))


class StepSpy:
    """A hook that only records what the loop tells it."""
    rows = None

    def __init__(self):
        self.calls = []

    def set_step(self, step, steps, timestep):
        self.calls.append((step, steps, timestep))

    def __call__(self, layer, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@torch.no_grad()
def test_hooks_get_the_run_steps_and_the_samplers_timesteps(ours):
    """0-based steps of the steps run (img2img runs fewer), and the UNet's timestep: fractional
    with Euler, and then σ(t) interpolated in log σ as ComfyUI does."""
    spy = StepSpy()
    ours(PROMPT, steps=STEPS, seed=1, width=32, height=32, hook=spy, sampler="euler", progress=False)
    assert spy.calls == [(i, STEPS, t) for i, t in enumerate([999.0, 749.25, 499.5, 249.75, 0.0])]
    spy = StepSpy()
    ours(PROMPT, steps=STEPS, seed=1, init_image=picture(32, 32), strength=0.6, hook=spy, sampler="dpmpp-2m-karras",
         progress=False)
    assert spy.calls == [(i, 3, t) for i, t in enumerate(make_sampler("dpmpp-2m-karras", STEPS).timesteps[2:].tolist())]
    assert all(isinstance(t, int) for _, _, t in spy.calls)
    low, high, w = LOG_SIGMAS[749], LOG_SIGMAS[750], 0.25
    assert sigma_at(749.25) == ((1 - w) * low + w * high).exp().item()
    assert SIGMAS[749] < sigma_at(749.25) < SIGMAS[750] and sigma_at(749) == SIGMAS[749].item()


# ----------------------------------------------------------------------------------------------
# An image prompt, small config (SD1.5's 16 cross-attention layers, 768-wide tokens)


@pytest.fixture(scope="module")
def image_prompt_world(small, small_vit_h_folder, tmp_path_factory):
    """A random base adapter in the official format at the small UNet's widths."""
    path = tmp_path_factory.mktemp("ip_adapter") / "ip-adapter_sd15.bin"
    ref.write_official(ref.official_state("base", seed=3, widths={n: w // 10 for n, w in ref.OFFICIAL_WIDTHS.items()}),
                       path)
    sd = StableDiffusion(**load_sd15(small.folder))
    adapter = load_ip_adapter(path, widths=sd.unet.cross_attention_widths(), context_dim=768)
    return path, IPAdapterPipeline(sd, adapter, load_image_encoder(small_vit_h_folder))


@torch.no_grad()
@pytest.mark.parametrize("name", ["euler-a", "dpmpp-2m-karras"])
def test_image_prompt_matches_diffusers(small, small_vit_h_folder, image_prompt_world, name):
    from transformers import CLIPImageProcessor
    path, pipe = image_prompt_world
    image = ref.sample_images()[0]
    common = dict(steps=STEPS, seed=11, width=64, height=64)
    mine = pipe(PROMPT, [image], scale=0.8, negative_prompt=NEGATIVE, sampler=name, progress=False, **common)
    reference = reference_pipeline(small, name, image_encoder=ref.load_hf_image_encoder(small_vit_h_folder),
                                   feature_extractor=CLIPImageProcessor())
    reference.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
    try:
        reference.set_ip_adapter_scale(0.8)
        theirs = reference(PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=image, num_inference_steps=STEPS,
                           width=64, height=64, generator=generator(11)).images
    finally:
        reference.unload_ip_adapter()  # the session's reference UNet serves other tests
    ddim = pipe(PROMPT, [image], scale=0.8, negative_prompt=NEGATIVE, progress=False, **common)
    compare(f"{name} with an image prompt", mine, theirs, ddim)
    without = pipe.sd(PROMPT, NEGATIVE, sampler=name, progress=False, **common)
    assert np.abs(pixels(mine) - pixels(without)).max() > 10 * PIXEL_TOL  # the image prompt acts


# ----------------------------------------------------------------------------------------------
# The command line


def test_sample_command_takes_the_sampler(tiny, ours, tmp_path):
    common = ["--model", str(tiny.folder), "--prompt", PROMPT, "--steps", str(STEPS), "--seed", "9", "--width", "64",
              "--height", "48", "--no-progress"]
    assert sample.main([*common, "--sampler", "euler-a", "--out", str(tmp_path / "a.png")]) == 0
    assert sample.main([*common, "--eta", "0.5", "--out", str(tmp_path / "b.png")]) == 0
    expected_a = ours(PROMPT, steps=STEPS, seed=9, width=64, height=48, sampler="euler-a", progress=False)[0]
    expected_b = ours(PROMPT, steps=STEPS, seed=9, width=64, height=48, eta=0.5, progress=False)[0]
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.tobytes() == expected_a.tobytes() and b.tobytes() == expected_b.tobytes()
    settings_a, settings_b = (a1111.parse(image.text["parameters"]) for image in (a, b))
    assert settings_a["Sampler"] == "Euler a" and "Eta DDIM" not in settings_a
    assert settings_b["Sampler"] == "DDIM" and settings_b["Eta DDIM"] == "0.5"
    assert a.tobytes() != b.tobytes()


@pytest.mark.parametrize("extra,message", [
    (["--sampler", "euler", "--eta", "0.3"], "--eta applies to --sampler ddim only, not to euler"),
    (["--eta", "1.5"], "argument --eta: 1.5 is outside [0, 1]"),
    (["--sampler", "dpmpp-2m", "--steps", "1000"], "--steps must be in [1, 999] for --sampler dpmpp-2m, got 1000"),
])
def test_sample_refuses_bad_sampler_flags_before_loading(tmp_path, capsys, extra, message):
    (tmp_path / "model.safetensors").write_bytes(b"garbage: loading it would fail differently")
    args = ["--model", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "o.png"), *extra]
    try:
        code = sample.main(args)
    except SystemExit as exit:  # argparse's own errors, one line too
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_help_explains_each_sampler(capsys):
    with pytest.raises(SystemExit):
        sample.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in SAMPLERS:
        assert f"{name}:" in text
    assert "A1111's 'DPM++ 2M Karras'" in text
