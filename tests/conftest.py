import os

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import reference_models as ref  # noqa: E402

# Triton kernels run through the interpreter where there is no GPU; this must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


class Reference:
    """Reference models with random weights, and where they were written as a diffusers folder."""

    def __init__(self, size: str, folder: Path):
        self.size = size
        self.unet, self.vae, self.text_encoder = ref.make_unet(size), ref.make_vae(size), ref.make_text_encoder(size)
        self.folder = ref.save_diffusers_folder(folder / "diffusers", self.unet, self.vae, self.text_encoder)
        self.tokenizer = ref.clip_tokenizer(folder / "tokenizer")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Reference:
    return Reference(ref.TINY, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> Reference:
    """Full SD1.5 architecture (~1.1 G parameters): built once for the whole session."""
    return Reference(ref.FULL, tmp_path_factory.mktemp("full"))


class ImageEncoderReference:
    """transformers' CLIPVisionModelWithProjection at full ViT-H/14 size with random weights,
    saved as the release's image_encoder folder."""

    def __init__(self, folder: Path):
        from ipadapter_min.image_encoder import ImageEncoderConfig
        self.model = ref.random_hf_model(ImageEncoderConfig.vit_h_14())
        self.folder = folder / "image_encoder"
        self.model.save_pretrained(self.folder)


@pytest.fixture(scope="session")
def vit_h_reference(tmp_path_factory) -> ImageEncoderReference:
    return ImageEncoderReference(tmp_path_factory.mktemp("vit_h"))
