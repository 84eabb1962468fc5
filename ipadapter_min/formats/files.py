"""Reading the checkpoint files people download, and writing ours safely.

Every reader returns a flat ``{key: tensor}`` dict. Pickles are opened with
``torch.load(weights_only=True)`` only: a checkpoint must never run code.

Loading is lean: tensors come back memory-mapped (copy-on-write), not read. A tensor already in
the wanted dtype becomes a parameter without a copy; a loader that casts tensor by tensor calls
:func:`release` on each source once it is copied, which gives its pages back. Peak memory is
then the weights in the target dtype, not that plus the file.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import re
import shutil
import signal
import struct
import tempfile
import threading
import weakref
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER = 100 * 2 ** 20  # bytes: the safetensors format's own bound on its JSON header
_TERMINAL_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# Tensors memory-mapped from a file, by id (a dead tensor leaves by itself).
_FILE_MAPPED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_madvise = getattr(ctypes.CDLL(None), "madvise", None) if hasattr(mmap, "MADV_DONTNEED") else None


class FileFormatError(ValueError):
    """A file made elsewhere (a checkpoint, a picture, a PNG's record, a dataset) that cannot be
    used as what it should be: one line naming the file and the problem. Readers of untrusted
    files raise this, whatever the bytes, never another library's traceback."""


class CheckpointError(FileFormatError):
    """A checkpoint that cannot be used; the message is one line naming the file and the problem."""


@dataclass
class Checkpoint:
    """Tensors renamed to our layout, and where each came from, so that a checker can name the
    file and the file's own key in its error messages."""
    tensors: dict[str, torch.Tensor]
    source: str  # the file or folder the user gave
    origin: dict[str, str] = field(default_factory=dict)  # our key → "file: key 'their key'"
    file_key: Callable[[str], str] = str  # our key → the name a missing key has in the file

    def where(self, key: str) -> str:
        return self.origin.get(key, f"{self.source}: key {key!r}")


def message(exc: BaseException) -> str:
    """An exception's text as one line for a person: the first line, without the terminal colour
    codes torch puts in some of its messages; the exception's type if it has no text."""
    text = _TERMINAL_ESCAPES.sub("", str(exc)).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def shown(text: str) -> str:
    """A name or string from a file, as an error message may quote it: as it is when printable, else
    in quotes with its line breaks and control characters escaped (a message stays one line, and a
    file cannot send escape sequences to the terminal)."""
    return text if text.isprintable() else repr(text)


def one_line(exc: BaseException) -> str:
    """``Type: message``, for quoting another library's exception inside ours."""
    return f"{type(exc).__name__}: {message(exc)}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or pickled checkpoint into a flat dict of memory-mapped tensors.

    A top-level ``state_dict`` wrapper (as Lightning writes) is removed; nested dicts of
    tensors (as the official IP-Adapter ``.bin`` has) are flattened with ``.`` joins.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        try:
            # mmap needs the zip format; older (legacy) pickles load without it.
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as exc:
            raise CheckpointError(f"{path}: not a checkpoint that loads with torch.load(weights_only=True) "
                                  f"({one_line(exc)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
        tensors = _flatten(obj)
        if zipfile.is_zipfile(path):
            _FILE_MAPPED.update((id(tensor), tensor) for tensor in tensors.values())
        return tensors
    raise CheckpointError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors, .ckpt, .bin, .pt)")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} for other files or none)."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    header, _ = _safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: its __metadata__ is not a JSON object of strings")
    return dict(metadata)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, offset of the data): the file starts with the header's length (u64, little-endian),
    then the header as JSON: {key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__"}."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(size - 8, MAX_HEADER):
                raise ValueError(f"header length {length} exceeds the file size {size} or the format's "
                                 f"{MAX_HEADER} bytes")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, struct.error, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(exc)})") from None
    return header, 8 + length


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor a view of one copy-on-write map of the file (one file descriptor, whatever
    the number of tensors)."""
    header, start = _safetensors_header(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    tensors = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape, offsets = list(info["shape"]), list(info["data_offsets"])
            if not all(type(n) is int and n >= 0 for n in shape + offsets) or len(offsets) != 2:
                raise ValueError
            begin, end = (start + n for n in offsets)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: key {key!r} has an unreadable header entry {repr(info)[:80]}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not start <= begin <= end <= size or end - begin != itemsize * math.prod(shape):
            raise CheckpointError(f"{path}: key {key!r} has data offsets {info['data_offsets']} that do not fit "
                                  f"shape {shape} of {info['dtype']} in a file of {size} bytes")
        if end == begin:
            tensors[key] = torch.empty(shape, dtype=dtype)
            continue
        raw = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin)
        if begin % itemsize:  # a view must start on its element size: misaligned bytes are copied
            tensors[key] = raw.clone().view(dtype).reshape(shape)
            continue
        tensors[key] = raw.view(dtype).reshape(shape)
        _FILE_MAPPED[id(tensors[key])] = tensors[key]
    return tensors


def release(tensor: torch.Tensor) -> None:
    """Give back the memory of a source tensor that has been copied (cast or moved). A mapped
    tensor shares one mapping with the whole file, which stays until every tensor from it is gone,
    so its pages are dropped here: they are clean file pages (never written), so nothing is lost;
    touched again, they are read from the file again. Only whole pages inside the tensor are
    dropped, never a neighbour's. Other tensors free their memory when their last reference goes."""
    if _FILE_MAPPED.get(id(tensor)) is not tensor or _madvise is None:
        return
    start, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
    last = (start + size) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_DONTNEED)


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        # Non-tensor leaves (epoch counters, optimizer hyper-parameters) carry no weights.
    return flat


class WriteError(OSError):
    """A file that could not be written (disk full, no permission, …); one line naming it and why."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM during a write, raised as Ctrl-C is, so that the write unwinds and cleans up."""


def write_atomically(path: str | os.PathLike, write: Callable[[str], None], overwrite: bool = False,
                     folder: bool = False) -> None:
    """``write(tmp)`` into a temporary file (or, with ``folder``, a temporary folder) beside
    ``path``, then rename it into place: a crash, a full disk or Ctrl-C never leaves a half-written
    file, and the old one stays whole until the new one is. An existing ``path`` is replaced only
    when asked. Every output of the project is written through here.

    A failure raises :class:`WriteError` naming ``path`` and the cause (whatever ``write`` raised:
    an OSError, safetensors' own error on a full disk), with the temporary removed. SIGINT and
    SIGTERM during the write remove it too, then end the program as they would have."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass --force to overwrite it)")
    if path.exists() and path.is_dir() != folder:
        raise FileExistsError(f"{path} exists and is not a {'folder' if folder else 'file'}")
    tmp = None
    with _terminate_as_interrupt():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            prefix, suffix = f".{path.name}.", ".tmp"
            if folder:
                tmp = tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix)
            else:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
                os.close(fd)
            write(tmp)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, (0o777 if folder else 0o666) & ~umask)  # mkstemp's files are private; outputs are ordinary
            _replace(tmp, path, folder)
        except Exception as exc:
            _remove(tmp)
            raise WriteError(f"{path}: not written ({one_line(exc)})") from None
        except BaseException:
            _remove(tmp)
            raise


def _replace(tmp: str, path: Path, folder: bool) -> None:
    """A file is renamed over the old one in one step; a folder cannot be, so the old one is first
    renamed aside (still whole, under a temporary name), then removed."""
    if not (folder and path.exists()):
        os.replace(tmp, path)
        return
    old = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old")
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old)


def _remove(tmp: str | None) -> None:
    if tmp is None or not os.path.lexists(tmp):
        return
    if os.path.isdir(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.unlink(tmp)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """Inside the block, SIGTERM raises :class:`Interrupted` rather than killing the process with
    the temporary left behind; once the write has unwound, the process ends as SIGTERM ends it.
    Only where SIGTERM has its default action, in the main thread (where signals arrive): a
    runtime with a handler of its own keeps it."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def interrupt(signum, frame):
        raise Interrupted("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except Interrupted:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str],
                     overwrite: bool = False) -> None:
    """Write ``tensors`` to ``path`` atomically, refusing to replace an existing file unless ``overwrite``."""
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata), overwrite)
