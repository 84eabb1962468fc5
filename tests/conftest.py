import os

# Nothing in the test suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ctypes  # noqa: E402
import gc  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import reference_models as ref  # noqa: E402

# Triton kernels run through the interpreter where there is no GPU; this must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def keep_freed_memory_for_reuse() -> None:
    """glibc serves large blocks with mmap and unmaps them at free, so the buffers oneDNN takes
    for every convolution call (its reordered weights: 59 MB for a 1280-channel 3×3 conv) fault
    in anew each time. At the full-size tests' tiny latents that is most of a UNet call
    (measured: 1.44 s -> 0.65 s at batch 2, 8×8 latents; 1.98 M -> 0.13 M page faults). Blocks
    come from the heap instead, and its top is given back only above 512 MB, so that freeing a
    whole model still returns it. Only where memory comes from changes, not what is computed."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):  # glibc
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 512 << 20)


keep_freed_memory_for_reuse()


_frozen_before = None  # the test module at whose start the collector last froze what was alive


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Each module starts with what earlier ones left frozen out of the garbage collector's way.

    A full collection walks every tracked object: with torch, transformers and diffusers
    imported, half a million, 0.3 s a time, and the full-size tests collect after every test
    (measured over the suite: 56 s in the collector before, 8 s after). At a module's first
    test, before its fixtures are set up (hence tryfirst) and after the last module's are gone,
    what is alive is the imported code and the session's fixtures, which live to the end anyway:
    collected once and frozen (gc.freeze), later collections walk only what was made since.
    Nothing a test or a module fixture makes is frozen, so whatever it leaves in reference cycles
    is still freed."""
    global _frozen_before
    module = getattr(item, "module", None)
    if module is not _frozen_before:
        _frozen_before = module
        gc.collect()
        gc.freeze()


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: they run fastest on one thread, and on a busy shared machine
    several OpenMP threads waiting for each other make them 10-100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_memory():
    """For modules of full-size models: collect garbage after each test, so that a model caught
    in a reference cycle is gone before the next test loads one."""
    yield
    gc.collect()


class Reference:
    """Reference models with random weights, written as a diffusers folder.

    The tiny ones stay in memory (``.unet``, ``.vae``, ``.text_encoder``). The full-size ones
    (4.3 GB in fp32) do not: a session fixture holding them would hold them through every test.
    Tests read a reference model back from the folder with ``load_unet()`` etc. (diffusers' and
    transformers' from_pretrained), for as long as they need it."""

    def __init__(self, size: str, folder: Path):
        self.size = size
        if size == ref.FULL:
            self.folder = ref.write_diffusers_folder(folder / "diffusers", size)
        else:
            self.unet, self.vae, self.text_encoder = ref.make_unet(size), ref.make_vae(size), ref.make_text_encoder(size)
            self.folder = ref.save_diffusers_folder(folder / "diffusers", self.unet, self.vae, self.text_encoder)
        self.tokenizer = ref.clip_tokenizer(folder / "tokenizer")

    def load_unet(self):
        return ref.load_unet(self.folder)

    def load_vae(self):
        return ref.load_vae(self.folder)

    def load_text_encoder(self):
        return ref.load_text_encoder(self.folder)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Reference:
    return Reference(ref.TINY, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> Reference:
    """SD1.5's structure at a tenth of the width (ref.SMALL): every cross-attention layer an
    IP-Adapter has, for training tests."""
    return Reference(ref.SMALL, tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="session")
def small_vit_h_folder(tmp_path_factory) -> Path:
    """transformers' CLIPVisionModelWithProjection (random weights) with ViT-H's widths, which the
    adapters read (1024-wide embedding, 1280-wide hidden states), but 2 layers, as the release's
    image_encoder folder."""
    from ipadapter_min.models.configs import ImageEncoderConfig
    folder = tmp_path_factory.mktemp("small_vit_h") / "image_encoder"
    ref.random_hf_model(ImageEncoderConfig(layers=2, mlp_width=512), seed=7).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def full(tmp_path_factory) -> Reference:
    """Full SD1.5 architecture (~1.1 G parameters): written once for the whole session, kept as
    files only."""
    return Reference(ref.FULL, tmp_path_factory.mktemp("full"))


class ImageEncoderReference:
    """transformers' CLIPVisionModelWithProjection at full ViT-H/14 size with random weights,
    saved as the release's image_encoder folder. The model (2.5 GB) is not kept: ``load()``
    reads it back."""

    def __init__(self, folder: Path):
        from ipadapter_min.models.configs import ImageEncoderConfig
        model = ref.random_hf_model(ImageEncoderConfig.vit_h_14())
        self.folder = folder / "image_encoder"
        model.save_pretrained(self.folder)
        del model
        gc.collect()

    def load(self):
        return ref.load_hf_image_encoder(self.folder)


@pytest.fixture(scope="session")
def vit_h_reference(tmp_path_factory) -> ImageEncoderReference:
    return ImageEncoderReference(tmp_path_factory.mktemp("vit_h"))


FULL_SIZE_FIXTURES = {"full", "vit_h_reference"}  # the session's full-size SD1.5 and ViT-H/14 references


def pytest_collection_modifyitems(items):
    """``python -m pytest -m quick``, the inner loop: every test but those on full-size models (the
    ``*_full.py`` modules, whatever takes a full-size fixture or is marked ``full_size``) and those
    marked ``slow`` (commands and imports in subprocesses, a wheel build, torchrun, a benchmark
    run, compiling, training the demo's models, every Unicode code point)."""
    for item in items:
        full_size = (item.path.stem.endswith("_full") or item.get_closest_marker("full_size")
                     or FULL_SIZE_FIXTURES & set(getattr(item, "fixturenames", ())))
        if not full_size and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.quick)
