"""The negative-noise images against ComfyUI_IPAdapter_plus's IPAdapterNoise.make_noise, written
out below from its source (IPAdapterPlus.py; shared/notes/reference-facts-wave2.md §6.4), compared
after the 8-bit rounding ComfyUI's image encoding applies (``round(clip(255·x))``)."""
import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from ipadapter_min.ip_adapter.negative_noise import KINDS, negative_noise


def comfyui_make_noise(type, strength, blur, image_optional=None):
    if image_optional is None:
        image = torch.zeros([1, 224, 224, 3])
    else:
        transforms = T.Compose([
            T.CenterCrop(min(image_optional.shape[1], image_optional.shape[2])),
            T.Resize((224, 224), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        ])
        image = transforms(image_optional.permute([0, 3, 1, 2])).permute([0, 2, 3, 1])
    seed = int(torch.sum(image).item()) % 1000000007
    torch.manual_seed(seed)
    if type == "fade":
        noise = torch.rand_like(image)
        noise = image * (1 - strength) + noise * strength
    elif type == "dissolve":
        mask = (torch.rand_like(image) < strength).float()
        noise = torch.rand_like(image)
        noise = image * (1 - mask) + noise * mask
    elif type == "gaussian":
        noise = torch.randn_like(image) * strength
        noise = image + noise
    elif type == "shuffle":
        transforms = T.Compose([
            T.ElasticTransform(alpha=75.0, sigma=(1 - strength) * 3.5),
            T.RandomVerticalFlip(p=1.0),
            T.RandomHorizontalFlip(p=1.0),
        ])
        image = transforms(image.permute([0, 3, 1, 2])).permute([0, 2, 3, 1])
        noise = torch.randn_like(image) * (strength * 0.75)
        noise = image * (1 - noise) + noise
    noise = torch.clamp(noise, 0, 1)
    if blur > 0:
        if blur % 2 == 0:
            blur += 1
        noise = T.functional.gaussian_blur(noise.permute([0, 3, 1, 2]), blur).permute([0, 2, 3, 1])
    return noise


def picture() -> Image.Image:
    grid = np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((300, 200), Image.BILINEAR)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_image,blur", [(False, 0), (True, 0), (True, 4)])
def test_noise_matches_comfyui(kind, with_image, blur):
    image = picture() if with_image else None
    tensor = None if image is None else torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)[None]
    before = torch.random.get_rng_state()
    theirs = comfyui_make_noise(kind, 0.4, blur, tensor)
    torch.random.set_rng_state(before)
    expected = torch.clip(255.0 * theirs[0], 0, 255).round().to(torch.uint8).numpy()
    ours = negative_noise(kind, 0.4, image, blur)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left as it was
    assert np.array_equal(np.asarray(ours), expected)
    assert np.asarray(ours).std() > 5


def test_kinds_differ_and_bad_input_is_refused():
    outputs = {kind: np.asarray(negative_noise(kind, 0.5, picture())).tobytes() for kind in KINDS}
    assert len(set(outputs.values())) == len(KINDS)
    with pytest.raises(ValueError, match="unknown negative noise 'salt'"):
        negative_noise("salt", 0.5)
    with pytest.raises(ValueError, match=r"noise strength must be in \[0, 1\], got 2"):
        negative_noise("fade", 2)
