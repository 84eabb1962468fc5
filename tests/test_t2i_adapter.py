"""T2I-Adapter against diffusers (fp32, CPU): the full and light models at SD1.5 size from the
original TencentARC files and from diffusers folders (≤ 1e-4: 77 M and 19 M parameters, cheap
enough at full size), StableDiffusionAdapterPipeline's images on the tiny config (≤ 2/255), and,
since diffusers' adapter pipeline takes no IP-Adapter, the UNet step with both at once.

The original files are written from the reference weights with TencentARC's key layout, spelled
out below from its conversion script (scripts/convert_original_t2i_adapter.py in diffusers), so
they do not rely on our own rename tables."""
import numpy as np
import pytest
import torch
from PIL import Image

import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.loading.controls import load_t2i_adapter
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.pipelines.controls import T2IAdapterInput
from weights_convert.__main__ import main as convert_main

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, NEGATIVE = "a red bicycle", "blurry"


def make_adapter(seed: int, **kwargs):
    from diffusers import T2IAdapter
    from diffusers.models.modeling_utils import no_init_weights
    with no_init_weights():
        return ref.randomize_(T2IAdapter(**kwargs), seed).eval()


def original_keys(state: dict, light: bool, blocks_per_level: int) -> dict:
    """diffusers keys → TencentARC's: full ``adapter.body.{i}.resnets.{j}.*`` → ``body.{i·n + j}.*``
    and ``adapter.body.{i}.in_conv`` → ``body.{i·n}.in_conv``; light ``…resnets.{k}`` →
    ``body.{i}.body.{k}``; ``adapter.conv_in`` → ``conv_in``."""
    out = {}
    for key, value in state.items():
        parts = key.removeprefix("adapter.").split(".")
        if parts[0] == "body":
            level = int(parts[1])
            if light:
                parts = ["body", str(level), "body", *parts[3:]] if parts[2] == "resnets" else parts
            elif parts[2] == "resnets":
                parts = ["body", str(level * blocks_per_level + int(parts[3])), *parts[4:]]
            else:  # in_conv
                parts = ["body", str(level * blocks_per_level), *parts[2:]]
        out[".".join(parts)] = value.clone()
    return out


@torch.no_grad()
@pytest.mark.full_size  # SD1.5's T2I-Adapters
@pytest.mark.parametrize("kind,in_channels", [("full_adapter", 3), ("full_adapter", 1), ("light_adapter", 3)])
def test_adapter_matches_diffusers_from_every_format(tmp_path, kind, in_channels):
    light = kind == "light_adapter"
    kwargs = dict(in_channels=in_channels, adapter_type=kind, num_res_blocks=4 if light else 2,
                  channels=[320, 640, 1280] if light else [320, 640, 1280, 1280])
    reference = make_adapter(3, **kwargs)
    folder, original, converted = tmp_path / "diffusers", tmp_path / "t2iadapter_sd15v2.pth", tmp_path / "c.safetensors"
    reference.save_pretrained(folder)
    torch.save(original_keys(reference.state_dict(), light, 2), original)
    assert convert_main(["t2i-adapter", str(original), "-o", str(converted)]) == 0
    image = torch.rand(1, in_channels, 128, 96, generator=torch.Generator().manual_seed(0))
    expected = reference(image)
    for path in (folder, original, converted):
        features = load_t2i_adapter(path)(image)
        assert [f.shape for f in features] == [e.shape for e in expected]
        error = max((a - b).abs().max().item() for a, b in zip(features, expected))
        print(f"{kind} ({in_channels} channels) from {path.name}: max abs error {error:.1e}")
        assert error <= 1e-4, (path, error)
    assert min(e.std().item() for e in expected) > 1e-3


def control_picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.NEAREST)


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory):
    """Two full adapters for the tiny UNet (its two levels: 32 and 64 wide), as diffusers folders."""
    root = tmp_path_factory.mktemp("t2i")
    out = []
    for seed in (1, 2):
        model = make_adapter(seed, channels=[32, 64], num_res_blocks=2)
        model.save_pretrained(root / f"adapter-{seed}")
        out.append((model, root / f"adapter-{seed}"))
    return out


@torch.no_grad()
@pytest.mark.parametrize("scales", [[1.0], [0.7, 0.4]])
def test_pipeline_matches_diffusers(tiny, tiny_adapters, scales):
    from diffusers import MultiAdapter, StableDiffusionAdapterPipeline
    sd = StableDiffusion(**load_sd15(tiny.folder))
    images = [control_picture(64, 48, i) for i in range(len(scales))]
    controls = [T2IAdapterInput(load_t2i_adapter(folder), image, scale)
                for (_, folder), image, scale in zip(tiny_adapters, images, scales)]
    mine = sd(PROMPT, NEGATIVE, steps=4, seed=42, num_images=2, controls=controls, progress=False)
    models = [model for model, _ in tiny_adapters[:len(scales)]]
    pipe = StableDiffusionAdapterPipeline(
        vae=tiny.vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=tiny.unet,
        adapter=models[0] if len(models) == 1 else MultiAdapter(models), scheduler=ref.ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, images[0] if len(images) == 1 else images, negative_prompt=NEGATIVE, num_inference_steps=4,
                  num_images_per_prompt=2, adapter_conditioning_scale=scales[0] if len(scales) == 1 else scales,
                  generator=torch.Generator("cpu").manual_seed(42)).images
    ours_pixels, their_pixels = (np.stack([np.asarray(im).astype(np.int16) for im in x]) for x in (mine, theirs))
    assert mine[0].size == (64, 48)
    diff = np.abs(ours_pixels - their_pixels).max()
    print(f"{len(scales)} adapter(s): max pixel difference {diff}/255")
    assert diff <= 2, f"max pixel difference {diff}/255"
    without = np.asarray(sd(PROMPT, NEGATIVE, steps=4, seed=42, width=64, height=48, progress=False)[0]).astype(np.int16)
    assert np.abs(ours_pixels[0] - without).max() > 8  # the adapter changes the image (4× the tolerance)


def test_sample_command_takes_t2i_adapters(tiny, tiny_adapters, tmp_path, capsys):
    image = tmp_path / "sketch.png"
    control_picture(64, 48, 0).save(image)
    out = tmp_path / "o.png"
    args = ["--model", str(tiny.folder), "--prompt", PROMPT, "--steps", "3", "--no-progress", "--out", str(out),
            "--t2i-adapter", str(tiny_adapters[0][1]), "--adapter-image", str(image), "--adapter-scale", "0.5"]
    assert sample.main(args) == 0
    sd = StableDiffusion(**load_sd15(tiny.folder))
    expected = sd(PROMPT, steps=3, progress=False,
                  controls=[T2IAdapterInput(load_t2i_adapter(tiny_adapters[0][1]), Image.open(image), 0.5)])[0]
    assert Image.open(out).tobytes() == expected.tobytes()
    bad = ["--model", str(tiny.folder), "--out", str(tmp_path / "x.png"), "--t2i-adapter", str(tiny_adapters[0][1]),
           "--adapter-image", str(image), "--width", "64", "--height", "64"]
    assert sample.main(bad) == 2
    assert "--adapter-image" in capsys.readouterr().err


@torch.no_grad()
@pytest.mark.filterwarnings("ignore:You have passed a tensor as `encoder_hidden_states`")
def test_unet_step_with_an_image_prompt_and_a_t2i_adapter_matches_diffusers(small):
    """diffusers' adapter pipeline takes no IP-Adapter, so the combination is checked by its parts:
    one UNet step with the adapter's image tokens (the hook) and the T2I features (the residual
    input) together, against diffusers' UNet with its IP-Adapter processors and
    down_intrablock_additional_residuals, on the small config (SD1.5's 16 cross-attention layers)."""
    from test_training import TOKENS, add_reference_processors

    from ipadapter_min.models.configs import AdapterSpec
    from ipadapter_min.training.recipe import new_adapter
    from ipadapter_min.models.residuals import Residuals
    unet = load_sd15(small.folder)["unet"]
    adapter = new_adapter(AdapterSpec.on_embedding(1024, TOKENS), unet)
    theirs = small.load_unet()
    add_reference_processors(theirs)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 7, 768, generator=g)
    tokens = torch.randn(1, TOKENS, 768, generator=g)
    features = [torch.randn(2, c, 16 // 2**i, 16 // 2**i, generator=g) * 0.5 for i, c in enumerate((32, 64, 128, 128))]
    t = torch.tensor(500)
    expected = theirs(x, t, torch.cat([text, tokens.expand(2, -1, -1)], 1),
                      down_intrablock_additional_residuals=[f.clone() for f in features]).sample
    hook = adapter.hook(tokens.expand(2, -1, -1))  # every row conditional, λ = 1
    mine = unet(x, t, text, hook, Residuals(levels=features))
    error = (mine - expected).abs().max().item()
    print(f"UNet step with an image prompt and T2I features: max abs error {error:.1e}")
    assert error <= 1e-4, error
    image_only = unet(x, t, text, adapter.hook(tokens.expand(2, -1, -1)))
    assert (mine - image_only).abs().max() > 100 * 1e-4  # the features change the step


def test_sdxl_and_foreign_adapters_are_refused(tmp_path):
    from ipadapter_min.formats.files import CheckpointError
    folder = tmp_path / "sdxl"
    make_adapter(0, channels=[32, 64], num_res_blocks=1, adapter_type="full_adapter_xl").save_pretrained(folder)
    with pytest.raises(CheckpointError, match="a T2I-Adapter for SDXL"):
        load_t2i_adapter(folder)
    path = tmp_path / "odd.pth"
    torch.save({"conv_in.weight": torch.zeros(320, 100, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="takes 100 channels after pixel-unshuffle by 8, expected 64"):
        load_t2i_adapter(path)
