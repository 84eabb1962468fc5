"""ControlNet against diffusers on the tiny config (fp32, CPU): the model's residuals (≤ 1e-5) from
each file format, and StableDiffusionControlNetPipeline's images (≤ 2/255) with one and two
ControlNets, a start/end window and guess mode. The full-size check, with an IP-Adapter, is in
test_controls_full.py.

The original-layout files are made from the reference folder and checked with diffusers' own
single-file converter, so they are genuine original checkpoints."""
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import a1111
import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.pipelines.controls import ControlNetInput
from ipadapter_min.formats.controlnet import read_controlnet
from ipadapter_min.formats.files import CheckpointError
from ipadapter_min.loading.controls import load_controlnet
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from weights_convert.__main__ import main as convert_main

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5
PROMPT, NEGATIVE = "a red bicycle", "blurry"


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Two reference ControlNets (tiny), each as a diffusers folder and as a converted file. (The
    original files assume SD1.5's configuration, so they are loaded at full size, in
    test_controls_full.py; here their key names are checked.)"""
    root = tmp_path_factory.mktemp("controlnets")
    out = []
    for seed in (20, 21):
        model = ref.make_controlnet(ref.TINY, seed=seed)
        folder, converted = root / f"diffusers-{seed}", root / f"control-{seed}.safetensors"
        model.save_pretrained(folder)
        assert convert_main(["controlnet", str(folder), "-o", str(converted)]) == 0
        out.append((model, folder, converted))
    return out


@pytest.fixture(scope="module")
def sd(tiny) -> StableDiffusion:
    return StableDiffusion(**load_sd15(tiny.folder))


def control_picture(width: int, height: int, seed: int) -> Image.Image:
    """A bright edge map on black, as a preprocessor makes."""
    rng = np.random.default_rng(seed)
    array = np.zeros((height, width, 3), np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, height), rng.integers(0, width)
        array[y, :] = 255
        array[:, x] = rng.integers(100, 256)
    return Image.fromarray(array)


def test_original_layout_is_what_diffusers_reads(nets, tmp_path):
    """Our names are the original checkpoints': written with and without the control_model.
    prefix, diffusers' single-file converter turns them into exactly the reference weights."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    model, folder, _ = nets[0]
    ours, _ = read_controlnet(folder)
    reference = model.state_dict()
    for prefix in ("control_model.", ""):
        original = {prefix + k: v for k, v in ours.tensors.items()}
        converted = convert_controlnet_checkpoint(original, dict(model.config))
        assert converted.keys() == reference.keys()
        assert all(torch.equal(converted[k], v) for k, v in reference.items())


@torch.no_grad()
def test_controlnet_matches_diffusers(nets):
    model, folder, converted = nets[0]
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 6, generator=g), torch.randn(2, 77, 32, generator=g)
    hint = torch.rand(2, 3, 64, 48, generator=g)
    t = torch.tensor([981, 300])
    down, mid = model(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    for path in (folder, converted):
        ours = load_controlnet(path)(x, t, context, hint)
        assert len(ours.skips) == len(down) == 4  # conv_in, level 0, its downsampler, level 1
        errors = [(a - b).abs().max().item() for a, b in zip([*ours.skips, ours.middle], [*down, mid])]
        print(f"{path.name}: max abs error {max(errors):.1e}")
        assert max(errors) <= TOL, (path, errors)
    assert min(r.std().item() for r in down) > 1e-3  # not a degenerate comparison


def reference_pipeline(tiny, controlnet):
    from diffusers import StableDiffusionControlNetPipeline
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet, controlnet=controlnet,
        scheduler=ref.ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im).astype(np.int16) for im in images])


CASES = {  # our ControlNetInput settings per net, and diffusers' arguments
    "one": ([dict(scale=0.7)], dict(controlnet_conditioning_scale=0.7)),
    "window": ([dict(scale=1.2, start=0.2, end=0.6)],
               dict(controlnet_conditioning_scale=1.2, control_guidance_start=0.2, control_guidance_end=0.6)),
    "guess": ([dict(guess_mode=True)], dict(guess_mode=True)),
    "two": ([dict(scale=0.8), dict(scale=0.5, end=0.5)],
            dict(controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.0],
                 control_guidance_end=[1.0, 0.5])),
}


@torch.no_grad()
@pytest.mark.parametrize("case", CASES)
def test_pipeline_matches_diffusers(tiny, sd, nets, case):
    settings, theirs_kwargs = CASES[case]
    images = [control_picture(64, 48, seed=i) for i in range(len(settings))]
    controls = [ControlNetInput(load_controlnet(folder), image, **s)
                for (_, folder, _), image, s in zip(nets, images, settings)]
    mine = sd(PROMPT, NEGATIVE, steps=5, seed=42, num_images=2, controls=controls, progress=False)
    reference_nets = [model for model, *_ in nets[:len(settings)]]
    pipe = reference_pipeline(tiny, reference_nets[0] if len(settings) == 1 else reference_nets)
    theirs = pipe(PROMPT, images[0] if len(settings) == 1 else images, negative_prompt=NEGATIVE, num_inference_steps=5,
                  num_images_per_prompt=2, generator=torch.Generator("cpu").manual_seed(42), **theirs_kwargs).images
    assert all(im.size == (64, 48) for im in mine)  # the control image's size
    diff = np.abs(pixels(mine) - pixels(theirs)).max()
    print(f"{case}: max pixel difference {diff}/255")
    assert diff <= 2, f"max pixel difference {diff}/255"
    without = sd(PROMPT, NEGATIVE, steps=5, seed=42, width=64, height=48, progress=False)
    assert np.abs(pixels(mine[:1]) - pixels(without)).max() > 8  # the control changes the image (4× the tolerance)


@torch.no_grad()
def test_controlnet_with_img2img_matches_diffusers(tiny, sd, nets):
    """The two combined, as StableDiffusionControlNetImg2ImgPipeline combines them."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(
        (64, 48), Image.BILINEAR)
    control = control_picture(64, 48, seed=3)
    mine = sd(PROMPT, NEGATIVE, steps=5, seed=8, init_image=init, strength=0.8,
              controls=[ControlNetInput(load_controlnet(nets[0][1]), control, scale=0.9)], progress=False)
    pipe = StableDiffusionControlNetImg2ImgPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet, controlnet=nets[0][0],
        scheduler=ref.ddim_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, image=init, control_image=control, strength=0.8, negative_prompt=NEGATIVE,
                  num_inference_steps=5, controlnet_conditioning_scale=0.9,
                  generator=torch.Generator("cpu").manual_seed(8)).images
    diff = np.abs(pixels(mine) - pixels(theirs)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    img2img_only = sd(PROMPT, NEGATIVE, steps=5, seed=8, init_image=init, strength=0.8, progress=False)
    assert np.abs(pixels(mine) - pixels(img2img_only)).max() > 8


@torch.no_grad()
def test_control_image_of_another_size_is_refused(sd, nets):
    control = ControlNetInput(load_controlnet(nets[0][1]), control_picture(64, 48, 0))
    with pytest.raises(ValueError, match="the control image is 64×48, the output 64×64"):
        sd(PROMPT, width=64, height=64, controls=[control], progress=False)


@pytest.mark.parametrize("change,message", [
    ({"label_emb.0.0.weight": torch.zeros(2, 2)}, "ControlNet for SDXL"),
    ({"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}, "Stable Diffusion 2"),
])
def test_other_controlnet_families_are_refused(tmp_path, change, message):
    path = tmp_path / "other.safetensors"
    save_file({"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
               **{"control_model." + k: v for k, v in change.items()}}, path)
    with pytest.raises(CheckpointError, match=message):
        read_controlnet(path)


def test_sample_command_takes_controlnets(tiny, sd, nets, tmp_path):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"edges-{i}.png")
        control_picture(64, 48, seed=i).save(paths[-1])
    out = tmp_path / "o.png"
    args = ["--model", str(tiny.folder), "--prompt", PROMPT, "--steps", "4", "--seed", "3", "--no-progress",
            "--controlnet", str(nets[0][2]), "--control-image", str(paths[0]), "--control-scale", "0.6",
            "--control-end", "1", "--controlnet", str(nets[1][1]), "--control-image", str(paths[1]),
            "--control-scale", "1", "--control-end", "0.5",
            "--out", str(out)]
    assert sample.main(args) == 0
    controls = [ControlNetInput(load_controlnet(nets[0][2]), Image.open(paths[0]), scale=0.6),
                ControlNetInput(load_controlnet(nets[1][1]), Image.open(paths[1]), end=0.5)]
    expected = sd(PROMPT, steps=4, seed=3, controls=controls, progress=False)[0]
    written = Image.open(out)
    assert written.size == (64, 48) and written.tobytes() == expected.tobytes()
    assert a1111.parse(written.text["parameters"])["ControlNet 1"].startswith("Model: ")


@pytest.mark.parametrize("extra,message", [
    (["--controlnet", "{d}/c.pth"], "--controlnet needs --control-image: 1 × --controlnet, 0 × --control-image"),
    (["--control-image", "{d}/edges.png"], "--control-image needs --controlnet"),
    (["--controlnet", "{d}/c.pth", "--control-image", "{d}/edges.png", "--width", "64", "--height", "64"],
     "--control-image {d}/edges.png is 64×48, the output 64×64"),
    (["--controlnet", "{d}/c.pth", "--control-image", "{d}/edges.png", "--control-scale", "1", "--control-scale", "2"],
     "--control-scale: give one value, or one per --controlnet (1), not 2"),
    (["--controlnet", "{d}/c.pth", "--control-image", "{d}/edges.png", "--control-start", "0.6", "--control-end", "0.4"],
     "0 ≤ --control-start < --control-end ≤ 1"),
    (["--controlnet", "{d}/missing.pth", "--control-image", "{d}/edges.png"], "--controlnet {d}/missing.pth: no such"),
    (["--guess-mode"], "--guess-mode applies to ControlNets"),
    (["--controlnet", "{d}/sdxl.safetensors", "--control-image", "{d}/edges.png"], "a ControlNet for SDXL"),
])
def test_sample_refuses_bad_control_input_before_loading(tmp_path, capsys, extra, message):
    control_picture(64, 48, 0).save(tmp_path / "edges.png")
    (tmp_path / "c.pth").write_bytes(b"x")
    save_file({"control_model.label_emb.0.0.weight": torch.zeros(2, 2)}, tmp_path / "sdxl.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")  # a readable header; loading would fail differently
    args = ["--model", str(tmp_path / "model.safetensors"), "--out", str(tmp_path / "o.png")]
    assert sample.main(args + [a.format(d=tmp_path) for a in extra]) == 2
    err = capsys.readouterr().err
    assert message.format(d=tmp_path) in err and err.count("\n") == 1
