"""Reading one model that is not Stable Diffusion itself (a ControlNet, a T2I-Adapter) from the
two layouts every such model shares: a diffusers folder (``config.json`` and
``diffusion_pytorch_model.*``, renamed by the model's prefix table) and the project's converted
file (our names, the config as JSON in the metadata)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

from .files import Checkpoint, CheckpointError, one_line, read_state_dict
from .sd15 import config_from, read_json, rename, weights_file


def read_diffusers_model(folder: Path, config_of: Callable[[dict], object],
                         table_of: Callable[[object], list[tuple[str, str]]]) -> tuple[Checkpoint, object]:
    config_path = folder / "config.json"
    cfg = config_from(config_of, read_json(config_path), config_path)
    weights = weights_file(folder, ("diffusion_pytorch_model",))
    table = table_of(cfg)
    tensors, origin = {}, {}
    for key, value in read_state_dict(weights).items():
        ours = rename(key, table)
        tensors[ours], origin[ours] = value, f"{weights}: key {key!r}"
    return Checkpoint(tensors, str(folder), origin), cfg


def converted_metadata(format_name: str, cfg: object) -> dict[str, str]:
    return {"format": format_name, "config": json.dumps(dataclasses.asdict(cfg))}


def read_converted_model(path: Path, metadata: dict[str, str], config_of_json: Callable[[str], object]
                         ) -> tuple[Checkpoint, object]:
    try:
        cfg = config_of_json(metadata["config"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{path}: metadata config is missing or invalid ({one_line(exc)})") from None
    return Checkpoint(read_state_dict(path), str(path)), cfg
