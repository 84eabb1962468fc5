"""Training checkpoints: ``OUT/checkpoint-<step>/``, everything ``--resume`` needs to go on bit
for bit, written atomically (a temporary folder renamed into place).

    ip-adapter.safetensors, ip-adapter.bin   the adapter in the release's layouts (fp32 / fp16):
                                             a checkpoint is usable by ``sample`` as it is
    optimizer.pt                             AdamW's state (and the fp16 loss scaler's), read back
                                             with torch.load(weights_only=True)
    state.json                               step, counters and the run's recipe

The data order and every random draw are functions of (seed, step), so no RNG state is stored.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..formats.files import CheckpointError, FileFormatError, one_line, read_state_dict, write_atomically
from ..formats.ip_adapter import save_official, to_project_layout

STATE_FILE, OPTIMIZER_FILE, ADAPTER_FILE = "state.json", "optimizer.pt", "ip-adapter.safetensors"


def checkpoint_folder(out: Path, step: int) -> Path:
    return out / f"checkpoint-{step}"


def save_checkpoint(folder: Path, adapter_state: dict[str, torch.Tensor], optimizer_state: dict, state: dict,
                    overwrite: bool = False) -> None:
    """Write the checkpoint into a temporary folder beside ``folder`` and rename it into place, so
    that an interrupted or failed save leaves the checkpoints before it whole, and no other."""
    def write(tmp: str) -> None:
        save_official(adapter_state, tmp)
        torch.save(optimizer_state, Path(tmp) / OPTIMIZER_FILE)
        (Path(tmp) / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))

    write_atomically(folder, write, overwrite, folder=True)


def saved_steps(out: Path) -> list[int]:
    """The steps of the checkpoints in a run's folder."""
    return [int(m.group(1)) for p in (out.iterdir() if out.is_dir() else [])
            if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / STATE_FILE).is_file()]


def find_checkpoint(path: Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest ``checkpoint-<step>`` inside it."""
    if (path / STATE_FILE).is_file():
        return path
    steps = saved_steps(path)
    if not steps:
        raise ValueError(f"--resume {path}: not a checkpoint folder (no {STATE_FILE}) and no checkpoint-<step> in it")
    return checkpoint_folder(path, max(steps))


def read_state(folder: Path) -> dict:
    """state.json, checked: a checkpoint may have been made elsewhere, and its numbers set where
    training goes on."""
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FileFormatError(f"--resume {folder}: unreadable {STATE_FILE} ({one_line(exc)})") from None
    counters = [state.get(k) for k in ("step", "skipped_images")] if isinstance(state, dict) else [None]
    if not (all(type(n) is int and n >= 0 for n in counters) and isinstance(state.get("recipe"), dict)):
        raise FileFormatError(f"--resume {folder}: {STATE_FILE} is not what training writes (whole step and "
                              "skipped_images counts, and the recipe)")
    return state


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(adapter tensors in our layout, fp32; optimizer state: AdamW's and the loss scaler's; state.json)."""
    state = read_state(folder)
    checkpoint, _ = to_project_layout(read_state_dict(folder / ADAPTER_FILE), folder / ADAPTER_FILE)
    adapter = {k: v.clone() for k, v in checkpoint.tensors.items()}
    try:
        optimizer = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever a damaged pickle raises
        raise CheckpointError(f"{folder / OPTIMIZER_FILE}: not loadable with torch.load(weights_only=True) "
                              f"({one_line(exc)})") from None
    if not (isinstance(optimizer, dict) and all(isinstance(optimizer.get(k), dict) for k in ("optimizer", "scaler"))):
        raise CheckpointError(f"{folder / OPTIMIZER_FILE}: not the optimizer and scaler states training writes")
    return adapter, optimizer, state
