"""Reading the checkpoint files people download, and writing ours safely.

Every reader returns a flat ``{key: tensor}`` dict. Pickles are opened with
``torch.load(weights_only=True)`` only: a checkpoint must never run code.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or pickled checkpoint into a flat dict of tensors.

    A top-level ``state_dict`` wrapper (as Lightning writes) is removed; nested dicts of
    tensors (as the official IP-Adapter ``.bin`` has) are flattened with ``.`` joins.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {key: f.get_tensor(key) for key in f.keys()}
        except Exception as exc:  # safetensors raises several types for a bad header
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            # mmap needs the zip format; older (legacy) pickles load without it.
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:
            raise CheckpointError(
                f"{path}: not a checkpoint that loads with torch.load(weights_only=True) ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        return _flatten(obj, path)
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors, .ckpt, .bin, .pt)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _flatten(tree: dict, path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(_flatten(value, path, name + "."))
        # Non-tensor leaves (epoch counters, optimizer hyper-parameters) carry no weights.
    return flat


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, then rename it into place: a crash
    never leaves a half-written file, and an existing file is replaced only when asked."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --force to overwrite it)")
    if path.exists() and not path.is_file():
        raise FileExistsError(f"{path} exists and is not a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; outputs are ordinary files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str],
                     overwrite: bool = False) -> None:
    """Write ``tensors`` to ``path`` atomically, refusing to replace an existing file unless ``overwrite``."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata), overwrite)
