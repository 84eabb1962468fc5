"""The files training writes (``save_official``: ip-adapter.safetensors flat fp32, ip-adapter.bin
nested fp16) are release files: diffusers' ``load_ip_adapter`` reads each one, and its
StableDiffusionPipeline makes the image that our ``python -m ipadapter_min.sample`` makes from the
same file, within 2/255 per pixel.

Models: SD1.5's structure at a tenth of the width (conftest ``small``: all 16 cross-attention
layers) and a 2-layer ViT-H-width image encoder, random weights; 64×64 px, 3 DDIM steps, fp32, CPU.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import reference_models as ref
from ipadapter_min.cli import sample
from ipadapter_min.formats.ip_adapter import detect_variant, save_official
from ipadapter_min.ip_adapter.adapter import IPAdapter
from ipadapter_min.loading.sd15 import load_sd15
from ipadapter_min.training.recipe import init_ip_layers_from_unet

SIZE, STEPS, SEED = 64, 3, 5
SCALES = (1.0, 0.6)
TOL = 2  # per pixel, of 255: a few fp32 op-order differences flip the rounding of a pixel or two

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(small, tmp_path_factory):
    """A base adapter as training makes it (random projection, ip layers from the UNet's to_k/to_v),
    its ip layers then moved off to_k/to_v so that a layer loaded into the wrong place shows;
    written by save_official, with a reference image beside it."""
    unet = load_sd15(small.folder)["unet"]
    adapter = ref.randomize_(IPAdapter(detect_variant(ref.projection_shapes("base")),
                                       widths=unet.cross_attention_widths()), 1)
    init_ip_layers_from_unet(adapter, unet)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.ip_layers.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std())
    folder = tmp_path_factory.mktemp("trained")
    save_official(adapter.state_dict(), folder)
    ref.sample_images()[0].save(folder / "ref.png")
    return folder


def diffusers_images(small, small_vit_h_folder, folder, weight_name) -> dict[float, np.ndarray]:
    """diffusers' image without an adapter (key None) and with the file at each of SCALES."""
    from transformers import CLIPImageProcessor
    pipe = ref.diffusers_pipeline(small.load_unet(), small.load_vae(), small.load_text_encoder(), small.tokenizer,
                                  image_encoder=ref.load_hf_image_encoder(small_vit_h_folder),
                                  feature_extractor=CLIPImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    common = dict(num_inference_steps=STEPS, width=SIZE, height=SIZE)
    out = {None: pipe("", generator=torch.Generator("cpu").manual_seed(SEED), **common).images[0]}
    pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name)
    image = Image.open(folder / "ref.png")
    for scale in SCALES:
        pipe.set_ip_adapter_scale(scale)
        out[scale] = pipe("", ip_adapter_image=[[image]], generator=torch.Generator("cpu").manual_seed(SEED),
                          **common).images[0]
    return {k: np.asarray(v).astype(np.int16) for k, v in out.items()}


def our_image(small, small_vit_h_folder, folder, weight_name, scale, out) -> np.ndarray:
    """The sample command, run in-process, and its PNG read back."""
    assert sample.main(["--model", str(small.folder), "--ip-adapter", str(folder / weight_name),
                        "--image-encoder", str(small_vit_h_folder), "--image", str(folder / "ref.png"),
                        "--prompt", "", "--scale", str(scale), "--width", str(SIZE), "--height", str(SIZE),
                        "--steps", str(STEPS), "--seed", str(SEED), "--no-progress", "--out", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


@torch.no_grad()
@pytest.mark.parametrize("weight_name", ["ip-adapter.safetensors", "ip-adapter.bin"])
def test_written_file_gives_diffusers_image(small, small_vit_h_folder, trained, weight_name, tmp_path):
    theirs = diffusers_images(small, small_vit_h_folder, trained, weight_name)
    for scale in SCALES:
        mine = our_image(small, small_vit_h_folder, trained, weight_name, scale, tmp_path / f"{scale}.png")
        diff = np.abs(mine - theirs[scale]).max()
        change = np.abs(theirs[scale] - theirs[None])
        print(f"\n{weight_name} λ={scale}: max pixel difference {diff}/255; the image prompt changes diffusers' "
              f"image by {change.mean():.1f} on average, {change.max()} at most; image std {mine.std():.1f}")
        assert diff <= TOL
        assert mine.std() > 5 and change.mean() > 1 and change.max() > 10 * TOL  # a real image, and the adapter matters
