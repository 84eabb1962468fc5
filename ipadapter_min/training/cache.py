"""``--cache DIR``: the frozen encoders' outputs for every training image, computed once.

Per image, ``<index>.safetensors`` holds the VAE's latent mean and std (so that every step still
draws its own latent sample, as training from images does) and the image encoder's features (the
embedding, or the penultimate hidden states for plus / full-face), fp32. Epochs after the first
skip the VAE encoder and the image encoder entirely. ``cache.json`` records what the entries
depend on (data, resolution, weights, variant, precision); a cache made for other inputs is
refused rather than silently reused. An interrupted build goes on where it stopped.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm.auto import tqdm

from ..formats.files import save_safetensors, write_atomically
from .data import Pair, PairDataset
from .recipe import FrozenEncoders

MANIFEST = "cache.json"


def file_fingerprint(path: Path) -> list:
    """Name, size and modification time of a file, or of every file in a folder: cheap, and
    changes when the weights are replaced."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [[str(p.relative_to(path) if path.is_dir() else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


class TrainingCache:
    def __init__(self, folder: Path, pairs: list[Pair], inputs: dict):
        """``inputs``: what the entries depend on besides the pairs (resolution, fingerprints, …)."""
        self.folder, self.pairs = Path(folder), pairs
        self.key = {"format": "ipadapter_min.training_cache", "version": 1, **inputs,
                    "pairs": [[str(p.image), file_fingerprint(p.image)[0][1:]] for p in pairs]}

    def entry(self, index: int) -> Path:
        return self.folder / f"{index:08d}.safetensors"

    def check_manifest(self, write: bool) -> None:
        """Refuse a folder made for other inputs; write the manifest (one process) if it is new."""
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                found = json.loads(manifest.read_text())
            except json.JSONDecodeError:
                found = None
            if found != self.key:
                changed = sorted(k for k in self.key if not isinstance(found, dict) or found.get(k) != self.key[k])
                raise ValueError(f"--cache {self.folder} was made for other inputs (differs in: {', '.join(changed)}); "
                                 f"give an empty or new folder")
        elif self.folder.exists() and any(self.folder.iterdir()):
            raise ValueError(f"--cache {self.folder} is not empty and has no {MANIFEST}: give an empty or new folder")
        elif write:
            write_atomically(manifest, lambda tmp: Path(tmp).write_text(json.dumps(self.key)))

    @torch.no_grad()
    def build(self, encoders: FrozenEncoders, resolution: int, batch_size: int, rank: int = 0, world_size: int = 1,
              progress: bool = True) -> None:
        """Encode the images without an entry (this process's share of them) and write their entries.
        A damaged image gets an entry that says so, and is skipped by training."""
        if rank == 0:
            self.check_manifest(write=True)
        if dist.is_initialized():
            dist.barrier()
        self.check_manifest(write=False)
        todo = [i for i in range(rank, len(self.pairs), world_size) if not self.entry(i).is_file()]
        images = PairDataset(self.pairs, resolution, encoders.image_encoder.config.image_size)
        bar = tqdm(total=len(todo), desc="caching encoder outputs", unit="image", disable=not progress)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            items = [images[i] for i in chunk]
            good = [(i, item) for i, item in zip(chunk, items) if item is not None]
            for i, item in zip(chunk, items):
                if item is None:
                    save_safetensors({}, self.entry(i), {"skipped": f"{self.pairs[i].image}: not a readable image"})
            if good:
                mean, std = encoders.latent_moments(torch.stack([item["pixels"] for _, item in good]))
                features = encoders.image_features(torch.stack([item["clip_pixels"] for _, item in good]))
                for row, (i, _) in enumerate(good):
                    tensors = {"mean": mean[row], "std": std[row], "features": features[row]}
                    save_safetensors({k: v.cpu() for k, v in tensors.items()}, self.entry(i), {})
            bar.update(len(chunk))
        bar.close()
        if dist.is_initialized():
            dist.barrier()


class CachedDataset(torch.utils.data.Dataset):
    """Item i: the cached (mean, std, features) of image i and its caption; None for a damaged image."""

    def __init__(self, cache: TrainingCache):
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache.pairs)

    def __getitem__(self, index: int) -> dict | None:
        with safe_open(self.cache.entry(index), framework="pt") as f:
            if "skipped" in (f.metadata() or {}):
                return None
            item = {k: f.get_tensor(k) for k in ("mean", "std", "features")}
        return {"index": index, "text": self.cache.pairs[index].text, **item}
