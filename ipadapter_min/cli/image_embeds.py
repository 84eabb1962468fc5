"""Precomputed image embeddings (``--save-embeds``, ``--embeds``): diffusers' ip_adapter_image_embeds
layout, negative first, with the adapter and encoder that made them recorded and checked."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..formats.files import CheckpointError, read_metadata, read_state_dict, save_safetensors
from ..models.configs import AdapterSpec

EMBEDS_FORMAT = "ipadapter_min.image_embeds"


def save_image_embeds(path: Path, features: torch.Tensor, spec: AdapterSpec, encoder_name: str,
                      overwrite: bool = False) -> None:
    """(2, images, …) encoder features, negative first, with the adapter and encoder recorded."""
    metadata = {"format": EMBEDS_FORMAT, "adapter": json.dumps({"variant": spec.variant, "encoder": spec.encoder,
                                                                "encoder_output": spec.encoder_output,
                                                                "feature_dim": spec.feature_dim}),
                "image_encoder": encoder_name}
    save_safetensors({"image_embeds": features.detach().float().contiguous().cpu()}, path, metadata, overwrite)


def read_image_embeds(path: Path, spec: AdapterSpec) -> torch.Tensor:
    """Features saved by ``--save-embeds`` (or a one-tensor file of diffusers'
    ip_adapter_image_embeds), checked against the adapter that will use them."""
    tensors, metadata = read_state_dict(path), read_metadata(path)
    if len(tensors) != 1:
        raise CheckpointError(f"--embeds {path}: expected one tensor of image embeddings, found {len(tensors)}")
    (features,) = tensors.values()
    if metadata.get("format") == EMBEDS_FORMAT:
        made_for = recorded_adapter(path, metadata)
        wanted = {"encoder": spec.encoder, "encoder_output": spec.encoder_output, "feature_dim": spec.feature_dim}
        if any(made_for.get(k) != v for k, v in wanted.items()):
            raise CheckpointError(f"--embeds {path}: made for a {made_for['variant']} adapter ({made_for['encoder']} "
                                  f"{made_for['encoder_output']}), not this {spec.variant} one ({spec.encoder} "
                                  f"{spec.encoder_output})")
    expected_ndim = 4 if spec.uses_hidden_states else 3
    if features.ndim != expected_ndim or features.shape[0] != 2 or features.shape[-1] != spec.feature_dim:
        raise CheckpointError(f"--embeds {path}: shape {list(features.shape)}, expected (2, images, "
                              f"{'tokens, ' if spec.uses_hidden_states else ''}{spec.feature_dim}) for the "
                              f"{spec.variant} adapter, negative first")
    if not torch.isfinite(features).all():
        raise CheckpointError(f"--embeds {path}: the embeddings hold values that are not finite numbers")
    return features.float()


def recorded_adapter(path: Path, metadata: dict[str, str]) -> dict[str, str]:
    """What the embeds file says it was made for: only compared with the adapter in use."""
    try:
        made_for = json.loads(metadata["adapter"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        made_for = None
    if not (isinstance(made_for, dict) and all(isinstance(made_for.get(k), str) for k in
                                               ("variant", "encoder", "encoder_output"))):
        raise CheckpointError(f"--embeds {path}: its metadata 'adapter' is not the JSON --save-embeds writes")
    return made_for
