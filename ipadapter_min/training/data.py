"""Image/caption pairs for training and evaluation, and the reference's image transforms.

Three layouts are read: the official JSON list of ``{"image_file": ..., "text": ...}`` (paths
relative to a data root), a folder of images each with a ``.txt`` caption beside it (the
convention of the usual trainers), and COCO's captions file (evaluation). Everything that can be checked before training is checked
here, so that a bad dataset fails in seconds with a one-line error rather than hours in.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..formats.files import FileFormatError, one_line, shown
from ..models.clip_preprocess import preprocess

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Pair:
    image: Path
    text: str


def read_pairs(data: str | Path, root: str | Path | None = None, flag: str = "--data") -> list[Pair]:
    """The pairs of a JSON file (image paths joined to ``root``, default the JSON's folder) or of
    a folder of images with ``.txt`` captions. Every image must exist; a ValueError names the first
    problem (``flag`` says which option the path came from)."""
    data = Path(data)
    if data.is_dir():
        if root is not None:
            raise FileFormatError(f"{flag} {data} is a folder of images with .txt captions: --data-root applies to a JSON file")
        return _folder_pairs(data, flag)
    if not data.is_file():
        raise FileFormatError(f"{flag} {data}: no such file or folder")
    root = data.parent if root is None else Path(root)
    if not root.is_dir():
        raise FileFormatError(f"--data-root {root}: no such folder")
    try:
        entries = json.loads(data.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise FileFormatError(f"{flag} {data}: not a JSON file ({one_line(exc)})") from None
    if not isinstance(entries, list):
        raise FileFormatError(f"{flag} {data}: expected a JSON list of {{\"image_file\": ..., \"text\": ...}}, "
                         f"got a {type(entries).__name__}")
    pairs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image_file"), str):
            raise FileFormatError(f"{flag} {data}: entry {i} has no \"image_file\" string: {json.dumps(entry)[:80]}")
        text = entry.get("text", "")
        if not isinstance(text, str):
            raise FileFormatError(f"{flag} {data}: entry {i} ({shown(entry['image_file'])}) has a \"text\" that is not a string")
        image = root / entry["image_file"]
        if not image.is_file():
            raise FileFormatError(f"{flag} {data}: entry {i}: image {shown(str(image))} not found")
        pairs.append(Pair(image, text))
    if not pairs:
        raise FileFormatError(f"{flag} {data}: no image/caption pairs")
    return pairs


def read_coco(captions: Path, images: Path) -> list[Pair]:
    """COCO's captions file ({"images": [{id, file_name}], "annotations": [{image_id, caption}]}):
    one pair per captioned image, its first caption, in image-id order."""
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
        first = {}
        for note in data["annotations"]:
            first.setdefault(note["image_id"], note["caption"].strip())
        files = sorted((entry["id"], entry["file_name"]) for entry in data["images"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(f"--coco-captions {captions}: not a readable JSON file ({exc})") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise FileFormatError(f"--coco-captions {captions}: not a COCO captions file (missing or bad {exc})") from None
    pairs = [Pair(images / name, first[image_id]) for image_id, name in files if image_id in first]
    if not pairs:
        raise FileFormatError(f"--coco-captions {captions}: no captioned images")
    return pairs


def _folder_pairs(folder: Path, flag: str) -> list[Pair]:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise FileFormatError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
    pairs = []
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise FileFormatError(f"{flag} {folder}: image {image.name} has no caption file {caption.name} beside it")
        pairs.append(Pair(image, caption.read_text(encoding="utf-8").strip()))
    return pairs


def check_images(pairs: list[Pair], flag: str = "--data") -> None:
    """Open every image's header (cheap: no pixels are decoded): an unreadable file is named
    before any work. Images that are damaged further in are found when read, and skipped."""
    for pair in pairs:
        try:
            with Image.open(pair.image) as image:
                image.size  # noqa: B018 - the header is parsed by open
        except (OSError, Image.DecompressionBombError) as exc:
            raise FileFormatError(f"{flag}: {pair.image} is not a readable image ({exc})") from None


def open_rgb(path: Path) -> Image.Image:
    """The whole image decoded (a damaged file raises OSError here, not later) and converted to RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def vae_pixels(image: Image.Image, resolution: int) -> torch.Tensor:
    """The reference's UNet-side transform: short side to ``resolution`` (bilinear), centre crop,
    [-1, 1]; as torchvision's Resize, CenterCrop, ToTensor and Normalize([0.5], [0.5]) do it."""
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left, top = int(round((size[0] - resolution) / 2.0)), int(round((size[1] - resolution) / 2.0))
    image = image.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    return (x - 0.5) / 0.5


class PairDataset(torch.utils.data.Dataset):
    """Item i: the VAE pixels and the CLIP pixels of image i (both from the same raw image, as the
    reference) and its caption; None when the image cannot be decoded (counted by the caller).
    ``clip_size``: the image encoder's input size (its ``config.image_size``; 224 for the releases')."""

    def __init__(self, pairs: list[Pair], resolution: int, clip_size: int = 224):
        self.pairs, self.resolution, self.clip_size = pairs, resolution, clip_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict | None:
        pair = self.pairs[index]
        try:
            image = open_rgb(pair.image)
        except (OSError, Image.DecompressionBombError, SyntaxError):
            return None
        return {"index": index, "pixels": vae_pixels(image, self.resolution),
                "clip_pixels": preprocess(image, size=self.clip_size)[0], "text": pair.text}


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of epoch ``epoch``: a function of (seed, epoch) alone."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


class RankBatches(torch.utils.data.Sampler):
    """The distributed sampler: the stream of samples is the epochs' shuffled orders one after
    another; micro-step m takes the next ``batch_size · world_size`` of them (its global batch)
    and process ``rank`` the ``batch_size`` at its place in it. So one process with batch 2B and
    two processes with batch B see the same global batches, and a run resumed at any step reads
    on exactly where it stopped. Yields one list of dataset indices per micro-step."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start_micro_step: int,
                 micro_steps: int):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start, self.stop = seed, start_micro_step, start_micro_step + micro_steps

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        orders: dict[int, torch.Tensor] = {}
        global_batch = self.batch_size * self.world_size
        for micro in range(self.start, self.stop):
            first = micro * global_batch + self.rank * self.batch_size
            batch = []
            for position in range(first, first + self.batch_size):
                epoch = position // self.n
                if epoch not in orders:
                    orders = {epoch: epoch_order(self.n, self.seed, epoch)}  # only the current epoch is kept
                batch.append(int(orders[epoch][position % self.n]))
            yield batch


def collate(items: list) -> list:
    """Keep each process's micro-batch as a list, damaged images as None: their slots in the
    global batch say which random draws are theirs."""
    return items
