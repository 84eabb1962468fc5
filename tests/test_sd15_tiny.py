"""Fast parity of each SD1.5 piece against diffusers/transformers, on small configs.

The reference models get random weights, are written as a diffusers folder, and ours are
loaded from that folder through the real loader. fp32, CPU. Tolerance: 1e-5 max abs here
(small models accumulate little rounding); the full-size tests state theirs.
"""
import types

import numpy as np
import pytest
import torch
from PIL import Image

import reference_models as ref
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.image_processing import to_images
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.samplers import DDIM

TOL = 1e-5


@pytest.fixture(scope="module")
def ours(tiny):
    return load_sd15(tiny.folder)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@torch.no_grad()
def test_unet_matches_diffusers(tiny, ours):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 24, generator=g)
    context = torch.randn(2, 77, 32, generator=g)
    for t in (torch.tensor(981), torch.tensor([1, 500])):
        expected = tiny.unet(x, t, encoder_hidden_states=context).sample
        assert max_diff(ours["unet"](x, t, context), expected) <= TOL
        assert expected.std() > 0.1  # not a degenerate comparison
    odd = torch.randn(2, 4, 9, 7, generator=g)  # sides that do not halve evenly (images of 72×56)
    expected = tiny.unet(odd, torch.tensor(500), encoder_hidden_states=context).sample
    assert max_diff(ours["unet"](odd, torch.tensor(500), context), expected) <= TOL


@torch.no_grad()
def test_vae_matches_diffusers(tiny, ours):
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected_mean = tiny.vae.encode(image).latent_dist.mean
    assert max_diff(ours["vae"].encode(image), expected_mean * 0.18215) <= TOL
    latents = torch.randn(1, 4, 4, 6, generator=torch.Generator().manual_seed(2))
    assert max_diff(ours["vae"].decode(latents), tiny.vae.decode(latents / 0.18215).sample) <= TOL


@torch.no_grad()
@pytest.mark.parametrize("clip_skip", [0, 1])
def test_text_encoder_matches_transformers(tiny, ours, clip_skip):
    ids = tiny.tokenizer(["a photo of a cat", ""], padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    out = tiny.text_encoder(ids, output_hidden_states=True)
    # diffusers' clip_skip: hidden state -(clip_skip + 1), then the final LayerNorm.
    expected = tiny.text_encoder.final_layer_norm(out.hidden_states[-(clip_skip + 1)])
    if clip_skip == 0:
        assert torch.equal(expected, out.last_hidden_state)
    assert max_diff(ours["text_encoder"](ids, clip_skip=clip_skip), expected) <= TOL


@pytest.mark.parametrize("steps", [1, 4, 7, 30, 50, 999])
def test_ddim_timesteps_match_diffusers(steps):
    reference = ref.ddim_scheduler()
    reference.set_timesteps(steps)
    assert DDIM(steps).timesteps.tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("steps", [3, 30])
def test_ddim_steps_match_diffusers(steps):
    reference = ref.ddim_scheduler()
    reference.set_timesteps(steps)
    ddim = DDIM(steps)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(reference.timesteps):
        eps = torch.randn(2, 4, 8, 8, generator=g)
        expected = reference.step(eps, t, x).prev_sample
        x_ours = ddim.step(eps, i, x)
        assert torch.allclose(x_ours, expected, rtol=0, atol=1e-6), int(t)
        x = expected


@pytest.mark.parametrize("steps", [0, 1000])
def test_ddim_rejects_bad_step_count(steps):
    with pytest.raises(ValueError, match=r"steps must be in \[1, 999\]"):
        DDIM(steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_images_are_rounded_as_diffusers_rounds_them(dtype):
    from diffusers.image_processor import VaeImageProcessor
    pixels = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 0.7).to(dtype)
    expected = VaeImageProcessor().postprocess(pixels, output_type="pil")
    assert pixels_of(to_images(pixels)).equal(pixels_of(expected))


def pixels_of(images) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).int() for im in images])


@torch.no_grad()
@pytest.mark.parametrize("guidance,negative,clip_skip", [(7.5, "", 0), (5.0, "blurry", 1), (1.0, "", 0)])
def test_pipeline_matches_diffusers(tiny, ours, guidance, negative, clip_skip, monkeypatch):
    # diffusers 0.42's clip_skip path reaches for transformers 4's `text_model` wrapper, which
    # transformers 5 removed; point it at the same final LayerNorm.
    monkeypatch.setattr(tiny.text_encoder, "text_model", types.SimpleNamespace(
        final_layer_norm=tiny.text_encoder.final_layer_norm), raising=False)
    kwargs = dict(steps=4, guidance=guidance, seed=42, width=64, height=48, num_images=2)
    mine = StableDiffusion(ours["unet"], ours["vae"], ours["text_encoder"])(
        "a red bicycle", negative, clip_skip=clip_skip, progress=False, **kwargs)
    pipe = ref.diffusers_pipeline(tiny.unet, tiny.vae, tiny.text_encoder, tiny.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red bicycle", negative_prompt=negative, num_inference_steps=4, guidance_scale=guidance,
                  width=64, height=48, num_images_per_prompt=2, clip_skip=clip_skip or None,
                  generator=torch.Generator("cpu").manual_seed(42)).images
    assert all(isinstance(im, Image.Image) and im.size == (64, 48) for im in mine)
    diff = (pixels_of(mine) - pixels_of(theirs)).abs().max().item()
    assert diff <= 2, f"max pixel difference {diff}/255"
    assert pixels_of(mine).float().std() > 5  # the images are not flat


@torch.no_grad()
def test_same_seed_same_bits(ours):
    sd = StableDiffusion(ours["unet"], ours["vae"], ours["text_encoder"])
    a = sd("x", steps=2, seed=7, width=32, height=32, progress=False)[0]
    b = sd("x", steps=2, seed=7, width=32, height=32, progress=False)[0]
    c = sd("x", steps=2, seed=8, width=32, height=32, progress=False)[0]
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
