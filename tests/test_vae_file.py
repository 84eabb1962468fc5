"""--vae (issue 13): separately distributed SD1.5 VAEs (stabilityai's sd-vae-ft-mse and the like) as
the original single file and as a diffusers folder, against diffusers' AutoencoderKL with the same
weights; the VAE replaces the model's; refusals.

The original file is made at the real SD1.5 VAE size (84M parameters): random weights under our
VAE's names, which are the original checkpoint's; diffusers' own single-file converter
(``convert_ldm_vae_checkpoint``) turns them into its names and AutoencoderKL loads them strictly,
so a name of ours that the original files do not use fails there. Tolerance: 1e-4 max abs on
encode (scaled latent mean) and decode, fp32.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import a1111
import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.models.configs import VAEConfig
from ipadapter_min.formats.files import CheckpointError
from ipadapter_min.loading.sd15 import load_sd15, load_vae
from ipadapter_min.pipelines.text_to_image import StableDiffusion
from ipadapter_min.models.vae import VAE

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-4
SCALE = 0.18215


@torch.no_grad()
def compare(ours: VAE, theirs) -> tuple[float, float]:
    """(encode, decode) max abs differences on a 64×64 image and an 8×8 latent."""
    g = torch.Generator().manual_seed(0)
    image, latents = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    encode = (ours.encode(image) - theirs.encode(image).latent_dist.mean * SCALE).abs().max().item()
    decode = (ours.decode(latents) - theirs.decode(latents / SCALE).sample).abs().max().item()
    return encode, decode


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    """An SD1.5-sized VAE's original state dict (random) and diffusers' AutoencoderKL holding it."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    original = ref.randomize_(VAE(VAEConfig()), seed=11).state_dict()
    config = ref.vae_kwargs(ref.FULL)
    reference = AutoencoderKL(**config).eval()
    reference.load_state_dict(convert_ldm_vae_checkpoint(dict(original), config), strict=True)
    return original, reference, tmp_path_factory.mktemp("full_vae")


@pytest.mark.full_size  # a full-size VAE
def test_original_file_matches_diffusers(full_size):
    original, reference, folder = full_size
    plain = folder / "vae-ft-mse-840000-ema-pruned.safetensors"
    save_file(original, str(plain))
    wrapped = folder / "vae-ft-mse-840000-ema-pruned.ckpt"  # the .ckpt: a Lightning state_dict, extras beside the VAE
    extras = {"model_ema.decay": torch.tensor(0.9999), "loss.logvar": torch.zeros(()),
              "loss.discriminator.main.0.weight": torch.zeros(64, 3, 4, 4)}
    torch.save({"state_dict": {**original, **extras}, "global_step": 840000}, wrapped)
    whole = folder / "whole-checkpoint.safetensors"  # a whole checkpoint's VAE, its other parts ignored
    save_file({**{f"first_stage_model.{k}": v for k, v in original.items()},
               "model.diffusion_model.out.2.bias": torch.zeros(4)}, str(whole))
    for path in (plain, wrapped, whole):
        encode, decode = compare(load_vae(path), reference)
        print(f"{path.name}: encode {encode:.1e}, decode {decode:.1e} from diffusers")
        assert encode <= TOL and decode <= TOL
    other = compare(ref.randomize_(VAE(VAEConfig()), seed=12).eval(), reference)  # another VAE is far off
    print(f"another VAE: encode {other[0]:.2f}, decode {other[1]:.2f} from diffusers'")
    assert min(other) > 1000 * TOL


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """A diffusers folder of a VAE of the tiny model's architecture with other random weights."""
    vae = ref.make_vae(ref.TINY, seed=5)
    folder = tmp_path_factory.mktemp("other_vae") / "sd-vae-ft-mse"
    vae.save_pretrained(folder)
    return vae, folder


def test_diffusers_folder_matches_diffusers(tiny, other_vae):
    vae, folder = other_vae
    encode, decode = compare(load_vae(folder), vae)
    print(f"diffusers folder: encode {encode:.1e}, decode {decode:.1e} from diffusers")
    assert encode <= TOL and decode <= TOL
    in_model = compare(load_vae(tiny.folder), tiny.vae)  # a model folder: its vae/
    assert max(in_model) <= TOL and min(compare(load_vae(tiny.folder), vae)) > 1000 * TOL


def test_the_vae_replaces_the_models(tiny, other_vae):
    _, folder = other_vae
    replaced = load_sd15(tiny.folder, vae=folder)
    alone, own = load_vae(folder), load_sd15(tiny.folder)
    assert all(torch.equal(a, b) for a, b in zip(replaced["vae"].state_dict().values(), alone.state_dict().values()))
    assert not torch.equal(replaced["vae"].decoder.conv_out.weight, own["vae"].decoder.conv_out.weight)
    assert all(torch.equal(a, b) for a, b in zip(replaced["unet"].state_dict().values(), own["unet"].state_dict().values()))


def test_cli_vae_changes_the_image(tiny, other_vae, tmp_path):
    _, folder = other_vae
    common = ["--model", str(tiny.folder), "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32",
              "--seed", "1", "--no-progress", "--device", "cpu"]
    assert sample.main([*common, "--out", str(tmp_path / "own.png")]) == 0
    assert sample.main([*common, "--vae", str(folder), "--out", str(tmp_path / "vae.png")]) == 0
    own, swapped = (Image.open(tmp_path / name) for name in ("own.png", "vae.png"))
    assert a1111.parse(swapped.text["parameters"])["VAE"] == "sd-vae-ft-mse" and "VAE" not in a1111.parse(own.text["parameters"])
    api = StableDiffusion.from_file(tiny.folder, vae=folder)("a cat", steps=2, width=32, height=32, seed=1,
                                                             progress=False)[0]
    own, swapped, api = (np.asarray(i.convert("RGB")).astype(int) for i in (own, swapped, api))
    print(f"--vae changes the image by up to {np.abs(own - swapped).max()}/255")
    assert np.array_equal(swapped, api) and np.abs(own - swapped).max() > 10


def sixteen_channel_file(path):
    save_file({"decoder.conv_in.weight": torch.zeros(512, 16, 3, 3), "encoder.conv_out.weight": torch.zeros(32, 512, 3, 3)},
              str(path))
    return path


def test_other_vaes_are_refused_in_one_line(tmp_path):
    from diffusers import AutoencoderKL
    flux_like = sixteen_channel_file(tmp_path / "ae.safetensors")
    folder = tmp_path / "sd3-vae"  # SD3's VAE: 16 latent channels, no quant_conv
    AutoencoderKL(**{**ref.vae_kwargs(ref.TINY), "latent_channels": 16, "use_quant_conv": False,
                     "use_post_quant_conv": False}).save_pretrained(folder)
    bad_key = tmp_path / "bad.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(128, 3, 3, 3), "cond_stage_model.x": torch.zeros(1)}, str(bad_key))
    tiny_vae = tmp_path / "tiny.safetensors"  # original layout, not SD1.5's widths: the shapes say so
    save_file(ref.randomize_(VAE(VAEConfig(channels=16, groups=8)), 0).state_dict(), str(tiny_vae))
    cases = [(flux_like, "a VAE with 16-channel latents (SD3's and Flux's have 16); SD1.5's has 4"),
             (folder, "a VAE with 16-channel latents"),
             (bad_key, "unexpected key 'cond_stage_model.x' (an SD1.x VAE has encoder., decoder., quant_conv., "
                       "post_quant_conv.)"),
             (tiny_vae, "has shape [64], expected [512] for an SD1.5 VAE"),
             (tmp_path / "missing.safetensors", "no such file or folder")]
    for path, message in cases:
        with pytest.raises(CheckpointError) as info:
            load_vae(path)
        assert message in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value), path


def test_pickled_vae_runs_no_code(tmp_path):
    """Pickles only through torch.load(weights_only=True): a .ckpt that would run code is refused."""
    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"decoder.conv_in.weight": Evil()}}, path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_vae(path)


def test_cli_bad_vae_is_one_line(tiny, tmp_path, capsys):
    code = sample.main(["--model", str(tiny.folder), "--vae", str(tmp_path / "nope"), "--out", str(tmp_path / "o.png")])
    assert code == 2 and capsys.readouterr().err == f"error: --vae {tmp_path / 'nope'}: no such file or folder\n"
    flux_like = sixteen_channel_file(tmp_path / "ae.safetensors")
    code = sample.main(["--model", str(tiny.folder), "--vae", str(flux_like), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and "16-channel latents" in err and err.count("\n") == 1 and not (tmp_path / "o.png").exists()
