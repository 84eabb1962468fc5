"""Parity at the full SD1.5 architecture (860 M UNet, 84 M VAE, 123 M text encoder), random
weights, fp32, CPU, and the three checkpoint formats users have.

Tolerances: 1e-4 max abs for each model. The reference models are written as a diffusers
folder; the original single file is made from it and then checked with diffusers' own
single-file converter, so it is a genuine original-layout checkpoint.

Memory: one full-size model at a time (the machine is shared; see conftest.Reference). The
reference models are read back from the folder for each test and dropped before ours are loaded;
fixtures keep paths, not weights.
"""
import gc
import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.loading.sd15 import load_sd15
from weights_convert.__main__ import main as convert_main
from ipadapter_min.formats.sd15 import read_sd15

TOL = 1e-4
SINGLE_FILE_PREFIX = {"unet.": "model.diffusion_model.", "vae.": "first_stage_model.",
                      "text_encoder.": "cond_stage_model.transformer.text_model."}

pytestmark = pytest.mark.usefixtures("free_memory")


def our(folder, part: str):
    """One of our models loaded from ``folder`` (the other two are dropped at once)."""
    model = load_sd15(folder)[part]
    gc.collect()
    return model


@pytest.fixture(scope="module")
def single_file(full, tmp_path_factory):
    """The reference weights in the original single-file layout, written once; only the path is
    kept, and the file (4.3 GB) goes when the module is done."""
    checkpoint, _ = read_sd15(full.folder)
    state = {}
    for key, value in checkpoint.tensors.items():
        ours, original = next((o, s) for o, s in SINGLE_FILE_PREFIX.items() if key.startswith(o))
        state[original + key[len(ours):]] = value
    path = tmp_path_factory.mktemp("single") / "v1-5.safetensors"
    save_file(state, path)
    del checkpoint, state, value
    gc.collect()
    yield path
    path.unlink()


def single_file_part(path, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one model (``prefix``) from the single file, read with safetensors (and cast
    to ``dtype`` one at a time)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_tensor(key) if dtype is None else f.get_tensor(key).to(dtype)
                for key in f.keys() if key.startswith(prefix)}


@pytest.fixture(scope="module")
def converted(full, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "sd15.safetensors"
    assert convert_main(["sd15", str(full.folder), "-o", str(out)]) == 0
    yield out
    out.unlink()


def max_diff(a, b) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def fingerprint(tensor: torch.Tensor) -> tuple:
    """dtype, shape and a SHA-256 of the bytes: equal fingerprints are equal tensors, bit for bit."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return tensor.dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def ours(full) -> dict:
    """Our models loaded from the diffusers folder, as fingerprints of every weight (as loaded, and
    cast to fp16 and back), so that the weight tests hold one full-size model at a time."""
    exact, fp16 = {}, {}
    for part, model in load_sd15(full.folder).items():
        for key, value in model.state_dict().items():
            exact[f"{part}.{key}"] = fingerprint(value)
            fp16[f"{part}.{key}"] = fingerprint(value.to(torch.float16).float())
    del model, value
    gc.collect()
    return {None: exact, torch.float16: fp16}


def assert_same_weights(models, reference, cast=None):
    """Every weight of ``models`` equals (bit for bit) ours from the diffusers folder, cast to
    ``cast`` and back first if given."""
    expected = reference[cast]
    for part, model in models.items():
        for key, value in model.state_dict().items():
            assert fingerprint(value) == expected[f"{part}.{key}"], f"{part}.{key}"


@torch.no_grad()
def test_text_encoder(full):
    ids = full.tokenizer(["a photograph of an astronaut riding a horse", ""], padding="max_length", max_length=77,
                         truncation=True, return_tensors="pt").input_ids
    theirs = full.load_text_encoder()
    expected = theirs(ids).last_hidden_state
    del theirs
    gc.collect()
    error = max_diff(our(full.folder, "text_encoder")(ids), expected)
    print(f"text encoder max abs error {error:.2e}")
    assert error <= TOL


@torch.no_grad()
def test_unet(full):
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 768, generator=g)
    t = torch.tensor([981, 21])
    theirs = full.load_unet()
    expected = theirs(x, t, encoder_hidden_states=context).sample
    del theirs
    gc.collect()
    error = max_diff(our(full.folder, "unet")(x, t, context), expected)
    print(f"UNet max abs error {error:.2e} (output std {expected.std():.3f})")
    assert error <= TOL


@torch.no_grad()
def test_vae(full):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    theirs = full.load_vae()
    expected = theirs.encode(image).latent_dist.mean * 0.18215
    expected_decoded = theirs.decode(latents / 0.18215).sample
    del theirs
    gc.collect()
    vae = our(full.folder, "vae")
    encode_error = max_diff(vae.encode(image), expected)
    decode_error = max_diff(vae.decode(latents), expected_decoded)
    print(f"VAE encode max abs error {encode_error:.2e}, decode {decode_error:.2e}")
    assert encode_error <= TOL and decode_error <= TOL


def test_single_file_is_what_diffusers_reads(full, single_file):
    """diffusers' own converter turns our single file back into exactly the reference weights.
    One model at a time: its part of the file, the converted dict and the reference model."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)
    convert = {
        "unet": lambda state, model: convert_ldm_unet_checkpoint(state, dict(model.config)),
        "vae": lambda state, model: convert_ldm_vae_checkpoint(state, dict(model.config)),
        "text_encoder": lambda state, model: {k.removeprefix("text_model."): v
                                              for k, v in convert_ldm_clip_checkpoint(state).items()},
    }
    for part, prefix in zip(convert, SINGLE_FILE_PREFIX.values()):
        model = getattr(full, f"load_{part}")()
        converted = convert[part](single_file_part(single_file, prefix), model)
        reference = model.state_dict()
        assert converted.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(converted[key].reshape(value.shape), value), key
        del model, converted, reference, value
        gc.collect()


def test_single_file_safetensors_loads_same_weights(ours, single_file):
    assert_same_weights(load_sd15(single_file), ours)


def test_pickled_fp16_ckpt_with_extras_loads(ours, single_file, tmp_path):
    """A .ckpt as people have them: state_dict wrapper, fp16, EMA copies, schedule buffers, position_ids."""
    state = {k: v for prefix in SINGLE_FILE_PREFIX.values()
             for k, v in single_file_part(single_file, prefix, torch.float16).items()}
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    state["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "v1-5.ckpt"
    torch.save({"state_dict": state, "global_step": 840000}, path)
    del state
    gc.collect()
    try:
        assert_same_weights(load_sd15(path), ours, cast=torch.float16)
    finally:
        path.unlink()  # 2.1 GB: tmp_path folders stay until the session ends


def test_converted_file_loads_same_weights(ours, converted):
    assert_same_weights(load_sd15(converted), ours)


def image_array(path) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@torch.no_grad()
def test_end_to_end_matches_diffusers_from_every_format(full, converted, single_file, tmp_path):
    """The sample command gives diffusers' image (≤ 2/255) from the converted file, the original
    single file and the diffusers folder, and the same bits from all three."""
    args = ["--prompt", "a red bicycle", "--negative-prompt", "blurry", "--steps", "3", "--seed", "42",
            "--width", "128", "--height", "128", "--no-progress"]
    outputs = []
    for name, model in (("converted", converted), ("single", single_file), ("diffusers", full.folder)):
        out = tmp_path / f"{name}.png"
        assert sample.main(["--model", str(model), "--out", str(out), *args]) == 0
        outputs.append(image_array(out))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])

    pipe = ref.diffusers_pipeline(full.load_unet(), full.load_vae(), full.load_text_encoder(), full.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red bicycle", negative_prompt="blurry", num_inference_steps=3, width=128, height=128,
                  generator=torch.Generator("cpu").manual_seed(42)).images[0]
    del pipe
    gc.collect()
    diff = np.abs(outputs[0] - np.asarray(theirs).astype(np.int16)).max()
    print(f"end-to-end max pixel difference {diff}/255; image std {outputs[0].std():.1f}")
    assert diff <= 2
    assert outputs[0].std() > 5  # a real image, not a flat or saturated one

