"""LoRA files (low-rank weight updates for SD1.5's UNet and text encoder) → updates of our weights.

A LoRA holds, for some linear and convolution layers, two factors: ``down`` (rank × inputs, for a
convolution rank × inputs × the layer's kernel) and ``up`` (outputs × rank, a 1×1 kernel for a
convolution), and perhaps ``alpha``. Merged with weight w, a layer's weight W becomes

    W + w · alpha / rank · up @ down        (convolutions: up's 1×1 kernel times down's kernel)

Three layouts name the same layers (``<diffusers name>``: the layer's name in diffusers'
UNet2DConditionModel or transformers' CLIPTextModel, e.g. ``down_blocks.0.attentions.0.proj_in``):

| layout | one layer's update | alpha |
|---|---|---|
| kohya-ss / A1111 | ``lora_unet_<diffusers name>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``, ``.`` written ``_``; the UNet's original names (``lora_unet_input_blocks_1_1_proj_in``) as A1111 and ComfyUI read them too; ``lora_te_text_model_<name>`` | the ``.alpha`` tensor; none: the rank |
| diffusers (peft) | ``unet.<diffusers name>.lora_A.weight``, ``.lora_B.weight``; ``text_encoder.[text_model.]<name>`` | the file's ``lora_adapter_metadata`` (peft's LoraConfig per part: ``unet.lora_alpha``, ``unet.alpha_pattern``, ``unet.use_rslora``); none: the rank |
| diffusers before peft | ``unet.<diffusers name>.lora.down.weight``, ``.lora.up.weight``; ``text_encoder.<name>.lora_linear_layer.down.weight``, ``.up.weight`` | the rank |

kohya's LoCon (conv LoRA) updates the resnets' 3×3 convolutions, the down/upsamplers and the 1×1
shortcuts and projections with the same keys. Readers know names and shapes only: the layers a
LoRA may touch come from ``loading`` as our weight keys with their shapes.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from ..models.configs import UNetConfig
from .files import CheckpointError, read_metadata, read_state_dict
from .sd15 import rename, unet_table

# The end of a key → the part of a layer's update it holds (longest first when matching).
SUFFIXES = {
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",  # kohya-ss
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # peft (diffusers)
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers' UNet before peft
    ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",  # its text encoder
}
PARTS = ("unet", "text_encoder")  # the models a LoRA updates
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' key in the safetensors metadata
DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")  # in a LoRA folder
# Keys only an SDXL LoRA has: its second text encoder, its added (size and crop) conditioning.
SDXL_MARKERS = ("lora_te1_", "lora_te2_", "text_encoder_2.", "add_embedding", "label_emb")
SDXL_CONTEXT = 2048  # SDXL's cross-attention context width (both text encoders' outputs)


@dataclass
class LayerUpdate:
    """One layer's low-rank update: ``key`` is our weight's (``unet.…weight``), ``scale`` alpha/rank."""
    key: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    source: str  # "file: key 'their key'" for messages

    def delta(self, shape: torch.Size, device: torch.device | str = "cpu") -> torch.Tensor:
        """up @ down (unscaled) in float32, in the layer's weight shape."""
        up = self.up.to(device=device, dtype=torch.float32).flatten(1)
        down = self.down.to(device=device, dtype=torch.float32).flatten(1)
        return (up @ down).reshape(shape)


def underscored(name: str) -> str:
    return name.replace(".", "_")


def to_diffusers_table(cfg: UNetConfig) -> list[tuple[str, str]]:
    """``sd15.unet_table`` read the other way: (our, i.e. the original, prefix, diffusers' prefix)."""
    table = [(ours, theirs) for theirs, ours in unet_table(cfg)]
    if len({ours for ours, _ in table}) != len(table):
        raise AssertionError("sd15.unet_table maps two diffusers names to one of ours")
    return table


def file_names(part: str, module: str, to_diffusers: list[tuple[str, str]]) -> list[str]:
    """The names a LoRA file gives the update of our module ``part.module`` (before the suffix);
    ``to_diffusers``: :func:`to_diffusers_table` (``input_blocks.1.1.proj_in`` →
    ``down_blocks.0.attentions.0.proj_in``)."""
    if part == "unet":
        theirs = rename(module + ".", to_diffusers)[:-1]
        return [f"lora_unet_{underscored(theirs)}", f"lora_unet_{underscored(module)}", f"unet.{theirs}"]
    # our text encoder's names are transformers' without "text_model."
    return [f"lora_te_text_model_{underscored(module)}", f"text_encoder.text_model.{module}", f"text_encoder.{module}"]


def name_table(targets: Mapping[str, torch.Size], cfg: UNetConfig) -> dict[str, str]:
    """{a file's name for a layer: our weight key} for every linear and convolution weight in
    ``targets`` (our ``unet.*`` and ``text_encoder.*`` keys with their shapes)."""
    table, to_diffusers = {}, to_diffusers_table(cfg)
    for key, shape in targets.items():
        part, _, name = key.partition(".")
        if part not in PARTS or not name.endswith(".weight") or len(shape) not in (2, 4) or "embedding" in name:
            continue  # norms are vectors; token and position embeddings are not layers LoRAs touch
        for file_name in dict.fromkeys(file_names(part, name.removesuffix(".weight"), to_diffusers)):
            if table.setdefault(file_name, key) != key:
                raise AssertionError(f"LoRA name {file_name!r} would stand for {table[file_name]} and {key}")
    return table


def lora_file(path: Path) -> Path:
    """A LoRA file, or the folder diffusers' save_lora_weights writes."""
    if path.is_dir():
        found = [path / name for name in DIFFUSERS_FILES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: a folder without {DIFFUSERS_FILES[0]} (or .bin)")
        return found[0]
    return path


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name, part of the update) of a file's key; None for a key of no known layout."""
    for suffix in sorted(SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], SUFFIXES[suffix]
    return None


def refuse_sdxl(keys: list[str], path: Path) -> None:
    marked = next((k for k in keys if any(m in k for m in SDXL_MARKERS)), None)
    if marked is None:  # SD1.5 has one transformer block per attention; SDXL up to ten
        marked = next((k for k in keys if re.search(r"transformer_blocks[._][1-9]", k)), None)
    if marked is not None:
        raise CheckpointError(f"{path}: this looks like a LoRA for SDXL (key {marked!r}); only SD1.x LoRAs are supported")


def peft_scales(metadata: dict[str, str], path: Path) -> dict[str, dict]:
    """diffusers' peft config of each part from the file's metadata ({} where there is none)."""
    if PEFT_METADATA not in metadata:
        return {}
    try:
        flat = json.loads(metadata[PEFT_METADATA])
        assert isinstance(flat, dict)
    except (json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{path}: metadata {PEFT_METADATA} is not a JSON object") from None
    configs = {part: {k[len(part) + 1:]: v for k, v in flat.items() if k.startswith(part + ".")} for part in PARTS}
    for part, config in configs.items():
        if config.get("use_dora"):
            raise CheckpointError(f"{path}: a DoRA ({part}.use_dora); only plain LoRAs are supported")
    return configs


def peft_alpha(config: dict, module: str) -> float | None:
    """peft's alpha of a module: the first ``alpha_pattern`` entry that names the end of its name
    (peft's rule), else ``lora_alpha``. peft reads a pattern as a regular expression; here it is
    matched as the module name it is in the files diffusers writes, because a pattern from a
    file run as a regex could take minutes to match (catastrophic backtracking)."""
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise ValueError("alpha_pattern is not a JSON object")
    for pattern, alpha in patterns.items():
        if module == pattern.lstrip("^") or module.endswith("." + pattern.lstrip("^")):
            return finite_alpha(alpha)
    alpha = config.get("lora_alpha")
    return None if alpha is None else finite_alpha(alpha)


def finite_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"a LoRA alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def read_lora(path: str | Path, targets: Mapping[str, torch.Size], cfg: UNetConfig) -> list[LayerUpdate]:
    """A LoRA file's updates of ``targets`` (our weight keys → shapes, see :func:`name_table`),
    checked: a one-line CheckpointError names the file and the keys that match no layer, a layer
    given twice, a missing factor or a shape that does not fit."""
    path = lora_file(Path(path))
    tensors, metadata = read_state_dict(path), read_metadata(path)
    refuse_sdxl(list(tensors), path)
    table, configs = name_table(targets, cfg), peft_scales(metadata, path)
    layers: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unmatched = []
    for key, value in tensors.items():
        split = split_key(key)
        if split is None or split[0] not in table:
            unmatched.append(key)
            continue
        name, role = split
        layers.setdefault(table[name], {})
        if role in layers[table[name]]:
            raise CheckpointError(f"{path}: keys {layers[table[name]][role][0]!r} and {key!r} both update {table[name]}")
        layers[table[name]][role] = key, value
    if unmatched:
        shown = ", ".join(repr(k) for k in unmatched[:3]) + (f" and {len(unmatched) - 3} more" if len(unmatched) > 3 else "")
        raise CheckpointError(f"{path}: {len(unmatched)} keys match no layer of SD1.5's UNet or text encoder (a LoRA "
                              f"for another model, or of a kind other than LoRA?): {shown}")
    if not layers:
        raise CheckpointError(f"{path}: no LoRA weights found")
    updates = []
    for ours, parts in layers.items():
        missing = [role for role in ("down", "up") if role not in parts]
        if missing:
            given = (parts.get("down") or parts.get("up") or parts["alpha"])[0]
            raise CheckpointError(f"{path}: key {given!r} has no {missing[0]} factor beside it")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        check_shapes(path, ours, targets[ours], down_key, down, up_key, up)
        for key, factor in ((down_key, down), (up_key, up)):
            if not (factor.is_floating_point() and torch.isfinite(factor).all()):
                raise CheckpointError(f"{path}: key {key!r} holds values that are not finite numbers")
        rank = down.shape[0]
        part = ours.partition(".")[0]
        if "alpha" in parts:
            alpha_key, alpha = parts["alpha"]
            if alpha.numel() != 1 or not torch.isfinite(alpha.float()).all():
                raise CheckpointError(f"{path}: key {alpha_key!r} is not one finite number")
            scale = float(alpha.float().item()) / rank
        else:
            their_name = split_key(down_key)[0].removeprefix(part + ".")
            try:
                alpha = peft_alpha(configs.get(part, {}), their_name)
            except ValueError as exc:
                raise CheckpointError(f"{path}: metadata {PEFT_METADATA}: {exc}") from None
            root = math.sqrt(rank) if configs.get(part, {}).get("use_rslora") else rank
            scale = 1.0 if alpha is None else alpha / root
        updates.append(LayerUpdate(ours, down, up, scale, f"{path}: key {down_key!r}"))
    return updates


def check_shapes(path: Path, ours: str, shape: torch.Size, down_key: str, down: torch.Tensor, up_key: str,
                 up: torch.Tensor) -> None:
    """down: rank × the layer's inputs × its kernel; up: the layer's outputs × rank (× 1 × 1). A
    linear and a 1×1 convolution take each other's factors."""
    outputs, inputs, kernel = shape[0], shape[1], tuple(shape[2:])
    if down.dim() not in (2, 4) or down.shape[1] != inputs:
        context = " (SDXL's cross-attention context)" if down.dim() >= 2 and down.shape[1] == SDXL_CONTEXT else ""
        raise CheckpointError(f"{path}: key {down_key!r} has shape {list(down.shape)}; the layer it updates ({ours}, "
                              f"weight {list(shape)}) takes {inputs} inputs{context}: a LoRA for another base model?")
    down_kernel = tuple(down.shape[2:])
    if down_kernel != kernel and not {down_kernel, kernel} <= {(), (1, 1)}:
        raise CheckpointError(f"{path}: key {down_key!r} has shape {list(down.shape)}, which does not fit the "
                              f"kernel of {ours} (weight {list(shape)})")
    rank = down.shape[0]
    if rank == 0:
        raise CheckpointError(f"{path}: key {down_key!r} has shape {list(down.shape)}: a rank of 0")
    if up.dim() not in (2, 4) or up.shape[0] != outputs or up.shape[1] != rank or any(n != 1 for n in up.shape[2:]):
        raise CheckpointError(f"{path}: key {up_key!r} has shape {list(up.shape)}, expected [{outputs}, {rank}"
                              f"{', 1, 1' if up.dim() == 4 else ''}] for {ours} (weight {list(shape)}) at rank {rank}")


def lora_argument(text: str) -> tuple[Path, float]:
    """``--lora FILE[:WEIGHT]``: the weight is what follows the last ':' when that is a number, or
    when FILE alone does not exist (then it must be one)."""
    path, colon, weight = text.rpartition(":")
    if not colon or (Path(text).exists() and not _is_number(weight)):
        return Path(text), 1.0
    if not _is_number(weight):
        raise ValueError(f"--lora {text}: the weight after ':' must be a number")
    if not math.isfinite(float(weight)):
        raise ValueError(f"--lora {text}: the weight after ':' must be a finite number")
    return Path(path), float(weight)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
